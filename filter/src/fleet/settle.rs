//! Settling claims in etcd from the root context: completions, releases and withdrawals,
//! retried until etcd answers them; the responses held until their completion is durable.
use super::*;

/// A settlement of a claim in etcd, and what hangs on it.
pub(crate) struct WriteOp {
    pub(super) write: Write,
    /// The claim settled (completion, release): its in-flight lease is held until then.
    pub(super) handle: Option<Box<FleetHandle>>,
    /// The completed record, cached once stored.
    pub(super) record: Option<Box<Record>>,
    /// A response whose last bytes wait for this write: its stream, and when to let them
    /// go regardless.
    pub(super) hold: Option<(u32, u64)>,
}

/// Root-context work: settlements outlive their streams.
pub(super) enum FleetOp {
    Write(Box<WriteOp>),
    KeepAlive(i64),
    /// A lease granted ahead of the claims that will need it.
    Grant(Lease),
}

pub(super) struct QueuedOp {
    pub(super) shared: Rc<Shared>,
    pub(super) op: FleetOp,
    /// Not dispatched before.
    pub(super) due: u64,
}

thread_local! {
    pub(super) static FLEET_QUEUE: RefCell<Vec<QueuedOp>> = const { RefCell::new(Vec::new()) };
    pub(super) static FLEET_PENDING: RefCell<HashMap<u32, QueuedOp>> = RefCell::new(HashMap::new());
}

pub(super) fn queue(shared: &Rc<Shared>, op: FleetOp, due: u64) {
    FLEET_QUEUE.with(|q| {
        q.borrow_mut().push(QueuedOp {
            shared: shared.clone(),
            op,
            due,
        })
    });
}

/// Hands a settlement to the root context (first attempt at its next tick).
pub(super) fn queue_write(s: &Rc<Shared>, op: WriteOp) {
    queue(s, FleetOp::Write(Box::new(op)), 0);
}

/// Withdraws a claim that may have committed unseen (answered 503, or its request gone).
pub(super) fn queue_abandon(s: &Rc<Shared>, flow: &ClaimFlow) {
    if let Some(write) = flow.abandon(now_ms()) {
        queue_write(
            s,
            WriteOp {
                write,
                handle: None,
                record: None,
                hold: None,
            },
        );
    }
}

/// Lets a held response go on (from any context; the stream may be gone).
pub(super) fn resume_response(stream: u32, back_to: u32) {
    if hostcalls::set_effective_context(stream).is_ok() {
        let _ = hostcalls::resume_http_response();
    }
    let _ = hostcalls::set_effective_context(back_to);
}

/// Responses held longer than their bound go on; their settlement continues.
pub(super) fn release_due_holds(root: u32, now: u64) {
    let mut due = Vec::new();
    let mut check = |op: &mut FleetOp| {
        if let FleetOp::Write(w) = op {
            if let Some((stream, at)) = w.hold {
                if at <= now {
                    w.hold = None;
                    due.push(stream);
                }
            }
        }
    };
    FLEET_QUEUE.with(|q| q.borrow_mut().iter_mut().for_each(|q| check(&mut q.op)));
    FLEET_PENDING.with(|p| p.borrow_mut().values_mut().for_each(|q| check(&mut q.op)));
    for stream in due {
        resume_response(stream, root);
    }
}

