//! The server's metrics, rendered as Prometheus text on the admin listener's `/metrics`.
//!
//! Kept per server instance (a recorder of its own, not the process-global one) so several
//! servers can run in one process, as the tests do. The handles are made once, at start, so
//! counting is an atomic add. Every label value is from a small fixed set.

use crate::ca_expiry::CaExpiry;
use crate::grpc::StreamKind;
use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge, Unit};
use metrics_exporter_prometheus::PrometheusHandle;

const SIGN: &str = "ward_server_sign_total";
const TOKENS_CREATED: &str = "ward_server_tokens_created_total";
const INTENTION_WRITES: &str = "ward_server_intention_writes_total";
const INTENTIONS: &str = "ward_server_intentions";
const CATALOG_INSTANCES: &str = "ward_server_catalog_instances";
const STREAMS: &str = "ward_server_streams";
const CA_EXPIRY: &str = "ward_server_ca_expiry_timestamp_seconds";
const CA_EXPIRY_BY_CA: &str = "ward_ca_expiry_timestamp_seconds";

const STREAM_KINDS: [StreamKind; 4] = [
    StreamKind::Roots,
    StreamKind::Intentions,
    StreamKind::Endpoints,
    StreamKind::Register,
];

#[derive(Debug)]
pub struct Metrics {
    prometheus: PrometheusHandle,
    sign_ok: Counter,
    sign_unauthenticated: Counter,
    sign_invalid: Counter,
    sign_denied: Counter,
    sign_limited: Counter,
    sign_error: Counter,
    tokens_created: Counter,
    intention_writes: Counter,
    /// By [`idx`] of the stream kind.
    streams: [Gauge; 4],
    intentions: Gauge,
    instances: Gauge,
    ca_expiry: Gauge,
    /// `ca="root"`, `ca="intermediate"`.
    root_expiry: Gauge,
    intermediate_expiry: Gauge,
}

fn idx(k: StreamKind) -> usize {
    match k {
        StreamKind::Roots => 0,
        StreamKind::Intentions => 1,
        StreamKind::Endpoints => 2,
        StreamKind::Register => 3,
    }
}

impl Default for Metrics {
    /// Every series exists from the start, at zero.
    fn default() -> Self {
        let recorder = ward_proxy::metrics::exporter().build_recorder();
        let prometheus = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_counter!(SIGN, "Identity.Sign calls by result");
            describe_counter!(TOKENS_CREATED, "Join tokens created");
            describe_counter!(INTENTION_WRITES, "Intentions created or deleted");
            describe_gauge!(INTENTIONS, "Intentions stored");
            describe_gauge!(CATALOG_INSTANCES, "Instances in the catalog");
            describe_gauge!(STREAMS, "Open Mesh streams by kind");
            describe_gauge!(
                CA_EXPIRY,
                Unit::Seconds,
                "notAfter of the intermediate CA, as a Unix timestamp"
            );
            describe_gauge!(
                CA_EXPIRY_BY_CA,
                Unit::Seconds,
                "notAfter of the active root and of the intermediate CA, as Unix timestamps"
            );
            let sign = |result: &'static str| {
                let c = counter!(SIGN, "result" => result);
                c.absolute(0);
                c
            };
            let zero = |g: Gauge| {
                g.set(0.0);
                g
            };
            let (tokens_created, intention_writes) =
                (counter!(TOKENS_CREATED), counter!(INTENTION_WRITES));
            tokens_created.absolute(0);
            intention_writes.absolute(0);
            Metrics {
                prometheus,
                sign_ok: sign("ok"),
                sign_unauthenticated: sign("unauthenticated"),
                sign_invalid: sign("invalid_argument"),
                sign_denied: sign("permission_denied"),
                sign_limited: sign("resource_exhausted"),
                sign_error: sign("error"),
                tokens_created,
                intention_writes,
                streams: STREAM_KINDS.map(|k| zero(gauge!(STREAMS, "kind" => k.as_str()))),
                intentions: zero(gauge!(INTENTIONS)),
                instances: zero(gauge!(CATALOG_INSTANCES)),
                ca_expiry: zero(gauge!(CA_EXPIRY)),
                root_expiry: zero(gauge!(CA_EXPIRY_BY_CA, "ca" => "root")),
                intermediate_expiry: zero(gauge!(CA_EXPIRY_BY_CA, "ca" => "intermediate")),
            }
        })
    }
}

