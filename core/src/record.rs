//! Records kept per key, and their versioned compact binary encoding.
//!
//! Every encoded value starts with the magic bytes `IG`, a version byte and a tag byte.
//! Decoders reject — never panic on — truncated, trailing, unknown-version or unknown-tag
//! input (fuzzed in the tests).
//!
//! ```
//! use idemgate_core::{Fingerprint, Record, StoredResponse};
//! let rec = Record::Completed {
//!     owner: 7,
//!     expires_at: 1_000,
//!     fingerprint: Fingerprint([1; 32]),
//!     response: StoredResponse { status: 201, headers: vec![("content-type".into(), b"application/json".to_vec())], body: b"{}".to_vec() },
//! };
//! assert_eq!(Record::decode(&rec.encode()).unwrap(), rec);
//! assert!(Record::decode(b"IG\x01").is_err());
//! ```
use crate::clock::Millis;
use crate::codec::{CodecError, Reader, Writer};
use crate::fingerprint::Fingerprint;
use crate::key::KeyId;

const MAGIC: &[u8; 2] = b"IG";
/// Version of the encoding written by this build.
pub const VERSION: u8 = 1;

const TAG_FREE: u8 = 0;
const TAG_IN_FLIGHT: u8 = 1;
const TAG_COMPLETED: u8 = 2;
const TAG_BODY: u8 = 3;

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Allowed headers, lower-case names, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, byte for byte.
    pub body: Vec<u8>,
}

/// What is known about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The first request is in flight; `owner` holds the key until `lease_until`.
    InFlight {
        /// Random token of the claim's holder.
        owner: u64,
        /// When the claim lapses if never completed.
        lease_until: Millis,
        /// When the key expires (fixed at first use).
        expires_at: Millis,
        /// Fingerprint of the request that holds the claim.
        fingerprint: Fingerprint,
    },
    /// The first request completed; its response is replayed until `expires_at`.
    Completed {
        /// Token of the claim that completed it.
        owner: u64,
        /// When the record expires.
        expires_at: Millis,
        /// Fingerprint of the request that produced the response.
        fingerprint: Fingerprint,
        /// The stored response.
        response: StoredResponse,
    },
}

fn header(w: &mut Writer, tag: u8) {
    w.raw(MAGIC);
    w.u8(VERSION);
    w.u8(tag);
}

fn read_header(r: &mut Reader<'_>) -> Result<u8, CodecError> {
    let magic = r.fixed::<2>()?;
    if &magic != MAGIC || r.u8()? != VERSION {
        return Err(CodecError::BadHeader);
    }
    r.u8()
}

pub(crate) fn put_response(w: &mut Writer, resp: &StoredResponse) {
    w.u16(resp.status);
    let n = resp.headers.len().min(usize::from(u16::MAX));
    w.u16(u16::try_from(n).unwrap_or(u16::MAX));
    for (name, value) in resp.headers.iter().take(n) {
        w.bytes16(name.as_bytes());
        w.bytes32(value);
    }
    w.bytes32(&resp.body);
}

pub(crate) fn get_response(r: &mut Reader<'_>) -> Result<StoredResponse, CodecError> {
    let status = r.u16()?;
    if !(100..=999).contains(&status) {
        return Err(CodecError::BadValue("status"));
    }
    let n = r.u16()?;
    let mut headers = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        let name = std::str::from_utf8(r.bytes16()?)
            .map_err(|_| CodecError::BadValue("header name"))?
            .to_string();
        let value = r.bytes32()?.to_vec();
        headers.push((name, value));
    }
    let body = r.bytes32()?.to_vec();
    Ok(StoredResponse {
        status,
        headers,
        body,
    })
}

impl Record {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        match self {
            Record::InFlight {
                owner,
                lease_until,
                expires_at,
                fingerprint,
            } => {
                header(&mut w, TAG_IN_FLIGHT);
                w.u64(*owner);
                w.u64(*lease_until);
                w.u64(*expires_at);
                w.raw(&fingerprint.0);
            }
            Record::Completed {
                owner,
                expires_at,
                fingerprint,
                response,
            } => {
                header(&mut w, TAG_COMPLETED);
                w.u64(*owner);
                w.u64(*expires_at);
                w.raw(&fingerprint.0);
                put_response(&mut w, response);
            }
        }
        w.finish()
    }

    /// Decodes a record, rejecting anything malformed.
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(buf);
        let rec = match read_header(&mut r)? {
            TAG_IN_FLIGHT => Record::InFlight {
                owner: r.u64()?,
                lease_until: r.u64()?,
                expires_at: r.u64()?,
                fingerprint: Fingerprint(r.fixed::<32>()?),
            },
            TAG_COMPLETED => Record::Completed {
                owner: r.u64()?,
                expires_at: r.u64()?,
                fingerprint: Fingerprint(r.fixed::<32>()?),
                response: get_response(&mut r)?,
            },
            _ => return Err(CodecError::BadValue("record tag")),
        };
        r.end()?;
        Ok(rec)
    }

    /// The claim's or completion's owner token.
    pub fn owner(&self) -> u64 {
        match self {
            Record::InFlight { owner, .. } | Record::Completed { owner, .. } => *owner,
        }
    }
}

/// The compact index entry kept in one store slot (the response body lives beside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEntry {
    /// Which key holds the slot (all zero when free).
    pub key_id: KeyId,
    /// What the slot holds.
    pub state: SlotState,
}

