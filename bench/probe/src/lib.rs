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
//!
//! - `answer` / `answer_hash`: `body` (`answer_hash`: and SHA-256 of it), then answers the
//!   request itself with `send_http_response` (200, two headers, `{"ok":true}`), as idemgate
//!   answers a replay; loaded with a `gate` in the same VM, as idemgate is.
//! - `gate`: holds every request's headers (`Pause`) and never releases them: idemgate's
//!   gate in front of a request answered locally.
//!
//! The `answer` rows are the floor of any replay with idemgate's design: what a replay costs
//! before looking anything up. `make bench` runs `body` and `hash` at 64 KiB; the difference in Envoy CPU per request between the
//! two is the hash alone, inside Envoy's V8, so 64 KiB / that difference is the in-Envoy
//! hash throughput.
#![forbid(unsafe_code)]

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
    /// Hold its headers (a gate).
    Hold,
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
            "gate" => self.then = Then::Hold,
            other => {
                log::error!(
                    "probe: configuration must be one of body, hash, hash_b3, answer, answer_hash, gate; got {other:?}"
                );
                return false;
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            hash: self.hash,
            then: self.then,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    hash: Hash,
    then: Then,
}

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if let Then::Hold = self.then {
            return Action::Pause;
        }
        let value = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "idempotency-key");
        std::hint::black_box(&value);
        Action::Continue
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
        if let Then::Answer = self.then {
            let headers = vec![
                ("content-type", "application/json"),
                ("idempotent-replayed", "true"),
            ];
            let _ = hostcalls::send_http_response(200, headers, Some(b"{\"ok\":true}"));
            return Action::Pause;
        }
        Action::Continue
    }
}
