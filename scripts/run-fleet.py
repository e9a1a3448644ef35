"""`make run-fleet`: fleet mode on one machine. Redis, one keymeter-limitd and two Envoys
sharing one key's limits, all on 127.0.0.1:

    Envoy A   API http://127.0.0.1:10000   Envoy admin 9901   keymeter admin 9902
    Envoy B   API http://127.0.0.1:10001   Envoy admin 9911   keymeter admin 9912
    limitd    http://127.0.0.1:8181  (Redis on a free port, data in .tools/fleet-demo)
    backend   echo server on a free port

It pushes a demo key set to both Envoys (each has its own shared data; in production
they would pull the same document) and prints curl loops that show one key's limit
shared by both Envoys. Ctrl-C stops everything it started.

Environment: ENVOY_BIN, KEYMETER_WASM, KEYMETER_LIMITD (make run-fleet sets them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "wasm-tests"))

import fleet  # noqa: E402
import harness  # noqa: E402
from echo_backend import EchoBackend  # noqa: E402
from keys import Key, keyset  # noqa: E402

API_PORTS = (10000, 10001)
ENVOY_ADMIN_PORTS = (9901, 9911)
KEYMETER_ADMIN_PORTS = (9902, 9912)
LIMITD_PORT = 8181
PLAN = {
    "rate_limits": [{"name": "per-10s", "rate": 10, "per": "10s", "burst": 10}],
    "quotas": [{"name": "daily", "period": "day", "limit": 100}],
}


def main() -> int:
    harness.install_signal_handlers()
    fleet._chain_signal_handlers()  # after the harness's: Redis and limitd first
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for p in (*API_PORTS, *ENVOY_ADMIN_PORTS, *KEYMETER_ADMIN_PORTS, LIMITD_PORT):
        if not harness.port_is_free(p):
            print(f"run-fleet: 127.0.0.1:{p} is in use (another demo running?)", file=sys.stderr)
            return 1
    run_dir = ROOT / ".tools" / "fleet-demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    wasm = os.environ.get("KEYMETER_WASM") or harness.DEFAULT_WASM
    backend = EchoBackend()
    redis = fleet.RedisServer(run_dir / "redis").start()
    limitd = fleet.Limitd(redis.url, run_dir, port=LIMITD_PORT).start()
    envoys = []
    try:
        for i in range(2):
            cfg = harness.envoy_config(
                backend_port=backend.port,
                public_port=API_PORTS[i],
                envoy_admin_port=ENVOY_ADMIN_PORTS[i],
                admin_api_port=KEYMETER_ADMIN_PORTS[i],
                wasm_path=wasm,
                filter_conf=fleet.filter_conf(2, node_name=f"envoy-{'ab'[i]}"),
                extra_clusters=[fleet.limitd_cluster([LIMITD_PORT])],
            )
            envoys.append(harness.Envoy(cfg, workdir=run_dir / f"envoy-{'ab'[i]}", concurrency=2))
        key = Key(consumer="demo", plan="fleet-demo")
        doc = keyset(1, [key], {"fleet-demo": PLAN})
        for e in envoys:
            r = harness.http("PUT", e.admin_api_url("/v1/keyset"),
                             {"authorization": f"Bearer {harness.TEST_ADMIN_TOKEN}"}, doc)  # fmt: skip
            if r.status != 200:
                print(f"run-fleet: push failed: {r}", file=sys.stderr)
                return 1
        print_help(key)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for e in envoys:
            e.stop()
        limitd.kill()
        redis.kill()
        backend.stop()
    return 0


def print_help(key: Key) -> None:
    quotas = json.dumps({"subject": f"k:{key.id}", "quotas": [
        {"name": "daily", "period": "day", "limit": 100}]})  # fmt: skip
    print(f"""
keymeter fleet demo: 2 Envoys share one key's limits through keymeter-limitd and Redis.

  Envoy A  http://127.0.0.1:{API_PORTS[0]}   keymeter admin http://127.0.0.1:{KEYMETER_ADMIN_PORTS[0]}
  Envoy B  http://127.0.0.1:{API_PORTS[1]}   keymeter admin http://127.0.0.1:{KEYMETER_ADMIN_PORTS[1]}
  limitd   http://127.0.0.1:{LIMITD_PORT}
  admin token: {harness.TEST_ADMIN_TOKEN}

Demo key (plan: 10 requests per 10 s, burst 10, and 100 a day, shared by both Envoys):

  KEY={key.key}

Alternate between the two Envoys: 10 requests pass in all, then 429, whichever
Envoy you ask (the bucket refills one token a second):

  for i in $(seq 1 14); do curl -s -o /dev/null -w "%{{http_code}} " \\
      -H "x-api-key: $KEY" http://127.0.0.1:1000$((i % 2))/v1/hello; done; echo

Fleet health of each Envoy (state, lease hit ratio, refill latency, overdraft):

  curl -s -H 'authorization: Bearer {harness.TEST_ADMIN_TOKEN}' http://127.0.0.1:{KEYMETER_ADMIN_PORTS[0]}/v1/status | python3 -m json.tool

The key's daily quota as the fleet counts it (consumed, units held per Envoy):

  curl -s -X POST -d '{quotas}' http://127.0.0.1:{LIMITD_PORT}/v1/peek; echo

Ctrl-C stops Redis, limitd, both Envoys and the backend.
""", flush=True)


if __name__ == "__main__":
    sys.exit(main())
