//! rustls configs for mesh connections: TLS 1.3 only, ECDSA P-256 keys, no early data, and
//! resumption only under the rules of `tickets.rs`.

use super::credentials::CredentialStore;
use super::provider::provider;
use super::verify::{InboundVerifier, OutboundVerifier};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use std::sync::Arc;

/// Presents the current certificate from the store, so a rotation applies to the next
/// handshake.
#[derive(Debug)]
pub struct StoreResolver(pub Arc<CredentialStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().map(|c| c.key.clone())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The inbound acceptor's config.
pub fn server_config(
    credentials: Arc<CredentialStore>,
    verifier: InboundVerifier,
    tickets: Option<Arc<super::tickets::EpochTicketer>>,
) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the provider supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreResolver(credentials)));
    // Security rule 8 (resumption and early data, docs/security.md): resumption only through
    // tickets whose keys follow the intentions and roots (see tickets.rs); never early data; no
    // server-side session cache.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.max_early_data_size = 0;
    match tickets {
        Some(t) => {
            cfg.ticketer = t;
            cfg.send_tls13_tickets = 2;
        }
        None => cfg.send_tls13_tickets = 0,
    }
    Arc::new(cfg)
}

/// The config for connections to one upstream service, offering `alpn` (`ward-mux/1` for a tcp
/// upstream, `h2` for an http one).
///
/// Each config has its own session cache. The outbound builds a new config whenever its own
/// certificate or roots change, so it never resumes a session that carries a certificate it has
/// replaced (a resumed session keeps the certificates of the handshake it came from, and so do
/// the tickets issued on it); connections still in flight put their tickets in the old cache,
/// which nothing reads any more.
pub fn client_config(
    credentials: Arc<CredentialStore>,
    verifier: Arc<OutboundVerifier>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(StoreResolver(credentials)));
    // Resume with tickets from the upstream's inbound (which re-authorizes resumed sessions);
    // never send early data.
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(1024);
    cfg.enable_early_data = false;
    // The verifier checks the SPIFFE ID; SNI would only leak the service name in clear.
    cfg.enable_sni = false;
    // A tcp upstream asks for the tunnel (an inbound that does not select it gets one connection
    // per client connection); an http upstream asks for HTTP/2.
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}
