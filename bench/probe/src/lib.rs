//! Benchmark probe: the floor plus idemgate's per-byte work, one piece at a time.
//!
//! Plugin configuration (a plain string):
//!
//! - `body`: like the floor, and also buffers the whole request body (returns `Pause` until
//!   end of stream, as idemgate's reader does) and copies it into the VM with one
//!   `get_buffer` call.
//! - `hash`: `body`, plus SHA-256 over the copied body (idemgate-core's, as the filter
//!   fingerprints: the wasm SIMD implementation of `core/src/sha256.rs`).
//! - `hash_b3`: `body`, plus BLAKE3 over the copied body (the opt-in
//!   `fingerprint.algorithm: "blake3"`; the `blake3` crate with wasm SIMD).
//! - `answer` / `answer_hash`: `body` (`answer_hash`: and SHA-256 of it), then answers the
//!   request itself with `send_http_response` (200, two headers, `{"ok":true}`), as idemgate
//!   answers a replay; loaded with a `gate` in the same VM, as idemgate is.
//! - `gate`: holds every request's headers (`Pause`), as idemgate's gate does, until a
//!   `claim` reader releases them (an `answer` reader never does: it answers itself).
//! - `claim`: the floor of a first request in idemgate's design, with none of its logic:
//!   `hash`, then a claim (get a bucket value from shared data, set it with its CAS), the
//!   `gate` released (`set_effective_context` + `resume_http_request`), the request goes on;
//!   on the answer, its headers (`get_map_bytes`, `response.code_details`) and body
//!   (`get_buffer`) are read and the completion written (get the bucket, set a record, set the
//!   bucket): the same hostcalls as idemgate's first request. Loaded with a `gate`.
//!
//! - `lookup`: `answer_hash` with idemgate's other hostcalls for a replay and none of its
//!   logic: every request header read (`get_map_bytes`), the time, and two shared-data gets
//!   (a bucket and a record, of the sizes idemgate's are) before the answer. Loaded with a
//!   `gate`.
//!
//! The `answer` rows are the floor of any replay with idemgate's design: what a replay costs
//! before looking anything up; `lookup` with its lookups; `claim` the same for first requests.
//!
//! `answer`, `answer_hash`, `lookup` and `claim` follow idemgate's two modes: loaded alone
//! (single-filter mode, as idemgate ships: Envoy ≥ 1.35 with `allow_on_headers_stop_iteration`)
//! the probe holds the request headers itself (`Pause`) and lets them go with the body; loaded
//! with a `gate` in its VM (two-filter mode) it lets the headers pass to the gate and
//! releases the gate instead.
//!
//! `make bench` runs `body` and `hash` at 64 KiB; the difference in Envoy CPU per request
//! between the two is the hash alone, inside Envoy's V8, so 64 KiB / that difference is the
//! in-Envoy hash throughput.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use idemgate_core::sha256::Sha256;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot { hash: Hash::None, then: Then::Continue }) });
}}

#[derive(Clone, Copy)]
enum Hash {
    None,
    Sha256,
    Blake3,
}

#[derive(Clone, Copy, Default)]
enum Then {
    /// Let the request go on.
    #[default]
    Continue,
    /// Answer it locally.
    Answer,
    /// Hold its headers (a gate), until a `Claim` reader releases them.
    Hold,
    /// Claim, release the gate, let it go on, complete on the answer.
    Claim,
    /// Read all headers, the time, a bucket and a record, then answer locally.
    Lookup,
}

/// The shared-data values a `lookup` reader reads (set at configuration).
const LOOKUP_BUCKET: &str = "probe:lookup:bucket";
const LOOKUP_RECORD: &str = "probe:lookup:record";

thread_local! {
    /// Set by a `claim` reader for the gate right behind it (same VM, same thread).
    static NEXT_GATE: Cell<Option<u64>> = const { Cell::new(None) };
    /// Gate context ids by token.
    static GATES: RefCell<BTreeMap<u64, u32>> = const { RefCell::new(BTreeMap::new()) };
    static TOKENS: Cell<u64> = const { Cell::new(0) };
    /// A `gate` is configured in this VM: two-filter mode.
    static GATE_IN_VM: Cell<bool> = const { Cell::new(false) };
}

/// Buckets of the claim table, as idemgate's `store.capacity / store.probes`.
const BUCKETS: u64 = 1250;

fn bucket_of(key: &[u8]) -> u64 {
    // FNV-1a: any spread will do
    key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    }) % BUCKETS
}

/// Get then CAS-set `key` to `value` (one try, as a claim without contention).
fn get_and_set(key: &str, value: &[u8]) {
    let cas = hostcalls::get_shared_data(key)
        .ok()
        .and_then(|(_, cas)| cas);
    let _ = hostcalls::set_shared_data(key, Some(value), cas);
}

