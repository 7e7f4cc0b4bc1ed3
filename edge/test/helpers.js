// Shared by the edge tests: the test origin (tests/origin.py, which counts executions),
// the worker in Miniflare, and a small request helper.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";

export const EDGE = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const ROOT = resolve(EDGE, "..");
export const COMPAT_DATE = "2025-04-01";

/** The worker's modules, named as in edge/worker/workerd.capnp (relative to edge/). */
export const WORKER_MODULES = ["index.js", "core.js", "engine.js", "gate.js", "outcomes.js", "claims.js", "store.js"];
export const MODULES = [
  ...WORKER_MODULES.map((f) => ({ type: "ESModule", path: join(EDGE, "worker", f) })),
  { type: "ESModule", path: join(EDGE, "dist/module/idemgate_edge.js") },
  { type: "CompiledWasm", path: join(EDGE, "dist/module/idemgate_edge_bg.wasm") },
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** tests/origin.py on free ports: every request is recorded; `executions(run)` counts the
 * requests of a run (query `run=<id>`) whose body arrived completely. */
export async function startOrigin() {
  const proc = spawn(process.env.PYTHON || "python3", ["-u", join(ROOT, "tests/origin.py"), "--port", "0", "--control-port", "0"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  const ready = await new Promise((resolveReady, reject) => {
    const timer = setTimeout(() => reject(new Error(`origin did not start: ${out}`)), 15_000);
    proc.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/READY port=(\d+) control_port=(\d+)/);
      if (m) {
        clearTimeout(timer);
        resolveReady({ port: Number(m[1]), controlPort: Number(m[2]) });
      }
    });
    proc.on("exit", (code) => reject(new Error(`origin exited (${code}): ${out}`)));
  });
  proc.stdout.resume();
  const control = `http://127.0.0.1:${ready.controlPort}`;
  return {
    ...ready,
    address: `127.0.0.1:${ready.port}`,
    async requests() {
      const r = await fetch(`${control}/requests`);
      return r.json();
    },
    async executions(run) {
      const log = await this.requests();
      return log.filter((r) => r.path.includes(`run=${run}`) && r.body_complete).length;
    },
    async seen(run) {
      const log = await this.requests();
      return log.filter((r) => r.path.includes(`run=${run}`)).length;
    },
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGTERM");
        await exited;
      }
    },
  };
}

/** A Miniflare worker definition for one configuration (name doubles as the route host). */
export function worker(name, config, origin, extra = {}) {
  const bindings = {};
  if (config !== undefined) bindings.IDEMGATE_CONFIG = typeof config === "string" ? config : JSON.stringify(config);
  return {
    name,
    modules: MODULES,
    modulesRoot: EDGE,
    compatibilityDate: COMPAT_DATE,
    routes: [`${name}.idemgate.test/*`],
    bindings,
    durableObjects: { IDEMGATE_STORE: "IdempotencyStore" },
    serviceBindings: origin ? { ORIGIN: { external: { address: origin.address, http: {} } } } : {},
    ...extra,
  };
}

/** Miniflare with `workers`; `persist` keeps Durable Objects on disk in that directory. */
export async function startMiniflare(workers, { persist } = {}) {
  const mf = new Miniflare({
    workers,
    durableObjectsPersist: persist ?? false,
    log: undefined,
  });
  await mf.ready;
  return mf;
}

/** One request through Miniflare to worker `name`; resolves to {status, headers, body}. */
export async function send(mf, name, method, path, { headers = {}, body, signal, duplex } = {}) {
  const init = { method, headers, signal };
  if (duplex) init.duplex = duplex;
  if (body !== undefined && body !== null) init.body = body;
  return received(await mf.dispatchFetch(`http://${name}.idemgate.test${path}`, init));
}

