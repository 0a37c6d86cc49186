//! The pooled HTTP/1.1 client an http inbound forwards requests to `local_app` with.

use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

/// Idle connections kept to `local_app`: the pool's bound (connections in use are bounded by
/// the requests in flight, which `max_connections` and the streams per connection bound).
const MAX_IDLE: usize = 64;
/// How long an idle pooled connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) type AppClient = Client<HttpConnector, Incoming>;

/// A client for `local_app`: HTTP/1.1, bodies streamed, connections reused.
pub(crate) fn new() -> AppClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(crate::forward::APP_CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(MAX_IDLE)
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector)
}
