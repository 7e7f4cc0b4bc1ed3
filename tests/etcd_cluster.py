"""A local etcd cluster of processes on loopback (Debian etcd-server), for tests/test_fleet.py
and the fleet rows of `make bench`: members started with the flags of envoy/fleet/etcd.flags,
data in a temp dir, stopped by PID."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
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


class Member:
    def __init__(self, name: str, client: int, peer: int, data: Path, cpu: str | None = None) -> None:
        self.name, self.client, self.peer, self.data = name, client, peer, data
        self.cpu = cpu  # taskset CPU list, if pinned
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client}"

    def start(self, cluster: str) -> None:
        cmd = [
            str(ETCD), "--name", self.name, "--data-dir", str(self.data),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "idemgate-test", *etcd_flags(),
        ]
        if self.cpu is not None:
            cmd = ["taskset", "-c", self.cpu, *cmd]
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def call(self, path: str, doc: dict[str, Any], timeout: float = 2) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(doc).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def status(self) -> dict[str, Any] | None:
        try:
            return self.call("/v3/maintenance/status", {}, timeout=1)
        except Exception:
            return None


class Cluster:
    def __init__(self, size: int = 3, cpu: str | None = None, base_dir: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="idemgate-etcd-", dir=base_dir))
        self.members = [
            Member(f"m{i}", free_port(), free_port(), self.dir / f"m{i}", cpu) for i in range(size)
        ]
        self.spec = ",".join(f"{m.name}=http://127.0.0.1:{m.peer}" for m in self.members)

    def start(self, members: list[Member] | None = None) -> None:
        for m in members or self.members:
            m.start(self.spec)
        self.wait_leader()

    def wait_leader(self, timeout: float = 30) -> Member:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is None:
                    continue
                st = m.status()
                if st and st.get("leader") and st["leader"] == st["header"]["member_id"]:
                    try:  # a write goes through: the cluster has quorum
                        m.call("/v3/kv/put", {"key": b64("/probe"), "value": b64("1")})
                        return m
                    except Exception:
                        pass
            time.sleep(0.1)
        raise TimeoutError("etcd cluster elected no leader:\n" + "\n".join(
            m.log.read_text(errors="replace")[-2000:] for m in self.members if m.log.exists()))

    def leader(self) -> Member:
        return self.wait_leader()

    def any_live(self) -> Member:
        return next(m for m in self.members if m.proc is not None)

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


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


