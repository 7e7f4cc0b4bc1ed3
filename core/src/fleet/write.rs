//! Settling a claim in etcd, sans-IO: the completion, the release and the abandon of a
//! claim, each one conditional txn ([`Write`]) that is idempotent by owner token, so it is
//! retried ([`WriteStep::Retry`]) until etcd gives an authoritative answer.
//!
//! - **Complete** = `mod_revision == <claim's revision>` → put the completed record with
//!   the key's expiry lease. A failed compare reads the key: our own completed record there
//!   means an earlier attempt landed ([`Written::Stored`], never "not stored" when it
//!   landed); anything else means the claim was lost (its lease lapsed, another request
//!   took the key).
//! - **Release** = `mod_revision == <claim's revision>` → delete (a response that is not
//!   stored frees the key).
//! - **Abandon** = `value == <our in-flight record>` → delete: a claim that may have
//!   committed while every attempt went unanswered, and whose request was answered 503.
//!
//! Each is retried until etcd answers it, for up to 3 in-flight lease TTLs (at least 30 s):
//! longer than any outage the lease survives (etcd restores leases after an election or a
//! restart, and the root context keeps refreshing them meanwhile). A completion or release
//! stops early when its lease is known to have lapsed (its key is gone: nothing to settle).
//!
//! ```
//! use idemgate_core::fleet::write::{Write, WriteStep};
//! use idemgate_core::fleet::calls::Reply;
//! use idemgate_core::KeyId;
//! let mut w = Write::abandon("/k", KeyId([0; 16]), b"record".to_vec(), 10_000);
//! // no answer: again in 25 ms
//! let step = w.on_reply(&Reply::Failed { code: 14, message: "" }, 1_000, true);
//! assert!(matches!(step, WriteStep::Retry { at: 1_025, .. }));
//! ```
use super::calls::{delete_op, parse_txn, put_op, txn, Call, EtcdError, Expect, Reply};
use super::claim::FleetHandle;
use super::{Fleet, ValuePolicy};
use crate::clock::Millis;
use crate::key::KeyId;
use crate::record::{Record, StoredResponse};

/// Which settlement a [`Write`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Store the completed record.
    Complete,
    /// Delete our claim (a response not stored).
    Release,
    /// Delete our in-flight record if an unanswered claim attempt wrote it.
    Abandon,
}

/// How a [`Write`] ended in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The completed record is stored (by this attempt or an earlier one).
    Stored,
    /// The key no longer holds our claim: deleted by us, or gone already.
    Released,
    /// The key holds someone else's record: our claim was lost (its lease lapsed and
    /// another request took the key) before we could settle it.
    Lost,
}

/// What to do after an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteStep {
    /// Settled.
    Done(Written),
    /// No authoritative answer: send [`Write::call`] again at `at`.
    Retry {
        /// When to send it again.
        at: Millis,
        /// What went wrong.
        error: EtcdError,
    },
    /// No more attempts: the outcome in etcd is unknown (`error.may_have_written()`), or
    /// etcd refused the write.
    GiveUp(EtcdError),
}

/// One conditional write settling a claim, retried until etcd answers it.
#[derive(Debug, Clone)]
pub struct Write {
    kind: WriteKind,
    key: String,
    key_id: KeyId,
    call: Call,
    owner: Option<u64>,
    failures: u32,
    deadline: Millis,
}

/// Pause before the next attempt after `failures` failed ones: 25 ms doubling up to 1 s.
fn backoff_ms(failures: u32) -> u64 {
    (25u64 << failures.saturating_sub(1).min(6)).min(1000)
}

/// How long a settlement of a claim on an in-flight lease of `ttl_s` is retried.
pub fn retry_window_ms(ttl_s: u64) -> u64 {
    (ttl_s * 3000).max(30_000)
}

