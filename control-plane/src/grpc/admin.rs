//! `Admin`: intentions, join tokens, roots and the catalog, for the bearer of the admin token.

use super::{roots_proto, storage_status, unauth, Shared};
use crate::admin_token::bearer;
use crate::catalog::Protocol;
use crate::intentions::{action_to_proto, blocking, Intention, IntentionError, ServiceRef};
use crate::storage::TokenRecord;
use crate::tokens;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use ward_config::identity::{Name, SpiffeId};
use ward_proto::v1;

pub(crate) struct AdminService(pub Arc<Shared>);

impl AdminService {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let ok = match bearer(req.metadata()) {
            Ok(Some(t)) => self.0.admin.verify(t),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(unauth(
                "Admin calls need the admin token in `authorization: Bearer <token>` (WARD_TOKEN)",
            ))
        }
    }
}

fn intention_status(e: IntentionError) -> Status {
    match e {
        IntentionError::Exists { .. } => Status::already_exists(e.to_string()),
        IntentionError::NotFound { .. } => Status::not_found(e.to_string()),
        IntentionError::NotHttp(_) => Status::failed_precondition(e.to_string()),
        IntentionError::Storage(s) => storage_status(&s),
        _ => Status::invalid_argument(e.to_string()),
    }
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn create_intention(
        &self,
        request: Request<v1::CreateIntentionRequest>,
    ) -> Result<Response<v1::CreateIntentionResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let p = r
            .intention
            .ok_or_else(|| Status::invalid_argument("intention is required"))?;
        let catalog = self.0.catalog.clone();
        let i = Intention::from_proto(&p, |d| catalog.is_http(d)).map_err(intention_status)?;
        let stored = self
            .0
            .intentions
            .create(i, r.replace)
            .await
            .map_err(intention_status)?;
        self.0.metrics.intention_written();
        tracing::info!(source = %stored.source, destination = %stored.destination, version = stored.version, "intention written");
        Ok(Response::new(v1::CreateIntentionResponse {
            version: stored.version,
            intention: Some(stored.to_proto()),
        }))
    }

    async fn delete_intention(
        &self,
        request: Request<v1::DeleteIntentionRequest>,
    ) -> Result<Response<v1::DeleteIntentionResponse>, Status> {
        self.authorize(&request)?;
        let r = request.get_ref();
        let version = self
            .0
            .intentions
            .delete(&r.source, &r.destination)
            .await
            .map_err(intention_status)?;
        self.0.metrics.intention_written();
        Ok(Response::new(v1::DeleteIntentionResponse { version }))
    }

    async fn list_intentions(
        &self,
        request: Request<v1::ListIntentionsRequest>,
    ) -> Result<Response<v1::ListIntentionsResponse>, Status> {
        self.authorize(&request)?;
        let r = request.get_ref();
        let filter = if r.destination.is_empty() {
            None
        } else {
            Some(ServiceRef::parse(&r.destination).map_err(|e| {
                Status::invalid_argument(format!("destination {:?}: {e}", r.destination))
            })?)
        };
        let snap = self.0.intentions.snapshot();
        let intentions = snap
            .rules
            .values()
            .filter(|i| filter.as_ref().is_none_or(|d| &i.destination == d))
            .map(Intention::to_proto)
            .collect();
        Ok(Response::new(v1::ListIntentionsResponse {
            version: snap.version,
            intentions,
            default_action: action_to_proto(snap.default) as i32,
        }))
    }

    async fn check_intention(
        &self,
        request: Request<v1::CheckIntentionRequest>,
    ) -> Result<Response<v1::CheckIntentionResponse>, Status> {
        self.authorize(&request)?;
        let r = request.get_ref();
        let (d, version) = self
            .0
            .intentions
            .check(&r.source, &r.destination)
            .map_err(intention_status)?;
        Ok(Response::new(v1::CheckIntentionResponse {
            decision: action_to_proto(d.action) as i32,
            rule: d.rule.as_ref().map(Intention::to_proto),
            reason: d.reason,
            version,
        }))
    }

    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        self.authorize(&request)?;
        let r = request.get_ref();
        let bad = |e: tokens::CreateError| Status::invalid_argument(e.to_string());
        let service = Name::new(&r.service)
            .map_err(|e| bad(tokens::CreateError::Service(r.service.clone(), e)))?;
        let namespace = if r.namespace.is_empty() {
            Name::default_namespace()
        } else {
            Name::new(&r.namespace)
                .map_err(|e| bad(tokens::CreateError::Namespace(r.namespace.clone(), e)))?
        };
        let (ttl, uses) = tokens::limits(&self.0.tokens, r.ttl_seconds, r.uses).map_err(bad)?;
        let id = SpiffeId::new(self.0.ca.trust_domain().clone(), namespace, service);
        let secret = tokens::generate(tokens::JOIN_PREFIX);
        let now = crate::now_unix();
        let rec = TokenRecord {
            sha256: secret.sha256.clone(),
            spiffe_id: id.to_string(),
            created_at: now,
            expires_at: now.saturating_add(ttl as i64),
            uses,
            uses_left: uses,
        };
        let storage = self.0.storage.clone();
        let index = tokens::index_of(&secret.sha256);
        let stored = rec.clone();
        blocking(move || storage.put_token(&index, &stored))
            .await
            .map_err(|e| storage_status(&e))?;
        self.0.metrics.token_created();
        tracing::info!(spiffe_id = %id, uses, ttl_seconds = ttl, "join token created");
        Ok(Response::new(v1::CreateTokenResponse {
            token: secret.value,
            spiffe_id: id.to_string(),
            expires_at: rec.expires_at,
            uses,
        }))
    }

    async fn list_roots(
        &self,
        request: Request<v1::ListRootsRequest>,
    ) -> Result<Response<v1::ListRootsResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(v1::ListRootsResponse {
            trust_domain: self.0.ca.trust_domain().to_string(),
            roots: roots_proto(&self.0.ca),
        }))
    }

    async fn list_services(
        &self,
        request: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        self.authorize(&request)?;
        let snap = self.0.catalog.snapshot();
        let mut by: BTreeMap<&ServiceRef, (u32, u32, Protocol)> = BTreeMap::new();
        for i in snap.instances.values() {
            let e = by.entry(&i.service).or_insert((0, 0, i.protocol));
            e.0 += 1;
            if i.disconnected_at.is_none() {
                e.1 += 1;
            }
            if i.protocol == Protocol::Http {
                e.2 = Protocol::Http;
            }
        }
        let services = by
            .into_iter()
            .map(
                |(svc, (instances, connected, protocol))| v1::ServiceSummary {
                    service: Some(svc.to_proto()),
                    instances,
                    connected,
                    protocol: protocol.to_proto() as i32,
                },
            )
            .collect();
        Ok(Response::new(v1::ListServicesResponse { services }))
    }

    async fn list_endpoints(
        &self,
        request: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsResponse>, Status> {
        self.authorize(&request)?;
        let r = request.get_ref();
        let svc = ServiceRef::parse(&r.service)
            .map_err(|e| Status::invalid_argument(format!("service {:?}: {e}", r.service)))?;
        let endpoints = self.0.catalog.snapshot().endpoints(&svc);
        // A service exists while an instance of it is registered; an empty list for a typo
        // would read as "registered, no instances".
        if endpoints.is_empty() {
            return Err(Status::not_found(format!("no service {svc} is registered")));
        }
        Ok(Response::new(v1::ListEndpointsResponse {
            service: Some(svc.to_proto()),
            endpoints,
        }))
    }
}
