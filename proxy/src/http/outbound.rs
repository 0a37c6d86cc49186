//! The http outbound (`[[upstreams]] protocol = "http"`): the app speaks HTTP/1.1, or HTTP/2
//! with prior knowledge, to the upstream's plain local listener; each request goes to one of
//! the upstream's endpoints in turn (round robin per request, not per connection), over the
//! pooled HTTP/2 mutual-TLS connections to it ([`super::h2_pool`]), which must prove the
//! upstream's identity exactly as a tcp upstream's does. Bodies are streamed both ways.
//!
//! The proxy answers on its own, with a short text body: 503 when the upstream has no endpoint,
//! 502 when none can be reached (TCP connect refused or over `CONNECT_TIMEOUT`, handshake
//! refused) or the connection fails mid-request, 504 when no response header came within
//! `[limits] request_timeout` of the start of forwarding (connect included) or, for a request
//! with a body, of that body having been sent whole.

use super::h2_pool::{H2Pool, Pooled};
use super::idle_body::{IdleBody, Phase, SentBody};
use super::inbound::{local, until_done, Body, Counted};
use super::upgrade::Slot;
use crate::copy::CopyEnd;
use crate::metrics::{Direction, HandshakeResult};
use crate::outbound::Upstream;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Serves one connection from the app until it is done, idle for `idle_timeout`, or the drain
/// deadline passes; gracefully once the drain closes the listeners.
pub(crate) async fn serve(upstream: Arc<Upstream>, tcp: TcpStream, _slot: OwnedSemaphorePermit) {
    let close = upstream.inputs.drain.force_close.child_token();
    let peer = upstream.service.to_string();
    crate::forward::forward_with(Direction::Outbound, peer, None, |rx, tx| async move {
        serve_app(upstream, tcp, rx, tx, &close).await
    })
    .await
}

