//! L7 permissions: the ordered rules of an intention for an http destination.
//!
//! One validated [`Permission`] for every reader: `ward intention create --file` reads the TOML
//! form through the `Raw*` structs, and the server checks what reaches it over gRPC with the
//! same [`RawPermission::parse`], so the two cannot accept different rules. The limits below
//! are the only place they are written.
//!
//! ```toml
//! permissions = [
//!   { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
//!   { action = "deny", path_exact = "/admin", headers = [{ name = "x-env", exact = "prod" }] },
//! ]
//! ```

use crate::intentions::Action;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Most permissions one intention holds.
pub const MAX_PERMISSIONS: usize = 256;
/// Longest path or path regex, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest method name, in bytes.
pub const MAX_METHOD_BYTES: usize = 32;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// Largest compiled `path_regex`, in bytes (the regex crate's `size_limit`): 256 of them stay
/// within a few hundred MiB even at the limit, and a pattern such as `\w{1000}` is refused.
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// Compiles a `path_regex` as it is matched: against the whole path, in linear time (the regex
/// crate has no backtracking). The pattern is first compiled alone, so wrapping it in
/// `^(?:...)$` cannot change what it means (`/a)|(/b` is refused, not read as two patterns).
pub fn path_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let build = |p: &str| {
        regex::RegexBuilder::new(p)
            .size_limit(MAX_REGEX_BYTES)
            .build()
    };
    build(pattern)?;
    build(&format!("^(?:{pattern})$"))
}

/// One checked permission: what to do with a request that matches all of its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub action: Action,
    /// None matches every path.
    pub path: Option<PathMatch>,
    /// Upper-case methods; empty matches every method.
    pub methods: Vec<String>,
    /// Every one must match.
    pub headers: Vec<HeaderMatch>,
}

/// How a permission matches the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// A lower-case header name and how its value must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: HeaderValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Exact(String),
    Prefix(String),
    /// The header is sent, with any value.
    Present,
}

/// A permission as written (the TOML form, or the fields of the gRPC message).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPermission {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<RawHeaderMatch>,
}

/// A header match as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// The TOML form of an L7 rule, as `ward intention create --file` reads it: the ordered
/// `permissions` and optionally `source`. `action` is read only to be refused: a rule has either
/// an action (L4) or permissions (L7).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub source: Option<String>,
    pub action: Option<toml::Value>,
    pub permissions: Option<Vec<RawPermission>>,
}

impl RawRule {
    /// Parses the text of such a file; a syntax or type error names the key at fault.
    pub fn from_toml(text: &str) -> Result<Self, PermissionError> {
        crate::error::deserialize_toml(text)
            .map_err(|crate::error::TomlError { key, message }| at(key, Problem::Toml(message)))
    }

    /// The checked permissions of this rule.
    pub fn permissions(&self) -> Result<Vec<Permission>, PermissionError> {
        if self.action.is_some() {
            return Err(at("action", Problem::ActionInL7Rule));
        }
        let list = self
            .permissions
            .as_deref()
            .ok_or_else(|| at("permissions", Problem::NoPermissions))?;
        parse_permissions(list)
    }
}

/// A refused permission: the key at fault (`permissions[0].path_prefix`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PermissionError {
    pub key: String,
    pub problem: Problem,
}

impl fmt::Display for PermissionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "key `{}`: {}", self.key, self.problem)
        }
    }
}

