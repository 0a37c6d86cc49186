//! The outbound's tunnel connections, per endpoint: each carries up to [`MAX_STREAMS`] streams,
//! and a new one is opened only when every open one is full, one handshake at a time per
//! endpoint (so a burst of new connections shares it).
//!
//! A connection is retired (takes no new stream; its open streams run to their end) when our
//! credentials change, when the server's certificate has expired, when a stream cannot be
//! opened on it (the server went away) or its answer does not come within the handshake
//! timeout, when the drain starts, or after [`POOL_IDLE`] without streams; it is closed with
//! its streams when the server leaves a PING unanswered (`keepalive`). An endpoint whose
//! inbound does not select `ward-mux/1` is remembered for [`PLAIN_MEMORY`], so connections to
//! it are not serialized behind the tunnel's one-handshake-at-a-time lock.

use super::io::StreamIo;
use super::keepalive::Keepalive;
use super::MAX_STREAMS;
use crate::inputs::ProxyInputs;
use bytes::Bytes;
use dashmap::DashMap;
use http::{Method, Request};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

/// A tunnel connection with no stream for this long is closed.
pub const POOL_IDLE: Duration = Duration::from_secs(60);
/// How long a failed attempt to reach an endpoint sends the callers queued behind it, and new
/// ones, on to the next endpoint (while there is one that did not fail too).
pub const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// How long an endpoint that did not select the tunnel gets plain connections without asking.
pub const PLAIN_MEMORY: Duration = Duration::from_secs(30);

/// The pooled connections of one upstream.
#[derive(Default)]
pub struct Pool {
    endpoints: DashMap<SocketAddr, Arc<EndpointConns>>,
    /// Bumped when our credentials change; connections of an older generation are retired.
    generation: AtomicU64,
}

#[derive(Default)]
struct EndpointConns {
    conns: Mutex<Vec<Arc<TunnelConn>>>,
    opening: Arc<tokio::sync::Mutex<()>>,
    /// When the last attempt to open a connection failed: callers that queued behind it move
    /// on to the next endpoint instead of each waiting out the same failure.
    failed_at: Mutex<Option<Instant>>,
    /// When the inbound last answered without selecting `ward-mux/1`.
    plain_at: Mutex<Option<Instant>>,
}

impl EndpointConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<TunnelConn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection with `state` retired and drops the pool's hold on it, so it
    /// closes once its last stream ends.
    fn retire(&self, state: &Arc<ConnState>) {
        state.retired.store(true, Ordering::Release);
        self.lock().retain(|c| !Arc::ptr_eq(&c.state, state));
    }

    /// Holds nothing worth keeping: no connection, no remembered failure or plain answer.
    fn forgettable(&self) -> bool {
        let expired = |at: &Mutex<Option<Instant>>, memory| {
            let at = *at.lock().unwrap_or_else(|e| e.into_inner());
            at.is_none_or(|at| at.elapsed() >= memory)
        };
        self.lock().is_empty()
            && expired(&self.failed_at, FAILURE_MEMORY)
            && expired(&self.plain_at, PLAIN_MEMORY)
    }
}

/// What the connection's driver task and its streams share.
struct ConnState {
    streams: AtomicU32,
    retired: AtomicBool,
    /// Milliseconds since `born` when the last stream ended.
    last_used_ms: AtomicU64,
    born: Instant,
}

struct TunnelConn {
    send: h2::client::SendRequest<Bytes>,
    state: Arc<ConnState>,
    generation: u64,
    /// When the server's chain stops being valid (Unix seconds; leaf and intermediates).
    server_not_after: i64,
}

/// One stream's claim on a connection; freed when dropped.
pub struct StreamSlot {
    conn: Arc<TunnelConn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let s = &self.conn.state;
        s.last_used_ms
            .store(s.born.elapsed().as_millis() as u64, Ordering::Relaxed);
        s.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TunnelConn {
    fn usable(&self, generation: u64) -> bool {
        !self.state.retired.load(Ordering::Acquire)
            && self.generation == generation
            && crate::now_unix() <= self.server_not_after
    }

    fn reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        let cap = (MAX_STREAMS as usize).min(self.send.current_max_send_streams()) as u32;
        self.state
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(StreamSlot { conn: self.clone() })
    }
}

