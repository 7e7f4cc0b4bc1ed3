//! Claiming in etcd from the request's own context, and the response's first settlement
//! attempt.
use super::*;
use idemgate_core::fleet::cache_lookup;

/// A claim waiting for etcd.
pub(crate) struct FleetClaim {
    pub(super) rule: usize,
    pub(super) hold: Hold,
    pub(super) flow: ClaimFlow,
    /// Token of the call in flight.
    pub(super) call: u32,
    /// The call in flight is a grant of this lease.
    pub(super) granting: Option<Lease>,
    /// Leases granted for this claim.
    pub(super) got: Vec<(Lease, i64)>,
    /// Cached leases are not to be trusted (one vanished).
    pub(super) fresh: bool,
    /// Parked by the wait policy at least once.
    pub(super) waited: bool,
    /// Grants that failed.
    pub(super) grant_failures: u32,
    /// Answer context, for answers sent from the root context's tick.
    pub(super) ctx: AnswerContext,
}

impl FleetClaim {
    fn lease_id(&self, s: &Shared, lease: Lease) -> Option<i64> {
        self.got
            .iter()
            .find(|(l, _)| *l == lease)
            .map(|(_, id)| *id)
            .or_else(|| (!self.fresh).then(|| cached_lease(s, lease)).flatten())
    }

    /// Dispatches the claim's next call from the current context: a grant of a lease it
    /// has no id for, else the claim txn.
    pub(super) fn send_next(&mut self, s: &Shared) -> Result<(), String> {
        let spec = s
            .config
            .store_etcd
            .as_ref()
            .ok_or_else(|| "fleet mode is not configured".to_string())?;
        let [inflight, expiry] = self.flow.leases();
        let call = match (self.lease_id(s, inflight), self.lease_id(s, expiry)) {
            (Some(i), Some(e)) => {
                self.granting = None;
                self.fresh = false;
                self.flow.call(i, e)
            }
            (None, _) => self.grant(s, inflight),
            (_, None) => self.grant(s, expiry),
        };
        self.call = dispatch(spec, &call)?;
        Ok(())
    }

    /// Feeds etcd's answer to the call in flight (a grant, retried like any call, or an
    /// attempt of the claim flow); returns the next step.
    pub(super) fn answered(&mut self, s: &Shared, reply: &Reply<'_>) -> Step {
        if matches!(reply, Reply::Failed { .. }) {
            s.metrics.inc("fleet_errors");
        }
        let Some(lease) = self.granting.take() else {
            let rule = s.config.rule_at(self.rule);
            return self.flow.on_answer(rule, reply, now_ms());
        };
        match parse_grant(reply) {
            Ok(id) => {
                cache_lease(s, lease, id);
                self.got.push((lease, id));
                Step::NeedLeases { fresh: false }
            }
            Err(_)
                if self.grant_failures < s.config.store_etcd.as_ref().map_or(0, |e| e.retries) =>
            {
                self.grant_failures += 1;
                Step::NeedLeases { fresh: false }
            }
            Err(e) => Step::Unavailable {
                reason: format!("lease grant: {e}"),
                maybe_claimed: false,
            },
        }
    }

    fn grant(&mut self, s: &Shared, lease: Lease) -> Call {
        self.granting = Some(lease);
        s.metrics.inc("fleet_leases");
        lease.grant_call(now_ms())
    }
}

/// Which bytes of a fleet response are held back. The end of the stream is held until the
/// claim is settled; when the response declares its length, so are the bytes that complete
/// it (an HTTP/1.1 client with a `content-length` has its answer once it has them, whether
/// or not the end of the stream follows).
impl Reader {
    /// Fleet mode: answer from the local cache of completed records when it can (never a
    /// claim), else ask etcd; the request is paused until etcd answers.
    pub(crate) fn conclude_fleet(
        &mut self,
        rule_idx: usize,
        resolved: &Resolved,
        request: Request,
        hold: Hold,
        from: From,
    ) -> Action {
        let s = self.shared.clone();
        let Some(f) = Fleet::new(&s.config) else {
            return Action::Continue;
        };
        let rule = s.config.rule_at(rule_idx);
        let now = now_ms();
        if let Ok((Some(bytes), _)) = hostcalls::get_shared_data(&f.cache_key(&resolved.key_id)) {
            if let Some(rec) = cache_lookup(&bytes, &resolved.key_id, now) {
                match idemgate_core::decide(rule, &request, Some(&rec), now) {
                    Decision::Replay(stored) => {
                        s.metrics.inc("fleet_cache_hits");
                        return self.fleet_answer(rule_idx, hold, Some(stored), None);
                    }
                    Decision::Reject(r) => {
                        s.metrics.inc("fleet_cache_hits");
                        return self.fleet_answer(rule_idx, hold, None, Some(r));
                    }
                    // Expired or otherwise claimable: only etcd may grant a claim.
                    _ => {}
                }
            }
        }
        s.metrics.inc("fleet_claims");
        let flow = ClaimFlow::start(&f, rule, resolved.key_id, request, now);
        let mut claim = Box::new(FleetClaim {
            rule: rule_idx,
            hold,
            flow,
            call: 0,
            granting: None,
            got: Vec::new(),
            fresh: false,
            waited: false,
            grant_failures: 0,
            ctx: self.ctx.clone(),
        });
        match self.fleet_next(&mut claim, from) {
            Some(action) => action,
            None => {
                self.phase = Phase::FleetClaim(claim);
                Action::Pause
            }
        }
    }

