//! Rate limiting per caller: GCRA math, limit keys, and a bounded shared-state table.
//!
//! # Design note: consistency
//!
//! *Envoy.* Every worker thread has its own VM; they share Envoy's shared data, a
//! compare-and-swap store ([`CasStore`]). [`RateTable::acquire`] reads a bucket's state,
//! computes the answer with [`check`] and writes the new state only if the version it read is
//! still current, retrying up to [`MAX_ATTEMPTS`] times. Every admission is therefore a
//! linearizable read-modify-write of one value: across all workers of one Envoy process the
//! count admitted is exact (never more than `burst + rate × elapsed`), however the requests
//! interleave, as long as the loop wins. When it cannot win (eight other writers got in
//! first) it answers [`Outcome::Contended`] and the host applies an explicit
//! [`ContentionPolicy`]: fail closed keeps the bound, fail open may let that one request
//! through. A refusal needs no write and is never contended. Two more, documented, ways to
//! exceed the bound: a live bucket evicted because the table is full (its caller starts over
//! with a full bucket; [`RateEvents::evictions`] counts them, size `capacity` above the number
//! of callers active within one `burst` refill time), and two workers creating the bucket of
//! the same new caller at the same moment in two different slots (at most one extra admission
//! per racing worker; later requests all find the first slot of the probe window).
//! The state lives in one process's shared data: limits are per Envoy process, not per
//! fleet. N Envoy replicas admit up to N times the quota; a fleet-wide limit needs a global
//! service (Envoy's `ratelimit`) or sticky routing of callers to replicas.
//!
//! *Edge.* The edge host would route each limit key to one Durable Object (named by
//! [`LimitKey::to_hex`]). A Durable Object handles its requests one at a time, so it keeps the
//! TAT in memory (or in its storage), calls the same [`check`] and stores `new_tat` on
//! [`Outcome::Allowed`]: no CAS, no contention, no table, and the limit is exact for the whole
//! fleet, at the price of a round trip to the object's location.
//!
//! # GCRA semantics
//!
//! A [`Quota`] admits `rate` requests per `period_ms`, with bursts of up to `burst`. Its
//! emission interval is `T = period_ms / rate` (kept in nanoseconds, rounded up, so 3 per
//! second does not drift; rounding up can only admit less). The state of a bucket is its
//! theoretical arrival time [`Tat`]: the moment at which the bucket will be full again. No
//! state, or a TAT in the past, means a full bucket. A request of cost `n` at `now`:
//!
//! - `new_tat = max(tat, now) + n × T`;
//! - it is **allowed** when `new_tat − now ≤ burst × T`: store `new_tat`;
//! - otherwise it is **limited** and the state does not change.
//!
//! The fields of an [`Outcome`]:
//!
//! - `remaining`: how many more requests of cost 1 would be admitted right now, after this
//!   one (`⌊(burst × T − (TAT − now)) / T⌋`, with the TAT after this request when allowed,
//!   the unchanged TAT when limited). Never more than `burst`; 0 on a cost-1 refusal.
//! - `reset_after_ms`: time until the bucket is full again (`TAT − now`, rounded up to a
//!   millisecond); 0 when it is full.
//! - `retry_after_ms` (limited only, always ≥ 1): the earliest wait after which the same
//!   request is admitted, if nothing else spends the bucket meanwhile
//!   (`max(tat, now) + n × T − burst × T − now`, rounded up). A cost above `burst` can never
//!   be admitted: its `retry_after_ms` is [`Millis::MAX`].
//!
//! A cost of 0 spends nothing: it reports the bucket as it is (for the headers of a replayed
//! response, which does not spend quota).
//!
//! # HTTP headers
//!
//! [`Outcome::headers`] gives the values; [`RateHeaders::pairs`] the lower-case header lines:
//!
//! | header | value |
//! |---|---|
//! | `x-ratelimit-limit` | `burst` |
//! | `x-ratelimit-remaining` | `remaining` |
//! | `x-ratelimit-reset` | [`ResetFormat::Seconds`]: `⌈reset_after_ms / 1000⌉`; [`ResetFormat::Epoch`]: `⌈(now + reset_after_ms) / 1000⌉`, Unix seconds |
//! | `retry-after` | limited only: `⌈retry_after_ms / 1000⌉`, at least 1 |
//!
//! ```
//! use idemgate_core::ratelimit::{check, limit_key, Outcome, Quota, RateTable, ResetFormat};
//! use idemgate_core::store::MemoryStore;
//!
//! // 10 requests per second, bursts of 3.
//! let quota = Quota::new(10, 1_000, 3).unwrap();
//! let now = 1_700_000_000_000; // ms since the epoch
//!
//! // The pure function: state in, outcome out.
//! let first = check(&quota, None, now, 1);
//! let Outcome::Allowed { new_tat, remaining, reset_after_ms } = first else { unreachable!() };
//! assert_eq!((remaining, reset_after_ms), (2, 100));
//! let second = check(&quota, Some(new_tat), now, 1);
//! assert_eq!(second.remaining(), 1);
//!
//! // Over a shared CAS store (Envoy's shared data in the filter).
//! let store = MemoryStore::default();
//! let table = RateTable::new(&store, "idemgate", 1_000, 8);
//! let caller = limit_key(b"Bearer abc", Some("/orders"));
//! for _ in 0..3 {
//!     assert!(table.acquire(&caller, &quota, now, 1).unwrap().0.is_allowed());
//! }
//! let (limited, _events) = table.acquire(&caller, &quota, now, 1).unwrap();
//! assert_eq!(limited, Outcome::Limited { retry_after_ms: 100, remaining: 0, reset_after_ms: 300 });
//! assert_eq!(limited.retry_after_seconds(), Some(1));
//! let headers = limited.headers(&quota, now, ResetFormat::Seconds);
//! assert_eq!(
//!     headers.pairs(),
//!     vec![
//!         ("x-ratelimit-limit", "3".to_string()),
//!         ("x-ratelimit-remaining", "0".to_string()),
//!         ("x-ratelimit-reset", "1".to_string()),
//!         ("retry-after", "1".to_string()),
//!     ]
//! );
//! assert_eq!(limited.headers(&quota, now, ResetFormat::Epoch).reset, 1_700_000_001);
//! // 100 ms later one more fits.
//! assert!(table.acquire(&caller, &quota, now + 100, 1).unwrap().0.is_allowed());
//! ```
use std::fmt;

use crate::sha256::Sha256;

use crate::clock::Millis;
use crate::codec::{CodecError, Reader, Writer};
use crate::key::put;
use crate::store::{Cas, CasStore, Expect, StoreError};

const NS_PER_MS: u128 = 1_000_000;

/// Longest accepted `period_ms`: 365 days.
pub const MAX_PERIOD_MS: u64 = 365 * 24 * 3_600 * 1_000;

/// CAS attempts [`RateTable::acquire`] makes before answering [`Outcome::Contended`].
pub const MAX_ATTEMPTS: u32 = 8;

/// `retry_after_ms` of a contended request refused by [`ContentionPolicy::FailClosed`].
pub const CONTENDED_RETRY_AFTER_MS: Millis = 1_000;

