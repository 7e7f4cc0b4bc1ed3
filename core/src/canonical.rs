//! Canonical JSON (RFC 8785 style) and JSON Pointers (RFC 6901).
//!
//! Canonical form: object members sorted by name (UTF-16 code units), no insignificant
//! whitespace, strings with minimal escaping, numbers in one spelling: integers exactly as
//! written (`-0` as `0`; never rounded through a double, unlike RFC 8785, so two large
//! integer ids never collide), other numbers as ECMAScript writes the nearest double
//! (`1.0` → `1`, `1e2` → `100`, `1e21` → `1e+21`). Two documents that differ only in member
//! order, whitespace or number spelling canonicalize to the same bytes; any change of a value
//! changes them. A name given twice counts once, with its last value (as for every reader
//! of request bodies, see [`crate::json`]).
//!
//! ```
//! use idemgate_core::canonical::{canonical_bytes, pointer_get};
//! use idemgate_core::json::{parse_str, Value};
//! let a = parse_str(r#"{"b": 1.0, "a": [true, null]}"#).unwrap();
//! let b = parse_str(r#"{ "a":[true,null],"b":1 }"#).unwrap();
//! assert_eq!(canonical_bytes(&a), canonical_bytes(&b));
//! assert_eq!(canonical_bytes(&a), br#"{"a":[true,null],"b":1}"#);
//! assert_eq!(pointer_get(&a, "/a/0"), Some(&Value::Bool(true)));
//! ```
use crate::json::{write_json, Value};

