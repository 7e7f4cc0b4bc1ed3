//! Fleet mode: etcd as the authoritative store, over etcd's native gRPC API, sans-IO.
//!
//! Many Envoys share one etcd cluster. This module builds every call (`etcdserverpb.KV/Txn`,
//! `KV/Range`, `Lease/LeaseGrant`, `Lease/LeaseKeepAlive`; [`messages`] holds the
//! protobuf messages) and turns every answer into the next step; the host only dispatches
//! the calls (`dispatch_grpc_call` in Envoy) and feeds the answers back. Decisions are
//! [`decide_waiting`](crate::decision::decide_waiting)'s, exactly as in local mode.
//!
//! - [`claim`]: claiming a key ([`ClaimFlow`]), waiting on a key in flight elsewhere.
//! - [`write`]: settling a claim ([`Write`]): completion, release, abandon, each
//!   idempotent by owner token and retried until etcd answers it.
//! - [`lease`]: the shared expiry and in-flight leases, and their keep-alives
//!   ([`KeepAlives`]).
//! - [`calls`]: the calls as values and what their answers mean ([`EtcdError`]).
//! - **Cache**: completed records are cached in Envoy's shared data, direct-mapped over
//!   `store.capacity` slots; the cache answers replays and rejections, never a claim.
//!
//! ```
//! use idemgate_core::fleet::{lease::lease_deadline, Fleet};
//! use idemgate_core::Config;
//! let config = Config::from_json(r#"{"store": {"etcd": {"leaseBucketSeconds": 60}}}"#).unwrap();
//! let fleet = Fleet::new(&config).unwrap();
//! assert_eq!(lease_deadline(61_000, 60_000), 120_000);
//! assert!(fleet.key(&idemgate_core::KeyId([0; 16])).starts_with("/idemgate/idemgate/"));
//! ```
pub mod calls;
pub mod claim;
pub mod lease;
pub mod messages;
pub mod write;

pub use calls::{Call, EtcdError, Reply};
pub use claim::{ClaimFlow, FleetHandle, Step};
pub use lease::{InFlightLease, KeepAlives, Lease, Refresh};
pub use write::{Write, WriteKind, WriteStep, Written};

use crate::clock::Millis;
use crate::config::{Config, EtcdSpec, FailPolicy};
use crate::key::KeyId;
use crate::record::Record;

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

    /// Whether an encoded record of `len` bytes may be written.
    pub fn value_policy(&self, len: usize) -> ValuePolicy {
        if u64::try_from(len).unwrap_or(u64::MAX) <= self.spec.max_value_bytes {
            ValuePolicy::Store
        } else {
            ValuePolicy::Hold
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
mod tests;
