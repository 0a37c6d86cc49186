//! The catalog: sidecar instances registered by `Mesh.Register` streams.
//!
//! An instance's identity (service, namespace) comes from its mesh certificate, never from the
//! request. An instance is live while its stream is open and for `deregister_after` after it
//! closed; then it is removed. An address:port held by a live instance of another service is
//! refused (security rule 3, one credential per call, docs/security.md), and one identity holds at
//! most `max_instances_per_identity` live instances. Instances are persisted, and after a restart
//! they count as disconnected from the moment of the start, so none is removed before the server
//! has been up for `deregister_after` (security rule 11, server state, docs/security.md).

use crate::intentions::{blocking, ServiceRef};
use crate::storage::{InstanceRecord, Storage, StorageError};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use ward_config::identity::SpiffeId;
use ward_config::server::CatalogConfig;
use ward_proto::v1;

/// The protocol of a sidecar's inbound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Http,
}

impl Protocol {
    pub fn from_proto(p: i32) -> Self {
        match v1::Protocol::try_from(p) {
            Ok(v1::Protocol::Http) => Protocol::Http,
            _ => Protocol::Tcp,
        }
    }

    pub fn to_proto(self) -> v1::Protocol {
        match self {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Http => v1::Protocol::Http,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        }
    }
}

/// A registered instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub service: ServiceRef,
    pub address: SocketAddr,
    pub protocol: Protocol,
    /// The port of its transparent inbound, on the IP of `address`, when it runs one.
    pub transparent_port: Option<u16>,
    pub registered_at: i64,
    /// `None` while its stream is open.
    pub disconnected_at: Option<Instant>,
    /// Which registration holds it, so a stale stream's end does not touch a newer one.
    generation: u64,
}

impl Instance {
    pub fn to_endpoint(&self) -> v1::Endpoint {
        v1::Endpoint {
            address: self.address.to_string(),
            protocol: self.protocol.to_proto() as i32,
            instance_id: self.id.clone(),
            connected: self.disconnected_at.is_none(),
            transparent_port: self.transparent_port.map_or(0, u32::from),
        }
    }
}

/// Every instance at one version.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: u64,
    pub instances: BTreeMap<String, Instance>,
}

impl Snapshot {
    pub fn endpoints(&self, service: &ServiceRef) -> Vec<v1::Endpoint> {
        self.instances
            .values()
            .filter(|i| &i.service == service)
            .map(Instance::to_endpoint)
            .collect()
    }

