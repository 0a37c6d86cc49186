//! L7 permissions in their gRPC form, checked by `ward_config::permission` so that the CLI and
//! the server accept exactly the same rules.

use crate::v1;
use v1::header_match::Match as M;
use v1::permission::Path as P;
use ward_config::intentions::Action;
use ward_config::permission::{
    parse_permissions, HeaderValue, PathMatch, Permission, PermissionError, RawHeaderMatch,
    RawPermission,
};

/// Checks the ordered permissions of an intention as a client sent them.
pub fn parse(perms: &[v1::Permission]) -> Result<Vec<Permission>, PermissionError> {
    let raw: Vec<RawPermission> = perms.iter().map(to_raw).collect();
    parse_permissions(&raw)
}

/// The message as written, for [`RawPermission::parse`] to check: an unspecified action is a
/// missing one, and an unknown action number is written out so the error can quote it.
pub fn to_raw(p: &v1::Permission) -> RawPermission {
    let action = match v1::Action::try_from(p.action) {
        Ok(v1::Action::Allow) => Some(Action::Allow.as_str().to_owned()),
        Ok(v1::Action::Deny) => Some(Action::Deny.as_str().to_owned()),
        Ok(v1::Action::Unspecified) => None,
        Err(_) => Some(p.action.to_string()),
    };
    let mut raw = RawPermission {
        action,
        methods: p.methods.clone(),
        ..RawPermission::default()
    };
    match &p.path {
        Some(P::PathExact(s)) => raw.path_exact = Some(s.clone()),
        Some(P::PathPrefix(s)) => raw.path_prefix = Some(s.clone()),
        Some(P::PathRegex(s)) => raw.path_regex = Some(s.clone()),
        None => {}
    }
    raw.headers = p
        .headers
        .iter()
        .map(|h| {
            let mut r = RawHeaderMatch {
                name: Some(h.name.clone()),
                ..RawHeaderMatch::default()
            };
            match &h.r#match {
                Some(M::Exact(s)) => r.exact = Some(s.clone()),
                Some(M::Prefix(s)) => r.prefix = Some(s.clone()),
                Some(M::Present(b)) => r.present = Some(*b),
                None => {}
            }
            r
        })
        .collect();
    raw
}

/// The message for a checked permission.
pub fn to_proto(p: &Permission) -> v1::Permission {
    let action = match p.action {
        Action::Allow => v1::Action::Allow,
        Action::Deny => v1::Action::Deny,
    };
    v1::Permission {
        action: action as i32,
        path: p.path.as_ref().map(|m| match m {
            PathMatch::Exact(s) => P::PathExact(s.clone()),
            PathMatch::Prefix(s) => P::PathPrefix(s.clone()),
            PathMatch::Regex(s) => P::PathRegex(s.clone()),
        }),
        methods: p.methods.clone(),
        headers: p
            .headers
            .iter()
            .map(|h| v1::HeaderMatch {
                name: h.name.clone(),
                r#match: Some(match &h.value {
                    HeaderValue::Exact(s) => M::Exact(s.clone()),
                    HeaderValue::Prefix(s) => M::Prefix(s.clone()),
                    HeaderValue::Present => M::Present(true),
                }),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_config::permission::Problem;

    #[test]
    fn checked_permissions_round_trip() {
        let p = v1::Permission {
            action: v1::Action::Deny as i32,
            path: Some(P::PathExact("/admin".into())),
            methods: vec!["POST".into()],
            headers: vec![v1::HeaderMatch {
                name: "x-env".into(),
                r#match: Some(M::Present(true)),
            }],
        };
        let checked = parse(std::slice::from_ref(&p)).unwrap();
        assert_eq!(to_proto(&checked[0]), p);
    }

    #[test]
    fn what_the_message_cannot_say_is_refused_by_name() {
        let mut p = v1::Permission {
            action: 7,
            ..Default::default()
        };
        let e = parse(std::slice::from_ref(&p)).unwrap_err();
        assert_eq!(e.problem, Problem::BadAction("7".into()));
        p.action = v1::Action::Unspecified as i32;
        let e = parse(std::slice::from_ref(&p)).unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.problem),
            ("permissions[0].action", Problem::NoAction)
        );
        p.action = v1::Action::Allow as i32;
        p.headers = vec![v1::HeaderMatch {
            name: "x-env".into(),
            r#match: None,
        }];
        let e = parse(std::slice::from_ref(&p)).unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.problem),
            ("permissions[0].headers[0]", Problem::NoHeaderValue)
        );
    }
}
