//! Local answers: errors (RFC 9457 `application/problem+json` or the API's own JSON
//! envelope), duplicate acknowledgements, and replayed responses.
//!
//! An envelope is a JSON template whose string leaves may hold placeholders:
//! `{{status}}`, `{{code}}`, `{{message}}`, `{{detail}}`, `{{path}}`, `{{idempotencyKey}}`,
//! `{{requestId}}`, `{{retryAfterSeconds}}`. A leaf that is exactly one placeholder takes
//! the value's JSON type (a number for `{{status}}`, `null` when absent); placeholders
//! inside longer strings are replaced by text.
//!
//! ```
//! use idemgate_core::{Config, Rejection};
//! use idemgate_core::problem::{render, AnswerContext};
//! let config = Config::from_json(r#"{"errors": {"format": "envelope",
//!     "envelope": {"success": false, "error": {"code": "{{code}}", "message": "{{message}}", "status": "{{status}}"}},
//!     "codes": {"conflict": "CDP_ETL.CONFLICT"}}}"#).unwrap();
//! let answer = render(&config.default_rule, &Rejection::Conflict { retry_after_s: 2 }, &AnswerContext::default());
//! assert_eq!(answer.status, 409);
//! assert!(answer.headers.contains(&("retry-after".to_string(), "2".to_string())));
//! let doc: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
//! assert_eq!(doc["error"]["code"], "CDP_ETL.CONFLICT");
//! assert_eq!(doc["error"]["status"], 409);
//! ```
use serde_json::{json, Map, Value};

use crate::config::{DuplicateAction, ErrorFormat, Rule};
use crate::decision::Rejection;
use crate::record::StoredResponse;

/// Base of the `type` URIs of idemgate's problems.
pub const PROBLEM_BASE: &str = "https://idemgate.dev/problems/";

/// A response to send locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAnswer {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names, string values).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Request facts echoed in answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerContext {
    /// The key as the client sent it.
    pub idempotency_key: Option<String>,
    /// The request's correlation id.
    pub request_id: Option<String>,
    /// The correlation header to set on the answer.
    pub correlation_header: Option<String>,
}

struct Described {
    status: u16,
    slug: &'static str,
    code: &'static str,
    title: &'static str,
    detail: String,
    path: Option<String>,
    retry_after_s: Option<u64>,
}

