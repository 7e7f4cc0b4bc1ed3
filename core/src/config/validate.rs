//! From the parsed document ([`super::raw`]) to the validated [`Config`]: defaults filled
//! in, bounds and cross-field rules checked, routes merged over the top-level rule. Every
//! error names the field path and the bad value.
//!
//! Parsing goes through `serde_path_to_error`, so a type error, an unknown field or a
//! field given twice names its path too:
//!
//! ```
//! use idemgate_core::Config;
//! let err = |json: &str| Config::from_json(json).unwrap_err().to_string();
//! assert_eq!(err(r#"{"key": {"maxLength": 0}}"#), "key.maxLength: must be 1..=1024, got 0");
//! assert_eq!(err(r#"{"key": {"header": "a", "header": "b"}}"#), "key.header: duplicate field `header`");
//! assert_eq!(err(r#"{"ttlSeconds": "x"}"#), "ttlSeconds: invalid type: string \"x\", expected u64");
//! ```
use serde_json::Value;

use super::fields::{bounded, check_template, header_name, methods, pointer, statuses};
use super::model::*;
use super::raw::{
    RawCorrelation, RawDocument, RawErrors, RawEtcd, RawFingerprint, RawKey, RawMatch, RawPolicy,
    RawRateLimit, RawResponse, RawRule, RawSource, RawStore,
};
use crate::error::ConfigError;
use crate::headers::never_stored;
use crate::ratelimit::{ContentionPolicy, Quota, ResetFormat};
use crate::request::canonical::Exclusions;
use crate::request::path::normalize;

impl Config {
    /// Parses and validates a JSON configuration. An empty document (`""` or whitespace)
    /// gives the defaults.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let text = if text.trim().is_empty() { "{}" } else { text };
        let mut de = serde_json::Deserializer::from_str(text);
        let doc: RawDocument =
            serde_path_to_error::deserialize(&mut de).map_err(|e| parse_error(&e))?;
        de.end().map_err(|e| ConfigError::new("$", e.to_string()))?;
        Config::try_from(doc)
    }

    /// Parses a JSON configuration given as bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ConfigError::new("$", format!("must be UTF-8 JSON, got invalid UTF-8 ({e})"))
        })?;
        Self::from_json(text)
    }
}

/// A parse error as a [`ConfigError`]: the path `serde_path_to_error` tracked (`$` for the
/// document), extended by the field for `unknown field`/`duplicate field` (raised while
/// the field's name is read, before its value); the position only for syntax errors.
fn parse_error(e: &serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let inner = e.inner();
    let full = inner.to_string();
    let message = match inner.classify() {
        serde_json::error::Category::Data => full
            .strip_suffix(&format!(
                " at line {} column {}",
                inner.line(),
                inner.column()
            ))
            .unwrap_or(&full)
            .to_string(),
        _ => full,
    };
    let mut path = e.path().to_string();
    if path == "." || path == "?" {
        path.clear();
    }
    for lead in ["unknown field `", "duplicate field `"] {
        if let Some(name) = message
            .strip_prefix(lead)
            .and_then(|rest| rest.split('`').next())
        {
            let last = path.rsplit('.').next().unwrap_or_default();
            if last != name {
                path = if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                };
            }
        }
    }
    ConfigError::new(
        if path.is_empty() {
            "$".to_string()
        } else {
            path
        },
        message,
    )
}

impl TryFrom<RawDocument> for Config {
    type Error = ConfigError;

    fn try_from(doc: RawDocument) -> Result<Self, ConfigError> {
        let base = doc.rule();
        let default_rule = validate_rule("", "default".into(), None, base.clone())?;
        let mut rules: Vec<Rule> = Vec::new();
        for (i, route) in doc.routes.unwrap_or_default().into_iter().enumerate() {
            let prefix = format!("routes[{i}].");
            let name = match &route.name {
                None => format!("route{i}"),
                Some(s) if !s.is_empty() && s.chars().count() <= 64 => s.clone(),
                Some(s) => {
                    return Err(ConfigError::new(
                        format!("{prefix}name"),
                        format!("must be a string of 1..=64 characters, got {s:?}"),
                    ))
                }
            };
            let Some(m) = route.matcher.clone() else {
                return Err(ConfigError::new(format!("{prefix}match"), "is required"));
            };
            if name == "default" || rules.iter().any(|r| r.name == name) {
                return Err(ConfigError::new(
                    format!("{prefix}name"),
                    format!("must be unique and not \"default\", got {name:?}"),
                ));
            }
            let matcher = validate_match(&prefix, m)?;
            let merged = merge(&base, route.rule());
            rules.push(validate_rule(&prefix, name, Some(matcher), merged)?);
        }
        validate_process(
            doc.description,
            doc.store.unwrap_or_default(),
            doc.correlation,
            default_rule,
            rules,
        )
    }
}

/// The process-wide settings, and the checks across rules.
fn validate_process(
    description: Option<String>,
    store: RawStore,
    correlation: Option<RawCorrelation>,
    default_rule: Rule,
    rules: Vec<Rule>,
) -> Result<Config, ConfigError> {
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
    Ok(Config {
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
    // matched against normalized paths, so normalized too (`/%6Frders` is `/orders`)
    let norm = |p: Option<String>| p.map(|p| normalize(&p).into_owned());
    Ok(RouteMatch {
        prefix: norm(m.prefix),
        exact: norm(m.exact),
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
        check_template(&format!("{path}.body"), &body.0)?;
    }
    Ok(Policy {
        action: a,
        status,
        code: raw.code,
        message: raw.message,
        retry_after_s,
        wait_ms,
        body: raw.body.map(|t| t.0),
    })
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
    rule.fingerprint.exclusions =
        Exclusions::new(rule.fingerprint.exclude_pointers.iter().map(String::as_str));
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
        Some("envelope") => match raw.envelope.map(|t| t.0) {
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
        for k in map.iter().flat_map(|m| m.0.keys()) {
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
        codes: raw.codes.unwrap_or_default().0,
        messages: raw.messages.unwrap_or_default().0,
    })
}

/// What a JSON value is, for messages.
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
