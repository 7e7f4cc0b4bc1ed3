// The Cloudflare store: one Durable Object per scoped key (named idFromName(keyIdHex)) and
// one per caller's rate-limit bucket, behind the store port that gate.js calls (kv.js is the
// other implementation). The decisions are claims.js's, run on the object's slot.
//
// The object holds at most one record, the core's encoded Record (in flight or completed),
// in memory and in its storage under "record". A Durable Object handles its events one at a
// time and the slot is set in memory before the first await, so claims are serialised by the
// object itself; the storage writes (value and alarm, one batch) are covered by the output
// gate: no answer leaves before they are durable. A storage alarm at the record's expiry
// deletes it. Requests that the `wait` policy holds are parked here and decided again the
// moment the record completes or is released, or when their deadline or the lease ends.
import { DurableObject } from "cloudflare:workers";
import { claims } from "./claims.js";
import { core, engineFor } from "./core.js";

const RECORD = "record";
const TAT = "tat";
const rules = claims(core);

/** The store port over a Durable Object namespace bound as IDEMGATE_STORE. */
export function durableObjectStore(namespace) {
  const object = (name) => namespace.get(namespace.idFromName(name));
  return {
    record(keyId) {
      const stub = object(keyId);
      return {
        begin: (request) => stub.begin(request),
        complete: (completed) => stub.complete(completed),
        release: (owner) => stub.release(owner),
      };
    },
    bucket(name) {
      const stub = object(name);
      return { charge: (request) => stub.charge(request) };
    },
  };
}

/** One stored value of the object (the record, or the bucket's state) and its alarm. */
class Slot {
  constructor(object, name) {
    this.object = object;
    this.name = name;
    this.value = undefined;
    this.version = 0;
    this.waiters = new Set();
  }

  read() {
    return { value: this.value, version: this.version };
  }

  write(version, value, expiresAt) {
    if (version !== this.version) return false;
    this.value = value;
    this.version++;
    this.#wake();
    const { storage } = this.object.ctx;
    // No await in between: one atomic batch (value + alarm), one flush.
    const put = storage.put(this.name, value);
    const alarm = this.object.alarmAt(expiresAt);
    return Promise.all([put, alarm]).then(() => true);
  }

  remove(version) {
    if (version !== this.version) return false;
    this.value = undefined;
    this.version++;
    this.#wake();
    return this.object.ctx.storage.delete(this.name).then(() => true);
  }

  changed(version, ms) {
    if (version !== this.version) return Promise.resolve();
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

export class IdempotencyStore extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.record = new Slot(this, RECORD);
    this.tat = new Slot(this, TAT);
    // The alarm this object set last (undefined: none, or not known since it started).
    this.alarm_ = undefined;
    ctx.blockConcurrencyWhile(async () => {
      const stored = await ctx.storage.get([RECORD, TAT]);
      const record = stored.get(RECORD);
      this.record.value = record ? new Uint8Array(record) : undefined;
      this.tat.value = stored.get(TAT);
    });
  }

  #engine() {
    const { engine, error } = engineFor(this.env.IDEMGATE_CONFIG);
    if (!engine) throw new Error(error);
    return engine;
  }

  /** claims.begin on this key's record. */
  begin(request) {
    return rules.begin(this.#engine(), this.record, request);
  }

  /** claims.complete: stores the completed record of the claim that still holds the key. */
  complete(completed) {
    return rules.complete(this.record, new Uint8Array(completed));
  }

  /** claims.release: frees the key held by claim `owner`. */
  async release(owner) {
    if (!(await rules.release(this.record, owner))) return false;
    this.alarm_ = undefined;
    await this.ctx.storage.deleteAlarm();
    return true;
  }

  /** claims.charge on this caller's bucket (an object named by Exchange.limitKey). */
  charge(request) {
    return rules.charge(this.#engine(), this.tat, request);
  }

  /** Expiry: the record is deleted once its key expires (a full bucket's state too). */
  async alarm() {
    this.alarm_ = undefined; // it fired: none is set now
    const tat = this.tat.value;
    if (tat !== undefined && Number(tat / 1_000_000n) < Date.now()) await this.tat.remove(this.tat.version);
    const record = this.record.value;
    if (!record) return;
    const at = core.expiresAt(record);
    if (at !== undefined && at > Date.now()) {
      await this.alarmAt(at);
      return;
    }
    await this.record.remove(this.record.version);
  }

  /** Sets the storage alarm at `at` unless it is set there already. A key's expiry is fixed
   * at its claim, so completing it leaves the claim's alarm as it is. */
  alarmAt(at) {
    if (at === this.alarm_) return undefined;
    this.alarm_ = at;
    return this.ctx.storage.setAlarm(at);
  }
}