impl Write {
    /// The completion of `handle`'s claim with `response`, and the record it writes; or
    /// `Err(ValuePolicy::Hold)` when that record is over `maxValueBytes`.
    pub fn complete(
        fleet: &Fleet<'_>,
        handle: &FleetHandle,
        response: &StoredResponse,
        now: Millis,
    ) -> Result<(Self, Record), ValuePolicy> {
        let record = Record::Completed {
            owner: handle.claim.owner,
            expires_at: handle.claim.expires_at,
            fingerprint: handle.claim.fingerprint,
            response: response.clone(),
        };
        let value = record.encode();
        if fleet.value_policy(value.len()) == ValuePolicy::Hold {
            return Err(ValuePolicy::Hold);
        }
        let call = txn(
            &handle.key,
            &Expect::Revision(handle.mod_revision),
            put_op(&handle.key, value, handle.lease),
        );
        Ok((Self::new(WriteKind::Complete, handle, call, now), record))
    }

    /// The release of `handle`'s claim.
    pub fn release(handle: &FleetHandle, now: Millis) -> Self {
        let call = txn(
            &handle.key,
            &Expect::Revision(handle.mod_revision),
            delete_op(&handle.key),
        );
        Self::new(WriteKind::Release, handle, call, now)
    }

    fn new(kind: WriteKind, handle: &FleetHandle, call: Call, now: Millis) -> Self {
        Self {
            kind,
            key: handle.key.clone(),
            key_id: handle.key_id,
            call,
            owner: Some(handle.claim.owner),
            failures: 0,
            deadline: now.saturating_add(retry_window_ms(handle.inflight.ttl_s)),
        }
    }

    /// The abandon of the in-flight record `value` at `key`, retried until `deadline`.
    pub fn abandon(key: &str, key_id: KeyId, value: Vec<u8>, deadline: Millis) -> Self {
        let call = txn(key, &Expect::Value(value), delete_op(key));
        Self {
            kind: WriteKind::Abandon,
            key: key.to_string(),
            key_id,
            call,
            owner: None,
            failures: 0,
            deadline,
        }
    }

    /// The call to send (the same for every attempt).
    pub fn call(&self) -> &Call {
        &self.call
    }

    /// Which settlement this is.
    pub fn kind(&self) -> WriteKind {
        self.kind
    }

    /// The key id.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The etcd key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Failed attempts so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Feeds the answer to [`Write::call`] at `now`. `lease_alive`: whether the claim's
    /// in-flight lease may still live (false once a keep-alive found it gone: the key
    /// lapsed, there is nothing left to settle).
    pub fn on_reply(&mut self, reply: &Reply<'_>, now: Millis, lease_alive: bool) -> WriteStep {
        let r = match parse_txn(reply) {
            Ok(r) => r,
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                let at = now.saturating_add(backoff_ms(self.failures));
                return if matches!(error, EtcdError::Refused(_) | EtcdError::LeaseNotFound)
                    || (!lease_alive && self.kind != WriteKind::Abandon)
                    || at >= self.deadline
                {
                    WriteStep::GiveUp(error)
                } else {
                    WriteStep::Retry { at, error }
                };
            }
        };
        if r.succeeded {
            return WriteStep::Done(match self.kind {
                WriteKind::Complete => Written::Stored,
                WriteKind::Release | WriteKind::Abandon => Written::Released,
            });
        }
        let current = r.current.and_then(|kv| Record::decode(&kv.value).ok());
        WriteStep::Done(match (self.kind, current) {
            (WriteKind::Complete, Some(Record::Completed { owner, .. }))
                if Some(owner) == self.owner =>
            {
                Written::Stored
            }
            (WriteKind::Complete, _) => Written::Lost,
            (_, None) => Written::Released,
            (_, Some(Record::InFlight { owner, .. })) if Some(owner) == self.owner => {
                // Our claim at another revision cannot be: a takeover by ourselves would
                // have forwarded from there. Leave it to its lease.
                Written::Lost
            }
            (_, Some(_)) => Written::Lost,
        })
    }
}
