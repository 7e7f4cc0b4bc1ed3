// What became of each request, for people and for metrics (README, edge worker: logs and
// metrics): one JSON log line per request, and optionally one Workers Analytics Engine data
// point per counter. Both name the Envoy counters the same request increments there
// (filter/src/metrics.rs): summing them over a namespace gives what /stats/prometheus shows
// for an Envoy that saw the same traffic. Never the raw key or credentials: the key appears
// as a prefix of its scoped SHA-256 id.

const OFF = new Set(["off", "false", "0", "no"]);

/** Whether a setting such as IDEMGATE_OUTCOME_LOGS is on (absent: on). */
export function enabled(setting) {
  return !OFF.has(String(setting ?? "").trim().toLowerCase());
}

/** A report for one request. `analytics`: an Analytics Engine dataset, or undefined. */
export function newReport(method, logs, analytics) {
  return {
    logs,
    analytics,
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

// The namespace and rule names of each configuration, read from the core once.
const names = new WeakMap();

/** What the core knows of the request, read before the exchange is freed (`engine`: the
 * configuration it runs under). */
export function note(report, ex, engine) {
  let known = names.get(engine);
  if (!known) names.set(engine, (known = { namespace: ex.namespace, routes: new Map() }));
  report.namespace = known.namespace;
  report.covered = ex.covered;
  if (report.covered) {
    const rule = ex.rule;
    let route = known.routes.get(rule);
    if (route === undefined) known.routes.set(rule, (route = ex.ruleName));
    report.route = route;
  }
  report.outcome = ex.outcome ?? null;
  const keyId = ex.keyId;
  report.keyId = keyId ? keyId.slice(0, 12) : null;
  const id = ex.requestId;
  report.correlationId = id === undefined ? null : id.slice(0, 128);
}

/** The Envoy counters this request increments. */
export function counters(r) {
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

/** The request is over (or its stored response is): its log line and data points, once. */
export function emit(r) {
  if (r.done) return;
  r.done = true;
  if (!r.logs && !r.analytics) return;
  const names = counters(r);
  if (r.analytics) write(r, names);
  if (!r.logs) return;
  console.log(
    JSON.stringify({
      idemgate: "outcome",
      namespace: r.namespace,
      route: r.route,
      method: r.method,
      status: r.status,
      outcome: r.outcome ?? "uncovered",
      counters: names,
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

/** One Analytics Engine data point per counter: index1 the namespace, blob1 the counter's
 * name, blob2 the route, blob3 the method, blob4 the outcome, double1 1, double2 the status.
 * `SELECT blob1, SUM(_sample_interval * double1) … WHERE index1 = '<namespace>' GROUP BY blob1`
 * gives the counters. A failing binding never fails the request. */
function write(r, names) {
  const namespace = r.namespace ?? "";
  const blobs = [r.route ?? "", r.method, r.outcome ?? "uncovered"];
  try {
    for (const name of names) {
      r.analytics.writeDataPoint({ indexes: [namespace], blobs: [name, ...blobs], doubles: [1, r.status] });
    }
  } catch (e) {
    console.error(`idemgate: analytics engine write failed: ${e}`);
  }
}
