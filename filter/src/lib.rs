//! # idemgate-filter
//!
//! The Envoy proxy-wasm adapter. This file alone calls the host ABI; every decision is made
//! by `idemgate-core`.
//!
//! The filter is loaded twice in the same VM (same `vm_config`): a **reader**
//! (`root_id: idemgate`, carrying the configuration) and a **gate** (`root_id:
//! idemgate_gate`) placed after it. Envoy turns a proxy-wasm `Pause` from request headers
//! into stop-all, so a single filter cannot read the body while holding the headers back.
//! Instead the reader lets the headers pass to the gate, which holds them (and everything
//! after them), while the reader buffers and fingerprints the body and decides. Only a
//! request that is to be forwarded is released through the gate; a replayed or rejected
//! request never reaches the origin, neither its headers nor any of its body. Requests
//! decided at header time (no body, bad key, methods outside the list) never involve the
//! gate.
//!
//! Claims are made atomic across worker threads by [`idemgate_core::store::SlotTable`] over
//! Envoy's shared data. Shared data has no atomic insert-if-absent (`set` on an absent key
//! ignores CAS); the adapter gets one by writing with a *fence* CAS: the version of another
//! key it owns. Every `set` takes a fresh version from one global counter, so no live key
//! can hold the fence's version and the conditional write fails whenever the key exists.
#![forbid(unsafe_code)]

pub mod metrics;
mod vecmap;

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::UNIX_EPOCH;
use vecmap::VecMap;

use idemgate_core::config::ConcurrentAction;
use idemgate_core::decision::Request;
use idemgate_core::fleet::{self, Call, ClaimFlow, Fleet, FleetHandle, Step};
use idemgate_core::problem::{self, AnswerContext, LocalAnswer};
use idemgate_core::ratelimit::{self, RateHeaders};
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

/// Internal request header carrying the reader→gate token. Removed by the reader when a
/// client sends it, and by the gate before the request goes on.
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
    /// Gate contexts waiting for release, by token (this VM = this worker thread).
    static GATES: RefCell<VecMap<u64, u32>> = RefCell::new(VecMap::new());
    static SEED: u64 = RandomState::new().build_hasher().finish();
    static COUNTER: Cell<u64> = const { Cell::new(0) };
}

/// A fresh token, unique across workers with overwhelming probability.
fn fresh_token() -> u64 {
    let n = COUNTER.with(|c| {
        let v = c.get().wrapping_add(1);
        c.set(v);
        v
    });
    let seed = SEED.with(|s| *s);
    // splitmix64 over seed + counter
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).max(1)
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

/// Metric ids defined for one namespace.
#[derive(Default)]
struct Metrics {
    ids: VecMap<&'static str, u32>,
}

impl Metrics {
    fn define(namespace: &str) -> Self {
        let mut ids = VecMap::new();
        for m in metrics::COUNTERS {
            if let Ok(id) =
                hostcalls::define_metric(MetricType::Counter, &metrics::name(namespace, m))
            {
                ids.insert(*m, id);
            }
        }
        for m in metrics::GAUGES {
            if let Ok(id) =
                hostcalls::define_metric(MetricType::Gauge, &metrics::name(namespace, m))
            {
                ids.insert(*m, id);
            }
        }
        Self { ids }
    }

