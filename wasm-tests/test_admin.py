"""The admin API in real Envoy: authentication, atomic full pushes, deltas, version
checks, and bad documents of every kind leaving the running set intact."""

from __future__ import annotations

import copy
import json

import pytest

import harness
from keys import Key, keyset
from test_auth import assert_problem, delta, get, push

TOKEN = harness.TEST_ADMIN_TOKEN


def status(envoy):
    r = harness.http("GET", envoy.admin_api_url("/v1/status"), {"authorization": f"Bearer {TOKEN}"})
    assert r.status == 200, r
    return r.json()


@pytest.fixture
def loaded(start_envoy):
    envoy = start_envoy()
    keys = [Key(plan="p"), Key(plan="p")]
    assert push(envoy, keyset(5, keys, {"p": {}})).status == 200
    return envoy, keys


def works(envoy, key):
    return get(envoy, headers={"x-api-key": key.key}).status == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"}],
)
def test_admin_token_is_required(loaded, headers):
    envoy, keys = loaded
    for method, path, body in [
        ("GET", "/v1/status", None),
        ("PUT", "/v1/keyset", keyset(9, [], {"p": {}})),
        ("POST", "/v1/keyset/delta", {"version": 9, "ops": [{"op": "revoke", "id": keys[0].id}]}),
        ("GET", "/v1/usage", None),
    ]:
        r = harness.http(method, envoy.admin_api_url(path), headers, body)
        assert_problem(r, 401, "admin-unauthorized")
        assert TOKEN not in r.text
    assert works(envoy, keys[0]) and status(envoy)["version"] == 5


def test_admin_paths_are_not_special_on_the_public_listener(loaded, backend):
    envoy, keys = loaded
    # the admin token is just a malformed API key there
    r = harness.http("PUT", envoy.url("/v1/keyset"), {"authorization": f"Bearer {TOKEN}"}, keyset(9, [], {"p": {}}))
    assert_problem(r, 401, "malformed-credential")
    r = harness.http("GET", envoy.url("/v1/status"), {"x-api-key": keys[0].key})
    assert r.status == 200 and r.json()["path"] == "/v1/status", "an ordinary request to the backend"
    assert status(envoy)["version"] == 5 and works(envoy, keys[1])


def test_unknown_path_and_wrong_method(loaded):
    envoy, _ = loaded
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert_problem(harness.http("GET", envoy.admin_api_url("/v1/nope"), auth), 404, "not-found")
    r = harness.http("POST", envoy.admin_api_url("/v1/keyset"), auth, b"{}")
    assert_problem(r, 405, "method-not-allowed")
    assert r.headers.get("allow") == "PUT"


def test_full_push_replaces_the_set_and_status_reports_it(loaded):
    envoy, (a, b) = loaded
    c = Key(plan="p")
    r = push(envoy, keyset(6, [b, c], {"p": {}}))
    assert r.status == 200 and r.json() == {"version": 6, "keys": 2, "written": 2, "removed": 1}
    assert not works(envoy, a) and works(envoy, b) and works(envoy, c)
    s = status(envoy)
    assert s["loaded"] and s["version"] == 6 and s["keys"] == 2 and s["plans"] == ["p"]
    assert s["last_update"]["source"] == "push" and s["updated_at"].endswith("Z")
    assert s["memory_estimate_bytes"] > 0


def test_stale_versions_are_refused_unless_forced(loaded):
    envoy, (a, b) = loaded
    for v in (5, 4):
        r = push(envoy, keyset(v, [b], {"p": {}}))
        body = assert_problem(r, 409, "stale-version")
        assert "5" in body["detail"]
    assert works(envoy, a)
    r = delta(envoy, {"version": 5, "ops": [{"op": "revoke", "id": a.id}]})
    assert_problem(r, 409, "stale-version")
    assert works(envoy, a)
    assert push(envoy, keyset(4, [b], {"p": {}}), query="?force=true").status == 200
    assert not works(envoy, a) and status(envoy)["version"] == 4


