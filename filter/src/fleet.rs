//! Fleet mode in Envoy: etcd as the authoritative store, reached over its native gRPC API
//! with `dispatch_grpc_call` (the cluster named by `store.etcd.cluster` speaks HTTP/2, with
//! TLS and client certificates when its `transport_socket` says so). Every decision is
//! `idemgate_core::fleet`'s; this module dispatches calls and carries the request on.
//!
//! - A claim is made from the request's own context while its headers are held.
//! - A claim is settled (completion, release) from the response's context first, holding
//!   the response's last bytes until etcd has the record (so a retry sent right after the
//!   answer gets the replay), for at most `timeoutMillis × (retries + 1)`; then the root
//!   context retries it, idempotently by owner token, until it lands or the claim's
//!   in-flight lease may have lapsed.
//! - A claim that may have committed while every attempt went unanswered, and whose request
//!   was answered 503, is withdrawn by the root context as soon as etcd answers again.
//! - The root context keeps in-flight leases alive while claims on them are unsettled,
//!   grants them ahead of the claims, and polls the keys parked requests wait on.
//!
//! The SDK delivers a call's answer to the context that was running when it was
//! dispatched, so work that must outlive a stream is dispatched from the root context's
//! tick (or its own answers).
use super::*;
use idemgate_core::config::EtcdSpec;
use idemgate_core::fleet::calls::{parse_grant, parse_keepalive, Kv, Reply};
use idemgate_core::fleet::{
    cache_lookup, cache_value, Call, ClaimFlow, EtcdError, Fleet, FleetHandle, Lease, Refresh,
    Step, ValuePolicy, Write, WriteKind, WriteStep, Written,
};
use idemgate_core::{Decision, Record};

/// How often the root context ticks in fleet mode: queued writes, keep-alives, parked
/// requests' polls, held responses' bounds.
pub(crate) const FLEET_TICK_MS: u32 = 10;

/// How often the root context looks for leases to grant ahead of the claims.
const GRANT_AHEAD_MS: u64 = 200;

// ------------------------------------------------------------------------------ calls

/// `envoy.config.core.v3.GrpcService` with its `envoy_grpc` target: the upstream argument
/// of `dispatch_grpc_call`, naming the cluster and the `:authority` of the calls. (Envoy
/// also takes a bare cluster name, but tries it as this message first.)
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

/// `envoy.config.core.v3.GrpcService.EnvoyGrpc`.
#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(string, tag = "2")]
    authority: String,
}

/// The upstream argument for the calls of `spec` (the SDK passes it as text: when the
/// encoded message is not UTF-8, the bare cluster name, with Envoy's default authority).
fn upstream(spec: &EtcdSpec) -> String {
    use prost::Message;
    let bytes = GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: spec.cluster.clone(),
            authority: spec.authority.clone(),
        }),
    }
    .encode_to_vec();
    String::from_utf8(bytes).unwrap_or_else(|_| spec.cluster.clone())
}

/// Dispatches `call` to the etcd cluster from the current context.
fn dispatch(spec: &EtcdSpec, call: &Call) -> Result<u32, String> {
    hostcalls::dispatch_grpc_call(
        &upstream(spec),
        call.service,
        call.method,
        vec![],
        Some(&call.message),
        std::time::Duration::from_millis(spec.timeout_ms),
    )
    .map_err(|e| format!("gRPC call to cluster {:?} failed: {e:?}", spec.cluster))
}

/// A gRPC answer, owned: status, message and status text.
pub(crate) struct Answer {
    code: u32,
    body: Vec<u8>,
    message: String,
}

impl Answer {
    /// The answer to the call being answered (`on_grpc_call_response`).
    pub(crate) fn read(code: u32, size: usize) -> Self {
        if code == 0 {
            let body = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default();
            return Self {
                code,
                body,
                message: String::new(),
            };
        }
        let message = hostcalls::get_grpc_status()
            .ok()
            .and_then(|(_, m)| m)
            .unwrap_or_default();
        Self {
            code,
            body: Vec::new(),
            message,
        }
    }

