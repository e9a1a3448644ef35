"""The key-set pull in real Envoy: the `service` role as an `envoy.bootstrap.wasm`
singleton polls a key-set source through a cluster and applies what it serves, so a
fleet converges on one key set and a restarted Envoy gets it back with no ops action.

Intervals are 1s; every wait polls for its condition with a generous timeout."""

from __future__ import annotations

import pytest

import harness
from keys import Key, keyset
from keyset_source import KeysetSource

TOKEN = harness.TEST_ADMIN_TOKEN
WAIT = 20  # seconds; conditions normally hold within 1-3 polls of 1s


def status(envoy) -> dict:
    r = harness.http("GET", envoy.admin_api_url("/v1/status"), {"authorization": f"Bearer {TOKEN}"})
    assert r.status == 200, r
    return r.json()


def call(envoy, key: Key | None = None) -> int:
    return harness.http("GET", envoy.url("/v1/things"), {"x-api-key": key.key} if key else {}).status


def wait_status(envoy, pred, message: str) -> dict:
    """Waits until `pred(status)` holds; returns that status."""
    seen: list[dict] = []

    def check():
        s = status(envoy)
        seen[:] = [s]
        return s if pred(s) else None

    try:
        return harness.wait_until(check, timeout=WAIT, interval=0.1, message=message)
    except AssertionError as e:
        raise AssertionError(f"{e}; last status: {seen[-1] if seen else None}") from None


def wait_calls(envoy, key: Key, want: int) -> None:
    harness.wait_until(lambda: call(envoy, key) == want, timeout=WAIT, interval=0.1,
                       message=f"key {key.id} never answered {want}")


@pytest.fixture
def source():
    s = KeysetSource()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def pulled(start_envoy, source, wasm_path):
    """Factory: an Envoy (2 workers) with the pull service polling `source` every 1s."""

    def start(**kwargs):
        return start_envoy(**harness.pull_service(source.port, wasm_path, **kwargs))

    return start


def test_initial_load_fails_closed_until_the_source_answers(pulled, source):
    source.fail(503)
    envoy = pulled(headers={"authorization": "Bearer source-secret"})
    k = Key()
    s = wait_status(envoy, lambda s: s["source"] and s["source"]["consecutive_failures"] >= 2,
                    "source errors not reported")
    assert s["loaded"] is False
    assert s["source"]["state"] == "error"
    assert s["source"]["last_error"]["kind"] == "http"
    assert "503" in s["source"]["last_error"]["message"]
    assert call(envoy, k) == 503, "fails closed while nothing was pulled"

    source.set_doc(keyset(1, [k]))
    wait_calls(envoy, k, 200)
    s = wait_status(envoy, lambda s: s["source"]["state"] == "ok", "source never healthy")
    assert s["loaded"] is True and s["version"] == 1 and s["keys"] == 1
    assert s["last_update"]["source"] == "pull"
    src = s["source"]
    assert src["applied_version"] == 1 and src["etag"] == source.etag
    assert src["consecutive_failures"] == 0
    assert src["cluster"] == harness.PULL_CLUSTER
    assert src["url"] == f"http://{harness.PULL_AUTHORITY}{harness.PULL_PATH}"
    assert src["last_error"]["kind"] == "http", "the last error is kept after recovery"
    # the request the source saw
    req = source.requests()[0]
    assert req["path"] == harness.PULL_PATH
    assert req["headers"]["host"] == harness.PULL_AUTHORITY
    assert req["headers"]["authorization"] == "Bearer source-secret"
    assert "source-secret" not in envoy.log_text(), "a source header value was logged"


def test_a_change_at_the_source_reaches_every_worker(pulled, source):
    keep, revoke, new = Key(), Key(), Key()
    source.set_doc(keyset(1, [keep, revoke]))
    envoy = pulled()
    wait_calls(envoy, revoke, 200)

    source.set_doc(keyset(2, [keep, new]))
    wait_calls(envoy, new, 200)
    # A pulled set has no admin answer to wait for: the status shows version 2 only once
    # every worker's copy of `km/meta` does (a status read near an update is held).
    wait_status(envoy, lambda s: s.get("version") == 2, "version 2 never reported")
    # Both workers, several connections each: none still has the old set.
    for _ in range(10):
        assert call(envoy, revoke) == 401
        assert call(envoy, new) == 200
        assert call(envoy, keep) == 200
    s = status(envoy)
    assert s["version"] == 2 and s["keys"] == 2
    assert s["source"]["applied"] == 2 and s["source"]["applied_version"] == 2
    assert "key set pull applied: version 2" in envoy.log_text()


def test_etag_revalidation_does_not_reapply(pulled, source):
    k = Key()
    etag = source.set_doc(keyset(1, [k]))
    envoy = pulled()
    wait_calls(envoy, k, 200)
    first = status(envoy)
    harness.wait_until(lambda: sum(r["status"] == 304 for r in source.requests()) >= 3, timeout=WAIT,
                       message="the source never answered 304")
    reqs = source.requests()
    assert reqs[0]["status"] == 200 and "if-none-match" not in reqs[0]["headers"]
    assert all(r["headers"].get("if-none-match") == etag for r in reqs[1:]), reqs
    # The source logs a request before it answers: the service counts it a moment later.
    s = wait_status(envoy, lambda s: s["source"]["unchanged"] >= 3, "the 304s were never counted")
    assert s["generation"] == first["generation"], "a 304 re-applied the set"
    assert s["last_update"] == first["last_update"]
    assert s["source"]["applied"] == 1
    assert s["source"]["state"] == "ok"
    # One pull service per Envoy process, whatever the worker count: about one poll
    # per interval (not one per worker).
    n, t = source.count, s["source"]["polls"]
    assert n <= t + 1, (n, t)


