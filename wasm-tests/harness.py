"""Test harness: Envoy bootstrap builder, Envoy process control and a tiny HTTP client.

Stdlib only, so that envoy/gen_demo.py and ad-hoc scripts can import it without pytest.

Every Envoy started through `Envoy` is put in a module registry and stopped by an
`atexit` hook (and by SIGTERM/SIGHUP handlers, see `install_signal_handlers`), so a
failed or interrupted test run does not leave Envoys holding ports.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import http.client as httpclient  # aliased: `http` below is our request helper
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WASM = REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "keymeter.wasm"
# Built with the `fault-injection` feature, for wasm-tests/test_faults.py only.
DEFAULT_FAULT_WASM = REPO_ROOT / "target" / "fault-injection" / "wasm32-wasip1" / "release" / "keymeter.wasm"
DEFAULT_CLI = REPO_ROOT / "target" / "release" / "keymeter"
DEFAULT_ENVOY = REPO_ROOT / ".tools" / "bin" / "envoy"

LOCALHOST = "127.0.0.1"
TEST_ADMIN_TOKEN = "test-admin-token"

WASM_FILTER_NAME = "envoy.filters.http.wasm"
WASM_VM_ID = "keymeter"
# Identity headers the filter adds for the upstream; a route that bypasses the filter
# must strip client-supplied copies so they cannot be forged.
IDENTITY_HEADERS = ("x-keymeter-key-id", "x-keymeter-consumer", "x-keymeter-plan", "x-keymeter-auth")
ADMIN_LISTENER_BUFFER_LIMIT = 256 * 1024 * 1024


def sha256hex(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = LOCALHOST) -> int:
    """A currently free TCP port.

    The kernel can give the same ephemeral port twice once it is released, so ports
    already handed out by this process are skipped: one Envoy's ports never collide
    with each other. Another process can still grab the port before Envoy binds it;
    `start_envoy` in conftest retries on that.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _ports_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("could not find a free port")


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option Envoy binds with, so TIME_WAIT leftovers do not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- config


def _socket_address(port: int, host: str = LOCALHOST) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _vm_config(wasm_path: str | os.PathLike, vm_id: str, runtime: str) -> dict:
    return {
        "vm_id": vm_id,
        "runtime": runtime,
        "code": {"local": {"filename": str(wasm_path)}},
    }


def wasm_filter(
    conf: Mapping[str, Any],
    wasm_path: str | os.PathLike,
    *,
    vm_id: str = WASM_VM_ID,
    runtime: str = "envoy.wasm.runtime.v8",
) -> dict:
    """The keymeter http_filters entry with `conf` as its plugin configuration.

    Both listeners use the same vm_id and code so Envoy runs one VM per worker for both
    (shared state is per VM); only the plugin configuration differs.
    """
    return {
        "name": WASM_FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "keymeter",
                "root_id": "keymeter",
                "vm_config": _vm_config(wasm_path, vm_id, runtime),
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(conf),
                },
                # A VM that dies (a panic: a bug, never a request's fault) is replaced by
                # a fresh one on the next request, with backoff, instead of failing every
                # later request on that worker with 503 until Envoy restarts
                # (wasm-tests/test_faults.py). Shared data lives on in the other VMs.
                "failure_policy": "FAIL_RELOAD",
                # Without this Envoy turns a plugin's StopIteration on headers into
                # StopAllIteration and never hands it the body: the admin API reads
                # key-set documents from request bodies.
                "allow_on_headers_stop_iteration": True,
            },
        },
    }


PULL_CLUSTER = "keyset_source"
PULL_AUTHORITY = "keys.internal"
PULL_PATH = "/keyset.json"


