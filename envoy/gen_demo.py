#!/usr/bin/env python3
"""Generate envoy/demo.json (the `make run` bootstrap) from the test harness.

The demo and the tests share harness.envoy_config() so they cannot drift apart; the
output is committed so that running the demo needs neither pytest nor this script.

    python3 envoy/gen_demo.py           rewrite envoy/demo.json
    python3 envoy/gen_demo.py --check   exit 1 if envoy/demo.json is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "wasm-tests"))

import harness  # noqa: E402 - importable only after the sys.path line above

OUTPUT = HERE / "demo.json"

# Must match scripts/run-demo.sh.
API_PORT = 10000
ENVOY_ADMIN_PORT = 9901
KEYMETER_ADMIN_PORT = 9902
BACKEND_PORT = 10080
DEMO_ADMIN_TOKEN = "demo-admin-token"
# Relative: run-demo.sh starts Envoy from the repo root.
WASM_PATH = "target/wasm32-wasip1/release/keymeter.wasm"
# Written by scripts/demo-jwt.py at start-up (a fresh signing key per demo run).
JWKS_PATH = ".tools/demo/jwks.json"


def build() -> dict:
    healthz = {
        # Liveness for load balancers: answered by Envoy, no key, no metering.
        "match": {"path": "/healthz"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        "typed_per_filter_config": harness.WASM_DISABLED,
    }
    # JWT recipe: jwt_authn before keymeter, and one requirement per route.
    app = {
        # Web-app endpoints: a verified JWT is required (jwt_authn answers 401 without).
        "match": {"prefix": "/app/"},
        "route": {"cluster": "backend"},
        "typed_per_filter_config": harness.jwt_route_config("jwt"),
    }
    partner = {
        # Integrations only: jwt_authn is off, so only API keys get in.
        "match": {"prefix": "/partner/"},
        "route": {"cluster": "backend"},
        "typed_per_filter_config": harness.jwt_route_config(None),
    }
    return harness.envoy_config(
        backend_port=BACKEND_PORT,
        public_port=API_PORT,
        envoy_admin_port=ENVOY_ADMIN_PORT,
        admin_api_port=KEYMETER_ADMIN_PORT,
        wasm_path=WASM_PATH,
        filter_conf={
            "role": "filter",
            "jwt": harness.jwt_filter_conf(plan_claim="plan", default_plan="free"),
        },
        admin_conf=harness.default_admin_conf(DEMO_ADMIN_TOKEN),
        extra_routes=[healthz, app, partner],
        # Everything else (`/`) takes either credential.
        jwt_authn=harness.jwt_authn_filter(jwks_file=JWKS_PATH),
        jwt_default_requirement="either",
    )


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the file is current")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run `make demo-config`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