    fn reply(&self) -> Reply<'_> {
        if self.code == 0 {
            Reply::Ok(&self.body)
        } else {
            Reply::Failed {
                code: self.code,
                message: &self.message,
            }
        }
    }
}

fn cached_lease(s: &Shared, lease: Lease) -> Option<i64> {
    let spec = s.config.store_etcd.as_ref()?;
    let key = lease.cache_key(&s.config.store_namespace, spec.lease_bucket_ms);
    match hostcalls::get_shared_data(&key) {
        Ok((Some(v), _)) => lease.parse_cache(&v),
        _ => None,
    }
}

fn cache_lease(s: &Shared, lease: Lease, id: i64) {
    if let Some(spec) = s.config.store_etcd.as_ref() {
        let key = lease.cache_key(&s.config.store_namespace, spec.lease_bucket_ms);
        let value = lease.cache_value(id);
        let _ = hostcalls::set_shared_data(&key, Some(value.as_bytes()), None);
    }
}

fn cache_completed(s: &Shared, key_id: &idemgate_core::KeyId, record: &Record) {
    if let Some(f) = Fleet::new(&s.config) {
        let value = cache_value(key_id, record);
        if f.value_policy(value.len()) == ValuePolicy::Store {
            let _ = hostcalls::set_shared_data(&f.cache_key(key_id), Some(&value), None);
        }
    }
}

/// A forwarded claim's in-flight lease no longer needs keeping alive for it.
pub(crate) fn unhold(s: &Shared, handle: &FleetHandle) {
    s.keepalives.borrow_mut().release(handle.inflight_lease);
}

// ------------------------------------------------------------------------------ root tick

/// The root context's fleet work at each tick.
pub(crate) fn tick(root: u32, s: &Rc<Shared>, granted_ahead_at: &mut u64) {
    poll_waiters(root);
    let now = now_ms();
    let due = s.keepalives.borrow_mut().due(now);
    for lease in due {
        queue(s, FleetOp::KeepAlive(lease), now);
    }
    if now.saturating_sub(*granted_ahead_at) >= GRANT_AHEAD_MS {
        *granted_ahead_at = now;
        grant_ahead(s, now);
    }
    release_due_holds(root, now);
    drain(root, now);
}

thread_local! {
    /// Leases this worker is granting ahead (answers pending).
    static GRANTING_AHEAD: RefCell<Vec<Lease>> = const { RefCell::new(Vec::new()) };
}

/// Grants, from the root context, the in-flight leases the rules' claims are about to need
/// and that no worker of this Envoy has cached yet, so that claims rarely wait for a grant
/// (and do not all grant the same lease at once when a window begins).
fn grant_ahead(s: &Rc<Shared>, now: u64) {
    let mut seen: Vec<u64> = Vec::new();
    for rule in s.config.rules() {
        if seen.contains(&rule.lease_ms) {
            continue;
        }
        seen.push(rule.lease_ms);
        for lease in idemgate_core::fleet::lease::leases_ahead(rule.lease_ms, now)
            .into_iter()
            .flatten()
        {
            let pending = GRANTING_AHEAD.with(|g| g.borrow().contains(&lease));
            if !pending && cached_lease(s, lease).is_none() {
                GRANTING_AHEAD.with(|g| g.borrow_mut().push(lease));
                s.metrics.inc("fleet_leases");
                queue(s, FleetOp::Grant(lease), now);
            }
        }
    }
}

// ------------------------------------------------------------------------------ writes

/// A settlement of a claim in etcd, and what hangs on it.
pub(crate) struct WriteOp {
    write: Write,
    /// The claim settled (completion, release): its in-flight lease is held until then.
    handle: Option<Box<FleetHandle>>,
    /// The completed record, cached once stored.
    record: Option<Box<Record>>,
    /// A response whose last bytes wait for this write: its stream, and when to let them
    /// go regardless.
    hold: Option<(u32, u64)>,
}

