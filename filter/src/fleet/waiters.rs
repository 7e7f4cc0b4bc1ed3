//! Requests parked by the wait policy in fleet mode, carried on by the root context.
use super::*;

/// A request parked by the wait policy in fleet mode. The root context carries it on:
/// calls dispatched from a root context are answered there, not in the stream.
pub(crate) struct FleetWaiter {
    pub(crate) reader: u32,
    pub(super) shared: Rc<Shared>,
    pub(super) due: u64,
    pub(super) deadline: u64,
    pub(super) claim: Box<FleetClaim>,
    /// The call in flight is a poll (a read), not a claim txn.
    pub(super) polling: bool,
    pub(super) settled: Rc<RefCell<Settled>>,
    /// The rate-limit charge deferred until the wait ends (limit rule, request headers).
    pub(super) charge: Option<(usize, Headers)>,
    /// The rate-limit headers of the settled charge, for the answer.
    pub(super) rate: Option<RateHeaders>,
}

thread_local! {
    /// Parked requests waiting for their next poll.
    pub(super) static FLEET_WAITERS: RefCell<Vec<FleetWaiter>> = const { RefCell::new(Vec::new()) };
    /// Parked requests with a call to etcd in flight, by call token.
    pub(super) static FLEET_WAIT_CALLS: RefCell<HashMap<u32, FleetWaiter>> = RefCell::new(HashMap::new());
}

/// A parked request's stream ended: forget it (withdrawing a claim txn it had in flight).
pub(crate) fn forget_waiter(reader: u32) {
    FLEET_WAITERS.with(|w| w.borrow_mut().retain(|x| x.reader != reader));
    let gone: Vec<FleetWaiter> = FLEET_WAIT_CALLS.with(|w| {
        let mut w = w.borrow_mut();
        let tokens: Vec<u32> = w
            .iter()
            .filter(|(_, x)| x.reader == reader)
            .map(|(t, _)| *t)
            .collect();
        tokens.into_iter().filter_map(|t| w.remove(&t)).collect()
    });
    for w in gone {
        if !w.polling {
            queue_abandon(&w.shared, &w.claim.flow);
        }
    }
}

/// Polls etcd for every parked request that is due, one read per key: the answer serves
/// every request parked on that key.
pub(super) fn poll_fleet_waiters(root: u32) {
    let parked = FLEET_WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if parked.is_empty() {
        return;
    }
    let now = now_ms();
    let mut still = Vec::new();
    let mut polled: Vec<idemgate_core::KeyId> = Vec::new();
    let _ = hostcalls::set_effective_context(root);
    for mut w in parked {
        let key = w.claim.flow.key_id();
        if w.due > now || polled.contains(&key) {
            still.push(w);
            continue;
        }
        let Some(spec) = w.shared.config.store_etcd.clone() else {
            continue;
        };
        match dispatch(&spec, &w.claim.flow.poll_call()) {
            Ok(t) => {
                polled.push(key);
                w.polling = true;
                w.claim.call = t;
                FLEET_WAIT_CALLS.with(|c| {
                    c.borrow_mut().insert(t, w);
                });
            }
            Err(e) => {
                log::warn!("idemgate: {e}");
                w.due = now.saturating_add(u64::from(FLEET_TICK_MS));
                still.push(w);
            }
        }
    }
    FLEET_WAITERS.with(|w| w.borrow_mut().extend(still));
}

/// An answer from etcd to a parked request's call. A poll's answer is also the answer for
/// every other request parked on the same key.
pub(super) fn waiter_answered(root: u32, mut w: FleetWaiter, reply: &Reply<'_>) {
    let s = w.shared.clone();
    let now = now_ms();
    if !w.polling {
        let step = w.claim.answered(&s, reply);
        return waiter_step(root, w, step);
    }
    let key = w.claim.flow.key_id();
    let same: Vec<FleetWaiter> = FLEET_WAITERS.with(|q| {
        let mut q = q.borrow_mut();
        let (same, rest) = std::mem::take(&mut *q)
            .into_iter()
            .partition(|x| x.claim.flow.key_id() == key && Rc::ptr_eq(&x.shared, &s));
        *q = rest;
        same
    });
    for mut w in std::iter::once(w).chain(same) {
        w.polling = false;
        let rule = s.config.rule_at(w.claim.rule);
        let step = w.claim.flow.on_poll(rule, reply, now);
        waiter_step(root, w, step);
    }
}

