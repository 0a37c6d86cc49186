//! Protobuf snapshots into the data plane's checked types, once per snapshot.

use ward_config::intentions::{Action, Rule, Source};
use ward_config::proxy::Protocol;
use ward_config::Name;
use ward_proto::v1;
use ward_proxy::intentions::IntentionSnapshot;
use ward_proxy::transparent::index::{IndexedEndpoint, IndexedService};

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

/// Converts an intentions snapshot for an inbound carrying `protocol`. A rule that cannot be
/// enforced as written (no L4 action; L7 permissions on a tcp inbound, which cannot check
/// requests; permissions this build does not accept) denies its source and counts in
/// `ward_intention_errors_total` (security rule 6, fail closed, docs/security.md).
pub fn intentions(
    snap: &v1::IntentionsSnapshot,
    protocol: Protocol,
    local_namespace: &Name,
) -> Result<IntentionSnapshot, SnapshotError> {
    intentions_for(snap, None, protocol, local_namespace)
}

/// As [`intentions`], also refusing a snapshot addressed to another service than `local`
/// (defence in depth: the server sends only the caller's own).
pub fn intentions_for(
    snap: &v1::IntentionsSnapshot,
    local: Option<&Name>,
    protocol: Protocol,
    local_namespace: &Name,
) -> Result<IntentionSnapshot, SnapshotError> {
    if let (Some(local), Some(dest)) = (local, &snap.destination) {
        let ns = namespace_of(dest);
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
        let unenforceable = |why: &str| {
            metrics::counter!(ward_proxy::metrics::INTENTION_ERRORS).increment(1);
            tracing::warn!(
                source = %i.source,
                "an intention this inbound cannot enforce as written denies its source: {why}"
            );
            Rule::l4(source.clone(), Action::Deny)
        };
        let action = v1::Action::try_from(i.action);
        let rule = match (action, i.permissions.is_empty(), protocol) {
            (Ok(v1::Action::Allow), true, _) => Rule::l4(source.clone(), Action::Allow),
            (Ok(v1::Action::Deny), true, _) => Rule::l4(source.clone(), Action::Deny),
            (Ok(v1::Action::Unspecified), false, Protocol::Http) => {
                match ward_proto::permission::parse(&i.permissions) {
                    Ok(p) => Rule::l7(source.clone(), p),
                    Err(e) => unenforceable(&e.to_string()),
                }
            }
            (_, false, Protocol::Tcp) => {
                unenforceable("L7 permissions on a tcp inbound, which cannot check requests")
            }
            _ => unenforceable("no action, or an action and permissions together"),
        };
        rules.push(rule);
    }
    Ok(IntentionSnapshot::new(
        snap.version,
        default,
        rules,
        local_namespace,
    ))
}

/// A service reference's namespace; the proto's empty one is `default`.
pub(crate) fn namespace_of(r: &v1::ServiceRef) -> &str {
    if r.namespace.is_empty() {
        "default"
    } else {
        &r.namespace
    }
}

