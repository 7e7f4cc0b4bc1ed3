//! Fleet mode in Envoy: etcd as the authoritative store, reached over its native gRPC API
//! with `dispatch_grpc_call` (the cluster named by `store.etcd.cluster` speaks HTTP/2, with
//! TLS and client certificates when its `transport_socket` says so). Every decision is
//! `idemgate_core::fleet`'s; this module dispatches calls and carries the request on.
//!
//! - A claim is made from the request's own context while its headers are held.
//! - A claim is settled (completion, release) from the response's context first, holding
//!   the response's last bytes until etcd has the record (so a retry sent right after the
//!   answer gets the replay), for at most `timeoutMillis × (retries + 1)`; then the root
//!   context retries it, idempotently by owner token, until it lands or the claim's
//!   in-flight lease may have lapsed.
//! - A claim that may have committed while every attempt went unanswered, and whose request
//!   was answered 503, is withdrawn by the root context as soon as etcd answers again.
//! - The root context keeps in-flight leases alive while claims on them are unsettled,
//!   grants them ahead of the claims, and polls the keys parked requests wait on.
//!
//! The SDK delivers a call's answer to the context that was running when it was
//! dispatched, so work that must outlive a stream is dispatched from the root context's
//! tick (or its own answers).
mod claim;
mod settle;
mod waiters;

pub(crate) use claim::FleetClaim;
pub(crate) use settle::{root_answered, ResponseHold, Settling};
pub(crate) use waiters::{answer_completed, forget_waiter};

use settle::*;
use waiters::*;

use super::*;
use idemgate_core::config::EtcdSpec;
use idemgate_core::fleet::calls::{parse_grant, parse_keepalive, Kv, Reply};
use idemgate_core::fleet::{
    cache_value, Call, ClaimFlow, EtcdError, Fleet, FleetHandle, Lease, Refresh, Step, ValuePolicy,
    Write, WriteKind, WriteStep, Written,
};
use idemgate_core::{Decision, Record};

/// How often the root context ticks in fleet mode: queued writes, keep-alives, parked
/// requests' polls, held responses' bounds.
pub(crate) const FLEET_TICK_MS: u32 = 10;

/// How often the root context looks for leases to grant ahead of the claims.
const GRANT_AHEAD_MS: u64 = 200;

// ------------------------------------------------------------------------------ calls

/// `envoy.config.core.v3.GrpcService` with its `envoy_grpc` target: the upstream argument
/// of `dispatch_grpc_call`, naming the cluster and the `:authority` of the calls. (Envoy
/// also takes a bare cluster name, but tries it as this message first.)
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

/// `envoy.config.core.v3.GrpcService.EnvoyGrpc`.
#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(string, tag = "2")]
    authority: String,
}

/// The upstream argument for the calls of `spec` (the SDK passes it as text: when the
/// encoded message is not UTF-8, the bare cluster name, with Envoy's default authority).
fn upstream(spec: &EtcdSpec) -> String {
    use prost::Message;
    let bytes = GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: spec.cluster.clone(),
            authority: spec.authority.clone(),
        }),
    }
    .encode_to_vec();
    String::from_utf8(bytes).unwrap_or_else(|_| spec.cluster.clone())
}

/// Dispatches `call` to the etcd cluster from the current context.
fn dispatch(spec: &EtcdSpec, call: &Call) -> Result<u32, String> {
    hostcalls::dispatch_grpc_call(
        &upstream(spec),
        call.service,
        call.method,
        vec![],
        Some(&call.message),
        std::time::Duration::from_millis(spec.timeout_ms),
    )
    .map_err(|e| format!("gRPC call to cluster {:?} failed: {e:?}", spec.cluster))
}

/// A gRPC answer, owned: status, message and status text.
pub(crate) struct Answer {
    code: u32,
    body: Vec<u8>,
    message: String,
}

