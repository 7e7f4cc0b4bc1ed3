//! # idemgate-edge
//!
//! The edge-worker adapter: `idemgate-core` exposed to JavaScript with wasm-bindgen, for the
//! ES-module worker and its Durable Object in `edge/worker/`. Like `filter/`, it makes no
//! decision of its own; it marshals requests, records and answers between JavaScript and
//! the core.
//!
//! One request in the worker:
//!
//! 1. [`Engine::exchange`] (headers time): correlation id, rule, [`admit`]. The exchange is
//!    then in one [`Step`]: pass untouched, answer at once, or read the body.
//! 2. [`Exchange::body`] (body time): [`resolve`]. Ready: the worker knows the scoped key id
//!    (the Durable Object's name) and the fingerprint.
//! 3. [`Exchange::consider`] answers from a completed record the worker holds in its
//!    isolate-local cache, or from what the Durable Object returned; the object itself calls
//!    [`Engine::decide`] on the record it stores and writes the claim.
//! 4. [`Exchange::capture`] captures the origin's response; [`Capture::finish`] turns the
//!    claim into the completed record the object stores ([`completes`]), or the worker gives
//!    the claim back ([`releases`]).
//!
//! Records cross the JavaScript boundary only in the core's binary codec
//! ([`Record::encode`]); times are milliseconds since the Unix epoch as JavaScript numbers.
#![forbid(unsafe_code)]

use std::rc::Rc;

use idemgate_core::decision::{self, decide_waiting, Decision, Request};
use idemgate_core::problem::{self, AnswerContext, LocalAnswer};
use idemgate_core::ratelimit::{self, LimitKey, Outcome, RateHeaders, Settlement, Tat};
use idemgate_core::{
    admit, resolve, Admission, Config, Fingerprint, Pending, Record, Rejection, Resolution,
    Resolved, ResponseCapture,
};
use wasm_bindgen::prelude::*;

/// Milliseconds as a JavaScript number (exact below 2^53).
fn ms_from_js(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v as u64
    } else {
        0
    }
}

/// A byte count from a JavaScript number (non-finite or negative: 0).
fn len_from_js(v: f64) -> u64 {
    ms_from_js(v)
}

fn ms_to_js(v: u64) -> f64 {
    v as f64
}

/// Header pairs from their lines `name\nvalue\nname\nvalue\n…` (one string crosses into
/// the wasm, not one per name and value; Fetch header names and values never contain a line
/// feed). Fetch header values are byte strings (every character ≤ U+00FF), so each character
/// is one byte, as on the wire.
fn header_pairs(lines: &str) -> Vec<(String, Vec<u8>)> {
    let mut parts = lines.split_terminator('\n');
    let mut out = Vec::new();
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        out.push((name.to_ascii_lowercase(), byte_string(value)));
    }
    out
}

fn byte_string(s: &str) -> Vec<u8> {
    if s.chars().all(|c| u32::from(c) <= 0xff) {
        s.chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect()
    } else {
        s.as_bytes().to_vec()
    }
}

fn fingerprint_from(bytes: &[u8]) -> Option<Fingerprint> {
    <[u8; 32]>::try_from(bytes).ok().map(Fingerprint)
}

/// A local answer: status, headers and body.
#[wasm_bindgen]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    inner: LocalAnswer,
}

#[wasm_bindgen]
impl Answer {
    /// Status code.
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> u16 {
        self.inner.status
    }

    /// Headers as a flat list `[name, value, …]`.
    #[wasm_bindgen(getter)]
    pub fn headers(&self) -> Vec<String> {
        self.inner
            .headers
            .iter()
            .flat_map(|(n, v)| [n.clone(), v.clone()])
            .collect()
    }

    /// Body bytes.
    #[wasm_bindgen(getter)]
    pub fn body(&self) -> Vec<u8> {
        self.inner.body.clone()
    }
}