/// What is wrong with a permission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// Not TOML, a value of the wrong type, or an unknown key (serde's one-line message).
    #[error("{0}")]
    Toml(String),
    #[error(
        "a file holds an L7 rule (permissions); for an L4 rule use --action instead of --file"
    )]
    ActionInL7Rule,
    #[error("is missing; an L7 rule needs a list of permissions")]
    NoPermissions,
    #[error("{written:?} does not match --source {given:?}")]
    OtherSource { written: String, given: String },
    #[error("must hold at least one permission")]
    Empty,
    #[error("holds more than {MAX_PERMISSIONS} permissions")]
    TooMany,
    #[error("is missing: allow or deny")]
    NoAction,
    #[error("{0:?} must be allow or deny")]
    BadAction(String),
    #[error("a permission has at most one path matcher, and `{0}` is already set")]
    TwoPaths(&'static str),
    #[error("{0:?} must start with '/'")]
    NotAbsolute(String),
    #[error("is not a regex this build can compile: {0}")]
    BadRegex(String),
    #[error("must be 1 to {MAX_PATH_BYTES} bytes")]
    PathLength,
    #[error("{0:?} must be an upper-case HTTP method such as \"GET\"")]
    BadMethod(String),
    #[error("is missing")]
    NoHeaderName,
    #[error("{0:?} must be a lower-case header name")]
    BadHeaderName(String),
    #[error("a header match has exactly one of exact, prefix, present")]
    TwoHeaderValues,
    #[error("needs one of exact, prefix, present")]
    NoHeaderValue,
    #[error("only `present = true` is supported; leave the header out to not require it")]
    PresentFalse,
}

/// The regex crate's message in one line: its syntax errors draw the pattern over several
/// lines and end with `error: <what>`.
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or("syntax error")
            .to_owned(),
        regex::Error::CompiledTooBig(_) => {
            format!("compiles to more than {MAX_REGEX_BYTES} bytes")
        }
        _ => "cannot be compiled".to_owned(),
    }
}

fn at(key: impl Into<String>, problem: Problem) -> PermissionError {
    PermissionError {
        key: key.into(),
        problem,
    }
}

/// Checks the ordered permissions of an L7 rule, written under the key `permissions`.
pub fn parse_permissions(raw: &[RawPermission]) -> Result<Vec<Permission>, PermissionError> {
    if raw.is_empty() {
        return Err(at("permissions", Problem::Empty));
    }
    if raw.len() > MAX_PERMISSIONS {
        return Err(at("permissions", Problem::TooMany));
    }
    raw.iter()
        .enumerate()
        .map(|(n, p)| p.parse(&format!("permissions[{n}]")))
        .collect()
}

