//! The transparent outbound (`[transparent] outbound_listen`): connections the app opened to any
//! address, redirected here by `ward redirect`. A destination a mesh service owns is carried over
//! mutual TLS to that service's sidecar at that address, with that service's identity expected;
//! any other follows `outbound_policy`.

use super::index::{MeshIndex, Owner};
use crate::connlog::LineBudget;
use crate::inputs::ProxyInputs;
use crate::metrics::{self as m, Direction};
use crate::outbound::Upstream;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use ward_config::proxy::OutboundPolicy;
use ward_config::Name;

/// Why a redirected connection was refused: the `reason` of `ward_transparent_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No mesh service owns the destination, and `outbound_policy = "registry_only"`.
    NotInMesh,
    /// Sidecars of several services registered the destination's address.
    Ambiguous,
    /// The connection is one of the proxy's own, sent back by the redirect (the proxy runs as
    /// another uid than `ward redirect --proxy-uid`), or aims at a sidecar's own port.
    Loop,
    /// The connection was not redirected: it came straight to the listener.
    NoOriginalDestination,
    /// The catalog has not told the proxy which service owns which address yet.
    CatalogNotReady,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::NotInMesh,
        Refusal::Ambiguous,
        Refusal::Loop,
        Refusal::NoOriginalDestination,
        Refusal::CatalogNotReady,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotInMesh => "not_in_mesh",
            Refusal::Ambiguous => "ambiguous",
            Refusal::Loop => "loop",
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::CatalogNotReady => "catalog_not_ready",
        }
    }
}

/// The peer label of connections passed through in plain TCP (`allow_any`): metrics never carry
/// raw addresses.
const PASSTHROUGH_PEER: &str = "passthrough";
/// At most one refusal line a second.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// What happens to a connection the app made to `dst`.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// A stream naming `authority` on a tunnel to the sidecar at `sidecar`, which must present
    /// `service`'s identity.
    Mesh {
        service: Name,
        namespace: Name,
        sidecar: SocketAddr,
        authority: String,
    },
    /// `allow_any`: on to `dst` in plain TCP.
    PassThrough,
    /// Refused, with the destination's service or "unknown" for the log.
    Refuse(Refusal, String),
}

/// Decides where `dst` goes. Only a sidecar with a transparent inbound can take the app's port;
/// at an address whose sidecar has none, the port the app dialled is not one the mesh serves
/// (that sidecar would send anything to its one local_app), so it is outside the mesh.
fn route(index: &MeshIndex, policy: OutboundPolicy, dst: SocketAddr) -> Route {
    let outside = |service: &str| match policy {
        OutboundPolicy::RegistryOnly => Route::Refuse(Refusal::NotInMesh, service.to_owned()),
        OutboundPolicy::AllowAny => Route::PassThrough,
    };
    match index.owner(dst.ip()) {
        Owner::Service {
            service,
            namespace,
            endpoint,
        } => {
            let own_ports = [Some(endpoint.address.port()), endpoint.transparent_port];
            if own_ports.contains(&Some(dst.port())) {
                return Route::Refuse(Refusal::Loop, service.to_string());
            }
            let Some(port) = endpoint.transparent_port else {
                return outside(service.as_str());
            };
            let authority = format!(
                "{}:{}",
                crate::mux::authority(&service, &namespace),
                dst.port()
            );
            Route::Mesh {
                sidecar: SocketAddr::new(endpoint.address.ip(), port),
                service,
                namespace,
                authority,
            }
        }
        // Until the catalog has answered, every address would look outside the mesh: under
        // allow_any a call to a mesh service would leave in plain text.
        Owner::Pending => Route::Refuse(Refusal::CatalogNotReady, "unknown".to_owned()),
        Owner::Ambiguous => Route::Refuse(Refusal::Ambiguous, "unknown".to_owned()),
        Owner::Unknown => outside("unknown"),
    }
}

pub struct TransparentOutbound {
    inputs: Arc<ProxyInputs>,
    index: Arc<MeshIndex>,
    policy: OutboundPolicy,
    /// One upstream per destination service, made on first use: its pool of tunnels and the
    /// identity its sidecars must present.
    upstreams: DashMap<(Name, Name), Arc<Upstream>>,
    /// The local ports of our own passthrough connections, taken before they connect: one of
    /// them arriving here was redirected back to us.
    passthrough: DashMap<u16, ()>,
    refusal_log: LineBudget,
}

