// The edge worker in Miniflare in front of tests/origin.py: concurrency, the wait policy,
// leases, unstored statuses, bad inputs and bad configurations, as the Envoy tests check
// them (tests/test_filter.py), and persistence of Durable Object storage across a restart.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { assertProblem, assertStorm, freshId, send, sleep, startMiniflare, startOrigin, tempDir, worker } from "./helpers.js";

const CONFIGS = {
  main: { store: { namespace: "main" } },
  required: { store: { namespace: "required" }, key: { required: true, maxLength: 64 } },
  short: { store: { namespace: "short" }, ttlSeconds: 2, leaseSeconds: 2 },
  small: { store: { namespace: "small" }, maxBodyBytes: 4 << 20, maxResponseBytes: 1024, leaseSeconds: 2 },
  wait: { onConcurrent: { action: "wait", waitMillis: 5000 }, leaseSeconds: 30 },
  bad: { key: { maxLength: 0 } },
  notjson: "{not json",
};

let origin;
let mf;

// The "short" lease is 2 s from the claim, which a loaded machine may make well after
// `started`: retry while the key is still held (409, nothing executed), for at most the
// lease plus a margin, and return the first other answer.
async function afterLease(started, retry) {
  await sleep(Math.max(0, 2000 - (Date.now() - started)));
  for (;;) {
    const r = await retry();
    if (r.status !== 409 || Date.now() - started > 10_000) return r;
    await sleep(100);
  }
}

before(async () => {
  origin = await startOrigin();
  const workers = Object.entries(CONFIGS).map(([name, cfg]) => worker(name, cfg, origin));
  workers.push(worker("noorigin", {}, null));
  workers.push(worker("defaults", undefined, origin));
  workers.push(worker("url", {}, null, { bindings: { ORIGIN_URL: `http://127.0.0.1:${origin.port}/base/` } }));
  workers.push(worker("down", {}, null, { bindings: { ORIGIN_URL: "http://127.0.0.1:1/" } }));
  workers.push(worker("badurl", {}, null, { bindings: { ORIGIN_URL: "ftp://origin.example/" } }));
  workers.push(worker("nostore", {}, origin, { durableObjects: {} }));
  mf = await startMiniflare(workers);
});

after(async () => {
  await mf?.dispose();
  await origin?.stop();
});

const key = () => `k-${freshId()}`;
const run = () => freshId();

describe("concurrency", { concurrency: 1 }, () => {
  test("100 concurrent same-key requests execute once at the origin", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    // the first request takes 2.5 s at the origin, so that the others arrive while it is in
    // flight even on a loaded machine
    const path = `/storm?run=${id}&delay=2.5`;
    await assertStorm(assert, origin, id, () => send(mf, "main", "POST", path, { headers: h, body: "x" }));
  });

  test("wait policy: concurrent duplicates wait for the first and get its response", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const path = `/w?run=${id}&delay=0.8`;
    const started = Date.now();
    const done = [];
    const resps = await Promise.all(
      Array.from({ length: 20 }, () => send(mf, "wait", "POST", path, { headers: h, body: "x" }).then((r) => (done.push(Date.now()), r))),
    );
    const elapsed = Date.now() - started;
    const spread = Math.max(...done) - Math.min(...done);
    assert.deepEqual([...new Set(resps.map((r) => r.status))], [200]);
    assert.equal(resps.filter((r) => r.header("idempotent-replayed") === "true").length, 19);
    for (const r of resps) assert.deepEqual(r.body, resps[0].body);
    assert.equal(await origin.executions(id), 1);
    // woken promptly when the first completes (all answered together), not at the 5 s bound
    assert.ok(spread < 1500 && elapsed < 4500, `answers spread over ${spread} ms, ${elapsed} ms in all`);
  });
});