fn describe(rule: &Rule, rejection: &Rejection) -> Described {
    let d = |status, slug, code, title, detail: String| Described {
        status,
        slug,
        code,
        title,
        detail,
        path: None,
        retry_after_s: None,
    };
    match rejection {
        Rejection::MissingKey { sources } => Described {
            path: Some(sources.clone()),
            ..d(400, "missing-key", "missing_idempotency_key", "Idempotency key required",
                format!("This endpoint requires an idempotency key: send a unique value (for example a UUID) in {sources}, and reuse it when you retry the same request."))
        },
        Rejection::MalformedKey { source, reason } => Described {
            path: Some(source.clone()),
            ..d(400, "malformed-key", "malformed_idempotency_key", "Malformed idempotency key",
                format!("The idempotency key in {source} is invalid: {reason}. Send 1 to {} printable ASCII characters (a header value may also be a quoted string).", rule.key_max_length))
        },
        Rejection::InvalidBody { detail } => d(400, "invalid-body", "invalid_body", "Invalid request body", format!("{detail}. Send a valid JSON body.")),
        Rejection::InvalidExpiry { header, detail } => Described {
            path: Some(header.clone()),
            ..d(400, "invalid-expiry", "invalid_expiration", "Invalid idempotency expiration", format!("The {header} header is invalid: {detail}."))
        },
        Rejection::BodyTooLarge { limit } => Described {
            path: Some("body".into()),
            ..d(413, "body-too-large", "body_too_large", "Request body too large",
                format!("Requests here may carry at most {limit} bytes of body; this one is larger. Send a smaller body."))
        },
        Rejection::Conflict { retry_after_s } => Described {
            retry_after_s: Some(*retry_after_s),
            ..d(rule.on_concurrent.status, "key-in-use", "request_in_progress", "Request in progress",
                "A request with this idempotency key is still being processed. Retry after the time given in Retry-After to get its result.".to_string())
        },
        Rejection::Mismatch => d(rule.on_mismatch.status, "key-reused", "idempotency_key_reused", "Idempotency key reused with a different request",
            "This idempotency key was already used with a different request (method, path or body). Use a new key for a new request, or resend exactly the original request.".to_string()),
        Rejection::Duplicate => d(rule.on_duplicate.status, "duplicate", "duplicate_request", "Duplicate request",
            "This request was already processed with this idempotency key; it was not applied again.".to_string()),
        Rejection::StoreUnavailable { retry_after_s, .. } => Described {
            retry_after_s: Some(*retry_after_s),
            ..d(503, "store-unavailable", "store_unavailable", "Idempotency store unavailable",
                "The idempotency store could not take this request right now; nothing was executed. Retry after the time given in Retry-After.".to_string())
        },
        Rejection::Misconfigured { detail } => d(500, "misconfigured", "misconfigured", "Idempotency filter misconfigured",
            format!("The proxy is misconfigured and refused the request before it reached the service: {detail}")),
        Rejection::RateLimited { retry_after_s } => Described {
            retry_after_s: Some(*retry_after_s),
            ..d(rule.rate_limit.as_ref().map_or(429, |r| r.status), "rate-limited", "rate_limited", "Too many requests",
                format!("This caller is over its rate limit; nothing was executed. Retry after {retry_after_s} second(s)."))
        },
    }
}

/// Renders a rejection (or a duplicate acknowledgement) in the rule's error format.
pub fn render(rule: &Rule, rejection: &Rejection, ctx: &AnswerContext) -> LocalAnswer {
    let desc = describe(rule, rejection);
    let kind = rejection.kind();
    let policy_code = match rejection {
        Rejection::Mismatch => rule.on_mismatch.code.as_deref(),
        Rejection::Duplicate => rule.on_duplicate.code.as_deref(),
        Rejection::Conflict { .. } => rule.on_concurrent.code.as_deref(),
        _ => None,
    };
    let policy_message = match rejection {
        Rejection::Mismatch => rule.on_mismatch.message.as_deref(),
        Rejection::Duplicate => rule.on_duplicate.message.as_deref(),
        Rejection::Conflict { .. } => rule.on_concurrent.message.as_deref(),
        _ => None,
    };
    let code = policy_code
        .or(rule.errors.codes.get(kind).map(String::as_str))
        .unwrap_or(desc.code)
        .to_string();
    let message = policy_message
        .or(rule.errors.messages.get(kind).map(String::as_str))
        .unwrap_or(desc.title)
        .to_string();
    let vars = Vars {
        status: desc.status,
        code: code.clone(),
        message: message.clone(),
        detail: desc.detail.clone(),
        path: desc.path.clone(),
        idempotency_key: ctx.idempotency_key.clone(),
        request_id: ctx.request_id.clone(),
        retry_after_s: desc.retry_after_s,
    };
    let acknowledge = matches!(rejection, Rejection::Duplicate)
        && rule.on_duplicate.action == DuplicateAction::Acknowledge;
    let (content_type, doc) = if acknowledge {
        let template = rule
            .on_duplicate
            .body
            .clone()
            .unwrap_or_else(|| json!({"duplicate": true, "message": "{{message}}"}));
        ("application/json".to_string(), fill(&template, &vars))
    } else {
        match &rule.errors.format {
            ErrorFormat::Envelope(template) => {
                (rule.errors.content_type.clone(), fill(template, &vars))
            }
            ErrorFormat::Problem => {
                let mut m = Map::new();
                m.insert(
                    "type".into(),
                    Value::String(format!("{PROBLEM_BASE}{}", desc.slug)),
                );
                m.insert("title".into(), Value::String(message));
                m.insert("status".into(), json!(desc.status));
                m.insert("detail".into(), Value::String(desc.detail));
                if policy_code.is_some() || rule.errors.codes.contains_key(kind) {
                    m.insert("code".into(), Value::String(code));
                }
                if let Some(id) = &ctx.request_id {
                    m.insert("requestId".into(), Value::String(id.clone()));
                }
                (rule.errors.content_type.clone(), Value::Object(m))
            }
        }
    };
    let mut headers = vec![("content-type".to_string(), content_type)];
    if let Some(s) = desc.retry_after_s {
        headers.push(("retry-after".to_string(), s.to_string()));
    }
    add_correlation(&mut headers, ctx);
    LocalAnswer {
        status: desc.status,
        headers,
        body: serde_json::to_vec(&doc).unwrap_or_default(),
    }
}

