//! The `Mesh` streams. Each runs its own reconnect loop; every message is a full snapshot, so a
//! reconnect needs no replay, and while the server is unreachable the last snapshot stays in
//! force.

use crate::backoff::Backoff;
use crate::channel::ServerTarget;
use crate::identity::Identity;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use ward_config::proxy::{Protocol, ServiceConfig};
use ward_proto::v1;
use ward_proxy::outbound::Upstream;
use ward_proxy::MeshHandles;

pub struct Watches {
    pub server: Arc<ServerTarget>,
    pub identity: Arc<Identity>,
    pub mesh: MeshHandles,
    pub service: ServiceConfig,
    pub stop: CancellationToken,
}

impl Watches {
    pub async fn run(&self) {
        // Upstreams written with static endpoints keep them; the others follow the catalog.
        let dynamic: Vec<Arc<Upstream>> = self
            .mesh
            .upstreams
            .iter()
            .filter(|u| u.endpoints.load().is_empty())
            .cloned()
            .collect();
        // A transparent outbound needs every service's addresses, upstreams or not.
        let watch_endpoints = !dynamic.is_empty() || self.mesh.transparent.is_some();
        tokio::join!(
            self.reconnecting("intentions", |ch| self.intentions(ch)),
            self.reconnecting("roots", |ch| self.roots(ch)),
            async {
                if watch_endpoints {
                    self.reconnecting("endpoints", |ch| self.endpoints(ch, &dynamic))
                        .await
                }
            },
            async {
                if let Some(registration) = registration(&self.mesh) {
                    self.reconnecting("register", |ch| self.register(ch, registration))
                        .await
                }
            },
        );
    }

