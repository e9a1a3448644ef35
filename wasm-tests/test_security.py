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
    "keymeter_requests_total": ("consumer", "plan", "key_id", "credential", "outcome"),
    "keymeter_responses_total": ("consumer", "plan", "key_id", "credential", "status_class"),
    "keymeter_request_bytes_total": ("consumer", "plan", "key_id", "credential"),
    "keymeter_response_bytes_total": ("consumer", "plan", "key_id", "credential"),
    "keymeter_cost_units_total": ("consumer", "plan", "key_id", "credential"),
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
ADVERSARIAL_CONSUMERS = ["plan", "key_id", "outcome", "consumer", "status_class", "reason", "x_rq_200", "-", "credential"]
ADVERSARIAL_PLANS = ["outcome", "consumer", "key_id", "plan", "status_class", "credential"]


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
        if "credential" in labels:
            assert labels["credential"] == "api-key", labels
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


def test_anonymous_route_costs_use_the_canonical_path(start_envoy, backend):
    envoy = start_envoy(filter_conf={"role": "filter", "anonymous": {"plan": "anon"}}, normalize_path=False)
    anon = {"rate_limits": [{**SLOW, "burst": 10}], "costs": [{"path_prefix": "/v1/reports", "cost": 10}]}
    load(envoy, 1, [], {"anon": anon})
    for i, path in enumerate(COST_DODGES):
        r = from_addr(envoy, f"127.0.1.{i + 1}", path=path)
        assert_problem(r, 403, "ambiguous-path")
    assert backend.requests() == []
    r = from_addr(envoy, "127.0.2.1", path="/v1/%72eports")
    assert r.status == 200 and r.headers.get("ratelimit", "").startswith('"hourly";r=0;'), r.headers


# --------------------------------------------------------------------------- 10.5 admin API

