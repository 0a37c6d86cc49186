//! Inbound: terminate mTLS, decide in the handshake, forward allowed connections to the app.

use crate::copy::{self, CopyEnd};
use crate::metrics::{self as m, Direction, HandshakeResult};
use crate::shared::Shared;
use crate::tls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use ward_config::identity::escape_peer_value;

/// How long connecting to `local_app` may take.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Inbound {
    shared: Arc<Shared>,
    /// For clients that do not offer `ward-mux/1`: plain L4, no ALPN.
    plain: Arc<rustls::ServerConfig>,
    /// For ward outbounds that offer it (security rule 9, a multiplexed tunnel between
    /// sidecars, docs/security.md: chosen by ALPN only).
    mux: Arc<rustls::ServerConfig>,
    local_app: SocketAddr,
}

impl Inbound {
    pub fn new(
        shared: Arc<Shared>,
        local_app: SocketAddr,
        tickets: Option<Arc<tls::tickets::EpochTicketer>>,
    ) -> Self {
        let verifier = tls::InboundVerifier::new(
            shared.credentials.clone(),
            shared.intentions.clone(),
            shared.service.name.clone(),
        );
        let plain = tls::config::server_config(shared.credentials.clone(), verifier, tickets);
        let mut mux = (*plain).clone();
        mux.alpn_protocols = vec![crate::mux::ALPN.to_vec()];
        Self {
            shared,
            plain,
            mux: Arc::new(mux),
            local_app,
        }
    }

    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let shared = self.shared.clone();
        // Without a certificate no handshake can even start; leave callers in the backlog
        // until the first one arrives (then, before intentions, they get access_denied).
        let mut changed = shared.credentials.subscribe();
        while shared.credentials.load().is_none() {
            tokio::select! {
                _ = shared.stop_accepting.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
        }
        crate::listener::accept_loop(listener, shared, move |tcp, peer, permit| {
            self.clone().serve(tcp, peer, permit)
        })
        .await
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, _slot: OwnedSemaphorePermit) {
        let shared = &self.shared;
        let started = Instant::now();
        let Some(pending) = shared.handshakes.begin(peer.ip()) else {
            tracing::debug!("pending handshake cap reached; connection refused");
            return;
        };
        let handshake =
            tokio::time::timeout(shared.limits.handshake_timeout, self.handshake(tcp)).await;
        drop(pending);
        let elapsed = started.elapsed().as_secs_f64();
        let tls = match handshake {
            Err(_) => {
                m::handshake(Direction::Inbound, HandshakeResult::Timeout, elapsed);
                return;
            }
            Ok(Err(e)) => {
                let result = tls::classify(&e);
                m::handshake(Direction::Inbound, result, elapsed);
                tracing::debug!(result = result.as_str(), error = %e, "inbound handshake refused");
                return;
            }
            Ok(Ok(s)) => s,
        };

        let conn = tls.get_ref().1;
        let chain = conn.peer_certificates().unwrap_or_default();
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        // The path the verifier built for this chain (under the current roots, valid now), or
        // for a resumed session (security rule 8, resumption and early data, docs/security.md)
        // a full verification when it has none: current roots, current time. A resumed session
        // then asks the current intentions too, before any byte reaches local_app.
        let checked =
            tls::verify::session_peer(&shared.credentials, chain, webpki::KeyUsage::client_auth())
                .map_err(|e| tls::verify::result_of(&e))
                .and_then(|session| {
                    if !resumed
                        || shared
                            .intentions
                            .authorize(&session.leaf.id, &shared.service.name)
                    {
                        Ok(session)
                    } else {
                        Err(HandshakeResult::Denied)
                    }
                });
        let session = match checked {
            Ok(session) => session,
            Err(result) => {
                m::handshake(Direction::Inbound, result, elapsed);
                tracing::debug!(
                    result = result.as_str(),
                    resumed,
                    "inbound session refused after its handshake"
                );
                // The handshake is over, so no alert can carry the reason; close cleanly.
                let mut tls = tls;
                tls.get_mut().1.send_close_notify();
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                return;
            }
        };
        m::handshake(Direction::Inbound, HandshakeResult::Ok, elapsed);
        let peer_id = session.leaf.id;
        let registration = shared.connections.register(
            peer_id.clone(),
            shared.force_close.child_token(),
            &shared.intentions,
            &shared.service.name,
        );
        if registration.close.is_cancelled() {
            return;
        }
        if tls.get_ref().1.alpn_protocol() == Some(crate::mux::ALPN) {
            tracing::debug!(peer = %escape_peer_value(&peer_id.to_string()), "inbound tunnel admitted");
            let peer = crate::mux::server::TunnelPeer {
                id: peer_id,
                not_after: session.not_after,
            };
            let close = registration.close.clone();
            crate::mux::server::serve(shared.clone(), self.local_app, tls, peer, close).await;
            return;
        }

        let Some(app) = connect_app(self.local_app).await else {
            return;
        };

        let peer_name = peer_id.service.to_string();
        tracing::debug!(peer = %escape_peer_value(&peer_id.to_string()), "inbound connection admitted");
        forward(
            shared,
            Direction::Inbound,
            peer_name,
            tls,
            app,
            &registration.close,
        )
        .await;
    }
}

