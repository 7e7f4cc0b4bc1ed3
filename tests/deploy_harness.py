"""Helpers for the tests of deploy/ and `make oci`/`make dist`: a local image registry (Debian
`docker-registry`), the registry client steps Istio's agent and Envoy Gateway take to get a
module out of an image, a static HTTP server for Envoy's remote Wasm code, and a Prometheus
(Debian `prometheus`). Every process is started on 127.0.0.1 on a free port, with its data in
a temp dir, and stopped by PID. Importable without pytest.

    with Registry() as reg:
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false",
                        "docker-archive:dist/idemgate-wasm-0.1.0.docker.tar",
                        f"docker://{reg.host}/idemgate/idemgate-wasm:0.1.0"], check=True)
        wasm, manifest, config = reg.pull_module("idemgate/idemgate-wasm", "0.1.0")
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from harness import REPO_ROOT, free_port

DIST = REPO_ROOT / "dist"
DEPLOY = REPO_ROOT / "deploy"

# The manifest media types Istio's agent and Envoy Gateway's cache accept (go-containerregistry).
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# Layer types from which Istio's "compat" extraction takes plugin.wasm (a gzipped tar).
GZIP_LAYERS = {"application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.oci.image.layer.v1.tar+gzip"}
PLUGIN_FILE = "plugin.wasm"


def version() -> str:
    """The version `make dist` names its artifacts with (IDEMGATE_VERSION, as the Makefile
    exports it; else the workspace version in Cargo.toml)."""
    v = os.environ.get("IDEMGATE_VERSION")
    if v:
        return v
    in_ws = False
    for line in (REPO_ROOT / "Cargo.toml").read_text().splitlines():
        if line.strip().startswith("["):
            in_ws = line.strip() == "[workspace.package]"
        elif in_ws and line.split("=")[0].strip() == "version":
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no [workspace.package] version in Cargo.toml")


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} not found on PATH ({hint})")
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll url until it answers 2xx; raise with the log if it does not, or if proc exits
    meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:  # refused, or an HTTP error status (not ready yet)
            time.sleep(0.1)
    text = log.read_text(errors="replace") if log and log.exists() else ""
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{text[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


# --------------------------------------------------------------------------- processes


class Served:
    """A server process of this test run on 127.0.0.1: started by `spawn`, stopped by PID,
    its files in a temp dir removed."""

    def __init__(self, binary: str, prefix: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, args: list[str], ready_path: str, timeout: float = 60) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT)
        wait_http(self.url + ready_path, timeout, self.proc, self.log)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self) -> "Served":
        raise NotImplementedError

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- registry


class Registry(Served):
    """Debian's docker-registry (distribution 2.8) on 127.0.0.1, storage in a temp dir,
    no auth, plain HTTP (Docker and skopeo treat 127.0.0.0/8 registries as insecure-allowed
    only with the flags below)."""

    def __init__(self) -> None:
        super().__init__(require_tool("docker-registry", "make deploy-deps installs Debian's docker-registry"),
                         "idemgate-registry-")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Registry":
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.dir / 'data'}}}}}\n"
            f"http: {{addr: '{self.host}'}}\n"
        )
        self.spawn(["serve", str(config)], "/v2/", 30)
        return self

    # -- the registry API, as an image puller uses it -------------------------------------

    def _get(self, path: str, accept: str | None = None) -> tuple[bytes, Mapping[str, str]]:
        req = urllib.request.Request(self.url + path)
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read(), dict(r.headers)

    def manifest(self, repo: str, ref: str) -> tuple[dict[str, Any], str]:
        """(manifest, its digest) for repo:ref (a tag or a digest)."""
        body, headers = self._get(f"/v2/{repo}/manifests/{ref}", accept=f"{DOCKER_MANIFEST}, {OCI_MANIFEST}")
        digest = "sha256:" + sha256(body)
        if headers.get("Docker-Content-Digest") not in (None, digest):
            raise AssertionError(f"registry says {headers.get('Docker-Content-Digest')}, content is {digest}")
        return json.loads(body), digest

    def blob(self, repo: str, digest: str) -> bytes:
        data, _ = self._get(f"/v2/{repo}/blobs/{digest}")
        if "sha256:" + sha256(data) != digest:
            raise AssertionError(f"blob {digest} has the wrong content")
        return data

    def pull_module(self, repo: str, ref: str) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """Fetch a module image the way Istio's agent does (pkg/wasm/imagefetcher.go, the
        Docker and "compat" variants): the manifest, then the LAST layer, which must be a
        gzipped tar, and plugin.wasm out of it. Returns (wasm, manifest, image config)."""
        manifest, _ = self.manifest(repo, ref)
        layers = manifest.get("layers") or []
        if not layers:
            raise AssertionError(f"{repo}:{ref} has no layers: {manifest}")
        layer = layers[-1]
        if layer["mediaType"] not in GZIP_LAYERS:
            raise AssertionError(f"last layer is {layer['mediaType']}, Istio needs one of {sorted(GZIP_LAYERS)}")
        wasm = plugin_from_layer(gzip.decompress(self.blob(repo, layer["digest"])))
        config = json.loads(self.blob(repo, manifest["config"]["digest"]))
        return wasm, manifest, config


def layer_members(layer_tar: bytes) -> dict[str, bytes]:
    """Regular files of an uncompressed layer tar, by path (without a leading ./ or /)."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name.lstrip("./").lstrip("/")] = f.read()
    return out


def plugin_from_layer(layer_tar: bytes) -> bytes:
    """plugin.wasm from a layer, found by base name as Istio does; the layer must hold
    nothing else."""
    files = layer_members(layer_tar)
    if list(files) != [PLUGIN_FILE]:
        raise AssertionError(f"the module layer must hold only {PLUGIN_FILE}, it holds {sorted(files)}")
    return files[PLUGIN_FILE]


def docker_archive_image(path: Path) -> tuple[dict[str, Any], list[bytes]]:
    """(image config, uncompressed layer tars) of a `docker save` tarball with one image."""
    with tarfile.open(path) as tar:
        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None, name
            return f.read()

        (entry,) = json.loads(read("manifest.json"))
        return json.loads(read(entry["Config"])), [read(layer) for layer in entry["Layers"]]


# --------------------------------------------------------------------------- file server


class FileServer:
    """A static HTTP/1.1 server on 127.0.0.1 (a thread of this process) serving `files`
    (URL path -> bytes), as Envoy Gateway's Wasm HTTP server serves modules to Envoy;
    records every path it was asked for."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = dict(files)
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.hits.append(self.path)
                body = outer.files.get(self.path)
                status = 200 if body is not None else 404
                body = body if body is not None else b"not found\n"
                self.send_response(status)
                self.send_header("Content-Type", "application/wasm" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- prometheus


class Prometheus(Served):
    """Debian's prometheus on 127.0.0.1 with `config` (a dict: the prometheus.yaml), its
    TSDB in a temp dir; `query`, `alerts` and `api` wrap the HTTP API."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(require_tool("prometheus", "make deploy-deps installs Debian's prometheus"),
                         "idemgate-prometheus-")
        self.config = config

    def start(self) -> "Prometheus":
        import yaml

        cfg = self.dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(dict(self.config), sort_keys=False))
        self.spawn([f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], "/-/ready")
        return self

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path} {params}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        if doc.get("status") != "success":
            raise AssertionError(f"{path} {params}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]
