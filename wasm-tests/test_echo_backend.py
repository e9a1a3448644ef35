"""The demo/test echo backend takes load like a real backend (issue 10.9): keep-alive
requests are answered without Nagle/delayed-ACK stalls, bursts of connections are not
dropped by a tiny listen backlog, and what it records stays bounded."""

from __future__ import annotations

import concurrent.futures
import http.client
import time

from echo_backend import EchoBackend, MAX_RECORDED


def test_keep_alive_requests_are_not_delayed():
    with EchoBackend() as b:
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=5)
        conn.request("GET", "/warmup")
        conn.getresponse().read()
        n = 50
        start = time.monotonic()
        for i in range(n):
            conn.request("POST", f"/v1/x?i={i}", body=b"{}", headers={"content-type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and r.read()
        took = time.monotonic() - start
        conn.close()
    # Header and body used to go out in two writes: Nagle held the body until the
    # client's delayed ACK (~40 ms), i.e. >= 2 s for 50 requests. ~1 ms each now.
    assert took < 1.0, f"{n} keep-alive requests took {took:.2f}s"


def test_a_burst_of_connections_is_accepted():
    with EchoBackend() as b:
        assert b._server.request_queue_size >= 1024, "listen backlog"

        def one(i):
            conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
            try:
                conn.request("GET", f"/burst/{i}")
                r = conn.getresponse()
                r.read()
                return r.status
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
            statuses = list(pool.map(one, range(256)))
        assert statuses == [200] * 256
        assert len(b.requests()) == 256


def test_recorded_requests_are_bounded():
    with EchoBackend(max_recorded=10) as b:
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=5)
        for i in range(25):
            conn.request("GET", f"/r/{i}")
            conn.getresponse().read()
        conn.close()
        paths = [r["path"] for r in b.requests()]
        assert paths == [f"/r/{i}" for i in range(15, 25)], "the newest are kept"
    assert MAX_RECORDED >= 10_000
