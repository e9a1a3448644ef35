"""Rate limits and quotas in real Envoy with 2 workers: token buckets shared across
workers, consumer-wide limits, route costs, quotas, anonymous per-IP limits, standard
429 responses and RateLimit headers, state surviving plan pushes and key rotation.

Timing: buckets that refill slowly (1 token per hour or per 2 s) so the number of
admitted requests does not depend on how fast this machine is."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

import harness
from keys import Key, keyset
from test_auth import assert_problem, delta, get, push

SLOW = {"name": "hourly", "rate": 1, "per": "1h"}


def plan(burst, **extra):
    return {"rate_limits": [{**SLOW, "burst": burst}], **extra}


@pytest.fixture
def envoy(start_envoy):
    return start_envoy(concurrency=2, filter_conf={"role": "filter", "anonymous": {"plan": "anon"}})


def load(envoy, version, keys, plans):
    r = push(envoy, keyset(version, keys, plans))
    assert r.status == 200, r


def statuses(envoy, key, n, path="/v1/x", method="GET"):
    return [get(envoy, path, {"x-api-key": key.key}, method=method).status for _ in range(n)]


def test_burst_then_throttle_with_retry_after_and_headers(envoy, backend):
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": plan(3)})
    oks = [get(envoy, headers={"x-api-key": k.key}) for _ in range(3)]
    assert [r.status for r in oks] == [200, 200, 200]
    assert oks[0].headers.get("ratelimit-policy") == '"hourly";q=1;w=3600'
    assert [r.headers.get("ratelimit") for r in oks] == ['"hourly";r=2;t=0', '"hourly";r=1;t=0', '"hourly";r=0;t=3600']
    backend.clear()
    r = get(envoy, headers={"x-api-key": k.key})
    body = assert_problem(r, 429, "rate-limited")
    assert 3590 <= int(r.headers.get("retry-after")) <= 3600
    assert r.headers.get("ratelimit") == '"hourly";r=0;t=3600'
    assert "retry" in body["detail"].lower()
    assert backend.requests() == [], "a throttled request reached the backend"


def test_refill(envoy):
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": {"rate_limits": [{"name": "two-s", "rate": 1, "per": "2s", "burst": 2}]}})
    assert statuses(envoy, k, 2) == [200, 200]
    r = get(envoy, headers={"x-api-key": k.key})
    assert r.status == 429
    wait = int(r.headers.get("retry-after"))
    assert 1 <= wait <= 2
    time.sleep(wait + 0.2)
    assert statuses(envoy, k, 1) == [200]


def test_two_workers_share_one_bucket_exactly(envoy):
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": plan(25)})
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: get(envoy, headers={"x-api-key": k.key}).status, range(80)))
    assert codes.count(200) == 25, codes
    assert codes.count(429) == 55
    stats = envoy.stats()
    per_worker = {name: v for name, v in stats.items() if ".worker_" in name and name.endswith("downstream_cx_total") and name.startswith("listener.127.0.0.1_" + str(envoy.public_port))}
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), per_worker


def test_consumer_shared_limits(envoy):
    a, b, other = Key(consumer="acme", plan="team"), Key(consumer="acme", plan="team"), Key(consumer="zeta", plan="team")
    load(envoy, 1, [a, b, other], {"team": plan(4, limit_by="consumer")})
    assert statuses(envoy, a, 3) == [200] * 3
    assert statuses(envoy, b, 2) == [200, 429]
    assert statuses(envoy, a, 1) == [429]
    assert statuses(envoy, other, 1) == [200], "another consumer has its own bucket"


def test_per_route_cost(envoy):
    k = Key(plan="p")
    costs = [{"methods": ["POST"], "path_prefix": "/v1/render", "cost": 4}]
    load(envoy, 1, [k], {"p": plan(10, costs=costs)})
    assert statuses(envoy, k, 2, "/v1/render/pdf", "POST") == [200, 200]
    assert statuses(envoy, k, 1, "/v1/render/pdf", "POST") == [429]  # 2 left < 4
    assert statuses(envoy, k, 2, "/v1/render/pdf", "GET") == [200, 200]  # GET costs 1
    assert statuses(envoy, k, 1) == [429]


def test_cost_beyond_burst_is_429_without_retry_after(envoy):
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": plan(3, costs=[{"path_prefix": "/v1/huge", "cost": 5}])})
    r = get(envoy, "/v1/huge", {"x-api-key": k.key})
    assert_problem(r, 429, "cost-exceeds-burst")
    assert r.headers.get("retry-after") is None


def test_daily_quota_exhaustion(envoy):
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": {"quotas": [{"name": "daily", "period": "day", "limit": 3}]}})
    assert statuses(envoy, k, 3) == [200] * 3
    r = get(envoy, headers={"x-api-key": k.key})
    body = assert_problem(r, 429, "quota-exceeded")
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    to_midnight = 86400 - int(time.time()) % 86400
    assert abs(int(r.headers.get("retry-after")) - to_midnight) <= 5
    assert r.headers.get("ratelimit-policy") == '"daily";q=3;w=86400'


def test_anonymous_plan_is_limited_per_client_ip(envoy, backend):
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": {}, "anon": plan(2)})
    r1 = get(envoy, headers={"x-keymeter-consumer": "spoof"})
    assert r1.status == 200
    assert r1.json()["headers"]["x-keymeter-consumer"] == "anonymous"
    assert r1.json()["headers"]["x-keymeter-plan"] == "anon"
    assert "x-keymeter-key-id" not in r1.json()["headers"]
    assert get(envoy).status == 200
    assert_problem(get(envoy), 429, "rate-limited")
    # another client address has its own bucket
    other = harness.http("GET", envoy.url("/v1/x"), source_address=("127.0.0.2", 0))
    assert other.status == 200
    # a malformed key is still a 401, not anonymous
    assert_problem(get(envoy, headers={"x-api-key": "junk"}), 401, "malformed-credential")

    # anonymous traffic is metered under the plan, as consumer "anonymous"
    def anonymous_row():
        r = harness.http("GET", envoy.admin_api_url("/v1/usage"), {"authorization": f"Bearer {harness.TEST_ADMIN_TOKEN}"})
        rows = [i for i in r.json()["items"] if i["lineage"] == "anonymous"]
        return rows[0] if rows else None

    harness.wait_until(
        lambda: (anonymous_row() or {}).get("requests", {}).get("admitted") == 3, timeout=10, message="anonymous usage"
    )
    row = anonymous_row()
    assert row["requests"]["rate_limited"] == 1 and row["consumer"] == "anonymous" and row["plan"] == "anon"


def test_headers_can_be_switched_off(start_envoy):
    envoy = start_envoy(filter_conf={"role": "filter", "rate_limit_headers": False})
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": plan(1)})
    r = get(envoy, headers={"x-api-key": k.key})
    assert r.status == 200 and r.headers.get("ratelimit") is None and r.headers.get("ratelimit-policy") is None


def test_plan_change_mid_traffic_keeps_consumed_state(envoy):
    k = Key(plan="p")
    load(envoy, 1, [k], {"p": plan(5)})
    assert statuses(envoy, k, 5) == [200] * 5
    # the plan grows to burst 7: the 5 consumed tokens stay consumed, 2 remain
    load(envoy, 2, [k], {"p": plan(7)})
    assert statuses(envoy, k, 3) == [200, 200, 429]
    # a delta that changes the key's plan to an empty one lifts the limit
    r = delta(envoy, {"version": 3, "ops": [{"op": "set_plan", "name": "open", "plan": {}}, {"op": "upsert", "key": {**k.doc, "plan": "open"}}]})
    assert r.status == 200, r
    assert statuses(envoy, k, 2) == [200, 200]


def test_rotation_keeps_limit_state(envoy):
    old = Key(plan="p")
    load(envoy, 1, [old], {"p": plan(4)})
    assert statuses(envoy, old, 3) == [200] * 3
    new = Key(plan="p", lineage=old.id)
    load(envoy, 2, [old, new], {"p": plan(4)})
    assert statuses(envoy, new, 2) == [200, 429], "the rotated key inherits the consumed bucket"
    assert statuses(envoy, old, 1) == [429]


def test_key_override_replaces_plan_limits(envoy):
    vip = Key(plan="p", limits={"rate_limits": [{**SLOW, "burst": 6}]})
    load(envoy, 1, [vip], {"p": plan(2)})
    assert statuses(envoy, vip, 7) == [200] * 6 + [429]


def test_anonymous_limits_hold_under_client_address_churn(envoy, backend):
    """Issue 10.17: anonymous state lives in a bounded table (the bound is shown in the
    core test `address_churn_is_bounded_and_each_address_stays_limited`); in real Envoy,
    with many distinct TCP peers (use_remote_address), each address keeps exactly its own
    allowance and an exhausted one stays exhausted however many others come and go."""
    load(envoy, 1, [Key(plan="p")], {"p": {}, "anon": plan(2)})

    def status(ip):
        return harness.http("GET", envoy.url("/v1/x"), source_address=(ip, 0)).status

    first = "127.1.0.1"
    assert [status(first) for _ in range(3)] == [200, 200, 429]
    for i in range(2, 202):
        ip = f"127.1.{i // 250}.{i % 250 + 1}"
        assert [status(ip) for _ in range(3)] == [200, 200, 429], ip
    assert status(first) == 429, "an exhausted address was reset by other addresses' traffic"
