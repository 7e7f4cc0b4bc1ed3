//! `idemgate-wasm-sha256 check N`: hashes N random inputs (random lengths up to 4 KiB, cut at
//! random points into up to four updates) and every length 0..=300 with the filter's
//! [`Simd`] SHA-256 and with the `sha2` crate ([`Portable`]), and exits 1 on the first
//! difference. Built for wasm32-wasip1 with simd128 (as the filter is) and run under node's
//! V8 (`make test-wasm`, part of `make test`), it checks the code Envoy runs, not a host
//! stand-in: on wasm32 with simd128 `Simd` computes its message schedule in `v128` lanes.
//!
//! `idemgate-wasm-sha256 bench`: MB/s of both over a 64 KiB body (the bench's body size).
// A test program: indexing a buffer it sized itself.
#![allow(clippy::indexing_slicing)]

use std::process::ExitCode;
use std::time::Instant;

use idemgate_core::sha256::{Portable, Simd};

fn random(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        eprintln!("getrandom failed: {e}");
        std::process::exit(2);
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    random(&mut b);
    u32::from_le_bytes(b)
}

fn usize_below(n: usize) -> usize {
    usize::try_from(random_u32()).unwrap_or(0) % n.max(1)
}

/// The SIMD digest of `data` fed in pieces cut at `cuts`.
fn simd_in_pieces(data: &[u8], cuts: &[usize]) -> [u8; 32] {
    let mut h = Simd::new();
    let mut rest = data;
    for c in cuts {
        let (a, b) = rest.split_at((*c).min(rest.len()));
        h.update(a);
        rest = b;
    }
    h.update(rest);
    h.finalize()
}

fn check(n: usize) -> ExitCode {
    let mut data = vec![0u8; 4096];
    for len in 0..=300 {
        random(&mut data[..len]);
        if Simd::digest(&data[..len]) != Portable::digest(&data[..len]) {
            eprintln!("SIMD SHA-256 differs from sha2 for a {len}-byte input");
            return ExitCode::FAILURE;
        }
    }
    for i in 0..n {
        let len = usize_below(data.len() + 1);
        random(&mut data[..len]);
        let cuts: Vec<usize> = (0..usize_below(5)).map(|_| usize_below(len + 1)).collect();
        let input = &data[..len];
        if simd_in_pieces(input, &cuts) != Portable::digest(input) {
            eprintln!("SIMD SHA-256 differs from sha2: input {i}, {len} bytes, cuts {cuts:?}");
            return ExitCode::FAILURE;
        }
    }
    println!(
        "sha256 on {}: SIMD = sha2 for {n} random inputs (up to 4 KiB, up to 5 pieces) and every length 0..=300",
        if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
            "wasm32 with simd128"
        } else {
            "this host (no wasm SIMD)"
        }
    );
    ExitCode::SUCCESS
}

fn bench() -> ExitCode {
    let mut body = vec![0u8; 64 * 1024];
    random(&mut body);
    let rounds: u32 = 400;
    let simd: fn(&[u8]) -> [u8; 32] = |d| Simd::digest(d);
    let sha2: fn(&[u8]) -> [u8; 32] = |d| Portable::digest(d);
    for (name, f) in [
        ("simd", simd),
        ("sha2", sha2),
        ("simd", simd),
        ("sha2", sha2),
    ] {
        let start = Instant::now();
        let mut acc = 0u8;
        for _ in 0..rounds {
            acc ^= f(&body)[0];
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{name}: {:.0} MB/s, {:.1} us per 64 KiB ({acc})",
            f64::from(rounds) * body.len() as f64 / secs / 1e6,
            secs / f64::from(rounds) * 1e6
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("check") => check(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(2000)),
        Some("bench") => bench(),
        _ => {
            eprintln!("usage: idemgate-wasm-sha256 check [N] | bench");
            ExitCode::from(2)
        }
    }
}