describe("responses and claims", { concurrency: 4 }, () => {
  test("first forwarded, retries replayed byte for byte without stored-only headers", async () => {
    const id = run();
    const h = { "Idempotency-Key": `order-${freshId()}`, "Content-Type": "application/json" };
    const body = '{"amount": 1000, "currency": "eur"}';
    const first = await send(mf, "main", "POST", `/t?run=${id}`, { headers: h, body });
    assert.equal(first.status, 200);
    assert.equal(first.header("idempotent-replayed"), null);
    assert.notEqual(first.header("set-cookie"), null);
    for (let i = 0; i < 3; i++) {
      const again = await send(mf, "main", "POST", `/t?run=${id}`, { headers: h, body });
      assert.equal(again.status, 200);
      assert.deepEqual(again.body, first.body);
      assert.equal(again.header("idempotent-replayed"), "true");
      assert.equal(again.header("content-type"), first.header("content-type"));
      assert.equal(again.header("set-cookie"), null);
      assert.equal(again.header("x-origin-execution"), null);
    }
    assert.equal(await origin.executions(id), 1);
  });

  test("a large response streams through and is replayed byte for byte", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const first = await send(mf, "main", "POST", `/big?run=${id}&size=300000`, { headers: h, body: "x" });
    assert.equal(first.status, 200);
    assert.equal(first.body.length, 300000);
    const again = await send(mf, "main", "POST", `/big?run=${id}&size=300000`, { headers: h, body: "x" });
    assert.equal(again.header("idempotent-replayed"), "true");
    assert.deepEqual(again.body, first.body);
    assert.equal(await origin.executions(id), 1);
  });

  test("a status that is not stored frees the key at once", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    assert.equal((await send(mf, "main", "POST", `/u?run=${id}&status=500`, { headers: h, body: "x" })).status, 500);
    assert.equal((await send(mf, "main", "POST", `/u?run=${id}&status=429`, { headers: h, body: "x" })).status, 429);
    const r = await send(mf, "main", "POST", `/u?run=${id}&status=201`, { headers: h, body: "x" });
    assert.equal(r.status, 201);
    assert.equal(r.header("idempotent-replayed"), null);
    const again = await send(mf, "main", "POST", `/u?run=${id}&status=201`, { headers: h, body: "x" });
    assert.equal(again.header("idempotent-replayed"), "true");
    assert.equal(await origin.executions(id), 3);
  });

  test("a response over maxResponseBytes is delivered, not stored, the key held until the lease", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const a = await send(mf, "small", "POST", `/l?run=${id}&size=5000`, { headers: h, body: "x" });
    assert.equal(a.status, 200);
    assert.equal(a.body.length, 5000);
    assertProblem(assert, await send(mf, "small", "POST", `/l?run=${id}&size=5000`, { headers: h, body: "x" }), 409);
    await sleep(2200);
    const b = await send(mf, "small", "POST", `/l?run=${id}&size=5000`, { headers: h, body: "x" });
    assert.equal(b.status, 200);
    assert.equal(await origin.executions(id), 2);
  });

  test("an origin reset leaves the key held until its lease lapses", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const started = Date.now();
    const r = await send(mf, "short", "POST", `/r?run=${id}&reset=1`, { headers: h, body: "x" });
    assert.equal(r.status, 503);
    assertProblem(assert, await send(mf, "short", "POST", `/r?run=${id}`, { headers: h, body: "x" }), 409);
    assert.equal(await origin.seen(id), 1);
    const ok = await afterLease(started, () => send(mf, "short", "POST", `/r?run=${id}`, { headers: h, body: "x" }));
    assert.equal(ok.status, 200);
    assert.equal(ok.header("idempotent-replayed"), null);
    assert.equal(await origin.seen(id), 2);
  });

  test("an origin that never answers holds the key until the lease; then a retry goes through", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const started = Date.now();
    const ac = new AbortController();
    const hung = send(mf, "short", "POST", `/h?run=${id}&hang=1`, { headers: h, body: "x", signal: ac.signal });
    setTimeout(() => ac.abort(), 700);
    await assert.rejects(hung);
    assertProblem(assert, await send(mf, "short", "POST", `/h?run=${id}&hang=1`, { headers: h, body: "x" }), 409);
    assert.equal(await origin.seen(id), 1);
    const ok = await afterLease(started, () => send(mf, "short", "POST", `/h?run=${id}`, { headers: h, body: "x" }));
    assert.equal(ok.status, 200);
    assert.equal(await origin.seen(id), 2);
  });

  test("keys expire after ttlSeconds and the request executes again", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const a = await send(mf, "short", "POST", `/e?run=${id}`, { headers: h, body: "x" });
    assert.equal((await send(mf, "short", "POST", `/e?run=${id}`, { headers: h, body: "x" })).header("idempotent-replayed"), "true");
    await sleep(2300);
    const b = await send(mf, "short", "POST", `/e?run=${id}`, { headers: h, body: "x" });
    assert.equal(b.header("idempotent-replayed"), null);
    assert.notDeepEqual(a.body, b.body);
    assert.equal(await origin.executions(id), 2);
  });

  test("GET and unlisted methods pass untouched; POST without a key passes", async () => {
    const id = run();
    const h = { "Idempotency-Key": "same", "X-Custom": "kept" };
    for (const method of ["GET", "PUT", "DELETE", "GET"]) {
      const r = await send(mf, "main", method, `/p?run=${id}`, { headers: h, body: method === "PUT" ? "body" : null });
      assert.equal(r.status, 200);
      assert.equal(r.header("idempotent-replayed"), null);
    }
    for (let i = 0; i < 2; i++) assert.equal((await send(mf, "main", "POST", `/p?run=${id}`, { body: "x" })).header("idempotent-replayed"), null);
    const log = (await origin.requests()).filter((r) => r.path.includes(`run=${id}`));
    assert.equal(log.length, 6);
    assert.equal(log[0].headers["x-custom"], "kept");
  });

  test("ORIGIN_URL: the origin by URL, its path as a prefix; an origin that is down is 503", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const r = await send(mf, "url", "POST", `/x?run=${id}`, { headers: h, body: "x" });
    assert.equal(r.status, 200);
    assert.equal(r.json().path, `/base/x?run=${id}`);
    assert.equal((await send(mf, "url", "POST", `/x?run=${id}`, { headers: h, body: "x" })).header("idempotent-replayed"), "true");
    assert.equal((await send(mf, "down", "GET", "/x", {})).status, 503);
    assert.equal((await send(mf, "down", "POST", "/x", { headers: h, body: "x" })).status, 503);
    // the outcome is unknown: the key stays held (409) until its lease lapses
    assertProblem(assert, await send(mf, "down", "POST", "/x", { headers: h, body: "x" }), 409);
  });

  test("the empty configuration (no IDEMGATE_CONFIG) gives the defaults", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    await send(mf, "defaults", "POST", `/d?run=${id}`, { headers: h, body: "x" });
    const again = await send(mf, "defaults", "POST", `/d?run=${id}`, { headers: h, body: "x" });
    assert.equal(again.header("idempotent-replayed"), "true");
  });
});

