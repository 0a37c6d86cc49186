//! The http outbound's HTTP/2 connections to an upstream's endpoints. A request takes a stream
//! on a pooled connection to its endpoint that has one free (HTTP/2 multiplexes requests, so one
//! mutual-TLS handshake serves many); when every connection to the endpoint has as many
//! requests in flight as the server allows (its `SETTINGS_MAX_CONCURRENT_STREAMS`), another is
//! opened, as the tcp path's tunnel pool does. A request holds its stream until its response
//! body has ended or been dropped ([`Slot`]), since the stream stays open while the body streams.
//!
//! An endpoint's first connection is opened as needed; each further one holds a
//! `max_connections` slot while it is open, so a burst of long requests cannot open connections
//! without bound. With none left, a request goes on the least busy connection, where hyper holds
//! it until a stream frees (bounded by `request_timeout`, as any wait for the response).
//!
//! A connection takes no new request (its requests in flight run to their end, then it closes)
//! when our credentials change, when the server's certificate path has expired, when the drain
//! starts, or after [`POOL_IDLE`] with no request in flight. hyper closes it when the server
//! leaves a PING unanswered for `handshake_timeout` or goes away.

use crate::copy::Activity;
use crate::inputs::ProxyInputs;
use crate::mux::pool::POOL_IDLE;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A request body as it goes upstream: bounded by `idle_timeout`, and telling when it is sent.
pub(crate) type ReqBody = super::idle_body::SentBody<Incoming>;

/// Sends requests on one pooled connection.
pub(crate) type Sender = http2::SendRequest<ReqBody>;

/// The connections of one upstream, by endpoint.
#[derive(Default)]
pub(crate) struct H2Pool {
    conns: Arc<DashMap<SocketAddr, Vec<Conn>>>,
    next_id: AtomicU64,
}

struct Conn {
    /// Tells this connection from the others to the same endpoint.
    id: u64,
    send: Sender,
    /// The upstream pool's generation (our credentials) it was opened with.
    generation: u64,
    /// When the server's verified chain stops being valid (Unix seconds).
    server_not_after: i64,
    state: Arc<ConnState>,
}

