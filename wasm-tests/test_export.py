"""The usage export in real Envoy: the `service` singleton pushes usage deltas as
CloudEvents 1.0 batches to a collector; with the collector deduplicating by event id,
its sums equal the usage API and what the backend saw, even across failed posts,
timeouts and batches split by `max_events`.

Export interval 1s, metering flush 200ms; every wait polls with a generous timeout."""

from __future__ import annotations

import collections
import concurrent.futures
import re

import pytest

import harness
from keys import Key, keyset
from keyset_source import KeysetSource
from test_auth import push

TOKEN = harness.TEST_ADMIN_TOKEN
WAIT = 20
FILTER = {"role": "filter", "metering": {"flush_interval": "200ms"}}
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def admin_get(envoy, path):
    r = harness.http("GET", envoy.admin_api_url(path), {"authorization": f"Bearer {TOKEN}"})
    assert r.status == 200, r
    return r.json()


def nonzero(d):
    return {k: v for k, v in d.items() if v}


def usage_rows(envoy):
    return {row["lineage"]: row for row in admin_get(envoy, "/v1/usage")["items"]}


def matches(collector, envoy) -> bool:
    """The collector's deduplicated totals equal the usage API, lineage by lineage."""
    rows, got = usage_rows(envoy), collector.totals()
    if not rows or set(rows) != set(got):
        return False
    for lineage, row in rows.items():
        t = got[lineage]
        if nonzero(t["requests"]) != nonzero(row["requests"]) or nonzero(t["responses"]) != nonzero(row["responses"]):
            return False
        if any(t[k] != row[k] for k in ("request_bytes", "response_bytes", "cost_units")):
            return False
    return True


def wait_usage(envoy, want: dict[str, int]):
    """Waits until the usage API counts `want` requests (all outcomes) per lineage."""
    def done():
        rows = usage_rows(envoy)
        return all(l in rows and sum(rows[l]["requests"].values()) == n for l, n in want.items())
    harness.wait_until(done, timeout=WAIT, interval=0.1, message=f"usage API never reached {want}")


def wait_match(collector, envoy):
    harness.wait_until(lambda: matches(collector, envoy), timeout=WAIT, interval=0.2,
                       message=f"collector totals never matched the usage API: {collector.totals()} vs "
                               f"{usage_rows(envoy)}")


def check_cloudevent(e: dict, instance_id: str) -> None:
    assert e["specversion"] == "1.0"
    assert re.fullmatch(r"[0-9a-f]{32}", e["id"]), e
    assert e["source"] == f"keymeter/{instance_id}"
    assert e["type"] == "keymeter.usage.v1"
    assert e["datacontenttype"] == "application/json"
    assert RFC3339.fullmatch(e["time"]), e
    assert isinstance(e["subject"], str) and e["subject"]
    assert set(e) <= {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}
    d = e["data"]
    assert set(d) == {"lineage", "key_id", "plan", "credential", "requests", "responses", "request_bytes",
                      "response_bytes", "cost_units"}
    assert d["credential"] in ("api-key", "jwt", "anonymous")
    assert any(d["requests"].values()) or any(d["responses"].values())


def traffic(envoy, jobs):
    def send(job):
        key, path = job
        return harness.http("GET", envoy.url(path), {"x-api-key": key.key}).status

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(send, jobs))


