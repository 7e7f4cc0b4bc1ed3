//! # idemgate-filter
//!
//! The Envoy proxy-wasm adapter. This file alone calls the host ABI; every decision is made
//! by `idemgate-core`.
//!
//! The **reader** (`root_id: idemgate`, carrying the configuration) holds every covered
//! request until it has decided: on Envoy ≥ 1.35 with `allow_on_headers_stop_iteration` it
//! pauses the request headers itself and reads the body (single-filter mode); where a host
//! cannot set that flag, a **gate** (`root_id: idemgate_gate`, same `vm_config`) after it
//! holds the headers instead (two-filter mode). See `hold.rs`. Only a request that is to be
//! forwarded is let go; a replayed or rejected request never reaches the origin, neither
//! its headers nor any of its body.
//!
//! Claims are made atomic across worker threads by [`idemgate_core::store::SlotTable`] over
//! Envoy's shared data. Shared data has no atomic insert-if-absent (`set` on an absent key
//! ignores CAS); the adapter gets one by writing with a *fence* CAS: the version of another
//! key it owns. Every `set` takes a fresh version from one global counter, so no live key
//! can hold the fence's version and the conditional write fails whenever the key exists.
#![forbid(unsafe_code)]

mod hold;
pub mod metrics;

use hold::{From, Hold, StopIteration};
use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use idemgate_core::config::ConcurrentAction;
use idemgate_core::decision::Request;
use idemgate_core::fleet::{self, Call, ClaimFlow, Fleet, FleetHandle, KeepAlives, Lease, Step};
use idemgate_core::problem::{self, AnswerContext, LocalAnswer};
use idemgate_core::ratelimit::{self, RateHeaders, Settlement};
use idemgate_core::store::{Begun, CasStore, ClaimHandle, Events, Expect, SlotTable, StoreError};
use idemgate_core::{
    admit, resolve, Admission, Config, NotStored, Pending, Rejection, Resolution, Resolved,
    ResponseCapture, Rule,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

/// Request or response headers as the host gives them.
type Headers = Vec<(String, Vec<u8>)>;

/// Request header that carried the reader→gate token in earlier versions (they now meet
/// through the stream's filter state, see [`hold`]); a client-sent header of this name is
/// still removed, so that no origin can be misled by one.
const GATE_HEADER: &str = "x-idemgate-gate";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(Root {
            id,
            ..Root::default()
        })
    });
}}

thread_local! {
    static HASH_KEY: RandomState = RandomState::new();
    static COUNTER: Cell<u64> = const { Cell::new(0) };
}

/// `N` random bytes from `getrandom` (WASI `random_get`, served by Envoy's generator): owner
/// tokens, gate tokens and correlation ids, none derivable from another. Should it ever fail,
/// SipHash of a counter under std's per-VM random key stands in (unpredictable without the
/// key), and the failure is logged.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if let Err(e) = getrandom::fill(&mut out) {
        log::error!("getrandom failed ({e}): ids fall back to a keyed hash of a counter");
        for chunk in out.chunks_mut(8) {
            let n = COUNTER.with(|c| {
                let v = c.get().wrapping_add(1);
                c.set(v);
                v
            });
            let mut h = HASH_KEY.with(|k| k.build_hasher());
            h.write_u64(n);
            for (d, s) in chunk.iter_mut().zip(h.finish().to_le_bytes()) {
                *d = s;
            }
        }
    }
    out
}

/// A fresh claim owner or gate token (never 0).
fn fresh_token() -> u64 {
    idemgate_core::ids::owner_token(random_bytes())
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Envoy shared data as a [`CasStore`].
struct SharedData {
    fence_key: String,
}

impl SharedData {
    fn fence_cas(&self) -> Result<u32, StoreError> {
        if let (_, Some(cas)) = hostcalls::get_shared_data(&self.fence_key).map_err(status_err)? {
            return Ok(cas);
        }
        // Unconditional: the fence's value never matters, only that it has a version.
        hostcalls::set_shared_data(&self.fence_key, Some(b"fence"), None).map_err(status_err)?;
        match hostcalls::get_shared_data(&self.fence_key).map_err(status_err)? {
            (_, Some(cas)) => Ok(cas),
            _ => Err(StoreError("fence key has no version".into())),
        }
    }
}

fn status_err(s: Status) -> StoreError {
    StoreError(format!("shared data call failed: {s:?}"))
}

impl CasStore for SharedData {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key).map_err(status_err)? {
            (Some(v), Some(cas)) => Ok(Some((v, cas))),
            (None, Some(cas)) => Ok(Some((Vec::new(), cas))),
            _ => Ok(None),
        }
    }

    fn put(&self, key: &str, value: &[u8], expect: Expect) -> Result<bool, StoreError> {
        let cas = match expect {
            Expect::Version(c) => c,
            Expect::Absent => self.fence_cas()?,
        };
        match hostcalls::set_shared_data(key, Some(value), Some(cas)) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(s) => Err(status_err(s)),
        }
    }
}

/// Metrics of one namespace, counted in the VM and sent to the host in one batch per flush
/// (the root context's tick), so a request costs no `increment_metric` hostcalls.
#[derive(Default)]
struct Metrics {
    /// Host metric id and the count not yet flushed, by metric name.
    ids: HashMap<&'static str, (u32, Cell<i64>)>,
}

impl Metrics {
    fn define(namespace: &str) -> Self {
        let mut ids = HashMap::new();
        let kinds = metrics::COUNTERS
            .iter()
            .map(|m| (m, MetricType::Counter))
            .chain(metrics::GAUGES.iter().map(|m| (m, MetricType::Gauge)));
        for (m, kind) in kinds {
            if let Ok(id) = hostcalls::define_metric(kind, &metrics::name(namespace, m)) {
                ids.insert(*m, (id, Cell::new(0)));
            }
        }
        Self { ids }
    }

    fn add(&self, metric: &str, n: i64) {
        if n == 0 {
            return; // most store events are zero: skip the lookup
        }
        if let Some((_, pending)) = self.ids.get(metric) {
            pending.set(pending.get().saturating_add(n));
        }
    }

    /// Sends the counts gathered since the last flush to the host.
    fn flush(&self) {
        for (id, pending) in self.ids.values() {
            let n = pending.replace(0);
            if n != 0 {
                let _ = hostcalls::increment_metric(*id, n);
            }
        }
    }

    fn inc(&self, metric: &str) {
        self.add(metric, 1);
    }

    fn events(&self, ev: &Events) {
        self.add("store_index_keys", i64::from(ev.index_keys_created));
        self.add("store_body_keys", i64::from(ev.body_keys_created));
        self.add("evictions", i64::from(ev.evictions));
        self.add("lease_expiries", i64::from(ev.lease_expiries));
        self.add("cas_retries", i64::from(ev.cas_retries));
    }

    fn rejection(&self, r: &Rejection) {
        self.inc(r.counter());
    }
}

/// State shared by a reader root context and its streams.
struct Shared {
    config: Config,
    store: SharedData,
    metrics: Metrics,
    /// Fleet mode: in-flight leases this worker's forwarded claims hold.
    keepalives: RefCell<KeepAlives>,
    /// Whether this plugin may hold request headers while reading the body (single-filter
    /// mode, see [`hold`]).
    stop_iteration: Cell<StopIteration>,
    /// The hint that the flag may be missing was logged.
    hinted: Cell<bool>,
}

