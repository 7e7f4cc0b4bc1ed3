//! Request fingerprints: SHA-256 over the method, the path with its query, and the body.
//!
//! ```
//! use idemgate_core::Fingerprinter;
//! let mut a = Fingerprinter::new("POST", "/orders?x=1");
//! a.update(b"{\"amount\":");
//! a.update(b"10}");
//! let mut b = Fingerprinter::new("POST", "/orders?x=1");
//! b.update(b"{\"amount\":10}");
//! assert_eq!(a.finish(), b.finish());
//! ```
use crate::sha256::Sha256;
use std::fmt;

use crate::key::put;

/// A request's fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(self.0))
    }
}

/// Incremental fingerprinting: the body may arrive in chunks.
#[derive(Clone)]
pub struct Fingerprinter {
    hasher: Sha256,
    body_len: u64,
}

impl Fingerprinter {
    /// Starts a fingerprint for `method` and `path_with_query`.
    pub fn new(method: &str, path_with_query: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idemgate/fp/v1\0");
        put(&mut hasher, method.to_ascii_uppercase().as_bytes());
        put(&mut hasher, path_with_query.as_bytes());
        Self {
            hasher,
            body_len: 0,
        }
    }

    /// Adds a chunk of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.body_len = self.body_len.saturating_add(chunk.len() as u64);
    }

    /// Body bytes seen so far.
    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// The fingerprint.
    pub fn finish(mut self) -> Fingerprint {
        self.hasher.update(self.body_len.to_be_bytes());
        Fingerprint(crate::prefix(&self.hasher.finalize()))
    }
}

/// Fingerprint of a whole request in one call.
pub fn fingerprint(method: &str, path_with_query: &str, body: &[u8]) -> Fingerprint {
    let mut f = Fingerprinter::new(method, path_with_query);
    f.update(body);
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_counts() {
        let base = fingerprint("POST", "/a?x=1", b"body");
        assert_eq!(base, fingerprint("post", "/a?x=1", b"body"));
        assert_ne!(base, fingerprint("PATCH", "/a?x=1", b"body"));
        assert_ne!(base, fingerprint("POST", "/a?x=2", b"body"));
        assert_ne!(base, fingerprint("POST", "/a?x=1", b"bodY"));
        assert_ne!(
            fingerprint("POST", "/a", b""),
            fingerprint("POST", "/", b"a")
        );
    }
}
