#!/usr/bin/env python3
"""Load benchmark of idemgate inside Envoy, against Envoy itself (`make bench` runs it).

One Envoy container (`--concurrency 1`, so one worker thread does all the work) holds:

- a zero-cost upstream: a listener whose route answers with `direct_response` (200, a
  small JSON body) behind the `buffer` filter (the whole request body is read before the
  answer, so Envoy keeps the upstream connections and reuses them);
- one listener per scenario, each routing to that upstream through a cluster, so answers
  come back `via_upstream` and idemgate stores them:
    pass      no HTTP filter but the router (the limit)
    floor     bench/floor: one Wasm filter that reads one header and continues
    floor2    diagnostic: two floor filters sharing one VM (idemgate is loaded as two)
    bare      diagnostic (with --bare-wasm): bench/bare, the floor without the proxy-wasm SDK
              and without std (its own ABI declarations, no_std): what of the floor's cost is
              the SDK's dispatching rather than Envoy's work for any wasm filter
    first     idemgate, a new key per request (first requests)
    first_p1  idemgate with store.probes 1, a new key per request
    first_b3, replay_b3  idemgate with the opt-in fingerprint.algorithm blake3
    replay    idemgate, one key (after one priming request: replays)
    body      diagnostic, 64 KiB only: bench/probe buffers the body and copies it into the VM
    hash      diagnostic, 64 KiB only: bench/probe as `body`, plus SHA-256 of the body
    hash_b3   diagnostic, 64 KiB only: bench/probe as `body`, plus BLAKE3 of the body
    answer    diagnostic: bench/probe answering every request itself after buffering and
              copying its body, with a gate holding the headers, both in one VM: the floor
              of a replay in idemgate's design (before any lookup)
    answer_hash  diagnostic: `answer` plus SHA-256 of the body (a replay's fingerprint)
    lookup    diagnostic: `answer_hash` plus idemgate's other hostcalls for a replay (every
              request header read, the time, a bucket and a record read from shared data)
              with none of its logic
    claim     diagnostic: bench/probe making idemgate's hostcalls for a first request (SHA-256
              of the body, a bucket get + CAS set, the gate released, the answer's headers and
              body read, a get and two sets to complete) with none of its logic: the floor of
              a first request in idemgate's design
    upstream  diagnostic: wrk straight to the upstream listener (its share of the CPU)
    fleet_first   idemgate in fleet mode (store.etcd): a new key per request, claimed and
              completed in etcd (a local cluster of --etcd-members processes on loopback,
              started before Envoy, stopped by PID); compared with `first` (local mode)
    fleet_replay  fleet mode, one key: replays answered from the shared-data cache of
              completed records (no etcd round trip); compared with `replay`
    wait      scenario 5, not a wrk run: idemgate with onConcurrent {action: wait} in front
              of a second upstream that answers after --slow-ms (the `fault` filter's
              fixed delay). Per trial one first request, then --waiters duplicates sent
              while it is in flight; measured: when each duplicate is answered, relative to
              when the first one's answer arrived (the waiters poll the store on a tick).

Load: wrk (1 thread, 16 connections, --duration seconds per run), runs interleaved
(every configuration once per round, in a fixed order), --rounds rounds; medians reported.
On a machine with two or more CPUs, Envoy is pinned to one CPU and wrk to another.
Everything is loopback; every run is bounded (wrk -d, plus a subprocess timeout).

Per run: requests/s, p50/p99 latency (wrk), Envoy CPU per request = delta of the
container's cgroup CPU time (or utime+stime of the Envoy process) / requests, and for
idemgate listeners the deltas of its counters (forwarded, replayed, stored, ...), which
prove that replays are replays and first requests are forwarded. Fleet rows also report
etcd's CPU per request (all members, from /proc; etcd runs on wrk's CPU, so Envoy's CPU stays
its own).

Writes JSON (--out) that bench/report.py turns into tables.
"""
from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import harness  # noqa: E402  (tests/harness.py: Docker/Envoy helpers)

LUA = REPO / "bench" / "wrk.lua"
SIZES = {"1KiB": 1024, "64KiB": 65536}
CONTAINER_DIR = "/etc/envoy"
BUFFER_LIMIT = 16 * 1024 * 1024
HCM_TYPE = harness.HCM_TYPE
WASM_TYPE = harness.WASM_FILTER_TYPE
STRING_TYPE = harness.STRING_VALUE_TYPE
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
UPSTREAM_BODY = '{"ok":true}'
CONNECTIONS = 16
SLOW_MS = 100

