//! Inbound: terminate mTLS, decide in the handshake, forward allowed connections to the app
//! (explicit `[inbound]`), or to the pod's own address at their original port (transparent).

use crate::connlog::ConnectionLog;
use crate::forward::{connect_app, forward};
use crate::inputs::ProxyInputs;
use crate::metrics::{self as m, Direction, HandshakeResult};
use crate::mux::server::Destination;
use crate::tls;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use ward_config::identity::escape_peer_value;

pub struct Inbound {
    inputs: Arc<ProxyInputs>,
    /// For clients that do not offer `ward-mux/1`: plain L4, no ALPN.
    plain: Arc<rustls::ServerConfig>,
    /// For ward outbounds that offer it (security rule 9, a multiplexed tunnel between
    /// sidecars, docs/security.md: chosen by ALPN only). An http inbound offers no tunnel, so
    /// every request it forwards is parsed and decided here, never carried as raw bytes.
    mux: Option<Arc<rustls::ServerConfig>>,
    target: Target,
    log: Arc<ConnectionLog>,
    /// `protocol = "http"`: clients offering `h2` or `http/1.1` get it; others HTTP/2 if they
    /// open with its preface, else HTTP/1.1.
    http: Option<Http>,
}

struct Http {
    tls: Arc<rustls::ServerConfig>,
    app: crate::http::app_client::AppClient,
    local_app: SocketAddr,
}

/// Where admitted connections go.
enum Target {
    /// `[inbound] local_app`.
    LocalApp(SocketAddr),
    /// `[transparent] inbound_listen`: the pod's own address at the port the connection (or
    /// its tunnel stream) was addressed to; never a port of `never`.
    Transparent {
        never: Arc<[std::ops::RangeInclusive<u16>]>,
    },
}

impl Target {
    /// Where the connection `tcp` and its tunnel streams may go.
    fn destination(&self, tcp: &TcpStream) -> Destination {
        match self {
            Target::LocalApp(app) => Destination::LocalApp(*app),
            Target::Transparent { never } => {
                let local = tcp
                    .local_addr()
                    .ok()
                    .map(crate::transparent::socket::canonical);
                // A connection made straight to our port (a tunnel from a transparent outbound)
                // was not redirected: it has no destination of its own.
                let redirected = crate::transparent::socket::original_dst(tcp)
                    .ok()
                    .filter(|dst| Some(*dst) != local)
                    .map(|dst| dst.port());
                Destination::Pod {
                    ip: local.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |l| l.ip()),
                    redirected,
                    never: never.clone(),
                }
            }
        }
    }
}

impl Inbound {
    pub fn new(
        inputs: Arc<ProxyInputs>,
        local_app: SocketAddr,
        tickets: Option<Arc<tls::tickets::EpochTicketer>>,
        log: ConnectionLog,
    ) -> Self {
        let verifier = tls::InboundVerifier::new(
            inputs.credentials.clone(),
            inputs.intentions.clone(),
            inputs.service.name.clone(),
        );
        let plain = tls::config::server_config(inputs.credentials.clone(), verifier, tickets);
        let mut mux = (*plain).clone();
        mux.alpn_protocols = vec![crate::mux::ALPN.to_vec()];
        Self {
            inputs,
            plain,
            mux: Some(Arc::new(mux)),
            target: Target::LocalApp(local_app),
            log: Arc::new(log),
            http: None,
        }
    }

    /// This inbound serving `protocol = "http"`: HTTP/2 or HTTP/1.1 by ALPN, no tunnel.
    pub fn serving_http(mut self) -> Self {
        let Target::LocalApp(local_app) = self.target else {
            return self;
        };
        let mut tls = (*self.plain).clone();
        tls.alpn_protocols = crate::http::ALPN.iter().map(|p| p.to_vec()).collect();
        self.http = Some(Http {
            tls: Arc::new(tls),
            app: crate::http::app_client::new(local_app),
            local_app,
        });
        self.mux = None;
        self
    }

