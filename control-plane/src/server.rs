//! `build(config)`: loads or creates the state, binds the gRPC TLS listener and the admin HTTP
//! listener, starts the background tasks, and returns a [`ServerHandle`] with the bound
//! addresses and a shutdown trigger.

use crate::admin_http::{self, ServerAdmin};
use crate::admin_token::{self, AdminToken};
use crate::ca::{Ca, CaMaterial};
use crate::catalog::Catalog;
use crate::grpc::{
    stopped, AdminService, IdentityService, MeshService, OversizeIsExhausted, RateLimiter, Shared,
    StreamSlots,
};
use crate::intentions::{self, Intentions};
use crate::metrics::Metrics;
use crate::peer::{mesh_peer, tls_config, MeshConn, PeerInfo, ServerCert};
use crate::storage::{self, Initial, RedbStorage, Storage, StorageError, STATE_FILE};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use ward_config::server::{AdvertiseName, ConnectionLimits, ServerConfig, StorageConfig};
use ward_proto::v1;
use ward_proxy::handshakes::HandshakeSlots;

/// The roots bundle written on every start, for `WARD_CACERT` and `control_plane.ca_file`.
pub const CA_FILE: &str = "ca.pem";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// State could not be read or written (names the file).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The CA could not be created, imported or loaded.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// ward's files are in data_dir, but no state: refusing to create a new CA over them.
    #[error("{}: found {} but no {STATE_FILE}; a first start did not finish or the state was removed. Refusing to create a new CA; remove {} to start over", dir.display(), found, found)]
    StateMissing { dir: PathBuf, found: String },
    /// data_dir holds other files and no ward state.
    #[error("{}: holds {found:?} and no {STATE_FILE}; a new CA is created only in an empty data_dir", dir.display())]
    NotEmpty { dir: PathBuf, found: String },
    /// Stored intentions this build cannot read.
    #[error("{}: {reason}", path.display())]
    Intentions {
        path: PathBuf,
        reason: intentions::LoadError,
    },
    /// A listener could not be bound.
    #[error("cannot listen on `{key}` {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The gRPC server stopped with an error.
    #[error("the gRPC server failed: {0}")]
    Serve(String),
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    /// The bound gRPC (TLS) address.
    pub grpc_addr: SocketAddr,
    /// The bound admin HTTP address (`/metrics`, `/ready`, `/live`, `/config`, `POST /drain`).
    pub admin_addr: SocketAddr,
    /// `<data_dir>/ca.pem`: the roots that verify the server's certificate.
    pub ca_file: PathBuf,
    pub data_dir: PathBuf,
    pub trust_domain: ward_config::TrustDomain,
    /// The path the admin token was written to, on the first start outside `--dev`.
    pub admin_token_file: Option<PathBuf>,
    admin_token: Option<String>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), ServerError>>>,
    storage: Weak<dyn Storage>,
}

impl ServerHandle {
    /// `https://<addr>` for `WARD_ADDR` (an unspecified listen IP becomes loopback).
    pub fn address(&self) -> String {
        let ip = match self.grpc_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, self.grpc_addr.port()))
    }

    /// The admin token, in `--dev` mode only (outside it, see `admin_token_file`).
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The three lines `ward server --dev` prints for a shell to `eval`; `None` outside dev.
    pub fn export_lines(&self) -> Option<String> {
        let token = self.admin_token.as_deref()?;
        Some(format!(
            "export WARD_ADDR={}\nexport WARD_TOKEN={token}\nexport WARD_CACERT={}\n",
            self.address(),
            self.ca_file.display()
        ))
    }

    /// Starts a graceful stop: listeners close, streams end, `/ready` answers 503.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves once a graceful stop has been asked for ([`ServerHandle::shutdown`] or the admin
    /// API's `POST /drain`).
    pub fn stop_requested(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            stopped(&mut rx).await;
        }
    }

    /// Waits until the server has stopped (after [`ServerHandle::shutdown`] or a failure) and
    /// its state file is closed.
    pub async fn wait(mut self) -> Result<(), ServerError> {
        let mut first_err = None;
        for t in self.tasks.drain(..) {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(ServerError::Serve(e.to_string()));
                }
            }
        }
        // Stream tasks end on the shutdown signal; wait for the last one to drop the state
        // file, so a new server can open it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.storage.upgrade().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        first_err.map_or(Ok(()), Err)
    }

    /// `shutdown()` then `wait()`.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown();
        self.wait().await
    }
}

