//! One admitted http connection: HTTP/2 or HTTP/1.1 (by ALPN, else by the client's first
//! bytes), each request decided by [`request_decision`] and forwarded to `local_app`.

use super::app_client::AppClient;
use super::idle_body::IdleBody;
use crate::copy::{Activity, CopyEnd};
use crate::inputs::ProxyInputs;
use crate::l7::path::{normalize, Rejection};
use crate::metrics as m;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use ward_config::SpiffeId;

/// Streams one HTTP/2 connection may have open at once (as a `ward-mux/1` tunnel).
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Rapid-reset protection (CVE-2023-44487): streams a client may open and reset before the
/// server has accepted them, and streams the server may reset for a client's protocol errors,
/// before the connection is closed with GOAWAY.
pub(crate) const MAX_PENDING_ACCEPT_RESETS: usize = 20;
pub(crate) const MAX_LOCAL_ERROR_RESETS: usize = 1024;

pub(crate) type Body = Either<IdleBody<Incoming>, Full<Bytes>>;

/// What every request on one admitted connection shares.
pub(crate) struct HttpConn {
    pub inputs: Arc<ProxyInputs>,
    pub app: AppClient,
    pub local_app: SocketAddr,
    /// The caller's identity, from its verified certificate.
    pub peer: SpiffeId,
    /// The request metrics, labelled with the caller's service name.
    pub metrics: super::request_metrics::RequestMetrics,
    /// `local_app` as the `:authority` of gRPC requests, and the `Host` of those naming none.
    pub app_authority: http::uri::Authority,
    /// The `x-forwarded-client-cert` every forwarded request carries.
    pub xfcc: HeaderValue,
    /// An HTTP/1.1 upgrade the app accepted, for `serve` to splice.
    pub upgrade: super::upgrade::Slot,
}

/// `addr` as an authority (`Host`): a socket address always is one.
pub(crate) fn authority_of(addr: SocketAddr) -> http::uri::Authority {
    addr.to_string()
        .parse()
        .expect("a socket address is an authority")
}

