//! etcd's gRPC calls as values: what to send ([`Call`]) and what an answer means
//! ([`Reply`] → the parsed result or an [`EtcdError`]).
//!
//! ```
//! use idemgate_core::fleet::calls::{parse_keepalive, keepalive_call, Reply};
//! let call = keepalive_call(7);
//! assert_eq!((call.service, call.method), ("etcdserverpb.Lease", "LeaseKeepAlive"));
//! // TTL 30 restored
//! assert_eq!(parse_keepalive(&Reply::Ok(&[0x10, 7, 0x18, 30])), Ok(Some(30)));
//! // Envoy's timeout of the call
//! assert!(parse_keepalive(&Reply::Failed { code: 4, message: "timeout" }).is_err());
//! ```
use prost::Message;

use super::messages::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, KeyValue, LeaseGrantRequest,
    LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse, COMPARE_EQUAL, KV_SERVICE, LEASE_SERVICE,
    TARGET_CREATE, TARGET_MOD, TARGET_VALUE,
};

/// One unary gRPC call to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// gRPC service (`etcdserverpb.KV`, `etcdserverpb.Lease`).
    pub service: &'static str,
    /// Method of the service.
    pub method: &'static str,
    /// The request message, encoded.
    pub message: Vec<u8>,
}

impl Call {
    fn new(service: &'static str, method: &'static str, message: &impl Message) -> Self {
        Self {
            service,
            method,
            message: message.encode_to_vec(),
        }
    }
}

/// What the host got back for a [`Call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Status OK, with the response message.
    Ok(&'a [u8]),
    /// Any other gRPC status: etcd's (no leader, lease not found, …) or Envoy's own for a
    /// call that got no answer (timeout, reset, no healthy member).
    Failed {
        /// The gRPC status code.
        code: u32,
        /// The status message, if any.
        message: &'a str,
    },
}

/// gRPC status codes after which etcd has certainly not applied the request (it refused
/// it); any other failure may hide a write that was applied (a timeout, a reset, a member
/// that lost its leader while proposing).
const REFUSED_CODES: [u32; 8] = [
    3,  // INVALID_ARGUMENT (e.g. request too large)
    6,  // ALREADY_EXISTS
    7,  // PERMISSION_DENIED
    8,  // RESOURCE_EXHAUSTED (NOSPACE alarm)
    9,  // FAILED_PRECONDITION
    11, // OUT_OF_RANGE
    12, // UNIMPLEMENTED (not an etcd v3 endpoint)
    16, // UNAUTHENTICATED
];
/// `NOT_FOUND`: from the KV and Lease calls idemgate makes, only "requested lease not found".
const NOT_FOUND: u32 = 5;

/// Why an etcd answer is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No answer (timeout, reset, no healthy member) or an etcd error that does not say the
    /// request was not applied (no leader, request timed out): a write may have landed.
    Unavailable(String),
    /// etcd refused the request (too large, no space, permission): nothing was written.
    Refused(String),
    /// The lease named in a put does not exist (lapsed, or granted by a lost cluster).
    LeaseNotFound,
    /// An answer that is not what etcd sends.
    Malformed(String),
}

impl EtcdError {
    /// Whether a write that got this answer may nevertheless have been applied.
    pub fn may_have_written(&self) -> bool {
        matches!(self, EtcdError::Unavailable(_) | EtcdError::Malformed(_))
    }
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdError::Unavailable(s) => write!(f, "etcd unavailable: {s}"),
            EtcdError::Refused(s) => write!(f, "etcd refused the request: {s}"),
            EtcdError::LeaseNotFound => write!(f, "etcd: requested lease not found"),
            EtcdError::Malformed(s) => write!(f, "etcd answer malformed: {s}"),
        }
    }
}

/// The decoded message of a successful reply, or why there is none.
fn answer<M: Message + Default>(reply: &Reply<'_>) -> Result<M, EtcdError> {
    match *reply {
        Reply::Ok(bytes) => M::decode(bytes).map_err(|e| EtcdError::Malformed(e.to_string())),
        Reply::Failed { code, message } => {
            let what = if message.is_empty() {
                format!("gRPC status {code}")
            } else {
                format!("gRPC status {code}: {message}")
            };
            Err(if code == NOT_FOUND {
                EtcdError::LeaseNotFound
            } else if REFUSED_CODES.contains(&code) {
                EtcdError::Refused(what)
            } else {
                EtcdError::Unavailable(what)
            })
        }
    }
}

