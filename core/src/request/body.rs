//! Request bodies read as JSON: parsed by `serde_json`, strictly, into [`Json`].
//!
//! A body that idemgate reads as JSON (a `jsonPointer` key source, a derived key, a
//! `canonicalJson` fingerprint) must be one RFC 8259 document whose objects name each member
//! once: RFC 8785 canonicalization is defined on I-JSON (RFC 7493), and an origin whose
//! parser keeps the first of two equal names (or refuses them) would disagree with idemgate
//! about which request this is. A name given twice is [`BodyError::Duplicate`], naming the
//! member. Numbers keep their text (`serde_json`'s `arbitrary_precision`), so integers are
//! compared exactly; a non-integer out of the double range (`1e400`) is refused. Nesting
//! deeper than `serde_json`'s limit (127 arrays or objects) is refused.
//!
//! [`Json`] is the tree a body becomes: object members sorted as RFC 8785 orders them
//! (UTF-16 code units), so canonicalizing writes them as they are, a JSON Pointer finds a
//! member by binary search, and a repeated name shows up as two neighbours. One `serde`
//! visitor builds it and also the `serde_json::Value` of configuration templates
//! ([`strict_value`]), which keep their members in document order.
//!
//! ```
//! use idemgate_core::request::body::{parse, BodyError, Json};
//! let v = parse(br#"{"id": 12345678901234567890123, "tags": ["a"]}"#).unwrap();
//! assert_eq!(v.pointer("/id"), Some(&Json::Number("12345678901234567890123".into())));
//! assert_eq!(v.pointer("/tags/0"), Some(&Json::String("a".into())));
//! let Err(BodyError::Duplicate { member, .. }) = parse(br#"{"k": "A", "k": "B"}"#) else { panic!() };
//! assert_eq!(member, "k");
//! ```
use std::cell::RefCell;
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A parsed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, its text as written (valid JSON; a non-integer is a finite double).
    Number(Box<str>),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Json>),
    /// An object: members sorted by name in UTF-16 code units, each name once.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The member `name` of an object.
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => find(members, name)
                .ok()
                .and_then(|i| members.get(i))
                .map(|m| &m.1),
            _ => None,
        }
    }

    /// Whether `value` (as `serde_json` reads a document) is this same document: numbers by
    /// their text, members by name (the fuzz targets and tests compare with it).
    pub fn denotes(&self, value: &Value) -> bool {
        match (self, value) {
            (Json::Null, Value::Null) => true,
            (Json::Bool(a), Value::Bool(b)) => a == b,
            (Json::Number(a), Value::Number(b)) => **a == *b.as_str(),
            (Json::String(a), Value::String(b)) => a == b,
            (Json::Array(a), Value::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.denotes(y))
            }
            (Json::Object(a), Value::Object(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(k, v)| b.get(k).is_some_and(|w| v.denotes(w)))
            }
            _ => false,
        }
    }

    /// The value at an RFC 6901 JSON Pointer (`""` is the whole document).
    pub fn pointer(&self, pointer: &str) -> Option<&Json> {
        if pointer.is_empty() {
            return Some(self);
        }
        let mut cur = self;
        for raw in pointer.strip_prefix('/')?.split('/') {
            let token = unescape(raw);
            cur = match cur {
                Json::Object(_) => cur.get(&token)?,
                Json::Array(items) => items.get(array_index(&token)?)?,
                _ => return None,
            };
        }
        Some(cur)
    }
}

/// RFC 8785 orders member names by their UTF-16 code units: code point (UTF-8 byte) order,
/// except that characters from U+E000 up sort after the surrogates of U+10000 and above.
pub fn utf16_cmp(a: &str, b: &str) -> Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

/// Position of `name` in sorted members (`Err`: where it would go).
pub(crate) fn find(members: &[(String, Json)], name: &str) -> Result<usize, usize> {
    members.binary_search_by(|(k, _)| utf16_cmp(k, name))
}

/// A pointer token with `~1` and `~0` decoded.
pub(crate) fn unescape(token: &str) -> String {
    if token.contains('~') {
        token.replace("~1", "/").replace("~0", "~")
    } else {
        token.to_string()
    }
}

/// An RFC 6901 array index: `0` or digits without a leading zero.
pub(crate) fn array_index(token: &str) -> Option<usize> {
    if token.is_empty()
        || (token.len() > 1 && token.starts_with('0'))
        || !token.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    token.parse().ok()
}

/// Why a body is not a JSON document idemgate can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not RFC 8259 JSON (or nested too deep, or a number out of range): `serde_json`'s
    /// message, with line and column.
    Syntax(String),
    /// An object names `member` twice (`at`: line and column where that object ends).
    Duplicate {
        /// The member name.
        member: String,
        /// `line L column C`.
        at: String,
    },
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Syntax(m) => f.write_str(m),
            BodyError::Duplicate { member, at } => {
                write!(
                    f,
                    "the member {member:?} appears twice in one object (the object ending at {at})"
                )
            }
        }
    }
}

