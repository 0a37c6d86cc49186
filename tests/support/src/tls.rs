//! A rustls client (TLS 1.3 only) for talking to a ward inbound directly.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct,
    RootCertStore, SignatureScheme, StreamOwned,
};

use super::pki::{uri_sans_of_der, Identity};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// What the client requires of the server's certificate.
#[derive(Clone, Debug, Default)]
pub struct ServerCheck {
    /// Verify the chain to these roots (None: accept any chain, only record the leaf).
    pub roots: Option<Vec<CertificateDer<'static>>>,
    /// Require exactly this one URI SAN on the leaf.
    pub spiffe_id: Option<String>,
}

impl ServerCheck {
    /// Accept any server certificate (only record it).
    pub fn any() -> Self {
        ServerCheck::default()
    }

    /// Chain to `root` and carry exactly `spiffe_id`.
    pub fn mesh(root: &CertificateDer<'static>, spiffe_id: &str) -> Self {
        ServerCheck {
            roots: Some(vec![root.clone()]),
            spiffe_id: Some(spiffe_id.to_string()),
        }
    }
}

#[derive(Debug)]
struct RecordingVerifier {
    roots: Option<RootCertStore>,
    spiffe_id: Option<String>,
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        if let Some(roots) = &self.roots {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        if let Some(want) = &self.spiffe_id {
            let got = uri_sans_of_der(end_entity);
            if got.len() != 1 || &got[0] != want {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How a connection attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The peer sent this fatal alert.
    Alert(AlertDescription),
    /// Any other rustls error (e.g. our own verifier refused the server).
    Tls(String),
    /// TCP closed without an alert.
    Closed,
    /// No answer within the timeout.
    Timeout,
    Io(String),
}

/// The rustls error inside an `io::Error` from a rustls stream, if any.
pub fn rustls_error(e: &io::Error) -> Option<rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
}

pub fn classify(e: &io::Error) -> Failure {
    match rustls_error(e) {
        Some(rustls::Error::AlertReceived(a)) => Failure::Alert(a),
        Some(other) => Failure::Tls(format!("{other:?}")),
        None => match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Closed,
            _ => Failure::Io(format!("{e}")),
        },
    }
}

pub struct TlsClient {
    pub stream: StreamOwned<ClientConnection, TcpStream>,
    seen: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl TlsClient {
    /// The leaf certificate the server presented.
    pub fn server_leaf(&self) -> Option<CertificateDer<'static>> {
        self.seen.lock().unwrap().clone()
    }

    /// Normalized serial of the server's leaf.
    pub fn server_serial(&self) -> Option<String> {
        self.server_leaf().map(|c| super::pki::serial_of_der(&c))
    }

    /// Writes `msg`, then reads until exactly `msg.len()` bytes came back; returns them.
    pub fn echo(&mut self, msg: &[u8]) -> Result<Vec<u8>, Failure> {
        self.stream.write_all(msg).map_err(|e| classify(&e))?;
        self.stream.flush().map_err(|e| classify(&e))?;
        let mut got = Vec::with_capacity(msg.len());
        let mut buf = [0u8; 4096];
        while got.len() < msg.len() {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(classify(&e)),
            }
        }
        Ok(got)
    }
}

/// TCP connect + TLS 1.3 handshake to `addr`, presenting `identity` (or no certificate).
/// In TLS 1.3 the server judges the client certificate after the client has finished, so a
/// refusal usually shows on the first read, see [`probe`].
pub fn tls_connect(
    addr: SocketAddr,
    identity: Option<&Identity>,
    check: &ServerCheck,
) -> Result<TlsClient, Failure> {
    let provider = provider();
    let seen = Arc::new(Mutex::new(None));
    let roots = check.roots.as_ref().map(|rs| {
        let mut store = RootCertStore::empty();
        for r in rs {
            store.add(r.clone()).expect("add root");
        }
        store
    });
    let verifier = RecordingVerifier {
        roots,
        spiffe_id: check.spiffe_id.clone(),
        seen: seen.clone(),
        provider: provider.clone(),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain_der.clone(), id.key_der())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| Failure::Io(format!("connect {addr}: {e}")))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    tcp.set_write_timeout(Some(Duration::from_secs(10))).ok();
    tcp.set_nodelay(true).ok();
    let server_name = ServerName::IpAddress(addr.ip().into());
    let conn = ClientConnection::new(Arc::new(config), server_name)
        .map_err(|e| Failure::Tls(format!("{e:?}")))?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| classify(&e))?;
    }
    Ok(TlsClient { stream, seen })
}

/// Result of [`probe`].
pub struct Probe {
    pub result: Result<(), Failure>,
    /// Normalized serial of the server leaf, if the server got as far as presenting one.
    pub server_serial: Option<String>,
}

/// Handshake, send a line, expect it echoed back. `Ok(())` only if the echo came back.
pub fn probe(addr: SocketAddr, identity: Option<&Identity>, check: &ServerCheck) -> Probe {
    match tls_connect(addr, identity, check) {
        Err(f) => Probe {
            result: Err(f),
            server_serial: None,
        },
        Ok(mut c) => {
            let msg = b"ward-probe-ping\n";
            let result = match c.echo(msg) {
                Ok(got) if got == msg => Ok(()),
                Ok(got) => Err(Failure::Io(format!(
                    "echo mismatch: {:?}",
                    String::from_utf8_lossy(&got)
                ))),
                Err(f) => Err(f),
            };
            Probe {
                result,
                server_serial: c.server_serial(),
            }
        }
    }
}

/// Accepts any server certificate: for tests that judge the session, not the server.
#[derive(Debug)]
pub struct AcceptAny(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
