//! Decimal text to the nearest `f64`, correctly rounded (ties to even), in ~3 kB of wasm.
//!
//! `str::parse::<f64>` is fast but brings core's `dec2flt` (Eisel–Lemire and an 11 kB table
//! of powers of five, ~17 kB in all) into every module. idemgate needs a double only for the
//! canonical form of a non-integer JSON number (RFC 8785) and to refuse numbers out of range,
//! so it trades speed for size: numbers of at most 15 significant digits and a small exponent
//! (nearly all that people write) take Clinger's fast path, one exact floating-point
//! operation (~30 ns); the others are held exactly as a ratio of two big integers whose 53
//! significant bits are found by long division (~10 µs for 770 digits; criterion
//! `decimal/*`).
//!
//! ```
//! use idemgate_core::decimal::to_f64;
//!
//! assert_eq!(to_f64("0.1"), Some(0.1));
//! assert_eq!(to_f64("-2.5e-3"), Some(-0.0025));
//! assert_eq!(to_f64("1e400"), Some(f64::INFINITY));
//! assert_eq!(to_f64("1.5x"), None);
//! ```

/// Significant digits kept: a decimal needs at most 767 to tell a double from the halfway
/// points next to it; the digits after them only matter as "some were not zero".
const MAX_DIGITS: usize = 770;

/// The nearest double to `text`, a number as JSON writes it (`-`? digits, optional fraction
/// and exponent; a leading `+` and a bare `.5` are accepted too): infinite when beyond the
/// largest double, zero (with the sign) when below half the smallest; `None` when `text` is
/// not such a number.
pub fn to_f64(text: &str) -> Option<f64> {
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, text.get(1..)?),
        b'+' => (false, text.get(1..)?),
        _ => (false, text),
    };
    let (mantissa, exp_text) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (unsigned, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    // Decimal exponent, saturated: beyond ±10^6 the answer is 0 or infinity anyway.
    let mut exp: i64 = 0;
    if let Some(e) = exp_text {
        let (neg, digits) = match e.as_bytes().first()? {
            b'-' => (true, e.get(1..)?),
            b'+' => (false, e.get(1..)?),
            _ => (false, e),
        };
        if digits.is_empty() || !all_digits(digits) {
            return None;
        }
        for b in digits.bytes() {
            exp = (exp * 10 + i64::from(b - b'0')).min(1_000_000);
        }
        if neg {
            exp = -exp;
        }
    }
    let signed = |v: f64| if negative { -v } else { v };
    // value = 0.d1 d2 … dk × 10^point (significant digits only). The first 19 digits also
    // go into `small`, for the fast path.
    let mut point = i64::try_from(int.len()).ok()?;
    let (mut count, mut trailing_zeros, mut small) = (0usize, 0usize, 0u64);
    for b in int.bytes().chain(frac.bytes()) {
        let d = b - b'0';
        if count == 0 && d == 0 {
            point -= 1;
            continue;
        }
        count += 1;
        trailing_zeros = if d == 0 { trailing_zeros + 1 } else { 0 };
        if count <= 19 {
            small = small * 10 + u64::from(d);
        }
    }
    if count == 0 {
        return Some(signed(0.0));
    }
    let point = point.saturating_add(exp);
    // value < 10^point: below 10^-324 it is under half the smallest double (2^-1074 ≈
    // 4.94e-324); at or above 10^310 it is beyond the largest (≈ 1.80e308).
    if point < -324 {
        return Some(signed(0.0));
    }
    if point > 310 {
        return Some(signed(f64::INFINITY));
    }
    let significant = count - trailing_zeros;
    // value = D × 10^e with D the significant digits as an integer
    let e = point - i64::try_from(significant).ok()?;
    if significant <= 15 && count <= 19 && (-22..=22).contains(&e) {
        // Clinger's fast path: D and 10^|e| are exact doubles, so one division or
        // multiplication rounds correctly. Most numbers people write take it.
        let d = (small / 10u64.pow(trailing_zeros as u32)) as f64;
        let p = (0..e.unsigned_abs()).fold(1.0f64, |p, _| p * 10.0);
        return Some(signed(if e < 0 { d / p } else { d * p }));
    }
    let mut digits: Vec<u8> = int
        .bytes()
        .chain(frac.bytes())
        .map(|b| b - b'0')
        .skip_while(|d| *d == 0)
        .take(significant)
        .collect();
    let mut e = e;
    if digits.len() > MAX_DIGITS {
        // Past the digits kept only "some were not zero" matters (the last significant digit
        // is not zero): a digit right after the kept ones stands in for them.
        e += i64::try_from(digits.len() - MAX_DIGITS - 1).ok()?;
        digits.truncate(MAX_DIGITS);
        digits.push(1);
    }
    let mut num = Big::from_digits(&digits);
    let mut den = Big::one();
    if e >= 0 {
        num.mul_pow10(e.unsigned_abs());
    } else {
        den.mul_pow10(e.unsigned_abs());
    }
    Some(signed(ratio_to_f64(num, den)))
}

