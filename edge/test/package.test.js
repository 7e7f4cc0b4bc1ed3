// The npm package as users get it, offline: `npm pack` of edge/ (idemgate-edge), unpacked where
// npm would install it (it has no dependencies) into a copy of edge/template made as
// `npm create cloudflare -- --template=…` makes one; then `wrangler deploy --dry-run` of the
// template, its bundle served by Miniflare (a first request and its replay), and the
// package's Deno entry (worker/deno.js from the tarball) serving one key.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { cpSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { Miniflare } from "miniflare";
import { COMPAT_DATE, DENO_FLAGS, EDGE, ROOT, freshId, request, send, startDeno, startOrigin, tempDir } from "./helpers.js";

const OFFLINE = { npm_config_offline: "true", npm_config_audit: "false", npm_config_fund: "false", npm_config_update_notifier: "false" };

let tmp;
let origin;
let tarball;
let packed;

before(async () => {
  tmp = tempDir("idemgate-edge-package-");
  origin = await startOrigin();
  const r = spawnSync("npm", ["pack", "--json", "--pack-destination", tmp.dir], {
    cwd: EDGE,
    env: { ...process.env, ...OFFLINE },
    encoding: "utf8",
    timeout: 120_000,
  });
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  packed = JSON.parse(r.stdout)[0];
  tarball = join(tmp.dir, packed.filename);
});

after(async () => {
  await origin?.stop();
  tmp?.remove();
});

test("npm pack: the wasm, both glues, the worker, the Durable Object and the Deno entry; nothing else", () => {
  const files = packed.files.map((f) => f.path).sort();
  for (const f of [
    "package.json",
    "README.md",
    "dist/module/idemgate_edge.js",
    "dist/module/idemgate_edge_bg.wasm",
    "dist/module/idemgate_edge.d.ts",
    "dist/web/idemgate_edge.js",
    "dist/web/idemgate_edge_bg.wasm",
    "worker/index.js",
    "worker/store.js",
    "worker/gate.js",
    "worker/claims.js",
    "worker/deno.js",
    "worker/kv.js",
    "worker/workerd.capnp",
  ]) {
    assert.ok(files.includes(f), `${f} missing from ${files.join(", ")}`);
  }
  for (const f of files) assert.match(f, /^(package\.json|README\.md|dist\/(module|web)\/[^/]+|worker\/[^/]+)$/, `unexpected ${f}`);
  assert.equal(packed.name, "idemgate-edge");
  // the package's version is the workspace's
  const cargo = readFileSync(join(ROOT, "Cargo.toml"), "utf8").match(/^version = "([^"]+)"/m)[1];
  assert.equal(packed.version, cargo);
  // every module the worker imports is in the package
  for (const f of files.filter((f) => f.startsWith("worker/") && f.endsWith(".js"))) {
    const src = readFileSync(join(EDGE, f), "utf8");
    for (const [, spec] of src.matchAll(/^(?:import|export)\s[^;]*?from\s+"(\.[^"]+)"/gm)) {
      const target = join("worker", spec).replace(/\\/g, "/");
      assert.ok(files.includes(target), `${f} imports ${spec}, which is not packed`);
    }
  }
});

/** A project made from edge/template as `npm create cloudflare` makes one, with the packed
 * package installed. */
