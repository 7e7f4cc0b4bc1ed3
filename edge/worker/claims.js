// The store's side of a key, written once for every store (store.js: a Durable Object per
// key; kv.js: Deno KV). Each decision is the core's (Engine.decide, completes, releases,
// Engine.rateCheck); this file only runs it against a slot and retries when the slot changed
// under it.
//
// A slot is one key's stored value with a version:
//   read()                          → {value, version}   (value undefined when absent)
//   write(version, value, expiresAt) → true, or false when the slot is no longer at `version`
//   remove(version)                 → true, or false likewise
//   changed(version, ms)            → resolves once the slot may have left `version`, or after ms
// Any of them may return a promise. A Durable Object's slot never loses a race (the object
// serialises its events); a Deno KV slot compares versionstamps (atomic check + set).

/** Conflicting writers on one slot after which the store gives up (answered as a store error). */
const MAX_ATTEMPTS = 16;

export function claims(core) {
  const { VerdictKind } = core;
  return {
    /**
     * One request of rule `rule` with `fingerprint`, claim token `owner` and per-request
     * expiry: claims the key (`{claimed: true, record, expiresAt, now, leaseExpired, waited}`), or settles
     * the request with the stored record (`{claimed: false, record, now, deadline}`: the worker
     * renders the answer from it with the same `now` and `deadline`), waiting first where the
     * rule says so.
     */
    async begin(engine, slot, { rule, fingerprint, owner, expiresInMs }) {
      let deadline;
      for (let lost = 0; ; ) {
        const { value: record, version } = await slot.read();
        const now = Date.now();
        const v = engine.decide(rule, fingerprint, owner, expiresInMs ?? undefined, record, now, deadline);
        let wakeAt;
        try {
          if (v.kind === VerdictKind.Claimed) {
            const claim = v.record;
            if (await slot.write(version, claim, v.expiresAt)) {
              return { claimed: true, record: claim, expiresAt: v.expiresAt, now, leaseExpired: v.leaseExpired, waited: deadline !== undefined };
            }
            if (++lost >= MAX_ATTEMPTS) throw new Error(`key still contended after ${lost} attempts`);
            continue;
          }
          if (v.kind !== VerdictKind.Wait) {
            return { claimed: false, record: record ?? null, now, deadline: deadline ?? null };
          }
          deadline = v.deadline;
          wakeAt = v.wakeAt;
        } finally {
          v.free();
        }
        await slot.changed(version, wakeAt - now);
      }
    },

    /** Stores the completed record of the claim that still holds the key; false if it lost it. */
    async complete(slot, completed) {
      for (let lost = 0; lost < MAX_ATTEMPTS; lost++) {
        const { value, version } = await slot.read();
        const expiresAt = core.completes(value, completed);
        if (expiresAt === undefined) return false;
        if (await slot.write(version, completed, expiresAt)) return true;
      }
      throw new Error(`key still contended after ${MAX_ATTEMPTS} attempts`);
    },

    /** Frees the key held by claim `owner` (the origin's status is not stored); false if it lost it. */
    async release(slot, owner) {
      for (let lost = 0; lost < MAX_ATTEMPTS; lost++) {
        const { value, version } = await slot.read();
        if (!core.releases(value, owner)) return false;
        if (await slot.remove(version)) return true;
      }
      throw new Error(`key still contended after ${MAX_ATTEMPTS} attempts`);
    },

    /**
     * Rate limiting (a slot per caller's bucket): spends `cost` under rule `rule`'s limit and
     * returns the state the bucket had before (`{tat, now}`), which the worker turns into the
     * answer and headers with the same core function. The state is kept until the bucket is
     * full again, when it means nothing.
     */
    async charge(engine, slot, { rule, cost }) {
      for (let lost = 0; lost < MAX_ATTEMPTS; lost++) {
        const { value: before, version } = await slot.read();
        const now = Date.now();
        const next = engine.rateCheck(rule, before, now, cost);
        if (next === undefined) return { tat: before ?? null, now };
        if (await slot.write(version, next, Number(next / 1_000_000n) + 1)) return { tat: before ?? null, now };
      }
      throw new Error(`rate-limit bucket still contended after ${MAX_ATTEMPTS} attempts`);
    },
  };
}
