// The store: one Durable Object per scoped key (the worker names it idFromName(keyIdHex)).
//
// The object holds at most one record, the core's encoded Record (in flight or completed),
// in memory and in its storage under "record". Every decision runs synchronously in the
// core (Engine.decide) on the in-memory record, and the new record is set in memory before
// the first await, so claims are serialised by the object itself; the storage write is
// covered by the output gate (no answer leaves before it is durable). A storage alarm at
// the record's expiry deletes it. Requests that the `wait` policy holds are parked here
// and decided again the moment the record completes or is released, or when their
// deadline or the in-flight lease ends.
import { DurableObject } from "cloudflare:workers";
import { core, engineFor } from "./engine.js";

const RECORD = "record";
const TAT = "tat";

export class IdempotencyStore extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.record = undefined;
    this.tat = undefined;
    this.waiters = new Set();
    // The alarm this object set last (undefined: none, or not known since it started).
    this.alarmAt = undefined;
    ctx.blockConcurrencyWhile(async () => {
      const stored = await ctx.storage.get([RECORD, TAT]);
      const record = stored.get(RECORD);
      this.record = record ? new Uint8Array(record) : undefined;
      this.tat = stored.get(TAT);
    });
  }

  /**
   * Decides for one request of rule `rule`: claims the key, or settles the request with
   * the stored record (the worker renders the answer from it with the same `now` and
   * `deadline`), waiting first where the rule says so.
   */
  async begin({ rule, fingerprint, owner, expiresInMs }) {
    const { engine, error } = engineFor(this.env);
    if (!engine) throw new Error(error);
    let deadline;
    for (;;) {
      const now = Date.now();
      const v = engine.decide(rule, fingerprint, owner, expiresInMs ?? undefined, this.record, now, deadline);
      let wakeAt;
      try {
        if (v.kind === core.VerdictKind.Claimed) {
          const record = v.record;
          const leaseExpired = v.leaseExpired;
          await this.#write(record, v.expiresAt);
          return { claimed: true, record, now, leaseExpired, waited: deadline !== undefined };
        }
        if (v.kind !== core.VerdictKind.Wait) {
          return { claimed: false, record: this.record ?? null, now, deadline: deadline ?? null };
        }
        deadline = v.deadline;
        wakeAt = v.wakeAt;
      } finally {
        v.free();
      }
      await this.#changed(wakeAt - now);
    }
  }

  /** Stores the completed record of the claim that still holds the key; false if lost. */
  async complete(completed) {
    completed = new Uint8Array(completed);
    if (!core.completes(this.record, completed)) return false;
    const write = this.#write(completed, core.expiresAt(completed));
    this.#wake();
    await write;
    return true;
  }

  /** Frees the key held by claim `owner` (the origin's status is not stored). */
  async release(owner) {
    if (!core.releases(this.record, owner)) return false;
    this.record = undefined;
    this.#wake();
    await this.ctx.storage.delete(RECORD);
    this.alarmAt = undefined;
    await this.ctx.storage.deleteAlarm();
    return true;
  }

  /**
   * Rate limiting (an object named by the caller's bucket, see Exchange.limitKey): spends
   * `cost` under rule `rule`'s limit and returns the state the bucket had before, which
   * the worker turns into the answer and headers with the same core function.
   */
  async charge({ rule, cost }) {
    const { engine, error } = engineFor(this.env);
    if (!engine) throw new Error(error);
    const now = Date.now();
    const before = this.tat;
    const next = engine.rateCheck(rule, before, now, cost);
    if (next !== undefined) {
      this.tat = next;
      await this.ctx.storage.put(TAT, next);
      // Once the bucket is full again its state means nothing: drop it then.
      await this.#alarm(Number(next / 1_000_000n) + 1);
    }
    return { tat: before ?? null, now };
  }

  /** Expiry: the record is deleted once its key expires (a full bucket's state too). */
  async alarm() {
    this.alarmAt = undefined; // it fired: none is set now
    if (this.tat !== undefined && Number(this.tat / 1_000_000n) < Date.now()) {
      this.tat = undefined;
      await this.ctx.storage.delete(TAT);
    }
    if (!this.record) return;
    const at = core.expiresAt(this.record);
    if (at !== undefined && at > Date.now()) {
      await this.#alarm(at);
      return;
    }
    this.record = undefined;
    await this.ctx.storage.delete(RECORD);
  }

  async #write(record, expiresAt) {
    this.record = record;
    await this.ctx.storage.put(RECORD, record);
    // A key's expiry is fixed at its claim: completing it leaves the claim's alarm as is.
    await this.#alarm(expiresAt);
  }

  async #alarm(at) {
    if (at === this.alarmAt) return;
    await this.ctx.storage.setAlarm(at);
    this.alarmAt = at;
  }

  #changed(ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, ms));
      this.waiters.add(done);
    });
  }

  #wake() {
    for (const done of [...this.waiters]) done();
  }
}
