//! Header names and look-ups shared by the request and response sides.
//!
//! ```
//! use idemgate_core::HeaderLookup;
//! let headers = [("idempotency-key".to_string(), b"abc".to_vec())];
//! assert_eq!(headers[..].get_all("Idempotency-Key").len(), 1);
//! ```

/// Read access to a header list whose names may repeat.
pub trait HeaderLookup {
    /// Every value of header `name` (ASCII case-insensitive), in order.
    fn get_all(&self, name: &str) -> Vec<&[u8]>;
}

impl HeaderLookup for [(String, Vec<u8>)] {
    fn get_all(&self, name: &str) -> Vec<&[u8]> {
        self.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

impl HeaderLookup for Vec<(String, Vec<u8>)> {
    fn get_all(&self, name: &str) -> Vec<&[u8]> {
        self.as_slice().get_all(name)
    }
}

/// Response headers that are never stored nor replayed, whatever the configuration says:
/// hop-by-hop headers (RFC 9110 §7.6.1), framing headers the host recomputes, cookies and
/// credentials.
pub const NEVER_STORED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "set-cookie",
    "set-cookie2",
    "cookie",
    "authorization",
    "proxy-authorization",
    "proxy-authenticate",
    "www-authenticate",
    "date",
];

/// True when `name` may never be stored (see [`NEVER_STORED`]); pseudo-headers are never
/// stored either.
pub fn never_stored(name: &str) -> bool {
    name.starts_with(':') || NEVER_STORED.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// True when `name` is a valid HTTP field name (RFC 9110 token).
pub fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
