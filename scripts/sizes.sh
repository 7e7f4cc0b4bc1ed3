#!/usr/bin/env bash
# make sizes: the sizes of dist/idemgate.wasm and the edge wasm (raw and gzipped), and where
# their bytes go (code per Rust path and the biggest functions, from builds of the same source
# that keep function names; bench/wasm_sizes.py). SIZES_FUNCTIONS=N lists N functions (20).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
n="${SIZES_FUNCTIONS:-20}"
out=target/sizes
mkdir -p "$out"
wasm_opt="$(make --no-print-directory -s print-wasm-opt)"
read -r -a filter_flags <<<"$(make --no-print-directory -s print-wasm-opt-flags)"
edge_flags=(-Oz --strip-debug --strip-producers --enable-bulk-memory --enable-nontrapping-float-to-int
  --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue)

report() { # label file
  printf '%-58s %9d B  (gzip -9: %d B)\n' "$1" "$(stat -c %s "$2")" "$(gzip -9 -c "$2" | wc -c)"
}

echo "[sizes] filter: unstripped release build (names kept) in $out/cargo"
CARGO_TARGET_DIR="$out/cargo" cargo build --quiet --release --target wasm32-wasip1 \
  -p idemgate-filter --config 'profile.release.strip=false'
"$wasm_opt" "${filter_flags[@]}" -g "$out/cargo/wasm32-wasip1/release/idemgate_filter.wasm" \
  -o "$out/filter.named.wasm"
echo "[sizes] edge: cargo build --profile edge (names kept)"
CARGO_TARGET_DIR="$out/cargo" cargo build --quiet --profile edge --target wasm32-unknown-unknown \
  -p idemgate-edge
"$wasm_opt" "${edge_flags[@]}" -g "$out/cargo/wasm32-unknown-unknown/edge/idemgate_edge.wasm" \
  -o "$out/edge.named.wasm"
"$wasm_opt" "${edge_flags[@]}" "$out/cargo/wasm32-unknown-unknown/edge/idemgate_edge.wasm" \
  -o "$out/edge.stripped.wasm"

echo
echo "== filter (names kept; dist/idemgate.wasm is the same code without them)"
"$py" bench/wasm_sizes.py "$out/filter.named.wasm" --top 20 --functions "$n"
echo
echo "== edge (cargo's module + wasm-opt, before wasm-bindgen; names kept)"
"$py" bench/wasm_sizes.py "$out/edge.named.wasm" --top 20 --functions "$n"
echo
[[ -f dist/idemgate.wasm ]] && report "dist/idemgate.wasm (make build)" dist/idemgate.wasm
[[ -f edge/dist/module/idemgate_edge_bg.wasm ]] && \
  report "edge/dist/module/idemgate_edge_bg.wasm (make edge)" edge/dist/module/idemgate_edge_bg.wasm
report "edge, before wasm-bindgen (make edge: minus its ~24 kB section)" "$out/edge.stripped.wasm"
