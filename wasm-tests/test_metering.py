"""Metering end to end: per-key usage counted across 2 workers, flushed into shared data
and Envoy metrics, equal to what the backend actually saw, request for request."""

from __future__ import annotations

import collections
import concurrent.futures
import re
import time

import harness
from keys import Key, keyset
from test_auth import get, push

TOKEN = harness.TEST_ADMIN_TOKEN


def usage(envoy, query=""):
    r = harness.http("GET", envoy.admin_api_url("/v1/usage" + query), {"authorization": f"Bearer {TOKEN}"})
    assert r.status == 200, r
    return r.json()


def prom_samples(envoy, metric):
    """{frozenset(labels): value} for one Prometheus metric."""
    out = {}
    for line in envoy.prometheus().splitlines():
        m = re.match(rf"^{metric}\{{(.*)\}} (\d+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels] = int(m.group(2))
    return out


def test_usage_matches_what_the_backend_saw(start_envoy, backend):
    envoy = start_envoy(concurrency=2, filter_conf={"role": "filter", "metering": {"flush_interval": "200ms"}})
    limited = Key(consumer="acme", plan="small")
    open_ = Key(consumer="acme", plan="big")
    other = Key(consumer="zeta", plan="big")
    disabled = Key(consumer="zeta", plan="big", enabled=False)
    scoped = Key(consumer="zeta", plan="big", scopes=[{"path_prefix": "/only"}])
    plans = {"small": {"rate_limits": [{"name": "h", "rate": 1, "per": "1h", "burst": 5}]}, "big": {}}
    keys = [limited, open_, other, disabled, scoped]
    assert push(envoy, keyset(1, keys, plans)).status == 200
    backend.clear()

    def send(job):
        key, path, body = job
        headers = {"x-api-key": key.key} if key else {}
        if body is None:
            return harness.http("GET", envoy.url(path), headers).status
        return harness.http("POST", envoy.url(path), headers, body=body).status

    jobs = (
        [(limited, "/v1/a", None)] * 8
        + [(open_, "/v1/b?size=1000", None)] * 4
        + [(open_, "/v1/b", b"x" * 5000)] * 2
        + [(other, "/status/503", None)] * 3
        + [(disabled, "/v1/c", None)] * 2
        + [(scoped, "/v1/c", None)] * 2
        + [(None, "/v1/c", None)] * 3
    )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = list(pool.map(send, jobs[:12]))
        # a key-set push in the middle must not disturb counting
        assert push(envoy, keyset(2, keys, plans)).status == 200
        second = list(pool.map(send, jobs[12:]))
    codes = first + second
    assert codes.count(429) == 3

    seen = collections.Counter(r["headers"].get("x-keymeter-key-id") for r in backend.requests())
    expected_admitted = {limited.id: 5, open_.id: 6, other.id: 3}
    assert dict(seen) == expected_admitted

    def rows():
        return {row["lineage"]: row for row in usage(envoy)["items"]}

    want = {
        limited.id: {"admitted": 5, "rate_limited": 3},
        open_.id: {"admitted": 6},
        other.id: {"admitted": 3},
        disabled.id: {"unauthorized": 2},
        scoped.id: {"forbidden": 2},
    }

    def settled():
        got = rows()
        return all(
            lineage in got and all(got[lineage]["requests"][k] == v for k, v in counts.items())
            for lineage, counts in want.items()
        )

    harness.wait_until(settled, timeout=10, message="usage API never matched the traffic")
    got = rows()
    for lineage, counts in want.items():
        total = sum(got[lineage]["requests"].values())
        assert total == sum(counts.values()), (lineage, got[lineage])
    assert got[other.id]["responses"]["5xx"] == 3
    assert got[limited.id]["responses"]["4xx"] == 3 and got[limited.id]["responses"]["2xx"] == 5
    assert got[open_.id]["response_bytes"] >= 4 * 1000
    assert got[open_.id]["request_bytes"] >= 2 * 5000
    assert got[limited.id]["cost_units"] == 5, "only admitted requests consume cost"
    assert got[limited.id]["consumer"] == "acme" and got[limited.id]["plan"] == "small"

    filtered = usage(envoy, "?consumer=acme")["items"]
    assert {r["lineage"] for r in filtered} == {limited.id, open_.id}
    paged = usage(envoy, "?limit=2")
    assert len(paged["items"]) == 2 and paged["next_cursor"] == 2
    assert len(usage(envoy, "?cursor=2&limit=10")["items"]) == 3
    meta = usage(envoy)
    assert re.fullmatch(r"[0-9a-f]{16}", meta["instance_id"]) and meta["started_at"].endswith("Z")

    # Prometheus shows the same numbers, as labelled series
    def prom_ok():
        s = prom_samples(envoy, "keymeter_requests_total")
        key = frozenset({("consumer", "acme"), ("plan", "small"), ("key_id", limited.id), ("credential", "api-key"),
                         ("outcome", "admitted")})
        return s.get(key) == 5

    harness.wait_until(prom_ok, timeout=10, message="prometheus never showed the admitted count")
    s = prom_samples(envoy, "keymeter_requests_total")
    assert s[frozenset({("consumer", "acme"), ("plan", "small"), ("key_id", limited.id), ("credential", "api-key"),
                        ("outcome", "rate_limited")})] == 3
    plan_totals = prom_samples(envoy, "keymeter_plan_requests_total")
    assert plan_totals[frozenset({("plan", "big"), ("outcome", "admitted")})] == 9
    unauth = prom_samples(envoy, "keymeter_unauthenticated_total")
    assert unauth[frozenset({("reason", "missing_credential")})] == 3
    resp = prom_samples(envoy, "keymeter_responses_total")
    assert resp[frozenset({("consumer", "zeta"), ("plan", "big"), ("key_id", other.id), ("credential", "api-key"),
                           ("status_class", "5xx")})] == 3
    # no key material in any metric
    assert limited.key not in envoy.prometheus()


def test_per_key_series_are_capped_but_plan_totals_are_not(start_envoy):
    envoy = start_envoy(filter_conf={"role": "filter", "metering": {"flush_interval": "200ms", "max_key_series": 2}})
    keys = [Key(consumer=f"c{i}", plan="p") for i in range(4)]
    assert push(envoy, keyset(1, keys, {"p": {}})).status == 200
    for k in keys:
        assert get(envoy, headers={"x-api-key": k.key}).status == 200

    def plan_total():
        return prom_samples(envoy, "keymeter_plan_requests_total").get(frozenset({("plan", "p"), ("outcome", "admitted")}))

    harness.wait_until(lambda: plan_total() == 4, timeout=10, message="plan total never reached 4")
    per_key = {dict(labels)["key_id"] for labels in prom_samples(envoy, "keymeter_requests_total")}
    assert len(per_key) == 2, per_key
    # the usage API is not capped
    assert len(usage(envoy)["items"]) == 4


def test_the_idle_state_walk_runs_and_keeps_limits_in_use(start_envoy):
    """The admin workers walk the usage index for idle limit state (reclaimed only after
    32 days idle, see core::limits::reclaim): the walk must run in Envoy and must not
    touch the state of keys in use."""
    envoy = start_envoy(concurrency=2, filter_conf={"role": "filter", "metering": {"flush_interval": "200ms"}})
    plans = {"small": {"rate_limits": [{"name": "h", "rate": 1, "per": "1h", "burst": 3}]}}
    keys = [Key(consumer=f"c{i}", plan="small") for i in range(4)]
    assert push(envoy, keyset(1, keys, plans)).status == 200
    for k in keys:
        assert [get(envoy, headers={"x-api-key": k.key}).status for _ in range(4)] == [200, 200, 200, 429]

    def reclaim():
        r = harness.http("GET", envoy.admin_api_url("/v1/status"), {"authorization": f"Bearer {TOKEN}"})
        assert r.status == 200, r
        return r.json()["reclaim"]

    harness.wait_until(lambda: reclaim()["cursor"] > 0, timeout=15, message="the idle-state walk never moved")
    # Let it go round the (4-lineage) index a few times.
    time.sleep(3)
    assert reclaim()["reclaimed_states"] == 0
    for k in keys:
        assert get(envoy, headers={"x-api-key": k.key}).status == 429, "a key's spent bucket must survive the walk"
