//! # idemgate-core
//!
//! Host-agnostic logic of idemgate: everything that decides what happens to a request lives
//! here, written sans-IO so that the Envoy filter and the edge worker behave identically.
//!
//! The flow for one request:
//!
//! 1. [`admit`] picks the rule for the method and path and looks at the headers: pass the
//!    request through untouched, reject it at once (bad key, body too large), or inspect it.
//! 2. [`resolve`] finds the key (header, JSON body field, composite, or derived) and
//!    fingerprints the request once the body is in.
//! 3. [`decide`] compares the request with the record already stored for its key (if any)
//!    and answers forward (with a claim), replay, or reject.
//! 4. The host forwards, captures the response with [`ResponseCapture`] and completes the
//!    record, or releases the claim.
//!
//! [`store::SlotTable`] runs steps 3–4 atomically over any compare-and-swap store
//! ([`store::CasStore`]), such as Envoy's shared data.
//!
//! ```
//! use idemgate_core::{admit, resolve, Admission, Config, Resolution};
//!
//! let config = Config::from_json(r#"{"methods": ["POST"]}"#).unwrap();
//! let headers = vec![("idempotency-key".to_string(), b"order-42".to_vec())];
//! let Admission::Inspect(pending) = admit(&config, "POST", "/orders", &headers) else { unreachable!() };
//! let Resolution::Ready(resolved) = resolve(&config, &pending, br#"{"amount": 10}"#) else { unreachable!() };
//! assert_eq!(resolved.key, "order-42");
//! assert_eq!(resolved.key_id.to_hex().len(), 32);
//! ```
#![forbid(unsafe_code)]

pub mod clock;
pub mod codec;
pub mod config;
pub mod decision;
pub mod error;
pub mod fingerprint;
pub mod fleet;
pub mod headers;
pub mod ids;
pub mod key;
pub mod problem;
pub mod ratelimit;
pub mod record;
pub mod request;
pub mod response;
pub mod sha256;
pub mod store;

pub use clock::{Clock, FakeClock, Millis};
pub use config::{Config, Rule};
pub use decision::{
    admit, body_hash_head, decide, resolve, resolve_hashed, Admission, Claim, Decision, Pending,
    Rejection, Resolution, Resolved,
};
pub use error::ConfigError;
pub use fingerprint::{Fingerprint, Fingerprinter};
pub use headers::HeaderLookup;
pub use key::KeyId;
pub use record::{Record, StoredResponse};
pub use response::{NotStored, ResponseCapture};

/// The first `N` bytes of `bytes` (zero-padded when shorter), e.g. of a digest.
pub(crate) fn prefix<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (d, s) in out.iter_mut().zip(bytes.iter()) {
        *d = *s;
    }
    out
}

/// A 64-bit number from the first eight bytes of an id, used to pick a store slot.
pub(crate) fn seed(id: &[u8]) -> u64 {
    u64::from_be_bytes(prefix::<8>(id))
}
