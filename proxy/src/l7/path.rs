//! The request path as L7 permissions match it, and as it is forwarded.
//!
//! A permission is only as good as the agreement between the path it matched and the path the
//! application serves. So the inbound normalizes the origin-form target once, matches the
//! result, and forwards exactly that result: an application that would have resolved
//! `/stock/../admin` to `/admin` receives `/admin`, the path that was matched.
//!
//! The steps, in this order:
//! 1. Split off the query at the first `?`; it is forwarded as is and never matched.
//! 2. Refuse a fragment (`#` anywhere), a path that does not start with `/` (such as `*` or an
//!    absolute-form left over), a path longer than [`MAX_PATH_BYTES`], and a byte RFC 3986
//!    does not allow in a path (controls, space, `\`, `"`, `<`, `>`, `[`, `]`, `{`, `}`, `|`,
//!    `^`, `` ` ``, non-ASCII: a client encodes them).
//! 3. Percent-decode the unreserved characters only (`ALPHA DIGIT - . _ ~`), keep every other
//!    escape with its hex in upper case, and refuse `%2F` and `%5C`: an application that decodes
//!    them would see a separator the matcher did not see (`/stock%2F..%2Fadmin`).
//! 4. Remove the dot segments (RFC 3986 5.2.4) and merge consecutive slashes (Envoy's
//!    `merge_slashes`), in one pass over the segments.
//!
//! Decoding comes before dot removal, as in RFC 3986 6.2.2: `%2e` *is* `.` to every reader of
//! the URI, so `/stock/%2e%2e/admin` must lose its `..` like `/stock/../admin` does; removing
//! dots first would match it under `/stock/` while the application serves `/admin`. Slashes are
//! merged as the segments are walked, so `/a//../b` becomes `/b` (nginx's order; Envoy, which
//! removes dots first, gives `/a/b`); either order is safe here since the path matched is the
//! path forwarded. Decoding is a single pass (`%252e` stays `%252E`), and the result is a fixed
//! point: normalizing it again changes nothing.
//!
//! Matching is case-sensitive, as in Envoy and Istio by default: `/ADMIN` is not `/admin`, so a
//! deny meant for every spelling must be a `path_regex` such as `(?i)/admin(/.*)?`.

use std::borrow::Cow;
use ward_config::permission::MAX_PATH_BYTES;

/// Why a request target cannot be matched; the inbound answers [`Rejection::status`] and
/// forwards nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the request target is not an origin-form path starting with '/'")]
    NotOriginForm,
    #[error("the request target has a fragment ('#')")]
    Fragment,
    #[error("the path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("the path has a character that must be percent-encoded")]
    BadCharacter,
    #[error("the path has a '%' that is not followed by two hex digits")]
    BadEscape,
    #[error("the path has an encoded '/' or '\\' (%2F or %5C)")]
    EncodedSeparator,
}

impl Rejection {
    /// 414 for a path over the limit, 400 for the rest.
    pub fn status(self) -> http::StatusCode {
        match self {
            Rejection::TooLong => http::StatusCode::URI_TOO_LONG,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// A normalized request target: [`path`](Self::path) is both matched and forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized<'a> {
    path: Cow<'a, str>,
    query: Option<&'a str>,
}

impl<'a> Normalized<'a> {
    /// The normalized path, without the query.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The query as received (without the `?`), if the target had one.
    pub fn query(&self) -> Option<&'a str> {
        self.query
    }

    /// Whether the path needed no change (the target can be forwarded as received).
    pub fn is_unchanged(&self) -> bool {
        matches!(self.path, Cow::Borrowed(_))
    }

    /// The target to forward: the normalized path and the query as received.
    pub fn target(&self) -> Cow<'_, str> {
        match self.query {
            None => Cow::Borrowed(&self.path),
            Some(q) => Cow::Owned(format!("{}?{q}", self.path)),
        }
    }
}