def test_export_equals_usage_and_backend_despite_failed_posts(start_envoy, backend, collector, wasm_path):
    collector.fail_next(2, 500)
    envoy = start_envoy(concurrency=2, filter_conf=FILTER,
                        **harness.export_service(collector.port, wasm_path, headers={"authorization": "Bearer c0l"}))
    limited = Key(consumer="acme", plan="small")
    open_ = Key(consumer="acme", plan="big")
    other = Key(consumer="zeta", plan="big")
    disabled = Key(consumer="zeta", plan="big", enabled=False)
    plans = {"small": {"rate_limits": [{"name": "h", "rate": 1, "per": "1h", "burst": 4}]}, "big": {}}
    keys = [limited, open_, other, disabled]
    assert push(envoy, keyset(1, keys, plans)).status == 200
    backend.clear()
    codes = traffic(envoy, [(limited, "/v1/a")] * 7 + [(open_, "/v1/b?size=500")] * 5
                    + [(other, "/status/503")] * 2 + [(disabled, "/v1/c")] * 3)
    assert codes.count(429) == 3 and codes.count(401) == 3

    wait_usage(envoy, {limited.id: 7, open_.id: 5, other.id: 2, disabled.id: 3})
    wait_match(collector, envoy)
    # ... and equal to what the backend saw
    seen = collections.Counter(r["headers"].get("x-keymeter-key-id") for r in backend.requests())
    got = collector.totals()
    assert {lineage: t["requests"]["admitted"] for lineage, t in got.items() if t["requests"]["admitted"]} == dict(seen)
    assert dict(seen) == {limited.id: 4, open_.id: 5, other.id: 2}
    assert nonzero(got[limited.id]["requests"]) == {"admitted": 4, "rate_limited": 3}
    assert nonzero(got[disabled.id]["requests"]) == {"unauthorized": 3}
    assert got[other.id]["responses"]["5xx"] == 2

    reqs = collector.requests()
    assert [r["status"] for r in reqs[:3]] == [500, 500, 200]
    # retries resend the frozen batch: same bytes, same ids
    assert reqs[0]["body"] == reqs[1]["body"] == reqs[2]["body"]
    assert [e["id"] for e in reqs[0]["events"]] == [e["id"] for e in reqs[2]["events"]]
    # the failed posts were received too: summing every event ever received, deduplicated
    # by id, still gives the exact totals
    all_ids = [e["id"] for r in reqs for e in r["events"]]
    assert len(set(all_ids)) == len(collector.accepted_events())
    for r in reqs:
        assert r["path"] == harness.EXPORT_PATH
        assert r["headers"]["content-type"] == "application/cloudevents-batch+json"
        assert r["headers"]["authorization"] == "Bearer c0l"
        assert r["headers"]["host"] == harness.EXPORT_AUTHORITY

    instance = admin_get(envoy, "/v1/usage")["instance_id"]
    subjects = {limited.id: "acme", open_.id: "acme", other.id: "zeta", disabled.id: "zeta"}
    for r in reqs:
        for e in r["events"]:
            check_cloudevent(e, instance)
            assert e["subject"] == subjects[e["data"]["lineage"]]
            assert e["data"]["key_id"] == e["data"]["lineage"]
    plans_of = {e["data"]["lineage"]: e["data"]["plan"] for e in collector.accepted_events()}
    assert plans_of[limited.id] == "small" and plans_of[other.id] == "big"

    ex = admin_get(envoy, "/v1/status")["export"]
    assert ex["failures"] == 2 and ex["retries"] == 2, ex
    assert ex["last_error"]["kind"] == "http" and "500" in ex["last_error"]["message"]
    assert ex["state"] == "ok" and ex["consecutive_failures"] == 0
    accepted_posts = [r for r in reqs if r["status"] == 200]
    assert ex["batches_sent"] == len(accepted_posts)
    assert ex["events_sent"] == sum(len(r["events"]) for r in accepted_posts)
    assert envoy.stat("wasmcustom.keymeter_export_failures_total") == 2
    assert envoy.stat("wasmcustom.keymeter_export_events_total") == ex["events_sent"]

    # more traffic: exported as a new delta, nothing counted twice
    assert traffic(envoy, [(open_, "/v1/b")] * 3) == [200] * 3
    wait_usage(envoy, {open_.id: 8})
    wait_match(collector, envoy)
    assert collector.totals()[open_.id]["requests"]["admitted"] == 8
    assert "c0l" not in envoy.log_text()


