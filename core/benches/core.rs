//! criterion benches for idemgate-core (`make bench` runs them with short times; plain
//! `cargo bench -p idemgate-core` works too).
//!
//! - `fingerprint/raw/<size>`: SHA-256 fingerprint of a POST with a 1 KiB / 64 KiB / 1 MiB
//!   body (throughput in bytes/s), `Fingerprinter` as the filter uses it for raw bodies.
//! - `fingerprint/canonical/<size>`: a rule with `fingerprint.body: "canonicalJson"`: parse
//!   the JSON body (`request::body::parse`, as `resolve` does) and fingerprint it canonically.
//! - `decide/<case>`: one call of `decide` per iteration.
//! - `record/{encode,decode}/<case>`: the record codec, and the slot index entry the store
//!   scans.
//! - `store/<case>`: `SlotTable::begin` (+ `complete` for first requests) over
//!   `MemoryStore`, with `store.probes` 8 (default) and 1.
//! - `adversarial/<case>`: `resolve` (parse, JSON Pointer key, canonical fingerprint with
//!   exclusions) of a 1 MiB body built to be expensive, beside `benign`, an ordinary 1 MiB
//!   order of the same size: 10^5 repeated member names (refused), 10^4 excluded pointers,
//!   numbers of 10^5 digits, arrays nested at the depth limit, 10^5 tiny members. Each should
//!   cost at most 5x `benign` (BENCHMARKS.md, "Hostile bodies").
//!
//! Before criterion starts, the bench prints how many store calls (`get`, `put`) one first
//! request, one replay, makes through `SlotTable`: in Envoy each is a shared-data hostcall.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, BatchSize, BenchmarkId, Criterion, Throughput};
use idemgate_core::decision::{self, Request};
use idemgate_core::record::{SlotEntry, SlotState};
use idemgate_core::store::{Begun, Cas, CasStore, Expect, MemoryStore, SlotTable, StoreError};
use idemgate_core::{
    decide, Config, Fingerprint, Fingerprinter, KeyId, Record, Rule, StoredResponse,
};

const KIB: usize = 1024;

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

fn response(n: usize) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: body(n),
    }
}

fn key(n: u64) -> KeyId {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&n.to_le_bytes());
    k[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    KeyId(k)
}

