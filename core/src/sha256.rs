//! SHA-256, the hash of fingerprints and key ids.
//!
//! Two implementations of the same function (FIPS 180-4):
//!
//! - [`Portable`]: the `sha2` crate. Used wherever the build has no wasm SIMD: the edge
//!   module (size-bound, opt-level z), native builds and tests.
//! - [`Simd`]: written here for wasm32 with `simd128`, as the Envoy filter is built (see
//!   `.cargo/config.toml`). SHA-256 rounds are a serial chain that SIMD cannot split, but the
//!   message schedule is four independent lanes at a time: it is computed four words per
//!   step with `v128` operations (big-endian loads, σ0/σ1, the round constants added in
//!   the vector), leaving the rounds only the state in locals. Kept because the crate cannot
//!   reach the hashing goal in Envoy (BENCHMARKS.md, "Hostile bodies and the crates under the
//!   core"): under V8 (node `--no-liftoff`, as Envoy runs it) this is ~450 MB/s against
//!   ~180 MB/s for `sha2`. `make test-wasm` proves it equal to `sha2` on random inputs on
//!   wasm32 with simd128 under V8 (`tests/wasm-sha256`); on other targets the same code runs
//!   on `[u32; 4]` lanes, which the unit tests check against `sha2` too.
//!
//! [`Sha256`] is whichever of the two the build uses; [`self_test`] checks it against
//! known answers (the filter runs it when it loads, so a miscompiled SIMD path refuses to
//! configure rather than fingerprint wrongly).

/// The SHA-256 this build uses.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub type Sha256 = Simd;
/// The SHA-256 this build uses.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
pub type Sha256 = Portable;

/// SHA-256 from the `sha2` crate.
#[derive(Clone, Default)]
pub struct Portable(sha2::Sha256);

impl Portable {
    /// A new hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data`.
    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        sha2::Digest::update(&mut self.0, data.as_ref());
    }

    /// The digest.
    pub fn finalize(self) -> [u8; 32] {
        sha2::Digest::finalize(self.0).into()
    }

    /// The digest of `data`.
    pub fn digest(data: impl AsRef<[u8]>) -> [u8; 32] {
        let mut h = Self::new();
        h.update(data);
        h.finalize()
    }
}

/// SHA-256 with the message schedule in SIMD lanes (see the module documentation).
#[derive(Clone)]
pub struct Simd {
    state: [u32; 8],
    buf: [u8; 64],
    buf_len: usize,
    len: u64,
}

const H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

const K: [u32; 64] = [
    0x428a_2f98,
    0x7137_4491,
    0xb5c0_fbcf,
    0xe9b5_dba5,
    0x3956_c25b,
    0x59f1_11f1,
    0x923f_82a4,
    0xab1c_5ed5,
    0xd807_aa98,
    0x1283_5b01,
    0x2431_85be,
    0x550c_7dc3,
    0x72be_5d74,
    0x80de_b1fe,
    0x9bdc_06a7,
    0xc19b_f174,
    0xe49b_69c1,
    0xefbe_4786,
    0x0fc1_9dc6,
    0x240c_a1cc,
    0x2de9_2c6f,
    0x4a74_84aa,
    0x5cb0_a9dc,
    0x76f9_88da,
    0x983e_5152,
    0xa831_c66d,
    0xb003_27c8,
    0xbf59_7fc7,
    0xc6e0_0bf3,
    0xd5a7_9147,
    0x06ca_6351,
    0x1429_2967,
    0x27b7_0a85,
    0x2e1b_2138,
    0x4d2c_6dfc,
    0x5338_0d13,
    0x650a_7354,
    0x766a_0abb,
    0x81c2_c92e,
    0x9272_2c85,
    0xa2bf_e8a1,
    0xa81a_664b,
    0xc24b_8b70,
    0xc76c_51a3,
    0xd192_e819,
    0xd699_0624,
    0xf40e_3585,
    0x106a_a070,
    0x19a4_c116,
    0x1e37_6c08,
    0x2748_774c,
    0x34b0_bcb5,
    0x391c_0cb3,
    0x4ed8_aa4a,
    0x5b9c_ca4f,
    0x682e_6ff3,
    0x748f_82ee,
    0x78a5_636f,
    0x84c8_7814,
    0x8cc7_0208,
    0x90be_fffa,
    0xa450_6ceb,
    0xbef9_a3f7,
    0xc671_78f2,
];

impl Default for Simd {
    fn default() -> Self {
        Self {
            state: H0,
            buf: [0; 64],
            buf_len: 0,
            len: 0,
        }
    }
}