/** A response read whole: {status, headers, header(n), body, text(), json()}. */
async function received(res) {
  const bytes = new Uint8Array(await res.arrayBuffer());
  return {
    status: res.status,
    headers: res.headers,
    header: (n) => res.headers.get(n),
    body: bytes,
    text: () => new TextDecoder().decode(bytes),
    json: () => JSON.parse(new TextDecoder().decode(bytes)),
  };
}

/** 100 concurrent same-key requests (`sendOne(i)`, slow at the origin) executed once: one
 * forwarded, the others in flight at the same time (409 problem, Retry-After 1) or, on a
 * loaded machine, arriving after it completed (its replay); then `sendOne` replays it. */
export async function assertStorm(assert, origin, run, sendOne) {
  const resps = await Promise.all(Array.from({ length: 100 }, (_, i) => sendOne(i)));
  const statuses = resps.map((r) => `${r.status}${r.header("idempotent-replayed") ? "r" : ""}`);
  const executed = resps.filter((r) => r.status === 200 && !r.header("idempotent-replayed"));
  assert.equal(executed.length, 1, statuses.join(","));
  assert.ok(statuses.filter((s) => s === "409").length >= 90, statuses.join(","));
  for (const r of resps.filter((r) => r.status === 409)) {
    assert.equal(r.header("retry-after"), "1");
    assertProblem(assert, r, 409);
  }
  for (const r of resps.filter((r) => r.status === 200)) assert.deepEqual(r.body, executed[0].body);
  assert.equal(await origin.executions(run), 1);
  for (const i of [0, 1]) {
    const again = await sendOne(i);
    assert.equal(again.header("idempotent-replayed"), "true");
    assert.deepEqual(again.body, executed[0].body);
  }
  assert.equal(await origin.executions(run), 1);
}

export const DENO = join(EDGE, "node_modules/.bin/deno");
/** What the README tells users to run worker/deno.js with (plus a KV file's directory). */
export const DENO_FLAGS = ["--unstable-kv", "--allow-net", "--allow-env", "--allow-read"];
const DENO_ENV = { DENO_NO_UPDATE_CHECK: "1", DENO_NO_PROMPT: "1" };

/** A Deno process (the npm package's binary) running `args`; resolves once it printed a line
 * matching `ready` (its match is `.ready`). stdout is scanned, then passed on; stderr inherited. */
export async function startDeno(args, { env = {}, ready, timeoutMs = 30_000 } = {}) {
  const proc = spawn(DENO, args, { cwd: EDGE, env: { ...process.env, ...DENO_ENV, ...env }, stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  const match = await new Promise((resolveReady, reject) => {
    const timer = setTimeout(() => reject(new Error(`deno did not start: ${out}`)), timeoutMs);
    const onData = (d) => {
      out += d;
      const m = out.match(ready);
      if (m) {
        clearTimeout(timer);
        proc.stdout.off("data", onData);
        resolveReady(m);
      }
    };
    proc.stdout.on("data", onData);
    proc.on("exit", (code) => reject(new Error(`deno exited (${code}): ${out}`)));
  });
  proc.stdout.pipe(process.stdout);
  return {
    proc,
    ready: match,
    async stop(signal = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill(signal);
        await exited;
      }
    },
  };
}

/** An HTTP request with fetch; resolves like send(). */
export async function request(url, method, { headers = {}, body, signal } = {}) {
  const init = { method, headers, signal, redirect: "manual" };
  if (body !== undefined && body !== null) init.body = body;
  return received(await fetch(url, init));
}

export function tempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

export function readJson(path) {
  return JSON.parse(readFileSync(path, "utf8"));
}

export function freshId() {
  return crypto.randomUUID().replaceAll("-", "").slice(0, 16);
}

export function assertProblem(assert, r, status) {
  assert.equal(r.status, status, r.text());
  assert.equal(r.header("content-type"), "application/problem+json");
  const doc = r.json();
  assert.equal(doc.status, status);
  assert.ok(doc.type.startsWith("https://idemgate.dev/problems/"), doc.type);
  assert.ok(doc.title && doc.detail.length > 30, JSON.stringify(doc));
  return doc;
}
