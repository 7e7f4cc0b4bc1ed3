//! The configuration document as written: `serde` DTOs, every field optional, `null` as
//! absent, unknown and repeated fields refused (`deny_unknown_fields`; `serde` refuses a
//! struct field given twice, [`UniqueMap`] and [`Template`] a repeated name in maps and
//! JSON templates). [`super::validate`] turns them into the validated [`super::Config`].
//!
//! The top level ([`RawDocument`]) and every route ([`RawRoute`]) carry the rule fields of
//! [`RawRule`]; one macro declares them once for all three. `schema/idemgate.schema.json` is
//! checked against these types (`config::tests::schema_matches_the_dtos`).
//!
//! Adding a field: add it to its block here (an `Option`), validate it in
//! [`super::validate`], and describe it in the schema (the test then insists).
//!
//! ```
//! use idemgate_core::config::raw::RawDocument;
//! let doc: RawDocument = serde_json::from_str(r#"{"ttlSeconds": 5, "store": {"capacity": 10}}"#).unwrap();
//! assert_eq!(doc.ttl_seconds, Some(5));
//! assert!(serde_json::from_str::<RawDocument>(r#"{"ttlSecs": 5}"#).is_err());
//! ```
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// `Deserialize` for a derived block (`remote = "Self"`) that takes a JSON object only:
/// `serde` would also read a struct from an array, by position.
macro_rules! objects_only {
    ($name:ident) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Object;
                impl<'de> Visitor<'de> for Object {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a JSON object")
                    }
                    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<$name, A::Error> {
                        $name::deserialize(de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(Object)
            }
        }
    };
}

/// Declares a block that carries the rule fields plus its own (`$extra`), and its
/// [`RawRule`] part.
macro_rules! with_rule_fields {
    ($(#[$m:meta])* $name:ident { $($(#[$em:meta])* $extra:ident: $ety:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Default, Clone, Deserialize)]
        #[cfg_attr(test, derive(schemars::JsonSchema))]
        #[serde(deny_unknown_fields, rename_all = "camelCase", remote = "Self")]
        pub struct $name {
            /// Methods covered.
            pub methods: Option<Vec<String>>,
            /// Key sources.
            pub key: Option<RawKey>,
            /// What the fingerprint covers.
            pub fingerprint: Option<RawFingerprint>,
            /// Replay window.
            pub ttl_seconds: Option<u64>,
            /// In-flight lease.
            pub lease_seconds: Option<u64>,
            /// Per-request expiry header.
            pub expiry: Option<RawExpiry>,
            /// Request body limit.
            pub max_body_bytes: Option<u64>,
            /// Stored response limit.
            pub max_response_bytes: Option<u64>,
            /// Same key, different request.
            pub on_mismatch: Option<RawPolicy>,
            /// Same key, same request, completed.
            pub on_duplicate: Option<RawPolicy>,
            /// Same key in flight.
            pub on_concurrent: Option<RawPolicy>,
            /// What is stored.
            pub response: Option<RawResponse>,
            /// Caller scope.
            pub scope: Option<RawScope>,
            /// Error rendering.
            pub errors: Option<RawErrors>,
            /// Rate limit.
            pub rate_limit: Option<RawRateLimit>,
            $($(#[$em])* pub $extra: $ety,)*
        }

        objects_only!($name);

        impl $name {
            /// The rule fields.
            pub fn rule(&self) -> RawRule {
                RawRule {
                    methods: self.methods.clone(),
                    key: self.key.clone(),
                    fingerprint: self.fingerprint.clone(),
                    ttl_seconds: self.ttl_seconds,
                    lease_seconds: self.lease_seconds,
                    expiry: self.expiry.clone(),
                    max_body_bytes: self.max_body_bytes,
                    max_response_bytes: self.max_response_bytes,
                    on_mismatch: self.on_mismatch.clone(),
                    on_duplicate: self.on_duplicate.clone(),
                    on_concurrent: self.on_concurrent.clone(),
                    response: self.response.clone(),
                    scope: self.scope.clone(),
                    errors: self.errors.clone(),
                    rate_limit: self.rate_limit.clone(),
                }
            }
        }
    };
}

with_rule_fields!(
    /// The fields of a rule (top level and routes).
    RawRule {}
);

with_rule_fields!(
    /// The whole document: process-wide settings and the default rule.
    RawDocument {
        /// Schema reference for editors (ignored).
        #[serde(rename = "$schema")]
        schema: Option<String>,
        /// Free text naming the API document followed.
        description: Option<String>,
        /// The slot table (and fleet mode).
        store: Option<RawStore>,
        /// Correlation id header.
        correlation: Option<RawCorrelation>,
        /// Route rules.
        routes: Option<Vec<RawRoute>>,
    }
);

with_rule_fields!(
    /// One route: a rule plus its name and match.
    RawRoute {
        /// Name in logs.
        name: Option<String>,
        /// Which requests.
        #[serde(rename = "match")]
        matcher: Option<RawMatch>,
    }
);

/// Declares a plain block: `deny_unknown_fields`, camelCase names, every field optional.
macro_rules! block {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Default, Clone, Deserialize)]
        #[cfg_attr(test, derive(schemars::JsonSchema))]
        #[serde(deny_unknown_fields, rename_all = "camelCase", remote = "Self")]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
        }
        objects_only!($name);
    };
}