/// Dispatches the queued work that is due from the root context (so its answers come back
/// here).
pub(super) fn drain(root: u32, now: u64) {
    let ops = FLEET_QUEUE.with(|q| std::mem::take(&mut *q.borrow_mut()));
    if ops.is_empty() {
        return;
    }
    let _ = hostcalls::set_effective_context(root);
    let mut later = Vec::new();
    for q in ops {
        if q.due > now {
            later.push(q);
            continue;
        }
        let Some(spec) = q.shared.config.store_etcd.clone() else {
            continue;
        };
        let call = match &q.op {
            FleetOp::Write(w) => w.write.call().clone(),
            FleetOp::KeepAlive(lease) => idemgate_core::fleet::calls::keepalive_call(*lease),
            FleetOp::Grant(lease) => lease.grant_call(now),
        };
        match dispatch(&spec, &call) {
            Ok(t) => FLEET_PENDING.with(|p| {
                p.borrow_mut().insert(t, q);
            }),
            Err(e) => {
                log::error!("idemgate: {e}");
                let failed = Answer {
                    code: 14,
                    body: Vec::new(),
                    message: e,
                };
                op_answered(root, q, &failed.reply());
            }
        }
    }
    FLEET_QUEUE.with(|q| q.borrow_mut().extend(later));
}

/// An answer to root-context fleet work.
pub(crate) fn root_answered(root: u32, token: u32, answer: &Answer) {
    if let Some(w) = FLEET_WAIT_CALLS.with(|c| c.borrow_mut().remove(&token)) {
        waiter_answered(root, w, &answer.reply());
    } else if let Some(q) = FLEET_PENDING.with(|p| p.borrow_mut().remove(&token)) {
        op_answered(root, q, &answer.reply());
    }
}

pub(super) fn op_answered(root: u32, q: QueuedOp, reply: &Reply<'_>) {
    let s = q.shared.clone();
    let now = now_ms();
    match q.op {
        FleetOp::Write(mut w) => {
            if let Some(w) = write_answered(&s, w.as_mut(), reply, now, root) {
                s.metrics.inc("fleet_retries");
                let due = w.1;
                queue(&s, FleetOp::Write(w.0), due);
            }
        }
        FleetOp::Grant(lease) => {
            GRANTING_AHEAD.with(|g| g.borrow_mut().retain(|l| *l != lease));
            match parse_grant(reply) {
                Ok(id) => cache_lease(&s, lease, id),
                Err(e) => {
                    s.metrics.inc("fleet_errors");
                    log::debug!("idemgate: lease grant ahead of claims: {e}");
                }
            }
        }
        FleetOp::KeepAlive(lease) => {
            let outcome = parse_keepalive(reply);
            let refresh = s.keepalives.borrow_mut().answered(lease, &outcome, now);
            match refresh {
                Refresh::Alive => s.metrics.inc("fleet_keepalives"),
                Refresh::Gone => {
                    s.metrics.inc("fleet_leases_lost");
                    log::warn!("idemgate: in-flight lease {lease:x} lapsed in etcd while claims held it (etcd unreachable for longer than its TTL?); their keys are free again");
                }
                Refresh::Failed => {
                    s.metrics.inc("fleet_errors");
                    if let Err(e) = outcome {
                        log::debug!("idemgate: keep-alive of lease {lease:x}: {e}");
                    }
                }
                Refresh::Unheld => {}
            }
        }
    }
}

/// Feeds an answer to a settlement; `Some((op, due))` when it is to be sent again then.
/// Settled or given up: the held response (if any) goes on, from context `back_to`.
pub(super) fn write_answered(
    s: &Rc<Shared>,
    w: &mut WriteOp,
    reply: &Reply<'_>,
    now: u64,
    back_to: u32,
) -> Option<(Box<WriteOp>, u64)> {
    let alive = w
        .handle
        .as_ref()
        .is_some_and(|h| s.keepalives.borrow().holds(h.inflight_lease));
    let step = w.write.on_reply(reply, now, alive);
    match step {
        WriteStep::Retry { at, error } => {
            s.metrics.inc("fleet_errors");
            log::debug!(
                "idemgate: {:?} of key {} not answered ({error}); again in {} ms",
                w.write.kind(),
                w.write.key_id().to_hex(),
                at.saturating_sub(now)
            );
            let op = WriteOp {
                write: w.write.clone(),
                handle: w.handle.take(),
                record: w.record.take(),
                hold: w.hold.take(),
            };
            return Some((Box::new(op), at));
        }
        WriteStep::Done(written) => {
            log::debug!(
                "idemgate: {:?} of key {}: {written:?}",
                w.write.kind(),
                w.write.key_id().to_hex()
            );
            settled(s, w, written)
        }
        WriteStep::GiveUp(e) => gave_up(s, w, &e),
    }
    if let Some(h) = &w.handle {
        unhold(s, h);
    }
    if let Some((stream, _)) = w.hold.take() {
        resume_response(stream, back_to);
    }
    None
}

