//! The inbound side of a tunnel connection: every stream is a `CONNECT` to this service, and
//! goes to `local_app` (explicit inbound) or to the pod's own address at the port it names
//! (transparent inbound).

use super::io::StreamIo;
use super::keepalive::Keepalive;
use crate::connlog::ConnectionLog;
use crate::inputs::ProxyInputs;
use crate::metrics::{self as m, Direction};
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode, Uri};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use ward_config::identity::escape_peer_value;
use ward_config::SpiffeId;

/// Who is at the other end of a tunnel connection, as its handshake established.
pub struct TunnelPeer {
    pub id: SpiffeId,
    /// Its address, for the connection log.
    pub addr: SocketAddr,
    /// When the peer's chain stops being valid (Unix seconds; the earliest not_after of its
    /// leaf and the intermediates on its verified path): no stream is admitted after it.
    pub not_after: i64,
}

/// Where the streams of a tunnel connection may go (security rule 9, docs/security.md).
#[derive(Debug, Clone)]
pub enum Destination {
    /// An explicit inbound: every stream goes to `local_app`.
    LocalApp(SocketAddr),
    /// A transparent inbound: a stream naming `:PORT` goes to the pod's own address `ip` (where
    /// the tunnel connection arrived) at that port; one naming no port goes to `redirected`,
    /// the original destination port of the tunnel connection itself, if it was redirected.
    /// Never to loopback, another host, or a port of `never` (the proxy's own, and those the
    /// redirect leaves out).
    Pod {
        ip: IpAddr,
        redirected: Option<u16>,
        never: Arc<[RangeInclusive<u16>]>,
    },
}

impl Destination {
    /// Where a connection that names no port goes: `local_app`, or the redirected port.
    pub fn default_target(&self) -> Option<SocketAddr> {
        match self {
            Destination::LocalApp(app) => Some(*app),
            Destination::Pod { redirected, .. } => redirected.and_then(|p| self.pod_port(p)),
        }
    }

    /// The pod's own address at `port`, unless that would reach loopback, the proxy itself or a
    /// port the redirect leaves out.
    fn pod_port(&self, port: u16) -> Option<SocketAddr> {
        match self {
            Destination::Pod { ip, never, .. }
                if port != 0
                    && !ip.is_loopback()
                    && !ip.is_unspecified()
                    && !never.iter().any(|r| r.contains(&port)) =>
            {
                Some(SocketAddr::new(*ip, port))
            }
            _ => None,
        }
    }

    /// Where the stream `method uri` goes, or the status that refuses it before any connect.
    fn resolve(&self, method: &Method, uri: &Uri, target: &str) -> Result<SocketAddr, StatusCode> {
        match self {
            Destination::LocalApp(app) => check_request(method, uri, target).map(|()| *app),
            Destination::Pod { .. } => match check_transparent_request(method, uri, target)? {
                Some(port) => self.pod_port(port),
                None => self.default_target(),
            }
            .ok_or(StatusCode::MISDIRECTED_REQUEST),
        }
    }
}

