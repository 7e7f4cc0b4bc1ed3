#!/usr/bin/env bash
# `make dist`: a release's artifacts in dist/, from what `make build`, `make edge` and
# deploy/oci/build.sh produce (run through make, which builds those first):
#
#   dist/idemgate-<version>.wasm             the Envoy module (what dist/idemgate.wasm is)
#   dist/idemgate-<version>.wasm.sha256      its sha256 (`sha256sum -c` format; the value for
#                                            Istio's `sha256:` and Envoy's remote `sha256`)
#   dist/idemgate-wasm-<version>.docker.tar  the module image ($OCI_IMAGE; `docker load -i`, or
#                                            `skopeo copy docker-archive:… docker://…` to push)
#   dist/idemgate-edge-<version>.tgz         the edge package idemgate-edge (`make edge-pack`:
#                                            npm pack of edge/), for `npm install` into a worker
#                                            made from edge/template, or for Deno
#   dist/SHA256SUMS                          sha256 of all four
#
# Env: VERSION (required), OCI_IMAGE (default idemgate/idemgate-wasm:$VERSION), OCI_SOURCE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[dist] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

VERSION="${VERSION:?set VERSION}"
OCI_IMAGE="${OCI_IMAGE:-idemgate/idemgate-wasm:$VERSION}"
[[ "$VERSION" =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]] || die "VERSION must be a plain version string, got '$VERSION'"

wasm="idemgate-$VERSION.wasm"
image_tar="idemgate-wasm-$VERSION.docker.tar"
edge_tgz="idemgate-edge-$VERSION.tgz"

[[ -f dist/idemgate.wasm ]] || die "dist/idemgate.wasm missing (run: make build)"
[[ -f "dist/$edge_tgz" ]] || die "dist/$edge_tgz missing (run: make edge-pack; the package's version must be $VERSION)"

cp dist/idemgate.wasm "dist/$wasm.tmp" && mv "dist/$wasm.tmp" "dist/$wasm"
(cd dist && sha256sum "$wasm" >"$wasm.sha256")
log "dist/$wasm ($(stat -c %s "dist/$wasm") bytes, sha256 $(cut -c1-12 "dist/$wasm.sha256"))"

VERSION="$VERSION" OCI_IMAGE="$OCI_IMAGE" WASM="dist/$wasm" OUT="dist/$image_tar" deploy/oci/build.sh

log "dist/$edge_tgz ($(stat -c %s "dist/$edge_tgz") bytes, from make edge-pack)"

(cd dist && sha256sum "$wasm" "$image_tar" "$edge_tgz" "$wasm.sha256" >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
log "dist/SHA256SUMS:"; sed 's/^/[dist]   /' dist/SHA256SUMS >&2
