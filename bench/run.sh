#!/usr/bin/env bash
# `make bench`: idemgate's cost as a user would measure it (against Envoy itself, with the origin
# outside Envoy, and against the alternative a user would run instead). Not part of `make test`.
#
#   1. builds dist/idemgate.wasm (make build), the Envoy image (make image) and the benchmark
#      filters (bench/floor, bench/probe, bench/bare -> dist/bench/*.wasm); make bench-deps
#      installs the origin (Debian nginx-light) and the alternative (idempotent-proxy-server
#      with cargo install, cached in $IDEMGATE_CACHE, with Debian redis-server);
#   2. criterion benches of idemgate-core (short: BENCH_CRITERION_ARGS);
#   3. bench/envoy_bench.py: nginx as the origin (pinned with wrk), one Envoy container and the
#      alternative (pinned to the other CPU), wrk against every scenario, interleaved,
#      BENCH_ROUNDS rounds of BENCH_SECONDS seconds each (loopback only, every run bounded);
#   4. bench/correctness.py: what idemgate and the alternative answer to concurrent duplicates,
#      a changed body and a retry after a refused connection (scenario id `correctness`);
#   5. bench/edge_bench.py: the edge worker on workerd (make edge) against a passthrough
#      worker, same load and statistics (skipped with BENCH_SKIP_EDGE=1);
#   6. bench/report.py: the generated sections of BENCHMARKS.md (the summary at the top, the
#      details further down).
#
# Raw results go to target/bench/. The Docker engine is stopped afterwards only if this run
# started it (as `make test` does).
#
# Env: BENCH_ROUNDS (5), BENCH_SECONDS (3), BENCH_WARMUP (1), BENCH_ONLY (scenario ids,
# comma-separated: Envoy's (bench/envoy_bench.py SCENARIOS, alt_* included), the edge's (edge_*)
# and `correctness`; default all; a part is skipped when BENCH_ONLY names none of its ids),
# BENCH_CRITERION_ARGS, BENCH_SKIP_CORE=1, BENCH_SKIP_EDGE=1, BENCH_PROFILE (1: one more run per
# Envoy configuration under `perf record`, Envoy's CPU split by thread and code; 0 skips it),
# PYTHON; BENCH_ETCD_MEMBERS (3) and BENCH_ETCD_DIR (temp dir) for the fleet rows (fleet_first,
# fleet_replay: a local etcd cluster, `make fleet-setup`).
#
# A quick check of some rows (partial tables go to target/bench/BENCHMARKS.partial.md, not
# BENCHMARKS.md, and the wasm size breakdown is skipped):
#   BENCH_ONLY=pass,first,replay,alt_first,alt_replay,correctness BENCH_ROUNDS=1 BENCH_SECONDS=1 BENCH_SKIP_CORE=1 make bench
#   BENCH_ONLY=first,replay,fleet_first,fleet_replay BENCH_ROUNDS=1 BENCH_SECONDS=1 BENCH_SKIP_CORE=1 make bench
#   BENCH_SKIP_CORE=1 BENCH_ONLY=edge_pass,edge_first BENCH_ROUNDS=1 BENCH_SECONDS=1 make bench
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS="${BENCH_ROUNDS:-5}"
SECONDS_PER_RUN="${BENCH_SECONDS:-3}"
CRITERION_ARGS="${BENCH_CRITERION_ARGS:---warm-up-time 1 --measurement-time 2}"
PY="${PYTHON:-python3}"
OUT=target/bench
WASM_TARGET=wasm32-wasip1
started_at="$(date +%s)"

log() { printf '[bench] %s\n' "$*" >&2; }

started_here=0
scripts/docker-engine.sh status >/dev/null 2>&1 || started_here=1
down() { if [[ $started_here == 1 ]]; then scripts/docker-engine.sh down || true; fi; }
trap down EXIT

make --no-print-directory deps-sys build image bench-deps
IDEMPOTENT_PROXY_SERVER="$(make --no-print-directory -s print-alt-proxy)"
export IDEMPOTENT_PROXY_SERVER
export BENCH_PROFILE="${BENCH_PROFILE:-1}"
if [[ $BENCH_PROFILE == 1 ]] && ! command -v perf >/dev/null; then
  log "perf not found: apt-get install linux-perf (for the profile of Envoy's CPU)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null; } \
    || { log "could not install linux-perf: the Envoy CPU profile is skipped"; BENCH_PROFILE=0; }
fi
log "building the benchmark filters (bench/floor, bench/probe, bench/bare)"
cargo build --quiet --release --target "$WASM_TARGET" -p idemgate-bench-floor -p idemgate-bench-probe \
  -p idemgate-bench-bare
mkdir -p dist/bench "$OUT"
cp "target/$WASM_TARGET/release/idemgate_bench_floor.wasm" dist/bench/floor.wasm
cp "target/$WASM_TARGET/release/idemgate_bench_probe.wasm" dist/bench/probe.wasm
# The sizes table compares like with like: the floor and bench/bare after the same wasm-opt
# pass as dist/idemgate.wasm (the floor that Envoy loads stays cargo's module, as in every run).
# shellcheck disable=SC2046
"$(make --no-print-directory -s print-wasm-opt)" $(make --no-print-directory -s print-wasm-opt-flags) \
  "target/$WASM_TARGET/release/idemgate_bench_floor.wasm" -o dist/bench/floor.opt.wasm
# shellcheck disable=SC2046
"$(make --no-print-directory -s print-wasm-opt)" $(make --no-print-directory -s print-wasm-opt-flags) \
  "target/$WASM_TARGET/release/idemgate_bench_bare.wasm" -o dist/bench/bare.wasm

