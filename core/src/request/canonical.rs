//! Canonical JSON (RFC 8785) of a parsed body, JSON Pointers (RFC 6901) and the members a
//! fingerprint excludes.
//!
//! Canonical form: object members sorted by name in UTF-16 code units, no insignificant
//! whitespace, strings escaped as `serde_json` (and ECMAScript) write them, numbers in one
//! spelling: integers exactly as written (`-0` as `0`; never rounded through a double,
//! unlike RFC 8785, so two large integer ids never collide), other numbers as ECMAScript
//! writes the nearest double (`1.0` → `1`, `1e2` → `100`, `1e21` → `1e+21`): std's float
//! parsing, `ryu`'s shortest digits. Bodies come from [`crate::request::body::parse`], which
//! refuses repeated member names and sorts the members, so they are written as they are.
//!
//! [`Exclusions`] removes the members of a list of pointers in one walk over the pointers
//! (never over the whole body): each pointer names a location in the body as received.
//!
//! ```
//! use idemgate_core::request::canonical::{canonical_bytes, Exclusions};
//! use idemgate_core::request::body::parse;
//! let mut a = parse(br#"{"b": 1.0, "a": [true, null], "ts": 5}"#).unwrap();
//! let mut b = parse(br#"{ "a":[true,null],"b":1,"ts":6 }"#).unwrap();
//! let ts = Exclusions::new(["/ts"]);
//! ts.remove_from(&mut a);
//! ts.remove_from(&mut b);
//! assert_eq!(canonical_bytes(&a), canonical_bytes(&b));
//! assert_eq!(canonical_bytes(&a), br#"{"a":[true,null],"b":1}"#);
//! ```
use std::collections::BTreeMap;

use super::body::{array_index, find, unescape, Json};

