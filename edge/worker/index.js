// idemgate as an edge worker (ES module): a thin host for the Rust core, as filter/ is for
// Envoy. Every decision is the core's; this file moves bytes between the client, the
// core, the store (the IdempotencyStore Durable Object, one per scoped key) and the origin.
//
// Bindings:
//   IDEMGATE_CONFIG  the configuration (same JSON as the Envoy filter's); absent = defaults
//   IDEMGATE_STORE   Durable Object namespace of class IdempotencyStore
//   ORIGIN           service binding to the origin, or
//   ORIGIN_URL       the origin's base URL (used when ORIGIN is not bound)
//   IDEMGATE_OUTCOME_LOGS  "off" (or "false", "0", "no") silences the per-request JSON log
//                    line (README, edge worker: logs); on otherwise
import { core, engineFor, flat, toResponse, NULL_BODY } from "./engine.js";

export { IdempotencyStore } from "./store.js";

// Isolate-local cache of completed records, by scoped key id. A completed record cannot
// change before it expires (the core never lets a request claim a completed key before
// then), so a retry is answered here without a round trip to the object; the core still
// compares fingerprints (Exchange.consider), so a changed request is refused as usual.
const CACHE_MAX_AGE_MS = 60_000;
const CACHE_MAX_ENTRIES = 1024;
const CACHE_MAX_BYTES = 8 << 20;
const cache = new Map();
let cacheBytes = 0;

function cached(keyId, now) {
  const hit = cache.get(keyId);
  if (!hit) return undefined;
  if (hit.until <= now) {
    forget(keyId);
    return undefined;
  }
  return hit.record;
}

function remember(keyId, record) {
  const until = core.completedUntil(record);
  if (until === undefined || record.byteLength > CACHE_MAX_BYTES / 8) return;
  forget(keyId);
  cache.set(keyId, { record, until: Math.min(until, Date.now() + CACHE_MAX_AGE_MS) });
  cacheBytes += record.byteLength;
  for (const oldest of cache.keys()) {
    if (cache.size <= CACHE_MAX_ENTRIES && cacheBytes <= CACHE_MAX_BYTES) break;
    forget(oldest);
  }
}

function forget(keyId) {
  const hit = cache.get(keyId);
  if (hit) {
    cacheBytes -= hit.record.byteLength;
    cache.delete(keyId);
  }
}

const random = (n) => crypto.getRandomValues(new Uint8Array(n));
const token = () => crypto.getRandomValues(new BigUint64Array(1))[0] || 1n;
const short = (keyId) => keyId.slice(0, 12);

export default {
  async fetch(request, env) {
    const report = newReport(env, request.method);
    const { engine, error } = engineFor(env);
    if (!engine) {
      report.outcome = "misconfigured";
      return finish(report, toResponse(core.misconfigured(error)));
    }
    const url = new URL(request.url);
    const path = url.pathname + url.search;
    const ex = engine.exchange(request.method, path, flat(request.headers), random(16));
    let response;
    try {
      response = await handle(ex, request, env, path, report);
    } finally {
      note(report, ex);
      ex.free();
    }
    return finish(report, response);
  },
};

