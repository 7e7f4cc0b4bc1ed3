//! The fuzz targets of idemgate-core: everything that reads bytes a client, an operator or
//! etcd controls. Each function takes the fuzzer's input and panics only when an invariant
//! breaks; `fuzz_targets/<name>.rs` hands it to libFuzzer (`make fuzz`), and
//! `tests/corpus.rs` replays the corpora in `fuzz/corpus/<name>/` under `make test`.
//!
//! | target | reads | checks |
//! |---|---|---|
//! | [`config`] | a configuration document | no panic; refused exactly when `serde_json` cannot read it or validation fails, errors name a path |
//! | [`key_header`] | an `Idempotency-Key` value (+ its `maxLength`) | accepted keys are 1..=max printable ASCII; admit/resolve never panic |
//! | [`body`] | a request body | differential against `serde_json`; canonical JSON reads back as itself; exclusions, pointers and `resolve` never panic |
//! | [`record`] | a stored record, slot entry, body or fleet cache value | decode never panics; what decodes re-encodes to the same record |
//! | [`etcd`] | an etcd gRPC answer (+ status) | every answer parser returns a value or an error |
//! | [`render`] | a rejection's fields and the request's echoed values | every answer body is JSON, every status a status |
//!
//! ```
//! idemgate_fuzz::body(br#"{"a": [1, 2.50, "x"], "b": {"c": null}}"#);
//! idemgate_fuzz::config(br#"{"ttlSeconds": 60}"#);
//! ```
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use idemgate_core::config::Config;
use idemgate_core::decision::{admit, resolve, Admission, Rejection};
use idemgate_core::fleet;
use idemgate_core::key::{parse_key, KeyError, KeyId};
use idemgate_core::problem::{self, AnswerContext};
use idemgate_core::record::{decode_body, encode_body, Record, SlotEntry};
use idemgate_core::request::body::{self, BodyError, Json};
use idemgate_core::request::canonical::{canonical_bytes, key_text, Exclusions};
use serde_json::Value;

/// A configuration document: `Config::from_slice` agrees with `serde_json` about what is JSON.
pub fn config(data: &[u8]) {
    let result = Config::from_slice(data);
    let blank = std::str::from_utf8(data).is_ok_and(|t| t.trim().is_empty());
    let json = serde_json::from_slice::<Value>(data);
    match &result {
        Ok(c) => {
            assert!(blank || json.is_ok(), "accepted what serde_json refuses");
            for p in ["/", "/orders", "/%6Frders/./x", "//a/../b?x=1", "*"] {
                let _ = c.rule_for("POST", p);
                let _ = c.limit_rule_for(p);
            }
        }
        Err(e) => {
            assert!(!e.path.is_empty() && !e.problem.is_empty(), "{e:?}");
            assert!(!blank, "refused a blank document: {e}");
        }
    }
}

/// An `Idempotency-Key` header value; the first two bytes choose `key.maxLength`.
pub fn key_header(data: &[u8]) {
    let (max, value) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b]) % 1024) + 1, rest),
        _ => (255, data),
    };
    match parse_key(value, max) {
        Ok(k) => {
            assert!(!k.is_empty() && k.len() <= max, "{k:?}");
            assert!(k.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{k:?}");
            let _ = KeyId::scoped("POST", "/orders", &[value], &k);
        }
        Err(KeyError::TooLong { len, max: m }) => assert!(len > m),
        Err(_) => {}
    }
    let config = Config::from_json(&format!(
        r#"{{"key": {{"maxLength": {max}, "required": true}}}}"#
    ))
    .expect("valid configuration");
    let headers = vec![("idempotency-key".to_string(), value.to_vec())];
    if let Admission::Inspect(p) = admit(&config, "POST", "/orders", &headers) {
        let _ = resolve(&config, &p, b"{}");
    }
}

/// Pointers into a document: every member and item path, at most `limit`.
fn pointers(doc: &Json, prefix: &str, out: &mut Vec<String>, limit: usize) {
    let children: Vec<(String, &Json)> = match doc {
        Json::Object(m) => m
            .iter()
            .map(|(k, v)| (k.replace('~', "~0").replace('/', "~1"), v))
            .collect(),
        Json::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (token, child) in children {
        if out.len() >= limit {
            return;
        }
        let p = format!("{prefix}/{token}");
        out.push(p.clone());
        pointers(child, &p, out, limit);
    }
}

/// A request body: differential against `serde_json`, canonical JSON stable, and the whole
/// of `resolve` (pointer key, canonical fingerprint with exclusions) never panics.
pub fn body(data: &[u8]) {
    let ours = body::parse(data);
    let theirs = serde_json::from_slice::<Value>(data);
    match (&ours, &theirs) {
        (Ok(j), Ok(v)) => assert!(j.denotes(v), "differs from serde_json"),
        (Ok(_), Err(e)) => panic!("accepted what serde_json refuses: {e}"),
        (Err(BodyError::Syntax(m)), Ok(_)) => {
            assert!(
                m.starts_with("number out of range"),
                "refused what serde_json reads: {m}"
            )
        }
        (Err(BodyError::Duplicate { member, .. }), _) => assert!(
            String::from_utf8_lossy(data).contains(member.as_str()) || data.contains(&b'\\'),
            "duplicate {member:?} not in the text"
        ),
        (Err(BodyError::Syntax(_)), Err(_)) => {}
    }
    if let Ok(doc) = &ours {
        let canonical = canonical_bytes(doc);
        let again = body::parse(&canonical).expect("canonical JSON reads back");
        assert_eq!(
            canonical_bytes(&again),
            canonical,
            "canonical JSON is not stable"
        );
        let mut paths = Vec::new();
        pointers(doc, "", &mut paths, 64);
        for p in &paths {
            let found = doc.pointer(p).expect("a pointer to a member finds it");
            let _ = key_text(found);
        }
        let mut trimmed = doc.clone();
        Exclusions::new(paths.iter().step_by(2).map(String::as_str)).remove_from(&mut trimmed);
        let c = canonical_bytes(&trimmed);
        assert!(body::parse(&c).is_ok(), "a trimmed document is JSON");
    }
    let config = Config::from_json(
        r#"{"key": {"sources": [{"jsonPointer": "/id"}, {"composite": [{"jsonPointer": "/a/0"}, {"route": true}]}], "deriveFromBody": true},
            "fingerprint": {"body": "canonicalJson", "excludePointers": ["/ts", "/a/1", "/n/~0x~1y"]}}"#,
    )
    .expect("valid configuration");
    let headers: Vec<(String, Vec<u8>)> = Vec::new();
    if let Admission::Inspect(p) = admit(&config, "POST", "/orders", &headers) {
        let _ = resolve(&config, &p, data);
    }
}

