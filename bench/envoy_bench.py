#!/usr/bin/env python3
"""Load benchmark of idemgate inside Envoy, against Envoy itself and against the alternative
a user would run instead (`make bench` runs it).

The origin is outside the Envoy under test: nginx (bench/hostprocs.py `NginxOrigin`: Debian
nginx-light, one process, `return 200 {"ok":true}`, keep-alive), pinned to wrk's CPU, so
Envoy's CPU per request (its container's cgroup) holds no part of the origin's work. One Envoy
container (`--concurrency 1`, pinned to the other CPU) holds one listener per scenario.

Scenarios are the entries of SCENARIOS below, run in that order and reported in that order
(bench/report.py takes titles and order from the JSON this writes). Adding a scenario is one
entry: an Envoy config variant is `filters` (the HTTP filters before the router, a function)
or `idemgate` (an idemgate configuration: the listener gets idemgate's filters from
tests/harness.py `idemgate_filters`, or from `chain` if given, a function (sid, config) ->
filters, e.g. idemgate loaded as one filter instead of two); `mode` is the wrk key mode
(unique: a new key per request, fixed: one primed key, i.e. replays). Optional keys: `sizes`
(the body sizes it runs at), `cluster` (origin | inenvoy | slow), `local` (answers without the
origin), `fill` (warm up longer: first requests fill the slot table), `fleet`, `alt`, `ns`
(the idemgate store namespace and counter prefix; default: the id without `_`).

    pass      no HTTP filter but the router (the limit)
    floor     bench/floor: one Wasm filter that reads one header and continues
    floor2    diagnostic: two floor filters sharing one VM (idemgate in two-filter mode is two)
    bare      diagnostic (with --bare-wasm): bench/bare, the floor without the proxy-wasm SDK
              and without std (its own ABI declarations, no_std)
    first     idemgate, a new key per request (first requests)
    first_p1  idemgate with store.probes 1, a new key per request
    first_b3, replay_b3  idemgate with the opt-in fingerprint.algorithm blake3
    replay    idemgate, one key (after one priming request: replays)
    first_2f, replay_2f  idemgate in two-filter mode (reader + gate, no
              allow_on_headers_stop_iteration: hosts that cannot set it), beside `first` and
              `replay` (one filter, as shipped)
    alt_first, alt_replay  the alternative: idempotent-proxy-server (cargo install) with Redis, both
              pinned to Envoy's CPU, in front of the same origin, the same requests (wrk to its
              `/URL_ORIGIN`); CPU per request = the proxy's + Redis's (/proc), every run
              interleaved with idemgate's, so each round pairs them
    body, hash, hash_b3  diagnostic, 64 KiB only: bench/probe buffers the body and copies it
              into the VM; plus SHA-256 / BLAKE3 of it
    answer    diagnostic: bench/probe answering every request itself after buffering and
              copying its body, holding the headers meanwhile (one filter with
              allow_on_headers_stop_iteration, as idemgate ships): the floor of a replay in
              idemgate's design (before any lookup)
    answer_hash  diagnostic: `answer` plus SHA-256 of the body (a replay's fingerprint)
    lookup    diagnostic: `answer_hash` plus idemgate's other hostcalls for a replay
    claim     diagnostic: bench/probe making idemgate's hostcalls for a first request with
              none of its logic: the floor of a first request in idemgate's design
    pass_inenvoy  diagnostic: passthrough to an upstream inside the same Envoy (a listener that
              answers with `direct_response` behind the `buffer` filter): the method before
              issue 20, where Envoy's CPU included the upstream's side of every request
    upstream  diagnostic: wrk straight to that in-Envoy upstream listener
    fleet_first, fleet_replay  idemgate in fleet mode (store.etcd) against a local etcd cluster
              of --etcd-members processes on loopback (pinned to wrk's CPU, stopped by PID)
    wait      scenario 5, not a wrk run: idemgate with onConcurrent {action: wait} in front
              of a slow origin (tests/origin.py, answering after --slow-ms). Per trial one first
              request, then --waiters duplicates sent while it is in flight; measured: when each
              duplicate is answered, relative to when the first one's answer arrived.

Load: wrk (1 thread, 16 connections, --duration seconds per run), runs interleaved
(every configuration once per round, in a fixed order), --rounds rounds; medians reported.
On a machine with two or more CPUs, Envoy (and the alternative) are pinned to one CPU, wrk
and the origin to another. Everything is loopback; every run is bounded (wrk -d, plus a
subprocess timeout).

Per run: requests/s, p50/p99 latency (wrk), CPU per request of the system under test (Envoy:
delta of its container's cgroup CPU time; the alternative: the proxy's and Redis's utime +
stime), the origin's requests per request (nginx stub_status: first requests 1, replays 0)
and its CPU, upstream connections Envoy opened (keep-alive holds), and for idemgate listeners
the deltas of its counters. Fleet rows also report etcd's CPU per request.

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

sys.path.insert(0, str(REPO / "bench"))
import hostprocs  # noqa: E402  (the origin and the alternative: processes on the host)

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
UPSTREAM_BODY = hostprocs.ORIGIN_BODY
CX_STAT = "cluster.origin.upstream_cx_total"
CONNECTIONS = 16
SLOW_MS = 100

FLOOR = f"{CONTAINER_DIR}/floor.wasm"
PROBE = f"{CONTAINER_DIR}/probe.wasm"


def _probe(mode: str) -> Any:
    return lambda: [_wasm(f"probe_{mode}", f"probe_{mode}", f"probe-{mode}", PROBE, mode)]


def _probe_held(mode: str) -> Any:
    """As idemgate ships: the probe filter alone, holding the request headers itself
    (allow_on_headers_stop_iteration) until it has the body."""
    def filters() -> list[dict[str, Any]]:
        f = _wasm(f"probe_{mode}", f"probe_{mode}", f"probe-{mode}", PROBE, mode)
        f["typed_config"]["config"]["allow_on_headers_stop_iteration"] = True
        return [f]
    return filters


def _two_filter(sid: str, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """idemgate in two-filter mode: reader + gate in one VM, without the flag."""
    return harness.idemgate_filters({"name": sid, "idemgate_config": cfg, "vm_id": f"idemgate-{sid}", "mode": "two"})


# The scenarios, in run and report order (see the module docstring for the keys).
SCENARIOS: dict[str, dict[str, Any]] = {
    "pass": {"title": "1 passthrough (no wasm)", "mode": "unique", "filters": lambda: []},
    "floor": {"title": "2 floor wasm (1 filter, reads 1 header)", "mode": "unique",
              "filters": lambda: [_wasm("floor", "floor", "floor", FLOOR)]},
    "bare": {"title": "floor without the SDK and std (bench/bare: own ABI, no_std) [diag]", "mode": "unique",
             "filters": lambda: [_wasm("bare", "bare", "bare", f"{CONTAINER_DIR}/bare.wasm")]},
    "floor2": {"title": "floor x2 (2 filters, 1 VM) [diag]", "mode": "unique",
               "filters": lambda: [_wasm("floor_a", "floor_a", "floor2", FLOOR), _wasm("floor_b", "floor_b", "floor2", FLOOR)]},
    "first": {"title": "3 idemgate first requests (probes 8)", "mode": "unique", "idemgate": {}, "fill": True},
    "alt_first": {"title": "idempotent-proxy-server + Redis, first requests", "mode": "unique", "alt": "ORIGIN"},
    "first_p1": {"title": "3b idemgate first requests, probes 1", "mode": "unique",
                 "idemgate": {"store": {"probes": 1}}, "fill": True},
    "first_b3": {"title": "3c idemgate first requests, fingerprint.algorithm blake3", "mode": "unique",
                 "idemgate": {"fingerprint": {"algorithm": "blake3"}}, "fill": True},
    "replay": {"title": "4 idemgate replays (one key)", "mode": "fixed", "idemgate": {}},
    "first_2f": {"title": "3t idemgate first requests, two-filter mode (reader + gate)", "mode": "unique",
                 "idemgate": {}, "fill": True, "chain": _two_filter},
    "replay_2f": {"title": "4t idemgate replays, two-filter mode (reader + gate)", "mode": "fixed",
                  "idemgate": {}, "chain": _two_filter},
    "alt_replay": {"title": "idempotent-proxy-server + Redis, replays (one key)", "mode": "fixed", "alt": "ORIGIN"},
    "wait": {"title": "5 concurrent duplicates, wait policy", "mode": "wait", "sizes": [], "cluster": "slow",
             "idemgate": {"onConcurrent": {"action": "wait", "waitMillis": 5000}}},
    "replay_b3": {"title": "4b idemgate replays, fingerprint.algorithm blake3", "mode": "fixed",
                  "idemgate": {"fingerprint": {"algorithm": "blake3"}}},
    "fleet_first": {"title": "3f idemgate fleet (etcd) first requests", "mode": "unique", "fleet": True,
                    "idemgate": {}},
    "fleet_replay": {"title": "4f idemgate fleet (etcd) replays (one key)", "mode": "fixed", "fleet": True,
                     "idemgate": {}},
    "body": {"title": "floor + buffer body + copy into VM [diag]", "mode": "unique", "sizes": ["64KiB"],
             "filters": _probe("body")},
    "hash": {"title": "floor + buffer + copy + SHA-256 [diag]", "mode": "unique", "sizes": ["64KiB"],
             "filters": _probe("hash")},
    "hash_b3": {"title": "floor + buffer + copy + BLAKE3 (opt-in algorithm) [diag]", "mode": "unique",
                "sizes": ["64KiB"], "filters": _probe("hash_b3")},
    "claim": {"title": "floor of a first request: 1 filter holding the headers, body copied + SHA-256, claim "
                       "(get + CAS set), answer read, completion (get + 2 sets) [diag]",
              "mode": "unique", "filters": _probe_held("claim")},
    "answer": {"title": "floor of a replay: 1 filter holding the headers, body buffered + copied, answered locally [diag]",
               "mode": "unique", "local": True, "filters": _probe_held("answer")},
    "answer_hash": {"title": "floor of a replay + SHA-256 of the body [diag]", "mode": "unique", "local": True,
                    "filters": _probe_held("answer_hash")},
    "lookup": {"title": "floor of a replay + SHA-256 + idemgate's lookups (all headers, time, bucket and record gets) [diag]",
               "mode": "unique", "local": True, "filters": _probe_held("lookup")},
    "pass_inenvoy": {"title": "passthrough to an upstream inside the same Envoy (the method before issue 20) [diag]",
                     "mode": "unique", "cluster": "inenvoy", "filters": lambda: []},
    "upstream": {"title": "in-Envoy upstream listener alone (direct_response) [diag]", "mode": "unique",
                 "cluster": "none"},
}
# store.etcd of the fleet rows (the Envoy cluster "etcd" lists the bench's members).
ETCD_SPEC = {"cluster": "etcd", "authority": "etcd", "prefix": "/idemgate-bench/", "timeoutMillis": 1000,
             "retries": 2, "failPolicy": "closed"}


def ns_of(sid: str) -> str | None:
    """The idemgate store namespace (and counter prefix) of a scenario, None if not idemgate."""
    sc = SCENARIOS.get(sid, {})
    if "idemgate" not in sc:
        return None
    return sc.get("ns") or re.sub(r"[^A-Za-z0-9]", "", sid)


def is_fleet(sid: str) -> bool:
    return bool(SCENARIOS.get(sid, {}).get("fleet"))


def is_alt(sid: str) -> bool:
    return bool(SCENARIOS.get(sid, {}).get("alt"))


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
    """The HTTP filters (before the router) of a scenario's listener."""
    if "@" in sid:
        # A variant: the base scenario's filters with another build of the wasm.
        base, variant = sid.split("@", 1)
        filters = json.loads(json.dumps(scenario_filters(base)))
        for f in filters:
            cfg = f["typed_config"]["config"]
            cfg["vm_config"]["code"]["local"]["filename"] = f"{CONTAINER_DIR}/var_{variant}.wasm"
            cfg["vm_config"]["vm_id"] += f"@{variant}"
            if ns_of(base) and cfg["name"] == "idemgate":
                c = json.loads(cfg["configuration"]["value"])
                c["store"]["namespace"] = ns_of(sid)
                cfg["configuration"]["value"] = json.dumps(c, separators=(",", ":"))
        return filters
    sc = SCENARIOS[sid]
    if "idemgate" not in sc:
        return sc["filters"]()
    cfg: dict[str, Any] = json.loads(json.dumps(sc["idemgate"]))
    cfg.setdefault("store", {})["namespace"] = ns_of(sid)
    if sc.get("fleet"):
        cfg["store"]["etcd"] = dict(ETCD_SPEC)
    chain = sc.get("chain")
    if chain is not None:
        return chain(sid, cfg)
    return harness.idemgate_filters({"name": sid, "idemgate_config": cfg, "vm_id": f"idemgate-{sid}"})


