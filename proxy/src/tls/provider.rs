//! The workspace's one crypto provider: every rustls config, verifier, signer and ticketer in
//! ward (proxy, control plane, control-plane client, CLI) takes its algorithms from here.
//!
//! aws-lc-rs rather than *ring*: it has the hybrid post-quantum key exchange X25519MLKEM768
//! (*ring* has no ML-KEM), so a recording of mesh traffic made today cannot be decrypted by a
//! future quantum computer, and AES-GCM code paths for the vector AES instructions of current
//! x86 servers. perf/profile-notes.md has the two providers measured side by side.

use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use std::sync::{Arc, OnceLock};

/// Key-exchange groups in order of preference. A ward client sends a key share for the hybrid
/// group and one for X25519 in the same ClientHello, so a classical server (OpenSSL 3.0, an older
/// ward) picks X25519 without a HelloRetryRequest; two ward sidecars agree on the hybrid. The
/// NIST curves stay for peers that offer nothing else.
static KX_GROUPS: [&dyn SupportedKxGroup; 4] = [
    kx_group::X25519MLKEM768,
    kx_group::X25519,
    kx_group::SECP256R1,
    kx_group::SECP384R1,
];

/// The provider, built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                kx_groups: KX_GROUPS.to_vec(),
                ..aws_lc_rs::default_provider()
            })
        })
        .clone()
}

/// A signer for a private key (PKCS#8, SEC1 or PKCS#1 DER) with the provider's algorithms.
pub fn signing_key(
    key: &rustls_pki_types::PrivateKeyDer<'_>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    aws_lc_rs::sign::any_supported_type(key)
}

/// An ECDSA signer for a private key (PKCS#8 or SEC1 DER): what the control plane's own
/// certificate uses, refusing any other kind of key.
pub fn ecdsa_signing_key(
    key: &rustls_pki_types::PrivateKeyDer<'_>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    aws_lc_rs::sign::any_ecdsa_type(key)
}

/// Session-ticket keys from the provider (random keys, never written anywhere).
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    aws_lc_rs::Ticketer::new()
}

/// SHA-256, fed in parts.
pub struct Sha256(::aws_lc_rs::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self(::aws_lc_rs::digest::Context::new(
            &::aws_lc_rs::digest::SHA256,
        ))
    }
}

impl Sha256 {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::default();
    h.update(data);
    h.finish()
}

/// The name of a key-exchange group as metrics and logs show it (a bounded set).
pub fn group_name(group: Option<&'static dyn SupportedKxGroup>) -> &'static str {
    use rustls::NamedGroup;
    match group.map(|g| g.name()) {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(_) => "other",
        None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_post_quantum_group_is_preferred() {
        let names: Vec<_> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(names[0], rustls::NamedGroup::X25519MLKEM768);
        assert_eq!(names[1], rustls::NamedGroup::X25519);
    }

    #[test]
    fn sha256_of_abc() {
        let mut parts = Sha256::default();
        parts.update(b"a");
        parts.update(b"bc");
        let whole = parts.finish();
        assert_eq!(whole, sha256(b"abc"));
        let hex: String = whole.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
