//! Forwarding an admitted connection or tunnel stream, inbound or outbound: connecting to
//! `local_app`, copying the bytes, and the connection metrics around the copy.

use crate::connlog::Admitted;
use crate::copy::{self, CopyEnd};
use crate::inputs::ProxyInputs;
use crate::metrics::{self as m, Direction};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long connecting to `local_app` may take.
pub(crate) const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// At most one line a second about failed connects to the app: a peer may ask for closed ports
/// of a transparent inbound's pod as fast as it likes.
static CONNECT_FAILURE_LOG: std::sync::LazyLock<crate::connlog::LineBudget> =
    std::sync::LazyLock::new(|| crate::connlog::LineBudget::new(1, Duration::from_secs(1)));

/// Connects to `local_app` (or a transparent inbound's pod port) for an admitted connection or
/// stream.
pub(crate) async fn connect_app(local_app: SocketAddr) -> Option<TcpStream> {
    let error = match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(local_app)).await
    {
        Ok(Ok(app)) => {
            let _ = app.set_nodelay(true);
            return Some(app);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_owned(),
    };
    match CONNECT_FAILURE_LOG.admit() {
        Some(left_out) => {
            tracing::warn!(local_app = %local_app, error, left_out, "cannot connect to the app")
        }
        None => tracing::debug!(local_app = %local_app, error, "cannot connect to the app"),
    }
    None
}

/// Forwards one admitted connection and keeps the connection metrics (and its line in the
/// connection log, when `admitted`).
pub(crate) async fn forward<P, L>(
    inputs: &ProxyInputs,
    direction: Direction,
    peer: String,
    admitted: Option<Admitted>,
    peer_io: P,
    local_io: L,
    close: &tokio_util::sync::CancellationToken,
) where
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let idle = inputs.limits.idle_timeout;
    forward_with(direction, peer, admitted, |rx, tx| async move {
        copy::bidirectional(peer_io, local_io, idle, close, &rx, &tx).await
    })
    .await
}

/// Keeps the connection metrics around `copy`, which gets the rx and tx byte counters; writes
/// the connection log's line at the close, when `admitted`.
pub(crate) async fn forward_with<F, Fut>(
    direction: Direction,
    peer: String,
    admitted: Option<Admitted>,
    copy: F,
) where
    F: FnOnce(metrics::Counter, metrics::Counter) -> Fut,
    Fut: std::future::Future<Output = CopyEnd>,
{
    let d = direction.as_str();
    metrics::counter!(m::CONNECTIONS_OPENED, "direction" => d, "peer" => peer.clone()).increment(1);
    let active = metrics::gauge!(m::CONNECTIONS_ACTIVE, "direction" => d);
    active.increment(1.0);
    let rx = metrics::counter!(m::BYTES, "direction" => d, "peer" => peer.clone(), "flow" => "rx");
    let tx = metrics::counter!(m::BYTES, "direction" => d, "peer" => peer.clone(), "flow" => "tx");
    let (rx, tx) = match &admitted {
        Some(a) => a.count(rx, tx),
        None => (rx, tx),
    };
    let end = copy(rx, tx).await;
    match &end {
        CopyEnd::Done => {}
        CopyEnd::Idle => tracing::debug!(direction = d, "connection closed after idle_timeout"),
        CopyEnd::Closed => tracing::debug!(direction = d, "connection closed by the proxy"),
        CopyEnd::Failed(e) => {
            tracing::debug!(direction = d, error = %e, "connection ended with an error")
        }
    }
    active.decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "direction" => d, "peer" => peer).increment(1);
    if let Some(a) = admitted {
        a.closed(&end);
    }
}
