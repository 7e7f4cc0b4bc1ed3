//! The store port and the slot table that makes claims atomic over it.
//!
//! [`CasStore`] is the shape of Envoy's shared data: `get` returns a value and its version,
//! `put` writes only if the version still matches (or, with [`Expect::Absent`], only if the
//! key does not exist yet). There is no delete and no TTL.
//!
//! [`SlotTable`] keeps at most `capacity` index entries, whatever the key churn. It is
//! set-associative: `capacity / probes` buckets (rounded up) of `probes` ways; a key lives in
//! one way of the bucket its [`KeyId`] selects, and the whole bucket is one small value in
//! the host store. A claim is one compare-and-swap of the bucket, so it is atomic against
//! every other key and worker that could take the same ways: two workers never both win.
//! Entries expire and their ways are reused; when every way is live, the completed entry
//! nearest to expiry is evicted; when all are in flight, the request gets 503. A completed
//! response lives in a body value beside its way (`<namespace>:b:<slot>`), tagged with the
//! claim's owner token, so a lookup reads one bucket and, for a replay, one body.
//!
//! ```
//! use idemgate_core::store::{Begun, MemoryStore, SlotTable};
//! use idemgate_core::{Config, Fingerprint, KeyId, StoredResponse};
//! use idemgate_core::decision::Request;
//! let config = Config::default();
//! let store = MemoryStore::default();
//! let table = SlotTable::new(&store, &config);
//! let key = KeyId([7; 16]);
//! let req = Request { fingerprint: Fingerprint([1; 32]), owner: 11, expires_in_ms: None };
//! let (begun, _) = table.begin(&config.default_rule, key, &req, 1_000).unwrap();
//! let Begun::Forward(handle) = begun else { unreachable!() };
//! let resp = StoredResponse { status: 201, headers: vec![], body: b"made".to_vec() };
//! assert!(table.complete(&handle, &resp).unwrap().0);
//! let again = Request { fingerprint: Fingerprint([1; 32]), owner: 12, expires_in_ms: None };
//! let (begun, _) = table.begin(&config.default_rule, key, &again, 2_000).unwrap();
//! assert!(matches!(begun, Begun::Replay(r) if r.body == b"made"));
//! ```
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use crate::clock::Millis;
use crate::config::Config;
use crate::config::Rule;
use crate::decision::{decide_waiting, Claim, Decision, Rejection, Request};
use crate::key::KeyId;
use crate::record::{decode_body, encode_body, Record, SlotEntry, SlotState, StoredResponse};

/// A value's version.
pub type Cas = u32;

/// The condition of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Only if the key does not exist.
    Absent,
    /// Only if the key exists with this version.
    Version(Cas),
}

/// The store could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store error: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

/// A compare-and-swap key-value store.
pub trait CasStore {
    /// The value and version of `key`, if present.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Cas)>, StoreError>;
    /// Writes `value` if `expect` holds; `Ok(false)` when it did not.
    fn put(&self, key: &str, value: &[u8], expect: Expect) -> Result<bool, StoreError>;
}

/// An in-process [`CasStore`], for tests and single-process hosts.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<(Entries, Cas)>,
}

type Entries = HashMap<String, (Vec<u8>, Cas)>;

impl MemoryStore {
    /// Number of keys ever created.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.0.len()).unwrap_or(0)
    }
    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CasStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Cas)>, StoreError> {
        let g = self
            .inner
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        Ok(g.0.get(key).cloned())
    }
    fn put(&self, key: &str, value: &[u8], expect: Expect) -> Result<bool, StoreError> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        let (map, counter) = &mut *g;
        let current = map.get(key).map(|(_, c)| *c);
        let ok = match (expect, current) {
            (Expect::Absent, None) => true,
            (Expect::Version(want), Some(have)) => want == have,
            _ => false,
        };
        if ok {
            *counter = counter.wrapping_add(1).max(1);
            map.insert(key.to_string(), (value.to_vec(), *counter));
        }
        Ok(ok)
    }
}