// ------------------------------------------------------------------------------ leases

/// `Lease/LeaseGrant` for `ttl_s` seconds.
pub fn grant_call(ttl_s: u64) -> Call {
    Call::new(
        LEASE_SERVICE,
        "LeaseGrant",
        &LeaseGrantRequest {
            ttl: i64::try_from(ttl_s).unwrap_or(i64::MAX),
        },
    )
}

/// The lease id of a grant answer.
pub fn parse_grant(reply: &Reply<'_>) -> Result<i64, EtcdError> {
    let r: LeaseGrantResponse = answer(reply)?;
    if !r.error.is_empty() {
        return Err(EtcdError::Unavailable(r.error));
    }
    if r.id <= 0 {
        return Err(EtcdError::Malformed(format!("lease id {}", r.id)));
    }
    Ok(r.id)
}

/// `Lease/LeaseKeepAlive` (a bidirectional stream; one request and its one answer) for
/// `lease`.
pub fn keepalive_call(lease: i64) -> Call {
    Call::new(
        LEASE_SERVICE,
        "LeaseKeepAlive",
        &LeaseKeepAliveRequest { id: lease },
    )
}

/// The TTL a keep-alive restored (`Some`), or `None` when etcd no longer has the lease (it
/// answers TTL 0).
pub fn parse_keepalive(reply: &Reply<'_>) -> Result<Option<u64>, EtcdError> {
    let r: LeaseKeepAliveResponse = answer(reply)?;
    Ok(u64::try_from(r.ttl).ok().filter(|t| *t > 0))
}

// ------------------------------------------------------------------------------ kv

/// A key-value as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// Revision of the last write.
    pub mod_revision: i64,
    /// The value.
    pub value: Vec<u8>,
    /// Attached lease (0: none).
    pub lease: i64,
}

impl From<KeyValue> for Kv {
    fn from(kv: KeyValue) -> Self {
        Self {
            mod_revision: kv.mod_revision,
            value: kv.value,
            lease: kv.lease,
        }
    }
}

/// `KV/Range` of one key; `serializable`: answered by the member asked from its own state
/// (cheap, possibly a little behind), else linearizable.
pub fn range_call(key: &str, serializable: bool) -> Call {
    Call::new(
        KV_SERVICE,
        "Range",
        &RangeRequest {
            key: key.as_bytes().to_vec(),
            serializable,
        },
    )
}

/// Parses a range answer: the key's value and revision, if present.
pub fn parse_range(reply: &Reply<'_>) -> Result<Option<Kv>, EtcdError> {
    let r: RangeResponse = answer(reply)?;
    Ok(r.kvs.into_iter().next().map(Kv::from))
}

/// What a txn answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compare held (the success branch ran).
    pub succeeded: bool,
    /// The cluster revision after the txn (the revision of our put when it succeeded).
    pub revision: i64,
    /// On failure, the key as the failure branch's range found it (`None`: absent).
    pub current: Option<Kv>,
}

/// Parses a txn answer.
pub fn parse_txn(reply: &Reply<'_>) -> Result<TxnResult, EtcdError> {
    let r: TxnResponse = answer(reply)?;
    let revision = r
        .header
        .map(|h| h.revision)
        .filter(|rev| *rev > 0)
        .ok_or_else(|| EtcdError::Malformed("txn without header.revision".into()))?;
    let current = if r.succeeded {
        None
    } else {
        r.responses
            .into_iter()
            .find_map(|op| match op.response {
                Some(response_op::Response::Range(range)) => range.kvs.into_iter().next(),
                _ => None,
            })
            .map(Kv::from)
    };
    Ok(TxnResult {
        succeeded: r.succeeded,
        revision,
        current,
    })
}

/// The condition a txn is written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Create,
    /// The key must still be at this revision.
    Revision(i64),
    /// The key must hold exactly this value.
    Value(Vec<u8>),
}