    /// Sends the claim's next call (a lease grant, or the claim txn). `Some(action)` when
    /// it ended.
    fn fleet_next(&mut self, claim: &mut FleetClaim, from: From) -> Option<Action> {
        let s = self.shared.clone();
        match claim.send_next(&s) {
            Ok(()) => None,
            Err(e) => Some(self.fleet_unavailable(claim, e, false, from)),
        }
    }

    /// An etcd answer to a call this stream made: a claim's, or a settlement's first.
    pub(crate) fn fleet_answered(&mut self, token: u32, answer: &Answer) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::FleetClaim(c) if c.call == token => self.claim_answered(c, &answer.reply()),
            Phase::Settling(st) if st.call == token => {
                let mut st = st;
                let s = self.shared.clone();
                let now = now_ms();
                if let Some((op, at)) =
                    write_answered(&s, &mut st.op, &answer.reply(), now, self.id)
                {
                    // Not settled: the root context carries on (and lets the response go
                    // at the latest at its bound).
                    queue(&s, FleetOp::Write(op), at);
                }
            }
            other => self.phase = other,
        }
    }

    fn claim_answered(&mut self, mut claim: Box<FleetClaim>, reply: &Reply<'_>) {
        let s = self.shared.clone();
        let rule = s.config.rule_at(claim.rule);
        let step = claim.answered(&s, reply);
        let action = match step {
            Step::Send(call) => match s
                .config
                .store_etcd
                .as_ref()
                .map(|spec| dispatch(spec, &call))
            {
                Some(Ok(t)) => {
                    claim.call = t;
                    self.phase = Phase::FleetClaim(claim);
                    return;
                }
                Some(Err(e)) => self.fleet_unavailable(&claim, e, true, From::Elsewhere),
                None => return,
            },
            Step::NeedLeases { fresh } => {
                if fresh {
                    claim.got.clear();
                    claim.fresh = true;
                }
                match self.fleet_next(&mut claim, From::Elsewhere) {
                    None => {
                        self.phase = Phase::FleetClaim(claim);
                        return;
                    }
                    Some(a) => a,
                }
            }
            Step::Wait { deadline } => {
                // From now on the root context's tick polls etcd and answers.
                claim.waited = true;
                let settled = Rc::new(RefCell::new(Settled::Pending));
                FLEET_WAITERS.with(|w| {
                    w.borrow_mut().push(FleetWaiter {
                        reader: self.id,
                        shared: s.clone(),
                        due: now_ms(),
                        deadline,
                        claim,
                        polling: false,
                        settled: settled.clone(),
                        charge: self.deferred_charge.take(),
                        rate: None,
                    })
                });
                self.phase = Phase::Waiting(settled);
                return;
            }
            Step::Forward(handle) => self.fleet_forward(claim.rule, claim.hold, handle),
            Step::Answer {
                decision,
                completed,
            } => {
                if let Some(rec) = &completed {
                    cache_completed(&s, &claim.flow.key_id(), rec);
                }
                match decision {
                    Decision::Replay(stored) => {
                        if claim.waited {
                            s.metrics.inc("waited");
                        }
                        self.fleet_answer(claim.rule, claim.hold, Some(stored), None)
                    }
                    Decision::Reject(r) => {
                        if claim.waited && matches!(r, Rejection::Conflict { .. }) {
                            s.metrics.inc("wait_timeouts");
                        }
                        self.fleet_answer(claim.rule, claim.hold, None, Some(r))
                    }
                    _ => self.fleet_answer(
                        claim.rule,
                        claim.hold,
                        None,
                        Some(Rejection::Conflict {
                            retry_after_s: rule.on_concurrent.retry_after_s,
                        }),
                    ),
                }
            }
            Step::Unavailable {
                reason,
                maybe_claimed,
            } => self.fleet_unavailable(&claim, reason, maybe_claimed, From::Elsewhere),
        };
        // A forwarded request was resumed by its release; an answered one ends here.
        let _ = action;
    }

    /// Replays or rejects (fleet mode), charging the rate limit as local mode does.
    fn fleet_answer(
        &mut self,
        rule_idx: usize,
        hold: Hold,
        stored: Option<idemgate_core::StoredResponse>,
        rejection: Option<Rejection>,
    ) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(rule_idx);
        hold.abandon(self.id);
        let cost = match &stored {
            Some(_) => u32::from(
                s.config
                    .rule_at(self.deferred_charge.as_ref().map_or(0, |(r, _)| *r))
                    .rate_limit
                    .as_ref()
                    .is_some_and(|r| r.charge_replays),
            ),
            None => 1,
        };
        if let Some((limit_rule, limited)) = self.deferred(cost) {
            return self.reject(s.config.rule_at(limit_rule), limited);
        }
        match (stored, rejection) {
            (Some(stored), _) => {
                s.metrics.inc("replayed");
                self.respond(problem::replay(rule, &stored, &self.ctx))
            }
            (None, Some(r)) => self.reject(rule, r),
            (None, None) => self.reject(
                rule,
                Rejection::StoreUnavailable {
                    retry_after_s: 1,
                    reason: "no decision",
                },
            ),
        }
    }

    /// etcd granted the claim (answered in the reader's context): the request goes on.
    fn fleet_forward(&mut self, rule_idx: usize, hold: Hold, handle: FleetHandle) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(rule_idx);
        // Kept alive from the root context until the claim settles.
        s.keepalives
            .borrow_mut()
            .hold(handle.inflight_lease, handle.inflight, now_ms());
        if let Some((limit_rule, limited)) = self.deferred(1) {
            queue_release(&s, handle);
            hold.abandon(self.id);
            return self.reject(s.config.rule_at(limit_rule), limited);
        }
        if let Err(detail) = hold.release(self.id, From::Elsewhere) {
            queue_release(&s, handle);
            hold.abandon(self.id);
            log::error!("idemgate: {detail}");
            return self.reject(rule, Rejection::Misconfigured { detail });
        }
        s.metrics.inc("forwarded");
        self.phase = Phase::FleetForwarded(rule_idx, Box::new(handle));
        Action::Continue
    }

    /// etcd could not decide: the fail policy answers (a claim that may have committed is
    /// withdrawn as soon as etcd answers again). `from`: where this runs.
    fn fleet_unavailable(
        &mut self,
        claim: &FleetClaim,
        reason: String,
        maybe: bool,
        from: From,
    ) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(claim.rule);
        log::warn!("idemgate: etcd could not decide a claim: {reason}");
        if maybe {
            queue_abandon(&s, &claim.flow);
        }
        let open = Fleet::new(&s.config).is_some_and(|f| f.fails_open());
        if open {
            s.metrics.inc("fleet_fail_open");
            let action = match claim.hold.release(self.id, from) {
                Ok(action) => action,
                Err(detail) => {
                    claim.hold.abandon(self.id);
                    return self.reject(rule, Rejection::Misconfigured { detail });
                }
            };
            let _ = self.deferred(1);
            self.phase = Phase::Done;
            return action;
        }
        s.metrics.inc("fleet_fail_closed");
        claim.hold.abandon(self.id);
        self.reject(
            rule,
            Rejection::StoreUnavailable {
                retry_after_s: 1,
                reason: "etcd unavailable",
            },
        )
    }

    /// The response of a forwarded fleet request is complete: settle its claim. Returns
    /// whether the response's last bytes are held until etcd has the settlement.
    pub(crate) fn settle_fleet(
        &mut self,
        handle: Box<FleetHandle>,
        capture: ResponseCapture,
    ) -> bool {
        let s = self.shared.clone();
        let Some(f) = Fleet::new(&s.config) else {
            return false;
        };
        let (write, record) = match capture.finish() {
            Ok(stored) => match Write::complete(&f, &handle, &stored, now_ms()) {
                Ok((w, record)) => (w, Some(Box::new(record))),
                Err(_) => {
                    s.metrics.inc("not_stored_too_large");
                    unhold(&s, &handle);
                    log::warn!("idemgate: record for key {} exceeds store.etcd.maxValueBytes; not stored, key held until its lease lapses", handle.key_id.to_hex());
                    return false;
                }
            },
            Err(NotStored::Status(_)) => {
                s.metrics.inc("not_stored_status");
                (Write::release(&handle, now_ms()), None)
            }
            Err(NotStored::TooLarge) => {
                s.metrics.inc("not_stored_too_large");
                unhold(&s, &handle);
                return false;
            }
        };
        let now = now_ms();
        let bound = f
            .spec
            .timeout_ms
            .saturating_mul(u64::from(f.spec.retries) + 1);
        let op = WriteOp {
            write,
            handle: Some(handle),
            record,
            hold: Some((self.id, now.saturating_add(bound))),
        };
        log::debug!(
            "idemgate: {:?} of key {}: response held until etcd has it",
            op.write.kind(),
            op.write.key_id().to_hex()
        );
        match dispatch(f.spec, op.write.call()) {
            Ok(call) => self.phase = Phase::Settling(Box::new(Settling { op, call })),
            Err(e) => {
                log::warn!("idemgate: {e}");
                queue_write(&s, op);
            }
        }
        true
    }

    /// The stream ends with fleet work in progress: the root context carries it on.
    pub(crate) fn fleet_done(&mut self, phase: Phase) {
        let s = self.shared.clone();
        match phase {
            Phase::Settling(mut st) => {
                st.op.hold = None;
                queue_write(&s, st.op);
            }
            // A claim txn may be in flight: it may commit for a request that is gone.
            Phase::FleetClaim(c) => queue_abandon(&s, &c.flow),
            _ => {}
        }
    }
}
