//! The http outbound's HTTP/2 connections to an upstream's endpoints: at most one in use per
//! endpoint, which every request to that endpoint shares (HTTP/2 multiplexes them), so one
//! mutual-TLS handshake serves many requests.
//!
//! A connection takes no new request (its requests in flight run to their end, then it closes)
//! when our credentials change, when the server's certificate path has expired, when the drain
//! starts, or after [`POOL_IDLE`] without a new request. hyper closes it when the server leaves
//! a PING unanswered for `handshake_timeout` or goes away.

use crate::copy::Activity;
use crate::inputs::ProxyInputs;
use crate::mux::pool::POOL_IDLE;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// A request body as it goes upstream: bounded by `idle_timeout`, and telling when it is sent.
pub(crate) type ReqBody = super::idle_body::SentBody<Incoming>;

/// Sends requests on one pooled connection.
pub(crate) type Sender = http2::SendRequest<ReqBody>;

/// The connections of one upstream, by endpoint.
#[derive(Default)]
pub(crate) struct H2Pool {
    conns: Arc<DashMap<SocketAddr, Conn>>,
    next_id: AtomicU64,
}

struct Conn {
    /// Tells this connection from a later one to the same endpoint.
    id: u64,
    send: Sender,
    /// The upstream pool's generation (our credentials) it was opened with.
    generation: u64,
    /// When the server's verified chain stops being valid (Unix seconds).
    server_not_after: i64,
    /// When a request last took it.
    used: Arc<Activity>,
}

impl Conn {
    fn usable(&self, generation: u64) -> bool {
        !self.send.is_closed()
            && self.generation == generation
            && crate::now_unix() <= self.server_not_after
    }
}

/// A pooled connection handed to one request.
pub(crate) struct Pooled {
    pub(crate) id: u64,
    pub(crate) send: Sender,
}

impl H2Pool {
    /// The open connection to `ep`, if it may take a new request; one that may not is dropped
    /// from the pool.
    pub(crate) fn get(&self, ep: SocketAddr, generation: u64) -> Option<Pooled> {
        if let Some(c) = self.conns.get(&ep) {
            if c.usable(generation) {
                c.used.touch();
                return Some(Pooled {
                    id: c.id,
                    send: c.send.clone(),
                });
            }
        }
        // A reader holding an older generation must not evict a newer connection.
        self.conns.remove_if(&ep, |_, c| {
            c.generation <= generation && !c.usable(generation)
        });
        None
    }

    /// Takes the connection `id` to `ep` out of the pool (a request could not be sent on it).
    pub(crate) fn retire(&self, ep: SocketAddr, id: u64) {
        self.conns.remove_if(&ep, |_, c| c.id == id);
    }

    /// Our certificate or roots changed: no connection takes a new request.
    pub(crate) fn retire_all(&self) {
        self.conns.clear();
    }

    /// Starts HTTP/2 over `io` (a mutual-TLS connection to `ep` that selected `h2`), pools it
    /// for the requests that follow and hands it to the first.
    pub(crate) async fn add<T>(
        &self,
        inputs: &Arc<ProxyInputs>,
        ep: SocketAddr,
        io: T,
        server_not_after: i64,
        generation: u64,
    ) -> Result<Pooled, hyper::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &inputs.limits;
        let (send, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.handshake_timeout)
            .keep_alive_timeout(limits.handshake_timeout)
            .keep_alive_while_idle(true)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .handshake(TokioIo::new(io))
            .await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let used = Arc::new(Activity::new());
        let conn = Conn {
            id,
            send: send.clone(),
            generation,
            server_not_after,
            used: used.clone(),
        };
        // An older connection it replaces takes no new request and closes after its last.
        self.conns.insert(ep, conn);
        let conns = self.conns.clone();
        inputs
            .drain
            .tracker
            .spawn(drive(inputs.clone(), connection, conns, ep, id, used));
        Ok(Pooled { id, send })
    }
}

/// Runs the connection until it ends: once it is out of the pool and the last request holding
/// it is done, or at the drain deadline.
async fn drive<T>(
    inputs: Arc<ProxyInputs>,
    connection: http2::Connection<TokioIo<T>, ReqBody, TokioExecutor>,
    conns: Arc<DashMap<SocketAddr, Conn>>,
    ep: SocketAddr,
    id: u64,
    used: Arc<Activity>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = std::pin::pin!(connection);
    let mut idle_check = tokio::time::interval(POOL_IDLE / 4);
    let retire = || {
        conns.remove_if(&ep, |_, c| c.id == id);
    };
    let mut retired = false;
    loop {
        tokio::select! {
            r = connection.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(endpoint = %ep, error = %e, "upstream HTTP/2 connection ended with an error");
                }
                break;
            }
            _ = inputs.drain.force_close.cancelled() => break,
            _ = inputs.drain.stop_accepting.cancelled(), if !retired => {
                retire();
                retired = true;
            }
            _ = idle_check.tick(), if !retired => {
                if used.idle_for() >= POOL_IDLE {
                    retire();
                    retired = true;
                }
            }
        }
    }
    retire();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender on a real HTTP/2 connection (over an in-memory pipe to a hyper server).
    async fn sender() -> Sender {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(String::new()))
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), service),
        );
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    #[tokio::test]
    async fn a_reader_with_an_older_generation_does_not_evict_a_newer_connection() {
        let pool = H2Pool::default();
        let ep: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let conn = |generation| async move {
            Conn {
                id: generation,
                send: sender().await,
                generation,
                server_not_after: i64::MAX,
                used: Arc::new(Activity::new()),
            }
        };
        pool.conns.insert(ep, conn(2).await);
        assert!(
            pool.get(ep, 1).is_none(),
            "not usable with older credentials"
        );
        assert_eq!(pool.get(ep, 2).map(|p| p.id), Some(2), "still pooled");
        // A newer generation does retire it.
        assert!(pool.get(ep, 3).is_none());
        assert!(pool.conns.get(&ep).is_none());
    }
}