impl StreamSlot {
    /// Takes the connection out of service: no new stream is placed on it.
    pub fn retire(&self) {
        self.conn.state.retired.store(true, Ordering::Release);
    }

    /// Opens the stream: a CONNECT naming `authority`. Bytes may follow at once; the answer is
    /// awaited by the first read.
    /// A connection that cannot open a stream is retired.
    pub async fn open(
        self,
        authority: &str,
        answer_within: Duration,
    ) -> Result<StreamIo, h2::Error> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .expect("an authority built from two valid names");
        let sent = match self.conn.send.clone().ready().await {
            Ok(mut send) => send.send_request(req, false),
            Err(e) => Err(e),
        };
        match sent {
            Ok((answer, stream)) => Ok(StreamIo::opened(stream, answer, answer_within, self)),
            Err(e) => {
                self.retire();
                Err(e)
            }
        }
    }
}

impl Pool {
    /// The current generation: read before the handshake of a connection to be added.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Retires every connection: called when our certificate or roots change.
    pub fn retire_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for endpoint in self.endpoints.iter() {
            endpoint.lock().clear();
        }
    }

    fn endpoint(&self, ep: SocketAddr) -> Arc<EndpointConns> {
        self.endpoints.entry(ep).or_default().clone()
    }

    /// A stream slot on an open connection to `ep` that has room, if any.
    pub fn reserve(&self, ep: SocketAddr) -> Option<StreamSlot> {
        let endpoint = self.endpoints.get(&ep)?.clone();
        let generation = self.generation.load(Ordering::Acquire);
        let mut conns = endpoint.lock();
        conns.retain(|c| c.usable(generation));
        conns.iter().find_map(|c| c.reserve())
    }

    /// Drops the entries of endpoints nobody uses and nothing is remembered about, so the map
    /// follows the upstream's endpoints as instances come and go. An entry held elsewhere (a
    /// connection's driver task) or whose opening lock is held or awaited (a handshake in
    /// progress, callers queued behind it) is kept; the shard's write lock keeps anyone from
    /// taking a new hold while the entry is looked at.
    fn forget_unused(&self) {
        self.endpoints.retain(|_, e| {
            Arc::strong_count(e) > 1 || Arc::strong_count(&e.opening) > 1 || !e.forgettable()
        });
    }

    /// Held while opening a connection to `ep`; `None` when an attempt failed within
    /// [`FAILURE_MEMORY`] (move on to the next endpoint). With `retry_failed_before` (every
    /// endpoint failed lately: try anyway), `None` only for a failure at or after that instant,
    /// one the caller saw itself or queued behind, so a burst shares one retry.
    pub async fn opening(
        &self,
        ep: SocketAddr,
        retry_failed_before: Option<Instant>,
    ) -> Option<OwnedMutexGuard<()>> {
        self.forget_unused();
        let endpoint = self.endpoint(ep);
        let guard = endpoint.opening.clone().lock_owned().await;
        let failed = *endpoint.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        let skip = failed.is_some_and(|at| match retry_failed_before {
            None => at.elapsed() < FAILURE_MEMORY,
            Some(before) => at >= before,
        });
        (!skip).then_some(guard)
    }

    /// Whether `ep` recently answered without selecting the tunnel.
    pub fn prefers_plain(&self, ep: SocketAddr) -> bool {
        let Some(endpoint) = self.endpoints.get(&ep) else {
            return false;
        };
        let at = *endpoint.plain_at.lock().unwrap_or_else(|e| e.into_inner());
        at.is_some_and(|at| at.elapsed() < PLAIN_MEMORY)
    }

    /// Records that `ep` answered without selecting the tunnel (`plain`), or with it.
    pub fn note_plain(&self, ep: SocketAddr, plain: bool) {
        let endpoint = self.endpoint(ep);
        *endpoint.plain_at.lock().unwrap_or_else(|e| e.into_inner()) = plain.then(Instant::now);
    }

    /// Records that opening a connection to `ep` failed, or (`ok`) that it worked.
    pub fn attempted(&self, ep: SocketAddr, ok: bool) {
        let endpoint = self.endpoint(ep);
        *endpoint.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = (!ok).then(Instant::now);
    }

    /// Starts a tunnel over `tls` (which negotiated `ward-mux/1`), adds it to the pool and
    /// reserves its first stream.
    pub async fn add<T>(
        &self,
        inputs: &Arc<ProxyInputs>,
        ep: SocketAddr,
        tls: T,
        server_not_after: i64,
        generation: u64,
    ) -> Result<StreamSlot, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = super::client_builder(inputs.limits.max_tunnel_buffer_bytes)
            .handshake::<_, Bytes>(tls)
            .await?;
        let state = Arc::new(ConnState {
            streams: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            last_used_ms: AtomicU64::new(0),
            born: Instant::now(),
        });
        let conn = Arc::new(TunnelConn {
            send,
            state: state.clone(),
            generation,
            server_not_after,
        });
        let slot = conn.reserve().expect("a new connection has room");
        let endpoint = self.endpoint(ep);
        endpoint.lock().push(conn);
        inputs
            .drain
            .tracker
            .spawn(drive(inputs.clone(), connection, state, endpoint, ep));
        Ok(slot)
    }
}

