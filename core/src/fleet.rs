//! Fleet mode: etcd as the authoritative store, sans-IO.
//!
//! Many Envoys share one etcd cluster (v3 JSON gateway: `/v3/kv/txn`, `/v3/kv/range`,
//! `/v3/lease/grant`; keys and values base64). This module builds every request body and
//! turns every answer into an outcome; the host only dispatches the calls and feeds the
//! answers back. Decisions are [`decide_waiting`]'s, exactly as in local mode.
//!
//! - **Claim** = one txn: `create_revision == 0` → put the in-flight [`Record`] (with the
//!   lease of its expiry bucket), else range the key. When the key exists, the record found
//!   is decided on: replay, reject, or take over (lapsed lease, expired record) with a txn on
//!   its `mod_revision`. The record carries the claim's owner token, so a retry after an
//!   ambiguous timeout that did commit finds its own record and forwards ("mine").
//! - **Complete** = txn `mod_revision == <claim's revision>` → put the completed record.
//!   A completed record whose encoding exceeds `maxValueBytes` is not written (see
//!   [`ValuePolicy`]): the key stays claimed until its lease lapses, as with a response over
//!   `maxResponseBytes` in local mode.
//! - **Release** = txn `mod_revision == <revision>` → delete. **Abandon** (a claim that may
//!   have committed while every attempt timed out) = txn `value == <our record>` → delete.
//! - **Leases** are shared, never one per key. A completed record expiring at `e` is
//!   attached to the expiry lease of deadline `D = ceil(e / W) · W`, granted with TTL
//!   `D − now` and never refreshed, so etcd deletes the key in `[e, e + W)` (plus etcd's
//!   rounding to whole seconds), never before it expires. An in-flight record rides a short
//!   [`InFlightLease`] (the rule's lease) that the root context keeps alive
//!   ([`KeepAlives`], `/v3/lease/keepalive`) while the claim is unsettled: the key is held
//!   as long as its Envoy lives, and freed within one TTL when it dies.
//! - **Wait**: a key in flight under `onConcurrent: wait` gives [`Step::Wait`]; the host
//!   re-polls with [`ClaimFlow::repoll`] (the claim txn again) until replay, claim, or 409.
//! - **Cache**: completed records are cached in Envoy's shared data, direct-mapped over
//!   `store.capacity` slots; the cache answers replays and rejections, never a claim.
//!
//! ```
//! use idemgate_core::fleet::{lease_deadline, Fleet};
//! use idemgate_core::Config;
//! let config = Config::from_json(r#"{"store": {"etcd": {"leaseBucketSeconds": 60}}}"#).unwrap();
//! let fleet = Fleet::new(&config).unwrap();
//! assert_eq!(lease_deadline(61_000, 60_000), 120_000);
//! assert!(fleet.key(&idemgate_core::KeyId([0; 16])).starts_with("/idemgate/idemgate/"));
//! ```
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::{json, Value};

use crate::clock::Millis;
use crate::config::{Config, EtcdSpec, FailPolicy, Rule};
use crate::decision::{decide_waiting, Claim, Decision, Request};
use crate::key::KeyId;
use crate::record::{Record, StoredResponse};

/// Path of the txn endpoint.
pub const TXN_PATH: &str = "/v3/kv/txn";
/// Path of the range endpoint.
pub const RANGE_PATH: &str = "/v3/kv/range";
/// Path of the lease grant endpoint.
pub const GRANT_PATH: &str = "/v3/lease/grant";
/// Path of the lease keep-alive endpoint (a stream in gRPC; one message over the gateway).
pub const KEEPALIVE_PATH: &str = "/v3/lease/keepalive";

/// The shortest lease etcd grants with the election timeout idemgate runs it with (1 s):
/// etcd raises shorter TTLs to 1.5 × the election timeout, rounded up to whole seconds.
pub const MIN_LEASE_TTL_S: u64 = 2;

/// Takeover rounds (the record changed under us again and again) before giving up.
const MAX_ROUNDS: u32 = 8;

/// One HTTP call to etcd: `POST <path>` with a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Endpoint path.
    pub path: &'static str,
    /// JSON body.
    pub body: Vec<u8>,
}

/// Why an etcd answer is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No answer (timeout, reset, no healthy member) or an etcd error (no leader, no
    /// quorum, request timed out): retry, then apply the fail policy.
    Unavailable(String),
    /// The lease named in a put does not exist (lapsed, or granted by a lost cluster).
    LeaseNotFound,
    /// An answer that is not what etcd sends.
    Malformed(String),
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdError::Unavailable(s) => write!(f, "etcd unavailable: {s}"),
            EtcdError::LeaseNotFound => write!(f, "etcd: requested lease not found"),
            EtcdError::Malformed(s) => write!(f, "etcd answer malformed: {s}"),
        }
    }
}

// ------------------------------------------------------------------------------ base64

/// Standard base64 with padding (etcd's gateway writes keys and values so).
pub fn b64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Standard base64, padding optional; `None` on any invalid input.
pub fn b64_decode(text: &str) -> Option<Vec<u8>> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(text).ok()
}

// ------------------------------------------------------------------------------ leases

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

/// Body of `POST /v3/lease/grant` for `ttl_s` seconds.
pub fn grant_call(ttl_s: u64) -> Call {
    Call {
        path: GRANT_PATH,
        body: json!({"TTL": ttl_s.to_string()}).to_string().into_bytes(),
    }
}

/// The lease id of a grant answer.
pub fn parse_grant(status: Option<u16>, body: &[u8]) -> Result<i64, EtcdError> {
    let v = answer(status, body)?;
    if let Some(e) = v
        .get("error")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
    {
        return Err(EtcdError::Unavailable(e.to_string()));
    }
    let id = int(v.get("ID")).ok_or_else(|| EtcdError::Malformed("grant without ID".into()))?;
    if id <= 0 {
        return Err(EtcdError::Malformed(format!("lease id {id}")));
    }
    Ok(id)
}

/// Shared-data key caching the lease of `deadline` for one Envoy (16 keys, reused
/// round-robin by bucket).
pub fn lease_cache_key(namespace: &str, deadline: Millis, bucket_ms: u64) -> String {
    Lease::Expiry { deadline }.cache_key(namespace, bucket_ms)
}

/// Value cached under [`lease_cache_key`].
pub fn lease_cache_value(deadline: Millis, lease: i64) -> String {
    Lease::Expiry { deadline }.cache_value(lease)
}

/// The lease id cached for `deadline`, if the cached value is for that deadline.
pub fn parse_lease_cache(bytes: &[u8], deadline: Millis) -> Option<i64> {
    Lease::Expiry { deadline }.parse_cache(bytes)
}