    /// Opens a channel with the current mesh certificate and runs `body` on it, again and again
    /// with backoff, until stopped. `body` returns whether it received anything (which resets
    /// the backoff) and why it ended.
    async fn reconnecting<'a, F, Fut>(&'a self, what: &'static str, body: F)
    where
        F: Fn(Channel) -> Fut + 'a,
        Fut: Future<Output = (bool, String)> + 'a,
    {
        let mut backoff = Backoff::control_plane();
        loop {
            let ended = async {
                match self
                    .server
                    .connect(Some(self.mesh.credentials.clone()))
                    .await
                {
                    Ok(ch) => body(ch).await,
                    Err(e) => (false, format!("cannot connect: {e}")),
                }
            };
            let (progressed, why) = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = ended => r,
            };
            if what == "intentions" {
                metrics::gauge!(ward_proxy::metrics::CONTROL_PLANE_CONNECTED).set(0.0);
            }
            if progressed {
                backoff.reset();
            }
            tracing::warn!(stream = what, "control-plane stream ended: {why}");
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn intentions(&self, ch: Channel) -> (bool, String) {
        let opened = mesh(ch)
            .watch_intentions(v1::WatchIntentionsRequest {})
            .await;
        follow(opened, |snap| {
            metrics::gauge!(ward_proxy::metrics::CONTROL_PLANE_CONNECTED).set(1.0);
            self.apply_intentions(snap);
        })
        .await
    }

    fn apply_intentions(&self, snap: v1::IntentionsSnapshot) {
        // Without an inbound no request is ever decided here: tcp, which takes no permissions.
        let protocol = self.mesh.inbound_protocol.unwrap_or(Protocol::Tcp);
        match crate::convert::intentions_for(
            &snap,
            Some(&self.service.name),
            protocol,
            &self.service.namespace,
        ) {
            Ok(s) => {
                let version = s.version;
                if self.mesh.intentions.publish(s) {
                    tracing::info!(version, "intentions updated");
                }
            }
            Err(e) => {
                metrics::counter!(ward_proxy::metrics::INTENTION_ERRORS).increment(1);
                tracing::warn!(
                    version = snap.version,
                    "refused an intentions snapshot, keeping the previous one: {e}"
                );
            }
        }
    }

    async fn roots(&self, ch: Channel) -> (bool, String) {
        let opened = mesh(ch).watch_roots(v1::WatchRootsRequest {}).await;
        follow(opened, |snap| self.apply_roots(snap)).await
    }

    /// Swaps in new roots with the current certificate and key, when they changed.
    fn apply_roots(&self, snap: v1::RootsSnapshot) {
        let roots: Vec<rustls_pki_types::CertificateDer<'static>> =
            snap.roots.into_iter().map(|r| r.cert.into()).collect();
        if roots.is_empty() {
            tracing::warn!(version = snap.version, "refused an empty roots snapshot");
            return;
        }
        let n = roots.len();
        match self.identity.replace_roots(roots, &self.mesh.credentials) {
            Ok(true) => tracing::info!(roots = n, version = snap.version, "trust roots updated"),
            Ok(false) => {}
            Err(e) => tracing::warn!("refused a roots snapshot, keeping the current roots: {e}"),
        }
    }

    /// One `WatchEndpoints` stream: the dynamic upstreams by name and, in transparent mode,
    /// every other service (`all`) for the address index.
    async fn endpoints(&self, ch: Channel, upstreams: &[Arc<Upstream>]) -> (bool, String) {
        let services = upstreams
            .iter()
            .map(|u| v1::ServiceRef {
                name: u.service.to_string(),
                namespace: u.namespace.to_string(),
            })
            .collect();
        let opened = mesh(ch)
            .watch_endpoints(v1::WatchEndpointsRequest {
                services,
                all: self.mesh.transparent.is_some(),
            })
            .await;
        follow(opened, |snap| self.apply_endpoints(&snap, upstreams)).await
    }

    /// Hands an endpoints snapshot to the upstreams it names and, in transparent mode, to the
    /// address index as a whole.
    fn apply_endpoints(&self, snap: &v1::EndpointsSnapshot, upstreams: &[Arc<Upstream>]) {
        apply_endpoints(snap, upstreams);
        if let Some(t) = &self.mesh.transparent {
            let services = crate::convert::indexed_services(snap);
            tracing::debug!(
                services = services.len(),
                version = snap.version,
                "mesh address index updated"
            );
            t.index.publish(services);
        }
    }

    async fn register(&self, ch: Channel, registration: Registration) -> (bool, String) {
        let Registration {
            address: addr,
            transparent_port,
        } = registration;
        // The server accepts L7 permissions only for a destination registered as http.
        let protocol = match self.mesh.inbound_protocol {
            Some(Protocol::Http) => v1::Protocol::Http,
            Some(Protocol::Tcp) | None => v1::Protocol::Tcp,
        };
        let request = v1::RegisterRequest {
            address: addr.to_string(),
            protocol: protocol as i32,
            transparent_port: transparent_port.map_or(0, u32::from),
        };
        let opened = mesh(ch).register(request).await;
        let mut first = true;
        follow(opened, |r: v1::RegisterResponse| {
            if std::mem::take(&mut first) {
                tracing::info!(address = %r.address, instance = %r.instance_id, "registered in the catalog");
                if registered_elsewhere(addr, &r.address) {
                    tracing::warn!(
                        asked = %addr,
                        registered = %r.address,
                        "the server registered this sidecar at another address than its inbound's: \
                         it takes the IP from the connection it sees; callers will dial the registered \
                         one (behind NAT, set [catalog] trust_registered_address = true on the server)"
                    );
                }
            }
        })
        .await
    }
}

/// What a sidecar registers in the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registration {
    /// The mesh address peers dial: `[inbound] listen`, else the transparent inbound's.
    address: SocketAddr,
    /// The transparent inbound's port, when it runs one.
    transparent_port: Option<u16>,
}

