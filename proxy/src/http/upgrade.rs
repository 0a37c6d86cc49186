//! HTTP/1.1 upgrades (WebSocket, or any other protocol named in `Upgrade`), with no config:
//! the handshake goes to `local_app` as an ordinary request with its `Connection: upgrade` and
//! `Upgrade` kept; when the app answers 101, hyper hands over both connections and they are
//! spliced, bytes copied both ways until either side closes, no byte moves for
//! `idle_timeout`, or the proxy closes the connection (intention deny, drain deadline).

use crate::copy::{self, CopyEnd};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The `Upgrade` value of an HTTP/1.1 request that names `upgrade` in `Connection`, without
/// `h2c`. An upgrade to h2c is never passed on: after it the connection would carry HTTP/2
/// requests the sidecar does not parse, past the per-request decisions (L7 permissions); such
/// a request goes on as a plain HTTP/1.1 one (RFC 9113 dropped the h2c upgrade too).
pub(crate) fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asked = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asked {
        return None;
    }
    let value = req.headers().get(header::UPGRADE)?;
    let text = value.to_str().ok()?;
    let kept: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
        .collect();
    match kept.len() {
        0 => None,
        n if n == text.split(',').count() => Some(value.clone()),
        _ => HeaderValue::from_str(&kept.join(", ")).ok(),
    }
}

/// Puts back the two hop-by-hop headers an upgrade needs on the next hop.
pub(crate) fn restore(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// The two halves of an upgrade the app agreed to, handed over once the 101 is sent.
pub(crate) struct Pending {
    pub client: OnUpgrade,
    pub app: OnUpgrade,
}

/// Where `forward` leaves an agreed upgrade for the connection's `serve`, which splices it once
/// hyper is done with the connection (one per HTTP/1.1 connection: an upgrade ends its HTTP).
#[derive(Default)]
pub(crate) struct Slot(Mutex<Option<Pending>>);

impl Slot {
    pub(crate) fn set(&self, pending: Pending) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(pending);
    }

    pub(crate) fn take(&self) -> Option<Pending> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Pending {
    /// Copies between the client and the app until either closes (half-close carried across),
    /// `idle` passes with no byte moved, or `close` fires. The client's bytes are already
    /// counted by its connection's `Counted`.
    pub(crate) async fn splice(self, idle: Duration, close: &CancellationToken) -> CopyEnd {
        let (client, app) = match tokio::try_join!(self.client, self.app) {
            Ok(both) => both,
            Err(e) => return CopyEnd::Failed(std::io::Error::other(e)),
        };
        let uncounted = metrics::Counter::noop();
        copy::bidirectional(
            TokioIo::new(client),
            TokioIo::new(app),
            idle,
            close,
            &uncounted,
            &uncounted,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asking(upgrade: &str) -> Request<()> {
        Request::builder()
            .header(header::CONNECTION, "Upgrade, HTTP2-Settings")
            .header(header::UPGRADE, upgrade)
            .body(())
            .unwrap()
    }

    #[test]
    fn an_upgrade_to_h2c_is_never_passed_on() {
        assert_eq!(requested(&asking("h2c")), None);
        assert_eq!(requested(&asking("H2C")), None);
        assert_eq!(
            requested(&asking("h2c, websocket")).unwrap(),
            HeaderValue::from_static("websocket")
        );
        assert_eq!(
            requested(&asking("websocket")).unwrap(),
            HeaderValue::from_static("websocket")
        );
    }
}
