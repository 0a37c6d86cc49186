//! The admin listener: /live, /ready, /metrics, /config, POST /drain (reference:
//! docs/admin-api.md). /config and /drain answer loopback peers only; on a non-loopback listen
//! address only GET /metrics, /ready and /live are served, and a POST that carries `Origin` (sent
//! by a browser page) is refused (security rule 13, admin listener, docs/security.md).

use crate::inputs::ProxyInputs;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// At most this many admin connections at once; the admin API must not compete with traffic.
const MAX_ADMIN_CONNECTIONS: usize = 64;

pub struct Admin {
    pub inputs: Arc<ProxyInputs>,
    pub prometheus: Option<PrometheusHandle>,
    pub local_only: bool,
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

impl Admin {
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(this.handle(req, peer)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                drop(permit);
            });
        }
    }

    fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if !allowed(req.method(), req.uri().path(), self.local_only, peer) || from_a_web_page(&req)
        {
            return reply(StatusCode::FORBIDDEN, "text/plain", "forbidden\n");
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => reply(StatusCode::OK, "text/plain", "live\n"),
            (&Method::GET, "/ready") => {
                if self.inputs.is_ready() {
                    reply(StatusCode::OK, "text/plain", "ready\n")
                } else if self.inputs.drain.is_draining() {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
                } else {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                }
            }
            (&Method::GET, "/metrics") => match &self.prometheus {
                Some(p) => reply(StatusCode::OK, "text/plain; version=0.0.4", p.render()),
                None => reply(StatusCode::OK, "text/plain; version=0.0.4", ""),
            },
            (&Method::GET, "/config") => {
                let body = serde_json::to_vec_pretty(&crate::config_dump::dump(&self.inputs))
                    .unwrap_or_default();
                reply(StatusCode::OK, "application/json", body)
            }
            (&Method::POST, "/drain") => {
                self.inputs.drain.begin_drain();
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