describe("bad inputs, as in Envoy", { concurrency: 4 }, () => {
  test("missing key where required is 400", async () => {
    const id = run();
    const doc = assertProblem(assert, await send(mf, "required", "POST", `/m?run=${id}`, { body: "x" }), 400);
    assert.ok(doc.detail.includes("idempotency-key"));
    assert.ok(doc.type.endsWith("missing-key"));
    assert.equal(await origin.seen(id), 0);
  });

  // (An empty header value is checked against raw workerd in workerd.test.js: Miniflare's
  // dispatchFetch drops empty headers before the worker sees them.)
  for (const [value, needle] of [
    ['""', "empty"],
    ["k".repeat(65), "at most 64"],
    ["caf\u00e9", "printable ASCII"],
    ['"unterminated', "structured-field string"],
    ['"a"b', "structured-field string"],
  ]) {
    test(`malformed key ${JSON.stringify(value).slice(0, 20)} is 400 (${needle})`, async () => {
      const id = run();
      const r = await send(mf, "required", "POST", `/k?run=${id}`, { headers: { "Idempotency-Key": value }, body: "x" });
      const doc = assertProblem(assert, r, 400);
      assert.ok(doc.detail.includes(needle), doc.detail);
      assert.ok(doc.type.endsWith("malformed-key"));
      assert.equal(await origin.seen(id), 0);
    });
  }

  test("a body over maxBodyBytes is 413, declared or streamed; exactly at the limit is fine", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const big = new Uint8Array((1 << 20) + 1).fill(0x78);
    const doc = assertProblem(assert, await send(mf, "main", "POST", `/b?run=${id}`, { headers: h, body: big }), 413);
    assert.ok(doc.detail.includes("1048576 bytes"));
    const stream = new ReadableStream({
      start(c) {
        for (let i = 0; i < big.length; i += 65536) c.enqueue(big.slice(i, i + 65536));
        c.close();
      },
    });
    assertProblem(assert, await send(mf, "main", "POST", `/b?run=${id}`, { headers: h, body: stream, duplex: "half" }), 413);
    assert.equal(await origin.seen(id), 0);
    assert.equal((await send(mf, "main", "POST", `/b?run=${id}`, { headers: h, body: big.slice(1) })).status, 200);
  });

  test("large bodies (hashed with WebCrypto): replayed, and a change in their last byte is 422", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    const body = new Uint8Array(64 * 1024).fill(0x61);
    const first = await send(mf, "main", "POST", `/lb?run=${id}`, { headers: h, body });
    assert.equal(first.status, 200);
    const again = await send(mf, "main", "POST", `/lb?run=${id}`, { headers: h, body });
    assert.equal(again.header("idempotent-replayed"), "true");
    assert.deepEqual(again.body, first.body);
    const changed = body.slice();
    changed[changed.length - 1] = 0x62;
    const r = await send(mf, "main", "POST", `/lb?run=${id}`, { headers: h, body: changed });
    assert.ok(assertProblem(assert, r, 422).type.endsWith("key-reused"));
    assert.equal(await origin.seen(id), 1);
  });

  test("same key with a different body is 422 and never reaches the origin", async () => {
    const id = run();
    const h = { "Idempotency-Key": key() };
    await send(mf, "main", "POST", `/v?run=${id}`, { headers: h, body: "one" });
    const r = await send(mf, "main", "POST", `/v?run=${id}`, { headers: h, body: "two" });
    assert.ok(assertProblem(assert, r, 422).type.endsWith("key-reused"));
    assert.equal(await origin.seen(id), 1);
  });

  for (const [name, field] of [
    ["bad", "key.maxLength: must be 1..=1024, got 0"],
    ["notjson", "$: key must be a string"],
  ]) {
    test(`a refused configuration answers 500 naming the field (${name})`, async () => {
      const id = run();
      for (const method of ["POST", "GET"]) {
        const r = await send(mf, name, method, `/c?run=${id}`, { headers: { "Idempotency-Key": "k" }, body: method === "POST" ? "x" : null });
        const doc = assertProblem(assert, r, 500);
        assert.ok(doc.type.endsWith("misconfigured"));
        assert.ok(doc.detail.includes(`invalid configuration: ${field}`), doc.detail);
      }
      assert.equal(await origin.seen(id), 0);
    });
  }

  test("no origin configured answers 500 misconfigured", async () => {
    const r = await send(mf, "noorigin", "POST", "/n", { headers: { "Idempotency-Key": "k" }, body: "x" });
    assert.ok(assertProblem(assert, r, 500).detail.includes("ORIGIN_URL"));
  });

  test("an ORIGIN_URL that is not http(s), or no store binding, answers 500 naming it", async () => {
    for (const [name, needle] of [
      ["badurl", 'ORIGIN_URL: must be http: or https:, got "ftp:"'],
      ["nostore", "no store: bind a Durable Object namespace of class IdempotencyStore as IDEMGATE_STORE"],
    ]) {
      for (const method of ["POST", "GET"]) {
        const r = await send(mf, name, method, "/n", { headers: { "Idempotency-Key": "k" }, body: method === "POST" ? "x" : null });
        const doc = assertProblem(assert, r, 500);
        assert.ok(doc.type.endsWith("misconfigured"));
        assert.ok(doc.detail.includes(needle), doc.detail);
      }
    }
  });
});