/// Normalizes an origin-form request target (`/path?query`); see the module documentation.
pub fn normalize(target: &str) -> Result<Normalized<'_>, Rejection> {
    if target.contains('#') {
        return Err(Rejection::Fragment);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(Rejection::NotOriginForm);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(Rejection::TooLong);
    }
    if path.bytes().any(|b| b != b'%' && b != b'/' && !is_pchar(b)) {
        return Err(Rejection::BadCharacter);
    }
    let decoded = decode_unreserved(path)?;
    let path = match decoded {
        Cow::Borrowed(p) if !needs_segments(p) => Cow::Borrowed(p),
        other => Cow::Owned(remove_dots_merge_slashes(&other)),
    };
    Ok(Normalized { path, query })
}

/// RFC 3986 `unreserved`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` without `pct-encoded`: unreserved, sub-delims, `:` and `@`.
fn is_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes the escapes of unreserved characters and upper-cases the hex of the others;
/// borrows when there was nothing to change.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, Rejection> {
    let bytes = path.as_bytes();
    let Some(first) = bytes.iter().position(|&b| b == b'%') else {
        return Ok(Cow::Borrowed(path));
    };
    let mut out = String::with_capacity(path.len());
    out.push_str(&path[..first]);
    let mut changed = false;
    let mut i = first;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(&h), Some(&l)) => (h, l),
            _ => return Err(Rejection::BadEscape),
        };
        let value = match (hex(hi), hex(lo)) {
            (Some(h), Some(l)) => h * 16 + l,
            _ => return Err(Rejection::BadEscape),
        };
        if value == b'/' || value == b'\\' {
            return Err(Rejection::EncodedSeparator);
        }
        if is_unreserved(value) {
            out.push(char::from(value));
            changed = true;
        } else {
            out.push('%');
            out.push(char::from(hi.to_ascii_uppercase()));
            out.push(char::from(lo.to_ascii_uppercase()));
            changed |= hi.is_ascii_lowercase() || lo.is_ascii_lowercase();
        }
        i += 3;
    }
    Ok(if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(path)
    })
}

/// Whether the path has an empty, `.` or `..` segment (other than the empty one after a
/// trailing slash), which [`remove_dots_merge_slashes`] would change.
fn needs_segments(path: &str) -> bool {
    let mut segments = path[1..].split('/').peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        if s == "." || s == ".." || (s.is_empty() && !last) {
            return true;
        }
    }
    false
}

