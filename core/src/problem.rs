//! Local answers: RFC 9457 `application/problem+json` errors and replayed responses.
//!
//! ```
//! use idemgate_core::{Config, Rejection};
//! use idemgate_core::problem::render;
//! let answer = render(&Config::default(), &Rejection::Conflict { retry_after_s: 1 });
//! assert_eq!(answer.status, 409);
//! assert!(answer.headers.contains(&("retry-after".to_string(), "1".to_string())));
//! let doc: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
//! assert_eq!(doc["status"], 409);
//! ```
use serde_json::json;

use crate::config::Config;
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

/// Status, slug, title and detail of a rejection.
pub fn describe(
    config: &Config,
    rejection: &Rejection,
) -> (u16, &'static str, &'static str, String) {
    match rejection {
        Rejection::MissingKey { header } => (
            400,
            "missing-key",
            "Idempotency key required",
            format!("This endpoint requires an idempotency key: send a unique value (for example a UUID) in the {header} header and reuse it when you retry the same request."),
        ),
        Rejection::MalformedKey { header, reason } => (
            400,
            "malformed-key",
            "Malformed idempotency key",
            format!("The {header} header is invalid: {reason}. Send 1 to {} printable ASCII characters, bare or as a quoted string.", config.key_max_length),
        ),
        Rejection::BodyTooLarge { limit } => (
            413,
            "body-too-large",
            "Request body too large",
            format!("Requests with an idempotency key may carry at most {limit} bytes of body; this one is larger. Send a smaller body."),
        ),
        Rejection::Conflict { .. } => (
            409,
            "key-in-use",
            "Request in progress",
            "A request with this idempotency key is still being processed. Retry after the time given in Retry-After to get its result.".to_string(),
        ),
        Rejection::Mismatch => (
            422,
            "key-reused",
            "Idempotency key reused with a different request",
            "This idempotency key was already used with a different request (method, path or body). Use a new key for a new request, or resend exactly the original request.".to_string(),
        ),
        Rejection::StoreUnavailable { .. } => (
            503,
            "store-unavailable",
            "Idempotency store unavailable",
            "The idempotency store could not take this request right now; nothing was executed. Retry after the time given in Retry-After.".to_string(),
        ),
        Rejection::Misconfigured { detail } => (
            500,
            "misconfigured",
            "Idempotency filter misconfigured",
            format!("The proxy is misconfigured and refused the request before it reached the service: {detail}"),
        ),
    }
}

/// Renders a rejection as a problem+json answer.
pub fn render(config: &Config, rejection: &Rejection) -> LocalAnswer {
    let (status, slug, title, detail) = describe(config, rejection);
    let doc = json!({
        "type": format!("{PROBLEM_BASE}{slug}"),
        "title": title,
        "status": status,
        "detail": detail,
    });
    let mut headers = vec![(
        "content-type".to_string(),
        "application/problem+json".to_string(),
    )];
    match rejection {
        Rejection::Conflict { retry_after_s }
        | Rejection::StoreUnavailable { retry_after_s, .. } => {
            headers.push(("retry-after".to_string(), retry_after_s.to_string()));
        }
        _ => {}
    }
    LocalAnswer {
        status,
        headers,
        body: serde_json::to_vec(&doc).unwrap_or_default(),
    }
}

/// The answer replaying a stored response: its status, stored headers and body byte for
/// byte, plus the replay header.
pub fn replay(config: &Config, stored: &StoredResponse) -> LocalAnswer {
    let mut headers: Vec<(String, String)> = stored
        .headers
        .iter()
        .filter_map(|(n, v)| {
            std::str::from_utf8(v)
                .ok()
                .map(|v| (n.clone(), v.to_string()))
        })
        .collect();
    headers.push((config.replay_header.clone(), "true".to_string()));
    LocalAnswer {
        status: stored.status,
        headers,
        body: stored.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyError;

    #[test]
    fn statuses_and_documents() {
        let c = Config::default();
        let cases = [
            (
                Rejection::MissingKey {
                    header: "idempotency-key".into(),
                },
                400,
            ),
            (
                Rejection::MalformedKey {
                    header: "idempotency-key".into(),
                    reason: KeyError::Empty,
                },
                400,
            ),
            (Rejection::BodyTooLarge { limit: 10 }, 413),
            (Rejection::Conflict { retry_after_s: 2 }, 409),
            (Rejection::Mismatch, 422),
            (
                Rejection::StoreUnavailable {
                    retry_after_s: 3,
                    reason: "full",
                },
                503,
            ),
        ];
        for (r, status) in cases {
            let a = render(&c, &r);
            assert_eq!(a.status, status);
            let doc: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
            assert_eq!(doc["status"], status);
            assert!(doc["type"].as_str().unwrap().starts_with(PROBLEM_BASE));
            assert!(doc["detail"].as_str().unwrap().len() > 20);
            assert_eq!(a.headers[0].1, "application/problem+json");
        }
        let a = render(&c, &Rejection::Conflict { retry_after_s: 2 });
        assert!(a.headers.contains(&("retry-after".into(), "2".into())));
    }

    #[test]
    fn replay_adds_header() {
        let c = Config::default();
        let s = StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body: b"hi".to_vec(),
        };
        let a = replay(&c, &s);
        assert_eq!(a.status, 201);
        assert_eq!(a.body, b"hi");
        assert!(a
            .headers
            .contains(&("idempotent-replayed".into(), "true".into())));
    }
}
