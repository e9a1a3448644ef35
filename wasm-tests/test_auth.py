"""Authentication end to end in real Envoy: credential sources, status codes, problem
bodies, identity headers, spoofing, per-route opt-out, fail-closed start."""

from __future__ import annotations

import json

import pytest

import harness
from keys import Key, basic, keyset

TOKEN = harness.TEST_ADMIN_TOKEN


def push(envoy, doc, token=TOKEN, query=""):
    return harness.http("PUT", envoy.admin_api_url("/v1/keyset" + query), {"authorization": f"Bearer {token}"}, doc)


def delta(envoy, doc, token=TOKEN):
    return harness.http("POST", envoy.admin_api_url("/v1/keyset/delta"), {"authorization": f"Bearer {token}"}, doc)


def get(envoy, path="/v1/things", headers=None, method="GET"):
    return harness.http(method, envoy.url(path), headers or {})


def assert_problem(r, status, slug):
    assert r.status == status, r
    assert r.headers.get("content-type") == "application/problem+json"
    body = r.json()
    assert body["status"] == status
    assert body["type"].endswith(slug), body
    assert body["title"]
    return body


@pytest.fixture
def env(start_envoy, backend):
    """Envoy with 2 workers and a key set of a few keys."""
    envoy = start_envoy(filter_conf={"role": "filter", "forward_metadata": ["tier"], "credentials": {"query_param": "api_key"}})
    k = {
        "plain": Key(metadata={"tier": "gold", "secret-note": "x"}),
        "scoped": Key(consumer="reports", scopes=[{"methods": ["GET"], "path_prefix": "/v1/reports"}]),
        "cidr_ok": Key(cidrs=["127.0.0.0/8", "::1/128"]),
        "cidr_no": Key(cidrs=["10.0.0.0/8"]),
        "disabled": Key(enabled=False),
        "expired": Key(expires_at="2020-01-01T00:00:00Z"),
        "future": Key(not_before="2099-01-01T00:00:00Z"),
    }
    r = push(envoy, keyset(1, list(k.values())))
    assert r.status == 200, r
    return envoy, k, backend


def test_fails_closed_until_a_key_set_is_loaded(start_envoy, backend):
    envoy = start_envoy()
    r = get(envoy)
    body = assert_problem(r, 503, "keyset-unavailable")
    assert backend.requests() == []
    assert "detail" in body


def test_fail_open_is_configurable(start_envoy, backend):
    envoy = start_envoy(filter_conf={"role": "filter", "when_no_keyset": "allow"})
    r = get(envoy, headers={"x-keymeter-consumer": "spoofed"})
    assert r.status == 200
    assert "x-keymeter-consumer" not in r.json()["headers"]
    for _ in range(5):
        assert get(envoy).status == 200
    # logged, but once per worker rather than once per request
    assert 1 <= envoy.log_text().count("no key set loaded") <= 2
    # and counted, every one of them
    harness.wait_until(
        lambda: "keymeter_unauthenticated_total{reason=\"fail_open\"} 6" in envoy.prometheus(),
        timeout=10,
        message="fail-open passes not counted",
    )


def test_every_credential_source_authenticates(env):
    envoy, k, backend = env
    key = k["plain"]
    for headers, path in [
        ({"x-api-key": key.key}, "/v1/things"),
        ({"authorization": f"Bearer {key.key}"}, "/v1/things"),
        ({"authorization": basic(key.id, key.secret_part)}, "/v1/things"),
        ({"authorization": basic(key.key, "")}, "/v1/things"),
        ({"authorization": basic("apikey", key.key)}, "/v1/things"),
        ({}, f"/v1/things?a=1&api_key={key.key}"),
    ]:
        r = get(envoy, path, headers)
        assert r.status == 200, (headers, path, r)
        seen = r.json()
        assert seen["headers"]["x-keymeter-key-id"] == key.id
        assert seen["headers"]["x-keymeter-consumer"] == "acme"
        assert seen["headers"]["x-keymeter-plan"] == "default"
        assert seen["headers"]["x-keymeter-meta-tier"] == "gold"
        assert "x-keymeter-meta-secret-note" not in seen["headers"], "only selected metadata is forwarded"
        # the credential itself is stripped before the backend
        assert "x-api-key" not in seen["headers"]
        assert "authorization" not in seen["headers"]
        assert key.key not in seen["path"]
    assert backend.requests()[-1]["path"] == "/v1/things?a=1"


def test_missing_malformed_unknown_and_wrong_secret_are_401_with_challenge(env):
    envoy, k, backend = env
    key = k["plain"]
    typo = key.key[:20] + ("A" if key.key[20] != "A" else "B") + key.key[21:]
    unknown = Key()
    cases = [
        ({}, "missing-credential"),
        ({"x-api-key": "hello"}, "malformed-credential"),
        ({"x-api-key": typo}, "malformed-credential"),
        ({"authorization": "Basic %%%"}, "malformed-credential"),
        ({"x-api-key": unknown.key}, "invalid-credential"),
        # right id, wrong secret (valid checksum): must not authenticate
        ({"x-api-key": Key(id=key.id).key}, "invalid-credential"),
        ({"authorization": "Digest abc"}, "missing-credential"),
    ]
    backend.clear()
    for headers, slug in cases:
        r = get(envoy, headers=headers)
        body = assert_problem(r, 401, slug)
        challenges = r.headers.get_all("www-authenticate")
        assert 'Basic realm="keymeter", charset="UTF-8"' in challenges
        assert 'Bearer realm="keymeter"' in challenges
        for v in headers.values():
            assert v not in json.dumps(body), "problem body echoes the credential"
    assert backend.requests() == [], "a refused request reached the backend"


