//! The gRPC listener's TLS: TLS 1.3 only, the server's own certificate (rotated in place), and
//! an optional client certificate verified against the mesh roots. A verified workload
//! certificate becomes the call's [`MeshPeer`]: the only source of a `Mesh.*` caller's identity.

use crate::ca::Ca;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use ward_config::identity::{escape_peer_value, SpiffeId};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What the server knows about the other end of a gRPC connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// Set when the client presented a chain verified against the mesh roots that names a
    /// workload SPIFFE ID of this trust domain.
    pub mesh: Option<MeshPeer>,
    /// The client presented a verified certificate that is not a workload identity.
    pub non_workload_cert: bool,
}

/// A caller authenticated by its mesh certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshPeer {
    pub spiffe_id: SpiffeId,
    /// Hex of the first 16 bytes of SHA-256 over the leaf's SubjectPublicKeyInfo.
    pub instance_id: String,
    /// The leaf's notAfter, Unix seconds.
    pub not_after: i64,
    /// The leaf's serial, lowercase hex.
    pub serial: String,
}

/// Reads the mesh identity out of a verified leaf.
pub fn mesh_peer(leaf: &CertificateDer<'_>, ca: &Ca) -> Option<MeshPeer> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return None;
    };
    let id = match SpiffeId::parse(uri) {
        Ok(id) => id,
        Err(_) => {
            tracing::debug!(uri = %escape_peer_value(uri), "client certificate is not a workload ID");
            return None;
        }
    };
    if &id.trust_domain != ca.trust_domain() {
        return None;
    }
    if cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca)
    {
        return None;
    }
    let digest = Sha256::digest(cert.public_key().raw);
    Some(MeshPeer {
        spiffe_id: id,
        instance_id: hex::encode(&digest[..16]),
        not_after: cert.validity().not_after.timestamp(),
        serial: hex::encode(cert.raw_serial()),
    })
}

/// The HTTP/2 client connection preface (RFC 9113 3.4): every gRPC client's first bytes.
pub(crate) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One accepted TLS connection, carrying its [`PeerInfo`] into tonic's request extensions.
pub struct MeshConn {
    pub(crate) inner: tokio_rustls::server::TlsStream<TcpStream>,
    pub(crate) info: PeerInfo,
    /// Its `max_connections` slot, held until tonic drops the connection.
    pub(crate) _slot: tokio::sync::OwnedSemaphorePermit,
    /// How much of the preface, read before the connection was handed to tonic, it has
    /// been given back.
    pub(crate) preface_given: usize,
}

impl tonic::transport::server::Connected for MeshConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.preface_given < H2_PREFACE.len() {
            let rest = &H2_PREFACE[self.preface_given..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.preface_given += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The server's own certificate, swapped in place before it expires.
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<OffsetDateTime>,
    issued_at: RwLock<OffsetDateTime>,
    ips: Vec<IpAddr>,
    dns: Vec<String>,
    ttl: std::time::Duration,
}

/// Why the server certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerCertError {
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error("cannot load the server key: {0}")]
    Key(rustls::Error),
}

impl ServerCert {
    /// Issues the first certificate for `ips` and `dns`.
    pub fn new(
        ca: &Ca,
        ips: Vec<IpAddr>,
        dns: Vec<String>,
        ttl: std::time::Duration,
    ) -> Result<Self, ServerCertError> {
        let (ck, issued) = Self::issue(ca, &ips, &dns, ttl)?;
        Ok(Self {
            current: RwLock::new(Arc::new(ck)),
            not_after: RwLock::new(issued.not_after),
            issued_at: RwLock::new(OffsetDateTime::now_utc()),
            ips,
            dns,
            ttl,
        })
    }

    fn issue(
        ca: &Ca,
        ips: &[IpAddr],
        dns: &[String],
        ttl: std::time::Duration,
    ) -> Result<(CertifiedKey, crate::ca::Issued), ServerCertError> {
        let (issued, key) = ca.issue_server(ips, dns, ttl)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer =
            ward_proxy::tls::provider::ecdsa_signing_key(&der).map_err(ServerCertError::Key)?;
        let chain = vec![issued.der.clone(), ca.intermediate().clone()];
        Ok((CertifiedKey::new(chain, signer), issued))
    }

    /// Re-issues when half the lifetime has passed; returns whether it did.
    pub fn refresh_if_due(&self, ca: &Ca) -> Result<bool, ServerCertError> {
        let now = OffsetDateTime::now_utc();
        let issued_at = *self.issued_at.read().unwrap_or_else(|e| e.into_inner());
        let not_after = *self.not_after.read().unwrap_or_else(|e| e.into_inner());
        let half = issued_at + (not_after - issued_at) / 2;
        if now < half {
            return Ok(false);
        }
        let (ck, issued) = Self::issue(ca, &self.ips, &self.dns, self.ttl)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        *self.not_after.write().unwrap_or_else(|e| e.into_inner()) = issued.not_after;
        *self.issued_at.write().unwrap_or_else(|e| e.into_inner()) = now;
        Ok(true)
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The rustls config of the gRPC listener.
pub fn tls_config(
    ca: &Ca,
    cert: Arc<ServerCert>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = ward_proxy::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for r in ca.roots() {
        roots.add(r.der.clone())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption and no early data: every connection is a full, fully verified handshake.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}
