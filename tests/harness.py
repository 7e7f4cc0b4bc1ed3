"""Test harness for idemgate: a real Envoy (in Docker) in front of tests/origin.py.

Importable helper module, no pytest dependency. Everything listens on 127.0.0.1.

Listeners load idemgate as shipped (envoy/envoy.yaml): one filter with
allow_on_headers_stop_iteration (single-filter mode) and failure_policy FAIL_RELOAD;
listener(..., mode="two") loads the reader and the gate instead (two-filter mode, for hosts
that cannot set the flag), mode="two-buffer" with Envoy's buffer filter (which holds the
headers until the body is complete) between them, mode="single-noflag" one filter without
the flag (a misconfiguration). listener(..., upstream="h2") talks HTTP/2 to the origin
(through a plain Envoy listener in front of it, in the same Envoy).

    from harness import Origin, Envoy, listener, validate_config

    with Origin() as origin, Envoy([listener("main", free_port(), {"methods": ["POST"]})],
                                   origin_port=origin.port) as envoy:
        urllib.request.urlopen(envoy.url + "/x")
        origin.requests()

Environment:
    ENVOY_IMAGE     Envoy image (default idemgate/envoy:1.40.0, built by `make image`)
    IDEMGATE_WASM   filter wasm on the host (default <repo>/dist/idemgate.wasm, `make build`)
    IDEMGATE_CACHE  cache dir (default ~/.cache/idemgate), used for the docker PID file
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
ORIGIN_SCRIPT = TESTS_DIR / "origin.py"
DOCKER_ENGINE_SCRIPT = REPO_ROOT / "scripts" / "docker-engine.sh"

ENVOY_VERSION = "1.40.0"
DEFAULT_ENVOY_IMAGE = f"idemgate/envoy:{ENVOY_VERSION}"

# Paths inside the Envoy container.
CONTAINER_WASM = "/etc/idemgate/idemgate.wasm"
CONTAINER_CONFIG_DIR = "/etc/envoy"
CONTAINER_ENVOY = "/usr/local/bin/envoy"

BUFFER_LIMIT_BYTES = 16 * 1024 * 1024
# idemgate counts its metrics in the VM and flushes them to Envoy's stats from the root
# context's tick (METRICS_FLUSH_MS in filter/src/lib.rs): the most a counter lags, in seconds.
METRICS_FLUSH_S = 1.0
# idemgate's metrics are wasmcustom.idemgate.<namespace>.<name>; this tag turns them into
# idemgate_<name>{idemgate_namespace="<namespace>"} at /stats/prometheus.
STATS_CONFIG = {
    "stats_tags": [{"tag_name": "idemgate_namespace", "regex": r"^wasmcustom\.idemgate\.((.+?)\.)"}]
}
DEFAULT_ROUTE_TIMEOUT_S: float = 15.0
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
ROUTER_FILTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
# The failure policy of the shipped configurations: a VM that fails answers 503 (nothing
# passes unguarded) and is reloaded for later requests.
SHIPPED_FAILURE_POLICY = "FAIL_RELOAD"
# How idemgate is loaded: see the module docstring.
MODES = ("single", "two", "two-buffer", "single-noflag")
# Cluster options that make Envoy speak HTTP/2 (h2c) to an upstream.
H2_UPSTREAM_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def cache_dir() -> Path:
    """Where `make` keeps what it installs and downloads ($IDEMGATE_CACHE)."""
    return Path(os.environ.get("IDEMGATE_CACHE") or Path.home() / ".cache" / "idemgate")


def envoy_image() -> str:
    return os.environ.get("ENVOY_IMAGE") or DEFAULT_ENVOY_IMAGE


def wasm_path() -> Path:
    return Path(os.environ.get("IDEMGATE_WASM") or REPO_ROOT / "dist" / "idemgate.wasm").resolve()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: Sequence[str], timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=check
    )


def docker_ok() -> bool:
    try:
        return _run(["docker", "info"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_docker() -> None:
    """Make sure a Docker engine answers (starting one via scripts/docker-engine.sh
    if needed; `make docker-down` stops it again) and that the Envoy image exists."""
    if not docker_ok():
        r = _run(["bash", str(DOCKER_ENGINE_SCRIPT), "up"], timeout=600)
        if r.returncode != 0 or not docker_ok():
            raise RuntimeError(f"no docker engine answers and starting one failed:\n{r.stdout}")
    image = envoy_image()
    if _run(["docker", "image", "inspect", image], timeout=30).returncode != 0:
        raise RuntimeError(f"Envoy image {image!r} not found; run `make image` (or set ENVOY_IMAGE)")


def _http(
    method: str, url: str, body: bytes | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------- origin


class Origin:
    """tests/origin.py in a subprocess on free ports (127.0.0.1)."""

    def __init__(self, port: int = 0, control_port: int = 0, verbose: bool = True,
                 extra_args: Sequence[str] = ()) -> None:
        self._want = (port, control_port)
        self.verbose = verbose
        self.extra_args = list(extra_args)
        self.port = 0
        self.control_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="idemgate-origin-")
        self.log_path = Path(self._dir) / "origin.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def start(self, timeout: float = 15) -> "Origin":
        cmd = [
            sys.executable, "-u", str(ORIGIN_SCRIPT),
            "--port", str(self._want[0]), "--control-port", str(self._want[1]),
        ]
        if self.verbose:
            cmd.append("--verbose")
        cmd += self.extra_args
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"READY port=(\d+) control_port=(\d+)", self.logs())
            if m:
                self.port, self.control_port = int(m.group(1)), int(m.group(2))
                if _http("GET", self.control_url + "/healthz", timeout=2)[0] == 200:
                    _ALIVE.add(self)
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        out = self.logs()
        self.stop()
        raise RuntimeError(f"origin did not start:\n{out}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests(self) -> list[dict[str, Any]]:
        """Recorded requests in arrival order (see tests/origin.py for the fields)."""
        status, body = _http("GET", self.control_url + "/requests")
        if status != 200:
            raise RuntimeError(f"origin /requests answered {status}")
        return json.loads(body)

    def reset(self) -> None:
        status, _ = _http("POST", self.control_url + "/reset", body=b"")
        if status != 200:
            raise RuntimeError(f"origin /reset answered {status}")

    def wait_for_requests(self, n: int, timeout: float = 10, complete: bool = False) -> list[dict[str, Any]]:
        """Poll until at least n requests are recorded (with complete=True: n whose
        body finished); return the log. Raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            reqs = self.requests()
            have = sum(1 for r in reqs if r.get("body_complete")) if complete else len(reqs)
            if have >= n:
                return reqs
            if time.monotonic() > deadline:
                raise TimeoutError(f"origin saw {have} requests, wanted {n}: {reqs}")
            time.sleep(0.05)

    def stop(self) -> None:
        _ALIVE.discard(self)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "Origin":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


