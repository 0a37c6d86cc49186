//! The inbound side of a tunnel connection: every stream is a `CONNECT` to this service, and
//! goes to `local_app`.

use super::io::StreamIo;
use crate::metrics::{self as m, Direction};
use crate::shared::Shared;
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use ward_config::identity::escape_peer_value;
use ward_config::SpiffeId;

/// Who is at the other end of a tunnel connection, as its handshake established.
pub struct TunnelPeer {
    pub id: SpiffeId,
    /// The peer certificate's not_after (Unix seconds): no stream is admitted after it.
    pub not_after: i64,
}

/// Serves one tunnel connection until the peer closes it, `close` fires (intention deny, drain
/// deadline), or it has carried no stream for `idle_timeout`. A drain sends GOAWAY and lets the
/// open streams finish.
pub async fn serve<T>(
    shared: Arc<Shared>,
    local_app: SocketAddr,
    io: T,
    peer: TunnelPeer,
    close: CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = tokio::time::timeout(
        shared.limits.handshake_timeout,
        super::server_builder().handshake::<_, Bytes>(io),
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
    let peer = Arc::new(peer);
    let target: Arc<str> = super::authority(&shared.service.name, &shared.service.namespace).into();
    let idle_timeout = shared.limits.idle_timeout;
    let period = idle_timeout.clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut idle_check = tokio::time::interval(period);
    let mut idle_since = Instant::now();
    let mut draining = false;
    loop {
        let next = tokio::select! {
            biased;
            _ = close.cancelled() => {
                conn.abrupt_shutdown(h2::Reason::CANCEL);
                return;
            }
            _ = shared.stop_accepting.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            _ = idle_check.tick(), if !draining => {
                if conn.has_streams() {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= idle_timeout {
                    draining = true;
                    conn.graceful_shutdown();
                }
                continue;
            }
            next = conn.accept() => next,
        };
        match next {
            None => return,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "tunnel connection ended with an error");
                return;
            }
            Some(Ok((req, respond))) => {
                let stream = Stream {
                    shared: shared.clone(),
                    local_app,
                    peer: peer.clone(),
                    target: target.clone(),
                    close: close.child_token(),
                };
                shared.tracker.spawn(stream.run(req, respond));
            }
        }
    }
}

struct Stream {
    shared: Arc<Shared>,
    local_app: SocketAddr,
    peer: Arc<TunnelPeer>,
    target: Arc<str>,
    close: CancellationToken,
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    m::mux_stream(Direction::Inbound, false);
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}

impl Stream {
    async fn run(self, req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
        let shared = &self.shared;
        // Rule 9: only a CONNECT to this service; anything else is refused before any connect.
        if req.method() != Method::CONNECT {
            return refuse(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        }
        if req.uri().authority().map(|a| a.as_str()) != Some(&*self.target) {
            tracing::debug!(
                target = %escape_peer_value(&req.uri().to_string()),
                "tunnel stream names another target; refused"
            );
            return refuse(&mut respond, StatusCode::MISDIRECTED_REQUEST);
        }
        // The handshake checked the peer's certificate; a stream opened later still needs it
        // to be valid, and the current intentions to allow it.
        if crate::now_unix() > self.peer.not_after {
            return refuse(&mut respond, StatusCode::FORBIDDEN);
        }
        if !shared
            .intentions
            .authorize(&self.peer.id, &shared.service.name)
            || self.close.is_cancelled()
        {
            return refuse(&mut respond, StatusCode::FORBIDDEN);
        }
        let Ok(_slot) = shared.conn_slots.clone().try_acquire_owned() else {
            tracing::debug!("max_connections reached; tunnel stream refused");
            m::mux_stream(Direction::Inbound, false);
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            return;
        };
        let app = match crate::inbound::connect_app(self.local_app).await {
            Some(app) => app,
            None => return refuse(&mut respond, StatusCode::BAD_GATEWAY),
        };
        let Ok(send) = respond.send_response(Response::new(()), false) else {
            return;
        };
        m::mux_stream(Direction::Inbound, true);
        let io = StreamIo::accepted(send, req.into_body());
        crate::inbound::forward(
            shared,
            Direction::Inbound,
            self.peer.id.service.to_string(),
            io,
            app,
            &self.close,
        )
        .await;
    }
}
