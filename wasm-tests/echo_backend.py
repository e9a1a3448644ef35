#!/usr/bin/env python3
"""Echo backend for the keymeter tests and demo (stdlib only).

Built to take load like a real backend (`wrk` against `make run`): a thread per
connection, a listen backlog of 1024, HTTP/1.1 keep-alive with TCP_NODELAY and one
write per response (see _server.py).

Every request, whatever the method and path, is answered 200 with a JSON echo:

    {"method": ..., "path": ..., "headers": {name: value | [values]}, "body_bytes": N}

Header names are lowercased; a header sent more than once becomes a list.

Extras:
  /status/<code>            reply with that status instead of 200
  ?size=N                   reply with exactly N bytes of padding instead of the JSON echo
                            (so byte metering can be checked against a known size)
  GET    /__backend/requests  requests served so far, the newest 100 000 (method, path, headers, body_bytes)
  DELETE /__backend/requests  forget them

Run standalone:  python3 echo_backend.py --port P     (prints "listening on P")
Or in-process:   backend = EchoBackend(); backend.port; backend.requests(); backend.stop()
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from urllib.parse import parse_qs, urlsplit

from _server import Handler, Server

CONTROL_PATH = "/__backend/requests"
# Requests remembered for requests(); older ones are forgotten first.
MAX_RECORDED = 100_000
_PAD_CHUNK = b"x" * 65536
# Statuses that must not carry a body (RFC 9110); Envoy rejects upstream bodies on them.
_NO_BODY_STATUSES = {204, 304}


def headers_to_dict(items) -> dict:
    """Lowercased name -> value, or a list of values when the header was repeated."""
    out: dict = {}
    for name, value in items:
        key = name.lower()
        if key not in out:
            out[key] = value
        elif isinstance(out[key], list):
            out[key].append(value)
        else:
            out[key] = [out[key], value]
    return out


class _Handler(Handler):
    server: _Server

    # BaseHTTPRequestHandler dispatches on do_<METHOD>; answering every name lets the
    # backend echo any method (including ones a filter should have rejected).
    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    # ---------------------------------------------------------------- request body

    def _read_body(self) -> int:
        """Consume the whole request body so the connection stays usable; return its size."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            total = 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers end with an empty line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return total
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 65536))
                    if not data:
                        raise ConnectionError("eof in chunk")
                    remaining -= len(data)
                total += size
                self.rfile.readline(65537)  # CRLF after the chunk data
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining:
            data = self.rfile.read(min(remaining, 65536))
            if not data:
                raise ConnectionError("eof in body")
            remaining -= len(data)
        return length

    # ---------------------------------------------------------------- dispatch

    def _handle(self) -> None:
        body_bytes = self._read_body()
        url = urlsplit(self.path)
        headers = headers_to_dict(self.headers.items())

        if url.path == CONTROL_PATH:
            self._control()
            return

        self.server.record(
            {
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body_bytes": body_bytes,
            }
        )

        status = 200
        parts = url.path.split("/")
        if len(parts) >= 3 and parts[1] == "status":
            try:
                status = int(parts[2])
            except ValueError:
                status = 400
            if not 200 <= status <= 599:
                status = 400

        size = parse_qs(url.query).get("size")
        if size is not None:
            try:
                pad = max(0, int(size[0]))
            except ValueError:
                pad = 0
            self._send(status, "application/octet-stream", pad_bytes=pad)
        else:
            echo = {
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body_bytes": body_bytes,
            }
            self._send(status, "application/json", json.dumps(echo).encode())

    def _control(self) -> None:
        if self.command == "GET":
            self._send(200, "application/json", json.dumps(self.server.requests()).encode())
        elif self.command == "DELETE":
            cleared = self.server.clear()
            self._send(200, "application/json", json.dumps({"cleared": cleared}).encode())
        else:
            self._send(405, "application/json", b'{"error":"method not allowed"}')

    def _send(self, status: int, content_type: str, body: bytes = b"", pad_bytes: int = 0) -> None:
        self.send_response(status)
        if status in _NO_BODY_STATUSES:
            self.end_headers()
            return
        length = pad_bytes if pad_bytes else len(body)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        if pad_bytes:
            # Streamed so that large sizes do not need that much memory.
            remaining = pad_bytes
            while remaining:
                chunk = _PAD_CHUNK[: min(remaining, len(_PAD_CHUNK))]
                self.wfile.write(chunk)
                remaining -= len(chunk)
        else:
            self.wfile.write(body)


class _Server(Server):
    def __init__(self, addr, verbose: bool = False, max_recorded: int = MAX_RECORDED):
        # Bounded: under load (wrk against `make run`) the oldest records go.
        self._requests: collections.deque[dict] = collections.deque(maxlen=max_recorded)
        super().__init__(addr, _Handler, verbose=verbose)

    def record(self, entry: dict) -> None:
        with self._lock:
            self._requests.append(entry)

    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> int:
        with self._lock:
            n = len(self._requests)
            self._requests.clear()
            return n


class EchoBackend:
    """The echo backend running in a background thread of this process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False, max_recorded: int = MAX_RECORDED):
        self.host = host
        self._server = _Server((host, port), verbose=verbose, max_recorded=max_recorded)
        self.port: int = self._server.port
        self._thread = self._server.start_thread("echo-backend")
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def requests(self) -> list[dict]:
        """Requests served so far, oldest first (control requests excluded)."""
        return self._server.requests()

    def clear(self) -> int:
        return self._server.clear()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.stop(self._thread)

    def __enter__(self) -> EchoBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_backend(host: str = "127.0.0.1", port: int = 0):
    """Start a backend thread; return (port, stop)."""
    backend = EchoBackend(host, port)
    return backend.port, backend.stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    server = _Server((args.host, args.port), verbose=args.verbose)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
