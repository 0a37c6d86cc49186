//! Assembles the proxy: loads credentials and intentions, binds every listener (so a port
//! conflict fails at start, before anything is served), then runs until drained.

use crate::admin::Admin;
use crate::inbound::Inbound;
use crate::inputs::ProxyInputs;
use crate::intentions::{IntentionSnapshot, IntentionStore};
use crate::outbound::Upstream;
use crate::tls::CredentialStore;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use ward_config::proxy::{CredentialSource, Protocol, ProxyConfig};

/// Why the proxy could not start; each names the config key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("{0}")]
    Files(#[from] crate::files::FileError),
    #[error("[transparent]: the proxy runs as root, which `ward redirect` never exempts (--proxy-uid 0 is refused), so its own connections would be redirected back to it; run it as the uid given to --proxy-uid")]
    TransparentAsRoot,
    #[error("key `{key}`: cannot listen on {addr}: {source}")]
    Bind {
        key: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running proxy: its bound addresses and the drain trigger.
pub struct ProxyHandle {
    pub admin_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    /// `[inbound] protocol`, when there is an inbound.
    pub inbound_protocol: Option<Protocol>,
    pub upstream_addrs: Vec<(String, SocketAddr)>,
    /// `[transparent]`: the owners of mesh addresses and the bound transparent inbound.
    pub transparent: Option<TransparentHandles>,
    inputs: Arc<ProxyInputs>,
    upstreams: Vec<Arc<Upstream>>,
}

/// What a control-plane client feeds: the stores the data plane reads, and the upstreams whose
/// endpoints come from the catalog.
pub struct MeshHandles {
    pub credentials: Arc<CredentialStore>,
    pub intentions: Arc<IntentionStore>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub inbound_addr: Option<SocketAddr>,
    /// What the inbound carries: the client registers it, and takes L7 permissions only for
    /// `http`, the inbound that decides each request.
    pub inbound_protocol: Option<Protocol>,
    /// With `[transparent]`: the client watches every service's endpoints into `index`, and
    /// registers the transparent inbound's port (as the address too when there is no inbound).
    pub transparent: Option<TransparentHandles>,
}

/// What a control-plane client feeds and registers for `[transparent]`.
#[derive(Clone)]
pub struct TransparentHandles {
    pub index: Arc<crate::transparent::index::MeshIndex>,
    /// The transparent inbound's bound address, if it has one.
    pub inbound_addr: Option<SocketAddr>,
}

async fn bind(key: String, addr: SocketAddr) -> Result<TcpListener, BuildError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BuildError::Bind { key, addr, source })
}

/// Every address the proxy listens on, with its config key: the admin listener, the inbound
/// (if any), the upstreams in order, then the transparent inbound and outbound (if any).
fn listen_keys(config: &ProxyConfig) -> Vec<(String, SocketAddr)> {
    let mut keys = vec![("admin.listen".to_owned(), config.admin.listen)];
    if let Some(i) = &config.inbound {
        keys.push(("inbound.listen".to_owned(), i.listen));
    }
    for (n, u) in config.upstreams.iter().enumerate() {
        keys.push((format!("upstreams[{n}].listen"), u.listen));
    }
    if let Some(t) = &config.transparent {
        if let Some(addr) = t.inbound_listen {
            keys.push(("transparent.inbound_listen".to_owned(), addr));
        }
        if let Some(addr) = t.outbound_listen {
            keys.push(("transparent.outbound_listen".to_owned(), addr));
        }
    }
    keys
}

/// Whether this process runs as root: the effective uid, the second field of the `Uid:` line
/// of `/proc/self/status` (the owner of `/proc/self` would say root for a process that is not
/// dumpable, such as one with file capabilities).
fn runs_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    effective_uid(&status) == Some(0)
}

fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The listener at `addr` and, for an IPv4 wildcard or loopback address, its IPv6 twin where
/// the host has IPv6: the redirect sends IPv6 connections to `[::]` or `[::1]` at that port.
fn with_ipv6_twin(key: &str, listener: TcpListener) -> Result<Vec<TcpListener>, BuildError> {
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let mut all = vec![listener];
    if let Some(twin) = crate::transparent::socket::ipv6_twin(addr) {
        match crate::transparent::socket::bind_ipv6_only(twin) {
            Ok(l) => all.push(l),
            Err(e) if crate::transparent::socket::no_ipv6(&e) => {
                tracing::info!(key, "no IPv6 on this host: listening on IPv4 only");
            }
            Err(source) => {
                return Err(BuildError::Bind {
                    key: key.to_owned(),
                    addr: twin,
                    source,
                })
            }
        }
    }
    Ok(all)
}

/// Refuses transparent mode to a proxy running as root, as [`build`] does: `ward redirect`
/// never exempts uid 0, so the proxy's own connections would come back to it.
pub fn check_user(config: &ProxyConfig) -> Result<(), BuildError> {
    if config.transparent.is_some() && runs_as_root() {
        return Err(BuildError::TransparentAsRoot);
    }
    Ok(())
}