def bootstrap(ports: dict[str, int], admin_port: int, origin_port: int, slow_port: int | None = None,
              etcd_ports: list[int] | None = None) -> dict[str, Any]:
    """Envoy's configuration: a listener per scenario (ports: sid -> port), routed to the
    cluster its scenario names: `origin` (nginx, outside Envoy), `slow` (tests/origin.py, for
    the wait policy) or `inenvoy` (the in-Envoy upstream listener, scenario `upstream`'s port)."""
    listeners: list[dict[str, Any]] = []
    clusters = [_cluster("origin", origin_port)]
    if "upstream" in ports:
        listeners.append(_listener(
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
        ))
        clusters.append(_cluster("inenvoy", ports["upstream"]))
    if slow_port is not None:
        clusters.append(_cluster("slow", slow_port))
    for sid, port in ports.items():
        if sid == "upstream":
            continue
        cluster = SCENARIOS[sid].get("cluster", "origin")
        listeners.append(
            _listener(sid, port, {"route": {"cluster": cluster, "timeout": "15s"}}, scenario_filters(sid))
        )
    if etcd_ports:
        import etcd_cluster  # tests/etcd_cluster.py: etcd's gRPC API as an HTTP/2 cluster

        clusters.append(etcd_cluster.envoy_cluster("etcd", etcd_ports))
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
        return hostprocs.http_get(self.admin_port, path, timeout=10)

    def counters(self) -> dict[str, int]:
        """idemgate's counters and the origin cluster's connection count."""
        q = urllib.parse.urlencode({"format": "json", "filter": r"^(wasmcustom\.idemgate\.|cluster\.origin\.upstream_cx_total$)"})
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