def pull_service(
    source_port: int,
    wasm_path: str | os.PathLike = DEFAULT_WASM,
    *,
    source_host: str = LOCALHOST,
    cluster: str = PULL_CLUSTER,
    path: str = PULL_PATH,
    authority: str = PULL_AUTHORITY,
    interval: str = "1s",
    timeout: str = "2s",
    headers: Mapping[str, str] | None = None,
    vm_id: str = WASM_VM_ID,
    runtime: str = "envoy.wasm.runtime.v8",
) -> dict:
    """The key-set pull service, as envoy_config() keyword arguments.

    Returns {"bootstrap_extensions": [...], "extra_clusters": [...]}: keymeter with role
    service as an `envoy.bootstrap.wasm` singleton (one per Envoy process, on the main
    thread) in the filters' VM (same vm_id and code, hence the same shared data), and a
    STATIC cluster `cluster` pointing at the key-set source. Use as
    `start_envoy(**pull_service(source.port, wasm_path))`.
    """
    source = {"cluster": cluster, "path": path, "authority": authority, "interval": interval, "timeout": timeout}
    if headers:
        source["headers"] = dict(headers)
    service = _singleton("keymeter_pull", {"role": "service", "source": source}, wasm_path, vm_id, runtime)
    return {"bootstrap_extensions": [service], "extra_clusters": [_static_cluster(cluster, source_port, source_host)]}


EXPORT_CLUSTER = "usage_collector"
EXPORT_AUTHORITY = "collector.internal"
EXPORT_PATH = "/api/v1/events"


def export_service(
    collector_port: int,
    wasm_path: str | os.PathLike = DEFAULT_WASM,
    *,
    collector_host: str = LOCALHOST,
    cluster: str = EXPORT_CLUSTER,
    path: str = EXPORT_PATH,
    authority: str = EXPORT_AUTHORITY,
    interval: str = "1s",
    timeout: str = "2s",
    max_events: int | None = None,
    headers: Mapping[str, str] | None = None,
    source_port: int | None = None,
    vm_id: str = WASM_VM_ID,
    runtime: str = "envoy.wasm.runtime.v8",
) -> dict:
    """The usage export service (CloudEvents to a collector), as envoy_config() kwargs.

    Like pull_service(): keymeter with role service as an `envoy.bootstrap.wasm`
    singleton, plus a STATIC cluster `cluster` pointing at the collector. With
    `source_port` the same singleton also runs the key-set pull (pull_service()'s
    defaults, interval 1s): `start_envoy(**export_service(col.port, wasm, source_port=p))`.
    """
    export: dict[str, Any] = {
        "cluster": cluster, "path": path, "authority": authority, "interval": interval, "timeout": timeout,
    }  # fmt: skip
    if max_events is not None:
        export["max_events"] = max_events
    if headers:
        export["headers"] = dict(headers)
    clusters = [_static_cluster(cluster, collector_port, collector_host)]
    conf: dict[str, Any] = {"role": "service", "export": export}
    if source_port is not None:
        pulled = pull_service(source_port, wasm_path, vm_id=vm_id, runtime=runtime)
        conf["source"] = json.loads(
            pulled["bootstrap_extensions"][0]["typed_config"]["config"]["configuration"]["value"]
        )["source"]
        clusters += pulled["extra_clusters"]
    service = _singleton("keymeter_service", conf, wasm_path, vm_id, runtime)
    return {"bootstrap_extensions": [service], "extra_clusters": clusters}


def _singleton(name: str, conf: dict, wasm_path: str | os.PathLike, vm_id: str, runtime: str) -> dict:
    """keymeter with configuration `conf` as an `envoy.bootstrap.wasm` singleton."""
    return {
        "name": "envoy.bootstrap.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
            "singleton": True,
            "config": {
                "name": name,
                "root_id": "keymeter",
                "vm_config": _vm_config(wasm_path, vm_id, runtime),
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(conf),
                },
            },
        },
    }


def _static_cluster(name: str, port: int, host: str = LOCALHOST) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(port, host)}}]}],
        },
    }


ROUTER_FILTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}

WASM_DISABLED = {
    WASM_FILTER_NAME: {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }
}

# --------------------------------------------------------------------------- jwt_authn

JWT_AUTHN_FILTER_NAME = "envoy.filters.http.jwt_authn"
JWT_PROVIDER = "idp"
# The provider's payload_in_metadata key; keymeter's `jwt.payload_key` must match.
JWT_PAYLOAD_KEY = "jwt_payload"
JWT_ISSUER = "https://idp.keymeter.test"
JWT_AUDIENCE = "keymeter-api"
# Per-route requirements (jwt_authn's requirement_map): a route names one of these in its
# typed_per_filter_config (jwt_route_config()); a route naming none verifies no token,
# so keymeter takes API keys only there.
JWT_REQUIREMENTS = {
    # A verified JWT is required (jwt_authn answers 401 without one).
    "jwt": {"provider_name": JWT_PROVIDER},
    # A JWT if one is sent (verified, else 401 from jwt_authn); none: keymeter decides
    # on the API key as usual.
    "either": {"requires_any": {"requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing": {}}]}},
}