async function handle(ex, request, env, path, report) {
  const Step = core.Step;
  const origin = originOf(env);
  if (!origin && ex.step !== Step.Answer) {
    ex.misconfigured("no origin: bind a service as ORIGIN or set ORIGIN_URL");
    console.error("idemgate: no origin: bind a service as ORIGIN or set ORIGIN_URL");
  }
  // Rate limit at headers time for a request that is not inspected (as the filter).
  if (ex.chargeDue) await charge(env, ex, 1);
  if (ex.step === Step.Answer) return answer(ex);
  if (ex.step === Step.Pass) return untouched(ex, origin, request, path, request.body);

  const body = await readBody(request, ex.maxBodyBytes);
  if (body === null) ex.bodyTooLarge();
  else await resolveBody(ex, body);
  // Refused or passed on at body time: the charge deferred until now is due (a bad
  // request spends quota like any other; over the limit the answer becomes the 429).
  if (ex.step !== Step.Ready) await chargeDeferred(env, ex);
  if (ex.step === Step.Answer) return answer(ex);
  if (ex.step === Step.Pass) return untouched(ex, origin, request, path, body);

  // Ready: key id and fingerprint known.
  const keyId = ex.keyId;
  const hit = cached(keyId, Date.now());
  if (hit && ex.consider(hit, Date.now(), undefined)) {
    await chargeDeferred(env, ex);
    return answer(ex);
  }

  const stub = env.IDEMGATE_STORE.get(env.IDEMGATE_STORE.idFromName(keyId));
  const owner = token();
  let begun;
  try {
    begun = await stub.begin({
      rule: ex.rule,
      fingerprint: ex.fingerprint,
      owner,
      expiresInMs: ex.expiresInMs ?? null,
    });
  } catch (e) {
    console.error(`idemgate: store error for key ${short(keyId)}: ${e}`);
    report.storeError = true;
    ex.storeUnavailable();
    await chargeDeferred(env, ex);
    return answer(ex);
  }
  report.waited = Boolean(begun.claimed ? begun.waited : begun.deadline != null);
  if (!begun.claimed) {
    const record = begun.record ? new Uint8Array(begun.record) : null;
    if (record && ex.consider(record, begun.now, begun.deadline ?? undefined)) {
      remember(keyId, record);
      await chargeDeferred(env, ex);
      return answer(ex);
    }
    console.error(`idemgate: store answered without a usable record for key ${short(keyId)}`);
    ex.storeUnavailable();
    await chargeDeferred(env, ex);
    return answer(ex);
  }
  const claim = new Uint8Array(begun.record);
  report.leaseExpired = Boolean(begun.leaseExpired);
  if (begun.leaseExpired) console.log(`idemgate: key ${short(keyId)}: lapsed lease taken over`);
  if (await chargeDeferred(env, ex)) {
    // Over the rate limit: give the claim back, nothing is forwarded.
    await release(stub, owner, keyId, report);
    return answer(ex);
  }

  let upstream;
  try {
    upstream = await forward(origin, request, path, ex, body);
  } catch (e) {
    // No response from the origin (reset, refused, timeout): the outcome is unknown, so
    // the claim stays until its lease lapses, as in Envoy.
    console.warn(`idemgate: origin failed for key ${short(keyId)} (${e}); claim left to its lease`);
    report.notStored = "incomplete";
    return upstreamFailed(ex, true);
  }
  const capture = ex.capture(upstream.status, flat(upstream.headers));
  if (!capture.storable) {
    capture.free();
    report.notStored = "status";
    await release(stub, owner, keyId, report);
    return passthrough(ex, upstream);
  }
  let freed = false;
  const store = {
    capture,
    claim,
    stub,
    keyId,
    report,
    free() {
      if (!freed) capture.free();
      freed = true;
    },
  };
  if (!upstream.body) {
    await settle(store);
    return passthrough(ex, upstream);
  }
  // The log line waits for the end of the stream, when the record is stored or not.
  report.streaming = true;
  return passthrough(ex, upstream, upstream.body.pipeThrough(captureStream(store)));
}

// ----------------------------------------------------------------------------- outcome logs
// One JSON line per request (console.log), whose `counters` are the Envoy counters the same
// request increments there (README, edge worker: logs): summing them over the lines of a
// namespace gives what /stats/prometheus shows for an Envoy that saw the same traffic.
// Never the raw key or credentials: the key appears as a prefix of its scoped SHA-256 id.

const LOGS_OFF = new Set(["off", "false", "0", "no"]);

function newReport(env, method) {
  return {
    on: !LOGS_OFF.has(String(env.IDEMGATE_OUTCOME_LOGS ?? "").trim().toLowerCase()),
    started: Date.now(),
    method,
    namespace: null,
    route: null,
    covered: false,
    outcome: null,
    status: 0,
    waited: false,
    leaseExpired: false,
    stored: false,
    notStored: null,
    lostClaim: false,
    storeError: false,
    keyId: null,
    correlationId: null,
    streaming: false,
    done: false,
  };
}

/** What the core knows of the request, before the exchange is freed. */
function note(report, ex) {
  report.namespace = ex.namespace;
  report.covered = ex.covered;
  report.route = ex.covered ? ex.ruleName : null;
  report.outcome = ex.outcome ?? null;
  const keyId = ex.keyId;
  report.keyId = keyId ? short(keyId) : null;
  const id = ex.requestId;
  report.correlationId = id === undefined ? null : id.slice(0, 128);
}

/** The response is decided: log now, or at the end of its body when it is captured. */
function finish(report, response) {
  report.status = response.status;
  if (!report.streaming) emit(report);
  return response;
}

