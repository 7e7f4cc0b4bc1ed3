//! Claim and settle flows against etcd answers built from the protobuf messages.
use prost::Message;

use super::calls::Reply;
use super::claim::MAX_ROUNDS;
use super::messages::{
    compare::TargetUnion, request_op, response_op, KeyValue, RangeRequest, RangeResponse,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse, KV_SERVICE, TARGET_CREATE, TARGET_MOD,
    TARGET_VALUE,
};
use super::*;
use crate::decision::{Decision, Rejection, Request};
use crate::fingerprint::Fingerprint;
use crate::record::StoredResponse;

fn cfg(extra: &str) -> Config {
    Config::from_json(&format!(
        r#"{{"ttlSeconds": 60, "leaseSeconds": 10, "store": {{"namespace": "ns", "etcd": {{"leaseBucketSeconds": 30, "retries": 1, "maxValueBytes": 2048 {extra}}}}}}}"#
    ))
    .unwrap()
}

fn req(fp: u8, owner: u64) -> Request {
    Request {
        fingerprint: Fingerprint([fp; 32]),
        owner,
        expires_in_ms: None,
    }
}

/// Another request's records for the key (fingerprint 1, expiring at 70 s).
fn theirs_in_flight(lease_until: u64) -> Record {
    Record::InFlight {
        owner: 5,
        lease_until,
        expires_at: 70_000,
        fingerprint: Fingerprint([1; 32]),
    }
}

fn theirs_completed() -> Record {
    Record::Completed {
        owner: 5,
        expires_at: 70_000,
        fingerprint: Fingerprint([1; 32]),
        response: StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body: b"made".to_vec(),
        },
    }
}

fn txn_of(call: &Call) -> TxnRequest {
    assert_eq!((call.service, call.method), (KV_SERVICE, "Txn"));
    TxnRequest::decode(&call.message[..]).unwrap()
}

/// (target, expected value) of the txn's compare.
fn compare_of(call: &Call) -> (i32, TargetUnion) {
    let t = txn_of(call);
    (
        t.compare[0].target,
        t.compare[0].target_union.clone().unwrap(),
    )
}

/// The put of the txn's success branch: (value, lease).
fn put_of(call: &Call) -> (Vec<u8>, i64) {
    match txn_of(call).success[0].request.clone() {
        Some(request_op::Request::Put(p)) => (p.value, p.lease),
        other => panic!("{other:?}"),
    }
}

fn ok(m: &impl Message) -> Vec<u8> {
    m.encode_to_vec()
}

fn succeeded(rev: i64) -> Vec<u8> {
    ok(&TxnResponse {
        header: Some(ResponseHeader { revision: rev }),
        succeeded: true,
        responses: vec![],
    })
}

fn failed_with(rev: i64, value: Option<&[u8]>) -> Vec<u8> {
    failed_with_lease(rev, value, 77)
}

fn failed_with_lease(rev: i64, value: Option<&[u8]>, lease: i64) -> Vec<u8> {
    let kvs = value
        .map(|v| KeyValue {
            key: b"x".to_vec(),
            create_revision: 5,
            mod_revision: rev - 1,
            value: v.to_vec(),
            lease,
        })
        .into_iter()
        .collect();
    ok(&TxnResponse {
        header: Some(ResponseHeader { revision: rev }),
        succeeded: false,
        responses: vec![ResponseOp {
            response: Some(response_op::Response::Range(RangeResponse {
                header: None,
                kvs,
            })),
        }],
    })
}

fn range_with(rev: i64, value: Option<&[u8]>) -> Vec<u8> {
    ok(&RangeResponse {
        header: Some(ResponseHeader { revision: rev }),
        kvs: value
            .map(|v| KeyValue {
                key: b"x".to_vec(),
                create_revision: 5,
                mod_revision: rev,
                value: v.to_vec(),
                lease: 77,
            })
            .into_iter()
            .collect(),
    })
}

const TIMEOUT: Reply<'static> = Reply::Failed {
    code: 4,
    message: "upstream request timeout",
};

