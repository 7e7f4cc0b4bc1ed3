//! The validated configuration: what every request decision reads. Built only by
//! [`Config::from_json`] (see [`super::validate`]); every field holds a checked value.
//!
//! ```
//! use idemgate_core::Config;
//! let c = Config::from_json(r#"{"routes": [{"name": "orders", "match": {"prefix": "/orders"}}]}"#).unwrap();
//! assert_eq!(c.rule_for("POST", "/orders/42").unwrap().name, "orders");
//! assert_eq!(c.rule_for("POST", "/orders-admin").unwrap().name, "default");
//! assert_eq!(c.rule_for("POST", "/%6Frders").unwrap().name, "orders");
//! ```
use std::collections::BTreeMap;

use serde_json::Value;

use crate::headers::never_stored;
use crate::ratelimit::{ContentionPolicy, Quota, ResetFormat};
use crate::request::canonical::Exclusions;
use crate::request::path::{normalize, prefix_matches};

pub const DEFAULT_STORE_HEADERS: &[&str] = &[
    "content-type",
    "content-language",
    "content-location",
    "content-encoding",
    "location",
    "etag",
    "last-modified",
    "cache-control",
    "expires",
    "vary",
    "link",
];

// ---------------------------------------------------------------------------- validated

/// An inclusive range of HTTP status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    /// Lowest code in the range.
    pub lo: u16,
    /// Highest code in the range.
    pub hi: u16,
}

impl StatusRange {
    fn contains(&self, status: u16) -> bool {
        self.lo <= status && status <= self.hi
    }
}

/// Where (part of) a key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A request header (lower-case name).
    Header(String),
    /// A member of the JSON body, by JSON Pointer.
    JsonPointer(String),
    /// Several parts joined unambiguously (length-prefixed); yields a key only when every
    /// part is present.
    Composite(Vec<KeySource>),
    /// The route (path without query).
    Route,
    /// A hash of the caller's credentials (`scope.credentialHeaders`).
    Caller,
}

impl KeySource {
    /// Whether extracting this source needs the request body.
    pub fn needs_body(&self) -> bool {
        match self {
            KeySource::JsonPointer(_) => true,
            KeySource::Composite(parts) => parts.iter().any(KeySource::needs_body),
            _ => false,
        }
    }

    /// Human description for error details (`header idempotency-key`, `body /orderId`).
    pub fn describe(&self) -> String {
        match self {
            KeySource::Header(h) => format!("header {h}"),
            KeySource::JsonPointer(p) => format!("body field {p}"),
            KeySource::Composite(parts) => format!(
                "({})",
                parts
                    .iter()
                    .map(KeySource::describe)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            KeySource::Route => "route".into(),
            KeySource::Caller => "caller".into(),
        }
    }
}

/// How the body enters the fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Byte for byte.
    Raw,
    /// Parsed as JSON and canonicalized (member order and whitespace do not matter).
    CanonicalJson,
    /// Not at all.
    None,
}

/// The hash of the fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashAlgorithm {
    /// SHA-256 (the default).
    #[default]
    Sha256,
    /// BLAKE3 (opt-in: ~4-5x SHA-256 under V8 with wasm SIMD; builds with the `blake3` feature).
    Blake3,
}

/// What the fingerprint covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintSpec {
    /// The hash.
    pub algorithm: HashAlgorithm,
    /// The method.
    pub method: bool,
    /// The path.
    pub path: bool,
    /// The query string.
    pub query: bool,
    /// Request headers (lower-case), in order.
    pub headers: Vec<String>,
    /// The body.
    pub body: BodyMode,
    /// JSON Pointers removed from the body before canonicalizing (timestamps, nonces).
    pub exclude_pointers: Vec<String>,
    /// The same pointers as a trie, removed in one walk.
    pub exclusions: Exclusions,
}

/// What to do when a key is reused with a different request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchAction {
    /// Answer with an error (422 by default; status and code configurable).
    Reject,
    /// Answer with the original response.
    Replay,
    /// Key and fingerprint together identify a request: a changed payload is a new request.
    NewRequest,
}

/// What to do when a completed key is used again with the same request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicateAction {
    /// Replay the stored response.
    Replay,
    /// Answer with an error (409 by default).
    Reject,
    /// Answer with a success acknowledging the duplicate (200 by default).
    Acknowledge,
}

