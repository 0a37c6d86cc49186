//! Certificate verifiers for both directions. The verifier establishes the peer's identity
//! (chain to our roots, validity, SVID rules); on the inbound it also asks the intentions
//! snapshot, so a denied caller fails inside the handshake with an `access_denied` alert.
//!
//! Each refusal is one row of [`REFUSALS`]: the rustls error the verifier returns, the alert
//! rustls sends for it (as docs/security.md, "Handshake refusals", names it), the handshake
//! result label it counts as, and its words in the logs.

use super::credentials::{chain_key, CredentialStore, Credentials};
use super::svid::{check_leaf, path_validity, LeafInfo, PathValidity, SvidError};
use crate::intentions::IntentionStore;
use crate::metrics::HandshakeResult;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{AlertDescription, CertificateError, DistinguishedName};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;
use ward_config::{Name, SpiffeId};

/// Why a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// Issuer not in our roots, self-signed, or chain broken (a leaf used as an issuer).
    UnknownCa,
    /// Expired or not yet valid.
    Expired,
    /// Not an acceptable mesh identity for this connection.
    BadIdentity(SvidError),
    /// A valid identity of the wrong service (outbound impersonation).
    WrongService,
    /// Intentions deny the caller.
    Denied,
    /// No credentials loaded yet.
    NotReady,
    /// Any other certificate fault.
    BadCertificate,
}

/// Every kind of handshake refusal: the key of [`REFUSALS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client sent no certificate (rustls refuses it before any verifier runs).
    NoClientCert,
    UnknownCa,
    Expired,
    BadIdentity,
    WrongService,
    Denied,
    NotReady,
    BadCertificate,
}

/// How a refusal reaches rustls, which picks the alert from it.
enum Raised {
    Certificate(CertificateError),
    /// `rustls::Error::NoCertificatesPresented`, raised by rustls itself.
    NoCertificate,
    /// `rustls::Error::General` with the row's words: not a certificate fault.
    General,
}

/// One row of [`REFUSALS`].
pub struct RefusalRow {
    pub refusal: Refusal,
    raised: Raised,
    /// The alert rustls sends for `raised` (the tests hold it to what rustls does).
    pub alert: AlertDescription,
    /// The `ward_tls_handshakes_total` result it counts as.
    pub result: HandshakeResult,
    /// What a log line says about it.
    pub words: &'static str,
}

/// The one table of handshake refusals, the contract of docs/security.md ("Handshake
/// refusals"): `From<VerifyError>`, [`classify`], [`result_of`] and [`result_of_alert`] all
/// read it, so an alert, its metric label and its log line cannot drift apart. A received
/// alert reads as the first row that sends it: identity faults come before the other
/// certificate faults, which are rare enough not to blur `bad_certificate`.
static REFUSALS: [RefusalRow; 8] = [
    RefusalRow {
        refusal: Refusal::Denied,
        raised: Raised::Certificate(CertificateError::ApplicationVerificationFailure),
        alert: AlertDescription::AccessDenied,
        result: HandshakeResult::Denied,
        words: "intentions deny the caller",
    },
    RefusalRow {
        refusal: Refusal::UnknownCa,
        raised: Raised::Certificate(CertificateError::UnknownIssuer),
        alert: AlertDescription::UnknownCA,
        result: HandshakeResult::UnknownCa,
        words: "the chain does not lead to our roots",
    },
    RefusalRow {
        refusal: Refusal::Expired,
        raised: Raised::Certificate(CertificateError::Expired),
        alert: AlertDescription::CertificateExpired,
        result: HandshakeResult::Expired,
        words: "a certificate of the chain is expired or not yet valid",
    },
    RefusalRow {
        refusal: Refusal::BadIdentity,
        raised: Raised::Certificate(CertificateError::NotValidForName),
        alert: AlertDescription::BadCertificate,
        result: HandshakeResult::BadIdentity,
        words: "not an acceptable mesh identity",
    },
    RefusalRow {
        refusal: Refusal::WrongService,
        raised: Raised::Certificate(CertificateError::NotValidForName),
        alert: AlertDescription::BadCertificate,
        result: HandshakeResult::BadIdentity,
        words: "the server is not the upstream service",
    },
    RefusalRow {
        refusal: Refusal::BadCertificate,
        raised: Raised::Certificate(CertificateError::BadEncoding),
        alert: AlertDescription::BadCertificate,
        // Not an identity fault.
        result: HandshakeResult::Error,
        words: "the certificate is malformed",
    },
    RefusalRow {
        refusal: Refusal::NoClientCert,
        raised: Raised::NoCertificate,
        alert: AlertDescription::CertificateRequired,
        result: HandshakeResult::NoClientCert,
        words: "no client certificate",
    },
    RefusalRow {
        refusal: Refusal::NotReady,
        raised: Raised::General,
        alert: AlertDescription::HandshakeFailure,
        // Not the peer's fault: counted as `error`, not `denied`.
        result: HandshakeResult::Error,
        words: "no credentials are loaded yet",
    },
];