def test_timeouts_are_retried_and_deduplicated(start_envoy, collector, wasm_path):
    """The collector answers too late: it got the batch, the exporter retries it, and the
    ids make the resent events harmless."""
    collector.delay_s = 1.5
    envoy = start_envoy(concurrency=2, filter_conf=FILTER,
                        **harness.export_service(collector.port, wasm_path, timeout="500ms"))
    k = Key(consumer="acme")
    assert push(envoy, keyset(1, [k])).status == 200
    assert traffic(envoy, [(k, "/v1/a")] * 5) == [200] * 5

    def timed_out():
        ex = admin_get(envoy, "/v1/status")["export"]
        return ex and ex["failures"] >= 2 and ex
    ex = harness.wait_until(timed_out, timeout=WAIT, interval=0.2, message="timeouts not reported")
    assert ex["last_error"]["kind"] == "unreachable", ex
    collector.delay_s = 0
    wait_usage(envoy, {k.id: 5})
    wait_match(collector, envoy)
    reqs = collector.requests()
    assert reqs[0]["body"] == reqs[1]["body"], "the timed-out batch is resent unchanged"
    assert len({r["body"] for r in reqs}) < len(reqs)
    assert collector.totals()[k.id]["requests"]["admitted"] == 5


def test_max_events_splits_batches_with_pull_in_the_same_service(start_envoy, collector, wasm_path):
    keys = [Key(consumer=f"c{i}", plan="p") for i in range(5)]
    source = KeysetSource(keyset(1, keys, {"p": {}}))
    try:
        envoy = start_envoy(concurrency=2, filter_conf=FILTER,
                            **harness.export_service(collector.port, wasm_path, max_events=2,
                                                     source_port=source.port))
        harness.wait_until(lambda: admin_get(envoy, "/v1/status").get("version") == 1, timeout=WAIT,
                           interval=0.1, message="pull never loaded the key set")
        jobs = [(k, "/v1/x") for i, k in enumerate(keys) for _ in range(i + 1)]
        assert traffic(envoy, jobs) == [200] * len(jobs)
        wait_usage(envoy, {k.id: i + 1 for i, k in enumerate(keys)})
        wait_match(collector, envoy)
        reqs = collector.requests()
        assert all(1 <= len(r["events"]) <= 2 for r in reqs)
        assert len(reqs) >= 3
        got = collector.totals()
        assert {k.id: got[k.id]["requests"]["admitted"] for k in keys} == {k.id: i + 1 for i, k in enumerate(keys)}
        st = admin_get(envoy, "/v1/status")
        assert st["source"]["state"] == "ok" and st["export"]["full_batches"] >= 2
    finally:
        source.stop()


def test_a_persistently_rejected_batch_is_parked_and_reported(start_envoy, collector, wasm_path):
    """Issue 10.16: a collector that keeps answering 4xx to a batch must not block the
    export forever: after 5 rejections the batch is parked (status and metric say so)
    and newer usage is exported again."""
    collector.fail_next(5, 422)
    envoy = start_envoy(concurrency=2, filter_conf=FILTER, **harness.export_service(collector.port, wasm_path))
    k = Key(consumer="acme")
    assert push(envoy, keyset(1, [k])).status == 200
    assert traffic(envoy, [(k, "/v1/a")] * 3) == [200] * 3

    def parked():
        ex = admin_get(envoy, "/v1/status")["export"]
        return ex and ex["parked_batches"] == 1 and ex
    ex = harness.wait_until(parked, timeout=WAIT, interval=0.2, message="the rejected batch was never parked")
    assert ex["parked_events"] == 1 and ex["last_parked_at"], ex
    assert "422" in ex["last_error"]["message"] and "parked" in ex["last_error"]["message"], ex
    assert envoy.stat("wasmcustom.keymeter_export_parked_events_total") == 1
    assert [r["status"] for r in collector.requests()][:5] == [422] * 5

    # the export moves on: only the usage after the parked batch arrives
    assert traffic(envoy, [(k, "/v1/a")] * 2) == [200] * 2
    harness.wait_until(lambda: collector.totals().get(k.id, {}).get("requests", {}).get("admitted") == 2,
                       timeout=WAIT, interval=0.2, message=f"newer usage not exported: {collector.totals()}")
    assert admin_get(envoy, "/v1/status")["export"]["state"] == "ok"
