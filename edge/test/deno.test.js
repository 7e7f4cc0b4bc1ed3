// The edge worker on Deno with Deno KV (worker/deno.js, the core's --target web build), in
// front of tests/origin.py: every conformance vector (conformance.js, through deno_serve.ts);
// then the shipped entry itself, run as the README says: 100 concurrent same-key requests
// split over two Deno processes sharing one KV database execute once; stored records (one
// over Deno KV's 64 KiB value limit too) survive a restart; the wait policy; HTTP/2;
// refused configurations.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import http2 from "node:http2";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { conformance } from "./conformance.js";
import { DENO, DENO_FLAGS, EDGE, assertProblem, assertStorm, freshId, request, startDeno, startOrigin, tempDir } from "./helpers.js";

conformance("deno", async (variants, origin) => {
  const tmp = tempDir("idemgate-deno-conf-");
  const spec = {
    kvPath: join(tmp.dir, "kv.sqlite"),
    origin: `http://${origin.address}`,
    variants: Object.fromEntries(variants.map(({ name, config }) => [name, { config }])),
  };
  const deno = await startDeno(["run", ...DENO_FLAGS, `--allow-write=${tmp.dir}`, "test/deno_serve.ts"], {
    env: { IDEMGATE_TEST_SPEC: JSON.stringify(spec) },
    ready: /READY (\{.*\})/,
  });
  const ports = JSON.parse(deno.ready[1]);
  return {
    send: (name, method, path, opts) => request(`http://127.0.0.1:${ports[name]}${path}`, method, opts),
    async stop() {
      await deno.stop();
      tmp.remove();
    },
  };
});

/** worker/deno.js as a user runs it; resolves to {url, stop}. */
async function entry({ config, kvDir, origin, env = {} }) {
  const deno = await startDeno(["run", ...DENO_FLAGS, `--allow-write=${kvDir}`, "worker/deno.js"], {
    env: {
      IDEMGATE_CONFIG: config === undefined ? "" : JSON.stringify(config),
      ...(origin ? { ORIGIN_URL: `http://${origin.address}` } : {}),
      IDEMGATE_KV_PATH: join(kvDir, "kv.sqlite"),
      PORT: "0",
      IDEMGATE_HOSTNAME: "127.0.0.1",
      ...env,
    },
    ready: /listening on (http:\/\/[^\s]+)/,
  });
  const url = deno.ready[1].replace(/\/$/, "");
  return { url, stop: () => deno.stop() };
}

