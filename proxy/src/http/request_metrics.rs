//! `ward_http_requests_total` and `ward_http_request_duration_seconds` of one direction and
//! peer, with their handles made once: a request then costs two atomic updates instead of two
//! registry lookups, each hashing and allocating its labels (measured: a few thousand
//! instructions per request at each hop, see perf/profile-notes.md).

use crate::metrics::{self as m, Direction};
use http::StatusCode;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub(crate) struct RequestMetrics {
    direction: Direction,
    peer: String,
    /// Made at the first request, once the recorder is surely installed.
    duration: OnceLock<metrics::Histogram>,
    /// By status code; at most the 900 codes HTTP has, and a handful in practice.
    requests: Mutex<Vec<(u16, metrics::Counter)>>,
}

impl RequestMetrics {
    pub(crate) fn new(direction: Direction, peer: String) -> Self {
        Self {
            direction,
            peer,
            duration: OnceLock::new(),
            requests: Mutex::new(Vec::new()),
        }
    }

    /// The `peer` label.
    pub(crate) fn peer(&self) -> &str {
        &self.peer
    }

    /// One request answered with `status` after `took`.
    pub(crate) fn record(&self, status: StatusCode, took: Duration) {
        self.count(status);
        self.duration
            .get_or_init(|| {
                metrics::histogram!(m::HTTP_REQUEST_DURATION,
                    "direction" => self.direction.as_str(), "peer" => self.peer.clone())
            })
            .record(took.as_secs_f64());
    }

    /// One request answered with `status` (a malformed one has no duration).
    pub(crate) fn count(&self, status: StatusCode) {
        let code = status.as_u16();
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = requests.iter().find(|(c, _)| *c == code) {
            c.increment(1);
            return;
        }
        let counter = metrics::counter!(m::HTTP_REQUESTS,
            "direction" => self.direction.as_str(), "peer" => self.peer.clone(),
            "code" => status.as_str().to_owned());
        counter.increment(1);
        requests.push((code, counter));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_counts_in_its_own_series_and_every_request_is_timed() {
        let recorder = crate::metrics::exporter().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let rm = RequestMetrics::new(Direction::Inbound, "order".into());
            for status in [StatusCode::OK, StatusCode::FORBIDDEN, StatusCode::OK] {
                rm.record(status, Duration::from_millis(2));
            }
            rm.count(StatusCode::BAD_REQUEST);
        });
        let text = handle.render();
        for line in [
            r#"ward_http_requests_total{direction="inbound",peer="order",code="200"} 2"#,
            r#"ward_http_requests_total{direction="inbound",peer="order",code="403"} 1"#,
            r#"ward_http_requests_total{direction="inbound",peer="order",code="400"} 1"#,
            // A malformed request has no duration.
            r#"ward_http_request_duration_seconds_count{direction="inbound",peer="order"} 3"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
