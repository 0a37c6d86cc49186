//! The pooled clients an http inbound forwards requests to `local_app` with: HTTP/1.1 for
//! ordinary requests, HTTP/2 over cleartext (h2c, prior knowledge) for gRPC.
//!
//! The HTTP/1.1 pool is our own, a stack of hyper connections: hyper-util's general-purpose
//! pool (keyed by host, a task per checkout) cost about 9,000 instructions per request at the
//! inbound hop (callgrind, perf/profile-notes.md) for the one host an inbound ever calls.

use super::idle_body::IdleBody;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Connections kept to `local_app`, busy or idle: beyond it a new connection serves its request
/// and closes (connections in use are bounded by the requests in flight, which
/// `max_connections` and the streams per connection bound).
const MAX_POOLED: usize = 256;
/// How long an idle pooled connection is kept (closed by the next request or the sweep after).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries for one request whose connection closed before the request went out (the app closed
/// a kept-alive connection as we took it): the request is unsent, so it is safe to try again.
const MAX_TRIES: usize = 3;

/// A request body on its way to the app: the caller's, bounded by the body idle timeout.
pub(crate) type AppBody = IdleBody<Incoming>;

/// Why a request did not get a response from `local_app`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("connecting: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    #[error(transparent)]
    H2c(#[from] hyper_util::client::legacy::Error),
}

/// The clients for `local_app`, bodies streamed both ways, connections reused.
#[derive(Clone)]
pub(crate) struct AppClient {
    http1: Arc<Http1Pool<AppBody>>,
    /// One multiplexed connection (hyper's pool keeps one per host for HTTP/2).
    h2c: Client<HttpConnector, AppBody>,
}

impl AppClient {
    /// Sends `req` over h2c when its version is HTTP/2, else over HTTP/1.1 (upgrades
    /// included: the HTTP/1.1 connection is handed over with a 101 response).
    pub(crate) async fn request(
        &self,
        req: Request<AppBody>,
    ) -> Result<Response<Incoming>, AppError> {
        if req.version() == Version::HTTP_2 {
            Ok(self.h2c.request(req).await?)
        } else {
            self.http1.request(req).await
        }
    }
}

/// The clients for `local_app`.
pub(crate) fn new(local_app: SocketAddr) -> AppClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(crate::forward::APP_CONNECT_TIMEOUT));
    let h2c = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(true)
        .build(connector);
    let http1 = Arc::new(Http1Pool::new(local_app));
    tokio::spawn(sweep(Arc::downgrade(&http1)));
    AppClient { http1, h2c }
}

/// Closes the pool's connections idle for [`IDLE_TIMEOUT`] even when no request comes to do
/// it, until the pool is gone.
async fn sweep<B>(pool: std::sync::Weak<Http1Pool<B>>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.prune(&mut pool.conns.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// HTTP/1.1 connections to `local_app`, most recently used last. A connection stays in the
/// pool while it serves a request; a request takes one that is ready for the next.
struct Http1Pool<B> {
    addr: SocketAddr,
    conns: Mutex<Vec<Pooled<B>>>,
}

struct Pooled<B> {
    send: http1::SendRequest<B>,
    /// When it was last seen serving a request: once it is ready, it has been idle since
    /// about then.
    busy: Instant,
}

impl<B> Http1Pool<B> {
    /// Drops the connections that are closed or idle for [`IDLE_TIMEOUT`], and notes which
    /// are busy.
    fn prune(&self, conns: &mut Vec<Pooled<B>>) {
        let now = Instant::now();
        conns.retain_mut(|c| {
            if c.send.is_closed() {
                return false;
            }
            if !c.send.is_ready() {
                c.busy = now;
            }
            now - c.busy <= IDLE_TIMEOUT
        });
    }
}

impl<B> Http1Pool<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            conns: Mutex::new(Vec::new()),
        }
    }

    async fn request(&self, mut req: Request<B>) -> Result<Response<Incoming>, AppError> {
        for _ in 1..MAX_TRIES {
            let mut send = match self.take() {
                Some(send) => send,
                None => self.connect().await?,
            };
            match send.try_send_request(req).await {
                Ok(response) => {
                    self.put(send);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // The last try on a new connection: an unsent request there is the app's doing.
        let mut send = self.connect().await?;
        let response = send.send_request(req).await?;
        self.put(send);
        Ok(response)
    }

    /// A pooled connection ready for a request, the most recently used first. Closed and
    /// idle ones are left to the sweep (or to `put` when the pool is full): a request pays for
    /// no clock reading and no pass over every connection.
    fn take(&self) -> Option<http1::SendRequest<B>> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let ready = conns.iter().rposition(|c| c.send.is_ready())?;
        Some(conns.swap_remove(ready).send)
    }

    /// Back into the pool, serving its request still (it takes the next once ready).
    fn put(&self, send: http1::SendRequest<B>) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= MAX_POOLED {
            self.prune(&mut conns);
        }
        if conns.len() < MAX_POOLED {
            conns.push(Pooled {
                send,
                busy: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<B>, AppError> {
        let timeout = crate::forward::APP_CONNECT_TIMEOUT;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| AppError::ConnectTimeout(timeout))?
            .map_err(AppError::Connect)?;
        // Best effort: without it a small response waits for Nagle.
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "connection to local_app ended with an error");
            }
        });
        Ok(send)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An app on a real socket answering `ok` to each request; with `close_after`, it closes
    /// the connection after each response without saying so (as an app whose keep-alive
    /// timeout ends does). Counts the connections it accepted.
    async fn app(close_after: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = tcp.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(ok).await.is_err() || close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Http1Pool<Empty<Bytes>>) -> String {
        let req = Request::get(format!("http://{}/", pool.addr)).body(Empty::new());
        let response = pool.request(req.unwrap()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection_and_concurrent_ones_get_their_own() {
        let (addr, accepted) = app(false).await;
        let pool = Http1Pool::new(addr);
        for _ in 0..20 {
            assert_eq!(get(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let together = tokio::join!(get(&pool), get(&pool), get(&pool), get(&pool));
        assert_eq!(
            together,
            ("ok".into(), "ok".into(), "ok".into(), "ok".into())
        );
        let n = accepted.load(Ordering::SeqCst);
        assert!(
            (2..=4).contains(&n),
            "{n} connections for 4 requests at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_by_the_sweep_without_a_request() {
        let (addr, accepted) = app(false).await;
        let pool = Arc::new(Http1Pool::new(addr));
        tokio::spawn(sweep(Arc::downgrade(&pool)));
        assert_eq!(get(&pool).await, "ok");
        assert_eq!(pool.conns.lock().unwrap().len(), 1);
        // Paused time jumps to each sweep; the connection is gone by the second past the limit.
        tokio::time::sleep(IDLE_TIMEOUT + IDLE_TIMEOUT / 2).await;
        assert!(
            pool.conns.lock().unwrap().is_empty(),
            "idle past IDLE_TIMEOUT"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_not_reused_and_no_request_fails() {
        let (addr, accepted) = app(true).await;
        let pool = Http1Pool::new(addr);
        for _ in 0..20 {
            assert_eq!(get(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }
}
