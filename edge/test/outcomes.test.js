// The edge twin of tests/test_ratelimit.py::test_scripted_traffic_counts_at_stats_prometheus:
// known traffic through the worker in Miniflare; the worker's structured log lines (one JSON
// line per request, captured from workerd's output) are summed into the Envoy counters they
// name, and every counter must equal what the test sent of its kind. Also: requests refused
// at body time spend rate-limit quota, no line carries a raw key or credential, and
// IDEMGATE_OUTCOME_LOGS=off silences the lines. The same traffic's Workers Analytics Engine data
// points (IDEMGATE_ANALYTICS, bound to a recording stand-in) add up to the same counters.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Miniflare } from "miniflare";
import { freshId, send, sleep, startOrigin, worker } from "./helpers.js";

const NAMESPACE = "edgemetrics";
const CONFIG = {
  store: { namespace: NAMESPACE },
  leaseSeconds: 2,
  maxBodyBytes: 1000,
  maxResponseBytes: 1000,
  correlation: { header: "x-correlation-id" },
  routes: [
    // GETs are not covered, but rate limited: a burst of 2, no refill during the test
    { name: "limited", match: { prefix: "/rl" }, rateLimit: { rate: 1, periodSeconds: 3600, burst: 2, callerHeaders: [] } },
    // the key is in the body: requests are charged once the body is in, refused or not
    {
      name: "bodylimited",
      match: { prefix: "/bl" },
      key: { sources: [{ jsonPointer: "/id" }], required: true },
      rateLimit: { rate: 1, periodSeconds: 3600, burst: 2, callerHeaders: [], perRoute: true },
    },
    { name: "required", match: { prefix: "/req" }, key: { required: true } },
    { name: "wait", match: { prefix: "/wait" }, onConcurrent: { action: "wait", waitMillis: 5000 }, leaseSeconds: 30 },
    { name: "dup", match: { prefix: "/dup" }, onDuplicate: { action: "reject" } },
  ],
};

// waiters (wait policy) are charged when their wait ends, as what it ends as
const WAIT_CONFIG = {
  store: { namespace: "waitrl" },
  rateLimit: { rate: 1, periodSeconds: 3600, burst: 5, callerHeaders: ["x-api-key"] },
  onConcurrent: { action: "wait", waitMillis: 5000 },
  routes: [{ name: "brief", match: { prefix: "/brief" }, onConcurrent: { action: "wait", waitMillis: 200 } }],
};

let origin;
let mf;
const messages = [];

before(async () => {
  origin = await startOrigin();
  mf = new Miniflare({
    workers: [
      worker("metrics", CONFIG, origin, { wrappedBindings: { IDEMGATE_ANALYTICS: { scriptName: "analytics" } } }),
      // An Analytics Engine dataset that writes each data point to the log (Miniflare's own
      // simulator drops them).
      {
        name: "analytics",
        modules: [
          {
            type: "ESModule",
            path: "analytics.js",
            contents: `export default () => ({ writeDataPoint(p) { console.log("${POINT}" + JSON.stringify(p)); } });`,
          },
        ],
      },
      worker("quiet", { store: { namespace: "quiet" } }, origin, { bindings: { IDEMGATE_OUTCOME_LOGS: "off" } }),
      worker("waitrl", WAIT_CONFIG, origin),
    ],
    durableObjectsPersist: false,
    // workerd's console output, one record per line, instead of printing it
    handleStructuredLogs: ({ message }) => {
      messages.push(String(message));
    },
  });
  await mf.ready;
});

after(async () => {
  await mf?.dispose();
  await origin?.stop();
});

const MARK = '{"idemgate":"outcome"';
const POINT = "analytics-engine-point ";

/** The Analytics Engine data points captured so far for `namespace`. */
function points(namespace) {
  const out = [];
  for (const m of messages) {
    for (const text of m.split("\n")) {
      const at = text.indexOf(POINT);
      if (at < 0) continue;
      const p = JSON.parse(text.slice(at + POINT.length));
      if (p.indexes[0] === namespace) out.push(p);
    }
  }
  return out;
}