/// What `mesh` registers, if it has an inbound of either kind: a proxy with only
/// `[transparent]` is in the catalog at its transparent inbound.
fn registration(mesh: &MeshHandles) -> Option<Registration> {
    let transparent = mesh.transparent.as_ref().and_then(|t| t.inbound_addr);
    Some(Registration {
        address: mesh.inbound_addr.or(transparent)?,
        transparent_port: transparent.map(|a| a.port()),
    })
}

/// Whether the server stored another IP than the inbound listens on (it takes the IP from the
/// connection unless told to trust the caller's). An unspecified listen IP (`0.0.0.0`, `::`)
/// names no address, so any IP the server saw is expected.
fn registered_elsewhere(asked: SocketAddr, registered: &str) -> bool {
    match registered.parse::<SocketAddr>() {
        Ok(got) => {
            !asked.ip().is_unspecified() && got.ip().to_canonical() != asked.ip().to_canonical()
        }
        Err(_) => true,
    }
}

fn mesh(ch: Channel) -> v1::mesh_client::MeshClient<Channel> {
    v1::mesh_client::MeshClient::new(ch).max_decoding_message_size(ward_proto::MAX_MESSAGE_SIZE)
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Reads an opened server stream to its end, handing each snapshot to `on_message`. Returns
/// whether anything arrived (which resets the reconnect backoff) and why the stream ended.
async fn follow<T>(
    opened: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
    mut on_message: impl FnMut(T),
) -> (bool, String) {
    let mut stream = match opened {
        Ok(s) => s.into_inner(),
        Err(s) => return (false, status_text(&s)),
    };
    let mut got = false;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                got = true;
                on_message(m);
            }
            Ok(None) => return (got, "the server closed the stream".into()),
            Err(s) => return (got, status_text(&s)),
        }
    }
}