def jwt_authn_filter(
    *,
    jwks: str | Mapping[str, Any] | None = None,
    jwks_file: str | os.PathLike | None = None,
    issuer: str = JWT_ISSUER,
    audiences: Iterable[str] = (JWT_AUDIENCE,),
    payload_key: str = JWT_PAYLOAD_KEY,
    forward: bool = False,
) -> dict:
    """Envoy's jwt_authn filter, to run before keymeter (envoy_config(jwt_authn=...)).

    It verifies signature, issuer, audience and expiry against a local JWKS (`jwks`
    inline, or `jwks_file`, read by Envoy at start-up; in production this is a
    `remote_jwks` with caching) and writes the verified payload to dynamic metadata
    under `payload_key` (`payload_in_metadata`), where keymeter reads the claims.
    `forward=False` removes the token from the request once verified. Requirements are
    per route only (no `rules`): see JWT_REQUIREMENTS and jwt_route_config().
    """
    if (jwks is None) == (jwks_file is None):
        raise ValueError("pass exactly one of jwks and jwks_file")
    if jwks is not None:
        local = {"inline_string": jwks if isinstance(jwks, str) else json.dumps(jwks)}
    else:
        local = {"filename": str(jwks_file)}
    return {
        "name": JWT_AUTHN_FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                JWT_PROVIDER: {
                    "issuer": issuer,
                    "audiences": list(audiences),
                    "local_jwks": local,
                    "payload_in_metadata": payload_key,
                    "forward": forward,
                }
            },
            "requirement_map": copy.deepcopy(JWT_REQUIREMENTS),
        },
    }


def jwt_route_config(requirement: str | None) -> dict:
    """typed_per_filter_config entry selecting a JWT requirement for a route
    (`"jwt"`, `"either"`), or, with None, turning jwt_authn off there (API keys only)."""
    per_route: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig"
    }
    if requirement is None:
        per_route["disabled"] = True
    else:
        if requirement not in JWT_REQUIREMENTS:
            raise ValueError(f"unknown JWT requirement {requirement!r}")
        per_route["requirement_name"] = requirement
    return {JWT_AUTHN_FILTER_NAME: per_route}


def jwt_filter_conf(**overrides: Any) -> dict:
    """keymeter's `jwt` plugin configuration matching jwt_authn_filter()'s defaults."""
    return {"payload_key": JWT_PAYLOAD_KEY, **overrides}


def _http_listener(
    name: str,
    port: int,
    stat_prefix: str,
    http_filters: list,
    routes: list,
    extra: Mapping[str, Any] | None = None,
    normalize_path: bool = True,
) -> dict:
    listener = {
        "name": name,
        "address": _socket_address(port),
        # Envoy sets SO_REUSEPORT by default, so a second Envoy (another test process)
        # could bind the same port silently; without it the bind fails and
        # start_envoy retries with fresh ports.
        "enable_reuse_port": False,
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": stat_prefix,
                            "codec_type": "AUTO",
                            # The client address (source.address: CIDR allow-lists, the
                            # anonymous per-IP subject) is the TCP peer, never what a
                            # client writes into X-Forwarded-For. Behind a load balancer
                            # set xff_num_trusted_hops to the number of trusted proxies
                            # instead (README "Client address").
                            "use_remote_address": True,
                            # Paths are normalized before the filter sees them, so a key's
                            # path rules cannot be dodged with "/a/../b", "//b" or "%2F".
                            "normalize_path": True,
                            "merge_slashes": True,
                            "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
                            "route_config": {
                                "name": f"{name}_routes",
                                "virtual_hosts": [
                                    {"name": name, "domains": ["*"], "routes": routes}
                                ],
                            },
                            "http_filters": http_filters,
                        },
                    }
                ]
            }
        ],
    }
    if not normalize_path:
        # Envoy's defaults: the path reaches the filters (and the backend) as sent.
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for k in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"):
            del hcm[k]
    if extra:
        listener.update(extra)
    return listener


