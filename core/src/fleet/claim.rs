//! Claiming a key in etcd, sans-IO: [`ClaimFlow`] says which call to make next ([`Step`])
//! and turns each answer into the next step; the host only dispatches calls, obtains the
//! leases it asks for, and parks, forwards or answers the request.
//!
//! - **Claim** = one txn: `create_revision == 0` → put the in-flight [`Record`] (with the
//!   in-flight lease), else read the key. When the key exists, the record found is decided
//!   on: replay, reject, wait, or take over (lapsed lease, expired record) with a txn on its
//!   `mod_revision`. The record carries the claim's owner token, so a retry after an
//!   ambiguous timeout that did commit finds its own record and forwards ("mine").
//! - **Wait** (`onConcurrent: wait`): [`Step::Wait`]; the host polls the key with a cheap
//!   serializable read ([`ClaimFlow::poll_call`], [`ClaimFlow::on_poll`]) and only sends a
//!   claim txn when the key looks free.
//! - **Unavailable**: the fail policy; when an attempt may have committed, the claim is
//!   withdrawn by owner token ([`ClaimFlow::abandon`]).
use super::calls::{parse_range, parse_txn, put_op, range_call, txn, Call, Expect, Kv, Reply};
use super::lease::{lease_deadline, InFlightLease, Lease};
use super::write::Write;
use super::Fleet;
use crate::clock::Millis;
use crate::config::Rule;
use crate::decision::{decide_waiting, Claim, Decision, Request};
use crate::key::KeyId;
use crate::record::Record;

/// Takeover rounds (the record changed under us again and again) before giving up.
pub(super) const MAX_ROUNDS: u32 = 8;

/// The claim txn: `expect` → put `record` with `lease`, else read the key.
pub fn claim_call(key: &str, expect: &Expect, record: &Record, lease: i64) -> Call {
    txn(key, expect, put_op(key, record.encode(), lease))
}

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
    /// The in-flight lease the claim is attached to (keep it alive while unsettled).
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
    /// request and poll the key ([`ClaimFlow::poll_call`]) until it is answered (no later
    /// than `deadline`, when a still in-flight key answers 409).
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
    /// committed ([`ClaimFlow::abandon`] withdraws it).
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
    /// Starts claiming `key_id` for `request` at `now`: the caller obtains the leases of
    /// [`ClaimFlow::leases`], then dispatches [`ClaimFlow::call`].
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
        claim_call(
            &self.key,
            &self.expect,
            &self.claim.record(),
            inflight_lease,
        )
    }

    fn resend(&mut self) -> Step {
        Step::Send(claim_call(
            &self.key,
            &self.expect,
            &self.claim.record(),
            self.inflight_lease,
        ))
    }

    /// The claim starts anew at `now` (after a wait): its times, its in-flight window.
    fn restart(&mut self, rule: &Rule, now: Millis, expect: Expect) -> Step {
        let before = self.leases();
        if let Decision::Forward { claim, .. } =
            decide_waiting(rule, &self.request, None, now, None)
        {
            self.claim = claim;
        }
        self.inflight = InFlightLease::at(self.lease_ms, now);
        self.expect = expect;
        self.attempts_left = self.retries;
        self.rounds = 0;
        if self.leases() != before || self.lease <= 0 || self.inflight_lease <= 0 {
            Step::NeedLeases { fresh: false }
        } else {
            self.resend()
        }
    }

    /// After [`Step::Wait`]: a claim attempt at `now` (a create txn whose failure branch
    /// reads the key), for a claim that starts now if it wins.
    pub fn repoll(&mut self, rule: &Rule, now: Millis) -> Step {
        self.restart(rule, now, Expect::Create)
    }

    /// After [`Step::Wait`]: the cheap look at the key a parked request makes (a
    /// serializable range, answered by any member without a raft round; the claim txn that
    /// may follow is linearizable).
    pub fn poll_call(&self) -> Call {
        range_call(&self.key, true)
    }

    /// Feeds the answer to [`ClaimFlow::poll_call`]: wait on, answer, or claim (the next
    /// step is then a claim txn, or leases for it). An error keeps the request waiting until
    /// its deadline, then gives the fail policy.
    pub fn on_poll(&mut self, rule: &Rule, reply: &Reply<'_>, now: Millis) -> Step {
        let deadline = self.wait_deadline.unwrap_or(now);
        match parse_range(reply) {
            Err(e) if now >= deadline => Step::Unavailable {
                reason: e.to_string(),
                maybe_claimed: self.ambiguous,
            },
            Err(_) => Step::Wait { deadline },
            Ok(None) => self.repoll(rule, now),
            Ok(Some(kv)) => self.on_found(rule, &kv, now),
        }
    }

    /// A record of the key known without asking etcd (a completion this worker just
    /// stored): the step for a parked request, as if a poll had found it.
    pub fn on_found(&mut self, rule: &Rule, kv: &Kv, now: Millis) -> Step {
        match self.decide_on(rule, kv, now) {
            Ok(step) => step,
            Err(_) => self.restart(rule, now, Expect::Revision(kv.mod_revision)),
        }
    }

    /// The write withdrawing our record if an attempt committed unseen (after
    /// [`Step::Unavailable`] with `maybe_claimed`, or a request gone while claiming):
    /// `value == <our record>` → delete, retried until etcd answers (see
    /// [`retry_window_ms`](super::write::retry_window_ms)).
    pub fn abandon(&self, now: Millis) -> Option<Write> {
        self.sent.then(|| {
            Write::abandon(
                &self.key,
                self.key_id,
                self.claim.record().encode(),
                now.saturating_add(super::write::retry_window_ms(self.inflight.ttl_s)),
            )
        })
    }

    /// Feeds the answer to the last claim txn.
    pub fn on_answer(&mut self, rule: &Rule, reply: &Reply<'_>, now: Millis) -> Step {
        let result = match parse_txn(reply) {
            Ok(r) => r,
            Err(super::calls::EtcdError::LeaseNotFound) => {
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
                if e.may_have_written() {
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
        match self.decide_on(rule, &kv, now) {
            Ok(step) => step,
            Err(claim) => {
                let before = self.leases();
                self.claim = claim;
                self.expect = Expect::Revision(kv.mod_revision);
                if self.leases() != before || self.lease <= 0 || self.inflight_lease <= 0 {
                    Step::NeedLeases { fresh: false }
                } else {
                    self.resend()
                }
            }
        }
    }

    /// Decides on the record `kv` holds: the step, or `Err(claim)` when it may be taken
    /// over with that claim (on its `mod_revision`).
    fn decide_on(&mut self, rule: &Rule, kv: &Kv, now: Millis) -> Result<Step, Claim> {
        let mut record = Record::decode(&kv.value).ok();
        if let Some(Record::InFlight {
            owner, lease_until, ..
        }) = &mut record
        {
            if *owner == self.request.owner {
                // An earlier attempt committed before its answer was lost: the claim is ours.
                return Ok(Step::Forward(self.handle(kv.mod_revision)));
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
            Decision::Forward { claim, .. } => Err(claim),
            Decision::Wait { deadline } => {
                self.wait_deadline = Some(deadline);
                Ok(Step::Wait { deadline })
            }
            decision => Ok(Step::Answer {
                decision,
                completed: record.filter(|r| matches!(r, Record::Completed { .. })),
            }),
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