/// State of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Nobody holds the slot.
    Free,
    /// A claim is in flight.
    InFlight {
        /// Claim holder.
        owner: u64,
        /// Lease deadline.
        lease_until: Millis,
        /// Expiry fixed at first use.
        expires_at: Millis,
        /// Fingerprint of the claiming request.
        fingerprint: Fingerprint,
    },
    /// Completed; the response is in the slot's body value written by `owner`.
    Completed {
        /// Claim that completed it; the body value carries the same token.
        owner: u64,
        /// Expiry.
        expires_at: Millis,
        /// Fingerprint of the original request.
        fingerprint: Fingerprint,
    },
}

impl SlotEntry {
    /// A free slot.
    pub fn free() -> Self {
        Self {
            key_id: KeyId::default(),
            state: SlotState::Free,
        }
    }

    /// Encodes the entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(80);
        match &self.state {
            SlotState::Free => header(&mut w, TAG_FREE),
            SlotState::InFlight {
                owner,
                lease_until,
                expires_at,
                fingerprint,
            } => {
                header(&mut w, TAG_IN_FLIGHT);
                w.raw(&self.key_id.0);
                w.u64(*owner);
                w.u64(*lease_until);
                w.u64(*expires_at);
                w.raw(&fingerprint.0);
            }
            SlotState::Completed {
                owner,
                expires_at,
                fingerprint,
            } => {
                header(&mut w, TAG_COMPLETED);
                w.raw(&self.key_id.0);
                w.u64(*owner);
                w.u64(*expires_at);
                w.raw(&fingerprint.0);
            }
        }
        w.finish()
    }

    /// Decodes an entry, rejecting anything malformed.
    pub fn decode(buf: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(buf);
        let entry = match read_header(&mut r)? {
            TAG_FREE => SlotEntry::free(),
            TAG_IN_FLIGHT => SlotEntry {
                key_id: KeyId(r.fixed::<16>()?),
                state: SlotState::InFlight {
                    owner: r.u64()?,
                    lease_until: r.u64()?,
                    expires_at: r.u64()?,
                    fingerprint: Fingerprint(r.fixed::<32>()?),
                },
            },
            TAG_COMPLETED => SlotEntry {
                key_id: KeyId(r.fixed::<16>()?),
                state: SlotState::Completed {
                    owner: r.u64()?,
                    expires_at: r.u64()?,
                    fingerprint: Fingerprint(r.fixed::<32>()?),
                },
            },
            _ => return Err(CodecError::BadValue("slot tag")),
        };
        r.end()?;
        Ok(entry)
    }

    /// Whether the slot holds nothing live at `now` (free, expired, or a lapsed lease).
    pub fn is_vacant(&self, now: Millis) -> bool {
        match &self.state {
            SlotState::Free => true,
            SlotState::InFlight { lease_until, .. } => *lease_until <= now,
            SlotState::Completed { expires_at, .. } => *expires_at <= now,
        }
    }
}

/// Encodes a response body value written beside a slot by claim `owner`.
pub fn encode_body(owner: u64, response: &StoredResponse) -> Vec<u8> {
    let mut w = Writer::with_capacity(32 + response.body.len());
    header(&mut w, TAG_BODY);
    w.u64(owner);
    put_response(&mut w, response);
    w.finish()
}

/// Decodes a body value into its owner token and response.
pub fn decode_body(buf: &[u8]) -> Result<(u64, StoredResponse), CodecError> {
    let mut r = Reader::new(buf);
    if read_header(&mut r)? != TAG_BODY {
        return Err(CodecError::BadValue("body tag"));
    }
    let owner = r.u64()?;
    let resp = get_response(&mut r)?;
    r.end()?;
    Ok((owner, resp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        Record::Completed {
            owner: u64::MAX,
            expires_at: 123,
            fingerprint: Fingerprint([9; 32]),
            response: StoredResponse {
                status: 200,
                headers: vec![("a".into(), vec![0, 255]), ("b".into(), vec![])],
                body: vec![1, 2, 3],
            },
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let f = Record::InFlight {
            owner: 1,
            lease_until: 2,
            expires_at: 3,
            fingerprint: Fingerprint([4; 32]),
        };
        assert_eq!(Record::decode(&f.encode()).unwrap(), f);
        let e = SlotEntry {
            key_id: KeyId([5; 16]),
            state: SlotState::Completed {
                owner: 6,
                expires_at: 7,
                fingerprint: Fingerprint([8; 32]),
            },
        };
        assert_eq!(SlotEntry::decode(&e.encode()).unwrap(), e);
        assert_eq!(
            SlotEntry::decode(&SlotEntry::free().encode()).unwrap(),
            SlotEntry::free()
        );
        let resp = StoredResponse {
            status: 201,
            headers: vec![],
            body: b"x".to_vec(),
        };
        assert_eq!(decode_body(&encode_body(9, &resp)).unwrap(), (9, resp));
    }

    #[test]
    fn rejects_every_truncation_and_extension() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(Record::decode(&bytes[..n]).is_err(), "prefix {n} accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Record::decode(&longer), Err(CodecError::TrailingBytes(1)));
        let mut v2 = bytes.clone();
        v2[2] = 2;
        assert_eq!(Record::decode(&v2), Err(CodecError::BadHeader));
        let mut tag = bytes;
        tag[3] = 77;
        assert!(Record::decode(&tag).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Record::decode(&bytes);
            let _ = SlotEntry::decode(&bytes);
            let _ = decode_body(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_mutations(pos in 0usize..200, val in any::<u8>()) {
            let mut bytes = sample().encode();
            if let Some(b) = bytes.get_mut(pos % 64) { *b = val; }
            let _ = Record::decode(&bytes);
            let mut e = encode_body(1, &StoredResponse { status: 200, headers: vec![("x".into(), b"y".to_vec())], body: vec![0; 10] });
            if let Some(b) = e.get_mut(pos % 40) { *b = val; }
            let _ = decode_body(&e);
        }
    }
}
