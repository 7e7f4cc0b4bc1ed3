// `wrangler deploy --dry-run --outdir` bundles edge/wrangler.toml's worker without an
// account: the Durable Object binding, its migration and the wasm module must all be
// accepted. (Offline, wrangler's `cf` download fails; that is harmless.)
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { EDGE, tempDir } from "./helpers.js";

test("wrangler deploy --dry-run bundles the worker, its Durable Object and the wasm", () => {
  const out = tempDir("idemgate-edge-wrangler-");
  const xdg = tempDir("idemgate-edge-xdg-");
  try {
    const r = spawnSync(join(EDGE, "node_modules/.bin/wrangler"), ["deploy", "--dry-run", "--outdir", out.dir], {
      cwd: EDGE,
      env: { ...process.env, XDG_CONFIG_HOME: xdg.dir, WRANGLER_SEND_METRICS: "false", CI: "true" },
      encoding: "utf8",
      timeout: 120_000,
    });
    const log = `${r.stdout}\n${r.stderr}`;
    assert.equal(r.status, 0, log);
    assert.match(log, /IDEMGATE_STORE/);
    assert.match(log, /IdempotencyStore/);
    const files = readdirSync(out.dir);
    assert.ok(files.includes("index.js"), files.join(", "));
    assert.ok(files.some((f) => f.endsWith("idemgate_edge_bg.wasm")), files.join(", "));
    const bundle = readFileSync(join(out.dir, "index.js"), "utf8");
    assert.ok(/IdempotencyStore = class extends DurableObject|class IdempotencyStore/.test(bundle), "the Durable Object class is in the bundle");
    assert.ok(existsSync(join(out.dir, files.find((f) => f.endsWith(".wasm")))));
  } finally {
    out.remove();
    xdg.remove();
  }
});
