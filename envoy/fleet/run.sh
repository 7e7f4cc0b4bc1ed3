#!/usr/bin/env bash
# `make run-fleet`: fleet mode in the foreground until Ctrl-C / SIGTERM.
#   etcd members idemgate-1..3 on 127.0.0.1:2379/22379/32379 (peers 2380/22380/32380), data in
#   a temp dir, flags from envoy/fleet/etcd.flags; origin (tests/origin.py) on :8080/:8081;
#   two Envoys (--concurrency 2) rendered from envoy/fleet/envoy.yaml: :10000 (admin 9901)
#   and :10001 (admin 9902). Everything this script started is stopped by PID / name on exit,
#   the Docker engine too if this script started it. Expects dist/idemgate.wasm (make build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ENVOY_IMAGE="${ENVOY_IMAGE:-idemgate/envoy:${ENVOY_VERSION}}"
PYTHON="${PYTHON:-python3}"
WASM="$ROOT/dist/idemgate.wasm"
CONTAINERS=(idemgate-fleet-1 idemgate-fleet-2)

log() { printf '[run-fleet] %s\n' "$*" >&2; }

[[ -f "$WASM" ]] || { log "missing $WASM (run: make build)"; exit 1; }
command -v etcd >/dev/null || { log "etcd not found (run: make fleet-setup)"; exit 1; }

for port in 2379 2380 22379 22380 32379 32380 8080 8081 10000 10001 9901 9902; do
  if ! "$PYTHON" -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", int(sys.argv[1])))' "$port" 2>/dev/null; then
    log "port $port is already in use (another run, or a system etcd service?); stop that first"
    exit 1
  fi
done

engine_started_here=0
scripts/docker-engine.sh status >/dev/null 2>&1 || engine_started_here=1

WORK="$(mktemp -d -t idemgate-fleet-XXXXXX)"
etcd_pids=()
origin_pid=""
cleaned=0
cleanup() {
  [[ $cleaned == 1 ]] && return 0
  cleaned=1
  trap - INT TERM
  log "stopping"
  for c in "${CONTAINERS[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  [[ -n "$origin_pid" ]] && kill "$origin_pid" 2>/dev/null || true
  for p in "${etcd_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${etcd_pids[@]}" $origin_pid; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
  if [[ $engine_started_here == 1 ]]; then scripts/docker-engine.sh down || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mapfile -t FLAGS < <(grep -v -E '^\s*(#|$)' envoy/fleet/etcd.flags)
CLUSTER="idemgate-1=http://127.0.0.1:2380,idemgate-2=http://127.0.0.1:22380,idemgate-3=http://127.0.0.1:32380"
for i in 1 2 3; do
  case $i in 1) c=2379 p=2380 ;; 2) c=22379 p=22380 ;; 3) c=32379 p=32380 ;; esac
  log "starting etcd member idemgate-$i on 127.0.0.1:$c"
  etcd --name "idemgate-$i" --data-dir "$WORK/idemgate-$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token idemgate-fleet \
    "${FLAGS[@]}" >"$WORK/idemgate-$i.log" 2>&1 &
  etcd_pids+=($!)
done

scripts/docker-engine.sh up
envoy/build-image.sh

log "starting origin on 127.0.0.1:8080 (control 127.0.0.1:8081)"
"$PYTHON" -u tests/origin.py --port 8080 --control-port 8081 >"$WORK/origin.log" 2>&1 &
origin_pid=$!

for i in 1 2; do
  listen=$((9999 + i)); admin=$((9900 + i)); name="${CONTAINERS[$((i - 1))]}"
  sed -e "s/@LISTEN_PORT@/$listen/" -e "s/@ADMIN_PORT@/$admin/" -e "s/@NODE@/$name/" \
    envoy/fleet/envoy.yaml >"$WORK/envoy-$i.yaml"
  docker rm -f "$name" >/dev/null 2>&1 || true
  log "starting Envoy $name on :$listen, admin 127.0.0.1:$admin"
  docker run -d --name "$name" --network host \
    -v "$WORK/envoy-$i.yaml:/etc/envoy/envoy.yaml:ro" \
    -v "$WASM:/etc/idemgate/idemgate.wasm:ro" \
    --entrypoint /usr/local/bin/envoy "$ENVOY_IMAGE" \
    -c /etc/envoy/envoy.yaml --concurrency 2 --disable-hot-restart --base-id "$i" \
    --log-level "${ENVOY_LOG_LEVEL:-info}" \
    --component-log-level "${ENVOY_COMPONENT_LOG_LEVEL:-wasm:info}" >/dev/null
done

for admin in 9901 9902; do
  if ! "$PYTHON" - "$admin" <<'PY'; then
import sys, time, urllib.request
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2) as r:
            if r.read().strip() == b"LIVE":
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
PY
    log "Envoy with admin $admin did not become ready"
    for c in "${CONTAINERS[@]}"; do docker logs "$c" 2>&1 | tail -n 20 >&2; done
    exit 1
  fi
done

cat <<'TXT'

idemgate fleet is up: Envoys :10000 and :10001 share etcd (127.0.0.1:2379/22379/32379).  Try:

  # first call, through the first Envoy: executes at the origin
  curl -si -X POST http://127.0.0.1:10000/orders -H 'Idempotency-Key: fleet-1' -d '{"amount":42}'
  # the retry lands on the other Envoy: replayed from etcd (idempotent-replayed: true)
  curl -si -X POST http://127.0.0.1:10001/orders -H 'Idempotency-Key: fleet-1' -d '{"amount":42}'
  # the records in etcd, and idemgate's fleet counters
  curl -s http://127.0.0.1:2379/v3/kv/range -d '{"key":"L2lkZW1nYXRlLw==","range_end":"L2lkZW1nYXRlMA==","count_only":true}'
  curl -s 'http://127.0.0.1:9901/stats?filter=idemgate.fleet'

Envoy logs follow. Ctrl-C stops everything.

TXT

for c in "${CONTAINERS[@]}"; do
  docker logs -f "$c" 2>&1 | grep --line-buffered -E 'idemgate|error|warn' &
done
wait -n "$origin_pid" "${etcd_pids[@]}" || true
log "origin or an etcd member exited"
exit 1