impl Shared {
    fn table(&self) -> SlotTable<'_, SharedData> {
        SlotTable::new(&self.store, &self.config)
    }
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    #[default]
    Reader,
    Gate,
}

#[derive(Default)]
struct Root {
    id: u32,
    role: Role,
    shared: Option<Rc<Shared>>,
    /// Fleet mode: when leases were last granted ahead.
    granted_ahead_at: u64,
    /// The tick period this root runs at (a gate release may shorten it for a moment).
    tick_ms: u64,
    /// When the last tick came.
    ticked_at: u64,
    /// This gate is counted in [`hold`]'s gates of the VM (once, however often configured).
    gate_counted: bool,
}

/// How often waiting requests look at the store again.
const WAIT_POLL_MS: u32 = 10;

/// How often the root context dispatches queued fleet completions and releases.
const FLEET_TICK_MS: u32 = 10;

/// How often metrics counted in the VM reach Envoy's stats when nothing else needs a
/// faster tick: the most a counter at the admin endpoint lags behind the traffic.
const METRICS_FLUSH_MS: u32 = 1000;

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _n: usize, body_size: usize, _t: usize) {
        let (status, body) = call_answer(body_size);
        if let Some(w) = FLEET_WAIT_CALLS.with(|c| c.borrow_mut().remove(&token)) {
            waiter_answered(self.id, w, status, &body);
        } else {
            fleet_op_answered(token, status, &body);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(s) = &self.shared {
            s.metrics.flush();
        }
        let id = self.id;
        WAKE_QUEUES.with(|q| q.borrow_mut().retain(|(root, _)| *root != id));
        if std::mem::take(&mut self.gate_counted) {
            hold::gate_root(false);
        }
        true
    }
}

