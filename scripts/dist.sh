#!/usr/bin/env bash
# `make dist`: a release's artifacts in dist/, from what `make build`, `make edge` and
# deploy/oci/build.sh produce (run through make, which builds those first):
#
#   dist/idemgate-<version>.wasm             the Envoy module (what dist/idemgate.wasm is)
#   dist/idemgate-<version>.wasm.sha256      its sha256 (`sha256sum -c` format; the value for
#                                            Istio's `sha256:` and Envoy's remote `sha256`)
#   dist/idemgate-wasm-<version>.docker.tar  the module image ($OCI_IMAGE; `docker load -i`, or
#                                            `skopeo copy docker-archive:… docker://…` to push)
#   dist/idemgate-edge-<version>.tar.gz      the edge worker: worker/, dist/{module,web}/,
#                                            wrangler.toml, unpacked = ready for `wrangler deploy`
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
edge_tgz="idemgate-edge-$VERSION.tar.gz"

[[ -f dist/idemgate.wasm ]] || die "dist/idemgate.wasm missing (run: make build)"
for f in edge/dist/module/idemgate_edge_bg.wasm edge/dist/web/idemgate_edge_bg.wasm edge/wrangler.toml; do
  [[ -f "$f" ]] || die "$f missing (run: make edge)"
done

cp dist/idemgate.wasm "dist/$wasm.tmp" && mv "dist/$wasm.tmp" "dist/$wasm"
(cd dist && sha256sum "$wasm" >"$wasm.sha256")
log "dist/$wasm ($(stat -c %s "dist/$wasm") bytes, sha256 $(cut -c1-12 "dist/$wasm.sha256"))"

VERSION="$VERSION" OCI_IMAGE="$OCI_IMAGE" WASM="dist/$wasm" OUT="dist/$image_tar" deploy/oci/build.sh

# The edge bundle keeps edge/'s layout (the worker imports ../dist/module/), so the unpacked
# directory deploys as it is. Sorted, owner-less and dated at the commit: the same sources
# give the same tarball.
mtime="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
stage="$(mktemp -d "${TMPDIR:-/tmp}/idemgate-dist.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
top="$stage/idemgate-edge-$VERSION"
mkdir -p "$top/dist"
cp -r edge/worker "$top/worker"
cp -r edge/dist/module edge/dist/web "$top/dist/"
cp edge/wrangler.toml "$top/wrangler.toml"
cat >"$top/README.md" <<TXT
# idemgate $VERSION for edge workers

- \`worker/\`: the ES-module worker (\`index.js\`) and its Durable Object (\`store.js\`);
  \`workerd.capnp\` runs it under plain \`workerd serve\`.
- \`dist/module/\`: the core for workerd and Cloudflare Workers (wasm-bindgen \`--target module\`);
  \`dist/web/\`: the same for other Web-standard runtimes (\`--target web\`).
- \`wrangler.toml\`: set \`ORIGIN_URL\` (or an \`ORIGIN\` service binding) and \`IDEMGATE_CONFIG\`
  (the same JSON as the Envoy filter's), then \`npx wrangler deploy\` from this directory.
TXT
find "$top" -type d -exec chmod 0755 {} + ; find "$top" -type f -exec chmod 0644 {} +
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$mtime" -C "$stage" \
  -cf - "idemgate-edge-$VERSION" | gzip -9 -n >"dist/$edge_tgz.tmp"
mv "dist/$edge_tgz.tmp" "dist/$edge_tgz"
log "dist/$edge_tgz ($(stat -c %s "dist/$edge_tgz") bytes)"

(cd dist && sha256sum "$wasm" "$image_tar" "$edge_tgz" "$wasm.sha256" >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
log "dist/SHA256SUMS:"; sed 's/^/[dist]   /' dist/SHA256SUMS >&2
