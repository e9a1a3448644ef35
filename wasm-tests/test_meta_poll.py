"""Workers decide from a polled copy of `km/meta` (no shared-data call on a steady
request), and the admin API holds its answer to a key-set change until every worker's
copy shows it (`core::request::meta_copy`, `core::admin_hold`), in real Envoy with 2
workers and several kept-alive connections on each.

Timing: the hold is a lower bound measured by the client around the call (the answer
cannot come sooner than the hold); everything after the answer is a plain "refused on
the very next request" check, so a slow machine cannot flake it."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import harness
from keys import Key, keyset
from test_auth import delta, push
from test_worker_leases import Client, clients_on_both_workers, per_worker_active

TOKEN = harness.TEST_ADMIN_TOKEN
AUTH = {"authorization": f"Bearer {TOKEN}"}
WORKERS = 2
STALE_S = 0.020  # core::request::meta_copy::STALE_MS
PLANS = {"p": {}}  # no limits: the request path whose only shared-data call was km/meta
FILTER = {"role": "filter", "metering": {"enabled": False}}


def timed(call):
    t0 = time.monotonic()
    r = call()
    return r, time.monotonic() - t0


def use_everywhere(pool: list[Client], key: Key) -> None:
    """Every connection (both workers) admits `key`, so each worker has it cached."""
    assert [c.get(key) for c in pool] == [200] * len(pool)


def test_a_revoke_is_answered_after_the_staleness_bound_and_refused_everywhere_after(start_envoy):
    envoy = start_envoy(concurrency=WORKERS, filter_conf=FILTER)
    keys = [Key(plan="p") for _ in range(6)]
    keep = Key(plan="p")
    assert push(envoy, keyset(1, keys + [keep], PLANS)).status == 200
    pool = clients_on_both_workers(envoy, keep)
    assert sum(1 for v in per_worker_active(envoy).values() if v > 0) == WORKERS
    for i, k in enumerate(keys):
        use_everywhere(pool, k)
        r, took = timed(lambda: delta(envoy, {"version": 2 + i, "ops": [{"op": "revoke", "id": k.id}]}))
        assert r.status == 200, r
        assert took >= STALE_S, f"the delta was answered {took * 1000:.1f} ms after it was sent"
        # The very next request on every connection, both workers: refused.
        assert [c.get(k) for c in pool] == [401] * len(pool), f"revoke {i}"
        assert [c.get(keep) for c in pool] == [200] * len(pool)
    for c in pool:
        c.close()


def test_a_full_push_and_a_staged_commit_are_answered_once_every_worker_uses_them(start_envoy):
    envoy = start_envoy(concurrency=WORKERS, filter_conf=FILTER)
    a, b, c_ = Key(plan="p"), Key(plan="p"), Key(plan="p")
    assert push(envoy, keyset(1, [a, b], PLANS)).status == 200
    pool = clients_on_both_workers(envoy, a)
    use_everywhere(pool, b)
    # A full push dropping `b` and adding `c_`.
    r, took = timed(lambda: push(envoy, keyset(2, [a, c_], PLANS)))
    assert r.status == 200, r
    assert took >= STALE_S, f"the push was answered after {took * 1000:.1f} ms"
    assert [c.get(b) for c in pool] == [401] * len(pool)
    assert [c.get(c_) for c in pool] == [200] * len(pool)
    # A staged upload's commit dropping `c_` again.
    r = harness.http("POST", envoy.admin_api_url("/v1/keyset/uploads"), AUTH)
    assert r.status == 201, r
    uid = r.json()["upload_id"]
    r = harness.http("PUT", envoy.admin_api_url(f"/v1/keyset/uploads/{uid}/keys"), AUTH,
                     keyset(3, [a], PLANS)["keys"])
    assert r.status == 200, r
    r, took = timed(lambda: harness.http("POST", envoy.admin_api_url(f"/v1/keyset/uploads/{uid}/commit"), AUTH,
                                         {"version": 3, "plans": PLANS}))
    assert r.status == 200, r
    assert took >= STALE_S, f"the commit was answered after {took * 1000:.1f} ms"
    assert [c.get(c_) for c in pool] == [401] * len(pool)
    assert [c.get(a) for c in pool] == [200] * len(pool)
    # A status read right after an update is held too (it may report the new
    # version); errors are not held.
    r, took = timed(lambda: harness.http("GET", envoy.admin_api_url("/v1/status"), AUTH))
    assert r.status == 200 and r.json()["version"] == 3, r
    assert took >= STALE_S
    r = delta(envoy, {"version": 3, "ops": [{"op": "revoke", "id": a.id}]})
    assert r.status == 409, r
    for c in pool:
        c.close()


def test_a_client_gone_during_the_hold_leaves_the_admin_api_working(start_envoy):
    """A held answer whose request went away is dropped, not sent to a stale context."""
    envoy = start_envoy(concurrency=1, filter_conf=FILTER)
    k = Key(plan="p")
    assert push(envoy, keyset(1, [k], PLANS)).status == 200
    body = f'{{"version": 2, "ops": [{{"op": "revoke", "id": "{k.id}"}}]}}'.encode()
    head = (f"POST /v1/keyset/delta HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {TOKEN}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", envoy.admin_api_port), timeout=5) as s:
        s.sendall(head + body)
    # Closed at once, before the hold ended: the delta still applied.
    harness.wait_until(lambda: harness.http("GET", envoy.url("/v1/things"), {"x-api-key": k.key}).status == 401,
                       timeout=5, message="the revoke never applied")
    r = harness.http("GET", envoy.admin_api_url("/v1/status"), AUTH)
    assert r.status == 200 and r.json()["version"] == 2, r
    assert envoy.is_running()
    assert "panicked" not in envoy.log_text()


def test_many_answers_held_at_once_all_go_out(start_envoy):
    """Several held answers on one admin worker at once (status reads right after an
    update): each is answered, none before the bound."""
    envoy = start_envoy(concurrency=1, filter_conf=FILTER)
    k = Key(plan="p")
    assert push(envoy, keyset(1, [k], PLANS)).status == 200
    assert delta(envoy, {"version": 2, "ops": [{"op": "disable", "id": k.id}]}).status == 200

    def read_status(_):
        return timed(lambda: harness.http("GET", envoy.admin_api_url("/v1/status"), AUTH))

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(read_status, range(16)))
    for r, took in results:
        assert r.status == 200 and r.json()["version"] == 2, r
        assert took >= STALE_S, f"a status was answered after {took * 1000:.1f} ms"
    # And the admin API answers on as before.
    r = harness.http("GET", envoy.admin_api_url("/v1/nope"), AUTH)
    assert r.status == 404, r
