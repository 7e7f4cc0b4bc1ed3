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
    "fleet_retries",
    "fleet_abandoned",
    "fleet_unsettled",
];

/// Gauges, in definition order.
pub const GAUGES: &[&str] = &["store_index_keys", "store_body_keys", "rate_keys"];

/// The full metric name for `metric` in `namespace`.
pub fn name(namespace: &str, metric: &str) -> String {
    format!("idemgate.{namespace}.{metric}")
}

#[cfg(test)]
mod tests {
    use super::COUNTERS;
    use idemgate_core::key::KeyError;
    use idemgate_core::{NotStored, Rejection};

    /// The core names the counter of every refusal and of every reason not to store (the
    /// edge worker logs the same names); each must be a counter defined here.
    #[test]
    fn core_counter_names_are_defined() {
        let rejections = [
            Rejection::MissingKey {
                sources: "h".into(),
            },
            Rejection::MalformedKey {
                source: "h".into(),
                reason: KeyError::Empty,
            },
            Rejection::InvalidBody { detail: "d".into() },
            Rejection::InvalidExpiry {
                header: "h".into(),
                detail: "d".into(),
            },
            Rejection::BodyTooLarge { limit: 1 },
            Rejection::Conflict { retry_after_s: 1 },
            Rejection::Mismatch,
            Rejection::Duplicate,
            Rejection::StoreUnavailable {
                retry_after_s: 1,
                reason: "r",
            },
            Rejection::Misconfigured { detail: "d".into() },
            Rejection::RateLimited { retry_after_s: 1 },
        ];
        let mut names: Vec<&str> = rejections.iter().map(Rejection::counter).collect();
        names.extend([NotStored::Status(500), NotStored::TooLarge].map(|n| n.counter()));
        for name in &names {
            assert!(COUNTERS.contains(name), "{name} is not a defined counter");
        }
        let mut distinct = names.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
    }
}