/// The lease an in-flight record is attached to. Short (the rule's `leaseSeconds`, at
/// least [`MIN_LEASE_TTL_S`]) and shared by the claims one Envoy begins in the same window
/// of half that TTL (so a claim attaches to a lease with at least half its TTL left); the
/// root context keeps it alive ([`KeepAlives`]) while any of those claims is in flight on
/// this worker, and lets it lapse once none is: a claim whose Envoy died, or whose outcome
/// is unknown, is gone within one TTL of the last keep-alive. The completion moves the key
/// to its [`Lease::Expiry`] lease, which is never refreshed.
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
    /// An in-flight lease, refreshed while its claims are in flight.
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
/// window is less than a fifth of a window (at most 1 s) away (granted earlier, it would run
/// short before its window ends).
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

/// Body of `POST /v3/lease/keepalive` for `lease`.
pub fn keepalive_call(lease: i64) -> Call {
    Call {
        path: KEEPALIVE_PATH,
        body: json!({"ID": lease.to_string()}).to_string().into_bytes(),
    }
}

/// The TTL a keep-alive restored (`Some`), or `None` when the lease is gone (etcd answers
/// TTL 0 for a lease it no longer has). The gateway wraps the stream's one message in
/// `{"result": …}`.
pub fn parse_keepalive(status: Option<u16>, body: &[u8]) -> Result<Option<u64>, EtcdError> {
    let first = body
        .split(|b| *b == b'\n')
        .find(|l| !l.iter().all(u8::is_ascii_whitespace))
        .unwrap_or(body);
    let v = answer(status, first)?;
    let msg = v.get("result").unwrap_or(&v);
    let ttl = int(msg.get("TTL")).unwrap_or(0);
    Ok(u64::try_from(ttl).ok().filter(|t| *t > 0))
}

/// In-flight leases held by one worker's forwarded claims, and when each is due for a
/// keep-alive. The root context's tick sends what [`KeepAlives::due`] returns and feeds
/// each answer to [`KeepAlives::answered`]. A lease no claim holds is forgotten (and lapses
/// in etcd within its TTL).
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
    /// No usable answer: retried at the next tick after a short pause.
    Failed,
    /// The lease is no longer held (every claim settled meanwhile).
    Unheld,
}

impl KeepAlives {
    /// A forwarded claim attached to `lease` at `now`. A lease this worker did not hold yet
    /// is refreshed at once: another worker may have granted it up to half a TTL ago.
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

    /// Number of leases held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no lease is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

// ------------------------------------------------------------------------------ answers

/// The JSON of a 200 answer, or why there is none.
fn answer(status: Option<u16>, body: &[u8]) -> Result<Value, EtcdError> {
    let Some(status) = status else {
        return Err(EtcdError::Unavailable(
            "no answer (timeout, reset or no healthy member)".into(),
        ));
    };
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.get("message").or_else(|| v.get("error")))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if message.contains("lease not found") {
        return Err(EtcdError::LeaseNotFound);
    }
    if status != 200 {
        return Err(EtcdError::Unavailable(format!(
            "HTTP {status}{}{message}",
            if message.is_empty() { "" } else { ": " }
        )));
    }
    match parsed {
        Some(v @ Value::Object(_)) => {
            // 200 with an embedded gRPC error (the gateway's streaming form).
            if let Some(err) = v.get("error") {
                if !err.is_null() && err.as_str() != Some("") {
                    return Err(EtcdError::Unavailable(format!("etcd error: {err}")));
                }
            }
            Ok(v)
        }
        _ => Err(EtcdError::Malformed("not a JSON object".into())),
    }
}

/// An int64 as the gateway writes it (a string) or as a number.
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// A key-value as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// Revision of the last write.
    pub mod_revision: i64,
    /// The value (decoded from base64).
    pub value: Vec<u8>,
    /// Attached lease (0: none).
    pub lease: i64,
}

fn kv_of(v: &Value) -> Result<Kv, EtcdError> {
    let value = match v.get("value").and_then(Value::as_str) {
        None => Vec::new(),
        Some(s) => b64_decode(s).ok_or_else(|| EtcdError::Malformed("value not base64".into()))?,
    };
    Ok(Kv {
        mod_revision: int(v.get("mod_revision"))
            .ok_or_else(|| EtcdError::Malformed("kv without mod_revision".into()))?,
        value,
        lease: int(v.get("lease")).unwrap_or(0),
    })
}

fn first_kv(range: Option<&Value>) -> Result<Option<Kv>, EtcdError> {
    match range
        .and_then(|r| r.get("kvs"))
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        None => Ok(None),
        Some(kv) => kv_of(kv).map(Some),
    }
}

/// What a txn answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compare held (the success branch ran).
    pub succeeded: bool,
    /// The cluster revision after the txn (the revision of our put when it succeeded).
    pub revision: i64,
    /// On failure, the key as the failure branch's range found it (`None`: absent).
    pub current: Option<Kv>,
}

/// Parses a txn answer.
pub fn parse_txn(status: Option<u16>, body: &[u8]) -> Result<TxnResult, EtcdError> {
    let v = answer(status, body)?;
    let revision = int(v.get("header").and_then(|h| h.get("revision")))
        .ok_or_else(|| EtcdError::Malformed("txn without header.revision".into()))?;
    let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
    let range = v
        .get("responses")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(|r| r.get("response_range"));
    let current = if succeeded { None } else { first_kv(range)? };
    Ok(TxnResult {
        succeeded,
        revision,
        current,
    })
}

/// Parses a range answer: the key's value and revision, if present.
pub fn parse_range(status: Option<u16>, body: &[u8]) -> Result<Option<Kv>, EtcdError> {
    let v = answer(status, body)?;
    first_kv(Some(&v))
}

// ------------------------------------------------------------------------------ requests

/// Fleet settings bound to a configuration.
#[derive(Debug, Clone, Copy)]
pub struct Fleet<'a> {
    /// The `store.etcd` block.
    pub spec: &'a EtcdSpec,
    namespace: &'a str,
    capacity: u32,
}

/// Whether a completed record may be written to etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValuePolicy {
    /// Small enough: write it.
    Store,
    /// Over `maxValueBytes` (etcd refuses requests over its limit, 1.5 MiB by default):
    /// not written; the key stays claimed until its lease lapses, then a retry goes through.
    Hold,
}

