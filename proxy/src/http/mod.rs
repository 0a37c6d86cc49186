//! The http inbound (`[inbound] protocol = "http"`): after the same mutual-TLS handshake as
//! L4 (identity and intention decided there), HTTP/2 or HTTP/1.1 by ALPN (or, with none
//! agreed, by the client's first bytes), each request forwarded to `local_app` with
//! `x-forwarded-client-cert` set: gRPC over h2c, everything else over HTTP/1.1.
//! The http outbound (`[[upstreams]] protocol = "http"`): the app's HTTP/1.1 or HTTP/2 requests,
//! each sent to one of the upstream's endpoints over a pooled HTTP/2 mutual-TLS connection.
//!
//! - [`inbound`]: the per-connection server, the per-request decision and the metrics.
//! - [`outbound`]: the upstream's local listener, endpoint choice per request, own answers.
//! - [`h2_pool`]: the outbound's HTTP/2 connections per endpoint, shared by requests.
//! - [`xfcc`]: the `x-forwarded-client-cert` value.
//! - [`request_metrics`]: the request counter and histogram of one direction and peer.
//! - [`app_client`]: the pooled clients to `local_app`.
//! - [`sniff`]: HTTP/2 prior knowledge on a connection without ALPN.
//! - [`upgrade`]: HTTP/1.1 upgrades (WebSocket) spliced to the app.
//! - [`upgrade_out`]: the outbound's HTTP/1.1 upgrades, each over a connection of its own.
//! - [`idle_body`]: the body idle timeout.
//! - [`hop_by_hop`]: the headers that never cross a proxy (RFC 9110 section 7.6.1).
//!
//! `CONNECT` is not forwarded: the app answers it as a plain request.

pub(crate) mod app_client;
pub(crate) mod h2_pool;
pub(crate) mod idle_body;
pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod request_metrics;
pub(crate) mod sniff;
pub(crate) mod upgrade;
pub(crate) mod upgrade_out;
pub(crate) mod xfcc;

use http::header::{self, HeaderMap, HeaderName};

/// The ALPN protocols an http inbound offers, preferred first.
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Removes the hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, and `TE` unless it is exactly
/// `trailers` (which gRPC needs end to end).
pub(crate) fn hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none of them: one pass over the names costs less than the lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Only names present are removed (each lookup costs), and the usual `Connection:
    // keep-alive` names nothing beyond the fixed list.
    let mut gone: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n) && *n != header::TE)
        .cloned()
        .collect();
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok());
    gone.extend(named);
    for name in gone {
        headers.remove(name);
    }
    let trailers_only = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
}

/// Whether `name` is hop-by-hop by itself or may be (`TE`), so [`hop_by_hop`] has work to do.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ]
    .contains(name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["te", "x-kept"]);
        h.insert("te", "gzip".parse().unwrap());
        hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
        // `keep-alive` as a header is removed whether or not Connection names it; a header
        // Connection names is removed whatever its case there.
        h.insert("connection", "Keep-Alive, X-Hop".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
        // Every name Connection lists goes, `close` included (RFC 9110 section 7.6.1).
        h.insert("connection", "close".parse().unwrap());
        h.insert("close", "1".parse().unwrap());
        hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }
}
