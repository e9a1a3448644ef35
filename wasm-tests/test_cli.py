"""The `keymeter` CLI against a real Envoy: key-set file round trips, pushes and deltas
taking effect on the public listener, rotation sharing rate-limit state, version
conflicts, validation, status, admin-token errors and the usage (billing) report."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import harness
from test_auth import assert_problem, get

# A bucket that does not refill during a test: 4 requests, then 429.
SLOW_PLANS = {"default": {"rate_limits": [{"name": "h", "rate": 1, "per": "1h", "burst": 4}]}}


class Cli:
    """Runs the CLI in `cwd` with KEYMETER_ADMIN / KEYMETER_ADMIN_TOKEN set, and keeps
    every stderr so the test can check that no key ever leaked there."""

    def __init__(self, path: Path, cwd: Path, admin: str, token: str):
        self.path, self.cwd = path, cwd
        self.env = {**os.environ, "KEYMETER_ADMIN": admin, "KEYMETER_ADMIN_TOKEN": token}
        self.stderrs: list[str] = []

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [str(self.path), *args],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.stderrs.append(p.stderr)
        return p

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        p = self.run(*args)
        assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
        return p

    def json(self, *args: str):
        return json.loads(self.ok(*args).stdout)

    def fails(self, code: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        p = self.run(*args, env=env)
        assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
        assert p.stderr.startswith("keymeter: "), p.stderr
        return p

    @property
    def file(self) -> Path:
        return self.cwd / "keyset.json"

    def doc(self) -> dict:
        return json.loads(self.file.read_text())

    def write(self, doc: dict, name: str = "keyset.json") -> Path:
        p = self.cwd / name
        p.write_text(json.dumps(doc, indent=2))
        return p


@pytest.fixture
def cli(start_envoy, cli_path, admin_token, tmp_path):
    envoy = start_envoy(concurrency=2)
    work = tmp_path / "cli"
    work.mkdir()
    # admin_api_url("") is the bare http://127.0.0.1:PORT base the CLI appends /v1/... to
    return envoy, Cli(cli_path, work, envoy.admin_api_url(""), admin_token)


def call(envoy, key: str, path: str = "/v1/things"):
    return get(envoy, path, {"x-api-key": key})


def assert_no_leak(c: Cli, keys: list[str]) -> None:
    text = c.file.read_text()
    for k in keys:
        assert k not in text, "a full key was written to the key-set file"
        assert k[16:] not in text, "a key's secret was written to the key-set file"
        for err in c.stderrs:
            assert k not in err, f"a full key appeared on stderr: {err}"


def test_key_lifecycle_against_envoy(cli, backend):
    envoy, c = cli
    admitted = 0  # acme's requests that reached the backend
    c.ok("keyset", "init", "--plan", "default")
    created = c.json("key", "create", "--consumer", "acme", "--plan", "default", "--json")
    key1, id1 = created["key"], created["id"]
    assert re.fullmatch(r"km_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}", key1)
    assert_problem(call(envoy, key1), 503, "keyset-unavailable")  # nothing pushed yet

    out = c.ok("keyset", "push").stdout
    assert "version 2" in out, out
    backend.clear()
    r = call(envoy, key1)
    assert r.status == 200, r
    admitted += 1
    seen = backend.requests()[-1]["headers"]
    assert seen["x-keymeter-key-id"] == id1
    assert seen["x-keymeter-consumer"] == "acme"
    assert seen["x-keymeter-plan"] == "default"
    assert "x-api-key" not in seen

    # --push sends a delta: the second key works at once, without a full push
    second = c.json("key", "create", "--consumer", "acme", "--plan", "default", "--push", "--json")
    key2, id2 = second["key"], second["id"]
    assert second["pushed"] is True and second["version"] == 3
    r = call(envoy, key2)
    assert r.status == 200, r
    admitted += 1
    assert r.json()["headers"]["x-keymeter-key-id"] == id2

    c.ok("key", "disable", id2, "--push")
    assert_problem(call(envoy, key2), 401, "key-disabled")
    c.ok("key", "enable", id2, "--push")
    assert call(envoy, key2).status == 200
    admitted += 1

    # rotation: both keys work during the overlap and are one lineage
    rotated = c.json("key", "rotate", id1, "--overlap", "1h", "--push", "--json")
    key3, id3 = rotated["key"], rotated["id"]
    assert rotated["lineage"] == id1 and rotated["replaces"] == id1
    for k, kid in ((key1, id1), (key3, id3)):
        r = call(envoy, k)
        assert r.status == 200, r
        assert r.json()["headers"]["x-keymeter-key-id"] == kid
        admitted += 1

    # ... and share the rate-limit state: 3 with the old key, 1 more with the new, then 429
    doc = c.doc()
    doc["plans"] = SLOW_PLANS
    doc["version"] += 1
    c.write(doc)
    c.ok("keyset", "push")
    assert [call(envoy, key1).status for _ in range(3)] == [200, 200, 200]
    assert call(envoy, key3).status == 200
    admitted += 4
    assert_problem(call(envoy, key3), 429, "rate-limited")
    assert call(envoy, key1).status == 429, "the old key shares the exhausted bucket"

    c.ok("key", "revoke", id2, "--push")
    assert_problem(call(envoy, key2), 401, "invalid-credential")

    listed = {k["id"]: k for k in c.json("key", "list", "--json")}
    assert set(listed) == {id1, id3}
    assert listed[id3]["lineage"] == id1
    assert_no_leak(c, [key1, key2, key3])

    # the usage report, from the admin API (metering flushes every second)
    def acme():
        rows = c.json("usage", "--json")["rows"]
        row = next((r for r in rows if r["consumer"] == "acme"), None)
        want = {"admitted": admitted, "rate_limited": 2, "unauthorized": 1}  # 1: the disabled key
        return row if row and all(row[k] == v for k, v in want.items()) else None

    row = harness.wait_until(acme, timeout=15, interval=0.3, message="usage never showed acme's traffic")
    assert row["denied"] == 1 + 2 and row["forbidden"] == row["quota_exceeded"] == 0, row
    assert row["responses"]["2xx"] == admitted
    assert row["cost_units"] == admitted
    report = c.json("usage", "--json", "--by", "key")
    by_lineage = {r["lineage"]: r for r in report["rows"]}
    assert set(by_lineage) == {id1, id2}, "the rotated key is counted in its lineage"
    assert by_lineage[id1]["admitted"] == admitted - 2
    # key_ids: the key(s) each Envoy last saw on the lineage (the old or the new one)
    assert by_lineage[id1]["key_ids"] and set(by_lineage[id1]["key_ids"]) <= {id1, id3}
    (inst,) = report["instances"]
    assert re.fullmatch(r"[0-9a-f]{16}", inst["instance_id"]) and inst["started_at"].endswith("Z")
    csv = c.ok("usage", "--format", "csv", "--consumer", "acme").stdout.splitlines()
    assert csv[0].startswith("consumer,admitted,denied,"), csv
    assert csv[1].startswith(f"acme,{admitted},3,1,0,2,0,"), csv

    # --since-file: the first run reports everything, the next only what is new
    first = c.json("usage", "--json", "--since-file", "billing.json")
    assert first["rows"][0]["admitted"] == admitted
    assert c.json("usage", "--json", "--since-file", "billing.json")["rows"] == []
    assert call(envoy, key1).status == 429

    def delta_seen():
        rows = c.json("usage", "--json", "--since-file", "billing.json")["rows"]
        return rows or None

    rows = harness.wait_until(delta_seen, timeout=15, interval=0.3, message="no change reported")
    assert rows[0]["admitted"] == 0 and rows[0]["rate_limited"] == 1, rows
    assert_no_leak(c, [key1, key2, key3])


def test_versions_validation_status_and_token(cli):
    envoy, c = cli
    c.ok("keyset", "init")
    k1 = c.json("key", "create", "--consumer", "acme", "--plan", "default", "--json")
    c.ok("keyset", "push")
    old = c.write(c.doc(), "old.json")  # version 2, one key
    k2 = c.json("key", "create", "--consumer", "acme", "--plan", "default", "--json")
    c.ok("keyset", "push")  # version 3, two keys
    assert call(envoy, k2["key"]).status == 200

    status = c.json("status", "--json")
    assert status["loaded"] is True
    assert (status["version"], status["keys"]) == (3, 2)
    human = c.ok("status").stdout.splitlines()
    assert "version=3" in human and "keys=2" in human

    p = c.fails(1, "keyset", "push", "--file", str(old))
    assert "not newer" in p.stderr and "409" in p.stderr, p.stderr
    assert call(envoy, k2["key"]).status == 200, "a refused push changes nothing"
    out = c.json("keyset", "push", "--file", "old.json", "--force", "--json")
    assert out["version"] == 2, out
    assert c.json("status", "--json")["version"] == 2
    assert_problem(call(envoy, k2["key"]), 401, "invalid-credential")
    assert call(envoy, k1["key"]).status == 200
    c.ok("keyset", "push")  # the file's version 3 is newer again
    assert call(envoy, k2["key"]).status == 200

    broken = c.doc()
    broken["keys"][1]["consumer"] = "not valid!"
    c.write(broken, "broken.json")
    p = c.fails(1, "keyset", "validate", "broken.json")
    assert "broken.json" in p.stderr and "keys[1]" in p.stderr and ".consumer" in p.stderr, p.stderr
    p = c.fails(1, "keyset", "push", "--file", "broken.json")
    assert "not pushed" in p.stderr, p.stderr
    c.ok("keyset", "validate")

    for args in (("status",), ("keyset", "push", "--force"), ("usage",)):
        p = c.fails(1, *args, env={"KEYMETER_ADMIN_TOKEN": "wrong-token"})
        assert "401" in p.stderr and "Admin token required" in p.stderr, p.stderr
        assert "admin token" in p.stderr and "--token" in p.stderr, p.stderr
    p = c.fails(1, "key", "disable", k1["id"], "--push", env={"KEYMETER_ADMIN_TOKEN": "wrong-token"})
    assert "push failed" in p.stderr and "401" in p.stderr, p.stderr
    assert call(envoy, k1["key"]).status == 200, "the refused delta did not disable the key"
    assert_no_leak(c, [k1["key"], k2["key"]])


def test_a_change_waits_while_another_update_holds_the_writer(cli):
    """`409 update-in-progress` changed nothing: the CLI waits (the server says
    Retry-After: 1) and sends the change again once the other writer is done."""
    import threading
    import time

    envoy, c = cli
    c.ok("keyset", "init", "--plan", "default")
    first = c.json("key", "create", "--consumer", "acme", "--plan", "default", "--json")
    c.ok("keyset", "push")
    auth = {"authorization": f"Bearer {c.env['KEYMETER_ADMIN_TOKEN']}"}
    r = harness.http("POST", envoy.admin_api_url("/v1/keyset/uploads"), auth)
    assert r.status == 201, r
    upload = r.json()["upload_id"]
    # While the upload holds the writer lock, a delta is refused, with Retry-After.
    busy = harness.http("POST", envoy.admin_api_url("/v1/keyset/delta"), auth,
                        {"version": 99, "ops": [{"op": "disable", "id": first["id"]}]})
    assert_problem(busy, 409, "update-in-progress")
    assert busy.headers.get("retry-after") == "1"

    def abort_later():
        time.sleep(2.5)
        harness.http("DELETE", envoy.admin_api_url(f"/v1/keyset/uploads/{upload}"), auth)

    t = threading.Thread(target=abort_later)
    t.start()
    started = time.monotonic()
    try:
        p = c.run("key", "create", "--consumer", "acme", "--plan", "default", "--push", "--json")
    finally:
        t.join()
    waited = time.monotonic() - started
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "another key-set update is in progress" in p.stderr
    assert waited >= 2.0, "it cannot have succeeded while the upload held the lock"
    created = json.loads(p.stdout)
    assert created["pushed"] is True
    assert call(envoy, created["key"]).status == 200
