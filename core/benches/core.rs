//! criterion benches for idemgate-core (`make bench` runs them with short times; plain
//! `cargo bench -p idemgate-core` works too).
//!
//! - `fingerprint/raw/<size>`: SHA-256 fingerprint of a POST with a 1 KiB / 64 KiB / 1 MiB
//!   body (throughput in bytes/s), `Fingerprinter` as the filter uses it for raw bodies.
//! - `fingerprint/canonical/<size>`: a rule with `fingerprint.body: "canonicalJson"`: parse
//!   the JSON body (`idemgate_core::json`, as `resolve` does) and fingerprint it canonically.
//! - `decide/<case>`: one call of `decide` per iteration.
//! - `record/{encode,decode}/<case>`: the record codec, and the slot index entry the store
//!   scans.
//! - `store/<case>`: `SlotTable::begin` (+ `complete` for first requests) over
//!   `MemoryStore`, with `store.probes` 8 (default) and 1.
//! - `decimal/<case>`: a JSON number's text to `f64` by `idemgate_core::decimal` (what the
//!   parser and canonical JSON use) beside `str::parse::<f64>`: a short number (the fast
//!   path) and the worst case, 770 significant digits near the subnormal range (the exact
//!   big-integer path).
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
                let json = idemgate_core::json::parse(black_box(b)).ok();
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

fn decimals(c: &mut Criterion) {
    let mut g = c.benchmark_group("decimal");
    let long = format!("{}e-1090", "7".repeat(770));
    for (name, text) in [("short", "1234.5678"), ("long_770_digits", long.as_str())] {
        g.bench_function(format!("ours/{name}"), |b| {
            b.iter(|| idemgate_core::decimal::to_f64(black_box(text)))
        });
        g.bench_function(format!("std/{name}"), |b| {
            b.iter(|| black_box(text).parse::<f64>())
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
    targets = fingerprint, decisions, records, store, decimals
}

fn main() {
    // `cargo test --benches` runs this binary without `--bench`: skip the report there.
    if std::env::args().any(|a| a == "--bench") {
        report_store_calls();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