/// Stored bytes: records, slot entries, response bodies and fleet cache values.
pub fn record(data: &[u8]) {
    if let Ok(r) = Record::decode(data) {
        assert_eq!(
            Record::decode(&r.encode()).as_ref(),
            Ok(&r),
            "record round trip"
        );
        let key = KeyId([7; 16]);
        let cached = fleet::cache_value(&key, &r);
        let _ = fleet::cache_lookup(&cached, &key, 0);
    }
    if let Ok(e) = SlotEntry::decode(data) {
        assert_eq!(
            SlotEntry::decode(&e.encode()).as_ref(),
            Ok(&e),
            "slot round trip"
        );
    }
    if let Ok((owner, response)) = decode_body(data) {
        let again = decode_body(&encode_body(owner, &response)).expect("body round trip");
        assert_eq!(again, (owner, response));
    }
    let _ = fleet::cache_lookup(data, &KeyId([7; 16]), 1);
}

/// An etcd gRPC answer: the first byte picks the gRPC status (0: OK, the rest is the
/// protobuf message; else a failure with that code and the rest as its message).
pub fn etcd(data: &[u8]) {
    let (code, rest) = match data {
        [c, rest @ ..] => (u32::from(c % 18), rest),
        [] => (0, data),
    };
    let message = String::from_utf8_lossy(rest);
    let reply = if code == 0 {
        fleet::Reply::Ok(rest)
    } else {
        fleet::Reply::Failed {
            code,
            message: &message,
        }
    };
    let _ = fleet::calls::parse_grant(&reply);
    let _ = fleet::calls::parse_keepalive(&reply);
    let _ = fleet::calls::parse_txn(&reply);
    let _ = fleet::calls::parse_range(&reply);
    let _ = fleet::Lease::Expiry { deadline: 60_000 }.parse_cache(rest);
}

/// Error rendering: fields of a rejection and the echoed request values come from the input;
/// every rendering must be a JSON body with a valid status.
pub fn render(data: &[u8]) {
    let mut parts = data
        .split(|b| *b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut next = || parts.next().unwrap_or_default();
    let selector = data.first().copied().unwrap_or(0);
    let number = u64::from_le_bytes(std::array::from_fn(|i| {
        data.get(i + 1).copied().unwrap_or(0)
    }));
    let rejection = match selector % 11 {
        0 => Rejection::MissingKey { sources: next() },
        1 => Rejection::MalformedKey {
            source: next(),
            reason: KeyError::TooLong {
                len: usize::from(selector),
                max: 1,
            },
        },
        2 => Rejection::InvalidBody { detail: next() },
        3 => Rejection::InvalidExpiry {
            header: next(),
            detail: next(),
        },
        4 => Rejection::BodyTooLarge { limit: number },
        5 => Rejection::Conflict {
            retry_after_s: number,
        },
        6 => Rejection::Mismatch,
        7 => Rejection::Duplicate,
        8 => Rejection::StoreUnavailable {
            retry_after_s: number,
            reason: "fuzz",
        },
        9 => Rejection::Misconfigured { detail: next() },
        _ => Rejection::RateLimited {
            retry_after_s: number,
        },
    };
    let ctx = AnswerContext {
        idempotency_key: Some(next()).filter(|s| !s.is_empty()),
        request_id: Some(next()).filter(|s| !s.is_empty()),
        correlation_header: Some("x-correlation-id".into()),
    };
    for config in render_configs() {
        for rule in config.rules() {
            let answer = problem::render(rule, &rejection, &ctx);
            assert!((100..=599).contains(&answer.status), "{}", answer.status);
            assert!(
                serde_json::from_slice::<Value>(&answer.body).is_ok(),
                "not JSON: {}",
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
}

fn render_configs() -> Vec<Config> {
    [
        "{}",
        r#"{"errors": {"codes": {"conflict": "C"}, "messages": {"mismatch": "M {{path}}"}}, "onDuplicate": {"action": "reject", "code": "dup"}}"#,
        r#"{"errors": {"format": "envelope", "envelope": {"ok": false, "e": {"s": "{{status}}", "c": "{{code}}", "m": "{{message}} {{detail}}", "p": "{{path}}", "k": "{{idempotencyKey}}", "r": ["{{requestId}}", "{{retryAfterSeconds}}"], "x": "a{{status}}b{{retryAfterSeconds}}"}}},
            "routes": [{"name": "ack", "match": {"prefix": "/w"}, "onDuplicate": {"action": "acknowledge", "body": {"d": true, "m": "{{message}}", "k": "{{idempotencyKey}}"}}}]}"#,
    ]
    .iter()
    .map(|c| Config::from_json(c).expect("valid configuration"))
    .collect()
}
