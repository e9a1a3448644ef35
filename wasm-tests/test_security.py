"""Hardening in real Envoy (issue 10): a client-written X-Forwarded-For never moves the
client address, CIDR families, the RateLimit field on a refused request, metric labels
that names cannot forge, path forms that cannot dodge scopes or route costs, and the
admin API's edges."""

from __future__ import annotations

import copy

import pytest

import harness
from keys import Key, keyset
from test_auth import assert_problem, get, push

SLOW = {"name": "hourly", "rate": 1, "per": "1h"}


def load(envoy, version, keys, plans=None):
    r = push(envoy, keyset(version, keys, plans))
    assert r.status == 200, r
    return r


def from_addr(envoy, addr, headers=None, path="/v1/x"):
    """A request whose TCP source address really is `addr` (a 127.x.y.z loopback)."""
    return harness.http("GET", envoy.url(path), headers or {}, source_address=(addr, 0))


# --------------------------------------------------------------------------- 10.1 client address


def test_x_forwarded_for_does_not_pass_a_cidr_allow_list(start_envoy):
    envoy = start_envoy()
    ten = Key(cidrs=["10.0.0.0/8"])
    two = Key(cidrs=["127.0.0.2/32"])
    load(envoy, 1, [ten, two])
    for xff in ("10.1.2.3", "10.1.2.3, 10.9.9.9", "127.0.0.2"):
        assert_problem(get(envoy, headers={"x-api-key": ten.key, "x-forwarded-for": xff}), 403, "address-not-allowed")
    assert_problem(
        get(envoy, headers={"x-api-key": two.key, "x-forwarded-for": "127.0.0.2"}), 403, "address-not-allowed"
    )
    # The real source address decides, whatever the header claims.
    assert from_addr(envoy, "127.0.0.2", {"x-api-key": two.key}).status == 200
    assert from_addr(envoy, "127.0.0.2", {"x-api-key": two.key, "x-forwarded-for": "10.1.2.3"}).status == 200
    assert_problem(from_addr(envoy, "127.0.0.3", {"x-api-key": two.key}), 403, "address-not-allowed")


def test_x_forwarded_for_does_not_rotate_the_anonymous_subject(start_envoy, backend):
    envoy = start_envoy(filter_conf={"role": "filter", "anonymous": {"plan": "anon"}})
    load(envoy, 1, [], {"anon": {"rate_limits": [{**SLOW, "burst": 2}]}})
    statuses = [
        from_addr(envoy, "127.0.0.4", {"x-forwarded-for": f"198.51.100.{i}"}).status for i in range(4)
    ]
    assert statuses == [200, 200, 429, 429], "each X-Forwarded-For value got a fresh bucket"
    # A really different client address is a different subject.
    assert from_addr(envoy, "127.0.0.5", {"x-forwarded-for": "198.51.100.1"}).status == 200
    # The backend sees Envoy's view of the client appended, not only the claim.
    seen = backend.requests()[-1]["headers"]["x-forwarded-for"]
    assert seen.endswith("127.0.0.5"), seen


# --------------------------------------------------------------------------- 10.6 CIDR families


def _v6_public_listener(config: dict) -> int:
    """Adds a copy of the public listener on [::1] (loopback) and returns its port."""
    listeners = config["static_resources"]["listeners"]
    v6 = copy.deepcopy(next(l for l in listeners if l["name"] == "public"))
    port = harness.free_port()
    v6["name"] = "public6"
    v6["address"] = {"socket_address": {"address": "::1", "port_value": port}}
    listeners.append(v6)
    return port


def test_ipv4_and_ipv6_any_cidrs_admit_only_their_family(start_envoy, backend, wasm_path):
    cfg = harness.envoy_config(
        backend_port=backend.port,
        public_port=harness.free_port(),
        envoy_admin_port=harness.free_port(),
        admin_api_port=harness.free_port(),
        wasm_path=wasm_path,
    )
    port6 = _v6_public_listener(cfg)
    envoy = start_envoy(config=cfg)
    any4, any6, both = Key(cidrs=["0.0.0.0/0"]), Key(cidrs=["::/0"]), Key(cidrs=["0.0.0.0/0", "::/0"])
    load(envoy, 1, [any4, any6, both])

    def via_v6(key):
        return harness.http("GET", f"http://[::1]:{port6}/v1/x", {"x-api-key": key.key})

    assert get(envoy, headers={"x-api-key": any4.key}).status == 200
    assert_problem(get(envoy, headers={"x-api-key": any6.key}), 403, "address-not-allowed")
    assert_problem(via_v6(any4), 403, "address-not-allowed")
    assert via_v6(any6).status == 200
    assert get(envoy, headers={"x-api-key": both.key}).status == 200
    assert via_v6(both).status == 200