/// What happened inside the table, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    /// Index keys created in the host store.
    pub index_keys_created: u32,
    /// Body keys created in the host store.
    pub body_keys_created: u32,
    /// Live completed entries evicted to make room.
    pub evictions: u32,
    /// Claims taken over after their lease lapsed.
    pub lease_expiries: u32,
    /// Compare-and-swap conflicts retried.
    pub cas_retries: u32,
}

/// A won claim: forward the request, then [`SlotTable::complete`] or [`SlotTable::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimHandle {
    /// Slot holding the claim.
    pub slot: u32,
    /// The key.
    pub key_id: KeyId,
    /// The claim written.
    pub claim: Claim,
}

/// Outcome of [`SlotTable::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// The claim is ours: forward.
    Forward(ClaimHandle),
    /// Replay this stored response.
    Replay(StoredResponse),
    /// The key is in flight and the rule says wait: look again later, until `deadline`.
    Wait {
        /// When to give up (answer 409).
        deadline: Millis,
    },
    /// Answer with this error.
    Reject(Rejection),
}

const MAX_ATTEMPTS: u32 = 16;

/// The index entries of one bucket (`probes` ways), read with its version.
struct Bucket {
    ways: Vec<SlotEntry>,
    cas: Option<Cas>,
}

impl Bucket {
    fn expect(&self) -> Expect {
        self.cas.map_or(Expect::Absent, Expect::Version)
    }
}

fn holds(entry: &SlotEntry, key_id: &KeyId) -> bool {
    entry.key_id == *key_id && entry.state != SlotState::Free
}

/// Encodes a bucket: the magic/version header of every idemgate value, tag 4, the number
/// of ways, then each way's entry length-prefixed.
fn encode_bucket(ways: &[SlotEntry]) -> Vec<u8> {
    let mut w = crate::codec::Writer::with_capacity(8 + ways.len() * 80);
    w.raw(b"IG");
    w.u8(crate::record::VERSION);
    w.u8(4);
    w.u8(u8::try_from(ways.len()).unwrap_or(u8::MAX));
    for e in ways.iter().take(usize::from(u8::MAX)) {
        w.bytes16(&e.encode());
    }
    w.finish()
}

/// Decodes a bucket of `ways` entries; anything malformed reads as an empty bucket (free
/// ways that may be overwritten), never as trusted data.
fn decode_bucket(bytes: &[u8], ways: usize) -> Vec<SlotEntry> {
    let parse = || -> Result<Vec<SlotEntry>, crate::codec::CodecError> {
        let mut r = crate::codec::Reader::new(bytes);
        if &r.fixed::<2>()? != b"IG" || r.u8()? != crate::record::VERSION || r.u8()? != 4 {
            return Err(crate::codec::CodecError::BadHeader);
        }
        let n = usize::from(r.u8()?);
        let mut out = Vec::with_capacity(ways);
        for _ in 0..n {
            out.push(SlotEntry::decode(r.bytes16()?).unwrap_or_else(|_| SlotEntry::free()));
        }
        r.end()?;
        Ok(out)
    };
    let mut out = parse().unwrap_or_default();
    out.resize(ways, SlotEntry::free());
    out
}

/// Claims, completions and lookups over a [`CasStore`], bounded to `capacity` entries.
///
/// The table is set-associative: `capacity / probes` buckets (rounded up) of `probes` ways.
/// A key lives in the bucket its [`KeyId`] selects; the whole bucket is one value in the
/// host store, so one compare-and-swap decides a claim against every other key that could
/// share its ways — two workers can never both win, and no re-scan is needed.
pub struct SlotTable<'a, S: CasStore + ?Sized> {
    store: &'a S,
    namespace: &'a str,
    buckets: u32,
    ways: u32,
}