# id -> title, wrk key mode, idemgate namespace (idemgate listeners), sizes (default: all)
SCENARIOS: dict[str, dict[str, Any]] = {
    "pass": {"title": "1 passthrough (no wasm)", "mode": "unique"},
    "floor": {"title": "2 floor wasm (1 filter, reads 1 header)", "mode": "unique"},
    "floor2": {"title": "floor x2 (2 filters, 1 VM) [diag]", "mode": "unique"},
    "bare": {"title": "floor without the SDK and std (bench/bare: own ABI, no_std) [diag]", "mode": "unique"},
    "first": {"title": "3 idemgate first requests (probes 8)", "mode": "unique", "ns": "first"},
    "first_p1": {"title": "3b idemgate first requests, probes 1", "mode": "unique", "ns": "firstp1"},
    "replay": {"title": "4 idemgate replays (one key)", "mode": "fixed", "ns": "replay"},
    "first_b3": {"title": "3c idemgate first requests, fingerprint.algorithm blake3", "mode": "unique", "ns": "firstb3"},
    "replay_b3": {"title": "4b idemgate replays, fingerprint.algorithm blake3", "mode": "fixed", "ns": "replayb3"},
    "body": {"title": "floor + buffer body + copy into VM [diag]", "mode": "unique", "sizes": ["64KiB"]},
    "hash": {"title": "floor + buffer + copy + SHA-256 [diag]", "mode": "unique", "sizes": ["64KiB"]},
    "hash_b3": {"title": "floor + buffer + copy + BLAKE3 (opt-in algorithm) [diag]", "mode": "unique", "sizes": ["64KiB"]},
    "claim": {"title": "floor of a first request: 2 filters in 1 VM, body copied + SHA-256, claim (get + CAS set), gate released, answer read, completion (get + 2 sets) [diag]",
              "mode": "unique"},
    "answer": {"title": "floor of a replay: 2 filters in 1 VM, body buffered + copied, answered locally [diag]",
               "mode": "unique", "local": True},
    "answer_hash": {"title": "floor of a replay + SHA-256 of the body [diag]", "mode": "unique",
                    "local": True},
    "lookup": {"title": "floor of a replay + SHA-256 + idemgate's lookups (all headers, time, bucket and record gets) [diag]",
               "mode": "unique", "local": True},
    "upstream": {"title": "upstream listener alone [diag]", "mode": "unique"},
    "fleet_first": {"title": "3f idemgate fleet (etcd) first requests", "mode": "unique", "ns": "fleetfirst",
                    "fleet": True},
    "fleet_replay": {"title": "4f idemgate fleet (etcd) replays (one key)", "mode": "fixed", "ns": "fleetreplay",
                     "fleet": True},
    "wait": {"title": "5 concurrent duplicates, wait policy", "mode": "wait", "ns": "wait", "sizes": []},
}
WAIT_MILLIS = 5000
# store.etcd of the fleet rows (the Envoy cluster "etcd" lists the bench's members).
ETCD_SPEC = {"cluster": "etcd", "authority": "etcd", "prefix": "/idemgate-bench/", "timeoutMillis": 1000,
             "retries": 2, "failPolicy": "closed"}


def is_fleet(sid: str) -> bool:
    return bool(SCENARIOS.get(sid, {}).get("fleet"))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _listener(name: str, port: int, route: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "address": _addr(port),
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM_TYPE,
                            "stat_prefix": name,
                            "codec_type": "AUTO",
                            "route_config": {
                                "name": f"{name}_routes",
                                "virtual_hosts": [
                                    {"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}
                                ],
                            },
                            "http_filters": [*filters, ROUTER],
                        },
                    }
                ]
            }
        ],
    }


def _wasm(name: str, root_id: str, vm_id: str, filename: str, configuration: str = "") -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": name,
        "root_id": root_id,
        "vm_config": {
            "vm_id": vm_id,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": filename}},
        },
    }
    if configuration:
        cfg["configuration"] = {"@type": STRING_TYPE, "value": configuration}
    return {"name": name, "typed_config": {"@type": WASM_TYPE, "config": cfg}}


def scenario_filters(sid: str) -> list[dict[str, Any]]:
    if "@" in sid:
        # A variant: the base scenario's filters with another build of the wasm.
        base, variant = sid.split("@", 1)
        filters = json.loads(json.dumps(scenario_filters(base)))
        for f in filters:
            cfg = f["typed_config"]["config"]
            cfg["vm_config"]["code"]["local"]["filename"] = f"{CONTAINER_DIR}/var_{variant}.wasm"
            cfg["vm_config"]["vm_id"] += f"@{variant}"
            if base in SCENARIOS and "ns" in SCENARIOS[base] and cfg["name"] == "idemgate":
                c = json.loads(cfg["configuration"]["value"])
                c["store"]["namespace"] = SCENARIOS[sid]["ns"]
                cfg["configuration"]["value"] = json.dumps(c, separators=(",", ":"))
        return filters
    floor = f"{CONTAINER_DIR}/floor.wasm"
    probe = f"{CONTAINER_DIR}/probe.wasm"
    if sid == "pass":
        return []
    if sid == "floor":
        return [_wasm("floor", "floor", "floor", floor)]
    if sid == "floor2":
        return [_wasm("floor_a", "floor_a", "floor2", floor), _wasm("floor_b", "floor_b", "floor2", floor)]
    if sid == "bare":
        return [_wasm("bare", "bare", "bare", f"{CONTAINER_DIR}/bare.wasm")]
    if sid in ("body", "hash", "hash_b3"):
        return [_wasm(f"probe_{sid}", f"probe_{sid}", f"probe-{sid}", probe, sid)]
    if sid in ("answer", "answer_hash", "lookup", "claim"):
        # as idemgate is loaded: the filter that answers, then a gate, in one VM
        return [_wasm(f"probe_{sid}", f"probe_{sid}", f"probe-{sid}", probe, sid),
                _wasm(f"probe_{sid}_gate", f"probe_{sid}_gate", f"probe-{sid}", probe, "gate")]
    ns = SCENARIOS[sid]["ns"]
    cfg: dict[str, Any] = {"store": {"namespace": ns}}
    if sid == "first_p1":
        cfg["store"]["probes"] = 1
    if sid in ("first_b3", "replay_b3"):
        cfg["fingerprint"] = {"algorithm": "blake3"}
    if sid == "wait":
        cfg["onConcurrent"] = {"action": "wait", "waitMillis": WAIT_MILLIS}
    if SCENARIOS[sid].get("fleet"):
        cfg["store"]["etcd"] = dict(ETCD_SPEC)
    return harness.idemgate_filters({"name": sid, "idemgate_config": cfg, "vm_id": f"idemgate-{sid}"})