# --------------------------------------------------------------------------- 10.8 RateLimit on 429


def test_a_429_reports_the_quota_that_really_remains(start_envoy):
    envoy = start_envoy()
    k = Key(plan="p")
    plan = {"rate_limits": [{**SLOW, "burst": 2}], "quotas": [{"name": "daily", "period": "day", "limit": 10}]}
    load(envoy, 1, [k], {"p": plan})
    oks = [get(envoy, headers={"x-api-key": k.key}) for _ in range(2)]
    assert [r.status for r in oks] == [200, 200]
    assert oks[1].headers.get("ratelimit").startswith('"hourly";r=0;t=3600, "daily";r=8;')
    refused = get(envoy, headers={"x-api-key": k.key})
    assert_problem(refused, 429, "rate-limited")
    # Not charged, so the day quota still has 8 (it said 7 before the fix).
    assert refused.headers.get("ratelimit").startswith('"hourly";r=0;t=3600, "daily";r=8;'), refused.headers


# --------------------------------------------------------------------------- 10.7 metric labels

FAMILIES = {
    "keymeter_requests_total": ("consumer", "plan", "key_id", "outcome"),
    "keymeter_responses_total": ("consumer", "plan", "key_id", "status_class"),
    "keymeter_request_bytes_total": ("consumer", "plan", "key_id"),
    "keymeter_response_bytes_total": ("consumer", "plan", "key_id"),
    "keymeter_cost_units_total": ("consumer", "plan", "key_id"),
    "keymeter_plan_requests_total": ("plan", "outcome"),
    "keymeter_plan_cost_units_total": ("plan",),
    "keymeter_unauthenticated_total": ("reason",),
    "keymeter_limit_contention_total": (),
    "keymeter_export_events_total": (),
    "keymeter_export_failures_total": (),
}


