//! HTTP/1.1 upgrades (WebSocket, or any other protocol named in `Upgrade`) through the http
//! outbound, with no config. HTTP/2 between the sidecars cannot carry an HTTP/1.1 upgrade, so
//! such a request never takes a pooled HTTP/2 connection: it goes to the upstream's next
//! endpoint over a mutual-TLS connection of its own with ALPN `http/1.1` (the same client
//! config, server-identity check and memory of failed endpoints as the pooled path), and the
//! endpoint's http inbound forwards it to its app, deciding it as any request. When the answer
//! is 101, the app's connection and this one are spliced ([`super::upgrade::Pending::splice`]:
//! `idle_timeout`, closed at the drain deadline); any other answer is an ordinary response, and
//! the connection closes after it.

use super::inbound::{local, Body};
use super::outbound::Reach;
use super::upgrade::{Pending, Slot};
use crate::outbound::{Answered, Upstream};
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// A request of the app's that asks for an upgrade this path carries: its `Upgrade` value.
/// `h2c` alone is left to the pooled path, which drops it as any hop-by-hop header: the app's
/// requests already reach the upstream over HTTP/2.
pub(crate) fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    super::upgrade::requested(req)
}

/// Sends the upgrade request `req` (asking for `protocol`) to the upstream's next endpoint and
/// hands its answer back; a 101 is left in `slot` for the connection to splice.
pub(crate) async fn forward(
    upstream: &Upstream,
    mut req: Request<Incoming>,
    protocol: HeaderValue,
    slot: &Slot,
) -> Response<Body> {
    let client = hyper::upgrade::on(&mut req);
    let Some(req) = to_endpoint(upstream, req, protocol) else {
        return local(StatusCode::BAD_REQUEST, "bad request target\n");
    };
    let endpoints = upstream.endpoints.load_full();
    let n = endpoints.len();
    if n == 0 {
        tracing::warn!(upstream = %upstream.service, "the upstream has no endpoints");
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "the upstream has no endpoints\n",
        );
    }
    let started = Instant::now();
    let first = upstream.next.fetch_add(1, Ordering::Relaxed);
    let mut turn: Vec<(SocketAddr, Option<Instant>)> =
        (0..n).map(|i| (endpoints[(first + i) % n], None)).collect();
    let mut skipped = Vec::new();
    // As the pooled path: endpoints in turn, then those skipped for a recent failure.
    for pass in 0..2 {
        for (ep, retry_failed_before) in std::mem::take(&mut turn) {
            match connect(upstream, ep, retry_failed_before).await {
                Reach::Open(send) => return exchange(upstream, ep, send, req, client, slot).await,
                Reach::Skipped if pass == 0 => skipped.push((ep, Some(started))),
                Reach::Unreachable | Reach::Skipped => {}
                Reach::Failed => {
                    return local(
                        StatusCode::BAD_GATEWAY,
                        "the upstream refused the connection\n",
                    )
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

/// The app's request as the endpoint gets it: HTTP/1.1 in origin form, `Host` from the target's
/// authority or the app's `Host` (else the upstream's name), hop-by-hop headers removed but for
/// the upgrade's own.
fn to_endpoint(
    upstream: &Upstream,
    req: Request<Incoming>,
    protocol: HeaderValue,
) -> Option<Request<Incoming>> {
    let (mut parts, body) = req.into_parts();
    super::hop_by_hop(&mut parts.headers);
    super::upgrade::restore(&mut parts.headers, protocol);
    let host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok()?,
        None => match parts.headers.get(header::HOST) {
            Some(h) => h.clone(),
            None => HeaderValue::from_str(&crate::mux::authority(
                &upstream.service,
                &upstream.namespace,
            ))
            .ok()?,
        },
    };
    parts.headers.insert(header::HOST, host);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    Some(Request::from_parts(parts, body))
}

/// A new HTTP/1.1 connection to `ep` for one upgrade: skipped when an attempt to reach `ep`
/// failed lately, as the pooled path does (waiting for a handshake under way to it, whose result
/// it then follows; the lock is not held for this handshake: no other request shares it).
async fn connect(
    upstream: &Upstream,
    ep: SocketAddr,
    retry_failed_before: Option<Instant>,
) -> Reach<http1::SendRequest<Incoming>> {
    match upstream.pool.opening(ep, retry_failed_before).await {
        Some(opening) => drop(opening),
        None => return Reach::Skipped,
    }
    let (tls, accepted) = match upstream.handshake_http(ep, true).await {
        Ok(done) => done,
        Err(unreachable) => {
            upstream.pool.attempted(ep, false);
            return match unreachable {
                true => Reach::Unreachable,
                false => Reach::Failed,
            };
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(b"http/1.1".as_slice()) {
        let why = "the endpoint did not select http/1.1: it is not an http inbound";
        accepted
            .unanswered
            .settle(crate::metrics::HandshakeResult::Error, None, &why);
        upstream.pool.attempted(ep, false);
        return Reach::Failed;
    }
    // Counted at the server's first record: its answer, or its refusal of our certificate.
    let io = TokioIo::new(Answered::new(tls, accepted.unanswered));
    let (send, connection) = match http1::Builder::new().handshake(io).await {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!(upstream = %upstream.service, endpoint = %ep, error = %e, "HTTP/1.1 setup failed");
            return Reach::Failed;
        }
    };
    // Runs until the exchange is done (after a 101, until hyper hands the connection over to
    // the splice), or the drain deadline.
    let close = upstream.inputs.drain.force_close.clone();
    upstream.inputs.drain.tracker.spawn(async move {
        tokio::select! {
            r = connection.with_upgrades() => if let Err(e) = r {
                tracing::debug!(endpoint = %ep, error = %e, "upgrade connection to the upstream ended with an error");
            },
            _ = close.cancelled() => {}
        }
    });
    Reach::Open(send)
}

/// Sends `req` on `send` (a connection to `ep`) and hands the answer back; on 101, the two
/// upgraded halves go to `slot`. Whether a response header came marks `ep` reachable or not.
async fn exchange(
    upstream: &Upstream,
    ep: SocketAddr,
    mut send: http1::SendRequest<Incoming>,
    req: Request<Incoming>,
    client: hyper::upgrade::OnUpgrade,
    slot: &Slot,
) -> Response<Body> {
    let timeout = upstream.inputs.limits.request_timeout;
    let sent = async {
        send.ready().await?;
        send.send_request(req).await
    };
    let mut response = match tokio::time::timeout(timeout, sent).await {
        Err(_) => {
            tracing::debug!(upstream = %upstream.service, endpoint = %ep, "no response header within request_timeout");
            // The answer's future is dropped: hyper closes the connection.
            return local(
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream did not answer within request_timeout\n",
            );
        }
        Ok(Err(e)) => {
            upstream.pool.attempted(ep, false);
            tracing::warn!(upstream = %upstream.service, endpoint = %ep, error = %e, "upgrade request to the upstream failed");
            return local(StatusCode::BAD_GATEWAY, "the upstream connection failed\n");
        }
        Ok(Ok(response)) => response,
    };
    upstream.pool.attempted(ep, true);
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upstream_side = switched.then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    super::hop_by_hop(&mut parts.headers);
    if let Some(upstream_side) = upstream_side {
        let Some(protocol) = protocol else {
            tracing::warn!(upstream = %upstream.service, endpoint = %ep, "the upstream switched protocols without naming one");
            return local(
                StatusCode::BAD_GATEWAY,
                "the upstream switched protocols without naming one\n",
            );
        };
        super::upgrade::restore(&mut parts.headers, protocol);
        // `app` is the far side of the splice: here, the connection to the upstream.
        slot.set(Pending {
            client,
            app: upstream_side,
        });
    }
    let idle = upstream.inputs.limits.idle_timeout;
    Response::from_parts(
        parts,
        Either::Left(super::idle_body::IdleBody::new(body, idle)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asking(connection: &str, upgrade: &str, version: Version) -> Request<()> {
        Request::builder()
            .version(version)
            .header(header::CONNECTION, connection)
            .header(header::UPGRADE, upgrade)
            .body(())
            .unwrap()
    }

    #[test]
    fn an_http1_upgrade_takes_this_path_but_h2c_does_not() {
        let v11 = Version::HTTP_11;
        let ws = asking("keep-alive, Upgrade", "websocket", v11);
        assert_eq!(requested(&ws).unwrap(), "websocket");
        assert_eq!(
            requested(&asking("upgrade", "x-echo/2", v11)).unwrap(),
            "x-echo/2"
        );
        // curl's `--http2` on http:// asks for h2c: served on the pooled HTTP/2 path instead.
        assert!(requested(&asking("Upgrade, HTTP2-Settings", "h2c", v11)).is_none());
        assert!(requested(&asking("keep-alive", "websocket", v11)).is_none());
        assert!(requested(&asking("upgrade", "websocket", Version::HTTP_2)).is_none());
    }
}
