"""The threaded HTTP server the test servers share (stdlib only).

`Server` runs its handlers in daemon threads (one per connection), listens with a
backlog of 1024, and keeps track of open connections, so
`stop()` can close the ones Envoy keeps alive (otherwise a stopped server would go on
answering over them, and its handler threads would sit in readline()). `Handler`
speaks HTTP/1.1 (keep-alive, as Envoy's upstream pool expects) with TCP_NODELAY and one
write per response, and logs only when the server is `verbose`.

    server = Server(addr, MyHandler, owner=obj); thread = server.start_thread("name")
    ... MyHandler: self.server.owner, self.reply(status, body) ...; server.stop(thread)
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server
    # Buffered writes: status line, headers and body leave in one send (flushed by
    # handle_one_request after each response) instead of one small write each.
    wbufsize = 64 * 1024

    def setup(self) -> None:
        super().setup()
        # No Nagle: a response's last segment must not wait for the peer's delayed ACK
        # (~40 ms per keep-alive request otherwise).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def reply(self, status: int, body: bytes | None, content_type: str = "text/plain", headers=None) -> None:
        """Answer `status` with `headers` and `body` (`None`: no body, not even a length)."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is None:
            self.end_headers()
            return
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # listen() backlog (socketserver's default is 5): a burst of new connections, e.g.
    # `wrk -c 256` or Envoy opening its pool, must queue, not be dropped and retried.
    # The kernel caps it at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(self, addr, handler: type[Handler], owner: Any = None, verbose: bool = False):
        # What the handlers serve and record (`self.server.owner`).
        self.owner = owner
        self.verbose = verbose
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        super().__init__(addr, handler)

    def handle_error(self, request, client_address) -> None:
        # A load generator closing its connections mid-request is normal, not an error.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def start_thread(self, name: str) -> threading.Thread:
        """Serve in a daemon thread named `name-<port>`."""
        thread = threading.Thread(target=self.serve_forever, name=f"{name}-{self.port}", daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread | None) -> None:
        """Stop serving, close the listener and every connection: calls get refused."""
        self.shutdown()
        self.close_connections()
        self.server_close()
        if thread is not None:
            thread.join(timeout=5)
