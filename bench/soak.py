"""keymeter soak test (`make soak`; default 10 min, `SOAK_S=<seconds>` to change).

One real Envoy (2 workers) runs keymeter in front of a counting backend while, for the
whole run:

  - wrk loads the public listener with a fixed set of stable keys (x-api-key, Bearer
    and Basic spellings, several consumers); a Lua script counts every status;
  - anonymous traffic (the anonymous plan, limited per client address) comes from
    rotating real source addresses: client sockets bound to different 127.x.y.z
    loopback addresses (never X-Forwarded-For, which a client can write), plus short
    bursts from fresh addresses that must hit the per-address limit;
  - every second a delta creates one key and revokes the oldest churn key; the new key
    must answer 200 and the revoked one 401 right after the delta returns;
  - every 30 s a full push (alternately one-shot PUT and staged upload) replaces the
    set, with part of a filler population replaced each time (so the sweep removes keys);
  - every 60 s the plugin is reloaded through file-based LDS with a different plugin
    configuration (as wasm-tests/test_reload.py does): new root contexts, old ones
    flushed in on_done.

It fails on: any 5xx (Envoy's own counters for both listeners and wrk's counts); any
401 (or other non-2xx) for a key that was valid at that moment (stable keys are always
valid; churn keys between their create and revoke); a revoked key still admitted; a
fresh anonymous address not admitted, or a burst not limited; Envoy RSS growing more
than RSS_BOUND_MIB after the warm-up; a VM panic in the log; usage counters (usage API,
per key lineage, and the Prometheus plan totals) that differ from what the backend
served, request for request; response counts that differ from it by more than the
requests wrk abandons in flight when it stops (at most one per connection: the backend
got them, Envoy never saw their response). A summary table goes to stdout.

Stdlib only; reuses wasm-tests/harness.py (Envoy, config, LDS reload, HTTP client),
wasm-tests/_server.py (the backend's server), wasm-tests/keys.py and bench/run.py
(wrk runner, RSS). Only loopback traffic; every loop is bounded by the deadline.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "wasm-tests"))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import keys as km_keys  # noqa: E402
import run as bench  # noqa: E402  (wrk runner, rss_kib, cleanup on exit/signals)
from _server import Handler, Server  # noqa: E402

TOKEN = harness.TEST_ADMIN_TOKEN
PATH = "/v1/soak"

# RSS may grow after the warm-up by at most this much. What legitimately grows: one
# empty shared-data entry, one usage record and ~20 labelled metric series per churned
# key id (~600 in 10 min: a few MiB). A per-request leak of 100 B (over ~1M requests),
# or keeping a VM's heap per plugin reload, would exceed it.
RSS_BOUND_MIB = 32
WARMUP_S_MAX = 120  # warm-up: min(this, a third of the run)

DELTA_EVERY_S = 1.0
PUSH_EVERY_S = 30.0
RELOAD_EVERY_S = 60.0
RSS_EVERY_S = 5.0
LIVE_CHURN = 10  # churn keys alive at a time
FILLER = 2000  # keys no client uses, so pushes and sweeps have real work
FILLER_REPLACED = 200  # filler keys replaced by every full push
STAGED_CHUNK = 500

PLANS = {
    "soak": {
        "rate_limits": [{"name": "huge", "rate": 100_000_000, "per": "1s", "burst": 100_000_000}],
        "quotas": [{"name": "monthly", "period": "month", "limit": 1_000_000_000_000}],
    },
    "team": {
        "rate_limits": [{"name": "huge", "rate": 100_000_000, "per": "1s"}],
        "limit_by": "consumer",
    },
    "churn": {"rate_limits": [{"name": "per-second", "rate": 1000, "per": "1s"}]},
    # Anonymous callers, per client address: a burst of 5, then 1 per second.
    "anon": {"rate_limits": [{"name": "per-second", "rate": 1, "per": "1s", "burst": 5}]},
    "filler": {},
}
ANON_BURST = 5

BASE_CONF = {"role": "filter", "anonymous": {"plan": "anon"}}
# The configurations the reloads cycle through (the first one is the initial one).
CONFS = [
    {**BASE_CONF, "metering": {"flush_interval": "1s"}},
    {**BASE_CONF, "realm": "soak-1", "forward_metadata": ["tier"], "metering": {"flush_interval": "500ms"}},
    {**BASE_CONF, "realm": "soak-2", "rate_limit_headers": False, "metering": {"flush_interval": "2s"}},
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- backend


class _CountingHandler(Handler):
    """Answers every request 200 and counts it under the identity keymeter forwarded."""

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes: without this, Nagle's algorithm and Envoy's
        # delayed ACK hold every response ~40 ms and the backend caps the load at ~100/s.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        who = self.headers.get("x-keymeter-key-id")
        if who is None:
            who = "anonymous" if self.headers.get("x-keymeter-consumer") == "anonymous" else "<none>"
        self.server.owner.count(who)
        self.reply(200, b"ok\n")

    do_GET = do_POST = do_HEAD = _handle


class CountingBackend:
    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self._server = Server((harness.LOCALHOST, 0), _CountingHandler, owner=self)
        self.port = self._server.port
        self._thread = self._server.start_thread("soak-backend")

    def count(self, who: str) -> None:
        with self._lock:
            self.counts[who] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def stop(self) -> None:
        self._server.stop(self._thread)


# --------------------------------------------------------------------------- keys


class SoakKey:
    def __init__(self, consumer: str, plan: str, **fields):
        self.id, self.key = km_keys.make_key()
        self.doc = {"id": self.id, "hash": km_keys.key_hash(self.key), "consumer": consumer, "plan": plan, **fields}


def filler_doc() -> dict:
    return {"id": km_keys.random_b62(12), "hash": os.urandom(32).hex(), "consumer": "filler", "plan": "filler"}


def credential_headers(k: SoakKey, style: int) -> tuple[str, str]:
    """The key in one of the three header spellings wrk cycles through."""
    if style == 0:
        return "x-api-key", k.key
    if style == 1:
        return "authorization", f"Bearer {k.key}"
    user, password = k.id, k.key[len("km_") + 12 + 1:]
    return "authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def wrk_script(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """wrk Lua: requests rotate over `pairs` (header name, value); every response status
    is counted per thread and summed in done() as one `SOAK_STATUS {json}` line."""
    entries = ",\n".join(f"  {{{json.dumps(n)}, {json.dumps(v)}}}" for n, v in pairs)
    path.write_text(
        f"local creds = {{\n{entries}\n}}\n"
        "local n = #creds\nlocal i = 0\nlocal threads = {}\n"
        "function setup(thread) table.insert(threads, thread) end\n"
        "function init(args) counts = {} ; i = math.random(n) end\n"
        "function request()\n"
        "  i = i % n + 1\n"
        f'  return wrk.format("GET", "{PATH}", {{[creds[i][1]] = creds[i][2]}})\n'
        "end\n"
        "function response(status, headers, body)\n"
        "  counts[status] = (counts[status] or 0) + 1\n"
        "end\n"
        "function done(summary, latency, requests)\n"
        "  local total = {}\n"
        "  for _, t in ipairs(threads) do\n"
        '    local c = t:get("counts") or {}\n'
        "    for k, v in pairs(c) do total[k] = (total[k] or 0) + v end\n"
        "  end\n"
        "  local parts = {}\n"
        '  for k, v in pairs(total) do table.insert(parts, string.format(\'"%d": %d\', k, v)) end\n'
        '  io.write("SOAK_STATUS {" .. table.concat(parts, ", ") .. "}\\n")\n'
        "end\n"
    )
    return path


# --------------------------------------------------------------------------- soak


class Failure:
    """Collects failures (with a bounded number of examples each)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, what: str, example: str) -> None:
        with self._lock:
            self.counts[what] += 1
            if len(self.examples[what]) < 5:
                self.examples[what].append(example)
                log(f"FAIL {what}: {example}")


