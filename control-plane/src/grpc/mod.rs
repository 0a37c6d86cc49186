//! The tonic services `Identity`, `Mesh` and `Admin`, with authentication per security rule 3
//! (one credential per call, checked first, docs/security.md):
//! one credential per call, checked first; anything else is UNAUTHENTICATED.
//!
//! This module holds what the services share (state, caller checks, the size-limit
//! middleware); each service has its own file, and `limits` the Sign rate limiter and the
//! one-stream-per-kind rule.

mod admin;
mod identity;
mod limits;
mod mesh;

pub(crate) use admin::AdminService;
pub(crate) use identity::IdentityService;
pub(crate) use limits::{RateLimiter, StreamKind, StreamSlots};
pub(crate) use mesh::MeshService;

use crate::admin_token::AdminToken;
use crate::ca::Ca;
use crate::catalog::Catalog;
use crate::intentions::Intentions;
use crate::metrics::Metrics;
use crate::peer::{MeshPeer, PeerInfo};
use crate::storage::Storage;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Code, Request, Status};
use ward_config::server::TokensConfig;
use ward_proto::v1;

/// What every service shares.
pub(crate) struct Shared {
    pub ca: Arc<Ca>,
    pub storage: Arc<dyn Storage>,
    pub intentions: Arc<Intentions>,
    pub catalog: Arc<Catalog>,
    /// `[catalog] trust_registered_address`.
    pub trust_registered_address: bool,
    pub admin: AdminToken,
    pub tokens: TokensConfig,
    pub limiter: RateLimiter,
    pub streams: StreamSlots,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
    /// Version of the roots set (grows on a rotation).
    pub roots_version: u64,
}

// ---- helpers -------------------------------------------------------------------------------

fn peer<T>(req: &Request<T>) -> Result<PeerInfo, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the connection carries no TLS peer information"))
}

fn unauth(msg: impl std::fmt::Display) -> Status {
    Status::unauthenticated(msg.to_string())
}

fn storage_status(e: &impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "storage write failed");
    Status::internal("the server could not store the change durably; nothing was acknowledged")
}

/// Refuses a mesh certificate past its notAfter. The TLS handshake checked it, but a
/// connection opened while it was valid may stay open long after.
fn unexpired(m: &MeshPeer) -> Result<(), Status> {
    let past = crate::now_unix().saturating_sub(m.not_after);
    if past <= 0 {
        return Ok(());
    }
    Err(unauth(format!(
        "the client certificate expired {past} s ago; reconnect with a valid one, or enroll again with a join token"
    )))
}

/// The caller's mesh identity, required by every `Mesh.*` call.
fn mesh_caller<T>(req: &Request<T>) -> Result<(PeerInfo, MeshPeer), Status> {
    let p = peer(req)?;
    match p.mesh.clone() {
        Some(m) => {
            unexpired(&m)?;
            Ok((p, m))
        }
        None if p.non_workload_cert => Err(unauth(
            "Mesh calls need a mesh workload certificate; the client certificate names no workload SPIFFE ID",
        )),
        None => Err(unauth("Mesh calls need the caller's mesh client certificate")),
    }
}

/// Resolves once the shutdown flag is set.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn roots_proto(ca: &Ca) -> Vec<v1::Root> {
    ca.roots()
        .iter()
        .enumerate()
        .map(|(n, r)| v1::Root {
            cert: r.der.to_vec(),
            fingerprint: r.fingerprint.clone(),
            not_before: r.not_before.unix_timestamp(),
            not_after: r.not_after.unix_timestamp(),
            active: n == 0,
        })
        .collect()
}

// ---- middleware ----------------------------------------------------------------------------

/// Answers a request message over the size limit with RESOURCE_EXHAUSTED (security rule 15,
/// bounds, docs/security.md) instead of tonic's OUT_OF_RANGE. No handler of ours returns
/// OUT_OF_RANGE, so every such status is the decoder's size check.
#[derive(Debug, Clone)]
pub(crate) struct OversizeIsExhausted<S>(pub S);

impl<S, B, RB> tower::Service<http::Request<B>> for OversizeIsExhausted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let out_of_range = (Code::OutOfRange as i32).to_string();
            if resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes())
            {
                let code = (Code::ResourceExhausted as i32).to_string();
                if let Ok(v) = http::HeaderValue::from_str(&code) {
                    resp.headers_mut().insert("grpc-status", v);
                }
            }
            Ok(resp)
        })
    }
}
