//! Checks of single configuration values: bounds, header names, method tokens, JSON
//! Pointers, templates and status items. Each error names the field's path and the value.
//!
//! ```
//! use idemgate_core::config::fields::bounded;
//! assert_eq!(bounded("key.maxLength", 0, 1, 1024).unwrap_err().to_string(), "key.maxLength: must be 1..=1024, got 0");
//! ```
use serde_json::Value;

use super::model::{StatusRange, PLACEHOLDERS};
use super::raw::StatusItem;
use crate::error::ConfigError;
use crate::headers::is_token;
use crate::request::canonical::valid_pointer;

/// `value` within `lo..=hi`.
pub fn bounded(path: &str, value: u64, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError::new(
            path,
            format!("must be {lo}..={hi}, got {value}"),
        ));
    }
    Ok(value)
}

/// A valid HTTP field name, lower-cased.
pub(super) fn header_name(path: &str, name: &str) -> Result<String, ConfigError> {
    if !is_token(name) {
        return Err(ConfigError::new(
            path,
            format!("must be an HTTP header name, got {name:?}"),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// At least one method token, upper-cased, without repeats.
pub(super) fn methods(path: &str, list: &[String]) -> Result<Vec<String>, ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::new(
            path,
            "must list at least one method, got []",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        if !is_token(m) {
            return Err(ConfigError::new(
                format!("{path}[{i}]"),
                format!("must be an HTTP method token, got {m:?}"),
            ));
        }
        let up = m.to_ascii_uppercase();
        if !out.contains(&up) {
            out.push(up);
        }
    }
    Ok(out)
}

/// A JSON Pointer into the body (not the whole document).
pub(super) fn pointer(path: &str, p: &str) -> Result<String, ConfigError> {
    valid_pointer(p).map_err(|e| ConfigError::new(path, e))?;
    if p.is_empty() {
        return Err(ConfigError::new(
            path,
            "must point inside the body, got \"\" (the whole document)",
        ));
    }
    Ok(p.to_string())
}

/// A JSON template: placeholders known and closed.
pub(super) fn check_template(path: &str, v: &Value) -> Result<(), ConfigError> {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                let after = rest.get(start + 2..).unwrap_or_default();
                let Some(end) = after.find("}}") else {
                    return Err(ConfigError::new(
                        path,
                        format!("unclosed placeholder in {s:?}"),
                    ));
                };
                let name = after.get(..end).unwrap_or_default().trim();
                if !PLACEHOLDERS.contains(&name) {
                    return Err(ConfigError::new(
                        path,
                        format!(
                            "unknown placeholder {{{{{name}}}}}; known: {}",
                            PLACEHOLDERS.join(", ")
                        ),
                    ));
                }
                rest = after.get(end + 2..).unwrap_or_default();
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_template(&format!("{path}[{i}]"), item)?;
            }
            Ok(())
        }
        Value::Object(map) => {
            for (k, item) in map.iter() {
                check_template(&format!("{path}.{k}"), item)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Status items as ranges.
pub(super) fn statuses(path: &str, items: &[StatusItem]) -> Result<Vec<StatusRange>, ConfigError> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let range = match item {
            StatusItem::Code(c) => {
                let code = status_code(&p, &c.to_string())?;
                StatusRange { lo: code, hi: code }
            }
            StatusItem::Text(t) => status_text(&p, t)?,
        };
        out.push(range);
    }
    Ok(out)
}

pub(super) fn status_text(path: &str, text: &str) -> Result<StatusRange, ConfigError> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(StatusRange { lo: 100, hi: 599 });
    }
    if t.len() == 3 && t.to_ascii_lowercase().ends_with("xx") {
        let class = t.chars().next().and_then(|c| c.to_digit(10)).unwrap_or(0);
        if (1..=5).contains(&class) {
            let lo = u16::try_from(class * 100).unwrap_or(0);
            return Ok(StatusRange { lo, hi: lo + 99 });
        }
        return Err(ConfigError::new(
            path,
            format!("must be a status class 1xx..5xx, got {text:?}"),
        ));
    }
    if let Some((a, b)) = t.split_once('-') {
        let lo = status_code(path, a.trim())?;
        let hi = status_code(path, b.trim())?;
        if lo > hi {
            return Err(ConfigError::new(
                path,
                format!("range is inverted ({lo} > {hi}), got {text:?}"),
            ));
        }
        return Ok(StatusRange { lo, hi });
    }
    let code = status_code(path, t)?;
    Ok(StatusRange { lo: code, hi: code })
}

pub(super) fn status_code(path: &str, text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(c) if (100..=599).contains(&c) => Ok(c),
        _ => Err(ConfigError::new(
            path,
            format!("must be a status code 100..=599, a range \"200-299\", a class \"2xx\" or \"all\", got {text:?}"),
        )),
    }
}
