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
use tokio::net::{TcpListener, TcpStream};
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
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::NotInMesh,
        Refusal::Ambiguous,
        Refusal::Loop,
        Refusal::NoOriginalDestination,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotInMesh => "not_in_mesh",
            Refusal::Ambiguous => "ambiguous",
            Refusal::Loop => "loop",
            Refusal::NoOriginalDestination => "no_original_destination",
        }
    }
}

/// The peer label of connections passed through in plain TCP (`allow_any`): metrics never carry
/// raw addresses.
const PASSTHROUGH_PEER: &str = "passthrough";
/// At most one refusal line a second.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

pub struct TransparentOutbound {
    inputs: Arc<ProxyInputs>,
    index: Arc<MeshIndex>,
    policy: OutboundPolicy,
    /// One upstream per destination service, made on first use: its pool of tunnels and the
    /// identity its sidecars must present.
    upstreams: DashMap<(Name, Name), Arc<Upstream>>,
    /// The local addresses of our own passthrough connections: one of them arriving here was
    /// redirected back to us.
    passthrough: DashMap<SocketAddr, ()>,
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
            Ok(dst) if Some(dst) != tcp.local_addr().ok() => dst,
            _ => return self.refuse(Refusal::NoOriginalDestination, None, "unknown"),
        };
        if self.passthrough.contains_key(&peer) {
            return self.refuse(Refusal::Loop, Some(dst), "unknown");
        }
        match self.index.owner(dst.ip()) {
            Owner::Service {
                service,
                namespace,
                endpoint,
            } => {
                let sidecar = endpoint.address.ip().to_canonical() == dst.ip().to_canonical()
                    && (endpoint.address.port() == dst.port()
                        || endpoint.transparent_port == Some(dst.port()));
                if sidecar {
                    return self.refuse(Refusal::Loop, Some(dst), service.as_str());
                }
                let authority = crate::mux::authority(&service, &namespace);
                // A transparent inbound takes the app's port in the stream; an explicit one
                // sends every stream to its local_app.
                let (ep, authority) = match endpoint.transparent_port {
                    Some(port) => (
                        SocketAddr::new(endpoint.address.ip(), port),
                        format!("{authority}:{}", dst.port()),
                    ),
                    None => (endpoint.address, authority),
                };
                let upstream = self.upstream(service, namespace);
                upstream.serve_at(tcp, ep, authority, slot).await
            }
            Owner::Ambiguous => self.refuse(Refusal::Ambiguous, Some(dst), "unknown"),
            Owner::Unknown => match self.policy {
                OutboundPolicy::RegistryOnly => {
                    self.refuse(Refusal::NotInMesh, Some(dst), "unknown")
                }
                OutboundPolicy::AllowAny => self.pass_through(tcp, dst).await,
            },
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
    /// there.
    async fn pass_through(&self, local: TcpStream, dst: SocketAddr) {
        let connected = tokio::time::timeout(
            self.inputs.limits.handshake_timeout,
            TcpStream::connect(dst),
        )
        .await;
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
        let ours = remote.local_addr().ok();
        if let Some(a) = ours {
            self.passthrough.insert(a, ());
        }
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
        if let Some(a) = ours {
            self.passthrough.remove(&a);
        }
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
