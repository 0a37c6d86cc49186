//! The proxy's control-plane client. It fills the same seams as the `[tls]` file source: the
//! credential store, the intentions store and the upstreams' endpoints, from `ward server`.
//!
//! - [`channel`]: TLS 1.3 to the server, which must prove `spiffe://<td>/ward/server`
//!   (security rule 1, who the server is, docs/security.md); the client presents its mesh
//!   certificate once it has one.
//! - [`identity`]: the key (generated here, never sent), CSRs, the first certificate from a join
//!   token, renewals with the mesh certificate, and the optional `state_dir`
//!   (security rule 12, proxy restarts need no new token, docs/security.md).
//! - [`watch`]: the `Mesh` streams, each reconnecting with capped exponential backoff and
//!   jitter; while the server is away the last certificate, roots and intentions stay in use.

pub mod backoff;
pub mod channel;
pub mod convert;
pub mod identity;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use ward_config::proxy::{ControlPlaneConfig, ServiceConfig};
use ward_proxy::MeshHandles;

/// Why the client cannot start; each names the config key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("key `control_plane.address`: {0}")]
    Address(String),
    #[error("key `control_plane.ca_file`: {}: {message}", path.display())]
    CaFile { path: PathBuf, message: String },
    #[error("key `control_plane.token_file`: {}: {message}", path.display())]
    TokenFile { path: PathBuf, message: String },
    #[error("key `control_plane.token_file`: is required while `control_plane.state_dir` holds no valid certificate")]
    NoToken,
    #[error("key `control_plane.state_dir`: {}: {message}", path.display())]
    StateDir { path: PathBuf, message: String },
}

/// Everything checked before the proxy binds a port.
pub struct Prepared {
    pub(crate) server: channel::ServerTarget,
    pub(crate) identity: identity::Identity,
    pub(crate) service: ServiceConfig,
}

/// Reads the server's CA file, the state dir and, when needed, the join token; any problem is
/// an error naming the key, so a bad config never half-starts a proxy.
pub fn prepare(cfg: &ControlPlaneConfig, service: &ServiceConfig) -> Result<Prepared, ClientError> {
    let server = channel::ServerTarget::new(cfg, service.trust_domain.clone())?;
    let identity = identity::Identity::prepare(cfg, service)?;
    Ok(Prepared {
        server,
        identity,
        service: service.clone(),
    })
}

/// What [`prepare`] checks, for `ward proxy --check`: the server's CA file and address, and the
/// join token unless `state_dir` holds a valid certificate. Writes nothing.
pub fn check(cfg: &ControlPlaneConfig, service: &ServiceConfig) -> Result<(), ClientError> {
    channel::ServerTarget::new(cfg, service.trust_domain.clone())?;
    identity::Identity::check(cfg, service)
}

/// Runs until `stop` fires: gets the first certificate, then keeps it renewed and the watches
/// open.
pub async fn run(prepared: Prepared, mesh: MeshHandles, stop: CancellationToken) {
    let Prepared {
        server,
        identity,
        service,
    } = prepared;
    let server = Arc::new(server);
    let identity = Arc::new(identity);
    metrics::gauge!(ward_proxy::metrics::CONTROL_PLANE_CONNECTED).set(0.0);
    let first = tokio::select! {
        _ = stop.cancelled() => return,
        r = identity.obtain(&server, &mesh.credentials) => r,
    };
    if !first {
        return;
    }
    let watches = watch::Watches {
        server: server.clone(),
        identity: identity.clone(),
        mesh,
        service,
        stop: stop.clone(),
    };
    tokio::join!(
        identity.keep_renewed(&server, &watches.mesh.credentials, &stop),
        watches.run()
    );
}
