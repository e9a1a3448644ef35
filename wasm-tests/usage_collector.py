"""A tiny usage collector for the export tests (stdlib only, threaded).

Accepts POSTed CloudEvents batches (a JSON array) and records every request: path,
headers, raw body, parsed events, status answered. It can fail the next N requests
with a status, or answer late (to make the caller time out).

    col = UsageCollector(); col.port; col.fail_next(2, 500); col.delay_s = 3
    col.requests(); col.count; col.accepted_events(); col.totals(); col.stop()
"""

from __future__ import annotations

import collections
import json
import threading
import time

from _server import Handler, Server


class _Handler(Handler):
    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            events = json.loads(body)
        except ValueError:
            events = None
        # Recorded on arrival (status None until answered), so a slow answer still shows.
        rec = owner._record(self.path, {k.lower(): v for k, v in self.headers.items()}, body, events)
        if owner.delay_s:
            time.sleep(owner.delay_s)
        status = owner._next_status()
        with owner._lock:
            rec["status"] = status
        reply = b"" if status < 300 else f"collector failure {status}\n".encode()
        self.reply(status, reply)


class UsageCollector:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Lock()
        self._requests: list[dict] = []
        self._fail: list[int] = []
        self.delay_s: float = 0
        self._server = Server((host, port), _Handler, owner=self)
        self.port = self._server.port
        self._thread = self._server.start_thread("collector")

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next `n` requests with `status` (then 200 again)."""
        with self._lock:
            self._fail = [status] * n

    def _next_status(self) -> int:
        with self._lock:
            return self._fail.pop(0) if self._fail else 200

    def _record(self, path, headers, body, events) -> dict:
        rec = {"path": path, "headers": headers, "body": body, "events": events, "status": None}
        with self._lock:
            self._requests.append(rec)
        return rec

    def requests(self) -> list[dict]:
        """Every request so far, oldest first; `status` is None while being answered."""
        with self._lock:
            return [dict(r) for r in self._requests]

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def accepted_events(self, dedup: bool = True) -> list[dict]:
        """Events of 2xx-answered requests, first occurrence of each id when `dedup`."""
        seen, out = set(), []
        for r in self.requests():
            if r["status"] is None or r["status"] >= 300 or not isinstance(r["events"], list):
                continue
            for e in r["events"]:
                if dedup and e.get("id") in seen:
                    continue
                seen.add(e.get("id"))
                out.append(e)
        return out

    def totals(self) -> dict[str, dict]:
        """Deduplicated sums per lineage: {lineage: {"requests": {...}, "responses": {...},
        "request_bytes": n, "response_bytes": n, "cost_units": n}}."""
        out: dict[str, dict] = {}
        for e in self.accepted_events():
            d = e["data"]
            t = out.setdefault(
                d["lineage"],
                {"requests": collections.Counter(), "responses": collections.Counter(),
                 "request_bytes": 0, "response_bytes": 0, "cost_units": 0},
            )  # fmt: skip
            t["requests"].update(d["requests"])
            t["responses"].update(d["responses"])
            for k in ("request_bytes", "response_bytes", "cost_units"):
                t[k] += d[k]
        return out

    def stop(self) -> None:
        self._server.stop(self._thread)

    def __enter__(self) -> "UsageCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