fn compare(key: &str, expect: &Expect) -> Compare {
    let (target, union) = match expect {
        Expect::Create => (TARGET_CREATE, compare::TargetUnion::CreateRevision(0)),
        Expect::Revision(rev) => (TARGET_MOD, compare::TargetUnion::ModRevision(*rev)),
        Expect::Value(v) => (TARGET_VALUE, compare::TargetUnion::Value(v.clone())),
    };
    Compare {
        result: COMPARE_EQUAL,
        target,
        key: key.as_bytes().to_vec(),
        target_union: Some(union),
    }
}

/// A put of `value` with `lease` (0: none).
pub fn put_op(key: &str, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::Put(PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
        })),
    }
}

/// A delete of the key.
pub fn delete_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::DeleteRange(DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
        })),
    }
}

/// `KV/Txn`: when `expect` holds, `success`; else read the key (its current value tells
/// what happened: ours, someone else's, or gone).
pub fn txn(key: &str, expect: &Expect, success: RequestOp) -> Call {
    Call::new(
        KV_SERVICE,
        "Txn",
        &TxnRequest {
            compare: vec![compare(key, expect)],
            success: vec![success],
            failure: vec![RequestOp {
                request: Some(request_op::Request::Range(RangeRequest {
                    key: key.as_bytes().to_vec(),
                    serializable: false,
                })),
            }],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::super::messages::{RangeResponse, ResponseHeader, ResponseOp};
    use super::*;

    fn txn_of(call: &Call) -> TxnRequest {
        assert_eq!((call.service, call.method), (KV_SERVICE, "Txn"));
        TxnRequest::decode(&call.message[..]).unwrap()
    }

    #[test]
    fn statuses_say_whether_a_write_may_have_landed() {
        let e = |code| parse_range(&Reply::Failed { code, message: "m" }).unwrap_err();
        assert_eq!(e(5), EtcdError::LeaseNotFound);
        for code in [1, 2, 4, 10, 13, 14, 15, 99] {
            assert!(e(code).may_have_written(), "{code}");
        }
        for code in REFUSED_CODES {
            assert!(!e(code).may_have_written(), "{code}");
            assert!(e(code).to_string().contains(&format!("status {code}: m")));
        }
        // malformed answers are errors, never panics
        for junk in [&[0xff][..], &[0x0a, 0x05, 1], &[0x12]] {
            assert!(matches!(
                parse_txn(&Reply::Ok(junk)),
                Err(EtcdError::Malformed(_))
            ));
        }
        // a txn answer without its header revision is not etcd's
        assert!(parse_txn(&Reply::Ok(&[])).is_err());
    }

    #[test]
    fn txn_answers_carry_the_failure_branch_read() {
        let kv = KeyValue {
            key: b"/k".to_vec(),
            create_revision: 3,
            mod_revision: 4,
            value: b"v".to_vec(),
            lease: 9,
        };
        let failed = TxnResponse {
            header: Some(ResponseHeader { revision: 5 }),
            succeeded: false,
            responses: vec![ResponseOp {
                response: Some(response_op::Response::Range(RangeResponse {
                    header: None,
                    kvs: vec![kv],
                })),
            }],
        }
        .encode_to_vec();
        assert_eq!(
            parse_txn(&Reply::Ok(&failed)),
            Ok(TxnResult {
                succeeded: false,
                revision: 5,
                current: Some(Kv {
                    mod_revision: 4,
                    value: b"v".to_vec(),
                    lease: 9
                })
            })
        );
        let call = txn("/k", &Expect::Value(b"x".to_vec()), delete_op("/k"));
        let t = txn_of(&call);
        assert_eq!(t.compare[0].target, TARGET_VALUE);
        assert_eq!(
            t.compare[0].target_union,
            Some(compare::TargetUnion::Value(b"x".to_vec()))
        );
        assert!(matches!(
            t.failure[0].request,
            Some(request_op::Request::Range(_))
        ));
        let g = parse_grant(&Reply::Ok(
            &LeaseGrantResponse {
                header: None,
                id: 0,
                ttl: 1,
                error: String::new(),
            }
            .encode_to_vec(),
        ));
        assert!(matches!(g, Err(EtcdError::Malformed(_))));
        let g = parse_grant(&Reply::Ok(
            &LeaseGrantResponse {
                header: None,
                id: 3,
                ttl: 1,
                error: "too many".into(),
            }
            .encode_to_vec(),
        ));
        assert!(matches!(g, Err(EtcdError::Unavailable(_))));
    }
}