def post(port: int, key: str, size: int, path: str = "/orders") -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST", path, body=body_of(size), headers={"Idempotency-Key": key, "Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


class Bench:
    """What the runs drive and measure: the Envoy (a listener per scenario), the origin
    outside it, the alternative (when an alt_* scenario is selected) and the fleet's etcd."""

    def __init__(self, envoy: "BenchEnvoy", ports: dict[str, int], origin: hostprocs.NginxOrigin,
                 alt: hostprocs.AltProxy | None, wrk_cpu: str | None):
        self.envoy, self.ports, self.origin, self.alt, self.wrk_cpu = envoy, ports, origin, alt, wrk_cpu

    def target(self, sid: str) -> tuple[int, str]:
        """(port, path) that wrk drives for a scenario."""
        if is_alt(sid):
            assert self.alt is not None
            return self.alt.port, self.alt.path(SCENARIOS[sid.split("@")[0]]["alt"])
        return self.ports[sid], "/orders"

    def sut_cpu_ns(self, sid: str) -> int:
        """CPU time of the system under test: the alternative's processes, or Envoy's container."""
        if is_alt(sid):
            assert self.alt is not None
            return self.alt.cpu_ns()
        return self.envoy.cpu_ns()

    def own_cpu_ns(self) -> int:
        """CPU time of every long-running process this bench started (not wrk: see children_cpu_ns)."""
        etcd = ETCD_CLUSTER[0]
        return (self.envoy.cpu_ns() + self.origin.cpu_ns() + (self.alt.cpu_ns() if self.alt else 0)
                + (etcd.cpu_ns() if etcd is not None else 0))