function project(name) {
  const dir = join(tmp.dir, name);
  cpSync(join(EDGE, "template"), dir, { recursive: true });
  const pkgPath = join(dir, "package.json");
  const pkg = JSON.parse(readFileSync(pkgPath, "utf8"));
  assert.equal(pkg.name, "<PACKAGE_NAME>", "C3 replaces this placeholder with the project's name");
  assert.ok(pkg.dependencies["idemgate-edge"], "the template depends on the package");
  pkg.name = name;
  writeFileSync(pkgPath, JSON.stringify(pkg, null, 2));
  const target = join(dir, "node_modules", "idemgate-edge");
  mkdirSync(target, { recursive: true });
  const r = spawnSync("tar", ["-xzf", tarball, "-C", target, "--strip-components=1"], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  return dir;
}

test("the template: wrangler deploy --dry-run bundles it with the package; the bundle serves and replays", async () => {
  const dir = project("my-idemgate");
  const config = readFileSync(join(dir, "wrangler.jsonc"), "utf8");
  assert.match(config, /"new_sqlite_classes": \["IdempotencyStore"\]/);
  const out = join(tmp.dir, "out");
  const xdg = tempDir("idemgate-edge-xdg-");
  let log;
  try {
    const r = spawnSync(join(EDGE, "node_modules/.bin/wrangler"), ["deploy", "--dry-run", "--outdir", out], {
      cwd: dir,
      env: { ...process.env, ...OFFLINE, XDG_CONFIG_HOME: xdg.dir, WRANGLER_SEND_METRICS: "false", CI: "true" },
      encoding: "utf8",
      timeout: 120_000,
    });
    log = `${r.stdout}\n${r.stderr}`;
    assert.equal(r.status, 0, log);
  } finally {
    xdg.remove();
  }
  assert.match(log, /env\.IDEMGATE_STORE \(IdempotencyStore\)/);
  assert.match(log, /IDEMGATE_CONFIG/);
  const files = readdirSync(out);
  const wasm = files.find((f) => f.endsWith(".wasm"));
  assert.ok(files.includes("index.js") && wasm, files.join(", "));

  // The bundle wrangler would upload, in workerd, in front of the test origin.
  const mf = new Miniflare({
    modules: true,
    scriptPath: join(out, "index.js"),
    modulesRoot: out,
    modulesRules: [{ type: "CompiledWasm", include: ["**/*.wasm"] }],
    compatibilityDate: COMPAT_DATE,
    bindings: { IDEMGATE_CONFIG: JSON.stringify({ store: { namespace: "template" } }) },
    durableObjects: { IDEMGATE_STORE: { className: "IdempotencyStore", useSQLite: true } },
    serviceBindings: { ORIGIN: { external: { address: origin.address, http: {} } } },
  });
  try {
    await mf.ready;
    const id = freshId();
    const h = { "Idempotency-Key": `t-${id}` };
    const first = await send(mf, "x", "POST", `/orders?run=${id}`, { headers: h, body: '{"a":1}' });
    assert.equal(first.status, 200, first.text());
    assert.equal(first.header("idempotent-replayed"), null);
    const again = await send(mf, "x", "POST", `/orders?run=${id}`, { headers: h, body: '{"a":1}' });
    assert.equal(again.header("idempotent-replayed"), "true");
    assert.deepEqual(again.body, first.body);
    assert.equal(await origin.executions(id), 1);
  } finally {
    await mf.dispose();
  }
});

test("the packed Deno entry (idemgate-edge/deno) serves and replays with Deno KV", async () => {
  const dir = project("deno-app");
  const kvDir = join(tmp.dir, "kv");
  mkdirSync(kvDir);
  const deno = await startDeno(["run", ...DENO_FLAGS, `--allow-write=${kvDir}`, join(dir, "node_modules/idemgate-edge/worker/deno.js")], {
    env: { ORIGIN_URL: `http://${origin.address}`, IDEMGATE_KV_PATH: join(kvDir, "kv.sqlite"), PORT: "0", IDEMGATE_HOSTNAME: "127.0.0.1" },
    ready: /listening on (http:\/\/[^\s]+)/,
  });
  try {
    const url = deno.ready[1].replace(/\/$/, "");
    const id = freshId();
    const h = { "Idempotency-Key": `d-${id}` };
    const first = await request(`${url}/orders?run=${id}`, "POST", { headers: h, body: "x" });
    assert.equal(first.status, 200, first.text());
    const again = await request(`${url}/orders?run=${id}`, "POST", { headers: h, body: "x" });
    assert.equal(again.header("idempotent-replayed"), "true");
    assert.equal(await origin.executions(id), 1);
  } finally {
    await deno.stop();
  }
});