# --------------------------------------------------------------------------- load


WRK_UNIQUE_KEYS = """
-- unique key per request: run prefix, wrk thread id (set as a global by setup), counter
local counter = 0
local prefix = "%s"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
request = function()
  counter = counter + 1
  local headers = { ["Idempotency-Key"] = prefix .. "-" .. tostring(tid) .. "-" .. counter, ["Content-Type"] = "application/json" }
  return wrk.format("POST", "%s", headers, '{"n":' .. counter .. '}')
end
"""


def wrk_unique_keys(port: int, prefix: str, path: str, seconds: int, connections: int, threads: int,
                    tmp: Path) -> tuple[int, int, str]:
    """wrk (Debian's, `make deps-sys`) POSTing JSON to `path` with a new Idempotency-Key per
    request: (requests, non-2xx answers, wrk's output)."""
    script = tmp / f"{prefix}.lua"
    script.write_text(WRK_UNIQUE_KEYS % (prefix, path))
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
         "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=seconds + 60,
    ).stdout
    total = non2xx = 0
    for line in out.splitlines():
        line = line.strip()
        if " requests in " in line:
            total = int(line.split()[0])
        if line.startswith("Non-2xx or 3xx responses:"):
            non2xx = int(line.split(":")[1])
    return total, non2xx, out


# --------------------------------------------------------------------------- envoy config


