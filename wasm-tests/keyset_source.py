"""A tiny key-set source for the pull tests (stdlib only, threaded).

Serves one document on every path: 200 with an ETag, or 304 when the request's
If-None-Match matches it. It can be switched to answer an error status or arbitrary
bytes, and stopped and started again on the same port (connection refused meanwhile).
Every request is recorded (path, headers, status answered).

    src = KeysetSource(doc); src.port; src.set_doc(doc2); src.fail(500); src.serve_raw(b"<html>")
    src.delay_s = 3  (answer late)
    src.stop(); src.start(); src.requests(); src.count
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

from _server import Handler, Server


class _Handler(Handler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        delay = self.server.owner.delay_s
        if delay:
            time.sleep(delay)
        status, body, etag = self.server.owner._answer(self.headers.get("If-None-Match"))
        self.server.owner._record(self.path, {k.lower(): v for k, v in self.headers.items()}, status)
        content_type = "application/json" if status == 200 else "text/plain"
        headers = {"ETag": etag} if etag is not None else None
        self.reply(status, None if status == 304 else body, content_type, headers)


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


class KeysetSource:
    def __init__(self, doc: dict | None = None, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self._lock = threading.Lock()
        self._body = b""
        self._etag: str | None = None
        self._fail: int | None = None
        self._requests: list[dict] = []
        # Seconds to wait before answering (to make the caller time out).
        self.delay_s: float = 0
        if doc is not None:
            self.set_doc(doc)
        else:
            self.fail(404)
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.start()

    # ---------------------------------------------------------------- what it serves

    def set_doc(self, doc: dict) -> str:
        """Serve `doc` (200 with a fresh ETag; 304 on a match); returns the ETag."""
        return self.serve_raw(json.dumps(doc).encode())

    def serve_raw(self, body: bytes, etag: str | None = None) -> str:
        """Serve arbitrary bytes as the document (garbage, invalid documents)."""
        etag = etag or etag_of(body)
        with self._lock:
            self._body, self._etag, self._fail = body, etag, None
        return etag

    def fail(self, status: int = 500) -> None:
        """Answer every request with `status` (a short text body, no ETag)."""
        with self._lock:
            self._fail = status

    @property
    def etag(self) -> str | None:
        with self._lock:
            return self._etag

    def _answer(self, if_none_match: str | None) -> tuple[int, bytes, str | None]:
        with self._lock:
            if self._fail is not None:
                return self._fail, f"source failure {self._fail}\n".encode(), None
            if if_none_match is not None and if_none_match == self._etag:
                return 304, b"", self._etag
            return 200, self._body, self._etag

    # ---------------------------------------------------------------- what it saw

    def _record(self, path: str, headers: dict, status: int) -> None:
        with self._lock:
            self._requests.append({"path": path, "headers": headers, "status": status})

    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "KeysetSource":
        """Listen (again) on `self.port` (a free one the first time when it is 0)."""
        if self._server is not None:
            return self
        self._server = Server((self.host, self.port), _Handler, owner=self)
        self.port = self._server.port
        self._thread = self._server.start_thread("keyset-source")
        return self

    def stop(self) -> None:
        """Close the listener and every connection: calls get connection refused."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(self._thread)

    def __enter__(self) -> "KeysetSource":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
