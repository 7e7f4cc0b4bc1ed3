//! Capturing the origin's response while it streams to the client.
//!
//! ```
//! use idemgate_core::{Config, ResponseCapture};
//! let config = Config::default();
//! let rule = &config.default_rule;
//! let headers = vec![("content-type".to_string(), b"text/plain".to_vec()), ("set-cookie".to_string(), b"s=1".to_vec())];
//! let mut cap = ResponseCapture::new(rule, 201, &headers);
//! cap.push(b"he");
//! cap.push(b"llo");
//! let stored = cap.finish().unwrap();
//! assert_eq!(stored.body, b"hello");
//! assert_eq!(stored.headers.len(), 1); // set-cookie is never stored
//! ```
use std::fmt;

use crate::config::Rule;
use crate::record::StoredResponse;

/// Why a response was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// Its status is not among the stored ones.
    Status(u16),
    /// Its body exceeded `maxResponseBytes`.
    TooLarge,
}

impl NotStored {
    /// Short reason, used as a metric tag and in logs.
    pub fn reason(&self) -> &'static str {
        match self {
            NotStored::Status(_) => "status",
            NotStored::TooLarge => "too_large",
        }
    }

    /// The counter it increments (`not_stored_<reason>`).
    pub fn counter(&self) -> &'static str {
        match self {
            NotStored::Status(_) => "not_stored_status",
            NotStored::TooLarge => "not_stored_too_large",
        }
    }
}

impl fmt::Display for NotStored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotStored::Status(s) => write!(f, "status {s} is not stored"),
            NotStored::TooLarge => write!(f, "response body exceeds maxResponseBytes"),
        }
    }
}

/// Accumulates status, allowed headers and body chunks.
#[derive(Debug)]
pub struct ResponseCapture {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    limit: u64,
    storable: bool,
    too_large: bool,
}

impl ResponseCapture {
    /// Starts capturing a response with `status` and `headers` (allowed ones are kept).
    pub fn new(rule: &Rule, status: u16, headers: &[(String, Vec<u8>)]) -> Self {
        let storable = rule.stores_status(status);
        let kept = if storable {
            headers
                .iter()
                .filter(|(n, v)| rule.stores_header(n) && std::str::from_utf8(v).is_ok())
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            status,
            headers: kept,
            body: Vec::new(),
            limit: rule.max_response_bytes,
            storable,
            too_large: false,
        }
    }

    /// Whether chunks are still worth copying.
    pub fn wants_body(&self) -> bool {
        self.storable && !self.too_large
    }

    /// Adds a body chunk; stops copying once over the limit.
    pub fn push(&mut self, chunk: &[u8]) {
        if !self.wants_body() {
            return;
        }
        if (self.body.len() as u64).saturating_add(chunk.len() as u64) > self.limit {
            self.too_large = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    /// The status seen.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The response to store, or why not.
    pub fn finish(self) -> Result<StoredResponse, NotStored> {
        if !self.storable {
            return Err(NotStored::Status(self.status));
        }
        if self.too_large {
            return Err(NotStored::TooLarge);
        }
        Ok(StoredResponse {
            status: self.status,
            headers: self.headers,
            body: self.body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn limits_and_statuses() {
        let c = Config::from_json(r#"{"maxResponseBytes": 4}"#).unwrap();
        let c = &c.default_rule;
        let mut cap = ResponseCapture::new(c, 200, &[]);
        cap.push(b"abc");
        cap.push(b"de");
        assert_eq!(cap.finish(), Err(NotStored::TooLarge));
        let cap = ResponseCapture::new(c, 500, &[]);
        assert!(!cap.wants_body());
        assert_eq!(cap.finish(), Err(NotStored::Status(500)));
        let mut cap = ResponseCapture::new(
            c,
            200,
            &[
                ("Connection".into(), b"close".to_vec()),
                ("ETag".into(), b"\"x\"".to_vec()),
            ],
        );
        cap.push(b"abcd");
        let s = cap.finish().unwrap();
        assert_eq!(s.headers, vec![("etag".to_string(), b"\"x\"".to_vec())]);
        assert_eq!(s.body, b"abcd");
    }
}
