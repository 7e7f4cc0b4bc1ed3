//! `schema/idemgate.schema.json` checked against the configuration's own types, not against
//! their source text:
//!
//! - its blocks have exactly the fields of the `serde` DTOs in [`super::raw`]: `schemars`
//!   derives their schema, and both are walked side by side (a hand-written block may show
//!   part of a DTO's fields, e.g. key sources and composite parts; together they show all);
//! - every bound it states is the validator's: a value one past a `minimum`/`maximum` is
//!   refused naming that field, the bound itself is not;
//! - every `default` it states is the validator's: writing the default changes nothing;
//! - error kinds, placeholders and the default stored headers are the core's constants.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::raw::RawDocument;
use super::{Config, DEFAULT_STORE_HEADERS, ERROR_KINDS, PLACEHOLDERS};
use crate::headers::NEVER_STORED;

fn schema() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schema/idemgate.schema.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// `#/$defs/<name>` of `root`.
fn def<'a>(root: &'a Value, reference: &str) -> &'a Value {
    let name = reference.rsplit('/').next().unwrap();
    &root["$defs"][name]
}

/// The properties a hand-written node allows: its own and those of the node it `$ref`s.
fn hand_props(root: &Value, node: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Some(r) = node.get("$ref").and_then(Value::as_str) {
        out.extend(hand_props(root, def(root, r)));
    }
    if let Some(Value::Object(p)) = node.get("properties") {
        out.extend(p.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    out
}

/// A generated node without its `Option` (`anyOf [x, null]`) and `$ref` wrappers, and the
/// name of the DTO it is.
fn gen_resolve<'a>(root: &'a Value, node: &'a Value) -> (&'a Value, Option<String>) {
    if let Some(Value::Array(any)) = node.get("anyOf") {
        if let Some(x) = any.iter().find(|s| s.get("type") != Some(&json!("null"))) {
            return gen_resolve(root, x);
        }
    }
    if let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap().to_string();
        return (def(root, r), Some(name));
    }
    (node, None)
}

/// The hand-written counterpart of a property: the block itself, or an array's items.
fn hand_resolve(root: &Value, node: &Value) -> Value {
    let node = match node.get("$ref").and_then(Value::as_str) {
        Some(r) if node.get("properties").is_none() => {
            let mut merged = def(root, r).clone();
            if let (Value::Object(m), Value::Object(n)) = (&mut merged, node) {
                m.extend(
                    n.iter()
                        .filter(|(k, _)| *k != "$ref")
                        .map(|(k, v)| (k.clone(), v.clone())),
                );
            }
            merged
        }
        _ => node.clone(),
    };
    node
}

/// Walks a DTO (`gen`) and its hand-written schema (`hand`): every hand-written field must be
/// a DTO field; the fields each DTO shows across the schema are collected in `seen`.
fn walk(
    gen_root: &Value,
    gen: &Value,
    hand_root: &Value,
    hand: &Value,
    at: &str,
    seen: &mut BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>,
) {
    let (g, name) = gen_resolve(gen_root, gen);
    let (g, name, hand) = match (g.get("items"), name) {
        (Some(items), None) => {
            let (gi, n) = gen_resolve(gen_root, items);
            (
                gi,
                n,
                hand_resolve(hand_root, &hand_resolve(hand_root, hand)["items"]),
            )
        }
        (_, n) => (g, n, hand_resolve(hand_root, hand)),
    };
    let Some(Value::Object(gprops)) = g.get("properties") else {
        return;
    };
    let name = name.unwrap_or_else(|| at.to_string());
    let hprops = hand_props(hand_root, &hand);
    let entry = seen.entry(name.clone()).or_default();
    entry.0.extend(gprops.keys().cloned());
    entry.1.extend(hprops.keys().cloned());
    for (field, hsub) in &hprops {
        let gsub = gprops
            .get(field)
            .unwrap_or_else(|| panic!("{at}.{field}: in the schema, not a field of {name}"));
        walk(
            gen_root,
            gsub,
            hand_root,
            hsub,
            &format!("{at}.{field}"),
            seen,
        );
    }
}

#[test]
fn schema_matches_the_dtos() {
    let hand = schema();
    let gen = schemars::schema_for!(RawDocument).to_value();
    let mut seen = BTreeMap::new();
    walk(&gen, &gen, &hand, &hand, "RawDocument", &mut seen);
    for (dto, (fields, shown)) in &seen {
        // `$schema` is the schema's own reference; the DTO ignores it by name
        assert_eq!(
            fields, shown,
            "{dto}: DTO fields (left) vs schema properties (right)"
        );
    }
    for dto in [
        "RawDocument",
        "RawRoute",
        "RawKey",
        "RawSource",
        "RawFingerprint",
        "RawExpiry",
        "RawPolicy",
        "RawResponse",
        "RawScope",
        "RawErrors",
        "RawStore",
        "RawEtcd",
        "RawCorrelation",
        "RawMatch",
        "RawRateLimit",
    ] {
        assert!(
            seen.contains_key(dto),
            "{dto} is not reached from the schema"
        );
    }
}