/** The Envoy counters this request increments. */
function counters(r) {
  const c = [];
  if (r.covered) c.push("requests");
  if (r.outcome) c.push(r.outcome);
  if (r.waited && r.outcome === "replayed") c.push("waited");
  if (r.waited && r.outcome === "conflicts") c.push("wait_timeouts");
  if (r.leaseExpired) c.push("lease_expiries");
  if (r.stored) c.push("stored");
  if (r.notStored) c.push(`not_stored_${r.notStored}`);
  if (r.lostClaim) c.push("lost_claims");
  if (r.storeError) c.push("store_errors");
  return c;
}

function emit(r) {
  if (r.done) return;
  r.done = true;
  if (!r.on) return;
  console.log(
    JSON.stringify({
      idemgate: "outcome",
      namespace: r.namespace,
      route: r.route,
      method: r.method,
      status: r.status,
      outcome: r.outcome ?? "uncovered",
      counters: counters(r),
      stored: r.stored,
      notStoredReason: r.notStored,
      rateLimited: r.outcome === "rate_limited",
      waited: r.waited,
      leaseExpired: r.leaseExpired,
      keyId: r.keyId,
      correlationId: r.correlationId,
      durationMs: Date.now() - r.started,
    }),
  );
}

function answer(ex) {
  return toResponse(ex.answer());
}

/** A request idemgate does not cover: to the origin and back, untouched. */
async function untouched(ex, origin, request, path, body) {
  try {
    return passthrough(ex, await forward(origin, request, path, ex, body));
  } catch (e) {
    console.warn(`idemgate: origin failed (${e})`);
    return upstreamFailed(ex, false);
  }
}

async function release(stub, owner, keyId, report) {
  try {
    await stub.release(owner);
  } catch (e) {
    report.storeError = true;
    console.error(`idemgate: store error releasing key ${short(keyId)}: ${e}`);
  }
}

/** Charges `cost` to the caller's rate-limit bucket (a Durable Object named by the core);
 * true when the caller is over its limit (the exchange's answer is then the 429). */
async function charge(env, ex, cost) {
  const name = ex.limitKey;
  let r;
  try {
    const stub = env.IDEMGATE_STORE.get(env.IDEMGATE_STORE.idFromName(name));
    r = await stub.charge({ rule: ex.limitRule, cost });
  } catch (e) {
    console.error(`idemgate: rate-limit store error (${e}); onContention decides`);
    return ex.chargeFailed(Date.now());
  }
  return ex.charged(r.tat ?? undefined, r.now, cost);
}

/** The charge a covered request owes once idemgate decided (see Exchange.deferredCost):
 * true when the caller is over its limit (the answer is then the 429). */
function chargeDeferred(env, ex) {
  const cost = ex.deferredCost();
  return cost === undefined ? false : charge(env, ex, cost);
}

/** Correlation id and rate-limit headers on a response that lacks them. */
function addHeaders(ex, headers) {
  const name = ex.correlationHeader;
  const id = ex.requestId;
  if (name && id !== undefined && !headers.has(name)) headers.set(name, id);
  const rate = ex.rateHeaders;
  for (let i = 0; i + 1 < rate.length; i += 2) if (!headers.has(rate[i])) headers.set(rate[i], rate[i + 1]);
  return headers;
}

function originOf(env) {
  if (env.ORIGIN && typeof env.ORIGIN.fetch === "function") return { service: env.ORIGIN };
  if (env.ORIGIN_URL) return { base: new URL(String(env.ORIGIN_URL)) };
  return null;
}

/** Sends the request to the origin: the client's headers (plus a generated correlation
 * id) and `body` (the buffered bytes, or the client's stream when untouched). */
function forward(origin, request, path, ex, body) {
  let target;
  if (origin.base) {
    target = new URL(origin.base);
    const [p, q] = [path.split("?")[0], path.includes("?") ? path.slice(path.indexOf("?")) : ""];
    target.pathname = target.pathname.replace(/\/$/, "") + p;
    target.search = q;
  } else {
    target = new URL(path, request.url);
  }
  const headers = new Headers(request.headers);
  if (ex.generated) headers.set(ex.correlationHeader, ex.requestId);
  const method = request.method;
  const noBody = method === "GET" || method === "HEAD";
  const init = { method, headers, body: noBody ? null : body, redirect: "manual" };
  return (origin.service ?? globalThis).fetch(new Request(target, init));
}

/** The origin's response to the client, with the correlation id and rate-limit headers
 * when it lacks them. */
function passthrough(ex, upstream, stream = upstream.body) {
  const headers = addHeaders(ex, new Headers(upstream.headers));
  const body = NULL_BODY.has(upstream.status) ? null : stream;
  return new Response(body, { status: upstream.status, statusText: upstream.statusText, headers });
}