/// `x-ratelimit-limit`.
pub const HEADER_LIMIT: &str = "x-ratelimit-limit";
/// `x-ratelimit-remaining`.
pub const HEADER_REMAINING: &str = "x-ratelimit-remaining";
/// `x-ratelimit-reset`.
pub const HEADER_RESET: &str = "x-ratelimit-reset";
/// `retry-after`.
pub const HEADER_RETRY_AFTER: &str = "retry-after";

// ----------------------------------------------------------------------------------- quota

/// Why a [`Quota`] was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaError {
    /// `rate` was 0.
    ZeroRate,
    /// `period_ms` was 0 or above [`MAX_PERIOD_MS`].
    Period(u64),
    /// `burst` was 0.
    ZeroBurst,
}

impl fmt::Display for QuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuotaError::ZeroRate => write!(f, "rate must be at least 1, got 0"),
            QuotaError::Period(p) => {
                write!(f, "period must be 1..={MAX_PERIOD_MS} ms, got {p}")
            }
            QuotaError::ZeroBurst => write!(f, "burst must be at least 1, got 0"),
        }
    }
}

impl std::error::Error for QuotaError {}

/// `rate` requests per `period_ms`, in bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    rate: u32,
    period_ms: u64,
    burst: u32,
    interval_ns: u64,
}

impl Quota {
    /// A quota; `rate ≥ 1`, `1 ≤ period_ms ≤ MAX_PERIOD_MS`, `burst ≥ 1`.
    pub fn new(rate: u32, period_ms: u64, burst: u32) -> Result<Self, QuotaError> {
        if rate == 0 {
            return Err(QuotaError::ZeroRate);
        }
        if period_ms == 0 || period_ms > MAX_PERIOD_MS {
            return Err(QuotaError::Period(period_ms));
        }
        if burst == 0 {
            return Err(QuotaError::ZeroBurst);
        }
        let interval = (u128::from(period_ms) * NS_PER_MS).div_ceil(u128::from(rate));
        Ok(Self {
            rate,
            period_ms,
            burst,
            interval_ns: u64::try_from(interval).unwrap_or(u64::MAX).max(1),
        })
    }

    /// Requests per period.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// The period, in milliseconds.
    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    /// Largest burst; the value of `x-ratelimit-limit`.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The emission interval `T = period / rate`, in nanoseconds, rounded up.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }
}

// ------------------------------------------------------------------------------------ GCRA

/// Theoretical arrival time: nanoseconds since the Unix epoch at which the bucket is full
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tat(pub u64);

impl Tat {
    /// The TAT standing at `ms` milliseconds since the epoch.
    pub fn from_millis(ms: Millis) -> Self {
        Tat(sat_u64(u128::from(ms) * NS_PER_MS))
    }
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admit the request.
    Allowed {
        /// The bucket's state after this request: store it. (From a fail-open
        /// [`ContentionPolicy::resolve`], the state it would have had; nothing was stored.)
        new_tat: Tat,
        /// More requests of cost 1 admitted right now.
        remaining: u32,
        /// Until the bucket is full again.
        reset_after_ms: Millis,
    },
    /// Refuse the request (429); the bucket is unchanged.
    Limited {
        /// Earliest wait after which this request would be admitted; ≥ 1.
        retry_after_ms: Millis,
        /// More requests of cost 1 admitted right now (0 for a cost-1 refusal).
        remaining: u32,
        /// Until the bucket is full again.
        reset_after_ms: Millis,
    },
    /// Only from [`RateTable::acquire`]: the request would be allowed (these are the values
    /// it would have had) but the CAS loop lost [`MAX_ATTEMPTS`] times, so nothing was
    /// stored. Map it with [`ContentionPolicy::resolve`].
    Contended {
        /// The state the request would have stored.
        new_tat: Tat,
        /// As for `Allowed`.
        remaining: u32,
        /// As for `Allowed`.
        reset_after_ms: Millis,
    },
}

/// Decides one request of `cost` against a bucket in state `tat` (`None`: no state, a full
/// bucket) at `now`. Pure: the caller stores `new_tat` when [`Outcome::Allowed`]; it never
/// answers [`Outcome::Contended`].
pub fn check(quota: &Quota, tat: Option<Tat>, now: Millis, cost: u32) -> Outcome {
    let t = u128::from(quota.interval_ns);
    let tau = t.saturating_mul(u128::from(quota.burst));
    let now_ns = u128::from(now).saturating_mul(NS_PER_MS);
    let tat0 = tat.map_or(now_ns, |x| u128::from(x.0).max(now_ns));
    let debt = tat0.saturating_sub(now_ns);
    let new_tat = tat0.saturating_add(t.saturating_mul(u128::from(cost)));
    let debt_after = new_tat.saturating_sub(now_ns);
    if debt_after <= tau {
        Outcome::Allowed {
            new_tat: Tat(sat_u64(new_tat)),
            remaining: remaining_of(tau, debt_after, t),
            reset_after_ms: ceil_ms(debt_after),
        }
    } else {
        let retry_after_ms = if cost > quota.burst {
            Millis::MAX
        } else {
            ceil_ms(debt_after.saturating_sub(tau)).max(1)
        };
        Outcome::Limited {
            retry_after_ms,
            remaining: remaining_of(tau, debt, t),
            reset_after_ms: ceil_ms(debt),
        }
    }
}

fn remaining_of(tau: u128, debt: u128, t: u128) -> u32 {
    u32::try_from(tau.saturating_sub(debt) / t.max(1)).unwrap_or(u32::MAX)
}

fn ceil_ms(ns: u128) -> Millis {
    sat_u64(ns.div_ceil(NS_PER_MS))
}

fn sat_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// How `x-ratelimit-reset` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResetFormat {
    /// Seconds from now until the bucket is full, rounded up (`"seconds"`).
    #[default]
    Seconds,
    /// Unix time in seconds at which the bucket is full, rounded up (`"epoch"`).
    Epoch,
}

impl ResetFormat {
    /// Parses the configuration spelling: `seconds` or `epoch`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "seconds" => Some(ResetFormat::Seconds),
            "epoch" => Some(ResetFormat::Epoch),
            _ => None,
        }
    }

    /// The configuration spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ResetFormat::Seconds => "seconds",
            ResetFormat::Epoch => "epoch",
        }
    }
}

/// The rate-limit header values of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    /// `x-ratelimit-limit`: the burst.
    pub limit: u32,
    /// `x-ratelimit-remaining`.
    pub remaining: u32,
    /// `x-ratelimit-reset`, in the requested [`ResetFormat`].
    pub reset: u64,
    /// `retry-after` in whole seconds, on a refusal only.
    pub retry_after: Option<u64>,
}

impl RateHeaders {
    /// Header lines, lower-case names, in a fixed order (`retry-after` last, when present).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (HEADER_LIMIT, self.limit.to_string()),
            (HEADER_REMAINING, self.remaining.to_string()),
            (HEADER_RESET, self.reset.to_string()),
        ];
        if let Some(s) = self.retry_after {
            out.push((HEADER_RETRY_AFTER, s.to_string()));
        }
        out
    }
}

impl Outcome {
    /// Whether the request is admitted ([`Outcome::Contended`] is not: resolve it first).
    pub fn is_allowed(&self) -> bool {
        matches!(self, Outcome::Allowed { .. })
    }