/// Parses a body as strict JSON.
pub fn parse(body: &[u8]) -> Result<Json, BodyError> {
    let stacks = Stacks::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = stacks
        .visitor()
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    result.map_err(|e| match stacks.duplicate.into_inner() {
        Some(member) => BodyError::Duplicate {
            member,
            at: format!("line {} column {}", e.line(), e.column()),
        },
        None => BodyError::Syntax(e.to_string()),
    })
}

/// Parses a value as strict JSON from any `serde` deserializer, members in document order
/// (configuration templates): a repeated name is a `duplicate field` error.
pub fn strict_value<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Stacks::<Value>::new().visitor().deserialize(d)
}

/// What the strict visitor builds: a body's [`Json`] or a template's `serde_json::Value`.
trait Tree: Sized {
    fn null() -> Self;
    fn boolean(b: bool) -> Self;
    /// A number's text, as `serde_json` validated it.
    fn number(text: String) -> Result<Self, String>;
    fn string(s: String) -> Self;
    fn array(items: Vec<Self>) -> Self;
    /// The members in document order, or the first name given twice.
    fn object(members: Vec<(String, Self)>) -> Result<Self, String>;
}

impl Tree for Json {
    fn null() -> Self {
        Json::Null
    }
    fn boolean(b: bool) -> Self {
        Json::Bool(b)
    }
    fn number(text: String) -> Result<Self, String> {
        Ok(Json::Number(text.into_boxed_str()))
    }
    fn string(s: String) -> Self {
        Json::String(s)
    }
    fn array(items: Vec<Self>) -> Self {
        Json::Array(items)
    }
    fn object(mut members: Vec<(String, Self)>) -> Result<Self, String> {
        members.sort_by(|a, b| utf16_cmp(&a.0, &b.0));
        if let Some(i) = members
            .windows(2)
            .position(|w| matches!(w, [a, b] if a.0 == b.0))
        {
            return Err(members.swap_remove(i).0);
        }
        Ok(Json::Object(members))
    }
}

impl Tree for Value {
    fn null() -> Self {
        Value::Null
    }
    fn boolean(b: bool) -> Self {
        Value::Bool(b)
    }
    fn number(text: String) -> Result<Self, String> {
        Number::from_str(&text)
            .map(Value::Number)
            .map_err(|e| e.to_string())
    }
    fn string(s: String) -> Self {
        Value::String(s)
    }
    fn array(items: Vec<Self>) -> Self {
        Value::Array(items)
    }
    fn object(members: Vec<(String, Self)>) -> Result<Self, String> {
        let mut map = Map::new();
        for (name, value) in members {
            if map.contains_key(&name) {
                return Err(name);
            }
            map.insert(name, value);
        }
        Ok(Value::Object(map))
    }
}

/// The key under which `serde_json` (`arbitrary_precision`) hands a number's text to
/// `deserialize_any` visitors (the tests below would catch a change).
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// The strict visitor; the first repeated name is left in the cell. Items and members
/// gather on two stacks shared by the whole parse and move into a vector of their exact size
/// when their container closes: one allocation per container, however deep.
struct Strict<'a, T> {
    duplicate: &'a RefCell<Option<String>>,
    items: &'a RefCell<Vec<T>>,
    members: &'a RefCell<Vec<(String, T)>>,
}

impl<T> Clone for Strict<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Strict<'_, T> {}

/// The visitor's state for one parse.
struct Stacks<T> {
    duplicate: RefCell<Option<String>>,
    items: RefCell<Vec<T>>,
    members: RefCell<Vec<(String, T)>>,
}

impl<T> Stacks<T> {
    fn new() -> Self {
        Self {
            duplicate: RefCell::new(None),
            items: RefCell::new(Vec::new()),
            members: RefCell::new(Vec::new()),
        }
    }

    fn visitor(&self) -> Strict<'_, T> {
        Strict {
            duplicate: &self.duplicate,
            items: &self.items,
            members: &self.members,
        }
    }
}

impl<'de, T: Tree> DeserializeSeed<'de> for Strict<'_, T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

/// A member name, or the marker of a number's text.
enum Key {
    Number,
    Name(String),
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E>(self, s: &str) -> Result<Key, E> {
        Ok(if s == NUMBER_TOKEN {
            Key::Number
        } else {
            Key::Name(s.to_string())
        })
    }
    fn visit_string<E>(self, s: String) -> Result<Key, E> {
        Ok(if s == NUMBER_TOKEN {
            Key::Number
        } else {
            Key::Name(s)
        })
    }
}