    fn add(&self, metric: &str, n: i64) {
        if n == 0 {
            return;
        }
        if let Some(id) = self.ids.get(metric) {
            let _ = hostcalls::increment_metric(*id, n);
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
        self.inc(match r {
            Rejection::MissingKey { .. } => "missing_keys",
            Rejection::MalformedKey { .. } => "bad_keys",
            Rejection::BodyTooLarge { .. } => "too_large",
            Rejection::Conflict { .. } => "conflicts",
            Rejection::Mismatch => "mismatches",
            Rejection::Duplicate => "duplicates",
            Rejection::InvalidBody { .. } => "invalid_bodies",
            Rejection::InvalidExpiry { .. } => "invalid_expiries",
            Rejection::StoreUnavailable { .. } => "store_unavailable",
            Rejection::RateLimited { .. } => "rate_limited",
            Rejection::Misconfigured { .. } => "misconfigured",
        });
    }
}

/// State shared by a reader root context and its streams.
struct Shared {
    config: Config,
    store: SharedData,
    metrics: Metrics,
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
}

/// How often waiting requests look at the store again.
const WAIT_POLL_MS: u32 = 10;

/// How often the root context dispatches queued fleet completions and releases.
const FLEET_TICK_MS: u32 = 10;

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _n: usize, body_size: usize, _t: usize) {
        let (status, body) = call_answer(body_size);
        fleet_op_answered(token, status, &body);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        // Format and send only what Envoy will print.
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
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
            log::info!("idemgate: gate ready (root_id {root_id})");
            return true;
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
                if config.store_etcd.is_some() {
                    // Fleet mode: completions and releases are dispatched from the root
                    // context's tick (a stream's own calls die with it).
                    let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(
                        u64::from(FLEET_TICK_MS),
                    ));
                } else if waits {
                    let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(
                        u64::from(WAIT_POLL_MS),
                    ));
                }
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
                }));
                true
            }
            Err(e) => {
                log::error!("idemgate: invalid configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        poll_waiters();
        drain_fleet_ops(self.id);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        match (self.role, &self.shared) {
            (Role::Gate, _) => Some(Box::new(Gate {
                id: context_id,
                token: None,
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

/// Holds a request's headers (and so everything after them) until the reader releases it.
struct Gate {
    id: u32,
    token: Option<u64>,
}

impl Context for Gate {
    fn on_done(&mut self) -> bool {
        if let Some(t) = self.token.take() {
            GATES.with(|g| g.borrow_mut().remove(&t));
        }
        true
    }
}

impl HttpContext for Gate {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Ok(Some(raw)) =
            hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, GATE_HEADER)
        else {
            return Action::Continue;
        };
        let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, GATE_HEADER, None);
        let token = std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        match token {
            Some(t) => {
                GATES.with(|g| g.borrow_mut().insert(t, self.id));
                self.token = Some(t);
                Action::Pause
            }
            None => Action::Continue,
        }
    }
}

/// Where a waiting request ended up, filled in by the root context's tick.
#[derive(Default)]
enum Settled {
    #[default]
    Pending,
    Forwarded(usize, ClaimHandle),
    Done,
}

/// A request parked by the `wait` concurrency policy.
struct Waiter {
    reader: u32,
    gate: Option<u64>,
    shared: Rc<Shared>,
    rule: usize,
    key_id: idemgate_core::KeyId,
    request: Request,
    deadline: u64,
    ctx: AnswerContext,
    settled: Rc<RefCell<Settled>>,
}

thread_local! {
    static WAITERS: RefCell<Vec<Waiter>> = const { RefCell::new(Vec::new()) };
}

/// Looks at the store for every waiting request of this worker; answers or forwards those
/// whose key settled (or whose wait ran out).
fn poll_waiters() {
    let waiting = WAITERS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if waiting.is_empty() {
        return;
    }
    let now = now_ms();
    let mut still = Vec::new();
    for w in waiting {
        let rule = w.shared.config.rule_at(w.rule);
        let table = w.shared.table();
        let outcome = table.begin_waiting(rule, w.key_id, &w.request, now, Some(w.deadline));
        if hostcalls::set_effective_context(w.reader).is_err() {
            continue; // the stream is gone
        }
        match outcome {
            Ok((Begun::Wait { .. }, _)) => {
                still.push(w);
                continue;
            }
            Ok((Begun::Replay(stored), ev)) => {
                w.shared.metrics.events(&ev);
                w.shared.metrics.inc("replayed");
                w.shared.metrics.inc("waited");
                send(problem::replay(rule, &stored, &w.ctx));
                *w.settled.borrow_mut() = Settled::Done;
            }
            Ok((Begun::Reject(r), ev)) => {
                w.shared.metrics.events(&ev);
                if matches!(r, Rejection::Conflict { .. }) {
                    w.shared.metrics.inc("wait_timeouts");
                }
                w.shared.metrics.rejection(&r);
                send(problem::render(rule, &r, &w.ctx));
                *w.settled.borrow_mut() = Settled::Done;
            }
            Ok((Begun::Forward(handle), ev)) => {
                w.shared.metrics.events(&ev);
                // The first request gave the key back (or its lease lapsed): this one goes.
                let released = match w.gate {
                    Some(t) => release_gate(w.reader, t),
                    None => Ok(()),
                };
                let _ = hostcalls::set_effective_context(w.reader);
                match released
                    .and_then(|()| hostcalls::resume_http_request().map_err(|e| format!("{e:?}")))
                {
                    Ok(()) => {
                        w.shared.metrics.inc("forwarded");
                        *w.settled.borrow_mut() = Settled::Forwarded(w.rule, handle);
                    }
                    Err(detail) => {
                        let _ = table.release(&handle);
                        let r = Rejection::Misconfigured { detail };
                        w.shared.metrics.rejection(&r);
                        send(problem::render(rule, &r, &w.ctx));
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
                send(problem::render(rule, &r, &w.ctx));
                *w.settled.borrow_mut() = Settled::Done;
            }
        }
    }
    WAITERS.with(|w| w.borrow_mut().extend(still));
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

/// Releases the gate holding request `token`, then makes `reader` the effective context
/// again.
fn release_gate(reader: u32, token: u64) -> Result<(), String> {
    let gate = GATES.with(|g| g.borrow_mut().remove(&token)).ok_or_else(|| {
        "the idemgate_gate filter did not hold this request; configure it right after the idemgate filter with the same vm_config".to_string()
    })?;
    hostcalls::set_effective_context(gate)
        .map_err(|e| format!("gate context {gate} is gone: {e:?}"))?;
    let resumed = hostcalls::resume_http_request();
    let _ = hostcalls::set_effective_context(reader);
    resumed.map_err(|e| format!("could not release the gate: {e:?}"))
}

enum Phase {
    Idle,
    /// Buffering the body of a covered request; the gate holds its headers.
    Buffering {
        pending: Pending,
        token: u64,
    },
    /// Parked by the wait policy; the root's tick settles it.
    Waiting(Rc<RefCell<Settled>>),
    /// Forwarded with a claim; waiting for the response.
    Forwarded(usize, ClaimHandle),
    /// Fleet mode: waiting for etcd to decide the claim (the gate holds the request).
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
                log::debug!(
                    "idemgate: key {} left in flight in etcd until its lease lapses",
                    h.key_id.to_hex()
                );
            }
            Phase::Buffering { token, .. } => {
                GATES.with(|g| g.borrow_mut().remove(&token));
            }
            Phase::Waiting(_) => {
                let id = self.id;
                WAITERS.with(|w| w.borrow_mut().retain(|x| x.reader != id));
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
            Settled::Forwarded(rule, h) => self.phase = Phase::Forwarded(rule, h),
            Settled::Done => self.phase = Phase::Done,
        }
    }

    fn respond(&mut self, mut answer: LocalAnswer) -> Action {
        self.phase = Phase::Done;
        if let Some(rate) = &self.rate {
            for (name, value) in rate.pairs() {
                answer
                    .headers
                    .retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                answer.headers.push((name.to_string(), value));
            }
        }
        send(answer);
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
        let s = self.shared.clone();
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
        self.rate = Some(charge.headers);
        limited.map(|retry_after_s| Rejection::RateLimited { retry_after_s })
    }

    /// Settles a charge deferred until the decision (covered requests).
    fn deferred(&mut self, cost: u32) -> Option<(usize, Rejection)> {
        let (rule, headers) = self.deferred_charge.take()?;
        self.charge(rule, &headers, cost).map(|r| (rule, r))
    }

    fn reject(&mut self, rule: &Rule, rejection: Rejection) -> Action {
        self.shared.metrics.rejection(&rejection);
        log::debug!("idemgate: rejected ({}): {rejection:?}", rule.name);
        self.respond(problem::render(rule, &rejection, &self.ctx))
    }

    /// Claims, replays or rejects once key and fingerprint are known.
    fn conclude(&mut self, rule_idx: usize, resolved: Resolved, token: Option<u64>) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(rule_idx);
        self.ctx.idempotency_key = Some(resolved.key.clone());
        let request = Request {
            fingerprint: resolved.fingerprint,
            owner: fresh_token(),
            expires_in_ms: resolved.expires_in_ms,
        };
        if s.config.store_etcd.is_some() {
            return self.conclude_fleet(rule_idx, &resolved, request, token);
        }
        let table = s.table();
        let (begun, events) = match table.begin(rule, resolved.key_id, &request, now_ms()) {
            Ok(r) => r,
            Err(e) => {
                log::error!("idemgate: {e}");
                s.metrics.inc("store_errors");
                return self.reject(
                    rule,
                    Rejection::StoreUnavailable {
                        retry_after_s: 1,
                        reason: "store error",
                    },
                );
            }
        };
        s.metrics.events(&events);
        let cost = match &begun {
            Begun::Replay(_) => u32::from(
                s.config
                    .rule_at(self.deferred_charge.as_ref().map_or(0, |(r, _)| *r))
                    .rate_limit
                    .as_ref()
                    .is_some_and(|r| r.charge_replays),
            ),
            Begun::Wait { .. } => 0,
            _ => 1,
        };
        if let Some((limit_rule, limited)) = self.deferred(cost) {
            if let Begun::Forward(handle) = &begun {
                let _ = table.release(handle);
            }
            if let Some(t) = token {
                GATES.with(|g| g.borrow_mut().remove(&t));
            }
            return self.reject(s.config.rule_at(limit_rule), limited);
        }
        match begun {
            Begun::Replay(stored) => {
                s.metrics.inc("replayed");
                log::debug!("idemgate: replaying key {}", resolved.key_id.to_hex());
                self.respond(problem::replay(rule, &stored, &self.ctx))
            }
            Begun::Reject(r) => self.reject(rule, r),
            Begun::Wait { deadline } => {
                let settled = Rc::new(RefCell::new(Settled::Pending));
                WAITERS.with(|w| {
                    w.borrow_mut().push(Waiter {
                        reader: self.id,
                        gate: token,
                        shared: s.clone(),
                        rule: rule_idx,
                        key_id: resolved.key_id,
                        request,
                        deadline,
                        ctx: self.ctx.clone(),
                        settled: settled.clone(),
                    })
                });
                self.phase = Phase::Waiting(settled);
                Action::Pause
            }
            Begun::Forward(handle) => {
                if let Some(t) = token {
                    if let Err(detail) = release_gate(self.id, t) {
                        let _ = table.release(&handle);
                        log::error!("idemgate: {detail}");
                        return self.reject(rule, Rejection::Misconfigured { detail });
                    }
                }
                s.metrics.inc("forwarded");
                self.phase = Phase::Forwarded(rule_idx, handle);
                Action::Continue
            }
        }
    }

    /// The whole body is in (or there is none): resolve the key, then conclude.
    fn body_complete(&mut self, pending: Pending, token: Option<u64>, body: &[u8]) -> Action {
        let s = self.shared.clone();
        let rule = s.config.rule_at(pending.rule);
        match resolve(&s.config, &pending, body) {
            Resolution::Ready(resolved) => self.conclude(pending.rule, resolved, token),
            Resolution::Reject(r) => self.reject(rule, r),
            Resolution::Pass => {
                s.metrics.inc("passed");
                if let Some(t) = token {
                    if let Err(detail) = release_gate(self.id, t) {
                        return self.reject(rule, Rejection::Misconfigured { detail });
                    }
                }
                self.phase = Phase::Done;
                Action::Continue
            }
        }
    }

    fn finish_response(&mut self) {
        self.settle_response();
        // Waiters on this worker learn the outcome now rather than at the next tick.
        poll_waiters();
        let _ = hostcalls::set_effective_context(self.id);
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
                let id = problem::correlation_id(fresh_token(), fresh_token());
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
        // Never trust a client-sent gate token.
        let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, GATE_HEADER, None);
        let mut headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
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
                    return self.body_complete(pending, None, &[]);
                }
                let token = fresh_token();
                if let Err(e) = hostcalls::set_map_value_bytes(
                    MapType::HttpRequestHeaders,
                    GATE_HEADER,
                    Some(token.to_string().as_bytes()),
                ) {
                    log::error!("idemgate: could not tag request for the gate: {e:?}");
                    return self.reject(
                        rule,
                        Rejection::Misconfigured {
                            detail: "could not tag the request for the gate".into(),
                        },
                    );
                }
                self.phase = Phase::Buffering { pending, token };
                Action::Continue
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, eos: bool) -> Action {
        let limit = match &self.phase {
            Phase::Buffering { pending, .. } => {
                self.shared.config.rule_at(pending.rule).max_body_bytes
            }
            Phase::Waiting(_) => return Action::Pause,
            _ => return Action::Continue,
        };
        if body_size as u64 > limit {
            let s = self.shared.clone();
            if let Phase::Buffering { pending, token } =
                std::mem::replace(&mut self.phase, Phase::Done)
            {
                GATES.with(|g| g.borrow_mut().remove(&token));
                return self.reject(
                    s.config.rule_at(pending.rule),
                    Rejection::BodyTooLarge { limit },
                );
            }
        }
        if !eos {
            return Action::Pause;
        }
        self.take_body(body_size)
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        if let Phase::Buffering { .. } = self.phase {
            let size = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
                .ok()
                .flatten()
                .map_or(0, |b| b.len());
            return self.take_body(size);
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
    fn take_body(&mut self, body_size: usize) -> Action {
        let Phase::Buffering { pending, token } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return Action::Continue;
        };
        let body = if body_size > 0 {
            match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
                Ok(b) => b.unwrap_or_default(),
                Err(e) => {
                    log::error!("idemgate: could not read the request body: {e:?}");
                    GATES.with(|g| g.borrow_mut().remove(&token));
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
        self.body_complete(pending, Some(token), &body)
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
    gate: Option<u64>,
    flow: ClaimFlow,
    /// Token of the call in flight.
    call: u32,
    /// The call in flight is a lease grant for this deadline.
    granting: Option<u64>,
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

fn cached_lease(s: &Shared, deadline: u64) -> Option<i64> {
    let spec = s.config.store_etcd.as_ref()?;
    let key = fleet::lease_cache_key(&s.config.store_namespace, deadline, spec.lease_bucket_ms);
    match hostcalls::get_shared_data(&key) {
        Ok((Some(v), _)) => fleet::parse_lease_cache(&v, deadline),
        _ => None,
    }
}

fn cache_lease(s: &Shared, deadline: u64, lease: i64) {
    if let Some(spec) = s.config.store_etcd.as_ref() {
        let key = fleet::lease_cache_key(&s.config.store_namespace, deadline, spec.lease_bucket_ms);
        let value = fleet::lease_cache_value(deadline, lease);
        let _ = hostcalls::set_shared_data(&key, Some(value.as_bytes()), None);
    }
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
        token: Option<u64>,
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
                        return self.fleet_answer(rule_idx, token, Some(stored), None);
                    }
                    idemgate_core::Decision::Reject(r) => {
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
        });
        match self.fleet_next(&mut claim, None) {
            Some(action) => action,
            None => {
                self.phase = Phase::FleetClaim(claim);
                Action::Pause
            }
        }
    }

    /// Sends the claim's next call: a grant when no lease is known for `need_lease`
    /// (or for the flow's deadline), else the claim txn. `Some(action)` when it ended.
    fn fleet_next(&mut self, claim: &mut FleetClaim, need_lease: Option<u64>) -> Option<Action> {
        let s = self.shared.clone();
        let spec = s.config.store_etcd.as_ref()?;
        let deadline = need_lease.unwrap_or_else(|| claim.flow.deadline());
        let lease = if need_lease.is_some() {
            None
        } else {
            cached_lease(&s, deadline)
        };
        let call = match lease {
            Some(id) => {
                claim.granting = None;
                claim.flow.call(id)
            }
            None => {
                claim.granting = Some(deadline);
                s.metrics.inc("fleet_leases");
                fleet::grant_call(fleet::lease_ttl_seconds(deadline, now_ms()))
            }
        };
        match dispatch(spec, &call) {
            Ok(t) => {
                claim.call = t;
                None
            }
            Err(e) => Some(self.fleet_unavailable(claim, e, false)),
        }
    }

    fn fleet_answered(&mut self, token: u32, status: Option<u16>, body: &[u8]) {
        let Phase::FleetClaim(mut claim) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        if claim.call != token {
            self.phase = Phase::FleetClaim(claim);
            return;
        }
        let s = self.shared.clone();
        let rule = s.config.rule_at(claim.rule);
        let step = if let Some(deadline) = claim.granting.take() {
            match fleet::parse_grant(status, body) {
                Ok(lease) => {
                    cache_lease(&s, deadline, lease);
                    Step::Send(claim.flow.call(lease))
                }
                Err(e) => {
                    s.metrics.inc("fleet_errors");
                    Step::Unavailable {
                        reason: format!("lease grant: {e}"),
                        maybe_claimed: false,
                    }
                }
            }
        } else {
            let step = claim.flow.on_answer(rule, status, body, now_ms());
            if status != Some(200) {
                s.metrics.inc("fleet_errors");
            }
            step
        };
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
            Step::NeedLease { deadline } => match self.fleet_next(&mut claim, Some(deadline)) {
                None => {
                    self.phase = Phase::FleetClaim(claim);
                    return;
                }
                Some(a) => a,
            },
            Step::Forward(handle) => self.fleet_forward(claim.rule, claim.gate, handle),
            Step::Answer {
                decision,
                completed,
            } => {
                if let Some(rec) = &completed {
                    cache_completed(&s, &claim.flow.key_id(), rec);
                }
                match decision {
                    idemgate_core::Decision::Replay(stored) => {
                        self.fleet_answer(claim.rule, claim.gate, Some(stored), None)
                    }
                    idemgate_core::Decision::Reject(r) => {
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
        if let Some((limit_rule, limited)) = self.deferred(1) {
            queue_fleet_op(&s, FleetOp::Release(Box::new(handle)));
            if let Some(t) = gate {
                GATES.with(|g| g.borrow_mut().remove(&t));
            }
            return self.reject(s.config.rule_at(limit_rule), limited);
        }
        if let Some(t) = gate {
            if let Err(detail) = release_gate(self.id, t) {
                queue_fleet_op(&s, FleetOp::Release(Box::new(handle)));
                log::error!("idemgate: {detail}");
                return self.reject(rule, Rejection::Misconfigured { detail });
            }
        }
        s.metrics.inc("forwarded");
        self.phase = Phase::FleetForwarded(rule_idx, Box::new(handle));
        Action::Continue
    }

    /// etcd could not decide: the fail policy answers.
    fn fleet_unavailable(&mut self, claim: &FleetClaim, reason: String, maybe: bool) -> Action {
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
}

struct QueuedOp {
    shared: Rc<Shared>,
    op: FleetOp,
}

thread_local! {
    static FLEET_QUEUE: RefCell<Vec<QueuedOp>> = const { RefCell::new(Vec::new()) };
    static FLEET_PENDING: RefCell<VecMap<u32, QueuedOp>> = RefCell::new(VecMap::new());
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
                log::warn!("idemgate: record for key {} exceeds store.etcd.maxValueBytes; not stored, key held until its lease lapses", handle.key_id.to_hex());
            }
        },
        Err(NotStored::Status(_)) => {
            s.metrics.inc("not_stored_status");
            queue_fleet_op(s, FleetOp::Release(handle));
        }
        Err(NotStored::TooLarge) => {
            s.metrics.inc("not_stored_too_large");
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
        };
        match dispatch(&spec, &call) {
            Ok(t) => FLEET_PENDING.with(|p| {
                p.borrow_mut().insert(t, q);
            }),
            Err(e) => {
                q.shared.metrics.inc("fleet_errors");
                log::error!("idemgate: {e}");
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
                cache_completed(&s, &handle.key_id, &record);
            }
            Ok(fleet::Completion::Lost) => {
                s.metrics.inc("lost_claims");
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
                    log::error!(
                        "idemgate: completion of key {} not stored: {e}; key held until its lease lapses",
                        handle.key_id.to_hex()
                    );
                }
            }
        },
        FleetOp::Release(_) | FleetOp::Abandon(_) => {
            if status != Some(200) {
                s.metrics.inc("fleet_errors");
            }
        }
    }
}