/// The 500 `misconfigured` problem for a worker that cannot serve at all (its configuration
/// was refused): rendered with the default rule, `detail` names the field.
#[wasm_bindgen]
pub fn misconfigured(detail: &str) -> Answer {
    let config = Config::default();
    Answer {
        inner: problem::render(
            &config.default_rule,
            &Rejection::Misconfigured {
                detail: detail.to_string(),
            },
            &AnswerContext::default(),
        ),
    }
}

/// A validated configuration, parsed once per isolate.
#[wasm_bindgen]
pub struct Engine {
    config: Rc<Config>,
}

impl Engine {
    /// Parses and validates the configuration (the same JSON as the Envoy filter's).
    pub fn parse(json: &str) -> Result<Engine, String> {
        Config::from_json(json)
            .map(|config| Engine {
                config: Rc::new(config),
            })
            .map_err(|e| e.to_string())
    }
}

#[wasm_bindgen]
impl Engine {
    /// Parses and validates `json`; throws an `Error` whose message names the field and the
    /// value (`key.maxLength: must be 1..=1024, got 0`).
    #[wasm_bindgen(constructor)]
    pub fn new(json: &str) -> Result<Engine, JsError> {
        Engine::parse(json).map_err(|e| JsError::new(&e))
    }

    /// The store namespace (`store.namespace`): stores that share a database keep each
    /// namespace's keys apart.
    #[wasm_bindgen(getter)]
    pub fn namespace(&self) -> String {
        self.config.store_namespace.clone()
    }