/// The double nearest `num / den` (both positive).
fn ratio_to_f64(mut num: Big, mut den: Big) -> f64 {
    // Scale so that den <= num < 2 den; then value = (num / den) × 2^binexp.
    let (nb, db) = (num.bits(), den.bits());
    let mut binexp = i64::try_from(nb).unwrap_or(0) - i64::try_from(db).unwrap_or(0);
    if binexp >= 0 {
        den.shl(binexp.unsigned_abs());
    } else {
        num.shl(binexp.unsigned_abs());
    }
    if num < den {
        num.shl(1);
        binexp -= 1;
    }
    // Bits of precision at this exponent: 53, fewer for subnormals.
    let precision = if binexp >= -1022 { 53 } else { binexp + 1075 };
    if precision < 0 {
        return 0.0; // below 2^-1075, half the smallest subnormal
    }
    // Long division: `precision` bits of the quotient, then the rounding bit, then whether
    // anything is left (sticky).
    let mut mantissa: u64 = 0;
    let mut rem = num;
    for _ in 0..=precision {
        mantissa <<= 1;
        if rem >= den {
            rem.sub(&den);
            mantissa |= 1;
        }
        rem.shl(1);
    }
    let round = mantissa & 1 == 1;
    mantissa >>= 1;
    let sticky = !rem.is_zero();
    if round && (sticky || mantissa & 1 == 1) {
        mantissa += 1;
    }
    if binexp < -1022 {
        // Subnormal: mantissa × 2^-1074; a carry into bit 52 is the smallest normal, which
        // the same bit pattern encodes.
        return f64::from_bits(mantissa);
    }
    if mantissa == 1 << 53 {
        mantissa >>= 1;
        binexp += 1;
    }
    if binexp > 1023 {
        return f64::INFINITY;
    }
    let biased = u64::try_from(binexp + 1023).unwrap_or(0);
    f64::from_bits((biased << 52) | (mantissa & ((1 << 52) - 1)))
}

/// An unsigned big integer, little-endian base-2^32 limbs, no trailing zero limbs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Big(Vec<u32>);

impl Big {
    fn one() -> Self {
        Big(vec![1])
    }

    fn from_digits(digits: &[u8]) -> Self {
        let mut b = Big(Vec::new());
        for chunk in digits.chunks(9) {
            let mut v: u32 = 0;
            for d in chunk {
                v = v * 10 + u32::from(*d);
            }
            b.mul_add(10u32.pow(chunk.len() as u32), v);
        }
        b
    }

    /// self = self × m + a
    fn mul_add(&mut self, m: u32, a: u32) {
        let mut carry = u64::from(a);
        for limb in self.0.iter_mut() {
            let v = u64::from(*limb) * u64::from(m) + carry;
            *limb = v as u32;
            carry = v >> 32;
        }
        if carry > 0 {
            self.0.push(carry as u32);
        }
    }

    fn mul_pow10(&mut self, mut n: u64) {
        while n > 0 {
            let step = n.min(9);
            self.mul_add(10u32.pow(step as u32), 0);
            n -= step;
        }
    }

    fn bits(&self) -> u64 {
        match self.0.last() {
            Some(top) => (self.0.len() as u64) * 32 - u64::from(top.leading_zeros()),
            None => 0,
        }
    }

