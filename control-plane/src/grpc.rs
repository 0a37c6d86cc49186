//! The tonic services `Identity`, `Mesh` and `Admin`, with authentication per security rule 3
//! (one credential per call, checked first, docs/security.md):
//! one credential per call, checked first; anything else is UNAUTHENTICATED.

use crate::admin_token::{bearer, AdminToken};
use crate::ca::Ca;
use crate::catalog::{Catalog, CatalogError, Protocol};
use crate::intentions::{
    action_to_proto, blocking, Intention, IntentionError, Intentions, ServiceRef,
};
use crate::metrics::Metrics;
use crate::peer::{MeshPeer, PeerInfo};
use crate::storage::{CertRecord, Storage, TokenRecord};
use crate::tokens::{self, Presented, TokenError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use ward_config::identity::{Name, SpiffeId};
use ward_config::server::{ServerLimits, TokensConfig};
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

fn token_status(e: &TokenError) -> Status {
    match e {
        TokenError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

fn storage_status(e: &impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "storage write failed");
    Status::internal("the server could not store the change durably; nothing was acknowledged")
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

fn service_of(id: &SpiffeId) -> ServiceRef {
    ServiceRef {
        namespace: id.namespace.clone(),
        name: id.service.clone(),
    }
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

fn deadline_of(not_after: i64) -> tokio::time::Instant {
    let left = not_after.saturating_sub(crate::now_unix()).max(0) as u64;
    tokio::time::Instant::now() + std::time::Duration::from_secs(left)
}

/// Follows `rx`, sending what `render` makes of each new value, until the client goes away,
/// the server shuts down or the caller's certificate expires. `guard` lives as long.
fn watch_stream<S, T, G>(
    mut rx: watch::Receiver<S>,
    mut shutdown: watch::Receiver<bool>,
    expires: tokio::time::Instant,
    guard: G,
    mut render: impl FnMut(&S) -> Option<T> + Send + 'static,
) -> ReceiverStream<Result<T, Status>>
where
    S: Clone + Send + Sync + 'static,
    T: Send + 'static,
    G: Send + 'static,
{
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        let _guard = guard;
        loop {
            let snap = rx.borrow_and_update().clone();
            if let Some(msg) = render(&snap) {
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                () = stopped(&mut shutdown) => {
                    let _ = tx.send(Err(Status::unavailable("the server is shutting down"))).await;
                    return;
                }
                () = tokio::time::sleep_until(expires) => {
                    let _ = tx
                        .send(Err(unauth("the client certificate has expired; reconnect with the renewed one")))
                        .await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(out)
}

// ---- limits --------------------------------------------------------------------------------

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

/// A token bucket per identity for `Identity.Sign` (security rule 15, bounds, docs/security.md).
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    burst: f64,
    per_second: f64,
}

impl RateLimiter {
    pub fn new(limits: &ServerLimits) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            burst: f64::from(limits.sign_burst.max(1)),
            per_second: limits.sign_per_second.max(0.0),
        }
    }

    /// Takes one call from `key`'s bucket.
    pub fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() > 100_000 {
            let (burst, rate) = (self.burst, self.per_second);
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = b.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The kinds of long-lived stream an instance may hold one of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamKind {
    Roots,
    Intentions,
    Endpoints,
    Register,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Roots => "WatchRoots",
            StreamKind::Intentions => "WatchIntentions",
            StreamKind::Endpoints => "WatchEndpoints",
            StreamKind::Register => "Register",
        }
    }
}

/// One stream of a kind per instance (security rule 15, bounds, docs/security.md).
#[derive(Default)]
pub(crate) struct StreamSlots {
    open: Arc<Mutex<HashSet<(StreamKind, String)>>>,
}

pub(crate) struct Slot {
    open: Arc<Mutex<HashSet<(StreamKind, String)>>>,
    key: (StreamKind, String),
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.metrics.stream_closed(self.key.0);
    }
}

impl StreamSlots {
    pub fn acquire(
        &self,
        kind: StreamKind,
        instance: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<Slot, Status> {
        let key = (kind, instance.to_owned());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !open.insert(key.clone()) {
            return Err(Status::resource_exhausted(format!(
                "this instance already has a {} stream open; one of each kind is allowed",
                kind.as_str()
            )));
        }
        metrics.stream_opened(kind);
        Ok(Slot {
            open: self.open.clone(),
            key,
            metrics: metrics.clone(),
        })
    }
}

// ---- Identity ------------------------------------------------------------------------------

pub(crate) struct IdentityService(pub Arc<Shared>);

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

// ---- Mesh ----------------------------------------------------------------------------------

pub(crate) struct MeshService(pub Arc<Shared>);

type Stream<T> = ReceiverStream<Result<T, Status>>;

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

#[tonic::async_trait]
impl v1::mesh_server::Mesh for MeshService {
    type WatchRootsStream = Stream<v1::RootsSnapshot>;
    type WatchIntentionsStream = Stream<v1::IntentionsSnapshot>;
    type WatchEndpointsStream = Stream<v1::EndpointsSnapshot>;
    type RegisterStream = Stream<v1::RegisterResponse>;

    async fn watch_roots(
        &self,
        request: Request<v1::WatchRootsRequest>,
    ) -> Result<Response<Self::WatchRootsStream>, Status> {
        let (_, m) = mesh_caller(&request)?;
        let s = &self.0;
        let slot = s
            .streams
            .acquire(StreamKind::Roots, &m.instance_id, &s.metrics)?;
        let snap = v1::RootsSnapshot {
            version: s.roots_version,
            trust_domain: s.ca.trust_domain().to_string(),
            roots: roots_proto(&s.ca),
        };
        // Roots change only with a rotation (not built yet): one snapshot, then the stream
        // stays open so a future rotation can be pushed.
        let (_keep, rx) = watch::channel(());
        let mut sent = false;
        let stream = watch_stream(
            rx,
            s.shutdown.clone(),
            deadline_of(m.not_after),
            (slot, _keep),
            move |()| (!std::mem::replace(&mut sent, true)).then(|| snap.clone()),
        );
        Ok(Response::new(stream))
    }

    async fn watch_intentions(
        &self,
        request: Request<v1::WatchIntentionsRequest>,
    ) -> Result<Response<Self::WatchIntentionsStream>, Status> {
        let (_, m) = mesh_caller(&request)?;
        let s = &self.0;
        let slot = s
            .streams
            .acquire(StreamKind::Intentions, &m.instance_id, &s.metrics)?;
        let dest = service_of(&m.spiffe_id);
        let mut last: Option<(i32, Vec<v1::Intention>)> = None;
        let stream = watch_stream(
            s.intentions.subscribe(),
            s.shutdown.clone(),
            deadline_of(m.not_after),
            slot,
            move |snap| {
                let rules: Vec<v1::Intention> = snap
                    .for_destination(&dest)
                    .map(Intention::to_proto)
                    .collect();
                let default = action_to_proto(snap.default) as i32;
                // The policy this caller sees: its rules and the default.
                if last
                    .as_ref()
                    .is_some_and(|(d, r)| *d == default && r == &rules)
                {
                    return None;
                }
                last = Some((default, rules.clone()));
                Some(v1::IntentionsSnapshot {
                    version: snap.version,
                    destination: Some(dest.to_proto()),
                    default_action: default,
                    intentions: rules,
                })
            },
        );
        Ok(Response::new(stream))
    }

    async fn watch_endpoints(
        &self,
        request: Request<v1::WatchEndpointsRequest>,
    ) -> Result<Response<Self::WatchEndpointsStream>, Status> {
        let (_, m) = mesh_caller(&request)?;
        let s = &self.0;
        let wanted = &request.get_ref().services;
        if wanted.len() > 1024 {
            return Err(Status::invalid_argument(
                "at most 1024 services per WatchEndpoints",
            ));
        }
        let services = wanted
            .iter()
            .map(|r| {
                ServiceRef::from_proto(r)
                    .map_err(|e| Status::invalid_argument(format!("service {:?}: {e}", r.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let slot = s
            .streams
            .acquire(StreamKind::Endpoints, &m.instance_id, &s.metrics)?;
        let mut last: Option<Vec<v1::ServiceEndpoints>> = None;
        let stream = watch_stream(
            s.catalog.subscribe(),
            s.shutdown.clone(),
            deadline_of(m.not_after),
            slot,
            move |snap| {
                let out: Vec<v1::ServiceEndpoints> = services
                    .iter()
                    .map(|svc| v1::ServiceEndpoints {
                        service: Some(svc.to_proto()),
                        endpoints: snap.endpoints(svc),
                    })
                    .collect();
                if last.as_ref() == Some(&out) {
                    return None;
                }
                last = Some(out.clone());
                Some(v1::EndpointsSnapshot {
                    version: snap.version,
                    services: out,
                })
            },
        );
        Ok(Response::new(stream))
    }

    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let (p, m) = mesh_caller(&request)?;
        let s = &self.0;
        let r = request.get_ref();
        let mut address: SocketAddr = r.address.parse().map_err(|_| {
            Status::invalid_argument(format!("address {:?} is not ip:port", r.address))
        })?;
        // The IP is the connection's source unless the operator trusts callers to name it:
        // otherwise any identity could claim another host's address ahead of its owner.
        if !s.trust_registered_address || address.ip().is_unspecified() {
            address.set_ip(p.remote.ip().to_canonical());
        }
        let slot = s
            .streams
            .acquire(StreamKind::Register, &m.instance_id, &s.metrics)?;
        let (reg, inst) = s
            .catalog
            .register(
                m.instance_id.clone(),
                m.spiffe_id.clone(),
                address,
                Protocol::from_proto(r.protocol),
            )
            .await
            .map_err(|e| match e {
                CatalogError::AddressTaken { .. } => Status::already_exists(e.to_string()),
                CatalogError::TooManyInstances { .. } => Status::resource_exhausted(e.to_string()),
                CatalogError::BadAddress(_) => Status::invalid_argument(e.to_string()),
                CatalogError::Storage(e) => storage_status(&e),
            })?;
        tracing::info!(spiffe_id = %m.spiffe_id, %address, "instance registered");
        let msg = v1::RegisterResponse {
            instance_id: inst.id.clone(),
            address: inst.address.to_string(),
            service: Some(inst.service.to_proto()),
        };
        let (_keep, rx) = watch::channel(());
        let mut sent = false;
        let stream = watch_stream(
            rx,
            s.shutdown.clone(),
            deadline_of(m.not_after),
            (slot, reg, _keep),
            move |()| (!std::mem::replace(&mut sent, true)).then(|| msg.clone()),
        );
        Ok(Response::new(stream))
    }
}

// ---- Admin ---------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_buckets_per_identity() {
        let l = RateLimiter::new(&ServerLimits {
            sign_burst: 3,
            sign_per_second: 0.0,
            ..ServerLimits::default()
        });
        assert!(l.allow("a") && l.allow("a") && l.allow("a"));
        assert!(!l.allow("a"));
        assert!(l.allow("b"), "another identity has its own bucket");
    }

    #[test]
    fn one_stream_of_a_kind_per_instance() {
        let slots = StreamSlots::default();
        let m = Arc::new(Metrics::default());
        let a = slots.acquire(StreamKind::Intentions, "i1", &m).unwrap();
        let err = slots
            .acquire(StreamKind::Intentions, "i1", &m)
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let _b = slots.acquire(StreamKind::Roots, "i1", &m).unwrap();
        let _c = slots.acquire(StreamKind::Intentions, "i2", &m).unwrap();
        drop(a);
        slots.acquire(StreamKind::Intentions, "i1", &m).unwrap();
    }
}
