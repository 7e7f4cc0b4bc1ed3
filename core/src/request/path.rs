//! Request paths as idemgate sees them: normalized once, before route matching, key
//! scoping and fingerprinting, so that spellings an origin may treat as one resource are one
//! route to idemgate too.
//!
//! [`normalize`] (RFC 3986 §6.2.2, plus merged slashes) on the path before `?`:
//!
//! - percent-encoded *unreserved* characters are decoded (`%6F` → `o`, `%7E` → `~`), other
//!   percent-escapes get upper-case hex (`%2f` → `%2F`; an encoded `/` stays encoded);
//! - runs of `/` become one (`//orders` → `/orders`);
//! - dot segments are removed (`/a/./b/../c` → `/a/c`; `..` never climbs above `/`), also
//!   when spelled with escapes (`%2E%2E`).
//!
//! A malformed escape (`%`, `%zz`) is kept as it is. The query is not changed. The request
//! sent to the origin is not rewritten: only idemgate's view of it is normalized.
//!
//! Route prefixes match whole segments ([`prefix_matches`]): `/orders` covers `/orders` and
//! `/orders/42`, never `/orders-admin`.
//!
//! ```
//! use idemgate_core::request::path::{normalize, prefix_matches};
//! assert_eq!(normalize("/%6Frders"), "/orders");
//! assert_eq!(normalize("/orders/./"), "/orders/");
//! assert_eq!(normalize("//a/b/../c?x=%6F"), "/a/c?x=%6F");
//! assert!(prefix_matches("/orders", "/orders/42"));
//! assert!(!prefix_matches("/orders", "/orders-admin"));
//! ```
use std::borrow::Cow;

/// The path (before `?`) normalized as the module says, followed by the query unchanged.
/// Borrowed when already normal (the common case costs one scan).
pub fn normalize(path_with_query: &str) -> Cow<'_, str> {
    let (path, query) = match path_with_query.find('?') {
        Some(i) => path_with_query.split_at(i),
        None => (path_with_query, ""),
    };
    if is_normal(path) {
        return Cow::Borrowed(path_with_query);
    }
    let decoded = decode_unreserved(path);
    let mut out = remove_dot_segments(&decoded);
    out.push_str(query);
    Cow::Owned(out)
}

/// Whether `path` has nothing to normalize: no `%`, no `//`, no `.` or `..` segment.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    !b.contains(&b'%')
        && !b.windows(2).any(|w| w == b"//")
        && !path
            .split('/')
            .skip(1)
            .any(|segment| segment == "." || segment == "..")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Decodes `%XX` of unreserved characters and upper-cases the hex of the others.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex_value),
                b.get(i + 2).copied().and_then(hex_value),
            ) {
                let byte = h * 16 + l;
                if is_unreserved(byte) {
                    out.push(byte);
                } else {
                    out.push(b'%');
                    out.extend(
                        [b.get(i + 1), b.get(i + 2)]
                            .into_iter()
                            .flatten()
                            .map(u8::to_ascii_uppercase),
                    );
                }
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes: still valid UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// RFC 3986 §5.2.4 on the segments, with empty segments (runs of `/`) merged. A path that
/// does not start with `/` (`*`, an absolute URI) is returned as it is.
fn remove_dot_segments(path: &str) -> String {
    let Some(rest) = path.strip_prefix('/') else {
        return path.to_string();
    };
    let mut kept: Vec<&str> = Vec::new();
    // a trailing "/", "/." or "/.." leaves the result ending in "/"
    let mut trailing_slash = false;
    for segment in rest.split('/') {
        trailing_slash = false;
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                kept.pop();
                trailing_slash = true;
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    out
}

/// Whether a route `prefix` covers `path` (both normalized, `path` without query): equal,
/// or `path` continues with a new segment. A prefix ending in `/` covers what starts with it.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spellings_of_one_path_meet() {
        for (raw, want) in [
            ("/orders", "/orders"),
            ("/%6Frders", "/orders"),
            ("/%6frders", "/orders"),
            ("/orders/./", "/orders/"),
            ("/orders/.", "/orders/"),
            ("//orders", "/orders"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/../../a", "/a"),
            ("/a/%2E%2E/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb", "/a%2Fb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%7Euser", "/~user"),
            ("/bad%zz%", "/bad%zz%"),
            ("/bad%4", "/bad%4"),
            ("/", "/"),
            ("", ""),
            ("*", "*"),
            ("/a/..", "/"),
            ("/a/./b?x=/./%6F", "/a/b?x=/./%6F"),
            ("/.hidden/..x", "/.hidden/..x"),
        ] {
            assert_eq!(normalize(raw), want, "{raw}");
        }
        assert!(matches!(normalize("/orders/42?x=1"), Cow::Borrowed(_)));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/orders", "/orders"));
        assert!(prefix_matches("/orders", "/orders/42"));
        assert!(!prefix_matches("/orders", "/orders-admin"));
        assert!(!prefix_matches("/orders", "/order"));
        assert!(prefix_matches("/webhooks/", "/webhooks/email"));
        assert!(!prefix_matches("/webhooks/", "/webhooks"));
        assert!(prefix_matches("/", "/anything"));
    }

    proptest! {
        #[test]
        fn normalizing_is_idempotent_and_keeps_the_query(
            path in "(/|//|\\.|\\.\\.|%2[eEfF]|%6[fF]|%zz|a|b|~|%)*",
            query in "(\\?[a-z/.%]*)?",
        ) {
            let raw = format!("/{path}{query}");
            let once = normalize(&raw).into_owned();
            prop_assert_eq!(normalize(&once).into_owned(), once.clone());
            prop_assert!(once.starts_with('/'));
            prop_assert!(once.ends_with(&query));
            let p = once.strip_suffix(&query).unwrap_or(&once);
            prop_assert!(!p.contains("//"), "{}", p);
            prop_assert!(!p.split('/').any(|s| s == "." || s == ".."), "{}", p);
        }
    }
}
