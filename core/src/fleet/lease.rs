//! etcd leases in fleet mode: shared, never one per key.
//!
//! - A completed record expiring at `e` rides the [`Lease::Expiry`] lease of deadline
//!   `D = ceil(e / W) · W` ([`lease_deadline`]), granted with TTL `D − now` and never
//!   refreshed: etcd deletes the key in `[e, e + W)` (plus its whole-second rounding).
//! - An in-flight record rides a short [`InFlightLease`] (the rule's `leaseSeconds`) that
//!   the root context keeps alive ([`KeepAlives`]) while a claim on it is unsettled: the key
//!   is held as long as its Envoy lives and reaches etcd, and freed within one TTL when it
//!   dies. Keep-alives never touch expiry leases, so a key's expiry never drifts.
//!
//! ```
//! use idemgate_core::fleet::lease::{lease_deadline, InFlightLease};
//! assert_eq!(lease_deadline(61_000, 60_000), 120_000);
//! let l = InFlightLease::at(30_000, 20_000);
//! assert_eq!((l.ttl_s, l.generation, l.refresh_ms()), (30, 1, 10_000));
//! ```
use super::calls::{grant_call, Call, EtcdError};
use crate::clock::Millis;

/// The shortest lease etcd grants with the election timeout idemgate runs it with (1 s):
/// etcd raises shorter TTLs to 1.5 × the election timeout, rounded up to whole seconds.
pub const MIN_LEASE_TTL_S: u64 = 2;

/// Deadline of the lease bucket a key expiring at `expires_at` belongs to: the first
/// multiple of `bucket_ms` at or after it. `expires_at ≤ deadline < expires_at + bucket_ms`.
pub fn lease_deadline(expires_at: Millis, bucket_ms: u64) -> Millis {
    let w = bucket_ms.max(1);
    expires_at.div_ceil(w).saturating_mul(w)
}

/// TTL (whole seconds, rounded up, at least 1) to grant at `now` for a lease that must
/// live until `deadline`.
pub fn lease_ttl_seconds(deadline: Millis, now: Millis) -> u64 {
    deadline.saturating_sub(now).div_ceil(1000).max(1)
}

/// The lease an in-flight record is attached to. Short (the rule's `leaseSeconds`, at
/// least [`MIN_LEASE_TTL_S`]) and shared by the claims one Envoy begins in the same window
/// of half that TTL (so a claim attaches to a lease with at least half its TTL left); the
/// root context keeps it alive ([`KeepAlives`]) while any of those claims is unsettled on
/// this worker, and lets it lapse once none is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InFlightLease {
    /// TTL granted and restored by every keep-alive, seconds.
    pub ttl_s: u64,
    /// Index of the half-TTL window the claims using it began in.
    pub generation: u64,
}

impl InFlightLease {
    /// The in-flight lease of a claim begun at `now` under a rule with `lease_ms`.
    pub fn at(lease_ms: u64, now: Millis) -> Self {
        let ttl_s = lease_ms.div_ceil(1000).max(MIN_LEASE_TTL_S);
        Self {
            ttl_s,
            generation: now / (ttl_s * 500),
        }
    }

    /// How often a held lease is refreshed: three keep-alives per TTL.
    pub fn refresh_ms(&self) -> u64 {
        self.ttl_s * 1000 / 3
    }
}

/// A lease a claim needs: its in-flight lease and the lease of its expiry bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The lease of the expiry bucket ending at `deadline` ([`lease_deadline`]): granted
    /// with TTL `deadline − now`, never refreshed.
    Expiry {
        /// The bucket's deadline.
        deadline: Millis,
    },
    /// An in-flight lease, refreshed while its claims are unsettled.
    InFlight(InFlightLease),
}

impl Lease {
    fn tag(&self) -> String {
        match self {
            Lease::Expiry { deadline } => deadline.to_string(),
            Lease::InFlight(l) => format!("i{}.{}", l.ttl_s, l.generation),
        }
    }

    /// Shared-data key caching this lease for one Envoy (16 keys per kind and TTL, reused
    /// round-robin).
    pub fn cache_key(&self, namespace: &str, bucket_ms: u64) -> String {
        match self {
            Lease::Expiry { deadline } => {
                format!("{namespace}:fl:{}", (deadline / bucket_ms.max(1)) % 16)
            }
            Lease::InFlight(l) => format!("{namespace}:fi:{}:{}", l.ttl_s, l.generation % 16),
        }
    }

    /// Value cached under [`Lease::cache_key`].
    pub fn cache_value(&self, lease: i64) -> String {
        format!("{}:{lease}", self.tag())
    }

    /// The lease id cached, if the cached value is for this lease.
    pub fn parse_cache(&self, bytes: &[u8]) -> Option<i64> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (tag, id) = text.split_once(':')?;
        (tag == self.tag())
            .then(|| id.parse::<i64>().ok())
            .flatten()
            .filter(|id| *id > 0)
    }

    /// The grant call for this lease at `now`.
    pub fn grant_call(&self, now: Millis) -> Call {
        grant_call(match self {
            Lease::Expiry { deadline } => lease_ttl_seconds(*deadline, now),
            Lease::InFlight(l) => l.ttl_s,
        })
    }
}

