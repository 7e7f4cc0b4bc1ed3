// idemgate in front of an origin, for any runtime with the Fetch API: a thin host for the Rust
// core, as filter/ is for Envoy. Every decision is the core's; this file moves bytes between
// the client, the core, the store and the origin. Runtimes plug in through `host`:
//
//   core             the core's build for the runtime
//   host.engine()    the configuration's engine: {engine} or {error} (engine.js's cache)
//   host.store       the store port: record(keyId) → {begin, complete, release} and
//                    bucket(name) → {charge}; store.js (Durable Objects) and kv.js (Deno KV)
//                    implement it with claims.js
//   host.origin      {service} (an object with fetch, e.g. a service binding) or {base} (a URL
//                    whose path prefixes the request's)
//   host.misconfigured  why the host cannot serve (no origin, no store), or null: every
//                    request is then answered 500 misconfigured naming it
//   host.logs        one JSON line per request (outcomes.js); host.analytics an optional
//                    Analytics Engine dataset
import { lines, toResponse, NULL_BODY } from "./engine.js";
import { emit, newReport, note } from "./outcomes.js";

// Isolate-local cache of completed records, by scoped key id. A completed record cannot
// change before it expires (the core never lets a request claim a completed key before
// then), so a retry is answered here without a round trip to the store; the core still
// compares fingerprints (Exchange.consider), so a changed request is refused as usual.
const CACHE_MAX_AGE_MS = 60_000;
const CACHE_MAX_ENTRIES = 1024;
const CACHE_MAX_BYTES = 8 << 20;

// Bodies from this size on are hashed with WebCrypto when the core needs nothing else of
// them (key in the headers, raw SHA-256 fingerprint): native SHA-256 beats the wasm's on
// large bodies, but a digest call has a fixed cost, above the wasm's for a small body.
const HASH_NATIVELY_FROM = 4096;

// Responses up to this size are read whole before they are answered (once stored): in one
// piece, natively, when their length is declared, else as they come. A longer one streams
// through (captureStream), the bytes read so far first.
const BUFFER_RESPONSES_UP_TO = 64 << 10;

// One draw per request: 16 bytes for a generated correlation id, 8 for the claim token.
const draw = () => crypto.getRandomValues(new Uint8Array(24));
const token = (random) => new DataView(random.buffer, 16, 8).getBigUint64(0, true) || 1n;
const short = (keyId) => keyId.slice(0, 12);