    /// This inbound as `[transparent] inbound_listen`: each connection goes to the pod's own
    /// address at its original destination port, each tunnel stream at the port it names; never
    /// to a port of `never` (the proxy's listeners, and those the redirect leaves out).
    pub fn transparent(mut self, never: Vec<std::ops::RangeInclusive<u16>>) -> Self {
        self.target = Target::Transparent {
            never: never.into(),
        };
        self.http = None;
        self
    }

    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let inputs = self.inputs.clone();
        // Without a certificate no handshake can even start; leave callers in the backlog
        // until the first one arrives (then, before intentions, they get access_denied).
        let mut changed = inputs.credentials.subscribe();
        while inputs.credentials.load().is_none() {
            tokio::select! {
                _ = inputs.drain.stop_accepting.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
        }
        crate::listener::accept_loop(listener, inputs, move |tcp, peer, permit| {
            self.clone().serve(tcp, peer, permit)
        })
        .await
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, _slot: OwnedSemaphorePermit) {
        let inputs = &self.inputs;
        let started = Instant::now();
        let destination = self.target.destination(&tcp);
        let Some(pending) = inputs.handshakes.begin(peer.ip()) else {
            tracing::debug!("pending handshake cap reached; connection refused");
            return;
        };
        let (handshake, presented) = self
            .log
            .handshake(tokio::time::timeout(
                inputs.limits.handshake_timeout,
                self.handshake(tcp),
            ))
            .await;
        drop(pending);
        let elapsed = started.elapsed().as_secs_f64();
        let tls = match handshake {
            Err(_) => {
                m::handshake(Direction::Inbound, HandshakeResult::Timeout, elapsed);
                self.log
                    .refused(peer, presented.as_deref(), HandshakeResult::Timeout);
                return;
            }
            Ok(Err(e)) => {
                let result = tls::classify(&e);
                m::handshake(Direction::Inbound, result, elapsed);
                tracing::debug!(result = result.as_str(), error = %e, "inbound handshake refused");
                self.log.refused(peer, presented.as_deref(), result);
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
            tls::verify::session_peer(&inputs.credentials, chain, webpki::KeyUsage::client_auth())
                .map_err(|e| tls::verify::result_of(&e))
                .and_then(|session| {
                    if !resumed
                        || inputs
                            .intentions
                            .authorize(&session.leaf.id, &inputs.service.name)
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
                if let Some(leaf) = chain.first() {
                    let presented = crate::connlog::presented_identity(leaf);
                    self.log.refused(peer, Some(&presented), result);
                }
                // The handshake is over, so no alert can carry the reason; close cleanly.
                let mut tls = tls;
                tls.get_mut().1.send_close_notify();
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                return;
            }
        };
        m::handshake(Direction::Inbound, HandshakeResult::Ok, elapsed);
        let group = tls.get_ref().1.negotiated_key_exchange_group();
        m::key_exchange(Direction::Inbound, tls::provider::group_name(group));
        let peer_id = session.leaf.id;
        let registration = inputs.connections.register(
            peer_id.clone(),
            inputs.drain.force_close.child_token(),
            &inputs.intentions,
            &inputs.service.name,
        );
        if registration.close.is_cancelled() {
            return;
        }
        if let Some(http) = &self.http {
            let Some(own) = inputs.credentials.load() else {
                return;
            };
            let conn = tls.get_ref().1;
            let leaf = conn.peer_certificates().and_then(|c| c.first());
            let Some(leaf) = leaf else { return };
            let h2 = conn.alpn_protocol().map(|p| p == b"h2");
            let peer_name = peer_id.service.to_string();
            let conn = Arc::new(crate::http::inbound::HttpConn {
                inputs: inputs.clone(),
                app: http.app.clone(),
                local_app: http.local_app,
                xfcc: crate::http::xfcc::value(&own.leaf.id, leaf, &peer_id),
                peer: peer_id.clone(),
                metrics: crate::http::request_metrics::RequestMetrics::new(
                    Direction::Inbound,
                    peer_name.clone(),
                ),
                app_authority: crate::http::inbound::authority_of(http.local_app),
                upgrade: Default::default(),
            });
            tracing::debug!(peer = %escape_peer_value(&peer_id.to_string()), ?h2, "inbound http connection admitted");
            let admitted = self.log.admitted(peer, &peer_id);
            let close = &registration.close;
            crate::forward::forward_with(Direction::Inbound, peer_name, admitted, |rx, tx| {
                let io = crate::http::inbound::Counted::new(tls, rx, tx);
                crate::http::inbound::serve(conn, io, h2, close)
            })
            .await;
            return;
        }
        if tls.get_ref().1.alpn_protocol() == Some(crate::mux::ALPN) {
            tracing::debug!(peer = %escape_peer_value(&peer_id.to_string()), "inbound tunnel admitted");
            let peer = crate::mux::server::TunnelPeer {
                id: peer_id,
                addr: peer,
                not_after: session.not_after,
            };
            let close = registration.close.clone();
            let log = self.log.clone();
            crate::mux::server::serve(inputs.clone(), destination, tls, peer, close, log).await;
            return;
        }

        let Some(target) = destination.default_target() else {
            tracing::debug!(peer = %escape_peer_value(&peer_id.to_string()), "a connection to the transparent inbound's own port names no destination; closed");
            return;
        };
        let Some(app) = connect_app(target).await else {
            return;
        };

        let peer_name = peer_id.service.to_string();
        tracing::debug!(peer = %escape_peer_value(&peer_id.to_string()), "inbound connection admitted");
        let admitted = self.log.admitted(peer, &peer_id);
        forward(
            inputs,
            Direction::Inbound,
            peer_name,
            admitted,
            tls,
            app,
            &registration.close,
        )
        .await;
    }
}

impl Inbound {
    /// Reads the ClientHello first, so the tunnel is offered only to a client that asks for
    /// it by ALPN (a plain client offering other protocols still gets plain L4), and an http
    /// inbound selects `h2` or `http/1.1` only for a client that offers one (any other client,
    /// a ward outbound offering only `ward-mux/1` included, gets no ALPN: its first bytes
    /// choose HTTP/2 or HTTP/1.1).
    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<tls::large_reads::LargeReads<TcpStream>>>
    {
        let acceptor = rustls::server::Acceptor::default();
        let start =
            tokio_rustls::LazyConfigAcceptor::new(acceptor, tls::large_reads::LargeReads::new(tcp))
                .await?;
        let offers = |wanted: &[&[u8]]| {
            start
                .client_hello()
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| wanted.contains(&p)))
        };
        let config = match (&self.http, &self.mux) {
            (Some(http), _) if offers(&crate::http::ALPN) => &http.tls,
            (None, Some(mux)) if offers(&[crate::mux::ALPN]) => mux,
            _ => &self.plain,
        };
        start.into_stream(config.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{ca, inputs, intentions, snapshot, store_for, Signer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use ward_config::intentions::Action;
    use ward_config::Name;

    /// A local_app that echoes, and counts the connections it accepted.
    async fn echo_app() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, accepted)
    }

    struct Mesh {
        root: Signer,
        int: Signer,
        inputs: Arc<ProxyInputs>,
        inbound: SocketAddr,
        accepted: Arc<AtomicUsize>,
    }

    /// `inventory`'s inbound, allowing `order` only, in front of an echo app.
    async fn mesh(tickets: bool) -> Mesh {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let credentials = store_for("inventory", &int, &[&root]);
        let inputs = inputs(
            "inventory",
            credentials,
            intentions(Action::Deny, &["order"]),
        );
        let (app, accepted) = echo_app().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inbound = listener.local_addr().unwrap();
        let tickets = tickets
            .then(|| tls::tickets::EpochTicketer::new().map(Arc::new))
            .flatten();
        let server = Arc::new(Inbound::new(
            inputs.clone(),
            app,
            tickets,
            ConnectionLog::new(false),
        ));
        tokio::spawn(server.run(listener));
        Mesh {
            root,
            int,
            inputs,
            inbound,
            accepted,
        }
    }

    impl Mesh {
        /// The client config of `service`, offering `alpn`.
        fn client(&self, service: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
            let store = store_for(service, &self.int, &[&self.root]);
            let verifier = Arc::new(tls::OutboundVerifier::new(
                store.clone(),
                Name::new("default").unwrap(),
                Name::new("inventory").unwrap(),
            ));
            let mut config =
                (*tls::config::client_config(store, verifier, crate::mux::ALPN)).clone();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        }

        async fn connect(
            &self,
            config: &Arc<rustls::ClientConfig>,
        ) -> tokio_rustls::client::TlsStream<TcpStream> {
            let tcp = TcpStream::connect(self.inbound).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("inventory").unwrap();
            tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .unwrap()
        }
    }

    /// Sends `ping` and reads what comes back (the echo, or the error that ended it).
    async fn ping(
        tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    ) -> std::io::Result<Vec<u8>> {
        tls.write_all(b"ping").await?;
        let mut got = vec![0u8; 4];
        let n = tls.read(&mut got).await?;
        got.truncate(n);
        Ok(got)
    }

    #[tokio::test]
    async fn the_tunnel_is_chosen_by_alpn_and_plain_callers_reach_local_app() {
        let mesh = mesh(false).await;
        let mut plain = mesh.connect(&mesh.client("order", &[b"h2"])).await;
        assert_eq!(plain.get_ref().1.alpn_protocol(), None);
        assert_eq!(ping(&mut plain).await.unwrap(), b"ping");
        let tunnel = mesh
            .connect(&mesh.client("order", &[b"h2", crate::mux::ALPN]))
            .await;
        assert_eq!(tunnel.get_ref().1.alpn_protocol(), Some(crate::mux::ALPN));
    }

    #[tokio::test]
    async fn a_denied_caller_gets_access_denied_and_never_reaches_local_app() {
        let mesh = mesh(false).await;
        let mut rogue = mesh.connect(&mesh.client("rogue", &[])).await;
        let refused = ping(&mut rogue).await.unwrap_err();
        assert_eq!(
            tls::verify::received_alert(&refused),
            Some(rustls::AlertDescription::AccessDenied)
        );
        assert_eq!(mesh.accepted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_resumed_session_is_refused_once_the_intentions_deny_it() {
        let mesh = mesh(true).await;
        let order = mesh.client("order", &[]);
        let mut first = mesh.connect(&order).await;
        // The echo comes after the session tickets, which the client has read by then.
        assert_eq!(ping(&mut first).await.unwrap(), b"ping");
        // Deny order without rotating the tickets (nothing wired them to the intentions here):
        // only the inbound's own check stands between the resumed session and local_app.
        assert!(mesh
            .inputs
            .intentions
            .publish(snapshot(2, Action::Deny, &[])));
        let mut resumed = mesh.connect(&order).await;
        assert_eq!(
            resumed.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        let answer = ping(&mut resumed).await;
        assert!(answer.as_deref().is_ok_and(|a| a.is_empty()), "{answer:?}");
        assert_eq!(mesh.accepted.load(Ordering::SeqCst), 1, "only the first");
    }
}