/// Root-context work: settlements outlive their streams.
enum FleetOp {
    Write(Box<WriteOp>),
    KeepAlive(i64),
    /// A lease granted ahead of the claims that will need it.
    Grant(Lease),
}

struct QueuedOp {
    shared: Rc<Shared>,
    op: FleetOp,
    /// Not dispatched before.
    due: u64,
}

thread_local! {
    static FLEET_QUEUE: RefCell<Vec<QueuedOp>> = const { RefCell::new(Vec::new()) };
    static FLEET_PENDING: RefCell<VecMap<u32, QueuedOp>> = RefCell::new(VecMap::new());
}

fn queue(shared: &Rc<Shared>, op: FleetOp, due: u64) {
    FLEET_QUEUE.with(|q| {
        q.borrow_mut().push(QueuedOp {
            shared: shared.clone(),
            op,
            due,
        })
    });
}

/// Hands a settlement to the root context (first attempt at its next tick).
fn queue_write(s: &Rc<Shared>, op: WriteOp) {
    queue(s, FleetOp::Write(Box::new(op)), 0);
}

/// Withdraws a claim that may have committed unseen (answered 503, or its request gone).
fn queue_abandon(s: &Rc<Shared>, flow: &ClaimFlow) {
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
fn resume_response(stream: u32, back_to: u32) {
    if hostcalls::set_effective_context(stream).is_ok() {
        let _ = hostcalls::resume_http_response();
    }
    let _ = hostcalls::set_effective_context(back_to);
}

/// Responses held longer than their bound go on; their settlement continues.
fn release_due_holds(root: u32, now: u64) {
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
fn drain(root: u32, now: u64) {
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

fn op_answered(root: u32, q: QueuedOp, reply: &Reply<'_>) {
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
fn write_answered(
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
            settled(s, w, written, back_to)
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

fn settled(s: &Shared, w: &WriteOp, written: Written, back_to: u32) {
    let key = w.write.key_id();
    match (w.write.kind(), written) {
        (WriteKind::Complete, Written::Stored) => {
            s.metrics.inc("stored");
            if let Some(record) = &w.record {
                cache_completed(s, &key, record);
                wake_waiters(s, key, record, back_to);
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

fn gave_up(s: &Shared, w: &WriteOp, e: &EtcdError) {
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

// ------------------------------------------------------------------------------ claims

/// A claim waiting for etcd.
pub(crate) struct FleetClaim {
    rule: usize,
    gate: Option<u64>,
    flow: ClaimFlow,
    /// Token of the call in flight.
    call: u32,
    /// The call in flight is a grant of this lease.
    granting: Option<Lease>,
    /// Leases granted for this claim.
    got: Vec<(Lease, i64)>,
    /// Cached leases are not to be trusted (one vanished).
    fresh: bool,
    /// Parked by the wait policy at least once.
    waited: bool,
    /// Grants that failed.
    grant_failures: u32,
    /// Answer context, for answers sent from the root context's tick.
    ctx: AnswerContext,
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
    fn send_next(&mut self, s: &Shared) -> Result<(), String> {
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
    fn answered(&mut self, s: &Shared, reply: &Reply<'_>) -> Step {
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
#[derive(Debug, Default)]
pub(crate) struct ResponseHold {
    /// The response's `content-length`.
    declared: Option<u64>,
    /// Body bytes seen so far.
    seen: u64,
    /// Bytes at the start of Envoy's buffer already seen (held back by the last callback).
    buffered: usize,
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
    op: WriteOp,
    call: u32,
}

impl Reader {
    /// Fleet mode: answer from the local cache of completed records when it can (never a
    /// claim), else ask etcd; the request is paused until etcd answers.
    pub(crate) fn conclude_fleet(
        &mut self,
        rule_idx: usize,
        resolved: &Resolved,
        request: Request,
        token: Option<u64>,
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
                        return self.fleet_answer(rule_idx, token, Some(stored), None);
                    }
                    Decision::Reject(r) => {
                        s.metrics.inc("fleet_cache_hits");
                        return self.fleet_answer(rule_idx, token, None, Some(r));
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
            gate: token,
            flow,
            call: 0,
            granting: None,
            got: Vec::new(),
            fresh: false,
            waited: false,
            grant_failures: 0,
            ctx: self.ctx.clone(),
        });
        match self.fleet_next(&mut claim) {
            Some(action) => action,
            None => {
                self.phase = Phase::FleetClaim(claim);
                Action::Pause
            }
        }
    }

    /// Sends the claim's next call (a lease grant, or the claim txn). `Some(action)` when
    /// it ended.
    fn fleet_next(&mut self, claim: &mut FleetClaim) -> Option<Action> {
        let s = self.shared.clone();
        match claim.send_next(&s) {
            Ok(()) => None,
            Err(e) => Some(self.fleet_unavailable(claim, e, false)),
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
                if let Some((op, at)) = write_answered(&s, &mut st.op, &answer.reply(), now, self.id)
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
                Some(Err(e)) => self.fleet_unavailable(&claim, e, true),
                None => return,
            },
            Step::NeedLeases { fresh } => {
                if fresh {
                    claim.got.clear();
                    claim.fresh = true;
                }
                match self.fleet_next(&mut claim) {
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
            Step::Forward(handle) => self.fleet_forward(claim.rule, claim.gate, handle),
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
                        self.fleet_answer(claim.rule, claim.gate, Some(stored), None)
                    }
                    Decision::Reject(r) => {
                        if claim.waited && matches!(r, Rejection::Conflict { .. }) {
                            s.metrics.inc("wait_timeouts");
                        }
                        self.fleet_answer(claim.rule, claim.gate, None, Some(r))
                    }
                    _ => self.fleet_answer(
                        claim.rule,
                        claim.gate,
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
            } => self.fleet_unavailable(&claim, reason, maybe_claimed),
        };
        if action == Action::Continue {
            let _ = hostcalls::resume_http_request();
        }
    }

    /// Replays or rejects (fleet mode), charging the rate limit as local mode does.
    fn fleet_answer(
        &mut self,
        rule_idx: usize,
        gate: Option<u64>,
        stored: Option<idemgate_core::StoredResponse>,
        rejection: Option<Rejection>,
    ) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(rule_idx);
        if let Some(t) = gate {
            GATES.with(|g| g.borrow_mut().remove(&t));
        }
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

    fn fleet_forward(&mut self, rule_idx: usize, gate: Option<u64>, handle: FleetHandle) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(rule_idx);
        // Kept alive from the root context until the claim settles.
        s.keepalives
            .borrow_mut()
            .hold(handle.inflight_lease, handle.inflight, now_ms());
        if let Some((limit_rule, limited)) = self.deferred(1) {
            queue_release(&s, handle);
            if let Some(t) = gate {
                GATES.with(|g| g.borrow_mut().remove(&t));
            }
            return self.reject(s.config.rule_at(limit_rule), limited);
        }
        if let Some(t) = gate {
            if let Err(detail) = release_gate(self.id, t) {
                queue_release(&s, handle);
                log::error!("idemgate: {detail}");
                return self.reject(rule, Rejection::Misconfigured { detail });
            }
        }
        s.metrics.inc("forwarded");
        self.phase = Phase::FleetForwarded(rule_idx, Box::new(handle));
        Action::Continue
    }

    /// etcd could not decide: the fail policy answers (a claim that may have committed is
    /// withdrawn as soon as etcd answers again).
    fn fleet_unavailable(&mut self, claim: &FleetClaim, reason: String, maybe: bool) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(claim.rule);
        log::warn!("idemgate: etcd could not decide a claim: {reason}");
        if maybe {
            queue_abandon(&s, &claim.flow);
        }
        let open = Fleet::new(&s.config).is_some_and(|f| f.fails_open());
        if open {
            s.metrics.inc("fleet_fail_open");
            if let Some(t) = claim.gate {
                if let Err(detail) = release_gate(self.id, t) {
                    return self.reject(rule, Rejection::Misconfigured { detail });
                }
            }
            let _ = self.deferred(1);
            self.phase = Phase::Done;
            return Action::Continue;
        }
        s.metrics.inc("fleet_fail_closed");
        if let Some(t) = claim.gate {
            GATES.with(|g| g.borrow_mut().remove(&t));
        }
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

/// Releases a claim that will not be forwarded after all.
fn queue_release(s: &Rc<Shared>, handle: FleetHandle) {
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

// ------------------------------------------------------------------------------ waiters

/// A request parked by the wait policy in fleet mode. The root context carries it on:
/// calls dispatched from a root context are answered there, not in the stream.
pub(crate) struct FleetWaiter {
    pub(crate) reader: u32,
    shared: Rc<Shared>,
    due: u64,
    deadline: u64,
    claim: Box<FleetClaim>,
    /// The call in flight is a poll (a read), not a claim txn.
    polling: bool,
    settled: Rc<RefCell<Settled>>,
    /// The rate-limit charge deferred until the wait ends (limit rule, request headers).
    charge: Option<(usize, Headers)>,
    /// The rate-limit headers of the settled charge, for the answer.
    rate: Option<RateHeaders>,
}

thread_local! {
    /// Parked requests waiting for their next poll.
    static FLEET_WAITERS: RefCell<Vec<FleetWaiter>> = const { RefCell::new(Vec::new()) };
    /// Parked requests with a call to etcd in flight, by call token.
    static FLEET_WAIT_CALLS: RefCell<VecMap<u32, FleetWaiter>> = RefCell::new(VecMap::new());
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
fn poll_waiters(root: u32) {
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
fn waiter_answered(root: u32, mut w: FleetWaiter, reply: &Reply<'_>) {
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

/// A completion stored by this worker: requests parked on its key here are answered at
/// once, without asking etcd (from context `back_to`).
fn wake_waiters(s: &Shared, key: idemgate_core::KeyId, record: &Record, back_to: u32) {
    let parked: Vec<FleetWaiter> = FLEET_WAITERS.with(|q| {
        let mut q = q.borrow_mut();
        let (same, rest) = std::mem::take(&mut *q)
            .into_iter()
            .partition(|x| x.claim.flow.key_id() == key && std::ptr::eq(&*x.shared, s));
        *q = rest;
        same
    });
    if parked.is_empty() {
        return;
    }
    let now = now_ms();
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
    let _ = hostcalls::set_effective_context(back_to);
}

/// Carries a parked request on by one step, from the root context.
fn waiter_step(root: u32, mut w: FleetWaiter, step: Step) {
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
            let released = match w.claim.gate {
                Some(t) => release_gate(w.reader, t),
                None => hostcalls::set_effective_context(w.reader).map_err(|e| format!("{e:?}")),
            };
            match released
                .and_then(|()| hostcalls::resume_http_request().map_err(|e| format!("{e:?}")))
            {
                Ok(()) => {
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
                let released = match w.claim.gate {
                    Some(t) => release_gate(w.reader, t),
                    None => {
                        hostcalls::set_effective_context(w.reader).map_err(|e| format!("{e:?}"))
                    }
                };
                if released
                    .and_then(|()| hostcalls::resume_http_request().map_err(|e| format!("{e:?}")))
                    .is_ok()
                {
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
fn answer_waiter(mut w: FleetWaiter, step: Step) {
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
fn waiter_reject(w: &FleetWaiter, r: Rejection) {
    waiter_reject_by(w, w.claim.rule, r);
}

/// Answers a parked request with `r` in the error format of rule `rule`.
fn waiter_reject_by(w: &FleetWaiter, rule: usize, r: Rejection) {
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
fn waiter_settle(w: &mut FleetWaiter, settled: Settlement) -> bool {
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

fn waiter_done(w: &FleetWaiter) {
    if let Some(t) = w.claim.gate {
        GATES.with(|g| g.borrow_mut().remove(&t));
    }
    *w.settled.borrow_mut() = Settled::Done;
}