def bootstrap(ports: dict[str, int], admin_port: int, etcd_ports: list[int] | None = None) -> dict[str, Any]:
    upstream = _listener(
        "upstream",
        ports["upstream"],
        {"direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}}},
        [
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 2 * 1024 * 1024,
                },
            }
        ],
    )
    listeners = [upstream]
    clusters = [_cluster("upstream", ports["upstream"])]
    if "slow_upstream" in ports:
        listeners.append(
            _listener(
                "slow_upstream",
                ports["slow_upstream"],
                {"direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}}},
                [
                    {
                        "name": "envoy.filters.http.buffer",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                            "max_request_bytes": 2 * 1024 * 1024,
                        },
                    },
                    {
                        "name": "envoy.filters.http.fault",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                            "delay": {
                                "fixed_delay": f"{SLOW_MS / 1000:.3f}s",
                                "percentage": {"numerator": 100, "denominator": "HUNDRED"},
                            },
                        },
                    },
                ],
            )
        )
        clusters.append(_cluster("slow_upstream", ports["slow_upstream"]))
    for sid, port in ports.items():
        if sid in ("upstream", "slow_upstream"):
            continue
        cluster = "slow_upstream" if sid == "wait" else "upstream"
        listeners.append(
            _listener(sid, port, {"route": {"cluster": cluster, "timeout": "15s"}}, scenario_filters(sid))
        )
    if etcd_ports:
        clusters.append({
            "name": "etcd",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "etcd", "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _addr(p)}} for p in etcd_ports]}]},
        })
    return {
        "node": {"id": "idemgate-bench", "cluster": "idemgate-bench"},
        "admin": {"address": _addr(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(port)}}]}],
        },
    }


# ----------------------------------------------------------------------------- container


class BenchEnvoy:
    def __init__(self, config: dict[str, Any], admin_port: int, wasm: dict[str, Path], envoy_cpu: str | None):
        self.config = config
        self.admin_port = admin_port
        self.wasm = wasm
        self.envoy_cpu = envoy_cpu
        self.name = f"idemgate-bench-{secrets.token_hex(4)}"
        self.dir = tempfile.mkdtemp(prefix="idemgate-bench-")
        self.started = False
        self.pid = 0
        self.cpu_file: Path | None = None

    def start(self) -> None:
        d = Path(self.dir)
        (d / "envoy.json").write_text(json.dumps(self.config, indent=1))
        for name, src in self.wasm.items():
            if name != "idemgate":
                shutil.copy(src, d / f"{name}.wasm")
        os.chmod(d, 0o755)
        for f in d.iterdir():
            os.chmod(f, 0o644)
        cmd = ["docker", "run", "-d", "--network", "host", "--name", self.name, "--label", "io.idemgate.bench=1"]
        if self.envoy_cpu is not None:
            cmd += ["--cpuset-cpus", self.envoy_cpu]
        cmd += [
            "-v", f"{d}:{CONTAINER_DIR}:ro",
            "-v", f"{self.wasm['idemgate']}:{harness.CONTAINER_WASM}:ro",
            "--entrypoint", harness.CONTAINER_ENVOY, harness.envoy_image(),
            "-c", f"{CONTAINER_DIR}/envoy.json", "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "warn",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"docker run failed: {r.stdout}{r.stderr}")
        self.started = True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, body = self.admin("/ready")
                if status == 200 and body.strip() == "LIVE":
                    break
            except OSError:
                pass
            if not self.running():
                raise RuntimeError(f"Envoy exited:\n{self.logs()}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"Envoy not ready after 60s:\n{self.logs()}")
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", self.name], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        self.pid = int(out)
        self.cpu_file = _cgroup_cpu_file(self.pid)

    def running(self) -> bool:
        r = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Running}}", self.name], capture_output=True, text=True, timeout=30
        )
        return r.stdout.strip() == "true"

    def logs(self) -> str:
        r = subprocess.run(["docker", "logs", self.name], capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr

    def admin(self, path: str) -> tuple[int, str]:
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            c.close()

    def counters(self) -> dict[str, int]:
        q = urllib.parse.urlencode({"format": "json", "filter": r"^wasmcustom\.idemgate\."})
        status, body = self.admin("/stats?" + q)
        if status != 200:
            raise RuntimeError(f"/stats answered {status}")
        return {s["name"]: int(s["value"]) for s in json.loads(body).get("stats", []) if "value" in s}

    def cpu_ns(self) -> int:
        """Cumulative CPU time of the container (cgroup), else of the Envoy process."""
        if self.cpu_file is not None:
            text = self.cpu_file.read_text()
            if self.cpu_file.name == "cpu.stat":
                for line in text.splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) * 1000
            return int(text.split()[0])
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    def cpu_source(self) -> str:
        return str(self.cpu_file) if self.cpu_file else f"/proc/{self.pid}/stat utime+stime"

    def stop(self) -> None:
        if self.started:
            subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=60)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


