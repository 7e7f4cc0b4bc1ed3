//! Canonical JSON (RFC 8785) of a parsed body, JSON Pointers (RFC 6901) and the members a
//! fingerprint excludes.
//!
//! Canonical form: object members sorted by name in UTF-16 code units, no insignificant
//! whitespace, strings escaped as `serde_json` (and ECMAScript) write them, numbers in one
//! spelling: integers exactly as written (`-0` as `0`; never rounded through a double,
//! unlike RFC 8785, so two large integer ids never collide), other numbers as ECMAScript
//! writes the nearest double (`1.0` → `1`, `1e2` → `100`, `1e21` → `1e+21`): std's float
//! parsing, `ryu`'s shortest digits. Bodies come from [`crate::request::body::parse`], which
//! refuses repeated member names, so every name is unique here.
//!
//! [`Exclusions`] removes the members of a list of pointers in one walk over the pointers
//! (never over the whole body): each pointer names a location in the body as received.
//!
//! ```
//! use idemgate_core::request::canonical::{canonical_bytes, Exclusions};
//! use idemgate_core::request::body::parse;
//! let a = parse(br#"{"b": 1.0, "a": [true, null], "ts": 5}"#).unwrap();
//! let mut b = parse(br#"{ "a":[true,null],"b":1,"ts":6 }"#).unwrap();
//! let ts = Exclusions::new(["/ts"]);
//! let (mut a, mut b) = (a, b);
//! ts.remove_from(&mut a);
//! ts.remove_from(&mut b);
//! assert_eq!(canonical_bytes(&a), canonical_bytes(&b));
//! assert_eq!(canonical_bytes(&a), br#"{"a":[true,null],"b":1}"#);
//! ```
use std::collections::BTreeMap;

use serde_json::{Number, Value};

/// Canonical bytes of a JSON value.
pub fn canonical_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(canonical_number(n).as_bytes()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            // UTF-8 byte order is code point order, which is UTF-16 order unless a name
            // holds a character from U+E000 up (surrogates sort below those in UTF-16).
            if map.keys().any(|k| k.chars().any(|c| u32::from(c) >= 0xE000)) {
                members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            } else {
                members.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push(b'{');
            for (i, (name, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(name, out);
                out.push(b':');
                write(item, out);
            }
            out.push(b'}');
        }
    }
}

/// A JSON string literal, minimally escaped (RFC 8785 §3.2.2.2 = `serde_json`'s escaping).
fn write_string(s: &str, out: &mut Vec<u8>) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Canonical text of a number: integers exactly as written (`-0` as `0`); other numbers as
/// the nearest double in ECMAScript `Number.prototype.toString` form.
pub fn canonical_number(n: &Number) -> String {
    let text = n.as_str();
    if !text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return if text == "-0" { "0".into() } else { text.into() };
    }
    let f: f64 = text.parse().unwrap_or(0.0);
    if f == 0.0 || !f.is_finite() {
        // -0 is written "0"; non-finite numbers never come out of the body parser
        return "0".into();
    }
    let mut buf = ryu::Buffer::new();
    let (digits, n) = significant_digits(buf.format_finite(f.abs()));
    es6_number(f < 0.0, &digits, n)
}

/// The significant digits `d1…dk` of a number's text (no leading or trailing zeros) and `n`
/// with value `0.d1…dk × 10^n`.
fn significant_digits(text: &str) -> (String, i64) {
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (text, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = int.chars().chain(frac.chars()).collect();
    let trimmed = all.trim_start_matches('0');
    let lead = i64::try_from(all.len() - trimmed.len()).unwrap_or(0);
    let n = i64::try_from(int.len()).unwrap_or(0) - lead;
    (trimmed.trim_end_matches('0').to_string(), n.saturating_add(exp))
}

/// `0.digits × 10^n` as ECMAScript's `Number.prototype.toString` writes it, given its
/// shortest round-trip digits.
fn es6_number(negative: bool, digits: &str, n: i64) -> String {
    let k = i64::try_from(digits.len()).unwrap_or(1);
    let mut out = String::with_capacity(digits.len() + 8);
    if negative {
        out.push('-');
    }
    let zeros = |count: i64| "0".repeat(usize::try_from(count).unwrap_or(0));
    if k <= n && n <= 21 {
        out.push_str(digits);
        out.push_str(&zeros(n - k));
    } else if 0 < n && n <= 21 {
        let at = usize::try_from(n).unwrap_or(0);
        out.push_str(digits.get(..at).unwrap_or_default());
        out.push('.');
        out.push_str(digits.get(at..).unwrap_or_default());
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.push_str(&zeros(-n));
        out.push_str(digits);
    } else {
        out.push_str(digits.get(..1).unwrap_or_default());
        if k > 1 {
            out.push('.');
            out.push_str(digits.get(1..).unwrap_or_default());
        }
        out.push('e');
        out.push(if n > 0 { '+' } else { '-' });
        out.push_str(&(n - 1).abs().to_string());
    }
    out
}

/// Whether `pointer` is a syntactically valid JSON Pointer (RFC 6901).
pub fn valid_pointer(pointer: &str) -> Result<(), String> {
    if pointer.is_empty() {
        return Ok(());
    }
    if !pointer.starts_with('/') {
        return Err(format!(
            "must be empty or start with \"/\", got {pointer:?}"
        ));
    }
    let bytes = pointer.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'~' && !matches!(bytes.get(i + 1), Some(b'0') | Some(b'1')) {
            return Err(format!(
                "\"~\" must be followed by 0 or 1 (RFC 6901), got {pointer:?}"
            ));
        }
    }
    Ok(())
}

