// The Deno KV store: the store port (gate.js) over a Deno.Kv, with claims.js deciding on
// slots that Deno KV's atomic operations keep consistent across isolates and processes: a
// write commits only if the key's versionstamp is still the one read
// (`atomic().check(entry).set(…, {expireIn})`), so of two requests that read the same state
// only one claims the key; the other reads again and is answered from the new record.
//
// Layout under `prefix` (deno.js: ["idemgate", <store namespace>]):
//   [...prefix, "record", keyId]             the core's encoded record, or, for a record over
//                                            one value's limit (64 KiB), a manifest
//                                            {parts, size, blob} of
//   [...prefix, "part", keyId, blob, i]      its parts, written before the manifest that
//                                            names them, expiring after it
//   [...prefix, "bucket", name]              a rate-limit bucket's state (bigint)
// Every entry expires with its key (`expireIn`); decisions treat an expired record as absent
// whether or not Deno KV has deleted it yet.

const VALUE_MAX = 65536; // Deno KV's limit on one value
const PARTS_PER_COMMIT = 12; // 12 × 64 KiB stays under its 800 KiB per atomic operation
const PARTS_OUTLIVE_MS = 60_000; // parts expire after the manifest that names them

// Deno KV's local backend is an SQLite file: while another process holds its write lock an
// operation fails with "database is locked" and has done nothing, so it is tried again, for
// at most BUSY_MS, before the error reaches the request (a 503 from the store).
const BUSY_MS = 3000;

async function unlocked(op) {
  const until = Date.now() + BUSY_MS;
  for (let wait = 2; ; wait = Math.min(wait * 2, 100)) {
    try {
      return await op();
    } catch (e) {
      if (!/database is locked/i.test(String(e?.message ?? e)) || Date.now() > until) throw e;
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}

/** `Deno.openKv(path)`, waiting out another process that is opening the same file. */
export const openKv = (path) => unlocked(() => Deno.openKv(path));

/** `kv` with its reads and commits tried again while the database is locked. */
function patient(kv) {
  return {
    get: (key) => unlocked(() => kv.get(key)),
    getMany: (keys) => unlocked(() => kv.getMany(keys)),
    atomic() {
      const op = kv.atomic();
      const commit = op.commit.bind(op);
      op.commit = () => unlocked(commit);
      return op;
    },
    watch: (keys) => kv.watch(keys),
  };
}

/** The store port over `kv`, for claims `rules` (claims.js) and the configuration's engine. */
export function kvStore(db, rules, engine, { prefix = ["idemgate"] } = {}) {
  const kv = patient(db);
  return {
    record(keyId) {
      const slot = recordSlot(kv, prefix, keyId);
      return {
        begin: (request) => rules.begin(engine(), slot, request),
        complete: (completed) => rules.complete(slot, completed),
        release: (owner) => rules.release(slot, owner),
      };
    },
    bucket(name) {
      const slot = valueSlot(kv, [...prefix, "bucket", name]);
      return { charge: (request) => rules.charge(engine(), slot, request) };
    },
  };
}

const expireIn = (at) => Math.max(1, Math.ceil(at - Date.now()));

/** A slot holding one small value (a bucket's state). */
function valueSlot(kv, key) {
  return {
    async read() {
      const e = await kv.get(key);
      return { value: e.value ?? undefined, version: e.versionstamp };
    },
    async write(version, value, expiresAt) {
      const r = await kv.atomic().check({ key, versionstamp: version }).set(key, value, { expireIn: expireIn(expiresAt) }).commit();
      return r.ok;
    },
    async remove(version) {
      return (await kv.atomic().check({ key, versionstamp: version }).delete(key).commit()).ok;
    },
    changed: (version, ms) => changed(kv, key, version, ms),
  };
}

/** The slot of one key's record: the record itself, or a manifest and its parts. */
function recordSlot(kv, prefix, keyId) {
  const key = [...prefix, "record", keyId];
  const partKey = (blob, i) => [...prefix, "part", keyId, blob, i];
  return {
    async read() {
      const e = await kv.get(key);
      const stored = e.value;
      if (stored === null || stored === undefined) return { value: undefined, version: e.versionstamp };
      if (stored instanceof Uint8Array) return { value: stored, version: e.versionstamp };
      // A manifest: the parts, in order (a part gone missing reads as no record: the core
      // treats bytes that do not decode as absent).
      const value = new Uint8Array(stored.size);
      let at = 0;
      for (let i = 0; i < stored.parts; i += 10) {
        const keys = [];
        for (let j = i; j < Math.min(stored.parts, i + 10); j++) keys.push(partKey(stored.blob, j));
        for (const part of await kv.getMany(keys)) {
          if (!(part.value instanceof Uint8Array) || at + part.value.byteLength > value.byteLength) {
            return { value: new Uint8Array(0), version: e.versionstamp };
          }
          value.set(part.value, at);
          at += part.value.byteLength;
        }
      }
      return { value: at === value.byteLength ? value : new Uint8Array(0), version: e.versionstamp };
    },
    async write(version, value, expiresAt) {
      const ttl = expireIn(expiresAt);
      let stored = value;
      if (value.byteLength > VALUE_MAX) {
        // The parts first (under a blob id of their own, so a writer that loses the race
        // leaves nothing the winner reads), then the manifest, atomically against `version`.
        const blob = crypto.randomUUID();
        const parts = Math.ceil(value.byteLength / VALUE_MAX);
        for (let i = 0; i < parts; i += PARTS_PER_COMMIT) {
          let op = kv.atomic();
          for (let j = i; j < Math.min(parts, i + PARTS_PER_COMMIT); j++) {
            op = op.set(partKey(blob, j), value.subarray(j * VALUE_MAX, (j + 1) * VALUE_MAX), { expireIn: ttl + PARTS_OUTLIVE_MS });
          }
          await op.commit();
        }
        stored = { parts, size: value.byteLength, blob };
      }
      const r = await kv.atomic().check({ key, versionstamp: version }).set(key, stored, { expireIn: ttl }).commit();
      return r.ok;
    },
    async remove(version) {
      return (await kv.atomic().check({ key, versionstamp: version }).delete(key).commit()).ok;
    },
    changed: (version, ms) => changed(kv, key, version, ms),
  };
}

/** Resolves once `key` is no longer at `version` (Deno KV's watch), or after `ms`. */
async function changed(kv, key, version, ms) {
  const reader = kv.watch([key]).getReader();
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(resolve, Math.max(0, ms), null);
  });
  try {
    for (;;) {
      const next = await Promise.race([reader.read(), timeout]);
      if (!next || next.done || next.value[0].versionstamp !== version) return;
    }
  } finally {
    clearTimeout(timer);
    reader.cancel().catch(() => {});
  }
}
