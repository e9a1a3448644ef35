"""Fault injection in real Envoy (2 workers), with keymeter.wasm built with the
`fault-injection` feature (src/adapter/fault.rs; the shipped wasm has no fault code and
rejects the `fault_injection` configuration field):

- a VM panic in the middle of a full push: the running set keeps serving on every
  worker, the dead writer's lock expires, and the next push succeeds;
- CAS exhaustion in the usage index: requests are served without a stall, and usage is
  neither lost nor counted twice;
- writer-lock TTL expiry: an abandoned staged upload stops blocking writers and is
  cleaned up, while an upload that keeps sending stays alive past the TTL.
"""

from __future__ import annotations

import time

import pytest

import harness
from keys import Key, keyset
from test_auth import assert_problem, delta, push
from test_metering import prom_samples, usage

TOKEN = harness.TEST_ADMIN_TOKEN
PLANS = {"p": {}}
# Staged uploads lease the lock for 15 s; the lock_ttl_ms fault caps leases at this.
LOCK_TTL_MS = 1500
# The real lease of a one-shot writer (core::keyset::writer_lock::ONE_SHOT_TTL_MS): a
# writer that died holding the lock blocks others this long.
PANIC_LOCK_TTL_MS = 5000


def admin_conf(faults: dict) -> dict:
    return {**harness.default_admin_conf(), "fault_injection": faults}


def statuses(envoy, key: Key | None, n: int = 12) -> set[int]:
    """Statuses of `n` requests, each on a new connection (so both workers answer)."""
    headers = {"x-api-key": key.key} if key else {}
    return {harness.http("GET", envoy.url("/v1/x"), headers, timeout=5).status for _ in range(n)}


def admin(envoy, method, path, body=None):
    return harness.http(method, envoy.admin_api_url(path), {"authorization": f"Bearer {TOKEN}"}, body)


def test_production_wasm_rejects_fault_configuration(start_envoy):
    with pytest.raises(harness.EnvoyError):
        start_envoy(admin_conf=admin_conf({"lock_ttl_ms": 1}), ready_timeout=10)


def test_vm_panic_mid_push_keeps_the_old_set_and_the_next_push_succeeds(start_envoy, fault_wasm_path):
    envoy = start_envoy(
        concurrency=2,
        wasm_path=fault_wasm_path,
        admin_conf=admin_conf({"panic_on_set": "k/PANICPANIC01"}),
    )
    old = [Key(plan="p") for _ in range(3)]
    assert push(envoy, keyset(1, old, PLANS)).status == 200
    new = [Key(plan="p") for _ in range(4)]
    poisoned = Key(plan="p", id="PANICPANIC01")

    # The VM dies writing the third key's entry: Envoy answers 5xx or drops the call.
    try:
        r = push(envoy, keyset(2, new[:2] + [poisoned] + new[2:], PLANS))
        assert r.status >= 500, r
    except OSError:
        pass
    t_panic = time.monotonic()
    harness.wait_until(lambda: "fault injection: panic writing k/PANICPANIC01" in envoy.log_text(),
                       timeout=5, message="the injected panic never happened")
    assert envoy.is_running()

    # The dead push still holds the writer lock (no unwinding: nothing released it), so
    # the next push is refused until the lock's TTL runs out. (A call that lands on the
    # worker whose VM died may get its fail-closed 503 until the VM is replaced.)
    def refused_busy():
        r = push(envoy, keyset(2, new, PLANS))
        assert r.status in (409, 503), r
        return r.status == 409 and b"update-in-progress" in r.body

    harness.wait_until(refused_busy, timeout=PANIC_LOCK_TTL_MS / 1000 / 2, interval=0.05,
                       message="a push was not refused while the dead writer's lock was live")

    # The dead VM is replaced (failure_policy FAIL_RELOAD, 1 s backoff; until then its
    # worker fails closed with 503) and sees the shared data the other VMs kept.
    harness.wait_until(lambda: statuses(envoy, old[0]) == {200}, timeout=10, interval=0.3,
                       message="the worker whose VM panicked never recovered")
    # The running set is untouched and served by both workers.
    for k in old:
        assert statuses(envoy, k) == {200}, k.id
    assert statuses(envoy, new[0]) == {401}
    # The admin listener's plugin on that worker is replaced separately, on its first
    # request after the back-off: until then that worker's admin calls get an empty 5xx.
    status = harness.wait_until(lambda: (r := admin(envoy, "GET", "/v1/status")).status == 200 and r,
                                timeout=10, interval=0.3, message="the admin plugin never recovered")
    st = status.json()
    assert (st["version"], st["keys"]) == (1, 3), st

    # Once the lock's TTL has run out, the next push succeeds and replaces the set whole.
    time.sleep(max(0.0, t_panic + PANIC_LOCK_TTL_MS / 1000 + 0.5 - time.monotonic()))
    r = push(envoy, keyset(2, new, PLANS))
    assert r.status == 200, r
    assert r.json()["keys"] == 4 and r.json()["removed"] == 3, r.json()
    for k in new:
        assert statuses(envoy, k, 6) == {200}, k.id
    assert statuses(envoy, old[0]) == {401}
    assert statuses(envoy, poisoned, 4) == {401}
    # and deltas work again too
    assert delta(envoy, {"version": 3, "ops": [{"op": "revoke", "id": new[0].id}]}).status == 200
    assert statuses(envoy, new[0]) == {401}


