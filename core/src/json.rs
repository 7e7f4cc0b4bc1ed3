//! JSON (RFC 8259) without serde: a [`Value`] tree, a strict parser and a compact writer.
//!
//! - Objects keep their members in document order ([`Object`], a vector of pairs). A name may
//!   occur twice in a parsed object; readers see the **last** one ([`Value::get`], JSON
//!   Pointers, canonical JSON), as serde_json did for request bodies. The configuration
//!   refuses duplicate names (see `config.rs`).
//! - Numbers keep their text ([`Number`]): an integer is never rounded through a double, so
//!   two different large integer ids stay different. Canonical JSON writes integers exactly
//!   and other numbers as ECMAScript's `Number.prototype.toString` does (RFC 8785).
//! - The parser is strict (no comments, no trailing commas, no leading zeros, no lone
//!   surrogates, UTF-8 only, `1e999` refused as out of range) and nests at most
//!   [`MAX_DEPTH`] arrays/objects deep, so hostile input cannot exhaust the stack.
//!
//! ```
//! use idemgate_core::json::{parse, Value};
//! let v = parse(br#"{"id": 12345678901234567890123, "tags": ["a\u00e9", null]}"#).unwrap();
//! assert_eq!(v["tags"][0], "a\u{e9}");
//! assert_eq!(v["id"].to_string(), "12345678901234567890123");
//! assert!(parse(b"[1,]").is_err());
//! assert_eq!(parse(b"{").unwrap_err().to_string(), "EOF while parsing an object at line 1 column 1");
//! ```
use std::fmt;

/// Deepest nesting of arrays and objects the parser accepts.
pub const MAX_DEPTH: usize = 128;

/// A JSON value.
#[derive(Clone, Default)]
pub enum Value {
    /// `null`.
    #[default]
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as written.
    Number(Number),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object.
    Object(Object),
}

/// The members of an object in document order. Lookups take the last member of a name.
#[derive(Clone, Default)]
pub struct Object(pub Vec<(String, Value)>);

/// A JSON number, kept as its (valid RFC 8259) text.
#[derive(Clone)]
pub struct Number(Box<str>);

static NULL: Value = Value::Null;

impl Object {
    /// An empty object.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// The value of the last member named `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of the last member named `key`, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.0
            .iter_mut()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Appends a member.
    pub fn insert(&mut self, key: String, value: Value) {
        self.0.push((key, value));
    }

    /// Removes every member named `key`, returning the value of the last one.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let mut found = None;
        let mut i = 0;
        while i < self.0.len() {
            if self.0.get(i).is_some_and(|(k, _)| k == key) {
                found = Some(self.0.remove(i).1);
            } else {
                i += 1;
            }
        }
        found
    }

    /// The members, in document order (duplicates included).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Number of members (duplicates included).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The members as readers see them: sorted by name (UTF-16 code units, as RFC 8785
    /// orders them), the last of each name only.
    pub fn sorted_unique(&self) -> Vec<(&str, &Value)> {
        let mut items: Vec<(usize, &str, &Value)> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, (k, v))| (i, k.as_str(), v))
            .collect();
        // equal names keep document order, so the last of a run is the last written
        crate::sort::sort_by(&mut items, |a, b| {
            utf16_cmp(a.1, b.1).then(a.0.cmp(&b.0)) == std::cmp::Ordering::Less
        });
        let mut out: Vec<(&str, &Value)> = Vec::with_capacity(items.len());
        for (_, name, value) in items {
            let item = (name, value);
            match out.last_mut() {
                Some(last) if last.0 == item.0 => *last = item,
                _ => out.push(item),
            }
        }
        out
    }
}

/// RFC 8785 sorts member names by their UTF-16 code units.
pub fn utf16_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

impl PartialEq for Object {
    /// Equal as maps: same names (last member of each), equal values; order does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.sorted_unique() == other.sorted_unique()
    }
}

impl FromIterator<(String, Value)> for Object {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl Number {
    /// The number as written (valid JSON number text).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is written as an integer (no fraction, no exponent).
    pub fn is_integer(&self) -> bool {
        !self.0.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'))
    }

    /// The value as `i64` when written as an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.is_integer().then(|| self.0.parse().ok()).flatten()
    }

