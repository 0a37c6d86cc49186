//! The handshake-signature half of every ward certificate verifier: the proxy's (both ways)
//! and the control-plane client's. ward's connections are TLS 1.3 only, so a TLS 1.2
//! signature is refused, and a TLS 1.3 one is checked with the provider's algorithms (`provider.rs`).
//! A verifier's `impl` writes [`crate::tls13_signatures!`] in place of the three methods.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::CertificateDer;
use std::sync::OnceLock;

/// The provider's signature algorithms, for certificate chains and handshake signatures.
pub fn algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGS: OnceLock<WebPkiSupportedAlgorithms> = OnceLock::new();
    ALGS.get_or_init(|| super::provider::provider().signature_verification_algorithms)
}

/// No ward config offers TLS 1.2, so a TLS 1.2 signature is never valid.
pub fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

pub fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
}

pub fn schemes() -> Vec<SignatureScheme> {
    algorithms().supported_schemes()
}

/// The signature methods of a `ServerCertVerifier` or `ClientCertVerifier`, written inside its
/// `impl`: TLS 1.2 refused, TLS 1.3 checked with [`algorithms`].
#[macro_export]
macro_rules! tls13_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &::rustls::pki_types::CertificateDer<'_>,
            _dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            $crate::tls::signatures::refuse_tls12()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            $crate::tls::signatures::verify_tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            $crate::tls::signatures::schemes()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls12_signatures_are_refused_and_tls13_offers_p256() {
        assert_eq!(
            refuse_tls12().err(),
            Some(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered
            ))
        );
        // ward's keys are ECDSA P-256: a verifier that did not offer it could verify no peer.
        assert!(schemes().contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
    }
}