thread_local! {
    /// Completions this worker just stored, for the requests parked on their keys.
    static COMPLETED: RefCell<Vec<(idemgate_core::KeyId, Record)>> = const { RefCell::new(Vec::new()) };
}

/// A completion stored by this worker: requests parked on its key here are answered right
/// after the current callback (not from it: a local reply to another stream would stop the
/// calling one), without asking etcd.
pub(super) fn wake_waiters(s: &Shared, key: idemgate_core::KeyId, record: &Record) {
    let parked = FLEET_WAITERS.with(|q| {
        q.borrow()
            .iter()
            .any(|x| x.claim.flow.key_id() == key && std::ptr::eq(&*x.shared, s))
    });
    if parked {
        COMPLETED.with(|c| c.borrow_mut().push((key, record.clone())));
        crate::wake_soon();
    }
}

/// Answers the requests parked on the keys of [`wake_waiters`]' completions (from a root
/// context, after the callback that stored them).
pub(crate) fn answer_completed() {
    let done = COMPLETED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if done.is_empty() {
        return;
    }
    let now = now_ms();
    for (key, record) in done {
        let parked: Vec<FleetWaiter> = FLEET_WAITERS.with(|q| {
            let mut q = q.borrow_mut();
            let (same, rest) = std::mem::take(&mut *q)
                .into_iter()
                .partition(|x| x.claim.flow.key_id() == key);
            *q = rest;
            same
        });
        let kv = Kv {
            mod_revision: 0,
            value: record.encode(),
            lease: 0,
        };
        for mut w in parked {
            let rule = w.shared.config.rule_at(w.claim.rule);
            match w.claim.flow.on_found(rule, &kv, now) {
                step @ Step::Answer { .. } => answer_waiter(w, step),
                _ => {
                    w.due = now;
                    FLEET_WAITERS.with(|q| q.borrow_mut().push(w));
                }
            }
        }
    }
}

/// Carries a parked request on by one step, from the root context.
pub(super) fn waiter_step(root: u32, mut w: FleetWaiter, step: Step) {
    let s = w.shared.clone();
    let _ = hostcalls::set_effective_context(root);
    let sent = match step {
        Step::Send(call) => s
            .config
            .store_etcd
            .as_ref()
            .ok_or_else(|| "fleet mode is not configured".to_string())
            .and_then(|spec| dispatch(spec, &call))
            .map(|t| w.claim.call = t),
        Step::NeedLeases { fresh } => {
            if fresh {
                w.claim.got.clear();
                w.claim.fresh = true;
            }
            w.claim.send_next(&s)
        }
        Step::Wait { deadline } => {
            w.deadline = deadline;
            w.due = now_ms();
            FLEET_WAITERS.with(|q| q.borrow_mut().push(w));
            return;
        }
        Step::Forward(handle) => {
            if waiter_settle(&mut w, Settlement::Other) {
                queue_release(&s, handle);
                let _ = hostcalls::set_effective_context(root);
                return;
            }
            s.keepalives
                .borrow_mut()
                .hold(handle.inflight_lease, handle.inflight, now_ms());
            match w.claim.hold.release(w.reader, From::Elsewhere) {
                Ok(_) => {
                    s.metrics.inc("forwarded");
                    *w.settled.borrow_mut() =
                        Settled::FleetForwarded(w.claim.rule, Box::new(handle), w.rate.take());
                }
                Err(detail) => {
                    queue_release(&s, handle);
                    waiter_reject(&w, Rejection::Misconfigured { detail });
                }
            }
            let _ = hostcalls::set_effective_context(root);
            return;
        }
        step @ Step::Answer { .. } => {
            answer_waiter(w, step);
            let _ = hostcalls::set_effective_context(root);
            return;
        }
        Step::Unavailable {
            reason,
            maybe_claimed,
        } => {
            if maybe_claimed {
                queue_abandon(&s, &w.claim.flow);
            }
            Err(reason)
        }
    };
    match sent {
        Ok(()) => FLEET_WAIT_CALLS.with(|c| {
            c.borrow_mut().insert(w.claim.call, w);
        }),
        Err(e) => {
            // etcd cannot decide: the fail policy answers, as for a first attempt.
            log::warn!("idemgate: etcd could not decide a waiting request: {e}");
            if waiter_settle(&mut w, Settlement::Other) {
                let _ = hostcalls::set_effective_context(root);
                return;
            }
            if Fleet::new(&s.config).is_some_and(|f| f.fails_open()) {
                s.metrics.inc("fleet_fail_open");
                if w.claim.hold.release(w.reader, From::Elsewhere).is_ok() {
                    *w.settled.borrow_mut() = Settled::Done;
                }
            } else {
                s.metrics.inc("fleet_fail_closed");
                waiter_reject(
                    &w,
                    Rejection::StoreUnavailable {
                        retry_after_s: 1,
                        reason: "etcd unavailable",
                    },
                );
            }
            let _ = hostcalls::set_effective_context(root);
        }
    }
}