    /// The value as `u64` when written as a non-negative integer that fits.
    pub fn as_u64(&self) -> Option<u64> {
        self.is_integer().then(|| self.0.parse().ok()).flatten()
    }

    /// The nearest double (infinite when out of range), by [`crate::decimal::to_f64`].
    pub fn as_f64(&self) -> f64 {
        crate::decimal::to_f64(&self.0).unwrap_or(f64::NAN)
    }

    /// Canonical text: integers exactly as written (`-0` as `0`); other numbers as the
    /// nearest double in ECMAScript `Number.prototype.toString` form (RFC 8785):
    /// `1.0` → `1`, `1e2` → `100`, `1.5e-7` → `1.5e-7`, `1e21` → `1e+21`.
    pub fn canonical(&self) -> String {
        if self.is_integer() {
            return if &*self.0 == "-0" {
                "0".into()
            } else {
                self.0.to_string()
            };
        }
        let f = self.as_f64();
        if f == 0.0 || !f.is_finite() {
            // -0 is written "0"; non-finite numbers never come out of the parser
            return "0".into();
        }
        // A decimal of at most 15 significant digits reads back from its double (DBL_DIG), and
        // no other decimal of as few digits reads as that double: it is the shortest form.
        // Subnormals have less precision: they take the exact path.
        let (digits, n) = match significant_digits(&self.0) {
            Some(short) if short.0.len() <= 15 && f.abs() >= f64::MIN_POSITIVE => short,
            _ => shortest_digits(f.abs()),
        };
        es6_number(f < 0.0, &digits, n)
    }
}

impl PartialEq for Number {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 || self.canonical() == other.canonical()
    }
}

/// The significant digits `d1…dk` of a number's text (no leading or trailing zeros) and `n`
/// with value `0.d1…dk × 10^n`; `None` for zero or an exponent out of range.
fn significant_digits(text: &str) -> Option<(String, i64)> {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exp) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.strip_prefix('+').unwrap_or(e).parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = int.chars().chain(frac.chars()).collect();
    let trimmed = all.trim_start_matches('0');
    let n = i64::try_from(int.len()).ok()? - i64::try_from(all.len() - trimmed.len()).ok()?;
    let digits = trimmed.trim_end_matches('0');
    (!digits.is_empty()).then(|| (digits.to_string(), n.saturating_add(exp)))
}

/// `0.digits × 10^n` (negative when `negative`) as ECMAScript's `Number.prototype.toString`
/// writes it, given its shortest round-trip digits.
fn es6_number(negative: bool, digits: &str, n: i64) -> String {
    // value = 0.d1d2…dk × 10^n
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

/// The fewest significant digits `d1…dk` (no trailing zeros) and `n` with
/// `0.d1…dk × 10^n` reading back as `f` (positive, finite): Ryū's shortest round-trip
/// digits, which among the spellings of that length is the one closest to `f`, the even one
/// on a tie, as ECMAScript's `Number.prototype.toString` requires.
fn shortest_digits(f: f64) -> (String, i64) {
    let mut buf = ryu::Buffer::new();
    significant_digits(buf.format_finite(f)).unwrap_or_else(|| ("0".into(), 1))
}

impl Value {
    /// The member `key` of an object (the last one of that name).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(o) => o.get(key),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The members, if this is an object.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The number as `i64`, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    /// The number as `u64`, if it is a non-negative integer that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    /// Whether this is a string.
    pub fn is_string(&self) -> bool {
        matches!(self, Value::String(_))
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Compact JSON text (members in order, numbers as written).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_value(self, &mut out);
        out
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Number(a), Value::Number(b)) => a == b,
            (Value::String(a), Value::String(b)) => a == b,
            (Value::Array(a), Value::Array(b)) => a == b,
            (Value::Object(a), Value::Object(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl std::ops::Index<&str> for Value {
    type Output = Value;
    /// The member `key`, or `null` when absent or not an object (never panics).
    fn index(&self, key: &str) -> &Value {
        self.get(key).unwrap_or(&NULL)
    }
}

impl std::ops::Index<usize> for Value {
    type Output = Value;
    /// The item at `i`, or `null` when absent or not an array (never panics).
    fn index(&self, i: usize) -> &Value {
        self.as_array().and_then(|a| a.get(i)).unwrap_or(&NULL)
    }
}

impl fmt::Display for Value {
    /// Compact JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_vec()))
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Value::Object(self.clone()), f)
    }
}

impl fmt::Debug for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// ------------------------------------------------------------------ building values

/// Conversion to a [`Value`] by reference (what [`json!`](crate::json!) uses for
/// interpolated expressions).
pub trait ToJson {
    /// The JSON value of `self`.
    fn to_json(&self) -> Value;
}

impl ToJson for Value {
    fn to_json(&self) -> Value {
        self.clone()
    }
}

impl ToJson for str {
    fn to_json(&self) -> Value {
        Value::String(self.to_string())
    }
}

impl ToJson for String {
    fn to_json(&self) -> Value {
        Value::String(self.clone())
    }
}

impl ToJson for bool {
    fn to_json(&self) -> Value {
        Value::Bool(*self)
    }
}

impl<T: ToJson + ?Sized> ToJson for &T {
    fn to_json(&self) -> Value {
        (**self).to_json()
    }
}

impl<T: ToJson> ToJson for Option<T> {
    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToJson::to_json)
    }
}

