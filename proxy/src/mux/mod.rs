//! `ward-mux/1`: many TCP streams carried over one mutual-TLS connection between two ward
//! sidecars, so a new connection through the mesh costs one HTTP/2 stream instead of a TLS
//! handshake (the idea of Istio's HBONE).
//!
//! Security rule 9: the tunnel is chosen only by the ALPN [`ALPN`], never by sniffing; a TLS
//! client that does not offer it gets the plain L4 path. Each stream is an HTTP/2 `CONNECT`
//! whose `:authority` names the destination service as `<service>.<namespace>`; the inbound
//! sends every stream to its `local_app` and refuses any other target before connecting
//! anything. A stream is authorized as its connection's peer, which the handshake authorized,
//! and is closed with the connection when the intentions turn to deny. Streams per connection,
//! pending resets, header size and buffered bytes are bounded by the settings below.
//!
//! - [`io`]: one stream as `AsyncRead + AsyncWrite`, for the copy loop.
//! - [`server`]: the inbound side of a tunnel connection.
//! - [`pool`]: the outbound's pooled tunnel connections, per endpoint.
//! - [`keepalive`]: PINGs that find a peer that is gone without a reset.

pub mod io;
mod keepalive;
pub mod pool;
pub mod server;

use ward_config::Name;

/// The ALPN protocol id that selects the tunnel.
pub const ALPN: &[u8] = b"ward-mux/1";

/// Streams one tunnel connection carries at once; the pool opens another connection beyond.
pub const MAX_STREAMS: u32 = 100;

/// Flow-control windows. A stream may have `STREAM_WINDOW` unread bytes in flight, about what
/// the kernel lets a plain connection's socket buffers hold, and enough that one stream is not
/// held back waiting for window updates. The connection window covers every stream's at once,
/// so streams whose readers stall cannot starve the others of a tunnel (a plain connection has
/// no such coupling either); it is credit, not memory: bytes are buffered only when a sender
/// sends and the reader does not read, at most `STREAM_WINDOW` per stream.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = MAX_STREAMS * STREAM_WINDOW;
/// Frames as large as one read of the copy loop.
const MAX_FRAME: u32 = 64 * 1024;
/// A CONNECT carries a handful of short headers.
const MAX_HEADER_LIST: u32 = 8 * 1024;
/// Bytes queued for sending per stream before the writer waits.
const MAX_SEND_BUFFER: usize = 256 * 1024;
/// Resets a peer may provoke before the connection is closed (rapid-reset bound): h2 counts
/// those before a stream is accepted and those it sends for protocol errors; the server counts
/// streams the peer resets before they were answered ([`MAX_EARLY_RESETS`]).
const MAX_PENDING_RESETS: usize = 32;
const MAX_LOCAL_ERROR_RESETS: usize = 256;
pub const MAX_EARLY_RESETS: usize = 256;

/// The `:authority` naming a destination service.
pub fn authority(service: &Name, namespace: &Name) -> String {
    format!("{service}.{namespace}")
}

pub(crate) fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    b
}

pub(crate) fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .enable_push(false);
    b
}
