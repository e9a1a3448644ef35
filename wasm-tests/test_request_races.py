"""Request-time races with key-set updates, in real Envoy with 2 workers (issue 10.11).

A request reads `km/meta`, then its key entry; a full push's commit on another worker
can flip the generation and sweep the old slot in between. Without a retry that read
is a miss and a valid key gets a spurious 401."""

from __future__ import annotations

import http.client
import multiprocessing
import time

import harness
from keys import Key, keyset
from test_auth import push

PUSHES = 600


def test_no_spurious_401_while_full_pushes_repeat(start_envoy):
    # A direct response behind the filter: the upstream's speed must not limit the
    # request rate.
    envoy = start_envoy(
        concurrency=2,
        filter_conf={"role": "filter", "metering": {"enabled": False}},
        extra_routes=[{"match": {"prefix": "/fast/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
    )
    # Few keys: the sweep clears the old slot of the first keys microseconds after the
    # generation flips, which is the window a concurrent request falls into.
    keys = [Key(consumer="acme") for _ in range(3)]
    assert push(envoy, keyset(1, keys)).status == 200

    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    results = ctx.Queue()
    # Client processes, not threads: the pushes below must not starve them of the GIL.
    procs = [ctx.Process(target=_client, args=(envoy.public_port, keys[i % len(keys)].key, stop, results))
             for i in range(3)]
    for p in procs:
        p.start()
    codes: dict[int, int] = {}
    try:
        time.sleep(0.3)
        for version in range(2, 2 + PUSHES):
            assert push(envoy, keyset(version, keys)).status == 200
    finally:
        stop.set()
        for _ in procs:
            for c, n in results.get(timeout=30).items():
                codes[c] = codes.get(c, 0) + n
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert codes.get(200, 0) > PUSHES, codes
    assert set(codes) == {200}, f"responses during {PUSHES} full pushes: {codes}"


def _client(port: int, key: str, stop, results) -> None:
    """Sends requests on one keep-alive connection until `stop`; reports status counts."""
    counts: dict[int, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        try:
            conn.request("GET", "/fast/x", headers={"x-api-key": key})
            r = conn.getresponse()
            r.read()
            counts[r.status] = counts.get(r.status, 0) + 1
        except (OSError, http.client.HTTPException):
            counts[-1] = counts.get(-1, 0) + 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()
    results.put(counts)
