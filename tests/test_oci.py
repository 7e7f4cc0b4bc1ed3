"""`make dist` and `make oci`: the release artifacts, and the module image through a real
registry (Debian's docker-registry on loopback) pushed and pulled back the ways users and
control planes do it: `skopeo copy` from the dist tarball, `docker push`/`docker pull` of an
image built offline, and the registry API steps Istio's agent takes to get plugin.wasm out.

`make test` runs `make dist` before pytest (integration-setup), so dist/ is this tree's.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from deploy_harness import (
    DIST,
    GZIP_LAYERS,
    PLUGIN_FILE,
    Registry,
    docker_archive_image,
    layer_members,
    plugin_from_layer,
    require_tool,
    sha256,
    version,
)
from harness import REPO_ROOT, ensure_docker

VERSION = version()
WASM = DIST / f"idemgate-{VERSION}.wasm"
IMAGE_TAR = DIST / f"idemgate-wasm-{VERSION}.docker.tar"
EDGE_TGZ = DIST / f"idemgate-edge-{VERSION}.tgz"
LABEL_KEYS = (
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.source",
    "org.opencontainers.image.title",
    "org.opencontainers.image.licenses",
)


def run(*cmd: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def dist_files() -> None:
    missing = [p.name for p in (WASM, IMAGE_TAR, EDGE_TGZ, DIST / "SHA256SUMS") if not p.is_file()]
    if missing:
        pytest.fail(f"dist/ lacks {missing}: run `make dist`")


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    require_tool("skopeo", "make deploy-deps installs Debian's skopeo")
    with Registry() as reg:
        yield reg


def assert_labels(labels: dict[str, str], wasm: bytes) -> None:
    for k in LABEL_KEYS:
        assert labels.get(k), f"label {k} missing: {labels}"
    assert labels["org.opencontainers.image.version"] == VERSION
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert labels["org.opencontainers.image.revision"] == head.stdout.strip()
    assert labels["io.idemgate.wasm-sha256"] == sha256(wasm)


# --------------------------------------------------------------------------- dist/


def test_dist_has_the_versioned_module_and_its_checksums(dist_files):
    wasm = WASM.read_bytes()
    assert wasm[:4] == b"\0asm"
    assert wasm == (DIST / "idemgate.wasm").read_bytes(), "dist/ holds a module other than this build's"
    assert (DIST / f"{WASM.name}.sha256").read_text() == f"{sha256(wasm)}  {WASM.name}\n"
    sums = dict(reversed(line.split("  ", 1)) for line in (DIST / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {WASM.name, IMAGE_TAR.name, EDGE_TGZ.name, f"{WASM.name}.sha256"}
    for name, digest in sums.items():
        assert sha256((DIST / name).read_bytes()) == digest, name
    # `sha256sum -c` is how a user checks a download
    run("sha256sum", "-c", "SHA256SUMS", cwd=str(DIST))


def test_dist_image_tarball_is_one_layer_with_the_module(dist_files):
    config, layers = docker_archive_image(IMAGE_TAR)
    assert len(layers) == 1, f"{len(layers)} layers"
    assert plugin_from_layer(layers[0]) == WASM.read_bytes()
    assert_labels(config["config"]["Labels"], WASM.read_bytes())
    # nothing to run: a module image has no entrypoint or command of its own
    assert not config["config"].get("Entrypoint") and not config["config"].get("Cmd")


def test_dist_edge_package_is_this_edge_build(dist_files):
    """The edge package (`make edge-pack`, npm pack of edge/) is this build's, at this
    version; edge/test/package.test.js installs such a tarball into edge/template and deploys
    it with wrangler --dry-run."""
    with tarfile.open(EDGE_TGZ) as tar:
        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None, name
            return f.read()

        assert json.loads(read("package/package.json"))["version"] == VERSION
        for variant in ("module", "web"):
            built = REPO_ROOT / "edge" / "dist" / variant / "idemgate_edge_bg.wasm"
            assert read(f"package/dist/{variant}/idemgate_edge_bg.wasm") == built.read_bytes(), variant
        assert read("package/worker/index.js") == (REPO_ROOT / "edge" / "worker" / "index.js").read_bytes()


# --------------------------------------------------------------------------- registry


def test_dist_tarball_pushed_with_skopeo_and_pulled_back_as_istio_does(dist_files, registry):
    repo, tag = "idemgate/idemgate-wasm", VERSION
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
        f"docker-archive:{IMAGE_TAR}", f"docker://{registry.host}/{repo}:{tag}")
    wasm, manifest, config = registry.pull_module(repo, tag)
    assert wasm == WASM.read_bytes()
    assert len(manifest["layers"]) == 1 and manifest["layers"][0]["mediaType"] in GZIP_LAYERS
    assert_labels(config["config"]["Labels"], wasm)

    # pinned by digest, as a production WasmPlugin/EnvoyExtensionPolicy should be
    _, digest = registry.manifest(repo, tag)
    assert registry.pull_module(repo, digest)[0] == wasm

    # skopeo pulls it back into an OCI layout: still one gzip layer holding the module
    layout = Path(tempfile.mkdtemp(prefix="idemgate-oci-layout-"))
    try:
        run("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{registry.host}/{repo}:{tag}", f"oci:{layout}:{tag}")
        index = json.loads((layout / "index.json").read_text())
        (desc,) = index["manifests"]
        m = json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_text())
        (layer,) = m["layers"]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip", layer
        blob = (layout / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
        assert plugin_from_layer(gzip.decompress(blob)) == wasm
    finally:
        shutil.rmtree(layout, ignore_errors=True)


def test_image_built_offline_from_scratch_docker_push_and_pull(registry, tmp_path):
    """The path a fresh machine takes (no image yet): deploy/oci/build.sh builds under a name
    of this test's own (--network none, nothing pulled), docker pushes it, the local copy is
    removed, docker pulls it back, and the module comes out of it byte for byte."""
    ensure_docker()
    wasm = (DIST / "idemgate.wasm").read_bytes()
    name = f"idemgate-test/oci-{secrets.token_hex(4)}"
    local, remote = f"{name}:{VERSION}", f"{registry.host}/{name}:{VERSION}"
    try:
        run(str(REPO_ROOT / "deploy/oci/build.sh"), env={**os.environ, "OCI_IMAGE": local, "FORCE": "1",
            "WASM": str(DIST / "idemgate.wasm"), "OUT": str(tmp_path / "image.tar")}, timeout=300)
        inspect = json.loads(run("docker", "image", "inspect", local).stdout)[0]
        assert len(inspect["RootFS"]["Layers"]) == 1
        assert_labels(inspect["Config"]["Labels"], wasm)
        run("docker", "tag", local, remote)
        run("docker", "push", remote, timeout=180)
        run("docker", "rmi", local, remote)
        assert subprocess.run(["docker", "image", "inspect", remote], capture_output=True).returncode != 0
        run("docker", "pull", remote, timeout=180)
        # docker can't run a FROM scratch image, but it can copy a file out of a container
        cid = run("docker", "create", remote, "none").stdout.strip()
        try:
            run("docker", "cp", f"{cid}:/{PLUGIN_FILE}", str(tmp_path / PLUGIN_FILE))
        finally:
            run("docker", "rm", cid)
        assert (tmp_path / PLUGIN_FILE).read_bytes() == wasm
        # and an image puller sees one gzip layer holding only plugin.wasm
        got, manifest, _ = registry.pull_module(name, VERSION)
        assert got == wasm and len(manifest["layers"]) == 1
        # the tarball written beside it is the same image
        _, layers = docker_archive_image(tmp_path / "image.tar")
        assert list(layer_members(layers[0])) == [PLUGIN_FILE]
    finally:
        subprocess.run(["docker", "rmi", "-f", local, remote], capture_output=True)


def test_build_refuses_a_file_that_is_not_a_wasm_module(tmp_path):
    bogus = tmp_path / "plugin.wasm"
    bogus.write_bytes(b"#!/bin/sh\necho not wasm\n")
    r = subprocess.run([str(REPO_ROOT / "deploy/oci/build.sh")], capture_output=True, text=True,
                       env={**os.environ, "WASM": str(bogus), "OCI_IMAGE": "idemgate-test/never:0"}, timeout=60)
    assert r.returncode != 0
    assert "is not a wasm module" in r.stderr
    missing = subprocess.run([str(REPO_ROOT / "deploy/oci/build.sh")], capture_output=True, text=True,
                             env={**os.environ, "WASM": str(tmp_path / "absent.wasm")}, timeout=60)
    assert missing.returncode != 0 and "run: make build" in missing.stderr