/// Serves one tunnel connection until the peer closes it, `close` fires (intention deny, drain
/// deadline), it has carried no stream for `idle_timeout`, or the peer leaves a PING
/// unanswered (closed with its streams). A drain sends GOAWAY and lets the open streams finish.
pub async fn serve<T>(
    inputs: Arc<ProxyInputs>,
    destination: Destination,
    io: T,
    peer: TunnelPeer,
    close: CancellationToken,
    log: Arc<ConnectionLog>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = tokio::time::timeout(
        inputs.limits.handshake_timeout,
        super::server_builder(inputs.limits.max_tunnel_buffer_bytes).handshake::<_, Bytes>(io),
    )
    .await;
    let mut conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "tunnel preface failed");
            return;
        }
        Err(_) => {
            tracing::debug!("tunnel preface timed out");
            return;
        }
    };
    let tunnel = Arc::new(Tunnel {
        peer,
        target: super::authority(&inputs.service.name, &inputs.service.namespace).into(),
        streams: Arc::new(Semaphore::new(super::MAX_STREAMS as usize)),
        early_resets: AtomicUsize::new(0),
        calm: CancellationToken::new(),
        log,
    });
    let idle_timeout = inputs.limits.idle_timeout;
    let period = idle_timeout.clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut idle_check = tokio::time::interval(period);
    let mut idle_since = Instant::now();
    let (mut accepted, mut accepted_at_check) = (0u64, 0u64);
    let mut roots = inputs.credentials.subscribe_roots();
    let mut draining = false;
    let mut keepalive = Keepalive::new(conn.ping_pong(), inputs.limits.handshake_timeout);
    loop {
        let next = tokio::select! {
            biased;
            _ = close.cancelled() => {
                conn.abrupt_shutdown(h2::Reason::CANCEL);
                break;
            }
            _ = tunnel.calm.cancelled() => {
                tracing::info!(peer = %escape_peer_value(&tunnel.peer.id.to_string()), "tunnel closed: too many streams reset before their answer");
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                break;
            }
            _ = inputs.drain.stop_accepting.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            // The handshake checked the peer's chain against the roots of that moment: with new
            // roots, no new stream on this connection (open ones finish); the peer reconnects.
            r = roots.changed(), if !draining => {
                if r.is_ok() {
                    draining = true;
                    conn.graceful_shutdown();
                }
                continue;
            }
            _ = idle_check.tick(), if !draining => {
                if conn.has_streams() || accepted != accepted_at_check {
                    idle_since = Instant::now();
                    accepted_at_check = accepted;
                } else if idle_since.elapsed() >= idle_timeout {
                    draining = true;
                    conn.graceful_shutdown();
                }
                continue;
            }
            next = conn.accept() => next,
            // After `accept`, which reads the connection (and so any PONG).
            _ = keepalive.peer_gone() => {
                tracing::warn!(peer = %escape_peer_value(&tunnel.peer.id.to_string()), "tunnel peer did not answer a PING; closing the tunnel and its streams");
                conn.abrupt_shutdown(h2::Reason::CANCEL);
                break;
            }
        };
        match next {
            None => return,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "tunnel connection ended with an error");
                return;
            }
            Some(Ok((req, mut respond))) => {
                accepted += 1;
                // Our own bound on streams at work, whatever h2 counts: a stream the peer
                // resets keeps its slot until its task has ended.
                let Ok(slot) = tunnel.streams.clone().try_acquire_owned() else {
                    refuse_for_now(&mut respond);
                    continue;
                };
                let stream = Stream {
                    inputs: inputs.clone(),
                    destination: destination.clone(),
                    tunnel: tunnel.clone(),
                    close: close.child_token(),
                    _slot: slot,
                };
                inputs.drain.tracker.spawn(stream.run(req, respond));
            }
        }
    }
    // Let the GOAWAY reach the peer, briefly.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        std::future::poll_fn(|cx| conn.poll_closed(cx)),
    )
    .await;
}

/// What the streams of one tunnel connection share.
struct Tunnel {
    peer: TunnelPeer,
    /// `<service>.<namespace>` of this inbound: the only target a stream may name.
    target: Arc<str>,
    /// One permit per stream task.
    streams: Arc<Semaphore>,
    /// Streams the peer reset before they were answered; past the bound the tunnel closes.
    early_resets: AtomicUsize,
    calm: CancellationToken,
    /// Each stream is one connection in the connection log.
    log: Arc<ConnectionLog>,
}

struct Stream {
    inputs: Arc<ProxyInputs>,
    destination: Destination,
    tunnel: Arc<Tunnel>,
    close: CancellationToken,
    _slot: OwnedSemaphorePermit,
}

/// Security rule 9 (tunnel between sidecars, docs/security.md): a stream may only be a
/// `CONNECT` whose `:authority` is exactly `target` (this service's `<service>.<namespace>`);
/// anything else gets this status before any connect.
/// Public for the fuzz target only.
#[doc(hidden)]
pub fn check_request(method: &Method, uri: &Uri, target: &str) -> Result<(), StatusCode> {
    if method != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    if uri.authority().map(|a| a.as_str()) != Some(target) {
        return Err(StatusCode::MISDIRECTED_REQUEST);
    }
    Ok(())
}