/// Every integer field with bounds or a default, by dotted path (routes left out: they take
/// the same rule fields).
fn integer_fields(root: &Value, node: &Value, at: &str, out: &mut Vec<(String, Value)>) {
    for (name, sub) in hand_props(root, &hand_resolve(root, node)) {
        if at.is_empty() && name == "routes" {
            continue;
        }
        let path = if at.is_empty() {
            name
        } else {
            format!("{at}.{name}")
        };
        let sub = hand_resolve(root, &sub);
        if sub.get("type") == Some(&json!("integer")) {
            out.push((path, sub));
        } else if sub.get("type") == Some(&json!("object")) && sub.get("properties").is_some() {
            integer_fields(root, &sub, &path, out);
        }
    }
}

/// A document setting `path` to `value`, inside what that block needs to be valid.
fn document(path: &str, value: Value) -> String {
    let mut doc = json!({});
    if path.starts_with("rateLimit.") {
        doc["rateLimit"] = json!({"rate": 1});
    }
    let mut node = &mut doc;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            node[*p] = value.clone();
        } else {
            if node.get(*p).is_none() {
                node[*p] = Value::Object(Map::new());
            }
            node = &mut node[*p];
        }
    }
    doc.to_string()
}

fn refusal(doc: &str) -> Option<String> {
    Config::from_json(doc).err().map(|e| e.path)
}

#[test]
fn schema_bounds_and_defaults_are_the_validators() {
    let hand = schema();
    let mut fields = Vec::new();
    integer_fields(&hand, &hand, "", &mut fields);
    assert!(
        fields.len() >= 25,
        "only {} integer fields found",
        fields.len()
    );
    let mut checked = 0;
    for (path, node) in &fields {
        if let Some(max) = node.get("maximum").and_then(Value::as_u64) {
            assert_eq!(
                refusal(&document(path, json!(max + 1))).as_deref(),
                Some(path.as_str()),
                "{path} above {max}"
            );
            assert_ne!(
                refusal(&document(path, json!(max))).as_deref(),
                Some(path.as_str()),
                "{path} at {max}"
            );
            checked += 1;
        }
        if let Some(min) = node.get("minimum").and_then(Value::as_u64) {
            if min > 0 {
                assert_eq!(
                    refusal(&document(path, json!(min - 1))).as_deref(),
                    Some(path.as_str()),
                    "{path} below {min}"
                );
            }
            assert_ne!(
                refusal(&document(path, json!(min))).as_deref(),
                Some(path.as_str()),
                "{path} at {min}"
            );
            checked += 1;
        }
        if let Some(default) = node.get("default") {
            let parent = path.rsplit_once('.').map_or("", |(p, _)| p);
            let without = if parent.is_empty() {
                "{}".to_string()
            } else {
                document(parent, json!({}))
            };
            let without = if path.starts_with("rateLimit.") {
                document("rateLimit.rate", json!(1))
            } else {
                without
            };
            let with = if path == "rateLimit.rate" {
                without.clone()
            } else {
                document(path, default.clone())
            };
            let with = if path.starts_with("rateLimit.") && path != "rateLimit.rate" {
                let mut v: Value = serde_json::from_str(&with).unwrap();
                v["rateLimit"]["rate"] = json!(1);
                v.to_string()
            } else {
                with
            };
            assert_eq!(
                Config::from_json(&with),
                Config::from_json(&without),
                "{path}: default {default}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} bounds and defaults checked");
}

#[test]
fn schema_lists_are_the_cores() {
    let hand = schema();
    let errors = &hand["$defs"]["errors"]["properties"];
    for list in ["codes", "messages"] {
        let names: Vec<&str> = errors[list]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names, ERROR_KINDS, "errors.{list}");
    }
    let pattern = hand["$defs"]["template"]["pattern"].as_str().unwrap();
    let names = pattern
        .split("(?:")
        .find_map(|p| {
            p.split_once(')')
                .map(|(a, _)| a)
                .filter(|a| a.contains("status|"))
        })
        .unwrap();
    assert_eq!(names.split('|').collect::<Vec<_>>(), PLACEHOLDERS);
    let store = &hand["$defs"]["response"]["properties"]["storeHeaders"];
    assert_eq!(store["default"], json!(DEFAULT_STORE_HEADERS));
    let never = regex::Regex::new(store["items"]["not"]["pattern"].as_str().unwrap()).unwrap();
    for h in NEVER_STORED {
        assert!(
            never.is_match(h) && never.is_match(&h.to_uppercase()),
            "{h}"
        );
    }
    assert!(!never.is_match("etag") && !never.is_match("content-type"));
}