impl<'a, S: CasStore + ?Sized> SlotTable<'a, S> {
    /// A table over `store` sized by `config`.
    pub fn new(store: &'a S, config: &'a Config) -> Self {
        let ways = config.store_probes.clamp(1, config.store_capacity.max(1));
        Self {
            store,
            namespace: &config.store_namespace,
            buckets: config.store_capacity.max(1).div_ceil(ways),
            ways,
        }
    }

    /// Host-store key of bucket `idx` (its index entries).
    pub fn index_key(&self, idx: u32) -> String {
        format!("{}:i:{idx}", self.namespace)
    }

    /// Host-store key of slot `slot`'s body value (`slot` = bucket × ways + way).
    pub fn body_key(&self, slot: u32) -> String {
        format!("{}:b:{slot}", self.namespace)
    }

    fn bucket_of(&self, key_id: &KeyId) -> u32 {
        u32::try_from(key_id.slot_seed() % u64::from(self.buckets)).unwrap_or(0)
    }

    fn read(&self, idx: u32) -> Result<Bucket, StoreError> {
        let ways = usize::try_from(self.ways).unwrap_or(1);
        Ok(match self.store.get(&self.index_key(idx))? {
            None => Bucket {
                ways: vec![SlotEntry::free(); ways],
                cas: None,
            },
            Some((bytes, cas)) => Bucket {
                ways: decode_bucket(&bytes, ways),
                cas: Some(cas),
            },
        })
    }

    fn slot(&self, bucket: u32, way: usize) -> u32 {
        bucket
            .saturating_mul(self.ways)
            .saturating_add(u32::try_from(way).unwrap_or(0))
    }

    /// Looks the key up, decides, and when the decision is to forward, claims the key
    /// atomically.
    pub fn begin(
        &self,
        rule: &Rule,
        key_id: KeyId,
        request: &Request,
        now: Millis,
    ) -> Result<(Begun, Events), StoreError> {
        self.begin_waiting(rule, key_id, request, now, None)
    }

    /// [`SlotTable::begin`] for a request already waiting until `wait_deadline`.
    pub fn begin_waiting(
        &self,
        rule: &Rule,
        key_id: KeyId,
        request: &Request,
        now: Millis,
        wait_deadline: Option<Millis>,
    ) -> Result<(Begun, Events), StoreError> {
        let mut ev = Events::default();
        let idx = self.bucket_of(&key_id);
        for _ in 0..MAX_ATTEMPTS {
            let mut bucket = self.read(idx)?;
            let found = bucket
                .ways
                .iter()
                .position(|e| holds(e, &key_id) && !e.is_vacant(now))
                .or_else(|| bucket.ways.iter().position(|e| holds(e, &key_id)));
            let existing = match found {
                None => None,
                Some(way) => {
                    let entry = bucket
                        .ways
                        .get(way)
                        .cloned()
                        .unwrap_or_else(SlotEntry::free);
                    match self.record_of(&entry, self.slot(idx, way), now)? {
                        Some(r) => Some(r),
                        // The body changed under us: the slot is being rewritten. Look again.
                        None => {
                            ev.cas_retries += 1;
                            continue;
                        }
                    }
                }
            };
            let (claim, lease_expired) =
                match decide_waiting(rule, request, existing.as_ref(), now, wait_deadline) {
                    Decision::Replay(r) => return Ok((Begun::Replay(r), ev)),
                    Decision::Wait { deadline } => return Ok((Begun::Wait { deadline }, ev)),
                    Decision::Reject(r) => return Ok((Begun::Reject(r), ev)),
                    Decision::Forward {
                        claim,
                        lease_expired,
                    } => (claim, lease_expired),
                };
            let way = match found {
                Some(w) => w,
                None => match choose(&bucket.ways, now) {
                    Choice::Way(w, evict) => {
                        if evict {
                            ev.evictions += 1;
                        }
                        w
                    }
                    Choice::Full(wait_ms) => {
                        return Ok((
                            Begun::Reject(Rejection::StoreUnavailable {
                                retry_after_s: wait_ms.div_ceil(1000).max(1),
                                reason: "every way of the key's bucket holds a request in flight",
                            }),
                            ev,
                        ))
                    }
                },
            };
            if let Some(slot) = bucket.ways.get_mut(way) {
                *slot = SlotEntry {
                    key_id,
                    state: SlotState::InFlight {
                        owner: claim.owner,
                        lease_until: claim.lease_until,
                        expires_at: claim.expires_at,
                        fingerprint: claim.fingerprint,
                    },
                };
            }
            if !self.store.put(
                &self.index_key(idx),
                &encode_bucket(&bucket.ways),
                bucket.expect(),
            )? {
                ev.cas_retries += 1;
                continue;
            }
            if bucket.cas.is_none() {
                ev.index_keys_created += 1;
            }
            if lease_expired {
                ev.lease_expiries += 1;
            }
            let handle = ClaimHandle {
                slot: self.slot(idx, way),
                key_id,
                claim,
            };
            return Ok((Begun::Forward(handle), ev));
        }
        Ok((
            Begun::Reject(Rejection::StoreUnavailable {
                retry_after_s: 1,
                reason: "too much contention on the store",
            }),
            ev,
        ))
    }