/// What to do when the key is held by a request still in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcurrentAction {
    /// Answer 409 with `Retry-After`.
    Reject,
    /// Wait up to `wait_ms` for the first request, then answer with its stored response
    /// (409 at the bound).
    Wait,
}

/// A policy: action plus the answer's status, code and message overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy<A> {
    /// The action.
    pub action: A,
    /// Status of the answer when the action answers locally.
    pub status: u16,
    /// Error code override.
    pub code: Option<String>,
    /// Message override.
    pub message: Option<String>,
    /// `Retry-After` seconds (concurrent).
    pub retry_after_s: u64,
    /// Longest wait (concurrent, `wait`).
    pub wait_ms: u64,
    /// Body template of an acknowledgement.
    pub body: Option<Value>,
}

/// Per-request expiry taken from a header (seconds), within bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpirySpec {
    /// Lower-case header name.
    pub header: String,
    /// Smallest accepted value.
    pub min_s: u64,
    /// Largest accepted value.
    pub max_s: u64,
}

/// How local errors are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorFormat {
    /// RFC 9457 `application/problem+json`.
    Problem,
    /// A JSON template whose string leaves may hold placeholders.
    Envelope(Value),
}

/// Error rendering settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorSpec {
    /// Problem or envelope.
    pub format: ErrorFormat,
    /// Content type of error bodies.
    pub content_type: String,
    /// Code per error kind (`conflict`, `mismatch`, …).
    pub codes: BTreeMap<String, String>,
    /// Message per error kind.
    pub messages: BTreeMap<String, String>,
}

/// Error kinds, as named in `errors.codes` / `errors.messages`.
pub const ERROR_KINDS: &[&str] = &[
    "missingKey",
    "malformedKey",
    "invalidBody",
    "invalidExpiry",
    "bodyTooLarge",
    "conflict",
    "mismatch",
    "duplicate",
    "storeUnavailable",
    "misconfigured",
    "rateLimited",
];

/// Placeholders an envelope may use.
pub const PLACEHOLDERS: &[&str] = &[
    "status",
    "code",
    "message",
    "detail",
    "path",
    "idempotencyKey",
    "requestId",
    "retryAfterSeconds",
];

/// Per-caller rate limiting for the requests a rule's route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSpec {
    /// Rate and burst.
    pub quota: Quota,
    /// Request headers identifying the caller (hashed; absent = one shared anonymous bucket).
    pub caller_headers: Vec<String>,
    /// Give each route rule its own bucket per caller.
    pub per_route: bool,
    /// `X-RateLimit-Reset` as seconds from now or epoch seconds.
    pub reset_format: ResetFormat,
    /// What to do when the shared state cannot be updated in a bounded number of tries.
    pub on_contention: ContentionPolicy,
    /// Whether replays of stored responses spend quota.
    pub charge_replays: bool,
    /// Buckets kept.
    pub capacity: u32,
    /// Slots probed per bucket.
    pub probes: u32,
    /// Status of the refusal.
    pub status: u16,
}

/// Which requests a route applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// Path prefix.
    pub prefix: Option<String>,
    /// Exact path.
    pub exact: Option<String>,
    /// Methods (upper-case); empty = the rule's methods.
    pub methods: Vec<String>,
}

/// Everything that governs one kind of request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `default` or the route's name.
    pub name: String,
    /// Which requests (None for the default rule).
    pub matcher: Option<RouteMatch>,
    /// Upper-case methods idemgate applies to; others pass untouched.
    pub methods: Vec<String>,
    /// Key sources, first that yields a key wins.
    pub key_sources: Vec<KeySource>,
    /// Derive a key from the canonical body when no source yields one.
    pub derive_from_body: bool,
    /// Refuse (400) a covered request that yields no key.
    pub key_required: bool,
    /// Longest accepted key, in characters.
    pub key_max_length: usize,
    /// What the fingerprint covers.
    pub fingerprint: FingerprintSpec,
    /// How long a completed response is replayed, from first use.
    pub ttl_ms: u64,
    /// How long a claim holds the key while the first request is in flight.
    pub lease_ms: u64,
    /// Per-request expiry header.
    pub expiry: Option<ExpirySpec>,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: u64,
    /// Largest response body stored for replay.
    pub max_response_bytes: u64,
    /// Same key, different request.
    pub on_mismatch: Policy<MismatchAction>,
    /// Same key, same request, completed.
    pub on_duplicate: Policy<DuplicateAction>,
    /// Same key while in flight.
    pub on_concurrent: Policy<ConcurrentAction>,
    /// Statuses whose responses are stored.
    pub store_statuses: Vec<StatusRange>,
    /// Statuses never stored even when inside `store_statuses`.
    pub never_store_statuses: Vec<StatusRange>,
    /// Lower-case response header names stored and replayed.
    pub store_headers: Vec<String>,
    /// Header added to replayed responses with the value `true`.
    pub replay_header: String,
    /// Request headers whose values (hashed) scope the key to a caller.
    pub credential_headers: Vec<String>,
    /// Error rendering.
    pub errors: ErrorSpec,
    /// Rate limiting, if any.
    pub rate_limit: Option<RateLimitSpec>,
}