pub(super) fn settled(s: &Shared, w: &WriteOp, written: Written) {
    let key = w.write.key_id();
    match (w.write.kind(), written) {
        (WriteKind::Complete, Written::Stored) => {
            s.metrics.inc("stored");
            if let Some(record) = &w.record {
                cache_completed(s, &key, record);
                wake_waiters(s, key, record);
            }
        }
        (WriteKind::Complete, _) => {
            s.metrics.inc("lost_claims");
            log::warn!(
                "idemgate: key {} was taken over in etcd before its response completed (its in-flight lease lapsed)",
                key.to_hex()
            );
        }
        (WriteKind::Abandon, _) => s.metrics.inc("fleet_abandoned"),
        (WriteKind::Release, _) => {}
    }
}

pub(super) fn gave_up(s: &Shared, w: &WriteOp, e: &EtcdError) {
    s.metrics.inc("fleet_unsettled");
    let key = w.write.key_id().to_hex();
    let outcome = if e.may_have_written() {
        "outcome unknown"
    } else {
        "not written"
    };
    match w.write.kind() {
        WriteKind::Complete => {
            s.metrics.inc("store_errors");
            log::error!("idemgate: completion of key {key}: {outcome} ({e}); until etcd has it, the key stays in flight and lapses with its lease");
        }
        WriteKind::Release => log::warn!(
            "idemgate: release of key {key}: {outcome} ({e}); the key lapses with its lease"
        ),
        WriteKind::Abandon => log::warn!(
            "idemgate: withdrawal of an unanswered claim of key {key}: {outcome} ({e}); it lapses with its lease"
        ),
    }
}

#[derive(Debug, Default)]
pub(crate) struct ResponseHold {
    /// The response's `content-length`.
    pub(super) declared: Option<u64>,
    /// Body bytes seen so far.
    pub(super) seen: u64,
    /// Bytes at the start of Envoy's buffer already seen (held back by the last callback).
    pub(super) buffered: usize,
}

impl ResponseHold {
    /// For a fleet response with `headers`.
    pub(crate) fn of(headers: &[(String, Vec<u8>)]) -> Self {
        let declared = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        Self {
            declared,
            ..Self::default()
        }
    }

    /// Of a body callback with `body_size` bytes buffered: where the new bytes start, and
    /// how many there are.
    pub(crate) fn fresh(&mut self, body_size: usize) -> (usize, usize) {
        let from = self.buffered.min(body_size);
        let new = body_size - from;
        self.seen = self.seen.saturating_add(new as u64);
        (from, new)
    }

    /// After a body callback (not the end of the stream): `Pause` keeps the buffer (the
    /// bytes completing the declared length) until the claim is settled.
    pub(crate) fn after(&mut self, body_size: usize, new: usize) -> Action {
        if self.declared.is_some_and(|len| new > 0 && self.seen >= len) {
            self.buffered = body_size;
            Action::Pause
        } else {
            self.buffered = 0;
            Action::Continue
        }
    }
}

/// A settlement whose first attempt the response's own context made.
pub(crate) struct Settling {
    pub(super) op: WriteOp,
    pub(super) call: u32,
}

/// Releases a claim that will not be forwarded after all.
pub(super) fn queue_release(s: &Rc<Shared>, handle: FleetHandle) {
    queue_write(
        s,
        WriteOp {
            write: Write::release(&handle, now_ms()),
            handle: Some(Box::new(handle)),
            record: None,
            hold: None,
        },
    );
}
