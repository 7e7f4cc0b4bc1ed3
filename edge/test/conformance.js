// Every conformance vector in tests/conformance/*.json against an edge runtime (Miniflare:
// conformance.test.js; Deno: deno.test.js), with the profile it names from envoy/profiles/
// (and its "short" variant: ttlSeconds and leaseSeconds 4), as tests/test_conformance.py runs
// them against Envoy: same statuses, headers, bodies and origin executions. Scenarios run
// concurrently (each has its own keys and run id), so the sleeps of the expiry scenarios
// overlap.
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ROOT, freshId, readJson, sleep, startOrigin } from "./helpers.js";

const PROFILES = Object.fromEntries(
  readdirSync(join(ROOT, "envoy/profiles"))
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => [f.replace(/\.json$/, ""), readJson(join(ROOT, "envoy/profiles", f))]),
);
const VECTORS = readdirSync(join(ROOT, "tests/conformance"))
  .filter((f) => f.endsWith(".json"))
  .sort()
  .flatMap((f) => {
    const doc = readJson(join(ROOT, "tests/conformance", f));
    return doc.scenarios.map((s) => [doc.profile, s]);
  });

function variantConfig(name, short) {
  const cfg = structuredClone(PROFILES[name]);
  cfg.store = { ...(cfg.store ?? {}), namespace: short ? `${name}-short` : name };
  if (short) {
    cfg.ttlSeconds = 4;
    cfg.leaseSeconds = 4;
    for (const route of cfg.routes ?? []) {
      delete route.ttlSeconds;
      delete route.leaseSeconds;
    }
  }
  return cfg;
}

const host = (profile, short) => (short ? `${profile}-short` : profile);

class Run {
  constructor(scenario) {
    this.id = freshId();
    this.keys = Object.fromEntries(["key", "key2", "key3"].map((k) => [k, `${k}-${freshId()}`]));
    this.scenario = scenario;
  }

  fill(value) {
    if (typeof value === "string") {
      value = value.replace(/\{\{a\*(\d+)\}\}/g, (_, n) => "a".repeat(Number(n)));
      for (const [k, v] of Object.entries(this.keys)) value = value.replaceAll(`{{${k}}}`, v);
      return value;
    }
    if (Array.isArray(value)) return value.map((v) => this.fill(v));
    if (value && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, this.fill(v)]));
    return value;
  }
}

function buildRequest(run, spec) {
  const method = spec.method ?? "POST";
  let path = run.fill(spec.path);
  const params = [`run=${run.id}`, ...Object.entries(spec.origin ?? {}).map(([k, v]) => `${k}=${v}`)];
  path += (path.includes("?") ? "&" : "?") + params.join("&");
  const headers = run.fill(spec.headers ?? {});
  let body = null;
  if ("json" in spec) {
    body = new TextEncoder().encode(JSON.stringify(run.fill(spec.json)));
    if (!Object.keys(headers).some((h) => h.toLowerCase() === "content-type")) headers["Content-Type"] = "application/json";
  } else if ("text" in spec) {
    body = new TextEncoder().encode(run.fill(spec.text));
  } else if ("bodySize" in spec) {
    body = new Uint8Array(Number(spec.bodySize)).fill(0x78);
  }
  if (body === null && ["POST", "PUT", "PATCH"].includes(method)) body = new Uint8Array(0);
  return { method, path, headers, body };
}

