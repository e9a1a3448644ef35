"""Fleet-mode cost on the request path, A/B (`make bench-fleet-ab`).

`make bench` measures 4f/4 (fleet mode vs single-node keymeter, Envoy CPU per request)
once per run with one pair of Envoy processes; between two full runs that ratio moved
more than within either (1.00 vs 1.15 at 5cd2b7b). This runner asks the narrower
question with several fresh process pairs: for each pair it starts scenario 4 (keymeter,
1k keys, a bucket that never throttles) and scenario 4f (the same in fleet mode, limits
leased from keymeter-limitd + Redis), warms both up, then alternates wrk runs of
`--duration` seconds on each, `--rounds` times, and prints 4f/4 per round, per pair and
over all rounds. Same pinning as `make bench`: Envoy on CPU 0; wrk, Redis and limitd on
CPU 1. Also prints the share of fleet decisions served from worker leases (from
`GET /v1/status`). Every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "wasm-tests"))
sys.path.insert(0, str(ROOT / "bench"))

import fleet  # noqa: E402
import harness  # noqa: E402
import run  # noqa: E402


def cpu_us_per_request(envoy, key: str, seconds: float) -> float:
    url = f"http://127.0.0.1:{envoy.public_port}{run.BENCH_PATH}"
    c0 = run.proc_cpu_s(envoy.pid)
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds:g}s", "-H", f"x-api-key: {key}",
                          url], capture_output=True, text=True, check=True).stdout
    c1 = run.proc_cpu_s(envoy.pid)
    parsed = run.parse_wrk(out)
    if parsed.get("non_2xx"):
        raise RuntimeError(f"non-2xx responses: {parsed}")
    return (c1 - c0) / parsed["requests"] * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs (Envoy pinned to 0, the rest to 1)")
        return 2
    run.WASM_DIR.mkdir(parents=True, exist_ok=True)
    run.shutil.copyfile(run.KEYMETER_WASM, run.KM_WASM)
    known = [run.KnownKey() for _ in range(3)]
    doc = run.keyset_json(1, 1000, known)
    work = run.BENCH_DIR / "fleet-ab"
    run.shutil.rmtree(work, ignore_errors=True)
    redis = fleet.RedisServer(work / "redis", aof=False).start()
    limitd = fleet.Limitd(redis.url, work / "limitd").start()
    for proc in (redis.proc, limitd.proc):
        os.sched_setaffinity(proc.pid, {1})
    all_ratios: list[float] = []
    try:
        for pair in range(args.pairs):
            fleet_cfg = run.keymeter_config(fleet.filter_conf(1, timeout_ms=100))
            fleet_cfg["static_resources"]["clusters"].append(fleet.limitd_cluster([limitd.port]))
            envoys = {}
            for name, cfg in (("4", run.keymeter_config()), ("4f", fleet_cfg)):
                envoys[name] = run.PinnedEnvoy(cfg, cpus="0", concurrency=1, workdir=work / f"{name}-{pair}",
                                               envoy_bin=run.ENVOY_BIN, component_log_level="wasm:warn")
                r = run.admin_call(envoys[name], "PUT", "/v1/keyset", doc)
                if r.status != 200:
                    raise RuntimeError(f"key-set push failed: {r}")
            for e in envoys.values():
                cpu_us_per_request(e, known[0].key, args.duration)  # warm-up
            ratios = []
            for rnd in range(args.rounds):
                single = cpu_us_per_request(envoys["4"], known[0].key, args.duration)
                fleet_mode = cpu_us_per_request(envoys["4f"], known[0].key, args.duration)
                ratios.append(fleet_mode / single)
                print(f"pair {pair} round {rnd}: 4 {single:.2f} µs/req, 4f {fleet_mode:.2f} µs/req, "
                      f"4f/4 {fleet_mode / single:.3f}", flush=True)
            c = run.admin_call(envoys["4f"], "GET", "/v1/status", None).json()["fleet"]["counters"]
            decided = sum(c[k] for k in ("lease_decisions", "take_decisions", "fallback_decisions",
                                         "exhausted_decisions"))
            print(f"pair {pair}: 4f/4 median {statistics.median(ratios):.3f}; worker-lease share of fleet "
                  f"decisions {c['worker_lease_decisions'] / max(decided, 1):.3f}, take calls {c['take_calls']}",
                  flush=True)
            all_ratios += ratios
            for e in envoys.values():
                e.stop()
    finally:
        harness.stop_all()
        fleet.stop_all()
    print(f"4f/4 Envoy CPU per request over {len(all_ratios)} rounds: median {statistics.median(all_ratios):.3f} "
          f"(min {min(all_ratios):.3f}, max {max(all_ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
