"""Staged (chunked) key-set uploads in real Envoy (2 workers): nothing is visible
before the commit, a bad chunk aborts the upload and keeps the running set, other
writers are refused while an upload holds the lock, and the CLI uses uploads for large
files."""

from __future__ import annotations

import json

import pytest

import harness
from keys import Key, keyset
from test_auth import assert_problem, delta, get, push
from test_cli import Cli

TOKEN = harness.TEST_ADMIN_TOKEN
AUTH = {"authorization": f"Bearer {TOKEN}"}
PLANS = {"p": {}}


def admin(envoy, method, path, body=None):
    return harness.http(method, envoy.admin_api_url(path), AUTH, body)


def begin(envoy) -> str:
    r = admin(envoy, "POST", "/v1/keyset/uploads")
    assert r.status == 201, r
    return r.json()["upload_id"]


def send(envoy, uid, keys):
    return admin(envoy, "PUT", f"/v1/keyset/uploads/{uid}/keys", keyset(1, keys, PLANS)["keys"])


def works(envoy, key):
    return get(envoy, headers={"x-api-key": key.key}).status == 200


def status(envoy):
    return admin(envoy, "GET", "/v1/status").json()


@pytest.fixture
def loaded(start_envoy):
    envoy = start_envoy(concurrency=2)
    old = [Key(plan="p") for _ in range(4)]
    assert push(envoy, keyset(5, old, PLANS)).status == 200
    return envoy, old


def test_multi_chunk_upload_equals_a_one_shot_push(loaded, start_envoy):
    envoy, old = loaded
    new = old[2:] + [Key(plan="p") for _ in range(7)]
    uid = begin(envoy)
    for i in range(0, len(new), 3):
        r = send(envoy, uid, new[i:i + 3])
        assert r.status == 200 and r.json() == {"keys_so_far": min(i + 3, len(new))}, r
    # chunks sent, not committed: the old set runs unchanged
    assert works(envoy, old[0]) and works(envoy, old[2]) and not works(envoy, new[-1])
    assert status(envoy)["version"] == 5
    r = admin(envoy, "POST", f"/v1/keyset/uploads/{uid}/commit", {"version": 6, "plans": PLANS})
    assert r.status == 200, r
    staged = r.json()
    assert staged == {"version": 6, "keys": 9, "written": 9, "removed": 2}
    assert not works(envoy, old[0]) and not works(envoy, old[1])
    assert all(works(envoy, k) for k in new)
    # the same push one-shot on another Envoy gives the same answer
    other = start_envoy(concurrency=2)
    assert push(other, keyset(5, old, PLANS)).status == 200
    r = push(other, keyset(6, new, PLANS))
    assert r.status == 200 and r.json() == staged
    s = status(envoy)
    assert s["keys"] == 9 and s["version"] == 6 and s["last_update"]["source"] == "upload"
    # the upload is gone once committed
    assert_problem(send(envoy, uid, [Key(plan="p")]), 404, "upload-not-found")