/// Follows Envoy's log level, so that lines Envoy would drop are neither formatted nor
/// sent (`log::debug!` checks the level first).
fn follow_host_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_host_log_level();
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        if root_id.ends_with("_gate") {
            self.role = Role::Gate;
            let text = String::from_utf8_lossy(&raw);
            if !matches!(text.trim(), "" | "{}") {
                log::error!("idemgate: the gate ({root_id}) takes no configuration (put it on the reader, root_id \"idemgate\"); got {} bytes", raw.len());
                return false;
            }
            log::info!("idemgate: gate ready (root_id {root_id}): two-filter mode for the idemgate filters of this VM");
            if !std::mem::replace(&mut self.gate_counted, true) {
                hold::gate_root(true);
            }
            return true;
        }
        // The SHA-256 of fingerprints runs in wasm SIMD here: refuse to start rather than
        // fingerprint wrongly if this runtime computes it differently.
        if let Err(e) = idemgate_core::sha256::self_test() {
            log::error!("idemgate: {e}");
            return false;
        }
        match Config::from_slice(&raw) {
            Ok(config) => {
                let metrics = Metrics::define(&config.store_namespace);
                let store = SharedData {
                    fence_key: format!("{}:fence", config.store_namespace),
                };
                let waits = config
                    .rules()
                    .any(|r| r.on_concurrent.action == ConcurrentAction::Wait);
                // Fleet mode: completions and releases are dispatched from the root
                // context's tick (a stream's own calls die with it). Every tick also
                // flushes the metrics counted in the VM.
                let tick_ms = if config.store_etcd.is_some() {
                    FLEET_TICK_MS
                } else if waits {
                    WAIT_POLL_MS
                } else {
                    METRICS_FLUSH_MS
                };
                self.tick_ms = u64::from(tick_ms);
                let queue = format!("idemgate-wake-{:x}-{}", fresh_token(), self.id);
                match hostcalls::register_shared_queue(&queue) {
                    Ok(q) => WAKE_QUEUES.with(|w| w.borrow_mut().push((self.id, q))),
                    Err(e) => log::warn!("idemgate: no wake-up queue ({e:?}); the tick stands in"),
                }
                let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(self.tick_ms));
                log::info!(
                    "idemgate: configured (root_id {root_id:?}, {} route rule(s), namespace {}, capacity {}){}",
                    config.routes.len(),
                    config.store_namespace,
                    config.store_capacity,
                    config.description.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
                );
                self.shared = Some(Rc::new(Shared {
                    config,
                    store,
                    metrics,
                    keepalives: RefCell::new(KeepAlives::default()),
                    stop_iteration: Cell::new(StopIteration::Unknown),
                    hinted: Cell::new(false),
                }));
                true
            }
            Err(e) => {
                log::error!("idemgate: invalid configuration: {e}");
                false
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        wake_up();
    }

    fn on_tick(&mut self) {
        wake_up();
        hold::on_tick();
        let now = now_ms();
        if self.tick_ms > 0 && now.saturating_sub(self.ticked_at) < self.tick_ms / 2 {
            // wake_soon() shortened this root's tick (no wake-up queue); the work is done.
            let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(self.tick_ms));
        }
        self.ticked_at = now;
        if let Some(s) = &self.shared {
            if s.config.store_etcd.is_some() {
                poll_fleet_waiters(self.id);
                let now = now_ms();
                let due = s.keepalives.borrow_mut().due(now);
                for lease in due {
                    queue_fleet_op(s, FleetOp::KeepAlive(lease));
                }
                if now.saturating_sub(self.granted_ahead_at) >= GRANT_AHEAD_MS {
                    self.granted_ahead_at = now;
                    grant_ahead(s, now);
                }
            }
        }
        drain_fleet_ops(self.id);
        if let Some(s) = &self.shared {
            s.metrics.flush();
            // An operator may change Envoy's level at run time (admin /logging).
            follow_host_log_level();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        match (self.role, &self.shared) {
            (Role::Gate, _) => Some(Box::new(hold::Gate {
                id: context_id,
                reader: None,
            })),
            (Role::Reader, Some(shared)) => Some(Box::new(Reader {
                id: context_id,
                shared: shared.clone(),
                phase: Phase::Idle,
                ctx: AnswerContext::default(),
                add_correlation: false,
                rate: None,
                deferred_charge: None,
            })),
            (Role::Reader, None) => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Where a waiting request ended up, filled in by the root context's tick.
#[derive(Default)]
enum Settled {
    #[default]
    Pending,
    /// Forwarded with a claim, with the rate-limit headers of its charge.
    Forwarded(usize, ClaimHandle, Option<RateHeaders>),
    /// Forwarded with an etcd claim, with the rate-limit headers of its charge.
    FleetForwarded(usize, Box<FleetHandle>, Option<RateHeaders>),
    Done,
}

/// A request parked by the `wait` concurrency policy.
struct Waiter {
    reader: u32,
    hold: Hold,
    shared: Rc<Shared>,
    rule: usize,
    key_id: idemgate_core::KeyId,
    request: Request,
    deadline: u64,
    ctx: AnswerContext,
    settled: Rc<RefCell<Settled>>,
    /// The rate-limit charge deferred until the wait ends (limit rule, request headers).
    charge: Option<(usize, Headers)>,
}

impl Waiter {
    /// Settles the deferred rate-limit charge of a request whose wait ended as `settled`:
    /// the headers for its answer, and the refusal (with its rule) when over the limit.
    fn settle_charge(
        &mut self,
        settled: Settlement,
    ) -> (Option<RateHeaders>, Option<(usize, Rejection)>) {
        settle_deferred(&self.shared, self.charge.take(), settled)
    }
}

/// Settles a rate-limit charge deferred until a wait ended as `settled`: the headers for the
/// answer, and the refusal (with its limit rule) when the caller is over its limit.
fn settle_deferred(
    s: &Shared,
    charge: Option<(usize, Headers)>,
    settled: Settlement,
) -> (Option<RateHeaders>, Option<(usize, Rejection)>) {
    let Some((limit_rule, headers)) = charge else {
        return (None, None);
    };
    let Some(spec) = s.config.rule_at(limit_rule).rate_limit.as_ref() else {
        return (None, None);
    };
    let cost = ratelimit::deferred_cost(spec, settled);
    match charge_limit(s, limit_rule, &headers, cost) {
        Some((rate, limited)) => (Some(rate), limited.map(|r| (limit_rule, r))),
        None => (None, None),
    }
}

/// Charges `cost` to the caller under the rate limit of rule `limit_rule`: the headers for
/// the answer, and the refusal when the caller is over its limit (`None` without a limit).
fn charge_limit(
    s: &Shared,
    limit_rule: usize,
    headers: &[(String, Vec<u8>)],
    cost: u32,
) -> Option<(RateHeaders, Option<Rejection>)> {
    let rule = s.config.rule_at(limit_rule);
    let charge = ratelimit::charge(
        &s.store,
        &s.config.store_namespace,
        rule,
        headers,
        now_ms(),
        cost,
    )?;
    s.metrics
        .add("rate_keys", i64::from(charge.events.keys_created));
    s.metrics
        .add("rate_evictions", i64::from(charge.events.evictions));
    s.metrics
        .add("cas_retries", i64::from(charge.events.cas_retries));
    let limited = charge.outcome.retry_after_seconds();
    Some((
        charge.headers,
        limited.map(|retry_after_s| Rejection::RateLimited { retry_after_s }),
    ))
}

/// `answer` with the rate-limit headers (replacing any it has).
fn with_rate(mut answer: LocalAnswer, rate: Option<&RateHeaders>) -> LocalAnswer {
    if let Some(rate) = rate {
        for (name, value) in rate.pairs() {
            answer
                .headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            answer.headers.push((name.to_string(), value));
        }
    }
    answer
}

thread_local! {
    static WAITERS: RefCell<Vec<Waiter>> = const { RefCell::new(Vec::new()) };
    /// A wake-up is on its way to a root context of this VM.
    static WAKE: Cell<bool> = const { Cell::new(false) };
    /// Shared queues of this VM's root contexts (root id, queue id): a message to one makes
    /// Envoy call that root's `on_queue_ready` once the current callback has returned.
    static WAKE_QUEUES: RefCell<Vec<(u32, u32)>> = const { RefCell::new(Vec::new()) };
}

/// The tick period of a root context without a wake-up queue while work waits for it.
const FAST_TICK_MS: u64 = 1;

/// Makes a root context of this VM run [`wake_up`] as soon as the current callback has
/// returned, for work that must not run inside it: answering another stream (proxy-wasm
/// stops the calling stream after any local reply), releasing a gate before Envoy buffered
/// the body ([`hold`]). Through a shared queue (Envoy posts `on_queue_ready` to the worker's
/// event loop); without one, the current context's root ticks in [`FAST_TICK_MS`].
fn wake_soon() {
    if WAKE.with(|w| w.replace(true)) {
        return;
    }
    let queued = WAKE_QUEUES
        .with(|q| q.borrow().first().map(|(_, q)| *q))
        .map(|q| hostcalls::enqueue_shared_queue(q, Some(b"w")));
    if !matches!(queued, Some(Ok(()))) {
        let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(FAST_TICK_MS));
    }
}

/// What [`wake_soon`] asked for: gate releases that waited for Envoy to buffer a body, and
/// the waiters (whose key a response may have settled).
fn wake_up() {
    WAKE.with(|w| w.set(false));
    hold::release_deferred();
    let _ = poll_waiters();
}

/// Looks at the store for every waiting request of this worker; answers or forwards those
/// whose key settled (or whose wait ran out). Returns whether it changed the effective
/// context (it had waiters to look at).
fn poll_waiters() -> bool {
    let waiting = WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if waiting.is_empty() {
        return false;
    }
    let now = now_ms();
    let mut still = Vec::new();
    for mut w in waiting {
        let shared = w.shared.clone();
        let rule = shared.config.rule_at(w.rule);
        let table = shared.table();
        let outcome = table.begin_waiting(rule, w.key_id, &w.request, now, Some(w.deadline));
        if hostcalls::set_effective_context(w.reader).is_err() {
            continue; // the stream is gone
        }
        if let Ok((Begun::Wait { .. }, _)) = outcome {
            still.push(w);
            continue;
        }
        // The wait is over: the request's rate-limit charge is due now.
        let settled = match &outcome {
            Ok((Begun::Replay(_), _)) => Settlement::Replayed,
            _ => Settlement::Other,
        };
        let (rate, limited) = w.settle_charge(settled);
        if let Some((limit_rule, r)) = limited {
            if let Ok((begun, ev)) = &outcome {
                w.shared.metrics.events(ev);
                if let Begun::Forward(handle) = begun {
                    let _ = table.release(handle);
                }
            }
            w.hold.abandon(w.reader);
            w.shared.metrics.rejection(&r);
            let answer = problem::render(shared.config.rule_at(limit_rule), &r, &w.ctx);
            send(with_rate(answer, rate.as_ref()));
            *w.settled.borrow_mut() = Settled::Done;
            continue;
        }
        match outcome {
            Ok((Begun::Wait { .. }, _)) => {}
            Ok((Begun::Replay(stored), ev)) => {
                w.shared.metrics.events(&ev);
                w.shared.metrics.inc("replayed");
                w.shared.metrics.inc("waited");
                send(with_rate(
                    problem::replay(rule, &stored, &w.ctx),
                    rate.as_ref(),
                ));
                *w.settled.borrow_mut() = Settled::Done;
            }
            Ok((Begun::Reject(r), ev)) => {
                w.shared.metrics.events(&ev);
                if matches!(r, Rejection::Conflict { .. }) {
                    w.shared.metrics.inc("wait_timeouts");
                }
                w.shared.metrics.rejection(&r);
                send(with_rate(problem::render(rule, &r, &w.ctx), rate.as_ref()));
                *w.settled.borrow_mut() = Settled::Done;
            }
            Ok((Begun::Forward(handle), ev)) => {
                w.shared.metrics.events(&ev);
                // The first request gave the key back (or its lease lapsed): this one goes.
                match w.hold.release(w.reader, From::Elsewhere) {
                    Ok(_) => {
                        w.shared.metrics.inc("forwarded");
                        *w.settled.borrow_mut() = Settled::Forwarded(w.rule, handle, rate);
                    }
                    Err(detail) => {
                        let _ = table.release(&handle);
                        let _ = hostcalls::set_effective_context(w.reader);
                        let r = Rejection::Misconfigured { detail };
                        w.shared.metrics.rejection(&r);
                        send(with_rate(problem::render(rule, &r, &w.ctx), rate.as_ref()));
                        *w.settled.borrow_mut() = Settled::Done;
                    }
                }
            }
            Err(e) => {
                w.shared.metrics.inc("store_errors");
                log::error!("idemgate: {e}");
                let r = Rejection::StoreUnavailable {
                    retry_after_s: 1,
                    reason: "store error",
                };
                send(with_rate(problem::render(rule, &r, &w.ctx), rate.as_ref()));
                *w.settled.borrow_mut() = Settled::Done;
            }
        }
    }
    WAITERS.with(|w| w.borrow_mut().extend(still));
    true
}

fn send(answer: LocalAnswer) {
    let headers: Vec<(&str, &str)> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    if let Err(e) =
        hostcalls::send_http_response(u32::from(answer.status), headers, Some(&answer.body))
    {
        log::error!("idemgate: could not send local response: {e:?}");
    }
}

enum Phase {
    Idle,
    /// Buffering the body of a covered request, held as `hold` says; `buffered`: an
    /// earlier body callback returned `Pause` (Envoy holds that part of the body).
    Buffering {
        pending: Pending,
        hold: Hold,
        buffered: bool,
    },
    /// Parked by the wait policy; the root's tick settles it.
    Waiting(Rc<RefCell<Settled>>),
    /// Forwarded with a claim; waiting for the response.
    Forwarded(usize, ClaimHandle),
    /// Fleet mode: waiting for etcd to decide the claim (the request is held).
    FleetClaim(Box<FleetClaim>),
    /// Fleet mode: forwarded with a claim in etcd; waiting for the response.
    FleetForwarded(usize, Box<FleetHandle>),
    /// Capturing the response.
    Capturing(Held, ResponseCapture),
    /// Answered locally or finished.
    Done,
}

struct Reader {
    id: u32,
    shared: Rc<Shared>,
    phase: Phase,
    ctx: AnswerContext,
    /// Set the correlation header on the response (it was missing or generated).
    add_correlation: bool,
    /// Rate-limit headers for the response.
    rate: Option<RateHeaders>,
    /// Index of the rule whose rate limit applies, and the request headers, while a
    /// covered request's charge waits for its decision.
    deferred_charge: Option<(usize, Headers)>,
}

impl Context for Reader {
    fn on_http_call_response(&mut self, token: u32, _n: usize, body_size: usize, _t: usize) {
        let (status, body) = call_answer(body_size);
        self.fleet_answered(token, status, &body);
    }

    fn on_done(&mut self) -> bool {
        self.settle();
        hold::forget(self.id);
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Forwarded(_, h) | Phase::Capturing(Held::Local(h), _) => {
                // No complete response: the outcome is unknown (reset, timeout, client gone).
                // The claim stays until its lease lapses; then a retry goes through.
                self.shared.metrics.inc("not_stored_incomplete");
                log::debug!(
                    "idemgate: key {} left in flight until its lease lapses",
                    h.key_id.to_hex()
                );
            }
            Phase::FleetForwarded(_, h) | Phase::Capturing(Held::Fleet(h), _) => {
                self.shared.metrics.inc("not_stored_incomplete");
                // Its in-flight lease is no longer kept alive for it: the key lapses
                // within the lease's TTL, unless other claims still hold that lease.
                unhold(&self.shared, &h);
                log::debug!(
                    "idemgate: key {} left in flight in etcd until its lease lapses",
                    h.key_id.to_hex()
                );
            }
            Phase::Waiting(_) => {
                let id = self.id;
                WAITERS.with(|w| w.borrow_mut().retain(|x| x.reader != id));
                FLEET_WAITERS.with(|w| w.borrow_mut().retain(|x| x.reader != id));
                FLEET_WAIT_CALLS.with(|w| w.borrow_mut().retain(|_, x| x.reader != id));
            }
            _ => {}
        }
        true
    }
}