/// Replaces the endpoints of each watched upstream named in `snap` (the others an `all` watch
/// lists are for the address index).
fn apply_endpoints(snap: &v1::EndpointsSnapshot, upstreams: &[Arc<Upstream>]) {
    for entry in &snap.services {
        let Some(svc) = &entry.service else { continue };
        let ns = crate::convert::namespace_of(svc);
        let Some(u) = upstreams
            .iter()
            .find(|u| u.service.as_str() == svc.name && u.namespace.as_str() == ns)
        else {
            continue;
        };
        // An instance whose stream is gone stays listed for the server's grace period: it is
        // usually alive and reconnecting (after a renewal or a server restart). Connected ones
        // go first; a dead one only costs a refused connect before the next endpoint is tried.
        let mut listed: Vec<&v1::Endpoint> = entry.endpoints.iter().collect();
        listed.sort_by_key(|e| !e.connected);
        let addrs: Vec<SocketAddr> = listed
            .iter()
            .filter_map(|e| e.address.parse().ok())
            .collect();
        tracing::info!(upstream = %u.service, endpoints = addrs.len(), "endpoints updated");
        u.endpoints.store(Arc::new(addrs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{config, service, token, Ca};
    use ward_config::proxy::Limits;
    use ward_config::Name;
    use ward_proxy::inputs::ProxyInputs;
    use ward_proxy::intentions::IntentionStore;
    use ward_proxy::tls::CredentialStore;
    use ward_proxy::transparent::index::{MeshIndex, Owner};
    use ward_proxy::TransparentHandles;

    fn inputs() -> Arc<ProxyInputs> {
        Arc::new(ProxyInputs::new(
            service("order"),
            Arc::default(),
            Arc::default(),
            Limits::default(),
        ))
    }

    fn upstream(inputs: &Arc<ProxyInputs>, name: &str, ns: &str, at: &[&str]) -> Arc<Upstream> {
        Arc::new(Upstream::new(
            inputs.clone(),
            Name::new(name).unwrap(),
            Name::new(ns).unwrap(),
            at.iter().map(|a| a.parse().unwrap()).collect(),
        ))
    }

    fn service_ref(name: &str, namespace: &str) -> Option<v1::ServiceRef> {
        Some(v1::ServiceRef {
            name: name.into(),
            namespace: namespace.into(),
        })
    }

    fn endpoint(address: &str, connected: bool) -> v1::Endpoint {
        v1::Endpoint {
            address: address.into(),
            connected,
            ..Default::default()
        }
    }

    fn addresses(u: &Upstream) -> Vec<String> {
        u.endpoints.load().iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn endpoints_go_to_the_upstream_they_name_connected_ones_first() {
        let inputs = inputs();
        let inventory = upstream(&inputs, "inventory", "default", &[]);
        let payments = upstream(&inputs, "payments", "prod", &["10.0.0.9:20000"]);
        let snap = v1::EndpointsSnapshot {
            version: 1,
            services: vec![
                v1::ServiceEndpoints {
                    // An empty namespace is `default`.
                    service: service_ref("inventory", ""),
                    endpoints: vec![
                        endpoint("10.0.0.1:20000", false),
                        endpoint("not an address", true),
                        endpoint("10.0.0.2:20000", true),
                    ],
                },
                v1::ServiceEndpoints {
                    // payments of another namespace than the one watched.
                    service: service_ref("payments", "default"),
                    endpoints: vec![endpoint("10.0.0.3:20000", true)],
                },
            ],
        };
        apply_endpoints(&snap, &[inventory.clone(), payments.clone()]);
        assert_eq!(addresses(&inventory), ["10.0.0.2:20000", "10.0.0.1:20000"]);
        assert_eq!(addresses(&payments), ["10.0.0.9:20000"]);
    }

    /// The watches of `order`, with a certificate installed under `root`.
    fn watches(dir: &std::path::Path, root: &Ca) -> Watches {
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, root.pem()).unwrap();
        let server = ServerTarget::parse("https://127.0.0.1:8502", &ca_file, None).unwrap();
        let identity =
            Identity::prepare(&config(Some(&token(dir)), None), &service("order")).unwrap();
        let credentials = Arc::new(CredentialStore::default());
        identity
            .install(root.issue(&identity, "order", false), &credentials)
            .unwrap();
        Watches {
            server: Arc::new(server),
            identity: Arc::new(identity),
            mesh: MeshHandles {
                credentials,
                intentions: Arc::new(IntentionStore::default()),
                upstreams: vec![],
                inbound_addr: None,
                inbound_protocol: None,
                transparent: None,
            },
            service: service("order"),
            stop: CancellationToken::new(),
        }
    }

    #[test]
    fn a_snapshot_for_another_service_or_without_roots_leaves_the_last_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let (root, next) = (Ca::new("root"), Ca::new("next root"));
        let w = watches(dir.path(), &root);
        let intentions = |version, destination: &str| v1::IntentionsSnapshot {
            version,
            destination: service_ref(destination, "default"),
            default_action: v1::Action::Allow as i32,
            intentions: vec![],
        };
        let version = || w.mesh.intentions.load().map(|s| s.version);
        w.apply_intentions(intentions(5, "order"));
        assert_eq!(version(), Some(5));
        w.apply_intentions(intentions(6, "payments"));
        assert_eq!(version(), Some(5), "not ours");

        let roots = |certs: &[&Ca]| v1::RootsSnapshot {
            version: 2,
            roots: certs
                .iter()
                .map(|c| v1::Root {
                    cert: c.der.to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let held = || w.mesh.credentials.load().unwrap().root_ders.len();
        w.apply_roots(roots(&[]));
        assert_eq!(held(), 1, "an empty snapshot is refused");
        w.apply_roots(roots(&[&root, &next]));
        assert_eq!(held(), 2);
    }

    /// In transparent mode one snapshot feeds both: the upstreams it names get their endpoints
    /// as without it, and every listed service, named or not, goes into the address index.
    #[test]
    fn a_transparent_proxy_indexes_every_listed_service_and_still_feeds_its_upstreams() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = watches(dir.path(), &Ca::new("root"));
        let index = Arc::new(MeshIndex::default());
        w.mesh.transparent = Some(TransparentHandles {
            index: index.clone(),
            inbound_addr: Some("0.0.0.0:15006".parse().unwrap()),
        });
        let inventory = upstream(&inputs(), "inventory", "default", &[]);
        let mut web = endpoint("10.0.0.7:15006", true);
        web.transparent_port = 15006;
        let snap = v1::EndpointsSnapshot {
            version: 4,
            services: vec![
                v1::ServiceEndpoints {
                    service: service_ref("inventory", ""),
                    endpoints: vec![endpoint("10.0.0.1:20000", true)],
                },
                v1::ServiceEndpoints {
                    // Nobody named it: listed because the watch asked for `all`.
                    service: service_ref("web", "shop"),
                    endpoints: vec![web],
                },
            ],
        };
        w.apply_endpoints(&snap, std::slice::from_ref(&inventory));
        assert_eq!(addresses(&inventory), ["10.0.0.1:20000"]);
        let owner = |ip: &str| match index.owner(ip.parse().unwrap()) {
            Owner::Service {
                service,
                namespace,
                endpoint,
            } => format!("{namespace}/{service} {:?}", endpoint.transparent_port),
            other => format!("{other:?}"),
        };
        assert_eq!(owner("10.0.0.1"), "default/inventory None");
        assert_eq!(owner("10.0.0.7"), "shop/web Some(15006)");
        assert_eq!(owner("10.0.0.9"), "Unknown");
        // The next snapshot replaces the index as a whole.
        w.apply_endpoints(
            &v1::EndpointsSnapshot {
                version: 5,
                services: vec![],
            },
            &[],
        );
        assert_eq!(owner("10.0.0.7"), "Unknown");
    }

    /// What a proxy registers: its inbound when it has one (with the transparent inbound's port
    /// when it runs one too), else its transparent inbound, else nothing.
    #[test]
    fn the_registration_is_the_inbound_else_the_transparent_inbound() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = watches(dir.path(), &Ca::new("root"));
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        // `transparent`: None without `[transparent]`, Some(None) with no transparent inbound.
        let mut registered = |inbound: Option<&str>, transparent: Option<Option<&str>>| {
            w.mesh.inbound_addr = inbound.map(addr);
            w.mesh.transparent = transparent.map(|t| TransparentHandles {
                index: Arc::default(),
                inbound_addr: t.map(addr),
            });
            registration(&w.mesh).map(|r| (r.address.to_string(), r.transparent_port))
        };
        let inbound = Some("10.0.0.5:21000");
        let transparent = Some(Some("0.0.0.0:15006"));
        assert_eq!(registered(None, None), None);
        assert_eq!(registered(None, Some(None)), None);
        assert_eq!(
            registered(inbound, None),
            Some(("10.0.0.5:21000".into(), None))
        );
        assert_eq!(
            registered(inbound, Some(None)),
            Some(("10.0.0.5:21000".into(), None))
        );
        assert_eq!(
            registered(None, transparent),
            Some(("0.0.0.0:15006".into(), Some(15006)))
        );
        assert_eq!(
            registered(inbound, transparent),
            Some(("10.0.0.5:21000".into(), Some(15006)))
        );
    }

    #[test]
    fn another_ip_than_the_inbounds_is_elsewhere() {
        let asked = "10.0.0.5:21000".parse().unwrap();
        assert!(!registered_elsewhere(asked, "10.0.0.5:21000"));
        assert!(registered_elsewhere(asked, "192.0.2.7:21000"), "NAT");
        assert!(!registered_elsewhere(asked, "[::ffff:10.0.0.5]:21000"));
        assert!(registered_elsewhere(asked, "not an address"));
        // An unspecified listen IP names no address: whatever the server saw is fine.
        let any = "0.0.0.0:21000".parse().unwrap();
        assert!(!registered_elsewhere(any, "10.0.0.5:21000"));
    }
}