impl Inbound {
    /// Reads the ClientHello first, so the tunnel is offered only to a client that asks for
    /// it by ALPN (a plain client offering other protocols still gets plain L4).
    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<crate::bigreads::BigReads<TcpStream>>>
    {
        let acceptor = rustls::server::Acceptor::default();
        let start =
            tokio_rustls::LazyConfigAcceptor::new(acceptor, crate::bigreads::BigReads::new(tcp))
                .await?;
        let offers_mux = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == crate::mux::ALPN));
        let config = if offers_mux { &self.mux } else { &self.plain };
        start.into_stream(config.clone()).await
    }
}

/// Connects to `local_app` for an admitted connection or stream.
pub(crate) async fn connect_app(local_app: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(local_app)).await {
        Ok(Ok(app)) => {
            let _ = app.set_nodelay(true);
            Some(app)
        }
        Ok(Err(e)) => {
            tracing::warn!(local_app = %local_app, error = %e, "cannot connect to local_app");
            None
        }
        Err(_) => {
            tracing::warn!(local_app = %local_app, "connecting to local_app timed out");
            None
        }
    }
}

/// Forwards one admitted connection and keeps the connection metrics.
pub(crate) async fn forward<P, L>(
    shared: &Shared,
    direction: Direction,
    peer: String,
    peer_io: P,
    local_io: L,
    close: &tokio_util::sync::CancellationToken,
) where
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let idle = shared.limits.idle_timeout;
    forward_with(direction, peer, |rx, tx| async move {
        copy::bidirectional(peer_io, local_io, idle, close, &rx, &tx).await
    })
    .await
}

/// Keeps the connection metrics around `copy`, which gets the rx and tx byte counters.
pub(crate) async fn forward_with<F, Fut>(direction: Direction, peer: String, copy: F)
where
    F: FnOnce(metrics::Counter, metrics::Counter) -> Fut,
    Fut: std::future::Future<Output = CopyEnd>,
{
    let d = direction.as_str();
    metrics::counter!(m::CONNECTIONS_OPENED, "direction" => d, "peer" => peer.clone()).increment(1);
    let active = metrics::gauge!(m::CONNECTIONS_ACTIVE, "direction" => d);
    active.increment(1.0);
    let rx = metrics::counter!(m::BYTES, "direction" => d, "peer" => peer.clone(), "flow" => "rx");
    let tx = metrics::counter!(m::BYTES, "direction" => d, "peer" => peer.clone(), "flow" => "tx");
    let end = copy(rx, tx).await;
    match end {
        CopyEnd::Done => {}
        CopyEnd::Idle => tracing::debug!(direction = d, "connection closed after idle_timeout"),
        CopyEnd::Closed => tracing::debug!(direction = d, "connection closed by the proxy"),
        CopyEnd::Failed(e) => {
            tracing::debug!(direction = d, error = %e, "connection ended with an error")
        }
    }
    active.decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "direction" => d, "peer" => peer).increment(1);
}
