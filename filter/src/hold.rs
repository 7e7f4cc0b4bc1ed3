//! Holding a covered request until idemgate has decided, then letting it go on.
//!
//! A request whose body idemgate must read (to fingerprint it or to find its key) is held:
//! neither its headers nor any byte of its body reach the origin before the decision. One
//! interface, [`Hold`], two ways to hold, used alike by local mode, the wait policy and
//! fleet mode:
//!
//! - **Single-filter mode** ([`Hold::Own`]; Envoy ≥ 1.35 with
//!   `allow_on_headers_stop_iteration: true` in the filter's Wasm `PluginConfig`): the reader
//!   pauses its own request headers; Envoy still hands it every body callback (one DATA
//!   frame or many, HTTP/1.1 or HTTP/2); it decides on the last one and continues itself.
//!   Requests without a body are held this way in both modes.
//! - **Two-filter mode** ([`Hold::Gate`]; hosts that cannot set that flag, such as Istio's
//!   `WasmPlugin`): a second instance of the filter in the same VM, the gate (`root_id:
//!   idemgate_gate`), placed after the reader, holds the headers; the reader lets them pass,
//!   holds the body, decides and releases the gate. Reader and gate meet through the
//!   stream's own filter state (property `idemgate_hold`), which no other stream can read
//!   or overwrite, whatever filters sit (and pause) between them.
//!
//! The mode follows the configuration: two-filter when a gate is configured in this VM.
//!
//! Single-filter without the flag cannot work: Envoy turns the pause into "stop all
//! iteration" and never delivers the body. The request stays held (nothing reaches the
//! origin) and, once Envoy has received body bytes for it, is answered 500 `misconfigured`
//! with a log line naming `allow_on_headers_stop_iteration` ([`on_tick`]); later requests of
//! that plugin are answered so at once. `make check-config` finds it before any traffic.
//!
//! ```text
//! at request headers:    let (hold, action) = Hold::begin(&shared, reader, ..);
//! on the decision:       action = hold.release(reader, From::Callback { buffered })?;
//! answered locally/gone: hold.abandon(reader);
//! ```
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use idemgate_core::problem::{self, AnswerContext};
use idemgate_core::Rejection;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Action;

use crate::{now_ms, send, Shared};
use std::collections::HashMap;

/// Filter-state property (per stream) through which a reader and its gate meet: the reader
/// writes `<vm nonce>:<reader context id>`, or [`GO`] once it has decided to forward.
const HOLD_PROPERTY: &str = "idemgate_hold";

/// The marker of a request the reader released before its gate saw the headers (a filter
/// between them held them): the gate lets it pass.
const GO: &[u8] = b"go";

/// The setting a single-filter configuration needs, as users write it.
pub(crate) const FLAG: &str = "allow_on_headers_stop_iteration";

/// After this long without a body callback, a request held at its headers logs a hint
/// (once per plugin) that the flag may be missing.
const HINT_AFTER_MS: u64 = 5_000;

thread_local! {
    /// Gate plugins configured in this VM (this worker's copy of it).
    static GATE_ROOTS: Cell<u32> = const { Cell::new(0) };
    /// Gates holding a request: reader context id → gate context id.
    static GATES: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
    /// Readers whose gate is released from the next tick (see [`Hold::release`]).
    static DEFERRED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Single-filter holds that have had no body callback yet; kept only until a body
    /// callback proves that the plugin has the flag.
    static AWAITING: RefCell<Vec<Awaiting>> = const { RefCell::new(Vec::new()) };
    /// This VM's mark in the hold marker: a gate in another VM cannot be released by this
    /// reader (contexts are per VM), and must say so.
    static VM_NONCE: u64 = crate::fresh_token();
}

/// What a plugin knows about `allow_on_headers_stop_iteration`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum StopIteration {
    /// No request paused at its headers has had a body callback yet.
    #[default]
    Unknown,
    /// A body callback came after a pause at request headers: the flag is set.
    Allowed,
    /// Envoy received a body that never reached the paused filter: the flag is missing.
    Missing,
}

/// How a request is held until the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// The reader holds it: its headers are paused (or it has no body).
    Own,
    /// The gate of this stream holds the headers (or will, when they reach it); the reader
    /// holds the body.
    Gate,
}

/// Where [`Hold::release`] is called from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum From {
    /// A request callback of the reader, which returns the action `release` gives.
    /// `buffered`: an earlier body callback of the reader returned `Pause`, so Envoy holds
    /// the body in its buffer.
    Callback { buffered: bool },
    /// Anywhere else (the root context's tick, an etcd answer): the stream is resumed.
    Elsewhere,
}

/// A single-filter hold that has had no body callback yet.
struct Awaiting {
    reader: u32,
    shared: Rc<Shared>,
    rule: usize,
    ctx: AnswerContext,
    /// Bytes of the request headers when the reader paused (Envoy's `request.total_size`
    /// counts them plus the body bytes it received).
    header_bytes: u64,
    since: u64,
}