    /// Whether the request is refused.
    pub fn is_limited(&self) -> bool {
        matches!(self, Outcome::Limited { .. })
    }

    /// More requests of cost 1 admitted right now.
    pub fn remaining(&self) -> u32 {
        match self {
            Outcome::Allowed { remaining, .. }
            | Outcome::Limited { remaining, .. }
            | Outcome::Contended { remaining, .. } => *remaining,
        }
    }

    /// Time until the bucket is full again.
    pub fn reset_after_ms(&self) -> Millis {
        match self {
            Outcome::Allowed { reset_after_ms, .. }
            | Outcome::Limited { reset_after_ms, .. }
            | Outcome::Contended { reset_after_ms, .. } => *reset_after_ms,
        }
    }

    /// `Retry-After` in whole seconds, rounded up and at least 1, when limited; `None`
    /// otherwise.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        match self {
            Outcome::Limited { retry_after_ms, .. } => Some(retry_after_ms.div_ceil(1_000).max(1)),
            _ => None,
        }
    }

    /// `x-ratelimit-reset` for an answer given at `now` (ms since the epoch).
    pub fn reset_value(&self, now: Millis, format: ResetFormat) -> u64 {
        let after = self.reset_after_ms();
        match format {
            ResetFormat::Seconds => after.div_ceil(1_000),
            ResetFormat::Epoch => now.saturating_add(after).div_ceil(1_000),
        }
    }

    /// The header values for this answer, given at `now`.
    pub fn headers(&self, quota: &Quota, now: Millis, format: ResetFormat) -> RateHeaders {
        RateHeaders {
            limit: quota.burst,
            remaining: self.remaining(),
            reset: self.reset_value(now, format),
            retry_after: self.retry_after_seconds(),
        }
    }
}

/// What to answer when [`RateTable::acquire`] could not win its CAS loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentionPolicy {
    /// Admit the request (`"failOpen"`): availability first; the request is not counted.
    FailOpen,
    /// Refuse it with `Retry-After` of [`CONTENDED_RETRY_AFTER_MS`] (`"failClosed"`): the
    /// bound `burst + rate × elapsed` holds. The default.
    #[default]
    FailClosed,
}

impl ContentionPolicy {
    /// Parses the configuration spelling: `failOpen` or `failClosed`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "failOpen" => Some(ContentionPolicy::FailOpen),
            "failClosed" => Some(ContentionPolicy::FailClosed),
            _ => None,
        }
    }

    /// The configuration spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ContentionPolicy::FailOpen => "failOpen",
            ContentionPolicy::FailClosed => "failClosed",
        }
    }

    /// Maps [`Outcome::Contended`] to `Allowed` or `Limited`; other outcomes pass unchanged.
    pub fn resolve(self, outcome: Outcome) -> Outcome {
        match (self, outcome) {
            (
                ContentionPolicy::FailOpen,
                Outcome::Contended {
                    new_tat,
                    remaining,
                    reset_after_ms,
                },
            ) => Outcome::Allowed {
                new_tat,
                remaining,
                reset_after_ms,
            },
            (ContentionPolicy::FailClosed, Outcome::Contended { reset_after_ms, .. }) => {
                Outcome::Limited {
                    retry_after_ms: CONTENDED_RETRY_AFTER_MS,
                    remaining: 0,
                    reset_after_ms,
                }
            }
            (_, other) => other,
        }
    }
}

// ------------------------------------------------------------------------------ limit keys

/// The identity of a bucket: 16 bytes of SHA-256 over the caller and, optionally, the route.
/// Caller values (API keys, credentials) never appear in clear, in the store or in logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LimitKey(pub [u8; 16]);

impl fmt::Debug for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LimitKey({})", self.to_hex())
    }
}

impl LimitKey {
    /// Scopes a bucket by the caller's values (header values, in order; an absent header is
    /// an empty value) and, when `route` is given, by the route. Every part is
    /// length-prefixed and the route's presence is marked, so no two different scopes hash
    /// the same input (`None` and `Some("")` differ).
    pub fn new(callers: &[&[u8]], route: Option<&str>) -> Self {
        let mut h = Sha256::new();
        h.update(b"idemgate/ratelimit/v1\0");
        h.update((callers.len() as u64).to_be_bytes());
        for c in callers {
            put(&mut h, c);
        }
        match route {
            None => h.update([0u8]),
            Some(r) => {
                h.update([1u8]);
                put(&mut h, r.as_bytes());
            }
        }
        LimitKey(crate::prefix(&h.finalize()))
    }

    /// The bucket of a request's caller under `rule`'s rate limit: its caller headers'
    /// values (repeated headers joined with `,`) and, with `perRoute`, the rule's name. The
    /// default key when the rule has no limit.
    pub fn for_request(rule: &crate::config::Rule, headers: &[(String, Vec<u8>)]) -> Self {
        use crate::headers::HeaderLookup;
        let Some(spec) = &rule.rate_limit else {
            return LimitKey::default();
        };
        let values: Vec<Vec<u8>> = spec
            .caller_headers
            .iter()
            .map(|h| headers.get_all(h).join(&b","[..]))
            .collect();
        let callers: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        LimitKey::new(&callers, spec.per_route.then_some(rule.name.as_str()))
    }

    /// Lower-case hex, safe to log (and a Durable Object name on the edge).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A 64-bit number derived from the key, used to pick a slot.
    pub fn slot_seed(&self) -> u64 {
        crate::seed(&self.0)
    }
}

/// The bucket of one caller value, optionally per route: [`LimitKey::new`]`(&[caller], route)`.
pub fn limit_key(caller: &[u8], route: Option<&str>) -> LimitKey {
    LimitKey::new(&[caller], route)
}

// ------------------------------------------------------------------------------ slot codec

const MAGIC: &[u8; 2] = b"IG";
/// Version of the rate slot encoding written by this build.
pub const SLOT_VERSION: u8 = 1;
/// Tag of a rate slot (distinct from the idempotency record tags).
const TAG_RATE: u8 = 0x10;
/// Encoded size of a [`RateSlot`].
pub const SLOT_LEN: usize = 2 + 1 + 1 + 16 + 8;

/// What one rate slot holds: whose bucket and its TAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSlot {
    /// The bucket's key.
    pub key: LimitKey,
    /// Its theoretical arrival time.
    pub tat: Tat,
}

impl RateSlot {
    /// `IG`, version, tag, 16 key bytes, TAT as a big-endian u64: 28 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(SLOT_LEN);
        w.raw(MAGIC);
        w.u8(SLOT_VERSION);
        w.u8(TAG_RATE);
        w.raw(&self.key.0);
        w.u64(self.tat.0);
        w.finish()
    }

    /// Decodes a slot; truncated, trailing, foreign or unknown-version bytes are refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let magic = r.fixed::<2>()?;
        if &magic != MAGIC || r.u8()? != SLOT_VERSION {
            return Err(CodecError::BadHeader);
        }
        if r.u8()? != TAG_RATE {
            return Err(CodecError::BadValue("rate slot tag"));
        }
        let key = LimitKey(r.fixed::<16>()?);
        let tat = Tat(r.u64()?);
        r.end()?;
        Ok(RateSlot { key, tat })
    }
}

