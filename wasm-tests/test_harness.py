"""Tests of the test harness itself; none of them needs the keymeter wasm build.

If these fail, failures elsewhere in wasm-tests say nothing about the filter.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness
from echo_backend import EchoBackend
from jwt_tokens import Issuer

HERE = Path(__file__).resolve().parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- echo backend


def test_backend_echoes_method_path_headers_and_body(backend):
    r = harness.http(
        "POST",
        f"{backend.url}/a/b?x=1",
        headers=[("X-Twice", "1"), ("X-Twice", "2"), ("X-Once", "v")],
        body=b"hello",
    )
    assert r.status == 200
    echo = r.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/a/b?x=1"
    assert echo["headers"]["x-twice"] == ["1", "2"]
    assert echo["headers"]["x-once"] == "v"
    assert echo["body_bytes"] == 5
    assert r.headers.get("content-length") == str(len(r.body))
    assert [(q["method"], q["path"]) for q in backend.requests()] == [("POST", "/a/b?x=1")]


def test_backend_reads_chunked_bodies_and_keeps_the_connection(backend):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=5)
    try:
        conn.request("PUT", "/chunked", body=iter([b"abc", b"defgh"]), encode_chunked=True)
        first = conn.getresponse()
        assert json.loads(first.read())["body_bytes"] == 8
        # Same socket: only works if the chunked body was consumed exactly.
        conn.request("GET", "/again")
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["path"] == "/again"
    finally:
        conn.close()


def test_backend_status_and_size(backend):
    assert harness.http("GET", f"{backend.url}/status/503").status == 503
    r = harness.http("GET", f"{backend.url}/status/201?size=1000")
    assert (r.status, len(r.body), set(r.body)) == (201, 1000, {ord("x")})
    assert harness.http("GET", f"{backend.url}/x?size=0").body == b""
    r = harness.http("GET", f"{backend.url}/status/204")
    assert (r.status, r.body, r.headers.get("content-length")) == (204, b"", None)
    r = harness.http("HEAD", f"{backend.url}/x?size=100")
    assert (r.status, r.body, r.headers.get("content-length")) == (200, b"", "100")


def test_backend_control_endpoints(backend):
    harness.http("GET", f"{backend.url}/one", headers={"X-K": "v"})
    seen = harness.http("GET", f"{backend.url}/__backend/requests").json()
    assert [(q["method"], q["path"], q["headers"]["x-k"]) for q in seen] == [("GET", "/one", "v")]
    assert harness.http("DELETE", f"{backend.url}/__backend/requests").json() == {"cleared": 1}
    assert backend.requests() == []
    backend.clear()


def test_backend_runs_standalone():
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "echo_backend.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on ")
        port = int(line.split()[-1])
        assert harness.http("GET", f"http://127.0.0.1:{port}/x").json()["path"] == "/x"
    finally:
        proc.terminate()
        proc.wait(5)


def test_start_backend_function():
    port, stop = __import__("echo_backend").start_backend()
    assert harness.http("GET", f"http://127.0.0.1:{port}/").status == 200
    stop()
    with pytest.raises(OSError):
        harness.http("GET", f"http://127.0.0.1:{port}/", timeout=2)


# --------------------------------------------------------------------------- http client


def test_headers_are_case_insensitive_and_multi_valued():
    h = harness.Headers(
        [("Set-Cookie", "a=1"), ("content-type", "text/plain"), ("set-cookie", "b=2")]
    )
    assert h.get("SET-COOKIE") == "a=1"
    assert h.get_all("set-cookie") == ["a=1", "b=2"]
    assert h["Content-Type"] == "text/plain"
    assert "CONTENT-TYPE" in h and "x-missing" not in h
    assert h.get("x-missing", "d") == "d" and h.get_all("x-missing") == []


def test_http_sends_json_bodies_and_raw_paths(backend):
    r = harness.http("POST", f"{backend.url}/a/../b//c", body={"k": 1})
    echo = r.json()
    # No client-side normalization: the normalization tests rely on this.
    assert echo["path"] == "/a/../b//c"
    assert echo["headers"]["content-type"] == "application/json"
    assert echo["body_bytes"] == len(json.dumps({"k": 1}))


# --------------------------------------------------------------------------- config


def test_envoy_config_shape():
    cfg = harness.envoy_config(
        backend_port=1,
        public_port=2,
        envoy_admin_port=3,
        admin_api_port=4,
        wasm_path="/x/keymeter.wasm",
        filter_conf={"role": "filter", "k": 1},
    )
    public, admin = cfg["static_resources"]["listeners"]
    assert (public["name"], admin["name"]) == ("public", "keymeter_admin")
    assert admin["per_connection_buffer_limit_bytes"] == 268435456

    def hcm(listener):
        return listener["filter_chains"][0]["filters"][0]["typed_config"]

    for listener in (public, admin):
        chain = hcm(listener)["http_filters"]
        assert [f["name"] for f in chain] == [
            "envoy.filters.http.wasm",
            "envoy.filters.http.router",
        ]
        wasm_cfg = chain[0]["typed_config"]["config"]
        assert wasm_cfg["vm_config"]["vm_id"] == "keymeter"
        assert wasm_cfg["vm_config"]["code"]["local"]["filename"] == "/x/keymeter.wasm"
        assert hcm(listener)["path_with_escaped_slashes_action"] == "UNESCAPE_AND_REDIRECT"

    def conf(listener):
        wasm_cfg = hcm(listener)["http_filters"][0]["typed_config"]["config"]
        return json.loads(wasm_cfg["configuration"]["value"])

    assert conf(public) == {"role": "filter", "k": 1}
    assert conf(admin) == {
        "role": "admin",
        "admin_token_sha256": harness.sha256hex("test-admin-token"),
    }

    routes = harness.routes(cfg)
    assert routes[0]["match"] == {"prefix": "/public/"}
    assert routes[0]["typed_per_filter_config"]["envoy.filters.http.wasm"]["disabled"] is True
    assert set(routes[0]["request_headers_to_remove"]) == set(harness.IDENTITY_HEADERS)
    assert routes[-1]["match"] == {"prefix": "/"}

    bare = harness.envoy_config(
        backend_port=1, public_port=2, envoy_admin_port=3, admin_listener=False, wasm=False
    )
    assert [lst["name"] for lst in bare["static_resources"]["listeners"]] == ["public"]
    chain = hcm(bare["static_resources"]["listeners"][0])["http_filters"]
    assert [f["name"] for f in chain] == ["envoy.filters.http.router"]


def test_demo_config_is_current_and_valid(envoy_bin, tmp_path):
    sys.path.insert(0, str(HERE.parent / "envoy"))
    try:
        import gen_demo
    finally:
        sys.path.pop(0)
    committed = (HERE.parent / "envoy" / "demo.json").read_text()
    assert committed == gen_demo.render(), "envoy/demo.json is stale: run `make demo-config`"

    # Validate mode loads the wasm, which may not be built here: check the rest of the
    # bootstrap with the keymeter filter taken out.
    cfg = json.loads(committed)
    for listener in cfg["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [
            f for f in hcm["http_filters"] if f["name"] != harness.WASM_FILTER_NAME
        ]
        # The demo's JWKS is written by scripts/demo-jwt.py at start-up; Envoy reads the
        # file when it loads the config, so give it one.
        for f in hcm["http_filters"]:
            if f["name"] == harness.JWT_AUTHN_FILTER_NAME:
                for provider in f["typed_config"]["providers"].values():
                    assert provider["local_jwks"]["filename"] == gen_demo.JWKS_PATH
                    jwks = tmp_path / "jwks.json"
                    jwks.write_text(Issuer().jwks_json())
                    provider["local_jwks"]["filename"] = str(jwks)
    path = tmp_path / "demo-nowasm.json"
    path.write_text(json.dumps(cfg))
    result = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


# --------------------------------------------------------------------------- envoy


def test_request_round_trips_through_envoy(start_envoy, backend):
    envoy = start_envoy(wasm=False)
    r = harness.http("POST", envoy.url("/v1/things?q=1"), headers={"X-Test": "yes"}, body=b"12345")
    assert r.status == 200
    assert r.headers.get("server") == "envoy"  # really went through Envoy
    echo = r.json()
    assert (echo["method"], echo["path"], echo["body_bytes"]) == ("POST", "/v1/things?q=1", 5)
    assert echo["headers"]["x-test"] == "yes"

    seen = backend.requests()
    assert len(seen) == 1
    assert (seen[0]["method"], seen[0]["path"]) == ("POST", "/v1/things?q=1")
    assert seen[0]["headers"]["x-test"] == "yes"


def test_envoy_normalizes_paths(start_envoy, backend):
    envoy = start_envoy(wasm=False)
    assert harness.http("GET", envoy.url("/a/../b//c")).json()["path"] == "/b/c"
    r = harness.http("GET", envoy.url("/a%2Fb"))
    assert r.status in (301, 302, 307, 308) and r.headers.get("location", "").endswith("/a/b")
    assert [q["path"] for q in backend.requests()] == ["/b/c"]


def test_public_route_strips_identity_headers(start_envoy, backend):
    envoy = start_envoy(wasm=False)
    forged = {h: "forged" for h in harness.IDENTITY_HEADERS}
    harness.http("GET", envoy.url("/public/x"), headers={**forged, "X-Other": "kept"})
    (seen,) = backend.requests()
    assert seen["path"] == "/public/x"
    assert not set(harness.IDENTITY_HEADERS) & set(seen["headers"])
    assert seen["headers"]["x-other"] == "kept"


def test_admin_listener_without_filter_is_404(start_envoy):
    envoy = start_envoy(wasm=False)
    assert envoy.admin_api_port is not None
    assert harness.http("GET", envoy.admin_api_url("/v1/keys")).status == 404


def test_two_envoys_at_once(start_envoy, backend):
    first = start_envoy(wasm=False)
    second = start_envoy(wasm=False, admin_listener=False)
    assert second.admin_api_port is None
    assert first.pid != second.pid and first.public_port != second.public_port
    assert first.is_running() and second.is_running()
    assert harness.http("GET", first.url("/one")).status == 200
    assert harness.http("GET", second.url("/two")).status == 200
    assert sorted(q["path"] for q in backend.requests()) == ["/one", "/two"]


def test_stop_kills_the_process(start_envoy):
    envoy = start_envoy(wasm=False, concurrency=1)
    pid, port = envoy.pid, envoy.public_port
    assert _pid_alive(pid) and envoy in harness.live_envoys()
    envoy.stop()
    assert not _pid_alive(pid)  # gone and reaped, not a zombie
    assert not envoy.is_running() and envoy not in harness.live_envoys()
    with pytest.raises(OSError):
        harness.http("GET", f"http://127.0.0.1:{port}/", timeout=2)
    envoy.stop()  # idempotent


def test_restart_keeps_ports_and_takes_new_config(start_envoy):
    envoy = start_envoy(wasm=False, log_level="info")
    old_pid, port = envoy.pid, envoy.public_port
    cfg = copy.deepcopy(envoy.config)
    harness.routes(cfg).insert(
        0, {"match": {"path": "/teapot"}, "direct_response": {"status": 418}}
    )
    envoy.restart(cfg)
    assert envoy.pid != old_pid and not _pid_alive(old_pid)
    assert envoy.public_port == port
    assert harness.http("GET", envoy.url("/teapot")).status == 418
    # One log file across restarts; current_run=True gives only the latest run.
    marker = "starting main dispatch loop"
    assert envoy.log_text().count(marker) == 2
    assert envoy.log_text(current_run=True).count(marker) == 1


def test_stats_and_prometheus(start_envoy):
    envoy = start_envoy(wasm=False)
    for _ in range(3):
        harness.http("GET", envoy.url("/x"))
    harness.wait_until(lambda: envoy.stat("http.public.downstream_rq_total") >= 3)
    stats = envoy.stats(filter="^http\\.public\\.")
    assert stats and all(name.startswith("http.public.") for name in stats)
    assert stats["http.public.downstream_rq_total"] >= 3
    assert "envoy_http_downstream_rq_total" in envoy.prometheus()


def test_bad_config_fails_fast_with_the_log(start_envoy):
    cfg = harness.envoy_config(
        backend_port=1,
        public_port=harness.free_port(),
        envoy_admin_port=harness.free_port(),
        wasm=False,
    )
    cfg["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    started = time.monotonic()
    with pytest.raises(harness.EnvoyError, match="NOT_A_TYPE"):
        start_envoy(config=cfg)
    assert time.monotonic() - started < 15
    assert harness.live_envoys() == []


def test_missing_wasm_fails_with_the_log(start_envoy, tmp_path):
    with pytest.raises(harness.EnvoyError, match="exited"):
        start_envoy(wasm_path=tmp_path / "missing.wasm")
    assert harness.live_envoys() == []


def test_envoy_context_manager(envoy_bin, tmp_path):
    with EchoBackend() as b:
        cfg = harness.envoy_config(
            backend_port=b.port,
            public_port=harness.free_port(),
            envoy_admin_port=harness.free_port(),
            wasm=False,
        )
        with harness.Envoy(cfg, envoy_bin=envoy_bin, workdir=tmp_path) as envoy:
            pid = envoy.pid
            assert harness.http("GET", envoy.url("/")).status == 200
        assert not _pid_alive(pid)