/// Canonical bytes of a JSON value.
pub fn canonical_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_json(value, &mut out, true);
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

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// The value at `pointer`, if any.
pub fn pointer_get<'v>(value: &'v Value, pointer: &str) -> Option<&'v Value> {
    if pointer.is_empty() {
        return Some(value);
    }
    let mut cur = value;
    for raw in pointer.strip_prefix('/')?.split('/') {
        let token = unescape(raw);
        cur = match cur {
            Value::Object(map) => map.get(&token)?,
            Value::Array(items) => {
                if token.len() > 1 && token.starts_with('0') {
                    return None;
                }
                items.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// Removes the value at `pointer` (no-op when absent; the root cannot be removed).
pub fn pointer_remove(value: &mut Value, pointer: &str) {
    let Some(rest) = pointer.strip_prefix('/') else {
        return;
    };
    let mut tokens: Vec<String> = rest.split('/').map(unescape).collect();
    let Some(last) = tokens.pop() else {
        return;
    };
    let mut cur = value;
    for token in &tokens {
        let next = match cur {
            Value::Object(map) => map.get_mut(token),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        match next {
            Some(v) => cur = v,
            None => return,
        }
    }
    match cur {
        Value::Object(map) => {
            map.remove(&last);
        }
        Value::Array(items) => {
            if let Ok(i) = last.parse::<usize>() {
                if i < items.len() {
                    items.remove(i);
                }
            }
        }
        _ => {}
    }
}

/// The text of a JSON value used as (part of) a key: strings as they are, other scalars
/// in canonical form; `None` for null, objects and arrays.
pub fn key_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => String::from_utf8(canonical_bytes(value)).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json;
    use crate::json::{parse_str, write_string};
    use proptest::prelude::*;

    fn quoted(k: &str) -> String {
        let mut out = Vec::new();
        write_string(k, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|i| json!(i)),
            any::<i64>().prop_map(|i| json!(i)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| parse_str(&format!("{f:e}")).unwrap()),
            "[a-z\u{e9}\u{1F600}\"\\\\ ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-d]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The same decimal value written without a fraction: `-1.25e3` -> `-125E1`.
    fn respell(text: &str) -> String {
        let (mantissa, exp) = text.split_once(['e', 'E']).unwrap_or((text, "0"));
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let exp: i64 = exp.parse().unwrap();
        format!("{int}{frac}E{}", exp - frac.len() as i64)
    }

    /// Serialize with shuffled member order and random whitespace.
    fn messy(v: &Value, seed: u64) -> String {
        match v {
            Value::Object(m) => {
                let mut items: Vec<_> = m.iter().collect();
                if seed % 2 == 1 {
                    items.reverse();
                }
                let parts: Vec<String> = items
                    .iter()
                    .map(|(k, v)| format!(" {} :\n {} ", quoted(k), messy(v, seed / 2)))
                    .collect();
                format!("{{ {} }}", parts.join(" ,\t"))
            }
            Value::Array(a) => format!(
                "[ {} ]",
                a.iter()
                    .map(|x| messy(x, seed / 3))
                    .collect::<Vec<_>>()
                    .join(" , ")
            ),
            // another spelling of the same number: 5 -> 5.0 / 50e-1, 0.25 -> 2.5E-1
            Value::Number(n) if seed % 3 == 1 => match n.as_i64() {
                Some(i) if i.unsigned_abs() < (1 << 53) => format!("{i}.0"),
                Some(i) => i.to_string(),
                None => respell(n.as_str()),
            },
            Value::Number(n)
                if seed % 3 == 2 && n.as_i64().is_some_and(|i| i.unsigned_abs() < (1 << 50)) =>
            {
                format!("{}0e-1", n.as_str())
            }
            other => other.to_string(),
        }
    }

    proptest! {
        #[test]
        fn order_and_whitespace_do_not_matter(v in arb_json(), seed in any::<u64>()) {
            let reparsed = parse_str(&messy(&v, seed)).unwrap();
            prop_assert_eq!(canonical_bytes(&reparsed), canonical_bytes(&v));
            // canonical output is itself valid JSON denoting the same value
            let back = json::parse(&canonical_bytes(&v)).unwrap();
            prop_assert_eq!(back, v);
        }

        #[test]
        fn any_value_change_matters(v in arb_json(), w in arb_json()) {
            prop_assume!(v != w);
            prop_assert_ne!(canonical_bytes(&v), canonical_bytes(&w));
        }
    }

    #[test]
    fn numbers() {
        let a = parse_str("[1.0, 1, 1e2, 0.5, -0.0, -0, 1E3, 2.50e-1]").unwrap();
        assert_eq!(canonical_bytes(&a), b"[1,1,100,0.5,0,0,1000,0.25]");
        // two large integer ids stay apart (a double would make them one)
        let ids = |t: &str| canonical_bytes(&parse_str(t).unwrap());
        assert_ne!(
            ids(r#"{"id": 12345678901234567891}"#),
            ids(r#"{"id": 12345678901234567890}"#)
        );
        assert_eq!(ids("[9007199254740993]"), b"[9007199254740993]");
    }

    #[test]
    fn members_sort_by_utf16_and_last_duplicate_wins() {
        // U+1F600 (surrogates D83D DE00) sorts before U+FF61 in UTF-16, after it in UTF-8
        let v = parse_str("{\"\u{ff61}\":1,\"\u{1F600}\":2,\"b\":3,\"a\":4,\"b\":5}").unwrap();
        assert_eq!(
            String::from_utf8(canonical_bytes(&v)).unwrap(),
            "{\"a\":4,\"b\":5,\"\u{1F600}\":2,\"\u{ff61}\":1}"
        );
        let mut w = v.clone();
        pointer_remove(&mut w, "/b");
        assert_eq!(pointer_get(&w, "/b"), None);
        assert_eq!(pointer_get(&v, "/b"), Some(&json!(5)));
    }

    #[test]
    fn pointers() {
        let v = json!({"a/b": {"~c": [10, 20]}, "n": 5});
        assert_eq!(pointer_get(&v, "/a~1b/~0c/1"), Some(&json!(20)));
        assert_eq!(pointer_get(&v, "/a~1b/~0c/01"), None);
        assert_eq!(pointer_get(&v, "/missing"), None);
        assert!(valid_pointer("/a~2").is_err());
        assert!(valid_pointer("a").is_err());
        assert!(valid_pointer("").is_ok());
        let mut w = v.clone();
        pointer_remove(&mut w, "/n");
        pointer_remove(&mut w, "/a~1b/~0c/0");
        assert_eq!(w, json!({"a/b": {"~c": [20]}}));
        assert_eq!(key_text(&json!(12)), Some("12".into()));
        assert_eq!(key_text(&json!("x")), Some("x".into()));
        assert_eq!(key_text(&json!(null)), None);
    }
}