// ------------------------------------------------------------------------------ the table

/// What happened inside the table, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RateEvents {
    /// Slot keys created in the host store (a gauge's increments; ≤ capacity in all).
    pub keys_created: u32,
    /// Live buckets of other callers evicted to make room (their callers start over full).
    pub evictions: u32,
    /// Undecodable slots overwritten.
    pub corrupt_overwritten: u32,
    /// Compare-and-swap conflicts retried.
    pub cas_retries: u32,
}

enum Content {
    Absent,
    Corrupt,
    Held(RateSlot),
}

struct Slot {
    idx: u32,
    cas: Option<Cas>,
    content: Content,
}

impl Slot {
    fn expect(&self) -> Expect {
        self.cas.map_or(Expect::Absent, Expect::Version)
    }

    /// The TAT if this slot holds `key`'s live bucket (TAT after `now`).
    fn live_for(&self, key: &LimitKey, now: Tat) -> Option<Tat> {
        match &self.content {
            Content::Held(s) if s.key == *key && s.tat > now => Some(s.tat),
            _ => None,
        }
    }
}

/// Buckets of many callers over a [`CasStore`], in at most `capacity` slots
/// (`"{namespace}:r:{idx}"`), whatever the caller churn.
///
/// A key probes `probes` consecutive slots from one derived from its hash. Its bucket is the
/// first slot of that window holding it with a TAT still ahead. A new bucket takes the first
/// slot of the window that is absent, undecodable, or holds a bucket that is full again
/// (TAT not after `now`: no state needed); when every slot holds a live bucket, the one with
/// the smallest TAT (the fullest, nearest to needing no state) is evicted.
pub struct RateTable<'a, S: CasStore + ?Sized> {
    store: &'a S,
    namespace: &'a str,
    capacity: u32,
    probes: u32,
}

impl<'a, S: CasStore + ?Sized> RateTable<'a, S> {
    /// A table over `store`; `capacity` is raised to 1, `probes` clamped to `1..=capacity`.
    pub fn new(store: &'a S, namespace: &'a str, capacity: u32, probes: u32) -> Self {
        let capacity = capacity.max(1);
        Self {
            store,
            namespace,
            capacity,
            probes: probes.clamp(1, capacity),
        }
    }

    /// Host-store key of slot `idx`.
    pub fn slot_key(&self, idx: u32) -> String {
        format!("{}:r:{idx}", self.namespace)
    }

    fn window(&self, key: &LimitKey) -> impl Iterator<Item = u32> {
        let cap = u64::from(self.capacity);
        let home = key.slot_seed() % cap;
        (0..u64::from(self.probes)).map(move |i| u32::try_from((home + i) % cap).unwrap_or(0))
    }

    fn read(&self, idx: u32) -> Result<Slot, StoreError> {
        Ok(match self.store.get(&self.slot_key(idx))? {
            None => Slot {
                idx,
                cas: None,
                content: Content::Absent,
            },
            Some((bytes, cas)) => Slot {
                idx,
                cas: Some(cas),
                content: RateSlot::decode(&bytes).map_or(Content::Corrupt, Content::Held),
            },
        })
    }

    /// Spends `cost` from `key`'s bucket at `now`, atomically across every user of the
    /// store. Allowed: the new state is stored. Limited: nothing is written. Contended: the
    /// request would be allowed but [`MAX_ATTEMPTS`] CAS attempts lost; apply a
    /// [`ContentionPolicy`]. A `cost` of 0 only reads (headers for a replay).
    pub fn acquire(
        &self,
        key: &LimitKey,
        quota: &Quota,
        now: Millis,
        cost: u32,
    ) -> Result<(Outcome, RateEvents), StoreError> {
        let mut ev = RateEvents::default();
        let now_tat = Tat::from_millis(now);
        let mut last = (now_tat, 0, 0);
        for _ in 0..MAX_ATTEMPTS {
            // Read the window up to the key's live bucket.
            let mut scan = Vec::with_capacity(usize::try_from(self.probes).unwrap_or(8));
            let mut own = None;
            for idx in self.window(key) {
                let slot = self.read(idx)?;
                if let Some(tat) = slot.live_for(key, now_tat) {
                    own = Some((slot, tat));
                    break;
                }
                scan.push(slot);
            }
            let outcome = check(quota, own.as_ref().map(|(_, t)| *t), now, cost);
            let (new_tat, remaining, reset_after_ms) = match outcome {
                Outcome::Allowed {
                    new_tat,
                    remaining,
                    reset_after_ms,
                } if cost > 0 => (new_tat, remaining, reset_after_ms),
                // A refusal or a zero-cost look writes nothing.
                other => return Ok((other, ev)),
            };
            last = (new_tat, remaining, reset_after_ms);
            let mut pending = RateEvents::default();
            let target = match &own {
                Some((slot, _)) => Some(slot),
                None => choose(&scan, now_tat, &mut pending),
            };
            let Some(target) = target else {
                // Unreachable with probes ≥ 1; treat like a lost race.
                ev.cas_retries += 1;
                continue;
            };
            let value = RateSlot {
                key: *key,
                tat: new_tat,
            }
            .encode();
            if self
                .store
                .put(&self.slot_key(target.idx), &value, target.expect())?
            {
                ev.keys_created += pending.keys_created;
                ev.evictions += pending.evictions;
                ev.corrupt_overwritten += pending.corrupt_overwritten;
                return Ok((outcome, ev));
            }
            ev.cas_retries += 1;
        }
        let (new_tat, remaining, reset_after_ms) = last;
        Ok((
            Outcome::Contended {
                new_tat,
                remaining,
                reset_after_ms,
            },
            ev,
        ))
    }

