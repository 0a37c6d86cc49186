//! The rogue client: a plain rustls client that tries its luck against a sidecar's inbound.

use super::pki::LeafFiles;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub enum Outcome {
    /// The sidecar aborted the handshake with this TLS alert.
    Refused(String),
    /// The connection went through: the attack worked.
    Admitted,
    /// Something else went wrong.
    Failed(String),
}

impl Outcome {
    pub fn refused(&self) -> bool {
        matches!(self, Outcome::Refused(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Refused(alert) => write!(f, "refused with TLS alert {alert}"),
            Outcome::Admitted => f.write_str("ADMITTED (this must not happen)"),
            Outcome::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// The rogue does not care who the server is.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    ward_proxy::tls13_signatures!();
}

fn alert_of(e: &std::io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(format!("{a:?}")),
        _ => None,
    }
}

pub async fn attempt(addr: SocketAddr, leaf: Option<&LeafFiles>) -> Outcome {
    match tokio::time::timeout(Duration::from_secs(10), try_connect(addr, leaf)).await {
        Ok(o) => o,
        Err(_) => Outcome::Failed("timed out".into()),
    }
}

async fn try_connect(addr: SocketAddr, leaf: Option<&LeafFiles>) -> Outcome {
    let provider = ward_proxy::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let config = match leaf {
        None => builder.with_no_client_auth(),
        Some(l) => {
            let chain = match CertificateDer::pem_file_iter(&l.cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(format!("cannot read {}: {e}", l.cert.display())),
            };
            let key = match PrivateKeyDer::from_pem_file(&l.key) {
                Ok(k) => k,
                Err(e) => return Outcome::Failed(format!("cannot read {}: {e}", l.key.display())),
            };
            match builder.with_client_auth_cert(chain, key) {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(e.to_string()),
            }
        }
    };
    let tcp = match TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("inventory.ward.local").expect("valid name");
    let mut tls = match connector.connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => {
            return alert_of(&e)
                .map(Outcome::Refused)
                .unwrap_or_else(|| Outcome::Failed(e.to_string()))
        }
    };
    // In TLS 1.3 the client finishes before the server has judged its certificate: the verdict
    // arrives on the first read.
    let _ = tls
        .write_all(b"GET /stock/widget HTTP/1.1\r\nhost: inventory\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(0) => Outcome::Failed("closed without an alert".into()),
        Ok(_) => Outcome::Admitted,
        Err(e) => alert_of(&e)
            .map(Outcome::Refused)
            .unwrap_or_else(|| Outcome::Failed(e.to_string())),
    }
}