impl<'a> Fleet<'a> {
    /// Fleet mode of `config`, when `store.etcd` is set.
    pub fn new(config: &'a Config) -> Option<Self> {
        config.store_etcd.as_ref().map(|spec| Self {
            spec,
            namespace: &config.store_namespace,
            capacity: config.store_capacity.max(1),
        })
    }

    /// The etcd key of a key id: `<prefix><namespace>/<hex>`.
    pub fn key(&self, key_id: &KeyId) -> String {
        format!("{}{}/{}", self.spec.prefix, self.namespace, key_id.to_hex())
    }

    /// Whether the fail policy forwards without idempotency.
    pub fn fails_open(&self) -> bool {
        self.spec.fail_policy == FailPolicy::Open
    }

    /// The lease deadline for a claim.
    pub fn deadline_of(&self, claim: &Claim) -> Millis {
        lease_deadline(claim.expires_at, self.spec.lease_bucket_ms)
    }

    /// Whether an encoded record of `len` bytes may be written.
    pub fn value_policy(&self, len: usize) -> ValuePolicy {
        if u64::try_from(len).unwrap_or(u64::MAX) <= self.spec.max_value_bytes {
            ValuePolicy::Store
        } else {
            ValuePolicy::Hold
        }
    }

    /// `POST /v3/kv/range` for the key.
    pub fn lookup_call(&self, key: &str) -> Call {
        Call {
            path: RANGE_PATH,
            body: json!({"key": b64_encode(key.as_bytes())})
                .to_string()
                .into_bytes(),
        }
    }

    /// Shared-data key of the cache slot of `key_id`.
    pub fn cache_key(&self, key_id: &KeyId) -> String {
        format!(
            "{}:fc:{}",
            self.namespace,
            key_id.slot_seed() % u64::from(self.capacity)
        )
    }
}

fn put_op(key: &str, value: &[u8], lease: i64) -> Value {
    let put = if lease > 0 {
        json!({"key": b64_encode(key.as_bytes()), "value": b64_encode(value), "lease": lease.to_string()})
    } else {
        json!({"key": b64_encode(key.as_bytes()), "value": b64_encode(value)})
    };
    json!({ "request_put": put })
}

fn range_op(key: &str) -> Value {
    json!({"request_range": {"key": b64_encode(key.as_bytes())}})
}

/// A txn: `compare` → `success`, else range the key.
fn txn(compare: Value, success: Value, key: &str) -> Call {
    Call {
        path: TXN_PATH,
        body: json!({"compare": [compare], "success": [success], "failure": [range_op(key)]})
            .to_string()
            .into_bytes(),
    }
}

/// The write a claim attempt is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Create,
    /// The key must still be at this revision (takeover of a lapsed or expired record).
    Revision(i64),
}