block!(
    /// `rateLimit`.
    RawRateLimit {
        /// Requests per period.
        rate: Option<u64>,
        /// The period.
        period_seconds: Option<u64>,
        /// Largest burst.
        burst: Option<u64>,
        /// Headers naming the caller.
        caller_headers: Option<Vec<String>>,
        /// A bucket per route.
        per_route: Option<bool>,
        /// `seconds` or `epoch`.
        reset_format: Option<String>,
        /// `failClosed` or `failOpen`.
        on_contention: Option<String>,
        /// Whether replays spend quota.
        charge_replays: Option<bool>,
        /// Buckets kept.
        capacity: Option<u64>,
        /// Slots probed.
        probes: Option<u64>,
        /// Status of the refusal.
        status: Option<u64>,
    }
);

block!(
    /// `key`.
    RawKey {
        /// Shorthand for one header source.
        header: Option<String>,
        /// Sources in order.
        sources: Option<Vec<RawSource>>,
        /// Derive from the canonical body.
        derive_from_body: Option<bool>,
        /// Refuse requests without a key.
        required: Option<bool>,
        /// Longest key.
        max_length: Option<u64>,
    }
);

block!(
    /// A key source or composite part: exactly one field set.
    RawSource {
        /// A request header.
        header: Option<String>,
        /// A JSON Pointer into the body.
        json_pointer: Option<String>,
        /// Parts joined.
        composite: Option<Vec<RawSource>>,
        /// The route (composite part).
        route: Option<bool>,
        /// The caller (composite part).
        caller: Option<bool>,
    }
);

block!(
    /// `fingerprint`.
    RawFingerprint {
        /// Include the method.
        method: Option<bool>,
        /// Include the path.
        path: Option<bool>,
        /// Include the query.
        query: Option<bool>,
        /// Headers included.
        headers: Option<Vec<String>>,
        /// `raw`, `canonicalJson` or `none`.
        body: Option<String>,
        /// Members removed before canonicalizing.
        exclude_pointers: Option<Vec<String>>,
        /// `sha256` or `blake3`.
        algorithm: Option<String>,
    }
);

block!(
    /// `expiry`.
    RawExpiry {
        /// The header.
        header: Option<String>,
        /// Smallest value.
        min_seconds: Option<u64>,
        /// Largest value.
        max_seconds: Option<u64>,
    }
);

block!(
    /// `onMismatch`, `onDuplicate`, `onConcurrent`.
    RawPolicy {
        /// The action.
        action: Option<String>,
        /// Status of the local answer.
        status: Option<u64>,
        /// Error code.
        code: Option<String>,
        /// Message.
        message: Option<String>,
        /// `Retry-After` of the 409.
        retry_after_seconds: Option<u64>,
        /// Longest wait.
        wait_millis: Option<u64>,
        /// Acknowledgement body template.
        body: Option<Template>,
    }
);

