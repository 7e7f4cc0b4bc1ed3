//! The decisions: [`admit`] at header time, [`resolve`] once the body is in, [`decide`] once
//! the stored record for the key is known.
//!
//! All three are pure functions of the configuration, the request, the stored record and
//! the current time, so every host decides alike.
//!
//! ```
//! use idemgate_core::{admit, decide, resolve, Admission, Config, Decision, Resolution};
//! use idemgate_core::decision::Request;
//! let config = Config::default();
//! let headers = vec![("idempotency-key".to_string(), b"order-42".to_vec())];
//! let Admission::Inspect(pending) = admit(&config, "POST", "/orders", &headers) else { unreachable!() };
//! let Resolution::Ready(resolved) = resolve(&config, &pending, br#"{"amount": 10}"#) else { unreachable!() };
//! let rule = config.rule_at(pending.rule);
//! let req = Request { fingerprint: resolved.fingerprint, owner: 42, expires_in_ms: resolved.expires_in_ms };
//! match decide(rule, &req, None, 1_000) {
//!     Decision::Forward { claim, .. } => assert_eq!(claim.lease_until, 1_000 + rule.lease_ms),
//!     other => unreachable!("{other:?}"),
//! }
//! ```

use crate::sha256::Sha256;

use crate::clock::Millis;
use crate::config::{
    BodyMode, ConcurrentAction, Config, DuplicateAction, HashAlgorithm, KeySource, MismatchAction,
    Rule,
};
use crate::fingerprint::Fingerprint;
use crate::headers::HeaderLookup;
use crate::key::{parse_key, put, validate_text, Absorb, KeyError, KeyId};
use crate::record::{Record, StoredResponse};
use crate::request::body::{self, BodyError, Json};
use crate::request::canonical::{canonical_bytes, key_text};
use crate::request::path::normalize;

/// Why a request is answered locally instead of being forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A key is required and no source yielded one (400).
    MissingKey {
        /// Where a key is looked for.
        sources: String,
    },
    /// The key is malformed (400).
    MalformedKey {
        /// Where it came from.
        source: String,
        /// What is wrong.
        reason: KeyError,
    },
    /// The body must be JSON here and is not (400).
    InvalidBody {
        /// What is wrong.
        detail: String,
    },
    /// The per-request expiry header is invalid or out of bounds (400).
    InvalidExpiry {
        /// The header.
        header: String,
        /// What is wrong.
        detail: String,
    },
    /// The body is larger than `maxBodyBytes` (413).
    BodyTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// A request with the same key is still in flight (409, `Retry-After`).
    Conflict {
        /// Seconds to wait before retrying.
        retry_after_s: u64,
    },
    /// The key was used before with a different request (422 by default).
    Mismatch,
    /// The key was used before with this request, and the rule rejects or acknowledges
    /// duplicates instead of replaying.
    Duplicate,
    /// The store cannot take the claim now (503, `Retry-After`).
    StoreUnavailable {
        /// Seconds to wait before retrying.
        retry_after_s: u64,
        /// Operator-facing reason.
        reason: &'static str,
    },
    /// The host is set up wrongly (500).
    Misconfigured {
        /// What is wrong.
        detail: String,
    },
    /// The caller is over its rate limit (429 by default, `Retry-After`).
    RateLimited {
        /// Seconds until a request would be admitted.
        retry_after_s: u64,
    },
}

impl Rejection {
    /// The error kind, as named in `errors.codes`.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::MissingKey { .. } => "missingKey",
            Rejection::MalformedKey { .. } => "malformedKey",
            Rejection::InvalidBody { .. } => "invalidBody",
            Rejection::InvalidExpiry { .. } => "invalidExpiry",
            Rejection::BodyTooLarge { .. } => "bodyTooLarge",
            Rejection::Conflict { .. } => "conflict",
            Rejection::Mismatch => "mismatch",
            Rejection::Duplicate => "duplicate",
            Rejection::StoreUnavailable { .. } => "storeUnavailable",
            Rejection::Misconfigured { .. } => "misconfigured",
            Rejection::RateLimited { .. } => "rateLimited",
        }
    }

    /// The counter this rejection increments: `idemgate_<counter>` in Envoy, the `outcome`
    /// of the edge worker's log line. One name per kind, shared so that both hosts count
    /// a refusal alike.
    pub fn counter(&self) -> &'static str {
        match self {
            Rejection::MissingKey { .. } => "missing_keys",
            Rejection::MalformedKey { .. } => "bad_keys",
            Rejection::InvalidBody { .. } => "invalid_bodies",
            Rejection::InvalidExpiry { .. } => "invalid_expiries",
            Rejection::BodyTooLarge { .. } => "too_large",
            Rejection::Conflict { .. } => "conflicts",
            Rejection::Mismatch => "mismatches",
            Rejection::Duplicate => "duplicates",
            Rejection::StoreUnavailable { .. } => "store_unavailable",
            Rejection::Misconfigured { .. } => "misconfigured",
            Rejection::RateLimited { .. } => "rate_limited",
        }
    }
}

/// What header-time inspection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Not covered (no rule, method not listed, or no key and none required): forward
    /// untouched.
    Pass,
    /// Answer locally at once.
    Reject(Rejection),
    /// Covered: read the body, then [`resolve`].
    Inspect(Pending),
}

