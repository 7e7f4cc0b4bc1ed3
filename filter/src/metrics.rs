//! Names of the metrics the filter defines (pure: no host calls).
//!
//! Every name is `idemgate.<namespace>.<metric>`; Envoy shows them under the `wasmcustom`
//! prefix (`wasmcustom.idemgate.<namespace>.<metric>` in `/stats`).

/// Counters, in definition order.
pub const COUNTERS: &[&str] = &[
    "requests",
    "passed",
    "forwarded",
    "replayed",
    "conflicts",
    "mismatches",
    "duplicates",
    "waited",
    "wait_timeouts",
    "invalid_bodies",
    "invalid_expiries",
    "missing_keys",
    "bad_keys",
    "too_large",
    "store_unavailable",
    "store_errors",
    "stored",
    "not_stored_status",
    "not_stored_too_large",
    "not_stored_incomplete",
    "lost_claims",
    "evictions",
    "lease_expiries",
    "cas_retries",
    "misconfigured",
    "rate_limited",
    "rate_evictions",
    "fleet_claims",
    "fleet_cache_hits",
    "fleet_leases",
    "fleet_errors",
    "fleet_fail_open",
    "fleet_fail_closed",
    "fleet_keepalives",
    "fleet_leases_lost",
];

/// Gauges, in definition order.
pub const GAUGES: &[&str] = &["store_index_keys", "store_body_keys", "rate_keys"];

/// The full metric name for `metric` in `namespace`.
pub fn name(namespace: &str, metric: &str) -> String {
    format!("idemgate.{namespace}.{metric}")
}
