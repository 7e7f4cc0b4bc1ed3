//! Idempotency keys: parsing the header value and scoping it into a storage [`KeyId`].
//!
//! A key is a bare token (`order-42`) or an RFC 8941 sf-string (`"order-42"`), printable
//! ASCII, 1..=`maxLength` characters once unquoted. The raw key is never stored: the store
//! sees only a [`KeyId`], a SHA-256 over the method, the route, a hash of the caller's
//! credentials and the key.
//!
//! ```
//! use idemgate_core::key::{parse_key, KeyError, KeyId};
//! assert_eq!(parse_key(b"\"abc\"", 255).unwrap(), "abc");
//! assert_eq!(parse_key(b"abc", 255).unwrap(), "abc");
//! assert_eq!(parse_key(b"", 255), Err(KeyError::Empty));
//! let a = KeyId::scoped("POST", "/orders", &[b"Bearer a"], "k");
//! let b = KeyId::scoped("POST", "/orders", &[b"Bearer b"], "k");
//! assert_ne!(a, b);
//! ```
use crate::sha256::Sha256;
use std::fmt;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The header was present but empty.
    Empty,
    /// Longer than the configured maximum.
    TooLong {
        /// Length found.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A byte outside printable ASCII, at this position.
    NotPrintable {
        /// Zero-based byte offset.
        at: usize,
    },
    /// Starts with `"` but is not a valid RFC 8941 sf-string.
    BadQuoting,
    /// The header appears more than once.
    Repeated,
    /// A body field used as a key is an object, an array or null.
    NotScalar,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => write!(f, "the key is empty"),
            KeyError::TooLong { len, max } => {
                write!(f, "the key is {len} characters long; at most {max} are allowed")
            }
            KeyError::NotPrintable { at } => write!(
                f,
                "the key has a character outside printable ASCII at position {at}"
            ),
            KeyError::BadQuoting => write!(
                f,
                "the key starts with a double quote but is not a valid structured-field string (RFC 8941)"
            ),
            KeyError::Repeated => write!(f, "the key header was sent more than once"),
            KeyError::NotScalar => write!(f, "the key must be a string or a number, not an object or array"),
        }
    }
}

/// Parses a key header value: a bare token or an sf-string.
pub fn parse_key(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    let raw = trim(raw);
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    let key: Vec<u8> = if raw.first() == Some(&b'"') {
        unquote(raw)?
    } else {
        if let Some(at) = raw.iter().position(|b| !(0x20..=0x7e).contains(b)) {
            return Err(KeyError::NotPrintable { at });
        }
        raw.to_vec()
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    String::from_utf8(key).map_err(|_| KeyError::NotPrintable { at: 0 })
}

/// Checks a key taken verbatim (from a JSON body): printable ASCII, 1..=`max_len`.
pub fn validate_text(text: &str, max_len: usize) -> Result<String, KeyError> {
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    if let Some(at) = text.bytes().position(|b| !(0x20..=0x7e).contains(&b)) {
        return Err(KeyError::NotPrintable { at });
    }
    if text.len() > max_len {
        return Err(KeyError::TooLong {
            len: text.len(),
            max: max_len,
        });
    }
    Ok(text.to_string())
}

fn trim(raw: &[u8]) -> &[u8] {
    let start = raw
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |p| p + 1);
    raw.get(start..end).unwrap_or_default()
}

fn unquote(raw: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut iter = raw.iter().enumerate().skip(1);
    while let Some((at, &b)) = iter.next() {
        match b {
            b'\\' => match iter.next() {
                Some((_, &c)) if c == b'"' || c == b'\\' => out.push(c),
                _ => return Err(KeyError::BadQuoting),
            },
            b'"' => {
                return if at + 1 == raw.len() {
                    Ok(out)
                } else {
                    Err(KeyError::BadQuoting)
                }
            }
            0x20..=0x7e => out.push(b),
            _ => return Err(KeyError::NotPrintable { at }),
        }
    }
    Err(KeyError::BadQuoting)
}

/// The storage identity of a key: 16 bytes of SHA-256 over its scope and the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KeyId(pub [u8; 16]);

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl KeyId {
    /// Scopes `key` by method, route and the caller's credentials (each value hashed, in
    /// order; an absent credential is an empty value). Every part is length-prefixed, so
    /// no two different scopes concatenate to the same input.
    pub fn scoped(method: &str, route: &str, credentials: &[&[u8]], key: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"idemgate/key/v1\0");
        put(&mut h, method.to_ascii_uppercase().as_bytes());
        put(&mut h, route.as_bytes());
        h.update((credentials.len() as u64).to_be_bytes());
        for c in credentials {
            put(&mut h, c);
        }
        put(&mut h, key.as_bytes());
        KeyId(crate::prefix(&h.finalize()))
    }

    /// Lower-case hex, safe to log.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A 64-bit number derived from the id, used to pick a store slot.
    pub fn slot_seed(&self) -> u64 {
        crate::seed(&self.0)
    }
}

/// Where the parts of a hashed identity go: a hash, or (for a host that hashes part of it
/// itself, `decision::body_hash_head`) the bytes that precede that part.
pub(crate) trait Absorb {
    fn absorb(&mut self, data: &[u8]);
}

impl Absorb for Sha256 {
    fn absorb(&mut self, data: &[u8]) {
        self.update(data);
    }
}

impl Absorb for Vec<u8> {
    fn absorb(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

/// A length-prefixed part (every hashed identity frames its parts so).
pub(crate) fn put(h: &mut impl Absorb, part: &[u8]) {
    h.absorb(&(part.len() as u64).to_be_bytes());
    h.absorb(part);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_and_sf_strings() {
        assert_eq!(parse_key(b"abc-123", 255).unwrap(), "abc-123");
        assert_eq!(parse_key(b"  abc  ", 255).unwrap(), "abc");
        assert_eq!(parse_key(br#""a\"b\\c""#, 255).unwrap(), r#"a"b\c"#);
        assert_eq!(parse_key(b"\"\"", 255), Err(KeyError::Empty));
        assert_eq!(parse_key(b"\"abc", 255), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(b"\"ab\"c", 255), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(b"\"a\\x\"", 255), Err(KeyError::BadQuoting));
        assert_eq!(
            parse_key(b"a\x01b", 255),
            Err(KeyError::NotPrintable { at: 1 })
        );
        assert_eq!(
            parse_key("caf\u{e9}".as_bytes(), 255),
            Err(KeyError::NotPrintable { at: 3 })
        );
        assert_eq!(
            parse_key(&[b'a'; 256], 255),
            Err(KeyError::TooLong { len: 256, max: 255 })
        );
        assert!(parse_key(&[b'a'; 255], 255).is_ok());
        assert_eq!(parse_key(b"   ", 255), Err(KeyError::Empty));
    }

    #[test]
    fn scope_separates_callers_routes_methods() {
        let base = KeyId::scoped("POST", "/a", &[b"x"], "k");
        assert_eq!(base, KeyId::scoped("post", "/a", &[b"x"], "k"));
        assert_ne!(base, KeyId::scoped("PATCH", "/a", &[b"x"], "k"));
        assert_ne!(base, KeyId::scoped("POST", "/b", &[b"x"], "k"));
        assert_ne!(base, KeyId::scoped("POST", "/a", &[b"y"], "k"));
        assert_ne!(base, KeyId::scoped("POST", "/a", &[], "k"));
        // length prefixes: no concatenation collisions
        assert_ne!(
            KeyId::scoped("POST", "/ab", &[], "c"),
            KeyId::scoped("POST", "/a", &[], "bc")
        );
    }
}