    /// The record an entry stands for; `None` when its body no longer matches (rewritten).
    fn record_of(
        &self,
        entry: &SlotEntry,
        slot: u32,
        now: Millis,
    ) -> Result<Option<Record>, StoreError> {
        Ok(Some(match &entry.state {
            SlotState::Free => return Ok(None),
            SlotState::InFlight {
                owner,
                lease_until,
                expires_at,
                fingerprint,
            } => Record::InFlight {
                owner: *owner,
                lease_until: *lease_until,
                expires_at: *expires_at,
                fingerprint: *fingerprint,
            },
            SlotState::Completed {
                owner,
                expires_at,
                fingerprint,
            } => {
                let response = if *expires_at <= now {
                    StoredResponse::default()
                } else {
                    match self.store.get(&self.body_key(slot))? {
                        Some((bytes, _)) => match decode_body(&bytes) {
                            Ok((o, r)) if o == *owner => r,
                            _ => return Ok(None),
                        },
                        None => return Ok(None),
                    }
                };
                Record::Completed {
                    owner: *owner,
                    expires_at: *expires_at,
                    fingerprint: *fingerprint,
                    response,
                }
            }
        }))
    }

    fn locate(&self, handle: &ClaimHandle) -> (u32, usize) {
        let ways = self.ways.max(1);
        (
            handle.slot / ways,
            usize::try_from(handle.slot % ways).unwrap_or(0),
        )
    }

    /// Rewrites our in-flight entry in its bucket with `next`, retrying when other ways of
    /// the bucket change meanwhile. `Ok(false)` when the entry is no longer ours.
    fn replace_ours(&self, handle: &ClaimHandle, next: &SlotEntry) -> Result<bool, StoreError> {
        self.replace_ours_in(handle, next, None)
    }

    /// [`Self::replace_ours`], starting from `read` (the bucket as just read by the caller)
    /// when given: one store read fewer when nothing changed the bucket meanwhile; a CAS
    /// mismatch reads it again.
    fn replace_ours_in(
        &self,
        handle: &ClaimHandle,
        next: &SlotEntry,
        mut read: Option<Bucket>,
    ) -> Result<bool, StoreError> {
        let (idx, way) = self.locate(handle);
        for _ in 0..MAX_ATTEMPTS {
            let mut bucket = match read.take() {
                Some(b) => b,
                None => self.read(idx)?,
            };
            let ours = matches!(bucket.ways.get(way), Some(SlotEntry { key_id, state: SlotState::InFlight { owner, .. } })
                if *key_id == handle.key_id && *owner == handle.claim.owner);
            if !ours {
                return Ok(false);
            }
            if let Some(slot) = bucket.ways.get_mut(way) {
                *slot = next.clone();
            }
            if self.store.put(
                &self.index_key(idx),
                &encode_bucket(&bucket.ways),
                bucket.expect(),
            )? {
                return Ok(true);
            }
        }
        Err(StoreError("too much contention on the store".into()))
    }

