#!/usr/bin/env bash
# `make run-edge`: the origin (tests/origin.py) on 127.0.0.1:8080/8081 and the idemgate edge
# worker in workerd (edge/node_modules/.bin/workerd, edge/worker/workerd.capnp) on
# 127.0.0.1:8787, Durable Objects on local disk, in the foreground until Ctrl-C / SIGTERM;
# then stops both (by PID). Expects edge/dist/ (make edge).
# `make run-edge-deno` (EDGE_RUNTIME=deno): the same with Deno (edge/node_modules/.bin/deno,
# edge/worker/deno.js) and Deno KV in $EDGE_STORAGE/kv.sqlite instead.
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
EDGE_RUNTIME="${EDGE_RUNTIME:-workerd}"
case "$EDGE_RUNTIME" in
  workerd) EDGE_STORAGE="${EDGE_STORAGE:-$IDEMGATE_CACHE/edge-do}" ;;
  deno) EDGE_STORAGE="${EDGE_STORAGE:-$IDEMGATE_CACHE/edge-deno-kv}" ;;
  *) echo "EDGE_RUNTIME must be workerd or deno, got '$EDGE_RUNTIME'" >&2; exit 2 ;;
esac
EDGE_CONFIG="${EDGE_CONFIG:-envoy/profiles/default.json}"
WORKERD="$ROOT/edge/node_modules/.bin/workerd"

RUN_TAG=run-edge
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

require_file edge/dist/module/idemgate_edge_bg.wasm "make edge"
[[ -x "$WORKERD" ]] || die "missing $WORKERD (run: make edge)"
DENO="$ROOT/edge/node_modules/.bin/deno"
[[ "$EDGE_RUNTIME" != deno || -x "$DENO" ]] || die "missing $DENO (run: make edge)"
if [[ -f "$EDGE_CONFIG" ]]; then config="$(cat "$EDGE_CONFIG")"; else config="$EDGE_CONFIG"; fi

require_ports_free 127.0.0.1 "another make run / run-edge?" "$ORIGIN_PORT" "$ORIGIN_CONTROL_PORT" "$EDGE_PORT"
mkdir -p "$EDGE_STORAGE"
run_traps

log "starting origin on 127.0.0.1:$ORIGIN_PORT (control 127.0.0.1:$ORIGIN_CONTROL_PORT)"
start_bg origin "$PYTHON" -u tests/origin.py --port "$ORIGIN_PORT" --control-port "$ORIGIN_CONTROL_PORT" --verbose
origin_pid=$LAST_PID

if [[ "$EDGE_RUNTIME" == deno ]]; then
  log "starting Deno on 127.0.0.1:$EDGE_PORT (Deno KV in $EDGE_STORAGE/kv.sqlite)"
  start_bg deno env IDEMGATE_CONFIG="$config" ORIGIN_URL="http://127.0.0.1:$ORIGIN_PORT" \
    IDEMGATE_KV_PATH="$EDGE_STORAGE/kv.sqlite" PORT="$EDGE_PORT" IDEMGATE_HOSTNAME=127.0.0.1 DENO_NO_UPDATE_CHECK=1 \
    "$DENO" run --unstable-kv --allow-net --allow-env --allow-read --allow-write="$EDGE_STORAGE" edge/worker/deno.js
else
  log "starting workerd on 127.0.0.1:$EDGE_PORT (Durable Objects in $EDGE_STORAGE)"
  start_bg workerd env IDEMGATE_CONFIG="$config" "$WORKERD" serve edge/worker/workerd.capnp \
    --socket-addr "http=127.0.0.1:$EDGE_PORT" --external-addr "origin=127.0.0.1:$ORIGIN_PORT" \
    --directory-path "do-storage=$EDGE_STORAGE"
fi

wait_http_ready origin "http://127.0.0.1:$ORIGIN_CONTROL_PORT/healthz" "" "$origin_pid" || exit 1
# the runtime logs to this terminal: what it said, if anything, is just above.
wait_http_ready "$EDGE_RUNTIME" "http://127.0.0.1:$EDGE_PORT/ready" "" "$LAST_PID" || exit 1

cat <<TXT

idemgate edge worker is up: $EDGE_RUNTIME 127.0.0.1:$EDGE_PORT -> origin 127.0.0.1:$ORIGIN_PORT.  Try:

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

Records survive a restart (on disk in $EDGE_STORAGE). Ctrl-C stops everything.
Another configuration: make run-edge EDGE_CONFIG=envoy/profiles/stripe.json

TXT

wait_first_exit
exit 1