/// Canonical bytes of a parsed body.
pub fn canonical_bytes(value: &Json) -> Vec<u8> {
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

fn write(value: &Json, out: &mut Vec<u8>) {
    match value {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Json::Number(n) => match canonical_number(n) {
            Some(text) => out.extend_from_slice(text.as_bytes()),
            None => out.extend_from_slice(n.as_bytes()),
        },
        Json::String(s) => write_string(s, out),
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Json::Object(members) => {
            out.push(b'{');
            for (i, (name, item)) in members.iter().enumerate() {
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
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Canonical text of a number's (valid JSON) text: `None` when it is already canonical (an
/// integer other than `-0`); else `0` for zeros, and other numbers as the nearest double in
/// ECMAScript `Number.prototype.toString` form.
pub fn canonical_number(text: &str) -> Option<String> {
    if !text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return (text == "-0").then(|| "0".to_string());
    }
    let f: f64 = text.parse().unwrap_or(0.0);
    if f == 0.0 || !f.is_finite() {
        // -0 is written "0"; non-finite numbers never come out of the body parser
        return Some("0".into());
    }
    let mut buf = ryu::Buffer::new();
    let (digits, n) = significant_digits(buf.format_finite(f.abs()));
    Some(es6_number(f < 0.0, &digits, n))
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
    (
        trimmed.trim_end_matches('0').to_string(),
        n.saturating_add(exp),
    )
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
pub fn key_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(canonical_number(n).unwrap_or_else(|| n.to_string())),
        Json::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Members removed from a body before it is canonicalized: a trie of JSON Pointer tokens,
/// built once from the configuration. Removing walks the trie, not the body, so its cost is
/// the pointers' length (plus one pass over an object or array that loses members), whatever
/// the body. Every pointer names a location in the body as received.
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
                node = node.children.entry(unescape(token)).or_default();
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
    pub fn remove_from(&self, value: &mut Json) {
        let mut drop: Vec<usize> = Vec::new();
        match value {
            Json::Object(members) => {
                for (token, child) in &self.children {
                    let Ok(i) = find(members, token) else {
                        continue;
                    };
                    if child.remove {
                        drop.push(i);
                    } else if let Some((_, v)) = members.get_mut(i) {
                        child.remove_from(v);
                    }
                }
                retain_except(members, drop);
            }
            Json::Array(items) => {
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
                retain_except(items, drop);
            }
            _ => {}
        }
    }
}

/// Removes the items at the positions in `drop`, in one pass.
fn retain_except<T>(items: &mut Vec<T>, mut drop: Vec<usize>) {
    if drop.is_empty() {
        return;
    }
    drop.sort_unstable();
    let mut i = 0;
    items.retain(|_| {
        let keep = drop.binary_search(&i).is_err();
        i += 1;
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::body::parse;
    use proptest::prelude::*;

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
        let mut v = parse(
            br#"{"a/b": {"~c": [10, 20, 30]}, "n": 5, "items": [{"ts": 1, "x": 1}, {"ts": 2}]}"#,
        )
        .unwrap();
        Exclusions::new([
            "/n",
            "/a~1b/~0c/0",
            "/a~1b/~0c/2",
            "/items/1/ts",
            "/items/0/ts",
            "/missing/x",
            "/items/7",
        ])
        .remove_from(&mut v);
        assert_eq!(
            String::from_utf8(canonical_bytes(&v)).unwrap(),
            r#"{"a/b":{"~c":[20]},"items":[{"x":1},{}]}"#
        );
        // a member and something under it: the member goes
        let mut w = parse(br#"{"a": {"b": 1}, "c": 2}"#).unwrap();
        Exclusions::new(["/a/b", "/a"]).remove_from(&mut w);
        assert_eq!(canonical_bytes(&w), br#"{"c":2}"#);
        assert!(Exclusions::new([]).is_empty());
    }

    #[test]
    fn pointers_and_key_text() {
        assert!(valid_pointer("/a~2").is_err());
        assert!(valid_pointer("a").is_err());
        assert!(valid_pointer("").is_ok());
        assert_eq!(key_text(&parse(b"12.0").unwrap()), Some("12".into()));
        assert_eq!(key_text(&parse(b"-0").unwrap()), Some("0".into()));
        assert_eq!(key_text(&parse(b"\"x\"").unwrap()), Some("x".into()));
        assert_eq!(key_text(&parse(b"true").unwrap()), Some("true".into()));
        assert_eq!(key_text(&parse(b"null").unwrap()), None);
    }

    /// A random document as JSON text (integers, doubles, strings with escapes, nesting).
    fn arb_text() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|i| i.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
            "[a-z\u{e9}\u{1F600}\u{ff61}\"\\\\ ]{0,6}"
                .prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::btree_map("[a-d\u{ff61}\u{1F600}]{1,2}", inner, 0..4)
                    .prop_map(|m| {
                        let members: Vec<String> = m
                            .iter()
                            .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
                            .collect();
                        format!("{{{}}}", members.join(","))
                    }),
            ]
        })
    }

    /// Another spelling of the same document: members reversed, whitespace, numbers respelled.
    fn messy(v: &Json, seed: u64) -> String {
        match v {
            Json::Object(m) => {
                let mut items: Vec<_> = m.iter().collect();
                if seed % 2 == 1 {
                    items.reverse();
                }
                let parts: Vec<String> = items
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            " {} :\n {} ",
                            serde_json::to_string(k).unwrap(),
                            messy(v, seed / 2)
                        )
                    })
                    .collect();
                format!("{{ {} }}", parts.join(" ,\t"))
            }
            Json::Array(a) => format!(
                "[ {} ]",
                a.iter()
                    .map(|x| messy(x, seed / 3))
                    .collect::<Vec<_>>()
                    .join(" , ")
            ),
            Json::Number(n)
                if seed % 3 == 1 && n.parse::<i64>().is_ok_and(|i| i.unsigned_abs() < 1 << 53) =>
            {
                format!("{n}.0")
            }
            Json::Number(n)
                if seed % 3 == 2 && n.parse::<i64>().is_ok_and(|i| i.unsigned_abs() < 1 << 50) =>
            {
                format!("{n}0e-1")
            }
            other => String::from_utf8(canonical_bytes(other)).unwrap(),
        }
    }

    proptest! {
        #[test]
        fn spelling_does_not_matter(text in arb_text(), seed in any::<u64>()) {
            let v = parse(text.as_bytes()).unwrap();
            let reparsed = parse(messy(&v, seed).as_bytes()).unwrap();
            prop_assert_eq!(canonical_bytes(&reparsed), canonical_bytes(&v));
            // canonical output is JSON that reads back as the same document
            let back = parse(&canonical_bytes(&v)).unwrap();
            prop_assert_eq!(canonical_bytes(&back), canonical_bytes(&v));
        }

        #[test]
        fn canonical_numbers_read_back_as_the_same_double(bits in any::<u64>()) {
            let f = f64::from_bits(bits);
            prop_assume!(f.is_finite() && f != 0.0);
            let text = format!("{f:e}");
            let c = canonical_number(&text).unwrap_or(text.clone());
            prop_assert_eq!(c.parse::<f64>().unwrap(), f, "{} -> {}", text, c);
        }
    }
}
