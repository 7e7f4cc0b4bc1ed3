//! The few etcd v3 gRPC messages fleet mode sends and reads, as `prost` structs derived by
//! hand (no protoc, no build script).
//!
//! Field numbers and types are those of etcd's own definitions, for the etcd 3.4 the tests
//! run (Debian `etcd-server` 3.4.23), and unchanged in later releases:
//! `etcdserver/etcdserverpb/rpc.proto` and `mvcc/mvccpb/kv.proto` of etcd-io/etcd at tag
//! v3.4.23 (commit 98c7692ddd3bc5677bcceeb1da9158b128abd1cc; moved to `api/etcdserverpb/` and
//! `api/mvccpb/` in 3.5). Only the fields idemgate uses are declared: protobuf decoding skips
//! the others, and an unset field is not encoded.
//!
//! ```
//! use idemgate_core::fleet::messages::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
//! use prost::Message;
//! let bytes = LeaseKeepAliveRequest { id: 7 }.encode_to_vec();
//! assert_eq!(bytes, [0x08, 7]); // field 1, varint 7
//! let answer = LeaseKeepAliveResponse::decode(&[0x10, 7, 0x18, 30][..]).unwrap();
//! assert_eq!((answer.id, answer.ttl), (7, 30));
//! ```

/// gRPC service of the key-value calls.
pub const KV_SERVICE: &str = "etcdserverpb.KV";
/// gRPC service of the lease calls.
pub const LEASE_SERVICE: &str = "etcdserverpb.Lease";

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// The key-value store revision when the request was applied.
    #[prost(int64, tag = "3")]
    pub revision: i64,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Revision of the last creation of the key.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// Revision of the last modification of the key.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// The value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// Lease attached to the key (0: none).
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// `etcdserverpb.RangeRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Served by the member asked, from its local state, without a round of the leader:
    /// possibly stale.
    #[prost(bool, tag = "7")]
    pub serializable: bool,
}

/// `etcdserverpb.RangeResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The keys found.
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
}

/// `etcdserverpb.PutRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// Lease to attach (0: none).
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

/// `etcdserverpb.PutResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `etcdserverpb.DeleteRangeRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeRequest {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
}

/// `etcdserverpb.DeleteRangeResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Keys deleted.
    #[prost(int64, tag = "2")]
    pub deleted: i64,
}

/// `etcdserverpb.RequestOp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestOp {
    /// The operation.
    #[prost(oneof = "request_op::Request", tags = "1, 2, 3")]
    pub request: Option<request_op::Request>,
}

/// The `request` oneof of [`RequestOp`].
pub mod request_op {
    /// One operation of a txn branch.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        /// `request_range`.
        #[prost(message, tag = "1")]
        Range(super::RangeRequest),
        /// `request_put`.
        #[prost(message, tag = "2")]
        Put(super::PutRequest),
        /// `request_delete_range`.
        #[prost(message, tag = "3")]
        DeleteRange(super::DeleteRangeRequest),
    }
}

/// `etcdserverpb.ResponseOp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseOp {
    /// The operation's answer.
    #[prost(oneof = "response_op::Response", tags = "1, 2, 3")]
    pub response: Option<response_op::Response>,
}

/// The `response` oneof of [`ResponseOp`].
pub mod response_op {
    /// The answer to one operation of a txn branch.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        /// `response_range`.
        #[prost(message, tag = "1")]
        Range(super::RangeResponse),
        /// `response_put`.
        #[prost(message, tag = "2")]
        Put(super::PutResponse),
        /// `response_delete_range`.
        #[prost(message, tag = "3")]
        DeleteRange(super::DeleteRangeResponse),
    }
}

/// `Compare.CompareResult.EQUAL`.
pub const COMPARE_EQUAL: i32 = 0;
/// `Compare.CompareTarget.CREATE` (the key's create revision).
pub const TARGET_CREATE: i32 = 1;
/// `Compare.CompareTarget.MOD` (the key's mod revision).
pub const TARGET_MOD: i32 = 2;
/// `Compare.CompareTarget.VALUE` (the key's value).
pub const TARGET_VALUE: i32 = 3;

/// `etcdserverpb.Compare`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Compare {
    /// `CompareResult` ([`COMPARE_EQUAL`]).
    #[prost(int32, tag = "1")]
    pub result: i32,
    /// `CompareTarget` ([`TARGET_CREATE`], [`TARGET_MOD`], [`TARGET_VALUE`]).
    #[prost(int32, tag = "2")]
    pub target: i32,
    /// The key compared.
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    /// What it is compared with.
    #[prost(oneof = "compare::TargetUnion", tags = "5, 6, 7")]
    pub target_union: Option<compare::TargetUnion>,
}

/// The `target_union` oneof of [`Compare`].
pub mod compare {
    /// The value a compare expects.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum TargetUnion {
        /// `create_revision`.
        #[prost(int64, tag = "5")]
        CreateRevision(i64),
        /// `mod_revision`.
        #[prost(int64, tag = "6")]
        ModRevision(i64),
        /// `value`.
        #[prost(bytes, tag = "7")]
        Value(Vec<u8>),
    }
}

/// `etcdserverpb.TxnRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRequest {
    /// Conditions, all of which must hold.
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    /// Operations when they hold.
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    /// Operations when they do not.
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

/// `etcdserverpb.TxnResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Whether the conditions held.
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
    /// Answers of the branch that ran.
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<ResponseOp>,
}

/// `etcdserverpb.LeaseGrantRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantRequest {
    /// `TTL`, seconds.
    #[prost(int64, tag = "1")]
    pub ttl: i64,
}

/// `etcdserverpb.LeaseGrantResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// `ID` of the lease granted.
    #[prost(int64, tag = "2")]
    pub id: i64,
    /// `TTL` granted, seconds.
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    /// Why no lease was granted.
    #[prost(string, tag = "4")]
    pub error: String,
}

/// `etcdserverpb.LeaseKeepAliveRequest` (one message of the `LeaseKeepAlive` stream).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveRequest {
    /// `ID` of the lease.
    #[prost(int64, tag = "1")]
    pub id: i64,
}

/// `etcdserverpb.LeaseKeepAliveResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// `ID` of the lease.
    #[prost(int64, tag = "2")]
    pub id: i64,
    /// `TTL` restored, seconds; 0 when etcd no longer has the lease.
    #[prost(int64, tag = "3")]
    pub ttl: i64,
}