block!(
    /// `response`.
    RawResponse {
        /// Statuses stored.
        store_statuses: Option<Vec<StatusItem>>,
        /// Statuses never stored.
        never_store_statuses: Option<Vec<StatusItem>>,
        /// Headers stored.
        store_headers: Option<Vec<String>>,
        /// Header marking replays.
        replay_header: Option<String>,
    }
);

block!(
    /// `scope`.
    RawScope {
        /// Headers scoping a key to a caller.
        credential_headers: Option<Vec<String>>,
    }
);

block!(
    /// `errors`.
    RawErrors {
        /// `problem` or `envelope`.
        format: Option<String>,
        /// Envelope template.
        envelope: Option<Template>,
        /// Content type of error bodies.
        content_type: Option<String>,
        /// Code per error kind.
        codes: Option<UniqueMap>,
        /// Message per error kind.
        messages: Option<UniqueMap>,
    }
);

block!(
    /// `store` (top level only).
    RawStore {
        /// Slots.
        capacity: Option<u64>,
        /// Ways per bucket.
        probes: Option<u64>,
        /// Key and metric prefix.
        namespace: Option<String>,
        /// Fleet mode.
        etcd: Option<RawEtcd>,
    }
);

block!(
    /// `store.etcd`: fleet mode. New fields (TLS, transport) go here.
    RawEtcd {
        /// Envoy cluster of the members.
        cluster: Option<String>,
        /// Key prefix.
        prefix: Option<String>,
        /// `:authority` of the calls.
        authority: Option<String>,
        /// Per call.
        timeout_millis: Option<u64>,
        /// Retries of a failed call.
        retries: Option<u64>,
        /// `closed` or `open`.
        fail_policy: Option<String>,
        /// Width of an expiry lease bucket.
        lease_bucket_seconds: Option<u64>,
        /// Largest record written.
        max_value_bytes: Option<u64>,
    }
);

block!(
    /// `correlation` (top level only).
    RawCorrelation {
        /// The header.
        header: Option<String>,
        /// Generate one when absent.
        generate: Option<bool>,
    }
);

block!(
    /// `routes[].match`.
    RawMatch {
        /// Path prefix (whole segments).
        prefix: Option<String>,
        /// Exact path.
        exact: Option<String>,
        /// Methods.
        methods: Option<Vec<String>>,
    }
);

/// A status as written: a code (`404`) or text (`"2xx"`, `"500-503"`, `"all"`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, serde(untagged))]
pub enum StatusItem {
    /// A code.
    Code(i64),
    /// A class, range or `all`.
    Text(String),
}

impl<'de> Deserialize<'de> for StatusItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match crate::request::body::strict_value(d)? {
            Value::String(s) => Ok(StatusItem::Text(s)),
            Value::Number(n) if n.as_i64().is_some() => {
                Ok(StatusItem::Code(n.as_i64().unwrap_or(0)))
            }
            other => Err(de::Error::invalid_type(
                unexpected(&other),
                &"a status code or a string",
            )),
        }
    }
}

/// How `serde` names a JSON value in a type error.
fn unexpected(v: &Value) -> de::Unexpected<'_> {
    match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => de::Unexpected::Signed(i),
            (None, Some(f)) => de::Unexpected::Float(f),
            _ => de::Unexpected::Other("number"),
        },
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

/// A JSON template (`errors.envelope`, an acknowledgement `body`): any JSON, member names
/// unique at every depth.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, serde(transparent))]
pub struct Template(pub Value);

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::request::body::strict_value(d).map(Template)
    }
}

/// An object of strings whose names are unique (`errors.codes`, `errors.messages`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, serde(transparent))]
pub struct UniqueMap(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Unique;
        impl<'de> Visitor<'de> for Unique {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if out.contains_key(&name) {
                        return Err(de::Error::custom(format_args!("duplicate field `{name}`")));
                    }
                    out.insert(name, value);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Unique)
    }
}