def prometheus_samples(text: str) -> list[tuple[str, dict, float]]:
    """(family, labels, value) of every keymeter sample in a /stats/prometheus page."""
    import re

    out = []
    for line in text.splitlines():
        if not line.startswith("keymeter_"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_:]+)(?:\{(.*)\})? (\S+)", line)
        assert m, f"unparseable line {line!r}"
        labels = dict(re.findall(r'([A-Za-z0-9_]+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


# Valid names (1-64 of A-Z a-z 0-9 _ -) chosen to look like the label names the
# stats_tags regexes look for, or like Envoy's own tag patterns.
ADVERSARIAL_CONSUMERS = ["plan", "key_id", "outcome", "consumer", "status_class", "reason", "x_rq_200", "-"]
ADVERSARIAL_PLANS = ["outcome", "consumer", "key_id", "plan", "status_class"]


def test_metric_labels_cannot_be_forged_by_names(start_envoy):
    envoy = start_envoy(filter_conf={"role": "filter", "metering": {"flush_interval": "200ms"}})
    keys = []
    for i, consumer in enumerate(ADVERSARIAL_CONSUMERS):
        keys.append(Key(consumer=consumer, plan=ADVERSARIAL_PLANS[i % len(ADVERSARIAL_PLANS)]))
    load(envoy, 1, keys, {p: {} for p in ADVERSARIAL_PLANS})
    for k in keys:
        assert get(envoy, headers={"x-api-key": k.key}).status == 200
    expected = {(k.doc["consumer"], k.doc["plan"], k.id) for k in keys}

    def all_counted():
        seen = {
            (l.get("consumer"), l.get("plan"), l.get("key_id"))
            for f, l, v in prometheus_samples(envoy.prometheus())
            if f == "keymeter_requests_total" and l.get("outcome") == "admitted" and v == 1
        }
        return expected <= seen

    harness.wait_until(all_counted, timeout=10, message=f"per-key series\n{envoy.prometheus()}")
    samples = prometheus_samples(envoy.prometheus())
    for family, labels, _ in samples:
        assert family in FAMILIES, f"forged metric family {family!r} {labels}"
        assert set(labels) == set(FAMILIES[family]), f"{family}: labels {labels}"
        if "key_id" in labels:
            assert (labels["consumer"], labels["plan"], labels["key_id"]) in expected, labels
        if "outcome" in labels:
            assert labels["outcome"] in ("admitted", "unauthorized", "forbidden", "rate_limited", "quota_exceeded")
        if "status_class" in labels:
            assert labels["status_class"] in ("1xx", "2xx", "3xx", "4xx", "5xx")
    per_plan = {
        l["plan"]: v for f, l, v in samples if f == "keymeter_plan_requests_total" and l["outcome"] == "admitted"
    }
    want = {}
    for k in keys:
        want[k.doc["plan"]] = want.get(k.doc["plan"], 0) + 1
    assert per_plan == want


# --------------------------------------------------------------------------- 10.2 path forms

# Paths that leave the scope /v1/reports on some backend (resolving '..', collapsing
# '//', decoding %2f/%5c or '\\' into separators, stripping ';' parameters).
SCOPE_ESCAPES = [
    "/v1/reports/../admin",
    "/v1/reports/./../admin",
    "/v1/reports/%2e%2e/admin",
    "/v1/reports/%2E%2E/admin",
    "/v1/reports/.%2e/admin",
    "/v1/reports/..%2fadmin",
    "/v1/reports%2f..%2fadmin",
    "/v1/reports/..%5cadmin",
    "/v1/reports\\..\\admin",
    "/v1/reports/..;/admin",
    "/v1/reports;/../admin",
    "/v1/reports//../../admin",
]
# Paths some backend serves as /v1/reports while the raw string misses the cost prefix.
COST_DODGES = [
    "/v1/reports;x",
    "/v1/reports%3bx",
    "/v1//reports",
    "/v1/./reports",
    "/v1/x/../reports",
    "/v1/%2e/reports",
    "/v1%2freports",
    "/v1%2Freports",
    "/v1\\reports",
]
ENVOY_REFUSALS = (301, 302, 307, 308, 400, 404)


@pytest.fixture(params=[False, True], ids=["raw-path", "normalize_path"])
def normalize(request):
    return request.param


def test_path_forms_cannot_leave_a_scope(start_envoy, backend, normalize):
    envoy = start_envoy(normalize_path=normalize)
    scoped = Key(scopes=[{"methods": ["GET"], "path_prefix": "/v1/reports"}])
    plain = Key()
    load(envoy, 1, [scoped, plain])
    for path in SCOPE_ESCAPES:
        backend.clear()
        r = get(envoy, path, {"x-api-key": scoped.key})
        if normalize and r.status != 403:
            # Envoy itself refused or redirected the form before keymeter saw it.
            assert r.status in ENVOY_REFUSALS, (path, r)
        elif normalize:
            assert r.json()["type"].endswith(("ambiguous-path", "out-of-scope")), (path, r)
        else:
            body = assert_problem(r, 403, "ambiguous-path")
            assert path not in body["detail"]
        assert backend.requests() == [], f"{path} reached the backend"
    # Unambiguous spellings of an allowed path still work: %72 is 'r'.
    for path in ("/v1/reports/1", "/v1/%72eports/1", "/v1/reports/a%20b", "/v1/reports?next=/../admin"):
        assert get(envoy, path, {"x-api-key": scoped.key}).status == 200, path
    # A key with no scopes and no route costs: keymeter has no path rule to protect.
    if not normalize:
        assert get(envoy, "/v1/reports/..;/admin", {"x-api-key": plain.key}).status == 200


def test_path_forms_cannot_dodge_a_route_cost(start_envoy, backend, normalize):
    envoy = start_envoy(normalize_path=normalize)
    plan = {
        "rate_limits": [{**SLOW, "burst": 10}],
        "costs": [{"path_prefix": "/v1/reports", "cost": 10}],
    }
    forms = COST_DODGES + ["/v1/%72eports"]
    keys = {path: Key(plan="costly") for path in forms}
    load(envoy, 1, list(keys.values()), {"costly": plan})
    for path, key in keys.items():
        backend.clear()
        r = get(envoy, path, {"x-api-key": key.key})
        if r.status == 200:
            # Served: then it was charged as /v1/reports (all 10 tokens).
            assert r.headers.get("ratelimit", "").startswith('"hourly";r=0;'), (path, r.headers)
            assert path == "/v1/%72eports" or normalize, f"{path} was served"
        elif r.status == 403:
            assert_problem(r, 403, "ambiguous-path")
            assert backend.requests() == []
        else:
            assert normalize and r.status in ENVOY_REFUSALS, (path, r)
            assert backend.requests() == []
