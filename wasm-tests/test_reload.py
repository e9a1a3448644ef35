"""Metering across a key-set push and a plugin reload, in real Envoy with 2 workers.

The public listener comes from file-based LDS, so the test can change keymeter's plugin
configuration in the running Envoy: Envoy builds a new plugin root context in each
worker and tears the old ones down (on_done) once the old filter chain has drained.

The first configuration flushes usage only every 60s, so the counts of phases 1 and 2
are still in the old root contexts' memory when the reload happens; only on_done's
flush can deliver them before the first tick. The usage API and the Prometheus totals
must then equal what the backend saw, request for request, plus the expected denials;
so must the CloudEvents the export singleton delivers to a collector (which fails its
first post, so a retried batch is in the mix), deduplicated by event id.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time

import harness
from keys import Key, keyset
from test_auth import push
from test_export import matches
from test_metering import prom_samples, usage
from usage_collector import UsageCollector

OLD_FLUSH_S = 60  # metering.flush_interval of the first configuration (the maximum)
OLD_CONF = {"role": "filter", "metering": {"flush_interval": f"{OLD_FLUSH_S}s"}}
NEW_CONF = {
    "role": "filter",
    "realm": "reloaded",
    "forward_metadata": ["tier"],
    "metering": {"flush_interval": "200ms"},
}
PLANS = {"small": {"rate_limits": [{"name": "h", "rate": 1, "per": "1h", "burst": 5}]}, "big": {}}


def test_usage_survives_keyset_push_and_plugin_reload(start_envoy, backend, tmp_path, wasm_path):
    t0 = time.monotonic()
    collector = UsageCollector()
    collector.fail_next(1, 500)
    try:
        run(start_envoy, backend, tmp_path, wasm_path, collector, t0)
    finally:
        collector.stop()


def run(start_envoy, backend, tmp_path, wasm_path, collector, t0):
    envoy = start_envoy(
        concurrency=2,
        filter_conf=OLD_CONF,
        lds_dir=tmp_path / "lds",
        extra_args=harness.LDS_ENVOY_ARGS,
        component_log_level="wasm:debug",
        **harness.export_service(collector.port, wasm_path, interval="1s"),
    )
    limited = Key(consumer="acme", plan="small")
    open_ = Key(consumer="acme", plan="big", metadata={"tier": "gold"})
    other = Key(consumer="zeta", plan="big")
    disabled = Key(consumer="zeta", plan="big", enabled=False)
    scoped = Key(consumer="zeta", plan="big", scopes=[{"path_prefix": "/only"}])
    stranger = Key(consumer="nobody", plan="big")  # never in the key set
    keys = [limited, open_, other, disabled, scoped]
    assert push(envoy, keyset(1, keys, PLANS)).status == 200
    backend.clear()

    def send(job):
        key, method, path, body = job
        headers = {"x-api-key": key.key} if key else {}
        r = harness.http(method, envoy.url(path), headers, body=body)
        return key, r

    def phase(n):
        jobs = (
            [(limited, "GET", f"/v1/a?p={n}", None)] * 3
            + [(open_, "GET", f"/v1/b?size={100 * n + i * 37}", None) for i in range(3)]
            + [(open_, "POST", "/v1/b", b"x" * (1000 * n + i)) for i in range(2)]
            + [(other, "GET", "/status/503", None)] * 2
            + [(other, "GET", "/status/201", None)]
            + [(disabled, "GET", "/v1/c", None)]
            + [(scoped, "GET", "/v1/c", None), (scoped, "GET", "/only/x", None)]
            + [(None, "GET", "/v1/c", None), (stranger, "GET", "/v1/c", None)]
        )
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(send, jobs * 2))  # each phase sends its mix twice

    def statuses(results):
        return collections.Counter((k.id if k else None, r.status) for k, r in results)

    def common(n_admitted_limited, n_limited):
        return {
            (open_.id, 200): 10,
            (other.id, 503): 4,
            (other.id, 201): 2,
            (disabled.id, 401): 2,
            (scoped.id, 403): 2,
            (scoped.id, 200): 2,
            (None, 401): 2,
            (stranger.id, 401): 2,
            **({(limited.id, 200): n_admitted_limited} if n_admitted_limited else {}),
            **({(limited.id, 429): n_limited} if n_limited else {}),
        }

    # Phase 1: 6 requests of the limited key (burst 5): 5 pass, 1 is limited.
    p1 = phase(1)
    assert statuses(p1) == common(5, 1)

    # A key-set push (new version, same keys): counting and limits carry on.
    assert push(envoy, keyset(2, keys, PLANS)).status == 200
    p2 = phase(2)
    assert statuses(p2) == common(0, 6)

    # Both workers served traffic, so both old root contexts hold counts.
    worker_cx = envoy.stats(filter=rf"^listener\.127\.0\.0\.1_{envoy.public_port}\.worker_\d+\.downstream_cx_total$")
    assert len(worker_cx) == 2 and all(v > 0 for v in worker_cx.values()), worker_cx
    # Nothing flushed yet: the counts are in the old root contexts' memory only.
    assert time.monotonic() - t0 < OLD_FLUSH_S - 20, "too slow to exercise on_done"
    assert usage(envoy)["items"] == []

    # The plugin reload: new configuration through LDS; the old filter chain drains.
    harness.update_public_listener(envoy, NEW_CONF)
    harness.wait_listeners_drained(envoy)
    probe = harness.http("GET", envoy.url("/v1/c"))
    assert probe.status == 401 and 'Bearer realm="reloaded"' in probe.headers.get_all("www-authenticate")

    p3 = phase(3)
    assert statuses(p3) == common(0, 6)
    for key, r in p3:
        if r.status == 401:
            assert 'Bearer realm="reloaded"' in r.headers.get_all("www-authenticate"), r.headers
    for key, r in p1 + p2:
        if r.status == 401:
            assert 'Bearer realm="keymeter"' in r.headers.get_all("www-authenticate"), r.headers

    # What the backend saw, request for request.
    seen = backend.requests()
    admitted = collections.Counter(q["headers"].get("x-keymeter-key-id") for q in seen)
    assert dict(admitted) == {limited.id: 5, open_.id: 30, other.id: 18, scoped.id: 6}
    tiers = collections.Counter(
        (q["path"].startswith("/v1/b"), q["headers"].get("x-keymeter-meta-tier")) for q in seen
    )
    # forward_metadata only exists in the new configuration: phase 3's open_ requests only
    assert tiers[(True, "gold")] == 10 and tiers[(True, None)] == 20, tiers
    body_bytes = sum(q["body_bytes"] for q in seen if q["headers"].get("x-keymeter-key-id") == open_.id)
    assert body_bytes == 2 * sum(1000 * n + i for n in (1, 2, 3) for i in range(2))
    sizes = 2 * sum(100 * n + i * 37 for n in (1, 2, 3) for i in range(3))

    want_requests = {
        limited.id: {"admitted": admitted[limited.id], "rate_limited": 13},
        open_.id: {"admitted": admitted[open_.id]},
        other.id: {"admitted": admitted[other.id]},
        disabled.id: {"unauthorized": 6},
        scoped.id: {"admitted": admitted[scoped.id], "forbidden": 6},
    }

    def nonzero(d):
        return {k: v for k, v in d.items() if v}

    def rows():
        return {row["lineage"]: row for row in usage(envoy)["items"]}

    def settled():
        got = rows()
        return set(got) == set(want_requests) and all(
            nonzero(got[lineage]["requests"]) == counts for lineage, counts in want_requests.items()
        )

    # Before the old configuration's first tick: only on_done can have flushed phases 1-2.
    remaining = OLD_FLUSH_S - 5 - (time.monotonic() - t0)
    assert remaining > 10, "too slow to tell on_done's flush from a tick"
    try:
        harness.wait_until(settled, timeout=remaining, interval=0.2)
    except AssertionError:
        got = {lineage: nonzero(row["requests"]) for lineage, row in rows().items()}
        raise AssertionError(
            f"usage API never matched the traffic (old root contexts' on_done flush missing?)\n"
            f"want {want_requests}\ngot  {got}"
        ) from None
    got = rows()
    assert got[other.id]["responses"] == {"1xx": 0, "2xx": 6, "3xx": 0, "4xx": 0, "5xx": 12}
    assert got[limited.id]["responses"]["2xx"] == 5 and got[limited.id]["responses"]["4xx"] == 13
    assert got[limited.id]["cost_units"] == 5
    assert got[open_.id]["request_bytes"] >= body_bytes
    assert got[open_.id]["response_bytes"] >= sizes
    assert got[disabled.id]["cost_units"] == 0 and got[disabled.id]["responses"]["4xx"] == 6

    # Prometheus: exactly the same per-key numbers, and the global totals.
    def labels(key):
        d = key.doc
        return {("consumer", d["consumer"]), ("plan", d["plan"]), ("key_id", key.id), ("credential", "api-key")}

    by_id = {k.id: k for k in keys}
    want_prom = {
        frozenset(labels(by_id[lineage]) | {("outcome", o)}): n
        for lineage, counts in want_requests.items()
        for o, n in counts.items()
    }

    def prom_settled():
        return nonzero(prom_samples(envoy, "keymeter_requests_total")) == want_prom

    harness.wait_until(prom_settled, timeout=10, interval=0.2, message="prometheus never matched the usage API")
    for lineage, row in got.items():
        base = labels(by_id[lineage])
        for metric, field in (
            ("keymeter_request_bytes_total", "request_bytes"),
            ("keymeter_response_bytes_total", "response_bytes"),
            ("keymeter_cost_units_total", "cost_units"),
        ):
            assert prom_samples(envoy, metric).get(frozenset(base), 0) == row[field], (metric, lineage, row)
        responses = prom_samples(envoy, "keymeter_responses_total")
        for cls, n in row["responses"].items():
            assert responses.get(frozenset(base | {("status_class", cls)}), 0) == n, (lineage, cls)
    plan = nonzero(prom_samples(envoy, "keymeter_plan_requests_total"))
    assert plan == {
        frozenset({("plan", "small"), ("outcome", "admitted")}): 5,
        frozenset({("plan", "small"), ("outcome", "rate_limited")}): 13,
        frozenset({("plan", "big"), ("outcome", "admitted")}): 54,
        frozenset({("plan", "big"), ("outcome", "unauthorized")}): 6,
        frozenset({("plan", "big"), ("outcome", "forbidden")}): 6,
    }
    unauth = nonzero(prom_samples(envoy, "keymeter_unauthenticated_total"))
    assert unauth == {
        frozenset({("reason", "missing_credential")}): 6 + 1,  # + the realm probe
        frozenset({("reason", "invalid_credential")}): 6,
    }
    assert time.monotonic() - t0 < OLD_FLUSH_S, "checked after the old configuration's first tick"

    # The CloudEvents export delivered exactly the same counts (deduplicated by id).
    harness.wait_until(lambda: matches(collector, envoy), timeout=20, interval=0.2,
                       message=f"exported CloudEvents never matched the usage API: {collector.totals()}")
    exported = collector.totals()
    for lineage, counts in want_requests.items():
        assert nonzero(exported[lineage]["requests"]) == counts, (lineage, exported[lineage])
    assert collector.requests()[0]["status"] == 500, "the first batch was refused and retried"