/// Files of a previous start that must not exist without `state.redb`.
const WARD_FILES: &[&str] = &[admin_token::ADMIN_TOKEN_FILE, CA_FILE];

struct Loaded {
    storage: Arc<RedbStorage>,
    state: storage::State,
    ca: Ca,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
}

fn load_or_create(cfg: &ServerConfig) -> Result<Loaded, ServerError> {
    let dir = &cfg.data_dir;
    storage::prepare_data_dir(dir)?;
    let imported = match &cfg.ca.import {
        Some(i) => Some(CaMaterial::import(
            &i.intermediate_cert_file,
            &i.intermediate_key_file,
            &i.root_cert_file,
        )?),
        None => None,
    };
    let state_path = dir.join(STATE_FILE);
    let mut admin_token = None;
    let mut admin_token_file = None;
    let storage = match RedbStorage::open(dir)? {
        Some(s) => {
            if let Some(m) = &imported {
                let stored = s.load()?.ca;
                if stored.intermediate_cert_pem != m.intermediate_cert_pem
                    || stored.roots_pem != m.roots_pem
                {
                    s.put_ca(m)?;
                }
            }
            if cfg.dev {
                let secret = admin_token::new_secret();
                s.set_admin_token_sha256(&secret.sha256)?;
                admin_token = Some(secret.value);
            }
            s
        }
        None => {
            for f in WARD_FILES {
                if dir.join(f).exists() {
                    return Err(ServerError::StateMissing {
                        dir: dir.clone(),
                        found: (*f).to_owned(),
                    });
                }
            }
            // Security rule 11 (server state, docs/security.md): a CA is created only in an empty
            // data_dir (a wrong path must not get a fresh CA beside someone else's files).
            if let Some(other) = foreign_entry(dir) {
                return Err(ServerError::NotEmpty {
                    dir: dir.clone(),
                    found: other,
                });
            }
            let material = match imported {
                Some(m) => m,
                None => CaMaterial::generate(
                    &cfg.trust_domain,
                    cfg.ca.root_ttl,
                    cfg.ca.intermediate_ttl,
                )?,
            };
            let secret = admin_token::new_secret();
            if cfg.dev {
                admin_token = Some(secret.value.clone());
            } else {
                // Written before the state: a crash in between leaves admin.token without
                // state.redb, which the next start refuses (above) rather than guessing.
                admin_token_file = Some(admin_token::write_token_file(dir, &secret)?);
            }
            let s = RedbStorage::create(
                dir,
                &Initial {
                    ca: &material,
                    admin_token_sha256: &secret.sha256,
                },
            )?;
            tracing::info!(data_dir = %dir.display(), "created a new CA and server state");
            s
        }
    };
    let state = storage.load()?;
    let ca = Ca::load(
        &state.ca,
        cfg.trust_domain.clone(),
        cfg.ca.leaf_ttl,
        &state_path.display().to_string(),
    )?;
    Ok(Loaded {
        storage: Arc::new(storage),
        state,
        ca,
        admin_token,
        admin_token_file,
    })
}

fn server_names(cfg: &ServerConfig, bound: SocketAddr) -> (Vec<IpAddr>, Vec<String>) {
    let mut ips = Vec::new();
    let mut dns = Vec::new();
    let ip = bound.ip();
    if ip.is_unspecified() {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        dns.push("localhost".to_owned());
    } else {
        ips.push(ip);
        if ip.is_loopback() {
            dns.push("localhost".to_owned());
        }
    }
    for a in &cfg.advertise {
        match a {
            AdvertiseName::Ip(ip) if !ips.contains(ip) => ips.push(*ip),
            AdvertiseName::Dns(d) if !dns.contains(d) => dns.push(d.clone()),
            _ => {}
        }
    }
    (ips, dns)
}

