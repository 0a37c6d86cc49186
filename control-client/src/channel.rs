//! The TLS channel to `ward server`. TLS 1.3 only; the server must chain to
//! `control_plane.ca_file` and carry exactly the URI SAN `spiffe://<td>/ward/server`, which no
//! CSR can obtain (security rule 1, who the server is, docs/security.md).

use crate::ClientError;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use ward_config::proxy::ControlPlaneConfig;
use ward_config::TrustDomain;
use ward_proxy::tls::CredentialStore;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a server address or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    Address(String),
    #[error("{0}")]
    CaFile(String),
}

/// Where the server is and how to recognise it.
pub struct ServerTarget {
    host: String,
    port: u16,
    verifier: Arc<ServerVerifier>,
}

impl ServerTarget {
    /// From the proxy config; errors name `control_plane.address` / `control_plane.ca_file`.
    pub fn new(
        cfg: &ControlPlaneConfig,
        trust_domain: Option<TrustDomain>,
    ) -> Result<Self, ClientError> {
        Self::parse(&cfg.address, &cfg.ca_file, trust_domain).map_err(|e| match e {
            TargetError::Address(m) => ClientError::Address(m),
            TargetError::CaFile(message) => ClientError::CaFile {
                path: cfg.ca_file.clone(),
                message,
            },
        })
    }

    /// From an `https://host:port` address and the PEM file of the CA that signs the server.
    pub fn parse(
        address: &str,
        ca_file: &std::path::Path,
        trust_domain: Option<TrustDomain>,
    ) -> Result<Self, TargetError> {
        let bad = || TargetError::Address(format!("{address:?} must be https://host:port"));
        let rest = address.strip_prefix("https://").ok_or_else(|| {
            TargetError::Address(format!("{address:?} must be an https:// address"))
        })?;
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((
                    h.trim_start_matches('[').trim_end_matches(']'),
                    p.parse().ok()?,
                ))
            })
            .ok_or_else(bad)?;
        if host.is_empty() || authority.contains('/') {
            return Err(bad());
        }
        let pem =
            std::fs::read(ca_file).map_err(|e| TargetError::CaFile(format!("cannot read: {e}")))?;
        let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|_| TargetError::CaFile("holds no PEM certificate".into()))?;
        if ders.is_empty() {
            return Err(TargetError::CaFile("holds no PEM certificate".into()));
        }
        let roots = ders
            .iter()
            .map(|d| webpki::anchor_from_trusted_cert(d).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                TargetError::CaFile("a certificate in it cannot be a trust anchor".into())
            })?;
        Ok(Self {
            host: host.to_owned(),
            port,
            verifier: Arc::new(ServerVerifier {
                roots,
                expected: trust_domain,
                learned: Mutex::new(None),
            }),
        })
    }

    /// The trust domain the server proved in its last handshake.
    pub fn trust_domain(&self) -> Option<TrustDomain> {
        self.verifier.learned.lock().ok().and_then(|t| t.clone())
    }

    /// Connects now (so the server's identity, and with it the trust domain, is known when
    /// this returns). With `credentials`, the current mesh certificate is presented.
    pub async fn connect(
        &self,
        credentials: Option<Arc<CredentialStore>>,
    ) -> Result<Channel, tonic::transport::Error> {
        let provider = ward_proxy::tls::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(self.verifier.clone());
        let mut tls = match credentials {
            Some(store) => builder
                .with_client_cert_resolver(Arc::new(ward_proxy::tls::config::StoreResolver(store))),
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"h2".to_vec()];
        tls.resumption = rustls::client::Resumption::disabled();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let host = self.host.clone();
        let port = self.port;
        let connect = tower::service_fn(move |_uri: http::Uri| {
            let connector = connector.clone();
            let host = host.clone();
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from(host)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        // The scheme here only labels requests: TLS is done by the connector above.
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        Endpoint::from_shared(format!("http://{authority}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector(connect)
            .await
    }
}

#[derive(Debug)]
struct ServerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    expected: Option<TrustDomain>,
    learned: Mutex<Option<TrustDomain>>,
}

/// The trust domain of a server identity `spiffe://<td>/ward/server`.
fn server_trust_domain(leaf: &[u8]) -> Option<TrustDomain> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    if cert.is_ca() {
        return None;
    }
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    let td = uri
        .strip_prefix("spiffe://")?
        .strip_suffix("/ward/server")?;
    TrustDomain::new(td).ok()
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        ee.verify_for_usage(
            ward_proxy::tls::verify::signature_algorithms(),
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            tracing::warn!(error = %e, "the control plane's certificate does not verify");
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        })?;
        let td = server_trust_domain(end_entity).ok_or_else(|| {
            tracing::warn!("the control plane's certificate is not a ward server identity");
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        })?;
        if self.expected.as_ref().is_some_and(|e| e != &td) {
            tracing::warn!(trust_domain = %td, "the control plane is in another trust domain");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        if let Ok(mut l) = self.learned.lock() {
            *l = Some(td);
        }
        Ok(ServerCertVerified::assertion())
    }

    ward_proxy::tls13_signatures!();
}