#[test]
fn claim_on_absent_key_forwards() {
    let c = cfg("");
    let f = Fleet::new(&c).unwrap();
    let rule = &c.default_rule;
    let k = KeyId([1; 16]);
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
    assert_eq!(flow.deadline(), 90_000); // expires 61_000 → bucket of 30 s
    assert_eq!(flow.key(), format!("/idemgate/ns/{}", k.to_hex()));
    let call = flow.call(77, 66);
    let t = txn_of(&call);
    assert_eq!(t.compare[0].key, flow.key().as_bytes());
    assert_eq!(
        compare_of(&call),
        (TARGET_CREATE, TargetUnion::CreateRevision(0))
    );
    let (value, lease) = put_of(&call);
    assert_eq!(lease, 77);
    assert_eq!(Record::decode(&value).unwrap(), flow.claim().record());
    match &t.failure[0].request {
        Some(request_op::Request::Range(r)) => {
            assert_eq!(r.key, flow.key().as_bytes());
            assert!(!r.serializable);
        }
        other => panic!("{other:?}"),
    }
    match flow.on_answer(rule, &Reply::Ok(&succeeded(12)), 1_010) {
        Step::Forward(h) => {
            assert_eq!(h.mod_revision, 12);
            // the in-flight record rides the in-flight lease; the expiry lease waits
            assert_eq!(h.inflight_lease, 77);
            assert_eq!(h.lease, 66);
            assert_eq!(h.inflight, InFlightLease::at(10_000, 1_000));
            assert_eq!(h.claim.owner, 9);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn in_flight_elsewhere_conflicts_completed_replays_or_mismatches() {
    let c = cfg("");
    let f = Fleet::new(&c).unwrap();
    let rule = &c.default_rule;
    let k = KeyId([2; 16]);
    let other = theirs_in_flight(20_000);
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
    flow.call(77, 66);
    assert_eq!(
        flow.on_answer(
            rule,
            &Reply::Ok(&failed_with(30, Some(&other.encode()))),
            1_000
        ),
        Step::Answer {
            decision: Decision::Reject(Rejection::Conflict { retry_after_s: 1 }),
            completed: None
        }
    );
    let done = theirs_completed();
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 10), 2_000);
    flow.call(77, 66);
    match flow.on_answer(
        rule,
        &Reply::Ok(&failed_with(31, Some(&done.encode()))),
        2_000,
    ) {
        Step::Answer {
            decision: Decision::Replay(r),
            completed: Some(rec),
        } => {
            assert_eq!(r.body, b"made");
            assert_eq!(rec, done);
        }
        other => panic!("{other:?}"),
    }
    let mut flow = ClaimFlow::start(&f, rule, k, req(2, 11), 2_000);
    flow.call(77, 66);
    assert!(matches!(
        flow.on_answer(
            rule,
            &Reply::Ok(&failed_with(31, Some(&done.encode()))),
            2_000
        ),
        Step::Answer {
            decision: Decision::Reject(Rejection::Mismatch),
            ..
        }
    ));
}

#[test]
fn wait_policy_polls_with_cheap_reads_then_replays_claims_or_gives_up_at_its_deadline() {
    let w = Config::from_json(
        r#"{"leaseSeconds": 2, "onConcurrent": {"action": "wait", "waitMillis": 5000}, "store": {"etcd": {"leaseBucketSeconds": 30}}}"#,
    )
    .unwrap();
    let fw = Fleet::new(&w).unwrap();
    let rule = &w.default_rule;
    let k = KeyId([9; 16]);
    let theirs = theirs_in_flight(2_000).encode();
    let mut flow = ClaimFlow::start(&fw, rule, k, req(1, 12), 1_000);
    flow.call(1, 66);
    assert_eq!(
        flow.on_answer(rule, &Reply::Ok(&failed_with(30, Some(&theirs))), 1_000),
        Step::Wait { deadline: 6_000 }
    );
    // polled with a serializable range (no raft round), not with the claim txn
    let poll = flow.poll_call();
    assert_eq!((poll.service, poll.method), (KV_SERVICE, "Range"));
    let r = RangeRequest::decode(&poll.message[..]).unwrap();
    assert!(r.serializable);
    assert_eq!(r.key, flow.key().as_bytes());
    // still in flight (past the record's own lease: the etcd lease holds it): wait on
    let in_flight = range_with(30, Some(&theirs));
    for now in [1_030, 5_900] {
        assert_eq!(
            flow.on_poll(rule, &Reply::Ok(&in_flight), now),
            Step::Wait { deadline: 6_000 }
        );
    }
    // a failed poll waits on too, until the deadline, then the fail policy answers
    assert_eq!(
        flow.on_poll(rule, &TIMEOUT, 5_950),
        Step::Wait { deadline: 6_000 }
    );
    assert!(matches!(
        flow.on_poll(rule, &TIMEOUT, 6_000),
        Step::Unavailable {
            maybe_claimed: false,
            ..
        }
    ));
    assert_eq!(
        flow.on_poll(rule, &Reply::Ok(&in_flight), 6_000),
        Step::Answer {
            decision: Decision::Reject(Rejection::Conflict { retry_after_s: 1 }),
            completed: None
        }
    );
    // completed meanwhile: the waiter replays it
    let done = theirs_completed();
    let mut flow = ClaimFlow::start(&fw, rule, k, req(1, 13), 1_000);
    flow.call(1, 66);
    flow.on_answer(rule, &Reply::Ok(&failed_with(30, Some(&theirs))), 1_000);
    assert!(matches!(
        flow.on_poll(
            rule,
            &Reply::Ok(&range_with(31, Some(&done.encode()))),
            1_110
        ),
        Step::Answer {
            decision: Decision::Replay(_),
            completed: Some(_)
        }
    ));
    // released meanwhile: the poll finds no key and a create txn follows; the claim starts
    // at the poll, in a later in-flight window, so its leases are asked for again
    let mut flow = ClaimFlow::start(&fw, rule, k, req(1, 14), 1_000);
    flow.call(1, 66);
    flow.on_answer(rule, &Reply::Ok(&failed_with(30, Some(&theirs))), 1_000);
    assert_eq!(
        flow.on_poll(rule, &Reply::Ok(&range_with(31, None)), 2_200),
        Step::NeedLeases { fresh: false }
    );
    assert_eq!(
        flow.leases()[0],
        Lease::InFlight(InFlightLease {
            ttl_s: 2,
            generation: 2
        })
    );
    let call = flow.call(3, 66);
    assert_eq!(compare_of(&call).0, TARGET_CREATE);
    match flow.on_answer(rule, &Reply::Ok(&succeeded(40)), 2_210) {
        Step::Forward(h) => {
            assert_eq!(h.claim.expires_at, 2_200 + rule.ttl_ms);
            assert_eq!(h.inflight_lease, 3);
        }
        other => panic!("{other:?}"),
    }
    // a lapsed record found by a poll is taken over on its revision
    let mut flow = ClaimFlow::start(&fw, rule, k, req(1, 15), 1_000);
    flow.call(1, 66);
    flow.on_answer(rule, &Reply::Ok(&failed_with(30, Some(&theirs))), 1_000);
    let lapsed = ok(&RangeResponse {
        header: Some(ResponseHeader { revision: 44 }),
        kvs: vec![KeyValue {
            key: vec![],
            create_revision: 1,
            mod_revision: 43,
            value: theirs.clone(),
            lease: 0,
        }],
    });
    flow.on_poll(rule, &Reply::Ok(&lapsed), 2_500);
    let call = flow.call(3, 66);
    assert_eq!(
        compare_of(&call),
        (TARGET_MOD, TargetUnion::ModRevision(43))
    );
}

#[test]
fn lapsed_lease_or_expired_record_is_taken_over_on_mod_revision() {
    let c = cfg("");
    let f = Fleet::new(&c).unwrap();
    let rule = &c.default_rule;
    let k = KeyId([3; 16]);
    let stale = theirs_in_flight(20_000);
    // attached to an in-flight lease, the key is held while etcd has it, even past the
    // record's own lease: its Envoy is refreshing the lease
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 8), 1_000);
    flow.call(77, 66);
    assert!(matches!(
        flow.on_answer(
            rule,
            &Reply::Ok(&failed_with(40, Some(&stale.encode()))),
            25_000
        ),
        Step::Answer {
            decision: Decision::Reject(Rejection::Conflict { .. }),
            completed: None
        }
    ));
    // without a lease, the record's own lease decides
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
    flow.call(77, 66);
    // at 25_000 the lease has lapsed; the new claim expires at 85_000, same bucket (90_000)
    let step = flow.on_answer(
        rule,
        &Reply::Ok(&failed_with_lease(40, Some(&stale.encode()), 0)),
        25_000,
    );
    let Step::Send(call) = step else {
        panic!("{step:?}")
    };
    assert_eq!(
        compare_of(&call),
        (TARGET_MOD, TargetUnion::ModRevision(39))
    );
    assert_eq!(put_of(&call).1, 77);
    assert!(matches!(
        flow.on_answer(rule, &Reply::Ok(&succeeded(41)), 25_010),
        Step::Forward(FleetHandle {
            mod_revision: 41,
            ..
        })
    ));
    // an expired completed record at a later time needs a lease of another bucket
    let old = Record::Completed {
        owner: 5,
        expires_at: 61_000,
        fingerprint: Fingerprint([1; 32]),
        response: StoredResponse::default(),
    };
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 10), 1_000);
    flow.call(77, 66);
    assert_eq!(
        flow.on_answer(
            rule,
            &Reply::Ok(&failed_with(50, Some(&old.encode()))),
            62_000
        ),
        Step::NeedLeases { fresh: false }
    );
    assert_eq!(flow.leases()[1], Lease::Expiry { deadline: 150_000 });
    let call = flow.call(88, 66);
    assert_eq!(
        compare_of(&call),
        (TARGET_MOD, TargetUnion::ModRevision(49))
    );
    assert_eq!(put_of(&call).1, 88);
    // garbage in etcd is never trusted: taken over like a vacant key
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 11), 1_000);
    flow.call(77, 66);
    assert!(matches!(
        flow.on_answer(rule, &Reply::Ok(&failed_with(60, Some(b"garbage"))), 1_000),
        Step::Send(_)
    ));
    // deleted between compare and range: create again
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 12), 1_000);
    flow.call(77, 66);
    let Step::Send(call) = flow.on_answer(rule, &Reply::Ok(&failed_with(61, None)), 1_000) else {
        panic!()
    };
    assert_eq!(compare_of(&call).0, TARGET_CREATE);
}