def _cgroup_cpu_file(pid: int) -> Path | None:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            for root in ("/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct"):
                f = Path(root + path) / "cpuacct.usage"
                if f.is_file():
                    return f
        if controllers == "":
            f = Path("/sys/fs/cgroup" + path) / "cpu.stat"
            if f.is_file():
                return f
    return None


# ----------------------------------------------------------------------------- requests


def body_of(size: int) -> bytes:
    head, tail = b'{"order":"bench","pad":"', b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def post(port: int, key: str, size: int) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST", "/orders", body=body_of(size), headers={"Idempotency-Key": key, "Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def check_scenarios(envoy: BenchEnvoy, ports: dict[str, int], tag: str) -> list[str]:
    """One request per listener (and the replay priming); returns notes."""
    notes = []
    for sid, port in ports.items():
        status, headers, body = post(port, f"check-{tag}-{sid}", 1024)
        if status != 200 or body != UPSTREAM_BODY.encode():
            raise RuntimeError(f"{sid}: sanity request got {status} {headers} {body[:200]!r}")
        local = SCENARIOS.get(sid, {}).get("local", False)
        if bool(headers.get("idempotent-replayed")) != local:
            raise RuntimeError(f"{sid}: first request came back {'not ' if local else ''}as a local answer: {headers}")
    for sid, port in ports.items():
        if SCENARIOS.get(sid, {}).get("mode") != "fixed":
            continue
        for size_label, size in SIZES.items():
            key = replay_key(tag, size_label)
            s1, h1, _ = post(port, key, size)
            if is_fleet(sid):
                time.sleep(0.2)  # the completion is written to etcd from the root context's tick
            s2, h2, b2 = post(port, key, size)
            if s1 != 200 or h1.get("idempotent-replayed") or s2 != 200 or h2.get("idempotent-replayed") != "true":
                raise RuntimeError(f"{sid} priming {size_label}: {s1} {h1} / {s2} {h2}")
            notes.append(f"{sid} {size_label}: the second request was answered {s2} with idempotent-replayed: true, body {b2!r}")
    return notes


def replay_key(tag: str, size_label: str) -> str:
    return f"replay-{tag}-{size_label}"


# ----------------------------------------------------------------------------- wrk


def run_wrk(port: int, mode: str, prefix: str, size: int, seconds: float, cpu: str | None) -> dict[str, Any]:
    cmd = [
        "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(LUA),
        f"http://127.0.0.1:{port}/orders", "--", mode, prefix, str(size),
    ]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"wrk gave no result (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")