impl Answer {
    /// The answer to the call being answered (`on_grpc_call_response`).
    pub(crate) fn read(code: u32, size: usize) -> Self {
        if code == 0 {
            let body = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default();
            return Self {
                code,
                body,
                message: String::new(),
            };
        }
        let message = hostcalls::get_grpc_status()
            .ok()
            .and_then(|(_, m)| m)
            .unwrap_or_default();
        Self {
            code,
            body: Vec::new(),
            message,
        }
    }

    fn reply(&self) -> Reply<'_> {
        if self.code == 0 {
            Reply::Ok(&self.body)
        } else {
            Reply::Failed {
                code: self.code,
                message: &self.message,
            }
        }
    }
}

fn cached_lease(s: &Shared, lease: Lease) -> Option<i64> {
    let spec = s.config.store_etcd.as_ref()?;
    let key = lease.cache_key(&s.config.store_namespace, spec.lease_bucket_ms);
    match hostcalls::get_shared_data(&key) {
        Ok((Some(v), _)) => lease.parse_cache(&v),
        _ => None,
    }
}

fn cache_lease(s: &Shared, lease: Lease, id: i64) {
    if let Some(spec) = s.config.store_etcd.as_ref() {
        let key = lease.cache_key(&s.config.store_namespace, spec.lease_bucket_ms);
        let value = lease.cache_value(id);
        let _ = hostcalls::set_shared_data(&key, Some(value.as_bytes()), None);
    }
}

fn cache_completed(s: &Shared, key_id: &idemgate_core::KeyId, record: &Record) {
    if let Some(f) = Fleet::new(&s.config) {
        let value = cache_value(key_id, record);
        if f.value_policy(value.len()) == ValuePolicy::Store {
            let _ = hostcalls::set_shared_data(&f.cache_key(key_id), Some(&value), None);
        }
    }
}

/// A forwarded claim's in-flight lease no longer needs keeping alive for it.
pub(crate) fn unhold(s: &Shared, handle: &FleetHandle) {
    s.keepalives.borrow_mut().release(handle.inflight_lease);
}

// ------------------------------------------------------------------------------ root tick

/// The root context's fleet work at each tick.
pub(crate) fn tick(root: u32, s: &Rc<Shared>, granted_ahead_at: &mut u64) {
    poll_fleet_waiters(root);
    let now = now_ms();
    let due = s.keepalives.borrow_mut().due(now);
    for lease in due {
        queue(s, FleetOp::KeepAlive(lease), now);
    }
    if now.saturating_sub(*granted_ahead_at) >= GRANT_AHEAD_MS {
        *granted_ahead_at = now;
        grant_ahead(s, now);
    }
    release_due_holds(root, now);
    drain(root, now);
}

thread_local! {
    /// Leases this worker is granting ahead (answers pending).
    static GRANTING_AHEAD: RefCell<Vec<Lease>> = const { RefCell::new(Vec::new()) };
}

/// Grants, from the root context, the in-flight leases the rules' claims are about to need
/// and that no worker of this Envoy has cached yet, so that claims rarely wait for a grant
/// (and do not all grant the same lease at once when a window begins).
fn grant_ahead(s: &Rc<Shared>, now: u64) {
    let mut seen: Vec<u64> = Vec::new();
    for rule in s.config.rules() {
        if seen.contains(&rule.lease_ms) {
            continue;
        }
        seen.push(rule.lease_ms);
        for lease in idemgate_core::fleet::lease::leases_ahead(rule.lease_ms, now)
            .into_iter()
            .flatten()
        {
            let pending = GRANTING_AHEAD.with(|g| g.borrow().contains(&lease));
            if !pending && cached_lease(s, lease).is_none() {
                GRANTING_AHEAD.with(|g| g.borrow_mut().push(lease));
                s.metrics.inc("fleet_leases");
                queue(s, FleetOp::Grant(lease), now);
            }
        }
    }
}