/// Binds every listener of `config` at once, as [`build`] would, and releases them: a port
/// already in use (or used twice in the config) is the same error start would give.
pub fn check_listeners(config: &ProxyConfig) -> Result<(), BuildError> {
    let mut held = Vec::new();
    for (key, addr) in listen_keys(config) {
        held.push(
            std::net::TcpListener::bind(addr).map_err(|source| BuildError::Bind {
                key,
                addr,
                source,
            })?,
        );
    }
    Ok(())
}

/// Builds and starts the proxy. Must run inside a tokio runtime.
pub async fn build(
    config: ProxyConfig,
    prometheus: Option<PrometheusHandle>,
) -> Result<ProxyHandle, BuildError> {
    crate::metrics::describe();
    check_user(&config)?;
    let credentials = Arc::new(CredentialStore::default());
    let intentions = Arc::new(IntentionStore::default());

    // With [tls] files, everything is loaded before binding; with [control_plane] the stores
    // start empty (every handshake refused, /ready 503) until the client fills them.
    let files = match &config.credentials {
        CredentialSource::Files {
            tls,
            intentions: rules,
        } => {
            credentials.store(crate::files::load(tls, &config.service)?);
            intentions.publish(IntentionSnapshot::new(
                1,
                rules.default,
                rules.rules.clone(),
                &config.service.namespace,
            ));
            Some(tls.clone())
        }
        CredentialSource::ControlPlane(_) => None,
    };

    // Bind everything before serving anything.
    let mut listeners = Vec::new();
    for (key, addr) in listen_keys(&config) {
        listeners.push(bind(key, addr).await?);
    }
    // The proxy's own ports (IPv6 twins share them): never a transparent destination.
    let own_ports: Vec<u16> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect();
    let mut listeners = listeners.into_iter();
    let admin_listener = listeners.next().expect("the admin listener is first");
    let inbound_listener = config.inbound.as_ref().and_then(|_| listeners.next());
    let upstream_listeners: Vec<TcpListener> =
        listeners.by_ref().take(config.upstreams.len()).collect();
    let transparent = config.transparent.as_ref();
    let mut transparent_inbound = Vec::new();
    if transparent.is_some_and(|t| t.inbound_listen.is_some()) {
        let l = listeners.next().expect("bound in listen_keys order");
        transparent_inbound = with_ipv6_twin("transparent.inbound_listen", l)?;
    }
    let mut transparent_outbound = Vec::new();
    if transparent.is_some_and(|t| t.outbound_listen.is_some()) {
        let l = listeners.next().expect("bound in listen_keys order");
        transparent_outbound = with_ipv6_twin("transparent.outbound_listen", l)?;
    }

    let inputs = Arc::new(ProxyInputs::new(
        config.service.clone(),
        credentials.clone(),
        intentions.clone(),
        config.limits.clone(),
    ));
    let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let mut roles = vec![("admin".to_owned(), local(&admin_listener))];

    if let Some(handle) = &prometheus {
        tokio::spawn(crate::metrics::upkeep(handle.clone()));
    }
    let admin = Arc::new(Admin {
        inputs: inputs.clone(),
        prometheus,
        local_only: config.admin.listen.ip().is_loopback(),
    });
    tokio::spawn(admin.run(admin_listener));

    let mut inbound_addr = None;
    let serves_inbound = inbound_listener.is_some() || !transparent_inbound.is_empty();
    let tickets = serves_inbound
        .then(crate::tls::tickets::EpochTicketer::new)
        .flatten()
        .map(Arc::new);
    if let Some(t) = &tickets {
        // New ticket keys before any new intentions, roots or own certificate are visible.
        intentions.rotate_on_change(t.clone());
        credentials.rotate_on_change(t.clone());
    }
    let new_inbound = |local_app| {
        let log = crate::connlog::ConnectionLog::new(config.admin.connection_log);
        Inbound::new(inputs.clone(), local_app, tickets.clone(), log)
    };
    if let (Some(cfg), Some(listener)) = (&config.inbound, inbound_listener) {
        inbound_addr = Some(local(&listener));
        roles.push(("inbound".to_owned(), local(&listener)));
        let inbound = new_inbound(cfg.local_app);
        let inbound = Arc::new(match cfg.protocol {
            ward_config::proxy::Protocol::Http => inbound.serving_http(),
            ward_config::proxy::Protocol::Tcp => inbound,
        });
        tokio::spawn(inbound.run(listener));
    }
    let transparent_inbound_addr = transparent_inbound.first().map(local);
    if !transparent_inbound.is_empty() {
        // local_app is not used: each connection goes to its own original destination.
        let unused = SocketAddr::from(([127, 0, 0, 1], 0));
        // Never a destination: the proxy's own ports, and those the redirect leaves out.
        let mut never: Vec<_> = own_ports.iter().map(|&p| p..=p).collect();
        never.extend(
            transparent
                .map_or(&[][..], |t| &t.exclude_inbound_ports)
                .iter()
                .cloned(),
        );
        let inbound = Arc::new(new_inbound(unused).transparent(never));
        for listener in transparent_inbound {
            roles.push(("transparent.inbound".to_owned(), local(&listener)));
            tokio::spawn(inbound.clone().run(listener));
        }
    }
    if serves_inbound {
        tokio::spawn(crate::connections::watch_intentions(
            inputs.connections.clone(),
            intentions.clone(),
            config.service.name.clone(),
            inputs.drain.force_close.clone(),
        ));
    }
    let index = Arc::new(crate::transparent::index::MeshIndex::default());
    if let Some(t) = transparent.filter(|_| !transparent_outbound.is_empty()) {
        let _ = inputs.mesh_index.set(index.clone());
        let outbound = Arc::new(crate::transparent::outbound::TransparentOutbound::new(
            inputs.clone(),
            index.clone(),
            t.outbound_policy,
        ));
        for listener in transparent_outbound {
            roles.push(("transparent.outbound".to_owned(), local(&listener)));
            tokio::spawn(outbound.clone().run(listener));
        }
    }

    let mut upstream_addrs = Vec::new();
    let mut upstreams = Vec::new();
    for (u, listener) in config.upstreams.iter().zip(upstream_listeners) {
        let namespace = u
            .namespace
            .clone()
            .unwrap_or_else(|| config.service.namespace.clone());
        let upstream = Upstream::new(
            inputs.clone(),
            u.service.clone(),
            namespace,
            u.endpoints.clone(),
        );
        let upstream = Arc::new(match u.protocol {
            ward_config::proxy::Protocol::Http => upstream.serving_http(),
            ward_config::proxy::Protocol::Tcp => upstream,
        });
        let addr = local(&listener);
        upstream_addrs.push((u.service.to_string(), addr));
        roles.push((format!("upstream.{}", u.service), addr));
        upstreams.push(upstream.clone());
        tokio::spawn(upstream.run(listener));
    }

    if let Some(files) = files {
        tokio::spawn(crate::files::watch(
            files,
            config.service.clone(),
            credentials,
            inputs.drain.force_close.clone(),
        ));
    }

    for (role, addr) in &roles {
        tracing::info!("listening role={role} addr={addr}");
    }
    if let Ok(mut l) = inputs.listeners.lock() {
        *l = roles;
    }
    Ok(ProxyHandle {
        admin_addr: local_admin(&inputs),
        inbound_addr,
        inbound_protocol: config.inbound.as_ref().map(|i| i.protocol),
        transparent: transparent.map(|_| TransparentHandles {
            index,
            inbound_addr: transparent_inbound_addr,
        }),
        upstream_addrs,
        inputs,
        upstreams,
    })
}