/// Starts the server: everything is bound and listening when this returns.
pub async fn build(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    let StorageConfig::Embedded = cfg.storage;
    let started = Instant::now();
    let c = cfg.clone();
    let loaded = tokio::task::spawn_blocking(move || load_or_create(&c))
        .await
        .map_err(|e| ServerError::Serve(e.to_string()))??;
    let Loaded {
        storage,
        state,
        ca,
        admin_token,
        admin_token_file,
    } = loaded;
    let ca = Arc::new(ca);
    let now = crate::now_unix();
    let st = storage.clone();
    tokio::task::spawn_blocking(move || st.purge_expired(now))
        .await
        .map_err(|e| ServerError::Serve(e.to_string()))??;
    let ca_file = cfg.data_dir.join(CA_FILE);
    storage::write_public_file(&ca_file, ca.roots_pem().as_bytes())?;

    let grpc_listener =
        TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                key: "server.listen",
                addr: cfg.listen,
                source,
            })?;
    let admin_listener = TcpListener::bind(cfg.admin.listen)
        .await
        .map_err(|source| ServerError::Bind {
            key: "admin.listen",
            addr: cfg.admin.listen,
            source,
        })?;
    let bind_err = |key, addr, source| ServerError::Bind { key, addr, source };
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|e| bind_err("server.listen", cfg.listen, e))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| bind_err("admin.listen", cfg.admin.listen, e))?;

    let (ips, dns) = server_names(&cfg, grpc_addr);
    let cert_ttl = cfg
        .ca
        .leaf_ttl
        .clamp(Duration::from_secs(3600), Duration::from_secs(30 * 86400));
    let server_cert = Arc::new(
        ServerCert::new(&ca, ips, dns, cert_ttl).map_err(|e| ServerError::Tls(e.to_string()))?,
    );
    let tls = tls_config(&ca, server_cert.clone()).map_err(|e| ServerError::Tls(e.to_string()))?;

    // Every start publishes a new intentions version, with the configured default stored
    // beside the rules: a proxy that reconnects takes the policy of this run even when only the
    // default changed, or the state was restored from an older copy (intentions::next_version).
    // The stored rules are read first, so state this build cannot read is never written over.
    let policy_version = intentions::next_version(state.intentions_version);
    let default = cfg.default_intention;
    let dyn_storage: Arc<dyn Storage> = storage.clone();
    let intentions = Arc::new(
        Intentions::new(
            dyn_storage.clone(),
            policy_version,
            &state.intentions,
            default,
        )
        .map_err(|reason| ServerError::Intentions {
            path: storage.path().to_owned(),
            reason,
        })?,
    );
    let st = storage.clone();
    tokio::task::spawn_blocking(move || {
        st.put_intentions_default(default.as_str(), policy_version)
    })
    .await
    .map_err(|e| ServerError::Serve(e.to_string()))??;
    if let Some(stored) = state.intentions_default.as_deref() {
        if stored != default.as_str() {
            tracing::info!(
                from = stored,
                to = default.as_str(),
                "[intentions] default changed; proxies receive the new policy"
            );
        }
    }
    let catalog = Arc::new(Catalog::new(
        dyn_storage.clone(),
        &state.instances,
        &cfg.catalog,
        started,
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared {
        ca: ca.clone(),
        storage: dyn_storage.clone(),
        intentions: intentions.clone(),
        catalog: catalog.clone(),
        trust_registered_address: cfg.catalog.trust_registered_address,
        admin: AdminToken::from_sha256(state.admin_token_sha256.clone()),
        tokens: cfg.tokens.clone(),
        limiter: RateLimiter::new(&cfg.limits),
        streams: StreamSlots::default(),
        metrics: metrics.clone(),
        shutdown: shutdown_rx.clone(),
        roots_version: 1,
    });
    let weak_storage = Arc::downgrade(&dyn_storage);
    drop(dyn_storage);
    drop(storage);

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(serve_grpc(
        grpc_listener,
        tls,
        ca.clone(),
        shared.clone(),
        cfg.connections.clone(),
        cfg.limits.max_message_size,
        shutdown_rx.clone(),
    )));
    let admin = Arc::new(ServerAdmin {
        metrics,
        intentions: Arc::downgrade(&intentions),
        catalog: Arc::downgrade(&catalog),
        ca: ca.clone(),
        shutdown: shutdown_tx.clone(),
        fixed: admin_http::fixed_config(&cfg, grpc_addr),
    });
    drop(intentions);
    let mut admin_stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        ward_proxy::admin::serve(
            admin_listener,
            admin,
            cfg.admin.listen.ip().is_loopback(),
            async move {
                stopped(&mut admin_stop).await;
            },
        )
        .await;
        Ok(())
    }));
    tasks.push(tokio::spawn(housekeeping(
        catalog,
        server_cert,
        ca,
        shared.storage.clone(),
        shutdown_rx,
    )));
    drop(shared);

    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "ward server listening");
    Ok(ServerHandle {
        grpc_addr,
        admin_addr,
        ca_file,
        data_dir: cfg.data_dir.clone(),
        trust_domain: cfg.trust_domain.clone(),
        admin_token_file,
        admin_token,
        shutdown: shutdown_tx,
        tasks,
        storage: weak_storage,
    })
}

