//! Outbound: a plain listener on localhost per upstream; each connection (tcp) or each request
//! (http, see `http::outbound`) is carried over mTLS to one of the upstream's endpoints, which
//! must prove the upstream's exact identity.

use crate::connlog::LineBudget;
use crate::inputs::ProxyInputs;
use crate::metrics::{self as m, Direction, HandshakeResult};
use crate::mux;
use crate::tls;
use arc_swap::ArcSwap;
use rustls_pki_types::ServerName;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use ward_config::Name;

/// How long one TCP connect to an endpoint may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// At most one failed-handshake line per upstream this often; the next says how many were left
/// out.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);
/// The one ALPN protocol an http upstream's upgrade connections offer.
const UPGRADE_ALPN: &[u8] = b"http/1.1";
/// What the tunnel reads ahead while it waits for the server's first frame; h2's own reads are
/// larger and bypass it.
const FIRST_FRAME_READ: usize = 64;

pub struct Upstream {
    pub(crate) inputs: Arc<ProxyInputs>,
    pub service: Name,
    pub namespace: Name,
    verifier: Arc<tls::OutboundVerifier>,
    /// The one ALPN protocol offered: `ward-mux/1`, or `h2` for an http upstream.
    alpn: &'static [u8],
    /// Replaced (with an empty session cache) whenever our credentials change.
    connector: ArcSwap<TlsConnector>,
    /// An http upstream's connector for HTTP/1.1 upgrades: the same config with ALPN
    /// `http/1.1` (see `http::upgrade_out`), replaced with `connector`.
    upgrade_connector: Option<ArcSwap<TlsConnector>>,
    /// Static endpoints, or the catalog's (replaced on each update).
    pub endpoints: ArcSwap<Vec<SocketAddr>>,
    pub(crate) next: AtomicUsize,
    /// Tunnel connections to the endpoints (ward-mux/1); for an http upstream, only its memory
    /// of failed attempts and its one-handshake-at-a-time lock per endpoint.
    pub(crate) pool: mux::pool::Pool,
    /// `protocol = "http"`: the HTTP/2 connections to the endpoints.
    pub(crate) http: Option<crate::http::h2_pool::H2Pool>,
    /// An http upstream's request metrics (`peer` = the upstream's service).
    pub(crate) http_metrics: crate::http::request_metrics::RequestMetrics,
    /// The `:authority` of our tunnel streams.
    authority: String,
    failure_log: Arc<LineBudget>,
}

impl Upstream {
    pub fn new(
        inputs: Arc<ProxyInputs>,
        service: Name,
        namespace: Name,
        endpoints: Vec<SocketAddr>,
    ) -> Self {
        let verifier = Arc::new(tls::OutboundVerifier::new(
            inputs.credentials.clone(),
            namespace.clone(),
            service.clone(),
        ));
        let config =
            tls::config::client_config(inputs.credentials.clone(), verifier.clone(), mux::ALPN);
        let authority = mux::authority(&service, &namespace);
        let http_metrics = crate::http::request_metrics::RequestMetrics::new(
            Direction::Outbound,
            service.to_string(),
        );
        Self {
            verifier,
            inputs,
            service,
            namespace,
            alpn: mux::ALPN,
            connector: ArcSwap::from_pointee(TlsConnector::from(config)),
            upgrade_connector: None,
            endpoints: ArcSwap::from_pointee(endpoints),
            next: AtomicUsize::new(0),
            pool: mux::pool::Pool::default(),
            http: None,
            http_metrics,
            authority,
            failure_log: Arc::new(LineBudget::new(1, FAILURE_LOG_EVERY)),
        }
    }

