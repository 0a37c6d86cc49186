//! The proxy's identity: a P-256 key generated here (it never leaves the proxy), the first
//! certificate from a join token, renewals authenticated by the current mesh certificate, and
//! the optional `state_dir` that lets a restart renew without a new token (security rule 12,
//! proxy restarts need no new token, docs/security.md).

use crate::backoff::Backoff;
use crate::channel::ServerTarget;
use crate::ClientError;
use base64::Engine;
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use ward_config::proxy::{ControlPlaneConfig, ServiceConfig};
use ward_config::time::now_unix;
use ward_config::{SpiffeId, TrustDomain};
use ward_proto::v1;
use ward_proxy::files::{check_own_identity, WrongIdentity};
use ward_proxy::tls::{CredentialError, CredentialStore, Credentials};

const KEY_FILE: &str = "key.pem";
const CERT_FILE: &str = "cert.pem";
const ROOTS_FILE: &str = "roots.pem";

/// Why a certificate could not be obtained or put in use; the current one stays in use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("credential lock poisoned")]
    Poisoned,
    #[error("{0}")]
    Roots(CredentialError),
    #[error("the server's certificate is unusable: {0}")]
    Unusable(CredentialError),
    #[error(transparent)]
    NotOurs(#[from] WrongIdentity),
    #[error("no token_file is configured")]
    NoTokenFile,
    #[error(transparent)]
    Token(ClientError),
    #[error("cannot connect: {0}")]
    Connect(tonic::transport::Error),
    #[error("the server proved no trust domain")]
    NoTrustDomain,
    #[error("{0}")]
    Csr(#[from] rcgen::Error),
    #[error("the token file holds characters a header cannot carry")]
    TokenNotAHeader,
    #[error("Sign refused: {code:?}: {message}")]
    SignRefused { code: tonic::Code, message: String },
    #[error("renewal refused: {code:?}: {message}")]
    RenewalRefused { code: tonic::Code, message: String },
}

/// What the last successful Sign gave us, kept to rebuild credentials when roots change.
#[derive(Clone)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

pub struct Identity {
    key: KeyPair,
    service: ServiceConfig,
    token_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    /// A still-valid certificate found in `state_dir` at start.
    stored: Mutex<Option<Issued>>,
    current: Mutex<Option<Issued>>,
    /// The roots last received on the roots stream: newer than a Sign response's.
    stream_roots: Mutex<Option<Vec<CertificateDer<'static>>>>,
    /// Held across read -> build -> publish of credentials, so a renewal and a roots update
    /// never interleave (either could otherwise put back what the other replaced).
    swap: Mutex<()>,
    renew_at: Mutex<Instant>,
}

fn state_err(path: &Path, message: impl Into<String>) -> ClientError {
    ClientError::StateDir {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn read_token(path: &Path) -> Result<String, ClientError> {
    let err = |message: String| ClientError::TokenFile {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("is empty".into()));
    }
    Ok(token.to_owned())
}

fn read_key(path: &Path) -> Result<KeyPair, ClientError> {
    let pem =
        std::fs::read_to_string(path).map_err(|e| state_err(path, format!("cannot read: {e}")))?;
    KeyPair::from_pem(&pem).map_err(|_| state_err(path, "holds no usable private key"))
}

impl Identity {
    /// The files [`Identity::prepare`] reads, read and written nothing: a key and valid
    /// certificate kept in `state_dir` need no token, else the token file must be readable.
    pub fn check(cfg: &ControlPlaneConfig, service: &ServiceConfig) -> Result<(), ClientError> {
        if let Some(dir) = &cfg.state_dir {
            let key_path = dir.join(KEY_FILE);
            if key_path.exists() && load_stored(dir, &read_key(&key_path)?, service).is_some() {
                return Ok(());
            }
        }
        let path = cfg.token_file.as_ref().ok_or(ClientError::NoToken)?;
        read_token(path).map(drop)
    }

    pub fn prepare(cfg: &ControlPlaneConfig, service: &ServiceConfig) -> Result<Self, ClientError> {
        let mut key = None;
        let mut stored = None;
        if let Some(dir) = &cfg.state_dir {
            ensure_private_dir(dir)?;
            let key_path = dir.join(KEY_FILE);
            if key_path.exists() {
                // Security rule 12 (proxy restarts, docs/security.md): the key file is 0600;
                // tighten a looser one rather than use it as is.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| state_err(&key_path, format!("cannot set mode 0600: {e}")))?;
                key = Some(read_key(&key_path)?);
                stored = load_stored(dir, key.as_ref().expect("just set"), service);
            }
        }
        let key = match key {
            Some(k) => k,
            None => {
                let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| {
                    state_err(Path::new("."), format!("cannot generate a key: {e}"))
                })?;
                if let Some(dir) = &cfg.state_dir {
                    let path = dir.join(KEY_FILE);
                    write_atomic(&path, k.serialize_pem().as_bytes(), 0o600)
                        .map_err(|e| state_err(&path, format!("cannot write: {e}")))?;
                }
                k
            }
        };
        if stored.is_none() {
            // Without a valid stored certificate the token is the only way in: check it now.
            let path = cfg.token_file.as_ref().ok_or(ClientError::NoToken)?;
            read_token(path)?;
        }
        Ok(Self {
            key,
            service: service.clone(),
            token_file: cfg.token_file.clone(),
            state_dir: cfg.state_dir.clone(),
            stored: Mutex::new(stored),
            current: Mutex::new(None),
            stream_roots: Mutex::new(None),
            swap: Mutex::new(()),
            renew_at: Mutex::new(Instant::now()),
        })
    }

    /// Takes the roots from the roots stream and, when they changed, republishes the current
    /// certificate with them. Returns whether anything changed.
    pub fn replace_roots(
        &self,
        roots: Vec<CertificateDer<'static>>,
        store: &CredentialStore,
    ) -> Result<bool, CertError> {
        let _swap = self.swap.lock().map_err(|_| CertError::Poisoned)?;
        if let Ok(mut r) = self.stream_roots.lock() {
            *r = Some(roots.clone());
        }
        let Some(mut issued) = self.current() else {
            return Ok(false);
        };
        if issued.roots == roots {
            return Ok(false);
        }
        issued.roots = roots;
        let creds = Credentials::from_der(
            issued.chain.clone(),
            self.private_key(),
            issued.roots.clone(),
        )
        .map_err(CertError::Roots)?;
        store.store(creds);
        if let Some(dir) = &self.state_dir {
            if let Err(e) = persist(dir, &issued) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the roots in state_dir");
            }
        }
        if let Ok(mut c) = self.current.lock() {
            *c = Some(issued);
        }
        Ok(true)
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    fn spiffe_id(&self, td: TrustDomain) -> SpiffeId {
        SpiffeId::new(
            td,
            self.service.namespace.clone(),
            self.service.name.clone(),
        )
    }

    fn csr(&self, id: &SpiffeId) -> Result<Vec<u8>, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        Ok(params.serialize_request(&self.key)?.der().to_vec())
    }

    /// Builds credentials from `issued`, checks they are ours, and publishes them.
    pub fn install(&self, mut issued: Issued, store: &CredentialStore) -> Result<i64, CertError> {
        let _swap = self.swap.lock().map_err(|_| CertError::Poisoned)?;
        if let Some(roots) = self.stream_roots.lock().ok().and_then(|r| r.clone()) {
            issued.roots = roots;
        }
        let creds = Credentials::from_der(
            issued.chain.clone(),
            self.private_key(),
            issued.roots.clone(),
        )
        .map_err(CertError::Unusable)?;
        check_own_identity(&creds.leaf.id, &self.service)?;
        let not_after = creds.leaf.not_after;
        let remaining = (not_after - now_unix()).max(1) as f64;
        // Renew at a random point between 50 % and 70 % of the remaining lifetime, on the
        // monotonic clock from now.
        let fraction = 0.5 + 0.2 * rand::random::<f64>();
        if let Ok(mut r) = self.renew_at.lock() {
            *r = Instant::now() + Duration::from_secs_f64(remaining * fraction);
        }
        tracing::info!(serial = %creds.leaf.serial, id = %creds.leaf.id, not_after, "certificate installed");
        store.store(creds);
        if let Some(dir) = &self.state_dir {
            if let Err(e) = persist(dir, &issued) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the certificate in state_dir");
            }
        }
        if let Ok(mut c) = self.current.lock() {
            *c = Some(issued);
        }
        Ok(not_after)
    }

    /// The last issued chain and roots.
    pub fn current(&self) -> Option<Issued> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Puts the first certificate in the store: a valid stored one, or one signed for the join
    /// token. Retries with backoff; returns false only when stopped... which the caller handles.
    pub async fn obtain(&self, server: &ServerTarget, store: &Arc<CredentialStore>) -> bool {
        if let Some(issued) = self.stored.lock().ok().and_then(|mut s| s.take()) {
            match self.install(issued, store) {
                Ok(_) => {
                    tracing::info!("using the certificate kept in state_dir");
                    return true;
                }
                Err(e) => tracing::warn!("ignoring the certificate in state_dir: {e}"),
            }
        }
        let mut backoff = Backoff::control_plane();
        loop {
            match self.sign_with_token(server, store).await {
                Ok(()) => {
                    metrics::counter!(ward_proxy::metrics::CERT_RENEWALS, "result" => "ok")
                        .increment(1);
                    return true;
                }
                Err(e) => {
                    metrics::counter!(ward_proxy::metrics::CERT_RENEWALS, "result" => "error")
                        .increment(1);
                    tracing::warn!("cannot get a certificate from the control plane: {e}");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn sign_with_token(
        &self,
        server: &ServerTarget,
        store: &CredentialStore,
    ) -> Result<(), CertError> {
        let path = self.token_file.as_ref().ok_or(CertError::NoTokenFile)?;
        let token = read_token(path).map_err(CertError::Token)?;
        let channel = server.connect(None).await.map_err(CertError::Connect)?;
        let td = server.trust_domain().ok_or(CertError::NoTrustDomain)?;
        let mut request = tonic::Request::new(v1::SignRequest {
            csr: self.csr(&self.spiffe_id(td))?,
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| CertError::TokenNotAHeader)?;
        request
            .metadata_mut()
            .insert(ward_proto::AUTHORIZATION, bearer);
        let resp = v1::identity_client::IdentityClient::new(channel)
            .max_decoding_message_size(ward_proto::MAX_MESSAGE_SIZE)
            .sign(request)
            .await
            .map_err(|s| CertError::SignRefused {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();
        self.install(issued_from(resp), store)?;
        Ok(())
    }

    async fn renew(
        &self,
        server: &ServerTarget,
        store: &Arc<CredentialStore>,
    ) -> Result<(), CertError> {
        let channel = server
            .connect(Some(store.clone()))
            .await
            .map_err(CertError::Connect)?;
        let td = server.trust_domain().ok_or(CertError::NoTrustDomain)?;
        let request = tonic::Request::new(v1::SignRequest {
            csr: self.csr(&self.spiffe_id(td))?,
        });
        let resp = v1::identity_client::IdentityClient::new(channel)
            .max_decoding_message_size(ward_proto::MAX_MESSAGE_SIZE)
            .sign(request)
            .await
            .map_err(|s| CertError::RenewalRefused {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();
        self.install(issued_from(resp), store)?;
        Ok(())
    }

    /// Renews at the scheduled point, retrying with backoff; falls back to the join token only
    /// once the certificate has expired.
    pub async fn keep_renewed(
        &self,
        server: &ServerTarget,
        store: &Arc<CredentialStore>,
        stop: &CancellationToken,
    ) {
        loop {
            let at = self
                .renew_at
                .lock()
                .map(|r| *r)
                .unwrap_or_else(|_| Instant::now());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {}
            }
            let mut backoff = Backoff::control_plane();
            // The not_after of the certificate the late-renewal warning was given for.
            let mut warned_for = None;
            loop {
                let expired = store.load().is_none_or(|c| c.leaf.not_after <= now_unix());
                let result = if expired {
                    self.sign_with_token(server, store).await
                } else {
                    self.renew(server, store).await
                };
                match result {
                    Ok(()) => {
                        metrics::counter!(ward_proxy::metrics::CERT_RENEWALS, "result" => "ok")
                            .increment(1);
                        break;
                    }
                    Err(e) => {
                        metrics::counter!(ward_proxy::metrics::CERT_RENEWALS, "result" => "error")
                            .increment(1);
                        tracing::warn!("certificate renewal failed; keeping the current one: {e}");
                        let now = now_unix();
                        if let Some(c) = store.load() {
                            let (from, to) = (c.leaf.not_before, c.leaf.not_after);
                            if late_in_life(from, to, now) && warned_for != Some(to) {
                                warned_for = Some(to);
                                tracing::warn!(
                                    not_after = to,
                                    "the certificate has used 80 % of its life and cannot be \
                                     renewed; it expires in {} s, and every mesh connection \
                                     fails after that unless the control plane answers",
                                    (to - now).max(0)
                                );
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Whether a certificate valid from `not_before` to `not_after` has used 80 % of its life at
/// `now`: from then on a failed renewal is worth a warning of its own.
fn late_in_life(not_before: i64, not_after: i64, now: i64) -> bool {
    now >= not_before + (not_after - not_before) / 5 * 4
}

pub fn issued_from(resp: v1::SignResponse) -> Issued {
    Issued {
        chain: resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        roots: resp.roots.into_iter().map(CertificateDer::from).collect(),
    }
}

/// What ward writes in `state_dir` (with the temporary names of [`write_atomic`]): a directory
/// holding only these may be tightened to 0700 (security rule 11, server state,
/// docs/security.md).
const OWN_FILES: &[&str] = &[
    KEY_FILE,
    CERT_FILE,
    ROOTS_FILE,
    "key.tmp",
    "cert.tmp",
    "roots.tmp",
];

fn ensure_private_dir(dir: &Path) -> Result<(), ClientError> {
    ward_config::private_dir::prepare(dir, OWN_FILES).map_err(|e| state_err(dir, e.to_string()))
}

/// A valid certificate + roots for our key and service in `dir`, if there is one.
fn load_stored(dir: &Path, key: &KeyPair, service: &ServiceConfig) -> Option<Issued> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join(CERT_FILE))
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join(ROOTS_FILE))
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let creds = Credentials::from_der(chain.clone(), der, roots.clone()).ok()?;
    check_own_identity(&creds.leaf.id, service).ok()?;
    // Keep a margin so a certificate about to expire is not used for the first renewal.
    (creds.leaf.not_after > now_unix() + 5).then_some(Issued { chain, roots })
}

fn pem_of(tag: &str, ders: &[CertificateDer<'_>]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for d in ders {
        let _ = writeln!(out, "-----BEGIN {tag}-----");
        let b64 = base64::engine::general_purpose::STANDARD.encode(d.as_ref());
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
        }
        let _ = writeln!(out, "-----END {tag}-----");
    }
    out
}

fn persist(dir: &Path, issued: &Issued) -> std::io::Result<()> {
    write_atomic(
        &dir.join(CERT_FILE),
        pem_of("CERTIFICATE", &issued.chain).as_bytes(),
        0o644,
    )?;
    write_atomic(
        &dir.join(ROOTS_FILE),
        pem_of("CERTIFICATE", &issued.roots).as_bytes(),
        0o644,
    )
}

/// Writes to a temporary file, fsyncs, then renames over `path`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose};
    use std::os::unix::fs::PermissionsExt;
    use ward_config::Name;

    /// A root CA that signs certificates for identities' keys.
    pub(crate) struct Ca {
        pub der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Ca {
        pub(crate) fn new(name: &str) -> Self {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let der = p.self_signed(&key).unwrap().der().clone();
            Self {
                der,
                issuer: Issuer::new(p, key),
            }
        }

        pub(crate) fn pem(&self) -> String {
            pem_of("CERTIFICATE", std::slice::from_ref(&self.der))
        }

        /// What the server's Sign answers for `identity`'s key as `service` (namespace
        /// `default`); long expired when `expired`.
        pub(crate) fn issue(&self, identity: &Identity, service: &str, expired: bool) -> Issued {
            let mut p = CertificateParams::default();
            let uri = format!("spiffe://mesh.test/ns/default/svc/{service}");
            p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            if expired {
                p.not_before = rcgen::date_time_ymd(2000, 1, 1);
                p.not_after = rcgen::date_time_ymd(2001, 1, 1);
            }
            let cert = p.signed_by(&identity.key, &self.issuer).unwrap();
            Issued {
                chain: vec![cert.der().clone()],
                roots: vec![self.der.clone()],
            }
        }
    }

    pub(crate) fn service(name: &str) -> ServiceConfig {
        ServiceConfig {
            name: Name::new(name).unwrap(),
            namespace: Name::new("default").unwrap(),
            trust_domain: None,
        }
    }

    pub(crate) fn config(
        token_file: Option<&Path>,
        state_dir: Option<&Path>,
    ) -> ControlPlaneConfig {
        ControlPlaneConfig {
            address: "https://127.0.0.1:8502".into(),
            ca_file: "ca.pem".into(),
            token_file: token_file.map(Path::to_owned),
            state_dir: state_dir.map(Path::to_owned),
        }
    }

    /// A token file in `dir`.
    pub(crate) fn token(dir: &Path) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, "a-join-token\n").unwrap();
        path
    }

    fn state_dir(dir: &Path) -> PathBuf {
        let path = dir.join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        path
    }

    fn refusal(cfg: &ControlPlaneConfig) -> String {
        match Identity::prepare(cfg, &service("order")) {
            Ok(_) => "prepared".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn without_a_valid_stored_certificate_a_readable_token_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let no_token = ClientError::NoToken.to_string();
        assert_eq!(refusal(&config(None, None)), no_token);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let e = refusal(&config(Some(&empty), None));
        assert!(e.contains("token_file") && e.ends_with("is empty"), "{e}");
        let missing = dir.path().join("missing");
        let e = refusal(&config(Some(&missing), None));
        assert!(e.contains("cannot read"), "{e}");
        // A state_dir whose certificate has expired holds none.
        let state = state_dir(dir.path());
        let first = Identity::prepare(
            &config(Some(&token(dir.path())), Some(&state)),
            &service("order"),
        )
        .unwrap();
        persist(&state, &Ca::new("root").issue(&first, "order", true)).unwrap();
        assert_eq!(refusal(&config(None, Some(&state))), no_token);
    }

    #[test]
    fn a_restart_uses_the_key_and_certificate_kept_in_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_dir(dir.path());
        let cfg = config(Some(&token(dir.path())), Some(&state));
        let first = Identity::prepare(&cfg, &service("order")).unwrap();
        let store = CredentialStore::default();
        let root = Ca::new("root");
        first
            .install(root.issue(&first, "order", false), &store)
            .unwrap();
        // A key file left readable by others is tightened, not used as is.
        let key_file = state.join(KEY_FILE);
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let again = Identity::prepare(&config(None, Some(&state)), &service("order")).unwrap();
        assert_eq!(again.key.serialize_der(), first.key.serialize_der());
        assert!(again.stored.lock().unwrap().is_some(), "no token needed");
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_certificate_for_another_service_is_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        let identity =
            Identity::prepare(&config(Some(&token(dir.path())), None), &service("order")).unwrap();
        let store = CredentialStore::default();
        let e = identity
            .install(Ca::new("root").issue(&identity, "payments", false), &store)
            .unwrap_err();
        assert!(matches!(e, CertError::NotOurs(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("not for service \"order\""), "{e}");
        assert!(store.load().is_none());
        assert!(identity.current().is_none());
    }

    #[test]
    fn roots_from_the_roots_stream_replace_and_outlive_a_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let identity =
            Identity::prepare(&config(Some(&token(dir.path())), None), &service("order")).unwrap();
        let store = CredentialStore::default();
        let (root, next) = (Ca::new("root"), Ca::new("next root"));
        let roots = |store: &CredentialStore| store.load().unwrap().root_ders.len();
        // No certificate yet: nothing to republish.
        assert!(matches!(
            identity.replace_roots(vec![root.der.clone()], &store),
            Ok(false)
        ));
        identity
            .install(root.issue(&identity, "order", false), &store)
            .unwrap();
        assert!(matches!(
            identity.replace_roots(vec![root.der.clone()], &store),
            Ok(false)
        ));
        let both = vec![root.der.clone(), next.der.clone()];
        assert!(matches!(identity.replace_roots(both, &store), Ok(true)));
        assert_eq!(roots(&store), 2);
        // A renewal answers with the roots of its moment; the stream's are newer.
        identity
            .install(root.issue(&identity, "order", false), &store)
            .unwrap();
        assert_eq!(roots(&store), 2);
    }

    /// The log lines keep their wording: the variant carries what the old string said.
    #[test]
    fn late_in_life_is_the_last_fifth() {
        assert!(!late_in_life(1000, 2000, 1799));
        assert!(late_in_life(1000, 2000, 1800));
        assert!(late_in_life(1000, 2000, 2500));
    }

    #[test]
    fn refusals_read_as_before() {
        let e = CertError::SignRefused {
            code: tonic::Code::Unauthenticated,
            message: "the join token has expired".into(),
        };
        assert_eq!(
            e.to_string(),
            "Sign refused: Unauthenticated: the join token has expired"
        );
        let e = CertError::Unusable(CredentialError::NoRoots);
        assert_eq!(
            e.to_string(),
            "the server's certificate is unusable: holds no root certificate"
        );
        let e = CertError::Token(read_token(Path::new("/nonexistent/ward.token")).unwrap_err());
        assert!(
            matches!(&e, CertError::Token(ClientError::TokenFile { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("/nonexistent/ward.token"), "{e}");
    }
}