async fn serve_app(
    upstream: Arc<Upstream>,
    tcp: TcpStream,
    rx: metrics::Counter,
    tx: metrics::Counter,
    close: &CancellationToken,
) -> CopyEnd {
    let inputs = upstream.inputs.clone();
    let limits = &inputs.limits;
    // HTTP/2 by its preface (there is no TLS and so no ALPN on the app's side), else HTTP/1.1.
    let sniffed = super::sniff::preface(tcp);
    let (h2, io) = match tokio::time::timeout(limits.header_read_timeout, sniffed).await {
        Err(_) => return CopyEnd::Idle,
        Ok(Err(e)) => return CopyEnd::Failed(e),
        Ok(Ok(sniffed)) => sniffed,
    };
    let io = Counted::new(io, rx, tx);
    let activity = io.activity();
    let idle = async {
        loop {
            let left = limits.idle_timeout.saturating_sub(activity.idle_for());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    };
    let io = TokioIo::new(io);
    let (u, upgrade) = (upstream.clone(), Arc::new(Slot::default()));
    let slot = upgrade.clone();
    let service = hyper::service::service_fn(move |req| handle(u.clone(), slot.clone(), req));
    let drain = &inputs.drain.stop_accepting;
    let served = async {
        let served = if h2 {
            let served = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // A trailers-only gRPC answer's header is its trailers: no Date of ours in it.
                .auto_date_header(false)
                .max_concurrent_streams(super::inbound::MAX_CONCURRENT_STREAMS)
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
                .max_pending_accept_reset_streams(super::inbound::MAX_PENDING_ACCEPT_RESETS)
                .max_local_error_reset_streams(super::inbound::MAX_LOCAL_ERROR_RESETS)
                .serve_connection(io, service);
            until_done(served, drain, |c| c.graceful_shutdown()).await
        } else {
            // As on the inbound: each request's whole header within header_read_timeout, at
            // most max_header_bytes of it (else 431).
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_header_size(limits.max_header_bytes)
                .serve_connection(io, service)
                .with_upgrades();
            until_done(served, drain, |c| c.graceful_shutdown()).await
        };
        match served {
            Ok(()) => {}
            Err(e) if e.is_timeout() => return CopyEnd::Idle,
            Err(e) => return CopyEnd::Failed(io::Error::other(e)),
        }
        // An HTTP/1.1 connection that switched protocols: hyper has handed it over.
        match upgrade.take() {
            Some(upgrade) => upgrade.splice(limits.idle_timeout, close).await,
            None => CopyEnd::Done,
        }
    };
    tokio::select! {
        end = served => end,
        _ = idle => CopyEnd::Idle,
        _ = close.cancelled() => CopyEnd::Closed,
    }
}

/// One request from the app: forwarded (an HTTP/1.1 upgrade over a connection of its own,
/// [`super::upgrade_out`], left in `upgrade` once agreed), answered, counted where it is decided.
async fn handle(
    upstream: Arc<Upstream>,
    upgrade: Arc<Slot>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let response = match super::upgrade_out::requested(&req) {
        // Not forwarded (a tunnel is a tcp upstream's job); hyper's HTTP/2 client refuses one
        // with a body anyway.
        _ if req.method() == http::Method::CONNECT => local(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported by an http upstream\n",
        ),
        // Boxed: its handshake makes it a large future, which would otherwise be moved along
        // with every request's.
        Some(protocol) => {
            Box::pin(super::upgrade_out::forward(
                &upstream, req, protocol, &upgrade,
            ))
            .await
        }
        None => forward(&upstream, req).await,
    };
    upstream
        .http_metrics
        .record(response.status(), started.elapsed());
    Ok(response)
}

/// Sends `req` to the upstream's next endpoint and hands its response back, both bodies
/// streamed. A request that a pooled connection could not take (the server went away) is sent
/// on the next endpoint; one that was sent is never sent twice.
async fn forward(upstream: &Upstream, req: Request<Incoming>) -> Response<Body> {
    let pool = upstream.http.as_ref().expect("an http upstream");
    let (parts, body) = match to_upstream(upstream, req) {
        Some(req) => req.into_parts(),
        None => return local(StatusCode::BAD_REQUEST, "bad request target\n"),
    };
    // A request body that stalls for idle_timeout ends; request_timeout waits until it is sent.
    let (body, phase) = SentBody::new(body, upstream.inputs.limits.idle_timeout);
    let mut req = Request::from_parts(parts, body);
    let endpoints = upstream.endpoints.load_full();
    let n = endpoints.len();
    if n == 0 {
        tracing::warn!(upstream = %upstream.service, "the upstream has no endpoints");
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "the upstream has no endpoints\n",
        );
    }
    // One deadline for the whole forward, connect attempts included (see response_deadline).
    let (started, timeout) = (Instant::now(), upstream.inputs.limits.request_timeout);
    let first = upstream.next.fetch_add(1, Ordering::Relaxed);
    let mut turn: Vec<(SocketAddr, Option<Instant>)> =
        (0..n).map(|i| (endpoints[(first + i) % n], None)).collect();
    let mut skipped = Vec::new();
    // Endpoints in turn; then, as the tcp path does, those skipped for a recent failure, so
    // failures never leave the upstream with nothing to try.
    for pass in 0..2 {
        for (ep, retry_failed_before) in std::mem::take(&mut turn) {
            // The pooled connection without building the connect future: that one holds a
            // whole handshake, kilobytes that every request would otherwise copy (boxed when
            // needed, so this future stays small).
            let generation = upstream.pool.generation();
            let reach = match pool.get(ep, generation) {
                Some(conn) => Ok(Reach::Open(conn)),
                None => {
                    let reach = Box::pin(connection(upstream, pool, ep, retry_failed_before));
                    tokio::time::timeout_at(started + timeout, reach).await
                }
            };
            let Ok(reach) = reach else {
                tracing::debug!(upstream = %upstream.service, endpoint = %ep, "no connection within request_timeout");
                return local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream did not answer within request_timeout\n",
                );
            };
            let conn = match reach {
                Reach::Open(conn) => conn,
                Reach::Skipped if pass == 0 => {
                    skipped.push((ep, Some(started)));
                    continue;
                }
                Reach::Unreachable | Reach::Skipped => continue,
                Reach::Failed => {
                    return local(
                        StatusCode::BAD_GATEWAY,
                        "the upstream refused the connection\n",
                    )
                }
            };
            let Pooled { id, mut send, slot } = conn;
            let deadline = response_deadline(phase.clone(), started, timeout);
            let sent = tokio::select! {
                sent = send.try_send_request(req) => Ok(sent),
                () = deadline => Err(()),
            };
            match sent {
                Err(()) => {
                    tracing::debug!(upstream = %upstream.service, endpoint = %ep, "no response header within request_timeout");
                    return local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the upstream did not answer within request_timeout\n",
                    );
                }
                Ok(Ok(response)) => {
                    let (mut parts, body) = response.into_parts();
                    super::hop_by_hop(&mut parts.headers);
                    // As on the inbound: a response body that stalls for idle_timeout ends.
                    // It keeps the request's stream on the connection until it is done.
                    let idle = upstream.inputs.limits.idle_timeout;
                    let body = IdleBody::holding(body, idle, slot);
                    return Response::from_parts(parts, Either::Left(body));
                }
                Ok(Err(mut e)) => {
                    // Only a connection that failed is retired: a stream reset or a local
                    // refusal of one request leaves the others on it (and later ones) alone.
                    if send.is_closed() {
                        pool.retire(ep, id);
                    }
                    match e.take_message() {
                        Some(unsent) => {
                            tracing::debug!(upstream = %upstream.service, endpoint = %ep, error = %e.error(), "pooled connection could not take the request; trying the next endpoint");
                            req = unsent;
                        }
                        None => {
                            tracing::warn!(upstream = %upstream.service, endpoint = %ep, error = %e.error(), "request to the upstream failed");
                            return local(
                                StatusCode::BAD_GATEWAY,
                                "the upstream connection failed\n",
                            );
                        }
                    }
                }
            }
        }
        turn = std::mem::take(&mut skipped);
    }
    tracing::warn!(upstream = %upstream.service, endpoints = n, "no endpoint of the upstream is reachable");
    local(
        StatusCode::BAD_GATEWAY,
        "no endpoint of the upstream is reachable\n",
    )
}