/// What a connection's driver task and the requests on it share.
struct ConnState {
    /// Requests holding a stream on it ([`Slot`]s).
    in_flight: AtomicU32,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS`, as the driver task last saw it.
    max_streams: AtomicU32,
    /// When a request last gave back a stream.
    used: Activity,
    /// The `max_connections` slot of an endpoint's further connection. hyper's connection
    /// future ends once no sender is left, while the streams in flight still run in a task of
    /// hyper's own: the slot is given back when the driver has ended *and* the last stream is.
    permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    /// The driver task has ended.
    ended: AtomicBool,
}

impl ConnState {
    fn new(max_streams: u32, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            max_streams: AtomicU32::new(max_streams),
            used: Activity::new(),
            permit: std::sync::Mutex::new(permit),
            ended: AtomicBool::new(false),
        }
    }

    /// Gives the `max_connections` slot back.
    fn release(&self) {
        drop(self.permit.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// The driver task has ended: the slot goes back now, or with the last stream.
    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            self.release();
        }
    }

    /// A stream for one request: only one free under the server's limit, unless `over_limit`.
    fn take(self: &Arc<Self>, over_limit: bool) -> Option<Slot> {
        if over_limit {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        } else {
            let max = self.max_streams.load(Ordering::Relaxed);
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()?;
        }
        // `used` is touched when the stream is given back: it is not idle while taken.
        Some(Slot(self.clone()))
    }
}

/// One request's stream on a pooled connection, given back when dropped.
pub(crate) struct Slot(Arc<ConnState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.touch();
        // SeqCst with `end`: one of the two sees the other, so the slot is given back.
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.ended.load(Ordering::SeqCst)
        {
            self.0.release();
        }
    }
}

impl Conn {
    fn usable(&self, generation: u64) -> bool {
        !self.send.is_closed()
            && self.generation == generation
            && crate::now_unix() <= self.server_not_after
    }

    fn pooled(&self, slot: Slot) -> Pooled {
        Pooled {
            id: self.id,
            send: self.send.clone(),
            slot,
        }
    }
}

/// A pooled connection handed to one request, with its stream on it.
pub(crate) struct Pooled {
    pub(crate) id: u64,
    pub(crate) send: Sender,
    pub(crate) slot: Slot,
}

impl H2Pool {
    /// A stream on an open connection to `ep` that may take a new request and has one free.
    /// Connections that may not take a new request are dropped from the pool.
    pub(crate) fn get(&self, ep: SocketAddr, generation: u64) -> Option<Pooled> {
        let mut stale = false;
        if let Some(conns) = self.conns.get(&ep) {
            for c in conns.iter() {
                if !c.usable(generation) {
                    stale = true;
                } else if let Some(slot) = c.state.take(false) {
                    return Some(c.pooled(slot));
                }
            }
        }
        if stale {
            self.prune(ep, generation);
        }
        None
    }

    /// When [`get`](Self::get) found no free stream (called while holding the endpoint's
    /// opening lock): `Err` to open a connection (with the `max_connections` slot it holds if
    /// it is not the endpoint's first), or, with no slot left, a stream on the least busy
    /// connection over the server's limit (hyper holds the request until one frees).
    pub(crate) fn when_full(
        &self,
        slots: &Arc<Semaphore>,
        ep: SocketAddr,
        generation: u64,
    ) -> Result<Pooled, Option<OwnedSemaphorePermit>> {
        let Some(conns) = self.conns.get(&ep) else {
            return Err(None);
        };
        let least_busy = conns
            .iter()
            .filter(|c| c.usable(generation))
            .min_by_key(|c| c.state.in_flight.load(Ordering::Relaxed));
        let Some(c) = least_busy else {
            return Err(None);
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => Err(Some(permit)),
            Err(_) => {
                let slot = c.state.take(true).expect("taken over the limit");
                Ok(c.pooled(slot))
            }
        }
    }

    /// Drops the connections to `ep` that may not take a new request, except newer ones: a
    /// reader holding an older generation must not evict a connection opened with a newer one.
    fn prune(&self, ep: SocketAddr, generation: u64) {
        self.conns.remove_if_mut(&ep, |_, conns| {
            conns.retain(|c| c.generation > generation || c.usable(generation));
            conns.is_empty()
        });
    }

    /// Takes the connection `id` to `ep` out of the pool (a request could not be sent on it).
    pub(crate) fn retire(&self, ep: SocketAddr, id: u64) {
        retire(&self.conns, ep, id);
    }

    /// Our certificate or roots changed: no connection takes a new request.
    pub(crate) fn retire_all(&self) {
        self.conns.clear();
    }

    /// Starts HTTP/2 over `io` (a mutual-TLS connection to `ep` that selected `h2`), pools it
    /// for the requests that follow and hands it to the first. `slot` is the `max_connections`
    /// slot it holds while open, if it is not the endpoint's first connection.
    pub(crate) async fn add<T>(
        &self,
        inputs: &Arc<ProxyInputs>,
        ep: SocketAddr,
        io: T,
        server_not_after: i64,
        generation: u64,
        slot: Option<OwnedSemaphorePermit>,
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
        // hyper's initial 100 (the http inbound's limit too) until the server's SETTINGS are
        // read; the driver task keeps it up to date from then on.
        let state = Arc::new(ConnState::new(max_streams(&connection), slot));
        let conn = Conn {
            id,
            send,
            generation,
            server_not_after,
            state: state.clone(),
        };
        // The first request's stream even if the server's limit is 0: it waits in hyper.
        let first = conn.pooled(state.take(true).expect("taken over the limit"));
        self.conns.entry(ep).or_default().push(conn);
        let conns = self.conns.clone();
        inputs
            .drain
            .tracker
            .spawn(drive(inputs.clone(), connection, conns, ep, id, state));
        Ok(first)
    }
}

/// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` as hyper knows it.
fn max_streams<T>(connection: &http2::Connection<TokioIo<T>, ReqBody, TokioExecutor>) -> u32
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    u32::try_from(connection.current_max_send_streams()).unwrap_or(u32::MAX)
}

fn retire(conns: &DashMap<SocketAddr, Vec<Conn>>, ep: SocketAddr, id: u64) {
    conns.remove_if_mut(&ep, |_, conns| {
        conns.retain(|c| c.id != id);
        conns.is_empty()
    });
}