    /// Stores the response of a won claim. `Ok(false)` when the claim was lost meanwhile
    /// (its lease lapsed and another request took the key).
    pub fn complete(
        &self,
        handle: &ClaimHandle,
        response: &StoredResponse,
    ) -> Result<(bool, Events), StoreError> {
        let mut ev = Events::default();
        let (idx, way) = self.locate(handle);
        let bucket = self.read(idx)?;
        let still_ours = matches!(bucket.ways.get(way), Some(SlotEntry { key_id, state: SlotState::InFlight { owner, .. } })
            if *key_id == handle.key_id && *owner == handle.claim.owner);
        if !still_ours {
            return Ok((false, ev));
        }
        let body_key = self.body_key(handle.slot);
        let body_expect = match self.store.get(&body_key)? {
            Some((_, cas)) => Expect::Version(cas),
            None => Expect::Absent,
        };
        if !self.store.put(
            &body_key,
            &encode_body(handle.claim.owner, response),
            body_expect,
        )? {
            return Ok((false, ev));
        }
        if body_expect == Expect::Absent {
            ev.body_keys_created += 1;
        }
        let done = SlotEntry {
            key_id: handle.key_id,
            state: SlotState::Completed {
                owner: handle.claim.owner,
                expires_at: handle.claim.expires_at,
                fingerprint: handle.claim.fingerprint,
            },
        };
        Ok((self.replace_ours_in(handle, &done, Some(bucket))?, ev))
    }

    /// Gives a won claim back, so the key is free at once. `Ok(false)` when it was no
    /// longer ours.
    pub fn release(&self, handle: &ClaimHandle) -> Result<bool, StoreError> {
        self.replace_ours(handle, &SlotEntry::free())
    }

    /// Live entries in the whole table at `now` (reads every bucket: for tests and admin use).
    pub fn live_entries(&self, now: Millis) -> Result<u32, StoreError> {
        let mut n = 0;
        for i in 0..self.buckets {
            n += self
                .read(i)?
                .ways
                .iter()
                .filter(|e| !e.is_vacant(now))
                .count();
        }
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

enum Choice {
    Way(usize, bool),
    Full(Millis),
}

fn choose(ways: &[SlotEntry], now: Millis) -> Choice {
    if let Some(w) = ways.iter().position(|e| e.is_vacant(now)) {
        return Choice::Way(w, false);
    }
    let victim = ways
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match &e.state {
            SlotState::Completed { expires_at, .. } => Some((i, *expires_at)),
            _ => None,
        })
        .min_by_key(|(_, exp)| *exp);
    if let Some((w, _)) = victim {
        return Choice::Way(w, true);
    }
    let wait = ways
        .iter()
        .filter_map(|e| match &e.state {
            SlotState::InFlight { lease_until, .. } => Some(lease_until.saturating_sub(now)),
            _ => None,
        })
        .min()
        .unwrap_or(1000);
    Choice::Full(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn cfg(json: &str) -> Config {
        Config::from_json(json).unwrap()
    }

    fn req(fp: u8, owner: u64) -> Request {
        Request {
            fingerprint: Fingerprint([fp; 32]),
            owner,
            expires_in_ms: None,
        }
    }

    fn resp(body: &[u8]) -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: vec![],
            body: body.to_vec(),
        }
    }