/// Resolves when the wait for the response header is over: `timeout` after `from` (the start
/// of forwarding) while the request body has not been asked for (or there is none), else
/// `timeout` after it was sent whole; an upload in progress is bounded by `idle_timeout`.
async fn response_deadline(
    phase: Option<tokio::sync::watch::Receiver<Phase>>,
    from: Instant,
    timeout: std::time::Duration,
) {
    let Some(mut phase) = phase else {
        return tokio::time::sleep_until(from + timeout).await;
    };
    loop {
        let now = *phase.borrow_and_update();
        match now {
            Phase::Waiting => tokio::select! {
                () = tokio::time::sleep_until(from + timeout) => return,
                changed = phase.changed() => if changed.is_err() { break },
            },
            Phase::Sending => {
                if phase.changed().await.is_err() {
                    break;
                }
            }
            Phase::Sent => break,
        }
    }
    tokio::time::sleep(timeout).await
}

/// The app's request as the upstream gets it: HTTP/2 with `:authority` from the app's `Host`
/// (or its own `:authority`), hop-by-hop headers removed.
fn to_upstream(upstream: &Upstream, req: Request<Incoming>) -> Option<Request<Incoming>> {
    let (mut parts, body) = req.into_parts();
    super::hop_by_hop(&mut parts.headers);
    // One Host, no userinfo anywhere (RFC 9112 3.2, RFC 9113 8.3.1): else which host is meant
    // is ambiguous, and the proxy refuses rather than picks one.
    if parts.headers.get_all(header::HOST).iter().count() > 1 {
        return None;
    }
    let host = parts.headers.remove(header::HOST);
    let userinfo = |a: &str| a.contains('@');
    if parts.uri.authority().is_some_and(|a| userinfo(a.as_str()))
        || host.as_ref().is_some_and(|h| h.as_bytes().contains(&b'@'))
    {
        return None;
    }
    // The parts as they are (shared bytes), not formatted and parsed again.
    let authority = match parts.uri.authority() {
        Some(a) => a.clone(),
        None => match &host {
            Some(h) => Authority::try_from(h.as_bytes()).ok()?,
            None => crate::mux::authority(&upstream.service, &upstream.namespace)
                .parse()
                .ok()?,
        },
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(uri).ok()?;
    parts.version = Version::HTTP_2;
    Some(Request::from_parts(parts, body))
}

/// What trying one endpoint came to: a connection (`C`) to send on, or why not.
pub(super) enum Reach<C = Pooled> {
    Open(C),
    /// The endpoint did not answer the TCP connect: try the next one.
    Unreachable,
    /// The endpoint answered but the connection failed (handshake refused, no `h2`).
    Failed,
    /// Not tried: an attempt to reach the endpoint failed lately.
    Skipped,
}

/// A stream on a pooled connection to `ep`, or a new connection when every pooled one is full
/// (see [`H2Pool::when_full`]): one handshake at a time per endpoint, so requests that arrive
/// together share it; failures are remembered as the tcp path does (`retry_failed_before`:
/// see `mux::pool::Pool::opening`).
async fn connection(
    upstream: &Upstream,
    pool: &H2Pool,
    ep: SocketAddr,
    retry_failed_before: Option<Instant>,
) -> Reach {
    // Read before the connector: a rotation during the handshake retires this connection.
    let generation = upstream.pool.generation();
    if let Some(conn) = pool.get(ep, generation) {
        return Reach::Open(conn);
    }
    let Some(_opening) = upstream.pool.opening(ep, retry_failed_before).await else {
        return Reach::Skipped;
    };
    // Again under the lock: credentials may have rotated while we waited for it, and a
    // connection opened with the old ones would be retired at once.
    let generation = upstream.pool.generation();
    if let Some(conn) = pool.get(ep, generation) {
        return Reach::Open(conn);
    }
    let slot = match pool.when_full(&upstream.inputs.conn_slots, ep, generation) {
        Ok(conn) => return Reach::Open(conn),
        Err(slot) => slot,
    };
    let reach = open(upstream, pool, ep, generation, slot).await;
    upstream.pool.attempted(ep, matches!(reach, Reach::Open(_)));
    reach
}

/// A new connection to `ep`: TCP, the mutual-TLS handshake (the server proves the upstream's
/// identity), then HTTP/2, pooled (holding `slot` while open).
async fn open(
    upstream: &Upstream,
    pool: &H2Pool,
    ep: SocketAddr,
    generation: u64,
    slot: Option<OwnedSemaphorePermit>,
) -> Reach {
    let (tls, accepted) = match upstream.handshake_http(ep, false).await {
        Ok(done) => done,
        Err(true) => return Reach::Unreachable,
        Err(false) => return Reach::Failed,
    };
    if tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice()) {
        let why = "the endpoint did not select h2: it is not an http inbound";
        accepted
            .unanswered
            .settle(HandshakeResult::Error, None, &why);
        return Reach::Failed;
    }
    // The server sends its SETTINGS at once, or refuses our certificate with an alert.
    let not_after = accepted.not_after;
    let first = crate::outbound::first_frame(tls, accepted.unanswered, accepted.deadline);
    let Some(tls) = first.await else {
        return Reach::Failed;
    };
    match pool
        .add(&upstream.inputs, ep, tls, not_after, generation, slot)
        .await
    {
        Ok(conn) => Reach::Open(conn),
        Err(e) => {
            tracing::warn!(upstream = %upstream.service, endpoint = %ep, error = %e, "HTTP/2 setup failed");
            Reach::Failed
        }
    }
}