def test_source_down_keeps_the_last_good_set(pulled, source):
    k = Key()
    source.set_doc(keyset(1, [k]))
    envoy = pulled(timeout="1s")
    wait_calls(envoy, k, 200)

    def failing(kind: str, text: str):
        """Waits for two more failures in a row of `kind` whose message has `text`."""
        before = status(envoy)["source"]["consecutive_failures"]
        s = wait_status(
            envoy,
            lambda s: s["source"]["consecutive_failures"] >= before + 2
            and s["source"]["last_error"]["kind"] == kind
            and text in s["source"]["last_error"]["message"],
            f"{kind} failures ({text}) not reported",
        )
        assert s["source"]["state"] == "error"
        assert s["loaded"] is True and s["version"] == 1, "the last good set is kept"
        assert call(envoy, k) == 200
        return s

    source.fail(500)
    s = failing("http", "source answered HTTP 500")
    source.stop()  # connection refused
    s = failing("unreachable", "upstream connect error")
    assert s["source"]["last_error"]["message"].startswith("source unreachable: Envoy answered 503")
    source.start()
    source.delay_s = 3  # answers after the 1s timeout
    s = failing("unreachable", "upstream request timeout")
    assert "keeping the running key set" in envoy.log_text()

    source.delay_s = 0
    source.set_doc(keyset(1, [k]))  # the same document: revalidated, nothing to apply
    s = wait_status(envoy, lambda s: s["source"]["state"] == "ok", "never recovered")
    assert s["source"]["consecutive_failures"] == 0
    assert s["source"]["applied"] == 1 and s["generation"] == 1
    assert call(envoy, k) == 200


def test_garbage_invalid_and_stale_documents_keep_the_last_good_set(pulled, source):
    k = Key()
    source.set_doc(keyset(5, [k]))
    envoy = pulled()
    wait_calls(envoy, k, 200)

    source.serve_raw(b"<html>maintenance</html>")
    s = wait_status(envoy, lambda s: s["source"]["state"] == "error", "garbage accepted")
    assert s["source"]["last_error"]["kind"] == "invalid"
    assert "invalid key-set document: invalid document" in s["source"]["last_error"]["message"]

    other = Key()
    bad = keyset(6, [k, other])
    bad["keys"][1] = {**other.doc, "plan": "nope"}
    source.set_doc(bad)
    s = wait_status(envoy, lambda s: "unknown plan" in s["source"]["last_error"]["message"], "invalid doc accepted")
    msg = s["source"]["last_error"]["message"]
    assert "keys[1]" in msg and "plan" in msg, msg
    assert s["version"] == 5
    assert call(envoy, other) == 401

    source.set_doc(keyset(4, [other]))
    s = wait_status(envoy, lambda s: s["source"]["last_error"]["kind"] == "stale", "older version accepted")
    assert "older than the running version 5" in s["source"]["last_error"]["message"]
    assert s["version"] == 5 and s["source"]["applied_version"] == 5
    assert call(envoy, k) == 200 and call(envoy, other) == 401

    source.set_doc(keyset(7, [other]))
    wait_calls(envoy, other, 200)
    assert call(envoy, k) == 401
    s = wait_status(envoy, lambda s: s["source"]["state"] == "ok", "never recovered")
    assert s["version"] == 7


def test_a_restarted_envoy_gets_the_key_set_back_from_the_source(pulled, source):
    k = Key()
    source.set_doc(keyset(3, [k]))
    envoy = pulled()
    wait_calls(envoy, k, 200)
    pid = envoy.pid

    envoy.restart()  # full stop and start: a new process, fresh shared data
    assert envoy.pid != pid
    wait_calls(envoy, k, 200)
    s = status(envoy)
    assert s["version"] == 3 and s["last_update"]["source"] == "pull"
    assert s["source"]["applied"] == 1, "this process pulled it once"
    assert any(r["status"] == 200 for r in source.requests()[1:]), "fetched again in full"


def test_an_invalid_service_config_stops_envoy_from_starting(start_envoy, source, wasm_path):
    kw = harness.pull_service(source.port, wasm_path)
    conf = kw["bootstrap_extensions"][0]["typed_config"]["config"]["configuration"]
    conf["value"] = conf["value"].replace('"interval": "1s"', '"interval": "1 s"')
    with pytest.raises(harness.EnvoyError) as e:
        start_envoy(ready_timeout=10, **kw)
    assert "source.interval" in str(e.value)


def test_an_unknown_cluster_is_reported(start_envoy, source, wasm_path):
    kw = harness.pull_service(source.port, wasm_path, cluster="no_such_cluster")
    del kw["extra_clusters"]
    envoy = start_envoy(**kw)
    s = wait_status(envoy, lambda s: s["source"]["consecutive_failures"] >= 1, "dispatch failure not reported")
    assert s["source"]["last_error"]["kind"] == "dispatch"
    assert "no_such_cluster" in s["source"]["last_error"]["message"]
    assert s["loaded"] is False


def test_a_large_document_is_read_in_slices_and_applied(pulled, source):
    # ~5000 keys, ~600 KiB of JSON: the service reads Envoy's buffer in 64 KiB slices.
    keys = [Key() for _ in range(5000)]
    source.set_doc(keyset(1, keys))
    envoy = pulled()
    s = wait_status(envoy, lambda s: s.get("keys") == 5000, "the large document was not applied")
    assert s["source"]["applied_version"] == 1
    for k in (keys[0], keys[2500], keys[-1]):
        assert call(envoy, k) == 200