/// The in-flight leases claims under a rule with `lease_ms` will need around `now`, for the
/// root context to grant ahead of them so that a claim rarely waits for a grant (and the
/// claims of a new window do not all grant at once): the current one, and the next once its
/// window is less than a fifth of a window (at most 1 s) away.
///
/// Expiry leases are not granted ahead: etcd 3.4 restarts a lease's TTL when it restores it
/// after a restart or an election (checkpoints come every 5 minutes), so a lease granted
/// before such an event could outlive its deadline; granted when a claim needs it, it
/// rarely predates one. (An in-flight lease restarted that way costs at most one short TTL.)
pub fn leases_ahead(lease_ms: u64, now: Millis) -> [Option<Lease>; 2] {
    let cur = InFlightLease::at(lease_ms, now);
    let window = cur.ttl_s * 500;
    let next_start = (cur.generation + 1).saturating_mul(window);
    let next = (next_start.saturating_sub(now) <= (window / 5).min(1000)).then_some(
        Lease::InFlight(InFlightLease {
            ttl_s: cur.ttl_s,
            generation: cur.generation + 1,
        }),
    );
    [Some(Lease::InFlight(cur)), next]
}

/// In-flight leases held by one worker's unsettled claims, and when each is due for a
/// keep-alive. The root context's tick sends what
/// [`KeepAlives::due`] returns and feeds each answer to [`KeepAlives::answered`]. A lease no
/// claim holds is forgotten (and lapses in etcd within its TTL).
#[derive(Debug, Default)]
pub struct KeepAlives {
    held: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    lease: i64,
    holders: u32,
    refresh_ms: u64,
    due: Millis,
    sent: bool,
}

/// What a keep-alive answer means for its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Refreshed; the next one is due in a third of the TTL.
    Alive,
    /// etcd no longer has the lease (it lapsed: its in-flight keys are gone); forgotten.
    Gone,
    /// No usable answer: retried soon.
    Failed,
    /// The lease is no longer held (every claim settled meanwhile).
    Unheld,
}

impl KeepAlives {
    /// An unsettled claim attached to `lease` at `now`. A lease this worker did not hold
    /// yet is refreshed at once: another worker may have granted it up to half a TTL ago.
    pub fn hold(&mut self, lease: i64, kind: InFlightLease, now: Millis) {
        if lease <= 0 {
            return;
        }
        match self.held.iter_mut().find(|h| h.lease == lease) {
            Some(h) => h.holders = h.holders.saturating_add(1),
            None => self.held.push(Held {
                lease,
                holders: 1,
                refresh_ms: kind.refresh_ms().max(1),
                due: now,
                sent: false,
            }),
        }
    }

    /// A claim attached to `lease` settled (completed, released, or ended unknown).
    pub fn release(&mut self, lease: i64) {
        if let Some(h) = self.held.iter_mut().find(|h| h.lease == lease) {
            h.holders = h.holders.saturating_sub(1);
        }
        self.held.retain(|h| h.holders > 0);
    }

    /// Leases due for a keep-alive at `now` (each marked sent until its answer).
    pub fn due(&mut self, now: Millis) -> Vec<i64> {
        let mut out = Vec::new();
        for h in &mut self.held {
            if !h.sent && h.due <= now {
                h.sent = true;
                out.push(h.lease);
            }
        }
        out
    }

    /// Feeds the answer to the keep-alive of `lease`.
    pub fn answered(
        &mut self,
        lease: i64,
        outcome: &Result<Option<u64>, EtcdError>,
        now: Millis,
    ) -> Refresh {
        let Some(h) = self.held.iter_mut().find(|h| h.lease == lease) else {
            return Refresh::Unheld;
        };
        h.sent = false;
        match outcome {
            Ok(Some(_)) => {
                h.due = now.saturating_add(h.refresh_ms);
                Refresh::Alive
            }
            Ok(None) => {
                self.held.retain(|h| h.lease != lease);
                Refresh::Gone
            }
            Err(_) => {
                h.due = now.saturating_add((h.refresh_ms / 10).clamp(10, 200));
                Refresh::Failed
            }
        }
    }

    /// Whether `lease` is held and not known to have lapsed in etcd.
    pub fn holds(&self, lease: i64) -> bool {
        self.held.iter().any(|h| h.lease == lease)
    }

    /// Number of leases held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no lease is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::messages::{LeaseGrantRequest, LEASE_SERVICE};
    use super::*;
    use prost::Message;

    fn ttl_of(call: &Call) -> i64 {
        assert_eq!((call.service, call.method), (LEASE_SERVICE, "LeaseGrant"));
        LeaseGrantRequest::decode(&call.message[..]).unwrap().ttl
    }