impl Simd {
    /// A new hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data`.
    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        self.update_slice(data.as_ref());
    }

    fn update_slice(&mut self, mut data: &[u8]) {
        self.len = self.len.wrapping_add(data.len() as u64);
        if self.buf_len > 0 {
            let take = (64 - self.buf_len).min(data.len());
            let (head, rest) = data.split_at(take);
            if let Some(dst) = self.buf.get_mut(self.buf_len..self.buf_len + take) {
                dst.copy_from_slice(head);
            }
            self.buf_len += take;
            data = rest;
            if self.buf_len < 64 {
                return;
            }
            let block = self.buf;
            compress(&mut self.state, &block);
            self.buf_len = 0;
        }
        let mut blocks = data.chunks_exact(64);
        for block in &mut blocks {
            if let Ok(block) = <&[u8; 64]>::try_from(block) {
                compress(&mut self.state, block);
            }
        }
        let rest = blocks.remainder();
        if let Some(dst) = self.buf.get_mut(..rest.len()) {
            dst.copy_from_slice(rest);
        }
        self.buf_len = rest.len();
    }

    /// The digest.
    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        // 0x80, zeros up to 56 mod 64, then the length in bits.
        let pad_len = if self.buf_len < 56 {
            56 - self.buf_len
        } else {
            120 - self.buf_len
        };
        let mut pad = [0u8; 64];
        pad[0] = 0x80;
        self.update(pad.get(..pad_len).unwrap_or(&pad));
        self.update(bits.to_be_bytes());
        let mut out = [0u8; 32];
        for (o, s) in out.chunks_exact_mut(4).zip(self.state.iter()) {
            o.copy_from_slice(&s.to_be_bytes());
        }
        out
    }

    /// The digest of `data`.
    pub fn digest(data: impl AsRef<[u8]>) -> [u8; 32] {
        let mut h = Self::new();
        h.update(data);
        h.finalize()
    }
}

/// Checks [`Sha256`] (the implementation this build uses) against known answers.
pub fn self_test() -> Result<(), String> {
    // 1000 bytes: 15 whole blocks, a partial one, and an odd split between updates.
    let long: Vec<u8> = (0..1000u32)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let cases: [(&[u8], &str); 3] = [
        (
            b"",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
        (
            b"abc",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ),
        (
            &long,
            "4e4c294b331f7a2099a379bec34b9f9fc03dc46ab465d998f4d683da53487e6d",
        ),
    ];
    for (input, want) in cases {
        let (a, b) = input.split_at(input.len() / 3);
        let mut h = Sha256::new();
        h.update(a);
        h.update(b);
        let got = hex::encode(h.finalize());
        if got != want {
            return Err(format!(
                "SHA-256 self-test failed for a {}-byte input: got {got}, want {want}",
                input.len()
            ));
        }
    }
    Ok(())
}

// Σ0 and Σ1 nested (as OpenSSL's x86 code writes them): the same three rotations, but each
// feeds the next, so V8's x86 code needs one scratch register instead of three copies of `x`.
// With the reordered `t1` (the terms that do not wait for `e` first) and the three-operation
// Maj, 64 KiB hashed in Envoy went from ~262 to ~244 µs (make bench probe rows, same Envoy).
#[inline(always)]
fn big_sigma0(x: u32) -> u32 {
    ((x.rotate_right(9) ^ x).rotate_right(11) ^ x).rotate_right(2)
}

#[inline(always)]
fn big_sigma1(x: u32) -> u32 {
    ((x.rotate_right(14) ^ x).rotate_right(5) ^ x).rotate_right(6)
}

/// One round: `$d` and `$h` take their new values; the caller rotates the names. `$bc`
/// holds `b ^ c` on entry and `a ^ b` on exit, which is the next round's `b ^ c`: with it
/// Maj(a, b, c) = ((a ^ b) & (b ^ c)) ^ b costs three operations instead of five.
macro_rules! round {
    ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident, $wk:expr, $bc:ident) => {
        let t1 = $h
            .wrapping_add($wk)
            .wrapping_add($g ^ ($e & ($f ^ $g)))
            .wrapping_add(big_sigma1($e));
        let ab = $a ^ $b;
        let t2 = big_sigma0($a).wrapping_add((ab & $bc) ^ $b);
        $bc = ab;
        $d = $d.wrapping_add(t1);
        $h = t1.wrapping_add(t2);
    };
}