/// Correlation id settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correlation {
    /// Lower-case header name.
    pub header: String,
    /// Generate one when the client sent none.
    pub generate: bool,
}

/// What fleet mode does when etcd cannot decide a claim (unreachable, no quorum, timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// Answer 503 with `Retry-After`; nothing is executed.
    Closed,
    /// Forward the request without idempotency.
    Open,
}

/// Fleet mode: etcd (its v3 gRPC API, through an Envoy cluster) is the authoritative store
/// of claims and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// Envoy cluster name of the etcd members (HTTP/2; TLS as its transport socket says).
    pub cluster: String,
    /// Key prefix in etcd (ends with `/`).
    pub prefix: String,
    /// `:authority` of the calls.
    pub authority: String,
    /// Timeout of one etcd call, milliseconds.
    pub timeout_ms: u64,
    /// Extra attempts after a failed call (same owner token).
    pub retries: u32,
    /// What to do when etcd cannot decide.
    pub fail_policy: FailPolicy,
    /// Width of a lease bucket, milliseconds.
    pub lease_bucket_ms: u64,
    /// Largest encoded record written to etcd.
    pub max_value_bytes: u64,
}

/// A validated configuration. Build it with [`Config::from_json`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Free text naming the document a profile follows.
    pub description: Option<String>,
    /// Number of records the store holds.
    pub store_capacity: u32,
    /// Slots probed per key.
    pub store_probes: u32,
    /// Prefix of the store's keys and of metric names.
    pub store_namespace: String,
    /// Fleet mode (etcd as the authoritative store), if configured.
    pub store_etcd: Option<EtcdSpec>,
    /// Correlation id header, if any.
    pub correlation: Option<Correlation>,
    /// The default rule.
    pub default_rule: Rule,
    /// Route rules, first match wins.
    pub routes: Vec<Rule>,
}

impl Default for Config {
    fn default() -> Self {
        // The empty document is valid; this cannot fail.
        Self::from_json("{}").unwrap_or_else(|_| Self {
            description: None,
            store_capacity: 10_000,
            store_probes: 8,
            store_namespace: "idemgate".into(),
            store_etcd: None,
            correlation: None,
            default_rule: Rule::fallback(),
            routes: Vec::new(),
        })
    }
}

impl Config {
    /// The rule for a request, or `None` when idemgate does not apply (the request passes
    /// untouched): the first route whose match fits, else the default rule, provided the
    /// method is covered.
    /// The path is normalized first ([`crate::request::path`]).
    pub fn rule_for(&self, method: &str, path_with_query: &str) -> Option<&Rule> {
        let normalized = normalize(path_with_query);
        let path = route_of(&normalized);
        let rule = self
            .routes
            .iter()
            .find(|r| r.matcher.as_ref().is_some_and(|m| m.matches(method, path)))
            .unwrap_or(&self.default_rule);
        rule.covers_method(method).then_some(rule)
    }

    /// The rule whose rate limit applies to a request: the first route whose path matches
    /// (whatever the method), else the default rule.
    pub fn limit_rule_for(&self, path_with_query: &str) -> &Rule {
        let normalized = normalize(path_with_query);
        let path = route_of(&normalized);
        self.routes
            .iter()
            .find(|r| r.matcher.as_ref().is_some_and(|m| m.matches_path(path)))
            .unwrap_or(&self.default_rule)
    }