/** The outcome lines captured so far for `namespace`. */
function lines(namespace) {
  const out = [];
  for (const m of messages) {
    for (const text of m.split("\n")) {
      const at = text.indexOf(MARK);
      if (at < 0) continue;
      const line = JSON.parse(text.slice(at));
      if (line.namespace === namespace) out.push(line);
    }
  }
  return out;
}

/** Waits until `n` lines of `namespace` arrived (the output is a stream), then a little
 * longer so that an extra line would be seen too. */
async function settled(namespace, n) {
  const deadline = Date.now() + 10_000;
  while (lines(namespace).length < n && Date.now() < deadline) await sleep(25);
  await sleep(300);
  return lines(namespace);
}

function tally(ls) {
  const sum = {};
  for (const l of ls) for (const c of l.counters) sum[c] = (sum[c] ?? 0) + 1;
  return sum;
}

async function inFlight(pathPart) {
  const deadline = Date.now() + 5_000;
  while (Date.now() < deadline) {
    if ((await origin.requests()).some((r) => r.path.includes(pathPart))) return;
    await sleep(20);
  }
  throw new Error(`the origin never saw ${pathPart}`);
}

test("silenced with IDEMGATE_OUTCOME_LOGS=off", async () => {
  const h = { "Idempotency-Key": `q-${freshId()}` };
  assert.equal((await send(mf, "quiet", "POST", "/q", { headers: h, body: "x" })).status, 200);
  assert.equal((await send(mf, "quiet", "POST", "/q", { headers: h, body: "x" })).status, 200);
  // (checked again after the scripted run, once later lines have arrived)
});

