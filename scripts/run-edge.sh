#!/usr/bin/env bash
# `make run-edge`: the origin (tests/origin.py) on 127.0.0.1:8080/8081 and the idemgate edge
# worker in workerd (edge/node_modules/.bin/workerd, edge/worker/workerd.capnp) on
# 127.0.0.1:8787, Durable Objects on local disk, in the foreground until Ctrl-C / SIGTERM;
# then stops both (by PID). Expects edge/dist/ (make edge).
# Env: EDGE_PORT (8787), ORIGIN_PORT (8080) and ORIGIN_CONTROL_PORT (8081), EDGE_CONFIG (a JSON document or a file; default
# envoy/profiles/default.json), EDGE_STORAGE (default $IDEMGATE_CACHE/edge-do).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
EDGE_PORT="${EDGE_PORT:-8787}"
ORIGIN_PORT="${ORIGIN_PORT:-8080}"
ORIGIN_CONTROL_PORT="${ORIGIN_CONTROL_PORT:-8081}"
IDEMGATE_CACHE="${IDEMGATE_CACHE:-$HOME/.cache/idemgate}"
EDGE_STORAGE="${EDGE_STORAGE:-$IDEMGATE_CACHE/edge-do}"
EDGE_CONFIG="${EDGE_CONFIG:-envoy/profiles/default.json}"
WORKERD="$ROOT/edge/node_modules/.bin/workerd"

log() { printf '[run-edge] %s\n' "$*" >&2; }

[[ -f edge/dist/module/idemgate_edge_bg.wasm ]] || { log "missing edge/dist (run: make edge)"; exit 1; }
[[ -x "$WORKERD" ]] || { log "missing $WORKERD (run: make edge)"; exit 1; }
if [[ -f "$EDGE_CONFIG" ]]; then config="$(cat "$EDGE_CONFIG")"; else config="$EDGE_CONFIG"; fi

for port in "$ORIGIN_PORT" "$ORIGIN_CONTROL_PORT" "$EDGE_PORT"; do
  if ! "$PYTHON" -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
    log "port $port is already in use (another make run / run-edge?); stop that first"
    exit 1
  fi
done
mkdir -p "$EDGE_STORAGE"

origin_pid=""
workerd_pid=""
cleaned=0
cleanup() {
  [[ $cleaned == 1 ]] && return 0
  cleaned=1
  trap - INT TERM
  log "stopping"
  [[ -n "$workerd_pid" ]] && kill "$workerd_pid" 2>/dev/null || true
  [[ -n "$origin_pid" ]] && kill "$origin_pid" 2>/dev/null || true
  [[ -n "$workerd_pid" ]] && wait "$workerd_pid" 2>/dev/null || true
  [[ -n "$origin_pid" ]] && wait "$origin_pid" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting origin on 127.0.0.1:$ORIGIN_PORT (control 127.0.0.1:$ORIGIN_CONTROL_PORT)"
"$PYTHON" -u tests/origin.py --port "$ORIGIN_PORT" --control-port "$ORIGIN_CONTROL_PORT" --verbose &
origin_pid=$!

log "starting workerd on 127.0.0.1:$EDGE_PORT (Durable Objects in $EDGE_STORAGE)"
IDEMGATE_CONFIG="$config" "$WORKERD" serve edge/worker/workerd.capnp \
  --socket-addr "http=127.0.0.1:$EDGE_PORT" --external-addr "origin=127.0.0.1:$ORIGIN_PORT" \
  --directory-path "do-storage=$EDGE_STORAGE" &
workerd_pid=$!

if ! "$PYTHON" - "$EDGE_PORT" <<'PY'; then
import sys, time, urllib.request
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2):
            sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
PY
  log "workerd did not answer"
  exit 1
fi

cat <<TXT

idemgate edge worker is up: workerd 127.0.0.1:$EDGE_PORT -> origin 127.0.0.1:$ORIGIN_PORT.  Try:

  # first call executes at the origin ("execution" in the body counts executions)
  curl -si -X POST http://127.0.0.1:$EDGE_PORT/orders -H 'Idempotency-Key: demo-1' \\
       -H 'content-type: application/json' -d '{"amount":42}'
  # same key + same body again: replayed byte for byte (same "execution"), idempotent-replayed: true
  curl -si -X POST http://127.0.0.1:$EDGE_PORT/orders -H 'Idempotency-Key: demo-1' \\
       -H 'content-type: application/json' -d '{"amount":42}'
  # same key, different body: 422 problem+json
  curl -si -X POST http://127.0.0.1:$EDGE_PORT/orders -H 'Idempotency-Key: demo-1' \\
       -H 'content-type: application/json' -d '{"amount":43}'
  # concurrent duplicate while the first is in flight (origin delays 3 s): 409 + Retry-After
  curl -s -o /dev/null -X POST 'http://127.0.0.1:$EDGE_PORT/slow?delay=3' -H 'Idempotency-Key: demo-2' -d x &
  sleep 0.5; curl -si -X POST 'http://127.0.0.1:$EDGE_PORT/slow?delay=3' -H 'Idempotency-Key: demo-2' -d x
  # what the origin saw
  curl -s http://127.0.0.1:$ORIGIN_CONTROL_PORT/requests

Records survive a restart (Durable Objects on disk in $EDGE_STORAGE). Ctrl-C stops everything.
Another configuration: make run-edge EDGE_CONFIG=envoy/profiles/stripe.json

TXT

wait -n "$origin_pid" "$workerd_pid" || true
log "origin or workerd exited"
exit 1