    /// One line for the log when the worker starts.
    #[wasm_bindgen(getter)]
    pub fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "{} route rule(s), namespace {}{}",
            c.routes.len(),
            c.store_namespace,
            c.description
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        )
    }

    /// Starts a request at headers time. `headers` are lines `name\nvalue\n…`,
    /// `random` supplies 16 random bytes for a generated correlation id.
    pub fn exchange(
        &self,
        method: &str,
        path_with_query: &str,
        headers: &str,
        random: &[u8],
    ) -> Exchange {
        let mut headers = header_pairs(headers);
        let mut ctx = AnswerContext::default();
        let mut generated = false;
        if let Some(c) = &self.config.correlation {
            ctx.correlation_header = Some(c.header.clone());
            let sent = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(&c.header))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .map(str::to_string);
            match sent {
                Some(id) => ctx.request_id = Some(id),
                None if c.generate => {
                    let mut bytes = [0u8; 16];
                    for (d, s) in bytes.iter_mut().zip(random) {
                        *d = *s;
                    }
                    let id = idemgate_core::ids::correlation_id(bytes);
                    headers.push((c.header.clone(), id.clone().into_bytes()));
                    ctx.request_id = Some(id);
                    generated = true;
                }
                None => {}
            }
        }
        // The caller's rate limit (as the filter: the first route whose path matches).
        let limit_rule = self.config.limit_rule_for(path_with_query);
        let limit = limit_rule.rate_limit.as_ref().map(|_| Limit {
            rule: self.config.rule_index(limit_rule),
            key: LimitKey::for_request(limit_rule, &headers),
            deferred: false,
        });
        let mut ex = Exchange {
            config: self.config.clone(),
            rule: 0,
            ctx,
            generated,
            step: Step::Pass,
            pending: None,
            resolved: None,
            answer: None,
            limit,
            rate: None,
            replayed: false,
            covered: false,
            outcome: None,
        };
        let Some(rule) = self.config.rule_for(method, path_with_query) else {
            return ex;
        };
        ex.covered = true;
        ex.rule = self.config.rule_index(rule);
        match admit(&self.config, method, path_with_query, &headers) {
            Admission::Pass => {}
            Admission::Reject(r) => ex.reject(r),
            Admission::Inspect(pending) => {
                if let Some(k) = pending.header_key() {
                    ex.ctx.idempotency_key = Some(k.to_string());
                }
                ex.rule = pending.rule;
                ex.pending = Some(pending);
                ex.step = Step::Body;
                // Charged once the decision is known (replays may not spend quota).
                if let Some(l) = &mut ex.limit {
                    l.deferred = true;
                }
            }
        }
        ex
    }

    /// The rate-limit bucket's new state after a request of `cost` under rule `rule`'s
    /// limit, given its state `tat` at `now`: store it; nothing when the request is
    /// refused (or spends nothing). The Durable Object named by [`Exchange::limit_key`]
    /// keeps the state and returns the state it had to the worker
    /// ([`Exchange::charged`]), which derives the answer from it alike.
    #[wasm_bindgen(js_name = rateCheck)]
    pub fn rate_check(&self, rule: usize, tat: Option<u64>, now: f64, cost: u32) -> Option<u64> {
        let spec = self.config.rule_at(rule).rate_limit.as_ref()?;
        match ratelimit::check(&spec.quota, tat.map(Tat), ms_from_js(now), cost) {
            Outcome::Allowed { new_tat, .. } if cost > 0 => Some(new_tat.0),
            _ => None,
        }
    }

    /// The Durable Object's decision for the record it holds (`record`, absent when none)
    /// and a request of rule `rule` with `fingerprint`, claim token `owner` and per-request
    /// expiry; `wait_deadline` is set while a request waits (the `wait` policy).
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        rule: usize,
        fingerprint: &[u8],
        owner: u64,
        expires_in_ms: Option<f64>,
        record: Option<Vec<u8>>,
        now: f64,
        wait_deadline: Option<f64>,
    ) -> Verdict {
        let now = ms_from_js(now);
        let Some(fingerprint) = fingerprint_from(fingerprint) else {
            return Verdict::settled();
        };
        let request = Request {
            fingerprint,
            owner,
            expires_in_ms: expires_in_ms.map(ms_from_js),
        };
        // An undecodable record is treated as absent, as the slot table treats a corrupt
        // entry as a free slot.
        let existing = record.and_then(|b| Record::decode(&b).ok());
        let rule = self.config.rule_at(rule);
        match decide_waiting(
            rule,
            &request,
            existing.as_ref(),
            now,
            wait_deadline.map(ms_from_js),
        ) {
            Decision::Forward {
                claim,
                lease_expired,
            } => Verdict {
                kind: VerdictKind::Claimed,
                record: Some(claim.record().encode()),
                expires_at: ms_to_js(claim.expires_at),
                deadline: 0.0,
                wake_at: 0.0,
                lease_expired,
            },
            Decision::Wait { deadline } => {
                let lease_end = match &existing {
                    Some(Record::InFlight {
                        lease_until,
                        expires_at,
                        ..
                    }) => (*lease_until).min(*expires_at),
                    _ => deadline,
                };
                Verdict {
                    kind: VerdictKind::Wait,
                    record: None,
                    expires_at: 0.0,
                    deadline: ms_to_js(deadline),
                    wake_at: ms_to_js(deadline.min(lease_end)),
                    lease_expired: false,
                }
            }
            Decision::Replay(_) | Decision::Reject(_) => Verdict::settled(),
        }
    }
}

/// What the Durable Object does for a request.
#[wasm_bindgen]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictKind {
    /// The request claims the key: store [`Verdict::record`] and forward.
    Claimed = 0,
    /// The stored record answers the request (replay or error): hand it to the worker,
    /// which renders the answer with [`Exchange::consider`].
    Settled = 1,
    /// The key is in flight and the rule says wait: decide again when the record changes
    /// or at [`Verdict::wake_at`], passing [`Verdict::deadline`].
    Wait = 2,
}

/// The Durable Object's decision (see [`Engine::decide`]).
#[wasm_bindgen]
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    kind: VerdictKind,
    record: Option<Vec<u8>>,
    expires_at: f64,
    deadline: f64,
    wake_at: f64,
    lease_expired: bool,
}

impl Verdict {
    fn settled() -> Self {
        Verdict {
            kind: VerdictKind::Settled,
            record: None,
            expires_at: 0.0,
            deadline: 0.0,
            wake_at: 0.0,
            lease_expired: false,
        }
    }
}