impl TransparentOutbound {
    pub fn new(inputs: Arc<ProxyInputs>, index: Arc<MeshIndex>, policy: OutboundPolicy) -> Self {
        for reason in Refusal::ALL {
            metrics::counter!(m::TRANSPARENT_REFUSED, "reason" => reason.as_str()).absolute(0);
        }
        Self {
            inputs,
            index,
            policy,
            upstreams: DashMap::new(),
            passthrough: DashMap::new(),
            refusal_log: LineBudget::new(1, REFUSAL_LOG_EVERY),
        }
    }

    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let inputs = self.inputs.clone();
        crate::listener::accept_loop(listener, inputs, move |tcp, peer, permit| {
            self.clone().serve(tcp, peer, permit)
        })
        .await
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) {
        let dst = match super::socket::original_dst(&tcp) {
            Ok(dst) if Some(dst) != tcp.local_addr().ok().map(super::socket::canonical) => dst,
            _ => return self.refuse(Refusal::NoOriginalDestination, None, "unknown"),
        };
        if self.passthrough.contains_key(&peer.port()) {
            return self.refuse(Refusal::Loop, Some(dst), "unknown");
        }
        match route(&self.index, self.policy, dst) {
            Route::Mesh {
                service,
                namespace,
                sidecar,
                authority,
            } => {
                let upstream = self.upstream(service, namespace);
                upstream.serve_at(tcp, sidecar, authority, slot).await
            }
            Route::PassThrough => self.pass_through(tcp, dst).await,
            Route::Refuse(reason, service) => self.refuse(reason, Some(dst), &service),
        }
    }

    /// The upstream for `service` in `namespace`, made on first use.
    fn upstream(&self, service: Name, namespace: Name) -> Arc<Upstream> {
        let key = (namespace.clone(), service.clone());
        if let Some(u) = self.upstreams.get(&key) {
            return u.clone();
        }
        self.upstreams
            .entry(key)
            .or_insert_with(|| {
                let u = Arc::new(Upstream::new(
                    self.inputs.clone(),
                    service,
                    namespace,
                    Vec::new(),
                ));
                u.follow_credentials();
                u
            })
            .clone()
    }

    /// `allow_any`: the connection goes on to its destination in plain TCP, as if no proxy were
    /// there. Its local port is noted before it connects, so that if the redirect sends it back
    /// (the proxy runs as a uid the rules do not exempt) it is known as ours when it arrives.
    async fn pass_through(&self, local: TcpStream, dst: SocketAddr) {
        let socket = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        };
        let unspecified = match dst {
            SocketAddr::V4(_) => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
        };
        let bound = socket.and_then(|s| s.bind(unspecified).map(|()| s));
        let port = bound
            .as_ref()
            .ok()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.port());
        let (Ok(socket), Some(port)) = (bound, port) else {
            // Out of file descriptors or ports, typically: said at most once a second.
            if let Some(left_out) = self.refusal_log.admit() {
                tracing::warn!(
                    left_out,
                    "cannot open a socket for a passthrough connection"
                );
            }
            return;
        };
        self.passthrough.insert(port, ());
        let _noted = NotedPort {
            ports: &self.passthrough,
            port,
        };
        let connected =
            tokio::time::timeout(self.inputs.limits.handshake_timeout, socket.connect(dst)).await;
        let remote = match connected {
            Ok(Ok(remote)) => remote,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "passthrough destination refused the connection");
                return;
            }
            Err(_) => {
                tracing::debug!("passthrough destination did not answer");
                return;
            }
        };
        let _ = remote.set_nodelay(true);
        let close = self.inputs.drain.force_close.child_token();
        crate::forward::forward(
            &self.inputs,
            Direction::Outbound,
            PASSTHROUGH_PEER.to_owned(),
            None,
            remote,
            local,
            &close,
        )
        .await;
    }

    /// Counts the refusal and logs it (at most once a second), naming the destination's service
    /// or "unknown": the address itself only at debug.
    fn refuse(&self, reason: Refusal, dst: Option<SocketAddr>, service: &str) {
        metrics::counter!(m::TRANSPARENT_REFUSED, "reason" => reason.as_str()).increment(1);
        tracing::debug!(reason = reason.as_str(), destination = ?dst, service, "transparent connection refused");
        if let Some(left_out) = self.refusal_log.admit() {
            tracing::warn!(
                reason = reason.as_str(),
                service,
                left_out,
                "transparent outbound connection refused"
            );
        }
    }
}

