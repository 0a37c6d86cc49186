//! ward's data plane.
//!
//! - [`tls`]: credentials, the verifiers that establish a peer's identity and decide its
//!   intention inside the handshake, and the rustls configs.
//! - [`intentions`]: the immutable snapshot a handshake reads.
//! - [`inbound`] / [`outbound`]: the two sides of the sidecar; [`copy`] moves the bytes;
//!   [`mux`] carries many connections between two sidecars over one (`ward-mux/1`);
//!   `forward` connects to `local_app` and keeps the connection metrics for all three;
//!   `http` serves an http inbound (`protocol = "http"`) request by request.
//! - [`l7`]: what an L7 permission matches: the normalized request path, and the decision.
//! - [`connections`]: open connections by peer, closed when intentions turn to deny.
//! - [`connlog`]: the connection log (`[admin] connection_log`).
//! - [`handshakes`]: handshakes in progress, capped globally and per source IP (also used by
//!   `ward server`).
//! - [`files`]: `[tls]` files, polled and hot-swapped.
//! - [`inputs`]: what every listener reads (service, stores, limits); [`drain`]: the drain
//!   signals and the connection tasks a drain waits for.
//! - [`admin`]: /live /ready /metrics /config /drain; [`process_metrics`]: the `process_*` set
//!   and `ward_build_info`, which the proxy and the server both serve.
//! - [`startup_memory`]: gives back the memory only startup needed, once ready.
//! - [`redirect`]: the nat rules of transparent mode (`ward redirect`); [`transparent`]: what
//!   the redirected connections need (the owners of mesh addresses).
//! - [`app`]: binds everything and returns a handle; [`app::ProxyHandle::wait`] drains.

pub mod admin;
pub mod app;
mod config_dump;
pub mod connections;
pub mod connlog;
pub mod copy;
pub mod drain;
pub mod files;
mod forward;
pub mod handshakes;
pub mod heap;
mod http;
pub mod inbound;
pub mod inputs;
pub mod intentions;
pub mod l7;
mod listener;
pub mod metrics;
pub mod mux;
pub mod outbound;
pub mod process_metrics;
pub mod redirect;
pub mod startup_memory;
#[cfg(test)]
mod test_pki;
pub mod tls;
pub mod transparent;

pub use app::{
    build, check_listeners, check_user, BuildError, MeshHandles, ProxyHandle, TransparentHandles,
};
pub(crate) use ward_config::time::now_unix;
