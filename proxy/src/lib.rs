//! ward's data plane.
//!
//! - [`tls`]: credentials, the verifiers that establish a peer's identity and decide its
//!   intention inside the handshake, and the rustls configs.
//! - [`intentions`]: the immutable snapshot a handshake reads.
//! - [`inbound`] / [`outbound`]: the two sides of the sidecar; [`copy`] moves the bytes;
//!   [`mux`] carries many connections between two sidecars over one (`ward-mux/1`).
//! - [`connections`]: open connections by peer, closed when intentions turn to deny.
//! - [`handshakes`]: handshakes in progress, capped globally and per source IP (also used by
//!   `ward server`).
//! - [`files`]: `[tls]` files, polled and hot-swapped.
//! - [`admin`]: /live /ready /metrics /config /drain.
//! - [`app`]: binds everything and returns a handle; [`app::ProxyHandle::wait`] drains.

pub mod admin;
pub mod app;
pub mod bigreads;
mod config_dump;
pub mod connections;
pub mod copy;
pub mod files;
pub mod footprint;
pub mod handshakes;
pub mod inbound;
pub mod intentions;
mod listener;
pub mod metrics;
pub mod mux;
pub mod outbound;
pub mod shared;
pub mod tls;

pub use app::{build, BuildError, MeshHandles, ProxyHandle};

/// Seconds since the Unix epoch (wall clock, for certificate validity).
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