impl Reader {
    /// Takes over what the tick decided for a waiting request.
    fn settle(&mut self) {
        let outcome = match &self.phase {
            Phase::Waiting(slot) => std::mem::take(&mut *slot.borrow_mut()),
            _ => return,
        };
        match outcome {
            Settled::Pending => {}
            Settled::Forwarded(rule, h, rate) => {
                if rate.is_some() {
                    self.rate = rate;
                }
                self.phase = Phase::Forwarded(rule, h);
            }
            Settled::FleetForwarded(rule, h, rate) => {
                if rate.is_some() {
                    self.rate = rate;
                }
                self.phase = Phase::FleetForwarded(rule, h);
            }
            Settled::Done => self.phase = Phase::Done,
        }
    }

    fn respond(&mut self, answer: LocalAnswer) -> Action {
        self.phase = Phase::Done;
        send(with_rate(answer, self.rate.as_ref()));
        Action::Pause
    }

    /// Charges `cost` to the caller under the rate limit of rule `limit_rule`; returns the
    /// refusal when the caller is over its limit.
    fn charge(
        &mut self,
        limit_rule: usize,
        headers: &[(String, Vec<u8>)],
        cost: u32,
    ) -> Option<Rejection> {
        let (rate, limited) = charge_limit(&self.shared, limit_rule, headers, cost)?;
        self.rate = Some(rate);
        limited
    }

    /// Settles a charge deferred until the decision (covered requests).
    fn deferred(&mut self, cost: u32) -> Option<(usize, Rejection)> {
        let (rule, headers) = self.deferred_charge.take()?;
        self.charge(rule, &headers, cost).map(|r| (rule, r))
    }

    /// Settles the deferred charge at the cost a request that ended as `settled` owes.
    fn settle_charge(&mut self, settled: Settlement) -> Option<(usize, Rejection)> {
        let s = self.shared.clone();
        let rule = self.deferred_charge.as_ref().map(|(r, _)| *r)?;
        let spec = s.config.rule_at(rule).rate_limit.as_ref()?;
        self.deferred(ratelimit::deferred_cost(spec, settled))
    }

    /// Refuses a covered request once its body was looked at, after settling its deferred
    /// charge: a bad request spends quota like any other, and the caller over its limit
    /// gets the 429 instead.
    fn reject_charged(&mut self, rule: usize, rejection: Rejection) -> Action {
        let s = self.shared.clone();
        match self.settle_charge(Settlement::Other) {
            Some((limit_rule, limited)) => self.reject(s.config.rule_at(limit_rule), limited),
            None => self.reject(s.config.rule_at(rule), rejection),
        }
    }

    fn reject(&mut self, rule: &Rule, rejection: Rejection) -> Action {
        self.shared.metrics.rejection(&rejection);
        log::debug!("idemgate: rejected ({}): {rejection:?}", rule.name);
        self.respond(problem::render(rule, &rejection, &self.ctx))
    }