def listener(
    name: str,
    port: int,
    idemgate_config: Mapping[str, Any] | str | None = None,
    route_timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S,
    vm_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A listener spec for Envoy()/build_envoy_config(). Extra keys:
    mode (one of MODES, default "single"), upstream ("h1" default, or "h2"),
    address (default 127.0.0.1), gate_config (default "{}"), failure_policy
    (default SHIPPED_FAILURE_POLICY; None for Envoy's default) or the older fail_open: bool,
    buffer_limit_bytes (default 16 MiB)."""
    spec: dict[str, Any] = {
        "name": name,
        "port": port,
        "idemgate_config": {} if idemgate_config is None else idemgate_config,
        "route_timeout_s": route_timeout_s,
    }
    if vm_id is not None:
        spec["vm_id"] = vm_id
    spec.update(extra)
    return spec


def _duration(seconds: float) -> str:
    s = f"{float(seconds):.3f}".rstrip("0").rstrip(".")
    return f"{s}s"


def _addr(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": int(port)}}


def _wasm_filter(name: str, configuration: str, vm_id: str, failure: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": WASM_FILTER_TYPE,
            "config": {
                "name": name,
                "root_id": name,
                "configuration": {"@type": STRING_VALUE_TYPE, "value": configuration},
                **failure,
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": CONTAINER_WASM}},
                },
            },
        },
    }


def idemgate_filters(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The http filters (before the router) that load idemgate for a listener spec, as its
    mode says: the reader "idemgate" alone (single-filter), or the reader and the gate
    "idemgate_gate" sharing one VM (identical vm_config), optionally with Envoy's buffer
    filter between them."""
    mode = spec.get("mode", "single")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = spec.get("idemgate_config", {})
    cfg_str = cfg if isinstance(cfg, str) else json.dumps(cfg, separators=(",", ":"))
    gate = spec.get("gate_config", "{}")
    gate_str = gate if isinstance(gate, str) else json.dumps(gate, separators=(",", ":"))
    vm_id = spec.get("vm_id") or f"idemgate-{spec['name']}"
    failure: dict[str, Any] = {}
    if "fail_open" in spec:
        failure["fail_open"] = bool(spec["fail_open"])
    elif spec.get("failure_policy", SHIPPED_FAILURE_POLICY) is not None:
        failure["failure_policy"] = spec.get("failure_policy", SHIPPED_FAILURE_POLICY)
    reader_flags = {"allow_on_headers_stop_iteration": True} if mode == "single" else {}
    reader = _wasm_filter("idemgate", cfg_str, vm_id, {**failure, **reader_flags})
    if mode in ("single", "single-noflag"):
        return [reader]
    between = []
    if mode == "two-buffer":
        between.append({
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": BUFFER_LIMIT_BYTES,
            },
        })
    return [reader, *between, _wasm_filter("idemgate_gate", gate_str, vm_id, failure)]


def _hcm_listener(name: str, address: str, port: int, limit: int, cluster: str, timeout_s: float,
                  http_filters: list[dict[str, Any]]) -> dict[str, Any]:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "name": f"{name}_routes",
            "virtual_hosts": [
                {
                    "name": "origin",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": _duration(timeout_s)}}
                    ],
                }
            ],
        },
        "http_filters": [*http_filters, ROUTER_FILTER],
    }
    return {
        "name": name,
        "address": _addr(address, port),
        "per_connection_buffer_limit_bytes": limit,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _origin_cluster(name: str, host: str, port: int, h2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(host, port)}}]}],
        },
    }
    if h2:
        cluster["typed_extension_protocol_options"] = H2_UPSTREAM_OPTIONS
    return cluster


def build_envoy_config(
    listeners: Iterable[Mapping[str, Any]],
    origin_port: int,
    admin_port: int,
    origin_host: str = "127.0.0.1",
) -> dict[str, Any]:
    """Envoy bootstrap (as a dict, dump it as JSON) for the given listener specs."""
    specs = list(listeners)
    out_listeners = []
    clusters = [_origin_cluster("origin", origin_host, origin_port)]
    if any(spec.get("upstream", "h1") == "h2" for spec in specs):
        # HTTP/2 to the origin: a plain listener of this Envoy speaks h2c in front of it.
        front = free_port()
        out_listeners.append(_hcm_listener("origin_h2_front", "127.0.0.1", front, BUFFER_LIMIT_BYTES,
                                           "origin", 0, []))
        clusters.append(_origin_cluster("origin_h2", "127.0.0.1", front, h2=True))
    for spec in specs:
        upstream = spec.get("upstream", "h1")
        if upstream not in ("h1", "h2"):
            raise ValueError(f"upstream must be h1 or h2, got {upstream!r}")
        out_listeners.append(_hcm_listener(
            spec["name"], spec.get("address", "127.0.0.1"), spec["port"],
            int(spec.get("buffer_limit_bytes", BUFFER_LIMIT_BYTES)),
            "origin_h2" if upstream == "h2" else "origin",
            spec.get("route_timeout_s", DEFAULT_ROUTE_TIMEOUT_S),
            idemgate_filters(spec),
        ))
    return {
        "node": {"id": "idemgate-test", "cluster": "idemgate-test"},
        "admin": {"address": _addr("127.0.0.1", admin_port)},
        "stats_config": STATS_CONFIG,
        "static_resources": {"listeners": out_listeners, "clusters": clusters},
    }


