//! Configuration reading: defaults, errors naming path and value, routes.
use super::*;

fn err(json: &str) -> String {
    match Config::from_json(json) {
        Ok(c) => panic!("accepted {json}: {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults() {
    let c = Config::from_json("{}").unwrap();
    let r = &c.default_rule;
    assert_eq!(
        r.key_sources,
        vec![KeySource::Header("idempotency-key".into())]
    );
    assert!(!r.key_required);
    assert_eq!(r.methods, vec!["POST", "PATCH"]);
    assert_eq!(r.key_max_length, 255);
    assert_eq!(r.ttl_ms, 86_400_000);
    assert_eq!(r.lease_ms, 30_000);
    assert!(r.stores_status(201));
    assert!(r.stores_status(404));
    assert!(!r.stores_status(429));
    assert!(!r.stores_status(500));
    assert!(r.stores_header("Content-Type"));
    assert!(!r.stores_header("set-cookie"));
    assert_eq!(r.on_mismatch.action, MismatchAction::Reject);
    assert_eq!(r.on_mismatch.status, 422);
    assert_eq!(Config::default(), c);
    assert_eq!(Config::from_json("").unwrap(), c);
    assert!(c.rule_for("GET", "/x").is_none());
    assert!(c.rule_for("POST", "/x").is_some());
}

#[test]
fn errors_name_path_and_value() {
    assert_eq!(
        err(r#"{"key":{"maxLength":0}}"#),
        "key.maxLength: must be 1..=1024, got 0"
    );
    assert!(
        err(r#"{"bogus":1}"#).starts_with("bogus: unknown field `bogus`"),
        "{}",
        err(r#"{"bogus":1}"#)
    );
    assert!(err(r#"{"key":{"hedaer":"x"}}"#).starts_with("key.hedaer: unknown field"));
    assert_eq!(
        err(r#"{"methods":[]}"#),
        "methods: must list at least one method, got []"
    );
    assert_eq!(
        err(r#"{"methods":["PO ST"]}"#),
        "methods[0]: must be an HTTP method token, got \"PO ST\""
    );
    assert_eq!(
        err(r#"{"ttlSeconds":10,"leaseSeconds":20}"#),
        "leaseSeconds: must not exceed ttlSeconds (10), got 20"
    );
    assert_eq!(
        err(r#"{"response":{"storeStatuses":["299-200"]}}"#),
        "response.storeStatuses[0]: range is inverted (299 > 200), got \"299-200\""
    );
    assert!(err(r#"{"response":{"storeHeaders":["Set-Cookie"]}}"#)
        .starts_with("response.storeHeaders[0]: \"Set-Cookie\" is a hop-by-hop"));
    assert!(err(r#"{"key":{"header":"bad header"}}"#)
        .starts_with("key.header: must be an HTTP header name"));
    assert!(err(r#"{"ttlSeconds":"x"}"#).starts_with("ttlSeconds: invalid type"));
    assert!(err(r#"{"store":{"capacity":0}}"#)
        .starts_with("store.capacity: must be 1..=10000000, got 0"));
    assert!(
        err(r#"{"store":{"capacity":4,"probes":8}}"#).starts_with("store.probes: must not exceed")
    );
    assert!(err(r#"{"store":{"capasity":4}}"#).starts_with("store.capasity: unknown field"));
    assert_eq!(
        err(r#"{"fingerprint":{"algorithm":"md5"}}"#),
        "fingerprint.algorithm: must be one of sha256, blake3; got \"md5\""
    );
    #[cfg(not(feature = "blake3"))]
    assert!(err(r#"{"fingerprint":{"algorithm":"blake3"}}"#)
        .starts_with("fingerprint.algorithm: \"blake3\" is not built into this module"));
    assert!(err(r#"{"response":{"storeStatuses":[700]}}"#)
        .starts_with("response.storeStatuses[0]: must be a status code"));
    assert!(
        err("true") == "$: invalid type: boolean `true`, expected a JSON object",
        "{}",
        err("true")
    );
    assert!(err("{").starts_with("$: EOF"), "{}", err("{"));
    // policies, pointers, bounds, routes
    assert_eq!(
        err(r#"{"onMismatch":{"action":"explode"}}"#),
        "onMismatch.action: must be one of reject, replay, newRequest; got \"explode\""
    );
    assert_eq!(
        err(r#"{"key":{"sources":[{"jsonPointer":"orderId"}]}}"#),
        "key.sources[0].jsonPointer: must be empty or start with \"/\", got \"orderId\""
    );
    assert_eq!(
        err(r#"{"expiry":{"minSeconds":100,"maxSeconds":10}}"#),
        "expiry: bounds are inverted: minSeconds 100 > maxSeconds 10"
    );
    assert_eq!(
        err(r#"{"routes":[{"match":{"prefix":"/a"},"onDuplicate":{"action":"ignore"}}]}"#),
        "routes[0].onDuplicate.action: must be one of replay, reject, acknowledge; got \"ignore\""
    );
    assert!(err(r#"{"routes":[{"match":{"prefix":"/a"},"bogus":1}]}"#)
        .starts_with("routes[0].bogus: unknown field"));
    assert!(err(r#"{"routes":[{"match":{"prefx":"/a"}}]}"#)
        .starts_with("routes[0].match.prefx: unknown field"));
    assert_eq!(
        err(r#"{"routes":[{"name":"x"}]}"#),
        "routes[0].match: is required"
    );
    assert_eq!(
        err(r#"{"fingerprint":{"excludePointers":["/ts"]}}"#),
        "fingerprint.excludePointers: needs fingerprint.body \"canonicalJson\""
    );
    assert!(
        err(r#"{"errors":{"format":"envelope","envelope":{"e":"{{nope}}"}}}"#)
            .starts_with("errors.envelope.e: unknown placeholder {{nope}}")
    );
    assert!(err(r#"{"errors":{"codes":{"oops":"x"}}}"#)
        .starts_with("errors.codes.oops: unknown error kind"));
    assert!(
        err(r#"{"key":{"sources":[{"header":"a","jsonPointer":"/b"}]}}"#)
            .starts_with("key.sources[0]: must set exactly one")
    );
    assert!(err(r#"{"key":{"sources":[{"route":true}]}}"#)
        .starts_with("key.sources[0].route: is only valid"));
    assert!(err(r#"{"onConcurrent":{"action":"wait"}}"#)
        .starts_with("onConcurrent.waitMillis: must be set"));
}

#[test]
fn duplicate_fields_are_refused_naming_the_path() {
    assert_eq!(
        err(r#"{"ttlSeconds": 10, "ttlSeconds": 20}"#),
        "ttlSeconds: duplicate field `ttlSeconds`"
    );
    assert_eq!(
        err(r#"{"key": {"header": "a", "header": "b"}}"#),
        "key.header: duplicate field `header`"
    );
    assert_eq!(
        err(r#"{"routes": [{"match": {"prefix": "/a"}, "name": "x", "name": "y"}]}"#),
        "routes[0].name: duplicate field `name`"
    );
    assert_eq!(
        err(r#"{"errors": {"codes": {"conflict": "a", "conflict": "b"}}}"#),
        "errors.codes.conflict: duplicate field `conflict`"
    );
    assert_eq!(
        err(r#"{"errors": {"format": "envelope", "envelope": {"e": {"x": 1, "x": 2}}}}"#),
        "errors.envelope.e.x: duplicate field `x`"
    );
}

#[test]
fn type_errors_name_what_was_found() {
    for (json, want) in [
        (
            r#"{"ttlSeconds": "x"}"#,
            "ttlSeconds: invalid type: string \"x\", expected u64",
        ),
        (
            r#"{"ttlSeconds": -1}"#,
            "ttlSeconds: invalid value: integer `-1`, expected u64",
        ),
        (
            r#"{"ttlSeconds": 1.5}"#,
            "ttlSeconds: invalid type: floating point `1.5`, expected u64",
        ),
        (
            r#"{"ttlSeconds": 18446744073709551616}"#,
            "ttlSeconds: invalid type: floating point `1.8446744073709552e+19`, expected u64",
        ),
        (
            r#"{"methods": "POST"}"#,
            "methods: invalid type: string \"POST\", expected a sequence",
        ),
        (
            r#"{"methods": [null]}"#,
            "methods[0]: invalid type: null, expected a string",
        ),
        (
            r#"{"key": []}"#,
            "key: invalid type: sequence, expected a JSON object",
        ),
        (
            r#"{"key": {"required": "yes"}}"#,
            "key.required: invalid type: string \"yes\", expected a boolean",
        ),
        (
            r#"{"key": {"sources": [{"composite": [{"header": 5}]}]}}"#,
            "key.sources[0].composite[0].header: invalid type: integer `5`, expected a string",
        ),
        (
            r#"{"errors": {"codes": {"conflict": true}}}"#,
            "errors.codes.conflict: invalid type: boolean `true`, expected a string",
        ),
        (
            r#"{"response": {"storeStatuses": [{}]}}"#,
            "response.storeStatuses[0]: invalid type: map, expected a status code or a string",
        ),
        (
            r#"{"routes": [{"match": []}]}"#,
            "routes[0].match: invalid type: sequence, expected a JSON object",
        ),
    ] {
        assert_eq!(err(json), want, "{json}");
    }
    assert!(err(r#"{"bogus": 1}"#)
        .starts_with("bogus: unknown field `bogus`, expected one of `methods`, `key`,"));
    assert_eq!(
        err(r#"{"ttlSeconds": 1,}"#),
        "$: trailing comma at line 1 column 18"
    );
}

#[test]
fn null_counts_as_absent() {
    let c = Config::from_json(
        r#"{"ttlSeconds": null, "key": null, "store": null, "correlation": null,
            "onDuplicate": {"body": null, "action": null}, "errors": {"envelope": null}}"#,
    )
    .unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn every_block_accepts_each_of_its_fields() {
    // Each field name listed in a block's reader gets past the unknown-field check: the
    // value `{"?": 1}` is wrong for every field, so the error must name the field itself
    // (or something inside it), never refuse it as unknown.
    let blocks: &[(&str, &[&str])] = &[
        (
            "",
            &[
                "methods",
                "key",
                "fingerprint",
                "ttlSeconds",
                "leaseSeconds",
                "expiry",
                "maxBodyBytes",
                "maxResponseBytes",
                "onMismatch",
                "onDuplicate",
                "onConcurrent",
                "response",
                "scope",
                "rateLimit",
            ],
        ),
        (
            "key",
            &[
                "header",
                "sources",
                "deriveFromBody",
                "required",
                "maxLength",
            ],
        ),
        (
            "fingerprint",
            &[
                "method",
                "path",
                "query",
                "headers",
                "body",
                "excludePointers",
                "algorithm",
            ],
        ),
        ("expiry", &["header", "minSeconds", "maxSeconds"]),
        (
            "onMismatch",
            &[
                "action",
                "status",
                "code",
                "message",
                "retryAfterSeconds",
                "waitMillis",
            ],
        ),
        (
            "response",
            &[
                "storeStatuses",
                "neverStoreStatuses",
                "storeHeaders",
                "replayHeader",
            ],
        ),
        ("scope", &["credentialHeaders"]),
        ("errors", &["format", "contentType", "codes", "messages"]),
        ("store", &["capacity", "probes", "namespace", "etcd"]),
        ("correlation", &["header", "generate"]),
        (
            "rateLimit",
            &[
                "rate",
                "periodSeconds",
                "burst",
                "callerHeaders",
                "perRoute",
                "resetFormat",
                "onContention",
                "chargeReplays",
                "capacity",
                "probes",
                "status",
            ],
        ),
    ];
    for (block, fields) in blocks {
        for field in *fields {
            let inner = format!(r#"{{"{field}": [[]]}}"#);
            let json = if block.is_empty() {
                inner
            } else {
                format!(r#"{{"{block}": {inner}}}"#)
            };
            let e = err(&json);
            let path = if block.is_empty() {
                field.to_string()
            } else {
                format!("{block}.{field}")
            };
            assert!(
                e.starts_with(&path) && !e.contains("unknown field"),
                "{json}: {e}"
            );
        }
    }
}

#[test]
fn lease_defaults_within_ttl_and_route_names_are_unique() {
    assert_eq!(
        Config::from_json(r#"{"ttlSeconds": 10}"#)
            .unwrap()
            .default_rule
            .lease_ms,
        10_000
    );
    assert_eq!(
        err(
            r#"{"routes":[{"name":"a","match":{"prefix":"/a"}},{"name":"a","match":{"prefix":"/b"}}]}"#
        ),
        "routes[1].name: must be unique and not \"default\", got \"a\""
    );
    assert!(err(
        r#"{"rateLimit":{"rate":1,"capacity":10},"routes":[{"name":"a","match":{"prefix":"/a"},"rateLimit":{"rate":1,"capacity":20}}]}"#
    )
    .starts_with("routes[0].rateLimit: capacity and probes must match"));
}

#[test]
fn status_specs() {
    let r = Config::from_json(
        r#"{"response":{"storeStatuses":["2xx", 404, "500-503"], "neverStoreStatuses":["all"]}}"#,
    )
    .unwrap()
    .default_rule;
    assert!(!r.stores_status(200));
    let r = Config::from_json(r#"{"response":{"storeStatuses":["all"], "neverStoreStatuses":[]}}"#)
        .unwrap()
        .default_rule;
    assert!(r.stores_status(500) && r.stores_status(429));
    let r = Config::from_json(r#"{"response":{"storeStatuses":["2xx", 404, "500-503"]}}"#)
        .unwrap()
        .default_rule;
    assert!(r.stores_status(204) && r.stores_status(404) && r.stores_status(502));
    assert!(!r.stores_status(400) && !r.stores_status(504));
}

#[test]
fn routes_inherit_and_match_in_order() {
    let c = Config::from_json(
        r#"{"ttlSeconds": 100, "onDuplicate": {"action": "reject", "code": "dup"},
            "routes": [
              {"name": "orders", "match": {"exact": "/orders", "methods": ["POST"]}, "key": {"sources": [{"jsonPointer": "/orderId"}]}},
              {"name": "hooks", "match": {"prefix": "/webhooks/"}, "onDuplicate": {"action": "acknowledge"}, "ttlSeconds": 50}
            ]}"#,
    )
    .unwrap();
    let orders = c.rule_for("POST", "/orders?x=1").unwrap();
    assert_eq!(orders.name, "orders");
    assert_eq!(orders.ttl_ms, 100_000);
    assert_eq!(orders.on_duplicate.action, DuplicateAction::Reject);
    assert_eq!(orders.on_duplicate.code.as_deref(), Some("dup"));
    assert_eq!(c.rule_for("PATCH", "/orders").unwrap().name, "default");
    let hooks = c.rule_for("POST", "/webhooks/email").unwrap();
    assert_eq!(hooks.name, "hooks");
    assert_eq!(hooks.ttl_ms, 50_000);
    assert_eq!(hooks.on_duplicate.action, DuplicateAction::Acknowledge);
    assert_eq!(hooks.on_duplicate.status, 200);
    assert_eq!(c.rule_for("POST", "/other").unwrap().name, "default");
    assert_eq!(c.rule_at(c.rule_index(hooks)).name, "hooks");
}

#[test]
fn store_etcd_block() {
    assert_eq!(Config::default().store_etcd, None);
    let c = Config::from_json(r#"{"store": {"etcd": {}}}"#).unwrap();
    let e = c.store_etcd.unwrap();
    assert_eq!(e.cluster, "etcd");
    assert_eq!(e.prefix, "/idemgate/");
    assert_eq!(e.authority, "etcd");
    assert_eq!(e.timeout_ms, 500);
    assert_eq!(e.retries, 2);
    assert_eq!(e.fail_policy, FailPolicy::Closed);
    assert_eq!(e.lease_bucket_ms, 60_000);
    assert_eq!(e.max_value_bytes, 1_000_000);
    let c = Config::from_json(
        r#"{"store": {"namespace": "n", "etcd": {"cluster": "kv", "prefix": "/a/b/", "timeoutMillis": 250,
            "retries": 0, "failPolicy": "open", "leaseBucketSeconds": 6, "maxValueBytes": 4096, "authority": "etcd.local"}}}"#,
    )
    .unwrap();
    let e = c.store_etcd.unwrap();
    assert_eq!(
        (e.cluster.as_str(), e.prefix.as_str(), e.authority.as_str()),
        ("kv", "/a/b/", "etcd.local")
    );
    assert_eq!(
        (
            e.timeout_ms,
            e.retries,
            e.lease_bucket_ms,
            e.max_value_bytes
        ),
        (250, 0, 6_000, 4096)
    );
    assert_eq!(e.fail_policy, FailPolicy::Open);
    let err = |json: &str| Config::from_json(json).unwrap_err().to_string();
    assert_eq!(
        err(r#"{"store": {"etcd": {"failPolicy": "maybe"}}}"#),
        "store.etcd.failPolicy: must be \"closed\" or \"open\", got \"maybe\""
    );
    assert_eq!(
        err(r#"{"store": {"etcd": {"timeoutMillis": 0}}}"#),
        "store.etcd.timeoutMillis: must be 10..=60000, got 0"
    );
    assert_eq!(
        err(r#"{"store": {"etcd": {"prefix": "idemgate"}}}"#),
        "store.etcd.prefix: must start and end with \"/\", got \"idemgate\""
    );
    assert_eq!(
        err(r#"{"store": {"etcd": {"maxValueBytes": 2000000}}}"#),
        "store.etcd.maxValueBytes: must be 1024..=1100000, got 2000000"
    );
    assert_eq!(
        err(r#"{"store": {"etcd": {"leaseBucketSeconds": 1}}}"#),
        "store.etcd.leaseBucketSeconds: must be 2..=86400, got 1"
    );
    assert!(err(r#"{"store": {"etcd": {"clustr": "x"}}}"#)
        .starts_with("store.etcd.clustr: unknown field"));
    assert!(err(r#"{"store": {"etcd": {"cluster": ""}}}"#)
        .starts_with("store.etcd.cluster: must be 1..=255"));
}