    /// Claims, replays or rejects once key and fingerprint are known; the request is held
    /// as `hold` says, and `from` is where this runs.
    fn conclude(&mut self, rule_idx: usize, resolved: Resolved, hold: Hold, from: From) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(rule_idx);
        self.ctx.idempotency_key = Some(resolved.key.clone());
        let request = Request {
            fingerprint: resolved.fingerprint,
            owner: fresh_token(),
            expires_in_ms: resolved.expires_in_ms,
        };
        if s.config.store_etcd.is_some() {
            return self.conclude_fleet(rule_idx, &resolved, request, hold, from);
        }
        let table = s.table();
        let (begun, events) = match table.begin(rule, resolved.key_id, &request, now_ms()) {
            Ok(r) => r,
            Err(e) => {
                log::error!("idemgate: {e}");
                s.metrics.inc("store_errors");
                return self.reject_charged(
                    rule_idx,
                    Rejection::StoreUnavailable {
                        retry_after_s: 1,
                        reason: "store error",
                    },
                );
            }
        };
        s.metrics.events(&events);
        let settled = match &begun {
            Begun::Replay(_) => Some(Settlement::Replayed),
            // charged when the wait ends (poll_waiters), as what it ends as
            Begun::Wait { .. } => None,
            _ => Some(Settlement::Other),
        };
        if let Some((limit_rule, limited)) = settled.and_then(|x| self.settle_charge(x)) {
            if let Begun::Forward(handle) = &begun {
                let _ = table.release(handle);
            }
            hold.abandon(self.id);
            return self.reject(s.config.rule_at(limit_rule), limited);
        }
        match begun {
            Begun::Replay(stored) => {
                hold.abandon(self.id);
                s.metrics.inc("replayed");
                log::debug!("idemgate: replaying key {}", resolved.key_id.to_hex());
                self.respond(problem::replay(rule, &stored, &self.ctx))
            }
            Begun::Reject(r) => {
                hold.abandon(self.id);
                self.reject(rule, r)
            }
            Begun::Wait { deadline } => {
                let settled = Rc::new(RefCell::new(Settled::Pending));
                WAITERS.with(|w| {
                    w.borrow_mut().push(Waiter {
                        reader: self.id,
                        hold,
                        shared: s.clone(),
                        rule: rule_idx,
                        key_id: resolved.key_id,
                        request,
                        deadline,
                        ctx: self.ctx.clone(),
                        settled: settled.clone(),
                        charge: self.deferred_charge.take(),
                    })
                });
                self.phase = Phase::Waiting(settled);
                Action::Pause
            }
            Begun::Forward(handle) => match hold.release(self.id, from) {
                Ok(action) => {
                    s.metrics.inc("forwarded");
                    self.phase = Phase::Forwarded(rule_idx, handle);
                    action
                }
                Err(detail) => {
                    let _ = table.release(&handle);
                    hold.abandon(self.id);
                    log::error!("idemgate: {detail}");
                    self.reject(rule, Rejection::Misconfigured { detail })
                }
            },
        }
    }

    /// The whole body is in (or there is none): resolve the key, then conclude.
    fn body_complete(&mut self, pending: Pending, hold: Hold, from: From, body: &[u8]) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(pending.rule);
        match resolve(&s.config, &pending, body) {
            Resolution::Ready(resolved) => self.conclude(pending.rule, resolved, hold, from),
            Resolution::Reject(r) => {
                hold.abandon(self.id);
                self.reject_charged(pending.rule, r)
            }
            Resolution::Pass => {
                if let Some((limit_rule, limited)) = self.settle_charge(Settlement::Other) {
                    hold.abandon(self.id);
                    return self.reject(s.config.rule_at(limit_rule), limited);
                }
                s.metrics.inc("passed");
                match hold.release(self.id, from) {
                    Ok(action) => {
                        self.phase = Phase::Done;
                        action
                    }
                    Err(detail) => {
                        hold.abandon(self.id);
                        self.reject(rule, Rejection::Misconfigured { detail })
                    }
                }
            }
        }
    }

    fn finish_response(&mut self) {
        self.settle_response();
        // Waiters on this worker learn the outcome right after this callback (wake_soon).
        // Not from here: a local answer sent to another stream from this stream's callback
        // would make Envoy stop this stream too (proxy-wasm stops the calling stream's
        // iteration after any send_local_response), cutting its response off.
        if WAITERS.with(|w| !w.borrow().is_empty()) {
            wake_soon();
        }
    }

    fn settle_response(&mut self) {
        let (handle, capture) = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Capturing(Held::Local(h), c) => (h, c),
            Phase::Capturing(Held::Fleet(h), c) => {
                settle_fleet_response(&self.shared, h, c);
                return;
            }
            _ => return,
        };
        let s = self.shared.clone();
        let table = s.table();
        match capture.finish() {
            Ok(stored) => match table.complete(&handle, &stored) {
                Ok((true, ev)) => {
                    s.metrics.events(&ev);
                    s.metrics.inc("stored");
                }
                Ok((false, ev)) => {
                    s.metrics.events(&ev);
                    s.metrics.inc("lost_claims");
                    log::warn!("idemgate: key {} was taken over before its response completed (lease too short?)", handle.key_id.to_hex());
                }
                Err(e) => {
                    s.metrics.inc("store_errors");
                    log::error!("idemgate: {e}");
                }
            },
            Err(NotStored::Status(status)) => {
                s.metrics.inc("not_stored_status");
                // The origin answered with a status that is not kept: free the key so the
                // client may retry.
                let _ = table.release(&handle);
                log::debug!(
                    "idemgate: status {status} not stored; key {} released",
                    handle.key_id.to_hex()
                );
            }
            Err(NotStored::TooLarge) => {
                s.metrics.inc("not_stored_too_large");
                log::warn!("idemgate: response for key {} exceeds maxResponseBytes; not stored, key held until its lease lapses", handle.key_id.to_hex());
            }
        }
    }

    /// Reads or makes the request's correlation id (before the headers pass).
    fn correlate(&mut self, headers: &mut Vec<(String, Vec<u8>)>) {
        let Some(c) = &self.shared.config.correlation else {
            return;
        };
        self.ctx.correlation_header = Some(c.header.clone());
        let sent = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&c.header))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::to_string);
        match sent {
            Some(id) => self.ctx.request_id = Some(id),
            None if c.generate => {
                let id = idemgate_core::ids::correlation_id(random_bytes());
                let _ = hostcalls::set_map_value_bytes(
                    MapType::HttpRequestHeaders,
                    &c.header,
                    Some(id.as_bytes()),
                );
                headers.push((c.header.clone(), id.clone().into_bytes()));
                self.ctx.request_id = Some(id);
            }
            None => {}
        }
        self.add_correlation = self.ctx.request_id.is_some();
    }
}