impl Hold {
    /// Holds a covered request whose body is still to come, from its request-headers
    /// callback; returns the hold and the action to return. `Err` with the rejection when
    /// the plugin is known to lack the flag (the request must be refused, nothing was held).
    pub(crate) fn begin(
        shared: &Rc<Shared>,
        reader: u32,
        rule: usize,
        ctx: &AnswerContext,
        headers: &[(String, Vec<u8>)],
    ) -> Result<(Hold, Action), Rejection> {
        if GATE_ROOTS.with(Cell::get) > 0 {
            let marker = format!("{:x}:{reader}", VM_NONCE.with(|n| *n));
            if let Err(e) = hostcalls::set_property(vec![HOLD_PROPERTY], Some(marker.as_bytes())) {
                return Err(Rejection::Misconfigured {
                    detail: format!(
                        "the filter state of this request could not be written ({e:?})"
                    ),
                });
            }
            return Ok((Hold::Gate, Action::Continue));
        }
        match shared.stop_iteration.get() {
            StopIteration::Allowed => {}
            StopIteration::Missing => return Err(missing_flag()),
            StopIteration::Unknown => {
                let header_bytes = headers
                    .iter()
                    .map(|(n, v)| (n.len() + v.len()) as u64)
                    .sum();
                AWAITING.with(|a| {
                    a.borrow_mut().push(Awaiting {
                        reader,
                        shared: shared.clone(),
                        rule,
                        ctx: ctx.clone(),
                        header_bytes,
                        since: now_ms(),
                    })
                });
            }
        }
        Ok((Hold::Own, Action::Pause))
    }

    /// A body callback reached the reader of this hold.
    pub(crate) fn body_arrived(self, shared: &Shared, reader: u32) {
        if self == Hold::Own && shared.stop_iteration.get() != StopIteration::Allowed {
            shared.stop_iteration.set(StopIteration::Allowed);
            AWAITING.with(|a| a.borrow_mut().retain(|w| w.reader != reader));
        }
    }

    /// Lets the held request go on towards the origin; returns the action for the calling
    /// callback (with [`From::Elsewhere`], the stream was resumed and the action is moot).
    ///
    /// Two-filter mode, decided in the body callback that brought the whole body in one
    /// piece (HTTP/2: one DATA frame with END_STREAM): Envoy has not buffered that body yet,
    /// and a gate resumed now would send the headers on as a complete request without it.
    /// The reader then returns `Pause` (Envoy buffers the body) and a root context releases
    /// the reader and the gate right after this callback ([`crate::wake_soon`]).
    pub(crate) fn release(self, reader: u32, from: From) -> Result<Action, String> {
        match (self, from) {
            (Hold::Own, From::Callback { .. }) => Ok(Action::Continue),
            (Hold::Own, From::Elsewhere) => resume(reader).map(|()| Action::Continue),
            (Hold::Gate, From::Callback { buffered: true }) => {
                release_gate(reader).map(|()| Action::Continue)
            }
            (Hold::Gate, From::Callback { buffered: false }) => {
                DEFERRED.with(|d| d.borrow_mut().push(reader));
                crate::wake_soon();
                Ok(Action::Pause)
            }
            (Hold::Gate, From::Elsewhere) => {
                // The reader first: its body reaches the gate, still holding, which then
                // sends headers and body on together.
                resume(reader)?;
                release_gate(reader).map(|()| Action::Continue)
            }
        }
    }

    /// The request is answered locally, or its stream is gone: nothing is to be released.
    pub(crate) fn abandon(self, reader: u32) {
        if self == Hold::Gate {
            GATES.with(|g| g.borrow_mut().remove(&reader));
            DEFERRED.with(|d| d.borrow_mut().retain(|r| *r != reader));
        }
        AWAITING.with(|a| a.borrow_mut().retain(|w| w.reader != reader));
    }
}

/// The reader's stream is done: drops whatever this module still keeps for it.
pub(crate) fn forget(reader: u32) {
    Hold::Gate.abandon(reader);
}

/// Resumes the reader's own stream (from outside its callbacks).
fn resume(reader: u32) -> Result<(), String> {
    hostcalls::set_effective_context(reader)
        .and_then(|()| hostcalls::resume_http_request())
        .map_err(|e| format!("could not resume the request: {e:?}"))
}

/// Releases the gate holding `reader`'s request, or tells it to let the request pass when
/// the headers have not reached it yet; the reader is the effective context afterwards.
fn release_gate(reader: u32) -> Result<(), String> {
    match GATES.with(|g| g.borrow_mut().remove(&reader)) {
        Some(gate) => {
            hostcalls::set_effective_context(gate)
                .map_err(|e| format!("gate context {gate} is gone: {e:?}"))?;
            let resumed = hostcalls::resume_http_request();
            let _ = hostcalls::set_effective_context(reader);
            resumed.map_err(|e| format!("could not release the gate: {e:?}"))
        }
        // A filter between reader and gate still holds the headers: the gate lets them
        // pass when they arrive.
        None => hostcalls::set_effective_context(reader)
            .and_then(|()| hostcalls::set_property(vec![HOLD_PROPERTY], Some(GO)))
            .map_err(|e| format!("could not mark the request for its gate: {e:?}")),
    }
}