TOKEN = harness.TEST_ADMIN_TOKEN
AUTH = {"authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024


def admin(envoy, method, path, headers=None, body=None):
    return harness.http(method, envoy.admin_api_url(path), AUTH if headers is None else headers, body)


@pytest.fixture
def admin_env(start_envoy):
    envoy = start_envoy()
    k = Key(plan="p")
    load(envoy, 5, [k], {"p": {}})
    return envoy, k


def test_admin_authenticates_before_routing(admin_env):
    envoy, _ = admin_env
    # Without the token, known and unknown paths and methods all look the same.
    for method, path in [
        ("GET", "/v1/status"),
        ("GET", "/v1/nope"),
        ("GET", "/admin"),
        ("DELETE", "/v1/keyset/uploads/0123abcd"),
        ("GET", "/v1/keyset/uploads/x/y/z"),
        ("POST", "/v1/status"),
    ]:
        r = admin(envoy, method, path, {})
        assert_problem(r, 401, "admin-unauthorized")
        assert r.headers.get("www-authenticate", "").startswith("Bearer")
        assert "allow" not in r.headers
    # With it, the real answers.
    assert_problem(admin(envoy, "GET", "/v1/nope"), 404, "not-found")
    assert_problem(admin(envoy, "POST", "/v1/status"), 405, "method-not-allowed")


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_admin_bearer_scheme_is_case_insensitive(admin_env, scheme):
    envoy, _ = admin_env
    assert admin(envoy, "GET", "/v1/status", {"authorization": f"{scheme} {TOKEN}"}).status == 200
    assert_problem(admin(envoy, "GET", "/v1/status", {"authorization": f"{scheme} wrong"}), 401, "admin-unauthorized")
    assert_problem(admin(envoy, "GET", "/v1/status", {"authorization": f"{scheme}{TOKEN}"}), 401, "admin-unauthorized")


def test_every_admin_answer_is_no_store(admin_env):
    envoy, k = admin_env
    answers = [
        admin(envoy, "GET", "/v1/status"),
        admin(envoy, "GET", "/v1/usage"),
        admin(envoy, "GET", "/v1/status", {}),
        admin(envoy, "GET", "/v1/nope"),
        admin(envoy, "POST", "/v1/status"),
        admin(envoy, "GET", "/v1/usage?limit=0"),
        admin(envoy, "PUT", "/v1/keyset", body=b"{"),
        admin(envoy, "POST", "/v1/keyset/delta", body={"version": 6, "ops": [{"op": "revoke", "id": k.id}]}),
        admin(envoy, "DELETE", "/v1/keyset/uploads/feedbeef"),
        send_large(envoy.admin_api_port, "/v1/keyset/delta", 9),
    ]
    statuses = [r.status for r in answers]
    assert statuses == [200, 200, 401, 404, 405, 400, 400, 200, 404, 413], statuses
    for r in answers:
        assert r.headers.get("cache-control") == "no-store", (r.status, r.headers)


def send_large(port: int, path: str, chunks: int, chunk_size: int = MIB, chunked: bool = False) -> harness.Response:
    """POSTs `chunks` x `chunk_size` bytes like a real client that reads the answer while
    it still sends: stops sending once a response arrives (a server refusing a large
    body answers early and may reset the connection after that)."""
    import select
    import socket

    head = f"POST {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {chunks * chunk_size}\r\n"
    data = b"x" * chunk_size
    piece = b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
    raw = b""
    with socket.create_connection((harness.LOCALHOST, port), timeout=10) as sock:
        sock.sendall((head + "\r\n").encode())
        try:
            for _ in range(chunks):
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(piece)
            if chunked and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
                got = sock.recv(65536)
                if not got:
                    break
                raw += got
        except ConnectionResetError:
            pass
    head_b, _, body = raw.partition(b"\r\n\r\n")
    lines = head_b.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = harness.Headers(tuple(l.split(": ", 1)) for l in lines[1:])
    return harness.Response(status, "", headers, body)


def _length(raw: bytes) -> int:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_delta_and_commit_bodies_are_capped(admin_env):
    envoy, k = admin_env
    port = envoy.admin_api_port
    r = send_large(port, "/v1/keyset/delta", 9)
    body = assert_problem(r, 413, "body-too-large")
    assert r.headers.get("cache-control") == "no-store"
    assert "8388608" in body["detail"]
    # Chunked, without a Content-Length: refused once the buffered body passes the cap.
    r = send_large(port, "/v1/keyset/delta", 12, chunked=True)
    assert_problem(r, 413, "body-too-large")
    # Just under the cap it is read (and is then simply not JSON).
    r = admin(envoy, "POST", "/v1/keyset/delta", body=b" " * (8 * MIB - 10) + b"{")
    assert_problem(r, 400, "invalid-delta")
    up = admin(envoy, "POST", "/v1/keyset/uploads")
    assert up.status == 201, up
    uid = up.json()["upload_id"]
    r = send_large(port, f"/v1/keyset/uploads/{uid}/commit", 2)
    assert_problem(r, 413, "body-too-large")
    assert admin(envoy, "DELETE", f"/v1/keyset/uploads/{uid}").status == 200
    # Nothing changed.
    assert admin(envoy, "GET", "/v1/status").json()["version"] == 5
    assert get(envoy, headers={"x-api-key": k.key}).status == 200


def _over(field, n):
    if field == "scopes":
        return [{"path_prefix": f"/p{i}"} for i in range(n)]
    if field == "cidrs":
        return [f"10.{i // 256}.{i % 256}.0/24" for i in range(n)]
    return {f"m{i}": "v" for i in range(n)}


@pytest.mark.parametrize("field, cap", [("scopes", 64), ("cidrs", 256), ("metadata", 32)])
def test_per_key_caps_are_422_naming_key_and_field(admin_env, field, cap):
    envoy, k = admin_env
    at_cap = Key(plan="p", **{field: _over(field, cap)})
    over = Key(plan="p", **{field: _over(field, cap + 1)})
    assert admin(envoy, "PUT", "/v1/keyset", body=keyset(6, [k, at_cap], {"p": {}})).status == 200
    r = admin(envoy, "PUT", "/v1/keyset", body=keyset(7, [k, over], {"p": {}}))
    body = assert_problem(r, 422, "over-limit")
    assert f'keys[1] (id "{over.id}").{field}' in body["detail"] and str(cap) in body["detail"], body
    r = admin(envoy, "POST", "/v1/keyset/delta", body={"version": 7, "ops": [{"op": "upsert", "key": over.doc}]})
    assert_problem(r, 422, "over-limit")
    assert admin(envoy, "GET", "/v1/status").json()["version"] == 6


def test_limits_per_plan_are_capped(admin_env):
    envoy, k = admin_env
    many = {"rate_limits": [{"name": f"r{i}", "rate": 1, "per": "1s"} for i in range(17)]}
    r = admin(envoy, "PUT", "/v1/keyset", body=keyset(6, [k], {"p": many}))
    body = assert_problem(r, 422, "over-limit")
    assert "plans.p" in body["detail"] and "rate_limits" in body["detail"], body
    r = admin(envoy, "POST", "/v1/keyset/delta", body={"version": 6, "ops": [{"op": "set_plan", "name": "q", "plan": many}]})
    assert_problem(r, 422, "over-limit")


def test_admin_errors_do_not_echo_document_values(admin_env):
    envoy, k = admin_env
    secret = "s3cr3t-Value-0123456789"
    docs = [
        {"version": secret, "plans": {"p": {}}, "keys": []},
        {"version": 6, "plans": {"p": {}}, "keys": [{**k.doc, "metadata": {"token": [secret]}}]},
        {"version": 6, "plans": {"p": {}}, "keys": [{**k.doc, "enabled": secret}]},
    ]
    for doc in docs:
        for method, path in (("PUT", "/v1/keyset"), ("POST", "/v1/keyset/delta")):
            r = admin(envoy, method, path, body=doc if path == "/v1/keyset" else {"version": 6, "ops": [{"op": "upsert", "key": doc["keys"][0]}]} if doc["keys"] else doc)
            assert r.status == 400, r
            assert secret not in r.text, r.text
            assert "line" in r.json()["detail"]
    assert secret not in envoy.log_text()


def test_a_source_url_query_string_is_never_shown(start_envoy, wasm_path):
    from keyset_source import KeysetSource

    secret = "q-s3cr3t-token-987"
    k = Key(plan="p")
    src = KeysetSource(keyset(1, [k], {"p": {}}))
    try:
        envoy = start_envoy(**harness.pull_service(src.port, wasm_path, path=f"/keyset.json?token={secret}"))
        harness.wait_until(lambda: get(envoy, headers={"x-api-key": k.key}).status == 200, timeout=15)
        assert any(secret in r["path"] for r in src.requests()), "the source got the real path"
        src.serve_raw(b"<html>not a key set</html>")
        harness.wait_until(
            lambda: (admin(envoy, "GET", "/v1/status").json()["source"] or {}).get("state") == "error", timeout=15
        )
        st = admin(envoy, "GET", "/v1/status")
        assert st.json()["source"]["url"].startswith("http://keys.internal/keyset.json?"), st.json()["source"]
        assert secret not in st.text
        assert secret not in envoy.log_text()
    finally:
        src.stop()