    #[test]
    fn lifecycle() {
        let c = cfg(r#"{"ttlSeconds": 10, "leaseSeconds": 2}"#);
        let s = MemoryStore::default();
        let t = SlotTable::new(&s, &c);
        let k = KeyId([1; 16]);
        let (b, ev) = t.begin(&c.default_rule, k, &req(1, 1), 0).unwrap();
        let Begun::Forward(h) = b else {
            panic!("{b:?}")
        };
        assert_eq!(ev.index_keys_created, 1);
        // concurrent duplicate
        assert!(matches!(
            t.begin(&c.default_rule, k, &req(1, 2), 1_000).unwrap().0,
            Begun::Reject(Rejection::Conflict { .. })
        ));
        // lease lapses: a retry takes over, the first can no longer complete
        let (b2, ev2) = t.begin(&c.default_rule, k, &req(1, 3), 2_000).unwrap();
        let Begun::Forward(h2) = b2 else {
            panic!("{b2:?}")
        };
        assert_eq!(ev2.lease_expiries, 1);
        assert!(!t.complete(&h, &resp(b"first")).unwrap().0);
        assert!(t.complete(&h2, &resp(b"second")).unwrap().0);
        assert!(
            matches!(t.begin(&c.default_rule, k, &req(1, 4), 3_000).unwrap().0, Begun::Replay(r) if r.body == b"second")
        );
        assert_eq!(
            t.begin(&c.default_rule, k, &req(2, 4), 3_000).unwrap().0,
            Begun::Reject(Rejection::Mismatch)
        );
        // expiry (ttl from first use at 2_000)
        assert!(matches!(
            t.begin(&c.default_rule, k, &req(2, 5), 12_000).unwrap().0,
            Begun::Forward(_)
        ));
    }

    #[test]
    fn release_frees_at_once() {
        let c = Config::default();
        let s = MemoryStore::default();
        let t = SlotTable::new(&s, &c);
        let k = KeyId([2; 16]);
        let Begun::Forward(h) = t.begin(&c.default_rule, k, &req(1, 1), 0).unwrap().0 else {
            panic!()
        };
        assert!(t.release(&h).unwrap());
        assert!(!t.release(&h).unwrap());
        assert!(matches!(
            t.begin(&c.default_rule, k, &req(1, 2), 1).unwrap().0,
            Begun::Forward(_)
        ));
    }

    #[test]
    fn bounded_under_churn_with_eviction() {
        let c = cfg(r#"{"store": {"capacity": 64, "probes": 4}}"#);
        let s = MemoryStore::default();
        let t = SlotTable::new(&s, &c);
        let mut evictions = 0;
        for i in 0..5_000u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            id[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
            let (b, ev) = t
                .begin(
                    &c.default_rule,
                    KeyId(id),
                    &req(1, u64::from(i)),
                    u64::from(i),
                )
                .unwrap();
            evictions += ev.evictions;
            let Begun::Forward(h) = b else {
                panic!("{b:?}")
            };
            assert!(t.complete(&h, &resp(b"x")).unwrap().0);
        }
        assert!(evictions > 0);
        assert!(s.len() <= 2 * 64, "{} keys", s.len());
        assert!(t.live_entries(5_000).unwrap() <= 64);
    }

    #[test]
    fn full_of_in_flight_gives_503() {
        let c = cfg(r#"{"store": {"capacity": 2, "probes": 2}}"#);
        let s = MemoryStore::default();
        let t = SlotTable::new(&s, &c);
        for i in 0..2u8 {
            assert!(matches!(
                t.begin(&c.default_rule, KeyId([i; 16]), &req(1, 1), 0)
                    .unwrap()
                    .0,
                Begun::Forward(_)
            ));
        }
        assert!(matches!(
            t.begin(&c.default_rule, KeyId([9; 16]), &req(1, 1), 0)
                .unwrap()
                .0,
            Begun::Reject(Rejection::StoreUnavailable { .. })
        ));
    }

    #[test]
    fn corrupt_buckets_are_overwritten_not_trusted() {
        let c = Config::default();
        let s = MemoryStore::default();
        let t = SlotTable::new(&s, &c);
        let k = KeyId([3; 16]);
        let home = t.bucket_of(&k);
        assert!(s
            .put(&t.index_key(home), b"garbage", Expect::Absent)
            .unwrap());
        assert!(
            matches!(t.begin(&c.default_rule, k, &req(1, 1), 0).unwrap().0, Begun::Forward(h) if h.slot / t.ways == home)
        );
        // a bucket whose entries are corrupt reads as free ways too
        let mut bad = encode_bucket(&[SlotEntry::free()]);
        if let Some(last) = bad.last_mut() {
            *last = 0xff;
        }
        assert_eq!(decode_bucket(&bad, 3), vec![SlotEntry::free(); 3]);
        let round = vec![
            SlotEntry {
                key_id: KeyId([1; 16]),
                state: SlotState::Free,
            },
            SlotEntry::free(),
        ];
        assert_eq!(decode_bucket(&encode_bucket(&round), 2).len(), 2);
    }

    /// Many threads race for one key, many rounds: exactly one wins each round.
    /// A store where another writer claims a second key of the same bucket right after
    /// `complete` has read that bucket (armed once): the completion's CAS then fails and
    /// must read the bucket again, keeping the other claim.
    struct Meddler<'a> {
        inner: MemoryStore,
        armed: std::cell::Cell<bool>,
        meddle: Box<dyn Fn(&MemoryStore) + 'a>,
    }

    impl CasStore for Meddler<'_> {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Cas)>, StoreError> {
            let got = self.inner.get(key);
            if key.contains(":i:") && self.armed.replace(false) {
                (self.meddle)(&self.inner);
            }
            got
        }
        fn put(&self, key: &str, value: &[u8], expect: Expect) -> Result<bool, StoreError> {
            self.inner.put(key, value, expect)
        }
    }

