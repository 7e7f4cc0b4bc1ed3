//! The shipped profiles and the shared configuration examples parse (or fail) as the schema
//! says. `tests/test_schema.py` runs the same inputs against `schema/idemgate.schema.json`:
//!
//! - every `envoy/profiles/*.json` must be accepted;
//! - every `good` entry of `tests/config-examples.json` must be accepted;
//! - every `bad` entry must be refused with an error starting with its `error` text.
use std::fs;
use std::path::{Path, PathBuf};

use idemgate_core::Config;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The shared examples file, or why it cannot be read.
fn examples() -> Result<Value, String> {
    let path = repo_root().join("tests/config-examples.json");
    let text =
        fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str::<Value>(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

/// The `field` array of the examples file.
fn entries(field: &str) -> Result<Vec<Value>, String> {
    let doc = examples()?;
    match doc.get(field) {
        Some(Value::Array(items)) if !items.is_empty() => Ok(items.clone()),
        _ => Err(format!(
            "tests/config-examples.json has no non-empty `{field}` array"
        )),
    }
}

#[test]
fn every_profile_parses() {
    let dir = repo_root().join("envoy/profiles");
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no profiles in {}", dir.display());
    let mut failures = Vec::new();
    for path in &paths {
        let text = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        match Config::from_json(&text) {
            Ok(config) => {
                if config
                    .description
                    .as_deref()
                    .unwrap_or("")
                    .trim()
                    .is_empty()
                {
                    failures.push(format!(
                        "{}: needs a `description` naming the document it follows",
                        path.display()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn good_examples_parse() {
    let good = entries("good").unwrap_or_else(|e| panic!("{e}"));
    let failures: Vec<String> = good
        .iter()
        .enumerate()
        .filter_map(|(i, config)| {
            Config::from_json(&config.to_string())
                .err()
                .map(|e| format!("good[{i}] refused: {e}\n  {config}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bad_examples_fail_with_their_message() {
    let bad = entries("bad").unwrap_or_else(|e| panic!("{e}"));
    let mut failures = Vec::new();
    for (i, entry) in bad.iter().enumerate() {
        let config = entry
            .get("config")
            .unwrap_or_else(|| panic!("bad[{i}] has no `config`"));
        let expected = entry
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("bad[{i}] has no `error` string"));
        match Config::from_json(&config.to_string()) {
            Ok(_) => failures.push(format!("bad[{i}] accepted: {config}")),
            Err(e) if !e.to_string().starts_with(expected) => failures.push(format!(
                "bad[{i}] {config}\n  expected prefix: {expected}\n  got:             {e}"
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