impl<'de, T: Tree> Visitor<'de> for Strict<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::null())
    }

    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::null())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        self.deserialize(d)
    }

    fn visit_bool<E>(self, b: bool) -> Result<T, E> {
        Ok(T::boolean(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
        T::number(n.to_string()).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
        T::number(n.to_string()).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<T, E> {
        if !f.is_finite() {
            return Err(E::custom("number out of range"));
        }
        T::number(format!("{f:e}")).map_err(E::custom)
    }

    fn visit_str<E>(self, s: &str) -> Result<T, E> {
        Ok(T::string(s.to_string()))
    }

    fn visit_string<E>(self, s: String) -> Result<T, E> {
        Ok(T::string(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        let start = self.items.borrow().len();
        while let Some(item) = seq.next_element_seed(self)? {
            self.items.borrow_mut().push(item);
        }
        let items: Vec<T> = self.items.borrow_mut().drain(start..).collect();
        Ok(T::array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let start = self.members.borrow().len();
        let mut first = true;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let name = match key {
                Key::Number if first => {
                    let text: String = map.next_value()?;
                    return number(text);
                }
                Key::Number => NUMBER_TOKEN.to_string(),
                Key::Name(name) => name,
            };
            first = false;
            let value = map.next_value_seed(self)?;
            self.members.borrow_mut().push((name, value));
        }
        let members: Vec<(String, T)> = self.members.borrow_mut().drain(start..).collect();
        T::object(members).map_err(|name| {
            let e = de::Error::custom(format_args!("duplicate field `{name}`"));
            *self.duplicate.borrow_mut() = Some(name);
            e
        })
    }
}

/// A number from its (valid JSON) text: a non-integer must be a finite double.
fn number<T: Tree, E: de::Error>(text: String) -> Result<T, E> {
    let integer = !text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if !integer && !text.parse::<f64>().is_ok_and(f64::is_finite) {
        return Err(E::custom("number out of range"));
    }
    T::number(text).map_err(E::custom)
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
        let v =
            parse(b"[12345678901234567890123, 12345678901234567890124, -0, 1.50, 1e2]").unwrap();
        let Json::Array(items) = v else { panic!() };
        let texts: Vec<&str> = items
            .iter()
            .map(|n| match n {
                Json::Number(t) => &**t,
                other => panic!("{other:?}"),
            })
            .collect();
        // serde_json writes the exponent's sign
        assert_eq!(
            texts,
            [
                "12345678901234567890123",
                "12345678901234567890124",
                "-0",
                "1.50",
                "1e+2"
            ]
        );
    }

    #[test]
    fn members_are_sorted_and_found() {
        let v = parse(
            "{\"b\": 1, \"\u{ff61}\": 2, \"\u{1F600}\": 3, \"a\": {\"x/y\": [true], \"~\": null}}"
                .as_bytes(),
        )
        .unwrap();
        let Json::Object(members) = &v else { panic!() };
        let names: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["a", "b", "\u{1F600}", "\u{ff61}"]);
        assert_eq!(v.pointer("/a/x~1y/0"), Some(&Json::Bool(true)));
        assert_eq!(v.pointer("/a/~0"), Some(&Json::Null));
        assert_eq!(v.pointer("/\u{ff61}"), Some(&Json::Number("2".into())));
        assert_eq!(v.pointer("/a/x~1y/00"), None);
        assert_eq!(v.pointer("/a/x~1y/1"), None);
        assert_eq!(v.pointer("/zz"), None);
        assert_eq!(v.pointer("b"), None);
        assert_eq!(v.pointer(""), Some(&v));
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
        // the same name in sibling or nested objects is fine
        assert!(parse(br#"[{"a":1},{"a":2}]"#).is_ok());
        assert!(parse(br#"{"a":{"a":{"a":1}}}"#).is_ok());
        // templates: members in document order, duplicates refused
        let mut de = serde_json::Deserializer::from_str(r#"{"z": 1, "a": [{"q": 2}]}"#);
        let v = strict_value(&mut de).unwrap();
        assert_eq!(v.to_string(), r#"{"z":1,"a":[{"q":2}]}"#);
        let mut de = serde_json::Deserializer::from_str(r#"{"z": 1, "z": 2}"#);
        assert!(strict_value(&mut de)
            .unwrap_err()
            .to_string()
            .starts_with("duplicate field `z`"));
    }

    #[test]
    fn malformed_and_hostile_inputs_are_refused() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "+1",
            "NaN",
            "'a'",
            "// c\n1",
            "1 2",
            "\"\\ud800\"",
            "\u{feff}{}",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "accepted {bad:?}");
        }
        assert!(syntax("1e400").starts_with("number out of range"));
        assert!(syntax("[-1.5e99999]").starts_with("number out of range"));
        assert_eq!(parse(b"1e-400").unwrap(), Json::Number("1e-400".into()));
        assert!(parse(b"\"\xff\"").is_err());
        let ok = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(parse(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
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
                Ok(ours) => prop_assert!(theirs.as_ref().is_ok_and(|t| ours.denotes(t)), "{:?}", theirs),
                // serde_json's map keeps the last of a repeated name
                Err(BodyError::Duplicate { .. }) => prop_assert!(theirs.is_ok()),
                // serde_json (arbitrary_precision) keeps 1e400 as text; we refuse it
                Err(BodyError::Syntax(m)) if m.starts_with("number out of range") => {}
                Err(BodyError::Syntax(_)) => prop_assert!(theirs.is_err()),
            }
        }
    }
}
