// The shipped edge/worker/workerd.capnp served by plain `workerd serve` (the npm binary),
// as `make run-edge` runs it, with addresses and the storage directory overridden on the
// command line: a smoke test of the real listener, and persistence of the Durable Object
// records on local disk (localDisk) across a restart of workerd.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import http from "node:http";
import net from "node:net";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { EDGE, ROOT, freshId, sleep, startOrigin, tempDir } from "./helpers.js";

const WORKERD = join(EDGE, "node_modules/.bin/workerd");
const CAPNP = join(EDGE, "worker/workerd.capnp");

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

/** workerd serve of the shipped config; resolves once the socket answers. */
async function serve({ port, originAddress, storage, config }) {
  const proc = spawn(
    WORKERD,
    ["serve", CAPNP, `--socket-addr=http=127.0.0.1:${port}`, `--external-addr=origin=${originAddress}`, `--directory-path=do-storage=${storage}`],
    { cwd: ROOT, env: { ...process.env, IDEMGATE_CONFIG: JSON.stringify(config) }, stdio: ["ignore", "inherit", "inherit"] },
  );
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`workerd exited with ${proc.exitCode}`);
    try {
      await request(port, "GET", "/healthz?probe=1", {});
      break;
    } catch {
      if (Date.now() > deadline) throw new Error("workerd did not start");
      await sleep(100);
    }
  }
  return {
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGTERM");
        await exited;
      }
    },
  };
}

/** A raw HTTP/1.1 request (node:http keeps empty header values, unlike fetch). */
function request(port, method, path, headers, body) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, method, path, headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

let origin;
let storage;
let port;

before(async () => {
  origin = await startOrigin();
  storage = tempDir("idemgate-edge-workerd-");
  port = await freePort();
});

after(async () => {
  await origin?.stop();
  storage?.remove();
});

test("workerd serve of the shipped capnp: replay, bad inputs, and records that survive a restart", async () => {
  const config = { correlation: {}, key: { maxLength: 64 } };
  const opts = { port, originAddress: origin.address, storage: storage.dir, config };
  const id = freshId();
  const h = { "Idempotency-Key": `k-${id}`, "Content-Type": "application/json" };
  let wd = await serve(opts);
  let first;
  try {
    first = await request(port, "POST", `/orders?run=${id}`, h, '{"amount":1}');
    assert.equal(first.status, 200);
    assert.equal(first.headers["idempotent-replayed"], undefined);
    assert.match(first.headers["x-correlation-id"], /^[0-9a-f-]{36}$/);
    const again = await request(port, "POST", `/orders?run=${id}`, h, '{"amount":1}');
    assert.equal(again.headers["idempotent-replayed"], "true");
    assert.deepEqual(again.body, first.body);
    const other = await request(port, "POST", `/orders?run=${id}`, h, '{"amount":2}');
    assert.equal(other.status, 422);
    assert.equal(other.headers["content-type"], "application/problem+json");
    // an empty key is malformed (Miniflare's dispatchFetch cannot send one)
    const empty = await request(port, "POST", `/orders?run=${id}`, { "Idempotency-Key": "" }, "x");
    assert.equal(empty.status, 400);
    assert.match(JSON.parse(empty.body).detail, /empty/);
    assert.equal(await origin.executions(id), 1);
  } finally {
    await wd.stop();
  }
  // restart: the record is read back from local disk
  wd = await serve(opts);
  try {
    const after = await request(port, "POST", `/orders?run=${id}`, h, '{"amount":1}');
    assert.equal(after.status, 200);
    assert.equal(after.headers["idempotent-replayed"], "true");
    assert.deepEqual(after.body, first.body);
    assert.equal(await origin.executions(id), 1);
  } finally {
    await wd.stop();
  }
});

test("workerd serve with a refused configuration answers 500 naming the field, and keeps serving", async () => {
  const wd = await serve({ port, originAddress: origin.address, storage: storage.dir, config: { ttlSeconds: 5, leaseSeconds: 10 } });
  try {
    for (let i = 0; i < 2; i++) {
      const r = await request(port, "POST", "/x", { "Idempotency-Key": "k" }, "x");
      assert.equal(r.status, 500);
      assert.equal(r.headers["content-type"], "application/problem+json");
      assert.match(JSON.parse(r.body).detail, /invalid configuration: leaseSeconds: must not exceed ttlSeconds \(5\), got 10/);
    }
  } finally {
    await wd.stop();
  }
});