/// A covered request waiting for its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Index of the rule ([`Config::rule_at`]).
    pub rule: usize,
    /// The method.
    pub method: String,
    /// Path with query, the path normalized ([`crate::request::path`]).
    pub path: String,
    /// The request headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Per-request expiry from the expiry header, validated.
    pub expires_in_ms: Option<u64>,
    /// The key from headers alone, when the rule reads it there.
    header_key: Option<String>,
}

impl Pending {
    /// The key found in the headers, if the rule reads it there.
    pub fn header_key(&self) -> Option<&str> {
        self.header_key.as_deref()
    }
}

/// Looks at a request's method, path and headers.
pub fn admit(
    config: &Config,
    method: &str,
    path_with_query: &str,
    headers: &[(String, Vec<u8>)],
) -> Admission {
    // one view of the path for matching, scoping and fingerprinting (request::path)
    let normalized = normalize(path_with_query);
    let path_with_query = normalized.as_ref();
    let Some(rule) = config.rule_for(method, path_with_query) else {
        return Admission::Pass;
    };
    if let Some(len) = content_length(headers) {
        if len > rule.max_body_bytes {
            return Admission::Reject(Rejection::BodyTooLarge {
                limit: rule.max_body_bytes,
            });
        }
    }
    let route = route_of(path_with_query);
    let mut header_key = None;
    if rule.key_from_headers() {
        match first_key(rule, route, headers, None) {
            Ok(Some(k)) => header_key = Some(k),
            Ok(None) if rule.key_required => {
                return Admission::Reject(Rejection::MissingKey {
                    sources: describe_sources(rule),
                })
            }
            Ok(None) => return Admission::Pass,
            Err(r) => return Admission::Reject(r),
        }
    }
    let expires_in_ms = match expiry(rule, headers) {
        Ok(e) => e,
        Err(r) => return Admission::Reject(r),
    };
    Admission::Inspect(Pending {
        rule: config.rule_index(rule),
        method: method.to_string(),
        path: path_with_query.to_string(),
        headers: headers.to_vec(),
        expires_in_ms,
        header_key,
    })
}

/// A request ready for [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Storage identity of the scoped key.
    pub key_id: KeyId,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// The key as the client sent it (echoed in error envelopes; never stored or logged).
    pub key: String,
    /// Per-request expiry.
    pub expires_in_ms: Option<u64>,
}

/// What body-time resolution found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// No key and none required: forward untouched.
    Pass,
    /// Answer locally.
    Reject(Rejection),
    /// Key and fingerprint known.
    Ready(Resolved),
}

/// Finds the key (from headers, the JSON body or derived from it) and fingerprints the
/// request once its whole body is known.
pub fn resolve(config: &Config, pending: &Pending, body: &[u8]) -> Resolution {
    resolve_body(config, pending, body.len() as u64, body, None)
}

/// The bytes that go before the body in the SHA-256 that is the request's fingerprint, when
/// nothing else of the body is needed: the rule reads the key from the headers (and found
/// it there), fingerprints the raw body with SHA-256, and `body_len` is within its limit.
/// A host with a faster SHA-256 than this code's (a worker's WebCrypto) then computes
/// `SHA-256(head ‖ body)` itself and hands it to [`resolve_hashed`]: the same fingerprint
/// [`resolve`] would compute, without copying the body in. `None`: call [`resolve`].
///
/// ```
/// use idemgate_core::decision::{admit, body_hash_head, resolve, resolve_hashed, Admission};
/// use idemgate_core::{sha256::Sha256, Config, Resolution};
/// let config = Config::default();
/// let headers = vec![("idempotency-key".to_string(), b"k1".to_vec())];
/// let Admission::Inspect(pending) = admit(&config, "POST", "/orders", &headers) else { unreachable!() };
/// let body = b"{\"amount\": 10}";
/// let head = body_hash_head(&config, &pending, body.len() as u64).unwrap();
/// let mut h = Sha256::new();
/// h.update(&head);
/// h.update(body);
/// let hashed = resolve_hashed(&config, &pending, body.len() as u64, h.finalize());
/// let (Some(Resolution::Ready(a)), Resolution::Ready(b)) = (hashed, resolve(&config, &pending, body)) else { unreachable!() };
/// assert_eq!(a, b);
/// ```
pub fn body_hash_head(config: &Config, pending: &Pending, body_len: u64) -> Option<Vec<u8>> {
    let rule = config.rule_at(pending.rule);
    if !hashable_outside(rule, pending, body_len) {
        return None;
    }
    let mut head = FP_DOMAIN_SHA256.to_vec();
    absorb_request(
        &mut head,
        rule,
        &pending.method,
        &pending.path,
        &pending.headers,
    );
    head.push(b'r');
    head.extend_from_slice(&body_len.to_be_bytes());
    Some(head)
}

/// [`resolve`] for a request whose body the host hashed itself: `digest` is
/// `SHA-256(head ‖ body)` with `head` from [`body_hash_head`]. `None` when
/// [`body_hash_head`] would have been `None` (the body itself is needed: call [`resolve`]).
pub fn resolve_hashed(
    config: &Config,
    pending: &Pending,
    body_len: u64,
    digest: [u8; 32],
) -> Option<Resolution> {
    let rule = config.rule_at(pending.rule);
    hashable_outside(rule, pending, body_len).then(|| {
        resolve_body(
            config,
            pending,
            body_len,
            &[],
            Some(Fingerprint(crate::prefix(&digest))),
        )
    })
}

