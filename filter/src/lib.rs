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

mod fleet;
mod hold;
pub mod metrics;

use hold::{From, Hold, StopIteration};
use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use fleet::{FleetClaim, Settling};
use idemgate_core::config::ConcurrentAction;
use idemgate_core::decision::Request;
use idemgate_core::fleet::{FleetHandle, KeepAlives};
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

/// How often metrics counted in the VM reach Envoy's stats when nothing else needs a
/// faster tick: the most a counter at the admin endpoint lags behind the traffic.
const METRICS_FLUSH_MS: u32 = 1000;

impl Context for Root {
    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, size: usize) {
        let answer = fleet::Answer::read(status_code, size);
        fleet::root_answered(self.id, token, &answer);
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
                    fleet::FLEET_TICK_MS
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
                fleet::tick(self.id, s, &mut self.granted_ahead_at);
            }
        }
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
                response_hold: fleet::ResponseHold::default(),
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
    fleet::answer_completed();
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
    /// Fleet mode: the response is complete and its last bytes are held while its claim is
    /// settled in etcd (first attempt, from this stream).
    Settling(Box<Settling>),
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
    /// Fleet mode: which response bytes are held until the claim is settled in etcd.
    response_hold: fleet::ResponseHold,
}

impl Context for Reader {
    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, size: usize) {
        let answer = fleet::Answer::read(status_code, size);
        self.fleet_answered(token, &answer);
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
                fleet::unhold(&self.shared, &h);
                log::debug!(
                    "idemgate: key {} left in flight in etcd until its lease lapses",
                    h.key_id.to_hex()
                );
            }
            Phase::Waiting(_) => {
                let id = self.id;
                WAITERS.with(|w| w.borrow_mut().retain(|x| x.reader != id));
                fleet::forget_waiter(id);
            }
            phase @ (Phase::Settling(_) | Phase::FleetClaim(_)) => self.fleet_done(phase),
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

    /// The response is complete: settle its claim. `Pause` while its last bytes are held
    /// until the settlement is durable (fleet mode).
    fn finish_response(&mut self) -> Action {
        if self.settle_response() {
            return Action::Pause;
        }
        // Waiters on this worker learn the outcome right after this callback (wake_soon).
        // Not from here: a local answer sent to another stream from this stream's callback
        // would make Envoy stop this stream too (proxy-wasm stops the calling stream's
        // iteration after any send_local_response), cutting its response off.
        if WAITERS.with(|w| !w.borrow().is_empty()) {
            wake_soon();
        }
        Action::Continue
    }

    /// Settles the claim of a complete response; returns whether the response is held.
    fn settle_response(&mut self) -> bool {
        let (handle, capture) = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Capturing(Held::Local(h), c) => (h, c),
            Phase::Capturing(Held::Fleet(h), c) => return self.settle_fleet(h, c),
            _ => return false,
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
        false
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
                fleet::unhold(&self.shared, h);
            }
            log::debug!(
                "idemgate: local response {status} for key {}; claim left to its lease",
                handle.key_id().to_hex()
            );
            return Action::Continue;
        }
        let rule = self.shared.config.rule_at(rule_idx);
        let capture = ResponseCapture::new(rule, status, &headers);
        if matches!(handle, Held::Fleet(_)) {
            self.response_hold = fleet::ResponseHold::of(&headers);
        }
        self.phase = Phase::Capturing(handle, capture);
        if eos {
            return self.finish_response();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, eos: bool) -> Action {
        if let Phase::Capturing(_, capture) = &mut self.phase {
            // Bytes held back earlier (fleet mode) are still in the buffer: only the rest is new.
            let (from, new) = self.response_hold.fresh(body_size);
            if capture.wants_body() && new > 0 {
                if let Ok(Some(chunk)) =
                    hostcalls::get_buffer(BufferType::HttpResponseBody, from, new)
                {
                    capture.push(&chunk);
                }
            }
            if eos {
                return self.finish_response();
            }
            return self.response_hold.after(body_size, new);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        self.finish_response()
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
