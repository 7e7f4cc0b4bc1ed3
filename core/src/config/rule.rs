//! One rule's validation: key sources, fingerprint, lifetimes, policies, stored responses,
//! scope, error rendering and rate limit, with the defaults of what a rule leaves unset.
//! Routes are validated after inheritance ([`super::validate`] merges them first).
//!
//! ```
//! use idemgate_core::Config;
//! let err = Config::from_json(r#"{"routes": [{"match": {"prefix": "/a"}, "onDuplicate": {"action": "ignore"}}]}"#).unwrap_err();
//! assert_eq!(err.to_string(), "routes[0].onDuplicate.action: must be one of replay, reject, acknowledge; got \"ignore\"");
//! ```
use serde_json::Value;

use super::fields::{bounded, check_template, header_name, methods, pointer, statuses};
use super::model::*;
use super::raw::{
    RawErrors, RawFingerprint, RawKey, RawPolicy, RawRateLimit, RawResponse, RawRule, RawSource,
};
use crate::error::ConfigError;
use crate::headers::never_stored;
use crate::ratelimit::{ContentionPolicy, Quota, ResetFormat};
use crate::request::canonical::Exclusions;

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

pub(super) fn validate_rule(
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