test("scripted traffic: the log lines count every outcome as Envoy's counters do", async () => {
  const run = freshId();
  const secret = `Bearer s3cret-${run}`;
  const k = (i) => `${run}-k${i}`;
  const p = `/m/${run}?run=${run}`;
  const post = (path, key, body = "{}", extra = {}) =>
    send(mf, "metrics", "POST", path, { headers: { authorization: secret, ...(key ? { "Idempotency-Key": key } : {}), ...extra }, body });
  const expectStatus = async (promise, status) => {
    const r = await promise;
    assert.equal(r.status, status, `${r.status}: ${r.text()}`);
    return r;
  };

  // 10 first requests, stored
  for (let i = 1; i <= 10; i++) await expectStatus(post(p, k(i)), 200);
  // 3 replays, 1 mismatch
  for (let i = 0; i < 3; i++) assert.equal((await post(p, k(10))).header("idempotent-replayed"), "true");
  await expectStatus(post(p, k(10), '{"x":1}'), 422);
  // 1 forwarded slow request + 2 concurrent conflicts
  const slow = post(`${p}&delay=0.8&slow=1`, k(11));
  await inFlight(`run=${run}&delay=0.8&slow=1`);
  for (let i = 0; i < 2; i++) await expectStatus(post(`${p}&delay=0.8&slow=1`, k(11)), 409);
  await expectStatus(slow, 200);
  // 2 malformed keys, 1 missing where required, 2 too large (declared, streamed), 3 passed
  await expectStatus(post(p, '"open'), 400);
  await expectStatus(post(p, "a".repeat(300)), 400);
  await expectStatus(post(`/req${p}`, null), 400);
  await expectStatus(post(p, k(98), "x".repeat(2000)), 413);
  const stream = new ReadableStream({
    start(c) {
      c.enqueue(new TextEncoder().encode("y".repeat(1500)));
      c.close();
    },
  });
  await expectStatus(
    send(mf, "metrics", "POST", p, { headers: { "Idempotency-Key": k(99) }, body: stream, duplex: "half" }),
    413,
  );
  for (let i = 0; i < 3; i++) await expectStatus(post(p, null), 200);
  // not stored by status (the key is released)
  await expectStatus(post(`${p}&status=500`, k(12)), 500);
  // an origin reset: outcome unknown, claim kept; after the lease a retry takes over
  await expectStatus(post(`${p}&reset=1`, k(13)), 503);
  await sleep(2200);
  await expectStatus(post(`${p}&reset=1`, k(13)), 503);
  // too large to store
  await expectStatus(post(`${p}&size=5000`, k(14)), 200);
  // 5 GETs on a route limited to a burst of 2 (not covered: no `requests`)
  const codes = [];
  for (let i = 0; i < 5; i++) codes.push((await send(mf, "metrics", "GET", `/rl/${run}`)).status);
  assert.deepEqual(codes, [200, 200, 429, 429, 429]);
  // body-time refusals spend quota (burst 2): not JSON, key missing, then 429s even for a
  // valid request, which never reaches the origin
  const bl = `/bl/${run}?run=${run}`;
  const first = await expectStatus(post(bl, null, "{not json"), 400);
  assert.equal(first.header("x-ratelimit-remaining"), "1");
  const second = await expectStatus(post(bl, null, "{}"), 400);
  assert.equal(second.header("x-ratelimit-remaining"), "0");
  for (const body of ["{not json", `{"id": "${k(20)}"}`]) {
    const r = await expectStatus(post(bl, null, body), 429);
    assert.equal(r.header("x-ratelimit-remaining"), "0");
    assert.equal(r.header("x-ratelimit-limit"), "2");
    assert.ok(Number(r.header("retry-after")) >= 1);
  }
  assert.equal((await origin.requests()).filter((r) => r.path.startsWith(`/bl/${run}`)).length, 0);
  // wait policy: 1 slow first request, 2 waiters replayed when it completes
  const w = `/wait/${run}?run=${run}&delay=0.8`;
  const firstWait = post(w, k(15));
  await inFlight(`/wait/${run}?`);
  const waiters = await Promise.all([post(w, k(15)), post(w, k(15))]);
  assert.equal((await firstWait).status, 200);
  assert.deepEqual(
    waiters.map((r) => [r.status, r.header("idempotent-replayed")]),
    [
      [200, "true"],
      [200, "true"],
    ],
  );
  // a duplicate rejected (counted apart from the other refusals)
  await expectStatus(post(`/dup${p}`, k(16)), 200);
  await expectStatus(post(`/dup${p}`, k(16)), 409);

  const requests = 10 + 3 + 1 + 3 + (2 + 1 + 2 + 3) + 1 + 2 + 1 + 4 + 3 + 2;
  const ls = await settled(NAMESPACE, requests + 5);
  assert.equal(ls.length, requests + 5, JSON.stringify(ls.map((l) => l.outcome)));
  const expected = {
    requests,
    forwarded: 10 + 1 + 1 + 2 + 1 + 1 + 1,
    stored: 10 + 1 + 1 + 1,
    replayed: 3 + 2,
    waited: 2,
    mismatches: 1,
    conflicts: 2,
    duplicates: 1,
    bad_keys: 2,
    missing_keys: 1 + 1,
    too_large: 2,
    invalid_bodies: 1,
    passed: 3,
    not_stored_status: 1,
    not_stored_incomplete: 2,
    not_stored_too_large: 1,
    lease_expiries: 1,
    rate_limited: 3 + 2,
  };
  const got = tally(ls);
  const names = new Set([...Object.keys(expected), ...Object.keys(got)]);
  const diff = [...names].filter((n) => (got[n] ?? 0) !== (expected[n] ?? 0)).map((n) => `${n}: got ${got[n] ?? 0}, want ${expected[n] ?? 0}`);
  assert.deepEqual(diff, [], diff.join("; "));
  // counters not listed above (wait_timeouts, lost_claims, store_errors, …) are 0: the
  // union above already requires it

  // the Analytics Engine data points count the same: one per counter, double1 = 1
  const ps = points(NAMESPACE);
  const byCounter = {};
  for (const pt of ps) byCounter[pt.blobs[0]] = (byCounter[pt.blobs[0]] ?? 0) + pt.doubles[0];
  assert.deepEqual(byCounter, got);
  for (const pt of ps) {
    assert.equal(pt.blobs.length, 4);
    assert.ok(["POST", "GET"].includes(pt.blobs[2]), JSON.stringify(pt));
    assert.ok(pt.doubles[1] >= 200 && pt.doubles[1] < 600, JSON.stringify(pt));
  }
  assert.deepEqual(points("quiet"), [], "no dataset bound there");

  // every line is consistent with its answer
  for (const l of ls) {
    assert.equal(typeof l.durationMs, "number");
    assert.ok(l.durationMs >= 0);
    assert.equal(l.rateLimited, l.outcome === "rate_limited");
    if (l.outcome === "rate_limited") assert.equal(l.status, 429);
    if (l.stored) assert.equal(l.status, 200);
    if (l.outcome === "uncovered") assert.deepEqual([l.route, l.counters, l.status], [null, [], 200]);
    assert.ok(l.correlationId && /^[0-9a-f-]{36}$/.test(l.correlationId), JSON.stringify(l));
  }
  const byOutcome = (o) => ls.filter((l) => l.outcome === o);
  assert.deepEqual([...new Set(byOutcome("mismatches").map((l) => l.status))], [422]);
  assert.deepEqual([...new Set(byOutcome("conflicts").map((l) => l.status))], [409]);
  assert.deepEqual([...new Set(byOutcome("duplicates").map((l) => [l.status, l.route].join()))], ["409,dup"]);
  assert.deepEqual(
    byOutcome("invalid_bodies").map((l) => [l.route, l.status]),
    [["bodylimited", 400]],
  );
  const notStored = ls.filter((l) => l.notStoredReason).map((l) => [l.notStoredReason, l.status]);
  assert.deepEqual(notStored.sort(), [
    ["incomplete", 503],
    ["incomplete", 503],
    ["status", 500],
    ["too_large", 200],
  ]);
  // keys appear only as a prefix of their scoped hash; credentials never
  const keyed = ls.filter((l) => l.keyId);
  assert.ok(keyed.length >= 26, `${keyed.length} lines with a key id`);
  for (const l of keyed) assert.match(l.keyId, /^[0-9a-f]{12}$/);
  for (const m of messages) {
    assert.ok(!m.includes(`${run}-k`), `a raw key was logged: ${m}`);
    assert.ok(!m.includes("s3cret"), `a credential was logged: ${m}`);
  }
  // the silenced worker wrote no outcome line
  assert.deepEqual(lines("quiet"), []);
});