impl Refusal {
    pub fn row(self) -> &'static RefusalRow {
        REFUSALS
            .iter()
            .find(|r| r.refusal == self)
            .expect("every refusal has a row")
    }
}

impl RefusalRow {
    /// The error the verifier hands rustls.
    pub fn error(&self) -> rustls::Error {
        match &self.raised {
            Raised::Certificate(c) => rustls::Error::InvalidCertificate(c.clone()),
            Raised::NoCertificate => rustls::Error::NoCertificatesPresented,
            Raised::General => rustls::Error::General(self.words.into()),
        }
    }

    /// Whether `err` is this row's error (rustls's variants with context read as plain ones).
    fn raised(&self, err: &rustls::Error) -> bool {
        use CertificateError as C;
        match (&self.raised, err) {
            (Raised::Certificate(want), rustls::Error::InvalidCertificate(got)) => {
                let plain = match got {
                    C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
                        C::Expired
                    }
                    C::NotValidForNameContext { .. } => C::NotValidForName,
                    other => other.clone(),
                };
                *want == plain
            }
            (Raised::NoCertificate, rustls::Error::NoCertificatesPresented) => true,
            (Raised::General, rustls::Error::General(message)) => message == self.words,
            _ => false,
        }
    }
}

impl VerifyError {
    pub fn refusal(&self) -> Refusal {
        match self {
            VerifyError::UnknownCa => Refusal::UnknownCa,
            VerifyError::Expired => Refusal::Expired,
            VerifyError::BadIdentity(_) => Refusal::BadIdentity,
            VerifyError::WrongService => Refusal::WrongService,
            VerifyError::Denied => Refusal::Denied,
            VerifyError::NotReady => Refusal::NotReady,
            VerifyError::BadCertificate => Refusal::BadCertificate,
        }
    }
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.refusal().row().words)?;
        match self {
            VerifyError::BadIdentity(why) => write!(f, ": {why}"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for VerifyError {}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        e.refusal().row().error()
    }
}

fn from_webpki(e: webpki::Error) -> VerifyError {
    use webpki::Error as W;
    match e {
        // No path to our roots: an unknown issuer, a signature that does not verify, or a
        // broken chain (a leaf used as an issuer, a CA below what pathLen allows).
        W::UnknownIssuer
        | W::InvalidSignatureForPublicKey
        | W::EndEntityUsedAsCa
        | W::PathLenConstraintViolated => VerifyError::UnknownCa,
        W::CertExpired { .. } | W::CertNotValidYet { .. } | W::InvalidCertValidity => {
            VerifyError::Expired
        }
        W::CaUsedAsEndEntity => VerifyError::BadIdentity(SvidError::CaAsLeaf),
        #[allow(deprecated)]
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => {
            VerifyError::BadIdentity(SvidError::MissingEku("clientAuth or serverAuth"))
        }
        _ => VerifyError::BadCertificate,
    }
}

/// Maps a failed handshake's error to its metric label.
pub fn classify(err: &std::io::Error) -> HandshakeResult {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return HandshakeResult::Error;
    };
    REFUSALS
        .iter()
        .find(|r| r.raised(tls))
        .map_or(HandshakeResult::Error, |r| r.result)
}

