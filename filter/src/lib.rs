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

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use idemgate_core::decision::Request;
use idemgate_core::problem::{self, LocalAnswer};
use idemgate_core::store::{Begun, CasStore, ClaimHandle, Events, Expect, SlotTable, StoreError};
use idemgate_core::{
    admit, Admission, Config, Fingerprinter, NotStored, Rejection, ResponseCapture,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

/// Internal request header carrying the reader→gate token. Removed by the reader when a
/// client sends it, and by the gate before the request goes on.
const GATE_HEADER: &str = "x-idemgate-gate";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

thread_local! {
    /// Gate contexts waiting for release, by token (this VM = this worker thread).
    static GATES: RefCell<HashMap<u64, u32>> = RefCell::new(HashMap::new());
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
    ids: HashMap<&'static str, u32>,
}

impl Metrics {
    fn define(namespace: &str) -> Self {
        let mut ids = HashMap::new();
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
            Rejection::StoreUnavailable { .. } => "store_unavailable",
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

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    #[default]
    Reader,
    Gate,
}

#[derive(Default)]
struct Root {
    role: Role,
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
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
                log::info!(
                    "idemgate: configured (root_id {root_id:?}, methods {:?}, key header {}, ttl {}s, lease {}s, capacity {})",
                    config.methods,
                    config.key_header,
                    config.ttl_ms / 1000,
                    config.lease_ms / 1000,
                    config.store_capacity
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

enum Phase {
    Idle,
    /// Buffering the body of a covered request; the gate holds its headers.
    Waiting {
        key_id: idemgate_core::KeyId,
        fp: Fingerprinter,
        token: u64,
    },
    /// Forwarded with a claim; waiting for the response.
    Forwarded(ClaimHandle),
    /// Capturing the response.
    Capturing(ClaimHandle, ResponseCapture),
    /// Answered locally or finished.
    Done,
}

struct Reader {
    id: u32,
    shared: Rc<Shared>,
    phase: Phase,
}

impl Context for Reader {
    fn on_done(&mut self) -> bool {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Forwarded(h) | Phase::Capturing(h, _) => {
                // No complete response: the outcome is unknown (reset, timeout, client gone).
                // The claim stays until its lease lapses; then a retry goes through.
                self.shared.metrics.inc("not_stored_incomplete");
                log::debug!(
                    "idemgate: key {} left in flight until its lease lapses",
                    h.key_id.to_hex()
                );
            }
            Phase::Waiting { token, .. } => {
                GATES.with(|g| g.borrow_mut().remove(&token));
            }
            _ => {}
        }
        true
    }
}

impl Reader {
    fn respond(&mut self, answer: LocalAnswer) -> Action {
        self.phase = Phase::Done;
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
        Action::Pause
    }

    fn reject(&mut self, rejection: Rejection) -> Action {
        let s = self.shared.clone();
        s.metrics.rejection(&rejection);
        log::debug!("idemgate: rejected: {rejection:?}");
        self.respond(problem::render(&s.config, &rejection))
    }

    /// Decides once the body is complete. `token` is the gate to release, if any.
    fn conclude(
        &mut self,
        key_id: idemgate_core::KeyId,
        fp: Fingerprinter,
        token: Option<u64>,
    ) -> Action {
        let s = self.shared.clone();
        let request = Request {
            fingerprint: fp.finish(),
            owner: fresh_token(),
        };
        let table = SlotTable::new(&s.store, &s.config);
        let (begun, events) = match table.begin(&s.config, key_id, &request, now_ms()) {
            Ok(r) => r,
            Err(e) => {
                log::error!("idemgate: {e}");
                s.metrics.inc("store_errors");
                return self.reject(Rejection::StoreUnavailable {
                    retry_after_s: 1,
                    reason: "store error",
                });
            }
        };
        s.metrics.events(&events);
        match begun {
            Begun::Replay(stored) => {
                s.metrics.inc("replayed");
                log::debug!("idemgate: replaying key {}", key_id.to_hex());
                self.respond(problem::replay(&s.config, &stored))
            }
            Begun::Reject(r) => self.reject(r),
            Begun::Forward(handle) => {
                if let Some(t) = token {
                    if let Err(detail) = self.release_gate(t) {
                        let _ = table.release(&handle);
                        log::error!("idemgate: {detail}");
                        return self.reject(Rejection::Misconfigured { detail });
                    }
                }
                s.metrics.inc("forwarded");
                self.phase = Phase::Forwarded(handle);
                Action::Continue
            }
        }
    }

    fn release_gate(&self, token: u64) -> Result<(), String> {
        let gate = GATES.with(|g| g.borrow_mut().remove(&token)).ok_or_else(|| {
            "the idemgate_gate filter did not hold this request; configure it right after the idemgate filter with the same vm_config".to_string()
        })?;
        hostcalls::set_effective_context(gate)
            .map_err(|e| format!("gate context {gate} is gone: {e:?}"))?;
        let resumed = hostcalls::resume_http_request();
        let _ = hostcalls::set_effective_context(self.id);
        resumed.map_err(|e| format!("could not release the gate: {e:?}"))
    }

    fn finish_response(&mut self) {
        let Phase::Capturing(handle, capture) = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return;
        };
        let s = self.shared.clone();
        let table = SlotTable::new(&s.store, &s.config);
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
}

impl HttpContext for Reader {
    fn on_http_request_headers(&mut self, _n: usize, eos: bool) -> Action {
        let s = self.shared.clone();
        // Never trust a client-sent gate token.
        let _ = hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, GATE_HEADER, None);
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        let pseudo = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let (method, path) = (pseudo(":method"), pseudo(":path"));
        if s.config.covers_method(&method) {
            s.metrics.inc("requests");
        }
        match admit(&s.config, &method, &path, &headers) {
            Admission::Pass => {
                s.metrics.inc("passed");
                Action::Continue
            }
            Admission::Reject(r) => self.reject(r),
            Admission::Inspect(pending) => {
                let fp = Fingerprinter::new(&method, &path);
                if eos {
                    return self.conclude(pending.key_id, fp, None);
                }
                let token = fresh_token();
                if let Err(e) = hostcalls::set_map_value_bytes(
                    MapType::HttpRequestHeaders,
                    GATE_HEADER,
                    Some(token.to_string().as_bytes()),
                ) {
                    log::error!("idemgate: could not tag request for the gate: {e:?}");
                    return self.reject(Rejection::Misconfigured {
                        detail: "could not tag the request for the gate".into(),
                    });
                }
                self.phase = Phase::Waiting {
                    key_id: pending.key_id,
                    fp,
                    token,
                };
                Action::Continue
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, eos: bool) -> Action {
        let Phase::Waiting { .. } = self.phase else {
            return Action::Continue;
        };
        let limit = self.shared.config.max_body_bytes;
        if body_size as u64 > limit {
            return self.reject(Rejection::BodyTooLarge { limit });
        }
        if !eos {
            return Action::Pause;
        }
        self.body_complete(body_size)
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        if let Phase::Waiting { .. } = self.phase {
            let size = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
                .ok()
                .flatten()
                .map_or(0, |b| b.len());
            return self.body_complete(size);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, eos: bool) -> Action {
        let Phase::Forwarded(handle) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return Action::Continue;
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
                handle.key_id.to_hex()
            );
            return Action::Continue;
        }
        let capture = ResponseCapture::new(&self.shared.config, status, &headers);
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
    fn body_complete(&mut self, body_size: usize) -> Action {
        let Phase::Waiting {
            key_id,
            mut fp,
            token,
        } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return Action::Continue;
        };
        if body_size > 0 {
            match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
                Ok(Some(body)) => fp.update(&body),
                Ok(None) => {}
                Err(e) => {
                    log::error!("idemgate: could not read the request body: {e:?}");
                    GATES.with(|g| g.borrow_mut().remove(&token));
                    return self.reject(Rejection::Misconfigured {
                        detail: "the request body could not be read".into(),
                    });
                }
            }
        }
        self.conclude(key_id, fp, Some(token))
    }
}