fn config(probes: u32) -> Config {
    Config::from_json(&format!(r#"{{"store": {{"probes": {probes}}}}}"#)).unwrap()
}

fn rule(config: &Config) -> &Rule {
    config.rule_for("POST", "/orders").unwrap()
}

/// A JSON order of about `n` bytes: items with a few fields each.
fn json_body(n: usize) -> Vec<u8> {
    let mut out = String::from(r#"{"customer":"c-42","currency":"EUR","items":["#);
    let mut i = 0;
    while out.len() + 80 < n {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"sku":"SKU-{i:06}","qty":{},"price":{}.5,"note":"gift wrap {i}"}}"#,
            i % 7 + 1,
            i % 100
        ));
        i += 1;
    }
    out.push_str(r#"],"pad":""#);
    while out.len() + 2 < n {
        out.push('x');
    }
    out.push_str(r#""}"#);
    out.into_bytes()
}

fn fingerprint(c: &mut Criterion) {
    let mut g = c.benchmark_group("fingerprint/raw");
    for (label, n) in [("1KiB", KIB), ("64KiB", 64 * KIB), ("1MiB", 1024 * KIB)] {
        let b = body(n);
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(label), &b, |bch, b| {
            bch.iter(|| {
                let mut fp = Fingerprinter::new("POST", "/orders?src=bench");
                fp.update(black_box(b));
                black_box(fp.finish())
            })
        });
    }
    g.finish();
    let cfg = Config::from_json(r#"{"fingerprint": {"body": "canonicalJson"}}"#).unwrap();
    let r = rule(&cfg);
    let mut g = c.benchmark_group("fingerprint/canonical");
    for (label, n) in [("1KiB", KIB), ("64KiB", 64 * KIB), ("1MiB", 1024 * KIB)] {
        let b = json_body(n);
        g.throughput(Throughput::Bytes(b.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(label), &b, |bch, b| {
            bch.iter(|| {
                let json = idemgate_core::request::body::parse(black_box(b)).ok();
                assert!(json.is_some());
                black_box(decision::fingerprint(
                    r,
                    "POST",
                    "/orders?src=bench",
                    &[],
                    b,
                    json,
                ))
            })
        });
    }
    g.finish();
}

fn decisions(c: &mut Criterion) {
    let config = Config::default();
    let cfg = rule(&config);
    let fp = Fingerprint([1; 32]);
    let req = Request {
        fingerprint: fp,
        owner: 7,
        expires_in_ms: None,
    };
    let now = 1_000_000;
    let busy = Record::InFlight {
        owner: 1,
        lease_until: now + 10_000,
        expires_at: now + 100_000,
        fingerprint: fp,
    };
    let done = |n| Record::Completed {
        owner: 1,
        expires_at: now + 100_000,
        fingerprint: fp,
        response: response(n),
    };
    let (done1, done64) = (done(KIB), done(64 * KIB));
    let other = Request {
        fingerprint: Fingerprint([2; 32]),
        owner: 7,
        expires_in_ms: None,
    };
    let mut g = c.benchmark_group("decide");
    g.bench_function("absent_forward", |b| {
        b.iter(|| decide(cfg, black_box(&req), None, now))
    });
    g.bench_function("in_flight_conflict", |b| {
        b.iter(|| decide(cfg, black_box(&req), Some(&busy), now))
    });
    g.bench_function("completed_mismatch", |b| {
        b.iter(|| decide(cfg, black_box(&other), Some(&done1), now))
    });
    // Replay clones the stored response (its body) out of the record.
    g.bench_function("completed_replay_1KiB", |b| {
        b.iter(|| decide(cfg, black_box(&req), Some(&done1), now))
    });
    g.bench_function("completed_replay_64KiB", |b| {
        b.iter(|| decide(cfg, black_box(&req), Some(&done64), now))
    });
    g.finish();
}

fn records(c: &mut Criterion) {
    let fp = Fingerprint([3; 32]);
    let in_flight = Record::InFlight {
        owner: 9,
        lease_until: 2,
        expires_at: 3,
        fingerprint: fp,
    };
    let completed = |n| Record::Completed {
        owner: 9,
        expires_at: 3,
        fingerprint: fp,
        response: response(n),
    };
    let slot = SlotEntry {
        key_id: key(1),
        state: SlotState::Completed {
            owner: 9,
            expires_at: 3,
            fingerprint: fp,
        },
    };
    let cases: Vec<(&str, Record)> = vec![
        ("in_flight", in_flight),
        ("completed_1KiB", completed(KIB)),
        ("completed_64KiB", completed(64 * KIB)),
    ];
    let mut g = c.benchmark_group("record");
    for (label, rec) in &cases {
        g.bench_with_input(BenchmarkId::new("encode", label), rec, |b, r| {
            b.iter(|| black_box(r).encode())
        });
        let bytes = rec.encode();
        g.bench_with_input(BenchmarkId::new("decode", label), &bytes, |b, bytes| {
            b.iter(|| Record::decode(black_box(bytes)).unwrap())
        });
    }
    let slot_bytes = slot.encode();
    g.bench_function("encode/slot_entry", |b| {
        b.iter(|| black_box(&slot).encode())
    });
    g.bench_function("decode/slot_entry", |b| {
        b.iter(|| SlotEntry::decode(black_box(&slot_bytes)).unwrap())
    });
    g.finish();
}

/// A first request through the table: begin (claim) then complete (store the response).
fn first_request(table: &SlotTable<'_, impl CasStore>, cfg: &Config, n: u64, now: u64) {
    let req = Request {
        fingerprint: Fingerprint([5; 32]),
        owner: n,
        expires_in_ms: None,
    };
    match table.begin(rule(cfg), key(n), &req, now).unwrap().0 {
        Begun::Forward(h) => {
            assert!(table.complete(&h, &response(64)).unwrap().0);
        }
        other => panic!("first request for key {n}: {other:?}"),
    }
}

fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    for probes in [8u32, 1] {
        let cfg = config(probes);
        // First requests on a table that is (after the first ~capacity iterations) full:
        // every probed slot is live, so each claim evicts. That is the steady state under
        // a steady stream of unique keys.
        let mem = MemoryStore::default();
        let table = SlotTable::new(&mem, &cfg);
        let n = Cell::new(0u64);
        g.bench_function(format!("first_begin_complete/probes{probes}"), |b| {
            b.iter(|| {
                let i = n.get() + 1;
                n.set(i);
                first_request(&table, &cfg, i, 1_000);
            })
        });
        // Replays of one completed key.
        let mem = MemoryStore::default();
        let table = SlotTable::new(&mem, &cfg);
        first_request(&table, &cfg, 42, 1_000);
        let req = Request {
            fingerprint: Fingerprint([5; 32]),
            owner: 1,
            expires_in_ms: None,
        };
        g.bench_function(format!("replay_begin/probes{probes}"), |b| {
            b.iter(
                || match table.begin(rule(&cfg), key(42), &req, 2_000).unwrap().0 {
                    Begun::Replay(r) => black_box(r),
                    other => panic!("{other:?}"),
                },
            )
        });
    }
    // Fresh table per batch: first requests while slots are still being created.
    let cfg = config(8);
    g.bench_function("first_begin_complete/probes8_empty_table", |b| {
        b.iter_batched(
            MemoryStore::default,
            |mem| {
                let table = SlotTable::new(&mem, &cfg);
                first_request(&table, &cfg, 1, 1_000);
                mem
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Counts the calls `SlotTable` makes; the Envoy adapter turns each into a shared-data
/// hostcall (and a `put` with `Expect::Absent` into one more `get`, of the fence key).
#[derive(Default)]
struct Counting {
    inner: MemoryStore,
    gets: Cell<u32>,
    puts: Cell<u32>,
    absent_puts: Cell<u32>,
}

impl Counting {
    fn take(&self) -> (u32, u32, u32) {
        let r = (self.gets.get(), self.puts.get(), self.absent_puts.get());
        self.gets.set(0);
        self.puts.set(0);
        self.absent_puts.set(0);
        r
    }
}

impl CasStore for Counting {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Cas)>, StoreError> {
        self.gets.set(self.gets.get() + 1);
        self.inner.get(key)
    }
    fn put(&self, key: &str, value: &[u8], expect: Expect) -> Result<bool, StoreError> {
        self.puts.set(self.puts.get() + 1);
        if expect == Expect::Absent {
            self.absent_puts.set(self.absent_puts.get() + 1);
        }
        self.inner.put(key, value, expect)
    }
}

fn report_store_calls() {
    println!("store calls per request through SlotTable (get / put / put-if-absent; each is a shared-data hostcall in Envoy, a put-if-absent costs one more get there):");
    for probes in [8u32, 1] {
        let cfg = config(probes);
        let capacity = u64::from(cfg.store_capacity);
        let s = Counting::default();
        let t = SlotTable::new(&s, &cfg);
        let req = |owner| Request {
            fingerprint: Fingerprint([5; 32]),
            owner,
            expires_in_ms: None,
        };
        // Empty table: the very first request.
        let (begun, _) = t.begin(rule(&cfg), key(1), &req(1), 1_000).unwrap();
        let b = s.take();
        let Begun::Forward(h) = begun else {
            panic!("{begun:?}")
        };
        t.complete(&h, &response(64)).unwrap();
        let c = s.take();
        println!(
            "  probes={probes} first request, empty table:  begin {}/{}/{}  complete {}/{}/{}",
            b.0, b.1, b.2, c.0, c.1, c.2
        );
        // Fill the table well past capacity, then measure a first request (evicting).
        for i in 2..(2 * capacity) {
            first_request(&t, &cfg, i, 1_000 + i);
        }
        s.take();
        let n = 10 * capacity;
        let (begun, _) = t.begin(rule(&cfg), key(n), &req(n), 100_000).unwrap();
        let b = s.take();
        let Begun::Forward(h) = begun else {
            panic!("{begun:?}")
        };
        t.complete(&h, &response(64)).unwrap();
        let c = s.take();
        println!(
            "  probes={probes} first request, full table:   begin {}/{}/{}  complete {}/{}/{}",
            b.0, b.1, b.2, c.0, c.1, c.2
        );
        let (begun, _) = t.begin(rule(&cfg), key(n), &req(n + 1), 100_001).unwrap();
        let b = s.take();
        assert!(matches!(begun, Begun::Replay(_)), "{begun:?}");
        println!(
            "  probes={probes} replay:                      begin {}/{}/{}",
            b.0, b.1, b.2
        );
    }
}

/// 1 MiB: the adversarial bodies and the benign one, each padded to the same size.
const MIB: usize = 1024 * KIB;

/// `text` (an object missing its closing brace) padded with a string member to `MIB` bytes.
fn padded(mut text: String) -> Vec<u8> {
    text.push_str(r#","pad":""#);
    while text.len() + 2 < MIB {
        text.push('x');
    }
    text.push_str(r#""}"#);
    text.into_bytes()
}

/// The adversarial bodies, by case name, with the configuration each runs under.
fn adversarial_cases() -> Vec<(&'static str, String, Vec<u8>)> {
    let base = |extra: &str| {
        format!(
            r#"{{"key": {{"sources": [{{"jsonPointer": "/id"}}]}}, "fingerprint": {{"body": "canonicalJson"{extra}}}, "maxBodyBytes": 2097152}}"#
        )
    };
    let mut cases = Vec::new();
    // an ordinary order of the same size
    let benign = String::from_utf8(json_body(MIB - 10)).unwrap();
    cases.push((
        "benign",
        base(""),
        benign.replacen('{', r#"{"id":"k1","#, 1).into_bytes(),
    ));
    // 10^5 members of one name: refused at the second
    let mut dup = String::from(r#"{"id":"k1""#);
    for _ in 0..100_000 {
        dup.push_str(r#","a":1"#);
    }
    cases.push(("duplicate_members_1e5", base(""), padded(dup)));
    // 10^4 excluded pointers, every one present in the body
    let pointers: Vec<String> = (0..10_000).map(|i| format!("\"/m{i}/ts\"")).collect();
    let mut ex = String::from(r#"{"id":"k1""#);
    for i in 0..10_000 {
        ex.push_str(&format!(r#","m{i}":{{"ts":{i},"v":"value {i}"}}"#));
    }
    cases.push((
        "exclude_pointers_1e4",
        base(&format!(r#", "excludePointers": [{}]"#, pointers.join(","))),
        padded(ex),
    ));
    // numbers of 10^5 digits: integers (kept exactly) and decimals (to a double)
    let digits: String = (0..100_000)
        .map(|i| char::from(b'1' + (i % 9) as u8))
        .collect();
    let mut num = String::from(r#"{"id":"k1","n":["#);
    for i in 0..9 {
        if i > 0 {
            num.push(',');
        }
        num.push_str(&digits);
        if i % 2 == 1 {
            num.push_str(".5e-99990");
        }
    }
    num.push(']');
    cases.push(("digits_1e5", base(""), padded(num)));
    // arrays nested at the depth limit (127 levels in all), repeated
    let mut deep = String::from(r#"{"id":"k1","d":["#);
    let nest = format!("{}1{}", "[".repeat(125), "]".repeat(125));
    let mut first = true;
    while deep.len() + nest.len() + 64 < MIB {
        if !first {
            deep.push(',');
        }
        first = false;
        deep.push_str(&nest);
    }
    deep.push(']');
    cases.push(("nesting_at_limit", base(""), padded(deep)));
    // 10^5 tiny members
    let mut tiny = String::from(r#"{"id":"k1""#);
    for i in 0..100_000 {
        tiny.push_str(&format!(r#","{i:x}":0"#));
    }
    cases.push(("tiny_members_1e5", base(""), padded(tiny)));
    cases
}

fn adversarial(c: &mut Criterion) {
    let mut g = c.benchmark_group("adversarial");
    g.throughput(Throughput::Bytes(MIB as u64));
    for (name, cfg, body) in adversarial_cases() {
        assert_eq!(body.len(), MIB, "{name}");
        let config = Config::from_json(&cfg).unwrap();
        let headers: Vec<(String, Vec<u8>)> = vec![];
        let decision::Admission::Inspect(pending) =
            decision::admit(&config, "POST", "/orders", &headers)
        else {
            panic!("{name}: not inspected")
        };
        let outcome = decision::resolve(&config, &pending, &body);
        // the duplicate body is refused, every other one resolves
        assert_eq!(
            matches!(outcome, decision::Resolution::Ready(_)),
            name != "duplicate_members_1e5",
            "{name}: {outcome:?}"
        );
        g.bench_function(name, |b| {
            b.iter(|| black_box(decision::resolve(&config, &pending, black_box(&body))))
        });
    }
    g.finish();
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = short();
    targets = fingerprint, decisions, records, store, adversarial
}

/// `IDEMGATE_ADVERSARIAL=<case>:<n>`: resolve that case's body `n` times and exit, for a
/// CPU-time count outside criterion (`perf stat -e task-clock`, BENCHMARKS.md).
fn adversarial_only(spec: &str) {
    let (name, n) = spec.split_once(':').unwrap_or((spec, "10"));
    let n: usize = n.parse().unwrap();
    let (_, cfg, body) = adversarial_cases()
        .into_iter()
        .find(|c| c.0 == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let config = Config::from_json(&cfg).unwrap();
    let decision::Admission::Inspect(pending) = decision::admit(&config, "POST", "/orders", &[])
    else {
        panic!("{name}: not inspected")
    };
    for _ in 0..n {
        black_box(decision::resolve(&config, &pending, black_box(&body)));
    }
}

fn main() {
    if let Ok(spec) = std::env::var("IDEMGATE_ADVERSARIAL") {
        return adversarial_only(&spec);
    }
    // `cargo test --benches` runs this binary without `--bench`: skip the report there.
    if std::env::args().any(|a| a == "--bench") {
        report_store_calls();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
