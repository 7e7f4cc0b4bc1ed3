#!/usr/bin/env bash
# `make run-fleet`: fleet mode in the foreground until Ctrl-C / SIGTERM.
#   etcd members idemgate-1..3 on 127.0.0.1:2379/22379/32379 (TLS, client certificates
#   required; peers 2380/22380/32380, health on http://127.0.0.1:2381/22381/32381), data and a
#   throw-away CA made with openssl in a temp dir, flags from envoy/fleet/etcd.flags; origin
#   (tests/origin.py) on :8080/:8081;
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

RUN_TAG=run-fleet
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

require_file "$WASM" "make build"
command -v etcd >/dev/null || die "etcd not found (run: make fleet-setup)"
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
require_ports_free 0.0.0.0 "another run, or a system etcd service?" \
  2379 2380 2381 22379 22380 22381 32379 32380 32381 8080 8081 10000 10001 9901 9902

WORK="$(mktemp -d -t idemgate-fleet-XXXXXX)"
run_traps
on_exit rm -rf "$WORK"

# A throw-away CA; etcd's server certificate (127.0.0.1) and the Envoys' client certificate.
CERTS="$WORK/certs"
mkdir -p "$CERTS"
ossl() { openssl "$@" >>"$WORK/openssl.log" 2>&1 || die "openssl $1 failed (see $WORK/openssl.log)"; }
EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
ossl req -x509 "${EC[@]}" -days 30 -subj "/CN=idemgate fleet demo CA" -keyout "$CERTS/ca-key.pem" -out "$CERTS/ca.pem"
issue() { # name CN extensions
  printf '%b' "$3" >"$CERTS/$1.ext"
  ossl req "${EC[@]}" -subj "/CN=$2" -keyout "$CERTS/$1-key.pem" -out "$CERTS/$1.csr"
  ossl x509 -req -in "$CERTS/$1.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca-key.pem" -CAcreateserial \
    -days 30 -extfile "$CERTS/$1.ext" -out "$CERTS/$1.pem"
}
issue server etcd 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n'
issue client idemgate 'extendedKeyUsage=clientAuth\n'
chmod 644 "$CERTS"/*.pem # read by Envoy in its container
TLS=(--cert-file "$CERTS/server.pem" --key-file "$CERTS/server-key.pem" --client-cert-auth
  --trusted-ca-file "$CERTS/ca.pem")

mapfile -t FLAGS < <(grep -v -E '^\s*(#|$)' envoy/fleet/etcd.flags)
CLUSTER="idemgate-1=http://127.0.0.1:2380,idemgate-2=http://127.0.0.1:22380,idemgate-3=http://127.0.0.1:32380"
etcd_pids=() etcd_ports=()
for i in 1 2 3; do
  case $i in 1) c=2379 p=2380 ;; 2) c=22379 p=22380 ;; 3) c=32379 p=32380 ;; esac
  log "starting etcd member idemgate-$i on 127.0.0.1:$c (TLS)"
  start_bg "etcd member idemgate-$i" etcd --name "idemgate-$i" --data-dir "$WORK/idemgate-$i" \
    --listen-client-urls "https://127.0.0.1:$c" --advertise-client-urls "https://127.0.0.1:$c" \
    --listen-metrics-urls "http://127.0.0.1:$((c + 2))" "${TLS[@]}" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token idemgate-fleet \
    "${FLAGS[@]}" >"$WORK/idemgate-$i.log" 2>&1
  etcd_pids+=("$LAST_PID") etcd_ports+=("$c")
done

docker_engine_up
envoy/build-image.sh

for i in 1 2 3; do
  c="${etcd_ports[i - 1]}"
  if ! wait_http_ready "etcd member idemgate-$i" "http://127.0.0.1:$((c + 2))/health" "" "${etcd_pids[i - 1]}"; then
    log "the last 20 lines of its log ($WORK/idemgate-$i.log):"
    tail -n 20 "$WORK/idemgate-$i.log" >&2
    exit 1
  fi
done

log "starting origin on 127.0.0.1:8080 (control 127.0.0.1:8081)"
start_bg origin "$PYTHON" -u tests/origin.py --port 8080 --control-port 8081 >"$WORK/origin.log" 2>&1

for i in 1 2; do
  listen=$((9999 + i)); admin=$((9900 + i)); name="${CONTAINERS[$((i - 1))]}"
  sed -e "s/@LISTEN_PORT@/$listen/" -e "s/@ADMIN_PORT@/$admin/" -e "s/@NODE@/$name/" \
    envoy/fleet/envoy.yaml >"$WORK/envoy-$i.yaml"
  log "starting Envoy $name on :$listen, admin 127.0.0.1:$admin"
  start_container "$name" --network host \
    -v "$WORK/envoy-$i.yaml:/etc/envoy/envoy.yaml:ro" \
    -v "$WASM:/etc/idemgate/idemgate.wasm:ro" \
    -v "$CERTS:/etc/idemgate/etcd:ro" \
    --entrypoint /usr/local/bin/envoy "$ENVOY_IMAGE" \
    -c /etc/envoy/envoy.yaml --concurrency 2 --disable-hot-restart --base-id "$i" \
    --log-level "${ENVOY_LOG_LEVEL:-info}" \
    --component-log-level "${ENVOY_COMPONENT_LOG_LEVEL:-wasm:info}"
done

for i in 1 2; do
  name="${CONTAINERS[$((i - 1))]}"
  if ! wait_http_ready "Envoy $name" "http://127.0.0.1:$((9900 + i))/ready" LIVE; then
    show_container_log "$name" 20
    exit 1
  fi
done

sed "s#CERTS_DIR#$CERTS#g" <<'TXT'

idemgate fleet is up: Envoys :10000 and :10001 share etcd (127.0.0.1:2379/22379/32379, gRPC
over TLS with client certificates; the certificates are in CERTS_DIR).  Try:

  # first call, through the first Envoy: executes at the origin
  curl -si -X POST http://127.0.0.1:10000/orders -H 'Idempotency-Key: fleet-1' -d '{"amount":42}'
  # the retry lands on the other Envoy: replayed from etcd (idempotent-replayed: true)
  curl -si -X POST http://127.0.0.1:10001/orders -H 'Idempotency-Key: fleet-1' -d '{"amount":42}'
  # the records in etcd, and idemgate's fleet counters
  curl -s --cacert CERTS_DIR/ca.pem --cert CERTS_DIR/client.pem --key CERTS_DIR/client-key.pem \
    https://127.0.0.1:2379/v3/kv/range -d '{"key":"L2lkZW1nYXRlLw==","range_end":"L2lkZW1nYXRlMA==","count_only":true}'
  curl -s 'http://127.0.0.1:9901/stats?filter=idemgate.fleet'

Envoy logs follow. Ctrl-C stops everything.

TXT

for c in "${CONTAINERS[@]}"; do follow_container "$c" -E 'idemgate|error|warn'; done
# Returns when the origin, an etcd member or an Envoy exits (or on a signal: the traps).
wait_first_exit
exit 1