def default_admin_conf(token: str = TEST_ADMIN_TOKEN) -> dict:
    return {"role": "admin", "admin_token_sha256": sha256hex(token)}


# keymeter encodes metric labels in the stat name (`keymeter_requests_total.consumer.acme.
# plan.pro...`); these extractors turn them into tags, i.e. Prometheus labels. Label
# values never contain dots (the key-set validation guarantees it), but they can be
# any allowed name, including a label name (a consumer called "plan"). So every
# extractor is positional: anchored at the metric name, it walks the fixed label order
# (consumer, plan, key_id, credential, then outcome | status_class; or plan, outcome; or
# reason) segment by segment, and a value can never be taken for a label name.
_KM = r"^wasmcustom\.keymeter_[a-z_]+"
_V = r"[^.]+"
_PER_KEY = rf"\.consumer\.{_V}\.plan\.{_V}\.key_id\.{_V}\.credential\.{_V}"
KEYMETER_LABELS = ("consumer", "plan", "key_id", "credential", "outcome", "status_class", "reason")
KEYMETER_STATS_CONFIG = {
    "stats_tags": [
        {"tag_name": "consumer", "regex": rf"{_KM}(\.consumer\.({_V}))"},
        {"tag_name": "plan", "regex": rf"{_KM}(?:\.consumer\.{_V})?(\.plan\.({_V}))"},
        {"tag_name": "key_id", "regex": rf"{_KM}\.consumer\.{_V}\.plan\.{_V}(\.key_id\.({_V}))"},
        {"tag_name": "credential", "regex": rf"{_KM}\.consumer\.{_V}\.plan\.{_V}\.key_id\.{_V}(\.credential\.({_V}))"},
        {"tag_name": "outcome", "regex": rf"{_KM}(?:{_PER_KEY}|\.plan\.{_V})(\.outcome\.({_V}))$"},
        {"tag_name": "status_class", "regex": rf"{_KM}{_PER_KEY}(\.status_class\.({_V}))$"},
        {"tag_name": "reason", "regex": rf"{_KM}(\.reason\.({_V}))$"},
    ]
}


