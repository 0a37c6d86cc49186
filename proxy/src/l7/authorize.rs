//! The L7 decision: the ordered permissions of the intention that matched the caller, against
//! one request. First match wins; a request no permission matches is denied.
//!
//! [`CompiledPermissions`] is built once per intentions snapshot (regexes compiled, header names
//! parsed); [`CompiledPermissions::decide`] then allocates nothing per request.
//!
//! What each part matches (all of a permission's parts must match):
//! - `path_exact`: the whole normalized path ([`super::path`]), byte for byte (case-sensitive;
//!   `/admin/` is not `/admin`).
//! - `path_prefix`: a plain string prefix, as Envoy's `prefix` (`/stock/secret` also covers
//!   `/stock/secret/1` and `/stock/secretx`).
//! - `path_regex`: the whole path must match ([`ward_config::permission::path_regex`]).
//! - `methods`: the request method is one of them (case-sensitive, as methods are).
//! - `headers`: every header match holds. A header sent more than once is matched value by
//!   value, in the direction that fails closed: a deny matches if *any* value matches, an allow
//!   only if *every* value does, so whichever value the application reads, it passed the rule
//!   that let the request through (`x-env: prod` twice cannot skip a deny on `x-env = prod`).

use http::header::{HeaderMap, HeaderName};
use http::Method;
use ward_config::intentions::Action;
use ward_config::permission::{HeaderValue, PathMatch, Permission};

/// The permission that decided a request, or none (no permission matched: deny).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The index, in the intention's order, of the permission that matched.
    pub permission: Option<usize>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.action == Action::Allow
    }
}

/// A permission that cannot be compiled; the whole rule is then unenforceable (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permissions[{index}]: {problem}")]
pub struct CompileError {
    pub index: usize,
    pub problem: String,
}

/// The permissions of one intention, ready to decide requests.
#[derive(Debug, Clone)]
pub struct CompiledPermissions {
    rules: Vec<Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    action: Action,
    path: Option<Path>,
    methods: Vec<String>,
    headers: Vec<Header>,
}

#[derive(Debug, Clone)]
enum Path {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
struct Header {
    name: HeaderName,
    value: HeaderValue,
}

impl CompiledPermissions {
    /// Compiles the permissions in order; the first one that cannot be compiled is the error.
    pub fn compile(permissions: &[Permission]) -> Result<Self, CompileError> {
        let rules = permissions
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let err = |problem: String| CompileError { index, problem };
                let path = match &p.path {
                    None => None,
                    Some(PathMatch::Exact(s)) => Some(Path::Exact(s.clone())),
                    Some(PathMatch::Prefix(s)) => Some(Path::Prefix(s.clone())),
                    Some(PathMatch::Regex(s)) => Some(Path::Regex(
                        ward_config::permission::path_regex(s)
                            .map_err(|e| err(format!("path_regex: {e}")))?,
                    )),
                };
                let headers = p
                    .headers
                    .iter()
                    .map(|h| {
                        let name = HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|_| err(format!("header name {:?}", h.name)))?;
                        Ok(Header {
                            name,
                            value: h.value.clone(),
                        })
                    })
                    .collect::<Result<_, CompileError>>()?;
                Ok(Compiled {
                    action: p.action,
                    path,
                    methods: p.methods.clone(),
                    headers,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(CompiledPermissions { rules })
    }

    /// How many permissions there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides one request; `path` is the normalized path ([`super::path::normalize`]).
    pub fn decide(&self, method: &Method, path: &str, headers: &HeaderMap) -> Decision {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(method, path, headers) {
                return Decision {
                    action: rule.action,
                    permission: Some(i),
                };
            }
        }
        Decision {
            action: Action::Deny,
            permission: None,
        }
    }
}

impl Compiled {
    fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(Path::Exact(p)) => path == p,
            Some(Path::Prefix(p)) => path.starts_with(p.as_str()),
            Some(Path::Regex(r)) => r.is_match(path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == method.as_str()))
            && self
                .headers
                .iter()
                .all(|h| header_matches(h, self.action, headers))
    }
}

