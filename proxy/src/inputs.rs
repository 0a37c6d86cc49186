//! What every listener, the admin API and the drain read: the service, the credential and
//! intention stores, the open connections, the limits and their slots, and the drain.

use crate::connections::ConnectionRegistry;
use crate::drain::Drain;
use crate::handshakes::HandshakeSlots;
use crate::intentions::IntentionStore;
use crate::tls::CredentialStore;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Semaphore;
use ward_config::proxy::{Limits, ServiceConfig};

pub struct ProxyInputs {
    pub service: ServiceConfig,
    pub credentials: Arc<CredentialStore>,
    pub intentions: Arc<IntentionStore>,
    pub connections: Arc<ConnectionRegistry>,
    pub limits: Limits,
    /// One permit per forwarded or handshaking connection (`max_connections`).
    pub conn_slots: Arc<Semaphore>,
    /// Handshakes in progress, globally and per source IP (security rule 15, bounds,
    /// docs/security.md).
    pub handshakes: Arc<HandshakeSlots>,
    /// The drain signals and every connection task.
    pub drain: Drain,
    /// The bound listener addresses, by role, for /config.
    pub listeners: std::sync::Mutex<Vec<(String, SocketAddr)>>,
    /// With a transparent outbound: the address index, which must have the catalog's first
    /// answer before the proxy is ready (until then every redirected connection is refused).
    pub mesh_index: std::sync::OnceLock<Arc<crate::transparent::index::MeshIndex>>,
}

impl ProxyInputs {
    pub fn new(
        service: ServiceConfig,
        credentials: Arc<CredentialStore>,
        intentions: Arc<IntentionStore>,
        limits: Limits,
    ) -> Self {
        Self {
            service,
            credentials,
            intentions,
            connections: Arc::default(),
            conn_slots: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: HandshakeSlots::new(
                limits.max_pending_handshakes,
                limits.max_pending_handshakes_per_ip,
            ),
            drain: Drain::new(limits.drain_delay),
            limits,
            listeners: std::sync::Mutex::new(Vec::new()),
            mesh_index: std::sync::OnceLock::new(),
        }
    }

    /// Ready once a certificate and an intentions snapshot are loaded (and, with a transparent
    /// outbound, the catalog's addresses), until a drain starts.
    pub fn is_ready(&self) -> bool {
        !self.drain.is_draining()
            && self.credentials.load().is_some()
            && self.intentions.load().is_some()
            && self.mesh_index.get().is_none_or(|index| index.published())
    }
}

#[cfg(test)]
mod tests {
    use crate::test_pki::{ca, inputs, intentions, store_for};
    use crate::transparent::index::MeshIndex;
    use std::sync::Arc;
    use ward_config::intentions::Action;

    #[test]
    fn a_transparent_outbound_is_ready_once_the_catalog_has_answered() {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let inputs = inputs(
            "order",
            store_for("order", &int, &[&root]),
            intentions(Action::Deny, &[]),
        );
        assert!(inputs.is_ready(), "certificate and intentions are in");
        let index = Arc::new(MeshIndex::default());
        inputs.mesh_index.set(index.clone()).unwrap();
        assert!(!inputs.is_ready(), "no catalog answer yet");
        index.publish(Vec::new());
        assert!(inputs.is_ready());
    }
}
