"""Fleet-mode test parts: real redis-server and keymeter-limitd processes, and the
Envoy config pieces that point keymeter at them.

Stdlib only (like harness.py), so `make run-fleet` and bench/run.py use it too. Every
process started here is registered and stopped by an atexit hook (and by the harness's
signal handlers, which exit through atexit), so a failing or interrupted run leaves no
Redis or limitd behind; the pytest fixtures also stop them at teardown.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import harness

DEFAULT_LIMITD = harness.REPO_ROOT / "target" / "limitd" / "keymeter-limitd"
LIMITD_CLUSTER = "keymeter_limitd"

_running: list = []


def _kill(server) -> None:
    """SIGKILLs a RedisServer's or Limitd's process and forgets it."""
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)
    if server in _running:
        _running.remove(server)


def stop_all() -> None:
    """Stops every Redis and limitd this process started."""
    for p in list(_running):
        p.kill()


atexit.register(stop_all)


def _chain_signal_handlers() -> None:
    """SIGTERM/SIGHUP do not run atexit: stop Redis and limitd first, then hand over to
    the handler already installed (the harness's, which stops the Envoys and re-raises)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        prev = signal.getsignal(sig)

        def handler(signum, frame, prev=prev):
            stop_all()
            if callable(prev):
                prev(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


_chain_signal_handlers()


def valkey_server() -> str:
    """valkey-server: $VALKEY_SERVER, else where `make fleet-tools` unpacks it."""
    path = os.environ.get("VALKEY_SERVER") or str(harness.REPO_ROOT / ".tools" / "valkey" / "bin" / "valkey-server")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"valkey-server not found at {path}: run `make fleet-tools`")
    return path


class RedisServer:
    """redis-server on a free loopback port. With `aof` (the default) every write goes to
    an append-only file in `workdir` before its reply is sent, so a killed (SIGKILL) and
    restarted server comes back with its data (what a production deployment gets from
    AOF or replicas). No fsync (`appendfsync no`): the page cache survives a killed
    process, and an fsync per write stalled Redis for longer than the fleet timeout on a
    loaded CI machine (a machine crash is not what these tests simulate). Not `everysec`
    either: it may postpone the write behind a slow background fsync while replies go out.
    `binary`: another server speaking the protocol (valkey_server())."""

    def __init__(self, workdir: Path, *, aof: bool = True, port: int | None = None, binary: str | None = None):
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or harness.free_port()
        self.aof = aof
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "redis.log"

    def start(self) -> "RedisServer":
        exe = self.binary or shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: run `make fleet-tools` (Debian's redis-server)")
        args = [exe, "--port", str(self.port), "--bind", harness.LOCALHOST, "--save", "",
                "--dir", str(self.workdir), "--logfile", str(self.log)]  # fmt: skip
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _running.append(self)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection((harness.LOCALHOST, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> list[str] | str | int | None:
        """One command (RESP): an integer, a (bulk) string, a flat list of strings."""
        with socket.create_connection((harness.LOCALHOST, self.port), timeout=5) as s:
            s.sendall(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args))
            f = s.makefile("rb")

            def read():
                line = f.readline().rstrip(b"\r\n")
                kind, rest = line[:1], line[1:].decode()
                if kind in (b"+", b"-"):
                    return rest
                if kind == b":":
                    return int(rest)
                if kind == b"$":
                    n = int(rest)
                    return None if n < 0 else f.read(n + 2)[:-2].decode()
                if kind == b"*":
                    return [read() for _ in range(int(rest))]
                raise ValueError(f"unexpected RESP {line!r}")

            return read()

    def kill(self) -> None:
        """SIGKILL: an outage, not a shutdown."""
        _kill(self)

    @property
    def url(self) -> str:
        return f"redis://{harness.LOCALHOST}:{self.port}"


class Limitd:
    """keymeter-limitd on a fixed free port (so it can be restarted where Envoy's
    cluster points)."""

    def __init__(self, redis_url: str, workdir: Path, *, binary: str | os.PathLike | None = None,
                 port: int | None = None, redis_timeout_ms: int = 500):  # fmt: skip
        self.binary = str(binary or os.environ.get("KEYMETER_LIMITD") or DEFAULT_LIMITD)
        self.redis_url = redis_url
        self.port = port or harness.free_port()
        self.redis_timeout_ms = redis_timeout_ms
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Limitd":
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"keymeter-limitd not found at {self.binary}: run `make limitd`")
        log = open(self.workdir / f"limitd-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", f"{harness.LOCALHOST}:{self.port}", "--redis", self.redis_url,
             "--redis-timeout-ms", str(self.redis_timeout_ms)],  # fmt: skip
            stdout=log,
            stderr=log,
        )
        log.close()
        _running.append(self)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((harness.LOCALHOST, self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"keymeter-limitd exited with {self.proc.returncode}")
                time.sleep(0.02)
        raise RuntimeError(f"keymeter-limitd on {self.port} did not start")

    def kill(self) -> None:
        _kill(self)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"http://{harness.LOCALHOST}:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def peek(self, subject: str, quotas: list[dict]) -> dict:
        """Per quota: consumed in the current period and units held per node."""
        return {q["name"]: q for q in self.post("/v1/peek", {"subject": subject, "quotas": quotas})["quotas"]}

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{harness.LOCALHOST}:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }


def limitd_cluster(ports: list[int], name: str = LIMITD_CLUSTER) -> dict:
    """A STATIC Envoy cluster over the limitd instances (round robin)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": harness.LOCALHOST, "port_value": p}}}} for p in ports]}  # fmt: skip
            ],
        },
    }


def filter_conf(fleet_size: int, **fleet) -> dict:
    """The public filter's plugin configuration in fleet mode. The call timeout is
    generous (2 s): on a shared 2-core CI machine a limitd answer can take longer than
    100 ms, and a slow answer must not turn a test of exact counts into a test of the
    partition fallback. Tests of outages set their own, short, timeout."""
    f = {"cluster": LIMITD_CLUSTER, "fleet_size": fleet_size, "timeout_ms": 2000}
    f.update(fleet)
    return {"role": "filter", "fleet": f}


def quota_specs(plan: dict) -> list[dict]:
    """A key-set plan's quotas as limitd's peek wants them."""
    return [{"name": q["name"], "period": q["period"], "limit": q["limit"]} for q in plan.get("quotas", [])]