#[allow(clippy::too_many_arguments)]
async fn serve_grpc(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ca: Arc<Ca>,
    shared: Arc<Shared>,
    limits: ConnectionLimits,
    max_message_size: usize,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (conn_tx, conn_rx) = mpsc::channel::<Result<MeshConn, std::io::Error>>(64);
    // Security rule 15 (bounds, docs/security.md): a connection cap, and handshake caps per source
    // IP as well as in all, so silent connections from one address cannot lock out enrollment,
    // renewal and the CLI.
    let conn_slots = Arc::new(tokio::sync::Semaphore::new(
        limits
            .max_connections
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let handshakes = HandshakeSlots::new(
        limits.max_pending_handshakes,
        limits.max_pending_handshakes_per_ip,
    );
    let hs_timeout = limits.handshake_timeout;
    let mut accept_shutdown = shutdown.clone();
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                () = stopped(&mut accept_shutdown) => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let deadline = tokio::time::Instant::now() + hs_timeout;
            let Ok(slot) = conn_slots.clone().try_acquire_owned() else {
                tracing::debug!(%remote, "max_connections reached; connection closed");
                continue;
            };
            let Some(pending) = handshakes.begin(remote.ip()) else {
                tracing::debug!(%remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let acceptor = acceptor.clone();
            let ca = ca.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                // A client that completed TLS but stays silent would hold its slot for good:
                // tonic waits for the HTTP/2 preface with no deadline, and its keepalive starts
                // only after it. The preface must arrive by the same deadline.
                let mut preface = [0u8; crate::peer::H2_PREFACE.len()];
                let read = tokio::time::timeout_at(
                    deadline,
                    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut preface),
                )
                .await;
                if !matches!(read, Ok(Ok(_))) || preface != *crate::peer::H2_PREFACE {
                    tracing::debug!(%remote, "no HTTP/2 preface by the handshake deadline; connection closed");
                    return;
                }
                drop(pending);
                let leaf = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .cloned();
                let mesh = leaf.as_ref().and_then(|l| mesh_peer(l, &ca));
                let info = PeerInfo {
                    remote,
                    non_workload_cert: leaf.is_some() && mesh.is_none(),
                    mesh,
                };
                let conn = MeshConn {
                    inner: tls,
                    info,
                    _slot: slot,
                    preface_given: 0,
                };
                let _ = conn_tx.send(Ok(conn)).await;
            });
        }
    });

    let max = max_message_size;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .layer(tower::layer::layer_fn(OversizeIsExhausted))
        .add_service(
            v1::identity_server::IdentityServer::new(IdentityService(shared.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            v1::mesh_server::MeshServer::new(MeshService(shared.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            v1::admin_server::AdminServer::new(AdminService(shared.clone()))
                .max_decoding_message_size(max),
        );
    drop(shared);
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let result = router
        .serve_with_incoming_shutdown(incoming, async move {
            stopped(&mut shutdown).await;
        })
        .await;
    accept.abort();
    result.map_err(|e| ServerError::Serve(e.to_string()))
}

async fn housekeeping(
    catalog: Arc<Catalog>,
    server_cert: Arc<ServerCert>,
    ca: Arc<Ca>,
    storage: Arc<dyn Storage>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => return Ok(()),
            _ = tick.tick() => {}
        }
        n += 1;
        if let Err(e) = catalog.reap(Instant::now()).await {
            tracing::warn!(error = %e, "catalog cleanup failed");
        }
        // At start and hourly: the operator hears of a CA that ends soon (ca_expiry.rs).
        if n == 1 || n.is_multiple_of(3600) {
            let now = time::OffsetDateTime::now_utc();
            for warning in crate::ca_expiry::CaExpiry::of(&ca).warnings(now) {
                tracing::warn!("{warning}");
            }
        }
        if n.is_multiple_of(30) {
            if let Err(e) = server_cert.refresh_if_due(&ca) {
                tracing::error!(error = %e, "cannot renew the server certificate");
            }
        }
        if n.is_multiple_of(600) {
            let st = storage.clone();
            let now = crate::now_unix();
            if let Err(e) = crate::intentions::blocking(move || st.purge_expired(now)).await {
                tracing::warn!(error = %e, "purging expired tokens failed");
            }
        }
    }
}

/// The first entry of `dir` that is not one of ward's own temporary files.
fn foreign_entry(dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| !name.ends_with(".tmp"))
}

/// The data_dir's state file, for messages.
pub fn state_file(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE_FILE)
}