def check_scenarios(bench: Bench, tag: str) -> list[str]:
    """One request per scenario (and the replay priming); returns notes."""
    notes = []
    targets = {sid: bench.target(sid) for sid in [*bench.ports, *[s for s in SCENARIOS if is_alt(s) and bench.alt]]}
    for sid, (port, path) in targets.items():
        if sid not in SCENARIOS or SCENARIOS[sid]["mode"] == "wait":
            continue
        status, headers, body = post(port, f"check-{tag}-{sid}", 1024, path)
        if status != 200 or body != UPSTREAM_BODY.encode():
            raise RuntimeError(f"{sid}: sanity request got {status} {headers} {body[:200]!r}")
        local = SCENARIOS[sid].get("local", False)
        if bool(headers.get("idempotent-replayed")) != local:
            raise RuntimeError(f"{sid}: first request came back {'not ' if local else ''}as a local answer: {headers}")
    for sid, (port, path) in targets.items():
        if SCENARIOS.get(sid, {}).get("mode") != "fixed":
            continue
        for size_label, size in SIZES.items():
            key = replay_key(tag, size_label)
            s1, h1, _ = post(port, key, size, path)
            # (fleet: the answer's last bytes come once etcd has the completion)
            before = bench.origin.requests()
            s2, h2, b2 = post(port, key, size, path)
            reached = bench.origin.requests() - before
            if is_alt(sid):
                # idempotent-proxy-server marks no replay: the origin's request count proves it
                if s1 != 200 or s2 != 200 or reached != 0:
                    raise RuntimeError(f"{sid} priming {size_label}: {s1} {h1} / {s2} {h2}, origin reached {reached}x")
                notes.append(f"{sid} {size_label}: the second request was answered {s2} without reaching the origin, "
                             f"body {b2!r}")
                continue
            if s1 != 200 or h1.get("idempotent-replayed") or s2 != 200 or h2.get("idempotent-replayed") != "true" \
                    or reached != 0:
                raise RuntimeError(f"{sid} priming {size_label}: {s1} {h1} / {s2} {h2}, origin reached {reached}x")
            notes.append(f"{sid} {size_label}: the second request was answered {s2} with idempotent-replayed: true "
                         f"without reaching the origin, body {b2!r}")
    return notes