impl HttpContext for Reader {
    fn on_http_request_headers(&mut self, _n: usize, eos: bool) -> Action {
        let s = self.shared.clone();
        let mut headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        if headers.iter().any(|(n, _)| n == GATE_HEADER) {
            // The gate no longer reads it, but an origin must never see a forged one.
            let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, GATE_HEADER, None);
            headers.retain(|(n, _)| n != GATE_HEADER);
        }
        self.correlate(&mut headers);
        let pseudo = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let (method, path) = (pseudo(":method"), pseudo(":path"));
        let limit_rule = s.config.limit_rule_for(&path);
        let limit_idx = limit_rule
            .rate_limit
            .is_some()
            .then(|| s.config.rule_index(limit_rule));
        let Some(rule) = s.config.rule_for(&method, &path) else {
            if let Some(idx) = limit_idx {
                if let Some(limited) = self.charge(idx, &headers, 1) {
                    return self.reject(s.config.rule_at(idx), limited);
                }
            }
            return Action::Continue;
        };
        s.metrics.inc("requests");
        let admission = admit(&s.config, &method, &path, &headers);
        if let Some(idx) = limit_idx {
            if matches!(admission, Admission::Inspect(_)) {
                // Charged once the decision is known: replays do not spend quota.
                self.deferred_charge = Some((idx, headers.clone()));
            } else if let Some(limited) = self.charge(idx, &headers, 1) {
                return self.reject(s.config.rule_at(idx), limited);
            }
        }
        match admission {
            Admission::Pass => {
                s.metrics.inc("passed");
                Action::Continue
            }
            Admission::Reject(r) => self.reject(rule, r),
            Admission::Inspect(pending) => {
                if let Some(k) = pending.header_key() {
                    self.ctx.idempotency_key = Some(k.to_string());
                }
                if eos {
                    let from = From::Callback { buffered: false };
                    return self.body_complete(pending, Hold::Own, from, &[]);
                }
                match Hold::begin(&s, self.id, pending.rule, &self.ctx, &headers) {
                    Ok((hold, action)) => {
                        self.phase = Phase::Buffering {
                            pending,
                            hold,
                            buffered: false,
                        };
                        action
                    }
                    Err(r) => self.reject(rule, r),
                }
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, eos: bool) -> Action {
        let limit = match &mut self.phase {
            Phase::Buffering {
                pending,
                hold,
                buffered,
            } => {
                hold.body_arrived(&self.shared, self.id);
                if !eos
                    && body_size as u64 <= self.shared.config.rule_at(pending.rule).max_body_bytes
                {
                    *buffered = true;
                    return Action::Pause;
                }
                self.shared.config.rule_at(pending.rule).max_body_bytes
            }
            Phase::Waiting(_) => return Action::Pause,
            _ => return Action::Continue,
        };
        if body_size as u64 > limit {
            if let Phase::Buffering { pending, hold, .. } =
                std::mem::replace(&mut self.phase, Phase::Done)
            {
                hold.abandon(self.id);
                return self.reject_charged(pending.rule, Rejection::BodyTooLarge { limit });
            }
        }
        self.take_body(body_size, false)
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        if let Phase::Buffering { .. } = self.phase {
            let size = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
                .ok()
                .flatten()
                .map_or(0, |b| b.len());
            return self.take_body(size, true);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, eos: bool) -> Action {
        self.settle();
        if self.add_correlation {
            if let (Some(h), Some(id)) = (&self.ctx.correlation_header, &self.ctx.request_id) {
                if let Ok(None) = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, h) {
                    let _ = hostcalls::set_map_value_bytes(
                        MapType::HttpResponseHeaders,
                        h,
                        Some(id.as_bytes()),
                    );
                }
            }
        }
        if let Some(rate) = &self.rate {
            for (name, value) in rate.pairs() {
                if let Ok(None) = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
                {
                    let _ = hostcalls::set_map_value_bytes(
                        MapType::HttpResponseHeaders,
                        name,
                        Some(value.as_bytes()),
                    );
                }
            }
        }
        let (rule_idx, handle) = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Forwarded(r, h) => (r, Held::Local(h)),
            Phase::FleetForwarded(r, h) => (r, Held::Fleet(h)),
            _ => return Action::Continue,
        };
        let headers = hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default();
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(0);
        // Only a response that came from the origin settles the key; Envoy's own answers
        // (upstream reset, timeout) leave the outcome unknown: keep the claim until its lease.
        let via_upstream = hostcalls::get_property(vec!["response", "code_details"])
            .ok()
            .flatten()
            .is_some_and(|d| d == b"via_upstream");
        if !via_upstream {
            self.shared.metrics.inc("not_stored_incomplete");
            if let Held::Fleet(h) = &handle {
                unhold(&self.shared, h);
            }
            log::debug!(
                "idemgate: local response {status} for key {}; claim left to its lease",
                handle.key_id().to_hex()
            );
            return Action::Continue;
        }
        let rule = self.shared.config.rule_at(rule_idx);
        let capture = ResponseCapture::new(rule, status, &headers);
        self.phase = Phase::Capturing(handle, capture);
        if eos {
            self.finish_response();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, eos: bool) -> Action {
        if let Phase::Capturing(_, capture) = &mut self.phase {
            if capture.wants_body() && body_size > 0 {
                if let Ok(Some(chunk)) =
                    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                {
                    capture.push(&chunk);
                }
            }
            if eos {
                self.finish_response();
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.finish_response();
        Action::Continue
    }
}

impl Reader {
    /// The whole body is in: the last body callback (`trailers` false) or the trailers
    /// callback brought it.
    fn take_body(&mut self, body_size: usize, trailers: bool) -> Action {
        let Phase::Buffering {
            pending,
            hold,
            buffered,
        } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return Action::Continue;
        };
        let body = if body_size > 0 {
            match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
                Ok(b) => b.unwrap_or_default(),
                Err(e) => {
                    log::error!("idemgate: could not read the request body: {e:?}");
                    hold.abandon(self.id);
                    let s = self.shared.clone();
                    return self.reject(
                        s.config.rule_at(pending.rule),
                        Rejection::Misconfigured {
                            detail: "the request body could not be read".into(),
                        },
                    );
                }
            }
        } else {
            Vec::new()
        };
        // With trailers, whatever Envoy forwards next is not the end of the request.
        let from = From::Callback {
            buffered: buffered || trailers,
        };
        self.body_complete(pending, hold, from, &body)
    }
}

// ------------------------------------------------------------------------------ fleet mode

/// A claim held by a forwarded request: in shared data (local mode) or in etcd (fleet).
enum Held {
    Local(ClaimHandle),
    Fleet(Box<FleetHandle>),
}

impl Held {
    fn key_id(&self) -> idemgate_core::KeyId {
        match self {
            Held::Local(h) => h.key_id,
            Held::Fleet(h) => h.key_id,
        }
    }
}

/// A claim waiting for etcd.
struct FleetClaim {
    rule: usize,
    hold: Hold,
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
    fn answered(&mut self, s: &Shared, status: Option<u16>, body: &[u8]) -> Step {
        if status != Some(200) {
            s.metrics.inc("fleet_errors");
        }
        let Some(lease) = self.granting.take() else {
            let rule = s.config.rule_at(self.rule);
            return self.flow.on_answer(rule, status, body, now_ms());
        };
        match fleet::parse_grant(status, body) {
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

/// Status and body of the http call being answered (`None`: no answer, e.g. a timeout).
fn call_answer(body_size: usize) -> (Option<u16>, Vec<u8>) {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<u16>().ok());
    let body = if body_size > 0 {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    (status, body)
}

/// Dispatches `call` to the etcd cluster from the current context.
fn dispatch(spec: &idemgate_core::config::EtcdSpec, call: &Call) -> Result<u32, String> {
    hostcalls::dispatch_http_call(
        &spec.cluster,
        vec![
            (":method", "POST"),
            (":path", call.path),
            (":authority", &spec.authority),
            ("content-type", "application/json"),
        ],
        Some(&call.body),
        vec![],
        std::time::Duration::from_millis(spec.timeout_ms),
    )
    .map_err(|e| format!("dispatch to cluster {:?} failed: {e:?}", spec.cluster))
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

/// How often the root context looks for leases to grant ahead of the claims.
const GRANT_AHEAD_MS: u64 = 200;

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
        let ahead = fleet::leases_ahead(rule.lease_ms, now);
        for lease in ahead.into_iter().flatten() {
            let pending = GRANTING_AHEAD.with(|g| g.borrow().contains(&lease));
            if !pending && cached_lease(s, lease).is_none() {
                GRANTING_AHEAD.with(|g| g.borrow_mut().push(lease));
                s.metrics.inc("fleet_leases");
                queue_fleet_op(s, FleetOp::Grant(lease));
            }
        }
    }
}

/// A forwarded claim's in-flight lease no longer needs keeping alive for it.
fn unhold(s: &Shared, handle: &FleetHandle) {
    s.keepalives.borrow_mut().release(handle.inflight_lease);
}

fn cache_completed(s: &Shared, key_id: &idemgate_core::KeyId, record: &idemgate_core::Record) {
    if let Some(f) = Fleet::new(&s.config) {
        let value = fleet::cache_value(key_id, record);
        if f.value_policy(value.len()) == fleet::ValuePolicy::Store {
            let _ = hostcalls::set_shared_data(&f.cache_key(key_id), Some(&value), None);
        }
    }
}

impl Reader {
    /// Fleet mode: answer from the local cache of completed records when it can (never a
    /// claim), else ask etcd; the request is paused until etcd answers.
    fn conclude_fleet(
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
            if let Some(rec) = fleet::cache_lookup(&bytes, &resolved.key_id, now) {
                match idemgate_core::decide(rule, &request, Some(&rec), now) {
                    idemgate_core::Decision::Replay(stored) => {
                        s.metrics.inc("fleet_cache_hits");
                        return self.fleet_answer(rule_idx, hold, Some(stored), None);
                    }
                    idemgate_core::Decision::Reject(r) => {
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

    fn fleet_answered(&mut self, token: u32, status: Option<u16>, body: &[u8]) {
        let mut claim = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::FleetClaim(c) => c,
            other => {
                self.phase = other;
                return;
            }
        };
        if claim.call != token {
            self.phase = Phase::FleetClaim(claim);
            return;
        }
        let s = self.shared.clone();
        let rule = s.config.rule_at(claim.rule);
        let step = claim.answered(&s, status, body);
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
                // From now on the root context's tick re-polls etcd and answers.
                claim.waited = true;
                let settled = Rc::new(RefCell::new(Settled::Pending));
                FLEET_WAITERS.with(|w| {
                    w.borrow_mut().push(FleetWaiter {
                        reader: self.id,
                        shared: s.clone(),
                        due: now_ms().saturating_add(FLEET_POLL_MS),
                        deadline,
                        claim,
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
                    idemgate_core::Decision::Replay(stored) => {
                        if claim.waited {
                            s.metrics.inc("waited");
                        }
                        self.fleet_answer(claim.rule, claim.hold, Some(stored), None)
                    }
                    idemgate_core::Decision::Reject(r) => {
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
            queue_fleet_op(&s, FleetOp::Release(Box::new(handle)));
            hold.abandon(self.id);
            return self.reject(s.config.rule_at(limit_rule), limited);
        }
        if let Err(detail) = hold.release(self.id, From::Elsewhere) {
            queue_fleet_op(&s, FleetOp::Release(Box::new(handle)));
            hold.abandon(self.id);
            log::error!("idemgate: {detail}");
            return self.reject(rule, Rejection::Misconfigured { detail });
        }
        s.metrics.inc("forwarded");
        self.phase = Phase::FleetForwarded(rule_idx, Box::new(handle));
        Action::Continue
    }

    /// etcd could not decide: the fail policy answers. `from`: where this runs.
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
            if let Some(call) = claim.flow.abandon_call() {
                queue_fleet_op(&s, FleetOp::Abandon(call));
            }
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
}

/// Work for the root context: completions, releases and abandons outlive their streams.
enum FleetOp {
    Complete {
        handle: Box<FleetHandle>,
        call: Call,
        record: Box<idemgate_core::Record>,
        attempts_left: u32,
    },
    Release(Box<FleetHandle>),
    Abandon(Call),
    KeepAlive(i64),
    /// A lease granted ahead of the claims that will need it.
    Grant(Lease),
}

struct QueuedOp {
    shared: Rc<Shared>,
    op: FleetOp,
}

thread_local! {
    static FLEET_QUEUE: RefCell<Vec<QueuedOp>> = const { RefCell::new(Vec::new()) };
    static FLEET_PENDING: RefCell<HashMap<u32, QueuedOp>> = RefCell::new(HashMap::new());
}

fn queue_fleet_op(shared: &Rc<Shared>, op: FleetOp) {
    FLEET_QUEUE.with(|q| {
        q.borrow_mut().push(QueuedOp {
            shared: shared.clone(),
            op,
        })
    });
}

/// Completion of a forwarded request in fleet mode: queued for the root context.
fn settle_fleet_response(s: &Rc<Shared>, handle: Box<FleetHandle>, capture: ResponseCapture) {
    let Some(f) = Fleet::new(&s.config) else {
        return;
    };
    match capture.finish() {
        Ok(stored) => match fleet::complete_call(&f, &handle, &stored) {
            Ok(call) => {
                let record = fleet::completed_record(&handle, &stored);
                queue_fleet_op(
                    s,
                    FleetOp::Complete {
                        handle,
                        call,
                        record: Box::new(record),
                        attempts_left: f.spec.retries,
                    },
                );
            }
            Err(_) => {
                s.metrics.inc("not_stored_too_large");
                unhold(s, &handle);
                log::warn!("idemgate: record for key {} exceeds store.etcd.maxValueBytes; not stored, key held until its lease lapses", handle.key_id.to_hex());
            }
        },
        Err(NotStored::Status(_)) => {
            s.metrics.inc("not_stored_status");
            queue_fleet_op(s, FleetOp::Release(handle));
        }
        Err(NotStored::TooLarge) => {
            s.metrics.inc("not_stored_too_large");
            unhold(s, &handle);
        }
    }
}

/// Dispatches queued fleet work from the root context (so its answers come back here).
fn drain_fleet_ops(root: u32) {
    let ops = FLEET_QUEUE.with(|q| std::mem::take(&mut *q.borrow_mut()));
    if ops.is_empty() {
        return;
    }
    let _ = hostcalls::set_effective_context(root);
    for q in ops {
        let Some(spec) = q.shared.config.store_etcd.clone() else {
            continue;
        };
        let call = match &q.op {
            FleetOp::Complete { call, .. } => call.clone(),
            FleetOp::Release(h) => fleet::release_call(h),
            FleetOp::Abandon(c) => c.clone(),
            FleetOp::KeepAlive(lease) => fleet::keepalive_call(*lease),
            FleetOp::Grant(lease) => lease.grant_call(now_ms()),
        };
        match dispatch(&spec, &call) {
            Ok(t) => FLEET_PENDING.with(|p| {
                p.borrow_mut().insert(t, q);
            }),
            Err(e) => {
                q.shared.metrics.inc("fleet_errors");
                log::error!("idemgate: {e}");
                match &q.op {
                    FleetOp::Complete { handle, .. } | FleetOp::Release(handle) => {
                        unhold(&q.shared, handle)
                    }
                    FleetOp::KeepAlive(lease) => {
                        let failed = Err(fleet::EtcdError::Unavailable(e));
                        q.shared
                            .keepalives
                            .borrow_mut()
                            .answered(*lease, &failed, now_ms());
                    }
                    FleetOp::Grant(lease) => {
                        GRANTING_AHEAD.with(|g| g.borrow_mut().retain(|l| l != lease))
                    }
                    FleetOp::Abandon(_) => {}
                }
            }
        }
    }
}

/// An answer to root-context fleet work.
fn fleet_op_answered(token: u32, status: Option<u16>, body: &[u8]) {
    let Some(q) = FLEET_PENDING.with(|p| p.borrow_mut().remove(&token)) else {
        return;
    };
    let s = q.shared.clone();
    match q.op {
        FleetOp::Complete {
            handle,
            call,
            record,
            attempts_left,
        } => match fleet::complete_outcome(&handle, status, body) {
            Ok(fleet::Completion::Stored) => {
                s.metrics.inc("stored");
                unhold(&s, &handle);
                cache_completed(&s, &handle.key_id, &record);
            }
            Ok(fleet::Completion::Lost) => {
                s.metrics.inc("lost_claims");
                unhold(&s, &handle);
                log::warn!(
                    "idemgate: key {} was taken over in etcd before its response completed",
                    handle.key_id.to_hex()
                );
            }
            Err(e) => {
                s.metrics.inc("fleet_errors");
                if attempts_left > 0 {
                    queue_fleet_op(
                        &s,
                        FleetOp::Complete {
                            handle,
                            call,
                            record,
                            attempts_left: attempts_left - 1,
                        },
                    );
                } else {
                    s.metrics.inc("store_errors");
                    unhold(&s, &handle);
                    log::error!(
                        "idemgate: completion of key {} not stored: {e}; key held until its lease lapses",
                        handle.key_id.to_hex()
                    );
                }
            }
        },
        FleetOp::Release(handle) => {
            unhold(&s, &handle);
            if status != Some(200) {
                s.metrics.inc("fleet_errors");
            }
        }
        FleetOp::Abandon(_) => {
            if status != Some(200) {
                s.metrics.inc("fleet_errors");
            }
        }
        FleetOp::Grant(lease) => {
            GRANTING_AHEAD.with(|g| g.borrow_mut().retain(|l| *l != lease));
            match fleet::parse_grant(status, body) {
                Ok(id) => cache_lease(&s, lease, id),
                Err(e) => {
                    s.metrics.inc("fleet_errors");
                    log::debug!("idemgate: lease grant ahead of claims: {e}");
                }
            }
        }
        FleetOp::KeepAlive(lease) => {
            let outcome = fleet::parse_keepalive(status, body);
            let refresh = s
                .keepalives
                .borrow_mut()
                .answered(lease, &outcome, now_ms());
            match refresh {
                fleet::Refresh::Alive => s.metrics.inc("fleet_keepalives"),
                fleet::Refresh::Gone => {
                    s.metrics.inc("fleet_leases_lost");
                    log::warn!("idemgate: in-flight lease {lease:x} lapsed in etcd while claims held it (etcd unreachable for longer than its TTL?); their keys are free again");
                }
                fleet::Refresh::Failed => {
                    s.metrics.inc("fleet_errors");
                    if let Err(e) = outcome {
                        log::debug!("idemgate: keep-alive of lease {lease:x}: {e}");
                    }
                }
                fleet::Refresh::Unheld => {}
            }
        }
    }
}

/// How often a request parked by the wait policy in fleet mode asks etcd again.
const FLEET_POLL_MS: u64 = 25;

/// A request parked by the wait policy in fleet mode. The root context carries it on:
/// calls dispatched from a root context are answered there, not in the stream.
struct FleetWaiter {
    reader: u32,
    shared: Rc<Shared>,
    due: u64,
    deadline: u64,
    claim: Box<FleetClaim>,
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
    static FLEET_WAIT_CALLS: RefCell<HashMap<u32, FleetWaiter>> = RefCell::new(HashMap::new());
}

/// Re-polls etcd for every parked request that is due: a create txn whose failure branch
/// reads the key (a released key is claimed at once; a completed one is replayed).
fn poll_fleet_waiters(root: u32) {
    let parked = FLEET_WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if parked.is_empty() {
        return;
    }
    let now = now_ms();
    let mut still = Vec::new();
    for mut w in parked {
        if w.due > now {
            still.push(w);
            continue;
        }
        let step = w
            .claim
            .flow
            .repoll(w.shared.config.rule_at(w.claim.rule), now);
        waiter_step(root, w, step);
    }
    FLEET_WAITERS.with(|w| w.borrow_mut().extend(still));
}

/// An answer from etcd to a parked request's call.
fn waiter_answered(root: u32, mut w: FleetWaiter, status: Option<u16>, body: &[u8]) {
    let s = w.shared.clone();
    let step = w.claim.answered(&s, status, body);
    waiter_step(root, w, step);
}

/// Carries a parked request on by one step, from the root context.
fn waiter_step(root: u32, mut w: FleetWaiter, step: Step) {
    let s = w.shared.clone();
    let rule = s.config.rule_at(w.claim.rule);
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
            w.due = now_ms().saturating_add(FLEET_POLL_MS);
            FLEET_WAITERS.with(|q| q.borrow_mut().push(w));
            return;
        }
        Step::Forward(handle) => {
            if waiter_settle(&mut w, Settlement::Other) {
                queue_fleet_op(&s, FleetOp::Release(Box::new(handle)));
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
                    queue_fleet_op(&s, FleetOp::Release(Box::new(handle)));
                    waiter_reject(&w, Rejection::Misconfigured { detail });
                }
            }
            let _ = hostcalls::set_effective_context(root);
            return;
        }
        Step::Answer {
            decision,
            completed,
        } => {
            if let Some(rec) = &completed {
                cache_completed(&s, &w.claim.flow.key_id(), rec);
            }
            let settled = match decision {
                idemgate_core::Decision::Replay(_) => Settlement::Replayed,
                _ => Settlement::Other,
            };
            if waiter_settle(&mut w, settled) {
                let _ = hostcalls::set_effective_context(root);
                return;
            }
            match decision {
                idemgate_core::Decision::Replay(stored) => {
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
                idemgate_core::Decision::Reject(r) => {
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
            let _ = hostcalls::set_effective_context(root);
            return;
        }
        Step::Unavailable {
            reason,
            maybe_claimed,
        } => Err(format!(
            "{reason}{}",
            if maybe_claimed {
                " (maybe claimed)"
            } else {
                ""
            }
        ))
        .inspect_err(|_| {
            if maybe_claimed {
                if let Some(call) = w.claim.flow.abandon_call() {
                    queue_fleet_op(&s, FleetOp::Abandon(call));
                }
            }
        }),
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
    w.claim.hold.abandon(w.reader);
    *w.settled.borrow_mut() = Settled::Done;
}