test("persistence: a stored response survives a restart (Durable Objects on disk)", async () => {
  const tmp = tempDir("idemgate-edge-persist-");
  const id = run();
  const h = { "Idempotency-Key": key() };
  try {
    const one = await startMiniflare([worker("main", CONFIGS.main, origin)], { persist: tmp.dir });
    const first = await send(one, "main", "POST", `/s?run=${id}`, { headers: h, body: "x" });
    assert.equal(first.status, 200);
    await one.dispose();
    const two = await startMiniflare([worker("main", CONFIGS.main, origin)], { persist: tmp.dir });
    try {
      const again = await send(two, "main", "POST", `/s?run=${id}`, { headers: h, body: "x" });
      assert.equal(again.header("idempotent-replayed"), "true");
      assert.deepEqual(again.body, first.body);
      assert.equal(await origin.executions(id), 1);
    } finally {
      await two.dispose();
    }
  } finally {
    tmp.remove();
  }
});

/** What a Durable Object of worker `name` keeps on disk (Miniflare's SQLite store, read with
 * Python's sqlite3): its keys and its alarm (ms since the epoch, or null). One object only. */
function objectStorage(persistDir, name) {
  const dir = join(persistDir, `${name}-IdempotencyStore`);
  const files = readdirSync(dir).filter((f) => f.endsWith(".sqlite") && f !== "metadata.sqlite");
  assert.equal(files.length, 1, `one object expected, found ${files}`);
  const out = execFileSync(process.env.PYTHON || "python3", ["-c", `
import json, sqlite3, sys
c = sqlite3.connect(sys.argv[1])
keys = [k for (k,) in c.execute("select key from _cf_KV order by key")]
alarm = [a for (a,) in c.execute("select value from _cf_METADATA where key = 1")]
print(json.dumps({"keys": keys, "alarm": alarm[0] // 1000000 if alarm and alarm[0] is not None else None}))
`, join(dir, files[0])]);
  return JSON.parse(out.toString());
}