test("waiters are charged as what their wait ends as, and logged as waited", async () => {
  const h = { "x-api-key": `caller-${freshId()}` };
  const post = (path, key) => send(mf, "waitrl", "POST", path, { headers: { ...h, "Idempotency-Key": key }, body: "{}" });
  // replayed after waiting: free
  let path = `/p/${freshId()}?delay=0.8`;
  let key = `w-${freshId()}`;
  let first = post(path, key);
  await inFlight(path);
  let waiter = await post(path, key);
  assert.equal((await first).header("x-ratelimit-remaining"), "4");
  assert.equal(waiter.header("idempotent-replayed"), "true");
  assert.equal(waiter.header("x-ratelimit-remaining"), "4");
  // the wait runs out (409): charged
  path = `/brief/${freshId()}?delay=1`;
  key = `w-${freshId()}`;
  first = post(path, key);
  await inFlight(path);
  waiter = await post(path, key);
  assert.equal(waiter.status, 409, waiter.text());
  assert.equal(waiter.header("x-ratelimit-remaining"), "2");
  assert.equal(waiter.header("x-ratelimit-limit"), "5");
  assert.equal((await first).header("x-ratelimit-remaining"), "3");
  // 4 charged so far (two first requests, the 409, this one): one left
  const last = await post(`/p/${freshId()}`, `w-${freshId()}`);
  assert.equal(last.header("x-ratelimit-remaining"), "1");

  const ls = await settled("waitrl", 5);
  assert.equal(ls.length, 5);
  assert.deepEqual(tally(ls), { requests: 5, forwarded: 3, stored: 3, replayed: 1, waited: 1, conflicts: 1, wait_timeouts: 1 });
  const timedOut = ls.find((l) => l.outcome === "conflicts");
  assert.deepEqual([timedOut.route, timedOut.status, timedOut.waited], ["brief", 409, true]);
});