def shipped_config(
    path: Path | str, listen_port: int, admin_port: int, origin_port: int, origin_host: str = "127.0.0.1"
) -> dict[str, Any]:
    """A shipped Envoy configuration (envoy/envoy.yaml) as it is, but for its addresses: the
    listener on 127.0.0.1:`listen_port`, the admin on `admin_port`, the origin cluster's
    one endpoint at `origin_host`:`origin_port`. The Wasm module stays where the shipped
    file loads it from (/etc/idemgate/idemgate.wasm, where Envoy() mounts it)."""
    import yaml  # PyYAML, installed by `make deps-py`

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    (lst,) = doc["static_resources"]["listeners"]
    lst["address"]["socket_address"].update(address="127.0.0.1", port_value=listen_port)
    origin = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "origin")
    (group,) = origin["load_assignment"]["endpoints"]
    (endpoint,) = group["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"].update(address=origin_host, port_value=origin_port)
    return doc


def _docker_volume_args(config_dir: str, wasm: Path) -> list[str]:
    if not wasm.is_file():
        # docker -v would silently create a directory at a missing host path.
        raise FileNotFoundError(f"filter wasm not found at {wasm}; run `make build` (or set IDEMGATE_WASM)")
    return ["-v", f"{config_dir}:{CONTAINER_CONFIG_DIR}:ro", "-v", f"{wasm}:{CONTAINER_WASM}:ro"]


def _write_config(config_dir: str, config: Mapping[str, Any] | str, filename: str) -> None:
    path = Path(config_dir) / filename
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))
    os.chmod(config_dir, 0o755)
    os.chmod(path, 0o644)


def validate_config(
    listeners: Iterable[Mapping[str, Any]] = (),
    origin_port: int = 8080,
    admin_port: int = 9901,
    *,
    raw_config: str | Mapping[str, Any] | None = None,
    filename: str = "envoy.json",
    image: str | None = None,
    wasm: Path | str | None = None,
    timeout: float = 120,
) -> tuple[int, str]:
    """Run `envoy --mode validate` on a config (built from listener specs, or
    raw_config as given) in a throw-away container; this also loads the wasm and
    runs the plugins' on_configure. Returns (returncode, combined output)."""
    config: Mapping[str, Any] | str = (
        raw_config if raw_config is not None else build_envoy_config(listeners, origin_port, admin_port)
    )
    tmp = tempfile.mkdtemp(prefix="idemgate-validate-")
    try:
        _write_config(tmp, config, filename)
        cmd = [
            "docker", "run", "--rm", "--network", "none", "--name", f"idemgate-validate-{secrets.token_hex(4)}",
            *_docker_volume_args(tmp, Path(wasm) if wasm else wasm_path()),
            "--entrypoint", CONTAINER_ENVOY, image or envoy_image(),
            "--mode", "validate", "-c", f"{CONTAINER_CONFIG_DIR}/{filename}",
            "--disable-hot-restart", "--log-level", "info",
        ]
        r = _run(cmd, timeout=timeout)
        return r.returncode, r.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- envoy


class EnvoyStartError(RuntimeError):
    pass