    fn is_zero(&self) -> bool {
        self.0.is_empty()
    }

    fn shl(&mut self, n: u64) {
        if self.0.is_empty() {
            return;
        }
        let (limbs, bits) = ((n / 32) as usize, (n % 32) as u32);
        if bits > 0 {
            let mut carry = 0u32;
            for limb in self.0.iter_mut() {
                let v = (*limb << bits) | carry;
                carry = *limb >> (32 - bits);
                *limb = v;
            }
            if carry > 0 {
                self.0.push(carry);
            }
        }
        if limbs > 0 {
            self.0.splice(0..0, std::iter::repeat_n(0, limbs));
        }
    }

    /// self -= other, for self >= other.
    fn sub(&mut self, other: &Big) {
        let mut borrow = 0i64;
        for (i, limb) in self.0.iter_mut().enumerate() {
            let o = other.0.get(i).copied().unwrap_or(0);
            let v = i64::from(*limb) - i64::from(o) - borrow;
            borrow = i64::from(v < 0);
            *limb = (v + (borrow << 32)) as u32;
        }
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }
}

impl PartialOrd for Big {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Big {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.iter().rev().cmp(other.0.iter().rev()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(text: &str) {
        let want: f64 = text.parse().unwrap();
        let got = to_f64(text).unwrap_or_else(|| panic!("refused {text:?}"));
        assert_eq!(got.to_bits(), want.to_bits(), "{text}: {got:e} != {want:e}");
    }

    #[test]
    fn edges_match_std() {
        for t in [
            "0", "-0", "0.0", "0e5", "1", "-1", "0.1", "0.5", "1.5", "2.5", "1e0", "1E+2",
            "123.456e-2", ".5", "5.", "+3.25", "9007199254740992", "9007199254740993",
            "9007199254740995", "9007199254740994.5", "1.7976931348623157e308",
            "1.7976931348623158e308", "1.7976931348623159e308", "1.797693134862315807e308",
            "1.7976931348623158079e308", "1e308", "1e309", "1e310", "1e311", "2.2250738585072014e-308",
            "2.2250738585072011e-308", "2.2250738585072012e-308", "4.9406564584124654e-324",
            "2.4703282292062327e-324", "2.4703282292062328e-324", "2.47032822920623272e-324",
            "5e-324", "1e-324", "3e-324", "7.4e-324", "1e-400", "1e-325", "0.000000001e-315",
            "123456789012345678901234567890e-20", "1e-1000000000000", "1e1000000000000",
            "18446744073709551615", "18446744073709551616e-3", "0.30000000000000004",
            "179769313486231570814527423731704356798070567525844996598917476803157260780028538760589558632766878171540458953514382464234321326889464182768467546703537516986049910576551282076245490090389328944075868508455133942304583236903222948165808559332123348274797826204144723168738177180919299881250404026184124858368",
            "2.225073858507201136057409796709131975934819546351645648023426109724822222021076945516529523908135087914149158913039621106870086438694594645527657207407820621743379988141063267329253552286881372149012981122451451889849057222307285255133155755015914397476397983411801999323962548289017107081850690630666655994938275772572015763062615325512e-308",
        ] {
            check(t);
        }
        assert_eq!(to_f64("-0").map(f64::to_bits), Some((-0.0f64).to_bits()));
        assert_eq!(
            to_f64("-1e-400").map(f64::to_bits),
            Some((-0.0f64).to_bits())
        );
        assert_eq!(to_f64("-1e400"), Some(f64::NEG_INFINITY));
    }

    #[test]
    fn long_digit_strings_round_like_std() {
        // Halfway between two doubles, written out exactly, then nudged by a far digit.
        let half = "9007199254740993"; // 2^53 + 1: a tie, to even (2^53)
        check(half);
        check(&format!("{half}.{}1", "0".repeat(900)));
        check(&format!("{half}{}e-900", "0".repeat(900)));
        check(&format!("0.{}1e10", "0".repeat(2000)));
        check(&"1".repeat(5000));
        check(&format!("1{}1e-851", "0".repeat(850))); // the cut digit is not a trailing zero
        check(&format!("36178427147255{}1e-786", "0".repeat(800)));
        check(&format!("{}e-4700", "7".repeat(5000)));
        // The halfway point between 0 and the smallest subnormal, 2^-1075 = 5^1075 × 10^-1075
        let mut five = Big::one();
        for _ in 0..1075 {
            five.mul_add(5, 0);
        }
        let digits = to_decimal(&five);
        check(&format!("{digits}e-1075"));
        check(&format!("{digits}1e-1076"));
        check(&format!("{digits}e-1075").replace('e', "0000e"));
    }

    fn to_decimal(b: &Big) -> String {
        let mut limbs = b.0.clone();
        let mut out = Vec::new();
        while !limbs.is_empty() {
            let mut rem = 0u64;
            for l in limbs.iter_mut().rev() {
                let v = (rem << 32) | u64::from(*l);
                *l = (v / 10) as u32;
                rem = v % 10;
            }
            out.push(b'0' + rem as u8);
            while limbs.last() == Some(&0) {
                limbs.pop();
            }
        }
        out.reverse();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn refuses_what_is_not_a_number() {
        for t in [
            "", "-", "+", ".", "e5", "1e", "1e+", "1.2.3", "1x", "0x10", "--1", "1e5.0", "inf",
            "NaN", " 1",
        ] {
            assert_eq!(to_f64(t), None, "{t:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn every_double_reads_back(bits in any::<u64>()) {
            let f = f64::from_bits(bits);
            prop_assume!(f.is_finite());
            for text in [format!("{f:e}"), format!("{f:?}"), format!("{:.17e}", f), format!("{:.3e}", f)] {
                let want: f64 = text.parse().unwrap();
                prop_assert_eq!(to_f64(&text).map(f64::to_bits), Some(want.to_bits()), "{}", text);
            }
        }

        #[test]
        fn random_decimals_match_std(digits in "[0-9]{1,40}", frac in "[0-9]{0,40}", exp in -360i32..330) {
            let text = format!("{digits}.{frac}e{exp}");
            check(&text);
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        #[test]
        fn midpoints_match_std(bits in 0u64..0x7fef_ffff_ffff_ffff, side in 0usize..4) {
            // The exact midpoint between a double and the next one (a tie: to even), just
            // above it, just below it, and above it by a digit past the ones kept.
            let (d, e) = exact_midpoint(bits);
            let text = match side {
                0 => format!("{d}e{e}"),
                1 => format!("{d}1e{}", e - 1),
                2 => format!("{}999e{}", decrement(&d), e - 3),
                _ => format!("{d}{}1e{}", "0".repeat(800), e - 801),
            };
            check(&text);
        }
    }

    /// `d - 1` for decimal digits `d > 0` (a leading zero is fine).
    fn decrement(d: &str) -> String {
        let mut b = d.as_bytes().to_vec();
        for c in b.iter_mut().rev() {
            if *c == b'0' {
                *c = b'9';
            } else {
                *c -= 1;
                break;
            }
        }
        String::from_utf8(b).unwrap()
    }

    /// The exact decimal of the midpoint between double `bits` and the next one: digits and a
    /// decimal exponent.
    fn exact_midpoint(bits: u64) -> (String, i64) {
        let exp = ((bits >> 52) & 0x7ff) as i64;
        let frac = bits & ((1 << 52) - 1);
        let (m, e2) = if exp == 0 {
            (frac, -1074)
        } else {
            (frac | (1 << 52), exp - 1075)
        };
        // midpoint = (2m + 1) × 2^(e2 - 1)
        let odd = 2 * m + 1;
        let mut n = Big(vec![odd as u32, (odd >> 32) as u32]);
        while n.0.last() == Some(&0) {
            n.0.pop();
        }
        let e = e2 - 1;
        if e >= 0 {
            n.shl(e as u64);
            (to_decimal(&n), 0)
        } else {
            for _ in 0..-e {
                n.mul_add(5, 0); // 2^e = 5^-e × 10^e
            }
            (to_decimal(&n), e)
        }
    }
}
