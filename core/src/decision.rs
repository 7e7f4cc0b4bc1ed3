//! The decisions: [`admit`] at header time, [`decide`] once the fingerprint is known.
//!
//! Both are pure functions of the configuration, the request and (for `decide`) the record
//! already stored for the key and the current time, so every host decides alike.
//!
//! ```
//! use idemgate_core::{decide, Config, Decision, Fingerprint, Record};
//! use idemgate_core::decision::Request;
//! let config = Config::default();
//! let req = Request { fingerprint: Fingerprint([1; 32]), owner: 42 };
//! match decide(&config, &req, None, 1_000) {
//!     Decision::Forward { claim, .. } => assert_eq!(claim.lease_until, 1_000 + config.lease_ms),
//!     other => unreachable!("{other:?}"),
//! }
//! let busy = Record::InFlight { owner: 1, lease_until: 5_000, expires_at: 9_000, fingerprint: Fingerprint([1; 32]) };
//! assert!(matches!(decide(&config, &req, Some(&busy), 1_000), Decision::Reject(_)));
//! ```
use crate::clock::Millis;
use crate::config::Config;
use crate::fingerprint::Fingerprint;
use crate::headers::HeaderLookup;
use crate::key::{parse_key, KeyError, KeyId};
use crate::record::{Record, StoredResponse};

/// Why a request is answered locally with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A key is required and none was sent (400).
    MissingKey {
        /// The header that should carry it.
        header: String,
    },
    /// The key header is malformed (400).
    MalformedKey {
        /// The header.
        header: String,
        /// What is wrong.
        reason: KeyError,
    },
    /// The body is larger than the fingerprint limit (413).
    BodyTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// A request with the same key is still in flight (409, `Retry-After`).
    Conflict {
        /// Seconds to wait before retrying.
        retry_after_s: u64,
    },
    /// The key was used before with a different request (422).
    Mismatch,
    /// The store cannot take the claim now (503, `Retry-After`).
    StoreUnavailable {
        /// Seconds to wait before retrying.
        retry_after_s: u64,
        /// Operator-facing reason.
        reason: &'static str,
    },
    /// The host is set up wrongly (500).
    Misconfigured {
        /// What is wrong.
        detail: String,
    },
}

/// What header-time inspection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Not covered (method not listed, or no key and none required): forward untouched.
    Pass,
    /// Answer locally at once.
    Reject(Rejection),
    /// Covered: fingerprint the body, then [`decide`].
    Inspect(Pending),
}

/// A covered request waiting for its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Storage identity of the scoped key.
    pub key_id: KeyId,
}

/// Looks at a request's method, path and headers.
pub fn admit<H: HeaderLookup + ?Sized>(
    config: &Config,
    method: &str,
    path_with_query: &str,
    headers: &H,
) -> Admission {
    if !config.covers_method(method) {
        return Admission::Pass;
    }
    let values = headers.get_all(&config.key_header);
    let raw = match values.as_slice() {
        [] if config.key_required => {
            return Admission::Reject(Rejection::MissingKey {
                header: config.key_header.clone(),
            })
        }
        [] => return Admission::Pass,
        [one] => *one,
        _ => {
            return Admission::Reject(Rejection::MalformedKey {
                header: config.key_header.clone(),
                reason: KeyError::Repeated,
            })
        }
    };
    let key = match parse_key(raw, config.key_max_length) {
        Ok(k) => k,
        Err(reason) => {
            return Admission::Reject(Rejection::MalformedKey {
                header: config.key_header.clone(),
                reason,
            })
        }
    };
    if let Some(len) = content_length(headers) {
        if len > config.max_body_bytes {
            return Admission::Reject(Rejection::BodyTooLarge {
                limit: config.max_body_bytes,
            });
        }
    }
    let route = path_with_query
        .split_once('?')
        .map_or(path_with_query, |(p, _)| p);
    let creds: Vec<Vec<u8>> = config
        .credential_headers
        .iter()
        .map(|h| headers.get_all(h).join(&b","[..]))
        .collect();
    let cred_refs: Vec<&[u8]> = creds.iter().map(Vec::as_slice).collect();
    Admission::Inspect(Pending {
        key_id: KeyId::scoped(method, route, &cred_refs, &key),
    })
}

fn content_length<H: HeaderLookup + ?Sized>(headers: &H) -> Option<u64> {
    headers
        .get_all("content-length")
        .first()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
}

/// The request as `decide` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// A fresh random token identifying this attempt if it claims the key.
    pub owner: u64,
}

/// A claim to write before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Token of the claim's holder.
    pub owner: u64,
    /// When the claim lapses.
    pub lease_until: Millis,
    /// When the key expires.
    pub expires_at: Millis,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
}

impl Claim {
    /// The in-flight record for this claim.
    pub fn record(&self) -> Record {
        Record::InFlight {
            owner: self.owner,
            lease_until: self.lease_until,
            expires_at: self.expires_at,
            fingerprint: self.fingerprint,
        }
    }
}

/// What to do with a covered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Claim the key and forward; `took_over` when a lapsed lease or expired record is replaced.
    Forward {
        /// The claim to write atomically.
        claim: Claim,
        /// An earlier claim's lease had lapsed.
        lease_expired: bool,
    },
    /// Answer with the stored response.
    Replay(StoredResponse),
    /// Answer with an error.
    Reject(Rejection),
}