test("storage: the claim sets the alarm at the key's expiry, the completion keeps it, the alarm deletes the record", async () => {
  const tmp = tempDir("idemgate-edge-alarm-");
  const id = run();
  const h = { "Idempotency-Key": key() };
  try {
    const one = await startMiniflare([worker("short", CONFIGS.short, origin)], { persist: tmp.dir });
    try {
      const before = Date.now();
      const first = await send(one, "short", "POST", `/e?run=${id}`, { headers: h, body: "x" });
      const after = Date.now();
      assert.equal(first.status, 200);
      const stored = objectStorage(tmp.dir, "short");
      assert.deepEqual(stored.keys, ["record"]);
      // ttlSeconds 2: the expiry fixed at the claim, the alarm there
      assert.ok(stored.alarm >= before + 2000 && stored.alarm <= after + 2000, JSON.stringify({ before, after, stored }));
      const again = await send(one, "short", "POST", `/e?run=${id}`, { headers: h, body: "x" });
      assert.equal(again.header("idempotent-replayed"), "true");
      for (let i = 0; i < 50 && objectStorage(tmp.dir, "short").keys.length > 0; i++) await sleep(100);
      assert.ok(Date.now() >= stored.alarm, "deleted before the expiry");
      assert.deepEqual(objectStorage(tmp.dir, "short"), { keys: [], alarm: null });
      // and the key is free: the request executes again
      const third = await send(one, "short", "POST", `/e?run=${id}`, { headers: h, body: "x" });
      assert.equal(third.header("idempotent-replayed"), null);
      assert.equal(await origin.executions(id), 2);
    } finally {
      await one.dispose();
    }
  } finally {
    tmp.remove();
  }
});