impl<T: ToJson> ToJson for Vec<T> {
    fn to_json(&self) -> Value {
        Value::Array(self.iter().map(ToJson::to_json).collect())
    }
}

macro_rules! integers {
    ($($t:ty),*) => {$(
        impl ToJson for $t {
            fn to_json(&self) -> Value {
                Value::Number(Number(self.to_string().into_boxed_str()))
            }
        }
        impl From<$t> for Value {
            fn from(n: $t) -> Value {
                n.to_json()
            }
        }
        impl PartialEq<$t> for Value {
            fn eq(&self, other: &$t) -> bool {
                matches!(self, Value::Number(n) if n.is_integer() && n.canonical() == other.to_string())
            }
        }
    )*};
}
integers!(i32, i64, u16, u32, u64, usize);

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl PartialEq<str> for Value {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == Some(other)
    }
}

impl PartialEq<&str> for Value {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == Some(*other)
    }
}

impl PartialEq<String> for Value {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == Some(other.as_str())
    }
}

impl PartialEq<bool> for Value {
    fn eq(&self, other: &bool) -> bool {
        self.as_bool() == Some(*other)
    }
}

/// Builds a [`Value`](crate::json::Value) from JSON-like syntax, as `serde_json::json!`:
/// `json!({"key": k, "list": [1, "two", null], "nested": {"ok": true}})`. Interpolated
/// expressions are taken by reference through [`ToJson`](crate::json::ToJson); object keys
/// are string literals.
#[macro_export]
macro_rules! json {
    (null) => { $crate::json::Value::Null };
    ([]) => { $crate::json::Value::Array(::std::vec::Vec::new()) };
    ([ $($tt:tt)+ ]) => {
        $crate::json::Value::Array($crate::__json_items!([]; []; $($tt)+))
    };
    ({}) => { $crate::json::Value::Object($crate::json::Object::new()) };
    ({ $($tt:tt)+ }) => {{
        let mut members = $crate::json::Object::new();
        $crate::__json_members!(members; $($tt)+);
        $crate::json::Value::Object(members)
    }};
    ($e:expr) => { $crate::json::ToJson::to_json(&$e) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __json_items {
    ([$($done:expr,)*]; [$($cur:tt)*];) => {
        ::std::vec![$($done,)* $crate::json!($($cur)*)]
    };
    ([$($done:expr,)*]; [$($cur:tt)*]; , $($rest:tt)*) => {
        $crate::__json_items!([$($done,)* $crate::json!($($cur)*),]; []; $($rest)*)
    };
    ([$($done:expr,)*]; [$($cur:tt)*]; $t:tt $($rest:tt)*) => {
        $crate::__json_items!([$($done,)*]; [$($cur)* $t]; $($rest)*)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __json_members {
    ($o:ident;) => {};
    ($o:ident; $k:literal : $($rest:tt)+) => { $crate::__json_member!($o; $k; []; $($rest)+); };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __json_member {
    ($o:ident; $k:literal; [$($cur:tt)*];) => { $o.insert(::std::string::String::from($k), $crate::json!($($cur)*)); };
    ($o:ident; $k:literal; [$($cur:tt)*]; , $($rest:tt)*) => {
        $o.insert(::std::string::String::from($k), $crate::json!($($cur)*));
        $crate::__json_members!($o; $($rest)*);
    };
    ($o:ident; $k:literal; [$($cur:tt)*]; $t:tt $($rest:tt)*) => {
        $crate::__json_member!($o; $k; [$($cur)* $t]; $($rest)*);
    };
}

// ------------------------------------------------------------------------- writing

/// Appends the compact JSON text of `value` (members in order, numbers as written).
pub fn write_value(value: &Value, out: &mut Vec<u8>) {
    write_json(value, out, false);
}

/// Appends the JSON text of `value`: compact with members in order and numbers as written,
/// or, when `canonical`, members sorted by UTF-16 name (a repeated name once, its last value)
/// and numbers in canonical form (see [`crate::canonical`]).
pub(crate) fn write_json(value: &Value, out: &mut Vec<u8>, canonical: bool) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) if canonical => out.extend_from_slice(n.canonical().as_bytes()),
        Value::Number(n) => out.extend_from_slice(n.as_str().as_bytes()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(item, out, canonical);
            }
            out.push(b']');
        }
        Value::Object(o) => {
            let members: Vec<(&str, &Value)> = if canonical {
                o.sorted_unique()
            } else {
                o.0.iter().map(|(k, v)| (k.as_str(), v)).collect()
            };
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_json(v, out, canonical);
            }
            out.push(b'}');
        }
    }
}