/** 503 when the origin gave no response (as Envoy answers an upstream reset). */
function upstreamFailed(ex, claimed) {
  const headers = addHeaders(ex, new Headers({ "content-type": "text/plain" }));
  const held = claimed ? "; the outcome is unknown, so the idempotency key stays held until its lease lapses" : "";
  return new Response(`upstream connect error or disconnect/reset before headers: the origin did not answer${held}\n`, {
    status: 503,
    headers,
  });
}

// Bodies from this size on are hashed with WebCrypto when the core needs nothing else of
// them (key in the headers, raw SHA-256 fingerprint): native SHA-256 is ~10x the wasm's on
// 64 KiB in workerd, but a digest call has a fixed cost of ~10 us (more in Node), above the
// wasm's for a small body.
const HASH_NATIVELY_FROM = 4096;

/** Body time: the core finds the key and fingerprints the request. The fingerprint is the
 * same either way: SHA-256 over the core's head of the request, then the body. */
async function resolveBody(ex, body) {
  if (body.byteLength >= HASH_NATIVELY_FROM) {
    const head = ex.bodyHashHead(body.byteLength);
    if (head !== undefined) {
      const input = new Uint8Array(head.byteLength + body.byteLength);
      input.set(head);
      input.set(body, head.byteLength);
      let digest;
      try {
        digest = new Uint8Array(await crypto.subtle.digest("SHA-256", input));
      } catch (e) {
        console.error(`idemgate: crypto.subtle.digest failed (${e}); hashing in wasm`);
      }
      if (digest && ex.bodyHashed(body.byteLength, digest)) return;
    }
  }
  ex.body(body);
}

/** The whole body, or null as soon as it exceeds `max` bytes (then stops reading). */
async function readBody(request, max) {
  if (!request.body) return new Uint8Array(0);
  // A declared length within the limit (a larger one was refused at headers time): the
  // runtime reads the body in one piece, natively (HTTP framing holds it to that length),
  // rather than chunk by chunk through JavaScript.
  const declared = request.headers.get("content-length");
  if (declared !== null && /^[0-9]{1,15}$/.test(declared) && Number(declared) <= max) {
    const whole = new Uint8Array(await request.arrayBuffer());
    return whole.byteLength <= max ? whole : null;
  }
  const reader = request.body.getReader();
  const chunks = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > max) {
      reader.cancel().catch(() => {});
      return null;
    }
    chunks.push(value);
  }
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.byteLength;
  }
  return out;
}

/** Streams the origin's body to the client while the core captures it. The last chunk is
 * held back until the record is stored, so a client never has the whole response before
 * a retry would find it (as in Envoy, which stores at end of stream before passing it on).
 * A client that goes away cancels the stream: the outcome is unknown, the claim stays
 * until its lease. */
function captureStream(store) {
  let held = null;
  return new TransformStream({
    transform(chunk, controller) {
      const bytes = chunk instanceof Uint8Array ? chunk : new Uint8Array(chunk);
      if (store.capture.wantsBody) store.capture.push(bytes);
      if (held) controller.enqueue(held);
      held = bytes;
    },
    async flush(controller) {
      await settle(store);
      emit(store.report);
      if (held) controller.enqueue(held);
    },
    cancel() {
      // The client went away (or the origin's body broke): nothing is stored.
      console.warn(`idemgate: response for key ${short(store.keyId)} incomplete; key held until its lease lapses`);
      store.report.notStored = "incomplete";
      emit(store.report);
      store.free();
    },
  });
}

/** The response is complete: store it (or say why not). */
async function settle(store) {
  const { capture, claim, stub, keyId, report } = store;
  try {
    const completed = capture.finish(claim);
    if (!completed) {
      const reason = capture.reason;
      // a claim that does not decode is the store's fault, not the response's
      if (reason === "bad_claim") report.storeError = true;
      else report.notStored = reason;
      console.warn(
        `idemgate: response for key ${short(keyId)} not stored (${reason}); key held until its lease lapses`,
      );
      return;
    }
    if (await stub.complete(completed)) {
      report.stored = true;
      remember(keyId, completed);
    } else {
      report.lostClaim = true;
      console.warn(`idemgate: key ${short(keyId)} was taken over before its response completed (lease too short?)`);
    }
  } catch (e) {
    report.storeError = true;
    console.error(`idemgate: store error completing key ${short(keyId)}: ${e}`);
  } finally {
    store.free();
  }
}