function pointer(doc, ptr) {
  let cur = doc;
  for (const raw of ptr ? ptr.replace(/^\//, "").split("/") : []) {
    const tok = raw.replaceAll("~1", "/").replaceAll("~0", "~");
    if (cur && typeof cur === "object" && !Array.isArray(cur) && Object.hasOwn(cur, tok)) cur = cur[tok];
    else if (Array.isArray(cur) && /^\d+$/.test(tok) && Number(tok) < cur.length) cur = cur[Number(tok)];
    else return [false, undefined];
  }
  return [true, cur];
}

function check(run, stepNo, r, expect, results) {
  const where = `${run.scenario.name} step ${stepNo}: ${r.status} ${[...r.headers].map((h) => h.join(": ")).join("; ")} ${r.text().slice(0, 300)}`;
  if ("status" in expect) assert.equal(r.status, expect.status, where);
  if ("statusIn" in expect) assert.ok(expect.statusIn.includes(r.status), where);
  for (const [name, want] of Object.entries(expect.headers ?? {})) {
    const got = r.header(name);
    if (want === null) assert.equal(got, null, `header ${name} should be absent; ${where}`);
    else if (typeof want === "object" && want.$present) assert.notEqual(got, null, `header ${name} should be present; ${where}`);
    else assert.equal(got, run.fill(want), `header ${name}; ${where}`);
  }
  if ("json" in expect) {
    const doc = r.json();
    for (const [ptr, want] of Object.entries(expect.json)) {
      const [found, got] = pointer(doc, ptr);
      if (want && typeof want === "object" && want.$absent) {
        assert.ok(!found, `${ptr} should be absent; ${where}`);
        continue;
      }
      assert.ok(found, `${ptr} missing; ${where}`);
      if (want && typeof want === "object" && want.$present) continue;
      if (want && typeof want === "object" && "$header" in want) {
        assert.ok(got !== null && got === r.header(want.$header), `${ptr}: ${got} != header ${want.$header}; ${where}`);
        continue;
      }
      if (want && typeof want === "object" && "$key" in want) {
        assert.equal(got, run.keys[want.$key], `${ptr}; ${where}`);
        continue;
      }
      assert.deepEqual(got, run.fill(want), `${ptr}; ${where}`);
    }
  }
  if ("sameBodyAs" in expect) {
    const ref = results[expect.sameBodyAs];
    assert.ok(ref && Buffer.from(ref.body).equals(Buffer.from(r.body)), `body differs from step ${expect.sameBodyAs}; ${where}`);
  }
}

/**
 * Defines the conformance tests against one runtime: `start(variants, origin)` starts it with
 * one worker per profile variant (`[{name, config}]`) in front of `origin` and resolves to
 * `{send(name, method, path, {headers, body}), stop()}` (send resolves like helpers.send).
 */
export function conformance(runtime, start) {
  let origin;
  let target;

  before(async () => {
    origin = await startOrigin();
    const variants = [];
    for (const name of Object.keys(PROFILES)) {
      for (const short of [false, true]) variants.push({ name: host(name, short), config: variantConfig(name, short) });
    }
    target = await start(variants, origin);
  });

  after(async () => {
    await target?.stop();
    await origin?.stop();
  });

  test(`${runtime}: every profile has vectors and every vector a profile`, () => {
    assert.deepEqual(Object.keys(PROFILES).sort(), ["default", "experiture", "fyno", "resultfly", "selwise", "slab5", "stripe"]);
    assert.deepEqual(new Set(VECTORS.map(([p]) => p)), new Set(Object.keys(PROFILES)));
  });

  describe(`${runtime}: conformance vectors`, { concurrency: 8 }, () => {
    for (const [profile, scenario] of VECTORS) {
      test(`${profile}: ${scenario.name}`, async () => {
        const run = new Run(scenario);
        const name = host(profile, scenario.variant === "short");
        const results = [];
        for (const [i, step] of scenario.steps.entries()) {
          if ("sleep" in step) {
            await sleep(step.sleep * 1000);
            results.push(null);
            continue;
          }
          const { method, path, headers, body } = buildRequest(run, step.send);
          const n = Number(step.concurrent ?? 1);
          const resps = await Promise.all(Array.from({ length: n }, () => target.send(name, method, path, { headers, body })));
          const expect = step.expect ?? {};
          for (const r of resps) check(run, i, r, expect, results);
          if ("anyWith" in expect) {
            const want = expect.anyWith;
            const matching = resps.filter((r) => r.status === want.status);
            assert.ok(matching.length > 0, `${scenario.name} step ${i}: no response with status ${want.status}`);
            for (const r of matching) check(run, i, r, want, results);
          }
          if ("origin" in expect) {
            // the origin may still be finishing a request whose answer we already have
            const deadline = Date.now() + 2000;
            while ((await origin.executions(run.id)) < expect.origin && Date.now() < deadline) await sleep(50);
            assert.equal(await origin.executions(run.id), expect.origin, `${scenario.name} step ${i}: origin executions`);
          }
          results.push(resps[0]);
        }
      });
    }
  });
}
