// The worker hashes bodies of 4 KiB and more with WebCrypto when the core needs nothing else
// of them (edge/worker/index.js, resolveBody). The fingerprint must be the one the wasm
// computes from the body itself, or retries would be refused as reused keys: checked here
// inside workerd, with its WebCrypto, against the core's own path (Exchange.body).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { join } from "node:path";
import { Miniflare } from "miniflare";
import { COMPAT_DATE, EDGE } from "./helpers.js";

const PROBE = `
import * as core from "../dist/module/idemgate_edge.js";
const hex = (b) => (b ? Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("") : null);
export default {
  async fetch(request) {
    const { config, size, headers } = await request.json();
    const engine = new core.Engine(JSON.stringify(config));
    const body = new Uint8Array(size);
    for (let i = 0; i < size; i++) body[i] = (i * 7 + size) & 0xff;
    const flat = Object.entries(headers).map(([n, v]) => n + "\\n" + v + "\\n").join("");
    const byWasm = engine.exchange("POST", "/orders?x=1", flat, new Uint8Array(16));
    byWasm.body(body);
    const byJs = engine.exchange("POST", "/orders?x=1", flat, new Uint8Array(16));
    const head = byJs.bodyHashHead(size);
    let hashed = null;
    if (head !== undefined) {
      const input = new Uint8Array(head.byteLength + size);
      input.set(head);
      input.set(body, head.byteLength);
      hashed = byJs.bodyHashed(size, new Uint8Array(await crypto.subtle.digest("SHA-256", input)));
    }
    return Response.json({
      head: head !== undefined,
      hashed,
      wasm: { step: byWasm.step, keyId: byWasm.keyId, fingerprint: hex(byWasm.fingerprint) },
      js: { step: byJs.step, keyId: byJs.keyId, fingerprint: hex(byJs.fingerprint) },
    });
  },
};`;

let mf;

before(async () => {
  mf = new Miniflare({
    modules: [
      { type: "ESModule", path: join(EDGE, "test/probe_hash.js"), contents: PROBE },
      { type: "ESModule", path: join(EDGE, "dist/module/idemgate_edge.js") },
      { type: "CompiledWasm", path: join(EDGE, "dist/module/idemgate_edge_bg.wasm") },
    ],
    modulesRoot: EDGE,
    compatibilityDate: COMPAT_DATE,
  });
  await mf.ready;
});

after(async () => {
  await mf?.dispose();
});

async function probe(config, size, headers = { "idempotency-key": "k-1" }) {
  const r = await mf.dispatchFetch("http://probe/", { method: "POST", body: JSON.stringify({ config, size, headers }) });
  assert.equal(r.status, 200);
  return r.json();
}

test("WebCrypto's SHA-256 over the core's head and the body is the wasm's fingerprint", async () => {
  const configs = [
    {},
    { fingerprint: { method: false, query: false, headers: ["x-tenant"] }, routes: [{ match: { prefix: "/orders" } }] },
  ];
  for (const config of configs) {
    for (const size of [0, 1, 55, 56, 64, 4095, 4096, 65536, 300001]) {
      const r = await probe(config, size, { "idempotency-key": "k-1", "x-tenant": "acme" });
      const what = `${JSON.stringify(config)}, ${size} bytes`;
      assert.equal(r.head, true, what);
      assert.equal(r.hashed, true, what);
      assert.equal(r.wasm.fingerprint.length, 64, what);
      assert.deepEqual(r.js, r.wasm, what);
    }
  }
});

test("a body the core needs itself is not hashed outside it", async () => {
  const cases = [
    [{ key: { sources: [{ jsonPointer: "/id" }] } }, {}],
    [{ fingerprint: { body: "canonicalJson" } }, { "idempotency-key": "k" }],
    [{ maxBodyBytes: 100 }, { "idempotency-key": "k" }, 101],
  ];
  for (const [config, headers, size = 10] of cases) {
    const r = await probe(config, size, headers);
    assert.equal(r.head, false, JSON.stringify(config));
    assert.equal(r.hashed, null);
  }
});