    #[test]
    fn lease_buckets_never_expire_early_and_never_drift_past_a_bucket() {
        let w = 30_000;
        for e in [1u64, 29_999, 30_000, 30_001, 59_999, 1_700_000_000_123] {
            let d = lease_deadline(e, w);
            assert!(d >= e && d < e + w, "{e} -> {d}");
            assert_eq!(d % w, 0);
        }
        // TTL granted now keeps the lease until the deadline (rounded up to seconds)
        assert_eq!(lease_ttl_seconds(60_000, 1_500), 59);
        assert_eq!(lease_ttl_seconds(60_000, 60_000), 1);
        assert_eq!(lease_ttl_seconds(60_000, 99_000), 1);
        assert_eq!(
            ttl_of(&Lease::Expiry { deadline: 60_000 }.grant_call(1_500)),
            59
        );
        // the per-Envoy lease cache: bounded keys, values checked against the deadline
        let e = Lease::Expiry { deadline: 60_000 };
        assert_eq!(e.cache_key("ns", w), "ns:fl:2");
        assert_eq!(
            Lease::Expiry {
                deadline: 60_000 + 16 * w
            }
            .cache_key("ns", w),
            "ns:fl:2"
        );
        let v = e.cache_value(42);
        assert_eq!(e.parse_cache(v.as_bytes()), Some(42));
        assert_eq!(
            Lease::Expiry { deadline: 90_000 }.parse_cache(v.as_bytes()),
            None
        );
        assert_eq!(e.parse_cache(b"junk"), None);
        assert_eq!(e.parse_cache(b"60000:-1"), None);
    }

    #[test]
    fn in_flight_leases_are_short_shared_per_window_and_kept_alive_only_while_held() {
        // TTL: the rule's lease, at least etcd's minimum; windows of half the TTL
        assert_eq!(
            InFlightLease::at(500, 0),
            InFlightLease {
                ttl_s: 2,
                generation: 0
            }
        );
        let l = InFlightLease::at(10_000, 12_345);
        assert_eq!((l.ttl_s, l.generation, l.refresh_ms()), (10, 2, 3_333));
        assert_eq!(InFlightLease::at(10_000, 14_999), l);
        assert_ne!(InFlightLease::at(10_000, 15_000), l);
        let li = Lease::InFlight(l);
        assert_eq!(li.cache_key("ns", 30_000), "ns:fi:10:2");
        let v = li.cache_value(42);
        assert_eq!(li.parse_cache(v.as_bytes()), Some(42));
        assert_eq!(
            Lease::InFlight(InFlightLease::at(10_000, 15_000)).parse_cache(v.as_bytes()),
            None
        );
        assert_eq!(ttl_of(&li.grant_call(99_999)), 10);
        // granted ahead by the root context: the current and (close to its window) the next
        assert_eq!(
            leases_ahead(10_000, 12_345),
            [Some(Lease::InFlight(l)), None]
        );
        assert_eq!(
            leases_ahead(10_000, 14_000)[1],
            Some(Lease::InFlight(InFlightLease::at(10_000, 15_000)))
        );
        assert_eq!(leases_ahead(10_000, 13_999)[1], None);

        // the registry: refreshed at once when first held, then every third of the TTL,
        // retried soon after a failure, forgotten when gone or no longer held
        let mut ka = KeepAlives::default();
        ka.hold(0, l, 0); // no lease: nothing to refresh
        assert!(ka.is_empty());
        ka.hold(5, l, 1_000);
        ka.hold(5, l, 1_100);
        ka.hold(6, l, 1_100);
        assert_eq!(ka.len(), 2);
        assert!(ka.holds(5) && !ka.holds(7));
        assert_eq!(ka.due(1_100), vec![5, 6]);
        assert_eq!(ka.due(1_200), Vec::<i64>::new()); // answers pending
        assert_eq!(ka.answered(5, &Ok(Some(10)), 1_200), Refresh::Alive);
        assert_eq!(
            ka.answered(6, &Err(EtcdError::Unavailable("x".into())), 1_200),
            Refresh::Failed
        );
        assert!(ka.holds(6)); // a failure tells nothing new
        assert_eq!(ka.due(1_500), vec![6]); // retried after 200 ms
        assert_eq!(ka.answered(6, &Ok(None), 1_510), Refresh::Gone);
        assert!(!ka.holds(6));
        assert_eq!(ka.len(), 1);
        assert_eq!(ka.due(4_532), Vec::<i64>::new());
        assert_eq!(ka.due(4_533), vec![5]);
        assert_eq!(ka.answered(5, &Ok(Some(10)), 4_540), Refresh::Alive);
        // one of two holders settles: still refreshed; the last one: forgotten
        ka.release(5);
        assert_eq!(ka.due(7_873), vec![5]);
        ka.release(5);
        assert!(ka.is_empty());
        assert_eq!(ka.answered(5, &Ok(Some(10)), 7_880), Refresh::Unheld);
        assert_eq!(ka.due(1_000_000), Vec::<i64>::new());
    }
}
