//! Which mesh service owns an IP address: how the transparent outbound turns the original
//! destination an app connected to into a service, its expected identity and its sidecar.
//!
//! Fed with every service's endpoints by the catalog's `WatchEndpoints` with `all`. An address
//! that two services claim maps to neither: the outbound refuses it rather than guess whose
//! identity to expect (fail closed).

use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use ward_config::Name;

/// One registered sidecar of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedEndpoint {
    /// The sidecar's registered mesh address (`[inbound] listen`, or the transparent inbound's
    /// when it has no explicit one), with the IP the server saw it connect from.
    pub address: SocketAddr,
    /// The port of its transparent inbound, when it runs one: tunnel streams sent there may name
    /// the original destination port.
    pub transparent_port: Option<u16>,
}

/// One service and its sidecars, as the catalog lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedService {
    pub service: Name,
    pub namespace: Name,
    pub endpoints: Vec<IndexedEndpoint>,
}

/// What an IP address is, for the transparent outbound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A sidecar of this service listens there.
    Service {
        service: Name,
        namespace: Name,
        endpoint: IndexedEndpoint,
    },
    /// Sidecars of more than one service registered it: no identity can be expected.
    Ambiguous,
    /// No mesh service is known there.
    Unknown,
    /// Nothing is known yet: the catalog has not answered since the proxy started.
    Pending,
}

#[derive(Debug, Default)]
struct Index {
    by_ip: HashMap<IpAddr, Owner>,
    /// False until the first publication.
    published: bool,
}

/// The current index; replaced as a whole on each catalog update, read without a lock.
#[derive(Debug, Default)]
pub struct MeshIndex {
    current: ArcSwap<Index>,
}

impl MeshIndex {
    /// Replaces the index with `services`.
    pub fn publish(&self, services: Vec<IndexedService>) {
        let mut by_ip: HashMap<IpAddr, Owner> = HashMap::new();
        for s in services {
            for endpoint in s.endpoints {
                let ip = endpoint.address.ip().to_canonical();
                let owner = Owner::Service {
                    service: s.service.clone(),
                    namespace: s.namespace.clone(),
                    endpoint,
                };
                by_ip
                    .entry(ip)
                    .and_modify(|held| {
                        if !same_service(held, &owner) {
                            *held = Owner::Ambiguous;
                        } else if transparent_port(held).is_none() {
                            // Of two instances at one address, the one with a transparent
                            // inbound can take the app's port.
                            *held = owner.clone();
                        }
                    })
                    .or_insert(owner);
            }
        }
        self.current.store(Arc::new(Index {
            by_ip,
            published: true,
        }));
    }

    /// Whether the catalog has answered once.
    pub fn published(&self) -> bool {
        self.current.load().published
    }

    /// Who owns `ip`.
    pub fn owner(&self, ip: IpAddr) -> Owner {
        let index = self.current.load();
        if !index.published {
            return Owner::Pending;
        }
        index
            .by_ip
            .get(&ip.to_canonical())
            .cloned()
            .unwrap_or(Owner::Unknown)
    }
}

fn transparent_port(owner: &Owner) -> Option<u16> {
    match owner {
        Owner::Service { endpoint, .. } => endpoint.transparent_port,
        _ => None,
    }
}

/// Whether two owners are sidecars of the same service (several instances of one service may
/// share a host; the first listed stays).
fn same_service(a: &Owner, b: &Owner) -> bool {
    match (a, b) {
        (
            Owner::Service {
                service: s1,
                namespace: n1,
                ..
            },
            Owner::Service {
                service: s2,
                namespace: n2,
                ..
            },
        ) => s1 == s2 && n1 == n2,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, addrs: &[&str]) -> IndexedService {
        IndexedService {
            service: Name::new(name).unwrap(),
            namespace: Name::default_namespace(),
            endpoints: addrs
                .iter()
                .map(|a| IndexedEndpoint {
                    address: a.parse().unwrap(),
                    transparent_port: Some(15006),
                })
                .collect(),
        }
    }

    fn name_of(owner: Owner) -> String {
        match owner {
            Owner::Service { service, .. } => service.to_string(),
            Owner::Ambiguous => "ambiguous".into(),
            Owner::Unknown => "unknown".into(),
            Owner::Pending => "pending".into(),
        }
    }

    #[test]
    fn an_address_maps_to_its_one_service_and_a_shared_one_to_none() {
        let index = MeshIndex::default();
        let at = |ip: &str| name_of(index.owner(ip.parse().unwrap()));
        assert_eq!(
            at("10.0.0.5"),
            "pending",
            "nothing is known before the catalog answers"
        );
        index.publish(vec![
            service("inventory", &["10.0.0.5:15006", "10.0.0.6:15006"]),
            service("order", &["10.0.0.7:21000", "[fd00::7]:21000"]),
            service("billing", &["10.0.0.7:21001"]),
        ]);
        assert_eq!(at("10.0.0.5"), "inventory");
        assert_eq!(at("10.0.0.6"), "inventory");
        assert_eq!(at("fd00::7"), "order");
        // An IPv4-mapped IPv6 address is the IPv4 address.
        assert_eq!(at("::ffff:10.0.0.5"), "inventory");
        assert_eq!(at("10.0.0.7"), "ambiguous");
        assert_eq!(at("10.0.0.8"), "unknown");
        // Two instances of one service on one host stay that service.
        index.publish(vec![service("inventory", &["10.0.0.5:1", "10.0.0.5:2"])]);
        assert_eq!(at("10.0.0.5"), "inventory");
        // A new publication replaces the old one as a whole.
        assert_eq!(at("10.0.0.6"), "unknown");
    }
}