/// Serves `io` until the client is done, the connection fails, no byte moved either way for
/// `idle_timeout`, or `close` (intention deny, drain deadline) fires; gracefully once a drain
/// closes the listeners. `alpn_h2` is the protocol the TLS handshake agreed (`Some(true)` h2,
/// `Some(false)` http/1.1); with none, the client's first bytes decide ([`super::sniff`]).
///
/// `idle_timeout` is also the body idle timeout: a request or response body that stops moving
/// leaves the connection idle, and ends its stream ([`super::idle_body`]). A malformed HTTP/1.1
/// request is answered by hyper (400, or 431 for an oversized header) and counted in
/// `ward_http_requests_total` with that code. On HTTP/2, h2 resets a malformed request's stream
/// (`PROTOCOL_ERROR`, RFC 9113 section 8.1.1) and closes with GOAWAY a connection that floods
/// resets or header fragments.
pub(crate) async fn serve<I>(
    conn: Arc<HttpConn>,
    io: Counted<I>,
    alpn_h2: Option<bool>,
    close: &CancellationToken,
) -> CopyEnd
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &conn.inputs.limits;
    let activity = io.activity.clone();
    let idle = async {
        loop {
            let left = limits.idle_timeout.saturating_sub(activity.idle_for());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    };
    let drain = &conn.inputs.drain.stop_accepting;
    let served = async {
        let (h2, io) = match alpn_h2 {
            Some(h2) => (h2, super::sniff::Rewind::new(io, Vec::new())),
            // The preface is part of the request header: header_read_timeout bounds it.
            None => {
                match tokio::time::timeout(limits.header_read_timeout, super::sniff::preface(io))
                    .await
                {
                    Ok(Ok(sniffed)) => sniffed,
                    Ok(Err(e)) => return CopyEnd::Failed(e),
                    Err(_) => return CopyEnd::Idle,
                }
            }
        };
        let io = TokioIo::new(io);
        let c = conn.clone();
        let service = hyper::service::service_fn(move |req| handle(c.clone(), req));
        let served = if h2 {
            let served = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // A trailers-only gRPC answer's header is its trailers: no Date of ours in it.
                .auto_date_header(false)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
                .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
                .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
                .serve_connection(io, service);
            until_done(served, drain, |c| c.graceful_shutdown()).await
        } else {
            // A client must send each request's whole header within header_read_timeout (also
            // the longest a kept-alive connection waits for its next request), and at most
            // max_header_bytes of it (else 431).
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
            // header_read_timeout, most often on a kept-alive connection left idle.
            Err(e) if e.is_timeout() => return CopyEnd::Idle,
            Err(e) => {
                count_malformed(&conn, &e);
                return CopyEnd::Failed(std::io::Error::other(e));
            }
        }
        // An HTTP/1.1 connection that switched protocols: hyper has handed it over.
        match conn.upgrade.take() {
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

/// Counts a request hyper refused as malformed, with the status hyper answered it with.
fn count_malformed(conn: &HttpConn, e: &hyper::Error) {
    let code = if e.is_parse_too_large() {
        // hyper answers an oversized request line 414 and an oversized header 431.
        if e.to_string().contains("URI") {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        }
    } else if e.is_parse() && !e.is_parse_version_h2() {
        StatusCode::BAD_REQUEST
    } else {
        return;
    };
    tracing::debug!(peer = %conn.metrics.peer(), error = %e, "malformed http request refused");
    conn.metrics.count(code);
}

/// Runs `served` to its end; once the drain closes the listeners, shuts it down gracefully
/// (`shutdown`): requests in flight finish, then HTTP/1.1 closes and HTTP/2 sends GOAWAY, so
/// clients go elsewhere before `drain_timeout` cuts whatever is left.
pub(crate) async fn until_done<C, E>(
    served: C,
    drain: &CancellationToken,
    shutdown: fn(Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    let mut served = std::pin::pin!(served);
    tokio::select! {
        r = served.as_mut() => return r,
        _ = drain.cancelled() => shutdown(served.as_mut()),
    }
    served.await
}

/// The origin-form target of `req` as received: `path?query` (empty for a request without a
/// path, such as `CONNECT host:port`, which [`normalize`] then refuses).
fn target_of<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("", |p| p.as_str())
}

/// Rewrites the request target to its normalized form ([`crate::l7::path`]): the path the
/// permissions match is then the path `forward` sends. A target that cannot be normalized is
/// refused, and nothing is forwarded.
fn normalize_target<B>(req: &mut Request<B>) -> Result<(), Rejection> {
    let n = normalize(target_of(req))?;
    if n.is_unchanged() {
        return Ok(());
    }
    let target: PathAndQuery = n.target().parse().map_err(|_| Rejection::BadCharacter)?;
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.path_and_query = Some(target);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Rejection::BadCharacter)?;
    Ok(())
}

/// Whether this request may reach `local_app`: the per-request decision point of the http
/// inbound, on the *current* snapshot (a change applies to the next request of an open
/// connection). The caller's L4 decision as the handshake takes it (an intention that turned to
/// deny is refused here even before its connection is closed), then, for an L7 rule, the first
/// of its permissions that matches the method, the normalized path and the headers; none
/// matching is a deny. Each L7 decision counts in `ward_intention_decisions_total`.
pub(crate) fn request_decision<B>(conn: &HttpConn, req: &Request<B>) -> bool {
    // Normalized already by `handle` (normalizing again changes nothing); a target that does
    // not normalize is never allowed.
    let Ok(target) = normalize(target_of(req)) else {
        return false;
    };
    let Some(d) = conn.inputs.intentions.decide_request(
        &conn.peer,
        req.method(),
        target.path(),
        req.headers(),
    ) else {
        return false;
    };
    if let Some(l7) = d.l7 {
        metrics::counter!(
            m::INTENTION_DECISIONS,
            "source" => conn.peer.service.to_string(),
            "destination" => conn.inputs.service.name.to_string(),
            "decision" => l7.action.as_str(),
        )
        .increment(1);
    }
    d.is_allow()
}

async fn handle(
    conn: Arc<HttpConn>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    // The answers say nothing about the rules: no permission, no path is named.
    let response = match normalize_target(&mut req) {
        Err(Rejection::TooLong) => local(StatusCode::URI_TOO_LONG, "request target too long\n"),
        Err(_) => local(StatusCode::BAD_REQUEST, "bad request target\n"),
        Ok(()) if request_decision(&conn, &req) => forward(&conn, req).await,
        Ok(()) => local(StatusCode::FORBIDDEN, "denied by intention\n"),
    };
    conn.metrics.record(response.status(), started.elapsed());
    Ok(response)
}

/// Forwards `req` to `local_app` and hands its response back, both bodies streamed (gRPC's
/// trailers included). A gRPC request that arrived over HTTP/2 goes to the app over h2c (gRPC
/// needs HTTP/2 end to end); every other request over HTTP/1.1, which every app speaks. An
/// HTTP/1.1 upgrade the app accepts is left in `conn.upgrade` for `serve` to splice.
async fn forward(conn: &HttpConn, mut req: Request<Incoming>) -> Response<Body> {
    let upgrade = super::upgrade::requested(&req);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let grpc = req.version() == Version::HTTP_2 && is_grpc(req.headers());
    let (mut parts, body) = req.into_parts();
    super::hop_by_hop(&mut parts.headers);
    if grpc {
        // HTTP/2 names the host in `:authority` alone.
        parts.headers.remove(header::HOST);
    } else if !parts.headers.contains_key(header::HOST) {
        // HTTP/2 carries the host in `:authority`; HTTP/1.1 to the app needs it as `Host`,
        // local_app's own when the caller named none (HTTP/1.0, or HTTP/2 without one).
        let host = match parts.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => HeaderValue::from_str(conn.app_authority.as_str()).ok(),
        };
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
    }
    if let Some(upgrade) = upgrade {
        super::upgrade::restore(&mut parts.headers, upgrade);
    }
    // Every instance the caller sent is replaced: the app trusts only ours.
    parts.headers.remove(super::xfcc::HEADER);
    parts.headers.insert(super::xfcc::HEADER, conn.xfcc.clone());
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // HTTP/1.1 in origin form (its host is in `Host`); the h2c client wants the whole URI.
    parts.uri = if grpc {
        match Uri::builder()
            .scheme("http")
            .authority(conn.app_authority.clone())
            .path_and_query(path)
            .build()
        {
            Ok(uri) => uri,
            Err(_) => return local(StatusCode::BAD_REQUEST, "bad request target\n"),
        }
    } else {
        Uri::from(path)
    };
    parts.version = if grpc {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let idle = conn.inputs.limits.idle_timeout;
    let body = IdleBody::new(body, idle);
    match conn.app.request(Request::from_parts(parts, body)).await {
        Ok(mut response) => {
            let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let app_upgrade = switched.then(|| hyper::upgrade::on(&mut response));
            let (mut parts, body) = response.into_parts();
            let protocol = parts.headers.get(header::UPGRADE).cloned();
            super::hop_by_hop(&mut parts.headers);
            if let Some(app) = app_upgrade {
                let (Some(client), Some(protocol)) = (client_upgrade, protocol) else {
                    tracing::warn!(local_app = %conn.local_app, "local_app switched protocols unasked");
                    return local(
                        StatusCode::BAD_GATEWAY,
                        "local_app switched protocols unasked\n",
                    );
                };
                super::upgrade::restore(&mut parts.headers, protocol);
                conn.upgrade.set(super::upgrade::Pending { client, app });
            }
            Response::from_parts(parts, Either::Left(IdleBody::new(body, idle)))
        }
        Err(e) => {
            tracing::warn!(local_app = %conn.local_app, error = %e, "forwarding to local_app failed");
            local(StatusCode::BAD_GATEWAY, "local_app is unreachable\n")
        }
    }
}

/// Whether `content-type` is gRPC's (`application/grpc`, `+proto` and other codecs; not
/// gRPC-Web, which HTTP/1.1 carries).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

/// An answer of the proxy's own.
pub(crate) fn local(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Counts the bytes of an http connection in `ward_bytes_total`, as L4 forwarding does, and
/// notes when they last moved, for `idle_timeout`.
pub(crate) struct Counted<I> {
    io: I,
    rx: metrics::Counter,
    tx: metrics::Counter,
    activity: Arc<Activity>,
}

impl<I> Counted<I> {
    pub(crate) fn new(io: I, rx: metrics::Counter, tx: metrics::Counter) -> Self {
        Self {
            io,
            rx,
            tx,
            activity: Arc::new(Activity::new()),
        }
    }

    /// When bytes last moved either way.
    pub(crate) fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.rx.increment(n as u64);
            self.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.tx.increment(n as u64);
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.tx.increment(n as u64);
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::request_metrics::RequestMetrics;
    use super::*;
    use crate::test_pki::{ca, id, inputs, intentions, snapshot, store_for};
    use ward_config::intentions::Action;

    #[tokio::test]
    async fn each_request_is_decided_on_the_current_intentions() {
        let root = ca("root", None, 3650, None);
        let credentials = store_for("inventory", &root, &[&root]);
        let inputs = inputs(
            "inventory",
            credentials,
            intentions(Action::Deny, &["order"]),
        );
        let conn = HttpConn {
            inputs: inputs.clone(),
            app: crate::http::app_client::new("127.0.0.1:1".parse().unwrap()),
            local_app: "127.0.0.1:1".parse().unwrap(),
            peer: id("order"),
            metrics: RequestMetrics::new(m::Direction::Inbound, "order".into()),
            app_authority: authority_of("127.0.0.1:1".parse().unwrap()),
            xfcc: HeaderValue::from_static("By=x"),
            upgrade: Default::default(),
        };
        let req = Request::new(());
        assert!(request_decision(&conn, &req));
        // A caller whose rule is no longer an L4 allow is refused per request.
        assert!(inputs.intentions.publish(snapshot(2, Action::Deny, &[])));
        assert!(!request_decision(&conn, &req));
    }

    /// `order`'s connection to `inventory`, whose intentions are `rules` (version 1).
    fn conn_under(rules: Vec<ward_config::intentions::Rule>) -> HttpConn {
        let root = ca("root", None, 3650, None);
        let credentials = store_for("inventory", &root, &[&root]);
        let ns = ward_config::Name::new("default").unwrap();
        let store = crate::intentions::IntentionStore::default();
        store.publish(crate::intentions::IntentionSnapshot::new(
            1,
            Action::Deny,
            rules,
            &ns,
        ));
        HttpConn {
            inputs: inputs("inventory", credentials, Arc::new(store)),
            app: crate::http::app_client::new("127.0.0.1:1".parse().unwrap()),
            local_app: "127.0.0.1:1".parse().unwrap(),
            peer: id("order"),
            metrics: RequestMetrics::new(m::Direction::Inbound, "order".into()),
            app_authority: authority_of("127.0.0.1:1".parse().unwrap()),
            xfcc: HeaderValue::from_static("By=x"),
            upgrade: Default::default(),
        }
    }

    fn l7(toml: &str) -> Vec<ward_config::intentions::Rule> {
        let raw = ward_config::permission::RawRule::from_toml(toml).unwrap();
        vec![ward_config::intentions::Rule::l7(
            ward_config::intentions::Source::parse("order").unwrap(),
            raw.permissions().unwrap(),
        )]
    }

    fn request(method: &str, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .body(())
            .unwrap()
    }

    // A runtime: the app client sweeps its idle connections in a task.
    #[tokio::test]
    async fn l7_permissions_decide_each_request_on_the_normalized_path() {
        let conn = conn_under(l7(r#"permissions = [
  { action = "deny", path_prefix = "/stock/secret" },
  { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
  { action = "deny", path_exact = "/admin" },
]"#));
        let cases = [
            ("GET", "/stock/1", true),
            ("GET", "/stock/1?q=/admin", true),
            ("POST", "/stock/1", false),
            ("GET", "/admin", false),
            ("GET", "/stock/../admin", false),
            ("GET", "/stock/%2e%2e/admin", false),
            ("GET", "//stock//secret/1", false),
            ("GET", "/stock/./x/../secret", false),
            // Normalized to /admin (not under /stock/): no permission matches it.
            ("GET", "/stock/../stock/../%61dmin", false),
            ("GET", "/stock%2F..%2Fadmin", false),
            ("GET", "/", false),
        ];
        for (method, target, allowed) in cases {
            let req = request(method, target);
            assert_eq!(request_decision(&conn, &req), allowed, "{method} {target}");
        }
    }

    #[test]
    fn the_target_forwarded_is_the_one_matched() {
        let mut req = request(
            "GET",
            "https://inventory:21000/stock/./a/..//%61dmin?x=/../&y",
        );
        normalize_target(&mut req).unwrap();
        assert_eq!(req.uri().path_and_query().unwrap(), "/stock/admin?x=/../&y");
        assert_eq!(req.uri().authority().unwrap(), "inventory:21000");
        let mut req = request("GET", "/stock/1");
        normalize_target(&mut req).unwrap();
        assert_eq!(req.uri(), "/stock/1");
        for (bad, why) in [
            ("/stock%2F..%2Fadmin", Rejection::EncodedSeparator),
            ("/a%5c", Rejection::EncodedSeparator),
            ("/a%zz", Rejection::BadEscape),
        ] {
            let mut req = request("GET", bad);
            assert_eq!(normalize_target(&mut req), Err(why), "{bad}");
            assert_eq!(req.uri(), bad, "left as received, and never forwarded");
        }
        let mut req = request("CONNECT", "inventory:443");
        assert_eq!(normalize_target(&mut req), Err(Rejection::NotOriginForm));
    }

    // A runtime: the app client sweeps its idle connections in a task.
    #[tokio::test]
    async fn a_change_of_permissions_applies_to_the_next_request() {
        let conn = conn_under(l7(
            r#"permissions = [{ action = "allow", path_prefix = "/a" }]"#,
        ));
        let a = request("GET", "/a");
        let b = request("GET", "/b");
        assert!(request_decision(&conn, &a) && !request_decision(&conn, &b));
        let ns = ward_config::Name::new("default").unwrap();
        let next = l7(r#"permissions = [{ action = "allow", path_prefix = "/b" }]"#);
        assert!(conn
            .inputs
            .intentions
            .publish(crate::intentions::IntentionSnapshot::new(
                2,
                Action::Deny,
                next,
                &ns
            )));
        assert!(!request_decision(&conn, &a) && request_decision(&conn, &b));
    }

    /// A connection for `order` whose inputs have `limits`.
    fn conn_with(limits: ward_config::proxy::Limits) -> Arc<HttpConn> {
        let root = ca("root", None, 3650, None);
        let credentials = store_for("inventory", &root, &[&root]);
        let service = ward_config::proxy::ServiceConfig {
            name: ward_config::Name::new("inventory").unwrap(),
            namespace: ward_config::Name::new("default").unwrap(),
            trust_domain: None,
        };
        let intentions = intentions(Action::Deny, &["order"]);
        let inputs = Arc::new(ProxyInputs::new(service, credentials, intentions, limits));
        Arc::new(HttpConn {
            inputs,
            app: crate::http::app_client::new("127.0.0.1:1".parse().unwrap()),
            local_app: "127.0.0.1:1".parse().unwrap(),
            peer: id("order"),
            metrics: RequestMetrics::new(m::Direction::Inbound, "order".into()),
            app_authority: authority_of("127.0.0.1:1".parse().unwrap()),
            xfcc: HeaderValue::from_static("By=x"),
            upgrade: Default::default(),
        })
    }

    fn counted(io: tokio::io::DuplexStream) -> Counted<tokio::io::DuplexStream> {
        Counted::new(io, metrics::Counter::noop(), metrics::Counter::noop())
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_idle_timeout() {
        let conn = conn_with(ward_config::proxy::Limits {
            idle_timeout: std::time::Duration::from_secs(5),
            ..Default::default()
        });
        // An HTTP/2 client that connects and never sends its preface (no other timer runs).
        let (_client, server) = tokio::io::duplex(1024);
        let started = Instant::now();
        let end = serve(conn, counted(server), Some(true), &CancellationToken::new()).await;
        assert!(matches!(end, CopyEnd::Idle), "{end:?}");
        assert!(started.elapsed() >= std::time::Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_a_kept_alive_connection_before_its_timeouts() {
        let conn = conn_with(ward_config::proxy::Limits::default());
        let inputs = conn.inputs.clone();
        // An HTTP/1.1 client between requests: nothing in flight, so a drain closes it at once.
        let (_client, server) = tokio::io::duplex(1024);
        let served = tokio::spawn(async move {
            serve(
                conn,
                counted(server),
                Some(false),
                &CancellationToken::new(),
            )
            .await
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let started = Instant::now();
        inputs.drain.begin_drain();
        let end = served.await.unwrap();
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        // Sooner than header_read_timeout (10 s) or idle_timeout would have closed it.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
