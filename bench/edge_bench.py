#!/usr/bin/env python3
"""Load benchmark of the idemgate edge worker on workerd, against a passthrough worker
(`make bench` runs it after the Envoy runs; bench/report.py turns its JSON into tables).

One workerd process (edge/node_modules, the version the edge tests use), pinned to one CPU
as Envoy is, serves every scenario on its own socket:

    edge_pass      a trivial worker that forwards the request to the origin (the limit)
    edge_floor     the floor of a first request with a Durable Object per key: a worker with
                   no idemgate logic making the platform calls idemgate's first request makes
                   (body read whole, a new object per key reading its storage at start, a
                   begin round trip writing a record and an alarm in one batch, the request
                   forwarded, the response read whole, a complete round trip writing the
                   response) and answering with the origin's response
    edge_first     the idemgate edge worker (edge/worker, edge/dist), a new key per request
    edge_replay    the same worker, one key (primed: replays, answered from the isolate
                   cache or the key's Durable Object without reaching the origin)
    edge_upstream  diagnostic: wrk straight to the origin worker (its share of the CPU)

The origin is a third worker in the same process (a service binding, as a zero-cost
upstream): it reads the whole body and answers `200 {"ok":true}` with its Content-Length (as an
HTTP origin does; a service binding does not add it), and counts the requests
it served, so every run proves how many requests reached it (first requests: 1 each,
replays: 0). Durable Objects keep their storage in memory (workerd drops an object's in-memory
storage when it evicts the idle object, ~70 s: each replay run stores its key again first).

Load and statistics as bench/envoy_bench.py: wrk (1 thread, 16 connections, bench/wrk.lua,
the same requests in every scenario), runs interleaved, medians of --rounds, CPU
microseconds per request from the workerd process (utime + stime of all its threads).
Loopback only; every run is bounded (wrk -d, plus a subprocess timeout).

    bench/edge_bench.py --rounds 5 --seconds 3 --out target/bench/edge.json
    BENCH_ONLY=edge_pass,edge_replay BENCH_SECONDS=1 BENCH_ROUNDS=1   a quick check
"""
from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
import envoy_bench as eb  # noqa: E402  (wrk driver, CPU accounting, request bodies)
import harness  # noqa: E402

SCENARIOS: dict[str, dict[str, str]] = {
    "edge_pass": {"title": "1 passthrough worker (forwards to the origin)", "mode": "unique"},
    "edge_floor": {"title": "2 Durable Object floor probe (a first request's round trips and writes, no idemgate)",
                   "mode": "unique"},
    "edge_first": {"title": "3 idemgate edge worker, first requests", "mode": "unique"},
    "edge_replay": {"title": "4 idemgate edge worker, replays (one key)", "mode": "fixed"},
    "edge_upstream": {"title": "origin worker alone [diag]", "mode": "unique"},
}
EDGE = REPO / "edge"
WORKER_FILES = ["index.js", "core.js", "engine.js", "gate.js", "outcomes.js", "claims.js", "store.js"]
DIST_FILES = ["idemgate_edge.js", "idemgate_edge_bg.wasm"]
IDEMGATE_CONFIG = {"store": {"namespace": "edgebench"}}

ORIGIN_JS = """
let served = 0;
export default {
  async fetch(request) {
    if (request.method === "GET" && new URL(request.url).pathname === "/__served") {
      return new Response(String(served));
    }
    await request.arrayBuffer();
    served += 1;
    // with its length, as an HTTP origin sends it (a service binding drops the implicit one)
    return new Response('{"ok":true}', { headers: { "content-type": "application/json", "content-length": "11" } });
  },
};
"""

FLOOR_JS = """
import { DurableObject } from "cloudflare:workers";

export class FloorStore extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    ctx.blockConcurrencyWhile(async () => {
      const stored = await ctx.storage.get(["record", "tat"]);
      this.record = stored.get("record");
    });
  }
  begin({ fingerprint }) {
    this.record = fingerprint;
    const put = this.ctx.storage.put("record", fingerprint);
    const alarm = this.ctx.storage.setAlarm(Date.now() + 86400000);
    return Promise.all([put, alarm]).then(() => ({ claimed: true, record: fingerprint }));
  }
  complete(record) {
    this.record = record;
    return this.ctx.storage.put("record", record).then(() => true);
  }
  async alarm() {
    await this.ctx.storage.delete("record");
  }
}

export default {
  async fetch(request, env) {
    const body = await request.arrayBuffer();
    const key = request.headers.get("idempotency-key") ?? "";
    const stub = env.FLOOR_STORE.get(env.FLOOR_STORE.idFromName(key));
    await stub.begin({ fingerprint: new Uint8Array(32) });
    const upstream = await env.ORIGIN.fetch(new Request(request.url, { method: request.method, headers: request.headers, body }));
    const bytes = new Uint8Array(await upstream.arrayBuffer());
    await stub.complete(bytes);
    return new Response(bytes, { status: upstream.status, headers: upstream.headers });
  },
};
"""

