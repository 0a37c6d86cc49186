//! The pooled clients an http inbound forwards requests to `local_app` with: HTTP/1.1 for
//! ordinary requests, HTTP/2 over cleartext (h2c, prior knowledge) for gRPC.

use super::idle_body::IdleBody;
use http::{Request, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

/// Idle connections kept to `local_app`: the pool's bound (connections in use are bounded by
/// the requests in flight, which `max_connections` and the streams per connection bound).
const MAX_IDLE: usize = 64;
/// How long an idle pooled connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request body on its way to the app: the caller's, bounded by the body idle timeout.
pub(crate) type AppBody = IdleBody<Incoming>;

/// The clients for `local_app`, bodies streamed both ways, connections reused.
#[derive(Clone)]
pub(crate) struct AppClient {
    http1: Client<HttpConnector, AppBody>,
    /// One multiplexed connection (hyper's pool keeps one per host for HTTP/2).
    h2c: Client<HttpConnector, AppBody>,
}

impl AppClient {
    /// Sends `req` over h2c when its version is HTTP/2, else over HTTP/1.1 (upgrades
    /// included: the HTTP/1.1 client hands a 101 response's connection on).
    pub(crate) fn request(&self, req: Request<AppBody>) -> ResponseFuture {
        if req.version() == Version::HTTP_2 {
            self.h2c.request(req)
        } else {
            self.http1.request(req)
        }
    }
}

/// The clients for `local_app`.
pub(crate) fn new() -> AppClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(crate::forward::APP_CONNECT_TIMEOUT));
    let client = |h2c: bool| {
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(MAX_IDLE)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(h2c)
            .build(connector.clone())
    };
    AppClient {
        http1: client(false),
        h2c: client(true),
    }
}