    /// Index of a rule returned by [`Config::rule_for`] (for hosts that keep an index).
    pub fn rule_index(&self, rule: &Rule) -> usize {
        self.routes
            .iter()
            .position(|r| std::ptr::eq(r, rule))
            .map_or(0, |i| i + 1)
    }

    /// The rule at an index from [`Config::rule_index`].
    pub fn rule_at(&self, index: usize) -> &Rule {
        index
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.default_rule)
    }

    /// Every rule, default first.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        std::iter::once(&self.default_rule).chain(self.routes.iter())
    }
}

/// The path of a path with query.
pub(crate) fn route_of(path_with_query: &str) -> &str {
    path_with_query
        .split_once('?')
        .map_or(path_with_query, |(p, _)| p)
}

impl RouteMatch {
    /// Whether the route applies to `method` and `path` (without query).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.matches_path(path)
            && (self.methods.is_empty()
                || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
    }

    /// Whether the route's path condition holds for `path` (normalized, without query):
    /// equal to `exact`, or under `prefix` by whole segments.
    pub fn matches_path(&self, path: &str) -> bool {
        match (&self.exact, &self.prefix) {
            (Some(e), _) => path == e,
            (None, Some(p)) => prefix_matches(p, path),
            (None, None) => true,
        }
    }
}

impl Rule {
    pub(super) fn fallback() -> Self {
        Rule {
            name: "default".into(),
            matcher: None,
            methods: vec!["POST".into(), "PATCH".into()],
            key_sources: vec![KeySource::Header("idempotency-key".into())],
            derive_from_body: false,
            key_required: false,
            key_max_length: 255,
            fingerprint: FingerprintSpec {
                algorithm: HashAlgorithm::Sha256,
                method: true,
                path: true,
                query: true,
                headers: vec![],
                body: BodyMode::Raw,
                exclude_pointers: vec![],
                exclusions: Exclusions::default(),
            },
            ttl_ms: 86_400_000,
            lease_ms: 30_000,
            expiry: None,
            max_body_bytes: 1 << 20,
            max_response_bytes: 1 << 20,
            on_mismatch: policy(MismatchAction::Reject, 422),
            on_duplicate: policy(DuplicateAction::Replay, 409),
            on_concurrent: policy(ConcurrentAction::Reject, 409),
            store_statuses: vec![StatusRange { lo: 200, hi: 499 }],
            never_store_statuses: vec![],
            store_headers: vec![],
            replay_header: "idempotent-replayed".into(),
            credential_headers: vec!["authorization".into()],
            errors: ErrorSpec {
                format: ErrorFormat::Problem,
                content_type: "application/problem+json".into(),
                codes: BTreeMap::new(),
                messages: BTreeMap::new(),
            },
            rate_limit: None,
        }
    }

    /// Whether requests with `method` are covered.
    pub fn covers_method(&self, method: &str) -> bool {
        self.matcher
            .as_ref()
            .filter(|m| !m.methods.is_empty())
            .map_or(&self.methods, |m| &m.methods)
            .iter()
            .any(|m| m.eq_ignore_ascii_case(method))
    }

    /// Whether a response with `status` is stored for replay.
    pub fn stores_status(&self, status: u16) -> bool {
        self.store_statuses.iter().any(|r| r.contains(status))
            && !self.never_store_statuses.iter().any(|r| r.contains(status))
    }

    /// Whether response header `name` (any case) is stored.
    pub fn stores_header(&self, name: &str) -> bool {
        !never_stored(name)
            && self
                .store_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
    }

    /// Whether the key or the fingerprint needs the body parsed as JSON.
    pub fn needs_json(&self) -> bool {
        self.key_sources.iter().any(KeySource::needs_body)
            || self.derive_from_body
            || self.fingerprint.body == BodyMode::CanonicalJson
    }

    /// Whether a key can be found from the headers alone.
    pub fn key_from_headers(&self) -> bool {
        !self.key_sources.iter().any(KeySource::needs_body) && !self.derive_from_body
    }
}

pub(super) fn policy<A>(action: A, status: u16) -> Policy<A> {
    Policy {
        action,
        status,
        code: None,
        message: None,
        retry_after_s: 1,
        wait_ms: 0,
        body: None,
    }
}
