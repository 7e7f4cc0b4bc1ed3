# idemgate: build the proxy-wasm filter, an offline Envoy image, and run the tests.
#
#   make deps         rustup wasm targets + Python venv (pytest, requests, h2, PyYAML) in $(IDEMGATE_CACHE)/venv
#   make build        dist/idemgate.wasm (release, wasm32-wasip1)
#   make image        Envoy image $(ENVOY_IMAGE) (built offline unless ENVOY_IMAGE is not idemgate/*)
#   make docker-up    make sure a Docker engine answers (starts dockerd if needed, PID file in the cache)
#   make docker-down  stop the dockerd that docker-up started (never one started by someone else)
#   make run          demo in the foreground: origin :8080/:8081, Envoy :10000, admin :9901
#                     (PROFILE=stripe etc.: envoy.yaml with that profile of envoy/profiles/)
#   make check-config how an Envoy configuration loads idemgate (ENVOY_CONFIG=file...; default:
#                     the shipped ones): errors for setups that forward before deciding or fail open
#   make unit         cargo test --workspace
#   make integration  pytest tests/ against a real Envoy in Docker
#   make test         unit + integration, then stop the engine if this run started it
#   make edge         edge/dist/: the core for edge workers (wasm-bindgen + wasm-opt); see the edge section
#   make run-edge     the edge worker in workerd in front of the demo origin (run-edge-deno: on Deno)
#   make test-edge    node:test: the edge worker on workerd (Miniflare) and Deno (part of make test)
#   make test-wasm    the filter's SIMD SHA-256 = the sha2 crate on random inputs, on wasm32-wasip1 under
#                     node's V8 (part of make test, after the unit tests)
#   make run-fleet    fleet mode demo: 3 etcd members + 2 Envoys (--concurrency 2) + origin; see the fleet section
#   make lint         rustfmt check + clippy (host and wasm32-wasip1)
#   make sizes        sizes of the filter and edge wasm, and where their bytes go (scripts/sizes.sh)
#   make oci          the module image $(OCI_IMAGE): FROM scratch, /plugin.wasm (deploy/oci/)
#   make dist         release artifacts in dist/: versioned .wasm + sha256, image tarball, edge bundle
#   make fuzz         every cargo-fuzz target of fuzz/ for FUZZ_SECONDS each (not part of make test;
#                     make test replays fuzz/corpus/ as a regression test)
#   make clean        cargo clean + dist/
#
# Variables (make VAR=... or environment): IDEMGATE_CACHE, ENVOY_VERSION, ENVOY_IMAGE,
# PYTEST_ARGS (default -q), PYTEST_PATHS (default tests/), PYTHON, FILTER_OPT_LEVEL (build).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build
MAKEFLAGS += --no-print-directory

HOME ?= /root
IDEMGATE_CACHE ?= $(HOME)/.cache/idemgate
ENVOY_VERSION ?= 1.40.0
ENVOY_IMAGE ?= idemgate/envoy:$(ENVOY_VERSION)
PYTHON ?= python3
VENV := $(IDEMGATE_CACHE)/venv
PYTEST_ARGS ?= -q
PYTEST_PATHS ?= tests/
WASM_TARGET := wasm32-wasip1
WASM_OUT := target/$(WASM_TARGET)/release/idemgate_filter.wasm
PY_DEPS := pytest>=8,<10 requests>=2.31,<3 jsonschema>=4.18,<5 h2>=4.1,<5 pyyaml>=6,<7 cel-python>=0.5,<0.6 python-jsonpath>=2,<3

export IDEMGATE_CACHE ENVOY_VERSION ENVOY_IMAGE PYTHON

