//! The accept loop shared by every listener: connection cap, accept-error backoff, drain.

use crate::inputs::ProxyInputs;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

/// Accepts until the drain starts; each connection runs `serve` on the drain's task tracker
/// while holding one `max_connections` permit.
pub async fn accept_loop<F, Fut>(listener: TcpListener, inputs: Arc<ProxyInputs>, serve: F)
where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = inputs.drain.stop_accepting.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = inputs.conn_slots.clone().try_acquire_owned() else {
            tracing::debug!("max_connections reached; connection refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        inputs.drain.tracker.spawn(serve(stream, peer, permit));
    }
}