    /// The entries of a `WatchEndpoints` snapshot: one per service of `requested`, in its
    /// order, also without an endpoint; with `all`, then every other service that has an
    /// instance, ordered by (namespace, name).
    ///
    /// With `all` the snapshot is as large as the catalog, which registration bounds:
    /// `[catalog] max_instances_per_identity` live instances per identity, each identity one a
    /// join token was issued for.
    pub fn watched(&self, requested: &[ServiceRef], all: bool) -> Vec<v1::ServiceEndpoints> {
        let mut out: Vec<v1::ServiceEndpoints> = requested
            .iter()
            .map(|svc| v1::ServiceEndpoints {
                service: Some(svc.to_proto()),
                endpoints: self.endpoints(svc),
            })
            .collect();
        if all {
            // ServiceRef orders by namespace, then name.
            let named: HashSet<&ServiceRef> = requested.iter().collect();
            let mut others: BTreeMap<&ServiceRef, Vec<v1::Endpoint>> = BTreeMap::new();
            for i in self.instances.values() {
                if !named.contains(&i.service) {
                    others.entry(&i.service).or_default().push(i.to_endpoint());
                }
            }
            out.extend(
                others
                    .into_iter()
                    .map(|(svc, endpoints)| v1::ServiceEndpoints {
                        service: Some(svc.to_proto()),
                        endpoints,
                    }),
            );
        }
        out
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// ALREADY_EXISTS.
    #[error("{address} is registered by an instance of {holder}")]
    AddressTaken { address: SocketAddr, holder: String },
    /// RESOURCE_EXHAUSTED.
    #[error("{identity} already has {max} live instances, the most `[catalog] max_instances_per_identity` allows")]
    TooManyInstances { identity: String, max: usize },
    /// INVALID_ARGUMENT.
    #[error("address {0:?} is not an ip:port with a non-zero port")]
    BadAddress(String),
    /// INVALID_ARGUMENT.
    #[error("transparent_port {0} is not a port: 0 for none, or 1-65535")]
    BadTransparentPort(u32),
    #[error(transparent)]
    Storage(#[from] Arc<StorageError>),
}

/// The catalog store.
pub struct Catalog {
    storage: Arc<dyn Storage>,
    tx: watch::Sender<Arc<Snapshot>>,
    write: tokio::sync::Mutex<()>,
    deregister_after: Duration,
    max_per_identity: usize,
    generation: AtomicU64,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("instances", &self.tx.borrow().instances.len())
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// Loads persisted instances as disconnected since `started`.
    pub fn new(
        storage: Arc<dyn Storage>,
        records: &[InstanceRecord],
        cfg: &CatalogConfig,
        started: Instant,
    ) -> Self {
        let mut instances = BTreeMap::new();
        for r in records {
            let (Ok(spiffe_id), Ok(address)) = (SpiffeId::parse(&r.spiffe_id), r.address.parse())
            else {
                tracing::warn!(instance = %r.instance_id, "skipping an unreadable catalog entry");
                continue;
            };
            let service = ServiceRef {
                namespace: spiffe_id.namespace.clone(),
                name: spiffe_id.service.clone(),
            };
            instances.insert(
                r.instance_id.clone(),
                Instance {
                    id: r.instance_id.clone(),
                    spiffe_id,
                    service,
                    address,
                    protocol: if r.protocol == "http" {
                        Protocol::Http
                    } else {
                        Protocol::Tcp
                    },
                    transparent_port: r.transparent_port,
                    registered_at: r.registered_at,
                    disconnected_at: Some(started),
                    generation: 0,
                },
            );
        }
        let (tx, _) = watch::channel(Arc::new(Snapshot {
            version: 1,
            instances,
        }));
        Self {
            storage,
            tx,
            write: tokio::sync::Mutex::new(()),
            deregister_after: cfg.deregister_after,
            max_per_identity: cfg.max_instances_per_identity,
            generation: AtomicU64::new(1),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Whether `i`'s stream is open, or closed less than `deregister_after` before `now`.
    fn is_live(&self, i: &Instance, now: Instant) -> bool {
        i.disconnected_at
            .is_none_or(|t| now.saturating_duration_since(t) < self.deregister_after)
    }

    /// Whether any instance of `service` is registered with an http inbound.
    pub fn is_http(&self, service: &ServiceRef) -> bool {
        self.tx
            .borrow()
            .instances
            .values()
            .any(|i| &i.service == service && i.protocol == Protocol::Http)
    }

    /// Registers (or re-registers) instance `id` of `spiffe_id` at `address`, with its
    /// transparent inbound at `transparent_port` (0: none) on the same IP. The returned guard
    /// marks it disconnected when dropped (the stream ended).
    pub async fn register(
        self: &Arc<Self>,
        id: String,
        spiffe_id: SpiffeId,
        address: SocketAddr,
        protocol: Protocol,
        transparent_port: u32,
    ) -> Result<(Registration, Instance), CatalogError> {
        if address.port() == 0 || address.ip().is_unspecified() {
            return Err(CatalogError::BadAddress(address.to_string()));
        }
        let transparent_port = match transparent_port {
            0 => None,
            p => Some(
                u16::try_from(p).map_err(|_| CatalogError::BadTransparentPort(transparent_port))?,
            ),
        };
        let service = ServiceRef {
            namespace: spiffe_id.namespace.clone(),
            name: spiffe_id.service.clone(),
        };
        let _w = self.write.lock().await;
        let cur = self.snapshot();
        let now = Instant::now();
        let mut replaced = Vec::new();
        let mut held = 0;
        for other in cur.instances.values() {
            if other.id == id {
                continue;
            }
            let live = self.is_live(other, now);
            if other.address == address {
                if live && other.service != service {
                    return Err(CatalogError::AddressTaken {
                        address,
                        holder: other.service.display_short(),
                    });
                }
                // The same service at the same address (a restarted sidecar with a new key),
                // or a holder gone for deregister_after that the next reap would remove.
                replaced.push(other.id.clone());
            } else if live && other.spiffe_id == spiffe_id {
                held += 1;
            }
        }
        if held >= self.max_per_identity {
            return Err(CatalogError::TooManyInstances {
                identity: spiffe_id.to_string(),
                max: self.max_per_identity,
            });
        }
        let rec = InstanceRecord {
            instance_id: id.clone(),
            spiffe_id: spiffe_id.to_string(),
            address: address.to_string(),
            protocol: protocol.as_str().to_owned(),
            transparent_port,
            registered_at: crate::now_unix(),
        };
        let storage = self.storage.clone();
        let gone = replaced.clone();
        let registered_at = rec.registered_at;
        blocking(move || {
            for g in &gone {
                storage.delete_instance(g)?;
            }
            storage.put_instance(&rec)
        })
        .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let inst = Instance {
            id: id.clone(),
            spiffe_id,
            service,
            address,
            protocol,
            transparent_port,
            registered_at,
            disconnected_at: None,
            generation,
        };
        let stored = inst.clone();
        self.tx.send_modify(|s| {
            let mut next = (**s).clone();
            for g in &replaced {
                next.instances.remove(g);
            }
            next.instances.insert(id.clone(), stored);
            next.version += 1;
            *s = Arc::new(next);
        });
        Ok((
            Registration {
                catalog: self.clone(),
                id,
                generation,
            },
            inst,
        ))
    }

    fn disconnect(&self, id: &str, generation: u64) {
        self.tx.send_if_modified(|s| {
            match s.instances.get(id) {
                Some(i) if i.generation == generation && i.disconnected_at.is_none() => {}
                _ => return false,
            }
            let mut next = (**s).clone();
            if let Some(i) = next.instances.get_mut(id) {
                i.disconnected_at = Some(Instant::now());
            }
            next.version += 1;
            *s = Arc::new(next);
            true
        });
    }

    /// Removes instances disconnected for `deregister_after`; returns how many.
    pub async fn reap(&self, now: Instant) -> Result<usize, CatalogError> {
        let _w = self.write.lock().await;
        let due = |i: &Instance| !self.is_live(i, now);
        let expired: Vec<String> = self
            .snapshot()
            .instances
            .values()
            .filter(|i| due(i))
            .map(|i| i.id.clone())
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let storage = self.storage.clone();
        let ids = expired.clone();
        blocking(move || {
            for id in &ids {
                storage.delete_instance(id)?;
            }
            Ok(())
        })
        .await?;
        let mut n = 0;
        self.tx.send_modify(|s| {
            let mut next = (**s).clone();
            for id in &expired {
                // Re-registered meanwhile: keep it.
                if next.instances.get(id).is_some_and(&due) {
                    next.instances.remove(id);
                    n += 1;
                }
            }
            next.version += 1;
            *s = Arc::new(next);
        });
        Ok(n)
    }
}

/// Held by a Register stream; dropping it marks the instance disconnected.
#[derive(Debug)]
pub struct Registration {
    catalog: Arc<Catalog>,
    id: String,
    generation: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.catalog.disconnect(&self.id, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Initial, RedbStorage};

    fn storage(dir: &std::path::Path) -> Arc<dyn Storage> {
        let m = crate::storage::test_material();
        Arc::new(
            RedbStorage::create(
                dir,
                &Initial {
                    ca: &m,
                    admin_token_sha256: "x",
                },
            )
            .unwrap(),
        )
    }

    fn cfg(deregister_after: Duration) -> CatalogConfig {
        CatalogConfig {
            deregister_after,
            ..CatalogConfig::default()
        }
    }

    /// An empty catalog that deregisters after 30 s.
    fn catalog(st: &Arc<dyn Storage>) -> Arc<Catalog> {
        Arc::new(Catalog::new(
            st.clone(),
            &[],
            &cfg(Duration::from_secs(30)),
            Instant::now(),
        ))
    }

    fn id(svc: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://ward.local/ns/default/svc/{svc}")).unwrap()
    }

    #[tokio::test]
    async fn address_of_another_service_is_refused_and_reaped_later() {
        let dir = tempfile::tempdir().unwrap();
        let st = storage(dir.path());
        let start = Instant::now();
        let c = Arc::new(Catalog::new(
            st.clone(),
            &[],
            &cfg(Duration::from_secs(30)),
            start,
        ));
        let addr: SocketAddr = "10.0.0.5:21000".parse().unwrap();
        let (reg, _) = c
            .register("a".into(), id("inventory"), addr, Protocol::Tcp, 0)
            .await
            .unwrap();
        let err = c
            .register("b".into(), id("rogue"), addr, Protocol::Tcp, 0)
            .await
            .unwrap_err();
        assert!(matches!(err, CatalogError::AddressTaken { .. }), "{err}");
        // Same service, new key: replaces.
        drop(reg);
        let (reg2, _) = c
            .register("c".into(), id("inventory"), addr, Protocol::Http, 0)
            .await
            .unwrap();
        assert!(c.is_http(&ServiceRef::parse("inventory").unwrap()));
        assert_eq!(c.snapshot().instances.len(), 1);
        drop(reg2);
        assert_eq!(c.reap(Instant::now()).await.unwrap(), 0, "not yet");
        assert_eq!(
            c.reap(Instant::now() + Duration::from_secs(31))
                .await
                .unwrap(),
            1
        );
        assert!(c.snapshot().instances.is_empty());
    }

    #[tokio::test]
    async fn an_address_is_refused_only_while_its_holder_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let st = storage(dir.path());
        let c = Arc::new(Catalog::new(
            st.clone(),
            &[],
            &cfg(Duration::from_secs(1)),
            Instant::now(),
        ));
        let addr: SocketAddr = "10.0.0.5:21000".parse().unwrap();
        let (reg, _) = c
            .register("a".into(), id("inventory"), addr, Protocol::Tcp, 0)
            .await
            .unwrap();
        drop(reg);
        // Closed less than deregister_after ago: still live.
        let err = c
            .register("b".into(), id("rogue"), addr, Protocol::Tcp, 0)
            .await
            .unwrap_err();
        assert!(matches!(err, CatalogError::AddressTaken { .. }), "{err}");
        // No reap runs here: the register call itself sees the holder is gone.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (_reg, inst) = c
            .register("b".into(), id("rogue"), addr, Protocol::Tcp, 0)
            .await
            .expect("the address of an instance gone for deregister_after is free");
        assert_eq!(inst.service.name.as_str(), "rogue");
        let ids: Vec<String> = c.snapshot().instances.keys().cloned().collect();
        assert_eq!(ids, ["b"]);
        let stored: Vec<String> = st
            .load()
            .unwrap()
            .instances
            .into_iter()
            .map(|r| r.instance_id)
            .collect();
        assert_eq!(stored, ["b"]);
    }

    #[tokio::test]
    async fn live_instances_per_identity_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(Catalog::new(
            storage(dir.path()),
            &[],
            &CatalogConfig {
                // A closed stream is no longer live at once.
                deregister_after: Duration::ZERO,
                max_instances_per_identity: 2,
                trust_registered_address: false,
            },
            Instant::now(),
        ));
        let at = |port: u16| SocketAddr::from(([10, 0, 0, 5], port));
        let (a, _) = c
            .register("a".into(), id("inventory"), at(1), Protocol::Tcp, 0)
            .await
            .unwrap();
        let (_b, _) = c
            .register("b".into(), id("inventory"), at(2), Protocol::Tcp, 0)
            .await
            .unwrap();
        let err = c
            .register("c".into(), id("inventory"), at(3), Protocol::Tcp, 0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CatalogError::TooManyInstances { max: 2, .. }),
            "{err}"
        );
        // Another identity has its own count; an instance re-registering is not a new one.
        c.register("x".into(), id("order"), at(4), Protocol::Tcp, 0)
            .await
            .unwrap();
        drop(a);
        let (a, _) = c
            .register("a".into(), id("inventory"), at(1), Protocol::Tcp, 0)
            .await
            .unwrap();
        // A closed one no longer counts.
        drop(a);
        c.register("c".into(), id("inventory"), at(3), Protocol::Tcp, 0)
            .await
            .unwrap();
    }

    /// A transparent port is returned in the endpoint and kept across a restart; 0 is none and
    /// a value that is not a port is refused, naming the field, with nothing registered.
    #[tokio::test]
    async fn a_transparent_port_is_stored_returned_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let st = storage(dir.path());
        let c = catalog(&st);
        let at = |port: u16| SocketAddr::from(([10, 0, 0, 5], port));
        let (_web, inst) = c
            .register("w".into(), id("web"), at(15006), Protocol::Tcp, 15006)
            .await
            .unwrap();
        assert_eq!(inst.transparent_port, Some(15006));
        let (_inv, _) = c
            .register("i".into(), id("inventory"), at(21000), Protocol::Tcp, 0)
            .await
            .unwrap();
        let err = c
            .register("x".into(), id("order"), at(21001), Protocol::Tcp, 65536)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CatalogError::BadTransparentPort(65536)),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("transparent_port 65536"),
            "{err}"
        );
        let ports = |snap: &Snapshot, svc: &str| -> Vec<u32> {
            snap.endpoints(&ServiceRef::parse(svc).unwrap())
                .iter()
                .map(|e| e.transparent_port)
                .collect()
        };
        let snap = c.snapshot();
        assert_eq!(ports(&snap, "web"), [15006]);
        assert_eq!(ports(&snap, "inventory"), [0]);
        assert!(ports(&snap, "order").is_empty(), "refused: not registered");

        let records = st.load().unwrap().instances;
        let c2 = Catalog::new(st, &records, &cfg(Duration::from_secs(30)), Instant::now());
        assert_eq!(ports(&c2.snapshot(), "web"), [15006]);
        assert_eq!(ports(&c2.snapshot(), "inventory"), [0]);
    }

    /// The `WatchEndpoints` entries: the requested services in request order (also without an
    /// endpoint); with `all`, then every other registered service once, by namespace, then name.
    #[tokio::test]
    async fn watched_lists_the_requested_then_all_others_in_a_stable_order() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(&storage(dir.path()));
        let in_ns = |ns: &str, svc: &str| {
            SpiffeId::parse(&format!("spiffe://ward.local/ns/{ns}/svc/{svc}")).unwrap()
        };
        let mut held = Vec::new();
        for (n, (ns, svc)) in [
            ("prod", "alpha"),
            ("default", "zeta"),
            ("default", "web"),
            ("default", "inventory"),
            ("default", "inventory"),
        ]
        .into_iter()
        .enumerate()
        {
            let port = 21000 + n as u16;
            let addr = SocketAddr::from(([10, 0, 0, 5], port));
            let (reg, _) = c
                .register(format!("i{n}"), in_ns(ns, svc), addr, Protocol::Tcp, 0)
                .await
                .unwrap();
            held.push(reg);
        }
        let requested: Vec<ServiceRef> = ["web", "order"]
            .iter()
            .map(|s| ServiceRef::parse(s).unwrap())
            .collect();
        let listed = |all: bool| -> Vec<(String, usize)> {
            c.snapshot()
                .watched(&requested, all)
                .into_iter()
                .map(|e| {
                    let s = e.service.unwrap();
                    (format!("{}/{}", s.namespace, s.name), e.endpoints.len())
                })
                .collect()
        };
        let named = [
            ("default/web".to_owned(), 1),
            ("default/order".to_owned(), 0),
        ];
        assert_eq!(listed(false), named);
        let mut everything = named.to_vec();
        everything.extend([
            ("default/inventory".to_owned(), 2),
            ("default/zeta".to_owned(), 1),
            ("prod/alpha".to_owned(), 1),
        ]);
        assert_eq!(listed(true), everything);
    }

    #[tokio::test]
    async fn after_restart_nothing_is_reaped_before_deregister_after() {
        let dir = tempfile::tempdir().unwrap();
        let st = storage(dir.path());
        let c = Arc::new(Catalog::new(
            st.clone(),
            &[],
            &cfg(Duration::from_secs(30)),
            Instant::now(),
        ));
        let (reg, _) = c
            .register(
                "a".into(),
                id("inventory"),
                "10.0.0.5:21000".parse().unwrap(),
                Protocol::Tcp,
                0,
            )
            .await
            .unwrap();
        std::mem::forget(reg);
        let records = st.load().unwrap().instances;
        assert_eq!(records.len(), 1);
        let start = Instant::now();
        let c2 = Catalog::new(st, &records, &cfg(Duration::from_secs(30)), start);
        assert_eq!(c2.reap(start + Duration::from_secs(29)).await.unwrap(), 0);
        assert_eq!(c2.reap(start + Duration::from_secs(30)).await.unwrap(), 1);
    }
}
