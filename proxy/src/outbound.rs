//! Outbound: a plain listener on localhost per upstream; each connection is carried over mTLS
//! to one of the upstream's endpoints, which must prove the upstream's exact identity.

use crate::metrics::{self as m, Direction, HandshakeResult};
use crate::mux;
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
    /// Tunnel connections to the endpoints (ward-mux/1).
    pool: mux::pool::Pool,
    /// The `:authority` of our tunnel streams.
    authority: String,
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
        let authority = mux::authority(&service, &namespace);
        Self {
            verifier,
            shared,
            service,
            namespace,
            connector: ArcSwap::from_pointee(TlsConnector::from(config)),
            endpoints: ArcSwap::from_pointee(endpoints),
            next: AtomicUsize::new(0),
            pool: mux::pool::Pool::default(),
            authority,
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
            // Tunnels opened with the old certificate or roots take no new streams.
            self.pool.retire_all();
        }
    }

    /// Round robin over the endpoints; a stream on a pooled tunnel to the chosen one, or a
    /// new connection to it; the next endpoint when one cannot be reached or failed lately.
    async fn open(&self) -> Option<Carrier> {
        let endpoints = self.endpoints.load_full();
        let n = endpoints.len();
        if n == 0 {
            tracing::warn!(upstream = %self.service, "the upstream has no endpoints");
            return None;
        }
        let started = Instant::now();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut skipped = Vec::new();
        for i in 0..n {
            let ep = endpoints[(first + i) % n];
            match self.open_via(ep, None).await {
                Attempt::Open(carrier) => return Some(carrier),
                Attempt::Failed => return None,
                Attempt::Unreachable => {}
                Attempt::Skipped => skipped.push(ep),
            }
        }
        // Skipping endpoints that failed lately must never leave the upstream with nothing to
        // try (Envoy's panic threshold): every endpoint is marked bad, so try those anyway,
        // except one whose failure this connection saw itself (it queued behind that attempt).
        for ep in skipped {
            match self.open_via(ep, Some(started)).await {
                Attempt::Open(carrier) => return Some(carrier),
                Attempt::Failed => return None,
                Attempt::Unreachable | Attempt::Skipped => {}
            }
        }
        tracing::warn!(upstream = %self.service, endpoints = n, "no endpoint of the upstream is reachable");
        None
    }

    /// `retry_failed_before`: see [`mux::pool::Pool::opening`].
    async fn open_via(&self, ep: SocketAddr, retry_failed_before: Option<Instant>) -> Attempt {
        if self.pool.prefers_plain(ep) {
            // No tunnel there lately: a connection per client connection, not serialized.
            return match self.open_tunnel(ep).await {
                Ok(slot) => self.open_stream(slot).await,
                Err(attempt) => attempt,
            };
        }
        // A pooled connection can be found dead only when a stream is opened on it: one more
        // try on another (or a new) connection, then the next endpoint.
        for _ in 0..2 {
            let slot = match self.pool.reserve(ep) {
                Some(slot) => slot,
                None => {
                    let Some(_opening) = self.pool.opening(ep, retry_failed_before).await else {
                        return Attempt::Skipped;
                    };
                    match self.pool.reserve(ep) {
                        Some(slot) => slot,
                        None => match self.open_tunnel(ep).await {
                            Ok(slot) => slot,
                            Err(attempt) => return attempt,
                        },
                    }
                }
            };
            match self.open_stream(slot).await {
                Attempt::Failed => continue,
                done => return done,
            }
        }
        Attempt::Unreachable
    }

    async fn open_stream(&self, slot: mux::pool::StreamSlot) -> Attempt {
        match slot
            .open(&self.authority, self.shared.limits.handshake_timeout)
            .await
        {
            Ok(stream) => Attempt::Open(Carrier::Stream(stream)),
            Err(e) => {
                tracing::debug!(upstream = %self.service, error = %e, "tunnel stream could not be opened");
                Attempt::Failed
            }
        }
    }

    /// A new connection to `ep`: a tunnel (its first stream's slot) or, when the peer does not
    /// select `ward-mux/1`, a plain connection for this one client connection.
    async fn open_tunnel(&self, ep: SocketAddr) -> Result<mux::pool::StreamSlot, Attempt> {
        // Read before the connector: a rotation during the handshake retires this connection.
        let generation = self.pool.generation();
        let result = match self.handshake(ep).await {
            Err(attempt) => Err(attempt),
            Ok((tls, _)) if tls.get_ref().1.alpn_protocol() != Some(mux::ALPN) => {
                self.pool.note_plain(ep, true);
                Err(Attempt::Open(Carrier::Plain(Box::new(tls))))
            }
            Ok((tls, not_after)) => {
                self.pool.note_plain(ep, false);
                // Only a tunnel outlives this client connection: it is retired when any
                // certificate on the server's verified path expires, not only the leaf.
                self.pool
                    .add(&self.shared, ep, tls, not_after, generation)
                    .await
                    .map_err(|e| {
                        tracing::warn!(upstream = %self.service, endpoint = %ep, error = %e, "tunnel setup failed");
                        Attempt::Failed
                    })
            }
        };
        let ok = !matches!(result, Err(Attempt::Failed | Attempt::Unreachable));
        self.pool.attempted(ep, ok);
        result
    }

    /// TCP connect and mutual TLS handshake to `ep`; the end of the server's verified path.
    async fn handshake(&self, ep: SocketAddr) -> Result<(MeshStream, i64), Attempt> {
        let shared = &self.shared;
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %ep, error = %e, "endpoint refused; trying the next");
                return Err(Attempt::Unreachable);
            }
            Err(_) => {
                tracing::debug!(endpoint = %ep, "endpoint connect timed out; trying the next");
                return Err(Attempt::Unreachable);
            }
        };
        let _ = tcp.set_nodelay(true);
        let started = Instant::now();
        // SNI is off and the verifier checks the SPIFFE ID, so the name only keys the session
        // ticket cache: one entry per endpoint.
        let name = endpoint_name(ep);
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
                return Err(Attempt::Failed);
            }
            Ok(Err(e)) => {
                let result = tls::classify(&e);
                m::handshake(Direction::Outbound, result, elapsed);
                tracing::warn!(upstream = %self.service, endpoint = %ep, result = result.as_str(), error = %e, "outbound handshake failed");
                return Err(Attempt::Failed);
            }
            Ok(Ok(s)) => s,
        };
        let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        // The path the verifier built for the server's chain if it is valid now, else (a
        // resumed session, say) a full verification against our current roots at the current
        // time; and the upstream's identity, which the verifier checked only in a full one.
        let checked =
            tls::verify::session_peer(&shared.credentials, chain, webpki::KeyUsage::server_auth())
                .and_then(|peer| {
                    if self.verifier.expects(&peer.leaf.id) {
                        Ok(peer)
                    } else {
                        Err(tls::verify::VerifyError::WrongService)
                    }
                });
        match checked {
            Ok(peer) => {
                m::handshake(Direction::Outbound, HandshakeResult::Ok, elapsed);
                Ok((tls, peer.not_after))
            }
            Err(e) => {
                m::handshake(Direction::Outbound, tls::verify::result_of(&e), elapsed);
                Err(Attempt::Failed)
            }
        }
    }

    async fn serve(self: Arc<Self>, local: TcpStream, _slot: OwnedSemaphorePermit) {
        // Boxed: the handshake's state is large and needed only until the connection is
        // carried; the task then keeps only the copy's state for the connection's life.
        let Some(carrier) = Box::pin(self.open()).await else {
            return;
        };
        let shared = &self.shared;
        let close = shared.force_close.child_token();
        let peer = self.service.to_string();
        match carrier {
            Carrier::Stream(stream) => {
                m::mux_stream(Direction::Outbound, true);
                let idle = shared.limits.idle_timeout;
                crate::inbound::forward_with(Direction::Outbound, peer, |rx, tx| {
                    mux::io::forward(stream, local, idle, &close, rx, tx)
                })
                .await
            }
            Carrier::Plain(tls) => {
                crate::inbound::forward(shared, Direction::Outbound, peer, tls, local, &close).await
            }
        }
    }
}

type MeshStream = tokio_rustls::client::TlsStream<crate::bigreads::BigReads<TcpStream>>;

/// What carries one client connection to the upstream.
enum Carrier {
    /// A stream on a pooled tunnel.
    Stream(mux::io::StreamIo),
    /// A connection of its own (the peer did not select `ward-mux/1`).
    Plain(Box<MeshStream>),
}

enum Attempt {
    Open(Carrier),
    /// The endpoint did not answer the TCP connect: try the next one.
    Unreachable,
    /// The endpoint answered but the connection failed (handshake refused, tunnel refused).
    Failed,
    /// Not tried: an attempt to reach the endpoint failed lately.
    Skipped,
}

/// A name unique to `endpoint`, to key the client's session ticket cache.
fn endpoint_name(endpoint: SocketAddr) -> ServerName<'static> {
    let ip = endpoint.ip().to_string().replace([':', '.'], "-");
    ServerName::try_from(format!("ep-{ip}-{}.ward", endpoint.port()))
        .unwrap_or_else(|_| ServerName::IpAddress(endpoint.ip().into()))
}