def replay_key(tag: str, size_label: str) -> str:
    return f"replay-{tag}-{size_label}"


# ----------------------------------------------------------------------------- wrk


def run_wrk(port: int, mode: str, prefix: str, size: int, seconds: float, cpu: str | None,
            path: str = "/orders") -> dict[str, Any]:
    cmd = [
        "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(LUA),
        f"http://127.0.0.1:{port}{path}", "--", mode, prefix, str(size), path,
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


OTHER_LOAD_LIMIT = 0.35  # CPUs busy with something else than the bench's processes: redo the run once
REDO_BUDGET = [0]  # redos left in this invocation (set in main: one extra round at most)


def measure(bench: Bench, sid: str, size: int, size_label: str, prefix: str, seconds: float,
            retry: bool = False) -> dict[str, Any]:
    sc = SCENARIOS[sid]
    ns = ns_of(sid)
    envoy, origin = bench.envoy, bench.origin
    port, path = bench.target(sid)
    before_c = envoy.counters()
    etcd = ETCD_CLUSTER[0]
    etcd0 = etcd.cpu_ns() if etcd is not None else 0
    alt_split0 = bench.alt.cpu_split_ns() if is_alt(sid) and bench.alt else {}
    origin_req0, origin_cpu0 = origin.requests(), origin.cpu_ns()
    before, own0, busy0, kids0 = bench.sut_cpu_ns(sid), bench.own_cpu_ns(), busy_ns(), children_cpu_ns()
    res = run_wrk(port, sc["mode"], prefix, size, seconds, bench.wrk_cpu, path)
    after, own1, busy1, kids1 = bench.sut_cpu_ns(sid), bench.own_cpu_ns(), busy_ns(), children_cpu_ns()
    origin_cpu1 = origin.cpu_ns()
    alt_split1 = bench.alt.cpu_split_ns() if is_alt(sid) and bench.alt else {}
    etcd_ns = (etcd.cpu_ns() - etcd0) if etcd is not None else 0
    if ns:
        time.sleep(harness.METRICS_FLUSH_S + 0.2)  # idemgate flushes its counters on a tick
    origin_req1 = origin.requests()
    after_c = envoy.counters()
    wall_ns = res["duration_us"] * 1000
    n = max(1, res["requests"])
    res["wrk_cpu_util"] = (kids1 - kids0) / wall_ns
    res["etcd_cpu_util"] = etcd_ns / wall_ns
    if sc.get("fleet"):
        res["etcd_cpu_us_per_req"] = etcd_ns / 1000 / n
    # Busy CPU time not spent by the bench's processes (Envoy, the origin, the alternative, etcd)
    # or wrk: other processes, and kernel work such as loopback softirqs accounted outside them.
    res["other_load"] = max(0, (busy1 - busy0) - (own1 - own0) - (kids1 - kids0)) / wall_ns
    if retry and res["other_load"] > OTHER_LOAD_LIMIT and REDO_BUDGET[0] > 0:
        REDO_BUDGET[0] -= 1
        log(f"  {size_label} {sid}: {res['other_load']:.2f} CPUs busy with other work during the run; redoing it once")
        redo_prefix = prefix if sc["mode"] == "fixed" else prefix + "-redo"  # fixed: the primed key
        again = measure(bench, sid, size, size_label, redo_prefix, seconds)
        again["redone"] = 1
        return again
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["cpu_us_per_req"] = (after - before) / 1000 / n
    res["cpu_util"] = (after - before) / 1000 / res["duration_us"]
    if alt_split0:
        res["cpu_split_us_per_req"] = {k: (alt_split1[k] - alt_split0[k]) / 1000 / n for k in alt_split0}
    # Requests that reached the origin per completed request (the status reads excluded; requests
    # still in flight when wrk stops are served and counted too, so a little above 1 is normal).
    res["origin_per_req"] = (origin_req1 - origin_req0) / n
    res["origin_cpu_us_per_req"] = (origin_cpu1 - origin_cpu0) / 1000 / n
    res["upstream_cx"] = after_c.get(CX_STAT, 0) - before_c.get(CX_STAT, 0)
    if ns:
        pre = f"wasmcustom.idemgate.{ns}."
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


def profile_run(bench: Bench, sid: str, size: int, label: str, prefix: str, seconds: float,
                outdir: Path) -> dict[str, Any]:
    """One more wrk run of a configuration under `perf record -e cpu-clock` on the Envoy
    process (every thread). Returns the run and the share of samples per (thread, group)."""
    envoy = bench.envoy
    outdir.mkdir(parents=True, exist_ok=True)
    data = outdir / f"{label}-{sid.replace('@', '_')}.perf.data"
    rec = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", str(envoy.pid), "-o", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(0.5)
    try:
        res = measure(bench, sid, size, label, prefix, seconds)
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


def wait_trials(envoy: "BenchEnvoy", port: int, slow: harness.Origin, size: int, trials: int, waiters: int,
                tag: str) -> dict[str, Any]:
    """Scenario 5: per trial, one first request to the slow origin (tests/origin.py, answering
    after SLOW_MS), then `waiters` duplicates sent while it is in flight. Returns answer times
    relative to the first's."""
    import threading

    sys.setswitchinterval(0.0005)
    body = body_of(size)
    deltas: list[float] = []
    firsts: list[float] = []
    statuses: dict[str, int] = {}
    replayed = 0
    before = envoy.counters()
    slow.reset()
    for t in range(trials):
        key = f"wait-{tag}-{size}-{t}"
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=15) for _ in range(waiters + 1)]
        for c in conns:
            c.connect()
        done: list[float] = [0.0] * (waiters + 1)
        info: list[tuple[int, str]] = [(0, "")] * (waiters + 1)

        def go(i: int) -> None:
            c = conns[i]
            c.request("POST", f"/orders?delay={SLOW_MS / 1000}", body=body,
                      headers={"Idempotency-Key": key, "Content-Type": "application/json"})
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
    pre = f"wasmcustom.idemgate.{ns_of('wait')}."
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
        "origin_requests": len(slow.requests()),
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
            if base not in SCENARIOS or is_alt(base):
                ap.error(f"--variant {name}: {base!r} is not an Envoy scenario")
            sc = dict(SCENARIOS[base])
            sc["title"] = f"{sc['title']} [{name}]"
            if "ns" in sc:
                sc["ns"] = f"{sc['ns']}{name}"
            SCENARIOS[f"{base}@{name}"] = sc
    if args.bare_wasm is None:
        del SCENARIOS["bare"]
    only = [x for x in args.only.split(",") if x]
    unknown = [x for x in only if x not in SCENARIOS and not x.startswith("edge_") and x != "correctness"]
    if unknown:
        log(f"BENCH_ONLY names unknown Envoy scenarios {unknown} (known: {', '.join(SCENARIOS)})")
    selected = [s for s in SCENARIOS if not only or s in only or "@" in s]
    envoy_sids = [s for s in selected if not is_alt(s)]
    ports = {sid: harness.free_port() for sid in envoy_sids}
    if "pass_inenvoy" in ports and "upstream" not in ports:
        ports["upstream"] = harness.free_port()  # the in-Envoy upstream, not measured alone
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
    origin = hostprocs.NginxOrigin(wrk_cpu).start()
    atexit.register(origin.stop)
    log(f"origin: {origin.version()} on 127.0.0.1:{origin.port}"
        + (f", pinned to CPU {wrk_cpu} (wrk's)" if wrk_cpu is not None else ""))
    slow: harness.Origin | None = None
    if "wait" in ports:
        slow = harness.Origin(verbose=False).start()
    alt: hostprocs.AltProxy | None = None
    if any(is_alt(s) for s in selected):
        alt = hostprocs.AltProxy({"ORIGIN": f"http://127.0.0.1:{origin.port}/orders"}, envoy_cpu).start()
        atexit.register(alt.stop)
        log(f"alternative: idempotent-proxy-server {hostprocs.ALT_VERSION} on 127.0.0.1:{alt.port} with "
            f"{alt.versions()['redis']} on {alt.redis_port}" + (f", both pinned to CPU {envoy_cpu}" if envoy_cpu else ""))
    etcd_ports: list[int] = []
    etcd_info: dict[str, Any] = {}
    if any(is_fleet(s) for s in ports):
        etcd_ports, etcd_info = start_etcd(args.etcd_members, wrk_cpu, args.etcd_dir)

    def make_envoy() -> BenchEnvoy:
        e = BenchEnvoy(bootstrap(ports, admin_port, origin.port, slow.port if slow and "wait" in ports else None,
                                 etcd_ports), admin_port, wasm, envoy_cpu)
        atexit.register(e.stop)
        return e

    envoy = make_envoy()
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
        del ports["wait"]
        envoy = make_envoy()
        envoy.start()
    log(f"Envoy CPU from {envoy.cpu_source()}")
    bench = Bench(envoy, ports, origin, alt, wrk_cpu)
    notes = check_scenarios(bench, tag)
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
        secs = max(args.warmup, 3) if SCENARIOS[sid].get("fill") and label == "1KiB" else args.warmup
        measure(bench, sid, SIZES[label], label, key_prefix("w", sid, label), secs)

    results: dict[str, dict[str, Any]] = {f"{label}/{sid}": {"size": label, "scenario": sid, "runs": []} for label, sid in configs}
    t0 = time.monotonic()
    REDO_BUDGET[0] = len(configs)
    load_start = os.getloadavg()
    for r in range(1, args.rounds + 1):
        for label, sid in configs:
            res = measure(bench, sid, SIZES[label], label, key_prefix(r, sid, label), args.seconds, retry=True)
            results[f"{label}/{sid}"]["runs"].append(res)
            extra = f" {res['counters']}" if "counters" in res else ""
            log(f"round {r}/{args.rounds} {label:>5} {sid:<12} {res['rps']:9.0f} req/s  p50 {res['p50_us']:6d}us"
                f"  p99 {res['p99_us']:6d}us  cpu {res['cpu_us_per_req']:6.1f}us/req  origin {res['origin_per_req']:.2f}/req"
                f"  other {res['other_load']:.2f}  err {res['errors']}{extra}")
    log(f"measured {len(configs) * args.rounds} runs in {time.monotonic() - t0:.0f}s")

    profiles: dict[str, Any] = {}
    if args.profile:
        if shutil.which("perf") is None:
            raise SystemExit("--profile needs perf (Debian package linux-perf)")
        for label, sid in configs:
            if is_alt(sid):
                continue  # perf follows the Envoy process only
            res = profile_run(bench, sid, SIZES[label], label, key_prefix("p", sid, label), args.seconds,
                              args.out.parent / "perf")
            profiles[f"{label}/{sid}"] = res
            split = ", ".join(f"{k} {v * res['cpu_us_per_req']:.0f}" for k, v in res["profile"]["share"].items())
            log(f"profile {label:>5} {sid:<8} cpu {res['cpu_us_per_req']:6.1f}us/req: {split}")

    wait: dict[str, Any] = {}
    if "wait" in selected and slow is not None:
        for label, size in SIZES.items():
            wait[label] = wait_trials(envoy, ports["wait"], slow, size, args.wait_trials, args.waiters, tag)
            w = wait[label]
            log(f"wait {label}: {w['answers']} duplicates answered {w['delta_ms_median']:.1f} ms (median), "
                f"{w['delta_ms_p90']:.1f} ms (p90), {w['delta_ms_max']:.1f} ms (max) after the first request's "
                f"answer; {w['replayed']} replays; statuses {w['statuses']}; counters {w['counters']}")
        slow.stop()

    for entry in results.values():
        runs = entry["runs"]
        entry["median"] = {
            k: statistics.median(run[k] for run in runs)
            for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req", "cpu_util", "other_load", "wrk_cpu_util",
                      "origin_per_req", "origin_cpu_us_per_req")
        }
        for part in ("proxy", "redis"):
            if all(part in run.get("cpu_split_us_per_req", {}) for run in runs):
                entry["median"][f"{part}_cpu_us_per_req"] = statistics.median(
                    run["cpu_split_us_per_req"][part] for run in runs)
        entry["upstream_cx"] = sum(run.get("upstream_cx", 0) for run in runs)
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
        "origin": {"version": origin.version(), "cpu": wrk_cpu,
                   "what": "nginx, one process (master_process off), return 200 {\"ok\":true}, keep-alive, no access log"},
        "alt": ({"versions": alt.versions(), "config": alt.config(), "redis_keys_end": alt.keys()} if alt else {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")
    envoy.stop()
    stop_etcd()
    if alt:
        alt.stop()
    origin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