struct ProbeRoot {
    hash: Hash,
    then: Then,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match String::from_utf8_lossy(&raw).trim() {
            "body" => self.hash = Hash::None,
            "hash" => self.hash = Hash::Sha256,
            "hash_b3" => self.hash = Hash::Blake3,
            "answer" => self.then = Then::Answer,
            "answer_hash" => (self.hash, self.then) = (Hash::Sha256, Then::Answer),
            "gate" => {
                self.then = Then::Hold;
                GATE_IN_VM.with(|g| g.set(true));
            }
            "claim" => (self.hash, self.then) = (Hash::Sha256, Then::Claim),
            "lookup" => {
                (self.hash, self.then) = (Hash::Sha256, Then::Lookup);
                // a bucket of 8 ways and a record with a small answer, as idemgate's are
                let _ = hostcalls::set_shared_data(LOOKUP_BUCKET, Some(&[7u8; 320]), None);
                let _ = hostcalls::set_shared_data(LOOKUP_RECORD, Some(&[8u8; 96]), None);
            }
            other => {
                log::error!(
                    "probe: configuration must be one of body, hash, hash_b3, answer, answer_hash, gate, claim, lookup; got {other:?}"
                );
                return false;
            }
        }
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            id: context_id,
            hash: self.hash,
            then: self.then,
            bucket: 0,
            token: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    id: u32,
    hash: Hash,
    then: Then,
    /// The claim's bucket and the token of its gate (`claim`).
    bucket: u64,
    token: Option<u64>,
}

impl Context for Probe {}

impl Probe {
    /// The claim of a `claim` reader once the body is in: a bucket get + CAS set, then the
    /// gate released.
    fn claim(&mut self) {
        let key = format!("probe:b:{}", self.bucket);
        get_and_set(&key, &[7u8; 320]);
        if let Some(gate) = self
            .token
            .take()
            .and_then(|t| GATES.with(|g| g.borrow_mut().remove(&t)))
        {
            let _ = hostcalls::set_effective_context(gate);
            let _ = hostcalls::resume_http_request();
            let _ = hostcalls::set_effective_context(self.id);
        }
    }

    /// The completion: the bucket read again, a record and the bucket written.
    fn complete(&self, body: &[u8]) {
        let key = format!("probe:b:{}", self.bucket);
        let _ = hostcalls::get_shared_data(&key);
        let record = format!("probe:r:{}", self.bucket);
        let _ = hostcalls::set_shared_data(&record, Some(body), None);
        get_and_set(&key, &[8u8; 320]);
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Then::Hold = self.then {
            if let Some(t) = NEXT_GATE.with(Cell::take) {
                GATES.with(|g| g.borrow_mut().insert(t, self.id));
            }
            return Action::Pause;
        }
        // Single-filter mode: the reader holds its own headers until the body is in.
        let held = if GATE_IN_VM.with(Cell::get) {
            Action::Continue
        } else {
            Action::Pause
        };
        if let Then::Claim = self.then {
            // as idemgate's reader: every request header, then a token for the gate
            let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
            let key = headers
                .iter()
                .find(|(n, _)| n == "idempotency-key")
                .map(|(_, v)| v.as_slice())
                .unwrap_or_default();
            self.bucket = bucket_of(key);
            if held == Action::Continue {
                let token = TOKENS.with(|t| {
                    t.set(t.get() + 1);
                    t.get()
                });
                NEXT_GATE.with(|g| g.set(Some(token)));
                self.token = Some(token);
            }
            return held;
        }
        if let Then::Lookup = self.then {
            let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
            std::hint::black_box(&headers);
            return held;
        }
        let value = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "idempotency-key");
        std::hint::black_box(&value);
        match self.then {
            Then::Answer => held,
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        if let Ok(Some(body)) = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            match self.hash {
                Hash::Sha256 => {
                    std::hint::black_box(Sha256::digest(&body));
                }
                Hash::Blake3 => {
                    std::hint::black_box(blake3::hash(&body));
                }
                Hash::None => {
                    std::hint::black_box(&body);
                }
            }
        }
        if let Then::Claim = self.then {
            self.claim();
            return Action::Continue;
        }
        if let Then::Lookup = self.then {
            std::hint::black_box(hostcalls::get_current_time().ok());
            std::hint::black_box(hostcalls::get_shared_data(LOOKUP_BUCKET).ok());
            std::hint::black_box(hostcalls::get_shared_data(LOOKUP_RECORD).ok());
        }
        if let Then::Answer | Then::Lookup = self.then {
            let headers = vec![
                ("content-type", "application/json"),
                ("idempotent-replayed", "true"),
            ];
            let _ = hostcalls::send_http_response(200, headers, Some(b"{\"ok\":true}"));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Then::Claim = self.then {
            let headers =
                hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default();
            std::hint::black_box(&headers);
            let details = hostcalls::get_property(vec!["response", "code_details"]);
            std::hint::black_box(&details);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, eos: bool) -> Action {
        if let (Then::Claim, true) = (self.then, eos) {
            let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            self.complete(&body);
        }
        Action::Continue
    }
}