/// Answers a parked request with a replay or a rejection (`step` is a [`Step::Answer`]).
pub(super) fn answer_waiter(mut w: FleetWaiter, step: Step) {
    let Step::Answer {
        decision,
        completed,
    } = step
    else {
        return;
    };
    let s = w.shared.clone();
    let rule = s.config.rule_at(w.claim.rule);
    if let Some(rec) = &completed {
        cache_completed(&s, &w.claim.flow.key_id(), rec);
    }
    let settled = match decision {
        Decision::Replay(_) => Settlement::Replayed,
        _ => Settlement::Other,
    };
    if waiter_settle(&mut w, settled) {
        return;
    }
    match decision {
        Decision::Replay(stored) => {
            if hostcalls::set_effective_context(w.reader).is_ok() {
                s.metrics.inc("replayed");
                s.metrics.inc("waited");
                send(with_rate(
                    problem::replay(rule, &stored, &w.claim.ctx),
                    w.rate.as_ref(),
                ));
            }
            waiter_done(&w);
        }
        Decision::Reject(r) => {
            if matches!(r, Rejection::Conflict { .. }) {
                s.metrics.inc("wait_timeouts");
            }
            waiter_reject(&w, r);
        }
        _ => waiter_reject(
            &w,
            Rejection::Conflict {
                retry_after_s: rule.on_concurrent.retry_after_s,
            },
        ),
    }
}

/// Answers a parked request with `r` (from its own context).
pub(super) fn waiter_reject(w: &FleetWaiter, r: Rejection) {
    waiter_reject_by(w, w.claim.rule, r);
}

/// Answers a parked request with `r` in the error format of rule `rule`.
pub(super) fn waiter_reject_by(w: &FleetWaiter, rule: usize, r: Rejection) {
    let rule = w.shared.config.rule_at(rule);
    if hostcalls::set_effective_context(w.reader).is_ok() {
        w.shared.metrics.rejection(&r);
        send(with_rate(
            problem::render(rule, &r, &w.claim.ctx),
            w.rate.as_ref(),
        ));
    }
    waiter_done(w);
}

/// Settles a parked request's deferred rate-limit charge now that its wait ended as
/// `settled`, as local mode does; answers 429 and returns true when the caller is over its
/// limit.
pub(super) fn waiter_settle(w: &mut FleetWaiter, settled: Settlement) -> bool {
    let (rate, limited) = settle_deferred(&w.shared, w.charge.take(), settled);
    w.rate = rate;
    match limited {
        Some((limit_rule, r)) => {
            waiter_reject_by(w, limit_rule, r);
            true
        }
        None => false,
    }
}

pub(super) fn waiter_done(w: &FleetWaiter) {
    w.claim.hold.abandon(w.reader);
    *w.settled.borrow_mut() = Settled::Done;
}