def busy_ns() -> int:
    """CPU time spent by the whole machine (all CPUs, everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def children_cpu_ns() -> int:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


OTHER_LOAD_LIMIT = 0.35  # CPUs busy with something else than Envoy and wrk: redo the run once
REDO_BUDGET = [0]  # redos left in this invocation (set in main: one extra round at most)


def measure(envoy: BenchEnvoy, sid: str, port: int, size: int, size_label: str, prefix: str,
            seconds: float, wrk_cpu: str | None, retry: bool = False) -> dict[str, Any]:
    sc = SCENARIOS[sid]
    before_c = envoy.counters() if "ns" in sc else {}
    etcd = ETCD_CLUSTER[0]
    etcd0 = etcd.cpu_ns() if etcd is not None else 0
    before, busy0, kids0 = envoy.cpu_ns(), busy_ns(), children_cpu_ns()
    res = run_wrk(port, sc["mode"], prefix, size, seconds, wrk_cpu)
    after, busy1, kids1 = envoy.cpu_ns(), busy_ns(), children_cpu_ns()
    etcd_ns = (etcd.cpu_ns() - etcd0) if etcd is not None else 0
    if "ns" in sc:
        time.sleep(harness.METRICS_FLUSH_S + 0.2)  # idemgate flushes its counters on a tick
    after_c = envoy.counters() if "ns" in sc else {}
    wall_ns = res["duration_us"] * 1000
    res["wrk_cpu_util"] = (kids1 - kids0) / wall_ns
    res["etcd_cpu_util"] = etcd_ns / wall_ns
    if sc.get("fleet"):
        res["etcd_cpu_us_per_req"] = etcd_ns / 1000 / max(1, res["requests"])
    # Busy CPU time not spent by Envoy, wrk or the bench's etcd (other processes, and kernel
    # work such as loopback softirqs accounted outside them), in CPUs.
    res["other_load"] = max(0, (busy1 - busy0) - (after - before) - (kids1 - kids0) - etcd_ns) / wall_ns
    if retry and res["other_load"] > OTHER_LOAD_LIMIT and REDO_BUDGET[0] > 0:
        REDO_BUDGET[0] -= 1
        log(f"  {size_label} {sid}: {res['other_load']:.2f} CPUs busy with other work during the run; redoing it once")
        redo_prefix = prefix if sc["mode"] == "fixed" else prefix + "-redo"  # fixed: the primed key
        again = measure(envoy, sid, port, size, size_label, redo_prefix, seconds, wrk_cpu)
        again["redone"] = 1
        return again
    n = max(1, res["requests"])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["cpu_us_per_req"] = (after - before) / 1000 / n
    res["cpu_util"] = (after - before) / 1000 / res["duration_us"]
    if "ns" in sc:
        pre = f"wasmcustom.idemgate.{sc['ns']}."
        res["counters"] = {
            k[len(pre):]: after_c.get(k, 0) - before_c.get(k, 0)
            for k in after_c
            if k.startswith(pre) and after_c.get(k, 0) != before_c.get(k, 0)
        }
    res["errors"] = res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
    return res


# ----------------------------------------------------------------------------- profile

# Where Envoy's CPU goes, by thread and by code: Envoy's binary is stripped, so samples are
# grouped by the mapping they fall in. The wasm modules' machine code (V8 compiles them with
# TurboFan; `--no-liftoff`) lives in anonymous executable mappings; Envoy's C++, V8's runtime
# and V8's builtins (the wasm-to-host call stubs among them) are in the envoy binary.
PROFILE_GROUPS = (
    ("kernel", ("[kernel.kallsyms]", "[kernel.vmlinux]", "[vdso]")),
    ("libc", ("libc.so.6", "libm.so.6", "libpthread.so.0", "ld-linux-x86-64.so.2", "librt.so.1")),
    ("envoy", ("envoy",)),
)


def profile_group(dso: str) -> str:
    for name, dsos in PROFILE_GROUPS:
        if dso in dsos:
            return name
    return "jit"  # [unknown], //anon, [anon:...], perf-<pid>.map: V8's generated code


def profile_run(envoy: "BenchEnvoy", sid: str, port: int, size: int, label: str, prefix: str,
                seconds: float, wrk_cpu: str | None, outdir: Path) -> dict[str, Any]:
    """One more wrk run of a configuration under `perf record -e cpu-clock` on the Envoy
    process (every thread). Returns the run and the share of samples per (thread, group)."""
    outdir.mkdir(parents=True, exist_ok=True)
    data = outdir / f"{label}-{sid.replace('@', '_')}.perf.data"
    rec = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", str(envoy.pid), "-o", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(0.5)
    try:
        res = measure(envoy, sid, port, size, label, prefix, seconds, wrk_cpu)
    finally:
        rec.send_signal(signal.SIGINT)
        try:
            _, err = rec.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            rec.kill()
            err = "perf record did not stop"
    rep = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "-q", "--sort", "comm,dso", "-F", "sample,comm,dso"],
        capture_output=True, text=True, timeout=300,
    )
    shares: dict[str, int] = {}
    total = 0
    for line in rep.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        n, comm, dso = int(parts[0]), parts[1], parts[2].strip()
        thread = "worker" if comm.startswith("wrk:") else "main"
        key = f"{thread}/{profile_group(dso)}"
        shares[key] = shares.get(key, 0) + n
        total += n
    if total == 0:
        raise RuntimeError(f"perf recorded no samples for {label} {sid}: {err.strip()[-500:]} {rep.stderr[-500:]}")
    res["profile"] = {"samples": total, "share": {k: v / total for k, v in sorted(shares.items())}}
    data.unlink(missing_ok=True)
    return res


# ----------------------------------------------------------------------------- wait policy


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def wait_trials(envoy: "BenchEnvoy", port: int, size: int, trials: int, waiters: int, tag: str) -> dict[str, Any]:
    """Scenario 5: per trial, one first request to the slow upstream, then `waiters`
    duplicates sent while it is in flight. Returns answer times relative to the first's."""
    import threading

    sys.setswitchinterval(0.0005)
    body = body_of(size)
    deltas: list[float] = []
    firsts: list[float] = []
    statuses: dict[str, int] = {}
    replayed = 0
    before = envoy.counters()
    for t in range(trials):
        key = f"wait-{tag}-{size}-{t}"
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=15) for _ in range(waiters + 1)]
        for c in conns:
            c.connect()
        done: list[float] = [0.0] * (waiters + 1)
        info: list[tuple[int, str]] = [(0, "")] * (waiters + 1)

        def go(i: int) -> None:
            c = conns[i]
            c.request("POST", "/orders", body=body, headers={"Idempotency-Key": key, "Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            done[i] = time.monotonic()
            info[i] = (r.status, r.getheader("idempotent-replayed") or "")

        first = threading.Thread(target=go, args=(0,))
        t0 = time.monotonic()
        first.start()
        time.sleep(SLOW_MS / 1000 * 0.3)  # the first request holds the key now
        others = [threading.Thread(target=go, args=(i,)) for i in range(1, waiters + 1)]
        for th in others:
            th.start()
        for th in [first, *others]:
            th.join(30)
        for c in conns:
            c.close()
        firsts.append((done[0] - t0) * 1000)
        for i in range(1, waiters + 1):
            deltas.append((done[i] - done[0]) * 1000)
            statuses[str(info[i][0])] = statuses.get(str(info[i][0]), 0) + 1
            replayed += info[i][1] == "true"
    time.sleep(harness.METRICS_FLUSH_S + 0.2)  # idemgate flushes its counters on a tick
    after = envoy.counters()
    pre = f"wasmcustom.idemgate.{SCENARIOS['wait']['ns']}."
    return {
        "trials": trials,
        "waiters": waiters,
        "slow_ms": SLOW_MS,
        "first_ms_median": statistics.median(firsts),
        "delta_ms_median": statistics.median(deltas),
        "delta_ms_p90": _pct(deltas, 0.9),
        "delta_ms_min": min(deltas),
        "delta_ms_max": max(deltas),
        "replayed": replayed,
        "answers": len(deltas),
        "statuses": statuses,
        "counters": {
            k[len(pre):]: after.get(k, 0) - before.get(k, 0)
            for k in after
            if k.startswith(pre) and after.get(k, 0) != before.get(k, 0)
        },
    }


# ----------------------------------------------------------------------------- etcd

ETCD_CLUSTER: list[Any] = [None]  # the fleet rows' cluster, while it runs


def start_etcd(members: int, cpu: str | None, base_dir: str | None) -> tuple[list[int], dict[str, Any]]:
    """Starts the fleet rows' etcd cluster (processes on loopback, flags of envoy/fleet/etcd.flags,
    pinned to `cpu`: wrk's, so that Envoy's CPU stays its own); stopped by PID at exit."""
    import etcd_cluster  # tests/etcd_cluster.py, shared with tests/test_fleet.py

    if etcd_cluster.ETCD is None:
        raise SystemExit("fleet rows need etcd (make fleet-setup), or leave them out with BENCH_ONLY")
    cluster = etcd_cluster.Cluster(size=members, cpu=cpu, base_dir=base_dir)
    ETCD_CLUSTER[0] = cluster
    atexit.register(stop_etcd)
    log(f"starting etcd: {members} member(s) on loopback, data in {cluster.dir}"
        + (f", pinned to CPU {cpu}" if cpu is not None else ""))
    cluster.start()
    fsync_ms = fsync_latency_ms(cluster.dir)
    log(f"etcd data dir: one 4 KiB O_DSYNC write takes {fsync_ms:.2f} ms (median of 50; etcd syncs its WAL per commit)")
    version = subprocess.run([etcd_cluster.ETCD, "--version"], capture_output=True, text=True, timeout=30).stdout
    fs = subprocess.run(["df", "--output=fstype", str(cluster.dir)], capture_output=True, text=True, timeout=30)
    return [m.client for m in cluster.members], {
        "members": members,
        "version": version.splitlines()[0] if version else "etcd ?",
        "data_fs": fs.stdout.split()[-1] if fs.returncode == 0 and fs.stdout.split() else "?",
        "cpu": cpu,
        "fsync_ms": fsync_ms,
        "flags": etcd_cluster.etcd_flags(),
    }


def fsync_latency_ms(directory: Path, n: int = 50) -> float:
    """Median time of a 4 KiB O_DSYNC write in `directory` (what every etcd commit waits for)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o600)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.pwrite(fd, b"x" * 4096, 0)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times)


def stop_etcd() -> None:
    cluster, ETCD_CLUSTER[0] = ETCD_CLUSTER[0], None
    if cluster is not None:
        cluster.stop()


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "5")))
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", "3")))
    ap.add_argument("--warmup", type=int, default=int(os.environ.get("BENCH_WARMUP", "1")))
    ap.add_argument("--floor-wasm", type=Path, required=True)
    ap.add_argument("--probe-wasm", type=Path, required=True)
    ap.add_argument("--bare-wasm", type=Path, help="bench/bare's module (the `bare` row; absent: no such row)")
    ap.add_argument("--idemgate-wasm", type=Path, default=harness.wasm_path())
    ap.add_argument("--wait-trials", type=int, default=int(os.environ.get("BENCH_WAIT_TRIALS", "20")))
    ap.add_argument("--waiters", type=int, default=CONNECTIONS - 1)
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""), help="comma-separated scenario ids")
    ap.add_argument("--etcd-members", type=int, default=int(os.environ.get("BENCH_ETCD_MEMBERS", "3")),
                    help="etcd members for the fleet rows (processes on loopback)")
    ap.add_argument("--etcd-dir", default=os.environ.get("BENCH_ETCD_DIR") or None,
                    help="parent of the etcd data dirs (default: the temp dir)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", action="store_true", default=os.environ.get("BENCH_PROFILE", "0") == "1",
                    help="after the rounds, one more run per configuration under perf record "
                    "(cpu-clock samples of the Envoy process): Envoy's CPU per request split by "
                    "thread and by code (kernel, libc, envoy binary, generated code)")
    ap.add_argument(
        "--variant", action="append", default=[], metavar="NAME=WASM:SCENARIOS",
        help="also run SCENARIOS (comma-separated, e.g. first,replay or hash) with another build "
        "WASM of their filter, interleaved with the rest; repeatable (compare builds in one Envoy)",
    )
    args = ap.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds >= 1 and --seconds > 0")

    harness.ensure_docker()
    ncpu = os.cpu_count() or 1
    envoy_cpu, wrk_cpu = (str(ncpu - 1), "0") if ncpu >= 2 else (None, None)
    variant_wasm: dict[str, Path] = {}
    for spec in args.variant:
        name, rest = spec.split("=", 1)
        path, scen = rest.rsplit(":", 1)
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            ap.error(f"--variant name must be [A-Za-z0-9_]+, got {name!r}")
        variant_wasm[name] = Path(path).resolve()
        for base in scen.split(","):
            sc = dict(SCENARIOS[base])
            sc["title"] = f"{sc['title']} [{name}]"
            if "ns" in sc:
                sc["ns"] = f"{sc['ns']}{name}"
            SCENARIOS[f"{base}@{name}"] = sc
    if args.bare_wasm is None:
        del SCENARIOS["bare"]
    selected = [s for s in SCENARIOS if not args.only or s in args.only.split(",") or "@" in s]
    ports = {sid: harness.free_port() for sid in selected if sid != "upstream"}
    ports["upstream"] = harness.free_port()
    if "wait" in ports:
        ports["slow_upstream"] = harness.free_port()
    admin_port = harness.free_port()
    wasm = {"idemgate": args.idemgate_wasm.resolve(), "floor": args.floor_wasm.resolve(), "probe": args.probe_wasm.resolve()}
    if args.bare_wasm is not None:
        wasm["bare"] = args.bare_wasm.resolve()
    wasm.update({f"var_{n}": p for n, p in variant_wasm.items()})
    for name, p in wasm.items():
        if not p.is_file():
            raise SystemExit(f"{name} wasm not found: {p}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    etcd_ports: list[int] = []
    etcd_info: dict[str, Any] = {}
    if any(is_fleet(s) for s in ports):
        etcd_ports, etcd_info = start_etcd(args.etcd_members, wrk_cpu, args.etcd_dir)
    envoy = BenchEnvoy(bootstrap(ports, admin_port, etcd_ports), admin_port, wasm, envoy_cpu)
    atexit.register(envoy.stop)

    tag = secrets.token_hex(3)
    log(f"starting Envoy ({harness.envoy_image()}, --concurrency 1"
        + (f", pinned to CPU {envoy_cpu}; wrk on CPU {wrk_cpu}" if envoy_cpu else "") + ")")
    try:
        envoy.start()
    except RuntimeError as e:
        if "wait" not in ports:
            raise
        # An idemgate without the wait policy refuses the wait listener's configuration.
        log(f"Envoy refused the configuration with the wait listener; retrying without it:\n{str(e)[-1500:]}")
        envoy.stop()
        selected.remove("wait")
        del ports["wait"], ports["slow_upstream"]
        envoy = BenchEnvoy(bootstrap(ports, admin_port, etcd_ports), admin_port, wasm, envoy_cpu)
        atexit.register(envoy.stop)
        envoy.start()
    log(f"Envoy CPU from {envoy.cpu_source()}")
    notes = check_scenarios(envoy, ports, tag)
    for n in notes:
        log(n)

    configs = [(label, sid) for label in SIZES for sid in selected if label in SCENARIOS[sid].get("sizes", SIZES)]
    run_prefix = lambda r, sid, label: f"{tag}-r{r}-{sid}-{label}"  # noqa: E731

    def key_prefix(r: int | str, sid: str, label: str) -> str:
        return replay_key(tag, label) if SCENARIOS[sid]["mode"] == "fixed" else run_prefix(r, sid, label)

    # Warm-up: every configuration once (JIT tiers, connection pools). First-request listeners
    # run longer so that their slot table is full (the steady state under unique keys).
    log(f"warm-up: {len(configs)} configurations")
    for label, sid in configs:
        secs = args.warmup
        if sid.split("@")[0] in ("first", "first_p1", "first_b3") and label == "1KiB":
            secs = max(args.warmup, 3)
        measure(envoy, sid, ports[sid], SIZES[label], label, key_prefix("w", sid, label), secs, wrk_cpu)

    results: dict[str, dict[str, Any]] = {f"{label}/{sid}": {"size": label, "scenario": sid, "runs": []} for label, sid in configs}
    t0 = time.monotonic()
    REDO_BUDGET[0] = len(configs)
    load_start = os.getloadavg()
    for r in range(1, args.rounds + 1):
        for label, sid in configs:
            res = measure(envoy, sid, ports[sid], SIZES[label], label, key_prefix(r, sid, label), args.seconds,
                          wrk_cpu, retry=True)
            results[f"{label}/{sid}"]["runs"].append(res)
            extra = f" {res['counters']}" if "counters" in res else ""
            log(f"round {r}/{args.rounds} {label:>5} {sid:<8} {res['rps']:9.0f} req/s  p50 {res['p50_us']:6d}us"
                f"  p99 {res['p99_us']:6d}us  cpu {res['cpu_us_per_req']:6.1f}us/req  other {res['other_load']:.2f}"
                f"  err {res['errors']}{extra}")
    log(f"measured {len(configs) * args.rounds} runs in {time.monotonic() - t0:.0f}s")

    profiles: dict[str, Any] = {}
    if args.profile:
        if shutil.which("perf") is None:
            raise SystemExit("--profile needs perf (Debian package linux-perf)")
        for label, sid in configs:
            res = profile_run(envoy, sid, ports[sid], SIZES[label], label, key_prefix("p", sid, label),
                              args.seconds, wrk_cpu, args.out.parent / "perf")
            profiles[f"{label}/{sid}"] = res
            split = ", ".join(f"{k} {v * res['cpu_us_per_req']:.0f}" for k, v in res["profile"]["share"].items())
            log(f"profile {label:>5} {sid:<8} cpu {res['cpu_us_per_req']:6.1f}us/req: {split}")

    wait: dict[str, Any] = {}
    if "wait" in selected:
        for label, size in SIZES.items():
            wait[label] = wait_trials(envoy, ports["wait"], size, args.wait_trials, args.waiters, tag)
            w = wait[label]
            log(f"wait {label}: {w['answers']} duplicates answered {w['delta_ms_median']:.1f} ms (median), "
                f"{w['delta_ms_p90']:.1f} ms (p90), {w['delta_ms_max']:.1f} ms (max) after the first request's "
                f"answer; {w['replayed']} replays; statuses {w['statuses']}; counters {w['counters']}")

    for entry in results.values():
        runs = entry["runs"]
        entry["median"] = {
            k: statistics.median(run[k] for run in runs)
            for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req", "cpu_util", "other_load", "wrk_cpu_util")
        }
        if all("etcd_cpu_us_per_req" in run for run in runs):
            entry["median"]["etcd_cpu_us_per_req"] = statistics.median(run["etcd_cpu_us_per_req"] for run in runs)
        entry["redone"] = sum(run.get("redone", 0) for run in runs)
        entry["rps_min"] = min(run["rps"] for run in runs)
        entry["rps_max"] = max(run["rps"] for run in runs)
        entry["errors"] = sum(run["errors"] for run in runs)
        entry["requests"] = sum(run["requests"] for run in runs)
        if any("counters" in run for run in runs):
            total: dict[str, int] = {}
            for run in runs:
                for k, v in run.get("counters", {}).items():
                    total[k] = total.get(k, 0) + v
            entry["counters"] = total

    counters_end = envoy.counters()
    version = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", harness.CONTAINER_ENVOY,
         harness.envoy_image(), "--version"],
        capture_output=True, text=True, timeout=120,
    )
    version = (version.stdout + version.stderr).strip().splitlines()
    version = version[-1].strip() if version else "?"
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    out = {
        "rounds": args.rounds,
        "loadavg_before": load_start,
        "loadavg_after": os.getloadavg(),
        "seconds": args.seconds,
        "connections": CONNECTIONS,
        "envoy_cpu": envoy_cpu,
        "wrk_cpu": wrk_cpu,
        "cpu_source": envoy.cpu_source(),
        "envoy_image": harness.envoy_image(),
        "envoy_version": version,
        "wrk_version": " ".join(wrk_v[0].split()[:2]) if wrk_v else "wrk ?",
        "notes": notes,
        "scenarios": {sid: SCENARIOS[sid]["title"] for sid in selected},
        "results": results,
        "wait": wait,
        "gauges_end": {k: v for k, v in counters_end.items() if k.endswith("_keys")},
        "etcd": etcd_info,
        "profiles": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")
    envoy.stop()
    stop_etcd()
    return 0


if __name__ == "__main__":
    sys.exit(main())