class Envoy:
    """A real Envoy in Docker (--network host) with the idemgate filter.

    listeners: specs as made by listener(): {name, port, idemgate_config (dict, or str
    used verbatim), route_timeout_s (default 15; 0 = none), vm_id (default
    "idemgate-<name>")}. config: a complete bootstrap dict to use instead.
    """

    def __init__(
        self,
        listeners: Sequence[Mapping[str, Any]] = (),
        origin_port: int = 8080,
        admin_port: int | None = None,
        concurrency: int = 4,
        *,
        image: str | None = None,
        wasm: Path | str | None = None,
        log_level: str = "info",
        component_log_level: str | None = "wasm:debug",
        extra_args: Sequence[str] = (),
        ready_timeout: float = 30.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.listeners = [dict(spec) for spec in listeners]
        self.origin_port = origin_port
        self.admin_port = admin_port or free_port()
        self.concurrency = concurrency
        self.image = image or envoy_image()
        self.wasm = Path(wasm).resolve() if wasm else wasm_path()
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.config = dict(config) if config else build_envoy_config(self.listeners, origin_port, self.admin_port)
        self.name = f"idemgate-test-{secrets.token_hex(4)}"
        self.container_id: str | None = None
        self._dir = tempfile.mkdtemp(prefix="idemgate-envoy-")

    # -- addresses ----------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def port(self, listener_name: str | None = None) -> int:
        for spec in self.listeners:
            if listener_name is None or spec["name"] == listener_name:
                return int(spec["port"])
        raise KeyError(listener_name)

    def url_for(self, listener_name: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port(listener_name)}"

    @property
    def url(self) -> str:
        """Base URL of the first listener."""
        return self.url_for(None)

    # -- lifecycle ----------------------------------------------------------------

    def command(self) -> list[str]:
        args = [
            "-c", f"{CONTAINER_CONFIG_DIR}/envoy.json",
            "--concurrency", str(self.concurrency),
            "--disable-hot-restart",
            "--log-level", self.log_level,
        ]
        if self.component_log_level:
            args += ["--component-log-level", self.component_log_level]
        return args + self.extra_args

    def start(self) -> "Envoy":
        _write_config(self._dir, self.config, "envoy.json")
        cmd = [
            "docker", "run", "-d", "--network", "host", "--name", self.name,
            "--label", "io.idemgate.test=1",
            *_docker_volume_args(self._dir, self.wasm),
            "--entrypoint", CONTAINER_ENVOY, self.image, *self.command(),
        ]
        r = _run(cmd, timeout=120)
        if r.returncode != 0:
            raise EnvoyStartError(f"docker run failed ({r.returncode}):\n{r.stdout}")
        self.container_id = r.stdout.strip().splitlines()[-1]
        _ALIVE.add(self)
        deadline = time.monotonic() + self.ready_timeout
        why = "timed out on admin /ready"
        while time.monotonic() < deadline:
            if not self.running():
                why = "container exited"
                break
            try:
                status, body = _http("GET", self.admin_url + "/ready", timeout=2)
                if status == 200 and body.strip() == b"LIVE":
                    return self
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        logs = self.logs()
        self.stop()
        raise EnvoyStartError(
            f"Envoy {self.name} did not become ready ({why}, limit {self.ready_timeout}s); docker logs:\n{logs}"
        )

    def running(self) -> bool:
        r = _run(["docker", "inspect", "-f", "{{.State.Running}}", self.name], timeout=30)
        return r.returncode == 0 and r.stdout.strip() == "true"

    def logs(self) -> str:
        r = _run(["docker", "logs", self.name], timeout=60)
        return r.stdout

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait until a regex matches the container's log; returns the match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.logs())
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in Envoy log")
            time.sleep(0.1)

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        status, body = _http(method, self.admin_url + path, body=b"" if method == "POST" else None)
        return status, body.decode(errors="replace")

    def settle_metrics(self) -> None:
        """Waits until idemgate's metrics reflect the traffic sent so far: the filter counts
        them in the VM and flushes them to Envoy's stats from its root tick, at least every
        METRICS_FLUSH_S (METRICS_FLUSH_MS in filter/src/lib.rs)."""
        time.sleep(METRICS_FLUSH_S + 0.3)

    def stats(self, filter_regex: str | None = None, used_only: bool = False) -> dict[str, Any]:
        """Counters and gauges (name -> int) from admin /stats?format=json,
        optionally filtered by an RE2 regex on the name. Text stats (e.g. the
        version) keep their string value."""
        q: dict[str, str] = {"format": "json"}
        if filter_regex:
            q["filter"] = filter_regex
        if used_only:
            q["usedonly"] = ""
        status, body = self.admin("/stats?" + urllib.parse.urlencode(q))
        if status != 200:
            raise RuntimeError(f"admin /stats answered {status}: {body}")
        out: dict[str, Any] = {}
        for item in json.loads(body).get("stats", []):
            if "name" in item and "value" in item:
                out[item["name"]] = item["value"]
        return out

    def rss_bytes(self) -> int:
        """Resident memory of the Envoy process (VmRSS of the container's PID 1)."""
        r = _run(["docker", "inspect", "-f", "{{.State.Pid}}", self.name], timeout=30)
        pid = r.stdout.strip()
        if r.returncode != 0 or not pid or pid == "0":
            raise RuntimeError(f"Envoy container not running: {r.stdout}")
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def stop(self) -> None:
        _ALIVE.discard(self)
        if self.container_id is not None:
            _run(["docker", "rm", "-f", self.name], timeout=60)
            self.container_id = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "Envoy":
        return self.start() if self.container_id is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Anything still running when the interpreter exits is stopped.
_ALIVE: set[Any] = set()


@atexit.register
def _cleanup() -> None:
    for obj in list(_ALIVE):
        try:
            obj.stop()
        except Exception:  # noqa: BLE001
            pass