/// Four rounds from four schedule words (`W + K`), starting with the names in order.
macro_rules! rounds4 {
    ($wk:expr, $bc:ident, $a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident) => {
        let [w0, w1, w2, w3] = $wk;
        round!($a, $b, $c, $d, $e, $f, $g, $h, w0, $bc);
        round!($h, $a, $b, $c, $d, $e, $f, $g, w1, $bc);
        round!($g, $h, $a, $b, $c, $d, $e, $f, w2, $bc);
        round!($f, $g, $h, $a, $b, $c, $d, $e, w3, $bc);
    };
}

/// One block. Not inlined: one copy of the unrolled rounds (~6 kB of wasm) serves every
/// caller.
#[inline(never)]
#[allow(unused_assignments)] // the last round's `bc` is not read
fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    let mut bc = b ^ c;
    let mut v0 = lanes::load(block, 0);
    let mut v1 = lanes::load(block, 1);
    let mut v2 = lanes::load(block, 2);
    let mut v3 = lanes::load(block, 3);
    // Rounds 0..16 take the message words; each later group of four computes its words
    // from the previous sixteen (v0..v3, oldest first, renamed as they rotate).
    rounds4!(lanes::plus_k(v0, 0), bc, a, b, c, d, e, f, g, h);
    rounds4!(lanes::plus_k(v1, 1), bc, e, f, g, h, a, b, c, d);
    rounds4!(lanes::plus_k(v2, 2), bc, a, b, c, d, e, f, g, h);
    rounds4!(lanes::plus_k(v3, 3), bc, e, f, g, h, a, b, c, d);
    // Written out rather than looped: constant round-constant indices, no loop (the
    // filter's profile optimises for size, which would keep a loop).
    macro_rules! sixteen {
        ($group:expr) => {
            v0 = lanes::schedule(v0, v1, v2, v3);
            rounds4!(lanes::plus_k(v0, $group), bc, a, b, c, d, e, f, g, h);
            v1 = lanes::schedule(v1, v2, v3, v0);
            rounds4!(lanes::plus_k(v1, $group + 1), bc, e, f, g, h, a, b, c, d);
            v2 = lanes::schedule(v2, v3, v0, v1);
            rounds4!(lanes::plus_k(v2, $group + 2), bc, a, b, c, d, e, f, g, h);
            v3 = lanes::schedule(v3, v0, v1, v2);
            rounds4!(lanes::plus_k(v3, $group + 3), bc, e, f, g, h, a, b, c, d);
        };
    }
    sixteen!(4);
    sixteen!(8);
    sixteen!(12);
    for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
        *s = s.wrapping_add(v);
    }
}

/// Four schedule words at a time: `v128` on wasm32 with simd128, `[u32; 4]` elsewhere.
mod lanes {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    mod ops {
        use core::arch::wasm32::*;
        pub type X4 = v128;

        #[inline(always)]
        pub fn from(w: [u32; 4]) -> X4 {
            u32x4(w[0], w[1], w[2], w[3])
        }
        #[inline(always)]
        pub fn to(x: X4) -> [u32; 4] {
            [
                u32x4_extract_lane::<0>(x),
                u32x4_extract_lane::<1>(x),
                u32x4_extract_lane::<2>(x),
                u32x4_extract_lane::<3>(x),
            ]
        }
        #[inline(always)]
        pub fn add(a: X4, b: X4) -> X4 {
            i32x4_add(a, b)
        }
        #[inline(always)]
        pub fn xor(a: X4, b: X4) -> X4 {
            v128_xor(a, b)
        }
        #[inline(always)]
        pub fn shr<const N: u32>(x: X4) -> X4 {
            u32x4_shr(x, N)
        }
        #[inline(always)]
        pub fn rotr<const N: u32, const L: u32>(x: X4) -> X4 {
            v128_or(u32x4_shr(x, N), i32x4_shl(x, L))
        }
        /// `[a1, a2, a3, b0]`
        #[inline(always)]
        pub fn align1(a: X4, b: X4) -> X4 {
            i32x4_shuffle::<1, 2, 3, 4>(a, b)
        }
        /// `[x2, x3, x2, x3]`
        #[inline(always)]
        pub fn high_to_low(x: X4) -> X4 {
            i32x4_shuffle::<2, 3, 2, 3>(x, x)
        }
        /// `[x0, x1, x0, x1]`
        #[inline(always)]
        pub fn low_to_high(x: X4) -> X4 {
            i32x4_shuffle::<0, 1, 0, 1>(x, x)
        }
        /// `[lo0, lo1, hi2, hi3]`
        #[inline(always)]
        pub fn join(lo: X4, hi: X4) -> X4 {
            i32x4_shuffle::<0, 1, 6, 7>(lo, hi)
        }
    }

    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    mod ops {
        pub type X4 = [u32; 4];

        #[inline(always)]
        pub fn from(w: [u32; 4]) -> X4 {
            w
        }
        #[inline(always)]
        pub fn to(x: X4) -> [u32; 4] {
            x
        }
        #[inline(always)]
        fn map2(a: X4, b: X4, f: impl Fn(u32, u32) -> u32) -> X4 {
            let [a0, a1, a2, a3] = a;
            let [b0, b1, b2, b3] = b;
            [f(a0, b0), f(a1, b1), f(a2, b2), f(a3, b3)]
        }
        #[inline(always)]
        pub fn add(a: X4, b: X4) -> X4 {
            map2(a, b, u32::wrapping_add)
        }
        #[inline(always)]
        pub fn xor(a: X4, b: X4) -> X4 {
            map2(a, b, |x, y| x ^ y)
        }
        #[inline(always)]
        pub fn shr<const N: u32>(x: X4) -> X4 {
            x.map(|v| v >> N)
        }
        #[inline(always)]
        pub fn rotr<const N: u32, const L: u32>(x: X4) -> X4 {
            x.map(|v| (v >> N) | (v << L))
        }
        #[inline(always)]
        pub fn align1(a: X4, b: X4) -> X4 {
            [a[1], a[2], a[3], b[0]]
        }
        #[inline(always)]
        pub fn high_to_low(x: X4) -> X4 {
            [x[2], x[3], x[2], x[3]]
        }
        #[inline(always)]
        pub fn low_to_high(x: X4) -> X4 {
            [x[0], x[1], x[0], x[1]]
        }
        #[inline(always)]
        pub fn join(lo: X4, hi: X4) -> X4 {
            [lo[0], lo[1], hi[2], hi[3]]
        }
    }

