//! Request bodies read as JSON: `serde_json`, strictly.
//!
//! A body that idemgate reads as JSON (a `jsonPointer` key source, a derived key, a
//! `canonicalJson` fingerprint) must be one RFC 8259 document whose objects name each member
//! once: RFC 8785 canonicalization is defined on I-JSON (RFC 7493), and an origin whose
//! parser keeps the first of two equal names (or refuses them) would disagree with idemgate
//! about which request this is. A name given twice is [`BodyError::Duplicate`], naming the
//! member. Numbers keep their text (`serde_json`'s `arbitrary_precision`), so integers are
//! compared exactly; a non-integer out of the double range (`1e400`) is refused. Nesting
//! deeper than `serde_json`'s limit of 128 is refused.
//!
//! ```
//! use idemgate_core::request::body::{parse, BodyError};
//! let v = parse(br#"{"id": 12345678901234567890123, "tags": ["a"]}"#).unwrap();
//! assert_eq!(v["id"].to_string(), "12345678901234567890123");
//! let Err(BodyError::Duplicate { member, .. }) = parse(br#"{"k": "A", "k": "B"}"#) else { panic!() };
//! assert_eq!(member, "k");
//! ```
use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a body is not a JSON document idemgate can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not RFC 8259 JSON (or nested deeper than 128, or a number out of range): `serde_json`'s
    /// message, with line and column.
    Syntax(String),
    /// An object names `member` twice (`at`: line and column of the second).
    Duplicate {
        /// The member name.
        member: String,
        /// Where the second one ends, `line L column C`.
        at: String,
    },
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Syntax(m) => f.write_str(m),
            BodyError::Duplicate { member, at } => {
                write!(f, "the member {member:?} appears twice in one object ({at})")
            }
        }
    }
}

/// The key under which `serde_json` (`arbitrary_precision`) hands a number's text to
/// `deserialize_any` visitors (checked by the tests below).
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Parses a body as strict JSON.
pub fn parse(body: &[u8]) -> Result<Value, BodyError> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = Strict(&duplicate)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    result.map_err(|e| match duplicate.into_inner() {
        Some(member) => BodyError::Duplicate {
            member,
            at: format!("line {} column {}", e.line(), e.column()),
        },
        None => BodyError::Syntax(e.to_string()),
    })
}

/// Parses a value as strict JSON from any `serde` deserializer (configuration templates use
/// it): duplicate member names are refused as `duplicate field` errors.
pub fn strict_value<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Strict(&RefCell::new(None)).deserialize(d)
}

/// A value whose objects must not repeat a name; the first repeated name is left in the cell.
#[derive(Clone, Copy)]
struct Strict<'a>(&'a RefCell<Option<String>>);

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Ok(Value::Object(Map::new()));
        };
        if first == NUMBER_TOKEN {
            let text: String = map.next_value()?;
            return number(&text).map(Value::Number);
        }
        let mut members = Map::new();
        let mut name = first;
        loop {
            let value = map.next_value_seed(self)?;
            if members.contains_key(&name) {
                let e = de::Error::custom(format_args!("duplicate field `{name}`"));
                *self.0.borrow_mut() = Some(name);
                return Err(e);
            }
            members.insert(name, value);
            match map.next_key::<String>()? {
                Some(next) => name = next,
                None => return Ok(Value::Object(members)),
            }
        }
    }
}

/// A number from its (valid JSON) text: kept as written; a non-integer must be a finite
/// double.
fn number<E: de::Error>(text: &str) -> Result<Number, E> {
    let integer = !text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if !integer && !text.parse::<f64>().is_ok_and(f64::is_finite) {
        return Err(E::custom("number out of range"));
    }
    Number::from_str(text).map_err(E::custom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn syntax(text: &str) -> String {
        match parse(text.as_bytes()) {
            Err(BodyError::Syntax(m)) => m,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn numbers_keep_their_text() {
        let v = parse(b"[12345678901234567890123, 12345678901234567890124, -0, 1.50, 1e2]").unwrap();
        let texts: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(Value::to_string)
            .collect();
        assert_eq!(
            texts,
            ["12345678901234567890123", "12345678901234567890124", "-0", "1.50", "1e+2"]
        );
        assert_eq!(v[0].as_u64(), None);
        assert_eq!(parse(b"9007199254740993").unwrap().as_u64(), Some(9_007_199_254_740_993));
    }

    #[test]
    fn duplicates_are_named_at_any_depth() {
        for (text, member) in [
            (r#"{"a":1,"a":1}"#, "a"),
            (r#"{"x":[{"b":{},"c":2,"b":{}}]}"#, "b"),
            (r#"{"a":{"n":1},"b":2,"a":{"n":1}}"#, "a"),
        ] {
            match parse(text.as_bytes()) {
                Err(BodyError::Duplicate { member: m, at }) => {
                    assert_eq!(m, member, "{text}");
                    assert!(at.starts_with("line 1 column "), "{at}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // the same name in sibling objects is fine
        assert!(parse(br#"[{"a":1},{"a":2}]"#).is_ok());
        assert!(parse(br#"{"a":{"a":{"a":1}}}"#).is_ok());
    }

    #[test]
    fn malformed_and_hostile_inputs_are_refused() {
        for bad in [
            "", "{", "[1,]", "{\"a\":1,}", "01", "-", "1.", ".5", "1e", "+1", "NaN", "'a'",
            "// c\n1", "1 2", "\"\\ud800\"", "\u{feff}{}",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
        assert!(syntax("1e400").starts_with("number out of range"));
        assert!(syntax("[-1.5e99999]").starts_with("number out of range"));
        assert_eq!(parse(b"1e-400").unwrap().to_string(), "1e-400");
        assert!(parse(b"\"\xff\"").is_err());
        let ok = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(parse(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert!(syntax(&deep).starts_with("recursion limit exceeded"));
        let hostile = "[{\"a\":".repeat(200_000);
        assert!(syntax(&hostile).starts_with("recursion limit exceeded"));
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json(bytes in proptest::collection::vec(
            prop_oneof![Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b':'),
                        Just(b','), Just(b'\\'), Just(b'u'), Just(b'1'), Just(b'-'), Just(b'.'),
                        Just(b'e'), Just(b' '), Just(b'n'), Just(b'0'), Just(b'a'), any::<u8>()], 0..40)) {
            let theirs = serde_json::from_slice::<Value>(&bytes);
            match parse(&bytes) {
                Ok(ours) => prop_assert_eq!(Some(ours), theirs.ok()),
                Err(BodyError::Duplicate { .. }) => prop_assert!(theirs.is_ok()),
                // serde_json (arbitrary_precision) keeps 1e400 as text; we refuse it
                Err(BodyError::Syntax(m)) if m.starts_with("number out of range") => {}
                Err(BodyError::Syntax(_)) => prop_assert!(theirs.is_err()),
            }
        }
    }
}