/// RFC 3986 5.2.4 for an absolute path, with empty segments dropped: `.` goes, `..` takes the
/// segment before it (never above the root), and the path ends with `/` when its last segment
/// was empty, `.` or `..` (`/a/b/..` is `/a/`).
fn remove_dots_merge_slashes(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for s in path[1..].split('/') {
        trailing = true;
        match s {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => {
                kept.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing || kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(target: &str) -> Result<String, Rejection> {
        normalize(target).map(|n| n.target().into_owned())
    }

    /// The classic ways of reaching `/admin` past a rule written for another path.
    #[test]
    fn bypass_shapes_normalize_to_the_path_served() {
        let cases: &[(&str, Result<&str, Rejection>)] = &[
            ("/stock/../admin", Ok("/admin")),
            ("/%61dmin", Ok("/admin")),
            ("/%61%64%6D%69%6e", Ok("/admin")),
            ("//admin", Ok("/admin")),
            ("/./admin", Ok("/admin")),
            ("/stock/%2e%2e/admin", Ok("/admin")),
            ("/stock/%2E./admin", Ok("/admin")),
            ("/stock/.%2e/admin", Ok("/admin")),
            ("/stock//secret/1", Ok("/stock/secret/1")),
            ("/stock/./secret/../secret/1", Ok("/stock/secret/1")),
            ("/../../admin", Ok("/admin")),
            ("/..", Ok("/")),
            ("/admin/", Ok("/admin/")),
            ("/admin/.", Ok("/admin/")),
            ("/a/b/..", Ok("/a/")),
            ("/a//../b", Ok("/b")),
            ("///", Ok("/")),
            ("/", Ok("/")),
            // Case is kept: /ADMIN is another path (matching is case-sensitive).
            ("/ADMIN", Ok("/ADMIN")),
            ("/stock%2F..%2Fadmin", Err(Rejection::EncodedSeparator)),
            ("/stock%2f..%2fadmin", Err(Rejection::EncodedSeparator)),
            ("/stock%5C..%5Cadmin", Err(Rejection::EncodedSeparator)),
            ("/stock%5c..", Err(Rejection::EncodedSeparator)),
            ("/stock\\..\\admin", Err(Rejection::BadCharacter)),
            ("/admin#x", Err(Rejection::Fragment)),
            ("/a?b#c", Err(Rejection::Fragment)),
            ("admin", Err(Rejection::NotOriginForm)),
            ("*", Err(Rejection::NotOriginForm)),
            ("", Err(Rejection::NotOriginForm)),
            ("?a=1", Err(Rejection::NotOriginForm)),
            ("http://x/admin", Err(Rejection::NotOriginForm)),
            ("/a%", Err(Rejection::BadEscape)),
            ("/a%4", Err(Rejection::BadEscape)),
            ("/a%zz", Err(Rejection::BadEscape)),
            ("/a b", Err(Rejection::BadCharacter)),
            ("/a\tb", Err(Rejection::BadCharacter)),
            ("/caf\u{e9}", Err(Rejection::BadCharacter)),
            ("/a\"b", Err(Rejection::BadCharacter)),
        ];
        for (target, want) in cases {
            let got = norm(target);
            assert_eq!(got.as_deref(), want.as_deref(), "{target:?}");
        }
    }

    #[test]
    fn other_escapes_are_kept_with_upper_case_hex() {
        assert_eq!(norm("/a%3fb").unwrap(), "/a%3Fb");
        assert_eq!(norm("/a%20b%C3%a9").unwrap(), "/a%20b%C3%A9");
        // One decoding pass: %25 is '%', kept encoded, so %252e never becomes '.'.
        assert_eq!(norm("/a/%252e%252e/b").unwrap(), "/a/%252e%252e/b");
        assert_eq!(norm("/%7e%2D%5f%2E").unwrap(), "/~-_.");
        assert!(normalize("/a%3Fb").unwrap().is_unchanged());
    }

    #[test]
    fn the_query_is_kept_apart_and_forwarded_as_is() {
        let n = normalize("/stock/../admin?x=/../%2F&y=%61").unwrap();
        assert_eq!(n.path(), "/admin");
        assert_eq!(n.query(), Some("x=/../%2F&y=%61"));
        assert_eq!(n.target(), "/admin?x=/../%2F&y=%61");
        let n = normalize("/a?").unwrap();
        assert_eq!((n.path(), n.query()), ("/a", Some("")));
        assert_eq!(n.target(), "/a?");
        let n = normalize("/stock/1").unwrap();
        assert!(n.is_unchanged());
        assert_eq!((n.path(), n.query()), ("/stock/1", None));
    }

    #[test]
    fn long_paths_are_bounded() {
        let at_limit = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert_eq!(norm(&at_limit).unwrap(), at_limit);
        let over = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(norm(&over), Err(Rejection::TooLong));
        // The limit is on the path as received; the query does not count.
        let q = format!("/a?{}", "q".repeat(4 * MAX_PATH_BYTES));
        assert!(normalize(&q).is_ok());
        assert_eq!(Rejection::TooLong.status(), http::StatusCode::URI_TOO_LONG);
        assert_eq!(Rejection::Fragment.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        let samples = [
            "/stock/../admin",
            "/a//../b",
            "/a/%252e%252e/b",
            "/%2e%2e/%2e/x/",
            "/a/./b/../../c//d/.",
            "/a%3f/%7E/..",
            "/x/%2e",
        ];
        for s in samples {
            let once = normalize(s).unwrap().path().to_owned();
            let twice = normalize(&once).unwrap();
            assert_eq!(twice.path(), once, "{s:?}");
            assert!(twice.is_unchanged(), "{s:?} -> {once:?}");
        }
    }
}