/// The text of a JSON value used as (part of) a key: strings as they are, other scalars
/// in canonical form; `None` for null, objects and arrays.
pub fn key_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(canonical_number(n)),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Members removed from a body before it is canonicalized: a trie of JSON Pointer tokens,
/// built once from the configuration. Removing walks the trie, not the body, so its cost is
/// the pointers' length (plus one pass over an array that loses items), whatever the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// Remove the value here (its children are then irrelevant).
    remove: bool,
    children: BTreeMap<String, Exclusions>,
}

impl Exclusions {
    /// The trie of `pointers` (valid, non-empty JSON Pointers).
    pub fn new<'a>(pointers: impl IntoIterator<Item = &'a str>) -> Self {
        let mut root = Self::default();
        for p in pointers {
            let Some(rest) = p.strip_prefix('/') else {
                continue;
            };
            let mut node = &mut root;
            for token in rest.split('/') {
                node = node
                    .children
                    .entry(token.replace("~1", "/").replace("~0", "~"))
                    .or_default();
            }
            node.remove = true;
        }
        root
    }

    /// Whether nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Removes every excluded member (absent ones are ignored).
    pub fn remove_from(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (token, child) in &self.children {
                    if child.remove {
                        map.remove(token);
                    } else if let Some(v) = map.get_mut(token) {
                        child.remove_from(v);
                    }
                }
            }
            Value::Array(items) => {
                let mut drop: Vec<usize> = Vec::new();
                for (token, child) in &self.children {
                    let Some(i) = array_index(token).filter(|i| *i < items.len()) else {
                        continue;
                    };
                    if child.remove {
                        drop.push(i);
                    } else if let Some(v) = items.get_mut(i) {
                        child.remove_from(v);
                    }
                }
                if !drop.is_empty() {
                    drop.sort_unstable();
                    let mut i = 0;
                    items.retain(|_| {
                        let keep = drop.binary_search(&i).is_err();
                        i += 1;
                        keep
                    });
                }
            }
            _ => {}
        }
    }
}