fn local_admin(inputs: &ProxyInputs) -> SocketAddr {
    inputs
        .listeners
        .lock()
        .ok()
        .and_then(|l| l.first().map(|(_, a)| *a))
        .expect("admin is bound first")
}

impl ProxyHandle {
    /// Whether the proxy is ready (certificate and intentions loaded, no drain), to ask later.
    pub fn readiness(&self) -> impl Fn() -> bool + Send + 'static {
        let inputs = self.inputs.clone();
        move || inputs.is_ready()
    }

    /// The stores and upstreams a control-plane client updates.
    pub fn mesh(&self) -> MeshHandles {
        MeshHandles {
            credentials: self.inputs.credentials.clone(),
            intentions: self.inputs.intentions.clone(),
            upstreams: self.upstreams.clone(),
            inbound_addr: self.inbound_addr,
            inbound_protocol: self.inbound_protocol,
            transparent: self.transparent.clone(),
        }
    }

    /// Fires when the proxy stops (drain deadline or end of drain): background clients stop.
    pub fn stopped(&self) -> tokio_util::sync::CancellationToken {
        self.inputs.drain.force_close.clone()
    }

    /// Starts the drain (as SIGTERM or `POST /drain` do).
    pub fn drain(&self) {
        self.inputs.drain.begin_drain();
    }

    /// Resolves once a drain has started (signal or `POST /drain`).
    pub async fn drain_started(&self) {
        self.inputs.drain.started.cancelled().await
    }

    /// Waits for the drain to start and the listeners to close (`drain_delay` later), then for
    /// open connections to end, closing what is left at `drain_timeout`.
    pub async fn wait(&self) {
        self.inputs.drain.stop_accepting.cancelled().await;
        let tracker = &self.inputs.drain.tracker;
        tracker.close();
        let deadline = self.inputs.limits.drain_timeout;
        if tokio::time::timeout(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = tracker.len(),
                "drain_timeout reached; closing the remaining connections"
            );
            self.inputs.drain.force_close.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), tracker.wait()).await;
        }
        self.inputs.drain.force_close.cancel();
        tracing::info!("drained");
    }
}

#[cfg(test)]
mod tests {
    use super::effective_uid;

    #[test]
    fn the_effective_uid_is_the_second_field_of_the_uid_line() {
        let status = "Name:\tward\nUmask:\t0022\nUid:\t1337\t0\t1337\t1337\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t1337\t1337\t1337\t1337\n"), Some(1337));
        assert_eq!(effective_uid("Name:\tward\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(effective_uid(&own).is_some(), "{own}");
    }
}
