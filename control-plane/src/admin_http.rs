//! The server's admin HTTP listener: the proxy's endpoints and access rules
//! ([`ward_proxy::admin::serve`]), answered from the server's state (reference:
//! docs/admin-api.md). `/config` shows what the server runs with and never a key, a token or a
//! token hash (security rule 13, admin listener, docs/security.md).

use crate::ca::Ca;
use crate::catalog::Catalog;
use crate::intentions::Intentions;
use crate::metrics::Metrics;
use serde_json::{json, Value};
use std::sync::{Arc, Weak};
use tokio::sync::watch;
use ward_config::server::{ServerConfig, StorageConfig};
use ward_proxy::admin::Endpoints;
use x509_parser::prelude::{FromDer, X509Certificate};

pub(crate) struct ServerAdmin {
    pub metrics: Arc<Metrics>,
    /// Weak: the stores must not outlive the server's tasks (the state file closes with them).
    pub intentions: Weak<Intentions>,
    pub catalog: Weak<Catalog>,
    pub ca: Arc<Ca>,
    /// The graceful stop that SIGTERM starts; `POST /drain` sets it too.
    pub shutdown: watch::Sender<bool>,
    /// The parts of `/config` fixed at start.
    pub fixed: Value,
}

/// The parts of `/config` that do not change while the server runs.
pub(crate) fn fixed_config(cfg: &ServerConfig, grpc: std::net::SocketAddr) -> Value {
    let c = &cfg.connections;
    let l = &cfg.limits;
    let storage = match cfg.storage {
        StorageConfig::Embedded => json!({
            "backend": "embedded",
            "data_dir": cfg.data_dir.display().to_string(),
        }),
    };
    json!({
        "listen": grpc.to_string(),
        "trust_domain": cfg.trust_domain.to_string(),
        "storage": storage,
        "limits": {
            "max_connections": c.max_connections,
            "max_pending_handshakes": c.max_pending_handshakes,
            "max_pending_handshakes_per_ip": c.max_pending_handshakes_per_ip,
            "handshake_timeout": ward_config::Duration(c.handshake_timeout).to_string(),
            "max_message_size": l.max_message_size,
            "sign_burst": l.sign_burst,
            "sign_per_second": l.sign_per_second,
        },
    })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Endpoints for ServerAdmin {
    fn ready(&self) -> Result<(), &'static str> {
        if *self.shutdown.borrow() {
            Err("not ready")
        } else {
            Ok(())
        }
    }

    fn metrics(&self) -> String {
        let n_int = self
            .intentions
            .upgrade()
            .map_or(0, |i| i.snapshot().rules.len());
        let n_inst = self
            .catalog
            .upgrade()
            .map_or(0, |c| c.snapshot().instances.len());
        let ca = crate::ca_expiry::CaExpiry::of(&self.ca);
        self.metrics.render(n_int, n_inst, &ca)
    }

    fn config(&self) -> Value {
        let roots: Vec<Value> = self
            .ca
            .roots()
            .iter()
            .map(|r| {
                let serial = X509Certificate::from_der(&r.der)
                    .map(|(_, c)| hex::encode(c.raw_serial()))
                    .ok();
                json!({
                    "serial": serial,
                    "fingerprint": r.fingerprint,
                    "not_after": rfc3339(r.not_after),
                })
            })
            .collect();
        let intentions = self.intentions.upgrade().map(|i| {
            let s = i.snapshot();
            json!({
                "version": s.version,
                "default": s.default.as_str(),
                "rules": s.rules.len(),
            })
        });
        let mut out = self.fixed.clone();
        if let Some(o) = out.as_object_mut() {
            o.insert("roots".into(), roots.into());
            o.insert("intentions".into(), intentions.into());
            o.insert("draining".into(), (*self.shutdown.borrow()).into());
        }
        out
    }

    fn drain(&self) {
        if !self.shutdown.send_replace(true) {
            tracing::info!("POST /drain: stopping");
        }
    }
}
