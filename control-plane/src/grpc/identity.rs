//! `Identity.Sign`: a certificate for a join token, or a renewal for a mesh caller.

use super::{peer, storage_status, unauth, unexpired, Shared};
use crate::admin_token::bearer;
use crate::intentions::blocking;
use crate::peer::MeshPeer;
use crate::storage::{CertRecord, TokenRecord};
use crate::tokens::{Presented, TokenError};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward_config::identity::SpiffeId;
use ward_proto::v1;

pub(crate) struct IdentityService(pub Arc<Shared>);

fn token_status(e: &TokenError) -> Status {
    match e {
        TokenError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

impl IdentityService {
    fn response(&self, leaf: crate::ca::Issued, id: &SpiffeId) -> v1::SignResponse {
        let ca = &self.0.ca;
        v1::SignResponse {
            cert_chain: vec![leaf.der.to_vec(), ca.intermediate().to_vec()],
            roots: ca.roots().iter().map(|r| r.der.to_vec()).collect(),
            not_after: leaf.not_after.unix_timestamp(),
            spiffe_id: id.to_string(),
            serial: leaf.serial,
            trust_domain: ca.trust_domain().to_string(),
        }
    }

    fn issue(&self, id: &SpiffeId, public_key: &[u8]) -> Result<crate::ca::Issued, Status> {
        self.0.ca.issue_leaf(id, public_key).map_err(|e| {
            tracing::error!(error = %e, "cannot issue a certificate");
            Status::internal(e.to_string())
        })
    }

    async fn with_token(&self, token: &str, csr: &[u8]) -> Result<v1::SignResponse, Status> {
        let s = &self.0;
        let presented = Presented::parse(token).map_err(|e| token_status(&e))?;
        let now = crate::now_unix();
        let storage = s.storage.clone();
        let index = presented.index.clone();
        let rec: Option<TokenRecord> = blocking(move || storage.get_token(&index))
            .await
            .map_err(|e| storage_status(&e))?;
        presented
            .check(rec.as_ref(), now)
            .map_err(|e| token_status(&e))?;
        let rec = rec.ok_or_else(|| token_status(&TokenError::Unknown))?;
        let bound = SpiffeId::parse(&rec.spiffe_id)
            .map_err(|_| Status::internal("a stored token names an invalid SPIFFE ID"))?;
        if !s.limiter.allow(&rec.spiffe_id) {
            return Err(Status::resource_exhausted(format!(
                "too many Sign calls for {bound}; retry later"
            )));
        }
        let req =
            s.ca.verify_csr(csr)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.spiffe_id != bound {
            return Err(token_status(&TokenError::WrongIdentity {
                bound: bound.to_string(),
                asked: req.spiffe_id.to_string(),
            }));
        }
        let leaf = self.issue(&bound, &req.public_key)?;
        let cert = CertRecord {
            serial: leaf.serial.clone(),
            spiffe_id: bound.to_string(),
            issued_at: now,
            not_after: leaf.not_after.unix_timestamp(),
            via: "token".into(),
        };
        let storage = s.storage.clone();
        let index = presented.index.clone();
        let p = presented.clone();
        let decided =
            blocking(move || storage.redeem_token(&index, &mut |cur| p.consume(cur, now), &cert))
                .await
                .map_err(|e| storage_status(&e))?;
        // A refusal here means a concurrent call took the last use: this certificate is
        // dropped unseen.
        decided.map_err(|e| token_status(&e))?;
        tracing::info!(spiffe_id = %bound, serial = %leaf.serial, "signed a certificate for a join token");
        Ok(self.response(leaf, &bound))
    }

    async fn renew(&self, mesh: &MeshPeer, csr: &[u8]) -> Result<v1::SignResponse, Status> {
        unexpired(mesh)?;
        let s = &self.0;
        let id = &mesh.spiffe_id;
        if !s.limiter.allow(&id.to_string()) {
            return Err(Status::resource_exhausted(format!(
                "too many Sign calls for {id}; retry later"
            )));
        }
        let req =
            s.ca.verify_csr(csr)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if &req.spiffe_id != id {
            return Err(Status::permission_denied(format!(
                "a renewal is for the caller's own identity {id}, but the CSR asks for {}",
                req.spiffe_id
            )));
        }
        let leaf = self.issue(id, &req.public_key)?;
        let cert = CertRecord {
            serial: leaf.serial.clone(),
            spiffe_id: id.to_string(),
            issued_at: crate::now_unix(),
            not_after: leaf.not_after.unix_timestamp(),
            via: "renewal".into(),
        };
        let storage = s.storage.clone();
        blocking(move || storage.record_cert(&cert))
            .await
            .map_err(|e| storage_status(&e))?;
        tracing::info!(spiffe_id = %id, serial = %leaf.serial, "renewed a certificate");
        Ok(self.response(leaf, id))
    }
}

#[tonic::async_trait]
impl v1::identity_server::Identity for IdentityService {
    async fn sign(
        &self,
        request: Request<v1::SignRequest>,
    ) -> Result<Response<v1::SignResponse>, Status> {
        let peer = peer(&request)?;
        let token = bearer(request.metadata())
            .map_err(unauth)?
            .map(str::to_owned);
        let csr = &request.get_ref().csr;
        let result = match (token, &peer.mesh) {
            (Some(_), Some(_)) => Err(unauth(
                "one credential per call: send a join token or a mesh client certificate, not both",
            )),
            (None, None) => Err(unauth(
                "Identity.Sign needs a join token (authorization: Bearer) or the caller's mesh client certificate",
            )),
            (Some(t), None) => self.with_token(&t, csr).await,
            (None, Some(m)) => self.renew(m, csr).await,
        };
        self.0
            .metrics
            .sign(result.as_ref().map(|_| ()).map_err(Status::code));
        result.map(Response::new)
    }
}
