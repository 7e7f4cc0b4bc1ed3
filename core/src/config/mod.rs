//! Configuration: a JSON document read into `serde` DTOs ([`raw`]; unknown and repeated
//! fields refused), then validated ([`validate`] the document, [`rule`] each rule,
//! [`fields`] single values) into [`Config`] ([`model`]).
//! Every error names the field path and the bad value.
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
pub mod fields;
pub mod model;
pub mod raw;
pub mod rule;
pub mod validate;

pub use model::*;

#[cfg(test)]
mod schema_check;
#[cfg(test)]
mod tests;
