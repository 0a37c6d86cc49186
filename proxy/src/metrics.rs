//! The proxy's metric names and bounded label values (reference: docs/metrics.md).
//!
//! Labels are enums or service names, never addresses, paths or full SPIFFE IDs.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::Duration;

pub const HANDSHAKES: &str = "ward_tls_handshakes_total";
pub const HANDSHAKE_DURATION: &str = "ward_tls_handshake_duration_seconds";
pub const KEY_EXCHANGES: &str = "ward_tls_key_exchanges_total";
pub const CONNECTIONS_OPENED: &str = "ward_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "ward_connections_closed_total";
pub const CONNECTIONS_ACTIVE: &str = "ward_connections_active";
pub const BYTES: &str = "ward_bytes_total";
pub const INTENTION_DECISIONS: &str = "ward_intention_decisions_total";
pub const INTENTION_ERRORS: &str = "ward_intention_errors_total";
pub const CERT_EXPIRY: &str = "ward_cert_expiry_timestamp_seconds";
pub const CERT_RELOADS: &str = "ward_cert_reloads_total";
pub const MUX_STREAMS: &str = "ward_mux_streams_total";
pub const HTTP_REQUESTS: &str = "ward_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "ward_http_request_duration_seconds";
/// Counted by the control-plane client (`[control_plane]` only), described here with the rest.
pub const TRANSPARENT_REFUSED: &str = "ward_transparent_refused_total";
pub const CERT_RENEWALS: &str = "ward_cert_renewals_total";
pub const CONTROL_PLANE_CONNECTED: &str = "ward_control_plane_connected";

/// Upper bounds, in seconds, of the buckets of every `*_duration_seconds` histogram. A
/// handshake takes from well under a millisecond (a resumption on loopback) to seconds (a slow
/// peer, up to `handshake_timeout`, 10 s by default). Buckets, unlike a summary's quantiles,
/// add up across sidecars: `histogram_quantile(0.99, sum by (le) (rate(..._bucket[5m])))`.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The exporter's settings for ward's metrics: durations as histograms with
/// [`DURATION_BUCKETS`]. `ward proxy` installs it as the global recorder; `ward server` keeps
/// one per server.
pub fn exporter() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".to_string()),
            &DURATION_BUCKETS,
        )
        .expect("DURATION_BUCKETS is not empty")
}

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// The exporter keeps each histogram sample until a scrape or an upkeep folds it into the
/// buckets: without this task, a sidecar that nobody scrapes grows by a sample per handshake.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Which side of the sidecar a connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The outcome of one handshake: each handshake counts exactly once, in exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeResult {
    Ok,
    NoClientCert,
    UnknownCa,
    Expired,
    BadIdentity,
    Denied,
    Timeout,
    Error,
}

impl HandshakeResult {
    pub const ALL: [HandshakeResult; 8] = [
        HandshakeResult::Ok,
        HandshakeResult::NoClientCert,
        HandshakeResult::UnknownCa,
        HandshakeResult::Expired,
        HandshakeResult::BadIdentity,
        HandshakeResult::Denied,
        HandshakeResult::Timeout,
        HandshakeResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::NoClientCert => "no_client_cert",
            HandshakeResult::UnknownCa => "unknown_ca",
            HandshakeResult::Expired => "expired",
            HandshakeResult::BadIdentity => "bad_identity",
            HandshakeResult::Denied => "denied",
            HandshakeResult::Timeout => "timeout",
            HandshakeResult::Error => "error",
        }
    }
}

/// Describes every metric and creates the handshake series at zero, so dashboards and
/// `increase()` see a series before its first event.
pub fn describe() {
    describe_counter!(HANDSHAKES, "TLS handshakes by direction and result");
    describe_histogram!(
        HANDSHAKE_DURATION,
        Unit::Seconds,
        "TLS handshake duration, from TCP accept or connect"
    );
    describe_counter!(
        KEY_EXCHANGES,
        "Accepted TLS handshakes by direction and key-exchange group (X25519MLKEM768 is post-quantum)"
    );
    describe_counter!(CONNECTIONS_OPENED, "Connections admitted and forwarded");
    describe_counter!(CONNECTIONS_CLOSED, "Forwarded connections that ended");
    describe_gauge!(CONNECTIONS_ACTIVE, "Forwarded connections open now");
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes forwarded; flow is rx (from the peer) or tx (to the peer)"
    );
    describe_counter!(
        INTENTION_DECISIONS,
        "Intention decisions taken in inbound handshakes"
    );
    describe_counter!(
        INTENTION_ERRORS,
        "Intention rules that could not be enforced as written"
    );
    describe_gauge!(
        CERT_EXPIRY,
        Unit::Seconds,
        "not_after of the certificate in use, as a Unix timestamp"
    );
    describe_counter!(CERT_RELOADS, "Certificate file reloads by result");
    describe_counter!(
        MUX_STREAMS,
        "ward-mux/1 tunnel streams by direction and result (ok, refused)"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by direction, peer and status code (http listeners)"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration, from the request header to the response header"
    );
    describe_counter!(
        CERT_RENEWALS,
        "Certificates obtained from the control plane (first and renewals) by result"
    );
    describe_counter!(
        TRANSPARENT_REFUSED,
        "Connections the transparent outbound refused, by reason"
    );
    describe_gauge!(
        CONTROL_PLANE_CONNECTED,
        "1 while the intentions stream from ward server is delivering, 0 otherwise"
    );
    for d in [Direction::Inbound, Direction::Outbound] {
        for r in HandshakeResult::ALL {
            counter!(HANDSHAKES, "direction" => d.as_str(), "result" => r.as_str()).absolute(0);
        }
        gauge!(CONNECTIONS_ACTIVE, "direction" => d.as_str()).set(0.0);
        for g in ["X25519MLKEM768", "X25519"] {
            counter!(KEY_EXCHANGES, "direction" => d.as_str(), "group" => g).absolute(0);
        }
        for r in ["ok", "refused"] {
            counter!(MUX_STREAMS, "direction" => d.as_str(), "result" => r).absolute(0);
        }
    }
    counter!(INTENTION_ERRORS).absolute(0);
}

pub fn handshake(direction: Direction, result: HandshakeResult, seconds: f64) {
    counter!(HANDSHAKES, "direction" => direction.as_str(), "result" => result.as_str())
        .increment(1);
    metrics::histogram!(HANDSHAKE_DURATION, "direction" => direction.as_str()).record(seconds);
}

/// The key-exchange group of a handshake counted `ok` (`crate::tls::provider::group_name`).
pub fn key_exchange(direction: Direction, group: &'static str) {
    counter!(KEY_EXCHANGES, "direction" => direction.as_str(), "group" => group).increment(1);
}

pub fn mux_stream(direction: Direction, ok: bool) {
    let result = if ok { "ok" } else { "refused" };
    counter!(MUX_STREAMS, "direction" => direction.as_str(), "result" => result).increment(1);
}