    /// This upstream serving `protocol = "http"`: the app's requests, each to an endpoint over
    /// a pooled HTTP/2 connection (ALPN `h2`, never the tunnel); an HTTP/1.1 upgrade over a
    /// connection of its own (ALPN `http/1.1`).
    pub fn serving_http(mut self) -> Self {
        self.alpn = b"h2";
        self.connector = ArcSwap::from_pointee(self.new_connector(self.alpn));
        self.upgrade_connector = Some(ArcSwap::from_pointee(self.new_connector(UPGRADE_ALPN)));
        self.http = Some(crate::http::h2_pool::H2Pool::default());
        self
    }

    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        self.follow_credentials();
        let inputs = self.inputs.clone();
        crate::listener::accept_loop(listener, inputs, move |tcp, _peer, permit| {
            let upstream = self.clone();
            async move {
                if upstream.http.is_some() {
                    crate::http::outbound::serve(upstream, tcp, permit).await
                } else {
                    upstream.serve(tcp, permit).await
                }
            }
        })
        .await
    }

    /// A connector offering `alpn` alone, with a new session cache.
    fn new_connector(&self, alpn: &[u8]) -> TlsConnector {
        let config = tls::config::client_config(
            self.inputs.credentials.clone(),
            self.verifier.clone(),
            alpn,
        );
        TlsConnector::from(config)
    }

    /// Keeps the connectors current with our certificate and roots, until the proxy stops.
    pub(crate) fn follow_credentials(self: &Arc<Self>) {
        tokio::spawn(self.clone().renew_connector_on_new_credentials());
    }

    /// A fresh client config (and session cache) whenever our certificate or roots change.
    async fn renew_connector_on_new_credentials(self: Arc<Self>) {
        let mut changed = self.inputs.credentials.subscribe();
        loop {
            tokio::select! {
                _ = self.inputs.drain.force_close.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
            self.connector
                .store(Arc::new(self.new_connector(self.alpn)));
            if let Some(upgrades) = &self.upgrade_connector {
                upgrades.store(Arc::new(self.new_connector(UPGRADE_ALPN)));
            }
            // Tunnels opened with the old certificate or roots take no new streams (nor do
            // HTTP/2 connections new requests).
            self.pool.retire_all();
            if let Some(http) = &self.http {
                http.retire_all();
            }
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
            match self.open_via(ep, None, &self.authority).await {
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
            match self.open_via(ep, Some(started), &self.authority).await {
                Attempt::Open(carrier) => return Some(carrier),
                Attempt::Failed => return None,
                Attempt::Unreachable | Attempt::Skipped => {}
            }
        }
        tracing::warn!(upstream = %self.service, endpoints = n, "no endpoint of the upstream is reachable");
        None
    }

    /// A stream naming `authority` to `ep`, or a plain connection to it;
    /// `retry_failed_before`: see [`mux::pool::Pool::opening`].
    async fn open_via(
        &self,
        ep: SocketAddr,
        retry_failed_before: Option<Instant>,
        authority: &str,
    ) -> Attempt {
        if self.pool.prefers_plain(ep) {
            // No tunnel there lately: a connection per client connection, not serialized.
            return match self.open_tunnel(ep).await {
                Ok(slot) => self.open_stream(slot, authority).await,
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
            match self.open_stream(slot, authority).await {
                Attempt::Failed => continue,
                done => return done,
            }
        }
        Attempt::Unreachable
    }

    async fn open_stream(&self, slot: mux::pool::StreamSlot, authority: &str) -> Attempt {
        match slot
            .open(authority, self.inputs.limits.handshake_timeout)
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
        let result = match self.handshake(ep, &self.connector).await {
            Err(attempt) => Err(attempt),
            Ok((tls, accepted)) if tls.get_ref().1.alpn_protocol() != Some(mux::ALPN) => {
                self.pool.note_plain(ep, true);
                // Counted at the server's first record or alert, while the bytes flow.
                let tls = Answered {
                    tls: Box::new(tls),
                    unanswered: Some(accepted.unanswered),
                };
                Err(Attempt::Open(Carrier::Plain(Box::new(tls))))
            }
            Ok((tls, accepted)) => {
                self.pool.note_plain(ep, false);
                // Only a tunnel outlives this client connection: it is retired when any
                // certificate on the server's verified path expires, not only the leaf.
                let not_after = accepted.not_after;
                match first_frame(tls, accepted.unanswered, accepted.deadline).await {
                    None => Err(Attempt::Failed),
                    Some(tls) => self
                        .pool
                        .add(&self.inputs, ep, tls, not_after, generation)
                        .await
                        .map_err(|e| {
                            tracing::warn!(upstream = %self.service, endpoint = %ep, error = %e, "tunnel setup failed");
                            Attempt::Failed
                        }),
                }
            }
        };
        let ok = !matches!(result, Err(Attempt::Failed | Attempt::Unreachable));
        self.pool.attempted(ep, ok);
        result
    }

    /// [`Self::handshake`] for an http upstream, offering `h2` (or, `upgrade`, `http/1.1`);
    /// `Err(true)`: the endpoint did not answer the TCP connect, `Err(false)`: the handshake
    /// failed (counted and logged).
    pub(crate) async fn handshake_http(
        &self,
        ep: SocketAddr,
        upgrade: bool,
    ) -> Result<(MeshStream, Accepted), bool> {
        let connector = match &self.upgrade_connector {
            Some(upgrades) if upgrade => upgrades,
            _ => &self.connector,
        };
        self.handshake(ep, connector)
            .await
            .map_err(|a| matches!(a, Attempt::Unreachable))
    }

    /// TCP connect and mutual TLS handshake to `ep` with `connector`, accepted on our side;
    /// counted once the server has answered it (see [`Unanswered`]). A failure on our side is
    /// counted here.
    async fn handshake(
        &self,
        ep: SocketAddr,
        connector: &ArcSwap<TlsConnector>,
    ) -> Result<(MeshStream, Accepted), Attempt> {
        let inputs = &self.inputs;
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
        let mut unanswered = Unanswered {
            upstream: self.service.clone(),
            endpoint: ep,
            started,
            finished: None,
            group: "none",
            log: self.failure_log.clone(),
        };
        // SNI is off and the verifier checks the SPIFFE ID, so the name only keys the session
        // ticket cache: one entry per endpoint.
        let name = endpoint_name(ep);
        let connector = connector.load_full();
        let handshake = tokio::time::timeout(
            inputs.limits.handshake_timeout,
            connector.connect(name, crate::tls::large_reads::LargeReads::new(tcp)),
        )
        .await;
        let tls = match handshake {
            Err(_) => {
                let why = "no handshake within handshake_timeout";
                unanswered.settle(HandshakeResult::Timeout, None, &why);
                return Err(Attempt::Failed);
            }
            Ok(Err(e)) => {
                let alert = tls::verify::received_alert(&e);
                unanswered.settle(tls::verify::classify_refusal(&e), alert, &e);
                return Err(Attempt::Failed);
            }
            Ok(Ok(s)) => s,
        };
        unanswered.finished = Some(Instant::now());
        unanswered.group =
            tls::provider::group_name(tls.get_ref().1.negotiated_key_exchange_group());
        let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        // The path the verifier built for the server's chain if it is valid now, else (a
        // resumed session, say) a full verification against our current roots at the current
        // time; and the upstream's identity, which the verifier checked only in a full one.
        let checked =
            tls::verify::session_peer(&inputs.credentials, chain, webpki::KeyUsage::server_auth())
                .and_then(|peer| {
                    if self.verifier.expects(&peer.leaf.id) {
                        Ok(peer)
                    } else {
                        Err(tls::verify::VerifyError::WrongService)
                    }
                });
        match checked {
            Ok(peer) => Ok((
                tls,
                Accepted {
                    not_after: peer.not_after,
                    deadline: started + inputs.limits.handshake_timeout,
                    unanswered,
                },
            )),
            Err(e) => {
                let result = tls::verify::result_of(&e);
                unanswered.settle(result, None, &e);
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
        self.carry(local, carrier).await
    }

    /// Carries one redirected connection (transparent outbound) to the sidecar at `ep`, as a
    /// tunnel stream naming `authority`: no other endpoint is tried, since the app chose this
    /// one's address.
    pub(crate) async fn serve_at(
        self: Arc<Self>,
        local: TcpStream,
        ep: SocketAddr,
        authority: String,
        _slot: OwnedSemaphorePermit,
    ) {
        // A failure remembered from another connection does not refuse this one: the app
        // asked for this address and nothing else can serve it.
        let opened = Box::pin(self.open_via(ep, Some(Instant::now()), &authority)).await;
        let Attempt::Open(carrier) = opened else {
            tracing::debug!(upstream = %self.service, endpoint = %ep, "transparent destination not reachable");
            return;
        };
        self.carry(local, carrier).await
    }

    async fn carry(&self, local: TcpStream, carrier: Carrier) {
        let inputs = &self.inputs;
        let close = inputs.drain.force_close.child_token();
        let peer = self.service.to_string();
        match carrier {
            Carrier::Stream(stream) => {
                m::mux_stream(Direction::Outbound, true);
                let idle = inputs.limits.idle_timeout;
                crate::forward::forward_with(Direction::Outbound, peer, None, |rx, tx| {
                    mux::io::forward(stream, local, idle, &close, rx, tx)
                })
                .await
            }
            Carrier::Plain(tls) => {
                let (direction, close) = (Direction::Outbound, &close);
                crate::forward::forward(inputs, direction, peer, None, tls, local, close).await
            }
        }
    }
}

pub(crate) type MeshStream =
    tokio_rustls::client::TlsStream<crate::tls::large_reads::LargeReads<TcpStream>>;

/// What carries one client connection to the upstream.
enum Carrier {
    /// A stream on a pooled tunnel.
    Stream(mux::io::StreamIo),
    /// A connection of its own (the peer did not select `ward-mux/1`).
    Plain(Box<Answered>),
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

/// Our side of a handshake is done and accepted the server.
pub(crate) struct Accepted {
    /// The end of the server's verified path (Unix seconds).
    pub(crate) not_after: i64,
    /// When the handshake timeout (counted from the TCP connect) runs out.
    pub(crate) deadline: Instant,
    pub(crate) unanswered: Unanswered,
}

/// A handshake not counted yet: in TLS 1.3 the server judges our certificate after our
/// Finished, so its refusal (an alert) arrives after our side of the handshake is done. A tunnel
/// waits for the server's first frame or that alert; a plain connection counts at the server's
/// first record or alert without holding the client's bytes back.
pub(crate) struct Unanswered {
    upstream: Name,
    endpoint: SocketAddr,
    /// From the TCP connect to the end of our side of the handshake: the duration recorded.
    started: Instant,
    finished: Option<Instant>,
    /// The key-exchange group our side of the handshake agreed on.
    group: &'static str,
    log: Arc<LineBudget>,
}

impl Unanswered {
    /// Counts the handshake as `result` on `direction="outbound"`; any other result than ok is
    /// logged at warn, naming the alert the server sent, if it sent one.
    pub(crate) fn settle(
        self,
        result: HandshakeResult,
        alert: Option<rustls::AlertDescription>,
        error: &dyn std::fmt::Display,
    ) {
        let finished = self.finished.unwrap_or_else(Instant::now);
        let seconds = finished.duration_since(self.started).as_secs_f64();
        m::handshake(Direction::Outbound, result, seconds);
        if result == HandshakeResult::Ok {
            m::key_exchange(Direction::Outbound, self.group);
            return;
        }
        let Some(left_out) = self.log.admit() else {
            return;
        };
        let (upstream, endpoint, result) = (&self.upstream, self.endpoint, result.as_str());
        match alert {
            Some(alert) => tracing::warn!(
                %upstream, %endpoint, alert = %tls::verify::alert_name(alert), result, left_out,
                "the upstream refused our handshake"
            ),
            None => tracing::warn!(
                %upstream, %endpoint, result, %error, left_out, "outbound handshake failed"
            ),
        }
    }
}

/// Waits for the tunnel's (or an http upstream's HTTP/2 connection's) first frame (the server's
/// SETTINGS, which it sends without waiting for ours) or the server's refusal, and counts the
/// handshake. HTTP/2 needs SETTINGS before its first stream anyway, so this costs no round trip.
pub(crate) async fn first_frame(
    tls: MeshStream,
    unanswered: Unanswered,
    deadline: Instant,
) -> Option<BufReader<MeshStream>> {
    let mut tls = BufReader::with_capacity(FIRST_FRAME_READ, tls);
    let answer = async { tls.fill_buf().await.map(|first| !first.is_empty()) };
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(true)) => {
            unanswered.settle(HandshakeResult::Ok, None, &"");
            Some(tls)
        }
        Ok(Ok(false)) => {
            let why = "closed the connection before the tunnel's first frame";
            unanswered.settle(HandshakeResult::Error, None, &why);
            None
        }
        Ok(Err(e)) => {
            let alert = tls::verify::received_alert(&e);
            unanswered.settle(tls::verify::classify_refusal(&e), alert, &e);
            None
        }
        Err(_) => {
            let why = "no tunnel frame within handshake_timeout";
            unanswered.settle(HandshakeResult::Timeout, None, &why);
            None
        }
    }
}

/// A plain connection whose handshake is counted at the server's first record: a session
/// ticket or data (it took our certificate), its clean close, or an alert (it refused it).
pub(crate) struct Answered {
    tls: Box<MeshStream>,
    unanswered: Option<Unanswered>,
}

impl Answered {
    pub(crate) fn new(tls: MeshStream, unanswered: Unanswered) -> Self {
        Self {
            tls: Box::new(tls),
            unanswered: Some(unanswered),
        }
    }

    fn settle(&mut self, result: HandshakeResult, error: Option<&io::Error>) {
        if let Some(unanswered) = self.unanswered.take() {
            let alert = error.and_then(tls::verify::received_alert);
            unanswered.settle(
                result,
                alert,
                &error.map_or(String::new(), |e| e.to_string()),
            );
        }
    }

    fn settle_on_error<T>(&mut self, polled: &Poll<io::Result<T>>) {
        if let Poll::Ready(Err(e)) = polled {
            self.settle(tls::verify::classify_refusal(e), Some(e));
        }
    }
}

impl Drop for Answered {
    /// The connection ended before the server said anything: it never refused us.
    fn drop(&mut self) {
        self.settle(HandshakeResult::Ok, None);
    }
}

impl AsyncRead for Answered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut *self.tls).poll_read(cx, buf);
        if self.unanswered.is_some() {
            match &polled {
                Poll::Ready(Ok(())) => self.settle(HandshakeResult::Ok, None),
                Poll::Pending if self.tls.get_ref().1.tls13_tickets_received() > 0 => {
                    self.settle(HandshakeResult::Ok, None)
                }
                _ => self.settle_on_error(&polled),
            }
        }
        polled
    }
}

impl AsyncWrite for Answered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.tls).poll_write(cx, buf);
        self.settle_on_error(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.tls).poll_write_vectored(cx, bufs);
        self.settle_on_error(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut *self.tls).poll_flush(cx);
        self.settle_on_error(&polled);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.tls).poll_shutdown(cx)
    }
}