/// Appends `s` as a JSON string: `"` and `\` escaped, control characters as `\b \t \n \f
/// \r` or `\u00xx`, everything else as is (the minimal escaping RFC 8785 asks for).
pub fn write_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(*HEX.get(usize::from(b >> 4)).unwrap_or(&b'0'));
            out.push(*HEX.get(usize::from(b & 0xf)).unwrap_or(&b'0'));
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

// ------------------------------------------------------------------------- parsing

/// Why a document is not JSON, and where (1-based line and column of the offending byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// What is wrong (`EOF while parsing a string`, `expected value`, …).
    pub message: &'static str,
    /// Line, from 1.
    pub line: usize,
    /// Column (bytes), from 1.
    pub column: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {} column {}",
            self.message, self.line, self.column
        )
    }
}

impl std::error::Error for ParseError {}

/// Parses one JSON document (surrounding whitespace allowed, nothing else).
pub fn parse(input: &[u8]) -> Result<Value, ParseError> {
    let mut p = Parser { s: input, i: 0 };
    p.ws();
    let v = p.value(MAX_DEPTH)?;
    p.ws();
    if p.i < p.s.len() {
        p.i += 1;
        return Err(p.err("trailing characters"));
    }
    Ok(v)
}

/// Parses one JSON document from text.
pub fn parse_str(input: &str) -> Result<Value, ParseError> {
    parse(input.as_bytes())
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, message: &'static str) -> ParseError {
        // the position of the last byte read, as serde_json reports it
        let at = self.i.min(self.s.len());
        let before = self.s.get(..at).unwrap_or_default();
        let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
        let column = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
        ParseError {
            message,
            line,
            column: column.max(1),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek();
        if b.is_some() {
            self.i += 1;
        }
        b
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        match self.peek() {
            None => Err(self.err("EOF while parsing a value")),
            Some(b'{') => {
                self.i += 1;
                let depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| self.err("recursion limit exceeded"))?;
                self.object(depth)
            }
            Some(b'[') => {
                self.i += 1;
                let depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| self.err("recursion limit exceeded"))?;
                self.array(depth)
            }
            Some(b'"') => {
                self.i += 1;
                self.string().map(Value::String)
            }
            Some(b't') => self.literal(b"true", Value::Bool(true)),
            Some(b'f') => self.literal(b"false", Value::Bool(false)),
            Some(b'n') => self.literal(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => {
                self.i += 1;
                Err(self.err("expected value"))
            }
        }
    }

    fn literal(&mut self, word: &[u8], v: Value) -> Result<Value, ParseError> {
        for &w in word {
            match self.next() {
                Some(b) if b == w => {}
                Some(_) => return Err(self.err("expected ident")),
                None => return Err(self.err("EOF while parsing a value")),
            }
        }
        Ok(v)
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.ws();
            if self.peek().is_none() {
                return Err(self.err("EOF while parsing a list"));
            }
            items.push(self.value(depth)?);
            self.ws();
            match self.next() {
                Some(b',') => {
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                        return Err(self.err("trailing comma"));
                    }
                }
                Some(b']') => return Ok(Value::Array(items)),
                Some(_) => return Err(self.err("expected `,` or `]`")),
                None => return Err(self.err("EOF while parsing a list")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        let mut members = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Value::Object(Object(members)));
        }
        loop {
            self.ws();
            match self.next() {
                Some(b'"') => {}
                Some(b'}') => return Err(self.err("trailing comma")),
                Some(_) => return Err(self.err("key must be a string")),
                None => return Err(self.err("EOF while parsing an object")),
            }
            let key = self.string()?;
            self.ws();
            match self.next() {
                Some(b':') => {}
                Some(_) => return Err(self.err("expected `:`")),
                None => return Err(self.err("EOF while parsing an object")),
            }
            self.ws();
            if self.peek().is_none() {
                return Err(self.err("EOF while parsing a value"));
            }
            let value = self.value(depth)?;
            members.push((key, value));
            self.ws();
            match self.next() {
                Some(b',') => {}
                Some(b'}') => return Ok(Value::Object(Object(members))),
                Some(_) => return Err(self.err("expected `,` or `}`")),
                None => return Err(self.err("EOF while parsing an object")),
            }
        }
    }

    /// A string's contents after its opening quote, up to and including the closing one.
    fn string(&mut self) -> Result<String, ParseError> {
        let mut out = String::new();
        loop {
            let start = self.i;
            let rest = self.s.get(start..).unwrap_or_default();
            let run = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(rest.len());
            let chunk = rest.get(..run).unwrap_or_default();
            match std::str::from_utf8(chunk) {
                Ok(text) => out.push_str(text),
                Err(e) => {
                    self.i = start + e.valid_up_to() + 1;
                    return Err(self.err("invalid UTF-8 in string"));
                }
            }
            self.i = start + run;
            match self.next() {
                Some(b'"') => return Ok(out),
                Some(b'\\') => self.escape(&mut out)?,
                Some(_) => {
                    return Err(self
                        .err("control character (\\u0000-\\u001F) found while parsing a string"))
                }
                None => return Err(self.err("EOF while parsing a string")),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), ParseError> {
        let c = match self.next() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let hi = self.hex4()?;
                let code = match hi {
                    0xD800..=0xDBFF => {
                        if self.next() != Some(b'\\') || self.next() != Some(b'u') {
                            return Err(self.err("lone leading surrogate in hex escape"));
                        }
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(self.err("lone leading surrogate in hex escape"));
                        }
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    }
                    0xDC00..=0xDFFF => {
                        return Err(self.err("lone trailing surrogate in hex escape"))
                    }
                    other => other,
                };
                char::from_u32(code).ok_or_else(|| self.err("invalid unicode code point"))?
            }
            Some(_) => return Err(self.err("invalid escape")),
            None => return Err(self.err("EOF while parsing a string")),
        };
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let mut n = 0u32;
        for _ in 0..4 {
            let d = match self.next() {
                Some(b) => char::from(b).to_digit(16),
                None => return Err(self.err("EOF while parsing a string")),
            };
            n = n * 16 + d.ok_or_else(|| self.err("invalid escape"))?;
        }
        Ok(n)
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => {
                self.i += 1;
                return Err(self.err("invalid number"));
            }
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            integer = false;
            if self.digits() == 0 {
                self.i += 1;
                return Err(self.err("invalid number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            integer = false;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                self.i += 1;
                return Err(self.err("invalid number"));
            }
        }
        let text =
            std::str::from_utf8(self.s.get(start..self.i).unwrap_or_default()).unwrap_or_default();
        let n = Number(text.into());
        if !integer && !n.as_f64().is_finite() {
            return Err(self.err("number out of range"));
        }
        Ok(Value::Number(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(text: &str) -> String {
        match parse(text.as_bytes()) {
            Ok(v) => panic!("accepted {text:?} as {v}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn scalars_and_containers() {
        assert_eq!(parse(b" null ").unwrap(), Value::Null);
        assert_eq!(parse(b"true").unwrap(), true);
        assert_eq!(parse(b"\"x\"").unwrap(), "x");
        assert_eq!(parse(b"-12").unwrap(), -12i64);
        assert_eq!(parse(b"[]").unwrap(), json!([]));
        assert_eq!(parse(b"{}").unwrap(), json!({}));
        let v = parse(b"{\"a\" : [1, {\"b\":null}] ,\"c\":\"d\"}").unwrap();
        assert_eq!(v, json!({"c": "d", "a": [1, {"b": null}]}));
        assert_eq!(v.to_string(), r#"{"a":[1,{"b":null}],"c":"d"}"#);
        assert_eq!(v["a"][1]["b"], Value::Null);
        assert_eq!(v["a"][7], Value::Null);
        assert_eq!(v["zz"]["yy"][0], Value::Null);
    }

    #[test]
    fn malformed_inputs_are_refused_with_position() {
        assert_eq!(err(""), "EOF while parsing a value at line 1 column 1");
        assert_eq!(err("{"), "EOF while parsing an object at line 1 column 1");
        assert_eq!(err("[1,"), "EOF while parsing a list at line 1 column 3");
        assert_eq!(err("\"ab"), "EOF while parsing a string at line 1 column 3");
        assert_eq!(err("[1,]"), "trailing comma at line 1 column 4");
        assert_eq!(err("{\"a\":1,}"), "trailing comma at line 1 column 8");
        assert_eq!(err("{\"a\" 1}"), "expected `:` at line 1 column 6");
        assert_eq!(err("{1:2}"), "key must be a string at line 1 column 2");
        assert_eq!(err("[1 2]"), "expected `,` or `]` at line 1 column 4");
        assert_eq!(
            err("{\"a\":1 \"b\"}"),
            "expected `,` or `}` at line 1 column 8"
        );
        assert_eq!(err("1 2"), "trailing characters at line 1 column 3");
        assert_eq!(err("{}\n\n  x"), "trailing characters at line 3 column 3");
        assert_eq!(err("tru"), "EOF while parsing a value at line 1 column 3");
        assert_eq!(err("nul!"), "expected ident at line 1 column 4");
        assert_eq!(err("'a'"), "expected value at line 1 column 1");
        assert_eq!(err("// c\n1"), "expected value at line 1 column 1");
        for bad in [
            "01", "-", "1.", ".5", "1e", "1e+", "+1", "--1", "0x10", "NaN", "Infinity",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "accepted {bad}");
        }
        assert!(err("1e400").starts_with("number out of range"));
        assert!(err("1e99999999999999999999999").starts_with("number out of range"));
        assert!(err("1.7976931348623159e308").starts_with("number out of range"));
        assert_eq!(
            parse(b"1.7976931348623157e308").unwrap().to_string(),
            "1.7976931348623157e308"
        );
        assert!(err("-1.5e99999").starts_with("number out of range"));
        assert!(err("\"a\u{1}\"").starts_with("control character"));
        assert!(err("\"\\x\"").starts_with("invalid escape"));
        assert!(err("\"\\u12G4\"").starts_with("invalid escape"));
        assert!(err("\"\\ud800\"").starts_with("lone leading surrogate"));
        assert!(err("\"\\ud800\\u0041\"").starts_with("lone leading surrogate"));
        assert!(err("\"\\udc00\"").starts_with("lone trailing surrogate"));
        assert!(parse(b"\"\xff\"")
            .unwrap_err()
            .message
            .starts_with("invalid UTF-8"));
        assert!(parse(b"\"\xc3\"").is_err());
        assert!(parse(b"\xef\xbb\xbf{}").is_err(), "a BOM is not JSON");
    }

    #[test]
    fn escapes_and_surrogate_pairs() {
        let v = parse(br#""a\"b\\c\/d\b\f\n\r\t\u0041\u00e9\ud83d\ude00""#).unwrap();
        assert_eq!(v, "a\"b\\c/d\u{8}\u{c}\n\r\tA\u{e9}\u{1F600}");
        // written back with minimal escaping; non-ASCII as UTF-8, controls as \u00xx
        assert_eq!(
            json!("\"\\/\u{1}\u{1f}\u{7f}\u{e9}\n").to_string(),
            "\"\\\"\\\\/\\u0001\\u001f\u{7f}\u{e9}\\n\""
        );
        assert_eq!(parse("\"\u{1F600}\"".as_bytes()).unwrap(), "\u{1F600}");
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(err(&deep).starts_with("recursion limit exceeded"));
        // far deeper than the stack could take, unterminated: refused at the limit
        let hostile = "[{\"a\":".repeat(200_000);
        assert!(err(&hostile).starts_with("recursion limit exceeded"));
    }

    #[test]
    fn numbers_keep_integers_exact() {
        let v = parse(b"[12345678901234567890123, 12345678901234567890124, -0, 9007199254740993]")
            .unwrap();
        let a = v.as_array().unwrap();
        assert_ne!(a[0], a[1]);
        assert_eq!(a[0].to_string(), "12345678901234567890123");
        assert_eq!(a[2], 0);
        assert_eq!(a[3].as_u64(), Some(9_007_199_254_740_993));
        assert_eq!(parse(b"18446744073709551616").unwrap().as_u64(), None);
        assert_eq!(
            parse(b"-9223372036854775808").unwrap().as_i64(),
            Some(i64::MIN)
        );
        assert_eq!(parse(b"1.0").unwrap().as_i64(), None);
    }

    #[test]
    fn canonical_numbers_follow_ecmascript() {
        let c = |t: &str| match parse(t.as_bytes()).unwrap() {
            Value::Number(n) => n.canonical(),
            other => panic!("{other}"),
        };
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
            ("1e-1", "0.1"),
            ("-1e-7", "-1e-7"),
            // halfway between two shortest spellings: the even digit, as ECMAScript
            ("2.2756502835772013e14", "227565028357720.12"),
            // integers as written: exact beyond 2^53
            ("9007199254740993", "9007199254740993"),
            ("100000000000000000000000", "100000000000000000000000"),
        ] {
            assert_eq!(c(text), want, "{text}");
        }
    }

    #[test]
    fn duplicate_names_read_last() {
        let mut v = parse(br#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(v["a"], 3);
        assert_eq!(v, json!({"b": 2, "a": 3}));
        let Value::Object(o) = &mut v else {
            panic!("not an object")
        };
        assert_eq!(o.remove("a"), Some(json!(3)));
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn json_macro_takes_expressions_by_reference() {
        let k = String::from("key");
        let n = 7u64;
        let inner = json!({"x": [1, null]});
        let v = json!({"k": k, "n": n, "s": n.to_string(), "list": [k, inner, {"deep": true}], "none": null});
        assert_eq!(
            v.to_string(),
            r#"{"k":"key","n":7,"s":"7","list":["key",{"x":[1,null]},{"deep":true}],"none":null}"#
        );
        assert_eq!(k, "key");
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Value::Number(Number(format!("{f:e}").into()))),
            "\\PC{0,8}".prop_map(Value::String),
            proptest::collection::vec(any::<char>(), 0..6)
                .prop_map(|c| Value::String(c.into_iter().collect())),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec(("\\PC{0,4}", inner), 0..5)
                    .prop_map(|m| Value::Object(Object(m))),
            ]
        })
    }

    proptest! {
        #[test]
        fn write_then_parse_round_trips(v in arb_value()) {
            let text = v.to_vec();
            let back = parse(&text).unwrap();
            prop_assert_eq!(&back, &v);
            // byte for byte, including member order and duplicates
            prop_assert_eq!(back.to_vec(), text);
        }

        #[test]
        fn canonical_numbers_read_back_and_both_paths_agree(bits in any::<u64>(), digits in 1usize..=15) {
            let f = f64::from_bits(bits);
            prop_assume!(f.is_finite() && f != 0.0);
            // the exact path always gives digits that read back as f
            let (d, n) = shortest_digits(f.abs());
            prop_assert!(d.len() <= 17);
            prop_assert_eq!(format!("0.{d}e{n}").parse::<f64>(), Ok(f.abs()));
            // a text of <= 15 digits: the fast path (its own digits) agrees with the exact one
            let text = format!("{:.*e}", digits - 1, f);
            let g: f64 = text.parse().unwrap();
            prop_assume!(g.is_finite() && g.abs() >= f64::MIN_POSITIVE);
            let fast = Number(text.clone().into()).canonical();
            let (d, n) = shortest_digits(g.abs());
            prop_assert_eq!(fast, es6_number(g < 0.0, &d, n), "{}", text);
        }

        #[test]
        fn shortest_digits_match_std_formatting(bits in any::<u64>(), scale in -30i32..30) {
            // any finite positive double, and decimal-looking ones of every magnitude
            let f = f64::from_bits(bits).abs();
            let g = format!("{}e{scale}", f64::from_bits(bits >> 12 | 0x3ff0_0000_0000_0000))
                .parse::<f64>()
                .unwrap();
            for x in [f, g] {
                prop_assume!(x.is_finite() && x > 0.0);
                prop_assert_eq!(shortest_digits(x), shortest_digits_std(x), "{:e}", x);
            }
        }

        #[test]
        fn never_panics_and_agrees_with_serde_json(bytes in proptest::collection::vec(
            prop_oneof![Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b':'),
                        Just(b','), Just(b'\\'), Just(b'u'), Just(b'1'), Just(b'-'), Just(b'.'),
                        Just(b'e'), Just(b' '), Just(b'n'), Just(b'0'), any::<u8>()], 0..40)) {
            let ours = parse(&bytes);
            let theirs = serde_json::from_slice::<serde_json::Value>(&bytes);
            prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{:?}", String::from_utf8_lossy(&bytes));
        }
    }

    /// The former implementation, on std's float formatting: `{:e}` gives the shortest digits
    /// that round-trip; when two spellings of that length read back as `f` and are equally
    /// close, exact formatting at that precision (round half to even) decides, when it still
    /// round-trips.
    fn shortest_digits_std(f: f64) -> (String, i64) {
        let shortest = format!("{f:e}");
        let precision = shortest
            .split_once('e')
            .map_or(0, |(m, _)| m.bytes().filter(u8::is_ascii_digit).count())
            .saturating_sub(1);
        let exact = format!("{f:.precision$e}");
        let sci = if exact.parse::<f64>() == Ok(f) {
            exact
        } else {
            shortest
        };
        significant_digits(&sci).unwrap_or_else(|| panic!("{sci}"))
    }

    #[test]
    fn shortest_digits_match_std_on_edges() {
        for x in [
            f64::MIN_POSITIVE,
            f64::MAX,
            5e-324,
            1e21,
            1e-7,
            0.1 + 0.2,
            9007199254740993.0,
            123456789012345680.0,
            f64::from_bits(3),
            1.7976931348623157e308,
            4.35,
            0.000001,
            5e-7,
        ] {
            assert_eq!(shortest_digits(x), shortest_digits_std(x), "{x:e}");
        }
        // exhaustive around a few powers of ten and two
        for base in [
            1.0f64,
            1e15,
            1e16,
            1e17,
            1e22,
            1e-5,
            2.0f64.powi(53),
            f64::MIN_POSITIVE,
        ] {
            let b = base.to_bits();
            for d in 0..2000u64 {
                for x in [f64::from_bits(b + d), f64::from_bits(b - d)] {
                    if x.is_finite() && x > 0.0 {
                        assert_eq!(shortest_digits(x), shortest_digits_std(x), "{x:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn agrees_with_serde_json_on_samples() {
        for text in [
            r#"{"a": [1, 2.5, -3e-2, true, false, null, "x\u00e9\ud83d\ude00"], "b": {}}"#,
            "[[[[[]]]]]",
            "\"\\u0000\"",
            "0",
            "-0.0e+0",
        ] {
            let ours = parse(text.as_bytes()).unwrap();
            let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(
                parse(theirs.to_string().as_bytes()).unwrap(),
                ours,
                "{text}"
            );
        }
    }
}
