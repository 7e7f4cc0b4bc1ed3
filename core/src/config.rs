//! Configuration: a JSON document read by hand into DTOs (unknown and duplicate fields
//! refused), then validated into [`Config`]. Every error names the field path and the bad
//! value.
//!
//! The document holds process-wide settings (`store`, `correlation`), a default [`Rule`]
//! (every other top-level field) and optional per-route rules (`routes`): the first route
//! whose `match` fits the request applies; a route inherits every top-level rule field it
//! does not set (blocks such as `key` or `onMismatch` are replaced whole).
//!
//! ```
//! use idemgate_core::Config;
//! let config = Config::from_json(r#"{"key": {"header": "Idempotency-Key"}, "ttlSeconds": 60}"#).unwrap();
//! let rule = config.rule_for("POST", "/orders").unwrap();
//! assert_eq!(rule.ttl_ms, 60_000);
//!
//! let err = Config::from_json(r#"{"key": {"maxLength": 0}}"#).unwrap_err();
//! assert_eq!(err.to_string(), "key.maxLength: must be 1..=1024, got 0");
//! ```
use std::collections::BTreeMap;

use crate::canonical::valid_pointer;
use crate::error::ConfigError;
use crate::headers::{is_token, never_stored};
use crate::json::{self, Value};
use crate::ratelimit::{ContentionPolicy, Quota, ResetFormat};

/// Default response headers stored and replayed.
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

// ------------------------------------------------------------------------------------- DTOs
//
// The document's blocks as written, every field optional. Each is read by hand from the
// parsed JSON (`read` below): unknown and duplicate names are refused, type errors name the
// path and what was found, `null` counts as absent. tests/test_schema.py checks that these
// fields are exactly the schema's properties.

#[derive(Default, Clone)]
struct RawRule {
    methods: Option<Vec<String>>,
    key: Option<RawKey>,
    fingerprint: Option<RawFingerprint>,
    ttl_seconds: Option<u64>,
    lease_seconds: Option<u64>,
    expiry: Option<RawExpiry>,
    max_body_bytes: Option<u64>,
    max_response_bytes: Option<u64>,
    on_mismatch: Option<RawPolicy>,
    on_duplicate: Option<RawPolicy>,
    on_concurrent: Option<RawPolicy>,
    response: Option<RawResponse>,
    scope: Option<RawScope>,
    errors: Option<RawErrors>,
    rate_limit: Option<RawRateLimit>,
}

/// The slot of a nested block read by `$ty::read` into `$dst` (an `Option`).
macro_rules! nested {
    ($dst:expr, $ty:ty) => {
        Slot::Read(&mut |p, v| {
            $dst = Some(<$ty>::read(p, v)?);
            Ok(())
        })
    };
}

