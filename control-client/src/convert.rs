//! Protobuf snapshots into the data plane's checked types, once per snapshot.

use ward_config::intentions::{Action, Rule, Source};
use ward_config::Name;
use ward_proto::v1;
use ward_proxy::intentions::IntentionSnapshot;

/// Why a snapshot was refused as a whole (the previous one stays in force).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("intention {index}: source {written:?} is not `*`, `svc` or `ns/svc`")]
    Source { index: usize, written: String },
    #[error("the snapshot is for {0}, not for this service")]
    OtherDestination(String),
    #[error("intention {index}: source {written:?} is listed twice")]
    Duplicate { index: usize, written: String },
}

/// Converts an intentions snapshot for this (tcp) inbound. A rule that cannot be enforced as
/// written (no L4 action, or L7 permissions, which a tcp inbound cannot check) denies its
/// source and counts in `ward_intention_errors_total` (security rule 6, fail closed,
/// docs/security.md).
pub fn intentions(
    snap: &v1::IntentionsSnapshot,
    local_namespace: &Name,
) -> Result<IntentionSnapshot, SnapshotError> {
    intentions_for(snap, None, local_namespace)
}

/// As [`intentions`], also refusing a snapshot addressed to another service than `local`
/// (defence in depth: the server sends only the caller's own).
pub fn intentions_for(
    snap: &v1::IntentionsSnapshot,
    local: Option<&Name>,
    local_namespace: &Name,
) -> Result<IntentionSnapshot, SnapshotError> {
    if let (Some(local), Some(dest)) = (local, &snap.destination) {
        let ns = if dest.namespace.is_empty() {
            "default"
        } else {
            dest.namespace.as_str()
        };
        if dest.name != local.as_str() || ns != local_namespace.as_str() {
            return Err(SnapshotError::OtherDestination(format!(
                "{ns}/{}",
                dest.name
            )));
        }
    }
    let default = match v1::Action::try_from(snap.default_action) {
        Ok(v1::Action::Allow) => Action::Allow,
        _ => Action::Deny,
    };
    let mut rules: Vec<Rule> = Vec::with_capacity(snap.intentions.len());
    for (index, i) in snap.intentions.iter().enumerate() {
        let source = Source::parse(&i.source).map_err(|_| SnapshotError::Source {
            index,
            written: i.source.clone(),
        })?;
        // `svc` is in this (the destination's) namespace: `default/svc` and `svc` are one.
        let same = source.qualified(local_namespace);
        if rules
            .iter()
            .any(|r| r.source.qualified(local_namespace) == same)
        {
            return Err(SnapshotError::Duplicate {
                index,
                written: i.source.clone(),
            });
        }
        let action = match (v1::Action::try_from(i.action), i.permissions.is_empty()) {
            (Ok(v1::Action::Allow), true) => Action::Allow,
            (Ok(v1::Action::Deny), true) => Action::Deny,
            _ => {
                metrics::counter!(ward_proxy::metrics::INTENTION_ERRORS).increment(1);
                tracing::warn!(
                    source = %i.source,
                    "an intention this tcp inbound cannot enforce as written denies its source"
                );
                Action::Deny
            }
        };
        rules.push(Rule::l4(source, action));
    }
    Ok(IntentionSnapshot::new(
        snap.version,
        default,
        rules,
        local_namespace,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_config::SpiffeId;

    fn intention(source: &str, action: v1::Action, l7: bool) -> v1::Intention {
        v1::Intention {
            source: source.into(),
            destination: "inventory".into(),
            action: action as i32,
            permissions: if l7 {
                vec![v1::Permission {
                    action: v1::Action::Allow as i32,
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            ..Default::default()
        }
    }

    #[test]
    fn converts_and_fails_closed() {
        let ns = Name::new("default").unwrap();
        let snap = v1::IntentionsSnapshot {
            version: 3,
            destination: None,
            default_action: v1::Action::Unspecified as i32,
            intentions: vec![
                intention("order", v1::Action::Allow, false),
                intention("web", v1::Action::Unspecified, true),
            ],
        };
        let s = intentions(&snap, &ns).unwrap();
        let id = |svc: &str| {
            SpiffeId::parse(&format!("spiffe://ward.local/ns/default/svc/{svc}")).unwrap()
        };
        assert_eq!(s.version, 3);
        assert!(s.decide(&id("order")).is_allow());
        assert!(
            !s.decide(&id("web")).is_allow(),
            "L7 rule on a tcp inbound denies"
        );
        assert!(
            !s.decide(&id("other")).is_allow(),
            "unspecified default is deny"
        );

        let bad = v1::IntentionsSnapshot {
            intentions: vec![intention("Not A Name", v1::Action::Allow, false)],
            ..snap
        };
        assert!(intentions(&bad, &ns).is_err());
    }

    #[test]
    fn one_caller_written_two_ways_is_a_duplicate() {
        let ns = Name::new("default").unwrap();
        let snap = v1::IntentionsSnapshot {
            version: 4,
            destination: None,
            default_action: v1::Action::Deny as i32,
            intentions: vec![
                intention("default/legacy", v1::Action::Allow, false),
                intention("legacy", v1::Action::Deny, false),
            ],
        };
        let Err(err) = intentions(&snap, &ns) else {
            panic!("a duplicate is refused")
        };
        assert!(
            matches!(&err, SnapshotError::Duplicate { index: 1, written } if written == "legacy"),
            "{err}"
        );
        // In another namespace, `legacy` and `default/legacy` are two callers.
        let prod = Name::new("prod").unwrap();
        assert!(intentions(&snap, &prod).is_ok());
    }
}