/// The refusal of a request held by a plugin that lacks the flag.
pub(crate) fn missing_flag() -> Rejection {
    Rejection::Misconfigured {
        detail: format!("the idemgate filter needs `{FLAG}: true` in its Envoy Wasm config (Envoy 1.35 or later), or the idemgate_gate filter right after it"),
    }
}

/// From a root context: releases the gates [`Hold::release`] deferred.
pub(crate) fn release_deferred() {
    let deferred = DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()));
    for reader in deferred {
        if let Err(e) = Hold::Gate.release(reader, From::Elsewhere) {
            log::debug!("idemgate: deferred release: {e}");
            GATES.with(|g| g.borrow_mut().remove(&reader));
        }
    }
}

/// From the root context's tick: finds requests held at their headers whose body Envoy
/// received but never delivered (the flag is missing).
pub(crate) fn on_tick() {
    if AWAITING.with(|a| a.borrow().is_empty()) {
        return;
    }
    let now = now_ms();
    let awaiting = AWAITING.with(|a| std::mem::take(&mut *a.borrow_mut()));
    let mut still = Vec::new();
    for w in awaiting {
        if w.shared.stop_iteration.get() == StopIteration::Allowed
            || hostcalls::set_effective_context(w.reader).is_err()
        {
            continue; // proven fine meanwhile, or the stream is gone
        }
        let received = hostcalls::get_property(vec!["request", "total_size"])
            .ok()
            .flatten()
            .and_then(|b| b.get(..8).and_then(|b| b.try_into().ok()))
            .map_or(0, i64::from_le_bytes);
        if u64::try_from(received).unwrap_or(0) > w.header_bytes {
            if w.shared.stop_iteration.replace(StopIteration::Missing) != StopIteration::Missing {
                log::error!("idemgate: a request body was received by Envoy but never delivered to the idemgate filter, which holds the request headers: set `{FLAG}: true` in the filter's Wasm config (Envoy 1.35 or later), or configure the idemgate_gate filter right after it; answering 500 misconfigured, nothing is forwarded");
            }
            let r = missing_flag();
            w.shared.metrics.rejection(&r);
            send(problem::render(w.shared.config.rule_at(w.rule), &r, &w.ctx));
            continue;
        }
        if now.saturating_sub(w.since) >= HINT_AFTER_MS && !w.shared.hinted.replace(true) {
            log::warn!("idemgate: a request has been held at its headers for {} s without a body callback: if its body was sent, set `{FLAG}: true` in the idemgate filter's Wasm config (Envoy 1.35 or later)", HINT_AFTER_MS / 1000);
        }
        still.push(w);
    }
    AWAITING.with(|a| a.borrow_mut().extend(still));
}

/// A gate plugin was configured in this VM (`up`) or removed.
pub(crate) fn gate_root(up: bool) {
    GATE_ROOTS.with(|g| {
        g.set(if up {
            g.get() + 1
        } else {
            g.get().saturating_sub(1)
        })
    });
}

/// The gate: holds a request's headers (and so everything after them) until its reader
/// releases it. Requests its reader did not mark pass untouched.
pub(crate) struct Gate {
    pub(crate) id: u32,
    /// The reader whose request this gate holds.
    pub(crate) reader: Option<u32>,
}

impl proxy_wasm::traits::Context for Gate {
    fn on_done(&mut self) -> bool {
        if let Some(r) = self.reader.take() {
            GATES.with(|g| {
                let mut g = g.borrow_mut();
                if g.get(&r) == Some(&self.id) {
                    g.remove(&r);
                }
            });
        }
        true
    }
}

impl proxy_wasm::traits::HttpContext for Gate {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let marker = match hostcalls::get_property(vec![HOLD_PROPERTY]) {
            Ok(Some(m)) => m,
            _ => return Action::Continue,
        };
        if marker == GO {
            return Action::Continue;
        }
        let text = String::from_utf8_lossy(&marker);
        let Some((nonce, reader)) = text.split_once(':') else {
            return Action::Continue;
        };
        let ours = format!("{:x}", VM_NONCE.with(|n| *n));
        match reader.parse::<u32>() {
            Ok(reader) if nonce == ours => {
                GATES.with(|g| g.borrow_mut().insert(reader, self.id));
                self.reader = Some(reader);
                Action::Pause
            }
            _ => {
                let detail = "the idemgate_gate filter runs in another Wasm VM than the idemgate filter before it: give both the same vm_config".to_string();
                log::error!("idemgate: {detail}; answering 500 misconfigured");
                let config = idemgate_core::Config::default();
                send(problem::render(
                    config.rule_at(0),
                    &Rejection::Misconfigured { detail },
                    &AnswerContext::default(),
                ));
                Action::Pause
            }
        }
    }
}