impl RawRule {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("methods", Slot::Strs(&mut r.methods)),
                ("key", nested!(r.key, RawKey)),
                ("fingerprint", nested!(r.fingerprint, RawFingerprint)),
                ("ttlSeconds", Slot::U64(&mut r.ttl_seconds)),
                ("leaseSeconds", Slot::U64(&mut r.lease_seconds)),
                ("expiry", nested!(r.expiry, RawExpiry)),
                ("maxBodyBytes", Slot::U64(&mut r.max_body_bytes)),
                ("maxResponseBytes", Slot::U64(&mut r.max_response_bytes)),
                ("onMismatch", nested!(r.on_mismatch, RawPolicy)),
                ("onDuplicate", nested!(r.on_duplicate, RawPolicy)),
                ("onConcurrent", nested!(r.on_concurrent, RawPolicy)),
                ("response", nested!(r.response, RawResponse)),
                ("scope", nested!(r.scope, RawScope)),
                ("errors", nested!(r.errors, RawErrors)),
                ("rateLimit", nested!(r.rate_limit, RawRateLimit)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawRateLimit {
    rate: Option<u64>,
    period_seconds: Option<u64>,
    burst: Option<u64>,
    caller_headers: Option<Vec<String>>,
    per_route: Option<bool>,
    reset_format: Option<String>,
    on_contention: Option<String>,
    charge_replays: Option<bool>,
    capacity: Option<u64>,
    probes: Option<u64>,
    status: Option<u64>,
}

impl RawRateLimit {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("rate", Slot::U64(&mut r.rate)),
                ("periodSeconds", Slot::U64(&mut r.period_seconds)),
                ("burst", Slot::U64(&mut r.burst)),
                ("callerHeaders", Slot::Strs(&mut r.caller_headers)),
                ("perRoute", Slot::Bool(&mut r.per_route)),
                ("resetFormat", Slot::Str(&mut r.reset_format)),
                ("onContention", Slot::Str(&mut r.on_contention)),
                ("chargeReplays", Slot::Bool(&mut r.charge_replays)),
                ("capacity", Slot::U64(&mut r.capacity)),
                ("probes", Slot::U64(&mut r.probes)),
                ("status", Slot::U64(&mut r.status)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawKey {
    header: Option<String>,
    sources: Option<Vec<RawSource>>,
    derive_from_body: Option<bool>,
    required: Option<bool>,
    max_length: Option<u64>,
}

impl RawKey {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("header", Slot::Str(&mut r.header)),
                (
                    "sources",
                    Slot::Read(&mut |p, v| {
                        r.sources = Some(list(p, v, RawSource::read)?);
                        Ok(())
                    }),
                ),
                ("deriveFromBody", Slot::Bool(&mut r.derive_from_body)),
                ("required", Slot::Bool(&mut r.required)),
                ("maxLength", Slot::U64(&mut r.max_length)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawSource {
    header: Option<String>,
    json_pointer: Option<String>,
    composite: Option<Vec<RawSource>>,
    route: Option<bool>,
    caller: Option<bool>,
}

impl RawSource {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("header", Slot::Str(&mut r.header)),
                ("jsonPointer", Slot::Str(&mut r.json_pointer)),
                (
                    "composite",
                    Slot::Read(&mut |p, v| {
                        r.composite = Some(list(p, v, RawSource::read)?);
                        Ok(())
                    }),
                ),
                ("route", Slot::Bool(&mut r.route)),
                ("caller", Slot::Bool(&mut r.caller)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawFingerprint {
    method: Option<bool>,
    path: Option<bool>,
    query: Option<bool>,
    headers: Option<Vec<String>>,
    body: Option<String>,
    exclude_pointers: Option<Vec<String>>,
    algorithm: Option<String>,
}

impl RawFingerprint {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("method", Slot::Bool(&mut r.method)),
                ("path", Slot::Bool(&mut r.path)),
                ("query", Slot::Bool(&mut r.query)),
                ("headers", Slot::Strs(&mut r.headers)),
                ("body", Slot::Str(&mut r.body)),
                ("excludePointers", Slot::Strs(&mut r.exclude_pointers)),
                ("algorithm", Slot::Str(&mut r.algorithm)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawExpiry {
    header: Option<String>,
    min_seconds: Option<u64>,
    max_seconds: Option<u64>,
}

impl RawExpiry {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("header", Slot::Str(&mut r.header)),
                ("minSeconds", Slot::U64(&mut r.min_seconds)),
                ("maxSeconds", Slot::U64(&mut r.max_seconds)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawPolicy {
    action: Option<String>,
    status: Option<u64>,
    code: Option<String>,
    message: Option<String>,
    retry_after_seconds: Option<u64>,
    wait_millis: Option<u64>,
    body: Option<Value>,
}

impl RawPolicy {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("action", Slot::Str(&mut r.action)),
                ("status", Slot::U64(&mut r.status)),
                ("code", Slot::Str(&mut r.code)),
                ("message", Slot::Str(&mut r.message)),
                ("retryAfterSeconds", Slot::U64(&mut r.retry_after_seconds)),
                ("waitMillis", Slot::U64(&mut r.wait_millis)),
                ("body", Slot::Any(&mut r.body)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawResponse {
    store_statuses: Option<Vec<StatusItem>>,
    never_store_statuses: Option<Vec<StatusItem>>,
    store_headers: Option<Vec<String>>,
    replay_header: Option<String>,
}

impl RawResponse {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("storeStatuses", Slot::Statuses(&mut r.store_statuses)),
                (
                    "neverStoreStatuses",
                    Slot::Statuses(&mut r.never_store_statuses),
                ),
                ("storeHeaders", Slot::Strs(&mut r.store_headers)),
                ("replayHeader", Slot::Str(&mut r.replay_header)),
            ],
        )?;
        Ok(r)
    }
}

/// A status as written: a code (`404`) or text (`"2xx"`, `"500-503"`, `"all"`).
#[derive(Clone)]
enum StatusItem {
    Code(i64),
    Text(String),
}

fn status_items(path: &str, v: Value) -> Result<Vec<StatusItem>, ConfigError> {
    list(path, v, |p, v| match v {
        Value::String(s) => Ok(StatusItem::Text(s)),
        Value::Number(n) if n.as_i64().is_some() => Ok(StatusItem::Code(n.as_i64().unwrap_or(0))),
        other => Err(ConfigError::new(
            p,
            format!(
                "data did not match any variant: must be a status code or a string, got {}",
                unexpected(&other)
            ),
        )),
    })
}

#[derive(Default, Clone)]
struct RawScope {
    credential_headers: Option<Vec<String>>,
}

impl RawScope {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [("credentialHeaders", Slot::Strs(&mut r.credential_headers))],
        )?;
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct RawErrors {
    format: Option<String>,
    envelope: Option<Value>,
    content_type: Option<String>,
    codes: Option<BTreeMap<String, String>>,
    messages: Option<BTreeMap<String, String>>,
}

impl RawErrors {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("format", Slot::Str(&mut r.format)),
                ("envelope", Slot::Any(&mut r.envelope)),
                ("contentType", Slot::Str(&mut r.content_type)),
                ("codes", Slot::Map(&mut r.codes)),
                ("messages", Slot::Map(&mut r.messages)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default)]
struct RawStore {
    capacity: Option<u64>,
    probes: Option<u64>,
    namespace: Option<String>,
    etcd: Option<RawEtcd>,
}

impl RawStore {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("capacity", Slot::U64(&mut r.capacity)),
                ("probes", Slot::U64(&mut r.probes)),
                ("namespace", Slot::Str(&mut r.namespace)),
                ("etcd", nested!(r.etcd, RawEtcd)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default)]
struct RawEtcd {
    cluster: Option<String>,
    prefix: Option<String>,
    authority: Option<String>,
    timeout_millis: Option<u64>,
    retries: Option<u64>,
    fail_policy: Option<String>,
    lease_bucket_seconds: Option<u64>,
    max_value_bytes: Option<u64>,
}

impl RawEtcd {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("cluster", Slot::Str(&mut r.cluster)),
                ("prefix", Slot::Str(&mut r.prefix)),
                ("authority", Slot::Str(&mut r.authority)),
                ("timeoutMillis", Slot::U64(&mut r.timeout_millis)),
                ("retries", Slot::U64(&mut r.retries)),
                ("failPolicy", Slot::Str(&mut r.fail_policy)),
                ("leaseBucketSeconds", Slot::U64(&mut r.lease_bucket_seconds)),
                ("maxValueBytes", Slot::U64(&mut r.max_value_bytes)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default)]
struct RawCorrelation {
    header: Option<String>,
    generate: Option<bool>,
}

impl RawCorrelation {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("header", Slot::Str(&mut r.header)),
                ("generate", Slot::Bool(&mut r.generate)),
            ],
        )?;
        Ok(r)
    }
}

#[derive(Default)]
struct RawMatch {
    prefix: Option<String>,
    exact: Option<String>,
    methods: Option<Vec<String>>,
}

impl RawMatch {
    fn read(path: &str, v: Value) -> Result<Self, ConfigError> {
        let mut r = Self::default();
        block(
            path,
            v,
            &mut [
                ("prefix", Slot::Str(&mut r.prefix)),
                ("exact", Slot::Str(&mut r.exact)),
                ("methods", Slot::Strs(&mut r.methods)),
            ],
        )?;
        Ok(r)
    }
}

// ------------------------------------------------------------------- reading the document

/// `path.field`, or `field` at the top.
fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// An error at `path` (`$` for the document itself).
fn error_at(path: &str, problem: String) -> ConfigError {
    ConfigError::new(if path.is_empty() { "$" } else { path }, problem)
}

/// What was found, as type errors name it: `string "x"`, ``integer `-1` ``, `sequence`, …
fn unexpected(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_integer() => format!("integer `{}`", n.as_str()),
        Value::Number(n) => format!("floating point `{}`", n.as_str()),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

fn invalid_type(path: &str, v: &Value, expected: &str) -> ConfigError {
    error_at(
        path,
        format!("invalid type: {}, expected {expected}", unexpected(v)),
    )
}

/// The members of the object at `path` in document order; the first name that is given
/// twice is refused (a JSON object's names should be unique, RFC 8259 §4).
fn members(path: &str, v: Value) -> Result<Vec<(String, Value)>, ConfigError> {
    let Value::Object(obj) = v else {
        return Err(invalid_type(path, &v, "a map"));
    };
    let mut names: Vec<&str> = obj.0.iter().map(|(k, _)| k.as_str()).collect();
    crate::sort::sort_by(&mut names, |a, b| a < b);
    if let Some(dup) = names.windows(2).find(|w| w.first() == w.last()) {
        let name = dup.first().copied().unwrap_or_default();
        return Err(error_at(
            &join(path, name),
            format!("duplicate field `{name}`"),
        ));
    }
    Ok(obj.0)
}

/// Where a field of a block goes once read (`null` counts as absent and leaves it `None`).
enum Slot<'a> {
    U64(&'a mut Option<u64>),
    Bool(&'a mut Option<bool>),
    Str(&'a mut Option<String>),
    Strs(&'a mut Option<Vec<String>>),
    Statuses(&'a mut Option<Vec<StatusItem>>),
    Map(&'a mut Option<BTreeMap<String, String>>),
    /// Any JSON (templates), kept as is.
    Any(&'a mut Option<Value>),
    /// A nested block or list of blocks: the reader gets the field's path and value.
    Read(&'a mut dyn FnMut(&str, Value) -> Result<(), ConfigError>),
}

/// Reads the block at `path` into its fields' slots: every member must be one of `fields`
/// (else `unknown field`), given once (see [`members`]), of the slot's type.
fn block(path: &str, v: Value, fields: &mut [(&str, Slot<'_>)]) -> Result<(), ConfigError> {
    for (name, value) in members(path, v)? {
        let p = join(path, &name);
        let Some((_, slot)) = fields.iter_mut().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
            return Err(error_at(
                &p,
                format!(
                    "unknown field `{name}`, expected one of `{}`",
                    names.join("`, `")
                ),
            ));
        };
        if value.is_null() {
            continue;
        }
        match slot {
            Slot::U64(s) => **s = Some(uint(&p, value)?),
            Slot::Bool(s) => **s = Some(boolean(&p, value)?),
            Slot::Str(s) => **s = Some(string(&p, value)?),
            Slot::Strs(s) => **s = Some(strings(&p, value)?),
            Slot::Statuses(s) => **s = Some(status_items(&p, value)?),
            Slot::Map(s) => **s = Some(string_map(&p, value)?),
            Slot::Any(s) => **s = Some(value),
            Slot::Read(read) => read(&p, value)?,
        }
    }
    Ok(())
}

/// `None` for an absent (`null`) value, else what `read` makes of it.
fn opt<T>(
    path: &str,
    v: Value,
    read: impl FnOnce(&str, Value) -> Result<T, ConfigError>,
) -> Result<Option<T>, ConfigError> {
    if v.is_null() {
        Ok(None)
    } else {
        read(path, v).map(Some)
    }
}

fn list<T>(
    path: &str,
    v: Value,
    item: impl Fn(&str, Value) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    let Value::Array(items) = v else {
        return Err(invalid_type(path, &v, "a sequence"));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, v) in items.into_iter().enumerate() {
        out.push(item(&format!("{path}[{i}]"), v)?);
    }
    Ok(out)
}

fn string(path: &str, v: Value) -> Result<String, ConfigError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(invalid_type(path, &other, "a string")),
    }
}

fn strings(path: &str, v: Value) -> Result<Vec<String>, ConfigError> {
    list(path, v, string)
}

fn boolean(path: &str, v: Value) -> Result<bool, ConfigError> {
    match v {
        Value::Bool(b) => Ok(b),
        other => Err(invalid_type(path, &other, "a boolean")),
    }
}

fn uint(path: &str, v: Value) -> Result<u64, ConfigError> {
    match &v {
        Value::Number(n) if n.is_integer() => n.as_u64().ok_or_else(|| {
            error_at(
                path,
                format!("invalid value: {}, expected u64", unexpected(&v)),
            )
        }),
        _ => Err(invalid_type(path, &v, "u64")),
    }
}

fn string_map(path: &str, v: Value) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (k, v) in members(path, v)? {
        let s = string(&join(path, &k), v)?;
        out.insert(k, s);
    }
    Ok(out)
}

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
    /// Parses and validates a JSON configuration. An empty document (`""` or whitespace)
    /// gives the defaults.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let text = if text.trim().is_empty() { "{}" } else { text };
        let doc = json::parse_str(text).map_err(|e| ConfigError::new("$", e.to_string()))?;
        if !matches!(doc, Value::Object(_)) {
            return Err(ConfigError::new(
                "$",
                format!("must be a JSON object, got {}", kind(&doc)),
            ));
        }
        let mut top = json::Object(members("", doc)?);
        let description = match top.remove("description") {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(ConfigError::new(
                    "description",
                    format!("must be a string, got {other}"),
                ))
            }
        };
        top.remove("$schema");
        let store = match top.remove("store") {
            None => RawStore::default(),
            Some(v) => opt("store", v, RawStore::read)?.unwrap_or_default(),
        };
        let correlation = match top.remove("correlation") {
            None => None,
            Some(v) => opt("correlation", v, RawCorrelation::read)?,
        };
        let routes = match top.remove("routes") {
            None => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(ConfigError::new(
                    "routes",
                    format!("must be an array, got {}", kind(&other)),
                ))
            }
        };
        let base = RawRule::read("", Value::Object(top))?;
        let default_rule = validate_rule("", "default".into(), None, base.clone())?;

        let mut rules = Vec::new();
        for (i, item) in routes.into_iter().enumerate() {
            let prefix = format!("routes[{i}].");
            if !matches!(item, Value::Object(_)) {
                return Err(ConfigError::new(
                    format!("routes[{i}]"),
                    "must be an object".to_string(),
                ));
            }
            let mut obj = json::Object(members(&format!("routes[{i}]"), item)?);
            let name = match obj.remove("name") {
                None => format!("route{i}"),
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => s,
                Some(other) => {
                    return Err(ConfigError::new(
                        format!("{prefix}name"),
                        format!("must be a string of 1..=64 characters, got {other}"),
                    ))
                }
            };
            let m = match obj.remove("match") {
                None | Some(Value::Null) => {
                    return Err(ConfigError::new(
                        format!("{prefix}match"),
                        "is required".to_string(),
                    ))
                }
                Some(v) => RawMatch::read(&format!("{prefix}match"), v)?,
            };
            if name == "default" || rules.iter().any(|r: &Rule| r.name == name) {
                return Err(ConfigError::new(
                    format!("{prefix}name"),
                    format!("must be unique and not \"default\", got {name:?}"),
                ));
            }
            let matcher = validate_match(&prefix, m)?;
            let over = RawRule::read(&format!("routes[{i}]"), Value::Object(obj))?;
            let merged = merge(&base, over);
            rules.push(validate_rule(&prefix, name, Some(matcher), merged)?);
        }

        let shared_tables: Vec<(usize, &RateLimitSpec)> = std::iter::once(&default_rule)
            .chain(rules.iter())
            .enumerate()
            .filter_map(|(i, r)| {
                r.rate_limit
                    .as_ref()
                    .filter(|s| !s.per_route)
                    .map(|s| (i, s))
            })
            .collect();
        if let Some((_, first)) = shared_tables.first() {
            if let Some((i, other)) = shared_tables
                .iter()
                .find(|(_, s)| s.capacity != first.capacity || s.probes != first.probes)
            {
                return Err(ConfigError::new(
                    format!("routes[{}].rateLimit", i.saturating_sub(1)),
                    format!(
                        "capacity and probes must match the other shared (perRoute false) rate limits ({}/{}), got {}/{}; set perRoute true for a table of its own",
                        first.capacity, first.probes, other.capacity, other.probes
                    ),
                ));
            }
        }
        let store_capacity = bounded(
            "store.capacity",
            store.capacity.unwrap_or(10_000),
            1,
            10_000_000,
        )?;
        let store_probes = bounded("store.probes", store.probes.unwrap_or(8), 1, 64)?;
        if store_probes > store_capacity {
            return Err(ConfigError::new(
                "store.probes",
                format!("must not exceed store.capacity ({store_capacity}), got {store_probes}"),
            ));
        }
        let store_namespace = store.namespace.unwrap_or_else(|| "idemgate".to_string());
        if store_namespace.is_empty()
            || store_namespace.len() > 64
            || !store_namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        {
            return Err(ConfigError::new(
                "store.namespace",
                format!("must be 1..=64 characters of [A-Za-z0-9_-], got {store_namespace:?}"),
            ));
        }
        let store_etcd = match store.etcd {
            None => None,
            Some(e) => Some(validate_etcd(e)?),
        };
        let correlation = match correlation {
            None => None,
            Some(c) => Some(Correlation {
                header: header_name(
                    "correlation.header",
                    c.header.as_deref().unwrap_or("x-correlation-id"),
                )?,
                generate: c.generate.unwrap_or(true),
            }),
        };
        Ok(Self {
            description,
            store_capacity: u32::try_from(store_capacity).unwrap_or(u32::MAX),
            store_probes: u32::try_from(store_probes).unwrap_or(1),
            store_namespace,
            store_etcd,
            correlation,
            default_rule,
            routes: rules,
        })
    }

    /// Parses a JSON configuration given as bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ConfigError::new("$", format!("must be UTF-8 JSON, got invalid UTF-8 ({e})"))
        })?;
        Self::from_json(text)
    }

    /// The rule for a request, or `None` when idemgate does not apply (the request passes
    /// untouched): the first route whose match fits, else the default rule, provided the
    /// method is covered.
    pub fn rule_for(&self, method: &str, path_with_query: &str) -> Option<&Rule> {
        let path = path_with_query
            .split_once('?')
            .map_or(path_with_query, |(p, _)| p);
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
        let path = path_with_query
            .split_once('?')
            .map_or(path_with_query, |(p, _)| p);
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

impl RouteMatch {
    /// Whether the route applies to `method` and `path` (without query).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.matches_path(path)
            && (self.methods.is_empty()
                || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
    }

    /// Whether the route's path condition holds for `path` (without query).
    pub fn matches_path(&self, path: &str) -> bool {
        match (&self.exact, &self.prefix) {
            (Some(e), _) => path == e,
            (None, Some(p)) => path.starts_with(p.as_str()),
            (None, None) => true,
        }
    }
}

impl Rule {
    fn fallback() -> Self {
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

fn policy<A>(action: A, status: u16) -> Policy<A> {
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

// ------------------------------------------------------------------------------ helpers

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn merge(base: &RawRule, over: RawRule) -> RawRule {
    RawRule {
        methods: over.methods.or_else(|| base.methods.clone()),
        key: over.key.or_else(|| base.key.clone()),
        fingerprint: over.fingerprint.or_else(|| base.fingerprint.clone()),
        ttl_seconds: over.ttl_seconds.or(base.ttl_seconds),
        lease_seconds: over.lease_seconds.or(base.lease_seconds),
        expiry: over.expiry.or_else(|| base.expiry.clone()),
        max_body_bytes: over.max_body_bytes.or(base.max_body_bytes),
        max_response_bytes: over.max_response_bytes.or(base.max_response_bytes),
        on_mismatch: over.on_mismatch.or_else(|| base.on_mismatch.clone()),
        on_duplicate: over.on_duplicate.or_else(|| base.on_duplicate.clone()),
        on_concurrent: over.on_concurrent.or_else(|| base.on_concurrent.clone()),
        response: over.response.or_else(|| base.response.clone()),
        scope: over.scope.or_else(|| base.scope.clone()),
        errors: over.errors.or_else(|| base.errors.clone()),
        rate_limit: over.rate_limit.or_else(|| base.rate_limit.clone()),
    }
}

fn validate_etcd(e: RawEtcd) -> Result<EtcdSpec, ConfigError> {
    let name = |path: &str, v: Option<String>, default: &str| -> Result<String, ConfigError> {
        let v = v.unwrap_or_else(|| default.to_string());
        if v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                path,
                format!("must be 1..=255 printable ASCII characters, got {v:?}"),
            ));
        }
        Ok(v)
    };
    let cluster = name("store.etcd.cluster", e.cluster, "etcd")?;
    let authority = name("store.etcd.authority", e.authority, "etcd")?;
    let prefix = name("store.etcd.prefix", e.prefix, "/idemgate/")?;
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(ConfigError::new(
            "store.etcd.prefix",
            format!("must start and end with \"/\", got {prefix:?}"),
        ));
    }
    let timeout_ms = bounded(
        "store.etcd.timeoutMillis",
        e.timeout_millis.unwrap_or(500),
        10,
        60_000,
    )?;
    let retries = bounded("store.etcd.retries", e.retries.unwrap_or(2), 0, 10)?;
    let fail_policy = match e.fail_policy.as_deref().unwrap_or("closed") {
        "closed" => FailPolicy::Closed,
        "open" => FailPolicy::Open,
        other => {
            return Err(ConfigError::new(
                "store.etcd.failPolicy",
                format!("must be \"closed\" or \"open\", got {other:?}"),
            ))
        }
    };
    let bucket_s = bounded(
        "store.etcd.leaseBucketSeconds",
        e.lease_bucket_seconds.unwrap_or(60),
        2,
        86_400,
    )?;
    let max_value_bytes = bounded(
        "store.etcd.maxValueBytes",
        e.max_value_bytes.unwrap_or(1_000_000),
        1_024,
        1_100_000,
    )?;
    Ok(EtcdSpec {
        cluster,
        prefix,
        authority,
        timeout_ms,
        retries: u32::try_from(retries).unwrap_or(0),
        fail_policy,
        lease_bucket_ms: bucket_s.saturating_mul(1000),
        max_value_bytes,
    })
}

fn bounded(path: &str, value: u64, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError::new(
            path,
            format!("must be {lo}..={hi}, got {value}"),
        ));
    }
    Ok(value)
}

fn header_name(path: &str, name: &str) -> Result<String, ConfigError> {
    if !is_token(name) {
        return Err(ConfigError::new(
            path,
            format!("must be an HTTP header name, got {name:?}"),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

fn methods(path: &str, list: &[String]) -> Result<Vec<String>, ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::new(
            path,
            "must list at least one method, got []",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        if !is_token(m) {
            return Err(ConfigError::new(
                format!("{path}[{i}]"),
                format!("must be an HTTP method token, got {m:?}"),
            ));
        }
        let up = m.to_ascii_uppercase();
        if !out.contains(&up) {
            out.push(up);
        }
    }
    Ok(out)
}

fn pointer(path: &str, p: &str) -> Result<String, ConfigError> {
    valid_pointer(p).map_err(|e| ConfigError::new(path, e))?;
    if p.is_empty() {
        return Err(ConfigError::new(
            path,
            "must point inside the body, got \"\" (the whole document)",
        ));
    }
    Ok(p.to_string())
}

fn validate_match(prefix: &str, m: RawMatch) -> Result<RouteMatch, ConfigError> {
    if m.prefix.is_some() && m.exact.is_some() {
        return Err(ConfigError::new(
            format!("{prefix}match"),
            "set either prefix or exact, not both".to_string(),
        ));
    }
    for (field, v) in [("prefix", &m.prefix), ("exact", &m.exact)] {
        if let Some(p) = v {
            if !p.starts_with('/') {
                return Err(ConfigError::new(
                    format!("{prefix}match.{field}"),
                    format!("must start with \"/\", got {p:?}"),
                ));
            }
        }
    }
    let methods = match &m.methods {
        None => Vec::new(),
        Some(list) => methods(&format!("{prefix}match.methods"), list)?,
    };
    Ok(RouteMatch {
        prefix: m.prefix,
        exact: m.exact,
        methods,
    })
}

fn source(path: &str, s: &RawSource, depth: u32) -> Result<KeySource, ConfigError> {
    let set = [
        s.header.is_some(),
        s.json_pointer.is_some(),
        s.composite.is_some(),
        s.route.is_some(),
        s.caller.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        return Err(ConfigError::new(
            path,
            format!(
                "must set exactly one of header, jsonPointer, composite, route, caller; got {set}"
            ),
        ));
    }
    if let Some(h) = &s.header {
        return Ok(KeySource::Header(header_name(
            &format!("{path}.header"),
            h,
        )?));
    }
    if let Some(p) = &s.json_pointer {
        return Ok(KeySource::JsonPointer(pointer(
            &format!("{path}.jsonPointer"),
            p,
        )?));
    }
    if let Some(parts) = &s.composite {
        if depth > 0 {
            return Err(ConfigError::new(
                format!("{path}.composite"),
                "composites cannot be nested",
            ));
        }
        if parts.len() < 2 || parts.len() > 8 {
            return Err(ConfigError::new(
                format!("{path}.composite"),
                format!("must have 2..=8 parts, got {}", parts.len()),
            ));
        }
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            out.push(source(&format!("{path}.composite[{i}]"), p, depth + 1)?);
        }
        if !out
            .iter()
            .any(|p| matches!(p, KeySource::Header(_) | KeySource::JsonPointer(_)))
        {
            return Err(ConfigError::new(
                format!("{path}.composite"),
                "needs at least one header or jsonPointer part",
            ));
        }
        return Ok(KeySource::Composite(out));
    }
    if let Some(r) = s.route {
        if depth == 0 || !r {
            return Err(ConfigError::new(
                format!("{path}.route"),
                "is only valid as `true` inside a composite",
            ));
        }
        return Ok(KeySource::Route);
    }
    if depth == 0 || s.caller != Some(true) {
        return Err(ConfigError::new(
            format!("{path}.caller"),
            "is only valid as `true` inside a composite",
        ));
    }
    Ok(KeySource::Caller)
}

fn action<A: Copy>(
    path: &str,
    name: Option<&str>,
    default: A,
    options: &[(&str, A)],
) -> Result<A, ConfigError> {
    let Some(name) = name else {
        return Ok(default);
    };
    options
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, a)| *a)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            ConfigError::new(
                path,
                format!("must be one of {}; got {name:?}", names.join(", ")),
            )
        })
}

fn validate_policy<A: Copy + PartialEq>(
    path: &str,
    raw: Option<RawPolicy>,
    default: A,
    options: &[(&str, A)],
    default_status: impl Fn(A) -> u16,
) -> Result<Policy<A>, ConfigError> {
    let raw = raw.unwrap_or_default();
    let a = action(
        &format!("{path}.action"),
        raw.action.as_deref(),
        default,
        options,
    )?;
    let status = match raw.status {
        None => default_status(a),
        Some(s) => u16::try_from(bounded(&format!("{path}.status"), s, 200, 599)?).unwrap_or(500),
    };
    let retry_after_s = bounded(
        &format!("{path}.retryAfterSeconds"),
        raw.retry_after_seconds.unwrap_or(1),
        1,
        3600,
    )?;
    let wait_ms = bounded(
        &format!("{path}.waitMillis"),
        raw.wait_millis.unwrap_or(0),
        0,
        60_000,
    )?;
    if let Some(code) = &raw.code {
        if code.is_empty() || code.len() > 128 {
            return Err(ConfigError::new(
                format!("{path}.code"),
                format!("must be 1..=128 characters, got {code:?}"),
            ));
        }
    }
    if let Some(body) = &raw.body {
        check_template(&format!("{path}.body"), body)?;
    }
    Ok(Policy {
        action: a,
        status,
        code: raw.code,
        message: raw.message,
        retry_after_s,
        wait_ms,
        body: raw.body,
    })
}

fn check_template(path: &str, v: &Value) -> Result<(), ConfigError> {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                let after = rest.get(start + 2..).unwrap_or_default();
                let Some(end) = after.find("}}") else {
                    return Err(ConfigError::new(
                        path,
                        format!("unclosed placeholder in {s:?}"),
                    ));
                };
                let name = after.get(..end).unwrap_or_default().trim();
                if !PLACEHOLDERS.contains(&name) {
                    return Err(ConfigError::new(
                        path,
                        format!(
                            "unknown placeholder {{{{{name}}}}}; known: {}",
                            PLACEHOLDERS.join(", ")
                        ),
                    ));
                }
                rest = after.get(end + 2..).unwrap_or_default();
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_template(&format!("{path}[{i}]"), item)?;
            }
            Ok(())
        }
        Value::Object(map) => {
            // refuses duplicate names
            members(path, Value::Object(map.clone()))?;
            for (k, item) in map.iter() {
                check_template(&format!("{path}.{k}"), item)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn validate_rule(
    prefix: &str,
    name: String,
    matcher: Option<RouteMatch>,
    raw: RawRule,
) -> Result<Rule, ConfigError> {
    // Filled in place from a borrowed `raw`: an error then drops one `Rule` and nothing of
    // `raw` piecemeal (each early return of a function that moves fields out of its
    // arguments and builds many locals carries its own drop code: ~7 kB of wasm here).
    let mut rule = Rule::fallback();
    rule.name = name;
    rule.matcher = matcher;
    fill_rule(&mut rule, prefix, &raw)?;
    Ok(rule)
}

/// Validates `raw` into `rule`, which holds the defaults of fields `raw` leaves unset.
fn fill_rule(rule: &mut Rule, prefix: &str, raw: &RawRule) -> Result<(), ConfigError> {
    let p = |field: &str| format!("{prefix}{field}");
    if let Some(list) = &raw.methods {
        rule.methods = methods(&p("methods"), list)?;
    }
    let no_key = RawKey::default();
    let key = raw.key.as_ref().unwrap_or(&no_key);
    if key.header.is_some() && key.sources.is_some() {
        return Err(ConfigError::new(
            p("key"),
            "set either header or sources, not both",
        ));
    }
    match (&key.header, &key.sources) {
        (Some(h), _) => {
            rule.key_sources = vec![KeySource::Header(header_name(&p("key.header"), h)?)];
        }
        (None, Some(list)) => {
            if list.is_empty() && key.derive_from_body != Some(true) {
                return Err(ConfigError::new(
                    p("key.sources"),
                    "must list at least one source, got []",
                ));
            }
            rule.key_sources.clear();
            for (i, s) in list.iter().enumerate() {
                let source = source(&p(&format!("key.sources[{i}]")), s, 0)?;
                rule.key_sources.push(source);
            }
        }
        (None, None) => {}
    }
    let key_max_length = bounded(&p("key.maxLength"), key.max_length.unwrap_or(255), 1, 1024)?;
    rule.derive_from_body = key.derive_from_body.unwrap_or(false);
    rule.key_required = key.required.unwrap_or(false);
    rule.key_max_length = usize::try_from(key_max_length).unwrap_or(1024);

    let no_fp = RawFingerprint::default();
    let fp = raw.fingerprint.as_ref().unwrap_or(&no_fp);
    let body = match fp.body.as_deref() {
        None | Some("raw") => BodyMode::Raw,
        Some("canonicalJson") => BodyMode::CanonicalJson,
        Some("none") => BodyMode::None,
        Some(other) => {
            return Err(ConfigError::new(
                p("fingerprint.body"),
                format!("must be one of raw, canonicalJson, none; got {other:?}"),
            ))
        }
    };
    let algorithm = match fp.algorithm.as_deref() {
        None | Some("sha256") => HashAlgorithm::Sha256,
        Some("blake3") if cfg!(feature = "blake3") => HashAlgorithm::Blake3,
        Some("blake3") => {
            return Err(ConfigError::new(
                p("fingerprint.algorithm"),
                "\"blake3\" is not built into this module (the edge module has sha256 only)"
                    .to_string(),
            ))
        }
        Some(other) => {
            return Err(ConfigError::new(
                p("fingerprint.algorithm"),
                format!("must be one of sha256, blake3; got {other:?}"),
            ))
        }
    };
    let spec = &mut rule.fingerprint;
    (spec.algorithm, spec.body) = (algorithm, body);
    spec.method = fp.method.unwrap_or(true);
    spec.path = fp.path.unwrap_or(true);
    spec.query = fp.query.unwrap_or(true);
    for (i, h) in fp.headers.as_deref().unwrap_or_default().iter().enumerate() {
        let name = header_name(&p(&format!("fingerprint.headers[{i}]")), h)?;
        rule.fingerprint.headers.push(name);
    }
    for (i, e) in fp
        .exclude_pointers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let ptr = pointer(&p(&format!("fingerprint.excludePointers[{i}]")), e)?;
        rule.fingerprint.exclude_pointers.push(ptr);
    }
    if !rule.fingerprint.exclude_pointers.is_empty() && body != BodyMode::CanonicalJson {
        return Err(ConfigError::new(
            p("fingerprint.excludePointers"),
            "needs fingerprint.body \"canonicalJson\"".to_string(),
        ));
    }

    let ttl_s = bounded(
        &p("ttlSeconds"),
        raw.ttl_seconds.unwrap_or(86_400),
        1,
        31_536_000,
    )?;
    let lease_s = bounded(
        &p("leaseSeconds"),
        raw.lease_seconds.unwrap_or(ttl_s.min(30)),
        1,
        86_400,
    )?;
    if lease_s > ttl_s {
        return Err(ConfigError::new(
            p("leaseSeconds"),
            format!("must not exceed ttlSeconds ({ttl_s}), got {lease_s}"),
        ));
    }
    rule.ttl_ms = ttl_s.saturating_mul(1000);
    rule.lease_ms = lease_s.saturating_mul(1000);
    rule.expiry = match &raw.expiry {
        None => None,
        Some(e) => {
            let header = header_name(
                &p("expiry.header"),
                e.header.as_deref().unwrap_or("x-idempotency-expiration"),
            )?;
            let min_s = bounded(
                &p("expiry.minSeconds"),
                e.min_seconds.unwrap_or(1),
                1,
                31_536_000,
            )?;
            let max_s = bounded(
                &p("expiry.maxSeconds"),
                e.max_seconds.unwrap_or(ttl_s.max(min_s)),
                1,
                31_536_000,
            )?;
            if min_s > max_s {
                return Err(ConfigError::new(
                    p("expiry"),
                    format!("bounds are inverted: minSeconds {min_s} > maxSeconds {max_s}"),
                ));
            }
            Some(ExpirySpec {
                header,
                min_s,
                max_s,
            })
        }
    };
    rule.max_body_bytes = bounded(
        &p("maxBodyBytes"),
        raw.max_body_bytes.unwrap_or(1 << 20),
        0,
        1 << 30,
    )?;
    rule.max_response_bytes = bounded(
        &p("maxResponseBytes"),
        raw.max_response_bytes.unwrap_or(1 << 20),
        0,
        64 << 20,
    )?;

    rule.on_mismatch = validate_policy(
        &p("onMismatch"),
        raw.on_mismatch.clone(),
        MismatchAction::Reject,
        &[
            ("reject", MismatchAction::Reject),
            ("replay", MismatchAction::Replay),
            ("newRequest", MismatchAction::NewRequest),
        ],
        |_| 422,
    )?;
    rule.on_duplicate = validate_policy(
        &p("onDuplicate"),
        raw.on_duplicate.clone(),
        DuplicateAction::Replay,
        &[
            ("replay", DuplicateAction::Replay),
            ("reject", DuplicateAction::Reject),
            ("acknowledge", DuplicateAction::Acknowledge),
        ],
        |a| {
            if a == DuplicateAction::Acknowledge {
                200
            } else {
                409
            }
        },
    )?;
    rule.on_concurrent = validate_policy(
        &p("onConcurrent"),
        raw.on_concurrent.clone(),
        ConcurrentAction::Reject,
        &[
            ("reject", ConcurrentAction::Reject),
            ("wait", ConcurrentAction::Wait),
        ],
        |_| 409,
    )?;
    if rule.on_concurrent.action == ConcurrentAction::Wait && rule.on_concurrent.wait_ms == 0 {
        return Err(ConfigError::new(
            p("onConcurrent.waitMillis"),
            "must be set (1..=60000) when action is \"wait\"".to_string(),
        ));
    }

    let no_resp = RawResponse::default();
    let resp = raw.response.as_ref().unwrap_or(&no_resp);
    rule.store_statuses = match &resp.store_statuses {
        None => vec![StatusRange { lo: 200, hi: 499 }],
        Some(items) => statuses(&p("response.storeStatuses"), items)?,
    };
    rule.never_store_statuses = match &resp.never_store_statuses {
        None => [408, 409, 425, 429]
            .iter()
            .map(|&c| StatusRange { lo: c, hi: c })
            .collect(),
        Some(items) => statuses(&p("response.neverStoreStatuses"), items)?,
    };
    rule.store_headers = match &resp.store_headers {
        None => DEFAULT_STORE_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
        Some(list) => {
            let mut out = Vec::new();
            for (i, h) in list.iter().enumerate() {
                let path = p(&format!("response.storeHeaders[{i}]"));
                let n = header_name(&path, h)?;
                if never_stored(&n) {
                    return Err(ConfigError::new(
                        path,
                        format!("{h:?} is a hop-by-hop, framing or credential header and is never stored"),
                    ));
                }
                if !out.contains(&n) {
                    out.push(n);
                }
            }
            out
        }
    };
    rule.replay_header = header_name(
        &p("response.replayHeader"),
        resp.replay_header
            .as_deref()
            .unwrap_or("idempotent-replayed"),
    )?;
    rule.credential_headers = match raw
        .scope
        .as_ref()
        .and_then(|s| s.credential_headers.as_ref())
    {
        None => vec!["authorization".to_string()],
        Some(list) => {
            let mut out = Vec::new();
            for (i, h) in list.iter().enumerate() {
                out.push(header_name(
                    &p(&format!("scope.credentialHeaders[{i}]")),
                    h,
                )?);
            }
            out
        }
    };
    rule.errors = validate_errors(&p("errors"), raw.errors.clone().unwrap_or_default())?;
    rule.rate_limit = match &raw.rate_limit {
        None => None,
        Some(r) => Some(validate_rate_limit(&p("rateLimit"), r.clone())?),
    };
    Ok(())
}

fn validate_rate_limit(path: &str, r: RawRateLimit) -> Result<RateLimitSpec, ConfigError> {
    let p = |f: &str| format!("{path}.{f}");
    let rate = bounded(
        &p("rate"),
        r.rate
            .ok_or_else(|| ConfigError::new(p("rate"), "is required"))?,
        1,
        1_000_000,
    )?;
    let period_s = bounded(
        &p("periodSeconds"),
        r.period_seconds.unwrap_or(1),
        1,
        86_400,
    )?;
    let burst = bounded(&p("burst"), r.burst.unwrap_or(rate), 1, 1_000_000)?;
    let quota = Quota::new(
        u32::try_from(rate).unwrap_or(u32::MAX),
        period_s.saturating_mul(1000),
        u32::try_from(burst).unwrap_or(u32::MAX),
    )
    .map_err(|e| ConfigError::new(path, e.to_string()))?;
    let caller_headers = match r.caller_headers {
        None => vec!["authorization".to_string()],
        Some(list) => {
            let mut out = Vec::new();
            for (i, h) in list.iter().enumerate() {
                out.push(header_name(&p(&format!("callerHeaders[{i}]")), h)?);
            }
            out
        }
    };
    let reset_format = match r.reset_format.as_deref() {
        None => ResetFormat::Seconds,
        Some(s) => ResetFormat::parse(s).ok_or_else(|| {
            ConfigError::new(
                p("resetFormat"),
                format!("must be one of seconds, epoch; got {s:?}"),
            )
        })?,
    };
    let on_contention = match r.on_contention.as_deref() {
        None => ContentionPolicy::FailClosed,
        Some(s) => ContentionPolicy::parse(s).ok_or_else(|| {
            ConfigError::new(
                p("onContention"),
                format!("must be one of failClosed, failOpen; got {s:?}"),
            )
        })?,
    };
    let capacity = bounded(&p("capacity"), r.capacity.unwrap_or(10_000), 1, 10_000_000)?;
    let probes = bounded(&p("probes"), r.probes.unwrap_or(8), 1, 64)?;
    if probes > capacity {
        return Err(ConfigError::new(
            p("probes"),
            format!("must not exceed capacity ({capacity}), got {probes}"),
        ));
    }
    let status = bounded(&p("status"), r.status.unwrap_or(429), 400, 599)?;
    Ok(RateLimitSpec {
        quota,
        caller_headers,
        per_route: r.per_route.unwrap_or(false),
        reset_format,
        on_contention,
        charge_replays: r.charge_replays.unwrap_or(false),
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        probes: u32::try_from(probes).unwrap_or(1),
        status: u16::try_from(status).unwrap_or(429),
    })
}

fn validate_errors(path: &str, raw: RawErrors) -> Result<ErrorSpec, ConfigError> {
    let format = match raw.format.as_deref() {
        None | Some("problem") => {
            if raw.envelope.is_some() {
                return Err(ConfigError::new(
                    format!("{path}.envelope"),
                    "is only used with format \"envelope\"".to_string(),
                ));
            }
            ErrorFormat::Problem
        }
        Some("envelope") => match raw.envelope {
            Some(v @ Value::Object(_)) => {
                check_template(&format!("{path}.envelope"), &v)?;
                ErrorFormat::Envelope(v)
            }
            Some(other) => {
                return Err(ConfigError::new(
                    format!("{path}.envelope"),
                    format!("must be a JSON object, got {}", kind(&other)),
                ))
            }
            None => {
                return Err(ConfigError::new(
                    format!("{path}.envelope"),
                    "is required with format \"envelope\"".to_string(),
                ))
            }
        },
        Some(other) => {
            return Err(ConfigError::new(
                format!("{path}.format"),
                format!("must be one of problem, envelope; got {other:?}"),
            ))
        }
    };
    for (field, map) in [("codes", &raw.codes), ("messages", &raw.messages)] {
        for k in map.iter().flat_map(|m| m.keys()) {
            if !ERROR_KINDS.contains(&k.as_str()) {
                return Err(ConfigError::new(
                    format!("{path}.{field}.{k}"),
                    format!("unknown error kind; known: {}", ERROR_KINDS.join(", ")),
                ));
            }
        }
    }
    let content_type = raw.content_type.unwrap_or_else(|| match format {
        ErrorFormat::Problem => "application/problem+json".into(),
        ErrorFormat::Envelope(_) => "application/json".into(),
    });
    Ok(ErrorSpec {
        format,
        content_type,
        codes: raw.codes.unwrap_or_default(),
        messages: raw.messages.unwrap_or_default(),
    })
}

fn statuses(path: &str, items: &[StatusItem]) -> Result<Vec<StatusRange>, ConfigError> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let range = match item {
            StatusItem::Code(c) => {
                let code = status_code(&p, &c.to_string())?;
                StatusRange { lo: code, hi: code }
            }
            StatusItem::Text(t) => status_text(&p, t)?,
        };
        out.push(range);
    }
    Ok(out)
}

fn status_text(path: &str, text: &str) -> Result<StatusRange, ConfigError> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(StatusRange { lo: 100, hi: 599 });
    }
    if t.len() == 3 && t.to_ascii_lowercase().ends_with("xx") {
        let class = t.chars().next().and_then(|c| c.to_digit(10)).unwrap_or(0);
        if (1..=5).contains(&class) {
            let lo = u16::try_from(class * 100).unwrap_or(0);
            return Ok(StatusRange { lo, hi: lo + 99 });
        }
        return Err(ConfigError::new(
            path,
            format!("must be a status class 1xx..5xx, got {text:?}"),
        ));
    }
    if let Some((a, b)) = t.split_once('-') {
        let lo = status_code(path, a.trim())?;
        let hi = status_code(path, b.trim())?;
        if lo > hi {
            return Err(ConfigError::new(
                path,
                format!("range is inverted ({lo} > {hi}), got {text:?}"),
            ));
        }
        return Ok(StatusRange { lo, hi });
    }
    let code = status_code(path, t)?;
    Ok(StatusRange { lo: code, hi: code })
}