impl RawPermission {
    /// Checks one permission; `key` names it in an error (`permissions[0]`).
    pub fn parse(&self, key: &str) -> Result<Permission, PermissionError> {
        let field = |f: &str| format!("{key}.{f}");
        let action = match self.action.as_deref() {
            None => return Err(at(field("action"), Problem::NoAction)),
            Some(s) => Action::parse(s)
                .ok_or_else(|| at(field("action"), Problem::BadAction(s.to_owned())))?,
        };
        let mut path: Option<(&'static str, PathMatch)> = None;
        let written = [
            ("path_exact", &self.path_exact),
            ("path_prefix", &self.path_prefix),
            ("path_regex", &self.path_regex),
        ];
        for (name, value) in written {
            let Some(s) = value else { continue };
            if let Some((first, _)) = &path {
                return Err(at(field(name), Problem::TwoPaths(first)));
            }
            if name != "path_regex" && !s.starts_with('/') {
                return Err(at(field(name), Problem::NotAbsolute(s.clone())));
            }
            if s.is_empty() || s.len() > MAX_PATH_BYTES {
                return Err(at(field(name), Problem::PathLength));
            }
            let m = match name {
                "path_exact" => PathMatch::Exact(s.clone()),
                "path_prefix" => PathMatch::Prefix(s.clone()),
                _ => {
                    path_regex(s)
                        .map_err(|e| at(field(name), Problem::BadRegex(regex_error(&e))))?;
                    PathMatch::Regex(s.clone())
                }
            };
            path = Some((name, m));
        }
        for (i, m) in self.methods.iter().enumerate() {
            let ok = !m.is_empty()
                && m.len() <= MAX_METHOD_BYTES
                && m.bytes().all(|c| c.is_ascii_uppercase());
            if !ok {
                return Err(at(
                    format!("{key}.methods[{i}]"),
                    Problem::BadMethod(m.clone()),
                ));
            }
        }
        let headers = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| h.parse(&format!("{key}.headers[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Permission {
            action,
            path: path.map(|(_, m)| m),
            methods: self.methods.clone(),
            headers,
        })
    }
}

impl RawHeaderMatch {
    /// Checks one header match; `key` names it in an error (`permissions[0].headers[1]`).
    pub fn parse(&self, key: &str) -> Result<HeaderMatch, PermissionError> {
        let field = |f: &str| format!("{key}.{f}");
        let name = self
            .name
            .as_deref()
            .ok_or_else(|| at(field("name"), Problem::NoHeaderName))?;
        let ok = !name.is_empty()
            && name.len() <= MAX_HEADER_NAME_BYTES
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_');
        if !ok {
            return Err(at(field("name"), Problem::BadHeaderName(name.to_owned())));
        }
        let mut value = None;
        let written = [
            ("exact", self.exact.clone().map(HeaderValue::Exact)),
            ("prefix", self.prefix.clone().map(HeaderValue::Prefix)),
            ("present", self.present.map(|_| HeaderValue::Present)),
        ];
        for (k, v) in written {
            let Some(v) = v else { continue };
            if value.is_some() {
                return Err(at(field(k), Problem::TwoHeaderValues));
            }
            // What `present = false` should mean is not defined; refuse it rather than guess.
            if self.present == Some(false) && k == "present" {
                return Err(at(field(k), Problem::PresentFalse));
            }
            value = Some(v);
        }
        let value = value.ok_or_else(|| at(key, Problem::NoHeaderValue))?;
        Ok(HeaderMatch {
            name: name.to_owned(),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> RawPermission {
        RawPermission {
            action: Some("allow".into()),
            ..RawPermission::default()
        }
    }

    fn header(name: &str) -> RawHeaderMatch {
        RawHeaderMatch {
            name: Some(name.into()),
            ..RawHeaderMatch::default()
        }
    }

    fn refused(p: RawPermission) -> PermissionError {
        p.parse("permissions[0]").unwrap_err()
    }

    #[test]
    fn a_full_permission_parses_and_round_trips() {
        let raw = RawPermission {
            action: Some("deny".into()),
            path_prefix: Some("/stock/".into()),
            methods: vec!["GET".into(), "HEAD".into()],
            headers: vec![
                RawHeaderMatch {
                    exact: Some("prod".into()),
                    ..header("x-env")
                },
                RawHeaderMatch {
                    present: Some(true),
                    ..header("x-a")
                },
            ],
            ..RawPermission::default()
        };
        let p = raw.parse("permissions[0]").unwrap();
        assert_eq!(p.action, Action::Deny);
        assert_eq!(p.path, Some(PathMatch::Prefix("/stock/".into())));
        assert_eq!(p.headers[1].value, HeaderValue::Present);
        assert_eq!(p.methods, ["GET", "HEAD"]);
        assert_eq!(p.headers[0].value, HeaderValue::Exact("prod".into()));
        assert_eq!(parse_permissions(&[raw]).unwrap(), vec![p]);
    }

    /// Each refusal names the key at fault and says what is wrong in one sentence.
    #[test]
    fn each_refusal_names_the_field() {
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        let cases: Vec<(RawPermission, &str, Problem)> = vec![
            (
                RawPermission::default(),
                "permissions[0].action",
                Problem::NoAction,
            ),
            (
                RawPermission {
                    action: Some("maybe".into()),
                    ..RawPermission::default()
                },
                "permissions[0].action",
                Problem::BadAction("maybe".into()),
            ),
            (
                RawPermission {
                    path_exact: Some("/a".into()),
                    path_prefix: Some("/b".into()),
                    ..allow()
                },
                "permissions[0].path_prefix",
                Problem::TwoPaths("path_exact"),
            ),
            (
                RawPermission {
                    path_exact: Some("a".into()),
                    ..allow()
                },
                "permissions[0].path_exact",
                Problem::NotAbsolute("a".into()),
            ),
            (
                RawPermission {
                    path_prefix: Some(long.clone()),
                    ..allow()
                },
                "permissions[0].path_prefix",
                Problem::PathLength,
            ),
            (
                RawPermission {
                    path_regex: Some(String::new()),
                    ..allow()
                },
                "permissions[0].path_regex",
                Problem::PathLength,
            ),
            (
                RawPermission {
                    path_regex: Some(long),
                    ..allow()
                },
                "permissions[0].path_regex",
                Problem::PathLength,
            ),
            (
                RawPermission {
                    path_regex: Some("/a)|(/b".into()),
                    ..allow()
                },
                "permissions[0].path_regex",
                Problem::BadRegex("unopened group".into()),
            ),
            (
                RawPermission {
                    path_regex: Some("\\w{1000}".into()),
                    ..allow()
                },
                "permissions[0].path_regex",
                Problem::BadRegex(format!("compiles to more than {MAX_REGEX_BYTES} bytes")),
            ),
            (
                RawPermission {
                    methods: vec!["GET".into(), "get".into()],
                    ..allow()
                },
                "permissions[0].methods[1]",
                Problem::BadMethod("get".into()),
            ),
            (
                RawPermission {
                    methods: vec!["A".repeat(MAX_METHOD_BYTES + 1)],
                    ..allow()
                },
                "permissions[0].methods[0]",
                Problem::BadMethod("A".repeat(MAX_METHOD_BYTES + 1)),
            ),
            (
                RawPermission {
                    headers: vec![RawHeaderMatch {
                        exact: Some("v".into()),
                        ..RawHeaderMatch::default()
                    }],
                    ..allow()
                },
                "permissions[0].headers[0].name",
                Problem::NoHeaderName,
            ),
            (
                RawPermission {
                    headers: vec![RawHeaderMatch {
                        present: Some(true),
                        ..header("X-Env")
                    }],
                    ..allow()
                },
                "permissions[0].headers[0].name",
                Problem::BadHeaderName("X-Env".into()),
            ),
            (
                RawPermission {
                    headers: vec![header("x-env")],
                    ..allow()
                },
                "permissions[0].headers[0]",
                Problem::NoHeaderValue,
            ),
            (
                RawPermission {
                    headers: vec![RawHeaderMatch {
                        exact: Some("a".into()),
                        prefix: Some("b".into()),
                        ..header("x-env")
                    }],
                    ..allow()
                },
                "permissions[0].headers[0].prefix",
                Problem::TwoHeaderValues,
            ),
            (
                RawPermission {
                    headers: vec![RawHeaderMatch {
                        present: Some(false),
                        ..header("x-env")
                    }],
                    ..allow()
                },
                "permissions[0].headers[0].present",
                Problem::PresentFalse,
            ),
        ];
        for (raw, key, problem) in cases {
            let e = refused(raw);
            assert_eq!((e.key.as_str(), &e.problem), (key, &problem), "{e}");
            let text = e.to_string();
            assert!(text.starts_with(&format!("key `{key}`: ")), "{text}");
            assert!(!text.contains('\n') && text.len() < 1200, "{text}");
        }
    }

    #[test]
    fn the_toml_form_names_the_key_at_fault() {
        let key = |text: &str| RawRule::from_toml(text).unwrap_err().key;
        assert_eq!(
            key("permissions = [{ action = \"allow\", paht = \"/\" }]"),
            "permissions[0].paht"
        );
        assert_eq!(
            key("permissions = [{ action = 1 }]"),
            "permissions[0].action"
        );
        assert_eq!(key("rules = []"), "rules");
        let e = RawRule::from_toml("permissions = [\n").unwrap_err();
        assert_eq!(e.key, "");
        assert!(!e.to_string().starts_with("key"), "{e}");
        let rule = RawRule::from_toml("action = \"allow\"").unwrap();
        assert_eq!(
            rule.permissions().unwrap_err().problem,
            Problem::ActionInL7Rule
        );
        let rule = RawRule::from_toml("source = \"web\"").unwrap();
        assert_eq!(
            rule.permissions().unwrap_err().problem,
            Problem::NoPermissions
        );
    }

    #[test]
    fn a_list_is_one_to_the_maximum() {
        assert_eq!(parse_permissions(&[]).unwrap_err().problem, Problem::Empty);
        let many = vec![allow(); MAX_PERMISSIONS + 1];
        let e = parse_permissions(&many).unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.problem),
            ("permissions", Problem::TooMany)
        );
        assert_eq!(
            parse_permissions(&many[..MAX_PERMISSIONS]).unwrap().len(),
            MAX_PERMISSIONS
        );
        let e = parse_permissions(&[allow(), RawPermission::default()]).unwrap_err();
        assert_eq!(e.key, "permissions[1].action");
    }
}
