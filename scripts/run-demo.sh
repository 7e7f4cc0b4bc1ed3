#!/usr/bin/env bash
# `make run`: origin (tests/origin.py) on 127.0.0.1:8080/8081 + Envoy (envoy/envoy.yaml)
# on :10000 with admin on 127.0.0.1:9901, in the foreground until Ctrl-C / SIGTERM.
# Stops the origin, the container, and the Docker engine if this script started it.
# Expects dist/idemgate.wasm (make build). Env: ENVOY_IMAGE, IDEMGATE_CACHE,
# ENVOY_LOG_LEVEL (default info), ENVOY_COMPONENT_LOG_LEVEL (default wasm:info).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ENVOY_IMAGE="${ENVOY_IMAGE:-idemgate/envoy:${ENVOY_VERSION}}"
PYTHON="${PYTHON:-python3}"
CONTAINER=idemgate-demo
WASM="$ROOT/dist/idemgate.wasm"

log() { printf '[run] %s\n' "$*" >&2; }

[[ -f "$WASM" ]] || { log "missing $WASM (run: make build)"; exit 1; }

for port in 8080 8081 10000 9901; do
  if ! "$PYTHON" -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", int(sys.argv[1])))' "$port" 2>/dev/null; then
    log "port $port is already in use (another make run?); stop that first"
    exit 1
  fi
done

engine_started_here=0
if ! scripts/docker-engine.sh status >/dev/null 2>&1; then
  engine_started_here=1
fi

origin_pid=""
logs_pid=""
cleaned=0
cleanup() {
  [[ $cleaned == 1 ]] && return 0
  cleaned=1
  trap - INT TERM
  log "stopping"
  [[ -n "$logs_pid" ]] && kill "$logs_pid" 2>/dev/null || true
  [[ -n "$origin_pid" ]] && kill "$origin_pid" 2>/dev/null || true
  docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
  [[ -n "$origin_pid" ]] && wait "$origin_pid" 2>/dev/null || true
  if [[ $engine_started_here == 1 ]]; then scripts/docker-engine.sh down || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/docker-engine.sh up
envoy/build-image.sh

log "starting origin on 127.0.0.1:8080 (control 127.0.0.1:8081)"
"$PYTHON" -u tests/origin.py --port 8080 --control-port 8081 --verbose &
origin_pid=$!

docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
log "starting Envoy ($ENVOY_IMAGE) on :10000, admin 127.0.0.1:9901"
docker run -d --name "$CONTAINER" --network host \
  -v "$ROOT/envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro" \
  -v "$WASM:/etc/idemgate/idemgate.wasm:ro" \
  --entrypoint /usr/local/bin/envoy "$ENVOY_IMAGE" \
  -c /etc/envoy/envoy.yaml --disable-hot-restart \
  --log-level "${ENVOY_LOG_LEVEL:-info}" \
  --component-log-level "${ENVOY_COMPONENT_LOG_LEVEL:-wasm:info}" >/dev/null

if ! "$PYTHON" - <<'PY'; then
import sys, time, urllib.request
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:9901/ready", timeout=2) as r:
            if r.read().strip() == b"LIVE":
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
PY
  log "Envoy did not become ready; its log:"
  docker logs "$CONTAINER" 2>&1 | tail -n 40 >&2
  exit 1
fi

cat <<'TXT'

idemgate demo is up: Envoy :10000 -> origin 127.0.0.1:8080.  Try:

  # first call executes at the origin (see x-origin-execution)
  curl -si -X POST http://127.0.0.1:10000/orders -H 'Idempotency-Key: demo-1' \
       -H 'content-type: application/json' -d '{"amount":42}'
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
docker logs -f "$CONTAINER" 2>&1 \
  | grep --line-buffered -v -E 'statically linked extensions|HTTP header map info|\]   [a-z]' &
logs_pid=$!
# Returns when either exits (or on a signal, which runs the traps).
wait -n "$origin_pid" "$logs_pid" || true
log "origin or Envoy exited"
exit 1