#[wasm_bindgen]
impl Verdict {
    /// What to do.
    #[wasm_bindgen(getter)]
    pub fn kind(&self) -> VerdictKind {
        self.kind
    }

    /// The claim to store (an in-flight record), when claimed.
    #[wasm_bindgen(getter)]
    pub fn record(&self) -> Option<Vec<u8>> {
        self.record.clone()
    }

    /// When the claimed key expires (the storage alarm).
    #[wasm_bindgen(getter, js_name = expiresAt)]
    pub fn expires_at(&self) -> f64 {
        self.expires_at
    }

    /// When a waiting request gives up (pass it back to [`Engine::decide`]).
    #[wasm_bindgen(getter)]
    pub fn deadline(&self) -> f64 {
        self.deadline
    }

    /// When to decide again at the latest, if the record does not change before: the
    /// deadline or the end of the in-flight lease, whichever is first.
    #[wasm_bindgen(getter, js_name = wakeAt)]
    pub fn wake_at(&self) -> f64 {
        self.wake_at
    }

    /// The claim takes over one whose lease lapsed.
    #[wasm_bindgen(getter, js_name = leaseExpired)]
    pub fn lease_expired(&self) -> bool {
        self.lease_expired
    }
}

/// Where an [`Exchange`] stands.
#[wasm_bindgen]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not covered: forward untouched.
    Pass = 0,
    /// Answer locally with [`Exchange::answer`].
    Answer = 1,
    /// Read the body (at most [`Exchange::max_body_bytes`]), then [`Exchange::body`].
    Body = 2,
    /// Key and fingerprint known: look the key up.
    Ready = 3,
}

/// A rate-limit charge still to make.
struct Limit {
    /// Index of the rule whose limit applies.
    rule: usize,
    /// The caller's bucket.
    key: LimitKey,
    /// Charged once the store decided (covered requests), not at headers time.
    deferred: bool,
}

/// One request, from its headers to its answer.
#[wasm_bindgen]
pub struct Exchange {
    config: Rc<Config>,
    rule: usize,
    ctx: AnswerContext,
    generated: bool,
    step: Step,
    pending: Option<Pending>,
    resolved: Option<Resolved>,
    answer: Option<LocalAnswer>,
    limit: Option<Limit>,
    rate: Option<RateHeaders>,
    replayed: bool,
    /// A rule covers the request (Envoy's `requests` counter).
    covered: bool,
    /// The counter the local answer increments (see [`Exchange::outcome`]).
    outcome: Option<&'static str>,
}

impl Exchange {
    fn reject(&mut self, rejection: Rejection) {
        let rule = self.config.rule_at(self.rule);
        self.answer = Some(problem::render(rule, &rejection, &self.ctx));
        self.outcome = Some(rejection.counter());
        self.step = Step::Answer;
    }

    /// Applies a rate-limit outcome for the pending charge: headers, and the 429.
    fn rate_outcome(&mut self, outcome: Outcome, now: u64) -> bool {
        let Some(limit) = self.limit.take() else {
            return false;
        };
        let rule = self.config.rule_at(limit.rule);
        let Some(spec) = &rule.rate_limit else {
            return false;
        };
        let outcome = spec.on_contention.resolve(outcome);
        self.rate = Some(outcome.headers(&spec.quota, now, spec.reset_format));
        match outcome.retry_after_seconds() {
            Some(retry_after_s) => {
                let rejection = Rejection::RateLimited { retry_after_s };
                self.answer = Some(problem::render(rule, &rejection, &self.ctx));
                self.outcome = Some(rejection.counter());
                self.step = Step::Answer;
                true
            }
            None => false,
        }
    }
}

#[wasm_bindgen]
impl Exchange {
    /// Where the exchange stands.
    #[wasm_bindgen(getter)]
    pub fn step(&self) -> Step {
        self.step
    }