fn compare(key: &str, expect: Expect) -> Value {
    let k = b64_encode(key.as_bytes());
    match expect {
        Expect::Create => {
            json!({"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
        }
        Expect::Revision(rev) => {
            json!({"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()})
        }
    }
}

/// The claim txn: `expect` → put `record` with `lease`, else range.
pub fn claim_call(key: &str, expect: Expect, record: &Record, lease: i64) -> Call {
    txn(
        compare(key, expect),
        put_op(key, &record.encode(), lease),
        key,
    )
}

// ------------------------------------------------------------------------------ claim

/// A won claim in etcd: forward, then complete or release at `mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetHandle {
    /// The etcd key.
    pub key: String,
    /// The key id.
    pub key_id: KeyId,
    /// Revision of our in-flight record.
    pub mod_revision: i64,
    /// Lease of the key's expiry bucket (the completed record's).
    pub lease: i64,
    /// The in-flight lease the claim is attached to (keep it alive while forwarded).
    pub inflight_lease: i64,
    /// Which in-flight lease that is.
    pub inflight: InFlightLease,
    /// The claim written.
    pub claim: Claim,
}

/// What to do next with a claim in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Dispatch this call and feed the answer to [`ClaimFlow::on_answer`].
    Send(Call),
    /// The attempt needs leases ([`ClaimFlow::leases`]) other than those it has (a takeover
    /// moved the claim to another expiry bucket, or a re-poll to another in-flight window),
    /// or one of them vanished (`fresh`: grant new ones rather than trust the cache); then
    /// call [`ClaimFlow::call`].
    NeedLeases {
        /// Whether cached leases must not be used.
        fresh: bool,
    },
    /// The key is in flight elsewhere and the rule waits (`onConcurrent: wait`): park the
    /// request and [`ClaimFlow::repoll`] it until it is answered (no later than `deadline`,
    /// when a still in-flight key answers 409).
    Wait {
        /// End of the wait.
        deadline: Millis,
    },
    /// The claim is ours: forward.
    Forward(FleetHandle),
    /// Answer without forwarding (replay, mismatch, duplicate, in flight); `completed` is
    /// the completed record found, to cache.
    Answer {
        /// A `Replay` or `Reject` decision.
        decision: Decision,
        /// The completed record behind the decision, if any.
        completed: Option<Record>,
    },
    /// etcd could not decide: apply the fail policy. `maybe_claimed`: an attempt may have
    /// committed ([`ClaimFlow::abandon_call`] removes it).
    Unavailable {
        /// Why.
        reason: String,
        /// Whether an attempt may have written our record.
        maybe_claimed: bool,
    },
}

/// A claim in progress: which write is attempted, with which owner token.
#[derive(Debug, Clone)]
pub struct ClaimFlow {
    key: String,
    key_id: KeyId,
    request: Request,
    claim: Claim,
    expect: Expect,
    lease: i64,
    inflight: InFlightLease,
    inflight_lease: i64,
    lease_ms: u64,
    wait_deadline: Option<Millis>,
    bucket_ms: u64,
    retries: u32,
    attempts_left: u32,
    rounds: u32,
    sent: bool,
    /// Whether a sent attempt got no clear answer (it may have committed).
    ambiguous: bool,
}

impl ClaimFlow {
    /// Starts claiming `key_id` for `request` at `now`: the caller obtains the lease for
    /// [`ClaimFlow::deadline`], then dispatches [`ClaimFlow::call`].
    pub fn start(
        fleet: &Fleet<'_>,
        rule: &Rule,
        key_id: KeyId,
        request: Request,
        now: Millis,
    ) -> Self {
        let claim = match decide_waiting(rule, &request, None, now, None) {
            Decision::Forward { claim, .. } => claim,
            // decide() on an absent record always forwards; keep a sane claim regardless.
            _ => Claim {
                owner: request.owner,
                lease_until: now.saturating_add(rule.lease_ms),
                expires_at: now.saturating_add(rule.ttl_ms),
                fingerprint: request.fingerprint,
            },
        };
        Self {
            key: fleet.key(&key_id),
            key_id,
            request,
            claim,
            expect: Expect::Create,
            lease: 0,
            inflight: InFlightLease::at(rule.lease_ms, now),
            inflight_lease: 0,
            lease_ms: rule.lease_ms,
            wait_deadline: None,
            bucket_ms: fleet.spec.lease_bucket_ms,
            retries: fleet.spec.retries,
            attempts_left: fleet.spec.retries,
            rounds: 0,
            sent: false,
            ambiguous: false,
        }
    }

    /// The deadline of the expiry lease the current attempt needs.
    pub fn deadline(&self) -> Millis {
        lease_deadline(self.claim.expires_at, self.bucket_ms)
    }

    /// The leases the current attempt needs: its in-flight lease, then its expiry lease.
    pub fn leases(&self) -> [Lease; 2] {
        [
            Lease::InFlight(self.inflight),
            Lease::Expiry {
                deadline: self.deadline(),
            },
        ]
    }

    /// The claim being attempted.
    pub fn claim(&self) -> &Claim {
        &self.claim
    }

    /// The etcd key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key id.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The txn of the current attempt with the ids of [`ClaimFlow::leases`]: the in-flight
    /// record is put with the in-flight lease; the expiry lease is kept for the completion.
    pub fn call(&mut self, inflight_lease: i64, expiry_lease: i64) -> Call {
        self.inflight_lease = inflight_lease;
        self.lease = expiry_lease;
        self.sent = true;
        claim_call(&self.key, self.expect, &self.claim.record(), inflight_lease)
    }

    fn resend(&mut self) -> Step {
        Step::Send(claim_call(
            &self.key,
            self.expect,
            &self.claim.record(),
            self.inflight_lease,
        ))
    }

    /// After [`Step::Wait`]: a new attempt at `now` (a create txn whose failure branch
    /// reads the key), for a claim that starts now if it wins.
    pub fn repoll(&mut self, rule: &Rule, now: Millis) -> Step {
        let before = self.leases();
        if let Decision::Forward { claim, .. } =
            decide_waiting(rule, &self.request, None, now, None)
        {
            self.claim = claim;
        }
        self.inflight = InFlightLease::at(self.lease_ms, now);
        self.expect = Expect::Create;
        self.attempts_left = self.retries;
        self.rounds = 0;
        if self.leases() != before || self.lease <= 0 || self.inflight_lease <= 0 {
            Step::NeedLeases { fresh: false }
        } else {
            self.resend()
        }
    }

    /// The call removing our record if an attempt committed unseen (after
    /// [`Step::Unavailable`] with `maybe_claimed`): txn `value == <our record>` → delete.
    pub fn abandon_call(&self) -> Option<Call> {
        if !self.sent {
            return None;
        }
        let k = b64_encode(self.key.as_bytes());
        let cmp = json!({"key": k, "target": "VALUE", "result": "EQUAL",
            "value": b64_encode(&self.claim.record().encode())});
        Some(Call {
            path: TXN_PATH,
            body: json!({"compare": [cmp], "success": [{"request_delete_range": {"key": k}}], "failure": []})
                .to_string()
                .into_bytes(),
        })
    }

    /// Feeds the answer to the last call (`status` `None`: no answer, e.g. a timeout).
    pub fn on_answer(
        &mut self,
        rule: &Rule,
        status: Option<u16>,
        body: &[u8],
        now: Millis,
    ) -> Step {
        let result = match parse_txn(status, body) {
            Ok(r) => r,
            Err(EtcdError::LeaseNotFound) => {
                self.rounds += 1;
                if self.rounds > MAX_ROUNDS {
                    return Step::Unavailable {
                        reason: "etcd keeps losing the leases granted".into(),
                        maybe_claimed: self.ambiguous,
                    };
                }
                return Step::NeedLeases { fresh: true };
            }
            Err(e) => {
                if matches!(e, EtcdError::Unavailable(_)) {
                    self.ambiguous = true;
                }
                if self.attempts_left > 0 {
                    self.attempts_left -= 1;
                    // Same owner token: if the lost attempt committed, the retry finds it.
                    return self.resend();
                }
                return Step::Unavailable {
                    reason: e.to_string(),
                    maybe_claimed: self.ambiguous,
                };
            }
        };
        if result.succeeded {
            return Step::Forward(self.handle(result.revision));
        }
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            return Step::Unavailable {
                reason: "too much contention on the key in etcd".into(),
                maybe_claimed: self.ambiguous,
            };
        }
        self.attempts_left = self.retries;
        let Some(kv) = result.current else {
            // Deleted between compare and range (released, or its lease ran out): create.
            self.expect = Expect::Create;
            return self.resend();
        };
        let mut record = Record::decode(&kv.value).ok();
        if let Some(Record::InFlight {
            owner, lease_until, ..
        }) = &mut record
        {
            if *owner == self.request.owner {
                // An earlier attempt committed before its answer was lost: the claim is ours.
                return Step::Forward(self.handle(kv.mod_revision));
            }
            if kv.lease != 0 {
                // Attached to an in-flight lease that its Envoy keeps alive: the key is held
                // as long as etcd has it, whatever the record's own lease says.
                *lease_until = Millis::MAX;
            }
        }
        // An undecodable value is never trusted: it is taken over like a vacant key.
        match decide_waiting(
            rule,
            &self.request,
            record.as_ref(),
            now,
            self.wait_deadline,
        ) {
            Decision::Forward { claim, .. } => {
                let before = self.leases();
                self.claim = claim;
                self.expect = Expect::Revision(kv.mod_revision);
                if self.leases() != before || self.lease <= 0 || self.inflight_lease <= 0 {
                    Step::NeedLeases { fresh: false }
                } else {
                    self.resend()
                }
            }
            Decision::Wait { deadline } => {
                self.wait_deadline = Some(deadline);
                Step::Wait { deadline }
            }
            decision => Step::Answer {
                decision,
                completed: record.filter(|r| matches!(r, Record::Completed { .. })),
            },
        }
    }

    fn handle(&self, mod_revision: i64) -> FleetHandle {
        FleetHandle {
            key: self.key.clone(),
            key_id: self.key_id,
            mod_revision,
            lease: self.lease,
            inflight_lease: self.inflight_lease,
            inflight: self.inflight,
            claim: self.claim,
        }
    }
}

// ------------------------------------------------------------------------------ complete

/// The completed record of a handle's claim.
pub fn completed_record(handle: &FleetHandle, response: &StoredResponse) -> Record {
    Record::Completed {
        owner: handle.claim.owner,
        expires_at: handle.claim.expires_at,
        fingerprint: handle.claim.fingerprint,
        response: response.clone(),
    }
}

/// The completion txn, or `Err(ValuePolicy::Hold)` when the record is over
/// `maxValueBytes`.
pub fn complete_call(
    fleet: &Fleet<'_>,
    handle: &FleetHandle,
    response: &StoredResponse,
) -> Result<Call, ValuePolicy> {
    let value = completed_record(handle, response).encode();
    match fleet.value_policy(value.len()) {
        ValuePolicy::Hold => Err(ValuePolicy::Hold),
        ValuePolicy::Store => Ok(txn(
            compare(&handle.key, Expect::Revision(handle.mod_revision)),
            put_op(&handle.key, &value, handle.lease),
            &handle.key,
        )),
    }
}

/// How a completion ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The record is stored.
    Stored,
    /// The claim was lost (its lease lapsed and another request took the key).
    Lost,
}