UNIT_CMD := cargo test --workspace
PYTEST_CMD = $(VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(PYTEST_PATHS)

.PHONY: deps deps-rust deps-py deps-sys build image docker-up docker-down run unit integration \
        integration-setup test lint clean

deps: deps-rust deps-py deps-sys

# Debian packages the tests use (wrk drives the key-churn and circuit-breaker tests; curl
# sends the README's HTTP/2 request, --http2-prior-knowledge).
SYS_TOOLS := wrk curl
deps-sys:
	@missing=""; for t in $(SYS_TOOLS); do command -v "$$t" >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "[deps] apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

deps-rust:
	@installed="$$(rustup target list --installed)"; \
	for t in wasm32-wasip1 wasm32-unknown-unknown; do \
	  grep -qx "$$t" <<<"$$installed" || { echo "[deps] rustup target add $$t"; rustup target add "$$t"; }; \
	done; \
	comps="$$(rustup component list --installed)"; \
	for c in clippy rustfmt; do \
	  grep -q "^$$c" <<<"$$comps" || { echo "[deps] rustup component add $$c"; rustup component add "$$c"; }; \
	done

deps-py:
	@if ! "$(VENV)/bin/python" -c 'import sys' >/dev/null 2>&1; then \
	  echo "[deps] creating Python venv in $(VENV)"; \
	  rm -rf "$(VENV)"; mkdir -p "$(IDEMGATE_CACHE)"; \
	  "$(PYTHON)" -m venv "$(VENV)"; \
	fi; \
	if ! "$(VENV)/bin/python" -c 'import pytest, requests, jsonschema, h2, yaml, celpy, jsonpath' >/dev/null 2>&1; then \
	  echo "[deps] installing $(PY_DEPS) into the venv"; \
	  "$(VENV)/bin/python" -m pip install --quiet --disable-pip-version-check $(foreach d,$(PY_DEPS),'$(d)'); \
	fi

# dist/idemgate.wasm = cargo's module shrunk by wasm-opt -Oz (binaryen from npm, the version
# edge/package.json pins, installed once into $(IDEMGATE_CACHE)/binaryen-<version>). The
# features are the ones rustc enables by default for wasm32-wasip1 (Envoy's V8 runs them all).
# wasm-opt runs again only when cargo's output changed (stamp dist/.idemgate.wasm.from).
BINARYEN_VERSION = $(shell sed -n 's/.*"binaryen": *"\([^"]*\)".*/\1/p' edge/package.json)
WASM_OPT = $(IDEMGATE_CACHE)/binaryen-$(BINARYEN_VERSION)/node_modules/.bin/wasm-opt
FILTER_WASM_OPT_FLAGS := -Oz --strip-debug --strip-producers --enable-bulk-memory --enable-simd \
  --enable-bulk-memory-opt --enable-call-indirect-overlong --enable-extended-const \
  --enable-multivalue --enable-mutable-globals --enable-nontrapping-float-to-int \
  --enable-reference-types --enable-sign-ext

.PHONY: wasm-opt-deps
wasm-opt-deps:
	@v="$(BINARYEN_VERSION)"; [[ -n "$$v" ]] || { echo "[build] no binaryen version in edge/package.json"; exit 1; }; \
	if ! "$(WASM_OPT)" --version >/dev/null 2>&1; then \
	  command -v npm >/dev/null || { echo "[build] npm not found (Node.js is needed for binaryen's wasm-opt)"; exit 1; }; \
	  echo "[build] npm install binaryen@$$v into $(IDEMGATE_CACHE)/binaryen-$$v (once)"; \
	  mkdir -p "$(IDEMGATE_CACHE)/binaryen-$$v"; \
	  npm install --prefix "$(IDEMGATE_CACHE)/binaryen-$$v" --no-save --no-audit --no-fund --loglevel=error "binaryen@$$v"; \
	fi

.PHONY: sizes
sizes: build
	@scripts/sizes.sh

.PHONY: print-wasm-opt print-wasm-opt-flags
print-wasm-opt:
	@echo "$(WASM_OPT)"
print-wasm-opt-flags:
	@echo "$(FILTER_WASM_OPT_FLAGS)"

# FILTER_OPT_LEVEL=z|s|1|2|3: the opt-level of the filter's crates (idemgate-core,
# idemgate-filter) instead of Cargo.toml's 3 (speed); "z" gives the smallest module (see
# BENCHMARKS.md for both).
FILTER_OPT_LEVEL ?=
FILTER_OPT_CONFIG := $(if $(FILTER_OPT_LEVEL),$(foreach c,idemgate-core idemgate-filter,--config 'profile.release.package.$(c).opt-level=$(if $(filter z s,$(FILTER_OPT_LEVEL)),"$(FILTER_OPT_LEVEL)",$(FILTER_OPT_LEVEL))'))

build: deps-rust wasm-opt-deps
	@echo "[build] cargo build --release --target $(WASM_TARGET) -p idemgate-filter $(FILTER_OPT_CONFIG)"
	@cargo build --release --target $(WASM_TARGET) -p idemgate-filter $(FILTER_OPT_CONFIG)
	@mkdir -p dist
	@stamp="dist/.idemgate.wasm.from"; want="$$(sha256sum $(WASM_OUT) | cut -c1-64) binaryen $(BINARYEN_VERSION)"; \
	if [[ -f "$$stamp" && "$$(cat "$$stamp")" == "$$want" && -f dist/idemgate.wasm ]]; then \
	  echo "[build] dist/idemgate.wasm is up to date: $$(stat -c %s dist/idemgate.wasm) bytes"; exit 0; \
	fi; \
	echo "[build] wasm-opt -Oz"; \
	"$(WASM_OPT)" $(FILTER_WASM_OPT_FLAGS) $(WASM_OUT) -o dist/idemgate.wasm.tmp; \
	mv dist/idemgate.wasm.tmp dist/idemgate.wasm; echo "$$want" > "$$stamp"; \
	echo "[build] dist/idemgate.wasm: $$(stat -c %s dist/idemgate.wasm) bytes ($$(stat -c %s $(WASM_OUT)) before wasm-opt)"

image: docker-up
	@envoy/build-image.sh

# The shipped configurations unless ENVOY_CONFIG names others (YAML or JSON bootstraps, or
# fragments with http_filters); exit status 1 on errors. See envoy/check-config.py.
SHIPPED_ENVOY_CONFIGS := envoy/envoy.yaml envoy/fleet/envoy.yaml
ENVOY_CONFIG ?=
.PHONY: check-config
check-config: deps-py
	@"$(VENV)/bin/python" envoy/check-config.py $(or $(ENVOY_CONFIG),$(SHIPPED_ENVOY_CONFIGS))

docker-up:
	@scripts/docker-engine.sh up

docker-down:
	@scripts/docker-engine.sh down

PROFILE ?=
run: build
	@PROFILE="$(PROFILE)" scripts/run-demo.sh

unit:
	@echo "[unit] $(UNIT_CMD)"
	@$(UNIT_CMD)

integration-setup: deps-py deps-sys fleet-setup deploy-deps build docker-up image dist

integration: integration-setup
	@echo "[integration] pytest $(PYTEST_PATHS) (Envoy image $(ENVOY_IMAGE))"
	@$(PYTEST_CMD)

# unit, then integration; the engine is stopped afterwards only if it was not
# answering before this run (i.e. this run started it), also when a step fails.
# The exit code is the failing step's own (cargo's, pytest's, or make's for setup).
test:
	@rc=0; started_here=0; \
	scripts/docker-engine.sh status >/dev/null 2>&1 || started_here=1; \
	down() { if [[ $$started_here == 1 ]]; then scripts/docker-engine.sh down || true; fi; }; \
	trap down EXIT; \
	$(MAKE) lint || rc=$$?; \
	if [[ $$rc == 0 ]]; then echo "[unit] $(UNIT_CMD)"; $(UNIT_CMD) || rc=$$?; fi; \
	if [[ $$rc == 0 ]]; then $(MAKE) test-wasm || rc=$$?; fi; \
	if [[ $$rc == 0 ]]; then \
	  start=$$(date +%s); \
	  $(MAKE) integration-setup || rc=$$?; \
	  echo "[integration] setup took $$(( $$(date +%s) - start ))s"; \
	fi; \
	if [[ $$rc == 0 ]]; then \
	  echo "[integration] pytest $(PYTEST_PATHS) (Envoy image $(ENVOY_IMAGE))"; \
	  $(PYTEST_CMD) || rc=$$?; \
	fi; \
	if [[ $$rc == 0 ]]; then $(MAKE) test-edge || rc=$$?; fi; \
	exit $$rc

# The filter's own SHA-256 (core/src/sha256.rs, SIMD) against the sha2 crate on random inputs,
# as the filter is built (wasm32-wasip1, simd128) and run (V8, TurboFan only): tests/wasm-sha256.
.PHONY: test-wasm
test-wasm: deps-rust
	@command -v node >/dev/null || { echo "[test-wasm] node not found (Node.js >= 20 runs the wasm)"; exit 1; }
	@cargo build --quiet --release --target $(WASM_TARGET) -p idemgate-wasm-sha256
	@echo "[test-wasm] node --no-liftoff scripts/wasi-run.mjs idemgate-wasm-sha256.wasm check 3000"
	@node --no-warnings --no-liftoff scripts/wasi-run.mjs target/$(WASM_TARGET)/release/idemgate-wasm-sha256.wasm check 3000

lint: deps-rust
	@echo "[lint] cargo fmt --check"
	@cargo fmt --all -- --check
	@echo "[lint] clippy (host)"
	@cargo clippy --workspace --all-targets -- -D warnings
	@echo "[lint] clippy ($(WASM_TARGET), idemgate-filter and the bench filters)"
	@cargo clippy -p idemgate-filter -p idemgate-bench-floor -p idemgate-bench-probe \
	  -p idemgate-bench-bare --target $(WASM_TARGET) -- -D warnings
	@echo "[lint] clippy (wasm32-unknown-unknown, idemgate-edge)"
	@cargo clippy -p idemgate-edge --target wasm32-unknown-unknown -- -D warnings

clean:
	cargo clean
	rm -rf dist/*.wasm dist/*.sha256 dist/*.tar dist/*.tgz dist/SHA256SUMS tests/__pycache__ edge/dist

# ------------------------------------------------------------------------------------- fuzz
# make fuzz   runs each target of fuzz/ (config, key_header, body, record, etcd, render) for
#             FUZZ_SECONDS (default 600), one after the other, with libFuzzer through cargo fuzz
#             (installed once into $(IDEMGATE_CACHE)/cargo-fuzz-<version>; the stable toolchain
#             with RUSTC_BOOTSTRAP=1 for the sanitizer flags). New inputs go to
#             target/fuzz-corpus/<target>; FUZZ_MERGE=1 merges them, minimized, into
#             fuzz/corpus/<target> (commit those: `make test` replays them). A crash leaves its
#             input in fuzz/artifacts/<target>/ and fails the run. Prints execs/s per target.
# Variables: FUZZ_SECONDS, FUZZ_TARGETS, FUZZ_MERGE, FUZZ_ARGS (extra libFuzzer flags).
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= config key_header body record etcd render
FUZZ_MERGE ?=
FUZZ_ARGS ?=
CARGO_FUZZ_VERSION := 0.13.2
CARGO_FUZZ := $(IDEMGATE_CACHE)/cargo-fuzz-$(CARGO_FUZZ_VERSION)/bin/cargo-fuzz
# The workspace's release profile is for the wasm (LTO, stripped, opt-level z): the
# sanitizer-coverage build links only without LTO, and runs faster at opt-level 3.
FUZZ_ENV := RUSTC_BOOTSTRAP=1 CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_STRIP=false \
  CARGO_PROFILE_RELEASE_OPT_LEVEL=3 CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16

.PHONY: fuzz fuzz-deps
fuzz-deps:
	@if ! "$(CARGO_FUZZ)" --version >/dev/null 2>&1; then \
	  echo "[fuzz] cargo install cargo-fuzz $(CARGO_FUZZ_VERSION) into $(IDEMGATE_CACHE)/cargo-fuzz-$(CARGO_FUZZ_VERSION) (once)"; \
	  cargo install cargo-fuzz --version "$(CARGO_FUZZ_VERSION)" --locked --root "$(IDEMGATE_CACHE)/cargo-fuzz-$(CARGO_FUZZ_VERSION)" --quiet; \
	fi

fuzz: fuzz-deps
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  echo "[fuzz] $$t for $(FUZZ_SECONDS)s (corpus target/fuzz-corpus/$$t + fuzz/corpus/$$t)"; \
	  log=target/fuzz-corpus/$$t.log; \
	  $(FUZZ_ENV) "$(CARGO_FUZZ)" run --fuzz-dir fuzz --features libfuzzer $$t \
	    target/fuzz-corpus/$$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	    -rss_limit_mb=2048 -print_final_stats=1 $(FUZZ_ARGS) > $$log 2>&1 \
	    || { tail -40 $$log; echo "[fuzz] $$t FAILED (input in fuzz/artifacts/$$t/)"; exit 1; }; \
	  runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$log); \
	  rate=$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$log); \
	  cov=$$(grep -o 'cov: [0-9]*' $$log | tail -1); \
	  echo "[fuzz] $$t: $$runs runs in $(FUZZ_SECONDS)s, $$rate execs/s, $$cov, no crash, no timeout"; \
	  if [[ -n "$(FUZZ_MERGE)" ]]; then \
	    $(FUZZ_ENV) "$(CARGO_FUZZ)" run --fuzz-dir fuzz --features libfuzzer $$t \
	      fuzz/corpus/$$t target/fuzz-corpus/$$t -- -merge=1 > $$log.merge 2>&1; \
	    echo "[fuzz] $$t: fuzz/corpus/$$t has $$(ls fuzz/corpus/$$t | wc -l) inputs"; \
	  fi; \
	done

# ------------------------------------------------------------------------------------ bench
# make bench       idemgate's cost as a user would measure it (not part of `make test`): criterion
#                  benches of idemgate-core, then wrk (1 thread, 16 connections) against one Envoy
#                  (--concurrency 1) in Docker with the origin outside it (nginx, pinned with wrk
#                  to the other CPU): passthrough, a minimal wasm filter (the floor, bench/floor;
#                  bench/bare), idemgate first requests, replays, the wait policy, fleet mode, and
#                  the alternative (idempotent-proxy-server + Redis, same origin, same requests);
#                  runs interleaved, medians of BENCH_ROUNDS; a correctness probe of both; the
#                  edge worker on workerd. Raw results in target/bench/, tables in the generated
#                  sections of BENCHMARKS.md. About 25 minutes; see bench/run.sh.
# make bench-deps  what only the bench needs: Debian nginx-light (the origin) and redis-server,
#                  and idempotent-proxy-server $(ALT_PROXY_VERSION) (cargo install --locked, once,
#                  ~5 min) into $(IDEMGATE_CACHE)/idempotent-proxy-server-<version>
#
# Variables: BENCH_ROUNDS (5), BENCH_SECONDS (3 per run), BENCH_ONLY (scenario ids),
# BENCH_CRITERION_ARGS (--warm-up-time 1 --measurement-time 2), BENCH_SKIP_CORE=1,
# BENCH_SKIP_EDGE=1, BENCH_PROFILE (1), ALT_PROXY_VERSION.
ALT_PROXY_VERSION ?= 1.2.2
ALT_PROXY = $(IDEMGATE_CACHE)/idempotent-proxy-server-$(ALT_PROXY_VERSION)/bin/idempotent-proxy-server
BENCH_APT := nginx:nginx-light redis-server:redis-server

.PHONY: bench bench-deps print-alt-proxy
bench:
	@bench/run.sh

bench-deps:
	@missing=""; for p in $(BENCH_APT); do command -v "$${p%%:*}" >/dev/null || missing="$$missing $${p#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "[bench] apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@if [[ ! -x "$(ALT_PROXY)" ]]; then \
	  echo "[bench] cargo install idempotent-proxy-server $(ALT_PROXY_VERSION) into $(IDEMGATE_CACHE)/idempotent-proxy-server-$(ALT_PROXY_VERSION) (once, ~5 min)"; \
	  cargo install idempotent-proxy-server --version "$(ALT_PROXY_VERSION)" --locked --quiet \
	    --root "$(IDEMGATE_CACHE)/idempotent-proxy-server-$(ALT_PROXY_VERSION)"; \
	fi

print-alt-proxy:
	@echo "$(ALT_PROXY)"

# ------------------------------------------------------------------------------------- edge
# make edge        edge/dist/: idemgate-edge (the core for edge workers) through wasm-bindgen,
#                  --target module (workerd, Cloudflare Workers; edge/dist/module) and
#                  --target web (other runtimes; edge/dist/web), shrunk by wasm-opt (npm binaryen)
# make run-edge    the worker in workerd (npm) in front of the demo origin (tests/origin.py on
#                  :8080), Durable Objects on local disk; curl lines to try; Ctrl-C stops it all
# make run-edge-deno  the same on Deno (npm `deno`, edge/worker/deno.js) with Deno KV on disk
# make edge-pack   dist/idemgate-edge-<version>.tgz: the npm package (npm pack of edge/)
# make test-edge   node:test (edge/test/) on workerd (Miniflare 4) and on Deno (npm `deno`, Deno
#                  KV): every conformance vector on both, 100 concurrent duplicates, persistence
#                  across a restart, bad inputs; a raw `workerd serve` smoke test of
#                  edge/worker/workerd.capnp; offline `npm pack` of the package, installed into
#                  edge/template (an `npm create cloudflare` template) whose `wrangler deploy
#                  --dry-run` bundle is then served by Miniflare
#
# wasm-bindgen-cli is installed once (cargo install, ~3 min) at exactly the version of the
# wasm-bindgen crate in Cargo.lock, into $(IDEMGATE_CACHE)/wasm-bindgen-<version>. npm
# packages are pinned in edge/package.json + package-lock.json and installed with npm ci.
# Variables: EDGE_TEST_ARGS (extra node --test arguments, e.g. --test-name-pattern=...).
EDGE_WASM := target/wasm32-unknown-unknown/edge/idemgate_edge.wasm
WASM_BINDGEN_VERSION = $(shell awk '/^name = "wasm-bindgen"$$/ {getline; gsub(/"/, "", $$3); print $$3; exit}' Cargo.lock)
WASM_BINDGEN = $(IDEMGATE_CACHE)/wasm-bindgen-$(WASM_BINDGEN_VERSION)/bin/wasm-bindgen
# The features rustc enables by default for wasm32-unknown-unknown.
WASM_OPT_FLAGS := -Oz --strip-debug --strip-producers --enable-bulk-memory \
  --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals \
  --enable-reference-types --enable-multivalue
EDGE_TEST_ARGS ?=

.PHONY: edge edge-deps edge-npm run-edge run-edge-deno edge-pack test-edge

edge-npm:
	@command -v npm >/dev/null || { echo "[edge] npm not found (Node.js >= 20.3 is needed)"; exit 1; }
	@if [[ ! -f edge/node_modules/.package-lock.json || edge/package-lock.json -nt edge/node_modules/.package-lock.json ]]; then \
	  echo "[edge] npm ci (edge/package-lock.json)"; \
	  (cd edge && npm ci --no-audit --no-fund --loglevel=error); \
	fi

edge-deps: deps-rust edge-npm
	@v="$(WASM_BINDGEN_VERSION)"; \
	[[ -n "$$v" ]] || { echo "[edge] no wasm-bindgen in Cargo.lock"; exit 1; }; \
	if [[ "$$("$(WASM_BINDGEN)" --version 2>/dev/null)" != "wasm-bindgen $$v" ]]; then \
	  echo "[edge] cargo install wasm-bindgen-cli $$v into $(IDEMGATE_CACHE)/wasm-bindgen-$$v (once, ~3 min)"; \
	  cargo install wasm-bindgen-cli --version "$$v" --root "$(IDEMGATE_CACHE)/wasm-bindgen-$$v" --quiet; \
	fi

edge: edge-deps
	@echo "[edge] cargo build --profile edge --target wasm32-unknown-unknown -p idemgate-edge"
	@cargo build --profile edge --target wasm32-unknown-unknown -p idemgate-edge
	@stamp="edge/dist/.built-from"; want="$$(sha256sum $(EDGE_WASM) | cut -c1-64) wasm-bindgen $(WASM_BINDGEN_VERSION)"; \
	if [[ -f "$$stamp" && "$$(cat "$$stamp")" == "$$want" && -f edge/dist/module/idemgate_edge_bg.wasm && -f edge/dist/web/idemgate_edge_bg.wasm ]]; then \
	  echo "[edge] edge/dist/ is up to date ($$(stat -c %s edge/dist/module/idemgate_edge_bg.wasm) bytes of wasm)"; exit 0; \
	fi; \
	$(MAKE) edge-dist && echo "$$want" > "$$stamp"

.PHONY: edge-dist
edge-dist:
	@rm -rf edge/dist/module edge/dist/web
	@echo "[edge] wasm-bindgen $(WASM_BINDGEN_VERSION) --target module / --target web"
	@"$(WASM_BINDGEN)" --target module --out-dir edge/dist/module $(EDGE_WASM)
	@"$(WASM_BINDGEN)" --target web --out-dir edge/dist/web $(EDGE_WASM)
	@echo "[edge] wasm-opt -Oz"
	@raw=$$(stat -c %s edge/dist/module/idemgate_edge_bg.wasm); \
	edge/node_modules/.bin/wasm-opt $(WASM_OPT_FLAGS) edge/dist/module/idemgate_edge_bg.wasm -o edge/dist/module/idemgate_edge_bg.wasm; \
	cp edge/dist/module/idemgate_edge_bg.wasm edge/dist/web/idemgate_edge_bg.wasm; \
	size=$$(stat -c %s edge/dist/module/idemgate_edge_bg.wasm); gz=$$(gzip -9 -c edge/dist/module/idemgate_edge_bg.wasm | wc -c); \
	echo "[edge] edge/dist/{module,web}/idemgate_edge_bg.wasm: $$size bytes ($$gz gzipped; $$raw before wasm-opt)"

run-edge: edge
	@scripts/run-edge.sh

run-edge-deno: edge
	@EDGE_RUNTIME=deno scripts/run-edge.sh

edge-pack: edge
	@mkdir -p dist
	@cd edge && npm pack --pack-destination ../dist --loglevel=error | grep -v '^$$' | sed 's|^|[edge] dist/|'

test-edge: edge
	@echo "[test-edge] node --test edge/test/ (Miniflare $$(node -p 'require("./edge/node_modules/miniflare/package.json").version'), $$(edge/node_modules/.bin/deno --version | head -1))"
	@cd edge && XDG_CONFIG_HOME="$${TMPDIR:-/tmp}/idemgate-edge-xdg" WRANGLER_SEND_METRICS=false DENO_NO_UPDATE_CHECK=1 \
	  node --test --test-concurrency=2 $(EDGE_TEST_ARGS) test/

# ------------------------------------------------------------------------------------ fleet
# make fleet-setup  Debian's etcd-server (etcd 3.4) and openssl (the TLS certificates of the
#                   fleet tests and run-fleet) via apt when missing; part of
#                   integration-setup, so tests/test_fleet.py runs in `make test` (it skips
#                   itself when etcd is missing)
# make run-fleet    fleet mode in the foreground (envoy/fleet/run.sh): etcd members on
#                   127.0.0.1:2379/22379/32379 (TLS; data and certificates in a temp dir), origin :8080/:8081, Envoys
#                   :10000 (admin 9901) and :10001 (admin 9902) sharing etcd; Ctrl-C stops it all
.PHONY: fleet-setup run-fleet
fleet-setup:
	@missing=""; command -v etcd >/dev/null || missing="etcd-server"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [[ -n "$$missing" ]]; then \
	  echo "[fleet] apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run-fleet: fleet-setup build
	@envoy/fleet/run.sh

# ----------------------------------------------------------------------------------- deploy
# make oci          the module image $(OCI_IMAGE) built offline (deploy/oci/build.sh):
#                   FROM scratch, one layer with /plugin.wasm (Istio's "compat" variant, what
#                   Envoy Gateway's Image source expects), OCI labels with the version, the git
#                   revision and OCI_SOURCE (default: the git remote). Push it with docker push,
#                   or skopeo from the tarball `make dist` writes.
# make dist         dist/idemgate-<version>.wasm + .sha256, dist/idemgate-wasm-<version>.docker.tar,
#                   dist/idemgate-edge-<version>.tgz (make edge-pack), dist/SHA256SUMS (scripts/dist.sh); part
#                   of integration-setup, so `make test` checks them (tests/test_oci.py)
# make deploy-deps  Debian's docker-registry, skopeo and prometheus (promtool) for the tests of
#                   deploy/ (registry round trip, Prometheus rules against a real Prometheus)
#
# Variables: IDEMGATE_VERSION (default: [workspace.package] version in Cargo.toml),
# OCI_IMAGE (default idemgate/idemgate-wasm:$(IDEMGATE_VERSION)), OCI_SOURCE.
IDEMGATE_VERSION ?= $(shell awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && /^version *=/{gsub(/[" ]/, ""); sub(/^version=/, ""); print; exit}' Cargo.toml)
OCI_IMAGE ?= idemgate/idemgate-wasm:$(IDEMGATE_VERSION)
export IDEMGATE_VERSION OCI_IMAGE
# command:Debian package
DEPLOY_TOOLS := docker-registry:docker-registry skopeo:skopeo promtool:prometheus prometheus:prometheus

.PHONY: oci dist deploy-deps
oci: build docker-up
	@VERSION="$(IDEMGATE_VERSION)" OCI_IMAGE="$(OCI_IMAGE)" deploy/oci/build.sh

dist: build edge-pack docker-up
	@VERSION="$(IDEMGATE_VERSION)" OCI_IMAGE="$(OCI_IMAGE)" scripts/dist.sh

deploy-deps:
	@missing=""; for tp in $(DEPLOY_TOOLS); do \
	  command -v "$${tp%%:*}" >/dev/null || case " $$missing " in *" $${tp##*:} "*) ;; *) missing="$$missing $${tp##*:}";; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "[deps] apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
