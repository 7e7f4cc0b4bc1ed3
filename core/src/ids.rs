//! Identifiers made from random bytes the host supplies: correlation ids (UUID v4 text, the
//! `uuid` crate) and claim owner tokens. The core does no IO: the Envoy filter draws the
//! bytes from `getrandom` (WASI `random_get`), the edge worker from
//! `crypto.getRandomValues`. Nothing derives one id from another, so an id reveals nothing
//! about the next.
//!
//! ```
//! use idemgate_core::ids::{correlation_id, owner_token};
//! let id = correlation_id([7; 16]);
//! assert_eq!(id, "07070707-0707-4707-8707-070707070707");
//! assert_ne!(owner_token([0; 8]), 0);
//! ```

/// A correlation id: the UUID v4 (RFC 9562) of 16 random bytes, hyphenated lower-case text.
pub fn correlation_id(random: [u8; 16]) -> String {
    uuid::Builder::from_random_bytes(random)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// A claim owner token from 8 random bytes: never 0 (0 marks "no owner" in records).
pub fn owner_token(random: [u8; 8]) -> u64 {
    u64::from_le_bytes(random).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4_variant_rfc() {
        let id = correlation_id([0xff; 16]);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let parsed = uuid::Uuid::parse_str(&correlation_id([0x12; 16])).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
    }
}