/// Runs the connection until it ends: once it is out of the pool and the last request holding
/// it is done, or at the drain deadline.
async fn drive<T>(
    inputs: Arc<ProxyInputs>,
    connection: http2::Connection<TokioIo<T>, ReqBody, TokioExecutor>,
    conns: Arc<DashMap<SocketAddr, Vec<Conn>>>,
    ep: SocketAddr,
    id: u64,
    state: Arc<ConnState>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = std::pin::pin!(connection);
    // hyper reads the server's SETTINGS (which may change its stream limit at any time) while
    // the connection is polled, so the limit is looked at after each poll.
    let mut run = std::future::poll_fn(|cx| {
        let r = connection.as_mut().poll(cx);
        let max = max_streams(&connection);
        if state.max_streams.load(Ordering::Relaxed) != max {
            state.max_streams.store(max, Ordering::Relaxed);
        }
        r
    });
    let mut idle_check = tokio::time::interval(POOL_IDLE / 4);
    let mut retired = false;
    loop {
        tokio::select! {
            r = &mut run => {
                if let Err(e) = r {
                    tracing::debug!(endpoint = %ep, error = %e, "upstream HTTP/2 connection ended with an error");
                }
                break;
            }
            _ = inputs.drain.force_close.cancelled() => break,
            _ = inputs.drain.stop_accepting.cancelled(), if !retired => {
                retire(&conns, ep, id);
                retired = true;
            }
            _ = idle_check.tick(), if !retired => {
                let idle = state.in_flight.load(Ordering::Acquire) == 0
                    && state.used.idle_for() >= POOL_IDLE;
                if idle {
                    retire(&conns, ep, id);
                    retired = true;
                }
            }
        }
    }
    retire(&conns, ep, id);
    state.end();
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

    fn conn(id: u64, generation: u64, send: Sender, max_streams: u32) -> Conn {
        Conn {
            id,
            send,
            generation,
            server_not_after: i64::MAX,
            state: Arc::new(ConnState::new(max_streams, None)),
        }
    }

    #[tokio::test]
    async fn a_reader_with_an_older_generation_does_not_evict_a_newer_connection() {
        let pool = H2Pool::default();
        let ep: SocketAddr = "127.0.0.1:1".parse().unwrap();
        pool.conns.insert(ep, vec![conn(2, 2, sender().await, 100)]);
        assert!(
            pool.get(ep, 1).is_none(),
            "not usable with older credentials"
        );
        assert_eq!(pool.get(ep, 2).map(|p| p.id), Some(2), "still pooled");
        // A newer generation does retire it.
        assert!(pool.get(ep, 3).is_none());
        assert!(pool.conns.get(&ep).is_none());
    }

    #[tokio::test]
    async fn a_request_holds_a_stream_until_it_is_done_and_full_connections_open_another() {
        let pool = H2Pool::default();
        let ep: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (none, one) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(1)));
        assert!(
            matches!(pool.when_full(&one, ep, 1), Err(None)),
            "an endpoint's first connection holds no max_connections slot"
        );
        pool.conns.insert(ep, vec![conn(1, 1, sender().await, 2)]);
        let a = pool.get(ep, 1).expect("a free stream");
        let b = pool.get(ep, 1).expect("a second free stream");
        assert!(pool.get(ep, 1).is_none(), "the server's limit is reached");
        let Err(Some(permit)) = pool.when_full(&one, ep, 1) else {
            panic!("every connection is full: open another, holding a max_connections slot");
        };
        drop(permit);
        let Ok(over) = pool.when_full(&none, ep, 1) else {
            panic!("no max_connections slot left: wait on a full connection");
        };
        assert_eq!(over.id, 1);
        drop((a, over));
        assert_eq!(
            pool.get(ep, 1).map(|p| p.id),
            Some(1),
            "a stream given back"
        );
        drop(b);
    }

    #[test]
    fn a_further_connections_slot_is_held_until_its_driver_and_its_last_stream_have_ended() {
        let slots = Arc::new(Semaphore::new(1));
        let permit = slots.clone().try_acquire_owned().unwrap();
        let state = Arc::new(ConnState::new(100, Some(permit)));
        let streaming = state.take(false).unwrap();
        // hyper's connection future ends when the last sender goes; a response still streams.
        state.end();
        assert_eq!(slots.available_permits(), 0, "a stream still runs");
        drop(streaming);
        assert_eq!(
            slots.available_permits(),
            1,
            "given back with the last stream"
        );
        // Ended with nothing in flight: given back at once.
        let permit = slots.clone().try_acquire_owned().unwrap();
        let state = ConnState::new(100, Some(permit));
        state.end();
        assert_eq!(slots.available_permits(), 1);
    }
}
