// idemgate as a Cloudflare Worker (ES module; also plain workerd): gate.js with the core's
// --target module build (core.js) and a Durable Object per key as its store (store.js).
//
// Bindings:
//   IDEMGATE_CONFIG     the configuration (same JSON as the Envoy filter's); absent = defaults
//   IDEMGATE_STORE      Durable Object namespace of class IdempotencyStore
//   ORIGIN              service binding to the origin, or
//   ORIGIN_URL          the origin's base URL (used when ORIGIN is not bound)
//   IDEMGATE_OUTCOME_LOGS  "off" (or "false", "0", "no") silences the per-request JSON log
//                       line (README, edge worker: logs); on otherwise
//   IDEMGATE_ANALYTICS  optional Workers Analytics Engine dataset: one data point per Envoy
//                       counter a request increments (outcomes.js)
import { core, engineFor } from "./core.js";
import { gate, originUrl } from "./gate.js";
import { enabled } from "./outcomes.js";
import { durableObjectStore } from "./store.js";

export { IdempotencyStore } from "./store.js";

const handle = gate(core);

// Per isolate: the host is rebuilt only when the bindings object changes.
let last = { env: undefined, host: undefined };

function hostFor(env) {
  if (last.env === env) return last.host;
  const { origin, error } = originOf(env);
  const store = env.IDEMGATE_STORE ? durableObjectStore(env.IDEMGATE_STORE) : null;
  const host = {
    engine: () => engineFor(env.IDEMGATE_CONFIG),
    store,
    origin,
    misconfigured: error ?? (store ? null : "no store: bind a Durable Object namespace of class IdempotencyStore as IDEMGATE_STORE"),
    logs: enabled(env.IDEMGATE_OUTCOME_LOGS),
    analytics: env.IDEMGATE_ANALYTICS,
  };
  last = { env, host };
  return host;
}

function originOf(env) {
  if (env.ORIGIN && typeof env.ORIGIN.fetch === "function") return { origin: { service: env.ORIGIN } };
  if (env.ORIGIN_URL) return originUrl(env.ORIGIN_URL);
  return { error: "no origin: bind a service as ORIGIN or set ORIGIN_URL" };
}

export default {
  fetch(request, env) {
    return handle(request, hostFor(env));
  },
};
