# idemgate: build the proxy-wasm filter, an offline Envoy image, and run the tests.
#
#   make deps         rustup wasm targets + Python venv (pytest, requests) in $(IDEMGATE_CACHE)/venv
#   make build        dist/idemgate.wasm (release, wasm32-wasip1)
#   make image        Envoy image $(ENVOY_IMAGE) (built offline unless ENVOY_IMAGE is not idemgate/*)
#   make docker-up    make sure a Docker engine answers (starts dockerd if needed, PID file in the cache)
#   make docker-down  stop the dockerd that docker-up started (never one started by someone else)
#   make run          demo in the foreground: origin :8080/:8081, Envoy :10000, admin :9901
#   make unit         cargo test --workspace
#   make integration  pytest tests/ against a real Envoy in Docker
#   make test         unit + integration, then stop the engine if this run started it
#   make lint         rustfmt check + clippy (host and wasm32-wasip1)
#   make clean        cargo clean + dist/
#
# Variables (make VAR=... or environment): IDEMGATE_CACHE, ENVOY_VERSION, ENVOY_IMAGE,
# PYTEST_ARGS (default -q), PYTEST_PATHS (default tests/), PYTHON.

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
PY_DEPS := pytest>=8,<10 requests>=2.31,<3 jsonschema>=4.18,<5

export IDEMGATE_CACHE ENVOY_VERSION ENVOY_IMAGE PYTHON

UNIT_CMD := cargo test --workspace
PYTEST_CMD = $(VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(PYTEST_PATHS)

.PHONY: deps deps-rust deps-py deps-sys build image docker-up docker-down run unit integration \
        integration-setup test lint clean

deps: deps-rust deps-py deps-sys

# Debian packages the tests use (wrk drives the key-churn test).
SYS_TOOLS := wrk
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
	if ! "$(VENV)/bin/python" -c 'import pytest, requests, jsonschema' >/dev/null 2>&1; then \
	  echo "[deps] installing pytest and requests into the venv"; \
	  "$(VENV)/bin/python" -m pip install --quiet --disable-pip-version-check $(foreach d,$(PY_DEPS),'$(d)'); \
	fi

build: deps-rust
	@echo "[build] cargo build --release --target $(WASM_TARGET) -p idemgate-filter"
	@cargo build --release --target $(WASM_TARGET) -p idemgate-filter
	@mkdir -p dist
	@cp $(WASM_OUT) dist/idemgate.wasm
	@echo "[build] dist/idemgate.wasm: $$(stat -c %s dist/idemgate.wasm) bytes"

image: docker-up
	@envoy/build-image.sh

docker-up:
	@scripts/docker-engine.sh up

docker-down:
	@scripts/docker-engine.sh down

run: build
	@scripts/run-demo.sh

unit:
	@echo "[unit] $(UNIT_CMD)"
	@$(UNIT_CMD)

integration-setup: deps-py deps-sys build docker-up image

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
	if [[ $$rc == 0 ]]; then \
	  start=$$(date +%s); \
	  $(MAKE) integration-setup || rc=$$?; \
	  echo "[integration] setup took $$(( $$(date +%s) - start ))s"; \
	fi; \
	if [[ $$rc == 0 ]]; then \
	  echo "[integration] pytest $(PYTEST_PATHS) (Envoy image $(ENVOY_IMAGE))"; \
	  $(PYTEST_CMD) || rc=$$?; \
	fi; \
	exit $$rc

lint:
	@echo "[lint] cargo fmt --check"
	@cargo fmt --all -- --check
	@echo "[lint] clippy (host)"
	@cargo clippy --workspace --all-targets -- -D warnings
	@echo "[lint] clippy ($(WASM_TARGET), idemgate-filter)"
	@cargo clippy -p idemgate-filter --target $(WASM_TARGET) -- -D warnings

clean:
	cargo clean
	rm -rf dist/*.wasm tests/__pycache__

# ------------------------------------------------------------------------------------ bench
# make bench   idemgate's cost against Envoy itself, side by side (not part of `make test`):
#              criterion benches of idemgate-core, then wrk (1 thread, 16 connections) against
#              one Envoy (--concurrency 1) in Docker: passthrough, a minimal wasm filter (the
#              floor, bench/floor), idemgate first requests, replays, the wait policy; runs
#              interleaved, medians of BENCH_ROUNDS. Raw results in target/bench/, tables in the
#              generated section of BENCHMARKS.md. About 10 minutes; see bench/run.sh.
#
# Variables: BENCH_ROUNDS (5), BENCH_SECONDS (3 per run), BENCH_ONLY (scenario ids),
# BENCH_CRITERION_ARGS (--warm-up-time 1 --measurement-time 2), BENCH_SKIP_CORE=1.
.PHONY: bench
bench:
	@bench/run.sh