def test_delta_upsert_revoke_disable_enable(loaded):
    envoy, (a, b) = loaded
    c = Key(plan="q")
    r = delta(
        envoy,
        {"version": 6, "ops": [{"op": "set_plan", "name": "q", "plan": {}}, {"op": "upsert", "key": c.doc}, {"op": "revoke", "id": a.id}, {"op": "disable", "id": b.id}]},
    )
    assert r.status == 200 and r.json()["keys"] == 2, r
    assert works(envoy, c)
    assert_problem(get(envoy, headers={"x-api-key": a.key}), 401, "invalid-credential")
    assert_problem(get(envoy, headers={"x-api-key": b.key}), 401, "key-disabled")
    assert delta(envoy, {"version": 7, "ops": [{"op": "enable", "id": b.id}]}).status == 200
    assert works(envoy, b)
    r = delta(envoy, {"version": 8, "ops": [{"op": "disable", "id": b.id}, {"op": "enable", "id": a.id}]})
    body = assert_problem(r, 400, "unknown-key")
    assert "ops[1]" in body["detail"] and a.id in body["detail"]
    assert works(envoy, b), "a failed batch changes nothing"


BAD_DOCS = [
    (b"", "invalid document"),
    (b"{", "invalid document"),
    (b"\xff\xfe", "invalid document"),
    (b"[]", "invalid document"),
    (b'{"version": 9, "keys": [], "plans": {}, "extra": 1}', "unknown field"),
    (b'{"version": 0, "keys": [], "plans": {}}', "version"),
    (b'{"version": "9"}', "invalid document"),
]


def bad_key_docs():
    k = Key(plan="p")
    out = []
    for field, value, expect in [
        ("id", "short", "keys[0].id"),
        ("hash", "abc", ".hash"),
        ("hash", k.doc["hash"].upper(), ".hash"),
        ("consumer", "a b", ".consumer"),
        ("plan", "nope", "unknown plan"),
        ("expires_at", "2030-13-01T00:00:00Z", ".expires_at"),
        ("cidrs", ["10.0.0.1/8"], ".cidrs[0]"),
        ("scopes", [{"methods": ["get"], "path_prefix": "/"}], ".scopes[0]"),
        ("metadata", {"x": "a\nb"}, ".metadata.x"),
        ("limits", {"rate_limits": [{"name": "x", "rate": 0, "per": "1s"}]}, ".limits"),
        ("bogus", 1, "unknown field"),
    ]:
        doc = copy.deepcopy(keyset(9, [k], {"p": {}}))
        doc["keys"][0][field] = value
        out.append((json.dumps(doc).encode(), expect))
    dup = keyset(9, [k, k], {"p": {}})
    out.append((json.dumps(dup).encode(), "duplicate key id"))
    bad_plan = keyset(9, [], {"p": {"rate_limits": [{"name": "r", "rate": 1, "per": "soon"}]}})
    out.append((json.dumps(bad_plan).encode(), "plans.p"))
    return out


@pytest.mark.parametrize("body, expect", BAD_DOCS + bad_key_docs())
def test_bad_documents_are_rejected_and_the_running_set_stays(loaded, body, expect):
    envoy, (a, b) = loaded
    r = harness.http("PUT", envoy.admin_api_url("/v1/keyset"), {"authorization": f"Bearer {TOKEN}"}, body)
    problem = assert_problem(r, 400, "invalid-keyset")
    assert expect in problem["detail"], problem
    assert works(envoy, a) and works(envoy, b)
    assert status(envoy)["version"] == 5
    r = harness.http("POST", envoy.admin_api_url("/v1/keyset/delta"), {"authorization": f"Bearer {TOKEN}"}, body)
    assert_problem(r, 400, "invalid-delta")
    assert works(envoy, a)