def test_a_bad_chunk_aborts_the_upload_and_keeps_the_set(loaded):
    envoy, old = loaded
    uid = begin(envoy)
    assert send(envoy, uid, [Key(plan="p") for _ in range(3)]).status == 200
    chunk = keyset(1, [Key(plan="p") for _ in range(3)], PLANS)["keys"]
    chunk[1]["hash"] = "nothex"
    r = admin(envoy, "PUT", f"/v1/keyset/uploads/{uid}/keys", chunk)
    body = assert_problem(r, 400, "invalid-keyset")
    assert "keys[4]" in body["detail"] and "aborted" in body["detail"], body
    assert all(works(envoy, k) for k in old) and status(envoy)["version"] == 5
    # aborted: the id is gone, the lock free, a new upload can start
    assert_problem(send(envoy, uid, []), 404, "upload-not-found")
    assert_problem(admin(envoy, "POST", f"/v1/keyset/uploads/{uid}/commit", {"version": 9}), 404,
                   "upload-not-found")
    uid2 = begin(envoy)
    keys = [Key(plan="p")]
    assert send(envoy, uid2, keys).status == 200
    # unknown plan at commit: 400 naming the key, aborted
    r = admin(envoy, "POST", f"/v1/keyset/uploads/{uid2}/commit", {"version": 9, "plans": {"q": {}}})
    body = assert_problem(r, 400, "invalid-keyset")
    assert "keys[0]" in body["detail"], body
    assert all(works(envoy, k) for k in old) and status(envoy)["version"] == 5
    # DELETE aborts
    uid3 = begin(envoy)
    assert send(envoy, uid3, keys).status == 200
    r = admin(envoy, "DELETE", f"/v1/keyset/uploads/{uid3}")
    assert r.status == 200 and r.json()["aborted"], r
    assert not works(envoy, keys[0]) and all(works(envoy, k) for k in old)
    assert_problem(admin(envoy, "DELETE", f"/v1/keyset/uploads/{uid3}"), 404, "upload-not-found")


def test_other_writers_are_busy_during_an_upload(loaded):
    envoy, old = loaded
    uid = begin(envoy)
    assert send(envoy, uid, old).status == 200
    r = delta(envoy, {"version": 7, "ops": [{"op": "revoke", "id": old[0].id}]})
    assert_problem(r, 409, "update-in-progress")
    assert_problem(push(envoy, keyset(8, old, PLANS)), 409, "update-in-progress")
    assert_problem(admin(envoy, "POST", "/v1/keyset/uploads"), 409, "update-in-progress")
    assert works(envoy, old[0])
    r = admin(envoy, "POST", f"/v1/keyset/uploads/{uid}/commit", {"version": 6, "plans": PLANS})
    assert r.status == 200, r
    r = delta(envoy, {"version": 7, "ops": [{"op": "revoke", "id": old[0].id}]})
    assert r.status == 200, r
    assert not works(envoy, old[0]) and works(envoy, old[1])


def test_upload_api_needs_the_admin_token(loaded):
    envoy, old = loaded
    for method, path in [("POST", "/v1/keyset/uploads"), ("PUT", "/v1/keyset/uploads/abc/keys"),
                         ("POST", "/v1/keyset/uploads/abc/commit"), ("DELETE", "/v1/keyset/uploads/abc")]:
        r = harness.http(method, envoy.admin_api_url(path), {"authorization": "Bearer wrong"}, b"[]")
        assert_problem(r, 401, "admin-unauthorized")
    r = admin(envoy, "GET", "/v1/keyset/uploads/abc/keys")
    assert_problem(r, 405, "method-not-allowed")


def test_cli_pushes_a_large_file_in_chunks(start_envoy, cli_path, admin_token, tmp_path):
    envoy = start_envoy(concurrency=2)
    work = tmp_path / "cli"
    work.mkdir()
    cli = Cli(cli_path, work, envoy.admin_api_url(""), admin_token)
    keys = [Key(plan="p") for _ in range(10)]
    cli.write(keyset(3, keys, PLANS))
    out = cli.ok("keyset", "push", "--chunk-keys", "3").stdout
    assert "pushed keyset.json" in out and "keys=10" in out, out
    assert all(works(envoy, k) for k in keys)
    s = status(envoy)
    assert s["version"] == 3 and s["keys"] == 10 and s["last_update"]["source"] == "upload"
    # a bad key: refused with the global index, the running set stays
    doc = keyset(4, keys[:5] + [Key(plan="p") for _ in range(5)], PLANS)
    doc["keys"][7]["hash"] = "nothex"
    cli.write(doc)
    p = cli.fails(1, "keyset", "push", "--chunk-keys", "3")
    assert "keys[7]" in p.stderr or "not pushed" in p.stderr, p.stderr
    assert status(envoy)["version"] == 3 and all(works(envoy, k) for k in keys)
