//! Intentions as operators write them: `source`, `action`, default policy.

use crate::identity::{IdentityError, Name};
use std::fmt;

/// What an intention does with a matching caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The caller an intention names: `*`, `svc` (in the destination's namespace) or `ns/svc`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Any,
    Service { namespace: Option<Name>, name: Name },
}

impl Source {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        if s == "*" {
            return Ok(Source::Any);
        }
        match s.split_once('/') {
            Some((ns, svc)) => Ok(Source::Service {
                namespace: Some(Name::new(ns)?),
                name: Name::new(svc)?,
            }),
            None => Ok(Source::Service {
                namespace: None,
                name: Name::new(s)?,
            }),
        }
    }

    /// This source with its namespace written out: a bare `svc` is in `dest_namespace`, the
    /// destination's. Two rules name the same caller exactly when these are equal, so
    /// `default/legacy` and `legacy` are one source for a destination in `default`.
    pub fn qualified(&self, dest_namespace: &Name) -> Source {
        match self {
            Source::Service {
                namespace: None,
                name,
            } => Source::Service {
                namespace: Some(dest_namespace.clone()),
                name: name.clone(),
            },
            other => other.clone(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Any => f.write_str("*"),
            Source::Service {
                namespace: Some(ns),
                name,
            } => write!(f, "{ns}/{name}"),
            Source::Service {
                namespace: None,
                name,
            } => write!(f, "{name}"),
        }
    }
}

/// One rule for a source: an L4 action, or L7 permissions (an http destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub source: Source,
    /// What the handshake decides. An L7 rule is `Allow` here: its connections are admitted
    /// and each request is decided by `permissions`.
    pub action: Action,
    /// The ordered L7 permissions; `Some` only for an http inbound, which decides every
    /// request by them (a request that matches none is denied).
    pub permissions: Option<Vec<crate::permission::Permission>>,
}

impl Rule {
    /// An L4 rule.
    pub fn l4(source: Source, action: Action) -> Self {
        Rule {
            source,
            action,
            permissions: None,
        }
    }

    /// An L7 rule: the connection is admitted, each request decided by `permissions`.
    pub fn l7(source: Source, permissions: Vec<crate::permission::Permission>) -> Self {
        Rule {
            source,
            action: Action::Allow,
            permissions: Some(permissions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert_eq!(Source::parse("*").unwrap(), Source::Any);
        assert_eq!(Source::parse("web").unwrap().to_string(), "web");
        assert_eq!(Source::parse("prod/web").unwrap().to_string(), "prod/web");
        for bad in ["", "Web", "a/b/c", "/web", "web/", "*/web", "a b"] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bare_source_is_in_the_destination_namespace() {
        let default = Name::new("default").unwrap();
        let q = |s: &str| Source::parse(s).unwrap().qualified(&default);
        assert_eq!(q("legacy"), q("default/legacy"));
        assert_ne!(q("legacy"), q("prod/legacy"));
        assert_eq!(q("*"), Source::Any);
        let prod = Name::new("prod").unwrap();
        assert_eq!(
            Source::parse("legacy").unwrap().qualified(&prod),
            q("prod/legacy")
        );
    }
}