class Soak:
    def __init__(self, args, workdir: Path, wasm: Path):
        self.args = args
        self.workdir = workdir
        self.wasm = wasm
        self.fail = Failure()
        self.ops: collections.Counter[str] = collections.Counter()
        self.version = 0
        self.stop = threading.Event()
        self.stable = [SoakKey(f"cust{i % 3}", "team" if i % 4 == 3 else "soak", metadata={"tier": "gold"})
                       for i in range(args.keys)]
        self.churn: collections.deque[SoakKey] = collections.deque()
        self.filler = [filler_doc() for _ in range(FILLER)]
        self.rss: list[tuple[float, int]] = []
        self.anon = collections.Counter()
        self.conf_i = 0
        self.abandoned = 0

    # ------------------------------------------------------------- admin calls

    def admin(self, method: str, path: str, body=None, timeout: float = 60) -> harness.Response:
        return harness.http(method, self.envoy.admin_api_url(path), {"authorization": f"Bearer {TOKEN}"}, body,
                            timeout=timeout)

    def admin_retrying(self, what: str, call) -> harness.Response | None:
        """`call()` until it is not a 409 update-in-progress (the admin's cleanup tick
        briefly holds the writer lock); bounded."""
        for _ in range(100):
            r = call()
            if r.status == 409 and b"update-in-progress" in r.body:
                self.ops[f"{what} retried (409 busy)"] += 1
                time.sleep(0.02)
                continue
            return r
        return None

    def next_version(self) -> int:
        self.version += 1
        return self.version

    def doc(self) -> dict:
        keys = [k.doc for k in self.stable] + [k.doc for k in self.churn] + self.filler
        return {"version": self.next_version(), "plans": PLANS, "keys": keys}

    # ------------------------------------------------------------- probes

    def probe(self, key: SoakKey | None, want: int, why: str) -> None:
        headers = {"x-api-key": key.key} if key else {}
        try:
            r = harness.http("GET", self.envoy.url(PATH), headers, timeout=10)
        except OSError as e:
            self.fail.add("probe connection error", f"{why}: {e}")
            return
        self.ops["probes"] += 1
        if r.status != want:
            what = "401 for a valid key" if (want == 200 and r.status == 401) else f"probe {why}"
            if r.status >= 500:
                what = "5xx"
            self.fail.add(what, f"{why}: want {want}, got {r.status} {r.body[:200]!r}")

    # ------------------------------------------------------------- periodic work

    def delta(self) -> None:
        new = SoakKey("churner", "churn")
        ops = [{"op": "upsert", "key": new.doc}]
        old = self.churn[0] if len(self.churn) >= LIVE_CHURN else None
        if old:
            ops.append({"op": "revoke", "id": old.id})
        r = self.admin_retrying("delta", lambda: self.admin("POST", "/v1/keyset/delta",
                                                            {"version": self.next_version(), "ops": ops}))
        if r is None or r.status != 200:
            self.fail.add("delta refused", f"{r.status if r else 'busy'} {r.body[:300] if r else ''!r}")
            return
        self.ops["deltas"] += 1
        self.churn.append(new)
        self.probe(new, 200, "key created by the delta that just returned")
        if old:
            self.churn.popleft()
            self.probe(old, 401, "key revoked by the delta that just returned")
        if self.churn:
            self.probe(self.churn[int(time.monotonic() * 1000) % len(self.churn)], 200, "live churn key")

    def full_push(self) -> None:
        for _ in range(FILLER_REPLACED):
            self.filler[int.from_bytes(os.urandom(2), "big") % len(self.filler)] = filler_doc()
        # Duplicate ids are impossible in practice (62^12), but keep the document valid.
        seen: set[str] = set()
        self.filler = [f for f in self.filler if not (f["id"] in seen or seen.add(f["id"]))]
        doc = self.doc()
        staged = self.ops["full pushes"] % 2 == 1
        if staged:
            r = self.admin_retrying("staged upload", lambda: self.admin("POST", "/v1/keyset/uploads"))
            if r is None or r.status != 201:
                self.fail.add("full push refused", f"upload begin: {r.status if r else 'busy'}")
                return
            base = "/v1/keyset/uploads/" + r.json()["upload_id"]
            keys = doc["keys"]
            for i in range(0, len(keys), STAGED_CHUNK):
                r = self.admin("PUT", base + "/keys", keys[i:i + STAGED_CHUNK])
                if r.status != 200:
                    self.fail.add("full push refused", f"upload chunk: {r.status} {r.body[:300]!r}")
                    return
            r = self.admin("POST", base + "/commit", {"version": doc["version"], "plans": PLANS})
        else:
            r = self.admin_retrying("full push", lambda: self.admin("PUT", "/v1/keyset", doc))
        if r is None or r.status != 200:
            self.fail.add("full push refused", f"{r.status if r else 'busy'} {r.body[:300] if r else ''!r}")
            return
        self.ops["full pushes"] += 1
        self.ops["staged uploads" if staged else "one-shot PUTs"] += 1
        for k in list(self.churn):
            self.probe(k, 200, "churn key after a full push")

    def reload(self) -> None:
        self.conf_i = (self.conf_i + 1) % len(CONFS)
        conf = CONFS[self.conf_i]
        try:
            harness.update_public_listener(self.envoy, conf, timeout=30)
        except (harness.EnvoyError, AssertionError) as e:
            self.fail.add("plugin reload failed", str(e)[:300])
            return
        self.ops["plugin reloads"] += 1
        realm = conf.get("realm", "keymeter")

        def new_conf_serves():
            r = harness.http("GET", self.envoy.url(PATH), {"x-api-key": "not-a-key"})
            if r.status >= 500:
                self.fail.add("5xx", f"after reload: {r.status}")
            return f'Bearer realm="{realm}"' in r.headers.get_all("www-authenticate")

        try:
            harness.wait_until(new_conf_serves, timeout=20, interval=0.2)
        except AssertionError:
            self.fail.add("plugin reload failed", f"realm {realm!r} never served")

    def sample_rss(self, t: float) -> None:
        kib = bench.rss_kib(self.envoy.pid)
        if kib:
            self.rss.append((t, kib))

    # ------------------------------------------------------------- anonymous traffic

    def anonymous_traffic(self, deadline: float) -> None:
        """Round-robin over 64 steady addresses (each well within its limit), and every
        5 s a burst of ANON_BURST + 5 requests from a fresh address."""
        steady = [f"127.1.{i // 8}.{i % 8 + 1}" for i in range(64)]
        i = 0
        fresh = 0
        next_burst = time.monotonic() + 5
        while not self.stop.is_set() and time.monotonic() < deadline:
            addr = steady[i % len(steady)]
            i += 1
            self.anon_request(addr, expect_ok=False)
            if time.monotonic() >= next_burst:
                next_burst += 5
                fresh += 1
                addr = f"127.2.{fresh // 250}.{fresh % 250 + 1}"
                statuses = [self.anon_request(addr, expect_ok=(j == 0)) for j in range(ANON_BURST + 5)]
                self.anon["bursts"] += 1
                if statuses.count(429) < 3:
                    self.fail.add("anonymous limit", f"burst from fresh {addr}: {statuses}")
            time.sleep(0.05)

    def anon_request(self, addr: str, expect_ok: bool) -> int:
        try:
            r = harness.http("GET", self.envoy.url(PATH), timeout=10, source_address=(addr, 0))
        except OSError as e:
            self.fail.add("anonymous connection error", f"{addr}: {e}")
            return 0
        self.anon[r.status] += 1
        if r.status >= 500:
            self.fail.add("5xx", f"anonymous from {addr}: {r.status} {r.body[:200]!r}")
        elif r.status not in (200, 429):
            self.fail.add("anonymous status", f"{addr}: {r.status} {r.body[:200]!r}")
        elif expect_ok and r.status != 200:
            self.fail.add("anonymous limit", f"first request from fresh {addr}: {r.status}")
        return r.status

    # ------------------------------------------------------------- run

    def run(self) -> int:
        args = self.args
        self.backend = CountingBackend()
        cfg = harness.envoy_config(
            backend_port=self.backend.port,
            public_port=harness.free_port(),
            envoy_admin_port=harness.free_port(),
            admin_api_port=harness.free_port(),
            wasm_path=self.wasm,
            filter_conf=CONFS[0],
            lds_dir=self.workdir / "lds",
        )
        self.envoy = harness.Envoy(cfg, concurrency=2, workdir=self.workdir / "envoy",
                                   extra_args=harness.LDS_ENVOY_ARGS)
        log(f"envoy pid {self.envoy.pid}, public {self.envoy.public_port}, log {self.envoy.log_path}")
        r = self.admin("PUT", "/v1/keyset", self.doc())
        if r.status != 200:
            raise SystemExit(f"initial push failed: {r.status} {r.text[:500]}")
        self.ops["full pushes"] += 1
        self.ops["one-shot PUTs"] += 1

        pairs = [credential_headers(k, s) for k in self.stable for s in range(3)]
        script = wrk_script(self.workdir / "soak.lua", pairs)
        duration = args.seconds
        t0 = time.monotonic()
        deadline = t0 + duration
        warmup = min(WARMUP_S_MAX, duration / 3)
        wrk = bench.Wrk(None, threads=1, connections=args.connections)
        wrk_result: dict = {}

        def run_wrk():
            try:
                wrk_result.update(wrk.run(self.envoy.url(PATH), duration, script=script, pin=False))
            except Exception as e:  # noqa: BLE001 - reported as a failure
                wrk_result["error"] = str(e)

        threads = [threading.Thread(target=run_wrk, name="wrk", daemon=True),
                   threading.Thread(target=self.anonymous_traffic, args=(deadline,), name="anon", daemon=True)]
        for t in threads:
            t.start()
        log(f"soak running for {duration:.0f} s (warm-up {warmup:.0f} s), wrk -t1 -c{args.connections}, "
            f"{len(self.stable)} stable keys")

        due = {"delta": t0 + DELTA_EVERY_S, "push": t0 + PUSH_EVERY_S, "reload": t0 + RELOAD_EVERY_S,
               "rss": t0}
        every = {"delta": DELTA_EVERY_S, "push": PUSH_EVERY_S, "reload": RELOAD_EVERY_S, "rss": RSS_EVERY_S}
        actions = {"delta": self.delta, "push": self.full_push, "reload": self.reload,
                   "rss": lambda: self.sample_rss(time.monotonic() - t0)}
        last_report = t0
        try:
            while time.monotonic() < deadline:
                now = time.monotonic()
                for name in ("rss", "reload", "push", "delta"):
                    if now >= due[name]:
                        actions[name]()
                        # Missed slots are skipped, not caught up in a burst.
                        due[name] = max(due[name] + every[name], time.monotonic())
                if not self.envoy.is_running():
                    self.fail.add("envoy exited", self.envoy.log_tail(20))
                    break
                if now - last_report >= 60:
                    last_report = now
                    rss = self.rss[-1][1] / 1024 if self.rss else 0
                    log(f"t={now - t0:.0f}s deltas {self.ops['deltas']} pushes {self.ops['full pushes']} "
                        f"reloads {self.ops['plugin reloads']} rss {rss:.1f} MiB failures {sum(self.fail.counts.values())}")
                time.sleep(max(0.0, min(due.values()) - time.monotonic()))
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=duration + 60)
        self.sample_rss(time.monotonic() - t0)
        return self.finish(wrk_result, warmup, time.monotonic() - t0)

    def finish(self, wrk_result: dict, warmup: float, elapsed: float) -> int:
        # wrk's statuses.
        wrk_status: dict[int, int] = {}
        raw = wrk_result.get("raw", "")
        for line in raw.splitlines():
            if line.startswith("SOAK_STATUS "):
                wrk_status = {int(k): v for k, v in json.loads(line[len("SOAK_STATUS "):]).items()}
        if "error" in wrk_result or not wrk_status:
            self.fail.add("wrk failed", wrk_result.get("error", raw[-500:]))
        wrk_5xx = sum(v for k, v in wrk_status.items() if k >= 500)
        wrk_401 = wrk_status.get(401, 0)
        wrk_other = sum(v for k, v in wrk_status.items() if k != 200 and k != 401 and k < 500)
        if wrk_5xx:
            self.fail.add("5xx", f"wrk saw {wrk_5xx}: {wrk_status}")
        if wrk_401:
            self.fail.add("401 for a valid key", f"wrk (stable keys) saw {wrk_401} 401s")
        if wrk_other:
            self.fail.add("wrk non-2xx", f"stable keys: {wrk_status}")

        # Envoy's own 5xx counters, both listeners.
        envoy_5xx = {
            name: self.envoy.stat(f"http.{name}.downstream_rq_5xx") for name in ("public", "keymeter_admin")
        }
        for name, n in envoy_5xx.items():
            if n:
                self.fail.add("5xx", f"Envoy counted {n} on the {name} listener")
        panics = [l for l in self.envoy.log_text().splitlines() if "panicked" in l or "wasm vm failed" in l.lower()]
        if panics:
            self.fail.add("VM panic", panics[0][:300])

        # Usage == what the backend served, per lineage; the Prometheus plan totals too.
        served = self.backend.snapshot()
        if served.get("<none>"):
            self.fail.add("backend saw a request without identity", str(served["<none>"]))
        plan_of = {k.id: k.doc["plan"] for k in self.stable}
        plan_of.update({k: "churn" for k in served if k not in plan_of and k != "anonymous"})
        plan_of["anonymous"] = "anon"
        last: dict = {}

        def usage_matches() -> bool:
            r = self.admin("GET", "/v1/usage?limit=10000")
            if r.status != 200:
                return False
            rows = {row["lineage"]: row for row in r.json()["items"]}
            admitted = {l: row["requests"]["admitted"] for l, row in rows.items() if row["requests"]["admitted"]}
            last["usage"] = admitted
            last["rows"] = rows
            return admitted == {k: v for k, v in served.items() if k != "<none>"}

        def prom_matches() -> bool:
            stats = self.envoy.stats(filter=r"^wasmcustom\.keymeter_plan_requests_total\..*\.outcome\.admitted$")
            got = {name.split(".")[3]: v for name, v in stats.items() if v}
            want: collections.Counter[str] = collections.Counter()
            for k, n in served.items():
                if k in plan_of:
                    want[plan_of[k]] += n
            last["prom"], last["prom_want"] = got, dict(want)
            return got == dict(want)

        try:
            harness.wait_until(usage_matches, timeout=30, interval=0.5)
            usage_ok = True
        except AssertionError:
            usage_ok = False
            got = last.get("usage", {})
            diff = {k: (served.get(k, 0), got.get(k, 0)) for k in set(served) | set(got)
                    if served.get(k, 0) != got.get(k, 0)}
            self.fail.add("usage != backend", f"{len(diff)} lineages differ (backend, usage): "
                          f"{dict(list(diff.items())[:10])}")
        try:
            harness.wait_until(prom_matches, timeout=15, interval=0.5)
        except AssertionError:
            self.fail.add("prometheus != backend", f"got {last.get('prom')} want {last.get('prom_want')}")
        # Every admitted request's response is counted too, except requests wrk abandoned
        # in flight when it stopped (the backend got them, Envoy never saw a response):
        # at most one per wrk connection, and only for the keys wrk uses.
        rows = last.get("rows", {})
        stable_ids = {k.id for k in self.stable}
        bad_2xx = [l for l, row in rows.items()
                   if l not in stable_ids and row["responses"]["2xx"] != served.get(l, 0)]
        self.abandoned = sum(served.get(l, 0) - rows[l]["responses"]["2xx"] for l in stable_ids if l in rows)
        if usage_ok and (bad_2xx or not 0 <= self.abandoned <= self.args.connections):
            self.fail.add("usage != backend", f"abandoned {self.abandoned}; 2xx responses differ: " + "; ".join(
                f"{l}: served {served.get(l, 0)}, usage {rows[l]['requests']} {rows[l]['responses']}"
                for l in bad_2xx[:5]))

        # RSS after the warm-up.
        after = [kib for t, kib in self.rss if t >= warmup]
        at_warm = after[0] if after else None
        rss_growth_mib = (max(after) - at_warm) / 1024 if after else None
        if rss_growth_mib is None:
            self.fail.add("rss", "no samples after the warm-up")
        elif rss_growth_mib > RSS_BOUND_MIB:
            self.fail.add("rss growth", f"{rss_growth_mib:.1f} MiB > {RSS_BOUND_MIB} MiB after warm-up")
        end_status = self.admin("GET", "/v1/status").json()

        self.print_summary(wrk_result, wrk_status, envoy_5xx, served, warmup, elapsed, at_warm,
                           rss_growth_mib, end_status, usage_ok)
        self.envoy.stop()
        self.backend.stop()
        return 1 if self.fail.counts else 0

    def print_summary(self, wrk_result, wrk_status, envoy_5xx, served, warmup, elapsed, at_warm,
                      rss_growth_mib, end_status, usage_ok) -> None:
        mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
        rss = [kib for _, kib in self.rss]
        anon_total = sum(v for k, v in self.anon.items() if isinstance(k, int))
        stable_served = sum(served.get(k.id, 0) for k in self.stable)
        churn_ids = {k for k in served if k not in {s.id for s in self.stable} and k != "anonymous"}
        rows = [
            ("duration", f"{elapsed:.0f} s (warm-up {warmup:.0f} s)", ""),
            ("wrk requests (stable keys, 3 header spellings)",
             f"{wrk_result.get('requests', 0)} ({wrk_result.get('rps', 0):.0f}/s), statuses {wrk_status}",
             "200 only"),
            ("wrk socket errors", f"{wrk_result.get('socket_errors', 0)}", "reported"),
            ("anonymous requests (rotating 127.x.y.z)",
             f"{anon_total}: {self.anon.get(200, 0)}x200, {self.anon.get(429, 0)}x429, "
             f"{self.anon.get('bursts', 0)} bursts from fresh addresses", "200/429; fresh address 200"),
            ("deltas (create + revoke)", f"{self.ops['deltas']}", f"~1/s"),
            ("full pushes (one-shot PUT / staged)",
             f"{self.ops['full pushes']} ({self.ops['one-shot PUTs']} / {self.ops['staged uploads']})", "~1/30 s"),
            ("plugin reloads (LDS)", f"{self.ops['plugin reloads']}", "~1/60 s"),
            ("admin 409-busy retries", str(sum(v for k, v in self.ops.items() if "retried" in k)), "reported"),
            ("probes (churn keys valid/revoked)", f"{self.ops['probes']}", ""),
            ("key set at end", f"version {end_status.get('version')}, {end_status.get('keys')} keys", ""),
            ("5xx (Envoy public / admin, wrk)",
             f"{envoy_5xx['public']} / {envoy_5xx['keymeter_admin']}, "
             f"{sum(v for k, v in wrk_status.items() if k >= 500)}", "0"),
            ("401 for a valid key", str(self.fail.counts.get("401 for a valid key", 0)), "0"),
            ("Envoy RSS MiB: start / end of warm-up / max / end",
             f"{mib(rss[0]) if rss else '?'} / {mib(at_warm) if at_warm else '?'} / "
             f"{mib(max(rss)) if rss else '?'} / {mib(rss[-1]) if rss else '?'}", ""),
            ("RSS growth after warm-up", f"{rss_growth_mib:.1f} MiB" if rss_growth_mib is not None else "?",
             f"<= {RSS_BOUND_MIB} MiB"),
            ("usage API admitted == backend served, per lineage",
             f"{'equal' if usage_ok else 'DIFFERENT'}: {len(served)} lineages ({len(churn_ids)} churn), "
             f"{sum(served.values())} requests ({stable_served} stable-key, "
             f"{served.get('anonymous', 0)} anonymous)", "equal"),
            ("usage 2xx responses == backend served",
             f"equal, except {self.abandoned} wrk abandoned in flight at its stop (admitted, no response)",
             f"<= {self.args.connections} (wrk connections)"),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        print()
        print(f"| {'check'.ljust(w0)} | {'measured'.ljust(w1)} | bound |")
        print(f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|-------|")
        for a, b, c in rows:
            print(f"| {a.ljust(w0)} | {b.ljust(w1)} | {c} |")
        print()
        if self.fail.counts:
            print("SOAK FAILED:")
            for what, n in self.fail.counts.items():
                print(f"  {what}: {n}")
                for ex in self.fail.examples[what]:
                    print(f"      e.g. {ex}")
            print(f"Envoy log: {self.envoy.log_path}")
        else:
            print("SOAK PASSED")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_S") or 600))
    ap.add_argument("--connections", type=int, default=4, help="wrk connections (1 thread)")
    ap.add_argument("--keys", type=int, default=8, help="stable keys wrk rotates over")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) on success")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: run `make bench-tools`")
    wasm_src = Path(os.environ.get("KEYMETER_WASM") or harness.DEFAULT_WASM)
    if not wasm_src.is_file():
        raise SystemExit(f"{wasm_src} not found: run `make wasm`")
    workdir = Path(tempfile.mkdtemp(prefix="keymeter-soak-"))
    # A snapshot: a rebuild during the run must not change the code a reload loads.
    wasm = workdir / "keymeter.wasm"
    shutil.copyfile(wasm_src, wasm)
    rc = Soak(args, workdir, wasm).run()
    if rc == 0 and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work directory kept: {workdir}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
