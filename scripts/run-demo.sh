#!/usr/bin/env bash
# `make run`: origin (tests/origin.py) on 127.0.0.1:8080/8081 + Envoy (envoy/envoy.yaml)
# on :10000 with admin on 127.0.0.1:9901, in the foreground until Ctrl-C / SIGTERM.
# Stops the origin, the container, and the Docker engine if this script started it.
# Expects dist/idemgate.wasm (make build). Env: ENVOY_IMAGE, IDEMGATE_CACHE,
# ENVOY_LOG_LEVEL (default info), ENVOY_COMPONENT_LOG_LEVEL (default wasm:info), PROFILE (a
# profile of envoy/profiles/ instead of envoy.yaml's own configuration: envoy/with-profile.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ENVOY_IMAGE="${ENVOY_IMAGE:-idemgate/envoy:${ENVOY_VERSION}}"
PYTHON="${PYTHON:-python3}"
CONTAINER=idemgate-demo
WASM="$ROOT/dist/idemgate.wasm"

RUN_TAG=run
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

require_file "$WASM" "make build"
ENVOY_YAML="$ROOT/envoy/envoy.yaml"
if [[ -n "${PROFILE:-}" ]]; then
  rendered="$(mktemp -t idemgate-envoy-XXXXXX.yaml)"
  "$PYTHON" envoy/with-profile.py "$PROFILE" >"$rendered" || { rm -f "$rendered"; exit 1; }
  chmod 644 "$rendered"
  ENVOY_YAML="$rendered"
fi
require_ports_free 0.0.0.0 "another make run?" 8080 8081 10000 9901
run_traps
[[ -z "${PROFILE:-}" ]] || on_exit rm -f "$ENVOY_YAML"

docker_engine_up
envoy/build-image.sh

log "starting origin on 127.0.0.1:8080 (control 127.0.0.1:8081)"
start_bg origin "$PYTHON" -u tests/origin.py --port 8080 --control-port 8081 --created /orders --verbose
origin_pid=$LAST_PID

log "starting Envoy ($ENVOY_IMAGE) on :10000, admin 127.0.0.1:9901${PROFILE:+, profile $PROFILE}"
start_container "$CONTAINER" --network host \
  -v "$ENVOY_YAML:/etc/envoy/envoy.yaml:ro" \
  -v "$WASM:/etc/idemgate/idemgate.wasm:ro" \
  --entrypoint /usr/local/bin/envoy "$ENVOY_IMAGE" \
  -c /etc/envoy/envoy.yaml --disable-hot-restart \
  --log-level "${ENVOY_LOG_LEVEL:-info}" \
  --component-log-level "${ENVOY_COMPONENT_LOG_LEVEL:-wasm:info}"

if ! wait_http_ready "origin" http://127.0.0.1:8081/healthz "" "$origin_pid" \
  || ! wait_http_ready "Envoy" http://127.0.0.1:9901/ready LIVE; then
  show_container_log "$CONTAINER"
  exit 1
fi

cat <<'TXT'

idemgate demo is up: Envoy :10000 -> origin 127.0.0.1:8080.  Try:

  # first call executes at the origin: 201 (see x-origin-execution); over HTTP/2 too
  curl -si -X POST http://127.0.0.1:10000/orders -H 'Idempotency-Key: demo-1' \
       -H 'content-type: application/json' -d '{"amount":42}'
  curl -si --http2-prior-knowledge http://127.0.0.1:10000/orders -H 'Idempotency-Key: h2-demo-1' \
       -H 'content-type: application/json' --data-binary '{"amount":42}'
  # same key + same body again: replayed by idemgate (same x-origin-execution,
  # plus "idempotent-replayed: true"), the origin is not called again
  curl -si -X POST http://127.0.0.1:10000/orders -H 'Idempotency-Key: demo-1' \
       -H 'content-type: application/json' -d '{"amount":42}'
  # same key, different body: 422
  curl -si -X POST http://127.0.0.1:10000/orders -H 'Idempotency-Key: demo-1' \
       -H 'content-type: application/json' -d '{"amount":43}'
  # Envoy stats (idemgate / wasm) and what the origin saw
  curl -s 'http://127.0.0.1:9901/stats?filter=idemgate|wasm'
  curl -s http://127.0.0.1:8081/requests

Envoy log follows. Ctrl-C stops everything.

TXT

# Envoy's log, minus the long list of compiled-in extensions printed at startup.
follow_container "$CONTAINER" -v -E 'statically linked extensions|HTTP header map info|\]   [a-z]'
# Returns when either exits (or on a signal, which runs the traps).
wait_first_exit
exit 1