    /// Index of the request's rule.
    #[wasm_bindgen(getter)]
    pub fn rule(&self) -> usize {
        self.rule
    }

    /// Name of the request's rule (for logs).
    #[wasm_bindgen(getter, js_name = ruleName)]
    pub fn rule_name(&self) -> String {
        self.config.rule_at(self.rule).name.clone()
    }

    /// The correlation header, when correlation ids are on.
    #[wasm_bindgen(getter, js_name = correlationHeader)]
    pub fn correlation_header(&self) -> Option<String> {
        self.ctx.correlation_header.clone()
    }

    /// The request's correlation id (sent by the client or generated).
    #[wasm_bindgen(getter, js_name = requestId)]
    pub fn request_id(&self) -> Option<String> {
        self.ctx.request_id.clone()
    }

    /// The correlation id was generated here: add it to the request sent to the origin.
    #[wasm_bindgen(getter)]
    pub fn generated(&self) -> bool {
        self.generated
    }

    /// Largest body accepted, in bytes.
    #[wasm_bindgen(getter, js_name = maxBodyBytes)]
    pub fn max_body_bytes(&self) -> f64 {
        ms_to_js(self.config.rule_at(self.rule).max_body_bytes)
    }

    /// The body grew past [`Exchange::max_body_bytes`] while it was read: answer 413.
    #[wasm_bindgen(js_name = bodyTooLarge)]
    pub fn body_too_large(&mut self) {
        let limit = self.config.rule_at(self.rule).max_body_bytes;
        self.pending = None;
        self.reject(Rejection::BodyTooLarge { limit });
    }