PASS_JS = """
export default {
  fetch(request, env) {
    return env.ORIGIN.fetch(request);
  },
};
"""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def workerd_binary() -> Path:
    """The workerd executable itself (not the npm launcher, whose PID is not workerd's)."""
    for p in sorted((EDGE / "node_modules" / "@cloudflare").glob("workerd-*/bin/workerd")):
        if os.access(p, os.X_OK):
            return p
    raise SystemExit("workerd not found under edge/node_modules/@cloudflare (run: make edge)")


def capnp(ports: dict[str, int]) -> str:
    sockets = ",\n    ".join(
        f'(name = "{sid}", address = "127.0.0.1:{port}", http = (), service = "{service}")'
        for sid, port in ports.items()
        for service in [{"edge_pass": "pass", "edge_floor": "floor", "edge_upstream": "origin"}.get(sid, "idemgate")]
    )
    modules = ",\n    ".join(
        [f'(name = "worker/{f}", esModule = embed "worker/{f}")' for f in WORKER_FILES]
        + [
            f'(name = "dist/module/{f}", {"wasm" if f.endswith(".wasm") else "esModule"} = embed "dist/module/{f}")'
            for f in DIST_FILES
        ]
    )
    return f"""using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "idemgate", worker = .idemgate),
    (name = "pass", worker = .pass),
    (name = "floor", worker = .floor),
    (name = "origin", worker = .origin),
  ],
  sockets = [
    {sockets}
  ],
);
const origin :Workerd.Worker = (
  modules = [(name = "origin.js", esModule = embed "origin.js")],
  compatibilityDate = "2025-04-01",
);
const pass :Workerd.Worker = (
  modules = [(name = "pass.js", esModule = embed "pass.js")],
  compatibilityDate = "2025-04-01",
  bindings = [(name = "ORIGIN", service = "origin")],
);
const floor :Workerd.Worker = (
  modules = [(name = "floor.js", esModule = embed "floor.js")],
  compatibilityDate = "2025-04-01",
  bindings = [
    (name = "ORIGIN", service = "origin"),
    (name = "FLOOR_STORE", durableObjectNamespace = "FloorStore"),
  ],
  durableObjectNamespaces = [(className = "FloorStore", uniqueKey = "idemgate-edge-bench-floor")],
  durableObjectStorage = (inMemory = void),
);
const idemgate :Workerd.Worker = (
  modules = [
    {modules}
  ],
  compatibilityDate = "2025-04-01",
  bindings = [
    (name = "IDEMGATE_CONFIG", fromEnvironment = "IDEMGATE_CONFIG"),
    (name = "ORIGIN", service = "origin"),
    (name = "IDEMGATE_STORE", durableObjectNamespace = "IdempotencyStore"),
  ],
  durableObjectNamespaces = [(className = "IdempotencyStore", uniqueKey = "idemgate-edge-bench")],
  durableObjectStorage = (inMemory = void),
);
"""