/** The request handler for one build of the core: `handle(request, host)` → Response. */
export function gate(core) {
  const Step = core.Step;
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

  /** Keeps a completed `record` (expiring at `until`, read from it when not given). */
  function remember(keyId, record, until = core.completedUntil(record)) {
    if (until === undefined || record.byteLength > CACHE_MAX_BYTES / 8) return;
    forget(keyId);
    cache.set(keyId, { record, until: Math.min(until, Date.now() + CACHE_MAX_AGE_MS) });
    cacheBytes += record.byteLength;
    if (cache.size <= CACHE_MAX_ENTRIES && cacheBytes <= CACHE_MAX_BYTES) return;
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

  async function handle(request, host) {
    const report = newReport(request.method, host.logs !== false, host.analytics);
    const { engine, error } = host.engine();
    if (!engine) {
      report.outcome = "misconfigured";
      return finish(report, toResponse(core.misconfigured(error)));
    }
    const path = pathOf(request.url);
    const random = draw();
    const ex = engine.exchange(request.method, path, lines(request.headers), random.subarray(0, 16));
    let response;
    try {
      response = await exchange(ex, request, host, path, report, random);
    } finally {
      note(report, ex, engine);
      ex.free();
    }
    return finish(report, response);
  }

  async function exchange(ex, request, host, path, report, random) {
    const { origin, store } = host;
    if (host.misconfigured && ex.step !== Step.Answer) {
      ex.misconfigured(host.misconfigured);
      console.error(`idemgate: ${host.misconfigured}`);
    }
    // Rate limit at headers time for a request that is not inspected (as the filter).
    if (ex.chargeDue) await charge(store, ex, 1);
    if (ex.step === Step.Answer) return answer(ex);
    if (ex.step === Step.Pass) return untouched(ex, origin, request, path, request.body);

    const body = await readBody(request, ex.maxBodyBytes);
    if (body === null) ex.bodyTooLarge();
    else await resolveBody(ex, body);
    // Refused or passed on at body time: the charge deferred until now is due (a bad
    // request spends quota like any other; over the limit the answer becomes the 429).
    if (ex.step !== Step.Ready) await chargeDeferred(store, ex);
    if (ex.step === Step.Answer) return answer(ex);
    if (ex.step === Step.Pass) return untouched(ex, origin, request, path, body);

    // Ready: key id and fingerprint known.
    const keyId = ex.keyId;
    const hit = cached(keyId, Date.now());
    if (hit && ex.consider(hit, Date.now(), undefined)) {
      await chargeDeferred(store, ex);
      return answer(ex);
    }

    const owner = token(random);
    let slot;
    let begun;
    try {
      slot = store.record(keyId);
      begun = await slot.begin({ rule: ex.rule, fingerprint: ex.fingerprint, owner, expiresInMs: ex.expiresInMs ?? null });
    } catch (e) {
      console.error(`idemgate: store error for key ${short(keyId)}: ${e}`);
      report.storeError = true;
      ex.storeUnavailable();
      await chargeDeferred(store, ex);
      return answer(ex);
    }
    report.waited = Boolean(begun.claimed ? begun.waited : begun.deadline != null);
    if (!begun.claimed) {
      const record = begun.record ? new Uint8Array(begun.record) : null;
      if (record && ex.consider(record, begun.now, begun.deadline ?? undefined)) {
        remember(keyId, record);
        await chargeDeferred(store, ex);
        return answer(ex);
      }
      console.error(`idemgate: store answered without a usable record for key ${short(keyId)}`);
      ex.storeUnavailable();
      await chargeDeferred(store, ex);
      return answer(ex);
    }
    const claim = new Uint8Array(begun.record);
    report.leaseExpired = Boolean(begun.leaseExpired);
    if (begun.leaseExpired) console.log(`idemgate: key ${short(keyId)}: lapsed lease taken over`);
    if (await chargeDeferred(store, ex)) {
      // Over the rate limit: give the claim back, nothing is forwarded.
      await release(slot, owner, keyId, report);
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
    const capture = ex.capture(upstream.status, lines(upstream.headers));
    if (!capture.storable) {
      capture.free();
      report.notStored = "status";
      await release(slot, owner, keyId, report);
      return passthrough(ex, upstream);
    }
    const stored = { capture, claim, expiresAt: begun.expiresAt, slot, keyId, report, freed: false };
    if (!upstream.body) {
      await settle(stored);
      return passthrough(ex, upstream);
    }
    const read = await readAhead(upstream, BUFFER_RESPONSES_UP_TO);
    if (read.broken) {
      // The origin's body broke off: the outcome is unknown, the claim stays until its lease.
      report.notStored = "incomplete";
      free(stored);
      console.warn(`idemgate: response for key ${short(keyId)} incomplete; key held until its lease lapses`);
      return upstreamFailed(ex, true);
    }
    if (read.whole) {
      // In one piece: captured, stored, then answered (nothing reaches the client before a
      // retry would find the record).
      capture.push(read.whole);
      await settle(stored);
      return passthrough(ex, upstream, read.whole);
    }
    // The log line waits for the end of the stream, when the record is stored or not.
    report.streaming = true;
    return passthrough(ex, upstream, captureStream(stored, read.head, read.reader));
  }

  /** The response is complete: store it (or say why not). */
  async function settle(stored) {
    const { capture, claim, expiresAt, slot, keyId, report } = stored;
    try {
      const completed = capture.finish(claim);
      if (!completed) {
        const reason = capture.reason;
        // a claim that does not decode is the store's fault, not the response's
        if (reason === "bad_claim") report.storeError = true;
        else report.notStored = reason;
        console.warn(`idemgate: response for key ${short(keyId)} not stored (${reason}); key held until its lease lapses`);
        return;
      }
      if (await slot.complete(completed)) {
        report.stored = true;
        remember(keyId, completed, expiresAt);
      } else {
        report.lostClaim = true;
        console.warn(`idemgate: key ${short(keyId)} was taken over before its response completed (lease too short?)`);
      }
    } catch (e) {
      report.storeError = true;
      console.error(`idemgate: store error completing key ${short(keyId)}: ${e}`);
    } finally {
      free(stored);
    }
  }

  /** Streams the origin's body to the client while the core captures it: `head` (the chunks
   * read ahead), then the rest from `reader`. The last chunk is held back until the record is
   * stored, so a client never has the whole response before a retry would find it (as in
   * Envoy, which stores at end of stream before passing it on). A client that goes away, or
   * an origin body that breaks off, leaves the outcome unknown: the claim stays until its
   * lease. */
  function captureStream(stored, head, reader) {
    const pending = [...head];
    for (const chunk of head) stored.capture.push(chunk);
    const incomplete = () => {
      console.warn(`idemgate: response for key ${short(stored.keyId)} incomplete; key held until its lease lapses`);
      stored.report.notStored = "incomplete";
      emit(stored.report);
      free(stored);
    };
    return new ReadableStream({
      async pull(controller) {
        for (;;) {
          let next;
          try {
            next = await reader.read();
          } catch (e) {
            incomplete();
            controller.error(e);
            return;
          }
          if (next.done) {
            await settle(stored);
            emit(stored.report);
            for (const chunk of pending.splice(0)) controller.enqueue(chunk);
            controller.close();
            return;
          }
          const bytes = next.value instanceof Uint8Array ? next.value : new Uint8Array(next.value);
          if (stored.capture.wantsBody) stored.capture.push(bytes);
          pending.push(bytes);
          if (pending.length > 1) {
            // everything but the last chunk may go
            while (pending.length > 1) controller.enqueue(pending.shift());
            return;
          }
        }
      },
      cancel(reason) {
        reader.cancel(reason).catch(() => {});
        incomplete();
      },
    });
  }

  return handle;
}

/** The path and query of an absolute request URL (`http://host/p?q` → `/p?q`): request URLs are
 * serialised, so the path starts at the first "/" after the authority. */
function pathOf(url) {
  const at = url.indexOf("/", url.indexOf("//") + 2);
  return at < 0 ? "/" : url.slice(at);
}

/** `{origin}` for an origin's base URL (ORIGIN_URL), or `{error}` naming what is wrong. */
export function originUrl(value) {
  let base;
  try {
    base = new URL(String(value));
  } catch {
    return { error: `ORIGIN_URL: not an absolute URL, got ${JSON.stringify(String(value)).slice(0, 200)}` };
  }
  if (base.protocol !== "http:" && base.protocol !== "https:") {
    return { error: `ORIGIN_URL: must be http: or https:, got ${JSON.stringify(base.protocol)}` };
  }
  return { origin: { base } };
}

function free(stored) {
  if (!stored.freed) stored.capture.free();
  stored.freed = true;
}

/** The response is decided: report now, or at the end of its body when it streams. */
function finish(report, response) {
  report.status = response.status;
  if (!report.streaming) emit(report);
  return response;
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

async function release(slot, owner, keyId, report) {
  try {
    await slot.release(owner);
  } catch (e) {
    report.storeError = true;
    console.error(`idemgate: store error releasing key ${short(keyId)}: ${e}`);
  }
}

/** Charges `cost` to the caller's rate-limit bucket (named by the core); true when the
 * caller is over its limit (the exchange's answer is then the 429). */
async function charge(store, ex, cost) {
  let r;
  try {
    r = await store.bucket(ex.limitKey).charge({ rule: ex.limitRule, cost });
  } catch (e) {
    console.error(`idemgate: rate-limit store error (${e}); onContention decides`);
    return ex.chargeFailed(Date.now());
  }
  return ex.charged(r.tat ?? undefined, r.now, cost);
}

/** The charge a covered request owes once idemgate decided (see Exchange.deferredCost):
 * true when the caller is over its limit (the answer is then the 429). */
function chargeDeferred(store, ex) {
  const cost = ex.deferredCost();
  return cost === undefined ? false : charge(store, ex, cost);
}

/** `headers` with the correlation id and rate-limit headers it lacks (a copy only when there
 * is something to add). */
function addHeaders(ex, headers) {
  const extra = ex.responseHeaders;
  if (!extra) return headers;
  const out = new Headers(headers);
  const pairs = extra.split("\n");
  for (let i = 0; i + 1 < pairs.length; i += 2) if (!out.has(pairs[i])) out.set(pairs[i], pairs[i + 1]);
  return out;
}

/** Sends the request to the origin: the client's headers (plus a generated correlation
 * id) and `body` (the buffered bytes, or the client's stream when untouched). */
function forward(origin, request, path, ex, body) {
  let target;
  if (origin.base) {
    target = new URL(origin.base);
    const q = path.indexOf("?");
    target.pathname = target.pathname.replace(/\/$/, "") + (q < 0 ? path : path.slice(0, q));
    target.search = q < 0 ? "" : path.slice(q);
  } else {
    target = request.url;
  }
  let headers = request.headers;
  if (ex.generated) {
    headers = new Headers(headers);
    headers.set(ex.correlationHeader, ex.requestId);
  }
  const method = request.method;
  const noBody = method === "GET" || method === "HEAD";
  const init = { method, headers, body: noBody ? null : body, redirect: "manual" };
  if (init.body instanceof ReadableStream) init.duplex = "half";
  return (origin.service ?? globalThis).fetch(target, init);
}

/** The origin's response to the client, with the correlation id and rate-limit headers
 * when it lacks them. */
function passthrough(ex, upstream, body = upstream.body) {
  const headers = addHeaders(ex, upstream.headers);
  return new Response(NULL_BODY.has(upstream.status) ? null : body, { status: upstream.status, statusText: upstream.statusText, headers });
}

/** 503 when the origin gave no (whole) response (as Envoy answers an upstream reset). */
function upstreamFailed(ex, claimed) {
  const headers = addHeaders(ex, new Headers({ "content-type": "text/plain" }));
  const held = claimed ? "; the outcome is unknown, so the idempotency key stays held until its lease lapses" : "";
  return new Response(`upstream connect error or disconnect/reset before headers: the origin did not answer${held}\n`, {
    status: 503,
    headers,
  });
}

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

/** A declared length within `max`, or undefined. */
function declaredLength(headers, max) {
  const declared = headers.get("content-length");
  if (declared === null || !/^[0-9]{1,15}$/.test(declared)) return undefined;
  const n = Number(declared);
  return n <= max ? n : undefined;
}

/** The whole body, or null as soon as it exceeds `max` bytes (then stops reading). */
async function readBody(request, max) {
  if (!request.body) return new Uint8Array(0);
  // A declared length within the limit (a larger one was refused at headers time): the
  // runtime reads the body in one piece, natively (HTTP framing holds it to that length),
  // rather than chunk by chunk through JavaScript.
  if (declaredLength(request.headers, max) !== undefined) {
    const whole = new Uint8Array(await request.arrayBuffer());
    return whole.byteLength <= max ? whole : null;
  }
  const reader = request.body.getReader();
  const { chunks, total, more } = await readUpTo(reader, max);
  if (more) {
    reader.cancel().catch(() => {});
    return null;
  }
  return concat(chunks, total);
}

/** Chunks from `reader` until it ends (`more` false) or they exceed `max` bytes (`more` true). */
async function readUpTo(reader, max) {
  const chunks = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return { chunks, total, more: false };
    const bytes = value instanceof Uint8Array ? value : new Uint8Array(value);
    chunks.push(bytes);
    total += bytes.byteLength;
    if (total > max) return { chunks, total, more: true };
  }
}

/** `chunks` (of `total` bytes) as one array. */
function concat(chunks, total) {
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.byteLength;
  }
  return out;
}

/** Reads the origin's body up to `max` bytes: `{whole}` when it ended within them (in one
 * piece, natively, when its length is declared), `{head, reader}` when it goes on (the chunks
 * read so far and the rest), `{broken}` when it broke off. */
async function readAhead(upstream, max) {
  try {
    if (declaredLength(upstream.headers, max) !== undefined) return { whole: new Uint8Array(await upstream.arrayBuffer()) };
    const reader = upstream.body.getReader();
    const { chunks, total, more } = await readUpTo(reader, max);
    return more ? { head: chunks, reader } : { whole: concat(chunks, total) };
  } catch {
    return { broken: true };
  }
}
