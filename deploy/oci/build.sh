#!/usr/bin/env bash
# Build idemgate's module image offline (`make oci`): FROM scratch, /plugin.wasm, OCI labels.
#
#   WASM        the module to pack (default dist/idemgate.wasm, from `make build`)
#   VERSION     image version label and tag (default: the workspace version in Cargo.toml)
#   OCI_IMAGE   image to produce (default idemgate/idemgate-wasm:$VERSION)
#   OCI_SOURCE  org.opencontainers.image.source (default: the git remote `origin`, else the
#               label says "unknown")
#   OUT         also write the image to this tarball (`docker save` format: `docker load`,
#               `skopeo copy docker-archive:OUT docker://REGISTRY/NAME:TAG`)
#   FORCE=1     rebuild even when an image built from the same inputs exists
#
# The image has exactly one layer, holding /plugin.wasm: Istio's "compat" variant, also what
# Envoy Gateway's Image code source expects. Nothing is pulled (FROM scratch, --network none).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
log() { printf '[oci] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

workspace_version() {
  awk '/^\[workspace.package\]/{p=1; next} /^\[/{p=0} p && /^version *=/{gsub(/[" ]/, "", $0); sub(/^version=/, "", $0); print; exit}' "$ROOT/Cargo.toml"
}

WASM="${WASM:-$ROOT/dist/idemgate.wasm}"
VERSION="${VERSION:-$(workspace_version)}"
[[ -n "$VERSION" ]] || die "no version (set VERSION, or [workspace.package] version in Cargo.toml)"
OCI_IMAGE="${OCI_IMAGE:-idemgate/idemgate-wasm:$VERSION}"
OCI_SOURCE="${OCI_SOURCE:-$(git -C "$ROOT" config --get remote.origin.url 2>/dev/null || true)}"
OCI_SOURCE="${OCI_SOURCE:-unknown}"
REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
CREATED="$(git -C "$ROOT" log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)"

[[ -f "$WASM" ]] || die "module not found at $WASM (run: make build)"
# A wasm module starts with \0asm; refuse to pack anything else.
[[ "$(head -c 4 "$WASM" | od -An -c | tr -d ' ')" == '\0asm' ]] || die "$WASM is not a wasm module"
docker info >/dev/null 2>&1 || die "docker engine not reachable (run: make docker-up)"

wasm_sum="$(sha256sum "$WASM" | cut -c1-64)"
# Everything the image is made of: a change to any of it gives a new image.
build_sum="$( { cat "$WASM" "$HERE/Dockerfile" "${BASH_SOURCE[0]}"; printf '%s\n' "$VERSION" "$REVISION" "$OCI_SOURCE" "$CREATED"; } | sha256sum | cut -c1-64)"

if [[ "${FORCE:-0}" != 1 ]] && \
   [[ "$(docker image inspect -f '{{ index .Config.Labels "io.idemgate.build-sha256" }}' "$OCI_IMAGE" 2>/dev/null || true)" == "$build_sum" ]]; then
  log "$OCI_IMAGE is up to date (plugin.wasm sha256 ${wasm_sum:0:12})"
else
  ctx="$(mktemp -d "${TMPDIR:-/tmp}/idemgate-oci-ctx.XXXXXX")"
  trap 'rm -rf "$ctx"' EXIT
  cp "$HERE/Dockerfile" "$ctx/Dockerfile"
  cp "$WASM" "$ctx/plugin.wasm"
  chmod 0644 "$ctx/plugin.wasm"
  log "building $OCI_IMAGE (plugin.wasm $(stat -c %s "$WASM") bytes, sha256 ${wasm_sum:0:12})"
  # Legacy builder: works with any engine, needs no buildx plugin; --network none: nothing
  # can be fetched (FROM scratch needs nothing).
  if ! DOCKER_BUILDKIT=0 docker build --network none \
      --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" \
      --build-arg "SOURCE=$OCI_SOURCE" --build-arg "CREATED=$CREATED" \
      --build-arg "WASM_SHA256=$wasm_sum" --build-arg "BUILD_SHA256=$build_sum" \
      -t "$OCI_IMAGE" "$ctx" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log" >&2
    die "docker build failed"
  fi
fi

layers="$(docker image inspect -f '{{ len .RootFS.Layers }}' "$OCI_IMAGE")"
[[ "$layers" == 1 ]] || die "$OCI_IMAGE has $layers layers; a module image must have exactly one"

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$(dirname "$OUT")"
  docker save -o "$OUT.tmp" "$OCI_IMAGE"
  mv "$OUT.tmp" "$OUT"
  log "wrote $OUT ($(stat -c %s "$OUT") bytes)"
fi
log "$OCI_IMAGE: version $VERSION, revision ${REVISION:0:12}, source $OCI_SOURCE"
