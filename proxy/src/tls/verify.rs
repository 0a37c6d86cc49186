//! Certificate verifiers for both directions. The verifier establishes the peer's identity
//! (chain to our roots, validity, SVID rules); on the inbound it also asks the intentions
//! snapshot, so a denied caller fails inside the handshake with an `access_denied` alert.
//!
//! Each fault maps to one rustls error whose alert PRODUCT.md names, and [`classify`] maps that
//! error back to exactly one handshake result label.

use super::credentials::CredentialStore;
use super::svid::{check_leaf, LeafInfo, SvidError};
use crate::intentions::IntentionStore;
use crate::metrics::HandshakeResult;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::{Arc, OnceLock};
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

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        let c = match e {
            VerifyError::UnknownCa => CertificateError::UnknownIssuer,
            VerifyError::Expired => CertificateError::Expired,
            VerifyError::BadIdentity(_) | VerifyError::WrongService => {
                CertificateError::NotValidForName
            }
            VerifyError::Denied => CertificateError::ApplicationVerificationFailure,
            // Not the peer's fault: counted as `error`, not `denied`.
            VerifyError::NotReady => {
                return rustls::Error::General("no credentials are loaded yet".into())
            }
            VerifyError::BadCertificate => CertificateError::BadEncoding,
        };
        rustls::Error::InvalidCertificate(c)
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
    match tls {
        rustls::Error::NoCertificatesPresented => HandshakeResult::NoClientCert,
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => HandshakeResult::UnknownCa,
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => HandshakeResult::Expired,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                HandshakeResult::BadIdentity
            }
            CertificateError::ApplicationVerificationFailure => HandshakeResult::Denied,
            _ => HandshakeResult::Error,
        },
        _ => HandshakeResult::Error,
    }
}

fn provider_algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGS: OnceLock<WebPkiSupportedAlgorithms> = OnceLock::new();
    ALGS.get_or_init(|| rustls::crypto::ring::default_provider().signature_verification_algorithms)
}

/// The signature algorithms certificate chains may use.
pub fn signature_algorithms(
) -> &'static [&'static dyn rustls_pki_types::SignatureVerificationAlgorithm] {
    provider_algorithms().all
}

/// Verifies `end_entity` + `intermediates` against the current roots and the SVID rules.
fn verify_peer(
    store: &CredentialStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(LeafInfo, Arc<super::credentials::Credentials>), VerifyError> {
    let creds = store.load().ok_or(VerifyError::NotReady)?;
    let ee =
        webpki::EndEntityCert::try_from(end_entity).map_err(|_| VerifyError::BadCertificate)?;
    ee.verify_for_usage(
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
    creds.remember_issuer(intermediates.last().unwrap_or(end_entity));
    Ok((leaf, creds))
}

/// Authorizes a resumed session's peer chain as a full handshake would (rule 8): its validity
/// period now, and its chain against the current roots (a signature check only the first time
/// an issuer is seen under these roots). The caller still decides the intention.
pub fn reverify_resumed(
    store: &CredentialStore,
    chain: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
) -> Result<LeafInfo, VerifyError> {
    let creds = store.load().ok_or(VerifyError::NotReady)?;
    let end_entity = chain.first().ok_or(VerifyError::BadCertificate)?;
    let leaf = check_leaf(end_entity, Some(&creds.leaf.id.trust_domain))
        .map_err(VerifyError::BadIdentity)?;
    if !leaf.valid_at(crate::now_unix()) {
        return Err(VerifyError::Expired);
    }
    let top = chain.last().unwrap_or(end_entity);
    if creds.knows_issuer(top) {
        return Ok(leaf);
    }
    tracing::debug!(
        "a resumed session's issuer is new under the current roots; verifying the chain"
    );
    verify_peer(store, end_entity, &chain[1..], UnixTime::now(), usage).map(|(l, _)| l)
}

/// The metric label for a refusal found outside rustls (resumed sessions).
pub fn result_of(e: &VerifyError) -> HandshakeResult {
    match e {
        VerifyError::UnknownCa => HandshakeResult::UnknownCa,
        VerifyError::Expired => HandshakeResult::Expired,
        VerifyError::BadIdentity(_) | VerifyError::WrongService => HandshakeResult::BadIdentity,
        VerifyError::Denied => HandshakeResult::Denied,
        VerifyError::NotReady | VerifyError::BadCertificate => HandshakeResult::Error,
    }
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
        let (leaf, _) = verify_peer(
            &self.credentials,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        // Rule 6: no snapshot yet means deny.
        let allowed = self.intentions.authorize(&leaf.id, &self.local_service);
        if allowed {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(VerifyError::Denied.into())
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Mesh connections are TLS 1.3 only; the config never offers 1.2.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, provider_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider_algorithms().supported_schemes()
    }
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
        let (leaf, _) = verify_peer(
            &self.credentials,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !self.expects(&leaf.id) {
            return Err(VerifyError::WrongService.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, provider_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider_algorithms().supported_schemes()
    }
}