@pytest.mark.parametrize(
    "faults",
    [
        # Transient: > 32 CAS retries fail, so several flushes in a row cannot index a
        # new lineage (budget per worker VM).
        {"prefix": "km/uidx/", "times": 200},
        # Permanent on the index chunk (after the slot was claimed): must not spin.
        {"prefix": "km/uidx/0", "times": 10**12},
    ],
    ids=["transient", "permanent-chunk"],
)
def test_usage_index_cas_exhaustion_neither_stalls_nor_miscounts(start_envoy, backend, fault_wasm_path, faults):
    envoy = start_envoy(
        concurrency=2,
        wasm_path=fault_wasm_path,
        filter_conf={"role": "filter", "metering": {"flush_interval": "200ms"},
                     "fault_injection": {"cas_mismatch": faults}},
    )
    a, b = Key(consumer="acme", plan="p"), Key(consumer="zeta", plan="p")
    assert push(envoy, keyset(1, [a, b], PLANS)).status == 200
    backend.clear()
    sent = {a.id: 0, b.id: 0}
    deadline = time.monotonic() + 3  # across many failing flushes
    while time.monotonic() < deadline:
        for k in (a, b, a):
            t = time.monotonic()
            r = harness.http("GET", envoy.url("/v1/x"), {"x-api-key": k.key}, timeout=5)
            assert r.status == 200, r
            assert time.monotonic() - t < 2, "a request stalled behind the usage flush"
            sent[k.id] += 1
        time.sleep(0.05)
    served = {}
    for q in backend.requests():
        kid = q["headers"]["x-keymeter-key-id"]
        served[kid] = served.get(kid, 0) + 1
    assert served == sent

    def labels(k):
        return frozenset({("consumer", k.doc["consumer"]), ("plan", "p"), ("key_id", k.id), ("credential", "api-key"),
                          ("outcome", "admitted")})

    def prom():
        samples = prom_samples(envoy, "keymeter_requests_total")
        return {k.id: samples.get(labels(k), 0) for k in (a, b)}

    # Counted once each in Envoy's metrics, whatever the index does.
    harness.wait_until(lambda: prom() == sent, timeout=10, interval=0.2,
                       message=f"prometheus {prom()} != served {sent}")
    if faults["times"] < 10**6:
        assert "fault injection: last injected CAS mismatch" in envoy.log_text()
        # Once the contention is over, the usage API has every lineage exactly once,
        # with exactly what was served (nothing lost, nothing merged twice).
        def rows():
            items = usage(envoy)["items"]
            return [(row["lineage"], row["requests"]["admitted"]) for row in items]

        harness.wait_until(lambda: sorted(rows()) == sorted(sent.items()), timeout=10, interval=0.2,
                           message=f"usage {rows()} != served {sent}")
    time.sleep(1)  # more failing flushes: nothing changes, nothing stalls
    assert prom() == sent
    assert statuses(envoy, a, 4) == {200}


def test_writer_lock_ttl_expiry(start_envoy, fault_wasm_path):
    envoy = start_envoy(
        concurrency=2,
        wasm_path=fault_wasm_path,
        admin_conf=admin_conf({"lock_ttl_ms": LOCK_TTL_MS}),
    )
    old = [Key(plan="p") for _ in range(3)]
    assert push(envoy, keyset(5, old, PLANS)).status == 200

    # An upload that goes silent holds the lock only until its TTL.
    r = admin(envoy, "POST", "/v1/keyset/uploads")
    assert r.status == 201, r
    abandoned = r.json()["upload_id"]
    ghost = [Key(plan="p") for _ in range(3)]
    r = admin(envoy, "PUT", f"/v1/keyset/uploads/{abandoned}/keys", keyset(6, ghost, PLANS)["keys"])
    assert r.status == 200, r
    extra = Key(plan="p")
    op = {"version": 6, "ops": [{"op": "upsert", "key": extra.doc}]}
    assert_problem(delta(envoy, op), 409, "update-in-progress")
    time.sleep(LOCK_TTL_MS / 1000 + 0.5)
    assert delta(envoy, op).status == 200  # takes the expired lock, reaps the upload
    r = admin(envoy, "PUT", f"/v1/keyset/uploads/{abandoned}/keys", keyset(6, ghost, PLANS)["keys"])
    assert_problem(r, 404, "upload-not-found")
    assert statuses(envoy, extra) == {200}
    for k in old:
        assert statuses(envoy, k, 4) == {200}
    for k in ghost:
        assert statuses(envoy, k, 4) == {401}

    # An upload that keeps sending outlives the TTL many times over (each call renews).
    r = admin(envoy, "POST", "/v1/keyset/uploads")
    assert r.status == 201, r
    live = r.json()["upload_id"]
    fresh = [Key(plan="p") for _ in range(4)]
    for k in fresh:
        time.sleep(LOCK_TTL_MS / 1000 * 0.6)
        r = admin(envoy, "PUT", f"/v1/keyset/uploads/{live}/keys", [k.doc])
        assert r.status == 200, r
    assert_problem(delta(envoy, {"version": 7, "ops": [{"op": "revoke", "id": extra.id}]}), 409, "update-in-progress")
    r = admin(envoy, "POST", f"/v1/keyset/uploads/{live}/commit", {"version": 8, "plans": PLANS})
    assert r.status == 200 and r.json()["keys"] == 4, r
    for k in fresh:
        assert statuses(envoy, k, 4) == {200}
    assert statuses(envoy, old[0]) == {401}
