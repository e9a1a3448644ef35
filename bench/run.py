"""keymeter benchmark runner (`make bench`, `make bench-quick`).

What is measured
  Throughput (requests/s), p50/p99 latency (wrk --latency) and Envoy RSS (VmRSS from
  /proc/<pid>/status after each run) for, on the same machine, load generator and
  Envoy build, in the same invocation:
    1  bare      Envoy, direct_response 200 route, no HTTP filter but the router
    2  native    Envoy api_key_auth (1k keys, x-api-key) + local_ratelimit (huge bucket)
    3  trivial   Envoy + a trivial Rust proxy-wasm filter (bench/trivial-filter): wasm floor
    4  km-1k     Envoy + keymeter, 1k keys, plan with a bucket that never throttles,
                 wrk sends one valid key
    4r km-1k-rot same, wrk lua script rotating over 100 valid keys
    5  km-1M     keymeter with 1M keys (--large-keys), one key
    5r km-1M-rot same, rotating over 100 keys
    4m km-nometer keymeter 1k with "metering": {"enabled": false}: the 4/4m ratio is
                 the metering overhead
    4a km-floor  the ablation: keymeter 1k configured down to what a key check cannot
                 do without (metering off, a plan with no limits, only x-keymeter-key-id
                 forwarded): 4a/3 is the floor of a shared-data key check in wasm, and
                 4/4a what limits, metering and the other headers add on top
    5h km-huge   keymeter with 10M keys (full mode; --huge-keys), one key
    6b proxy-bare Envoy proxying to an upstream Envoy (direct_response, on wrk's CPU)
    6  proxy-km  the same with keymeter 1k in front of the router: 6/6b is what the
                 filter costs relative to an ordinary proxied request
    4f           scenario 4 in fleet mode: limits leased from keymeter-limitd + Redis
                 (both pinned to wrk's CPU); 4f/4 CPU per request shows what leasing
                 costs on the request path, and limitd calls/s at full load that the
                 calls follow the refill rate, not the request rate
  and, measured apart (unpinned, wrk -t2, same rounds), the two-worker scaling set:
    3u/3w        trivial filter at --concurrency 1 / 2
    4u/4w        keymeter 1k at --concurrency 1 / 2: 4w/3w and 4w/4u show what the
                 shared-data mutex costs when two workers take it on every request
  Scenarios 1-5 answer from a `direct_response` route, so no backend is involved: we
  measure Envoy + filter, not a Python echo server (which would be the bottleneck).

Method
  - All Envoys run at the same time (idle ones cost nothing measurable), each with
    --concurrency 1 and pinned with taskset to CPU 0; wrk runs pinned to CPU 1 with
    1 thread and a fixed number of connections (default 16) over HTTP/1.1 keep-alive.
    Without taskset or with fewer than 2 CPUs nothing is pinned (recorded in the JSON).
  - Scenarios run one after another in rounds (quick: 1 round of 3 s, full: 5 rounds of
    10 s), the order rotated each round, after a short warm-up per scenario, so that
    drift on a noisy machine spreads over all scenarios. Ratios are computed per round
    (4/3, 4/2, 5/4 throughput; p99 of 4 minus p99 of 3) and reported as min/median/max.
  - Envoy CPU time per request (utime+stime of the Envoy process over the run / requests,
    "CPU us" in the table) is also reported, with the interrupt/softirq time and the
    load from other processes on Envoy's CPU ("other%"): on a shared, noisy machine
    req/s moves with the neighbours, CPU per request much less so.
  - A run counts only if every response was a 2xx (a keymeter 401/429 would be a much
    cheaper request): non-2xx responses are reported and flag the row INVALID.
  - The rotating-key variants call a Lua request() per request on the wrk side; wrk has
    its own CPU so this should not limit them, but compare 4r with 4 with that in mind.
  - 1M-key set: ids random base62, hashes random except for the keys wrk uses (real
    sha256 of real keys); the key set is sent as a staged upload (POST /v1/keyset/uploads,
    PUT .../keys in chunks of 20000 keys, POST .../commit). Push time, RSS before/after, and bytes per key (RSS growth /
    keys: an upper bound, it includes the wasm heap used to parse the document) are
    reported; full mode also times a second full push of the same set (replace: new
    slot, flip, sweep of the old one).
  - 10M-key set (full mode): pushed as a staged upload whose chunks are generated on the
    fly (bench/extra.py), so neither this runner nor the filter ever holds the document;
    push time and RSS per key as for 1M.
  - Revoke latency over 2 workers: 8+ kept-alive connections spread over both workers
    (SO_REUSEPORT; per-worker connection counts from Envoy's stats are reported), 20
    delta revokes; for each, the time from the admin API's 200 until the revoked key is
    refused on every connection (probed one connection after another: an upper bound).
  - Live traffic during a 1M-key push: a separate Envoy with --concurrency 2 (unpinned)
    is loaded once, then re-pushed one-shot (PUT /v1/keyset, one callback) and staged
    (20000-key chunks) while a probe thread sends sequential requests with a valid key
    (new connection each, so about half land on the worker running the push); p50/p99/max
    latency of the probe per push.
  - Delta revoke: POST /v1/keyset/delta revoking one key, timed, then the revoked key is
    sent to the public listener at once and must get 401 (another key still gets 200).
  - Rate-limit accuracy: a separate Envoy with --concurrency 2 (unpinned), plan rate 200
    per 1s burst 50, wrk -t2 -c8 for 10 s (quick 3 s) on one key. Admitted = 2xx counted
    by Envoy (http.public.downstream_rq_2xx), cross-checked with wrk; expected = burst +
    rate * wrk's measured duration; error in %.

Output: a table on stdout, .bench/results.json (latest run) and
.bench/results-<quick|full>.json. Every Envoy and wrk started here is stopped on exit,
error, Ctrl-C, SIGTERM or SIGHUP.

The wasm files are copied to .bench/wasm/ at start (sha256 in the JSON), so a rebuild
during a run does not change the code under test. Stdlib only; reuses
wasm-tests/harness.py and wasm-tests/keys.py.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "wasm-tests"))
sys.path.insert(0, str(ROOT / "bench"))

import extra  # noqa: E402
import fleet  # noqa: E402
import harness  # noqa: E402
import keys as km_keys  # noqa: E402

BENCH_DIR = ROOT / ".bench"
# Paths from the environment (`make bench` sets them) with repo-relative defaults.
ENVOY_BIN = Path(os.environ.get("ENVOY_BIN") or harness.DEFAULT_ENVOY)
KEYMETER_WASM = Path(os.environ.get("KEYMETER_WASM") or harness.DEFAULT_WASM)
TRIVIAL_WASM = Path(os.environ.get("TRIVIAL_WASM")
                    or ROOT / "target" / "trivial-filter" / "wasm32-wasip1" / "release" / "trivial_filter.wasm")
# Envoys load snapshots copied here at start, so a `make wasm` by someone else during a
# run cannot change the code under test half-way.
WASM_DIR = BENCH_DIR / "wasm"
KM_WASM = WASM_DIR / "keymeter.wasm"
TRIVIAL_SNAPSHOT = WASM_DIR / "trivial_filter.wasm"
TOKEN = harness.TEST_ADMIN_TOKEN
BENCH_PATH = "/v1/bench"
HUGE_BUCKET = {"name": "huge", "rate": 100_000_000, "per": "1s", "burst": 100_000_000}
PLANS = {"bench": {"rate_limits": [HUGE_BUCKET]}}
# A run where other processes took more than this share of Envoy's CPU is flagged NOISY.
NOISY_PCT = 20.0
DIRECT_200 = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}


# --------------------------------------------------------------------------- processes

_wrk_procs: set[subprocess.Popen] = set()


def stop_wrk() -> None:
    for p in list(_wrk_procs):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        _wrk_procs.discard(p)


def cleanup() -> None:
    stop_wrk()
    harness.stop_all()
    fleet.stop_all()


atexit.register(cleanup)


def _on_signal(signum, _frame):
    # Unwind normally (finally blocks, atexit) instead of dying with Envoys left behind.
    raise SystemExit(128 + signum)


for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


class PinnedEnvoy(harness.Envoy):
    """harness.Envoy started under `taskset -c <cpus>` (taskset execs Envoy: same pid)."""

    def __init__(self, config, *, cpus: str | None = None, **kw):
        self.cpus = cpus
        super().__init__(config, **kw)

    def command(self) -> list[str]:
        cmd = super().command()
        return ["taskset", "-c", self.cpus, *cmd] if self.cpus else cmd


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_times() -> dict[str, tuple[float, float, float]]:
    """Per-CPU (busy, steal, irq+softirq) seconds from /proc/stat ("cpu" is the total)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *vals = line.split()
        v = [int(x) for x in vals] + [0] * 8
        idle = v[3] + v[4]
        steal = v[7]
        busy = sum(v[:8]) - idle - steal
        out[name] = (busy / _CLK_TCK, steal / _CLK_TCK, (v[5] + v[6]) / _CLK_TCK)
    return out


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- wrk

_UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0, "m": 60_000_000.0}


def _lat_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsable latency {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {"non_2xx": 0, "socket_errors": 0}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", out, re.M)
    if m:
        res["requests"] = int(m.group(1))
        res["duration_s"] = _lat_us(m.group(2) + m.group(3)) / 1e6
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M)
        if m:
            res[f"p{pct}_us"] = _lat_us(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    return res


class Wrk:
    def __init__(self, cpu: str | None, threads: int, connections: int):
        self.cpu = cpu
        self.threads = threads
        self.connections = connections

    def run(self, url: str, duration: float, headers: dict | None = None, script: Path | None = None,
            threads: int | None = None, connections: int | None = None, pin: bool = True,
            watch: PinnedEnvoy | None = None) -> dict:
        """One wrk run; with `watch`, also that Envoy's CPU use over the run."""
        self.watch = watch
        cmd = ["wrk", "-t", str(threads or self.threads), "-c", str(connections or self.connections),
               "-d", f"{max(1, round(duration))}s", "--latency", "--timeout", "5s"]  # whole seconds only
        for k, v in (headers or {}).items():
            cmd += ["-H", f"{k}: {v}"]
        if script:
            cmd += ["-s", str(script)]
        cmd.append(url)
        if pin and self.cpu is not None:
            cmd = ["taskset", "-c", self.cpu, *cmd]
        watch = self.watch
        e0 = proc_cpu_s(watch.pid) if watch else None
        c0, ru0, t0 = cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        _wrk_procs.add(proc)
        try:
            out, _ = proc.communicate(timeout=duration + 30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _wrk_procs.discard(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
        wall = time.monotonic() - t0
        c1, ru1 = cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
        res = parse_wrk(out)
        res["raw"] = out
        wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        res["wrk_cpu_pct"] = round(100 * wrk_cpu / wall, 1)
        res["steal_pct"] = round(100 * (c1["cpu"][1] - c0["cpu"][1]) / wall, 1)
        if watch and e0 is not None:
            e1 = proc_cpu_s(watch.pid)
            if e1 is not None:
                envoy_cpu = e1 - e0
                res["envoy_cpu_pct"] = round(100 * envoy_cpu / wall, 1)
                if res.get("requests"):
                    res["cpu_us_per_req"] = round(envoy_cpu * 1e6 / res["requests"], 2)
                # Envoy's CPU: interrupt/softirq time (mostly loopback TCP of this very
                # load) and the rest that is not Envoy (other processes: noise).
                if watch.cpus and watch.cpus.isdigit() and f"cpu{watch.cpus}" in c1:
                    cpu = f"cpu{watch.cpus}"
                    busy = c1[cpu][0] - c0[cpu][0]
                    irq = c1[cpu][2] - c0[cpu][2]
                    res["irq_pct_on_envoy_cpu"] = round(100 * irq / wall, 1)
                    res["foreign_cpu_pct_on_envoy_cpu"] = round(max(0.0, 100 * (busy - irq - envoy_cpu) / wall), 1)
        return res


def rotate_script(path: Path, key_list: list[str]) -> Path:
    body = ",\n".join(f'  "{k}"' for k in key_list)
    path.write_text(
        "-- wrk: each request carries the next key of the list in x-api-key.\n"
        f"local keys = {{\n{body}\n}}\n"
        "local n = #keys\nlocal i = 0\n"
        "request = function()\n"
        "  i = i % n + 1\n"
        '  return wrk.format(nil, nil, {["x-api-key"] = keys[i]})\n'
        "end\n"
    )
    return path


# --------------------------------------------------------------------------- keys


class KnownKey:
    def __init__(self):
        self.id, self.key = km_keys.make_key()
        self.hash = km_keys.key_hash(self.key)


def keyset_json(version: int, n: int, known: list[KnownKey]) -> bytes:
    """A key-set document with `n` keys (keys.py's format), the `known` ones first."""
    return doc_of(version, keyset_parts(n, known))


def doc_of(version: int, parts: list[str], plans: dict | None = None) -> bytes:
    return ('{"version":%d,"plans":%s,"keys":[' % (version, json.dumps(PLANS if plans is None else plans))).encode() + \
        ",".join(parts).encode() + b"]}"


def keyset_parts(n: int, known: list[KnownKey]) -> list[str]:
    """The JSON objects of `n` keys, the `known` ones first.

    The rest have random ids and random hashes (no key behind them): the filter cannot
    tell, and it keeps generating 1M keys to a few seconds.
    """
    table = bytes((km_keys.BASE62 * 5)[:256], "ascii")
    ids: set[str] = {k.id for k in known}
    parts = [
        f'{{"id":"{k.id}","hash":"{k.hash}","consumer":"c{i % 1000}","plan":"bench"}}'
        for i, k in enumerate(known)
    ]
    need = n - len(known)
    i = len(known)
    while need > 0:
        raw = os.urandom(12 * need).translate(table).decode()
        hashes = os.urandom(32 * need).hex()
        for j in range(need):
            kid = raw[12 * j:12 * j + 12]
            if kid in ids:
                continue
            ids.add(kid)
            parts.append(f'{{"id":"{kid}","hash":"{hashes[64 * j:64 * j + 64]}","consumer":"c{i % 1000}","plan":"bench"}}')
            i += 1
        need = n - len(parts)
    return parts


CHUNK_KEYS = 20000


def staged_push(envoy, version: int, chunks: list[bytes], force: bool = False):
    """A staged upload (POST uploads, PUT keys per chunk, POST commit); returns the
    commit's response (or the first failing one, after aborting)."""
    r = admin_call(envoy, "POST", "/v1/keyset/uploads", None)
    if r.status != 201:
        return r
    base = "/v1/keyset/uploads/" + r.json()["upload_id"]
    for c in chunks:
        r = admin_call(envoy, "PUT", base + "/keys", c)
        if r.status != 200:
            admin_call(envoy, "DELETE", base, None)
            return r
    return admin_call(envoy, "POST", base + "/commit" + ("?force=true" if force else ""),
                      {"version": version, "plans": PLANS})


class LiveProbe:
    """Sequential requests with a valid key on the public listener while a push runs;
    records latencies."""

    def __init__(self, envoy, headers: dict):
        import threading
        self.envoy, self.headers = envoy, headers
        self.lat_ms: list[float] = []
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                ok = harness.http("GET", self.envoy.url(BENCH_PATH), self.headers, timeout=60).status == 200
            except Exception:  # noqa: BLE001 - counted
                ok = False
            self.lat_ms.append((time.perf_counter() - t) * 1000)
            self.errors += 0 if ok else 1

    def __enter__(self):
        self.thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        time.sleep(0.3)
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        lat = sorted(self.lat_ms)
        if not lat:
            return {"requests": 0}
        return {"requests": len(lat), "errors": self.errors, "p50_ms": round(lat[len(lat) // 2], 2),
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2), "max_ms": round(lat[-1], 2)}


def admin_call(envoy, method: str, path: str, body, timeout: float = 900, busy_wait: float = 120):
    """One admin call; a key-set change refused with `409 update-in-progress` (the
    previous push's bounded sweep or another writer still running; nothing changed) is
    sent again after the server's Retry-After, for up to `busy_wait` seconds."""
    deadline = time.monotonic() + busy_wait
    while True:
        r = harness.http(method, envoy.admin_api_url(path), {"authorization": f"Bearer {TOKEN}"}, body,
                         timeout=timeout)
        if not (r.status == 409 and b"update-in-progress" in r.body) or time.monotonic() >= deadline:
            return r
        time.sleep(min(1.0, float(r.headers.get("retry-after", "1") or 1)))


def wait_writable(envoy):
    """Returns once a key-set update could start (the previous push's sweep is done), so
    a timed push measures the push and not the wait: opens and aborts an upload."""
    r = admin_call(envoy, "POST", "/v1/keyset/uploads", None)
    if r.status != 201:
        raise RuntimeError(f"upload begin: HTTP {r.status} {r.text[:200]}")
    admin_call(envoy, "DELETE", "/v1/keyset/uploads/" + r.json()["upload_id"], None)


# --------------------------------------------------------------------------- configs


def base_config(*, wasm: bool = False, admin: bool = False, filter_conf=None, vm_id=harness.WASM_VM_ID,
                wasm_path=harness.DEFAULT_WASM) -> dict:
    ports = {"public_port": harness.free_port(), "envoy_admin_port": harness.free_port()}
    if admin:
        ports["admin_api_port"] = harness.free_port()
    cfg = harness.envoy_config(
        backend_port=9,  # never connected: every public route is a direct_response
        wasm=wasm, admin_listener=admin, filter_conf=filter_conf, wasm_path=wasm_path, vm_id=vm_id,
        extra_routes=[DIRECT_200], **ports,
    )
    # Only the direct_response route on the public listener (no /public/ backend route).
    routes = harness.routes(cfg)
    routes[:] = [DIRECT_200]
    return cfg


def public_filters(cfg: dict) -> list:
    for lst in cfg["static_resources"]["listeners"]:
        if lst["name"] == "public":
            return lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    raise KeyError("public")


def native_config(key_list: list[str]) -> dict:
    cfg = base_config()
    public_filters(cfg)[:0] = [
        {
            "name": "envoy.filters.http.api_key_auth",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                "credentials": [{"key": k, "client": f"c{i % 1000}"} for i, k in enumerate(key_list)],
                "key_sources": [{"header": "x-api-key"}],
                # Like keymeter: tell the backend who called, drop the key.
                "forwarding": {"header": "x-client-id", "hide_credentials": True},
            },
        },
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench_rl",
                "token_bucket": {"max_tokens": 100_000_000, "tokens_per_fill": 100_000_000, "fill_interval": "1s"},
                "filter_enabled": {"runtime_key": "rl_enabled",
                                   "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "filter_enforced": {"runtime_key": "rl_enforced",
                                    "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            },
        },
    ]
    return cfg


def trivial_config() -> dict:
    cfg = base_config()
    public_filters(cfg)[:0] = [harness.wasm_filter({}, TRIVIAL_SNAPSHOT, vm_id="trivial")]
    return cfg


def keymeter_config(filter_conf=None) -> dict:
    return base_config(wasm=True, admin=True, filter_conf=filter_conf or {"role": "filter"}, wasm_path=KM_WASM)


# --------------------------------------------------------------------------- scenarios


class Scenario:
    def __init__(self, name: str, label: str, envoy=None, headers=None, script=None, skip: str | None = None):
        self.name, self.label, self.envoy = name, label, envoy
        self.headers, self.script, self.skip = headers, script, skip
        self.runs: list[dict] = []

    def summary(self) -> dict:
        out: dict = {"label": self.label}
        if self.skip:
            out["skipped"] = self.skip
            return out
        for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req", "envoy_cpu_pct", "wrk_cpu_pct",
                  "irq_pct_on_envoy_cpu", "foreign_cpu_pct_on_envoy_cpu", "steal_pct"):
            vals = [r[k] for r in self.runs if k in r]
            if vals:
                out[k] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
        out["rss_kib"] = max((r["rss_kib"] for r in self.runs if r.get("rss_kib")), default=None)
        out["non_2xx"] = sum(r["non_2xx"] for r in self.runs)
        out["socket_errors"] = sum(r["socket_errors"] for r in self.runs)
        out["runs"] = [{k: v for k, v in r.items() if k != "raw"} for r in self.runs]
        return out


def limitd_calls(d: fleet.Limitd) -> float:
    m = d.metrics()
    return m.get("keymeter_limitd_lease_calls_total", 0) + m.get("keymeter_limitd_take_calls_total", 0)


def log(msg: str) -> None:
    print(msg, flush=True)


def timed(fn):
    t0 = time.perf_counter()
    v = fn()
    return v, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s, short warm-up, no re-push")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float, help="seconds per wrk run")
    ap.add_argument("--warmup", type=float)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--keys", type=int, default=1000, help="key-set size of scenarios 2 and 4")
    ap.add_argument("--large-keys", type=int, help="key-set size of scenario 5 (default 1000000)")
    ap.add_argument("--rotate", type=int, default=100, help="keys in the rotating-key variants")
    ap.add_argument("--huge-keys", type=int,
                    help="key-set size of scenario 5h (default 10000000 in full mode, 0 = skip, quick skips)")
    ap.add_argument("--revokes", type=int, default=20, help="delta revokes timed over 2 workers")
    ap.add_argument("--rl-duration", type=float)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results.json")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (0.0 if args.quick else 3.0)
    large = args.large_keys or 1_000_000
    huge = args.huge_keys if args.huge_keys is not None else (0 if args.quick else 10_000_000)
    rl_duration = args.rl_duration or (3.0 if args.quick else 10.0)

    for what, path in (("envoy", ENVOY_BIN), ("keymeter.wasm", KEYMETER_WASM),
                       ("trivial_filter.wasm", TRIVIAL_WASM)):
        if not Path(path).exists():
            sys.exit(f"{what} missing at {path}: run `make bench` / `make bench-quick`")
    if not shutil.which("wrk"):
        sys.exit("wrk not found: run `make bench-tools`")

    ncpu = os.cpu_count() or 1
    pin = not args.no_pin and ncpu >= 2 and shutil.which("taskset") is not None
    envoy_cpus, wrk_cpu = ("0", "1") if pin else (None, None)
    BENCH_DIR.mkdir(exist_ok=True)
    WASM_DIR.mkdir(exist_ok=True)
    shutil.copyfile(KEYMETER_WASM, KM_WASM)
    shutil.copyfile(TRIVIAL_WASM, TRIVIAL_SNAPSHOT)
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    workroot = BENCH_DIR / "envoy"
    shutil.rmtree(workroot, ignore_errors=True)

    def mk_envoy(cfg, name="probe", concurrency=1, cpus=envoy_cpus, **kw):
        return PinnedEnvoy(cfg, cpus=cpus, concurrency=concurrency, workdir=workroot / name, envoy_bin=ENVOY_BIN,
                           component_log_level="wasm:warn", **kw)

    wrk = Wrk(wrk_cpu, threads=1, connections=args.connections)
    envoy_version = subprocess.run([str(ENVOY_BIN), "--version"], capture_output=True,
                                   text=True).stdout.strip()
    m = re.search(r"version: (\S+)", envoy_version)
    envoy_version = m.group(1) if m else envoy_version
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor())
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "envoy_version": envoy_version,
        "machine": {"nproc": ncpu, "cpu_model": cpu_model, "kernel": platform.release(),
                    "mem_total_kib": int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])},
        "git": git,
        "wasm": {name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                 for name, p in (("keymeter", KM_WASM), ("trivial", TRIVIAL_SNAPSHOT))},
        "method": {"rounds": rounds, "duration_s": duration, "warmup_s": warmup, "wrk_threads": 1,
                   "wrk_connections": args.connections, "envoy_concurrency": 1,
                   "pinning": {"envoy_cpus": envoy_cpus, "wrk_cpu": wrk_cpu} if pin else None,
                   "route": "direct_response 200 (no backend)", "keys": args.keys, "large_keys": large,
                   "rotate_keys": args.rotate},
        "notes": [],
    }
    log(f"keymeter bench ({mode}): {rounds} round(s) x {duration:g}s, wrk -t1 -c{args.connections}, "
        f"Envoy --concurrency 1" + (f", Envoy on CPU {envoy_cpus}, wrk on CPU {wrk_cpu}" if pin else ", unpinned"))
    log("all routes are direct_response 200: the numbers are Envoy + filter, no backend")
    log(f"{envoy_version}; {ncpu} x {cpu_model}; git {git}; wasm bytes: keymeter "
        f"{results['wasm']['keymeter']['bytes']}, trivial {results['wasm']['trivial']['bytes']}")

    # ---- keys
    known = [KnownKey() for _ in range(max(args.rotate, 1) + 2)]
    bench_key, revoke_key, rot_keys = known[0], known[1], known[2:2 + args.rotate]
    small_doc = keyset_json(1, args.keys, known)
    (large_parts, gen_s) = timed(lambda: keyset_parts(large, known))
    large_doc = doc_of(1, large_parts)
    large_chunks = [("[" + ",".join(large_parts[i:i + CHUNK_KEYS]) + "]").encode()
                    for i in range(0, len(large_parts), CHUNK_KEYS)]
    del large_parts
    log(f"generated {large} keys ({len(large_doc) / 2**20:.0f} MiB JSON) in {gen_s:.1f}s")
    script = rotate_script(BENCH_DIR / "rotate.lua", [k.key for k in rot_keys])
    hdr = {"x-api-key": bench_key.key}

    scenarios: list[Scenario] = []
    try:
        # ---- start everything
        e_bare = mk_envoy(base_config(), "bare")
        native_keys = [k.key for k in known] + [km_keys.make_key()[1] for _ in range(args.keys - len(known))]
        e_native = mk_envoy(native_config(native_keys), "native")
        e_trivial = mk_envoy(trivial_config(), "trivial")
        e_km = mk_envoy(keymeter_config(), "keymeter-1k")
        r = admin_call(e_km, "PUT", "/v1/keyset", small_doc)
        if r.status != 200:
            raise RuntimeError(f"1k key-set push failed: {r}")
        e_big = mk_envoy(keymeter_config(), "keymeter-large")
        rss0 = rss_kib(e_big.pid)
        push_info: dict = {"keys": large, "doc_bytes": len(large_doc), "generate_s": round(gen_s, 2),
                           "rss_before_kib": rss0, "method": f"staged upload, {CHUNK_KEYS} keys per chunk",
                           "chunks": len(large_chunks)}
        large_skip = None
        t_push = time.perf_counter()
        try:
            r, push_s = timed(lambda: staged_push(e_big, 1, large_chunks))
            push_info.update(status=r.status, push_s=round(push_s, 2), response=r.text[:300])
            if r.status != 200:
                large_skip = f"{large}-key push failed: HTTP {r.status} {r.text[:200]}"
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            push_info.update(error=repr(e), failed_after_s=round(time.perf_counter() - t_push, 2))
            large_skip = f"{large}-key push failed: {e!r}"
        if not e_big.is_running():
            large_skip = f"Envoy died during the {large}-key push:\n{e_big.log_tail(20)}"
        time.sleep(1)
        rss1 = rss_kib(e_big.pid) if e_big.is_running() else None
        push_info["rss_after_kib"] = rss1
        if rss0 and rss1 and not large_skip:
            push_info["bytes_per_key"] = round((rss1 - rss0) * 1024 / large, 1)
        if not large_skip and not args.quick:
            # A second full push of the same keys (version 2): what a whole-set rotation
            # costs once the set is loaded (writes the other slot, then sweeps the old one).
            try:
                r, push2_s = timed(lambda: staged_push(e_big, 2, large_chunks))
                push_info.update(repush_status=r.status, repush_s=round(push2_s, 2), repush_response=r.text[:300])
                time.sleep(1)
                push_info["rss_after_repush_kib"] = rss_kib(e_big.pid)
            except Exception as e:  # noqa: BLE001
                push_info.update(repush_error=repr(e))
        results["large_push"] = push_info

        # ---- a real upstream: the same filter chain proxying to a second Envoy that
        # answers direct_response (on wrk's CPU, so it does not share the measured one).
        e_upstream = mk_envoy(base_config(), "upstream", cpus=wrk_cpu)
        e_proxy_bare = mk_envoy(extra.proxy_config(base_config, e_upstream.public_port, keymeter=False,
                                                   km_wasm=KM_WASM), "proxy-bare")
        e_proxy_km = mk_envoy(extra.proxy_config(base_config, e_upstream.public_port, keymeter=True,
                                                 km_wasm=KM_WASM), "proxy-keymeter")
        r = admin_call(e_proxy_km, "PUT", "/v1/keyset", small_doc)
        if r.status != 200:
            raise RuntimeError(f"1k key-set push (proxied) failed: {r}")

        # ---- a very large key set, streamed chunk by chunk (never held whole here).
        huge_skip = "not run (quick mode or --huge-keys 0)" if not huge else None
        huge_info: dict = {"keys": huge, "method": f"staged upload, {CHUNK_KEYS} keys per chunk, generated on the fly"}
        e_huge = None
        if huge:
            e_huge = mk_envoy(keymeter_config(), "keymeter-huge")
            rss0h = rss_kib(e_huge.pid)
            try:
                r, push_s = timed(lambda: staged_push(e_huge, 1, extra.chunk_stream(huge, known, CHUNK_KEYS)))
                huge_info.update(status=r.status, push_s=round(push_s, 2), response=r.text[:300])
                if r.status != 200:
                    huge_skip = f"{huge}-key push failed: HTTP {r.status} {r.text[:200]}"
            except Exception as e:  # noqa: BLE001 - reported
                huge_info.update(error=repr(e))
                huge_skip = f"{huge}-key push failed: {e!r}"
            if not e_huge.is_running():
                huge_skip = f"Envoy died during the {huge}-key push:\n{e_huge.log_tail(20)}"
            time.sleep(1)
            rss1h = rss_kib(e_huge.pid) if e_huge.is_running() else None
            huge_info.update(rss_before_kib=rss0h, rss_after_kib=rss1h)
            if rss0h and rss1h and not huge_skip:
                huge_info["bytes_per_key"] = round((rss1h - rss0h) * 1024 / huge, 1)
            log(f"huge push: {huge_info}")
        results["huge_push"] = huge_info

        # ---- live traffic during a 1M-key push: one-shot PUT vs staged upload, on one
        # Envoy with ONE worker, so the public listener shares the worker that applies
        # the push (the worst case; with N workers a push stalls 1/N of connections).
        # A probe sends sequential requests and records their latency.
        live: dict = {"envoy_concurrency": 1, "keys": large, "chunk_keys": CHUNK_KEYS,
                      "probe": "sequential GET with a valid key, new connection per request"}
        e_live = None
        try:
            e_live = mk_envoy(keymeter_config(), "keymeter-live", concurrency=1, cpus=None)
            r = admin_call(e_live, "PUT", "/v1/keyset", large_doc)  # load (not measured)
            if r.status != 200:
                raise RuntimeError(f"load: HTTP {r.status} {r.text[:200]}")
            with LiveProbe(e_live, hdr) as p:
                r, dt = timed(lambda: admin_call(e_live, "PUT", "/v1/keyset", large_doc.replace(
                    b'{"version":1,', b'{"version":2,', 1)))
            live["one_shot"] = {"status": r.status, "push_s": round(dt, 2), **p.summary()}
            wait_writable(e_live)
            with LiveProbe(e_live, hdr) as p:
                r, dt = timed(lambda: staged_push(e_live, 3, large_chunks))
            live["staged"] = {"status": r.status, "push_s": round(dt, 2), **p.summary()}
        except Exception as e:  # noqa: BLE001 - reported
            live["error"] = repr(e)
        finally:
            if e_live:
                e_live.stop()
        results["live_traffic_during_push"] = live
        log(f"live traffic during push: {live}")
        log(f"large push: {push_info.get('status', push_info.get('error'))} in {push_info.get('push_s', '?')}s, "
            f"RSS {rss0} -> {rss1} KiB" + (f", {push_info['bytes_per_key']} B/key" if 'bytes_per_key' in push_info else ""))
        del large_doc, large_chunks

        # ---- fleet mode: the same 1k keys, limits leased from keymeter-limitd + Redis
        # (both on wrk's CPU, so the measured CPU is Envoy's alone).
        fleet_redis = fleet.RedisServer(workroot / "redis", aof=False).start()
        fleet_limitd = fleet.Limitd(fleet_redis.url, workroot / "limitd").start()
        if pin:
            for proc in (fleet_redis.proc, fleet_limitd.proc):
                os.sched_setaffinity(proc.pid, {int(wrk_cpu)})
        fleet_cfg = keymeter_config(fleet.filter_conf(1, timeout_ms=100))
        fleet_cfg["static_resources"]["clusters"].append(fleet.limitd_cluster([fleet_limitd.port]))
        e_fleet = mk_envoy(fleet_cfg, "keymeter-fleet")
        r = admin_call(e_fleet, "PUT", "/v1/keyset", small_doc)
        if r.status != 200:
            raise RuntimeError(f"1k key-set push (fleet) failed: {r}")

        e_nometer = mk_envoy(keymeter_config({"role": "filter", "metering": {"enabled": False}}), "nometer")
        r = admin_call(e_nometer, "PUT", "/v1/keyset", small_doc)
        if r.status != 200:
            raise RuntimeError(f"1k key-set push (metering off) failed: {r}")

        e_floor = mk_envoy(keymeter_config({"role": "filter", "metering": {"enabled": False},
                                            "headers": {"forward": ["key_id"]}}), "floor")
        r = admin_call(e_floor, "PUT", "/v1/keyset", doc_of(1, keyset_parts(args.keys, known), {"bench": {}}))
        if r.status != 200:
            raise RuntimeError(f"1k key-set push (floor) failed: {r}")

        big = "1M" if large == 1_000_000 else f"{large // 1000}k"
        scenarios = [
            Scenario("bare", "1  bare Envoy", e_bare, hdr),
            Scenario("native", f"2  api_key_auth+local_rl ({args.keys // 1000}k)", e_native, hdr),
            Scenario("trivial", "3  trivial wasm filter", e_trivial, hdr),
            Scenario("km", f"4  keymeter {args.keys // 1000}k keys", e_km, hdr),
            Scenario("km_rot", f"4r keymeter {args.keys // 1000}k, {args.rotate} rot.", e_km, script=script),
            Scenario("km_large", f"5  keymeter {big} keys", e_big, hdr, skip=large_skip),
            Scenario("km_large_rot", f"5r keymeter {big}, {args.rotate} rot.", e_big, script=script, skip=large_skip),
            Scenario("km_nometer", f"4m keymeter {args.keys // 1000}k, metering off", e_nometer, hdr),
            Scenario("km_floor", f"4a keymeter {args.keys // 1000}k, floor config", e_floor, hdr),
            Scenario("km_fleet", f"4f keymeter {args.keys // 1000}k, fleet mode", e_fleet, hdr),
            Scenario("km_huge", f"5h keymeter {huge / 1e6:g}M keys", e_huge, hdr, skip=huge_skip),
            Scenario("proxy_bare", "6b bare Envoy -> upstream Envoy", e_proxy_bare, hdr),
            Scenario("proxy_km", f"6  keymeter {args.keys // 1000}k -> upstream", e_proxy_km, hdr),
        ]
        active = [s for s in scenarios if not s.skip]
        for s in scenarios:
            if s.skip:
                log(f"SKIP {s.label}: {s.skip}")

        # Sanity: every scenario answers 200 with its headers before we measure.
        for s in active:
            h = dict(s.headers or {"x-api-key": rot_keys[0].key})
            r = harness.http("GET", s.envoy.url(BENCH_PATH), h)
            if r.status != 200:
                raise RuntimeError(f"{s.label}: sanity request got {r.status}: {r.text[:300]}")

        if warmup > 0:
            for s in active:
                wrk.run(s.envoy.url(BENCH_PATH), warmup, s.headers, s.script)
        for rnd in range(rounds):
            order = active[rnd % len(active):] + active[:rnd % len(active)]
            for s in order:
                calls0 = limitd_calls(fleet_limitd) if s.name == "km_fleet" else 0
                res = wrk.run(s.envoy.url(BENCH_PATH), duration, s.headers, s.script, watch=s.envoy)
                if s.name == "km_fleet":
                    # Calls to limitd per second at full load: bounded by subjects x
                    # refill rate, not by the request rate (one key here).
                    res["limitd_calls_per_s"] = round((limitd_calls(fleet_limitd) - calls0) / duration, 1)
                res["round"] = rnd
                res["rss_kib"] = rss_kib(s.envoy.pid)
                s.runs.append(res)
                bad = "" if res["non_2xx"] == 0 and res["socket_errors"] == 0 else \
                    f"  INVALID non2xx={res['non_2xx']} sockerr={res['socket_errors']}"
                log(f"  round {rnd + 1}/{rounds} {s.label:34s} {res['rps']:8.0f} rps  "
                    f"p50 {res.get('p50_us', 0):6.0f}us  p99 {res.get('p99_us', 0):6.0f}us  "
                    f"envoy {res.get('envoy_cpu_pct', 0):5.1f}% cpu {res.get('cpu_us_per_req', 0):6.2f}us/req  "
                    f"wrk {res['wrk_cpu_pct']:5.1f}%  irq {res.get('irq_pct_on_envoy_cpu', 0):4.1f}%  "
                    f"other {res.get('foreign_cpu_pct_on_envoy_cpu', 0):5.1f}%{bad}")

        # ---- delta revoke: time to apply, then the key must be refused at once.
        deltas = {}
        for name, env, n in (("km", e_km, args.keys), ("km_large", e_big, large)):
            if name == "km_large" and large_skip:
                continue
            version = 3 if name == "km_large" and "repush_s" in results["large_push"] else 2
            doc = {"version": version, "ops": [{"op": "revoke", "id": revoke_key.id}]}
            before = harness.http("GET", env.url(BENCH_PATH), {"x-api-key": revoke_key.key}).status
            r, dt = timed(lambda: admin_call(env, "POST", "/v1/keyset/delta", doc))
            after = harness.http("GET", env.url(BENCH_PATH), {"x-api-key": revoke_key.key}).status
            other = harness.http("GET", env.url(BENCH_PATH), {"x-api-key": bench_key.key}).status
            deltas[name] = {"keys": n, "status": r.status, "seconds": round(dt, 4), "status_before": before,
                            "status_after": after, "other_key_status": other,
                            "ok": r.status == 200 and before == 200 and after == 401 and other == 200}
        results["delta_revoke"] = deltas

        for e in (e_bare, e_native, e_trivial, e_km, e_big, e_nometer, e_floor, e_huge, e_proxy_bare, e_proxy_km, e_upstream,
                  e_fleet):
            if e:
                e.stop()

        # ---- two workers: trivial and keymeter at --concurrency 2, and both at 1, all
        # unpinned with wrk -t2 (there are only 2 CPUs: wrk shares them), in rounds.
        scaling = []
        for name, label, cfg, conc in (("t1", "3u trivial, 1 worker", trivial_config, 1),
                                       ("t2", "3w trivial, 2 workers", trivial_config, 2),
                                       ("k1", "4u keymeter 1k, 1 worker", keymeter_config, 1),
                                       ("k2", "4w keymeter 1k, 2 workers", keymeter_config, 2)):
            env = mk_envoy(extra.spread_over_workers(cfg()), f"scaling-{name}", concurrency=conc, cpus=None)
            if cfg is keymeter_config:
                r = admin_call(env, "PUT", "/v1/keyset", small_doc)
                if r.status != 200:
                    raise RuntimeError(f"scaling push failed: {r}")
            scaling.append(Scenario(name, label, env, hdr))
        for rnd in range(rounds):
            for s in scaling[rnd % len(scaling):] + scaling[:rnd % len(scaling)]:
                res = wrk.run(s.envoy.url(BENCH_PATH), duration, s.headers, threads=2, pin=False, watch=s.envoy)
                res["round"] = rnd
                res["rss_kib"] = rss_kib(s.envoy.pid)
                s.runs.append(res)
                log(f"  round {rnd + 1}/{rounds} {s.label:34s} {res['rps']:8.0f} rps  "
                    f"p99 {res.get('p99_us', 0):6.0f}us  cpu {res.get('cpu_us_per_req', 0):6.2f}us/req"
                    + ("" if res["non_2xx"] == 0 and res["socket_errors"] == 0 else "  INVALID"))
        for s in scaling:
            s.envoy.stop()
        scenarios.extend(scaling)

        # ---- revoke latency over 2 workers: admin 200 -> refused on every connection.
        e_rev = mk_envoy(extra.spread_over_workers(keymeter_config()), "revoke", concurrency=2, cpus=None)
        try:
            rev_keys = [KnownKey() for _ in range(args.revokes + 1)]
            results["revoke_latency"] = extra.revoke_latency(e_rev, admin_call, rev_keys, PLANS,
                                                             revokes=args.revokes)
        except Exception as e:  # noqa: BLE001 - reported
            results["revoke_latency"] = {"error": repr(e)}
        e_rev.stop()
        log(f"revoke latency: {results['revoke_latency']}")

        # ---- rate-limit accuracy at --concurrency 2
        rl_plan = {"rl": {"rate_limits": [{"name": "r200", "rate": 200, "per": "1s", "burst": 50}]}}
        e_rl = mk_envoy(keymeter_config(), "ratelimit", concurrency=2, cpus=None)
        doc = {"version": 1, "plans": rl_plan,
               "keys": [{"id": bench_key.id, "hash": bench_key.hash, "consumer": "c", "plan": "rl"}]}
        r = admin_call(e_rl, "PUT", "/v1/keyset", doc)
        if r.status != 200:
            raise RuntimeError(f"rate-limit key-set push failed: {r}")
        res = wrk.run(e_rl.url(BENCH_PATH), rl_duration, hdr, threads=2, connections=8, pin=False)
        time.sleep(0.2)
        admitted = e_rl.stat("http.public.downstream_rq_2xx")
        limited = e_rl.stat("http.public.downstream_rq_4xx")
        wrk_admitted = res["requests"] - res["non_2xx"]
        expected = 50 + 200 * res["duration_s"]
        contended = e_rl.log_text().count("contended")
        results["rate_limit_accuracy"] = {
            "plan": rl_plan["rl"], "envoy_concurrency": 2, "wrk": "-t2 -c8", "duration_s": res["duration_s"],
            "requests": res["requests"], "admitted_envoy": admitted, "refused_4xx_envoy": limited,
            "admitted_wrk": wrk_admitted, "expected": round(expected, 1),
            "error_pct": round((admitted - expected) / expected * 100, 2), "contended_log_lines": contended}
        e_rl.stop()
    finally:
        cleanup()

    # ---- report
    results["scenarios"] = {s.name: s.summary() for s in scenarios}
    by = {s.name: s for s in scenarios}

    def per_round(a: str, b: str, key: str, op):
        ra = {r["round"]: r for r in by[a].runs}
        rb = {r["round"]: r for r in by[b].runs}
        vals = [op(ra[i][key], rb[i][key]) for i in sorted(ra) if i in rb and key in ra[i] and key in rb[i]]
        if not vals:
            return None
        return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}

    ratios = {
        "4/3 rps": per_round("km", "trivial", "rps", lambda a, b: a / b),
        "4/2 rps": per_round("km", "native", "rps", lambda a, b: a / b),
        "5/4 rps": per_round("km_large", "km", "rps", lambda a, b: a / b),
        "3/1 rps": per_round("trivial", "bare", "rps", lambda a, b: a / b),
        "4r/4 rps": per_round("km_rot", "km", "rps", lambda a, b: a / b),
        "4/4m rps": per_round("km", "km_nometer", "rps", lambda a, b: a / b),
        "4a/3 rps": per_round("km_floor", "trivial", "rps", lambda a, b: a / b),
        "4a/3 cpu/req": per_round("km_floor", "trivial", "cpu_us_per_req", lambda a, b: a / b),
        "4/4a cpu/req": per_round("km", "km_floor", "cpu_us_per_req", lambda a, b: a / b),
        "4/3 cpu/req": per_round("km", "trivial", "cpu_us_per_req", lambda a, b: a / b),
        "4-3 cpu us/req": per_round("km", "trivial", "cpu_us_per_req", lambda a, b: a - b),
        "5/4 cpu/req": per_round("km_large", "km", "cpu_us_per_req", lambda a, b: a / b),
        "p99 4-3 us": per_round("km", "trivial", "p99_us", lambda a, b: a - b),
        "p50 4-3 us": per_round("km", "trivial", "p50_us", lambda a, b: a - b),
        "5h/4 rps": per_round("km_huge", "km", "rps", lambda a, b: a / b),
        "6/6b rps": per_round("proxy_km", "proxy_bare", "rps", lambda a, b: a / b),
        "6/6b cpu/req": per_round("proxy_km", "proxy_bare", "cpu_us_per_req", lambda a, b: a / b),
        "6-6b cpu us/req": per_round("proxy_km", "proxy_bare", "cpu_us_per_req", lambda a, b: a - b),
        "4w/3w rps": per_round("k2", "t2", "rps", lambda a, b: a / b),
        "4w/4u rps": per_round("k2", "k1", "rps", lambda a, b: a / b),
        "3w/3u rps": per_round("t2", "t1", "rps", lambda a, b: a / b),
        "4w/3w cpu/req": per_round("k2", "t2", "cpu_us_per_req", lambda a, b: a / b),
        "4f/4 rps": per_round("km_fleet", "km", "rps", lambda a, b: a / b),
        "4f/4 cpu/req": per_round("km_fleet", "km", "cpu_us_per_req", lambda a, b: a / b),
    }
    fleet_calls = [r["limitd_calls_per_s"] for r in by["km_fleet"].runs if "limitd_calls_per_s" in r]
    results["fleet"] = {"limitd_calls_per_s": fleet_calls,
                        "requests_per_s": [r["rps"] for r in by["km_fleet"].runs]}
    results["ratios"] = ratios

    print()
    print("medians over rounds; CPU us = Envoy CPU time per request; other% = load on Envoy's CPU from other "
          f"processes (NOISY: > {NOISY_PCT:g}%, numbers disturbed by neighbours)")
    print(f"{'scenario':36s} {'req/s':>8s} {'(min-max)':>17s} {'p50 us':>7s} {'p99 us':>7s} {'CPU us':>7s} "
          f"{'other%':>6s} {'RSS MiB':>8s}")
    for s in scenarios:
        sm = s.summary()
        if s.skip:
            print(f"{s.label:36s} skipped: {s.skip.splitlines()[0][:100]}")
            continue
        med = lambda k: sm.get(k, {}).get("median", float("nan"))  # noqa: E731
        flag = "  INVALID (non-2xx)" if sm["non_2xx"] or sm["socket_errors"] else ""
        if med("foreign_cpu_pct_on_envoy_cpu") > NOISY_PCT:
            flag += "  NOISY"
        print(f"{s.label:36s} {med('rps'):8.0f} {sm['rps']['min']:8.0f}-{sm['rps']['max']:<8.0f} "
              f"{med('p50_us'):7.0f} {med('p99_us'):7.0f} {med('cpu_us_per_req'):7.2f} "
              f"{med('foreign_cpu_pct_on_envoy_cpu'):6.1f} {(sm['rss_kib'] or 0) / 1024:8.1f}{flag}")
    print()
    for name, v in ratios.items():
        if v:
            fmt = "{:+.2f}" if " cpu us" in name else "{:.3f}" if "/" in name else "{:+.0f}"
            print(f"{name:14s} median {fmt.format(v['median'])}  min {fmt.format(v['min'])}  "
                  f"max {fmt.format(v['max'])}  ({v['n']} rounds)")
    fc = results.get("fleet", {}).get("limitd_calls_per_s")
    if fc:
        print(f"fleet mode (4f): calls to limitd per second at full load {statistics.median(fc):.1f} "
              f"(min {min(fc)}, max {max(fc)}) for one key at "
              f"{statistics.median(results['fleet']['requests_per_s']):.0f} req/s")
    lp = results.get("large_push", {})
    print(f"\nfull push ({lp.get('method', 'one-shot PUT')}) of {lp.get('keys')} keys ({lp.get('doc_bytes', 0) / 2**20:.0f} MiB JSON, generated in "
          f"{lp.get('generate_s')}s): " + (f"HTTP {lp['status']} in {lp['push_s']}s" if 'status' in lp
                                          else f"FAILED {lp.get('error')}")
          + (f" after {lp['failed_after_s']}s" if "failed_after_s" in lp else "")
          + (f", RSS {lp['rss_before_kib'] / 1024:.0f} -> {lp['rss_after_kib'] / 1024:.0f} MiB = "
             f"{lp['bytes_per_key']} bytes/key" if 'bytes_per_key' in lp else ""))
    lv = results.get("live_traffic_during_push", {})
    for name, what in (("one_shot", "one-shot PUT"), ("staged", f"staged upload ({CHUNK_KEYS}-key chunks)")):
        m = lv.get(name)
        if m:
            print(f"live traffic during a {lv['keys']}-key {what} (Envoy 1 worker, shared with the push): HTTP {m['status']} in "
                  f"{m['push_s']}s; probe {m.get('requests')} req, p50 {m.get('p50_ms')} ms, p99 {m.get('p99_ms')} ms, "
                  f"max {m.get('max_ms')} ms, errors {m.get('errors')}")
    if "error" in lv:
        print(f"live traffic measurement FAILED: {lv['error']}")
    if "repush_s" in lp:
        print(f"second full push of the same {lp['keys']} keys (replace + sweep): HTTP {lp['repush_status']} in "
              f"{lp['repush_s']}s, RSS after {lp['rss_after_repush_kib'] / 1024:.0f} MiB")
    hp = results.get("huge_push", {})
    if hp.get("keys"):
        print(f"full push ({hp['method']}) of {hp['keys']} keys: "
              + (f"HTTP {hp['status']} in {hp['push_s']}s" if "status" in hp else f"FAILED {hp.get('error')}")
              + (f", RSS {hp['rss_before_kib'] / 1024:.0f} -> {hp['rss_after_kib'] / 1024:.0f} MiB = "
                 f"{hp['bytes_per_key']} bytes/key" if "bytes_per_key" in hp else ""))
    rv = results.get("revoke_latency", {})
    if "worst_ms" in rv:
        print(f"delta revoke over 2 workers ({rv['revokes']} revokes, {rv['connections']} kept-alive connections "
              f"{rv['connections_per_worker']}): refused everywhere at worst {rv['worst_ms']} ms "
              f"(median {rv['median_ms']} ms) after the admin API's 200; not refused within "
              f"{rv['deadline_s']}s: {rv['not_refused_within_deadline']}")
    elif rv:
        print(f"revoke latency measurement FAILED: {rv.get('error')}")
    for name, d in results.get("delta_revoke", {}).items():
        print(f"delta revoke ({d['keys']} keys): HTTP {d['status']} in {d['seconds'] * 1000:.1f} ms; "
              f"revoked key {d['status_before']} -> {d['status_after']} immediately, other key {d['other_key_status']}"
              f" -> {'OK' if d['ok'] else 'FAILED'}")
    rl = results.get("rate_limit_accuracy")
    if rl:
        print(f"rate-limit accuracy (concurrency 2, rate 200/s burst 50, {rl['duration_s']:.2f}s, "
              f"{rl['requests']} requests): admitted {rl['admitted_envoy']} (wrk {rl['admitted_wrk']}) vs expected "
              f"{rl['expected']:.0f} -> error {rl['error_pct']:+.2f}%, contention log lines {rl['contended_log_lines']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    args.out.write_text(text)
    (args.out.parent / f"results-{mode}.json").write_text(text)
    print(f"\nresults: {args.out} (and results-{mode}.json)")
    invalid = any(s.summary().get("non_2xx") or s.summary().get("socket_errors") for s in scenarios if not s.skip)
    return 1 if invalid else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: stopping Envoy and wrk", file=sys.stderr)
        sys.exit(130)
