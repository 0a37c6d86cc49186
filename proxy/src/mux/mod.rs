//! `ward-mux/1`: many TCP streams carried over one mutual-TLS connection between two ward
//! sidecars, so a new connection through the mesh costs one HTTP/2 stream instead of a TLS
//! handshake (the idea of Istio's HBONE).
//!
//! Security rule 9 (a multiplexed tunnel between sidecars, docs/security.md): the tunnel is chosen
//! only by the ALPN [`ALPN`], never by sniffing; a TLS client that does not offer it gets the plain
//! L4 path. Each stream is an HTTP/2 `CONNECT` whose `:authority` names the destination service as
//! `<service>.<namespace>`; the inbound sends every stream to its `local_app` and refuses any other
//! target before connecting anything. A stream is authorized as its connection's peer, which the
//! handshake authorized, and is closed with the connection when the intentions turn to deny.
//! Streams per connection, pending resets, header size and buffered bytes are bounded by the
//! settings below.
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

/// Flow-control windows. A tunnel buffers at most `[limits] max_tunnel_buffer_bytes` of what its
/// peer sent (security rule 15, bounds, docs/security.md): that is its connection window, and each
/// stream's window is an equal share of it for `MAX_STREAMS`, at most `STREAM_WINDOW`, so streams
/// whose readers stall can never use up the window of the others (each is as independent as a plain
/// connection). Bytes are buffered only when a sender sends and the reader does not read.
/// `STREAM_WINDOW` is about what the kernel lets a plain connection's socket buffers hold.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Frames as large as one read of the copy loop.
const MAX_FRAME: u32 = 64 * 1024;
/// A CONNECT carries a handful of short headers.
const MAX_HEADER_LIST: u32 = 8 * 1024;
/// Bytes queued for sending per stream before the writer waits (less when the tunnel's buffer
/// bound, shared by `MAX_STREAMS`, is smaller).
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

/// The smallest tunnel buffer the config takes.
const MIN_BUFFER: usize = *ward_config::proxy::TUNNEL_BUFFER_RANGE.start();

/// The windows and send queue of a tunnel that buffers at most `max_buffer` bytes each way:
/// received (the connection window, of which each stream has an equal share) and queued to send
/// (`MAX_STREAMS` send queues).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Windows {
    stream: u32,
    connection: u32,
    send_buffer: usize,
}

impl Windows {
    fn for_buffer(max_buffer: usize) -> Self {
        // The config keeps it within range; clamp anyway so no value can panic.
        let connection = u32::try_from(max_buffer.clamp(MIN_BUFFER, i32::MAX as usize))
            .unwrap_or(i32::MAX as u32);
        Self {
            stream: (connection / MAX_STREAMS).min(STREAM_WINDOW),
            connection,
            send_buffer: (connection as usize / MAX_STREAMS as usize).min(MAX_SEND_BUFFER),
        }
    }
}

pub(crate) fn server_builder(max_buffer: usize) -> h2::server::Builder {
    let w = Windows::for_buffer(max_buffer);
    let mut b = h2::server::Builder::new();
    b.initial_window_size(w.stream)
        .initial_connection_window_size(w.connection)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(w.send_buffer)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    b
}

pub(crate) fn client_builder(max_buffer: usize) -> h2::client::Builder {
    let w = Windows::for_buffer(max_buffer);
    let mut b = h2::client::Builder::new();
    b.initial_window_size(w.stream)
        .initial_connection_window_size(w.connection)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(w.send_buffer)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .enable_push(false);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_buffer_bounds_windows_and_send_queues() {
        let w = Windows::for_buffer(ward_config::proxy::Limits::default().max_tunnel_buffer_bytes);
        assert_eq!(
            w,
            Windows {
                stream: (64 << 20) / MAX_STREAMS,
                connection: 64 << 20,
                send_buffer: MAX_SEND_BUFFER
            }
        );
        for max in [
            MIN_BUFFER,
            8 << 20,
            64 << 20,
            400 << 20,
            1 << 30,
            i32::MAX as usize,
        ] {
            let w = Windows::for_buffer(max);
            assert_eq!(w.connection as usize, max);
            // Every stream's full window fits at once: none can starve the others.
            assert!(
                w.stream as usize * MAX_STREAMS as usize <= max,
                "{max}: {w:?}"
            );
            assert!(
                w.stream >= MAX_FRAME && w.stream <= STREAM_WINDOW,
                "{max}: {w:?}"
            );
            assert!(w.send_buffer * MAX_STREAMS as usize <= max, "{max}: {w:?}");
        }
        assert_eq!(Windows::for_buffer(400 << 20).stream, STREAM_WINDOW);
        // Out of range is clamped, never a panic.
        assert_eq!(Windows::for_buffer(0).connection as usize, MIN_BUFFER);
        assert_eq!(Windows::for_buffer(usize::MAX).connection, i32::MAX as u32);
    }
}