    /// The whole body is in: find the key and fingerprint the request.
    pub fn body(&mut self, body: &[u8]) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let resolution = resolve(&self.config, &pending, body);
        self.resolved_as(resolution);
    }

    /// When the request's fingerprint is `SHA-256(head ‖ body)` and nothing else of the
    /// body is needed (the key is in the headers; raw body; see
    /// `idemgate_core::decision::body_hash_head`): `head`, for a body of `len` bytes. The
    /// worker then hashes with WebCrypto (native code: ~10× the wasm's speed on 64 KiB) and
    /// calls [`Exchange::body_hashed`] instead of [`Exchange::body`]. `undefined`: call `body`.
    #[wasm_bindgen(js_name = bodyHashHead)]
    pub fn body_hash_head(&self, len: f64) -> Option<Vec<u8>> {
        let pending = self.pending.as_ref()?;
        decision::body_hash_head(&self.config, pending, len_from_js(len))
    }

    /// [`Exchange::body`] for a body of `len` bytes that the worker hashed itself:
    /// `digest` = SHA-256(`head` ‖ body), `head` from [`Exchange::body_hash_head`].
    /// `false` (nothing changed) when the body itself is needed or `digest` is not 32
    /// bytes: call `body`.
    #[wasm_bindgen(js_name = bodyHashed)]
    pub fn body_hashed(&mut self, len: f64, digest: &[u8]) -> bool {
        let (Some(pending), Ok(digest)) = (&self.pending, <[u8; 32]>::try_from(digest)) else {
            return false;
        };
        let Some(resolution) =
            decision::resolve_hashed(&self.config, pending, len_from_js(len), digest)
        else {
            return false;
        };
        self.pending = None;
        self.resolved_as(resolution);
        true
    }

    fn resolved_as(&mut self, resolution: Resolution) {
        match resolution {
            Resolution::Pass => self.step = Step::Pass,
            Resolution::Reject(r) => self.reject(r),
            Resolution::Ready(resolved) => {
                self.ctx.idempotency_key = Some(resolved.key.clone());
                self.resolved = Some(resolved);
                self.step = Step::Ready;
            }
        }
    }

    /// Storage identity of the scoped key (lower-case hex): the Durable Object's name.
    /// Safe to log.
    #[wasm_bindgen(getter, js_name = keyId)]
    pub fn key_id(&self) -> Option<String> {
        self.resolved.as_ref().map(|r| r.key_id.to_hex())
    }

    /// The request's fingerprint (32 bytes).
    #[wasm_bindgen(getter)]
    pub fn fingerprint(&self) -> Option<Vec<u8>> {
        self.resolved.as_ref().map(|r| r.fingerprint.0.to_vec())
    }

    /// Per-request expiry from the expiry header, in milliseconds.
    #[wasm_bindgen(getter, js_name = expiresInMs)]
    pub fn expires_in_ms(&self) -> Option<f64> {
        self.resolved
            .as_ref()
            .and_then(|r| r.expires_in_ms)
            .map(ms_to_js)
    }

    /// Answers the request from a stored `record` at `now` (with `wait_deadline` when it
    /// waited), when the record settles it: a replay, or an error such as 409 in flight or
    /// 422 reused. Returns `false` (and changes nothing) when the request would claim the
    /// key or wait instead, or when `record` is not a record.
    pub fn consider(&mut self, record: &[u8], now: f64, wait_deadline: Option<f64>) -> bool {
        let (Some(resolved), Ok(existing)) = (&self.resolved, Record::decode(record)) else {
            return false;
        };
        let request = Request {
            fingerprint: resolved.fingerprint,
            owner: 0,
            expires_in_ms: resolved.expires_in_ms,
        };
        let rule = self.config.rule_at(self.rule);
        let answer = match decide_waiting(
            rule,
            &request,
            Some(&existing),
            ms_from_js(now),
            wait_deadline.map(ms_from_js),
        ) {
            Decision::Replay(stored) => {
                self.replayed = true;
                self.outcome = Some("replayed");
                problem::replay(rule, &stored, &self.ctx)
            }
            Decision::Reject(r) => {
                self.outcome = Some(r.counter());
                problem::render(rule, &r, &self.ctx)
            }
            Decision::Forward { .. } | Decision::Wait { .. } => return false,
        };
        self.answer = Some(answer);
        self.step = Step::Answer;
        true
    }

    /// Name of the rate-limit bucket to charge now (its Durable Object), when one is due:
    /// at headers time for a request that is not inspected, after the store's decision
    /// for one that is ([`Exchange::deferred_cost`]).
    #[wasm_bindgen(getter, js_name = limitKey)]
    pub fn limit_key(&self) -> Option<String> {
        self.limit
            .as_ref()
            .map(|l| format!("rate:{}:{}", self.config.store_namespace, l.key.to_hex()))
    }

    /// Index of the rule whose rate limit applies (for [`Engine::rate_check`]).
    #[wasm_bindgen(getter, js_name = limitRule)]
    pub fn limit_rule(&self) -> usize {
        self.limit.as_ref().map_or(0, |l| l.rule)
    }

    /// A charge of cost 1 is due before the request is answered or passed on.
    #[wasm_bindgen(getter, js_name = chargeDue)]
    pub fn charge_due(&self) -> bool {
        self.limit.as_ref().is_some_and(|l| !l.deferred)
    }

    /// Cost of the charge deferred until idemgate knew what it does with an inspected
    /// request, as the filter counts it ([`ratelimit::deferred_cost`]): a replay spends only
    /// with `chargeReplays`, anything else (forwarded, passed, refused at body time or by
    /// the store, after waiting or not) 1. Nothing when no charge is deferred.
    #[wasm_bindgen(js_name = deferredCost)]
    pub fn deferred_cost(&self) -> Option<u32> {
        let limit = self.limit.as_ref().filter(|l| l.deferred)?;
        let spec = self.config.rule_at(limit.rule).rate_limit.as_ref()?;
        let settled = if self.replayed {
            Settlement::Replayed
        } else {
            Settlement::Other
        };
        Some(ratelimit::deferred_cost(spec, settled))
    }

    /// The bucket answered: it was in state `tat` at `now` before this request of `cost`.
    /// Returns `true` when the caller is over its limit; the answer is then the 429.
    pub fn charged(&mut self, tat: Option<u64>, now: f64, cost: u32) -> bool {
        let Some(spec) = self
            .limit
            .as_ref()
            .and_then(|l| self.config.rule_at(l.rule).rate_limit.as_ref())
        else {
            return false;
        };
        let now = ms_from_js(now);
        let outcome = ratelimit::check(&spec.quota, tat.map(Tat), now, cost);
        self.rate_outcome(outcome, now)
    }

    /// The bucket could not be reached: the rule's `onContention` policy decides.
    #[wasm_bindgen(js_name = chargeFailed)]
    pub fn charge_failed(&mut self, now: f64) -> bool {
        let now = ms_from_js(now);
        self.rate_outcome(
            Outcome::Contended {
                new_tat: Tat::from_millis(now),
                remaining: 0,
                reset_after_ms: 0,
            },
            now,
        )
    }

    /// A rule covers the request (counted as Envoy's `requests`).
    #[wasm_bindgen(getter)]
    pub fn covered(&self) -> bool {
        self.covered
    }

    /// What became of the request so far, named as the Envoy counter it increments:
    /// `passed`, `forwarded` (key and fingerprint known and not answered locally: the
    /// worker forwards it with a claim), `replayed`, or a refusal's counter
    /// (`conflicts`, `mismatches`, `duplicates`, `bad_keys`, `rate_limited`, …, as
    /// [`Rejection::counter`]). Nothing for a request no rule covers that passes untouched,
    /// or one whose body is still awaited.
    #[wasm_bindgen(getter)]
    pub fn outcome(&self) -> Option<String> {
        let name = match self.step {
            Step::Answer => self.outcome,
            Step::Ready => Some("forwarded"),
            Step::Pass => self.covered.then_some("passed"),
            Step::Body => None,
        };
        name.map(str::to_string)
    }

    /// The store namespace (`store.namespace`), as Envoy tags its metrics.
    #[wasm_bindgen(getter)]
    pub fn namespace(&self) -> String {
        self.config.store_namespace.clone()
    }

    /// Headers to set on the origin's response when it lacks them, as lines
    /// `name\nvalue\n…`: the correlation id and the rate-limit headers, as the filter adds
    /// them. Empty when there are none.
    #[wasm_bindgen(getter, js_name = responseHeaders)]
    pub fn response_headers(&self) -> String {
        let mut out = String::new();
        if let (Some(name), Some(id)) = (&self.ctx.correlation_header, &self.ctx.request_id) {
            out.push_str(&format!("{name}\n{id}\n"));
        }
        for (name, value) in self.rate.iter().flat_map(RateHeaders::pairs) {
            out.push_str(&format!("{name}\n{value}\n"));
        }
        out
    }

    /// The store could not be reached: answer 503 with `Retry-After` (nothing was executed).
    #[wasm_bindgen(js_name = storeUnavailable)]
    pub fn store_unavailable(&mut self) {
        self.reject(Rejection::StoreUnavailable {
            retry_after_s: 1,
            reason: "store error",
        });
    }

    /// The worker is set up wrongly (for example no origin): answer 500 `misconfigured`.
    pub fn misconfigured(&mut self, detail: &str) {
        self.reject(Rejection::Misconfigured {
            detail: detail.to_string(),
        });
    }

    /// The local answer, once [`Exchange::step`] is [`Step::Answer`] (with the rate-limit
    /// headers, as the filter sends them).
    pub fn answer(&self) -> Option<Answer> {
        let mut inner = self.answer.clone()?;
        if let Some(rate) = &self.rate {
            for (name, value) in rate.pairs() {
                inner.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                inner.headers.push((name.to_string(), value));
            }
        }
        Some(Answer { inner })
    }

    /// Starts capturing the origin's response to a claimed request (`headers` as lines
    /// `name\nvalue\n…`).
    pub fn capture(&self, status: u16, headers: &str) -> Capture {
        let rule = self.config.rule_at(self.rule);
        let capture = ResponseCapture::new(rule, status, &header_pairs(headers));
        Capture {
            storable: capture.wants_body(),
            inner: Some(capture),
            reason: None,
        }
    }
}