    pub use ops::X4;
    use ops::*;

    /// Message words `4 * i .. 4 * i + 4` of `block`, big-endian.
    #[inline(always)]
    pub fn load(block: &[u8; 64], i: usize) -> X4 {
        let mut w = [0u32; 4];
        for (j, word) in w.iter_mut().enumerate() {
            let at = 16 * i + 4 * j;
            if let Some(&[b0, b1, b2, b3]) = block.get(at..at + 4) {
                *word = u32::from_be_bytes([b0, b1, b2, b3]);
            }
        }
        from(w)
    }

    /// `W + K` for words `4 * group .. 4 * group + 4`.
    #[inline(always)]
    pub fn plus_k(w: X4, group: usize) -> [u32; 4] {
        let k = match super::K.get(4 * group..4 * group + 4) {
            Some(&[k0, k1, k2, k3]) => [k0, k1, k2, k3],
            _ => [0; 4],
        };
        to(add(w, from(k)))
    }

    #[inline(always)]
    fn sigma0(x: X4) -> X4 {
        xor(xor(rotr::<7, 25>(x), rotr::<18, 14>(x)), shr::<3>(x))
    }

    #[inline(always)]
    fn sigma1(x: X4) -> X4 {
        xor(xor(rotr::<17, 15>(x), rotr::<19, 13>(x)), shr::<10>(x))
    }

    /// The next four words from the previous sixteen (`a` oldest: `W[t-16..t-12]`, `d`
    /// newest: `W[t-4..t]`). The σ1 terms of the upper two words need the lower two of
    /// the result, so they are added in a second step.
    #[inline(always)]
    pub fn schedule(a: X4, b: X4, c: X4, d: X4) -> X4 {
        let partial = add(add(a, sigma0(align1(a, b))), align1(c, d));
        let low = add(partial, sigma1(high_to_low(d)));
        let high = add(partial, sigma1(low_to_high(low)));
        join(low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answers() {
        assert_eq!(self_test(), Ok(()));
        let million_a = vec![b'a'; 1_000_000];
        assert_eq!(
            hex::encode(Simd::digest(&million_a)),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn every_length_around_the_block_edges_matches_sha2() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in 0..data.len() {
            let input = &data[..n];
            assert_eq!(Simd::digest(input), Portable::digest(input), "length {n}");
        }
    }

    proptest! {
        #[test]
        fn matches_sha2_for_any_input_and_split(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(any::<usize>(), 0..4),
        ) {
            let mut simd = Simd::new();
            let mut rest = &data[..];
            for c in cuts {
                let (a, b) = rest.split_at(c % (rest.len() + 1));
                simd.update(a);
                rest = b;
            }
            simd.update(rest);
            prop_assert_eq!(simd.finalize(), Portable::digest(&data));
        }
    }
}