    /// Slot keys that exist in the store (reads every slot: for tests and admin use).
    pub fn slots_in_use(&self) -> Result<u32, StoreError> {
        let mut n = 0;
        for i in 0..self.capacity {
            if self.store.get(&self.slot_key(i))?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Buckets not yet full again at `now` (reads every slot: for tests and admin use).
    pub fn live_buckets(&self, now: Millis) -> Result<u32, StoreError> {
        let now_tat = Tat::from_millis(now);
        let mut n = 0;
        for i in 0..self.capacity {
            if matches!(self.read(i)?.content, Content::Held(s) if s.tat > now_tat) {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Where a new bucket goes: the first reusable slot of the window, else the live bucket
/// with the smallest TAT.
fn choose<'s>(scan: &'s [Slot], now: Tat, ev: &mut RateEvents) -> Option<&'s Slot> {
    let reusable = scan.iter().find(|s| match &s.content {
        Content::Absent | Content::Corrupt => true,
        Content::Held(h) => h.tat <= now,
    });
    if let Some(s) = reusable {
        match s.content {
            Content::Absent => ev.keys_created += 1,
            Content::Corrupt => ev.corrupt_overwritten += 1,
            Content::Held(_) => {}
        }
        return Some(s);
    }
    let victim = scan
        .iter()
        .filter_map(|s| match &s.content {
            Content::Held(h) => Some((s, h.tat)),
            _ => None,
        })
        .min_by_key(|(_, tat)| *tat)
        .map(|(s, _)| s);
    if victim.is_some() {
        ev.evictions += 1;
    }
    victim
}

/// What rate limiting says about one request: the outcome (after the contention policy),
/// the headers to send, and store events for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Allowed or limited.
    pub outcome: Outcome,
    /// `X-RateLimit-*` (and `Retry-After` when limited).
    pub headers: RateHeaders,
    /// Store housekeeping.
    pub events: RateEvents,
}

/// How a covered request ended, for the charge that waited for it ([`deferred_cost`]).
///
/// Hosts charge a request the rate limit applies to once. One that is not inspected is
/// charged at headers time; one that is (its key or fingerprint needs the body) is charged
/// once idemgate knows what it does with it, because a replay may be free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Answered with the stored response of an earlier request (after waiting for it or
    /// not).
    Replayed,
    /// Anything else: forwarded, passed on untouched, or refused (a body that is not JSON,
    /// a key missing from the body, a body over `maxBodyBytes`, a conflict, a mismatch, a
    /// store error…). A refused bad request is charged like any other, so a client cannot
    /// send unlimited bad requests.
    Other,
}

/// The cost of the deferred charge of a request that ended as `settled` under `spec`: 1,
/// except a replay (0 unless `chargeReplays`). A request parked by the `wait` policy is
/// charged when its wait ends, as what it ends as (replayed, forwarded, or refused).
pub fn deferred_cost(spec: &crate::config::RateLimitSpec, settled: Settlement) -> u32 {
    match settled {
        Settlement::Replayed => u32::from(spec.charge_replays),
        Settlement::Other => 1,
    }
}

/// Charges `cost` requests to the caller identified by `headers` under `rule`'s rate limit
/// (`None` when the rule has none). `cost` 0 only reads the bucket, for the headers of a
/// replay. A store that fails is handled by the rule's contention policy.
pub fn charge<S: CasStore + ?Sized>(
    store: &S,
    namespace: &str,
    rule: &crate::config::Rule,
    headers: &[(String, Vec<u8>)],
    now: Millis,
    cost: u32,
) -> Option<Charge> {
    let spec = rule.rate_limit.as_ref()?;
    let key = LimitKey::for_request(rule, headers);
    // One table per rule with its own buckets, or one shared by every rule that does not
    // limit per route (their capacity and probes agree: the configuration checks it).
    let table_ns = format!(
        "{namespace}.{}",
        if spec.per_route {
            rule.name.as_str()
        } else {
            "all"
        }
    );
    let table = RateTable::new(store, &table_ns, spec.capacity, spec.probes);
    let (outcome, events) = match table.acquire(&key, &spec.quota, now, cost) {
        Ok(r) => r,
        Err(_) => (
            Outcome::Contended {
                new_tat: Tat::from_millis(now),
                remaining: 0,
                reset_after_ms: 0,
            },
            RateEvents::default(),
        ),
    };
    let outcome = spec.on_contention.resolve(outcome);
    let headers = outcome.headers(&spec.quota, now, spec.reset_format);
    Some(Charge {
        outcome,
        headers,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, FakeClock};
    use crate::store::MemoryStore;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Barrier};

    const T0: Millis = 1_700_000_000_000;

    fn q(rate: u32, period_ms: u64, burst: u32) -> Quota {
        Quota::new(rate, period_ms, burst).unwrap()
    }

    /// Runs `check` and keeps the state, like a host would.
    struct Bucket {
        quota: Quota,
        tat: Option<Tat>,
    }

    impl Bucket {
        fn new(quota: Quota) -> Self {
            Self { quota, tat: None }
        }
        fn hit(&mut self, now: Millis, cost: u32) -> Outcome {
            let o = check(&self.quota, self.tat, now, cost);
            if let Outcome::Allowed { new_tat, .. } = o {
                self.tat = Some(new_tat);
            }
            o
        }
    }

    #[test]
    fn quota_validation() {
        assert_eq!(Quota::new(0, 1_000, 1), Err(QuotaError::ZeroRate));
        assert_eq!(Quota::new(1, 0, 1), Err(QuotaError::Period(0)));
        assert_eq!(
            Quota::new(1, MAX_PERIOD_MS + 1, 1),
            Err(QuotaError::Period(MAX_PERIOD_MS + 1))
        );
        assert_eq!(Quota::new(1, 1_000, 0), Err(QuotaError::ZeroBurst));
        assert_eq!(
            QuotaError::ZeroBurst.to_string(),
            "burst must be at least 1, got 0"
        );
        assert_eq!(q(10, 1_000, 3).interval_ns(), 100_000_000);
        assert_eq!(q(3, 1_000, 1).interval_ns(), 333_333_334);
        assert_eq!(q(u32::MAX, 1, 1).interval_ns(), 1);
        assert_eq!(q(1, MAX_PERIOD_MS, u32::MAX).burst(), u32::MAX);
    }

    #[test]
    fn burst_then_limited() {
        let clock = FakeClock::new(T0);
        let mut b = Bucket::new(q(10, 1_000, 3));
        let got: Vec<_> = (0..3).map(|_| b.hit(clock.now(), 1)).collect();
        for (i, o) in got.iter().enumerate() {
            let Outcome::Allowed {
                remaining,
                reset_after_ms,
                ..
            } = *o
            else {
                panic!("{o:?}")
            };
            assert_eq!(remaining, 2 - i as u32);
            assert_eq!(reset_after_ms, 100 * (i as u64 + 1));
            assert_eq!(o.retry_after_seconds(), None);
        }
        let limited = b.hit(clock.now(), 1);
        assert_eq!(
            limited,
            Outcome::Limited {
                retry_after_ms: 100,
                remaining: 0,
                reset_after_ms: 300
            }
        );
        assert_eq!(limited.retry_after_seconds(), Some(1));
        // The state did not move: 40 ms later the wait is 60 ms.
        clock.advance(40);
        assert_eq!(
            b.hit(clock.now(), 1),
            Outcome::Limited {
                retry_after_ms: 60,
                remaining: 0,
                reset_after_ms: 260
            }
        );
    }

    #[test]
    fn refill_after_clock_advances() {
        let clock = FakeClock::new(T0);
        let mut b = Bucket::new(q(10, 1_000, 3));
        for _ in 0..3 {
            assert!(b.hit(clock.now(), 1).is_allowed());
        }
        assert!(b.hit(clock.now(), 1).is_limited());
        clock.advance(100);
        let o = b.hit(clock.now(), 1);
        assert!(o.is_allowed(), "{o:?}");
        assert_eq!(o.remaining(), 0);
        assert!(b.hit(clock.now(), 1).is_limited());
        // Long enough: the bucket is full again (burst, never more).
        clock.advance(10_000);
        let o = b.hit(clock.now(), 1);
        assert_eq!(
            o,
            Outcome::Allowed {
                new_tat: Tat::from_millis(clock.now() + 100),
                remaining: 2,
                reset_after_ms: 100
            }
        );
    }

    #[test]
    fn retry_after_is_exact() {
        for (quota, cost) in [
            (q(10, 1_000, 3), 1),
            (q(3, 1_000, 2), 1),
            (q(7, 60_000, 5), 3),
        ] {
            let mut b = Bucket::new(quota);
            let mut now = T0;
            while b.hit(now, cost).is_allowed() {}
            let Outcome::Limited { retry_after_ms, .. } = check(&quota, b.tat, now, cost) else {
                panic!()
            };
            assert!(check(&quota, b.tat, now + retry_after_ms - 1, cost).is_limited());
            now += retry_after_ms;
            assert!(b.hit(now, cost).is_allowed(), "{quota:?} cost {cost}");
        }
    }

    #[test]
    fn fractional_interval_does_not_drift() {
        // 3 per second, burst 1, one try every millisecond for 100 s: 1 + 300 admitted at
        // most, and rounding the interval up loses less than one.
        let quota = q(3, 1_000, 1);
        let mut b = Bucket::new(quota);
        let admitted = (0..=100_000u64)
            .filter(|ms| b.hit(T0 + ms, 1).is_allowed())
            .count();
        assert!((300..=301).contains(&admitted), "{admitted}");
    }

    #[test]
    fn cost_zero_peeks_and_cost_above_burst_never_fits() {
        let quota = q(10, 1_000, 3);
        let mut b = Bucket::new(quota);
        assert!(b.hit(T0, 2).is_allowed());
        let peek = check(&quota, b.tat, T0, 0);
        assert_eq!(peek.remaining(), 1);
        assert_eq!(peek, b.hit(T0, 0));
        assert_eq!(b.hit(T0, 0).remaining(), 1);
        // Weighted: cost 2 refused while one cost-1 request still fits.
        let o = b.hit(T0, 2);
        assert_eq!(
            o,
            Outcome::Limited {
                retry_after_ms: 100,
                remaining: 1,
                reset_after_ms: 200
            }
        );
        let never = check(&quota, None, T0, 4);
        assert_eq!(
            never,
            Outcome::Limited {
                retry_after_ms: Millis::MAX,
                remaining: 3,
                reset_after_ms: 0
            }
        );
    }

    #[test]
    fn header_formatting_rounds_up() {
        let quota = q(1, 60_000, 2);
        let o = Outcome::Limited {
            retry_after_ms: 1_001,
            remaining: 0,
            reset_after_ms: 60_001,
        };
        let h = o.headers(&quota, T0 + 500, ResetFormat::Seconds);
        assert_eq!(
            h,
            RateHeaders {
                limit: 2,
                remaining: 0,
                reset: 61,
                retry_after: Some(2)
            }
        );
        // Epoch: (now + reset) rounded up to the next whole second.
        let e = o.headers(&quota, T0 + 500, ResetFormat::Epoch);
        assert_eq!(e.reset, (T0 + 500 + 60_001).div_ceil(1_000));
        assert_eq!(e.reset, 1_700_000_061);
        assert_eq!(
            o.headers(&quota, T0, ResetFormat::Epoch).reset,
            1_700_000_061
        );
        assert_eq!(
            Outcome::Limited {
                retry_after_ms: 1_000,
                remaining: 0,
                reset_after_ms: 1_000
            }
            .headers(&quota, T0, ResetFormat::Epoch)
            .reset,
            1_700_000_001
        );
        // Retry-After is at least 1 even below a second, exact on whole seconds.
        for (ms, s) in [(1, 1), (999, 1), (1_000, 1), (1_001, 2), (59_999, 60)] {
            let o = Outcome::Limited {
                retry_after_ms: ms,
                remaining: 0,
                reset_after_ms: 0,
            };
            assert_eq!(o.retry_after_seconds(), Some(s), "{ms}");
        }
        // Allowed: no retry-after; a full bucket resets in 0 seconds / now.
        let full = check(&quota, None, T0, 0);
        let h = full.headers(&quota, T0, ResetFormat::Seconds);
        assert_eq!(h.retry_after, None);
        assert_eq!(h.reset, 0);
        assert_eq!(
            full.headers(&quota, T0, ResetFormat::Epoch).reset,
            T0 / 1_000
        );
        assert_eq!(
            check(&quota, None, T0, 1)
                .headers(&quota, T0, ResetFormat::Seconds)
                .pairs(),
            vec![
                ("x-ratelimit-limit", "2".to_string()),
                ("x-ratelimit-remaining", "1".to_string()),
                ("x-ratelimit-reset", "60".to_string()),
            ]
        );
        assert_eq!(ResetFormat::parse("epoch"), Some(ResetFormat::Epoch));
        assert_eq!(ResetFormat::parse("seconds"), Some(ResetFormat::Seconds));
        assert_eq!(ResetFormat::parse("Epoch"), None);
        assert_eq!(ResetFormat::Epoch.as_str(), "epoch");
    }

    #[test]
    fn contention_policy_maps_contended() {
        let c = Outcome::Contended {
            new_tat: Tat(5),
            remaining: 2,
            reset_after_ms: 300,
        };
        assert_eq!(
            ContentionPolicy::FailOpen.resolve(c),
            Outcome::Allowed {
                new_tat: Tat(5),
                remaining: 2,
                reset_after_ms: 300
            }
        );
        let closed = ContentionPolicy::FailClosed.resolve(c);
        assert_eq!(
            closed,
            Outcome::Limited {
                retry_after_ms: CONTENDED_RETRY_AFTER_MS,
                remaining: 0,
                reset_after_ms: 300
            }
        );
        assert_eq!(closed.retry_after_seconds(), Some(1));
        assert!(!c.is_allowed() && !c.is_limited());
        assert_eq!(c.retry_after_seconds(), None);
        let l = check(&q(1, 1_000, 1), Some(Tat::from_millis(T0 + 1_000)), T0, 1);
        assert_eq!(ContentionPolicy::FailOpen.resolve(l), l);
        assert_eq!(ContentionPolicy::default(), ContentionPolicy::FailClosed);
        assert_eq!(
            ContentionPolicy::parse("failOpen"),
            Some(ContentionPolicy::FailOpen)
        );
        assert_eq!(ContentionPolicy::parse("open"), None);
        assert_eq!(ContentionPolicy::FailClosed.as_str(), "failClosed");
    }

    #[test]
    fn limit_keys_scope_and_hide_the_caller() {
        let a = limit_key(b"Bearer a", Some("/orders"));
        assert_eq!(a, limit_key(b"Bearer a", Some("/orders")));
        assert_eq!(a, LimitKey::new(&[b"Bearer a"], Some("/orders")));
        assert_ne!(a, limit_key(b"Bearer b", Some("/orders")));
        assert_ne!(a, limit_key(b"Bearer a", Some("/refunds")));
        assert_ne!(a, limit_key(b"Bearer a", None));
        assert_ne!(limit_key(b"x", None), limit_key(b"x", Some("")));
        // Length prefixes: parts cannot slide into each other.
        assert_ne!(
            LimitKey::new(&[b"ab", b"c"], None),
            LimitKey::new(&[b"a", b"bc"], None)
        );
        assert_ne!(LimitKey::new(&[b""], None), LimitKey::new(&[], None));
        assert_eq!(a.to_hex().len(), 32);
        assert!(format!("{a:?}").starts_with("LimitKey("));
        // Neither the stored slot nor its key name carries the caller.
        let secret = b"sk_live_SECRET";
        let k = limit_key(secret, None);
        let bytes = RateSlot {
            key: k,
            tat: Tat(1),
        }
        .encode();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret));
        assert!(!a.to_hex().contains("Bearer"));
    }

