//! The server's metrics, rendered as Prometheus text on the admin listener's `/metrics`.
//!
//! Kept per server instance (not in a process-global recorder) so several servers can run in
//! one process, as the tests do. Every label value is from a small fixed set.

use crate::grpc::StreamKind;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    sign_ok: AtomicU64,
    sign_unauthenticated: AtomicU64,
    sign_invalid: AtomicU64,
    sign_denied: AtomicU64,
    sign_limited: AtomicU64,
    sign_error: AtomicU64,
    tokens_created: AtomicU64,
    intention_writes: AtomicU64,
    streams: [AtomicI64; 4],
}

fn idx(k: StreamKind) -> usize {
    match k {
        StreamKind::Roots => 0,
        StreamKind::Intentions => 1,
        StreamKind::Endpoints => 2,
        StreamKind::Register => 3,
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
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn token_created(&self) {
        self.tokens_created.fetch_add(1, Relaxed);
    }

    pub(crate) fn intention_written(&self) {
        self.intention_writes.fetch_add(1, Relaxed);
    }

    pub(crate) fn stream_opened(&self, k: StreamKind) {
        self.streams[idx(k)].fetch_add(1, Relaxed);
    }

    pub(crate) fn stream_closed(&self, k: StreamKind) {
        self.streams[idx(k)].fetch_sub(1, Relaxed);
    }

    /// Prometheus text exposition; `intentions`, `instances` and `ca_expiry` are gauges read
    /// at render time.
    pub fn render(&self, intentions: usize, instances: usize, ca_expiry: i64) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP ward_server_sign_total Identity.Sign calls by result."
        );
        let _ = writeln!(o, "# TYPE ward_server_sign_total counter");
        for (result, c) in [
            ("ok", &self.sign_ok),
            ("unauthenticated", &self.sign_unauthenticated),
            ("invalid_argument", &self.sign_invalid),
            ("permission_denied", &self.sign_denied),
            ("resource_exhausted", &self.sign_limited),
            ("error", &self.sign_error),
        ] {
            let _ = writeln!(
                o,
                "ward_server_sign_total{{result=\"{result}\"}} {}",
                c.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP ward_server_tokens_created_total Join tokens created."
        );
        let _ = writeln!(o, "# TYPE ward_server_tokens_created_total counter");
        let _ = writeln!(
            o,
            "ward_server_tokens_created_total {}",
            self.tokens_created.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP ward_server_intention_writes_total Intentions created or deleted."
        );
        let _ = writeln!(o, "# TYPE ward_server_intention_writes_total counter");
        let _ = writeln!(
            o,
            "ward_server_intention_writes_total {}",
            self.intention_writes.load(Relaxed)
        );
        let _ = writeln!(o, "# HELP ward_server_intentions Intentions stored.");
        let _ = writeln!(o, "# TYPE ward_server_intentions gauge");
        let _ = writeln!(o, "ward_server_intentions {intentions}");
        let _ = writeln!(
            o,
            "# HELP ward_server_catalog_instances Instances in the catalog."
        );
        let _ = writeln!(o, "# TYPE ward_server_catalog_instances gauge");
        let _ = writeln!(o, "ward_server_catalog_instances {instances}");
        let _ = writeln!(o, "# HELP ward_server_streams Open Mesh streams by kind.");
        let _ = writeln!(o, "# TYPE ward_server_streams gauge");
        for k in [
            StreamKind::Roots,
            StreamKind::Intentions,
            StreamKind::Endpoints,
            StreamKind::Register,
        ] {
            let _ = writeln!(
                o,
                "ward_server_streams{{kind=\"{}\"}} {}",
                k.as_str(),
                self.streams[idx(k)].load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP ward_server_ca_expiry_timestamp_seconds notAfter of the intermediate CA."
        );
        let _ = writeln!(o, "# TYPE ward_server_ca_expiry_timestamp_seconds gauge");
        let _ = writeln!(o, "ward_server_ca_expiry_timestamp_seconds {ca_expiry}");
        o
    }
}