fn status_code(path: &str, text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(c) if (100..=599).contains(&c) => Ok(c),
        _ => Err(ConfigError::new(
            path,
            format!("must be a status code 100..=599, a range \"200-299\", a class \"2xx\" or \"all\", got {text:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        match Config::from_json(json) {
            Ok(c) => panic!("accepted {json}: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults() {
        let c = Config::from_json("{}").unwrap();
        let r = &c.default_rule;
        assert_eq!(
            r.key_sources,
            vec![KeySource::Header("idempotency-key".into())]
        );
        assert!(!r.key_required);
        assert_eq!(r.methods, vec!["POST", "PATCH"]);
        assert_eq!(r.key_max_length, 255);
        assert_eq!(r.ttl_ms, 86_400_000);
        assert_eq!(r.lease_ms, 30_000);
        assert!(r.stores_status(201));
        assert!(r.stores_status(404));
        assert!(!r.stores_status(429));
        assert!(!r.stores_status(500));
        assert!(r.stores_header("Content-Type"));
        assert!(!r.stores_header("set-cookie"));
        assert_eq!(r.on_mismatch.action, MismatchAction::Reject);
        assert_eq!(r.on_mismatch.status, 422);
        assert_eq!(Config::default(), c);
        assert_eq!(Config::from_json("").unwrap(), c);
        assert!(c.rule_for("GET", "/x").is_none());
        assert!(c.rule_for("POST", "/x").is_some());
    }

    #[test]
    fn errors_name_path_and_value() {
        assert_eq!(
            err(r#"{"key":{"maxLength":0}}"#),
            "key.maxLength: must be 1..=1024, got 0"
        );
        assert!(
            err(r#"{"bogus":1}"#).starts_with("bogus: unknown field `bogus`"),
            "{}",
            err(r#"{"bogus":1}"#)
        );
        assert!(err(r#"{"key":{"hedaer":"x"}}"#).starts_with("key.hedaer: unknown field"));
        assert_eq!(
            err(r#"{"methods":[]}"#),
            "methods: must list at least one method, got []"
        );
        assert_eq!(
            err(r#"{"methods":["PO ST"]}"#),
            "methods[0]: must be an HTTP method token, got \"PO ST\""
        );
        assert_eq!(
            err(r#"{"ttlSeconds":10,"leaseSeconds":20}"#),
            "leaseSeconds: must not exceed ttlSeconds (10), got 20"
        );
        assert_eq!(
            err(r#"{"response":{"storeStatuses":["299-200"]}}"#),
            "response.storeStatuses[0]: range is inverted (299 > 200), got \"299-200\""
        );
        assert!(err(r#"{"response":{"storeHeaders":["Set-Cookie"]}}"#)
            .starts_with("response.storeHeaders[0]: \"Set-Cookie\" is a hop-by-hop"));
        assert!(err(r#"{"key":{"header":"bad header"}}"#)
            .starts_with("key.header: must be an HTTP header name"));
        assert!(err(r#"{"ttlSeconds":"x"}"#).starts_with("ttlSeconds: invalid type"));
        assert!(err(r#"{"store":{"capacity":0}}"#)
            .starts_with("store.capacity: must be 1..=10000000, got 0"));
        assert!(err(r#"{"store":{"capacity":4,"probes":8}}"#)
            .starts_with("store.probes: must not exceed"));
        assert!(err(r#"{"store":{"capasity":4}}"#).starts_with("store.capasity: unknown field"));
        assert_eq!(
            err(r#"{"fingerprint":{"algorithm":"md5"}}"#),
            "fingerprint.algorithm: must be one of sha256, blake3; got \"md5\""
        );
        #[cfg(not(feature = "blake3"))]
        assert!(err(r#"{"fingerprint":{"algorithm":"blake3"}}"#)
            .starts_with("fingerprint.algorithm: \"blake3\" is not built into this module"));
        assert!(err(r#"{"response":{"storeStatuses":[700]}}"#)
            .starts_with("response.storeStatuses[0]: must be a status code"));
        assert!(
            err("true").starts_with("$: must be a JSON object"),
            "{}",
            err("true")
        );
        assert!(err("{").starts_with("$: EOF"), "{}", err("{"));
        // policies, pointers, bounds, routes
        assert_eq!(
            err(r#"{"onMismatch":{"action":"explode"}}"#),
            "onMismatch.action: must be one of reject, replay, newRequest; got \"explode\""
        );
        assert_eq!(
            err(r#"{"key":{"sources":[{"jsonPointer":"orderId"}]}}"#),
            "key.sources[0].jsonPointer: must be empty or start with \"/\", got \"orderId\""
        );
        assert_eq!(
            err(r#"{"expiry":{"minSeconds":100,"maxSeconds":10}}"#),
            "expiry: bounds are inverted: minSeconds 100 > maxSeconds 10"
        );
        assert_eq!(
            err(r#"{"routes":[{"match":{"prefix":"/a"},"onDuplicate":{"action":"ignore"}}]}"#),
            "routes[0].onDuplicate.action: must be one of replay, reject, acknowledge; got \"ignore\""
        );
        assert!(err(r#"{"routes":[{"match":{"prefix":"/a"},"bogus":1}]}"#)
            .starts_with("routes[0].bogus: unknown field"));
        assert!(err(r#"{"routes":[{"match":{"prefx":"/a"}}]}"#)
            .starts_with("routes[0].match.prefx: unknown field"));
        assert_eq!(
            err(r#"{"routes":[{"name":"x"}]}"#),
            "routes[0].match: is required"
        );
        assert_eq!(
            err(r#"{"fingerprint":{"excludePointers":["/ts"]}}"#),
            "fingerprint.excludePointers: needs fingerprint.body \"canonicalJson\""
        );
        assert!(
            err(r#"{"errors":{"format":"envelope","envelope":{"e":"{{nope}}"}}}"#)
                .starts_with("errors.envelope.e: unknown placeholder {{nope}}")
        );
        assert!(err(r#"{"errors":{"codes":{"oops":"x"}}}"#)
            .starts_with("errors.codes.oops: unknown error kind"));
        assert!(
            err(r#"{"key":{"sources":[{"header":"a","jsonPointer":"/b"}]}}"#)
                .starts_with("key.sources[0]: must set exactly one")
        );
        assert!(err(r#"{"key":{"sources":[{"route":true}]}}"#)
            .starts_with("key.sources[0].route: is only valid"));
        assert!(err(r#"{"onConcurrent":{"action":"wait"}}"#)
            .starts_with("onConcurrent.waitMillis: must be set"));
    }

    #[test]
    fn duplicate_fields_are_refused_naming_the_path() {
        assert_eq!(
            err(r#"{"ttlSeconds": 10, "ttlSeconds": 20}"#),
            "ttlSeconds: duplicate field `ttlSeconds`"
        );
        assert_eq!(
            err(r#"{"key": {"header": "a", "header": "b"}}"#),
            "key.header: duplicate field `header`"
        );
        assert_eq!(
            err(r#"{"routes": [{"match": {"prefix": "/a"}, "name": "x", "name": "y"}]}"#),
            "routes[0].name: duplicate field `name`"
        );
        assert_eq!(
            err(r#"{"errors": {"codes": {"conflict": "a", "conflict": "b"}}}"#),
            "errors.codes.conflict: duplicate field `conflict`"
        );
        assert_eq!(
            err(r#"{"errors": {"format": "envelope", "envelope": {"e": {"x": 1, "x": 2}}}}"#),
            "errors.envelope.e.x: duplicate field `x`"
        );
    }

    #[test]
    fn type_errors_name_what_was_found() {
        for (json, want) in [
            (r#"{"ttlSeconds": "x"}"#, "ttlSeconds: invalid type: string \"x\", expected u64"),
            (r#"{"ttlSeconds": -1}"#, "ttlSeconds: invalid value: integer `-1`, expected u64"),
            (r#"{"ttlSeconds": 1.5}"#, "ttlSeconds: invalid type: floating point `1.5`, expected u64"),
            (r#"{"ttlSeconds": 18446744073709551616}"#, "ttlSeconds: invalid value: integer `18446744073709551616`, expected u64"),
            (r#"{"methods": "POST"}"#, "methods: invalid type: string \"POST\", expected a sequence"),
            (r#"{"methods": [null]}"#, "methods[0]: invalid type: null, expected a string"),
            (r#"{"key": []}"#, "key: invalid type: sequence, expected a map"),
            (r#"{"key": {"required": "yes"}}"#, "key.required: invalid type: string \"yes\", expected a boolean"),
            (r#"{"key": {"sources": [{"composite": [{"header": 5}]}]}}"#, "key.sources[0].composite[0].header: invalid type: integer `5`, expected a string"),
            (r#"{"errors": {"codes": {"conflict": true}}}"#, "errors.codes.conflict: invalid type: boolean `true`, expected a string"),
            (r#"{"response": {"storeStatuses": [{}]}}"#, "response.storeStatuses[0]: data did not match any variant: must be a status code or a string, got map"),
            (r#"{"routes": [{"match": []}]}"#, "routes[0].match: invalid type: sequence, expected a map"),
        ] {
            assert_eq!(err(json), want, "{json}");
        }
        assert!(err(r#"{"bogus": 1}"#)
            .starts_with("bogus: unknown field `bogus`, expected one of `methods`, `key`,"));
        assert_eq!(err("[1,]"), "$: trailing comma at line 1 column 4");
    }

    #[test]
    fn null_counts_as_absent() {
        let c = Config::from_json(
            r#"{"ttlSeconds": null, "key": null, "store": null, "correlation": null,
                "onDuplicate": {"body": null, "action": null}, "errors": {"envelope": null}}"#,
        )
        .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn every_block_accepts_each_of_its_fields() {
        // Each field name listed in a block's reader gets past the unknown-field check: the
        // value `{"?": 1}` is wrong for every field, so the error must name the field itself
        // (or something inside it), never refuse it as unknown.
        let blocks: &[(&str, &[&str])] = &[
            (
                "",
                &[
                    "methods",
                    "key",
                    "fingerprint",
                    "ttlSeconds",
                    "leaseSeconds",
                    "expiry",
                    "maxBodyBytes",
                    "maxResponseBytes",
                    "onMismatch",
                    "onDuplicate",
                    "onConcurrent",
                    "response",
                    "scope",
                    "rateLimit",
                ],
            ),
            (
                "key",
                &[
                    "header",
                    "sources",
                    "deriveFromBody",
                    "required",
                    "maxLength",
                ],
            ),
            (
                "fingerprint",
                &[
                    "method",
                    "path",
                    "query",
                    "headers",
                    "body",
                    "excludePointers",
                    "algorithm",
                ],
            ),
            ("expiry", &["header", "minSeconds", "maxSeconds"]),
            (
                "onMismatch",
                &[
                    "action",
                    "status",
                    "code",
                    "message",
                    "retryAfterSeconds",
                    "waitMillis",
                ],
            ),
            (
                "response",
                &[
                    "storeStatuses",
                    "neverStoreStatuses",
                    "storeHeaders",
                    "replayHeader",
                ],
            ),
            ("scope", &["credentialHeaders"]),
            ("errors", &["format", "contentType", "codes", "messages"]),
            ("store", &["capacity", "probes", "namespace", "etcd"]),
            ("correlation", &["header", "generate"]),
            (
                "rateLimit",
                &[
                    "rate",
                    "periodSeconds",
                    "burst",
                    "callerHeaders",
                    "perRoute",
                    "resetFormat",
                    "onContention",
                    "chargeReplays",
                    "capacity",
                    "probes",
                    "status",
                ],
            ),
        ];
        for (block, fields) in blocks {
            for field in *fields {
                let inner = format!(r#"{{"{field}": [[]]}}"#);
                let json = if block.is_empty() {
                    inner
                } else {
                    format!(r#"{{"{block}": {inner}}}"#)
                };
                let e = err(&json);
                let path = if block.is_empty() {
                    field.to_string()
                } else {
                    format!("{block}.{field}")
                };
                assert!(
                    e.starts_with(&path) && !e.contains("unknown field"),
                    "{json}: {e}"
                );
            }
        }
    }

    #[test]
    fn lease_defaults_within_ttl_and_route_names_are_unique() {
        assert_eq!(
            Config::from_json(r#"{"ttlSeconds": 10}"#)
                .unwrap()
                .default_rule
                .lease_ms,
            10_000
        );
        assert_eq!(
            err(
                r#"{"routes":[{"name":"a","match":{"prefix":"/a"}},{"name":"a","match":{"prefix":"/b"}}]}"#
            ),
            "routes[1].name: must be unique and not \"default\", got \"a\""
        );
        assert!(err(
            r#"{"rateLimit":{"rate":1,"capacity":10},"routes":[{"name":"a","match":{"prefix":"/a"},"rateLimit":{"rate":1,"capacity":20}}]}"#
        )
        .starts_with("routes[0].rateLimit: capacity and probes must match"));
    }

    #[test]
    fn status_specs() {
        let r = Config::from_json(r#"{"response":{"storeStatuses":["2xx", 404, "500-503"], "neverStoreStatuses":["all"]}}"#).unwrap().default_rule;
        assert!(!r.stores_status(200));
        let r =
            Config::from_json(r#"{"response":{"storeStatuses":["all"], "neverStoreStatuses":[]}}"#)
                .unwrap()
                .default_rule;
        assert!(r.stores_status(500) && r.stores_status(429));
        let r = Config::from_json(r#"{"response":{"storeStatuses":["2xx", 404, "500-503"]}}"#)
            .unwrap()
            .default_rule;
        assert!(r.stores_status(204) && r.stores_status(404) && r.stores_status(502));
        assert!(!r.stores_status(400) && !r.stores_status(504));
    }

    #[test]
    fn routes_inherit_and_match_in_order() {
        let c = Config::from_json(
            r#"{"ttlSeconds": 100, "onDuplicate": {"action": "reject", "code": "dup"},
                "routes": [
                  {"name": "orders", "match": {"exact": "/orders", "methods": ["POST"]}, "key": {"sources": [{"jsonPointer": "/orderId"}]}},
                  {"name": "hooks", "match": {"prefix": "/webhooks/"}, "onDuplicate": {"action": "acknowledge"}, "ttlSeconds": 50}
                ]}"#,
        )
        .unwrap();
        let orders = c.rule_for("POST", "/orders?x=1").unwrap();
        assert_eq!(orders.name, "orders");
        assert_eq!(orders.ttl_ms, 100_000);
        assert_eq!(orders.on_duplicate.action, DuplicateAction::Reject);
        assert_eq!(orders.on_duplicate.code.as_deref(), Some("dup"));
        assert_eq!(c.rule_for("PATCH", "/orders").unwrap().name, "default");
        let hooks = c.rule_for("POST", "/webhooks/email").unwrap();
        assert_eq!(hooks.name, "hooks");
        assert_eq!(hooks.ttl_ms, 50_000);
        assert_eq!(hooks.on_duplicate.action, DuplicateAction::Acknowledge);
        assert_eq!(hooks.on_duplicate.status, 200);
        assert_eq!(c.rule_for("POST", "/other").unwrap().name, "default");
        assert_eq!(c.rule_at(c.rule_index(hooks)).name, "hooks");
    }

    #[test]
    fn store_etcd_block() {
        assert_eq!(Config::default().store_etcd, None);
        let c = Config::from_json(r#"{"store": {"etcd": {}}}"#).unwrap();
        let e = c.store_etcd.unwrap();
        assert_eq!(e.cluster, "etcd");
        assert_eq!(e.prefix, "/idemgate/");
        assert_eq!(e.authority, "etcd");
        assert_eq!(e.timeout_ms, 500);
        assert_eq!(e.retries, 2);
        assert_eq!(e.fail_policy, FailPolicy::Closed);
        assert_eq!(e.lease_bucket_ms, 60_000);
        assert_eq!(e.max_value_bytes, 1_000_000);
        let c = Config::from_json(
            r#"{"store": {"namespace": "n", "etcd": {"cluster": "kv", "prefix": "/a/b/", "timeoutMillis": 250,
                "retries": 0, "failPolicy": "open", "leaseBucketSeconds": 6, "maxValueBytes": 4096, "authority": "etcd.local"}}}"#,
        )
        .unwrap();
        let e = c.store_etcd.unwrap();
        assert_eq!(
            (e.cluster.as_str(), e.prefix.as_str(), e.authority.as_str()),
            ("kv", "/a/b/", "etcd.local")
        );
        assert_eq!(
            (
                e.timeout_ms,
                e.retries,
                e.lease_bucket_ms,
                e.max_value_bytes
            ),
            (250, 0, 6_000, 4096)
        );
        assert_eq!(e.fail_policy, FailPolicy::Open);
        let err = |json: &str| Config::from_json(json).unwrap_err().to_string();
        assert_eq!(
            err(r#"{"store": {"etcd": {"failPolicy": "maybe"}}}"#),
            "store.etcd.failPolicy: must be \"closed\" or \"open\", got \"maybe\""
        );
        assert_eq!(
            err(r#"{"store": {"etcd": {"timeoutMillis": 0}}}"#),
            "store.etcd.timeoutMillis: must be 10..=60000, got 0"
        );
        assert_eq!(
            err(r#"{"store": {"etcd": {"prefix": "idemgate"}}}"#),
            "store.etcd.prefix: must start and end with \"/\", got \"idemgate\""
        );
        assert_eq!(
            err(r#"{"store": {"etcd": {"maxValueBytes": 2000000}}}"#),
            "store.etcd.maxValueBytes: must be 1024..=1100000, got 2000000"
        );
        assert_eq!(
            err(r#"{"store": {"etcd": {"leaseBucketSeconds": 1}}}"#),
            "store.etcd.leaseBucketSeconds: must be 2..=86400, got 1"
        );
        assert!(err(r#"{"store": {"etcd": {"clustr": "x"}}}"#)
            .starts_with("store.etcd.clustr: unknown field"));
        assert!(err(r#"{"store": {"etcd": {"cluster": ""}}}"#)
            .starts_with("store.etcd.cluster: must be 1..=255"));
    }
}