/// Maps an error on the caller's side of a handshake to its metric label: an alert the server sent
/// is counted as the refusal it stands for (the alerts docs/security.md names for each fault, read
/// backwards), anything else as [`classify`] does. Only for the caller: on the inbound an alert
/// from the client says nothing about the client's own certificate.
pub fn classify_refusal(err: &std::io::Error) -> HandshakeResult {
    match received_alert(err) {
        Some(alert) => result_of_alert(alert),
        None => classify(err),
    }
}

/// The result a refusal alert means (the first row of [`REFUSALS`] that sends it).
pub fn result_of_alert(alert: AlertDescription) -> HandshakeResult {
    REFUSALS
        .iter()
        .find(|r| r.alert == alert)
        .map_or(HandshakeResult::Error, |r| r.result)
}

/// The alert's name as TLS spells it (`access_denied`), for logs.
pub fn alert_name(alert: AlertDescription) -> std::borrow::Cow<'static, str> {
    match alert {
        AlertDescription::AccessDenied => "access_denied".into(),
        AlertDescription::CertificateRequired => "certificate_required".into(),
        AlertDescription::UnknownCA => "unknown_ca".into(),
        AlertDescription::CertificateExpired => "certificate_expired".into(),
        AlertDescription::BadCertificate => "bad_certificate".into(),
        AlertDescription::CloseNotify => "close_notify".into(),
        other => format!("{other:?}").into(),
    }
}

/// The alert the server sent, if `err` is one.
pub fn received_alert(err: &std::io::Error) -> Option<AlertDescription> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// The signature algorithms certificate chains may use.
pub fn signature_algorithms(
) -> &'static [&'static dyn rustls_pki_types::SignatureVerificationAlgorithm] {
    super::signatures::algorithms().all
}

/// Verifies `end_entity` + `intermediates` against `creds`' roots and the SVID rules; returns
/// the leaf and the validity of the path it verified along. The caller remembers the chain
/// ([`Credentials::remember_path`]) once it admits the peer, so refused peers fill no cache.
fn verify_peer(
    creds: &Credentials,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(LeafInfo, PathValidity), VerifyError> {
    let ee =
        webpki::EndEntityCert::try_from(end_entity).map_err(|_| VerifyError::BadCertificate)?;
    let path = ee
        .verify_for_usage(
            signature_algorithms(),
            &creds.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(from_webpki)?;
    let leaf = check_leaf(end_entity, Some(&creds.leaf.id.trust_domain))
        .map_err(VerifyError::BadIdentity)?;
    // Only the intermediates on the path: the peer may send others (cross-signed ones during a
    // CA rotation), and their validity says nothing about this chain.
    let validity = path_validity(&leaf, path.intermediate_certificates().map(|c| c.der()))
        .map_err(|_| VerifyError::BadCertificate)?;
    Ok((leaf, validity))
}

/// The peer of an established session: who it is, and until when its chain is valid.
#[derive(Debug, Clone)]
pub struct SessionPeer {
    pub leaf: LeafInfo,
    /// The end of the verified path (Unix seconds): the leaf's or an intermediate's on it.
    pub not_after: i64,
}

/// Authorizes the peer chain of an established session, full or resumed, as a full handshake would
/// (security rule 8, resumption and early data, docs/security.md): the path the handshake verified
/// under the current credentials, if it is still valid now; otherwise (a ticket issued under
/// earlier credentials, a path that has expired since) the chain is verified again against the
/// current roots at the current time, so an expired intermediate refuses it unless another valid
/// path exists. The caller still decides the intention.
pub fn session_peer(
    store: &CredentialStore,
    chain: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
) -> Result<SessionPeer, VerifyError> {
    session_peer_at(store, chain, usage, UnixTime::now())
}

fn session_peer_at(
    store: &CredentialStore,
    chain: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
    now: UnixTime,
) -> Result<SessionPeer, VerifyError> {
    let creds = store.load().ok_or(VerifyError::NotReady)?;
    let (end_entity, intermediates) = chain.split_first().ok_or(VerifyError::BadCertificate)?;
    let verified = creds
        .verified_path(&chain_key(end_entity, intermediates))
        .filter(|v| v.valid_at(now.as_secs() as i64));
    let (leaf, validity) = match verified {
        Some(validity) => {
            let leaf = check_leaf(end_entity, Some(&creds.leaf.id.trust_domain))
                .map_err(VerifyError::BadIdentity)?;
            (leaf, validity)
        }
        None => {
            tracing::debug!("no verified path of this chain is valid now; verifying it again");
            let (leaf, validity) = verify_peer(&creds, end_entity, intermediates, now, usage)?;
            creds.remember_path(chain_key(end_entity, intermediates), validity);
            (leaf, validity)
        }
    };
    Ok(SessionPeer {
        leaf,
        not_after: validity.not_after,
    })
}

/// The metric label for a refusal found outside rustls (by [`session_peer`] or an intention
/// asked after a resumption).
pub fn result_of(e: &VerifyError) -> HandshakeResult {
    e.refusal().row().result
}

/// Inbound: requires a client certificate and decides the intention inside the handshake.
#[derive(Debug)]
pub struct InboundVerifier {
    credentials: Arc<CredentialStore>,
    intentions: Arc<IntentionStore>,
    local_service: Name,
}

impl InboundVerifier {
    pub fn new(
        credentials: Arc<CredentialStore>,
        intentions: Arc<IntentionStore>,
        local_service: Name,
    ) -> Self {
        Self {
            credentials,
            intentions,
            local_service,
        }
    }
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialStore")
    }
}

impl ClientCertVerifier for InboundVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Every return but the admission below notes the presented identity for the connection
        // log.
        let refusal = crate::connlog::NoteIfRefused(end_entity);
        let creds = self.credentials.load().ok_or(VerifyError::NotReady)?;
        let (leaf, validity) = verify_peer(
            &creds,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        // Security rule 6 (fail closed, docs/security.md): no snapshot yet means deny.
        let allowed = self.intentions.authorize(&leaf.id, &self.local_service);
        if allowed {
            creds.remember_path(chain_key(end_entity, intermediates), validity);
            refusal.admitted();
            Ok(ClientCertVerified::assertion())
        } else {
            Err(VerifyError::Denied.into())
        }
    }

    crate::tls13_signatures!();
}