/// Whether a request's fingerprint is `SHA-256(head ‖ body)` and nothing else of its body
/// is needed (see [`body_hash_head`]).
fn hashable_outside(rule: &Rule, pending: &Pending, body_len: u64) -> bool {
    rule.fingerprint.algorithm == HashAlgorithm::Sha256
        && rule.fingerprint.body == BodyMode::Raw
        && !rule.needs_json()
        && pending.header_key.is_some()
        && body_len <= rule.max_body_bytes
}

/// [`resolve`], for a body of `body_len` bytes: `body` itself, or (with `hashed`, the
/// fingerprint computed by the host) nothing of it.
fn resolve_body(
    config: &Config,
    pending: &Pending,
    body_len: u64,
    body: &[u8],
    hashed: Option<Fingerprint>,
) -> Resolution {
    let rule = config.rule_at(pending.rule);
    if body_len > rule.max_body_bytes {
        return Resolution::Reject(Rejection::BodyTooLarge {
            limit: rule.max_body_bytes,
        });
    }
    let (json, error): (Option<Json>, Option<BodyError>) =
        match (rule.needs_json() && !body.is_empty()).then(|| body::parse(body)) {
            Some(Ok(v)) => (Some(v), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
    let needs_json_for_key = rule.key_sources.iter().any(KeySource::needs_body);
    let unreadable = error.is_some();
    let invalid_body = |why: String| {
        let what = match &error {
            Some(e @ BodyError::Duplicate { .. }) => format!(
                "{e}: member names must be unique (RFC 8259 §4, I-JSON), so that every reader sees the same request"
            ),
            Some(BodyError::Syntax(m)) => format!("it is not valid JSON: {m}"),
            None => "it is not valid JSON".to_string(),
        };
        Resolution::Reject(Rejection::InvalidBody {
            detail: format!("the request body must be a JSON document here ({why}); {what}"),
        })
    };
    if unreadable && rule.fingerprint.body == BodyMode::CanonicalJson {
        return invalid_body("the request is fingerprinted as canonical JSON".into());
    }
    let route = route_of(&pending.path);
    let found = match &pending.header_key {
        Some(k) => Ok(Some(k.clone())),
        None => first_key(rule, route, &pending.headers, json.as_ref()),
    };
    let key = match found {
        Ok(Some(k)) => k,
        // The key may be in the body we cannot read.
        Ok(None) if unreadable && (needs_json_for_key || rule.derive_from_body) => {
            return invalid_body(format!(
                "the idempotency key is read from {}",
                describe_sources(rule)
            ));
        }
        Ok(None) if rule.derive_from_body => {
            let canonical = json.as_ref().map_or_else(|| body.to_vec(), canonical_bytes);
            format!("derived:{}", hex::encode(Sha256::digest(&canonical)))
        }
        Ok(None) if rule.key_required => {
            return Resolution::Reject(Rejection::MissingKey {
                sources: describe_sources(rule),
            })
        }
        Ok(None) => return Resolution::Pass,
        Err(r) => return Resolution::Reject(r),
    };
    let fingerprint = match hashed {
        Some(f) => f,
        None => fingerprint(
            rule,
            &pending.method,
            &pending.path,
            &pending.headers,
            body,
            json,
        ),
    };
    let creds: Vec<Vec<u8>> = credentials(rule, &pending.headers);
    let cred_refs: Vec<&[u8]> = creds.iter().map(Vec::as_slice).collect();
    let key_material = if rule.on_mismatch.action == MismatchAction::NewRequest {
        // key + fingerprint identify the request: a changed payload is a new request
        format!("{key}\u{0}{}", hex::encode(fingerprint.0))
    } else {
        key.clone()
    };
    Resolution::Ready(Resolved {
        key_id: KeyId::scoped(&pending.method, route, &cred_refs, &key_material),
        fingerprint,
        key,
        expires_in_ms: pending.expires_in_ms,
    })
}

fn route_of(path_with_query: &str) -> &str {
    path_with_query
        .split_once('?')
        .map_or(path_with_query, |(p, _)| p)
}

fn content_length(headers: &[(String, Vec<u8>)]) -> Option<u64> {
    headers
        .get_all("content-length")
        .first()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
}

fn credentials(rule: &Rule, headers: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    rule.credential_headers
        .iter()
        .map(|h| headers.get_all(h).join(&b","[..]))
        .collect()
}

fn describe_sources(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule.key_sources.iter().map(KeySource::describe).collect();
    if parts.is_empty() {
        parts.push("the body".into());
    }
    parts.join(" or ")
}

/// The first key a source yields. Header keys may be sf-strings; body values are taken as
/// they are (strings, numbers, booleans).
fn first_key(
    rule: &Rule,
    route: &str,
    headers: &[(String, Vec<u8>)],
    json: Option<&Json>,
) -> Result<Option<String>, Rejection> {
    for source in &rule.key_sources {
        if let Some(k) = source_key(rule, source, route, headers, json)? {
            return Ok(Some(k));
        }
    }
    Ok(None)
}

fn source_key(
    rule: &Rule,
    source: &KeySource,
    route: &str,
    headers: &[(String, Vec<u8>)],
    json: Option<&Json>,
) -> Result<Option<String>, Rejection> {
    let malformed = |reason| Rejection::MalformedKey {
        source: source.describe(),
        reason,
    };
    match source {
        KeySource::Header(h) => match headers.get_all(h).as_slice() {
            [] => Ok(None),
            [one] => parse_key(one, rule.key_max_length)
                .map(Some)
                .map_err(malformed),
            _ => Err(malformed(KeyError::Repeated)),
        },
        KeySource::JsonPointer(p) => match json.and_then(|j| j.pointer(p)) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => match key_text(v) {
                Some(text) => validate_text(&text, rule.key_max_length)
                    .map(Some)
                    .map_err(malformed),
                None => Err(malformed(KeyError::NotScalar)),
            },
        },
        KeySource::Route => Ok(Some(route.to_string())),
        KeySource::Caller => {
            let mut h = Sha256::new();
            for c in credentials(rule, headers) {
                put(&mut h, &c);
            }
            Ok(Some(hex::encode(h.finalize())))
        }
        KeySource::Composite(parts) => {
            // Length-prefixed join: ("ab","c") and ("a","bc") never meet.
            let mut joined = String::from("composite");
            for part in parts {
                match source_key(rule, part, route, headers, json)? {
                    Some(text) => {
                        joined.push('|');
                        joined.push_str(&text.len().to_string());
                        joined.push(':');
                        joined.push_str(&text);
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some(joined))
        }
    }
}

fn expiry(rule: &Rule, headers: &[(String, Vec<u8>)]) -> Result<Option<u64>, Rejection> {
    let Some(spec) = &rule.expiry else {
        return Ok(None);
    };
    let values = headers.get_all(&spec.header);
    let Some(raw) = values.first() else {
        return Ok(None);
    };
    let invalid = |detail: String| Rejection::InvalidExpiry {
        header: spec.header.clone(),
        detail,
    };
    let text = std::str::from_utf8(raw)
        .map_err(|_| invalid("it is not ASCII".into()))?
        .trim();
    let secs: u64 = text.parse().map_err(|_| {
        invalid(format!(
            "it must be a whole number of seconds, got {text:?}"
        ))
    })?;
    if secs < spec.min_s || secs > spec.max_s {
        return Err(invalid(format!(
            "it must be between {} and {} seconds, got {secs}",
            spec.min_s, spec.max_s
        )));
    }
    Ok(Some(secs.saturating_mul(1000)))
}

/// The domain string that starts every SHA-256 fingerprint (version 2 of what is hashed).
const FP_DOMAIN_SHA256: &[u8] = b"idemgate/fp/v2\0";

/// The hash of a fingerprint, by `fingerprint.algorithm`. The domain string differs per
/// algorithm (and per version of what is hashed), so no two ever compare equal.
// Short-lived, on the stack, one per request: no need to box the larger BLAKE3 state.
#[allow(clippy::large_enum_variant)]
enum FpHash {
    Sha256(Sha256),
    #[cfg(feature = "blake3")]
    Blake3(blake3::Hasher),
}

impl FpHash {
    fn new(algorithm: HashAlgorithm) -> Self {
        match algorithm {
            #[cfg(feature = "blake3")]
            HashAlgorithm::Blake3 => {
                let mut h = blake3::Hasher::new();
                h.update(b"idemgate/fp/v3-blake3\0");
                Self::Blake3(h)
            }
            // Without the feature the configuration refuses blake3.
            _ => {
                let mut h = Sha256::new();
                h.update(FP_DOMAIN_SHA256);
                Self::Sha256(h)
            }
        }
    }

    fn finalize(self) -> [u8; 32] {
        match self {
            Self::Sha256(h) => h.finalize(),
            #[cfg(feature = "blake3")]
            Self::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

impl Absorb for FpHash {
    fn absorb(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            #[cfg(feature = "blake3")]
            Self::Blake3(h) => {
                h.update(data);
            }
        }
    }
}

/// The parts of a fingerprint before the body: method, path, query and headers, each
/// flagged by whether the rule counts it.
fn absorb_request(
    a: &mut impl Absorb,
    rule: &Rule,
    method: &str,
    path_with_query: &str,
    headers: &[(String, Vec<u8>)],
) {
    let spec = &rule.fingerprint;
    let (path, query) = path_with_query
        .split_once('?')
        .unwrap_or((path_with_query, ""));
    a.absorb(&[u8::from(spec.method)]);
    if spec.method {
        put(a, method.to_ascii_uppercase().as_bytes());
    }
    a.absorb(&[u8::from(spec.path)]);
    if spec.path {
        put(a, path.as_bytes());
    }
    a.absorb(&[u8::from(spec.query)]);
    if spec.query {
        put(a, query.as_bytes());
    }
    a.absorb(&(spec.headers.len() as u64).to_be_bytes());
    for name in &spec.headers {
        put(a, name.as_bytes());
        put(a, &headers.get_all(name).join(&b","[..]));
    }
}

/// The fingerprint of a request under `rule`'s fingerprint spec.
pub fn fingerprint(
    rule: &Rule,
    method: &str,
    path_with_query: &str,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    json: Option<Json>,
) -> Fingerprint {
    let spec = &rule.fingerprint;
    let mut h = FpHash::new(spec.algorithm);
    absorb_request(&mut h, rule, method, path_with_query, headers);
    match spec.body {
        BodyMode::None => h.absorb(b"n"),
        BodyMode::Raw => {
            h.absorb(b"r");
            put(&mut h, body);
        }
        BodyMode::CanonicalJson => {
            h.absorb(b"c");
            match json {
                Some(mut v) => {
                    spec.exclusions.remove_from(&mut v);
                    put(&mut h, &canonical_bytes(&v));
                }
                None => put(&mut h, body),
            }
        }
    }
    Fingerprint(crate::prefix(&h.finalize()))
}

/// The request as `decide` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// A fresh random token identifying this attempt if it claims the key.
    pub owner: u64,
    /// Per-request expiry (from the expiry header), fixed at first use.
    pub expires_in_ms: Option<u64>,
}

/// A claim to write before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Token of the claim's holder.
    pub owner: u64,
    /// When the claim lapses.
    pub lease_until: Millis,
    /// When the key expires.
    pub expires_at: Millis,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
}

impl Claim {
    /// The in-flight record for this claim.
    pub fn record(&self) -> Record {
        Record::InFlight {
            owner: self.owner,
            lease_until: self.lease_until,
            expires_at: self.expires_at,
            fingerprint: self.fingerprint,
        }
    }
}

/// What to do with a covered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Claim the key and forward; `lease_expired` when a lapsed claim is taken over.
    Forward {
        /// The claim to write atomically.
        claim: Claim,
        /// An earlier claim's lease had lapsed.
        lease_expired: bool,
    },
    /// Answer with the stored response.
    Replay(StoredResponse),
    /// The key is in flight and the rule says wait: poll again until `deadline`, then
    /// answer 409.
    Wait {
        /// Give up at this time.
        deadline: Millis,
    },
    /// Answer with an error (or an acknowledgement, for duplicates).
    Reject(Rejection),
}

/// Decides for a covered request given the record stored for its key (if any) at `now`.
/// `wait_deadline` is `Some` while a waiting request polls again; past it, a request still
/// in flight is answered 409.
pub fn decide(rule: &Rule, request: &Request, existing: Option<&Record>, now: Millis) -> Decision {
    decide_waiting(rule, request, existing, now, None)
}

/// [`decide`] for a request that is already waiting until `wait_deadline`.
pub fn decide_waiting(
    rule: &Rule,
    request: &Request,
    existing: Option<&Record>,
    now: Millis,
    wait_deadline: Option<Millis>,
) -> Decision {
    let forward = |lease_expired| Decision::Forward {
        claim: Claim {
            owner: request.owner,
            lease_until: now.saturating_add(rule.lease_ms),
            expires_at: now.saturating_add(request.expires_in_ms.unwrap_or(rule.ttl_ms)),
            fingerprint: request.fingerprint,
        },
        lease_expired,
    };
    match existing {
        None => forward(false),
        // A request in flight holds its key until its lease lapses, even when a short
        // per-request expiry has passed: the first outcome is not known yet.
        Some(Record::InFlight { lease_until, .. }) => {
            if *lease_until <= now {
                forward(true)
            } else if rule.on_concurrent.action == ConcurrentAction::Wait {
                let deadline =
                    wait_deadline.unwrap_or_else(|| now.saturating_add(rule.on_concurrent.wait_ms));
                if now < deadline {
                    Decision::Wait { deadline }
                } else {
                    Decision::Reject(Rejection::Conflict {
                        retry_after_s: rule.on_concurrent.retry_after_s,
                    })
                }
            } else {
                Decision::Reject(Rejection::Conflict {
                    retry_after_s: rule.on_concurrent.retry_after_s,
                })
            }
        }
        Some(Record::Completed {
            expires_at,
            fingerprint,
            response,
            ..
        }) => {
            if *expires_at <= now {
                forward(false)
            } else if *fingerprint != request.fingerprint {
                match rule.on_mismatch.action {
                    MismatchAction::Replay => Decision::Replay(response.clone()),
                    MismatchAction::Reject | MismatchAction::NewRequest => {
                        Decision::Reject(Rejection::Mismatch)
                    }
                }
            } else {
                match rule.on_duplicate.action {
                    DuplicateAction::Replay => Decision::Replay(response.clone()),
                    DuplicateAction::Reject | DuplicateAction::Acknowledge => {
                        Decision::Reject(Rejection::Duplicate)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn cfg(json: &str) -> Config {
        Config::from_json(json).unwrap()
    }

    fn ready(
        c: &Config,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resolved {
        match admit(c, method, path, &h(headers)) {
            Admission::Inspect(p) => match resolve(c, &p, body) {
                Resolution::Ready(r) => r,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    /// A fingerprint computed by this version for a fixed request. Stored records hold
    /// fingerprints: a change of what is hashed (or how) must be a new domain version, never
    /// a silent change, or retries spanning an upgrade would be refused as reused keys.
    #[test]
    fn fingerprint_definition_is_stable() {
        let c = cfg(r#"{"fingerprint":{"headers":["x-tenant"]}}"#);
        let headers = h(&[("x-tenant", "acme"), ("x-tenant", "b")]);
        let f = fingerprint(
            c.rule_at(0),
            "post",
            "/orders?x=1",
            &headers,
            br#"{"amount":10}"#,
            None,
        );
        assert_eq!(
            hex::encode(f.0),
            "d4daaa67360293d005fe74625b2cfb7594b9c18afbacf7c9c9fda4245ff5e0b3"
        );
    }

    fn pending(c: &Config, path: &str, headers: &[(&str, &str)]) -> Pending {
        match admit(c, "POST", path, &h(headers)) {
            Admission::Inspect(p) => p,
            other => panic!("{other:?}"),
        }
    }

    fn sha256(parts: &[&[u8]]) -> [u8; 32] {
        let mut s = Sha256::new();
        for p in parts {
            s.update(p);
        }
        s.finalize()
    }

    proptest::proptest! {
        /// SHA-256(head ‖ body) handed to resolve_hashed resolves exactly as resolve does
        /// with the body, whatever the fingerprint's parts and the body.
        #[test]
        fn hashed_outside_resolves_as_resolve(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            method_on in proptest::prelude::any::<bool>(),
            query_on in proptest::prelude::any::<bool>(),
            tenant in "[a-z]{0,8}",
            query in "[a-z=&]{0,12}",
        ) {
            let c = cfg(&format!(
                r#"{{"fingerprint":{{"method":{method_on},"query":{query_on},"headers":["x-tenant"]}}}}"#
            ));
            let path = format!("/orders?{query}");
            let p = pending(&c, &path, &[("idempotency-key", "k"), ("x-tenant", &tenant)]);
            let len = body.len() as u64;
            let head = body_hash_head(&c, &p, len).unwrap();
            let hashed = resolve_hashed(&c, &p, len, sha256(&[&head, &body])).unwrap();
            proptest::prop_assert_eq!(hashed, resolve(&c, &p, &body));
        }
    }

    #[test]
    fn hashed_outside_only_when_the_body_is_not_needed() {
        let key = [("idempotency-key", "k")];
        let digest = [0u8; 32];
        let cases = [
            // the fingerprint reads the body as JSON
            (r#"{"fingerprint":{"body":"canonicalJson"}}"#, &key[..]),
            // the key is in the body, or derived from it
            (r#"{"key":{"sources":[{"jsonPointer":"/id"}]}}"#, &key[..]),
            (r#"{"key":{"sources":[],"deriveFromBody":true}}"#, &[][..]),
        ];
        for (json, headers) in cases {
            let c = cfg(json);
            let Admission::Inspect(p) = admit(&c, "POST", "/o", &h(headers)) else {
                panic!("{json}: not inspected");
            };
            assert_eq!(body_hash_head(&c, &p, 10), None, "{json}");
            assert_eq!(resolve_hashed(&c, &p, 10, digest), None, "{json}");
        }
        // over the rule's body limit: resolve answers 413
        let c = cfg(r#"{"maxBodyBytes": 100}"#);
        let p = pending(&c, "/o", &key);
        assert!(body_hash_head(&c, &p, 100).is_some());
        assert_eq!(body_hash_head(&c, &p, 101), None);
        assert_eq!(resolve_hashed(&c, &p, 101, digest), None);
        #[cfg(feature = "blake3")]
        {
            let c = cfg(r#"{"fingerprint":{"algorithm":"blake3"}}"#);
            let p = pending(&c, "/o", &key);
            assert_eq!(body_hash_head(&c, &p, 10), None, "blake3 is not SHA-256");
        }
        // "none" fingerprints no body: nothing to hash outside either
        let c = cfg(r#"{"fingerprint":{"body":"none"}}"#);
        let p = pending(&c, "/o", &key);
        assert_eq!(body_hash_head(&c, &p, 10), None);
    }

    #[test]
    fn admission() {
        let c = Config::default();
        assert_eq!(
            admit(&c, "GET", "/x", &h(&[("idempotency-key", "a")])),
            Admission::Pass
        );
        assert_eq!(admit(&c, "POST", "/x", &h(&[])), Admission::Pass);
        assert!(matches!(
            admit(&c, "POST", "/x", &h(&[("Idempotency-Key", "a")])),
            Admission::Inspect(_)
        ));
        assert!(matches!(
            admit(
                &c,
                "POST",
                "/x",
                &h(&[("idempotency-key", "a"), ("idempotency-key", "b")])
            ),
            Admission::Reject(Rejection::MalformedKey {
                reason: KeyError::Repeated,
                ..
            })
        ));
        assert!(matches!(
            admit(&c, "POST", "/x", &h(&[("idempotency-key", "")])),
            Admission::Reject(Rejection::MalformedKey {
                reason: KeyError::Empty,
                ..
            })
        ));
        assert!(matches!(
            admit(
                &c,
                "POST",
                "/x",
                &h(&[("idempotency-key", "a"), ("content-length", "2000000")])
            ),
            Admission::Reject(Rejection::BodyTooLarge { limit: 1_048_576 })
        ));
        let req = cfg(r#"{"key":{"required":true}}"#);
        assert!(matches!(
            admit(&req, "PATCH", "/x", &h(&[])),
            Admission::Reject(Rejection::MissingKey { .. })
        ));
    }

    #[test]
    fn scope_ignores_query_but_not_credentials() {
        let c = Config::default();
        let id = |path: &str, auth: &str| {
            ready(
                &c,
                "POST",
                path,
                &[("idempotency-key", "k"), ("authorization", auth)],
                b"",
            )
            .key_id
        };
        assert_eq!(id("/a?x=1", "t"), id("/a?x=2", "t"));
        assert_ne!(id("/a", "t"), id("/a", "u"));
        assert_ne!(id("/a", "t"), id("/b", "t"));
    }

    #[test]
    fn repeated_members_are_refused_naming_the_member() {
        for json in [
            r#"{"key": {"sources": [{"jsonPointer": "/id"}]}}"#,
            r#"{"fingerprint": {"body": "canonicalJson"}}"#,
            r#"{"key": {"deriveFromBody": true, "sources": []}}"#,
        ] {
            let c = cfg(json);
            let p = pending(&c, "/o", &[("idempotency-key", "k")]);
            match resolve(&c, &p, br#"{"id": "A", "n": {"x": 1, "x": 2}, "id": "B"}"#) {
                Resolution::Reject(Rejection::InvalidBody { detail }) => {
                    assert!(detail.contains("appears twice"), "{json}: {detail}");
                    assert!(
                        detail.contains("\"x\"") || detail.contains("\"id\""),
                        "{detail}"
                    );
                }
                other => panic!("{json}: {other:?}"),
            }
        }
        // a raw fingerprint with the key in a header does not read the body
        let c = cfg("{}");
        let p = pending(&c, "/o", &[("idempotency-key", "k")]);
        assert!(matches!(
            resolve(&c, &p, br#"{"a":1,"a":2}"#),
            Resolution::Ready(_)
        ));
    }

    #[test]
    fn spellings_of_a_path_share_route_scope_and_fingerprint() {
        let c = cfg(
            r#"{"routes": [{"name": "orders", "match": {"prefix": "/orders"}, "ttlSeconds": 5}]}"#,
        );
        let headers = [("idempotency-key", "k")];
        let base = ready(&c, "POST", "/orders?x=1", &headers, b"b");
        for spelling in [
            "/%6Frders?x=1",
            "//orders?x=1",
            "/a/../orders?x=1",
            "/./orders?x=1",
        ] {
            let p = pending(&c, spelling, &headers);
            assert_eq!(c.rule_at(p.rule).name, "orders", "{spelling}");
            assert_eq!(p.path, "/orders?x=1");
            assert_eq!(
                ready(&c, "POST", spelling, &headers, b"b"),
                base,
                "{spelling}"
            );
        }
        assert_eq!(
            c.rule_for("POST", "/orders-admin").map(|r| r.name.as_str()),
            Some("default")
        );
        // the query is not normalized
        let q = ready(&c, "POST", "/orders?x=%31", &headers, b"b");
        assert_ne!(q.fingerprint, base.fingerprint);
    }

    #[test]
    fn json_pointer_and_composite_keys() {
        let c = cfg(r#"{"key": {"sources": [
            {"composite": [{"header": "x-tenant"}, {"jsonPointer": "/source"}, {"jsonPointer": "/externalEventId"}]},
            {"jsonPointer": "/idempotency_key"}], "required": true}}"#);
        let a = ready(
            &c,
            "POST",
            "/e",
            &[("x-tenant", "t1")],
            br#"{"source":"ab","externalEventId":"c"}"#,
        );
        let b = ready(
            &c,
            "POST",
            "/e",
            &[("x-tenant", "t1")],
            br#"{"source":"a","externalEventId":"bc"}"#,
        );
        assert_ne!(
            a.key_id, b.key_id,
            "composite parts must not collide by concatenation"
        );
        let a2 = ready(
            &c,
            "POST",
            "/e",
            &[("x-tenant", "t1")],
            br#"{"externalEventId":"c", "source":"ab"}"#,
        );
        assert_eq!(a.key_id, a2.key_id);
        // falls through to the second source when a composite part is missing
        let k = ready(&c, "POST", "/e", &[], br#"{"idempotency_key": 42}"#);
        assert_eq!(k.key, "42");
        // no source: required → 400
        let Admission::Inspect(p) = admit(&c, "POST", "/e", &h(&[])) else {
            panic!()
        };
        assert!(matches!(
            resolve(&c, &p, br#"{"x":1}"#),
            Resolution::Reject(Rejection::MissingKey { .. })
        ));
        // not JSON → 400 invalid body
        assert!(matches!(
            resolve(&c, &p, b"not json"),
            Resolution::Reject(Rejection::InvalidBody { .. })
        ));
        // object as key → malformed
        assert!(matches!(
            resolve(&c, &p, br#"{"idempotency_key": {"a": 1}}"#),
            Resolution::Reject(Rejection::MalformedKey {
                reason: KeyError::NotScalar,
                ..
            })
        ));
    }

    #[test]
    fn fingerprint_algorithms_never_meet() {
        let hk = [("idempotency-key", "k")];
        let sha = cfg("{}");
        assert_eq!(
            sha.rule_at(0).fingerprint.algorithm,
            crate::config::HashAlgorithm::Sha256
        );
        let a = ready(&sha, "POST", "/p", &hk, b"body");
        assert_eq!(
            a.fingerprint,
            ready(&sha, "POST", "/p", &hk, b"body").fingerprint
        );
        #[cfg(feature = "blake3")]
        {
            let b3 = cfg(r#"{"fingerprint": {"algorithm": "blake3"}}"#);
            let b = ready(&b3, "POST", "/p", &hk, b"body");
            assert_ne!(
                a.fingerprint, b.fingerprint,
                "the algorithm is part of the fingerprint"
            );
            assert_eq!(
                b.fingerprint,
                ready(&b3, "POST", "/p", &hk, b"body").fingerprint
            );
            assert_ne!(
                b.fingerprint,
                ready(&b3, "POST", "/p", &hk, b"bodY").fingerprint
            );
            assert_ne!(
                b.fingerprint,
                ready(&b3, "POST", "/q", &hk, b"body").fingerprint
            );
            let long = vec![7u8; 70_000];
            let c = ready(&b3, "POST", "/p", &hk, &long);
            let mut other = long.clone();
            other[69_999] = 8;
            assert_ne!(
                c.fingerprint,
                ready(&b3, "POST", "/p", &hk, &other).fingerprint
            );
        }
    }

    #[test]
    fn canonical_fingerprint_and_exclusions() {
        let c = cfg(r#"{"fingerprint": {"body": "canonicalJson", "excludePointers": ["/ts"]}}"#);
        let hk = [("idempotency-key", "k")];
        let a = ready(&c, "POST", "/p", &hk, br#"{"a":1,"b":[1,2],"ts":5}"#);
        let b = ready(
            &c,
            "POST",
            "/p",
            &hk,
            b"{ \"b\": [1, 2],\n \"a\": 1.0, \"ts\": 99 }",
        );
        assert_eq!(a.fingerprint, b.fingerprint);
        let d = ready(&c, "POST", "/p", &hk, br#"{"a":2,"b":[1,2]}"#);
        assert_ne!(a.fingerprint, d.fingerprint);
        let Admission::Inspect(p) = admit(&c, "POST", "/p", &h(&hk)) else {
            panic!()
        };
        assert!(matches!(
            resolve(&c, &p, b"{bad"),
            Resolution::Reject(Rejection::InvalidBody { .. })
        ));
    }

    #[test]
    fn derived_key_and_new_request_policy() {
        let c = cfg(
            r#"{"key": {"sources": [], "deriveFromBody": true}, "fingerprint": {"body": "canonicalJson"}}"#,
        );
        let a = ready(&c, "POST", "/p", &[], br#"{"a":1,"b":2}"#);
        let b = ready(&c, "POST", "/p", &[], br#"{"b":2,"a":1}"#);
        assert_eq!(a.key_id, b.key_id);
        let n = cfg(r#"{"onMismatch": {"action": "newRequest"}}"#);
        let x = ready(&n, "POST", "/p", &[("idempotency-key", "k")], b"1");
        let y = ready(&n, "POST", "/p", &[("idempotency-key", "k")], b"2");
        assert_ne!(x.key_id, y.key_id);
    }

    #[test]
    fn expiry_header_bounds() {
        let c = cfg(
            r#"{"expiry": {"header": "x-idempotency-expiration", "minSeconds": 60, "maxSeconds": 3600}}"#,
        );
        let r = ready(
            &c,
            "POST",
            "/p",
            &[
                ("idempotency-key", "k"),
                ("x-idempotency-expiration", "120"),
            ],
            b"",
        );
        assert_eq!(r.expires_in_ms, Some(120_000));
        for bad in ["10", "7200", "soon"] {
            assert!(matches!(
                admit(
                    &c,
                    "POST",
                    "/p",
                    &h(&[("idempotency-key", "k"), ("x-idempotency-expiration", bad)])
                ),
                Admission::Reject(Rejection::InvalidExpiry { .. })
            ));
        }
    }

    #[test]
    fn decisions_and_policies() {
        let c = Config::default();
        let rule = &c.default_rule;
        let fp = Fingerprint([1; 32]);
        let req = Request {
            fingerprint: fp,
            owner: 5,
            expires_in_ms: None,
        };
        let now = 10_000;
        let done = Record::Completed {
            owner: 1,
            expires_at: now + 1,
            fingerprint: fp,
            response: StoredResponse {
                status: 201,
                headers: vec![],
                body: b"ok".to_vec(),
            },
        };
        assert!(
            matches!(decide(rule, &req, Some(&done), now), Decision::Replay(r) if r.body == b"ok")
        );
        let other = Request {
            fingerprint: Fingerprint([2; 32]),
            ..req
        };
        assert_eq!(
            decide(rule, &other, Some(&done), now),
            Decision::Reject(Rejection::Mismatch)
        );
        assert!(matches!(
            decide(rule, &req, Some(&done), now + 1),
            Decision::Forward {
                lease_expired: false,
                ..
            }
        ));
        let busy = Record::InFlight {
            owner: 1,
            lease_until: now + 1,
            expires_at: now + 100,
            fingerprint: fp,
        };
        assert_eq!(
            decide(rule, &req, Some(&busy), now),
            Decision::Reject(Rejection::Conflict { retry_after_s: 1 })
        );
        assert!(matches!(
            decide(rule, &req, Some(&busy), now + 1),
            Decision::Forward {
                lease_expired: true,
                ..
            }
        ));

        let replay_mismatch =
            cfg(r#"{"onMismatch": {"action": "replay"}, "onDuplicate": {"action": "reject"}}"#);
        let r2 = &replay_mismatch.default_rule;
        assert!(matches!(
            decide(r2, &other, Some(&done), now),
            Decision::Replay(_)
        ));
        assert_eq!(
            decide(r2, &req, Some(&done), now),
            Decision::Reject(Rejection::Duplicate)
        );

        let wait = cfg(r#"{"onConcurrent": {"action": "wait", "waitMillis": 500}}"#);
        let rw = &wait.default_rule;
        assert_eq!(
            decide(rw, &req, Some(&busy), now - 200),
            Decision::Wait {
                deadline: now + 300
            }
        );
        assert_eq!(
            decide_waiting(rw, &req, Some(&busy), now - 100, Some(now - 100)),
            Decision::Reject(Rejection::Conflict { retry_after_s: 1 })
        );

        // a short per-request expiry never frees a key whose first request is in flight
        let short = Record::InFlight {
            owner: 1,
            lease_until: now + 1_000,
            expires_at: now - 1,
            fingerprint: fp,
        };
        assert_eq!(
            decide(rule, &req, Some(&short), now),
            Decision::Reject(Rejection::Conflict { retry_after_s: 1 })
        );

        let per_req = Request {
            expires_in_ms: Some(5_000),
            ..req
        };
        match decide(rule, &per_req, None, now) {
            Decision::Forward { claim, .. } => assert_eq!(claim.expires_at, now + 5_000),
            other => panic!("{other:?}"),
        }
    }
}
