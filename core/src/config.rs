//! Configuration: a JSON document parsed into a serde DTO with `deny_unknown_fields`, then
//! validated into [`Config`]. Every error names the field path and the bad value.
//!
//! ```
//! use idemgate_core::Config;
//! let config = Config::from_json(r#"{"key": {"header": "Idempotency-Key"}, "ttlSeconds": 60}"#).unwrap();
//! assert_eq!(config.key_header, "idempotency-key");
//! assert_eq!(config.ttl_ms, 60_000);
//!
//! let err = Config::from_json(r#"{"key": {"maxLength": 0}}"#).unwrap_err();
//! assert_eq!(err.to_string(), "key.maxLength: must be 1..=1024, got 0");
//! ```
use serde::Deserialize;

use crate::error::ConfigError;
use crate::headers::{is_token, never_stored};

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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    description: Option<String>,
    #[serde(default)]
    key: RawKey,
    methods: Option<Vec<String>>,
    ttl_seconds: Option<u64>,
    lease_seconds: Option<u64>,
    max_body_bytes: Option<u64>,
    max_response_bytes: Option<u64>,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    response: RawResponse,
    #[serde(default)]
    scope: RawScope,
    #[serde(default)]
    conflict: RawConflict,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawKey {
    header: Option<String>,
    required: Option<bool>,
    max_length: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStore {
    capacity: Option<u64>,
    probes: Option<u64>,
    namespace: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawResponse {
    store_statuses: Option<Vec<StatusItem>>,
    never_store_statuses: Option<Vec<StatusItem>>,
    store_headers: Option<Vec<String>>,
    replay_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StatusItem {
    Code(i64),
    Text(String),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawScope {
    credential_headers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConflict {
    retry_after_seconds: Option<u64>,
}

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

/// A validated configuration. Build it with [`Config::from_json`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Free text naming the document a profile follows.
    pub description: Option<String>,
    /// Lower-case name of the request header carrying the key.
    pub key_header: String,
    /// Whether a request with a covered method and no key is refused (400).
    pub key_required: bool,
    /// Longest accepted key, in characters.
    pub key_max_length: usize,
    /// Upper-case methods idemgate applies to; others pass untouched.
    pub methods: Vec<String>,
    /// How long a completed response is replayed, from first use.
    pub ttl_ms: u64,
    /// How long a claim holds the key while the first request is in flight.
    pub lease_ms: u64,
    /// Largest request body that is fingerprinted; larger ones get 413.
    pub max_body_bytes: u64,
    /// Largest response body that is stored for replay.
    pub max_response_bytes: u64,
    /// Number of records the store holds.
    pub store_capacity: u32,
    /// Slots probed per key.
    pub store_probes: u32,
    /// Prefix of the store's keys, so several filters can share one host store.
    pub store_namespace: String,
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
    /// `Retry-After` seconds on a 409 for a request still in flight.
    pub conflict_retry_after_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        // The empty document is always valid; fall back to a literal copy if that ever changed.
        Self::from_raw(RawConfig::default()).unwrap_or_else(|_| Self {
            description: None,
            key_header: "idempotency-key".into(),
            key_required: false,
            key_max_length: 255,
            methods: vec!["POST".into(), "PATCH".into()],
            ttl_ms: 86_400_000,
            lease_ms: 30_000,
            max_body_bytes: 1 << 20,
            max_response_bytes: 1 << 20,
            store_capacity: 10_000,
            store_probes: 8,
            store_namespace: "idemgate".into(),
            store_statuses: vec![StatusRange { lo: 200, hi: 499 }],
            never_store_statuses: vec![],
            store_headers: vec![],
            replay_header: "idempotent-replayed".into(),
            credential_headers: vec!["authorization".into()],
            conflict_retry_after_s: 1,
        })
    }
}

impl Config {
    /// Parses and validates a JSON configuration. An empty document (`""` or whitespace)
    /// gives the defaults.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Self::from_raw(RawConfig::default());
        }
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." || path == "?" {
                "$".to_string()
            } else {
                path
            };
            ConfigError::new(path, e.inner().to_string())
        })?;
        Self::from_raw(raw)
    }

    /// Parses a JSON configuration given as bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ConfigError::new("$", format!("must be UTF-8 JSON, got invalid UTF-8 ({e})"))
        })?;
        Self::from_json(text)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let key_header = header_name(
            "key.header",
            raw.key.header.as_deref().unwrap_or("idempotency-key"),
        )?;
        let key_max_length = bounded("key.maxLength", raw.key.max_length.unwrap_or(255), 1, 1024)?;
        let methods = match raw.methods {
            None => vec!["POST".to_string(), "PATCH".to_string()],
            Some(list) => {
                if list.is_empty() {
                    return Err(ConfigError::new(
                        "methods",
                        "must list at least one method, got []",
                    ));
                }
                let mut out: Vec<String> = Vec::new();
                for (i, m) in list.iter().enumerate() {
                    if !is_token(m) {
                        return Err(ConfigError::new(
                            format!("methods[{i}]"),
                            format!("must be an HTTP method token, got {m:?}"),
                        ));
                    }
                    let up = m.to_ascii_uppercase();
                    if !out.contains(&up) {
                        out.push(up);
                    }
                }
                out
            }
        };
        let ttl_s = bounded(
            "ttlSeconds",
            raw.ttl_seconds.unwrap_or(86_400),
            1,
            31_536_000,
        )?;
        let lease_s = bounded("leaseSeconds", raw.lease_seconds.unwrap_or(30), 1, 86_400)?;
        if lease_s > ttl_s {
            return Err(ConfigError::new(
                "leaseSeconds",
                format!("must not exceed ttlSeconds ({ttl_s}), got {lease_s}"),
            ));
        }
        let max_body_bytes = bounded(
            "maxBodyBytes",
            raw.max_body_bytes.unwrap_or(1 << 20),
            0,
            1 << 30,
        )?;
        let max_response_bytes = bounded(
            "maxResponseBytes",
            raw.max_response_bytes.unwrap_or(1 << 20),
            0,
            64 << 20,
        )?;
        let store_capacity = bounded(
            "store.capacity",
            raw.store.capacity.unwrap_or(10_000),
            1,
            10_000_000,
        )?;
        let store_probes = bounded("store.probes", raw.store.probes.unwrap_or(8), 1, 64)?;
        if store_probes > store_capacity {
            return Err(ConfigError::new(
                "store.probes",
                format!("must not exceed store.capacity ({store_capacity}), got {store_probes}"),
            ));
        }
        let store_namespace = raw
            .store
            .namespace
            .unwrap_or_else(|| "idemgate".to_string());
        if store_namespace.is_empty()
            || store_namespace.len() > 64
            || !store_namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(ConfigError::new(
                "store.namespace",
                format!("must be 1..=64 characters of [A-Za-z0-9_.-], got {store_namespace:?}"),
            ));
        }
        let store_statuses = match raw.response.store_statuses {
            None => vec![StatusRange { lo: 200, hi: 499 }],
            Some(items) => statuses("response.storeStatuses", &items)?,
        };
        let never_store_statuses = match raw.response.never_store_statuses {
            None => [408, 409, 425, 429]
                .iter()
                .map(|&c| StatusRange { lo: c, hi: c })
                .collect(),
            Some(items) => statuses("response.neverStoreStatuses", &items)?,
        };
        let store_headers = match raw.response.store_headers {
            None => DEFAULT_STORE_HEADERS
                .iter()
                .map(|h| h.to_string())
                .collect(),
            Some(list) => {
                let mut out = Vec::new();
                for (i, h) in list.iter().enumerate() {
                    let path = format!("response.storeHeaders[{i}]");
                    let name = header_name(&path, h)?;
                    if never_stored(&name) {
                        return Err(ConfigError::new(
                            path,
                            format!("{h:?} is a hop-by-hop, framing or credential header and is never stored"),
                        ));
                    }
                    if !out.contains(&name) {
                        out.push(name);
                    }
                }
                out
            }
        };
        let replay_header = header_name(
            "response.replayHeader",
            raw.response
                .replay_header
                .as_deref()
                .unwrap_or("idempotent-replayed"),
        )?;
        let credential_headers = match raw.scope.credential_headers {
            None => vec!["authorization".to_string()],
            Some(list) => {
                let mut out = Vec::new();
                for (i, h) in list.iter().enumerate() {
                    out.push(header_name(&format!("scope.credentialHeaders[{i}]"), h)?);
                }
                out
            }
        };
        let conflict_retry_after_s = bounded(
            "conflict.retryAfterSeconds",
            raw.conflict.retry_after_seconds.unwrap_or(1),
            1,
            3600,
        )?;
        Ok(Self {
            description: raw.description,
            key_header,
            key_required: raw.key.required.unwrap_or(false),
            key_max_length: usize::try_from(key_max_length).unwrap_or(1024),
            methods,
            ttl_ms: ttl_s.saturating_mul(1000),
            lease_ms: lease_s.saturating_mul(1000),
            max_body_bytes,
            max_response_bytes,
            store_capacity: u32::try_from(store_capacity).unwrap_or(u32::MAX),
            store_probes: u32::try_from(store_probes).unwrap_or(1),
            store_namespace,
            store_statuses,
            never_store_statuses,
            store_headers,
            replay_header,
            credential_headers,
            conflict_retry_after_s,
        })
    }

    /// Whether requests with `method` are covered.
    pub fn covers_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
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
        assert_eq!(c.key_header, "idempotency-key");
        assert!(!c.key_required);
        assert_eq!(c.methods, vec!["POST", "PATCH"]);
        assert_eq!(c.key_max_length, 255);
        assert_eq!(c.ttl_ms, 86_400_000);
        assert_eq!(c.lease_ms, 30_000);
        assert!(c.stores_status(201));
        assert!(c.stores_status(404));
        assert!(!c.stores_status(429));
        assert!(!c.stores_status(500));
        assert!(c.stores_header("Content-Type"));
        assert!(!c.stores_header("set-cookie"));
        assert_eq!(Config::default(), c);
        assert_eq!(Config::from_json("").unwrap(), c);
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
        assert!(err(r#"{"response":{"storeStatuses":[700]}}"#)
            .starts_with("response.storeStatuses[0]: must be a status code"));
        assert!(
            err("true").starts_with("$: invalid type"),
            "{}",
            err("true")
        );
        assert!(err("{").starts_with("$: EOF"), "{}", err("{"));
    }

    #[test]
    fn status_specs() {
        let c = Config::from_json(r#"{"response":{"storeStatuses":["2xx", 404, "500-503"], "neverStoreStatuses":["all"]}}"#).unwrap();
        assert!(!c.stores_status(200));
        let c =
            Config::from_json(r#"{"response":{"storeStatuses":["all"], "neverStoreStatuses":[]}}"#)
                .unwrap();
        assert!(c.stores_status(500) && c.stores_status(429));
        let c =
            Config::from_json(r#"{"response":{"storeStatuses":["2xx", 404, "500-503"]}}"#).unwrap();
        assert!(c.stores_status(204) && c.stores_status(404) && c.stores_status(502));
        assert!(!c.stores_status(400) && !c.stores_status(504));
    }
}
