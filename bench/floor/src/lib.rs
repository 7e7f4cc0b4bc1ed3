//! The benchmark *floor*: the least any proxy-wasm HTTP filter costs in Envoy.
//!
//! It reads one request header (`idempotency-key`) and continues; every other callback
//! is the SDK's default (`Continue`). `make bench` loads it as one Wasm HTTP filter and
//! compares idemgate against it. It does nothing useful on purpose: what it costs is the
//! price of a Wasm VM in the request path (context creation, one call per callback, one
//! header hostcall, context teardown).
#![forbid(unsafe_code)]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot) });
}}

/// Header read per request (the one idemgate reads first).
const HEADER: &str = "idempotency-key";

struct FloorRoot;

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Floor;

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        // One hostcall; the value is deliberately unused (black-boxed so it is not elided).
        let value = proxy_wasm::hostcalls::get_map_value_bytes(
            proxy_wasm::types::MapType::HttpRequestHeaders,
            HEADER,
        );
        std::hint::black_box(&value);
        Action::Continue
    }
}
