//! `Mesh`: the watch streams (roots, intentions, endpoints) and `Register`, each held open
//! until the client goes away, the server stops or the caller's certificate expires.

use super::{mesh_caller, roots_proto, stopped, storage_status, unauth, Shared, StreamKind};
use crate::catalog::{CatalogError, Protocol};
use crate::intentions::{action_to_proto, Intention, ServiceRef};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ward_config::identity::SpiffeId;
use ward_proto::v1;

pub(crate) struct MeshService(pub Arc<Shared>);

type Stream<T> = ReceiverStream<Result<T, Status>>;

fn service_of(id: &SpiffeId) -> ServiceRef {
    ServiceRef {
        namespace: id.namespace.clone(),
        name: id.service.clone(),
    }
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
        // With `all` the stream still holds the one Endpoints slot of this instance, and its
        // snapshots are bounded by the catalog itself (see `catalog::Snapshot::watched`).
        let all = request.get_ref().all;
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
                let out = snap.watched(&services, all);
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
                r.transparent_port,
            )
            .await
            .map_err(|e| match e {
                CatalogError::AddressTaken { .. } => Status::already_exists(e.to_string()),
                CatalogError::TooManyInstances { .. } => Status::resource_exhausted(e.to_string()),
                CatalogError::BadAddress(_) | CatalogError::BadTransparentPort(_) => {
                    Status::invalid_argument(e.to_string())
                }
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
