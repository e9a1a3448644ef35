"""Bench measurements beyond the pinned single-worker rounds of run.py.

- proxied pair: the filter in front of a real upstream (a second Envoy answering
  `direct_response`), so the README can show the cost relative to an ordinary proxied
  request, which is what users see;
- two workers: trivial filter and keymeter at `--concurrency 2`, and keymeter at 1,
  measured alike (unpinned, wrk -t2), so the shared-data mutex shows up as poor scaling;
- revoke latency: over 2 workers, the time from the admin API's 200 for a delta revoke
  until the revoked key is refused on every kept-alive connection (both workers);
- a very large key set (10M by default in full mode): push time and RSS per key, pushed
  as a staged upload whose chunks are generated on the fly (the document is never held).
"""

from __future__ import annotations

import http.client
import os
import statistics
import time

import harness

BENCH_PATH = "/v1/bench"


# --------------------------------------------------------------------------- configs


def proxy_config(base_config, upstream_port: int, *, keymeter: bool, km_wasm) -> dict:
    """An Envoy whose public listener proxies everything to `upstream_port` (with or
    without keymeter in front of the router)."""
    if keymeter:
        cfg = base_config(wasm=True, admin=True, filter_conf={"role": "filter"}, wasm_path=km_wasm)
    else:
        cfg = base_config()
    routes = harness.routes(cfg)
    routes[:] = [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "backend":
            addr = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            addr["socket_address"]["port_value"] = upstream_port
    return cfg


def spread_over_workers(cfg: dict) -> dict:
    """SO_REUSEPORT on the public listener: the kernel spreads connections over the
    workers' sockets (the test harness turns it off to catch port clashes)."""
    for lst in cfg["static_resources"]["listeners"]:
        if lst["name"] == "public":
            lst["enable_reuse_port"] = True
    return cfg


# --------------------------------------------------------------------------- keys


def chunk_stream(n: int, known: list, chunk_keys: int, plan: str = "bench"):
    """`n` keys as staged-upload chunks, the `known` ones first; random ids and hashes
    generated per chunk so 10M keys never sit in memory. A random 12-character base62
    id collides with probability ~n^2/2/62^12 (1.6e-8 at 10M): not checked across chunks."""
    import keys as km_keys

    table = bytes((km_keys.BASE62 * 5)[:256], "ascii")
    parts = [f'{{"id":"{k.id}","hash":"{k.hash}","consumer":"c{i % 1000}","plan":"{plan}"}}'
             for i, k in enumerate(known)]
    made = len(parts)
    while made < n or parts:
        need = min(chunk_keys - len(parts), n - made)
        if need > 0:
            raw = os.urandom(12 * need).translate(table).decode()
            hashes = os.urandom(32 * need).hex()
            parts.extend(
                f'{{"id":"{raw[12 * j:12 * j + 12]}","hash":"{hashes[64 * j:64 * j + 64]}",'
                f'"consumer":"c{(made + j) % 1000}","plan":"{plan}"}}'
                for j in range(need))
            made += need
        yield ("[" + ",".join(parts) + "]").encode()
        parts = []


# --------------------------------------------------------------------------- revoke latency


def _get(conn: http.client.HTTPConnection, key: str) -> int:
    conn.request("GET", BENCH_PATH, headers={"x-api-key": key})
    r = conn.getresponse()
    r.read()
    return r.status


def worker_connections(envoy) -> dict[str, int]:
    """Active downstream connections per worker of the public listener."""
    port = envoy.public_port
    out = {}
    for name, v in envoy.stats().items():
        if f"_{port}.worker_" in name and name.endswith(".downstream_cx_active"):
            out[name.split(".worker_")[1].split(".")[0]] = int(v)
    return out


def revoke_latency(envoy, admin_call, keys: list, plans: dict, *, revokes: int = 20, conns: int = 8,
                   deadline_s: float = 5.0) -> dict:
    """`keys[0]` stays valid; `keys[1..revokes]` are revoked one per round. Returns the
    worst and median time from the delta's 200 to the first 401 on the slowest of
    `conns` kept-alive connections (measured one connection after another, so each
    figure is an upper bound)."""
    doc = {"version": 1, "plans": plans,
           "keys": [{"id": k.id, "hash": k.hash, "consumer": "c", "plan": "bench"} for k in keys]}
    r = admin_call(envoy, "PUT", "/v1/keyset", doc)
    if r.status != 200:
        raise RuntimeError(f"revoke bench push failed: {r.status} {r.text[:200]}")
    pool: list[http.client.HTTPConnection] = []
    try:
        # Open connections until both workers hold some (bounded).
        for _ in range(conns * 4):
            c = http.client.HTTPConnection(harness.LOCALHOST, envoy.public_port, timeout=5)
            if _get(c, keys[0].key) != 200:
                raise RuntimeError("revoke bench: valid key refused")
            pool.append(c)
            per_worker = worker_connections(envoy)
            if len(pool) >= conns and sum(1 for v in per_worker.values() if v > 0) >= min(2, envoy.concurrency):
                break
        per_worker = worker_connections(envoy)
        lat_ms, failures = [], 0
        version = 1
        for i in range(1, revokes + 1):
            target = keys[i].key
            if any(_get(c, target) != 200 for c in pool):
                raise RuntimeError(f"revoke bench: key {i} refused before its revoke")
            version += 1
            r = admin_call(envoy, "POST", "/v1/keyset/delta",
                           {"version": version, "ops": [{"op": "revoke", "id": keys[i].id}]})
            t_ok = time.perf_counter()
            if r.status != 200:
                raise RuntimeError(f"revoke bench: delta {i} got {r.status} {r.text[:200]}")
            worst = 0.0
            for c in pool:
                while True:
                    status = _get(c, target)
                    dt = time.perf_counter() - t_ok
                    if status == 401:
                        worst = max(worst, dt)
                        break
                    if dt > deadline_s:
                        failures += 1
                        worst = max(worst, dt)
                        break
            lat_ms.append(worst * 1000)
        return {"revokes": revokes, "connections": len(pool), "connections_per_worker": per_worker,
                "worst_ms": round(max(lat_ms), 2), "median_ms": round(statistics.median(lat_ms), 2),
                "not_refused_within_deadline": failures, "deadline_s": deadline_s}
    finally:
        for c in pool:
            c.close()