/// The origin's response to a claimed request, captured while it streams to the client.
#[wasm_bindgen]
pub struct Capture {
    inner: Option<ResponseCapture>,
    storable: bool,
    reason: Option<&'static str>,
}

#[wasm_bindgen]
impl Capture {
    /// Whether the status is stored. When it is not, give the claim back at once.
    #[wasm_bindgen(getter)]
    pub fn storable(&self) -> bool {
        self.storable
    }

    /// Whether body chunks are still worth passing in.
    #[wasm_bindgen(getter, js_name = wantsBody)]
    pub fn wants_body(&self) -> bool {
        self.inner.as_ref().is_some_and(ResponseCapture::wants_body)
    }

    /// Adds a body chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        if let Some(c) = &mut self.inner {
            c.push(chunk);
        }
    }

    /// The whole body went through: the completed record for `claim` (the in-flight record
    /// the Durable Object stored), or nothing when the response is not stored
    /// ([`Capture::reason`] says why).
    pub fn finish(&mut self, claim: &[u8]) -> Option<Vec<u8>> {
        let capture = self.inner.take()?;
        let response = match capture.finish() {
            Ok(r) => r,
            Err(e) => {
                self.reason = Some(e.reason());
                return None;
            }
        };
        match Record::decode(claim) {
            Ok(Record::InFlight {
                owner,
                expires_at,
                fingerprint,
                ..
            }) => Some(
                Record::Completed {
                    owner,
                    expires_at,
                    fingerprint,
                    response,
                }
                .encode(),
            ),
            _ => {
                self.reason = Some("bad_claim");
                None
            }
        }
    }

    /// Why [`Capture::finish`] returned nothing: `status`, `too_large` or `bad_claim`.
    #[wasm_bindgen(getter)]
    pub fn reason(&self) -> Option<String> {
        self.reason.map(str::to_string)
    }
}