/// Runs the connection's I/O until it ends (after it is retired and its last stream is done),
/// the drain deadline passes, or the peer leaves a PING unanswered ([`Keepalive`]).
async fn drive<T>(
    inputs: Arc<ProxyInputs>,
    mut connection: h2::client::Connection<T, Bytes>,
    state: Arc<ConnState>,
    endpoint: Arc<EndpointConns>,
    endpoint_addr: SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut idle_check = tokio::time::interval(POOL_IDLE / 4);
    let mut keepalive = Keepalive::new(connection.ping_pong(), inputs.limits.handshake_timeout);
    loop {
        let retired = state.retired.load(Ordering::Acquire);
        tokio::select! {
            // The connection first: it reads any PONG before the keepalive looks.
            biased;
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel connection ended with an error");
                }
                break;
            }
            _ = inputs.drain.force_close.cancelled() => break,
            _ = inputs.drain.stop_accepting.cancelled(), if !retired => endpoint.retire(&state),
            _ = idle_check.tick(), if !retired => {
                let last = Duration::from_millis(state.last_used_ms.load(Ordering::Relaxed));
                let quiet = state.born.elapsed().saturating_sub(last);
                if state.streams.load(Ordering::Acquire) == 0 && quiet >= POOL_IDLE {
                    endpoint.retire(&state);
                }
            }
            _ = keepalive.peer_gone() => {
                tracing::warn!(
                    %endpoint_addr,
                    timeout = ?inputs.limits.handshake_timeout,
                    "tunnel peer did not answer a PING; closing the tunnel and its streams"
                );
                break;
            }
        }
    }
    endpoint.retire(&state);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_are_forgotten_once_nothing_is_remembered_about_them() {
        let pool = Pool::default();
        pool.attempted(addr(1), false); // a failure, remembered for FAILURE_MEMORY
        pool.note_plain(addr(2), true); // a plain answer, remembered for PLAIN_MEMORY
        pool.attempted(addr(3), true); // a success with no connection left: nothing
        let held = pool.endpoint(addr(4)); // in use elsewhere
        pool.forget_unused();
        let mut left: Vec<u16> = pool.endpoints.iter().map(|e| e.key().port()).collect();
        left.sort();
        assert_eq!(left, vec![1, 2, 4]);

        tokio::time::advance(FAILURE_MEMORY).await;
        drop(held);
        pool.forget_unused();
        assert_eq!(
            pool.endpoints.len(),
            1,
            "only the plain answer is still remembered"
        );
        assert!(pool.prefers_plain(addr(2)));

        tokio::time::advance(PLAIN_MEMORY).await;
        let guard = pool
            .opening(addr(5), None)
            .await
            .expect("no failure remembered for it");
        assert!(!pool.prefers_plain(addr(2)));
        let left: Vec<u16> = pool.endpoints.iter().map(|e| e.key().port()).collect();
        assert_eq!(left, vec![5], "the endpoint being opened stays");
        drop(guard);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_is_tried_anyway_unless_the_failure_came_after_the_caller() {
        let pool = Pool::default();
        let before = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        pool.attempted(addr(1), false);
        assert!(pool.opening(addr(1), None).await.is_none(), "skipped");
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(
            pool.opening(addr(1), Some(Instant::now())).await.is_some(),
            "a failure older than the caller: tried anyway"
        );
        assert!(
            pool.opening(addr(1), Some(before)).await.is_none(),
            "a failure the caller queued behind: not tried again"
        );
    }
}