#[test]
fn ambiguous_timeout_that_committed_is_recognised_as_mine() {
    let c = cfg("");
    let f = Fleet::new(&c).unwrap();
    let rule = &c.default_rule;
    let k = KeyId([4; 16]);
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
    let first = flow.call(77, 66);
    // timeout: the same txn (same owner token) is sent again
    let Step::Send(again) = flow.on_answer(rule, &TIMEOUT, 1_500) else {
        panic!()
    };
    assert_eq!(again, first);
    // the first attempt had committed: the retry's compare fails and finds our record
    let ours = flow.claim().record();
    match flow.on_answer(
        rule,
        &Reply::Ok(&failed_with(20, Some(&ours.encode()))),
        1_600,
    ) {
        Step::Forward(h) => assert_eq!(h.mod_revision, 19),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unavailable_after_retries_is_abandoned_by_owner_token() {
    let c = cfg("");
    let f = Fleet::new(&c).unwrap();
    let rule = &c.default_rule;
    let k = KeyId([5; 16]);
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
    assert!(flow.abandon(1_000).is_none()); // nothing sent: nothing to withdraw
    flow.call(77, 66);
    let no_leader = Reply::Failed {
        code: 14,
        message: "etcdserver: no leader",
    };
    assert!(matches!(
        flow.on_answer(rule, &no_leader, 1_000),
        Step::Send(_)
    ));
    match flow.on_answer(rule, &TIMEOUT, 1_500) {
        Step::Unavailable {
            maybe_claimed: true,
            reason,
        } => assert!(reason.contains("status 4"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // withdrawn by value (our record, with our owner token), retried for two lease TTLs
    let mut ab = flow.abandon(1_600).unwrap();
    assert_eq!(ab.kind(), WriteKind::Abandon);
    let (target, union) = compare_of(ab.call());
    assert_eq!(target, TARGET_VALUE);
    assert_eq!(union, TargetUnion::Value(flow.claim().record().encode()));
    assert!(matches!(
        txn_of(ab.call()).success[0].request,
        Some(request_op::Request::DeleteRange(_))
    ));
    // retried for 3 lease TTLs, at least 30 s, whatever the keep-alives say
    assert!(matches!(
        ab.on_reply(&TIMEOUT, 2_000, false),
        WriteStep::Retry { at: 2_025, .. }
    ));
    assert!(matches!(
        ab.on_reply(&TIMEOUT, 2_100, false),
        WriteStep::Retry { at: 2_150, .. }
    ));
    assert!(matches!(
        ab.on_reply(&TIMEOUT, 31_000, false),
        WriteStep::Retry { .. }
    ));
    assert!(matches!(
        ab.on_reply(&TIMEOUT, 31_590, false),
        WriteStep::GiveUp(_)
    ));
    // etcd answers: gone (the attempt never committed), or deleted now
    let mut ab = flow.abandon(1_600).unwrap();
    assert_eq!(
        ab.on_reply(&Reply::Ok(&failed_with(9, None)), 2_000, true),
        WriteStep::Done(Written::Released)
    );
    assert_eq!(
        ab.on_reply(&Reply::Ok(&succeeded(9)), 2_000, true),
        WriteStep::Done(Written::Released)
    );
    // a refusal (a request etcd will never take) is not retried
    let no_space = Reply::Failed {
        code: 8,
        message: "etcdserver: mvcc: database space exceeded",
    };
    assert!(matches!(
        ab.on_reply(&no_space, 2_000, true),
        WriteStep::GiveUp(EtcdError::Refused(_))
    ));
    // definite refusals do not make a claim ambiguous
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 10), 1_000);
    flow.call(77, 66);
    flow.on_answer(rule, &no_space, 1_000);
    assert!(matches!(
        flow.on_answer(rule, &no_space, 1_000),
        Step::Unavailable {
            maybe_claimed: false,
            ..
        }
    ));
    // a lease that vanished: grant another, then the same attempt; but not forever
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 10), 1_000);
    flow.call(77, 66);
    let nf = Reply::Failed {
        code: 5,
        message: "etcdserver: requested lease not found",
    };
    assert_eq!(
        flow.on_answer(rule, &nf, 1_000),
        Step::NeedLeases { fresh: true }
    );
    assert_eq!(put_of(&flow.call(99, 66)).1, 99);
    let mut last = Step::NeedLeases { fresh: true };
    for _ in 0..MAX_ROUNDS {
        flow.call(99, 66);
        last = flow.on_answer(rule, &nf, 1_000);
    }
    assert!(matches!(last, Step::Unavailable { .. }), "{last:?}");
}

#[test]
fn completions_are_retried_while_the_lease_lives_and_an_ambiguous_one_is_read_back() {
    let c = cfg("");
    let f = Fleet::new(&c).unwrap();
    let rule = &c.default_rule;
    let k = KeyId([6; 16]);
    let mut flow = ClaimFlow::start(&f, rule, k, req(1, 9), 1_000);
    flow.call(77, 66);
    let Step::Forward(h) = flow.on_answer(rule, &Reply::Ok(&succeeded(12)), 1_000) else {
        panic!()
    };
    let resp = StoredResponse {
        status: 201,
        headers: vec![],
        body: b"made".to_vec(),
    };
    let (mut w, record) = Write::complete(&f, &h, &resp, 1_000).unwrap();
    assert_eq!(w.kind(), WriteKind::Complete);
    assert_eq!(
        compare_of(w.call()),
        (TARGET_MOD, TargetUnion::ModRevision(12))
    );
    // the completed record moves to the expiry lease (never refreshed)
    let (value, lease) = put_of(w.call());
    assert_eq!(lease, 66);
    assert_eq!(Record::decode(&value).unwrap(), record);
    assert!(matches!(record, Record::Completed { owner: 9, .. }));
    assert_eq!(
        w.clone().on_reply(&Reply::Ok(&succeeded(13)), 1_000, true),
        WriteStep::Done(Written::Stored)
    );
    // unanswered: retried, with a growing pause, for 3 lease TTLs (at least 30 s)
    let mut at = 0;
    for now in [2_000, 2_100, 2_300, 2_700] {
        match w.on_reply(&TIMEOUT, now, true) {
            WriteStep::Retry { at: a, .. } => at = a,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(at, 2_900);
    // ... and read back once etcd answers: the first attempt had landed
    assert_eq!(
        w.clone().on_reply(
            &Reply::Ok(&failed_with(14, Some(&record.encode()))),
            3_000,
            true
        ),
        WriteStep::Done(Written::Stored)
    );
    // someone else took the key over (our lease lapsed)
    let theirs = theirs_in_flight(1);
    assert_eq!(
        w.clone().on_reply(
            &Reply::Ok(&failed_with(14, Some(&theirs.encode()))),
            3_000,
            true
        ),
        WriteStep::Done(Written::Lost)
    );
    assert!(matches!(
        w.clone().on_reply(&TIMEOUT, 30_500, true),
        WriteStep::Retry { .. }
    ));
    // no more retries after the window: the outcome is unknown
    match w.clone().on_reply(&TIMEOUT, 31_000, true) {
        WriteStep::GiveUp(e) => assert!(e.may_have_written()),
        other => panic!("{other:?}"),
    }
    // ... nor once a keep-alive found the lease gone (the key lapsed)
    assert!(matches!(
        Write::release(&h, 1_000).on_reply(&TIMEOUT, 1_000, false),
        WriteStep::GiveUp(_)
    ));
    // too large for etcd: held, not written
    let big = StoredResponse {
        status: 200,
        headers: vec![],
        body: vec![0; 4096],
    };
    assert!(matches!(
        Write::complete(&f, &h, &big, 1_000),
        Err(ValuePolicy::Hold)
    ));
    assert_eq!(f.value_policy(2048), ValuePolicy::Store);
    assert_eq!(f.value_policy(2049), ValuePolicy::Hold);
    // the release: delete on our revision; gone already counts as released
    let mut r = Write::release(&h, 1_000);
    assert_eq!(
        compare_of(r.call()),
        (TARGET_MOD, TargetUnion::ModRevision(12))
    );
    assert!(matches!(
        txn_of(r.call()).success[0].request,
        Some(request_op::Request::DeleteRange(_))
    ));
    assert_eq!(
        r.on_reply(&Reply::Ok(&failed_with(20, None)), 1_000, true),
        WriteStep::Done(Written::Released)
    );
    assert_eq!(
        r.on_reply(
            &Reply::Ok(&failed_with(20, Some(&theirs.encode()))),
            1_000,
            true
        ),
        WriteStep::Done(Written::Lost)
    );
}

#[test]
fn cache_answers_only_live_completed_records_of_its_key() {
    let c = cfg("");
    let f = Fleet::new(&c).unwrap();
    let k = KeyId([7; 16]);
    let done = Record::Completed {
        owner: 1,
        expires_at: 5_000,
        fingerprint: Fingerprint([1; 32]),
        response: StoredResponse {
            status: 200,
            headers: vec![],
            body: b"x".to_vec(),
        },
    };
    let v = cache_value(&k, &done);
    assert_eq!(cache_lookup(&v, &k, 4_999), Some(done.clone()));
    assert_eq!(cache_lookup(&v, &k, 5_000), None);
    assert_eq!(cache_lookup(&v, &KeyId([8; 16]), 0), None);
    assert_eq!(cache_lookup(b"short", &k, 0), None);
    let inflight = Record::InFlight {
        owner: 1,
        lease_until: 9,
        expires_at: 9_000,
        fingerprint: Fingerprint([1; 32]),
    };
    assert_eq!(cache_lookup(&cache_value(&k, &inflight), &k, 0), None);
    assert!(f.cache_key(&k).starts_with("ns:fc:"));
    assert!(!f.fails_open());
}