REPORT=BENCHMARKS.md
README_ARGS=(--readme README.md)  # a full run also fills the README's cost block
if [[ -n "${BENCH_ONLY:-}" ]]; then
  README_ARGS=()
  REPORT="$OUT/BENCHMARKS.partial.md"
  rm -f "$REPORT" "$OUT/wasm-sizes.json"
  log "BENCH_ONLY=$BENCH_ONLY: partial run, tables to $REPORT (BENCHMARKS.md untouched)"
else
  log "where the bytes of dist/idemgate.wasm go (an unstripped build of the same source)"
  CARGO_TARGET_DIR=target/bench-unstripped cargo build --quiet --release --target "$WASM_TARGET" \
    -p idemgate-filter --config 'profile.release.strip=false'
  # the same wasm-opt pass as `make build`, keeping the function names (-g)
  # shellcheck disable=SC2046
  "$(make --no-print-directory -s print-wasm-opt)" $(make --no-print-directory -s print-wasm-opt-flags) -g \
    "target/bench-unstripped/$WASM_TARGET/release/idemgate_filter.wasm" -o "$OUT/idemgate_filter.named.wasm"
  "$PY" bench/wasm_sizes.py "$OUT/idemgate_filter.named.wasm" \
    --json "$OUT/wasm-sizes.json" --top 12 >&2
  log "where idemgate's own wasm code spends its time (bench/wasm_host.mjs in node, V8 CPU profiler)"
  rm -rf "$OUT/cpuprof" && mkdir -p "$OUT/cpuprof"  # one .cpuprofile per run: chrome://inspect or speedscope
  for run in replay:1024:30000 first:1024:30000 replay:65536:3000 first:65536:3000; do
    IFS=: read -r sc size n <<<"$run"
    dir="$OUT/cpuprof/$sc-$size"
    node --no-liftoff bench/wasm_host.mjs "$OUT/idemgate_filter.named.wasm" \
      --scenario "$sc" --size "$size" --requests "$n" --cpu-profile "$dir.cpuprofile" >"$dir.json"
    "$PY" bench/wasm_profile.py "$dir.cpuprofile" --top 60 --label "$sc $size" --json "$dir.profile.json" >/dev/null
    log "  $(cat "$dir.json")"
  done
fi
if [[ -z "${BENCH_ONLY:-}" || ",$BENCH_ONLY," == *,fleet_* ]]; then
  make --no-print-directory fleet-setup
fi

if [[ "${BENCH_SKIP_CORE:-0}" != 1 ]]; then
  log "criterion: cargo bench -p idemgate-core --bench core -- $CRITERION_ARGS"
  rm -rf target/criterion
  # shellcheck disable=SC2086
  cargo bench --quiet -p idemgate-core --bench core -- $CRITERION_ARGS | tee "$OUT/criterion.log" \
    | grep -E '^(store calls|  probes=|[a-z_]+/[^ ]+ *time:|[a-z_/0-9A-Za-z]+$)' >&2 || true
fi

# wants <grep options and patterns>: BENCH_ONLY is empty or names a scenario selected by grep.
wants() { [[ -z "${BENCH_ONLY:-}" ]] || tr ',' '\n' <<<"$BENCH_ONLY" | grep -q "$@"; }

rm -f "$OUT/envoy.json" "$OUT/edge.json" "$OUT/correctness.json"
if wants -v -e '^edge_' -e '^correctness$'; then
  log "Envoy: $ROUNDS rounds x ${SECONDS_PER_RUN}s per configuration"
  "$PY" bench/envoy_bench.py --rounds "$ROUNDS" --seconds "$SECONDS_PER_RUN" \
    --floor-wasm dist/bench/floor.wasm --probe-wasm dist/bench/probe.wasm --bare-wasm dist/bench/bare.wasm \
    --idemgate-wasm dist/idemgate.wasm --out "$OUT/envoy.json"
fi

if wants -x -e correctness; then
  log "correctness probe: idemgate and the alternative (bench/correctness.py)"
  "$PY" bench/correctness.py --idemgate-wasm dist/idemgate.wasm --out "$OUT/correctness.json"
fi

if [[ "${BENCH_SKIP_EDGE:-0}" != 1 ]] && wants -e '^edge_'; then
  make --no-print-directory edge
  log "edge (workerd): $ROUNDS rounds x ${SECONDS_PER_RUN}s per configuration"
  "$PY" bench/edge_bench.py --rounds "$ROUNDS" --seconds "$SECONDS_PER_RUN" --out "$OUT/edge.json"
fi

"$PY" bench/report.py --envoy "$OUT/envoy.json" --correctness "$OUT/correctness.json" --wasm-profile-dir "$OUT/cpuprof" --edge "$OUT/edge.json" --criterion-log "$OUT/criterion.log" \
  --wasm-sizes "$OUT/wasm-sizes.json" \
  --floor-wasm dist/bench/floor.wasm --floor-opt-wasm dist/bench/floor.opt.wasm --bare-wasm dist/bench/bare.wasm \
  --idemgate-wasm dist/idemgate.wasm \
  --started "$started_at" --benchmarks "$REPORT" "${README_ARGS[@]}" \
  --command "make bench  # BENCH_ROUNDS=$ROUNDS BENCH_SECONDS=$SECONDS_PER_RUN"
log "done in $(( $(date +%s) - started_at ))s; raw results in $OUT/, tables in $REPORT"