def envoy_config(
    *,
    backend_port: int,
    public_port: int,
    envoy_admin_port: int,
    admin_api_port: int | None = None,
    wasm_path: str | os.PathLike = DEFAULT_WASM,
    filter_conf: Mapping[str, Any] | None = None,
    admin_conf: Mapping[str, Any] | None = None,
    wasm: bool = True,
    admin_listener: bool = True,
    extra_routes: Iterable[dict] = (),
    extra_listeners: Iterable[dict] = (),
    extra_clusters: Iterable[dict] = (),
    bootstrap_extensions: Iterable[dict] | None = None,
    stats_config: Mapping[str, Any] | None = None,
    vm_id: str = WASM_VM_ID,
    lds_dir: str | os.PathLike | None = None,
    normalize_path: bool = True,
    jwt_authn: Mapping[str, Any] | None = None,
    jwt_default_requirement: str | None = "either",
) -> dict:
    """The Envoy bootstrap (as a dict, to be written as JSON).

    - `normalize_path=False` leaves the public listener with Envoy's default path
      handling (no normalize_path, merge_slashes or escaped-slash action), to check that
      keymeter's own path rules hold without them.

    - `wasm=False` leaves the keymeter filter out of both listeners (harness self-tests,
      or checking Envoy behaviour without the filter).
    - `admin_listener=False` (or no `admin_api_port`) omits the keymeter admin listener.
    - `extra_routes` go on the public listener before the default `/public/` and `/`
      routes, so they win.
    - `lds_dir`: the public listener is delivered by file-based LDS instead of being
      static: it is written (now) to `<lds_dir>/lds.json`, which Envoy watches, so
      `update_public_listener()` can change the plugin configuration of a running Envoy
      (a new plugin root context; the old one is torn down when its filter chain has
      drained). Its HCM gets a short `drain_timeout`; start Envoy with
      `extra_args=LDS_ENVOY_ARGS` for a short server drain time. The keymeter admin
      listener stays static.
    """
    if filter_conf is None:
        filter_conf = {"role": "filter"}
    if admin_conf is None:
        admin_conf = default_admin_conf()

    def filters(conf: Mapping[str, Any], public: bool = False) -> list:
        chain = [wasm_filter(conf, wasm_path, vm_id=vm_id)] if wasm else []
        if public and jwt_authn is not None:
            chain.insert(0, copy.deepcopy(dict(jwt_authn)))
        return chain + [copy.deepcopy(ROUTER_FILTER)]

    default_route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
    if jwt_authn is not None and jwt_default_requirement is not None:
        default_route["typed_per_filter_config"] = jwt_route_config(jwt_default_requirement)

    public_routes = list(copy.deepcopy(list(extra_routes))) + [
        {
            # Unauthenticated area: the filter is off, and identity headers a client
            # sends are dropped so the backend can trust them everywhere.
            "match": {"prefix": "/public/"},
            "route": {"cluster": "backend"},
            "typed_per_filter_config": copy.deepcopy(WASM_DISABLED),
            "request_headers_to_remove": list(IDENTITY_HEADERS),
        },
        default_route,
    ]

    listeners = [
        _http_listener(
            "public",
            public_port,
            "public",
            filters(filter_conf, public=True),
            public_routes,
            normalize_path=normalize_path,
        )
    ]
    if admin_listener and admin_api_port is not None:
        listeners.append(
            _http_listener(
                "keymeter_admin",
                admin_api_port,
                "keymeter_admin",
                filters(admin_conf),
                # The filter answers admin API calls itself; anything it lets through
                # has no backend behind it.
                [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}],
                # Key-set uploads are buffered whole by the filter.
                extra={"per_connection_buffer_limit_bytes": ADMIN_LISTENER_BUFFER_LIMIT},
            )
        )
    listeners.extend(copy.deepcopy(list(extra_listeners)))

    clusters = [
        {
            "name": "backend",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "backend",
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _socket_address(backend_port)}}]}
                ],
            },
        }
    ]
    clusters.extend(copy.deepcopy(list(extra_clusters)))

    bootstrap: dict[str, Any] = {
        "admin": {"address": _socket_address(envoy_admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if lds_dir is not None:
        public = listeners.pop(0)
        hcm = public["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["drain_timeout"] = LDS_HCM_DRAIN_TIMEOUT
        lds_file = write_lds(lds_dir, [public])
        bootstrap["node"] = {"id": "keymeter-test", "cluster": "keymeter-test"}
        bootstrap["dynamic_resources"] = {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(lds_file),
                    "watched_directory": {"path": str(lds_file.parent)},
                },
            }
        }
    if bootstrap_extensions:
        bootstrap["bootstrap_extensions"] = copy.deepcopy(list(bootstrap_extensions))
    bootstrap["stats_config"] = copy.deepcopy(dict(stats_config or KEYMETER_STATS_CONFIG))
    return bootstrap


def routes(config: Mapping[str, Any], listener: str = "public") -> list:
    """The (mutable) route list of `listener` in a bootstrap from envoy_config()."""
    for lst in config["static_resources"]["listeners"]:
        if lst["name"] == listener:
            hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
            return hcm["route_config"]["virtual_hosts"][0]["routes"]
    raise KeyError(listener)


def listener_port(config: Mapping[str, Any], name: str) -> int | None:
    for listener in config.get("static_resources", {}).get("listeners", []):
        if listener.get("name") == name:
            return int(listener["address"]["socket_address"]["port_value"])
    # Not static: maybe delivered by file-based LDS (envoy_config(lds_dir=...)).
    for listener in lds_listeners(config):
        if listener.get("name") == name:
            return int(listener["address"]["socket_address"]["port_value"])
    return None


# --------------------------------------------------------------------------- file-based LDS

LDS_FILE = "lds.json"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
LDS_HCM_DRAIN_TIMEOUT = "0.5s"
# Envoy arguments for LDS tests: a replaced filter chain (and with it the old plugin
# root context) is gone about a second after an update instead of the default 600s.
LDS_ENVOY_ARGS = ("--drain-time-s", "1", "--drain-strategy", "immediate")


def write_lds(lds_dir: str | os.PathLike, listeners: Iterable[Mapping[str, Any]], version: int = 1) -> Path:
    """Atomically (temp file + rename) writes `<lds_dir>/lds.json`; returns its path.

    Envoy watches the directory for renames, so an update is picked up whole.
    """
    lds_dir = Path(lds_dir).resolve()
    lds_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "version_info": str(version),
        "resources": [{"@type": LISTENER_TYPE, **copy.deepcopy(dict(l))} for l in listeners],
    }
    path = lds_dir / LDS_FILE
    fd, tmp = tempfile.mkstemp(prefix=".lds-", suffix=".tmp", dir=lds_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.rename(tmp, path)
    return path


def lds_path(config: Mapping[str, Any]) -> Path | None:
    """The LDS file of a bootstrap from envoy_config(lds_dir=...), else None."""
    source = config.get("dynamic_resources", {}).get("lds_config", {}).get("path_config_source")
    return Path(source["path"]) if source else None


def read_lds(config: Mapping[str, Any]) -> tuple[int, list[dict]]:
    """(version, listeners) currently in the LDS file; (0, []) without LDS."""
    path = lds_path(config)
    if path is None or not path.exists():
        return 0, []
    doc = json.loads(path.read_text())
    listeners = [{k: v for k, v in r.items() if k != "@type"} for r in doc.get("resources", [])]
    return int(doc.get("version_info") or 0), listeners


def lds_listeners(config: Mapping[str, Any]) -> list[dict]:
    return read_lds(config)[1]


def filter_conf_of(listener: Mapping[str, Any]) -> dict | None:
    """The keymeter plugin configuration (parsed) in a listener's HCM, or None."""
    for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        if f["name"] == WASM_FILTER_NAME:
            return json.loads(f["typed_config"]["config"]["configuration"]["value"])
    return None


def update_public_listener(
    envoy: "Envoy",
    filter_conf: Mapping[str, Any],
    *,
    listener: str = "public",
    timeout: float = 10.0,
) -> int:
    """Rewrites `listener` in the LDS file with `filter_conf` as keymeter's plugin
    configuration and waits until Envoy accepted it (`listener_manager.lds.update_success`
    went up); EnvoyError if Envoy rejected it. Returns the new LDS version.

    Envoy builds a new filter config for the listener, hence a new plugin root context
    in each worker's VM; the old filter chain drains (see wait_listeners_drained) and
    its root contexts get on_done. Requests arriving right after this returns may still
    land on the old filter chain until the workers have switched; check for behaviour of
    the new configuration if that matters.
    """
    if lds_path(envoy.config) is None:
        raise ValueError("this Envoy has no file-based LDS (envoy_config(lds_dir=...))")
    version, listeners = read_lds(envoy.config)
    for lst in listeners:
        if lst["name"] == listener:
            hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
            wasm = [f for f in hcm["http_filters"] if f["name"] == WASM_FILTER_NAME]
            if not wasm:
                raise ValueError(f"listener {listener!r} has no keymeter filter")
            wasm[0]["typed_config"]["config"]["configuration"]["value"] = json.dumps(filter_conf)
            break
    else:
        raise KeyError(listener)
    success = envoy.stat("listener_manager.lds.update_success")
    rejected = envoy.stat("listener_manager.lds.update_rejected")
    write_lds(lds_path(envoy.config).parent, listeners, version + 1)

    def done():
        if envoy.stat("listener_manager.lds.update_rejected") > rejected:
            raise EnvoyError(f"Envoy rejected LDS version {version + 1}\n{envoy.log_tail()}")
        return envoy.stat("listener_manager.lds.update_success") > success

    wait_until(done, timeout=timeout, message=f"Envoy did not take LDS version {version + 1}\n{envoy.log_tail()}")
    return version + 1


def wait_listeners_drained(envoy: "Envoy", timeout: float = 15.0) -> None:
    """Waits until no listener or filter chain is draining (after an LDS update: the old
    filter chain, and with it the old plugin configuration, is gone from all workers)."""

    def drained():
        s = envoy.stats(filter=r"^listener_manager\.total_(listeners|filter_chains)_draining$")
        return all(v == 0 for v in s.values())

    wait_until(drained, timeout=timeout, interval=0.1, message=f"listeners still draining\n{envoy.log_tail()}")


# --------------------------------------------------------------------------- http client


class Headers:
    """Case-insensitive, multi-valued response headers (order preserved)."""

    def __init__(self, items: Iterable[tuple[str, str]]):
        self._items = [(k, v) for k, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of `name`, or `default`."""
        lname = name.lower()
        for k, v in self._items:
            if k.lower() == lname:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self._items if k.lower() == lname]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Response:
    def __init__(self, status: int, reason: str, headers: Headers, body: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


HeadersArg = Mapping[str, str] | Iterable[tuple[str, str]] | None


def http(
    method: str,
    url: str,
    headers: HeadersArg = None,
    body: bytes | str | dict | list | None = None,
    timeout: float = 10,
    source_address: tuple[str, int] | None = None,
) -> Response:
    """One request on a fresh connection.

    `source_address` binds the client side (e.g. ("127.0.0.2", 0)) to test per-IP logic.

    `headers` may be a dict or a list of (name, value) pairs (to send a header twice).
    A dict/list `body` is sent as JSON. The path is sent exactly as given (no
    normalization), so tests can probe Envoy's own normalization.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported: {url}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query

    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
    names = {k.lower() for k, _ in pairs}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        if "content-type" not in names:
            pairs.append(("Content-Type", "application/json"))
    elif isinstance(body, str):
        body = body.encode()
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        pairs.append(("Content-Length", str(len(body))))
    elif (
        body is None
        and method.upper() in ("POST", "PUT", "PATCH")
        and "content-length" not in names
    ):
        pairs.append(("Content-Length", "0"))

    conn = httpclient.HTTPConnection(
        parts.hostname, parts.port or 80, timeout=timeout, source_address=source_address
    )
    try:
        conn.putrequest(method, target, skip_host="host" in names, skip_accept_encoding=True)
        for k, v in pairs:
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, Headers(resp.getheaders()), data)
    finally:
        conn.close()


# --------------------------------------------------------------------------- envoy process


class EnvoyError(RuntimeError):
    """Envoy exited or never became ready; the message carries the log tail."""


_live: set[Envoy] = set()
_live_lock = threading.Lock()


def live_envoys() -> list[Envoy]:
    with _live_lock:
        return list(_live)


def stop_all() -> None:
    """Stop every Envoy this process started that is still running."""
    for envoy in live_envoys():
        try:
            envoy.stop()
        except Exception:
            pass


atexit.register(stop_all)


def install_signal_handlers() -> None:
    """Stop all Envoys on SIGTERM/SIGHUP too (atexit does not run on a fatal signal).

    The handler then re-raises the signal with its default action, so the exit status is
    unchanged. Handlers someone else installed are left alone. SIGINT needs nothing:
    it raises KeyboardInterrupt, which unwinds through finalizers and atexit.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        stop_all()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, handler)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05, message: str = ""):
    """Poll `predicate` until it returns a truthy value (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


class Envoy:
    """One Envoy process running `config` (a bootstrap dict).

    Started in its own session (process group) so stop() can signal the whole group and
    a Ctrl-C aimed at the test runner's terminal is not delivered to Envoy first.
    `--use-dynamic-base-id` keeps parallel Envoys' hot-restart shared memory apart.
    """

    def __init__(
        self,
        config: dict,
        *,
        envoy_bin: str | os.PathLike | None = None,
        concurrency: int = 2,
        workdir: str | os.PathLike | None = None,
        cwd: str | os.PathLike = REPO_ROOT,
        log_level: str = "warn",
        component_log_level: str | None = "wasm:info",
        extra_args: Iterable[str] = (),
        ready_timeout: float = 20.0,
        start: bool = True,
    ):
        self.config = config
        self.envoy_bin = str(envoy_bin or os.environ.get("ENVOY_BIN") or DEFAULT_ENVOY)
        self.concurrency = concurrency
        self.workdir = (
            Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="keymeter-envoy-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cwd = Path(cwd)
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log_file = None
        self._log_offset = 0
        if start:
            self.start()

    # ---------------------------------------------------------------- addresses

    @property
    def envoy_admin_port(self) -> int:
        return int(self.config["admin"]["address"]["socket_address"]["port_value"])

    @property
    def public_port(self) -> int | None:
        return listener_port(self.config, "public")

    @property
    def admin_api_port(self) -> int | None:
        return listener_port(self.config, "keymeter_admin")

    def url(self, path: str = "/") -> str:
        """URL on the public (API) listener."""
        return f"http://{LOCALHOST}:{self.public_port}{path}"

    def admin_api_url(self, path: str = "/") -> str:
        """URL on the keymeter admin API listener."""
        return f"http://{LOCALHOST}:{self.admin_api_port}{path}"

    def envoy_admin_url(self, path: str = "/") -> str:
        return f"http://{LOCALHOST}:{self.envoy_admin_port}{path}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ---------------------------------------------------------------- lifecycle

    def command(self) -> list[str]:
        cmd = [
            self.envoy_bin,
            "-c", str(self.config_path),
            "--concurrency", str(self.concurrency),
            "--use-dynamic-base-id",
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        return cmd + self.extra_args

    def start(self) -> Envoy:
        if self.is_running():
            raise EnvoyError("already running")
        if not os.access(self.envoy_bin, os.X_OK):
            raise EnvoyError(
                f"envoy binary not found or not executable: {self.envoy_bin} (run `make tools`)"
            )
        # Rewritten on every start so that restart() picks up edits to self.config.
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")
        # One log file across restarts; remember where this run begins for log_text().
        self._log_file = open(self.log_path, "ab")
        self._log_offset = self._log_file.tell()
        self.returncode = None
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            start_new_session=True,
        )
        with _live_lock:
            _live.add(self)
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise EnvoyError(
                    f"envoy exited with status {self.proc.returncode} before it was ready\n"
                    f"{self.log_tail()}"
                )
            try:
                if http("GET", self.envoy_admin_url("/ready"), timeout=1).status == 200:
                    return
            except OSError:
                pass  # admin listener not up yet
            if time.monotonic() >= deadline:
                raise EnvoyError(f"envoy not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after `timeout`; returns the exit status."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait()
            # Anything else left in the group (Envoy forks nothing today) goes too.
            self._signal_group(proc, signal.SIGKILL)
            self.returncode = proc.returncode
            self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _live_lock:
            _live.discard(self)
        return self.returncode

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self, config: dict | None = None) -> Envoy:
        """Full stop and start (not a hot restart): the VM and its state are fresh.

        Pass `config` to restart with a different bootstrap (e.g. a new filter_conf).
        """
        self.stop()
        if config is not None:
            self.config = config
        return self.start()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Envoy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Envoy pid={self.pid} public={self.public_port} admin={self.envoy_admin_port}>"

    # ---------------------------------------------------------------- logs and stats

    def log_text(self, current_run: bool = False) -> str:
        """The Envoy log: all runs, or only since the latest start()."""
        if self._log_file is not None:
            self._log_file.flush()
        try:
            with open(self.log_path, "rb") as f:
                if current_run:
                    f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text(current_run=True).splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(tail)} lines) ---\n" + "\n".join(tail)

    def admin(self, path: str, method: str = "GET") -> Response:
        return http(method, self.envoy_admin_url(path))

    def stats(self, filter: str | None = None) -> dict[str, Any]:
        """Counters and gauges as {name: value}; `filter` is Envoy's regex filter."""
        path = "/stats?format=json"
        if filter:
            path += "&filter=" + urllib.parse.quote(filter)
        resp = self.admin(path)
        if resp.status != 200:
            raise EnvoyError(f"/stats returned {resp.status}: {resp.text[:500]}")
        out: dict[str, Any] = {}
        for entry in resp.json().get("stats", []):
            if "name" in entry:  # histograms come as one {"histograms": ...} entry; skipped
                out[entry["name"]] = entry.get("value")
        return out

    def stat(self, name: str, default: Any = 0) -> Any:
        # re.escape output is also valid RE2, which is what Envoy filters with.
        return self.stats(filter="^" + re.escape(name) + "$").get(name, default)

    def prometheus(self) -> str:
        resp = self.admin("/stats/prometheus")
        if resp.status != 200:
            raise EnvoyError(f"/stats/prometheus returned {resp.status}")
        return resp.text
