#!/usr/bin/env python3
"""Processes `make bench` runs on the host beside the Envoy container, each pinned to a CPU
with taskset, its CPU time read from /proc (utime + stime of every thread), stopped by PID:

- `NginxOrigin`: the origin outside the Envoy under test (Debian nginx-light, one process,
  `return 200 {"ok":true}`, keep-alive), with a stub_status port that counts the requests
  it served (every run proves how many reached the origin);
- `AltProxy`: the alternative a user would run instead of idemgate, `idempotent-proxy-server`
  (a Rust crate, `cargo install`) with its Redis (Debian redis-server), in front of the same origin.

Nothing here is started unless a run asks for it; every process is stopped at exit.
"""
from __future__ import annotations

import atexit
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ORIGIN_BODY = '{"ok":true}'
ALT_VERSION = "1.2.2"  # the default; make bench passes the Makefile's ALT_PROXY_VERSION's binary
ALT_BINARY_ENV = "IDEMPOTENT_PROXY_SERVER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_ns(pid: int) -> int:
    """utime + stime of a process (all its threads), in ns; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def version_of(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


class HostProc:
    """One process started by the bench, optionally pinned to `cpu`, stopped by PID."""

    def __init__(self, name: str, cmd: list[str], cpu: str | None, cwd: Path, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd
        self.cwd = cwd
        self.env = env
        self.log_path = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_ns(self) -> int:
        return proc_cpu_ns(self.pid) if self.alive() else 0

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def wait_ready(self, ready: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.logs()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.logs()}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


# ------------------------------------------------------------------------------ origin

NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_max_body_size 2m;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
  server {{
    listen 127.0.0.1:{status_port};
    location / {{ stub_status; }}
  }}
}}
"""


class NginxOrigin:
    """nginx (one process: master_process off) answering every request `200 {"ok":true}` with
    keep-alive; `requests()` is its stub_status request counter, less the status reads."""

    def __init__(self, cpu: str | None):
        if shutil.which("nginx") is None:
            raise SystemExit("nginx not found: make bench-deps (Debian nginx-light)")
        self.dir = Path(tempfile.mkdtemp(prefix="idemgate-bench-nginx-"))
        self.port, self.status_port = free_port(), free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, port=self.port, status_port=self.status_port,
                                          body=ORIGIN_BODY))
        self.proc = HostProc("nginx", ["nginx", "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                                       "-c", str(conf)], cpu, self.dir)
        self.cpu = cpu
        self._reads = 0

    def start(self) -> "NginxOrigin":
        self.proc.start()
        self.proc.wait_ready(lambda: http_get(self.port, "/")[0] == 200)
        return self

    def requests(self) -> int:
        """Requests served so far on the origin port (stub_status counts every request,
        its own reads included: each read adds one)."""
        status, body = http_get(self.status_port, "/")
        self._reads += 1
        m = re.search(r"\n\s*\d+\s+\d+\s+(\d+)", body)
        if status != 200 or not m:
            raise RuntimeError(f"nginx stub_status answered {status}: {body!r}")
        return int(m.group(1)) - self._reads

    def cpu_ns(self) -> int:
        return self.proc.cpu_ns()

    def version(self) -> str:
        return version_of(["nginx", "-v"]).replace("nginx version: ", "")

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------- alternative


def alt_binary() -> Path:
    env = os.environ.get(ALT_BINARY_ENV)
    if env:
        return Path(env)
    cache = Path(os.environ.get("IDEMGATE_CACHE") or Path.home() / ".cache" / "idemgate")
    return cache / f"idempotent-proxy-server-{ALT_VERSION}" / "bin" / "idempotent-proxy-server"


def redis_cmd(port: int, *args: str, timeout: float = 5) -> bytes:
    """One RESP command to Redis; returns the raw reply."""
    parts = [f"*{len(args)}\r\n".encode()] + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(parts))
        data = b""
        while b"\r\n" not in data:  # PING, DBSIZE: one-line replies
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


class AltProxy:
    """idempotent-proxy-server with Redis, both pinned to `cpu`, in front of `urls`
    ({NAME: url}: the proxy forwards `/URL_<NAME>` to url; it proxies to nothing else).

    Configuration (the proxy reads .env in its working directory): records and locks live
    `ttl_ms` (its REQUEST_TIMEOUT, which is also its timeout towards the origin), duplicates
    poll Redis every `poll_ms`, log level warn (as Envoy's). Redis keeps its data in memory
    (no RDB snapshots, no AOF), as idemgate's shared data does."""

    def __init__(self, urls: dict[str, str], cpu: str | None, ttl_ms: int = 86_400_000, poll_ms: int = 100):
        binary = alt_binary()
        if not binary.is_file():
            raise SystemExit(f"idempotent-proxy-server not found at {binary}: make bench-deps "
                             f"(cargo install idempotent-proxy-server --version {ALT_VERSION}), or set {ALT_BINARY_ENV}")
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server not found: make bench-deps (Debian redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="idemgate-bench-alt-"))
        self.port, self.redis_port = free_port(), free_port()
        self.cpu = cpu
        self.ttl_ms, self.poll_ms = ttl_ms, poll_ms
        self.urls = dict(urls)
        self.redis = HostProc("redis", [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no", "--loglevel", "warning",
        ], cpu, self.dir)
        env_lines = [
            f"SERVER_ADDR=127.0.0.1:{self.port}",
            f"REDIS_URL=127.0.0.1:{self.redis_port}",
            f"POLL_INTERVAL={poll_ms}",
            f"REQUEST_TIMEOUT={ttl_ms}",
            "LOG_LEVEL=warn",
            *(f"URL_{name}={url}" for name, url in self.urls.items()),
        ]
        (self.dir / ".env").write_text("\n".join(env_lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("URL_", "HEADER_", "ECDSA_", "ED25519_"))}
        self.proxy = HostProc("idempotent-proxy-server", [str(binary)], cpu, self.dir, env=env)
        self.binary = binary

    def start(self) -> "AltProxy":
        self.redis.start()
        self.redis.wait_ready(lambda: redis_cmd(self.redis_port, "PING").startswith(b"+PONG"))
        self.proxy.start()
        # Ready when it answers; without an idempotency-key it answers 400.
        self.proxy.wait_ready(lambda: http_get(self.port, f"/URL_{next(iter(self.urls))}")[0] == 400)
        return self

    def path(self, name: str) -> str:
        return f"/URL_{name}"

    def cpu_ns(self) -> int:
        return self.proxy.cpu_ns() + self.redis.cpu_ns()

    def cpu_split_ns(self) -> dict[str, int]:
        return {"proxy": self.proxy.cpu_ns(), "redis": self.redis.cpu_ns()}

    def keys(self) -> int:
        reply = redis_cmd(self.redis_port, "DBSIZE")
        return int(reply[1:].strip()) if reply.startswith(b":") else -1

    def versions(self) -> dict[str, str]:
        m = re.search(r"idempotent-proxy-server-(\d+\.\d+\.\d+)", str(self.binary))
        return {"proxy": f"idempotent-proxy-server {m.group(1) if m else ALT_VERSION}",
                "redis": version_of(["redis-server", "--version"])}

    def config(self) -> dict[str, Any]:
        return {"REQUEST_TIMEOUT": self.ttl_ms, "POLL_INTERVAL": self.poll_ms, "LOG_LEVEL": "warn",
                "redis": "--save '' --appendonly no", "cpu": self.cpu}

    def stop(self) -> None:
        self.proxy.stop()
        self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
