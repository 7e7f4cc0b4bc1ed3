//! What idemgate reads of a request: its path ([`path`]), its body as JSON ([`body`]) and
//! that body's canonical form ([`canonical`]).
//!
//! ```
//! use idemgate_core::request::{body, canonical, path};
//! assert_eq!(path::normalize("/a/./%62"), "/a/b");
//! let v = body::parse(br#"{"b": 1.0, "a": 2}"#).unwrap();
//! assert_eq!(canonical::canonical_bytes(&v), br#"{"a":2,"b":1}"#);
//! ```
pub mod body;
pub mod canonical;
pub mod path;
