//! State shared by the listeners, the admin API and the drain logic.

use crate::connections::ConnectionRegistry;
use crate::handshakes::HandshakeSlots;
use crate::intentions::IntentionStore;
use crate::tls::CredentialStore;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ward_config::proxy::{Limits, ServiceConfig};

pub struct Shared {
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
    /// Every connection task, so a drain can wait for them.
    pub tracker: TaskTracker,
    /// Fires when the drain starts: listeners stop accepting.
    pub stop_accepting: CancellationToken,
    /// Fires at the drain deadline: open connections are closed.
    pub force_close: CancellationToken,
    draining: AtomicBool,
    /// The bound listener addresses, by role, for /config.
    pub listeners: std::sync::Mutex<Vec<(String, SocketAddr)>>,
}

impl Shared {
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
            limits,
            tracker: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            force_close: CancellationToken::new(),
            draining: AtomicBool::new(false),
            listeners: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Ready once a certificate and an intentions snapshot are loaded, until a drain starts.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.credentials.load().is_some() && self.intentions.load().is_some()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts the drain: /ready turns 503 at once and the listeners stop accepting.
    pub fn begin_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: listeners closed, waiting for open connections");
        }
        self.stop_accepting.cancel();
    }
}