/// Parses the answer to [`complete_call`]; a failed compare whose current record is our
/// completed record (an earlier attempt committed) counts as stored.
pub fn complete_outcome(
    handle: &FleetHandle,
    status: Option<u16>,
    body: &[u8],
) -> Result<Completion, EtcdError> {
    let r = parse_txn(status, body)?;
    if r.succeeded {
        return Ok(Completion::Stored);
    }
    let mine = r
        .current
        .and_then(|kv| Record::decode(&kv.value).ok())
        .is_some_and(
            |rec| matches!(rec, Record::Completed { owner, .. } if owner == handle.claim.owner),
        );
    Ok(if mine {
        Completion::Stored
    } else {
        Completion::Lost
    })
}

/// The release txn: delete the key if it still holds our claim.
pub fn release_call(handle: &FleetHandle) -> Call {
    let k = b64_encode(handle.key.as_bytes());
    Call {
        path: TXN_PATH,
        body: json!({"compare": [compare(&handle.key, Expect::Revision(handle.mod_revision))],
            "success": [{"request_delete_range": {"key": k}}], "failure": []})
        .to_string()
        .into_bytes(),
    }
}

// ------------------------------------------------------------------------------ cache

/// Encodes a completed record for the local cache slot of `key_id`.
pub fn cache_value(key_id: &KeyId, record: &Record) -> Vec<u8> {
    let enc = record.encode();
    let mut out = Vec::with_capacity(16 + enc.len());
    out.extend_from_slice(&key_id.0);
    out.extend_from_slice(&enc);
    out
}

