//! The admin listener of `ward proxy` and `ward server`: /live, /ready, /metrics, /config, POST
//! /drain (reference: docs/admin-api.md). Both serve the same paths under the same access rules
//! through [`serve`]: /config and /drain answer loopback peers only; on a non-loopback listen
//! address only GET /metrics, /ready and /live are served, and a POST that carries `Origin` (sent
//! by a browser page) is refused (security rule 13, admin listener, docs/security.md).

use crate::inputs::ProxyInputs;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// At most this many admin connections at once; the admin API must not compete with traffic.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// How long a connection may stay open, and how long a request in flight when the listener
/// stops may take to be answered.
const CONNECTION_TIME: Duration = Duration::from_secs(30);
const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// What one admin listener answers; the proxy and `ward server` each implement it.
pub trait Endpoints: Send + Sync + 'static {
    /// `GET /ready`: `Ok` answers 200, `Err(why)` 503 with `why` as the body.
    fn ready(&self) -> Result<(), &'static str>;
    /// `GET /metrics`: Prometheus text format 0.0.4; the process's own metrics
    /// ([`crate::process_metrics`]) are appended to it.
    fn metrics(&self) -> String;
    /// `GET /config`: what the process runs with; never a key, a token or a token hash.
    fn config(&self) -> serde_json::Value;
    /// `POST /drain`: starts the same drain as SIGTERM.
    fn drain(&self);
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// Serves `endpoints` until `stop` resolves; then stops accepting, lets the requests in flight be
/// answered (the `POST /drain` that stopped it among them) and returns. `local_only`: the listen
/// address is a loopback one (security rule 13).
pub async fn serve<E: Endpoints>(
    listener: TcpListener,
    endpoints: Arc<E>,
    local_only: bool,
    stop: impl Future<Output = ()>,
) {
    let stopping = CancellationToken::new();
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        if conns.len() >= MAX_ADMIN_CONNECTIONS {
            continue;
        }
        let endpoints = endpoints.clone();
        let stopping = stopping.clone();
        conns.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = answer(&*endpoints, &req, local_only, peer);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "admin connection ended");
                    }
                    return;
                }
                () = tokio::time::sleep(CONNECTION_TIME) => return,
                () = stopping.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(ANSWER_GRACE, conn).await;
        });
    }
    drop(listener);
    stopping.cancel();
    let _ = tokio::time::timeout(ANSWER_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

fn answer<E: Endpoints, B>(
    endpoints: &E,
    req: &Request<B>,
    local_only: bool,
    peer: SocketAddr,
) -> Response<Body> {
    if !allowed(req.method(), req.uri().path(), local_only, peer) || from_a_web_page(req) {
        return reply(StatusCode::FORBIDDEN, "text/plain", "forbidden\n");
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => reply(StatusCode::OK, "text/plain", "live\n"),
        (&Method::GET, "/ready") => match endpoints.ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            let mut body = endpoints.metrics();
            crate::process_metrics::render(&mut body);
            reply(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        (&Method::GET, "/config") => {
            let body = serde_json::to_vec_pretty(&endpoints.config()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        (&Method::POST, "/drain") => {
            endpoints.drain();
            reply(StatusCode::OK, "text/plain", "draining\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/drain") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The proxy's endpoints.
pub struct Admin {
    pub inputs: Arc<ProxyInputs>,
    pub prometheus: Option<PrometheusHandle>,
    pub local_only: bool,
}

impl Admin {
    /// Serves until the process exits: the admin listener stays up through a drain.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let local_only = self.local_only;
        serve(listener, self, local_only, std::future::pending()).await;
    }
}

impl Endpoints for Admin {
    fn ready(&self) -> Result<(), &'static str> {
        if self.inputs.is_ready() {
            Ok(())
        } else if self.inputs.drain.is_draining() {
            Err("draining")
        } else {
            Err("not ready")
        }
    }

    fn metrics(&self) -> String {
        self.prometheus
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default()
    }

    fn config(&self) -> serde_json::Value {
        crate::config_dump::dump(&self.inputs)
    }

    fn drain(&self) {
        self.inputs.drain.begin_drain();
    }
}

/// Security rule 13 (admin listener, docs/security.md): GET /metrics, /ready and /live for anyone
/// who reaches the listener; everything else (/config, POST /drain) only on a loopback listener and
/// from a loopback peer.
fn allowed(method: &Method, path: &str, local_only: bool, peer: SocketAddr) -> bool {
    let public = method == Method::GET && matches!(path, "/metrics" | "/ready" | "/live");
    public || (local_only && peer.ip().is_loopback())
}

/// Security rule 13 (admin listener, docs/security.md): a browser sends `Origin` with every
/// cross-site POST, so a page open on this host could drain the proxy through loopback with a
/// no-cors request; curl and the orchestrator send none. Only reads (GET, HEAD) may carry it.
fn from_a_web_page<B>(req: &Request<B>) -> bool {
    !matches!(*req.method(), Method::GET | Method::HEAD)
        && req.headers().contains_key(http::header::ORIGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_drain_answer_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        for path in ["/metrics", "/ready", "/live"] {
            assert!(allowed(&Method::GET, path, false, remote), "{path}");
            assert!(allowed(&Method::GET, path, true, lo), "{path}");
        }
        assert!(allowed(&Method::GET, "/config", true, lo));
        assert!(allowed(&Method::POST, "/drain", true, lo));
        assert!(!allowed(&Method::GET, "/config", true, remote));
        assert!(!allowed(&Method::POST, "/drain", true, remote));
        // A non-loopback listener serves only the public GETs, even to a loopback peer.
        assert!(!allowed(&Method::GET, "/config", false, lo));
        assert!(!allowed(&Method::POST, "/drain", false, lo));
        assert!(!allowed(&Method::POST, "/metrics", false, remote));
    }

    #[test]
    fn writes_from_a_web_page_are_refused() {
        let req = |method: Method, origin: Option<&str>| {
            let mut b = Request::builder().method(method).uri("/drain");
            if let Some(o) = origin {
                b = b.header("origin", o);
            }
            b.body(()).unwrap()
        };
        assert!(from_a_web_page(&req(
            Method::POST,
            Some("http://evil.example")
        )));
        assert!(from_a_web_page(&req(Method::POST, Some("null"))));
        assert!(!from_a_web_page(&req(Method::POST, None)));
        assert!(!from_a_web_page(&req(
            Method::GET,
            Some("http://evil.example")
        )));
    }
}
