"""Billing exactness (issue 15): for every way a request can end, the body bytes a key
is charged equal the body bytes its caller sent and received, once, in the usage API,
in Prometheus and in the CloudEvents export alike.

Definitions under test (README, "Metering"): `request_bytes` counts the request body of
an admitted request (a refused request's body is never read, so it counts 0);
`response_bytes` counts the response body the client received, whoever produced it:
the upstream, keymeter's own refusal, or a local reply Envoy makes after keymeter
admitted the request. Headers are never counted. One key per outcome, so each
comparison is exact per key."""

from __future__ import annotations

import http.client
import re
import socket
import threading

import pytest

import harness
from keys import Key, keyset
from test_auth import push
from test_export import usage_rows, wait_usage
from test_metering import prom_samples

FILTER = {"role": "filter", "metering": {"flush_interval": "200ms"}}
RESET_AFTER = 300  # body bytes the resetting upstream sends of the 1000 it announces


class ResettingUpstream:
    """Answers every request with headers announcing 1000 body bytes, sends 300 and
    closes the connection: an upstream reset after the response started."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\ncontent-type: text/plain\r\n\r\n")
                    conn.sendall(b"r" * RESET_AFTER)
                except OSError:
                    pass

    def stop(self):
        self._stop = True
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def resetting():
    u = ResettingUpstream()
    try:
        yield u
    finally:
        u.stop()


def send(envoy, method, path, key, body=b""):
    """One request on its own connection; returns (status, body bytes received).

    Head and body go out in one write: with two (as http.client does), a loaded machine
    can deliver the body after Envoy already gave up on a dead upstream, and then the
    body never passes the filter at all."""
    sock = socket.create_connection(("127.0.0.1", envoy.public_port), timeout=10)
    try:
        head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {key.key}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"content-length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"connection: close\r\n\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        try:
            got = resp.read()
        except http.client.IncompleteRead as e:
            got = e.partial
        return resp.status, len(got)
    finally:
        sock.close()


def test_every_outcome_is_charged_exactly_once(start_envoy, backend, resetting, collector, wasm_path):
    dead_port = harness.free_port()  # nothing listens: Envoy answers 503 itself
    extra = harness.export_service(collector.port, wasm_path, interval="1s")
    extra["extra_clusters"] = extra["extra_clusters"] + [
        harness._static_cluster("dead", dead_port, "127.0.0.1"),
        harness._static_cluster("resetting", resetting.port, "127.0.0.1"),
    ]
    envoy = start_envoy(
        concurrency=2,
        filter_conf=FILTER,
        extra_routes=[
            {"match": {"prefix": "/dead/"}, "route": {"cluster": "dead"}},
            {"match": {"prefix": "/reset/"}, "route": {"cluster": "resetting"}},
        ],
        **extra,
    )
    plans = {
        "big": {},
        "small": {"rate_limits": [{"name": "h", "rate": 1, "per": "1h", "burst": 2}]},
        "quota": {"quotas": [{"name": "d", "period": "day", "limit": 2}]},
    }
    k = {
        "ok": Key(plan="big"),
        "upstream_error": Key(plan="big"),
        "envoy_local_reply": Key(plan="big"),
        "upstream_reset": Key(plan="big"),
        "disabled": Key(plan="big", enabled=False),
        "expired": Key(plan="big", expires_at="2001-01-01T00:00:00Z"),
        "out_of_scope": Key(plan="big", scopes=[{"path_prefix": "/only"}]),
        "address": Key(plan="big", cidrs=["10.0.0.0/8"]),
        "rate_limited": Key(plan="small"),
        "quota": Key(plan="quota"),
    }
    assert push(envoy, keyset(1, list(k.values()), plans)).status == 200

    post = b"p" * 777
    script = {
        "ok": [
            ("GET", "/v1/a?size=1234"),
            ("GET", "/v1/a?size=0"),
            ("POST", "/v1/a?size=10", post),
            ("POST", "/v1/a", post),  # the backend's JSON echo: a size only the client knows
            ("HEAD", "/v1/a?size=5000"),  # a HEAD response has no body
        ],
        "upstream_error": [("GET", "/status/503"), ("GET", "/status/404?size=99"), ("POST", "/status/500", post)],
        "envoy_local_reply": [("GET", "/dead/x"), ("POST", "/dead/y", post)],
        "upstream_reset": [("GET", "/reset/x"), ("GET", "/reset/y")],
        "disabled": [("GET", "/v1/a"), ("POST", "/v1/a", post)],
        "expired": [("GET", "/v1/a")],
        "out_of_scope": [("GET", "/v1/a"), ("POST", "/v1/a?size=5", post)],
        "address": [("GET", "/v1/a"), ("GET", "/v1/b")],
        "rate_limited": [("POST", "/v1/a?size=100", post)] * 5,
        "quota": [("GET", "/v1/a?size=50")] * 4,
    }
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    statuses: dict[str, list[int]] = {}
    for name, reqs in script.items():
        sent[name] = received[name] = 0
        statuses[name] = []
        for method, path, *body in reqs:
            body = body[0] if body else b""
            status, n = send(envoy, method, path, k[name], body)
            statuses[name].append(status)
            received[name] += n
            # A refused request's body is never read (Envoy answers before it), so only
            # admitted requests send body bytes on to the upstream.
            if status not in (401, 403, 429):
                sent[name] += len(body)

    # The outcomes are what this test means them to be.
    assert statuses["ok"] == [200] * 5
    assert statuses["upstream_error"] == [503, 404, 500]
    assert statuses["envoy_local_reply"] == [503, 503]
    assert statuses["upstream_reset"] == [200, 200]
    assert received["upstream_reset"] == 2 * RESET_AFTER
    assert statuses["disabled"] == [401, 401] and statuses["expired"] == [401]
    assert statuses["out_of_scope"] == [403, 403] and statuses["address"] == [403, 403]
    assert statuses["rate_limited"] == [200, 200, 429, 429, 429]
    assert statuses["quota"] == [200, 200, 429, 429]
    assert all(received[n] > 0 for n in script), received

    want = {k[name].id: len(reqs) for name, reqs in script.items()}
    wait_usage(envoy, want)
    rows = usage_rows(envoy)
    got_api = {name: (rows[k[name].id]["request_bytes"], rows[k[name].id]["response_bytes"]) for name in script}
    expected = {name: (sent[name], received[name]) for name in script}
    assert got_api == expected, "usage API (request_bytes, response_bytes) per outcome"

    def prom(metric):
        samples = prom_samples(envoy, metric)
        return {name: samples.get(frozenset({("consumer", "acme"), ("plan", k[name].doc["plan"]), ("key_id", k[name].id),
                                            ("credential", "api-key")}))
                for name in script}

    harness.wait_until(lambda: prom("keymeter_response_bytes_total") == {n: r or None for n, (_, r) in expected.items()},
                       timeout=20, interval=0.2,
                       message="prometheus response bytes never matched")
    got_prom = {name: (prom("keymeter_request_bytes_total")[name] or 0, prom("keymeter_response_bytes_total")[name] or 0)
                for name in script}
    assert got_prom == expected, "Prometheus (request_bytes, response_bytes) per outcome"

    def exported():
        t = collector.totals()
        return {name: (t.get(k[name].id, {}).get("request_bytes"), t.get(k[name].id, {}).get("response_bytes"))
                for name in script}

    harness.wait_until(lambda: exported() == expected, timeout=20, interval=0.2,
                       message=f"exported events never matched: {collector.totals()}")