/// Security rule 9 on a transparent inbound: a `CONNECT` whose `:authority` is exactly `target`
/// or `target:PORT` (the port in its plain decimal form); the port it names.
/// Public for the fuzz target only.
#[doc(hidden)]
pub fn check_transparent_request(
    method: &Method,
    uri: &Uri,
    target: &str,
) -> Result<Option<u16>, StatusCode> {
    if method != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(authority) = uri.authority() else {
        return Err(StatusCode::MISDIRECTED_REQUEST);
    };
    let named = authority.as_str();
    match authority.port_u16() {
        None if named == target => Ok(None),
        Some(port) if port != 0 && named == format!("{target}:{port}") => Ok(Some(port)),
        _ => Err(StatusCode::MISDIRECTED_REQUEST),
    }
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    m::mux_stream(Direction::Inbound, false);
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}

/// Refuses a stream the peer may retry (REFUSED_STREAM: nothing of it was processed).
fn refuse_for_now(respond: &mut SendResponse<Bytes>) {
    m::mux_stream(Direction::Inbound, false);
    respond.send_reset(h2::Reason::REFUSED_STREAM);
}

impl Stream {
    async fn run(self, req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
        let inputs = &self.inputs;
        // Security rule 9 (tunnel between sidecars, docs/security.md): only a CONNECT to this
        // service (and on a transparent inbound, a port of the pod); anything else is refused
        // before any connect.
        let app_addr = match self
            .destination
            .resolve(req.method(), req.uri(), &self.tunnel.target)
        {
            Ok(addr) => addr,
            Err(status) => {
                if status == StatusCode::MISDIRECTED_REQUEST {
                    tracing::debug!(
                        target = %escape_peer_value(&req.uri().to_string()),
                        "tunnel stream names another target; refused"
                    );
                }
                return refuse(&mut respond, status);
            }
        };
        // The handshake checked the peer's certificate; a stream opened later still needs it
        // to be valid, and the current intentions to allow it.
        let peer = &self.tunnel.peer;
        if crate::now_unix() > peer.not_after {
            return refuse(&mut respond, StatusCode::FORBIDDEN);
        }
        if !inputs.intentions.authorize(&peer.id, &inputs.service.name) || self.close.is_cancelled()
        {
            return refuse(&mut respond, StatusCode::FORBIDDEN);
        }
        // A stream that arrived while our GOAWAY was on its way: the peer may retry it.
        if inputs.drain.stop_accepting.is_cancelled() {
            return refuse_for_now(&mut respond);
        }
        let Ok(_slot) = inputs.conn_slots.clone().try_acquire_owned() else {
            tracing::debug!("max_connections reached; tunnel stream refused");
            return refuse_for_now(&mut respond);
        };
        let connected = tokio::select! {
            app = crate::forward::connect_app(app_addr) => Some(app),
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => None,
        };
        let app = match connected {
            Some(Some(app)) => app,
            Some(None) => return refuse(&mut respond, StatusCode::BAD_GATEWAY),
            None => {
                // Reset by the peer before the answer: counted against the tunnel's budget.
                m::mux_stream(Direction::Inbound, false);
                let n = self.tunnel.early_resets.fetch_add(1, Ordering::Relaxed) + 1;
                if n > super::MAX_EARLY_RESETS {
                    self.tunnel.calm.cancel();
                }
                return;
            }
        };
        // A deny may have landed while we connected.
        if self.close.is_cancelled() {
            m::mux_stream(Direction::Inbound, false);
            return;
        }
        let Ok(send) = respond.send_response(Response::new(()), false) else {
            return;
        };
        m::mux_stream(Direction::Inbound, true);
        let stream = StreamIo::accepted(send, req.into_body());
        let idle = inputs.limits.idle_timeout;
        let close = &self.close;
        let admitted = self.tunnel.log.admitted(peer.addr, &peer.id);
        let name = peer.id.service.to_string();
        crate::forward::forward_with(Direction::Inbound, name, admitted, |rx, tx| {
            super::io::forward(stream, app, idle, close, rx, tx)
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{ca, id, inputs, intentions, store_for};
    use tokio::net::{TcpListener, TcpStream};
    use ward_config::intentions::Action;

    fn check(method: Method, uri: &str) -> Result<(), StatusCode> {
        check_request(&method, &uri.parse().unwrap(), "web.default")
    }

    #[test]
    fn only_a_connect_to_this_service_passes() {
        assert_eq!(check(Method::CONNECT, "web.default"), Ok(()));
        assert_eq!(
            check(Method::GET, "web.default"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        for other in [
            "api.default",
            "web.default:443",
            "user@web.default",
            "WEB.default",
            "web.default.",
            "/web.default",
        ] {
            assert_eq!(
                check(Method::CONNECT, other),
                Err(StatusCode::MISDIRECTED_REQUEST),
                "{other}"
            );
        }
    }

    #[test]
    fn a_transparent_stream_names_this_service_and_at_most_a_plain_port() {
        let check = |method: Method, uri: &str| {
            check_transparent_request(&method, &uri.parse().unwrap(), "web.default")
        };
        assert_eq!(check(Method::CONNECT, "web.default"), Ok(None));
        assert_eq!(check(Method::CONNECT, "web.default:8080"), Ok(Some(8080)));
        assert_eq!(
            check(Method::GET, "web.default:8080"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        for other in [
            "api.default:8080",
            "web.default:0",
            "web.default:08080",
            "web.default:+80",
            "user@web.default:8080",
            "WEB.default:8080",
            "web.default.:8080",
            "/web.default:8080",
        ] {
            assert_eq!(
                check(Method::CONNECT, other),
                Err(StatusCode::MISDIRECTED_REQUEST),
                "{other}"
            );
        }
    }

    #[test]
    fn a_transparent_destination_is_the_pods_own_address_never_loopback_or_the_proxy() {
        let pod = |ip: &str, redirected: Option<u16>| Destination::Pod {
            ip: ip.parse().unwrap(),
            redirected,
            never: vec![15001..=15001, 15006..=15006, 19000..=19000, 22..=23].into(),
        };
        let resolve = |d: &Destination, authority: &str| {
            d.resolve(&Method::CONNECT, &authority.parse().unwrap(), "web.default")
        };
        let b = pod("10.0.0.3", None);
        assert_eq!(
            resolve(&b, "web.default:8080"),
            Ok("10.0.0.3:8080".parse().unwrap())
        );
        // No port named, and the tunnel connection itself was not redirected: nowhere to go.
        assert_eq!(
            resolve(&b, "web.default"),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(b.default_target(), None);
        // The proxy's own listeners, and ports the redirect leaves out, are never a destination.
        for own in ["web.default:15006", "web.default:19000", "web.default:23"] {
            assert_eq!(
                resolve(&b, own),
                Err(StatusCode::MISDIRECTED_REQUEST),
                "{own}"
            );
        }
        // A connection redirected from port 8443 goes there, and so do its streams naming no port.
        let redirected = pod("fd00::3", Some(8443));
        assert_eq!(
            redirected.default_target(),
            Some("[fd00::3]:8443".parse().unwrap())
        );
        assert_eq!(
            resolve(&redirected, "web.default"),
            Ok("[fd00::3]:8443".parse().unwrap())
        );
        // A tunnel that arrived over loopback would reach apps bound to loopback only: refused.
        for ip in ["127.0.0.1", "::1", "0.0.0.0"] {
            let local = pod(ip, Some(8080));
            assert_eq!(local.default_target(), None, "{ip}");
            assert_eq!(
                resolve(&local, "web.default:8080"),
                Err(StatusCode::MISDIRECTED_REQUEST),
                "{ip}"
            );
        }
        // An explicit inbound still takes no port at all.
        let app: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let explicit = Destination::LocalApp(app);
        assert_eq!(resolve(&explicit, "web.default"), Ok(app));
        assert_eq!(
            resolve(&explicit, "web.default:8080"),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
    }

    /// A local_app that echoes what each connection sends.
    async fn echo_app() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// A tunnel from `order` (its chain valid until `not_after`) to `inventory`'s inbound,
    /// whose intentions allow `allowed`, in front of `local_app`.
    async fn tunnel(
        allowed: &[&str],
        not_after: i64,
        local_app: SocketAddr,
    ) -> (Arc<ProxyInputs>, h2::client::SendRequest<Bytes>) {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let credentials = store_for("inventory", &int, &[&root]);
        let inputs = inputs("inventory", credentials, intentions(Action::Deny, allowed));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, addr) = listener.accept().await.unwrap();
        let peer = TunnelPeer {
            id: id("order"),
            addr,
            not_after,
        };
        let close = CancellationToken::new();
        let log = Arc::new(ConnectionLog::new(false));
        tokio::spawn(serve(
            inputs.clone(),
            Destination::LocalApp(local_app),
            server,
            peer,
            close,
            log,
        ));
        let max = inputs.limits.max_tunnel_buffer_bytes;
        let (send, conn) = super::super::client_builder(max)
            .handshake(client)
            .await
            .unwrap();
        tokio::spawn(conn);
        (inputs, send)
    }

    /// Opens a stream to `authority`: its status, and the stream when admitted.
    async fn open(
        send: &h2::client::SendRequest<Bytes>,
        authority: &str,
    ) -> Result<(StatusCode, h2::SendStream<Bytes>, h2::RecvStream), h2::Error> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap();
        let (answer, body) = send.clone().ready().await?.send_request(req, false)?;
        let answer = answer.await?;
        Ok((answer.status(), body, answer.into_body()))
    }

    fn tomorrow() -> i64 {
        crate::now_unix() + 86_400
    }

    #[tokio::test]
    async fn an_admitted_stream_reaches_local_app() {
        let (_, send) = tunnel(&["order"], tomorrow(), echo_app().await).await;
        let (status, mut to_app, mut from_app) = open(&send, "inventory.default").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        to_app
            .send_data(Bytes::from_static(b"ping"), false)
            .unwrap();
        let echo = from_app.data().await.unwrap().unwrap();
        assert_eq!(&echo[..], b"ping");
    }

    #[tokio::test]
    async fn streams_are_refused_once_the_chain_expired_or_the_intentions_deny() {
        let app = echo_app().await;
        let (_, send) = tunnel(&["order"], crate::now_unix() - 1, app).await;
        let refused = open(&send, "inventory.default").await.unwrap().0;
        assert_eq!(refused, StatusCode::FORBIDDEN, "expired");
        let (_, send) = tunnel(&["payments"], tomorrow(), app).await;
        let refused = open(&send, "inventory.default").await.unwrap().0;
        assert_eq!(refused, StatusCode::FORBIDDEN, "denied");
        let (_, send) = tunnel(&["order"], tomorrow(), app).await;
        let refused = open(&send, "payments.default").await.unwrap().0;
        assert_eq!(refused, StatusCode::MISDIRECTED_REQUEST, "another target");
    }

    #[tokio::test]
    async fn a_stream_to_an_unreachable_local_app_gets_bad_gateway() {
        // A port with nothing listening: bound, then closed.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = gone.local_addr().unwrap();
        drop(gone);
        let (_, send) = tunnel(&["order"], tomorrow(), app).await;
        let status = open(&send, "inventory.default").await.unwrap().0;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn with_max_connections_taken_a_stream_is_refused_for_a_retry() {
        let (inputs, send) = tunnel(&["order"], tomorrow(), echo_app().await).await;
        let all = inputs.limits.max_connections as u32;
        let _taken = inputs
            .conn_slots
            .clone()
            .acquire_many_owned(all)
            .await
            .unwrap();
        let refused = open(&send, "inventory.default").await.err();
        assert_eq!(
            refused.and_then(|e| e.reason()),
            Some(h2::Reason::REFUSED_STREAM)
        );
    }
}
