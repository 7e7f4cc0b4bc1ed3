"""A local etcd cluster of processes on loopback (Debian etcd-server), for tests/test_fleet.py
and the fleet rows of `make bench`: members started with the flags of envoy/fleet/etcd.flags,
data in a temp dir, stopped by PID. Optionally with TLS and client-certificate auth
(certificates made with openssl in the cluster's dir), and with faults: a member paused
(SIGSTOP), killed, or restarted from its data dir.

`envoy_cluster()` is the Envoy cluster idemgate reaches it through: HTTP/2 (etcd's gRPC API),
gRPC health checks, and the TLS transport socket when the cluster has TLS."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import REPO_ROOT, free_port

ETCD = shutil.which("etcd")
FLAGS_FILE = REPO_ROOT / "envoy" / "fleet" / "etcd.flags"


def etcd_flags() -> list[str]:
    return [
        line.strip()
        for line in FLAGS_FILE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


class Certs:
    """A CA, a server certificate for 127.0.0.1/localhost/etcd and a client certificate,
    made with openssl (PEM files in `dir`)."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = dir / "ca.pem", dir / "ca-key.pem"
        self.server, self.server_key = dir / "server.pem", dir / "server-key.pem"
        self.client, self.client_key = dir / "client.pem", dir / "client-key.pem"
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-days", "2", "-subj", "/CN=idemgate test CA",
                      "-keyout", self.ca_key, "-out", self.ca)
        self._issue("etcd", self.server, self.server_key,
                    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:etcd\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n")
        self._issue("idemgate", self.client, self.client_key, "extendedKeyUsage=clientAuth\n")

    def _openssl(self, *args: Any) -> None:
        r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {r.stderr}")

    def _issue(self, cn: str, cert: Path, key: Path, ext: str) -> None:
        csr, extfile = cert.with_suffix(".csr"), cert.with_suffix(".ext")
        extfile.write_text(ext)
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-subj", f"/CN={cn}", "-keyout", key, "-out", csr)
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                      "-CAcreateserial", "-days", "2", "-extfile", extfile, "-out", cert)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client), str(self.client_key))
        return ctx


class Member:
    def __init__(self, name: str, client: int, peer: int, data: Path, cpu: str | None = None,
                 certs: Certs | None = None) -> None:
        self.name, self.client, self.peer, self.data = name, client, peer, data
        self.cpu = cpu  # taskset CPU list, if pinned
        self.certs = certs
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.log = data.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"{'https' if self.certs else 'http'}://127.0.0.1:{self.client}"

    def start(self, cluster: str) -> None:
        cmd = [
            str(ETCD), "--name", self.name, "--data-dir", str(self.data),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "idemgate-test", *etcd_flags(),
        ]
        if self.certs is not None:
            cmd += ["--cert-file", str(self.certs.server), "--key-file", str(self.certs.server_key),
                    "--client-cert-auth", "--trusted-ca-file", str(self.certs.ca)]
        if self.cpu is not None:
            cmd = ["taskset", "-c", self.cpu, *cmd]
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.paused = False
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stops the process (its data dir stays: start() again restarts from it)."""
        if self.proc and self.proc.poll() is None:
            if self.paused:
                os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing."""
        if self.proc and not self.paused:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc and self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    @property
    def up(self) -> bool:
        return self.proc is not None and not self.paused

    def call(self, path: str, doc: dict[str, Any], timeout: float = 2) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(doc).encode(), method="POST")
        ctx = self.certs.context() if self.certs else None
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return json.loads(r.read())

    def status(self) -> dict[str, Any] | None:
        try:
            return self.call("/v3/maintenance/status", {}, timeout=1)
        except Exception:
            return None


class Cluster:
    def __init__(self, size: int = 3, cpu: str | None = None, base_dir: str | None = None,
                 tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="idemgate-etcd-", dir=base_dir))
        self.certs = Certs(self.dir / "certs") if tls else None
        self.members = [
            Member(f"m{i}", free_port(), free_port(), self.dir / f"m{i}", cpu, self.certs)
            for i in range(size)
        ]
        self.spec = ",".join(f"{m.name}=http://127.0.0.1:{m.peer}" for m in self.members)

    def start(self, members: list[Member] | None = None) -> None:
        """Starts the members (new, or again from their data dirs) and waits for a leader."""
        for m in members or self.members:
            if m.proc is None:
                m.start(self.spec)
        self.wait_leader()

    def wait_leader(self, timeout: float = 30) -> Member:
        """The leader, once a write through it commits (the cluster has quorum)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.members:
                if not m.up:
                    continue
                st = m.status()
                if st and st.get("leader") and st["leader"] == st["header"]["member_id"]:
                    try:
                        m.call("/v3/kv/put", {"key": b64("/probe"), "value": b64("1")})
                        return m
                    except Exception:
                        pass
            time.sleep(0.1)
        raise TimeoutError("etcd cluster elected no leader:\n" + "\n".join(
            m.log.read_text(errors="replace")[-2000:] for m in self.members if m.log.exists()))

    def leader(self) -> Member:
        return self.wait_leader()

    def followers(self) -> list[Member]:
        leader = self.leader()
        return [m for m in self.members if m is not leader]

    def any_live(self) -> Member:
        return next(m for m in self.members if m.up)

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def cpu_ns(self) -> int:
        """CPU time (user + system) of the running members so far."""
        total = 0
        for m in self.members:
            if m.proc is None:
                continue
            try:
                fields = Path(f"/proc/{m.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        return total

    def envoy_cluster(self, name: str = "etcd", client_cert: bool = True) -> dict[str, Any]:
        """The Envoy cluster of these members, as envoy/fleet/envoy.yaml sets it up."""
        return envoy_cluster(name, [m.client for m in self.members],
                             self.certs if self.certs else None, client_cert)


def _pem(path: Path) -> dict[str, str]:
    return {"inline_string": path.read_text()}


def envoy_cluster(name: str, ports: list[int], certs: Certs | None = None,
                  client_cert: bool = True) -> dict[str, Any]:
    """etcd's members as an Envoy cluster: HTTP/2 for etcd's gRPC API, gRPC health checks
    (a SIGSTOPped or dead member is ejected), TLS with a client certificate if `certs`."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {
                    "connection_keepalive": {"interval": "1s", "timeout": "1s"}}},
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in ports]}]},
        "health_checks": [{
            "timeout": "0.5s", "interval": "1s", "no_traffic_interval": "1s",
            "unhealthy_threshold": 2, "healthy_threshold": 1,
            "grpc_health_check": {}}],
        "outlier_detection": {
            "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 2,
            "base_ejection_time": "2s", "max_ejection_percent": 67},
    }
    if certs is not None:
        common: dict[str, Any] = {
            "alpn_protocols": ["h2"],
            "validation_context": {
                "trusted_ca": _pem(certs.ca),
                "match_typed_subject_alt_names": [
                    {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}],
            },
        }
        if client_cert:
            common["tls_certificates"] = [{"certificate_chain": _pem(certs.client),
                                           "private_key": _pem(certs.client_key)}]
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": common,
            },
        }
    return cluster


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()