/// The completed record cached for `key_id`, if the slot holds it and it is live at `now`.
pub fn cache_lookup(bytes: &[u8], key_id: &KeyId, now: Millis) -> Option<Record> {
    let (id, rest) = (bytes.get(..16)?, bytes.get(16..)?);
    if id != key_id.0 {
        return None;
    }
    match Record::decode(rest).ok()? {
        r @ Record::Completed { expires_at, .. } if expires_at > now => Some(r),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Rejection;
    use crate::fingerprint::Fingerprint;

    fn cfg(extra: &str) -> Config {
        Config::from_json(&format!(
            r#"{{"ttlSeconds": 60, "leaseSeconds": 10, "store": {{"namespace": "ns", "etcd": {{"leaseBucketSeconds": 30, "retries": 1, "maxValueBytes": 2048 {extra}}}}}}}"#
        ))
        .unwrap()
    }

    fn req(fp: u8, owner: u64) -> Request {
        Request {
            fingerprint: Fingerprint([fp; 32]),
            owner,
            expires_in_ms: None,
        }
    }

    /// Another request's records for the key (fingerprint 1, expiring at 70 s).
    fn theirs_in_flight(lease_until: u64) -> Record {
        Record::InFlight {
            owner: 5,
            lease_until,
            expires_at: 70_000,
            fingerprint: Fingerprint([1; 32]),
        }
    }

    fn theirs_completed() -> Record {
        Record::Completed {
            owner: 5,
            expires_at: 70_000,
            fingerprint: Fingerprint([1; 32]),
            response: StoredResponse {
                status: 201,
                headers: vec![("content-type".into(), b"text/plain".to_vec())],
                body: b"made".to_vec(),
            },
        }
    }

    fn body_of(call: &Call) -> Value {
        serde_json::from_slice(&call.body).unwrap()
    }

    fn succeeded(rev: i64) -> Vec<u8> {
        format!(r#"{{"header":{{"cluster_id":"1","member_id":"2","revision":"{rev}","raft_term":"2"}},"succeeded":true,"responses":[{{"response_put":{{"header":{{"revision":"{rev}"}}}}}}]}}"#).into_bytes()
    }

    fn failed_with(rev: i64, value: Option<&[u8]>) -> Vec<u8> {
        failed_with_lease(rev, value, 77)
    }

    fn failed_with_lease(rev: i64, value: Option<&[u8]>, lease: i64) -> Vec<u8> {
        match value {
            Some(v) => format!(r#"{{"header":{{"revision":"{rev}","raft_term":"2"}},"responses":[{{"response_range":{{"header":{{"revision":"{rev}"}},"kvs":[{{"key":"eA==","create_revision":"5","mod_revision":"{}","version":"1","value":"{}","lease":"{lease}"}}],"count":"1"}}}}]}}"#, rev - 1, b64_encode(v)).into_bytes(),
            None => format!(r#"{{"header":{{"revision":"{rev}"}},"responses":[{{"response_range":{{"header":{{"revision":"{rev}"}}}}}}]}}"#).into_bytes(),
        }
    }

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(b64_decode(&b64_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(b64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(b64_encode(b"/t/a"), "L3QvYQ==");
        assert_eq!(b64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(b64_decode("a"), None);
        assert_eq!(b64_decode("a$=="), None);
        assert_eq!(b64_decode("a==="), None);
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
        let g = body_of(&grant_call(59));
        assert_eq!(g, json!({"TTL": "59"}));
        let ok = br#"{"header":{"revision":"1"},"ID":"2324035573703736837","TTL":"59"}"#;
        assert_eq!(
            parse_grant(Some(200), ok).unwrap(),
            2_324_035_573_703_736_837
        );
        assert!(matches!(
            parse_grant(Some(200), br#"{"header":{}}"#),
            Err(EtcdError::Malformed(_))
        ));
        assert!(matches!(
            parse_grant(None, b""),
            Err(EtcdError::Unavailable(_))
        ));
        // the per-Envoy lease cache: bounded keys, values checked against the deadline
        assert_eq!(lease_cache_key("ns", 60_000, w), "ns:fl:2");
        assert_eq!(lease_cache_key("ns", 60_000 + 16 * w, w), "ns:fl:2");
        let v = lease_cache_value(60_000, 42);
        assert_eq!(parse_lease_cache(v.as_bytes(), 60_000), Some(42));
        assert_eq!(parse_lease_cache(v.as_bytes(), 90_000), None);
        assert_eq!(parse_lease_cache(b"junk", 60_000), None);
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
        // cached per Envoy under bounded keys, checked against the lease they are for
        let li = Lease::InFlight(l);
        assert_eq!(li.cache_key("ns", 30_000), "ns:fi:10:2");
        let v = li.cache_value(42);
        assert_eq!(li.parse_cache(v.as_bytes()), Some(42));
        assert_eq!(
            Lease::InFlight(InFlightLease::at(10_000, 15_000)).parse_cache(v.as_bytes()),
            None
        );
        assert_eq!(
            Lease::Expiry { deadline: 2 }.parse_cache(v.as_bytes()),
            None
        );
        assert_eq!(body_of(&li.grant_call(99_999)), json!({"TTL": "10"}));
        assert_eq!(
            body_of(&Lease::Expiry { deadline: 60_000 }.grant_call(1_500)),
            json!({"TTL": "59"})
        );
        // granted ahead by the root context: the current and (close to its window) the
        // next in-flight lease
        assert_eq!(
            leases_ahead(10_000, 12_345),
            [Some(Lease::InFlight(l)), None]
        );
        assert_eq!(
            leases_ahead(10_000, 14_000)[1],
            Some(Lease::InFlight(InFlightLease::at(10_000, 15_000)))
        );
        assert_eq!(leases_ahead(10_000, 13_999)[1], None);
        // keep-alive calls and answers (the gateway's stream form, TTL 0 = gone)
        let k = keepalive_call(7);
        assert_eq!(k.path, KEEPALIVE_PATH);
        assert_eq!(body_of(&k), json!({"ID": "7"}));
        let alive = br#"{"result":{"header":{"revision":"9"},"ID":"7","TTL":"10"}}
"#;
        assert_eq!(parse_keepalive(Some(200), alive), Ok(Some(10)));
        assert_eq!(
            parse_keepalive(
                Some(200),
                br#"{"result":{"header":{"revision":"9"},"ID":"7"}}"#
            ),
            Ok(None)
        );
        assert!(matches!(
            parse_keepalive(None, b""),
            Err(EtcdError::Unavailable(_))
        ));
        assert!(parse_keepalive(
            Some(200),
            br#"{"error":{"grpc_code":14,"message":"etcdserver: no leader"}}"#
        )
        .is_err());

        // the registry: refreshed at once when first held, then every third of the TTL,
        // retried soon after a failure, forgotten when gone or no longer held
        let mut ka = KeepAlives::default();
        ka.hold(0, l, 0); // no lease: nothing to refresh
        assert!(ka.is_empty());
        ka.hold(5, l, 1_000);
        ka.hold(5, l, 1_100);
        ka.hold(6, l, 1_100);
        assert_eq!(ka.len(), 2);
        assert_eq!(ka.due(1_100), vec![5, 6]);
        assert_eq!(ka.due(1_200), Vec::<i64>::new()); // answers pending
        assert_eq!(ka.answered(5, &Ok(Some(10)), 1_200), Refresh::Alive);
        assert_eq!(
            ka.answered(6, &Err(EtcdError::Unavailable("x".into())), 1_200),
            Refresh::Failed
        );
        assert_eq!(ka.due(1_500), vec![6]); // retried after 200 ms
        assert_eq!(ka.answered(6, &Ok(None), 1_510), Refresh::Gone);
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

    #[test]
    fn claim_on_absent_key_forwards() {
        let c = cfg("");
        let f = Fleet::new(&c).unwrap();
        let rule = &c.default_rule;
        let k = KeyId([1; 16]);
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
        assert_eq!(flow.deadline(), 90_000); // expires 61_000 → bucket of 30 s
        assert_eq!(flow.key(), format!("/idemgate/ns/{}", k.to_hex()));
        let call = flow.call(77, 66);
        assert_eq!(call.path, TXN_PATH);
        let b = body_of(&call);
        let key64 = b64_encode(flow.key().as_bytes());
        assert_eq!(
            b["compare"][0],
            json!({"key": key64, "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
        );
        assert_eq!(b["success"][0]["request_put"]["lease"], "77");
        let stored = b64_decode(b["success"][0]["request_put"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(Record::decode(&stored).unwrap(), flow.claim().record());
        assert_eq!(b["failure"][0]["request_range"]["key"], key64);
        match flow.on_answer(rule, Some(200), &succeeded(12), 1_010) {
            Step::Forward(h) => {
                assert_eq!(h.mod_revision, 12);
                // the in-flight record rides the in-flight lease; the expiry lease waits
                assert_eq!(h.inflight_lease, 77);
                assert_eq!(h.lease, 66);
                assert_eq!(h.inflight, InFlightLease::at(10_000, 1_000));
                assert_eq!(h.claim.owner, 9);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn in_flight_elsewhere_conflicts_completed_replays_or_mismatches() {
        let c = cfg("");
        let f = Fleet::new(&c).unwrap();
        let rule = &c.default_rule;
        let k = KeyId([2; 16]);
        let other = theirs_in_flight(20_000);
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
        flow.call(77, 66);
        assert_eq!(
            flow.on_answer(
                rule,
                Some(200),
                &failed_with(30, Some(&other.encode())),
                1_000
            ),
            Step::Answer {
                decision: Decision::Reject(Rejection::Conflict { retry_after_s: 1 }),
                completed: None
            }
        );
        let done = theirs_completed();
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 10), 2_000);
        flow.call(77, 66);
        match flow.on_answer(
            rule,
            Some(200),
            &failed_with(31, Some(&done.encode())),
            2_000,
        ) {
            Step::Answer {
                decision: Decision::Replay(r),
                completed: Some(rec),
            } => {
                assert_eq!(r.body, b"made");
                assert_eq!(rec, done);
            }
            other => panic!("{other:?}"),
        }
        let mut flow = ClaimFlow::start(&f, rule, k, req(2, 11), 2_000);
        flow.call(77, 66);
        assert!(matches!(
            flow.on_answer(
                rule,
                Some(200),
                &failed_with(31, Some(&done.encode())),
                2_000
            ),
            Step::Answer {
                decision: Decision::Reject(Rejection::Mismatch),
                ..
            }
        ));
    }

    #[test]
    fn wait_policy_parks_then_replays_claims_or_gives_up_at_its_deadline() {
        let w = Config::from_json(
            r#"{"leaseSeconds": 2, "onConcurrent": {"action": "wait", "waitMillis": 5000}, "store": {"etcd": {"leaseBucketSeconds": 30}}}"#,
        )
        .unwrap();
        let fw = Fleet::new(&w).unwrap();
        let rule = &w.default_rule;
        let k = KeyId([9; 16]);
        let in_flight = failed_with(30, Some(&theirs_in_flight(2_000).encode()));
        let mut flow = ClaimFlow::start(&fw, rule, k, req(1, 12), 1_000);
        flow.call(1, 66);
        assert_eq!(
            flow.on_answer(rule, Some(200), &in_flight, 1_000),
            Step::Wait { deadline: 6_000 }
        );
        // still in flight at the next poll (past the record's own lease: the etcd lease
        // holds it): wait on, with the same deadline
        let Step::Send(poll) = flow.repoll(rule, 1_020) else {
            panic!()
        };
        assert_eq!(body_of(&poll)["compare"][0]["target"], "CREATE");
        assert_eq!(
            flow.on_answer(rule, Some(200), &in_flight, 1_030),
            Step::Wait { deadline: 6_000 }
        );
        assert_eq!(
            flow.on_answer(rule, Some(200), &in_flight, 5_900),
            Step::Wait { deadline: 6_000 }
        );
        assert_eq!(
            flow.on_answer(rule, Some(200), &in_flight, 6_000),
            Step::Answer {
                decision: Decision::Reject(Rejection::Conflict { retry_after_s: 1 }),
                completed: None
            }
        );
        // completed meanwhile: the waiter replays it
        let done = theirs_completed();
        let mut flow = ClaimFlow::start(&fw, rule, k, req(1, 13), 1_000);
        flow.call(1, 66);
        flow.on_answer(rule, Some(200), &in_flight, 1_000);
        flow.repoll(rule, 1_100);
        assert!(matches!(
            flow.on_answer(
                rule,
                Some(200),
                &failed_with(31, Some(&done.encode())),
                1_110
            ),
            Step::Answer {
                decision: Decision::Replay(_),
                completed: Some(_)
            }
        ));
        // released meanwhile: the re-poll's create wins; the claim starts at the re-poll,
        // in a later in-flight window, so its leases are asked for again
        let mut flow = ClaimFlow::start(&fw, rule, k, req(1, 14), 1_000);
        flow.call(1, 66);
        flow.on_answer(rule, Some(200), &in_flight, 1_000);
        assert_eq!(flow.repoll(rule, 2_200), Step::NeedLeases { fresh: false });
        assert_eq!(
            flow.leases()[0],
            Lease::InFlight(InFlightLease {
                ttl_s: 2,
                generation: 2
            })
        );
        flow.call(3, 66);
        match flow.on_answer(rule, Some(200), &succeeded(40), 2_210) {
            Step::Forward(h) => {
                assert_eq!(h.claim.expires_at, 2_200 + rule.ttl_ms);
                assert_eq!(h.inflight_lease, 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lapsed_lease_or_expired_record_is_taken_over_on_mod_revision() {
        let c = cfg("");
        let f = Fleet::new(&c).unwrap();
        let rule = &c.default_rule;
        let k = KeyId([3; 16]);
        let stale = theirs_in_flight(20_000);
        // attached to an in-flight lease, the key is held while etcd has it, even past the
        // record's own lease: its Envoy is refreshing the lease
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 8), 1_000);
        flow.call(77, 66);
        assert!(matches!(
            flow.on_answer(
                rule,
                Some(200),
                &failed_with(40, Some(&stale.encode())),
                25_000
            ),
            Step::Answer {
                decision: Decision::Reject(Rejection::Conflict { .. }),
                completed: None
            }
        ));
        // without a lease, the record's own lease decides
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
        flow.call(77, 66);
        // at 25_000 the lease has lapsed; the new claim expires at 85_000, same bucket (90_000)
        let step = flow.on_answer(
            rule,
            Some(200),
            &failed_with_lease(40, Some(&stale.encode()), 0),
            25_000,
        );
        let Step::Send(call) = step else {
            panic!("{step:?}")
        };
        let b = body_of(&call);
        assert_eq!(b["compare"][0]["target"], "MOD");
        assert_eq!(b["compare"][0]["mod_revision"], "39");
        assert_eq!(b["success"][0]["request_put"]["lease"], "77");
        assert!(matches!(
            flow.on_answer(rule, Some(200), &succeeded(41), 25_010),
            Step::Forward(FleetHandle {
                mod_revision: 41,
                ..
            })
        ));
        // an expired completed record at a later time needs a lease of another bucket
        let old = Record::Completed {
            owner: 5,
            expires_at: 61_000,
            fingerprint: Fingerprint([1; 32]),
            response: StoredResponse::default(),
        };
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 10), 1_000);
        flow.call(77, 66);
        assert_eq!(
            flow.on_answer(
                rule,
                Some(200),
                &failed_with(50, Some(&old.encode())),
                62_000
            ),
            Step::NeedLeases { fresh: false }
        );
        assert_eq!(flow.leases()[1], Lease::Expiry { deadline: 150_000 });
        let b = body_of(&flow.call(88, 66));
        assert_eq!(b["compare"][0]["mod_revision"], "49");
        assert_eq!(b["success"][0]["request_put"]["lease"], "88");
        // garbage in etcd is never trusted: taken over like a vacant key
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 11), 1_000);
        flow.call(77, 66);
        assert!(matches!(
            flow.on_answer(rule, Some(200), &failed_with(60, Some(b"garbage")), 1_000),
            Step::Send(_)
        ));
        // deleted between compare and range: create again
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 12), 1_000);
        flow.call(77, 66);
        let Step::Send(call) = flow.on_answer(rule, Some(200), &failed_with(61, None), 1_000)
        else {
            panic!()
        };
        assert_eq!(body_of(&call)["compare"][0]["target"], "CREATE");
    }

    #[test]
    fn ambiguous_timeout_that_committed_is_recognised_as_mine() {
        let c = cfg("");
        let f = Fleet::new(&c).unwrap();
        let rule = &c.default_rule;
        let k = KeyId([4; 16]);
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
        let first = flow.call(77, 66);
        // timeout: the same txn (same owner token) is sent again
        let Step::Send(again) = flow.on_answer(rule, None, b"", 1_500) else {
            panic!()
        };
        assert_eq!(again, first);
        // the first attempt had committed: the retry's compare fails and finds our record
        let ours = flow.claim().record();
        match flow.on_answer(
            rule,
            Some(200),
            &failed_with(20, Some(&ours.encode())),
            1_600,
        ) {
            Step::Forward(h) => assert_eq!(h.mod_revision, 19),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unavailable_after_retries_with_abandon_and_lease_not_found() {
        let c = cfg("");
        let f = Fleet::new(&c).unwrap();
        let rule = &c.default_rule;
        let k = KeyId([5; 16]);
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
        assert_eq!(flow.abandon_call(), None);
        flow.call(77, 66);
        let no_leader =
            br#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#;
        assert!(matches!(
            flow.on_answer(rule, Some(503), no_leader, 1_000),
            Step::Send(_)
        ));
        match flow.on_answer(rule, None, b"", 1_500) {
            Step::Unavailable {
                maybe_claimed: true,
                reason,
            } => assert!(reason.contains("no answer"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let ab = body_of(&flow.abandon_call().unwrap());
        assert_eq!(ab["compare"][0]["target"], "VALUE");
        assert_eq!(
            b64_decode(ab["compare"][0]["value"].as_str().unwrap()).unwrap(),
            flow.claim().record().encode()
        );
        assert!(ab["success"][0]["request_delete_range"]["key"].is_string());
        // a lease that vanished: grant another, then the same attempt
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 10), 1_000);
        flow.call(77, 66);
        let nf = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        assert_eq!(
            flow.on_answer(rule, Some(404), nf, 1_000),
            Step::NeedLeases { fresh: true }
        );
        assert_eq!(
            body_of(&flow.call(99, 66))["success"][0]["request_put"]["lease"],
            "99"
        );
        // ... but not forever
        let mut last = Step::NeedLeases { fresh: true };
        for _ in 0..MAX_ROUNDS {
            flow.call(99, 66);
            last = flow.on_answer(rule, Some(404), nf, 1_000);
        }
        assert!(matches!(last, Step::Unavailable { .. }), "{last:?}");
        // malformed answers are errors, never panics
        for junk in [
            &b""[..],
            b"[]",
            b"{",
            br#"{"header":{}}"#,
            br#"{"header":{"revision":"x"}}"#,
        ] {
            assert!(parse_txn(Some(200), junk).is_err());
        }
        assert!(parse_txn(
            Some(200),
            br#"{"header":{"revision":"3"},"responses":[{"response_range":{"kvs":[{"mod_revision":"2","value":"!!"}]}}]}"#
        )
        .is_err());
    }

    #[test]
    fn completion_release_and_value_policy() {
        let c = cfg("");
        let f = Fleet::new(&c).unwrap();
        let rule = &c.default_rule;
        let k = KeyId([6; 16]);
        let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
        flow.call(77, 66);
        let Step::Forward(h) = flow.on_answer(rule, Some(200), &succeeded(12), 1_000) else {
            panic!()
        };
        let resp = StoredResponse {
            status: 201,
            headers: vec![],
            body: b"made".to_vec(),
        };
        let b = body_of(&complete_call(&f, &h, &resp).unwrap());
        assert_eq!(b["compare"][0]["target"], "MOD");
        assert_eq!(b["compare"][0]["mod_revision"], "12");
        // the completed record moves to the expiry lease (never refreshed)
        assert_eq!(b["success"][0]["request_put"]["lease"], "66");
        let v = b64_decode(b["success"][0]["request_put"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(Record::decode(&v).unwrap(), completed_record(&h, &resp));
        assert_eq!(
            complete_outcome(&h, Some(200), &succeeded(13)),
            Ok(Completion::Stored)
        );
        // a retried completion whose first attempt committed
        assert_eq!(
            complete_outcome(
                &h,
                Some(200),
                &failed_with(14, Some(&completed_record(&h, &resp).encode()))
            ),
            Ok(Completion::Stored)
        );
        // someone else took the key over
        let theirs = Record::InFlight {
            owner: 1,
            lease_until: 1,
            expires_at: 2,
            fingerprint: Fingerprint([0; 32]),
        };
        assert_eq!(
            complete_outcome(&h, Some(200), &failed_with(14, Some(&theirs.encode()))),
            Ok(Completion::Lost)
        );
        assert!(complete_outcome(&h, None, b"").is_err());
        // too large for etcd: held, not written
        let big = StoredResponse {
            status: 200,
            headers: vec![],
            body: vec![0; 4096],
        };
        assert_eq!(complete_call(&f, &h, &big), Err(ValuePolicy::Hold));
        assert_eq!(f.value_policy(2048), ValuePolicy::Store);
        assert_eq!(f.value_policy(2049), ValuePolicy::Hold);
        let r = body_of(&release_call(&h));
        assert_eq!(r["compare"][0]["mod_revision"], "12");
        assert!(r["success"][0]["request_delete_range"]["key"].is_string());
        let l = body_of(&f.lookup_call("/k"));
        assert_eq!(l, json!({"key": "L2s="}));
        let found = parse_range(
            Some(200),
            br#"{"header":{"revision":"3"},"kvs":[{"key":"L2s=","mod_revision":"3","value":"aGk=","lease":"7"}],"count":"1"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            found,
            Kv {
                mod_revision: 3,
                value: b"hi".to_vec(),
                lease: 7
            }
        );
        assert_eq!(
            parse_range(Some(200), br#"{"header":{"revision":"3"}}"#),
            Ok(None)
        );
    }

    #[test]
    fn cache_answers_only_live_completed_records_of_its_key() {
        let c = cfg("");
        let f = Fleet::new(&c).unwrap();
        let k = KeyId([7; 16]);
        let done = Record::Completed {
            owner: 1,
            expires_at: 5_000,
            fingerprint: Fingerprint([1; 32]),
            response: StoredResponse {
                status: 200,
                headers: vec![],
                body: b"x".to_vec(),
            },
        };
        let v = cache_value(&k, &done);
        assert_eq!(cache_lookup(&v, &k, 4_999), Some(done.clone()));
        assert_eq!(cache_lookup(&v, &k, 5_000), None);
        assert_eq!(cache_lookup(&v, &KeyId([8; 16]), 0), None);
        assert_eq!(cache_lookup(b"short", &k, 0), None);
        let inflight = Record::InFlight {
            owner: 1,
            lease_until: 9,
            expires_at: 9_000,
            fingerprint: Fingerprint([1; 32]),
        };
        assert_eq!(cache_lookup(&cache_value(&k, &inflight), &k, 0), None);
        assert!(f.cache_key(&k).starts_with("ns:fc:"));
        assert!(!f.fails_open());
    }
}
