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
use super::fields::{bounded, header_name, methods};
use super::model::*;
use super::raw::{RawCorrelation, RawDocument, RawEtcd, RawMatch, RawRule, RawStore};
use super::rule::validate_rule;
use crate::error::ConfigError;
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
