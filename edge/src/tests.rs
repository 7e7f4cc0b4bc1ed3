use super::*;

fn engine(json: &str) -> Engine {
    Engine::parse(json).unwrap()
}

/// Header lines `name\nvalue\n…`, as the worker passes them.
fn h(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(n, v)| format!("{n}\n{v}\n")).collect()
}

fn json(answer: &Answer) -> serde_json::Value {
    serde_json::from_slice(&answer.body()).unwrap()
}

fn header<'a>(answer: &'a [String], name: &str) -> Option<&'a str> {
    answer
        .chunks(2)
        .find(|p| p[0].eq_ignore_ascii_case(name))
        .map(|p| p[1].as_str())
}

/// Headers → body → ready, at `now`, with the Durable Object's decision on `record`.
fn ready(e: &Engine, key: &str, body: &[u8]) -> Exchange {
    let mut ex = e.exchange(
        "POST",
        "/orders?x=1",
        &h(&[("Idempotency-Key", key)]),
        &[0; 16],
    );
    assert_eq!(ex.step(), Step::Body);
    ex.body(body);
    assert_eq!(ex.step(), Step::Ready);
    ex
}

#[test]
fn config_errors_name_the_field() {
    assert_eq!(
        Engine::parse(r#"{"key": {"maxLength": 0}}"#).err().unwrap(),
        "key.maxLength: must be 1..=1024, got 0"
    );
    let a = misconfigured("invalid configuration: key.maxLength: must be 1..=1024, got 0");
    assert_eq!(a.status(), 500);
    assert_eq!(
        header(&a.headers(), "content-type"),
        Some("application/problem+json")
    );
    let doc = json(&a);
    assert_eq!(doc["type"], "https://idemgate.dev/problems/misconfigured");
    assert!(doc["detail"].as_str().unwrap().contains("key.maxLength"));
}

#[test]
fn pass_reject_and_body_steps() {
    let e = engine("{}");
    let get = e.exchange("GET", "/x", &h(&[("idempotency-key", "k")]), &[]);
    assert_eq!(get.step(), Step::Pass);
    let none = e.exchange("POST", "/x", "", &[]);
    assert_eq!(none.step(), Step::Pass);
    let bad = e.exchange("POST", "/x", &h(&[("idempotency-key", "\"open")]), &[]);
    assert_eq!(bad.step(), Step::Answer);
    let a = bad.answer().unwrap();
    assert_eq!(a.status(), 400);
    assert_eq!(
        json(&a)["type"],
        "https://idemgate.dev/problems/malformed-key"
    );
    let declared = e.exchange(
        "POST",
        "/x",
        &h(&[("idempotency-key", "k"), ("content-length", "1048577")]),
        &[],
    );
    assert_eq!(declared.answer().unwrap().status(), 413);
    let mut streamed = e.exchange("POST", "/x", &h(&[("idempotency-key", "k")]), &[]);
    assert_eq!(streamed.max_body_bytes(), 1_048_576.0);
    streamed.body_too_large();
    assert_eq!(streamed.answer().unwrap().status(), 413);
    // Latin-1 bytes arrive as one character each and are refused like on the wire
    let latin = e.exchange("POST", "/x", &h(&[("idempotency-key", "caf\u{e9}")]), &[]);
    let doc = json(&latin.answer().unwrap());
    assert!(doc["detail"].as_str().unwrap().contains("position 3"));
}

#[test]
fn claim_complete_replay_round_trip() {
    let e = engine("{}");
    let ex = ready(&e, "order-1", b"{\"a\":1}");
    let key = ex.key_id().unwrap();
    assert_eq!(key.len(), 32);
    let fp = ex.fingerprint().unwrap();
    // the object: nothing stored → claim
    let v = e.decide(ex.rule(), &fp, 7, None, None, 1_000.0, None);
    assert_eq!(v.kind(), VerdictKind::Claimed);
    assert_eq!(v.expires_at(), 1_000.0 + 86_400_000.0);
    let claim = v.record().unwrap();
    assert_eq!(expires_at(&claim), Some(v.expires_at()));
    assert_eq!(completed_until(&claim), None);
    // a concurrent duplicate: settled by the in-flight record → 409
    let v2 = e.decide(ex.rule(), &fp, 8, None, Some(claim.clone()), 1_001.0, None);
    assert_eq!(v2.kind(), VerdictKind::Settled);
    let mut dup = ready(&e, "order-1", b"{\"a\":1}");
    assert!(dup.consider(&claim, 1_001.0, None));
    let a = dup.answer().unwrap();
    assert_eq!(a.status(), 409);
    assert_eq!(header(&a.headers(), "retry-after"), Some("1"));
    // the origin answers 201: capture and complete
    let mut cap = ex.capture(
        201,
        &h(&[
            ("Content-Type", "application/json"),
            ("Set-Cookie", "s=1"),
            ("X-Other", "no"),
        ]),
    );
    assert!(cap.storable() && cap.wants_body());
    cap.push(b"{\"id\":");
    cap.push(b"1}");
    let done = cap.finish(&claim).unwrap();
    assert_eq!(
        completes(Some(claim.clone()), &done),
        Some(1_000.0 + 86_400_000.0)
    );
    assert_eq!(completes(None, &done), None);
    assert_eq!(completes(Some(done.clone()), &done), None);
    assert_eq!(completed_until(&done), Some(1_000.0 + 86_400_000.0));
    // a retry replays from the completed record (the isolate cache or the object)
    let mut retry = ready(&e, "\"order-1\"", b"{\"a\":1}");
    assert!(retry.consider(&done, 2_000.0, None));
    let a = retry.answer().unwrap();
    assert_eq!(a.status(), 201);
    assert_eq!(a.body(), b"{\"id\":1}");
    let hs = a.headers();
    assert_eq!(header(&hs, "content-type"), Some("application/json"));
    assert_eq!(header(&hs, "idempotent-replayed"), Some("true"));
    assert_eq!(header(&hs, "set-cookie"), None);
    assert_eq!(header(&hs, "x-other"), None);
    // a different body: 422
    let mut other = ready(&e, "order-1", b"{\"a\":2}");
    assert!(other.consider(&done, 2_000.0, None));
    assert_eq!(other.answer().unwrap().status(), 422);
    // expired: the record no longer answers; the object lets the request claim again
    let mut late = ready(&e, "order-1", b"{\"a\":1}");
    assert!(!late.consider(&done, 1_000.0 + 86_400_000.0, None));
    assert_eq!(late.step(), Step::Ready);
    let v3 = e.decide(
        late.rule(),
        &fp,
        9,
        None,
        Some(done),
        1_000.0 + 86_400_000.0,
        None,
    );
    assert_eq!(v3.kind(), VerdictKind::Claimed);
}

#[test]
fn unstored_status_and_release() {
    let e = engine("{}");
    let ex = ready(&e, "k", b"x");
    let v = e.decide(
        ex.rule(),
        &ex.fingerprint().unwrap(),
        5,
        None,
        None,
        10.0,
        None,
    );
    let claim = v.record().unwrap();
    let mut cap = ex.capture(503, "");
    assert!(!cap.storable());
    assert_eq!(cap.finish(&claim), None);
    assert_eq!(cap.reason().as_deref(), Some("status"));
    assert!(releases(Some(claim.clone()), 5));
    assert!(!releases(Some(claim), 6));
    assert!(!releases(None, 5));
}

#[test]
fn too_large_response_is_not_stored() {
    let e = engine(r#"{"maxResponseBytes": 3}"#);
    let ex = ready(&e, "k", b"x");
    let claim = e
        .decide(
            ex.rule(),
            &ex.fingerprint().unwrap(),
            5,
            None,
            None,
            10.0,
            None,
        )
        .record()
        .unwrap();
    let mut cap = ex.capture(200, "");
    cap.push(b"abcd");
    assert!(!cap.wants_body());
    assert_eq!(cap.finish(&claim), None);
    assert_eq!(cap.reason().as_deref(), Some("too_large"));
}

#[test]
fn lease_lapse_lets_the_next_request_claim() {
    let e = engine(r#"{"ttlSeconds": 10, "leaseSeconds": 2}"#);
    let ex = ready(&e, "k", b"x");
    let fp = ex.fingerprint().unwrap();
    let claim = e
        .decide(ex.rule(), &fp, 1, None, None, 0.0, None)
        .record()
        .unwrap();
    assert_eq!(
        e.decide(ex.rule(), &fp, 2, None, Some(claim.clone()), 1_999.0, None)
            .kind(),
        VerdictKind::Settled
    );
    let v = e.decide(ex.rule(), &fp, 2, None, Some(claim), 2_000.0, None);
    assert_eq!(v.kind(), VerdictKind::Claimed);
    assert!(v.lease_expired());
}

#[test]
fn wait_policy_wakes_at_the_lease_or_deadline() {
    let wait = r#""onConcurrent": {"action": "wait", "waitMillis": 5000}"#;
    let e = engine(&format!(
        r#"{{"ttlSeconds": 60, "leaseSeconds": 10, {wait}}}"#
    ));
    let ex = ready(&e, "k", b"x");
    let fp = ex.fingerprint().unwrap();
    let claim = e
        .decide(ex.rule(), &fp, 1, None, None, 0.0, None)
        .record()
        .unwrap();
    let w = e.decide(ex.rule(), &fp, 2, None, Some(claim.clone()), 100.0, None);
    assert_eq!(w.kind(), VerdictKind::Wait);
    assert_eq!(w.deadline(), 5_100.0);
    assert_eq!(w.wake_at(), 5_100.0);
    // past the deadline the waiting request is settled: 409
    let late = e.decide(
        ex.rule(),
        &fp,
        2,
        None,
        Some(claim.clone()),
        5_100.0,
        Some(5_100.0),
    );
    assert_eq!(late.kind(), VerdictKind::Settled);
    let mut waiting = ready(&e, "k", b"x");
    assert!(waiting.consider(&claim, 5_100.0, Some(5_100.0)));
    assert_eq!(waiting.answer().unwrap().status(), 409);
    // a lease that ends before the deadline wakes the waiter then, and it claims
    let short = engine(&format!(
        r#"{{"ttlSeconds": 60, "leaseSeconds": 2, {wait}}}"#
    ));
    let claim = short
        .decide(ex.rule(), &fp, 1, None, None, 0.0, None)
        .record()
        .unwrap();
    let w = short.decide(ex.rule(), &fp, 2, None, Some(claim.clone()), 100.0, None);
    assert_eq!(w.wake_at(), 2_000.0);
    let woken = short.decide(
        ex.rule(),
        &fp,
        2,
        None,
        Some(claim),
        2_000.0,
        Some(w.deadline()),
    );
    assert_eq!(woken.kind(), VerdictKind::Claimed);
    assert!(woken.lease_expired());
}

#[test]
fn correlation_ids_are_echoed_or_generated() {
    let e = engine(r#"{"correlation": {"header": "x-request-id"}}"#);
    let sent = e.exchange("GET", "/x", &h(&[("X-Request-Id", "abc")]), &[1; 16]);
    assert_eq!(sent.request_id().as_deref(), Some("abc"));
    assert!(!sent.generated());
    let made = e.exchange("POST", "/x", &h(&[("idempotency-key", "")]), &[7; 16]);
    assert!(made.generated());
    let id = made.request_id().unwrap();
    assert_eq!(id.len(), 36);
    assert_eq!(id.as_bytes()[14], b'4');
    let a = made.answer().unwrap();
    assert_eq!(header(&a.headers(), "x-request-id"), Some(id.as_str()));
    let off = engine("{}").exchange("POST", "/x", "", &[0; 16]);
    assert_eq!(off.correlation_header(), None);
    assert_eq!(off.request_id(), None);
}

#[test]
fn body_keys_and_routes() {
    let e = engine(
        r#"{"routes": [{"match": {"prefix": "/orders"}, "key": {"sources": [{"jsonPointer": "/orderId"}], "required": true},
             "onDuplicate": {"action": "reject", "status": 409, "code": "duplicate_order"}}]}"#,
    );
    let mut ex = e.exchange("POST", "/orders", "", &[]);
    assert_eq!(ex.step(), Step::Body);
    assert_eq!(ex.rule(), 1);
    ex.body(br#"{"items": []}"#);
    assert_eq!(ex.answer().unwrap().status(), 400);
    let mut bad = e.exchange("POST", "/orders", "", &[]);
    bad.body(b"not json");
    assert_eq!(
        json(&bad.answer().unwrap())["type"],
        "https://idemgate.dev/problems/invalid-body"
    );
    let mut ok = e.exchange("POST", "/orders", "", &[]);
    ok.body(br#"{"orderId": "o-1"}"#);
    assert_eq!(ok.step(), Step::Ready);
    assert_eq!(ok.rule_name(), "route0");
    let fp = ok.fingerprint().unwrap();
    let claim = e
        .decide(ok.rule(), &fp, 3, None, None, 0.0, None)
        .record()
        .unwrap();
    let mut cap = ok.capture(200, "");
    cap.push(b"ok");
    let done = cap.finish(&claim).unwrap();
    let mut dup = e.exchange("POST", "/orders", "", &[]);
    dup.body(br#"{"orderId": "o-1"}"#);
    assert!(dup.consider(&done, 1.0, None));
    let doc = json(&dup.answer().unwrap());
    assert_eq!(doc["status"], 409);
    assert_eq!(doc["code"], "duplicate_order");
}

#[test]
fn garbage_records_never_panic() {
    let e = engine("{}");
    let mut ex = ready(&e, "k", b"x");
    assert!(!ex.consider(b"nope", 0.0, None));
    assert_eq!(expires_at(b""), None);
    assert_eq!(completed_until(&[0xff; 40]), None);
    assert_eq!(completes(Some(vec![1, 2]), b"x"), None);
    let v = e.decide(0, &[0; 32], 1, None, Some(vec![9; 9]), 0.0, None);
    assert_eq!(v.kind(), VerdictKind::Claimed);
    assert_eq!(
        e.decide(0, &[0; 31], 1, None, None, 0.0, None).kind(),
        VerdictKind::Settled
    );
    let mut cap = ex.capture(200, "");
    assert_eq!(cap.finish(b"junk"), None);
    assert_eq!(cap.reason().as_deref(), Some("bad_claim"));
}

#[test]
fn rate_limits_charge_like_the_filter() {
    let e = engine(
        r#"{"rateLimit": {"rate": 2, "periodSeconds": 60, "burst": 2, "callerHeaders": ["authorization"]},
            "onDuplicate": {"action": "replay"}}"#,
    );
    let caller = [("authorization", "Bearer a")];
    // not inspected (GET): a charge of 1 is due at headers time
    let mut get = e.exchange("GET", "/x", &h(&caller), &[]);
    assert!(get.charge_due());
    let bucket = get.limit_key().unwrap();
    assert!(bucket.starts_with("rate:idemgate:"));
    let now = 1_000_000.0;
    let tat1 = e.rate_check(get.limit_rule(), None, now, 1);
    assert!(tat1.is_some());
    assert!(!get.charged(None, now, 1));
    let added = get.response_headers();
    let lines: Vec<String> = added.split_terminator('\n').map(str::to_string).collect();
    assert_eq!(header(&lines, "x-ratelimit-remaining"), Some("1"));
    // the same caller elsewhere shares the bucket; another caller does not
    let other = e.exchange("GET", "/y", &h(&[("authorization", "Bearer b")]), &[]);
    assert_ne!(other.limit_key().unwrap(), bucket);
    assert_eq!(
        e.exchange("GET", "/y", &h(&caller), &[])
            .limit_key()
            .unwrap(),
        bucket
    );
    let tat2 = e.rate_check(0, tat1, now, 1);
    // over the limit: no new state, and the answer is the 429 with the headers
    assert_eq!(e.rate_check(0, tat2, now, 1), None);
    let mut third = e.exchange("POST", "/z", &h(&caller), &[]);
    assert!(third.charge_due());
    assert!(third.charged(tat2, now, 1));
    let a = third.answer().unwrap();
    assert_eq!(a.status(), 429);
    let hs = a.headers();
    assert_eq!(header(&hs, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&hs, "x-ratelimit-limit"), Some("2"));
    assert!(header(&hs, "retry-after").is_some());
    // covered requests are charged after the store's decision: replays spend nothing
    let mut covered = ready_with(&e, &caller, "k", b"x");
    assert!(!covered.charge_due());
    assert_eq!(covered.deferred_cost(), Some(1));
    let claim = e
        .decide(
            covered.rule(),
            &covered.fingerprint().unwrap(),
            1,
            None,
            None,
            now,
            None,
        )
        .record()
        .unwrap();
    let mut cap = covered.capture(200, "");
    let done = cap.finish(&claim).unwrap();
    assert!(covered.consider(&done, now, None));
    assert_eq!(covered.deferred_cost(), Some(0));
    assert!(!covered.charged(tat2, now, 0));
    let a = covered.answer().unwrap();
    assert_eq!(header(&a.headers(), "idempotent-replayed"), Some("true"));
    assert_eq!(header(&a.headers(), "x-ratelimit-remaining"), Some("0"));
    // an unreachable bucket: failClosed by default
    let mut lost = e.exchange("GET", "/x", &h(&caller), &[]);
    assert!(lost.charge_failed(now));
    assert_eq!(lost.answer().unwrap().status(), 429);
    // no rate limit configured: nothing to charge
    assert_eq!(
        engine("{}").exchange("GET", "/x", "", &[]).limit_key(),
        None
    );
}

fn ready_with(e: &Engine, extra: &[(&str, &str)], key: &str, body: &[u8]) -> Exchange {
    let mut headers = h(extra);
    headers.push_str(&h(&[("idempotency-key", key)]));
    let mut ex = e.exchange("POST", "/orders", &headers, &[0; 16]);
    assert_eq!(ex.step(), Step::Body);
    ex.body(body);
    assert_eq!(ex.step(), Step::Ready);
    ex
}

#[test]
fn outcomes_are_named_as_the_envoy_counters() {
    let e = engine(r#"{"key": {"sources": [{"jsonPointer": "/id"}], "required": true}}"#);
    let outcome = |ex: &Exchange| (ex.covered(), ex.outcome());
    // not covered (GET): no counter at all
    let get = e.exchange("GET", "/x", "", &[]);
    assert_eq!(outcome(&get), (false, None));
    assert_eq!(get.namespace(), "idemgate");
    // refused at body time: the refusal's counter
    let mut not_json = e.exchange("POST", "/x", "", &[]);
    assert_eq!(outcome(&not_json), (true, None));
    not_json.body(b"{nope");
    assert_eq!(outcome(&not_json), (true, Some("invalid_bodies".into())));
    let mut missing = e.exchange("POST", "/x", "", &[]);
    missing.body(b"{}");
    assert_eq!(outcome(&missing), (true, Some("missing_keys".into())));
    let mut large = e.exchange("POST", "/x", "", &[]);
    large.body_too_large();
    assert_eq!(outcome(&large), (true, Some("too_large".into())));
    // ready: forwarded with a claim; then a replay, a mismatch, a conflict
    let mut first = e.exchange("POST", "/x", "", &[]);
    first.body(br#"{"id": "a"}"#);
    assert_eq!(outcome(&first), (true, Some("forwarded".into())));
    let now = 1_000_000.0;
    let fp = first.fingerprint().unwrap();
    let claim = e
        .decide(first.rule(), &fp, 7, None, None, now, None)
        .record()
        .unwrap();
    let mut conflict = e.exchange("POST", "/x", "", &[]);
    conflict.body(br#"{"id": "a"}"#);
    assert!(conflict.consider(&claim, now, None));
    assert_eq!(conflict.outcome().as_deref(), Some("conflicts"));
    let done = first.capture(200, "").finish(&claim).unwrap();
    let mut again = e.exchange("POST", "/x", "", &[]);
    again.body(br#"{"id": "a"}"#);
    assert!(again.consider(&done, now, None));
    assert_eq!(again.outcome().as_deref(), Some("replayed"));
    let mut changed = e.exchange("POST", "/x", "", &[]);
    changed.body(br#"{"id": "a", "x": 1}"#);
    assert!(changed.consider(&done, now, None));
    assert_eq!(changed.outcome().as_deref(), Some("mismatches"));
    // covered but no key where none is required: passed
    let optional = engine("{}");
    let passed = optional.exchange("POST", "/x", "", &[]);
    assert_eq!(outcome(&passed), (true, Some("passed".into())));
    let mut store_down = ready(&optional, "k", b"x");
    store_down.store_unavailable();
    assert_eq!(store_down.outcome().as_deref(), Some("store_unavailable"));
}

#[test]
fn requests_refused_at_body_time_are_charged() {
    let e = engine(
        r#"{"key": {"sources": [{"jsonPointer": "/id"}], "required": true},
            "rateLimit": {"rate": 1, "periodSeconds": 3600, "burst": 1, "callerHeaders": []}}"#,
    );
    let now = 1_000_000.0;
    for body in [&b"{nope"[..], b"{}"] {
        let mut ex = e.exchange("POST", "/x", "", &[]);
        assert!(!ex.charge_due(), "inspected: charged once the body is in");
        ex.body(body);
        assert_eq!(ex.step(), Step::Answer);
        assert_eq!(ex.deferred_cost(), Some(1));
        // within the limit the refusal stands, with the headers
        assert!(!ex.charged(None, now, 1));
        let a = ex.answer().unwrap();
        assert_eq!(a.status(), 400);
        assert_eq!(header(&a.headers(), "x-ratelimit-remaining"), Some("0"));
    }
    // over the limit the 429 replaces the refusal, once: nothing more is due
    let tat = e.rate_check(0, None, now, 1);
    let mut ex = e.exchange("POST", "/x", "", &[]);
    ex.body_too_large();
    assert!(ex.charged(tat, now, 1));
    assert_eq!(ex.outcome().as_deref(), Some("rate_limited"));
    assert_eq!(ex.answer().unwrap().status(), 429);
    assert_eq!(ex.deferred_cost(), None);
    assert!(!ex.charge_due());
}

#[test]
fn a_body_hashed_by_the_worker_resolves_as_the_body() {
    let e = engine("{}");
    let body = br#"{"amount": 10}"#;
    let by_wasm = ready(&e, "k1", body);
    let mut ex = e.exchange(
        "POST",
        "/orders?x=1",
        &h(&[("Idempotency-Key", "k1")]),
        &[0; 16],
    );
    let head = ex.body_hash_head(body.len() as f64).unwrap();
    let mut sha = idemgate_core::sha256::Sha256::new();
    sha.update(&head);
    sha.update(body);
    let digest = sha.finalize();
    // a digest of the wrong length, or for a body over the limit, is refused untouched
    assert!(!ex.body_hashed(body.len() as f64, &digest[..31]));
    assert!(!ex.body_hashed(f64::from(1u32 << 20) + 1.0, &digest));
    assert_eq!(ex.step(), Step::Body);
    assert!(ex.body_hashed(body.len() as f64, &digest));
    assert_eq!(ex.step(), Step::Ready);
    assert_eq!(ex.key_id(), by_wasm.key_id());
    assert_eq!(ex.fingerprint(), by_wasm.fingerprint());
    // once resolved, there is nothing more to hash
    assert_eq!(ex.body_hash_head(body.len() as f64), None);
    assert!(!ex.body_hashed(body.len() as f64, &digest));

    // a key in the body: the body itself is needed
    let e = engine(r#"{"key": {"sources": [{"jsonPointer": "/id"}]}}"#);
    let ex = e.exchange("POST", "/orders", &h(&[]), &[0; 16]);
    assert_eq!(ex.step(), Step::Body);
    assert_eq!(ex.body_hash_head(10.0), None);
}

#[test]
fn header_lines_become_pairs() {
    let pairs = header_pairs("Idempotency-Key\nk-1\nX-Empty\n\nX-Latin\ncaf\u{e9}\ndangling");
    assert_eq!(
        pairs,
        vec![
            ("idempotency-key".to_string(), b"k-1".to_vec()),
            ("x-empty".to_string(), Vec::new()),
            ("x-latin".to_string(), vec![b'c', b'a', b'f', 0xe9]),
        ]
    );
    assert!(header_pairs("").is_empty());
}

#[test]
fn response_headers_carry_the_correlation_id() {
    let e = engine(r#"{"correlation": {"header": "x-request-id"}}"#);
    let sent = e.exchange("POST", "/x", &h(&[("X-Request-Id", "abc")]), &[]);
    assert_eq!(sent.response_headers(), "x-request-id\nabc\n");
    assert_eq!(
        engine("{}")
            .exchange("POST", "/x", "", &[])
            .response_headers(),
        ""
    );
}