/// Every service of an endpoints snapshot, for the transparent outbound's address index, each
/// endpoint with its transparent port (0: none). A name or address that does not parse (the
/// server sends none) is left out, never guessed. An endpoint whose stream is gone stays listed,
/// as for the upstreams: its address is still its service's.
pub fn indexed_services(snap: &v1::EndpointsSnapshot) -> Vec<IndexedService> {
    snap.services
        .iter()
        .filter_map(|entry| {
            let svc = entry.service.as_ref()?;
            let (Ok(service), Ok(namespace)) = (Name::new(&svc.name), Name::new(namespace_of(svc)))
            else {
                tracing::warn!(
                    service = ?svc.name,
                    "left an endpoints entry with an invalid name out of the address index"
                );
                return None;
            };
            let endpoints = entry
                .endpoints
                .iter()
                .filter_map(|e| {
                    Some(IndexedEndpoint {
                        address: e.address.parse().ok()?,
                        // Not a port (the server refuses one at registration): the sidecar
                        // stays its service's, with no transparent inbound to name a port to.
                        transparent_port: u16::try_from(e.transparent_port)
                            .ok()
                            .filter(|p| *p != 0),
                    })
                })
                .collect();
            Some(IndexedService {
                service,
                namespace,
                endpoints,
            })
        })
        .collect()
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

    /// Each listed service with its endpoints for the address index: an empty namespace is
    /// `default`, a transparent port of 0 (or one that is no port) is none, and what does not
    /// parse is left out rather than guessed.
    #[test]
    fn endpoints_snapshots_become_indexed_services() {
        let entry = |name: &str, ns: &str, eps: &[(&str, u32)]| v1::ServiceEndpoints {
            service: Some(v1::ServiceRef {
                name: name.into(),
                namespace: ns.into(),
            }),
            endpoints: eps
                .iter()
                .map(|(address, transparent_port)| v1::Endpoint {
                    address: (*address).into(),
                    transparent_port: *transparent_port,
                    ..Default::default()
                })
                .collect(),
        };
        let snap = v1::EndpointsSnapshot {
            version: 1,
            services: vec![
                entry(
                    "web",
                    "",
                    &[
                        ("10.0.0.7:15006", 15006),
                        ("10.0.0.8:21000", 0),
                        ("not an address", 15006),
                        ("10.0.0.9:21000", 70000),
                    ],
                ),
                entry("payments", "prod", &[]),
                entry("Bad_Name", "default", &[("10.0.0.1:21000", 0)]),
                v1::ServiceEndpoints {
                    service: None,
                    endpoints: vec![],
                },
            ],
        };
        let at = |a: &str, transparent_port| IndexedEndpoint {
            address: a.parse().unwrap(),
            transparent_port,
        };
        assert_eq!(
            indexed_services(&snap),
            [
                IndexedService {
                    service: Name::new("web").unwrap(),
                    namespace: Name::new("default").unwrap(),
                    endpoints: vec![
                        at("10.0.0.7:15006", Some(15006)),
                        at("10.0.0.8:21000", None),
                        at("10.0.0.9:21000", None),
                    ],
                },
                IndexedService {
                    service: Name::new("payments").unwrap(),
                    namespace: Name::new("prod").unwrap(),
                    endpoints: vec![],
                },
            ]
        );
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
        let s = intentions(&snap, Protocol::Tcp, &ns).unwrap();
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
        assert!(intentions(&bad, Protocol::Tcp, &ns).is_err());
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
        let Err(err) = intentions(&snap, Protocol::Tcp, &ns) else {
            panic!("a duplicate is refused")
        };
        assert!(
            matches!(&err, SnapshotError::Duplicate { index: 1, written } if written == "legacy"),
            "{err}"
        );
        // In another namespace, `legacy` and `default/legacy` are two callers.
        let prod = Name::new("prod").unwrap();
        assert!(intentions(&snap, Protocol::Tcp, &prod).is_ok());
    }

    #[test]
    fn an_http_inbound_takes_permissions_and_a_tcp_one_denies_their_source() {
        let ns = Name::new("default").unwrap();
        let admin = v1::Permission {
            action: v1::Action::Deny as i32,
            path: Some(v1::permission::Path::PathExact("/admin".into())),
            ..Default::default()
        };
        let stock = v1::Permission {
            action: v1::Action::Allow as i32,
            path: Some(v1::permission::Path::PathPrefix("/stock/".into())),
            methods: vec!["GET".into()],
            ..Default::default()
        };
        let l7 = |perms: Vec<v1::Permission>| v1::Intention {
            permissions: perms,
            ..intention("web", v1::Action::Unspecified, false)
        };
        let snap = |i: v1::Intention| v1::IntentionsSnapshot {
            version: 5,
            destination: None,
            default_action: v1::Action::Deny as i32,
            intentions: vec![i],
        };
        let web = SpiffeId::parse("spiffe://ward.local/ns/default/svc/web").unwrap();
        let headers = http::HeaderMap::new();
        let get = |s: &IntentionSnapshot, path: &str| {
            s.decide_request(&web, &http::Method::GET, path, &headers)
                .is_allow()
        };

        let http = intentions(
            &snap(l7(vec![admin.clone(), stock.clone()])),
            Protocol::Http,
            &ns,
        )
        .unwrap();
        assert!(
            http.decide(&web).is_allow(),
            "admitted; each request decided"
        );
        let perms = http.rules[0].permissions.as_ref().unwrap();
        assert_eq!(perms.len(), 2);
        assert!(get(&http, "/stock/1") && !get(&http, "/admin") && !get(&http, "/other"));

        // A tcp inbound cannot check requests: the source is denied, never admitted whole.
        let tcp = intentions(&snap(l7(vec![admin.clone(), stock])), Protocol::Tcp, &ns).unwrap();
        assert!(!tcp.decide(&web).is_allow());
        assert!(tcp.rules[0].permissions.is_none());

        // Permissions this build does not accept deny the source on http too.
        let bad = v1::Permission {
            action: v1::Action::Allow as i32,
            path: Some(v1::permission::Path::PathPrefix("no-slash".into())),
            ..Default::default()
        };
        let s = intentions(&snap(l7(vec![bad])), Protocol::Http, &ns).unwrap();
        assert!(!s.decide(&web).is_allow());
        // An action and permissions together: deny.
        let both = v1::Intention {
            action: v1::Action::Allow as i32,
            ..l7(vec![admin])
        };
        let s = intentions(&snap(both), Protocol::Http, &ns).unwrap();
        assert!(!s.decide(&web).is_allow());
    }
}