/// Decides for a covered request given the record stored for its key (if any) at `now`.
pub fn decide(
    config: &Config,
    request: &Request,
    existing: Option<&Record>,
    now: Millis,
) -> Decision {
    let forward = |lease_expired| Decision::Forward {
        claim: Claim {
            owner: request.owner,
            lease_until: now.saturating_add(config.lease_ms),
            expires_at: now.saturating_add(config.ttl_ms),
            fingerprint: request.fingerprint,
        },
        lease_expired,
    };
    match existing {
        None => forward(false),
        Some(Record::InFlight {
            lease_until,
            expires_at,
            ..
        }) => {
            if *expires_at <= now {
                forward(false)
            } else if *lease_until <= now {
                forward(true)
            } else {
                Decision::Reject(Rejection::Conflict {
                    retry_after_s: config.conflict_retry_after_s,
                })
            }
        }
        Some(Record::Completed {
            expires_at,
            fingerprint,
            response,
            ..
        }) => {
            if *expires_at <= now {
                forward(false)
            } else if *fingerprint != request.fingerprint {
                Decision::Reject(Rejection::Mismatch)
            } else {
                Decision::Replay(response.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn admission() {
        let c = Config::default();
        assert_eq!(
            admit(&c, "GET", "/x", &h(&[("idempotency-key", "a")])),
            Admission::Pass
        );
        assert_eq!(admit(&c, "POST", "/x", &h(&[])), Admission::Pass);
        assert!(matches!(
            admit(&c, "POST", "/x", &h(&[("Idempotency-Key", "a")])),
            Admission::Inspect(_)
        ));
        assert!(matches!(
            admit(
                &c,
                "POST",
                "/x",
                &h(&[("idempotency-key", "a"), ("idempotency-key", "b")])
            ),
            Admission::Reject(Rejection::MalformedKey {
                reason: KeyError::Repeated,
                ..
            })
        ));
        assert!(matches!(
            admit(&c, "POST", "/x", &h(&[("idempotency-key", "")])),
            Admission::Reject(Rejection::MalformedKey {
                reason: KeyError::Empty,
                ..
            })
        ));
        assert!(matches!(
            admit(
                &c,
                "POST",
                "/x",
                &h(&[("idempotency-key", "a"), ("content-length", "2000000")])
            ),
            Admission::Reject(Rejection::BodyTooLarge { limit: 1_048_576 })
        ));
        let req = Config::from_json(r#"{"key":{"required":true}}"#).unwrap();
        assert!(matches!(
            admit(&req, "PATCH", "/x", &h(&[])),
            Admission::Reject(Rejection::MissingKey { .. })
        ));
    }

    #[test]
    fn scope_ignores_query_but_not_credentials() {
        let c = Config::default();
        let id = |path: &str, auth: &str| match admit(
            &c,
            "POST",
            path,
            &h(&[("idempotency-key", "k"), ("authorization", auth)]),
        ) {
            Admission::Inspect(p) => p.key_id,
            other => panic!("{other:?}"),
        };
        assert_eq!(id("/a?x=1", "t"), id("/a?x=2", "t"));
        assert_ne!(id("/a", "t"), id("/a", "u"));
        assert_ne!(id("/a", "t"), id("/b", "t"));
    }

    #[test]
    fn decisions() {
        let c = Config::default();
        let fp = Fingerprint([1; 32]);
        let req = Request {
            fingerprint: fp,
            owner: 5,
        };
        let now = 10_000;
        let done = Record::Completed {
            owner: 1,
            expires_at: now + 1,
            fingerprint: fp,
            response: StoredResponse {
                status: 201,
                headers: vec![],
                body: b"ok".to_vec(),
            },
        };
        assert!(
            matches!(decide(&c, &req, Some(&done), now), Decision::Replay(r) if r.body == b"ok")
        );
        let other = Request {
            fingerprint: Fingerprint([2; 32]),
            owner: 5,
        };
        assert_eq!(
            decide(&c, &other, Some(&done), now),
            Decision::Reject(Rejection::Mismatch)
        );
        assert!(matches!(
            decide(&c, &req, Some(&done), now + 1),
            Decision::Forward {
                lease_expired: false,
                ..
            }
        ));
        let busy = Record::InFlight {
            owner: 1,
            lease_until: now + 1,
            expires_at: now + 100,
            fingerprint: fp,
        };
        assert_eq!(
            decide(&c, &req, Some(&busy), now),
            Decision::Reject(Rejection::Conflict { retry_after_s: 1 })
        );
        assert_eq!(
            decide(&c, &other, Some(&busy), now),
            Decision::Reject(Rejection::Conflict { retry_after_s: 1 })
        );
        assert!(matches!(
            decide(&c, &req, Some(&busy), now + 1),
            Decision::Forward {
                lease_expired: true,
                ..
            }
        ));
        match decide(&c, &req, None, now) {
            Decision::Forward {
                claim,
                lease_expired: false,
            } => {
                assert_eq!(claim.owner, 5);
                assert_eq!(claim.expires_at, now + c.ttl_ms);
                assert_eq!(claim.lease_until, now + c.lease_ms);
            }
            other => panic!("{other:?}"),
        }
    }
}