impl Metrics {
    pub(crate) fn sign(&self, r: Result<(), tonic::Code>) {
        let c = match r {
            Ok(()) => &self.sign_ok,
            Err(tonic::Code::Unauthenticated) => &self.sign_unauthenticated,
            Err(tonic::Code::InvalidArgument) => &self.sign_invalid,
            Err(tonic::Code::PermissionDenied) => &self.sign_denied,
            Err(tonic::Code::ResourceExhausted) => &self.sign_limited,
            Err(_) => &self.sign_error,
        };
        c.increment(1);
    }

    pub(crate) fn token_created(&self) {
        self.tokens_created.increment(1);
    }

    pub(crate) fn intention_written(&self) {
        self.intention_writes.increment(1);
    }

    pub(crate) fn stream_opened(&self, k: StreamKind) {
        self.streams[idx(k)].increment(1.0);
    }

    pub(crate) fn stream_closed(&self, k: StreamKind) {
        self.streams[idx(k)].decrement(1.0);
    }

    /// Prometheus text exposition; `intentions`, `instances` and the CA's expiry are gauges
    /// read at render time.
    pub fn render(&self, intentions: usize, instances: usize, ca: &CaExpiry) -> String {
        self.intentions.set(intentions as f64);
        self.instances.set(instances as f64);
        let intermediate = ca.intermediate.not_after.unix_timestamp() as f64;
        self.ca_expiry.set(intermediate);
        self.intermediate_expiry.set(intermediate);
        if let Some(root) = ca.root {
            self.root_expiry.set(root.not_after.unix_timestamp() as f64);
        }
        self.prometheus.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two servers in one process count apart.
    #[test]
    fn each_instance_counts_its_own() {
        let (a, b) = (Metrics::default(), Metrics::default());
        a.sign(Ok(()));
        a.sign(Err(tonic::Code::ResourceExhausted));
        a.stream_opened(StreamKind::Register);
        a.stream_opened(StreamKind::Register);
        a.stream_closed(StreamKind::Register);
        let at = |t| time::OffsetDateTime::from_unix_timestamp(t).unwrap();
        let expiry = |root, intermediate| CaExpiry {
            root: Some(crate::ca_expiry::Validity {
                not_before: at(1_700_000_000),
                not_after: at(root),
            }),
            intermediate: crate::ca_expiry::Validity {
                not_before: at(1_700_000_000),
                not_after: at(intermediate),
            },
        };
        let text = a.render(3, 2, &expiry(2_000_000_000, 1_800_000_000));
        for line in [
            "ward_server_sign_total{result=\"ok\"} 1",
            "ward_server_sign_total{result=\"resource_exhausted\"} 1",
            "ward_server_sign_total{result=\"error\"} 0",
            "ward_server_streams{kind=\"Register\"} 1",
            "ward_server_streams{kind=\"WatchRoots\"} 0",
            "ward_server_intentions 3",
            "ward_server_catalog_instances 2",
            "ward_server_ca_expiry_timestamp_seconds 1800000000",
            "ward_ca_expiry_timestamp_seconds{ca=\"intermediate\"} 1800000000",
            "ward_ca_expiry_timestamp_seconds{ca=\"root\"} 2000000000",
            "ward_server_tokens_created_total 0",
            "# HELP ward_server_sign_total Identity.Sign calls by result",
            "# TYPE ward_server_streams gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        let other = b.render(0, 0, &expiry(1_700_000_001, 1_700_000_001));
        assert!(
            other
                .lines()
                .any(|l| l == "ward_server_sign_total{result=\"ok\"} 0"),
            "{other}"
        );
    }
}