    #[test]
    fn complete_rereads_a_bucket_changed_after_its_check() {
        // one bucket of two ways: both keys land in it
        let c = cfg(r#"{"store": {"capacity": 2, "probes": 2}}"#);
        let (k1, k2) = (KeyId([1; 16]), KeyId([2; 16]));
        let s = Meddler {
            inner: MemoryStore::default(),
            armed: std::cell::Cell::new(false),
            meddle: Box::new(|inner: &MemoryStore| {
                let t = SlotTable::new(inner, &c);
                assert!(matches!(
                    t.begin(&c.default_rule, k2, &req(2, 2), 10).unwrap().0,
                    Begun::Forward(_)
                ));
            }),
        };
        let t = SlotTable::new(&s, &c);
        let Begun::Forward(h1) = t.begin(&c.default_rule, k1, &req(1, 1), 0).unwrap().0 else {
            panic!()
        };
        s.armed.set(true);
        assert!(t.complete(&h1, &resp(b"one")).unwrap().0);
        assert!(!s.armed.get(), "the bucket was read");
        // the completion landed and the other claim survived it
        assert!(matches!(
            t.begin(&c.default_rule, k1, &req(1, 3), 20).unwrap().0,
            Begun::Replay(r) if r.body == b"one"
        ));
        assert!(matches!(
            t.begin(&c.default_rule, k2, &req(2, 4), 20).unwrap().0,
            Begun::Reject(Rejection::Conflict { .. })
        ));
    }

    #[test]
    fn one_winner_under_contention() {
        let c = Arc::new(cfg(r#"{"store": {"capacity": 8, "probes": 4}}"#));
        let s = Arc::new(MemoryStore::default());
        let owners = Arc::new(AtomicU64::new(1));
        for round in 0..50u8 {
            let k = KeyId([round; 16]);
            let wins: Vec<ClaimHandle> = (0..8)
                .map(|_| {
                    let (c, s, owners) = (c.clone(), s.clone(), owners.clone());
                    std::thread::spawn(move || {
                        let t = SlotTable::new(&*s, &c);
                        let owner = owners.fetch_add(1, Ordering::SeqCst);
                        match t.begin(&c.default_rule, k, &req(1, owner), 0).unwrap().0 {
                            Begun::Forward(h) => Some(h),
                            Begun::Reject(Rejection::Conflict { .. }) => None,
                            other => panic!("{other:?}"),
                        }
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(wins.len(), 1, "round {round}");
            // Completed entries stay; the table must keep finding room by evicting them.
            let t = SlotTable::new(&*s, &c);
            assert!(t.complete(&wins[0], &resp(b"r")).unwrap().0);
        }
    }
}