describe("deno: the shipped entry (worker/deno.js)", { concurrency: 1 }, () => {
  let origin;
  let kv;

  before(async () => {
    origin = await startOrigin();
    kv = tempDir("idemgate-deno-kv-");
  });

  after(async () => {
    await origin?.stop();
    kv?.remove();
  });

  test("100 concurrent same-key requests over two processes sharing one KV database execute once", async () => {
    const config = { store: { namespace: "storm" } };
    const [a, b] = await Promise.all([entry({ config, kvDir: kv.dir, origin }), entry({ config, kvDir: kv.dir, origin })]);
    try {
      const id = freshId();
      const h = { "Idempotency-Key": `k-${id}` };
      // 2.5 s at the origin: the others arrive while it is in flight even on a loaded machine
      const path = `/storm?run=${id}&delay=2.5`;
      // every other request to each process; the replays afterwards from both
      await assertStorm(assert, origin, id, (i) => request(`${i % 2 ? a.url : b.url}${path}`, "POST", { headers: h, body: "x" }));
    } finally {
      await Promise.all([a.stop(), b.stop()]);
    }
  });

  test("a request waits out another process holding the KV database's write lock", async () => {
    const config = { store: { namespace: "locked" } };
    const d = await entry({ config, kvDir: kv.dir, origin });
    // Another process takes SQLite's exclusive lock on the file for 0.8 s, as a second
    // Deno process writing to it would; requests meanwhile must wait, not fail.
    const locker = spawn("python3", ["-c", [
      "import sqlite3, sys, time",
      "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)",
      "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(0.8); c.execute('COMMIT')",
    ].join("\n"), join(kv.dir, "kv.sqlite")], { stdio: ["ignore", "pipe", "inherit"] });
    try {
      await new Promise((resolve, reject) => {
        locker.stdout.once("data", resolve);
        locker.once("exit", (code) => reject(new Error(`the lock holder exited (${code})`)));
      });
      const id = freshId();
      const h = { "Idempotency-Key": `lock-${id}` };
      const first = await request(`${d.url}/orders?run=${id}`, "POST", { headers: h, body: "x" });
      assert.equal(first.status, 200, first.text());
      const again = await request(`${d.url}/orders?run=${id}`, "POST", { headers: h, body: "x" });
      assert.equal(again.header("idempotent-replayed"), "true");
      assert.equal(await origin.executions(id), 1);
    } finally {
      locker.kill();
      await d.stop();
    }
  });

  test("two namespaces on one KV database keep their keys apart", async () => {
    const [a, b] = await Promise.all(
      ["ns-a", "ns-b"].map((namespace) => entry({ config: { store: { namespace } }, kvDir: kv.dir, origin })),
    );
    try {
      const id = freshId();
      const h = { "Idempotency-Key": `n-${id}` };
      const firstA = await request(`${a.url}/orders?run=${id}`, "POST", { headers: h, body: "x" });
      const firstB = await request(`${b.url}/orders?run=${id}`, "POST", { headers: h, body: "x" });
      assert.equal(firstB.header("idempotent-replayed"), null, "namespace b must not see a's record");
      assert.notDeepEqual(firstA.body, firstB.body);
      for (const [d, first] of [[a, firstA], [b, firstB]]) {
        const again = await request(`${d.url}/orders?run=${id}`, "POST", { headers: h, body: "x" });
        assert.equal(again.header("idempotent-replayed"), "true");
        assert.deepEqual(again.body, first.body);
      }
      assert.equal(await origin.executions(id), 2);
    } finally {
      await Promise.all([a.stop(), b.stop()]);
    }
  });

  test("records survive a restart of the process (on-disk KV), a 300 kB one in parts too", async () => {
    const config = { store: { namespace: "restart" }, maxResponseBytes: 1 << 20 };
    const id = freshId();
    const small = { "Idempotency-Key": `s-${id}`, "Content-Type": "application/json" };
    const large = { "Idempotency-Key": `l-${id}` };
    const bigPath = `/big?run=${id}&size=300000`;
    let d = await entry({ config, kvDir: kv.dir, origin });
    let first;
    let big;
    try {
      first = await request(`${d.url}/orders?run=${id}`, "POST", { headers: small, body: '{"amount":1}' });
      assert.equal(first.status, 200);
      assert.equal(first.header("idempotent-replayed"), null);
      big = await request(`${d.url}${bigPath}`, "POST", { headers: large, body: "x" });
      assert.equal(big.status, 200);
      assert.equal(big.body.length, 300000);
    } finally {
      await d.stop();
    }
    d = await entry({ config, kvDir: kv.dir, origin });
    try {
      const again = await request(`${d.url}/orders?run=${id}`, "POST", { headers: small, body: '{"amount":1}' });
      assert.equal(again.status, 200);
      assert.equal(again.header("idempotent-replayed"), "true");
      assert.deepEqual(again.body, first.body);
      const bigAgain = await request(`${d.url}${bigPath}`, "POST", { headers: large, body: "x" });
      assert.equal(bigAgain.header("idempotent-replayed"), "true");
      assert.deepEqual(bigAgain.body, big.body);
      const changed = await request(`${d.url}/orders?run=${id}`, "POST", { headers: small, body: '{"amount":2}' });
      assert.ok(assertProblem(assert, changed, 422).type.endsWith("key-reused"));
      assert.equal(await origin.executions(id), 2);
    } finally {
      await d.stop();
    }
  });

  test("wait policy: concurrent duplicates wait for the first (Deno KV watch) and get its response", async () => {
    const config = { store: { namespace: "wait" }, onConcurrent: { action: "wait", waitMillis: 5000 }, leaseSeconds: 30 };
    const d = await entry({ config, kvDir: kv.dir, origin });
    try {
      const id = freshId();
      const h = { "Idempotency-Key": `w-${id}` };
      const started = Date.now();
      const done = [];
      const resps = await Promise.all(
        Array.from({ length: 20 }, () =>
          request(`${d.url}/w?run=${id}&delay=0.8`, "POST", { headers: h, body: "x" }).then((r) => (done.push(Date.now()), r)),
        ),
      );
      const spread = Math.max(...done) - Math.min(...done);
      assert.deepEqual([...new Set(resps.map((r) => r.status))], [200]);
      assert.equal(resps.filter((r) => r.header("idempotent-replayed") === "true").length, 19);
      for (const r of resps) assert.deepEqual(r.body, resps[0].body);
      assert.equal(await origin.executions(id), 1);
      // woken when the first completes (all answered together), not at the 5 s bound
      assert.ok(spread < 1500 && Date.now() - started < 4500, `answers spread over ${spread} ms`);
    } finally {
      await d.stop();
    }
  });

  test("HTTP/2 (h2c): first request forwarded, the retry replayed", async () => {
    const d = await entry({ config: { store: { namespace: "h2" } }, kvDir: kv.dir, origin });
    const client = http2.connect(d.url);
    try {
      const id = freshId();
      const post = () =>
        new Promise((resolve, reject) => {
          const req = client.request({ ":method": "POST", ":path": `/h2?run=${id}`, "idempotency-key": `h-${id}` });
          let headers;
          const chunks = [];
          req.on("response", (h) => (headers = h));
          req.on("data", (c) => chunks.push(c));
          req.on("end", () => resolve({ headers, body: Buffer.concat(chunks) }));
          req.on("error", reject);
          req.end("x");
        });
      const first = await post();
      assert.equal(first.headers[":status"], 200);
      assert.equal(first.headers["idempotent-replayed"], undefined);
      const again = await post();
      assert.equal(again.headers[":status"], 200);
      assert.equal(again.headers["idempotent-replayed"], "true");
      assert.deepEqual(again.body, first.body);
      assert.equal(await origin.executions(id), 1);
    } finally {
      client.close();
      await d.stop();
    }
  });

  test("rate limits: the caller's bucket in Deno KV; over the burst is 429", async () => {
    const config = { store: { namespace: "rl" }, rateLimit: { rate: 1, periodSeconds: 3600, burst: 2, callerHeaders: ["x-api-key"] } };
    const d = await entry({ config, kvDir: kv.dir, origin });
    try {
      const caller = { "x-api-key": `c-${freshId()}` };
      const statuses = [];
      for (let i = 0; i < 3; i++) statuses.push((await request(`${d.url}/rl`, "GET", { headers: caller })).status);
      assert.deepEqual(statuses, [200, 200, 429]);
      const other = await request(`${d.url}/rl`, "GET", { headers: { "x-api-key": `c-${freshId()}` } });
      assert.equal(other.status, 200);
    } finally {
      await d.stop();
    }
  });

  test("a bad PORT or a KV path that cannot be opened stops the entry with a message", async () => {
    for (const [env, message] of [
      [{ PORT: "eighty" }, /idemgate: PORT must be a port number \(0\.\.65535\), got "eighty"/],
      [{ IDEMGATE_KV_PATH: join(kv.dir, "missing", "dir", "kv.sqlite") }, /idemgate: cannot open Deno KV at .*missing/],
    ]) {
      const r = spawnSync(DENO, ["run", ...DENO_FLAGS, `--allow-write=${kv.dir}`, "worker/deno.js"], {
        cwd: EDGE,
        env: { ...process.env, DENO_NO_UPDATE_CHECK: "1", ORIGIN_URL: "http://127.0.0.1:9", PORT: "0", ...env },
        encoding: "utf8",
        timeout: 30_000,
      });
      assert.equal(r.status, 2, `${r.stdout}\n${r.stderr}`);
      assert.match(r.stderr, message);
    }
  });

  test("a refused configuration, no origin and a bad ORIGIN_URL answer 500 naming what is wrong", async () => {
    const cases = [
      [{ config: { ttlSeconds: 5, leaseSeconds: 10 }, origin }, /invalid configuration: leaseSeconds: must not exceed ttlSeconds \(5\), got 10/],
      [{ config: {} }, /no origin: set ORIGIN_URL/],
      [{ config: {}, env: { ORIGIN_URL: "not a url" } }, /ORIGIN_URL: not an absolute URL/],
    ];
    for (const [opts, detail] of cases) {
      const d = await entry({ kvDir: kv.dir, ...opts });
      try {
        for (const method of ["POST", "GET"]) {
          const r = await request(`${d.url}/c`, method, { headers: { "Idempotency-Key": "k" }, body: method === "POST" ? "x" : null });
          const doc = assertProblem(assert, r, 500);
          assert.match(doc.detail, detail);
        }
      } finally {
        await d.stop();
      }
    }
  });
});