fn header_matches(h: &Header, action: Action, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&h.name).iter().peekable();
    if values.peek().is_none() {
        return false;
    }
    let one = |v: &http::HeaderValue| match &h.value {
        HeaderValue::Present => true,
        HeaderValue::Exact(s) => v.as_bytes() == s.as_bytes(),
        HeaderValue::Prefix(s) => v.as_bytes().starts_with(s.as_bytes()),
    };
    match action {
        Action::Deny => values.any(one),
        Action::Allow => values.all(one),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::path::normalize;
    use ward_config::permission::{parse_permissions, RawRule};

    fn compile(toml: &str) -> CompiledPermissions {
        let rule = RawRule::from_toml(toml).unwrap();
        CompiledPermissions::compile(&rule.permissions().unwrap()).unwrap()
    }

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in list {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    /// (method, target as received, headers) -> the index that decided and the action.
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        Option<usize>,
        Action,
    );

    fn check(rules: &CompiledPermissions, cases: &[Case]) {
        for (method, target, hs, index, action) in cases {
            let path = normalize(target).unwrap();
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let d = rules.decide(&method, path.path(), &headers(hs));
            assert_eq!(
                (d.permission, d.action),
                (*index, *action),
                "{method} {target} {hs:?}"
            );
        }
    }

    use Action::{Allow, Deny};

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let rules = compile(
            r#"permissions = [
  { action = "deny", path_prefix = "/stock/secret" },
  { action = "allow", path_prefix = "/stock/", methods = ["GET", "HEAD"] },
  { action = "deny", path_exact = "/admin" },
  { action = "allow", path_exact = "/admin/" },
  { action = "allow", path_regex = "/api/v[0-9]+/items" },
]"#,
        );
        check(
            &rules,
            &[
                ("GET", "/stock/1", &[], Some(1), Allow),
                ("HEAD", "/stock/1?x=1", &[], Some(1), Allow),
                ("POST", "/stock/1", &[], None, Deny),
                ("get", "/stock/1", &[], None, Deny),
                // The deny on /stock/secret is found however the path is written.
                ("GET", "/stock/secret/1", &[], Some(0), Deny),
                ("GET", "/stock//secret/1", &[], Some(0), Deny),
                ("GET", "/stock/./secret/1", &[], Some(0), Deny),
                ("GET", "/stock/x/../secret/1", &[], Some(0), Deny),
                ("GET", "/stock/%73ecret/1", &[], Some(0), Deny),
                ("GET", "/stock/secretx", &[], Some(0), Deny),
                // /admin reached through the classic shapes is still /admin.
                ("GET", "/admin", &[], Some(2), Deny),
                ("GET", "/stock/../admin", &[], Some(2), Deny),
                ("GET", "/stock/%2e%2e/admin", &[], Some(2), Deny),
                ("GET", "/%61dmin", &[], Some(2), Deny),
                ("GET", "//admin", &[], Some(2), Deny),
                ("GET", "/./admin", &[], Some(2), Deny),
                // path_exact is the whole path: /admin/ is another path, and so is /ADMIN.
                ("GET", "/admin/", &[], Some(3), Allow),
                ("GET", "/ADMIN", &[], None, Deny),
                // path_regex matches the whole path, not a part of it.
                ("PUT", "/api/v2/items", &[], Some(4), Allow),
                ("PUT", "/x/api/v2/items", &[], None, Deny),
                ("PUT", "/api/v2/items/1", &[], None, Deny),
                ("GET", "/", &[], None, Deny),
            ],
        );
        let e = normalize("/stock%2F..%2Fadmin").unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn header_matches() {
        let rules = compile(
            r#"permissions = [
  { action = "deny", headers = [{ name = "x-env", exact = "prod" }] },
  { action = "allow", path_prefix = "/a", headers = [{ name = "x-team", prefix = "ops-" }, { name = "x-debug", present = true }] },
  { action = "allow", path_prefix = "/b", headers = [{ name = "x-team", exact = "ops" }] },
]"#,
        );
        check(
            &rules,
            &[
                ("GET", "/x", &[("x-env", "prod")], Some(0), Deny),
                ("GET", "/x", &[("X-Env", "prod")], Some(0), Deny),
                ("GET", "/x", &[("x-env", "Prod")], None, Deny),
                ("GET", "/x", &[("x-env", "prod2")], None, Deny),
                // Sent twice: a deny matches if any value does.
                (
                    "GET",
                    "/a",
                    &[("x-env", "dev"), ("x-env", "prod")],
                    Some(0),
                    Deny,
                ),
                (
                    "GET",
                    "/a",
                    &[("x-team", "ops-1"), ("x-debug", "")],
                    Some(1),
                    Allow,
                ),
                ("GET", "/a", &[("x-team", "ops-1")], None, Deny),
                (
                    "GET",
                    "/a",
                    &[("x-team", "dev"), ("x-debug", "1")],
                    None,
                    Deny,
                ),
                // An allow only if every value does.
                (
                    "GET",
                    "/a",
                    &[("x-team", "ops-1"), ("x-team", "dev"), ("x-debug", "1")],
                    None,
                    Deny,
                ),
                (
                    "GET",
                    "/b",
                    &[("x-team", "ops"), ("x-team", "ops")],
                    Some(2),
                    Allow,
                ),
                (
                    "GET",
                    "/b",
                    &[("x-team", "ops"), ("x-team", "dev")],
                    None,
                    Deny,
                ),
                ("GET", "/b", &[], None, Deny),
            ],
        );
    }

    #[test]
    fn a_permission_without_parts_matches_everything() {
        let rules = compile(r#"permissions = [{ action = "allow" }]"#);
        check(
            &rules,
            &[
                ("DELETE", "/anything", &[], Some(0), Allow),
                ("GET", "/", &[], Some(0), Allow),
            ],
        );
        assert_eq!(rules.len(), 1);
    }

    #[test]
    fn regexes_match_the_whole_path() {
        let raw = |re: &str| ward_config::permission::RawPermission {
            action: Some("allow".into()),
            path_regex: Some(re.into()),
            ..Default::default()
        };
        let ok = parse_permissions(&[raw("(?i)/admin(/.*)?"), raw("/a|/b")]).unwrap();
        let rules = CompiledPermissions::compile(&ok).unwrap();
        check(
            &rules,
            &[
                ("GET", "/ADMIN/x", &[], Some(0), Allow),
                ("GET", "/a", &[], Some(1), Allow),
                ("GET", "/b", &[], Some(1), Allow),
                // `^(?:/a|/b)$`, not `^/a|/b$`.
                ("GET", "/ab", &[], None, Deny),
                ("GET", "/x/b", &[], None, Deny),
            ],
        );
    }
}