/// Whether the store keeps `completed` over `current`: only the claim's own completion,
/// while that claim is still the stored record (the slot table's rule). Returns when the
/// completed record expires (its storage expiry) if so, nothing otherwise.
#[wasm_bindgen]
pub fn completes(current: Option<Vec<u8>>, completed: &[u8]) -> Option<f64> {
    match (
        current.and_then(|b| Record::decode(&b).ok()),
        Record::decode(completed),
    ) {
        (
            Some(Record::InFlight { owner: held, .. }),
            Ok(Record::Completed {
                owner, expires_at, ..
            }),
        ) if held == owner => Some(ms_to_js(expires_at)),
        _ => None,
    }
}

/// Whether the claim `owner` is still the stored record `current`, so the Durable Object
/// may free the key (the origin answered with a status that is not stored).
#[wasm_bindgen]
pub fn releases(current: Option<Vec<u8>>, owner: u64) -> bool {
    matches!(
        current.and_then(|b| Record::decode(&b).ok()),
        Some(Record::InFlight { owner: held, .. }) if held == owner
    )
}

/// When `record` expires (the storage alarm), or nothing when it is not a record.
#[wasm_bindgen(js_name = expiresAt)]
pub fn expires_at(record: &[u8]) -> Option<f64> {
    match Record::decode(record).ok()? {
        Record::InFlight { expires_at, .. } | Record::Completed { expires_at, .. } => {
            Some(ms_to_js(expires_at))
        }
    }
}

/// When a completed `record` expires: the end of its life in the isolate-local cache.
/// Nothing for an in-flight record, which is never cached.
#[wasm_bindgen(js_name = completedUntil)]
pub fn completed_until(record: &[u8]) -> Option<f64> {
    match Record::decode(record).ok()? {
        Record::Completed { expires_at, .. } => Some(ms_to_js(expires_at)),
        Record::InFlight { .. } => None,
    }
}

#[cfg(test)]
mod tests;