fn add_correlation(headers: &mut Vec<(String, String)>, ctx: &AnswerContext) {
    if let (Some(h), Some(id)) = (&ctx.correlation_header, &ctx.request_id) {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(h));
        headers.push((h.clone(), id.clone()));
    }
}

struct Vars {
    status: u16,
    code: String,
    message: String,
    detail: String,
    path: Option<String>,
    idempotency_key: Option<String>,
    request_id: Option<String>,
    retry_after_s: Option<u64>,
}

impl Vars {
    fn value(&self, name: &str) -> Value {
        let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
        match name {
            "status" => json!(self.status),
            "code" => Value::String(self.code.clone()),
            "message" => Value::String(self.message.clone()),
            "detail" => Value::String(self.detail.clone()),
            "path" => opt(&self.path),
            "idempotencyKey" => opt(&self.idempotency_key),
            "requestId" => opt(&self.request_id),
            "retryAfterSeconds" => self.retry_after_s.map_or(Value::Null, |s| json!(s)),
            _ => Value::Null,
        }
    }
}

fn fill(template: &Value, vars: &Vars) -> Value {
    match template {
        Value::String(s) => {
            let t = s.trim();
            if let Some(name) = t.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")) {
                if !name.contains("{{") {
                    return vars.value(name.trim());
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                out.push_str(rest.get(..start).unwrap_or_default());
                let after = rest.get(start + 2..).unwrap_or_default();
                match after.find("}}") {
                    Some(end) => {
                        let name = after.get(..end).unwrap_or_default().trim();
                        match vars.value(name) {
                            Value::String(v) => out.push_str(&v),
                            Value::Null => {}
                            other => out.push_str(&other.to_string()),
                        }
                        rest = after.get(end + 2..).unwrap_or_default();
                    }
                    None => {
                        out.push_str(rest.get(start..).unwrap_or_default());
                        rest = "";
                    }
                }
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| fill(i, vars)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The answer replaying a stored response: its status, stored headers and body byte for
/// byte, plus the replay header (and the current request's correlation id).
pub fn replay(rule: &Rule, stored: &StoredResponse, ctx: &AnswerContext) -> LocalAnswer {
    let mut headers: Vec<(String, String)> = stored
        .headers
        .iter()
        .filter_map(|(n, v)| {
            std::str::from_utf8(v)
                .ok()
                .map(|v| (n.clone(), v.to_string()))
        })
        .collect();
    headers.push((rule.replay_header.clone(), "true".to_string()));
    add_correlation(&mut headers, ctx);
    LocalAnswer {
        status: stored.status,
        headers,
        body: stored.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::key::KeyError;

    #[test]
    fn statuses_and_documents() {
        let c = Config::default();
        let r = &c.default_rule;
        let cases = [
            (
                Rejection::MissingKey {
                    sources: "header idempotency-key".into(),
                },
                400,
            ),
            (
                Rejection::MalformedKey {
                    source: "header idempotency-key".into(),
                    reason: KeyError::Empty,
                },
                400,
            ),
            (Rejection::InvalidBody { detail: "x".into() }, 400),
            (
                Rejection::InvalidExpiry {
                    header: "x".into(),
                    detail: "y".into(),
                },
                400,
            ),
            (Rejection::BodyTooLarge { limit: 10 }, 413),
            (Rejection::Conflict { retry_after_s: 2 }, 409),
            (Rejection::Mismatch, 422),
            (Rejection::Duplicate, 409),
            (
                Rejection::StoreUnavailable {
                    retry_after_s: 3,
                    reason: "full",
                },
                503,
            ),
            (Rejection::Misconfigured { detail: "x".into() }, 500),
            (Rejection::RateLimited { retry_after_s: 3 }, 429),
        ];
        for (rej, status) in cases {
            let a = render(r, &rej, &AnswerContext::default());
            assert_eq!(a.status, status);
            let doc: Value = serde_json::from_slice(&a.body).unwrap();
            assert_eq!(doc["status"], status);
            assert!(doc["type"].as_str().unwrap().starts_with(PROBLEM_BASE));
            assert!(doc["detail"].as_str().unwrap().len() > 20);
            assert_eq!(a.headers[0].1, "application/problem+json");
        }
    }

    #[test]
    fn envelopes_and_codes() {
        let c = Config::from_json(
            r#"{"onMismatch": {"status": 409, "code": "idempotency_conflict", "message": "The idempotency key was reused with a different request body."},
                "errors": {"format": "envelope", "envelope": {"error": {"code": "{{code}}", "message": "{{message}}",
                   "idempotency_key": "{{idempotencyKey}}", "request_id": "{{requestId}}", "retry_after_seconds": "{{retryAfterSeconds}}", "note": "see {{code}} ({{status}})"}}}}"#,
        )
        .unwrap();
        let ctx = AnswerContext {
            idempotency_key: Some("k1".into()),
            request_id: Some("req_1".into()),
            correlation_header: Some("x-request-id".into()),
        };
        let a = render(&c.default_rule, &Rejection::Mismatch, &ctx);
        assert_eq!(a.status, 409);
        let doc: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(
            doc,
            json!({"error": {"code": "idempotency_conflict", "message": "The idempotency key was reused with a different request body.",
                "idempotency_key": "k1", "request_id": "req_1", "retry_after_seconds": null, "note": "see idempotency_conflict (409)"}})
        );
        assert!(a.headers.contains(&("x-request-id".into(), "req_1".into())));
        assert!(a
            .headers
            .contains(&("content-type".into(), "application/json".into())));
    }

    #[test]
    fn acknowledgement() {
        let c = Config::from_json(r#"{"onDuplicate": {"action": "acknowledge", "body": {"received": true, "duplicate": true, "key": "{{idempotencyKey}}"}}}"#).unwrap();
        let ctx = AnswerContext {
            idempotency_key: Some("evt_1".into()),
            ..Default::default()
        };
        let a = render(&c.default_rule, &Rejection::Duplicate, &ctx);
        assert_eq!(a.status, 200);
        let doc: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(
            doc,
            json!({"received": true, "duplicate": true, "key": "evt_1"})
        );
    }

    #[test]
    fn replay_adds_header_and_current_correlation() {
        let c = Config::default();
        let s = StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body: b"hi".to_vec(),
        };
        let ctx = AnswerContext {
            request_id: Some("r2".into()),
            correlation_header: Some("x-correlation-id".into()),
            ..Default::default()
        };
        let a = replay(&c.default_rule, &s, &ctx);
        assert_eq!(a.status, 201);
        assert_eq!(a.body, b"hi");
        assert!(a
            .headers
            .contains(&("idempotent-replayed".into(), "true".into())));
        assert!(a
            .headers
            .contains(&("x-correlation-id".into(), "r2".into())));
    }
}
