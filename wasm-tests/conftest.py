"""pytest fixtures for the keymeter Envoy tests.

Artifacts come from the environment (`make test` sets absolute paths) with repo-relative
defaults, so `python -m pytest wasm-tests` also works after `make tools wasm cli`:

    KEYMETER_WASM  target/wasm32-wasip1/release/keymeter.wasm
    KEYMETER_CLI   target/release/keymeter
    KEYMETER_FAULT_WASM  target/fault-injection/wasm32-wasip1/release/keymeter.wasm
                   (built with the `fault-injection` feature; test_faults.py only)
    ENVOY_BIN      .tools/bin/envoy

A missing artifact fails the test (never skips it): a green run must mean the filter
was really exercised.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

import harness
from echo_backend import EchoBackend
from usage_collector import UsageCollector

# Keyword arguments of start_envoy() that go to harness.Envoy; the rest go to
# harness.envoy_config().
_ENVOY_KWARGS = {
    "concurrency",
    "log_level",
    "component_log_level",
    "extra_args",
    "ready_timeout",
    "cwd",
}
_AUTO_PORTS = ("public_port", "envoy_admin_port", "admin_api_port")


def pytest_configure(config):
    harness.install_signal_handlers()


def _artifact(env_var: str, default: Path, what: str, make_target: str, executable: bool) -> Path:
    path = Path(os.environ.get(env_var) or default).resolve()
    ok = path.is_file() and (not executable or os.access(path, os.X_OK))
    if not ok:
        pytest.fail(
            f"{what} not found at {path}: run `make {make_target}` or set {env_var}",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def wasm_path() -> Path:
    return _artifact("KEYMETER_WASM", harness.DEFAULT_WASM, "keymeter.wasm", "wasm", False)


@pytest.fixture(scope="session")
def fault_wasm_path() -> Path:
    """keymeter.wasm built with the `fault-injection` feature (never shipped)."""
    return _artifact("KEYMETER_FAULT_WASM", harness.DEFAULT_FAULT_WASM, "fault-injection keymeter.wasm", "wasm-fault", False)


@pytest.fixture(scope="session")
def cli_path() -> Path:
    return _artifact("KEYMETER_CLI", harness.DEFAULT_CLI, "keymeter CLI", "cli", True)


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    return _artifact("ENVOY_BIN", harness.DEFAULT_ENVOY, "envoy binary", "tools", True)


@pytest.fixture(scope="session")
def admin_token() -> str:
    """Token matching the default admin_conf of harness.envoy_config()."""
    return harness.TEST_ADMIN_TOKEN


@pytest.fixture
def backend():
    """Echo backend in a thread of the test process (fresh per test)."""
    b = EchoBackend()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def collector():
    """CloudEvents usage collector in a thread of the test process (fresh per test)."""
    c = UsageCollector()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def start_envoy(request, backend, envoy_bin, tmp_path):
    """Factory: start_envoy(config=None, **kwargs) -> harness.Envoy, stopped at teardown.

    kwargs named in _ENVOY_KWARGS (concurrency, log_level, ...) go to harness.Envoy; the
    others go to harness.envoy_config(). Unless given: backend_port is the `backend`
    fixture's, ports are picked free, and wasm_path is the `wasm_path` fixture's (only
    resolved when the filter is included, so wasm=False runs need no wasm build).
    Pass a ready-made bootstrap as `config` to skip envoy_config() altogether.
    """
    started: list[harness.Envoy] = []
    request.node._keymeter_envoys = started  # for the failure report hook below

    def start(config: dict | None = None, **kwargs) -> harness.Envoy:
        envoy_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _ENVOY_KWARGS}
        cfg_kw = dict(kwargs)
        cfg_kw.setdefault("backend_port", backend.port)
        if config is None and cfg_kw.get("wasm", True) and "wasm_path" not in cfg_kw:
            cfg_kw["wasm_path"] = request.getfixturevalue("wasm_path")
        wants_admin = cfg_kw.get("admin_listener", True)
        auto = [
            p for p in _AUTO_PORTS if p not in cfg_kw and (p != "admin_api_port" or wants_admin)
        ]

        # A port picked free can be taken by someone else before Envoy binds it; with
        # auto-picked ports that is worth a retry with new ones.
        attempts = 3 if (config is None and auto) else 1
        for attempt in range(attempts):
            if config is None:
                for p in auto:
                    cfg_kw[p] = harness.free_port()
                cfg = harness.envoy_config(**cfg_kw)
            else:
                cfg = config
            envoy = harness.Envoy(
                cfg,
                envoy_bin=envoy_bin,
                workdir=tmp_path / f"envoy-{len(started)}",
                start=False,
                **envoy_kw,
            )
            started.append(envoy)
            try:
                return envoy.start()
            except harness.EnvoyError as e:
                if attempt + 1 < attempts and "address already in use" in str(e).lower():
                    continue
                raise
        raise AssertionError("unreachable")

    yield start

    for envoy in started:
        # A test that kills an Envoy itself says so (`killed_on_purpose`); any other exit
        # is worth a warning.
        if envoy.proc is not None and envoy.proc.poll() is not None and not getattr(envoy, "killed_on_purpose", False):
            warnings.warn(
                f"envoy {envoy.pid} exited on its own with status {envoy.proc.returncode} "
                f"during the test\n{envoy.log_tail()}"
            )
        envoy.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A failing test gets the tail of each of its Envoy logs in the report: that is
    # where the filter's own log lines (wasm:info) end up.
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for i, envoy in enumerate(getattr(item, "_keymeter_envoys", [])):
            report.sections.append((f"envoy #{i} log", envoy.log_tail(80)))