def test_disabled_expired_and_not_yet_valid_keys(env):
    envoy, k, _ = env
    assert_problem(get(envoy, headers={"x-api-key": k["disabled"].key}), 401, "key-disabled")
    assert_problem(get(envoy, headers={"x-api-key": k["expired"].key}), 401, "key-expired")
    assert_problem(get(envoy, headers={"x-api-key": k["future"].key}), 401, "key-not-yet-valid")


def test_scopes_and_cidrs_are_403(env):
    envoy, k, _ = env
    s = {"x-api-key": k["scoped"].key}
    assert get(envoy, "/v1/reports/7", s).status == 200
    assert get(envoy, "/v1/reports", s).status == 200
    assert_problem(get(envoy, "/v1/reports/7", s, method="DELETE"), 403, "out-of-scope")
    assert_problem(get(envoy, "/v1/reportsX", s), 403, "out-of-scope")
    assert_problem(get(envoy, "/v1/other", s), 403, "out-of-scope")
    # Envoy normalizes the path before the filter: no escaping the scope with dot-dot
    assert_problem(get(envoy, "/v1/reports/../admin", s), 403, "out-of-scope")
    assert get(envoy, headers={"x-api-key": k["cidr_ok"].key}).status == 200
    assert_problem(get(envoy, headers={"x-api-key": k["cidr_no"].key}), 403, "address-not-allowed")


def test_spoofed_identity_headers_never_reach_the_backend(env):
    envoy, k, _ = env
    spoof = {
        "x-keymeter-key-id": "evil",
        "x-keymeter-consumer": "evil",
        "x-keymeter-plan": "enterprise",
        "x-keymeter-meta-tier": "platinum",
    }
    r = get(envoy, headers={**spoof, "x-api-key": k["scoped"].key}, path="/v1/reports")
    seen = r.json()["headers"]
    assert seen["x-keymeter-consumer"] == "reports"
    assert seen["x-keymeter-plan"] == "default"
    assert seen["x-keymeter-key-id"] == k["scoped"].id
    assert "x-keymeter-meta-tier" not in seen, "metadata header the key does not have must be removed"


def test_routes_can_opt_out_per_route(env):
    envoy, _, backend = env
    r = get(envoy, "/public/page", {"x-keymeter-consumer": "evil"})
    assert r.status == 200
    assert "x-keymeter-consumer" not in r.json()["headers"]


def test_keep_credential_option(start_envoy):
    envoy = start_envoy(filter_conf={"role": "filter", "keep_credential": True})
    key = Key()
    assert push(envoy, keyset(1, [key])).status == 200
    r = get(envoy, headers={"x-api-key": key.key})
    assert r.json()["headers"]["x-api-key"] == key.key


def test_basic_only_config_challenges_with_basic_only(start_envoy):
    envoy = start_envoy(filter_conf={"role": "filter", "realm": "Acme API", "credentials": {"header": None, "bearer": False}})
    key = Key()
    assert push(envoy, keyset(1, [key])).status == 200
    r = get(envoy, headers={"x-api-key": key.key})
    assert_problem(r, 401, "missing-credential")
    assert r.headers.get_all("www-authenticate") == ['Basic realm="Acme API", charset="UTF-8"']
    assert get(envoy, headers={"authorization": basic(key.id, key.secret_part)}).status == 200


@pytest.mark.parametrize(
    "conf, field",
    [
        ({"role": "filter", "credentails": {}}, "credentails"),
        ({"role": "filter", "credentials": {"header": "X-Bad"}}, "credentials.header"),
        ({"role": "gateway"}, "gateway"),
    ],
)
def test_bad_plugin_config_is_refused_with_the_field_named(start_envoy, envoy_bin, conf, field):
    with pytest.raises(harness.EnvoyError) as e:
        start_envoy(filter_conf=conf, ready_timeout=15)
    assert field in str(e.value)


def raw_request(port: int, head: bytes) -> bytes:
    """Sends bytes as they are (http.client refuses non-ASCII header values)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    "header",
    [b"x-api-key: \xff\xfe", b"authorization: Bearer \xc3\x28", b"authorization: Basic \xff", b"x-other: \xff"],
)
def test_non_utf8_header_values_are_refused_not_fatal(env, header):
    # HTTP allows obs-text bytes in values; proxy-wasm's string getters panic on them,
    # which would kill the worker's VM and fail every later request.
    envoy, k, backend = env
    for _ in range(2):  # both workers, probably
        resp = raw_request(envoy.public_port, b"GET /v1/x HTTP/1.1\r\nhost: a\r\n" + header + b"\r\nconnection: close\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 401"), resp[:200]
    admin = raw_request(
        envoy.admin_api_port, b"GET /v1/status HTTP/1.1\r\nhost: a\r\nauthorization: Bearer \xff\r\nconnection: close\r\n\r\n"
    )
    assert admin.startswith(b"HTTP/1.1 401"), admin[:200]
    for _ in range(4):
        assert get(envoy, headers={"x-api-key": k["plain"].key}).status == 200