/// Outbound: the server must present exactly the SPIFFE ID of the upstream service.
#[derive(Debug)]
pub struct OutboundVerifier {
    credentials: Arc<CredentialStore>,
    namespace: Name,
    service: Name,
}

impl OutboundVerifier {
    pub fn new(credentials: Arc<CredentialStore>, namespace: Name, service: Name) -> Self {
        Self {
            credentials,
            namespace,
            service,
        }
    }

    /// Whether `id` is the upstream this verifier expects.
    pub fn expects(&self, id: &SpiffeId) -> bool {
        id.namespace == self.namespace && id.service == self.service
    }
}

impl ServerCertVerifier for OutboundVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let creds = self.credentials.load().ok_or(VerifyError::NotReady)?;
        let (leaf, validity) = verify_peer(
            &creds,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !self.expects(&leaf.id) {
            return Err(VerifyError::WrongService.into());
        }
        creds.remember_path(chain_key(end_entity, intermediates), validity);
        Ok(ServerCertVerified::assertion())
    }

    crate::tls13_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{ca, id, intentions, key_der, leaf, store, store_for, svid, Signer};
    use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
    use time::Duration;
    use ward_config::intentions::Action;

    fn unix(t: i64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t as u64))
    }

    fn client_auth() -> webpki::KeyUsage {
        webpki::KeyUsage::client_auth()
    }

    #[test]
    fn a_full_path_cache_drops_one_entry_not_all() {
        use super::super::credentials::MAX_VERIFIED_PATHS;
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let creds = store(&root, &int).load().unwrap();
        let valid = PathValidity {
            not_before: 0,
            not_after: i64::MAX,
        };
        let key = |i: usize| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            k
        };
        for i in 0..=MAX_VERIFIED_PATHS {
            creds.remember_path(key(i), valid);
        }
        let kept = (0..=MAX_VERIFIED_PATHS)
            .filter(|&i| creds.verified_path(&key(i)).is_some())
            .count();
        assert_eq!(kept, MAX_VERIFIED_PATHS, "one entry dropped, not all");
        assert!(creds.verified_path(&key(MAX_VERIFIED_PATHS)).is_some());
    }

    #[test]
    fn a_certificate_off_the_verified_path_does_not_end_the_chain() {
        let now = crate::now_unix();
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        // Same name, another key, valid one day: the leaf's signature does not verify under it.
        let extra = ca("intermediate", Some(&root), 1, None);
        let store = store(&root, &int);
        let (order, _) = leaf("order", &int);
        for chain in [
            vec![order.der.clone(), int.der.clone(), extra.der.clone()],
            vec![order.der.clone(), extra.der.clone(), int.der.clone()],
        ] {
            let peer = session_peer_at(&store, &chain, client_auth(), unix(now)).unwrap();
            assert_eq!(
                peer.not_after, order.not_after,
                "the leaf's end, not that of the certificate off the path ({})",
                extra.not_after
            );
        }
    }

    #[test]
    fn an_intermediate_on_the_path_that_expires_first_ends_the_chain() {
        let now = crate::now_unix();
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 1, None);
        let store = store(&root, &int);
        let (order, _) = leaf("order", &int);
        let chain = [order.der.clone(), int.der.clone()];
        let peer = session_peer_at(&store, &chain, client_auth(), unix(now)).unwrap();
        assert!(int.not_after < order.not_after);
        assert_eq!(peer.not_after, int.not_after);
    }

    #[test]
    fn a_session_whose_verified_intermediate_has_expired_is_refused() {
        let now = crate::now_unix();
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 1, None);
        let store = store(&root, &int);
        let (order, _) = leaf("order", &int);
        let chain = [order.der.clone(), int.der.clone()];
        // The full handshake verified it; a day later (the leaf still valid) it is refused.
        assert!(session_peer_at(&store, &chain, client_auth(), unix(now)).is_ok());
        let later = unix(int.not_after + 1);
        assert_eq!(
            session_peer_at(&store, &chain, client_auth(), later).map(|p| p.not_after),
            Err(VerifyError::Expired)
        );
    }

    #[test]
    fn a_session_whose_path_expired_keeps_another_path_valid_now() {
        let now = crate::now_unix();
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let store = store(&root, &int);
        // The leaf's issuer reissued for one day (same name and key): the path taken first.
        let short = ca("intermediate", Some(&root), 1, Some(int.issuer.key()));
        let (order, _) = leaf("order", &short);
        let chain = [order.der.clone(), short.der.clone(), int.der.clone()];
        let first = session_peer_at(&store, &chain, client_auth(), unix(now)).unwrap();
        assert_eq!(first.not_after, short.not_after);
        let later = session_peer_at(&store, &chain, client_auth(), unix(short.not_after + 1));
        assert_eq!(later.map(|p| p.not_after), Ok(order.not_after));
    }

    #[test]
    fn a_leaf_or_a_ca_below_the_paths_length_as_an_issuer_is_an_unknown_ca() {
        let now = crate::now_unix();
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let store = store(&root, &int);
        let (mesh_leaf, _) = leaf("payments", &int);
        let (order, _) = leaf("order", &mesh_leaf);
        let chain = [order.der.clone(), mesh_leaf.der.clone(), int.der.clone()];
        let got = session_peer_at(&store, &chain, client_auth(), unix(now)).map(|p| p.not_after);
        assert_eq!(got, Err(VerifyError::UnknownCa));
        // The intermediate has pathLen 0: a CA it signed cannot issue.
        let sub = ca("sub", Some(&int), 30, None);
        let (order, _) = leaf("order", &sub);
        let chain = [order.der.clone(), sub.der.clone(), int.der.clone()];
        let got = session_peer_at(&store, &chain, client_auth(), unix(now)).map(|p| p.not_after);
        assert_eq!(got, Err(VerifyError::UnknownCa));
        // Both are counted as unknown_ca, the alert rustls sends for UnknownIssuer.
        let err = std::io::Error::other(rustls::Error::from(VerifyError::UnknownCa));
        assert_eq!(classify(&err), HandshakeResult::UnknownCa);
    }

    type Chain = (
        Vec<CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    );

    /// `leaf` and its issuer `int`, as a client presents them.
    fn chain((leaf, key): (Signer, rcgen::KeyPair), int: &Signer) -> Chain {
        (vec![leaf.der, int.der.clone()], key_der(&key))
    }

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// The inbound of `inventory` under `store`'s credentials, asking `intentions`.
    fn inbound(store: &Arc<CredentialStore>, intentions: Arc<IntentionStore>) -> Arc<ServerConfig> {
        let verifier = InboundVerifier::new(store.clone(), intentions, name("inventory"));
        super::super::config::server_config(store.clone(), verifier, None)
    }

    /// A TLS 1.3 client that expects `expected` (namespace `namespace`) by `roots`' roots, and
    /// presents `chain` if any.
    fn client(
        roots: &Arc<CredentialStore>,
        namespace: &str,
        expected: &str,
        chain: Option<Chain>,
    ) -> Arc<ClientConfig> {
        let verifier = OutboundVerifier::new(roots.clone(), name(namespace), name(expected));
        let builder = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        Arc::new(match chain {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
            None => builder.with_no_client_auth(),
        })
    }

    /// Moves what `from` has to send into `to`; false when there was nothing to move.
    fn transfer(
        from: &mut rustls::Connection,
        to: &mut rustls::Connection,
        to_err: &mut Option<rustls::Error>,
    ) -> bool {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        if buf.is_empty() || to_err.is_some() {
            return false;
        }
        let mut rest = buf.as_slice();
        while !rest.is_empty() && to_err.is_none() {
            to.read_tls(&mut rest).unwrap();
            if let Err(e) = to.process_new_packets() {
                *to_err = Some(e);
            }
        }
        true
    }

    /// A real TLS 1.3 handshake in memory; the error each side ended with (client, server).
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (Option<rustls::Error>, Option<rustls::Error>) {
        let server_name = ServerName::try_from("inventory").unwrap();
        let mut c = rustls::Connection::from(ClientConnection::new(client, server_name).unwrap());
        let mut s = rustls::Connection::from(ServerConnection::new(server).unwrap());
        let (mut c_err, mut s_err) = (None, None);
        for _ in 0..10 {
            let to_server = transfer(&mut c, &mut s, &mut s_err);
            let to_client = transfer(&mut s, &mut c, &mut c_err);
            if !to_server && !to_client {
                break;
            }
        }
        assert!(
            c_err.is_some() || s_err.is_some() || !(c.is_handshaking() || s.is_handshaking()),
            "the handshake neither finished nor failed"
        );
        (c_err, s_err)
    }

    /// The alert and result [`CONTRACT`] promises for `refusal`.
    fn promised(refusal: Refusal) -> (AlertDescription, &'static str) {
        let c = CONTRACT.iter().find(|c| c.0 == refusal).unwrap();
        (c.1, c.2)
    }

    #[test]
    fn the_inbound_admits_an_allowed_caller_and_refuses_each_fault_with_its_alert() {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let other_root = ca("other root", None, 3650, None);
        let other_int = ca("other intermediate", Some(&other_root), 30, None);
        let server = store_for("inventory", &int, &[&root]);
        let order = store_for("order", &int, &[&root]);
        let order_id = id("order").to_string();
        let days = Duration::days;
        let cases = [
            ("allowed", Some(chain(leaf("order", &int), &int)), None),
            (
                "denied",
                Some(chain(leaf("rogue", &int), &int)),
                Some(Refusal::Denied),
            ),
            (
                "issuer not in the roots",
                Some(chain(leaf("order", &other_int), &other_int)),
                Some(Refusal::UnknownCa),
            ),
            (
                "self-signed",
                Some(chain(leaf("order", &other_root), &other_root)),
                Some(Refusal::UnknownCa),
            ),
            (
                "expired",
                Some(chain(svid(&order_id, &int, -days(3), -days(1)), &int)),
                Some(Refusal::Expired),
            ),
            (
                "not yet valid",
                Some(chain(svid(&order_id, &int, days(1), days(2)), &int)),
                Some(Refusal::Expired),
            ),
            (
                "another trust domain",
                Some(chain(
                    svid(
                        "spiffe://other.test/ns/default/svc/order",
                        &int,
                        -days(1),
                        days(1),
                    ),
                    &int,
                )),
                Some(Refusal::BadIdentity),
            ),
            ("no certificate", None, Some(Refusal::NoClientCert)),
        ];
        for (what, presented, refused) in cases {
            let allow_order = intentions(Action::Deny, &["order"]);
            let config = client(&order, "default", "inventory", presented);
            let (client_err, server_err) = handshake(inbound(&server, allow_order), config);
            let Some(refusal) = refused else {
                assert_eq!((client_err, server_err), (None, None), "{what}");
                continue;
            };
            let (alert, result) = promised(refusal);
            assert_eq!(
                client_err,
                Some(rustls::Error::AlertReceived(alert)),
                "{what}"
            );
            let server_err = io_error(server_err.expect(what));
            assert_eq!(classify(&server_err).as_str(), result, "{what}");
        }
    }

    #[test]
    fn before_the_first_intentions_every_caller_is_denied() {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let server = store_for("inventory", &int, &[&root]);
        let order = store_for("order", &int, &[&root]);
        let none_yet = Arc::new(IntentionStore::default());
        let config = client(
            &order,
            "default",
            "inventory",
            Some(chain(leaf("order", &int), &int)),
        );
        let (client_err, _) = handshake(inbound(&server, none_yet), config);
        let (alert, _) = promised(Refusal::Denied);
        assert_eq!(client_err, Some(rustls::Error::AlertReceived(alert)));
    }

    #[test]
    fn the_outbound_refuses_a_server_of_another_service_or_namespace() {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let server = store_for("inventory", &int, &[&root]);
        let order = store_for("order", &int, &[&root]);
        for (namespace, expected) in [("default", "payments"), ("prod", "inventory")] {
            let allow_all = intentions(Action::Allow, &[]);
            let config = client(
                &order,
                namespace,
                expected,
                Some(chain(leaf("order", &int), &int)),
            );
            let (client_err, server_err) = handshake(inbound(&server, allow_all), config);
            let what = format!("{expected}.{namespace}");
            let client_err = io_error(client_err.expect(&what));
            assert_eq!(classify(&client_err).as_str(), "bad_identity", "{what}");
            let (alert, _) = promised(Refusal::WrongService);
            assert_eq!(
                server_err,
                Some(rustls::Error::AlertReceived(alert)),
                "{what}"
            );
        }
    }

    /// The product's contract, written out apart from [`REFUSALS`]: each refusal, the alert
    /// the peer receives, the result the refusing side counts, how the caller reads that
    /// alert back, and the words of the logs.
    const CONTRACT: [(Refusal, AlertDescription, &str, &str, &str); 8] = [
        (
            Refusal::Denied,
            AlertDescription::AccessDenied,
            "denied",
            "denied",
            "intentions deny the caller",
        ),
        (
            Refusal::UnknownCa,
            AlertDescription::UnknownCA,
            "unknown_ca",
            "unknown_ca",
            "the chain does not lead to our roots",
        ),
        (
            Refusal::Expired,
            AlertDescription::CertificateExpired,
            "expired",
            "expired",
            "a certificate of the chain is expired or not yet valid",
        ),
        (
            Refusal::BadIdentity,
            AlertDescription::BadCertificate,
            "bad_identity",
            "bad_identity",
            "not an acceptable mesh identity",
        ),
        (
            Refusal::WrongService,
            AlertDescription::BadCertificate,
            "bad_identity",
            "bad_identity",
            "the server is not the upstream service",
        ),
        (
            Refusal::BadCertificate,
            AlertDescription::BadCertificate,
            "error",
            "bad_identity",
            "the certificate is malformed",
        ),
        (
            Refusal::NoClientCert,
            AlertDescription::CertificateRequired,
            "no_client_cert",
            "no_client_cert",
            "no client certificate",
        ),
        (
            Refusal::NotReady,
            AlertDescription::HandshakeFailure,
            "error",
            "error",
            "no credentials are loaded yet",
        ),
    ];

    /// The verifier's error of each kind, where the verifier raises it.
    fn verify_error(refusal: Refusal) -> Option<VerifyError> {
        Some(match refusal {
            Refusal::NoClientCert => return None,
            Refusal::UnknownCa => VerifyError::UnknownCa,
            Refusal::Expired => VerifyError::Expired,
            Refusal::BadIdentity => VerifyError::BadIdentity(SvidError::NoUri),
            Refusal::WrongService => VerifyError::WrongService,
            Refusal::Denied => VerifyError::Denied,
            Refusal::NotReady => VerifyError::NotReady,
            Refusal::BadCertificate => VerifyError::BadCertificate,
        })
    }

    fn io_error(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn every_refusal_keeps_its_alert_result_and_words() {
        for (refusal, alert, result, read_back, words) in CONTRACT {
            let row = refusal.row();
            let error = row.error();
            assert_eq!(row.alert, alert, "{refusal:?}: alert");
            if let rustls::Error::InvalidCertificate(c) = &error {
                // What rustls sends for the error the verifier returns.
                assert_eq!(AlertDescription::from(c.clone()), alert, "{refusal:?}");
            }
            assert_eq!(classify(&io_error(error)).as_str(), result, "{refusal:?}");
            assert_eq!(result_of_alert(alert).as_str(), read_back, "{refusal:?}");
            assert_eq!(row.words, words, "{refusal:?}");
            if let Some(e) = verify_error(refusal) {
                assert_eq!(e.refusal(), refusal);
                assert_eq!(rustls::Error::from(e.clone()), row.error(), "{refusal:?}");
                assert_eq!(result_of(&e).as_str(), result, "{refusal:?}");
                assert!(e.to_string().starts_with(words), "{refusal:?}: {e}");
            }
        }
        // One row per refusal, each in the contract.
        assert_eq!(REFUSALS.len(), CONTRACT.len());
        for row in &REFUSALS {
            let n = CONTRACT.iter().filter(|c| c.0 == row.refusal).count();
            assert_eq!(n, 1, "{:?}", row.refusal);
        }
    }

    #[test]
    fn rustls_errors_with_context_count_as_their_plain_kind() {
        use rustls_pki_types::UnixTime;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1));
        for (c, result) in [
            (
                CertificateError::ExpiredContext {
                    time: at,
                    not_after: at,
                },
                "expired",
            ),
            (CertificateError::NotValidYet, "expired"),
            (
                CertificateError::NotValidYetContext {
                    time: at,
                    not_before: at,
                },
                "expired",
            ),
            (
                CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("web").unwrap().to_owned(),
                    presented: vec![],
                },
                "bad_identity",
            ),
            (CertificateError::Revoked, "error"),
        ] {
            let e = io_error(rustls::Error::InvalidCertificate(c.clone()));
            assert_eq!(classify(&e).as_str(), result, "{c:?}");
        }
        // Not a TLS error at all, or another General message than NotReady's.
        assert_eq!(
            classify(&std::io::Error::other("reset")),
            HandshakeResult::Error
        );
        let other = io_error(rustls::Error::General("other".into()));
        assert_eq!(classify(&other), HandshakeResult::Error);
    }

    /// The caller reads each refusal's alert back as the result the inbound counted for it.
    #[test]
    fn each_refusal_alert_reads_back_as_the_inbound_result() {
        let refusals = [
            VerifyError::UnknownCa,
            VerifyError::Expired,
            VerifyError::BadIdentity(SvidError::CaAsLeaf),
            VerifyError::WrongService,
            VerifyError::Denied,
        ];
        for e in refusals {
            let rustls::Error::InvalidCertificate(c) = rustls::Error::from(e.clone()) else {
                panic!("{e:?} is a certificate error");
            };
            assert_eq!(
                result_of_alert(AlertDescription::from(c)),
                result_of(&e),
                "{e:?}"
            );
        }
        assert_eq!(
            result_of_alert(AlertDescription::CertificateRequired),
            HandshakeResult::NoClientCert
        );
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::AccessDenied),
        );
        assert_eq!(classify_refusal(&alert), HandshakeResult::Denied);
        assert_eq!(
            classify(&alert),
            HandshakeResult::Error,
            "not on the inbound"
        );
    }
}