    #[test]
    fn slot_codec_round_trips_and_rejects_corruption() {
        let s = RateSlot {
            key: LimitKey([7; 16]),
            tat: Tat(u64::MAX - 1),
        };
        let bytes = s.encode();
        assert_eq!(bytes.len(), SLOT_LEN);
        assert_eq!(RateSlot::decode(&bytes), Ok(s));
        for n in 0..bytes.len() {
            assert!(RateSlot::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(RateSlot::decode(&longer), Err(CodecError::TrailingBytes(1)));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(RateSlot::decode(&magic), Err(CodecError::BadHeader));
        let mut version = bytes.clone();
        version[2] = 2;
        assert_eq!(RateSlot::decode(&version), Err(CodecError::BadHeader));
        let mut tag = bytes;
        tag[3] = 1;
        assert!(matches!(
            RateSlot::decode(&tag),
            Err(CodecError::BadValue(_))
        ));
    }

    #[test]
    fn table_burst_refill_and_two_callers() {
        let clock = FakeClock::new(T0);
        let store = MemoryStore::default();
        let table = RateTable::new(&store, "ns", 64, 4);
        let quota = q(10, 1_000, 3);
        let alice = limit_key(b"alice", Some("/orders"));
        let bob = limit_key(b"bob", Some("/orders"));
        let (first, ev) = table.acquire(&alice, &quota, clock.now(), 1).unwrap();
        assert_eq!(ev.keys_created, 1);
        assert_eq!(first.remaining(), 2);
        for want in [1, 0] {
            assert_eq!(
                table
                    .acquire(&alice, &quota, clock.now(), 1)
                    .unwrap()
                    .0
                    .remaining(),
                want
            );
        }
        let (limited, ev) = table.acquire(&alice, &quota, clock.now(), 1).unwrap();
        assert_eq!(
            limited,
            Outcome::Limited {
                retry_after_ms: 100,
                remaining: 0,
                reset_after_ms: 300
            }
        );
        assert_eq!(ev, RateEvents::default());
        // Bob has his own bucket.
        let (b, _) = table.acquire(&bob, &quota, clock.now(), 1).unwrap();
        assert!(b.is_allowed());
        assert_eq!(b.remaining(), 2);
        // A zero-cost look spends nothing and writes nothing.
        let before = store.get(&table.slot_key(table.window(&bob).next().unwrap()));
        assert_eq!(
            table
                .acquire(&bob, &quota, clock.now(), 0)
                .unwrap()
                .0
                .remaining(),
            2
        );
        assert_eq!(
            store.get(&table.slot_key(table.window(&bob).next().unwrap())),
            before
        );
        // Refill.
        clock.advance(100);
        assert!(table
            .acquire(&alice, &quota, clock.now(), 1)
            .unwrap()
            .0
            .is_allowed());
        assert!(table
            .acquire(&alice, &quota, clock.now(), 1)
            .unwrap()
            .0
            .is_limited());
        clock.advance(300);
        assert_eq!(
            table
                .acquire(&alice, &quota, clock.now(), 1)
                .unwrap()
                .0
                .remaining(),
            2
        );
        // Bob's bucket (one spent at T0) is full again; Alice's is live.
        assert_eq!(table.live_buckets(clock.now()).unwrap(), 1);
        assert!(table.slots_in_use().unwrap() <= 2);
    }

    #[test]
    fn corrupt_slot_is_overwritten_not_trusted() {
        let store = MemoryStore::default();
        let table = RateTable::new(&store, "ns", 8, 2);
        let quota = q(1, 60_000, 2);
        let k = limit_key(b"c", None);
        let home = table.window(&k).next().unwrap();
        // Garbage, and a slot claiming to be k's bucket but with a foreign version byte.
        assert!(store
            .put(&table.slot_key(home), b"garbage", Expect::Absent)
            .unwrap());
        let mut foreign = RateSlot {
            key: k,
            tat: Tat::from_millis(T0 + 3_600_000),
        }
        .encode();
        foreign[2] = 9;
        let second = table.window(&k).nth(1).unwrap();
        assert!(store
            .put(&table.slot_key(second), &foreign, Expect::Absent)
            .unwrap());
        let (o, ev) = table.acquire(&k, &quota, T0, 1).unwrap();
        assert_eq!(o.remaining(), 1, "a corrupt slot must not count as state");
        assert_eq!(ev.corrupt_overwritten, 1);
        assert_eq!(ev.keys_created, 0);
        let (bytes, _) = store.get(&table.slot_key(home)).unwrap().unwrap();
        assert_eq!(RateSlot::decode(&bytes).unwrap().key, k);
    }

    #[test]
    fn full_bucket_slot_is_taken_over_and_fullest_is_evicted() {
        let store = MemoryStore::default();
        let table = RateTable::new(&store, "ns", 2, 2);
        let quota = q(1, 1_000, 5);
        let (a, b, c) = (
            limit_key(b"a", None),
            limit_key(b"b", None),
            limit_key(b"c", None),
        );
        // a spends 3 (TAT now+3s), b spends 1 (TAT now+1s): both live, table full.
        for _ in 0..3 {
            assert!(table.acquire(&a, &quota, T0, 1).unwrap().0.is_allowed());
        }
        assert!(table.acquire(&b, &quota, T0, 1).unwrap().0.is_allowed());
        assert_eq!(table.live_buckets(T0).unwrap(), 2);
        // c evicts b, the fullest bucket (smallest TAT).
        let (o, ev) = table.acquire(&c, &quota, T0, 1).unwrap();
        assert!(o.is_allowed());
        assert_eq!(ev.evictions, 1);
        assert_eq!(table.acquire(&a, &quota, T0, 0).unwrap().0.remaining(), 2);
        assert_eq!(table.acquire(&b, &quota, T0, 0).unwrap().0.remaining(), 5);
        // Once c's bucket is full again (1 s), b takes its slot without an eviction.
        let (o, ev) = table.acquire(&b, &quota, T0 + 1_000, 1).unwrap();
        assert!(o.is_allowed());
        assert_eq!(ev, RateEvents::default());
        assert_eq!(
            table
                .acquire(&a, &quota, T0 + 1_000, 0)
                .unwrap()
                .0
                .remaining(),
            3
        );
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn bounded_key_count_under_churn() {
        let store = MemoryStore::default();
        let table = RateTable::new(&store, "ns", 32, 4);
        let quota = q(1, 60_000, 10);
        let mut created = 0;
        let mut evictions = 0;
        for i in 0..5_000u32 {
            let k = limit_key(&i.to_be_bytes(), Some("/x"));
            let (o, ev) = table.acquire(&k, &quota, T0 + u64::from(i), 1).unwrap();
            assert!(o.is_allowed());
            created += ev.keys_created;
            evictions += ev.evictions;
        }
        assert!(store.len() <= 32, "{} keys", store.len());
        assert_eq!(created as usize, store.len());
        assert_eq!(table.slots_in_use().unwrap() as usize, store.len());
        assert!(evictions > 0);
        assert!(table.live_buckets(T0 + 5_000).unwrap() <= 32);
    }

    /// A store whose writes always lose (another writer got in first).
    struct Losing(MemoryStore, AtomicU32);

    impl CasStore for Losing {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Cas)>, StoreError> {
            self.0.get(key)
        }
        fn put(&self, _: &str, _: &[u8], _: Expect) -> Result<bool, StoreError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(false)
        }
    }

    struct Broken;

    impl CasStore for Broken {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, Cas)>, StoreError> {
            Err(StoreError("down".into()))
        }
        fn put(&self, _: &str, _: &[u8], _: Expect) -> Result<bool, StoreError> {
            Err(StoreError("down".into()))
        }
    }