/// An RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) || token.starts_with('+') {
        return None;
    }
    token.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::body::parse;
    use proptest::prelude::*;
    use serde_json::json;

    fn canon(text: &str) -> String {
        String::from_utf8(canonical_bytes(&parse(text.as_bytes()).unwrap())).unwrap()
    }

    #[test]
    fn numbers_follow_ecmascript_and_integers_stay_exact() {
        for (text, want) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("1.0", "1"),
            ("1e2", "100"),
            ("1E+2", "100"),
            ("0.5", "0.5"),
            ("-1.25e1", "-12.5"),
            ("1.5e-7", "1.5e-7"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1e-7"),
            ("1e20", "100000000000000000000"),
            ("1e21", "1e+21"),
            ("123456789012345678901234.5", "1.2345678901234569e+23"),
            ("0.1", "0.1"),
            ("0.10000000000000001", "0.1"),
            ("4.35", "4.35"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("333333333.33333329", "333333333.3333333"),
            ("-1e-7", "-1e-7"),
            ("2.2756502835772013e14", "227565028357720.12"),
            ("9007199254740993", "9007199254740993"),
            ("100000000000000000000000", "100000000000000000000000"),
        ] {
            assert_eq!(canon(text), want, "{text}");
        }
        assert_ne!(canon("12345678901234567891"), canon("12345678901234567890"));
    }

    #[test]
    fn members_sort_by_utf16_and_strings_escape_minimally() {
        // U+1F600 (surrogates D83D DE00) sorts before U+FF61 in UTF-16, after it in UTF-8
        assert_eq!(
            canon("{\"\u{ff61}\":1,\"\u{1F600}\":2,\"b\":3,\"a\":4}"),
            "{\"a\":4,\"b\":3,\"\u{1F600}\":2,\"\u{ff61}\":1}"
        );
        assert_eq!(
            canon(r#""\"\\\/\u0001\u001f\u007f\u00e9\n\b\f\t\r""#),
            "\"\\\"\\\\/\\u0001\\u001f\u{7f}\u{e9}\\n\\b\\f\\t\\r\""
        );
    }

    #[test]
    fn exclusions_remove_members_and_items_as_received() {
        let mut v = json!({"a/b": {"~c": [10, 20, 30]}, "n": 5, "items": [{"ts": 1, "x": 1}, {"ts": 2}]});
        Exclusions::new(["/n", "/a~1b/~0c/0", "/a~1b/~0c/2", "/items/1/ts", "/items/0/ts", "/missing/x", "/items/7"])
            .remove_from(&mut v);
        assert_eq!(v, json!({"a/b": {"~c": [20]}, "items": [{"x": 1}, {}]}));
        // a member and something under it: the member goes
        let mut w = json!({"a": {"b": 1}, "c": 2});
        Exclusions::new(["/a/b", "/a"]).remove_from(&mut w);
        assert_eq!(w, json!({"c": 2}));
        assert!(Exclusions::new([]).is_empty());
        assert_eq!(array_index("01"), None);
        assert_eq!(array_index("10"), Some(10));
    }

    #[test]
    fn pointers_and_key_text() {
        assert!(valid_pointer("/a~2").is_err());
        assert!(valid_pointer("a").is_err());
        assert!(valid_pointer("").is_ok());
        assert_eq!(key_text(&parse(b"12.0").unwrap()), Some("12".into()));
        assert_eq!(key_text(&json!("x")), Some("x".into()));
        assert_eq!(key_text(&json!(true)), Some("true".into()));
        assert_eq!(key_text(&json!(null)), None);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| parse(format!("{f:e}").as_bytes()).unwrap()),
            "[a-z\u{e9}\u{1F600}\u{ff61}\"\\\\ ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-d\u{ff61}\u{1F600}]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Another spelling of the same document: members reversed, whitespace, numbers respelled.
    fn messy(v: &Value, seed: u64) -> String {
        match v {
            Value::Object(m) => {
                let mut items: Vec<_> = m.iter().collect();
                if seed % 2 == 1 {
                    items.reverse();
                }
                let parts: Vec<String> = items
                    .iter()
                    .map(|(k, v)| format!(" {} :\n {} ", json!(k), messy(v, seed / 2)))
                    .collect();
                format!("{{ {} }}", parts.join(" ,\t"))
            }
            Value::Array(a) => format!(
                "[ {} ]",
                a.iter().map(|x| messy(x, seed / 3)).collect::<Vec<_>>().join(" , ")
            ),
            Value::Number(n) if seed % 3 == 1 && n.as_i64().is_some_and(|i| i.unsigned_abs() < 1 << 53) => {
                format!("{}.0", n.as_str())
            }
            Value::Number(n) if seed % 3 == 2 && n.as_i64().is_some_and(|i| i.unsigned_abs() < 1 << 50) => {
                format!("{}0e-1", n.as_str())
            }
            other => other.to_string(),
        }
    }

    proptest! {
        #[test]
        fn spelling_does_not_matter_values_do(v in arb_json(), w in arb_json(), seed in any::<u64>()) {
            let reparsed = parse(messy(&v, seed).as_bytes()).unwrap();
            prop_assert_eq!(canonical_bytes(&reparsed), canonical_bytes(&v));
            // canonical output is JSON that reads back as the same document
            let back = parse(&canonical_bytes(&v)).unwrap();
            prop_assert_eq!(canonical_bytes(&back), canonical_bytes(&v));
            if canonical_bytes(&parse(&canonical_bytes(&w)).unwrap()) != canonical_bytes(&v) {
                prop_assert_ne!(canonical_bytes(&v), canonical_bytes(&w));
            }
        }

        #[test]
        fn canonical_numbers_read_back_as_the_same_double(bits in any::<u64>()) {
            let f = f64::from_bits(bits);
            prop_assume!(f.is_finite() && f != 0.0);
            let text = format!("{f:e}");
            let n: Number = text.parse().unwrap();
            let c = canonical_number(&n);
            prop_assert_eq!(c.parse::<f64>().unwrap(), f, "{} -> {}", text, c);
        }
    }
}