class Workerd:
    def __init__(self, ports: dict[str, int], cpu: str | None):
        self.dir = Path(tempfile.mkdtemp(prefix="idemgate-edge-bench-"))
        (self.dir / "worker").mkdir()
        (self.dir / "dist" / "module").mkdir(parents=True)
        for f in WORKER_FILES:
            shutil.copy(EDGE / "worker" / f, self.dir / "worker" / f)
        for f in DIST_FILES:
            src = EDGE / "dist" / "module" / f
            if not src.is_file():
                raise SystemExit(f"missing {src} (run: make edge)")
            shutil.copy(src, self.dir / "dist" / "module" / f)
        (self.dir / "origin.js").write_text(ORIGIN_JS)
        (self.dir / "pass.js").write_text(PASS_JS)
        (self.dir / "floor.js").write_text(FLOOR_JS)
        (self.dir / "bench.capnp").write_text(capnp(ports))
        self.ports = ports
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "workerd.log"

    def start(self) -> None:
        cmd = [str(workerd_binary()), "serve", str(self.dir / "bench.capnp")]
        if self.cpu is not None:
            cmd = ["taskset", "-c", self.cpu, *cmd]
        env = dict(os.environ, IDEMGATE_CONFIG=json.dumps(IDEMGATE_CONFIG))
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        deadline = time.monotonic() + 30
        port = next(iter(self.ports.values()))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"workerd exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/__ready")
                c.getresponse().read()
                c.close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"workerd did not answer:\n{self.log_path.read_text()[-3000:]}")

    def cpu_ns(self) -> int:
        """utime + stime of the workerd process, all threads."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    def served(self) -> int:
        c = http.client.HTTPConnection("127.0.0.1", self.ports["edge_upstream"], timeout=10)
        try:
            c.request("GET", "/__served")
            return int(c.getresponse().read())
        finally:
            c.close()

    def refusals(self) -> dict[str, int]:
        """The idemgate outcome lines in workerd's log whose status is not 2xx, by status and
        outcome (what wrk counts as status errors), and the store errors logged."""
        counts: dict[str, int] = {}
        if not self.log_path.is_file():
            return counts
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"idemgate":"outcome"' in line:
                try:
                    d = json.loads(line[line.index("{"):])
                except ValueError:
                    continue
                if not 200 <= d.get("status", 0) < 300:
                    key = f"{d.get('status')} {d.get('outcome')}"
                    counts[key] = counts.get(key, 0) + 1
            elif "idemgate: store error" in line or "Error" in line and "idemgate" in line:
                key = line.strip()[:160]
                counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def check(w: Workerd, tag: str) -> list[str]:
    notes = []
    for sid, port in w.ports.items():
        status, headers, body = eb.post(port, f"check-{tag}-{sid}", 1024)
        if status != 200 or body != eb.UPSTREAM_BODY.encode() or headers.get("idempotent-replayed"):
            raise RuntimeError(f"{sid}: sanity request got {status} {headers} {body[:200]!r}")
    if "edge_replay" in w.ports:
        for label, size in eb.SIZES.items():
            key = eb.replay_key(tag, label)
            s1, h1, _ = eb.post(w.ports["edge_replay"], key, size)
            s2, h2, b2 = eb.post(w.ports["edge_replay"], key, size)
            if s1 != 200 or h1.get("idempotent-replayed") or s2 != 200 or h2.get("idempotent-replayed") != "true":
                raise RuntimeError(f"edge_replay priming {label}: {s1} {h1} / {s2} {h2}")
            notes.append(f"edge_replay {label}: the second request was answered {s2} with idempotent-replayed: true, body {b2!r}")
    return notes


def measure(w: Workerd, sid: str, size: int, prefix: str, seconds: float, wrk_cpu: str | None) -> dict[str, Any]:
    if SCENARIOS[sid]["mode"] == "fixed":
        # workerd's in-memory Durable Object storage does not outlive an object evicted when
        # idle (~70 s): the key's record may be gone since the last run. One request stores it
        # again (a replay if it is still there), so the run measures replays.
        status, _, _ = eb.post(w.ports[sid], prefix, size)
        if status != 200:
            raise RuntimeError(f"{sid}: priming request for {prefix} got {status}")
    served0, cpu0, busy0, kids0 = w.served(), w.cpu_ns(), eb.busy_ns(), eb.children_cpu_ns()
    res = eb.run_wrk(w.ports[sid], SCENARIOS[sid]["mode"], prefix, size, seconds, wrk_cpu)
    cpu1, busy1, kids1 = w.cpu_ns(), eb.busy_ns(), eb.children_cpu_ns()
    served1 = w.served()
    wall_ns = res["duration_us"] * 1000
    n = max(1, res["requests"])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["cpu_us_per_req"] = (cpu1 - cpu0) / 1000 / n
    res["cpu_util"] = (cpu1 - cpu0) / 1000 / res["duration_us"]
    res["wrk_cpu_util"] = (kids1 - kids0) / wall_ns
    res["other_load"] = max(0, (busy1 - busy0) - (cpu1 - cpu0) - (kids1 - kids0)) / wall_ns
    # one GET /__served is among them when the origin is wrk's target
    res["origin_per_request"] = (served1 - served0) / n
    res["errors"] = res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "5")))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "3")))
    ap.add_argument("--warmup", type=float, default=float(os.environ.get("BENCH_WARMUP", "1")))
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                    help="comma-separated scenario ids (default: all; env BENCH_ONLY, which may also "
                    "name Envoy scenarios: those are ignored here, and when it names no edge "
                    "scenario this script does nothing)")
    ap.add_argument("--sizes", default=os.environ.get("BENCH_SIZES", ",".join(eb.SIZES)),
                    help="comma-separated body sizes (1KiB,64KiB; env BENCH_SIZES)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds >= 1 and --seconds > 0")
    selected = [s for s in SCENARIOS if not args.only or s in args.only.split(",")]
    if not selected:
        log(f"edge: no edge scenario in BENCH_ONLY={args.only!r} (known: {', '.join(SCENARIOS)}); skipped")
        return 0
    sizes = {label: eb.SIZES[label] for label in args.sizes.split(",") if label in eb.SIZES}
    if not sizes:
        ap.error(f"--sizes: pick from {', '.join(eb.SIZES)}")

    ncpu = os.cpu_count() or 1
    server_cpu, wrk_cpu = (str(ncpu - 1), "0") if ncpu >= 2 else (None, None)
    ports = {sid: harness.free_port() for sid in selected}
    ports.setdefault("edge_upstream", harness.free_port())  # the origin's count is read there
    w = Workerd(ports, server_cpu)
    atexit.register(w.stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    version = subprocess.run([str(workerd_binary()), "--version"], capture_output=True, text=True, timeout=30)
    log(f"starting workerd ({(version.stdout or version.stderr).strip()})"
        + (f", pinned to CPU {server_cpu}; wrk on CPU {wrk_cpu}" if server_cpu else ""))
    w.start()
    tag = secrets.token_hex(3)
    notes = check(w, tag)
    for n in notes:
        log(n)

    configs = [(label, sid) for label in sizes for sid in selected]

    def key_prefix(r: int | str, sid: str, label: str) -> str:
        return eb.replay_key(tag, label) if SCENARIOS[sid]["mode"] == "fixed" else f"{tag}-r{r}-{sid}-{label}"

    log(f"warm-up: {len(configs)} configurations")
    for label, sid in configs:
        measure(w, sid, sizes[label], key_prefix("w", sid, label), args.warmup, wrk_cpu)
    results: dict[str, dict[str, Any]] = {f"{label}/{sid}": {"size": label, "scenario": sid, "runs": []} for label, sid in configs}
    load_start = os.getloadavg()
    t0 = time.monotonic()
    for r in range(1, args.rounds + 1):
        for label, sid in configs:
            res = measure(w, sid, sizes[label], key_prefix(r, sid, label), args.seconds, wrk_cpu)
            results[f"{label}/{sid}"]["runs"].append(res)
            log(f"edge round {r}/{args.rounds} {label:>5} {sid:<13} {res['rps']:9.0f} req/s  p50 {res['p50_us']:6d}us"
                f"  p99 {res['p99_us']:6d}us  cpu {res['cpu_us_per_req']:6.1f}us/req  other {res['other_load']:.2f}"
                f"  origin/req {res['origin_per_request']:.2f}  err {res['errors']}")
    log(f"measured {len(configs) * args.rounds} edge runs in {time.monotonic() - t0:.0f}s")
    refused = w.refusals()
    if refused:
        notes.append("answers that were not 2xx (idemgate's log lines, all runs): "
                     + "; ".join(f"{n}× {k}" for k, n in sorted(refused.items(), key=lambda kv: -kv[1])[:8]))
        log(notes[-1])
    for entry in results.values():
        runs = entry["runs"]
        entry["median"] = {
            k: statistics.median(run[k] for run in runs)
            for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req", "cpu_util", "other_load", "wrk_cpu_util")
        }
        entry["rps_min"] = min(run["rps"] for run in runs)
        entry["rps_max"] = max(run["rps"] for run in runs)
        entry["errors"] = sum(run["errors"] for run in runs)
        entry["requests"] = sum(run["requests"] for run in runs)
        entry["origin_per_request"] = sum(run["origin_per_request"] * run["requests"] for run in runs) / max(1, entry["requests"])
    out = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "connections": eb.CONNECTIONS,
        "server_cpu": server_cpu,
        "wrk_cpu": wrk_cpu,
        "workerd_version": (version.stdout or version.stderr).strip(),
        "loadavg_before": load_start,
        "loadavg_after": os.getloadavg(),
        "idemgate_config": IDEMGATE_CONFIG,
        "notes": notes,
        "scenarios": {sid: SCENARIOS[sid]["title"] for sid in selected},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")
    w.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