    #[test]
    fn contended_after_bounded_retries_then_policy() {
        let store = Losing(MemoryStore::default(), AtomicU32::new(0));
        let table = RateTable::new(&store, "ns", 8, 2);
        let quota = q(10, 1_000, 3);
        let k = limit_key(b"k", None);
        let (o, ev) = table.acquire(&k, &quota, T0, 1).unwrap();
        assert_eq!(
            o,
            Outcome::Contended {
                new_tat: Tat::from_millis(T0 + 100),
                remaining: 2,
                reset_after_ms: 100
            }
        );
        assert_eq!(ev.cas_retries, MAX_ATTEMPTS);
        assert_eq!(store.1.load(Ordering::SeqCst), MAX_ATTEMPTS);
        assert_eq!(ev.keys_created, 0, "events count only writes that happened");
        assert!(ContentionPolicy::FailOpen.resolve(o).is_allowed());
        assert!(ContentionPolicy::FailClosed.resolve(o).is_limited());
        // A zero-cost look never contends.
        assert!(table.acquire(&k, &quota, T0, 0).unwrap().0.is_allowed());
        // Store errors are reported, not guessed.
        let broken = RateTable::new(&Broken, "ns", 8, 2);
        assert_eq!(
            broken.acquire(&k, &quota, T0, 1),
            Err(StoreError("down".into()))
        );
    }

