//! Outbound: a plain listener on localhost per upstream; each connection is carried over mTLS
//! to one of the upstream's endpoints, which must prove the upstream's exact identity.

use crate::metrics::{self as m, Direction, HandshakeResult};
use crate::shared::Shared;
use crate::tls;
use arc_swap::ArcSwap;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use ward_config::Name;

/// How long one TCP connect to an endpoint may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Upstream {
    shared: Arc<Shared>,
    pub service: Name,
    pub namespace: Name,
    verifier: Arc<tls::OutboundVerifier>,
    /// Replaced (with an empty session cache) whenever our credentials change.
    connector: ArcSwap<TlsConnector>,
    /// Static endpoints, or the catalog's (replaced on each update).
    pub endpoints: ArcSwap<Vec<SocketAddr>>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(
        shared: Arc<Shared>,
        service: Name,
        namespace: Name,
        endpoints: Vec<SocketAddr>,
    ) -> Self {
        let verifier = Arc::new(tls::OutboundVerifier::new(
            shared.credentials.clone(),
            namespace.clone(),
            service.clone(),
        ));
        let config = tls::config::client_config(shared.credentials.clone(), verifier.clone());
        Self {
            verifier,
            shared,
            service,
            namespace,
            connector: ArcSwap::from_pointee(TlsConnector::from(config)),
            endpoints: ArcSwap::from_pointee(endpoints),
            next: AtomicUsize::new(0),
        }
    }

    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        tokio::spawn(self.clone().renew_connector_on_new_credentials());
        let shared = self.shared.clone();
        crate::listener::accept_loop(listener, shared, move |tcp, _peer, permit| {
            self.clone().serve(tcp, permit)
        })
        .await
    }

    /// A fresh client config (and session cache) whenever our certificate or roots change.
    async fn renew_connector_on_new_credentials(self: Arc<Self>) {
        let mut changed = self.shared.credentials.subscribe();
        loop {
            tokio::select! {
                _ = self.shared.force_close.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
            let config =
                tls::config::client_config(self.shared.credentials.clone(), self.verifier.clone());
            self.connector.store(Arc::new(TlsConnector::from(config)));
        }
    }

    /// Round robin over the endpoints, moving to the next on a connect failure.
    async fn connect(&self) -> Option<(TcpStream, SocketAddr)> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        if n == 0 {
            tracing::warn!(upstream = %self.service, "the upstream has no endpoints");
            return None;
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let ep = endpoints[(first + i) % n];
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep)).await {
                Ok(Ok(s)) => return Some((s, ep)),
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %ep, error = %e, "endpoint refused; trying the next")
                }
                Err(_) => {
                    tracing::debug!(endpoint = %ep, "endpoint connect timed out; trying the next")
                }
            }
        }
        tracing::warn!(upstream = %self.service, endpoints = n, "no endpoint of the upstream is reachable");
        None
    }

    async fn serve(self: Arc<Self>, local: TcpStream, _slot: OwnedSemaphorePermit) {
        let shared = &self.shared;
        let Some((tcp, endpoint)) = self.connect().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let started = Instant::now();
        // SNI is off and the verifier checks the SPIFFE ID, so the name only keys the session
        // ticket cache: one entry per endpoint.
        let name = endpoint_name(endpoint);
        let connector = self.connector.load_full();
        let handshake = tokio::time::timeout(
            shared.limits.handshake_timeout,
            connector.connect(name, crate::bigreads::BigReads::new(tcp)),
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        let tls = match handshake {
            Err(_) => {
                m::handshake(Direction::Outbound, HandshakeResult::Timeout, elapsed);
                return;
            }
            Ok(Err(e)) => {
                let result = tls::classify(&e);
                m::handshake(Direction::Outbound, result, elapsed);
                tracing::warn!(upstream = %self.service, endpoint = %endpoint, result = result.as_str(), error = %e, "outbound handshake failed");
                return;
            }
            Ok(Ok(s)) => s,
        };
        let conn = tls.get_ref().1;
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            // The server's identity was verified when the ticket was issued; check its time
            // and its chain against our current roots again now.
            let chain = conn.peer_certificates().unwrap_or_default();
            let checked = tls::verify::reverify_resumed(
                &shared.credentials,
                chain,
                webpki::KeyUsage::server_auth(),
            )
            .and_then(|leaf| {
                if self.verifier.expects(&leaf.id) {
                    Ok(leaf)
                } else {
                    Err(tls::verify::VerifyError::WrongService)
                }
            });
            if let Err(e) = checked {
                m::handshake(Direction::Outbound, tls::verify::result_of(&e), elapsed);
                return;
            }
        }
        m::handshake(Direction::Outbound, HandshakeResult::Ok, elapsed);
        let close = shared.force_close.child_token();
        crate::inbound::forward(
            shared,
            Direction::Outbound,
            self.service.to_string(),
            tls,
            local,
            &close,
        )
        .await;
    }
}

/// A name unique to `endpoint`, to key the client's session ticket cache.
fn endpoint_name(endpoint: SocketAddr) -> ServerName<'static> {
    let ip = endpoint.ip().to_string().replace([':', '.'], "-");
    ServerName::try_from(format!("ep-{ip}-{}.ward", endpoint.port()))
        .unwrap_or_else(|_| ServerName::IpAddress(endpoint.ip().into()))
}