/// A passthrough connection's port, forgotten when the connection ends.
struct NotedPort<'a> {
    ports: &'a DashMap<u16, ()>,
    port: u16,
}

impl Drop for NotedPort<'_> {
    fn drop(&mut self) {
        self.ports.remove(&self.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transparent::index::{IndexedEndpoint, IndexedService};

    fn index() -> MeshIndex {
        let endpoint = |address: &str, transparent_port| IndexedEndpoint {
            address: address.parse().unwrap(),
            transparent_port,
        };
        let service = |name: &str, endpoints| IndexedService {
            service: Name::new(name).unwrap(),
            namespace: Name::default_namespace(),
            endpoints,
        };
        let index = MeshIndex::default();
        index.publish(vec![
            service("inventory", vec![endpoint("10.0.0.3:15006", Some(15006))]),
            service("legacy", vec![endpoint("10.0.0.4:21000", None)]),
            service("a", vec![endpoint("10.0.0.9:15006", Some(15006))]),
            service("b", vec![endpoint("10.0.0.9:15007", Some(15007))]),
        ]);
        index
    }

    fn to(index: &MeshIndex, policy: OutboundPolicy, dst: &str) -> Route {
        route(index, policy, dst.parse().unwrap())
    }

    #[test]
    fn a_mesh_address_goes_to_its_sidecar_naming_the_apps_port() {
        for policy in [OutboundPolicy::RegistryOnly, OutboundPolicy::AllowAny] {
            assert_eq!(
                to(&index(), policy, "10.0.0.3:8080"),
                Route::Mesh {
                    service: Name::new("inventory").unwrap(),
                    namespace: Name::default_namespace(),
                    sidecar: "10.0.0.3:15006".parse().unwrap(),
                    authority: "inventory.default:8080".into(),
                }
            );
        }
    }

    #[test]
    fn what_the_mesh_cannot_carry_follows_the_policy_or_is_refused() {
        let index = index();
        let refused = |reason, service: &str| Route::Refuse(reason, service.to_owned());
        let registry_only = |dst| to(&index, OutboundPolicy::RegistryOnly, dst);
        let allow_any = |dst| to(&index, OutboundPolicy::AllowAny, dst);
        // Outside the mesh.
        assert_eq!(
            registry_only("192.0.2.1:443"),
            refused(Refusal::NotInMesh, "unknown")
        );
        assert_eq!(allow_any("192.0.2.1:443"), Route::PassThrough);
        // A host whose sidecar has no transparent inbound serves no port of the app's choosing.
        assert_eq!(
            registry_only("10.0.0.4:5432"),
            refused(Refusal::NotInMesh, "legacy")
        );
        assert_eq!(allow_any("10.0.0.4:5432"), Route::PassThrough);
        // Whatever the policy: a sidecar's own port (our connection sent back, a loop), and an
        // address two services claim.
        for dst in ["10.0.0.3:15006", "10.0.0.4:21000"] {
            let Route::Refuse(Refusal::Loop, _) = allow_any(dst) else {
                panic!("{dst}: {:?}", allow_any(dst));
            };
        }
        assert_eq!(
            allow_any("10.0.0.9:80"),
            refused(Refusal::Ambiguous, "unknown")
        );
    }

    #[test]
    fn before_the_catalog_answers_nothing_leaves_in_plain_text() {
        let empty = MeshIndex::default();
        for policy in [OutboundPolicy::RegistryOnly, OutboundPolicy::AllowAny] {
            assert_eq!(
                to(&empty, policy, "10.0.0.3:8080"),
                Route::Refuse(Refusal::CatalogNotReady, "unknown".into())
            );
        }
        // An empty catalog is an answer: then the policy applies.
        empty.publish(Vec::new());
        assert_eq!(
            to(&empty, OutboundPolicy::AllowAny, "10.0.0.3:8080"),
            Route::PassThrough
        );
    }
}