    /// N threads hammer one key through one store while a fake clock steps forward; the
    /// count admitted never exceeds `burst + rate × elapsed`, and, as every refusal read an
    /// empty bucket, reaches it exactly.
    #[test]
    fn threads_never_exceed_the_allowance() {
        const THREADS: usize = 4;
        const STEPS: u64 = 60;
        const STEP_MS: u64 = 300;
        const TRIES_PER_STEP: usize = 4;
        // 10/s, burst 5: 3 tokens per step, ≤ MAX_ATTEMPTS, so no request can be starved
        // into Contended (each lost CAS is another request's admission in the same step).
        let quota = q(10, 1_000, 5);
        let store = Arc::new(MemoryStore::default());
        let clock = Arc::new(FakeClock::new(T0));
        let barrier = Arc::new(Barrier::new(THREADS));
        let admitted = Arc::new(AtomicU32::new(0));
        let contended = Arc::new(AtomicU32::new(0));
        let key = limit_key(b"Bearer hammer", Some("/orders"));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (store, clock, barrier, admitted, contended) = (
                    store.clone(),
                    clock.clone(),
                    barrier.clone(),
                    admitted.clone(),
                    contended.clone(),
                );
                std::thread::spawn(move || {
                    let table = RateTable::new(&*store, "idemgate", 128, 8);
                    for _ in 0..STEPS {
                        let now = clock.now();
                        for _ in 0..TRIES_PER_STEP {
                            let (o, _) = table.acquire(&key, &quota, now, 1).unwrap();
                            match ContentionPolicy::FailClosed.resolve(o) {
                                Outcome::Allowed { remaining, .. } => {
                                    assert!(remaining <= quota.burst());
                                    admitted.fetch_add(1, Ordering::SeqCst);
                                }
                                Outcome::Limited { retry_after_ms, .. } => {
                                    assert!(retry_after_ms > 0);
                                    if matches!(o, Outcome::Contended { .. }) {
                                        contended.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                                Outcome::Contended { .. } => unreachable!(),
                            }
                        }
                        // Everyone is done with this instant; one thread moves the clock.
                        if barrier.wait().is_leader() {
                            clock.advance(STEP_MS);
                        }
                        barrier.wait();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let elapsed_ms = (STEPS - 1) * STEP_MS;
        let allowance =
            u64::from(quota.burst()) + elapsed_ms * u64::from(quota.rate()) / quota.period_ms();
        let admitted = u64::from(admitted.load(Ordering::SeqCst));
        assert!(admitted <= allowance, "{admitted} > {allowance}");
        assert_eq!(contended.load(Ordering::SeqCst), 0);
        assert_eq!(admitted, allowance);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn deferred_cost_charges_everything_but_free_replays() {
        let spec = |charge_replays: bool| {
            let json =
                format!(r#"{{"rateLimit": {{"rate": 1, "chargeReplays": {charge_replays}}}}}"#);
            let config = crate::Config::from_json(&json).unwrap();
            config.default_rule.rate_limit.clone().unwrap()
        };
        let (free, paid) = (spec(false), spec(true));
        assert_eq!(deferred_cost(&free, Settlement::Replayed), 0);
        assert_eq!(deferred_cost(&paid, Settlement::Replayed), 1);
        for s in [&free, &paid] {
            assert_eq!(deferred_cost(s, Settlement::Other), 1);
        }
    }

    proptest! {
        #[test]
        fn remaining_bounded_and_retry_iff_limited(
            rate in 1u32..1_000,
            period_ms in 1u64..120_000,
            burst in 1u32..50,
            steps in proptest::collection::vec((0u64..5_000, 0u32..8), 1..60),
        ) {
            let quota = q(rate, period_ms, burst);
            let mut b = Bucket::new(quota);
            let mut now = T0;
            let mut admitted_cost = 0u128;
            for (dt, cost) in steps {
                now += dt;
                let o = b.hit(now, cost);
                prop_assert!(o.remaining() <= burst);
                match o {
                    Outcome::Allowed { reset_after_ms, .. } => {
                        prop_assert_eq!(o.retry_after_seconds(), None);
                        admitted_cost += u128::from(cost);
                        let max_reset = (u128::from(quota.interval_ns()) * u128::from(burst)).div_ceil(NS_PER_MS);
                        prop_assert!(u128::from(reset_after_ms) <= max_reset);
                    }
                    Outcome::Limited { retry_after_ms, .. } => {
                        prop_assert!(retry_after_ms > 0);
                        prop_assert!(cost > 0);
                        prop_assert!(o.retry_after_seconds().unwrap_or(0) >= 1);
                    }
                    Outcome::Contended { .. } => prop_assert!(false, "check never contends"),
                }
                let elapsed_ns = u128::from(now - T0) * NS_PER_MS;
                prop_assert!(
                    admitted_cost <= u128::from(burst) + elapsed_ns / u128::from(quota.interval_ns()),
                );
            }
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RateSlot::decode(&bytes);
        }

        #[test]
        fn any_stored_tat_gives_sane_answers(tat in any::<u64>(), now in 0u64..u64::MAX / 2, cost in 0u32..10) {
            let quota = q(5, 1_000, 3);
            let o = check(&quota, Some(Tat(tat)), now, cost);
            prop_assert!(o.remaining() <= 3);
            prop_assert_eq!(o.is_limited(), o.retry_after_seconds().is_some());
        }
    }
}
