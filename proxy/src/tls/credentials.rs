//! The proxy's own certificate, key and trust roots, published as one immutable snapshot.
//!
//! New handshakes read the current snapshot through a lock-free load; a rotation swaps it and
//! leaves established connections untouched.

use super::svid::{check_leaf, LeafInfo, PathValidity, SvidError};
use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use std::sync::Arc;

/// Why a set of credentials was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("holds no PEM private key")]
    NoKey,
    #[error("private key is not a supported type (ECDSA P-256/P-384, Ed25519 or RSA)")]
    BadKey,
    #[error("private key does not match the certificate")]
    KeyMismatch,
    #[error("holds no root certificate")]
    NoRoots,
    #[error("root certificate cannot be used as a trust anchor")]
    BadRoot,
    #[error("leaf certificate is not a valid SVID: {0}")]
    Leaf(#[from] SvidError),
    #[error("certificate does not chain to the roots: {0}")]
    Chain(webpki::Error),
}

/// Which input a [`CredentialError`] is about, so callers can name the file or field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialPart {
    Certificate,
    Key,
    Roots,
}

impl CredentialError {
    pub fn part(&self) -> CredentialPart {
        match self {
            CredentialError::NoKey | CredentialError::BadKey | CredentialError::KeyMismatch => {
                CredentialPart::Key
            }
            CredentialError::NoRoots | CredentialError::BadRoot => CredentialPart::Roots,
            _ => CredentialPart::Certificate,
        }
    }
}

/// A verified certificate chain, its key, and the roots that peers must chain to.
pub struct Credentials {
    pub key: Arc<CertifiedKey>,
    pub roots: Vec<TrustAnchor<'static>>,
    pub root_ders: Vec<CertificateDer<'static>>,
    pub leaf: LeafInfo,
    /// Peer chains (by [`chain_key`]) verified to these roots, with the validity of the path
    /// the verifier built: what a full handshake established, for the session's later uses
    /// (its resumptions, its tunnel streams) without another signature check.
    verified_paths: std::sync::Mutex<std::collections::HashMap<ChainKey, PathValidity>>,
}

/// At most this many verified chains are remembered per set of credentials.
pub(crate) const MAX_VERIFIED_PATHS: usize = 4096;

/// SHA-256 over a presented chain (leaf first), each certificate length-prefixed.
pub type ChainKey = [u8; 32];

/// The key of the chain `end_entity` + `intermediates`, exactly as the peer presented it (and
/// as rustls keeps it with the session).
pub fn chain_key(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> ChainKey {
    let mut ctx = super::provider::Sha256::default();
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        ctx.update(&(der.len() as u64).to_be_bytes());
        ctx.update(der);
    }
    ctx.finish()
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Credentials")
            .field("leaf", &self.leaf)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl Credentials {
    /// Builds credentials from PEM: `chain` is the leaf then its intermediates, `key` a
    /// PKCS#8/SEC1 private key, `roots` one or more root certificates (several during a root
    /// rotation).
    pub fn from_pem(chain: &[u8], key: &[u8], roots: &[u8]) -> Result<Self, CredentialError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|_| CredentialError::NoCertificate)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| CredentialError::NoKey)?;
        let root_ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(roots)
            .collect::<Result<_, _>>()
            .map_err(|_| CredentialError::NoRoots)?;
        Self::from_der(chain, key, root_ders)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        root_ders: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CredentialError> {
        let leaf_der = chain.first().ok_or(CredentialError::NoCertificate)?;
        if root_ders.is_empty() {
            return Err(CredentialError::NoRoots);
        }
        let roots = root_ders
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|_| CredentialError::BadRoot)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let leaf = check_leaf(leaf_der, None)?;
        let ee = webpki::EndEntityCert::try_from(leaf_der)
            .map_err(|_| CredentialError::Leaf(SvidError::Malformed))?;
        ee.verify_for_usage(
            super::verify::signature_algorithms(),
            &roots,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(CredentialError::Chain)?;
        let signer = super::provider::signing_key(&key).map_err(|_| CredentialError::BadKey)?;
        let key = CertifiedKey::new(chain, signer);
        match key.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err(CredentialError::KeyMismatch),
        }
        Ok(Self {
            key: Arc::new(key),
            roots,
            root_ders,
            leaf,
            verified_paths: Default::default(),
        })
    }
}

impl Credentials {
    /// Remembers that the chain `key` verified to these roots along a path valid for `validity`.
    pub fn remember_path(&self, key: ChainKey, validity: PathValidity) {
        if let Ok(mut paths) = self.verified_paths.lock() {
            if paths.len() >= MAX_VERIFIED_PATHS && !paths.contains_key(&key) {
                // Full: drop one entry (whichever the map yields first), not all of them, so
                // many new peers cost the known ones at most a re-verification each.
                if let Some(old) = paths.keys().next().copied() {
                    paths.remove(&old);
                }
            }
            paths.insert(key, validity);
        }
    }

    /// The validity of the path the chain `key` verified along under these roots, if it did.
    pub fn verified_path(&self, key: &ChainKey) -> Option<PathValidity> {
        self.verified_paths
            .lock()
            .ok()
            .and_then(|paths| paths.get(key).copied())
    }
}

/// The current credentials; empty until the first ones arrive.
pub struct CredentialStore {
    current: ArcSwapOption<Credentials>,
    /// Bumped whenever the set of roots changes.
    roots_changed: tokio::sync::watch::Sender<u64>,
    /// Bumped on every new certificate or roots.
    changed: tokio::sync::watch::Sender<u64>,
    /// Session-ticket keys to replace before new credentials are visible (security rule 8,
    /// resumption and early data, docs/security.md).
    tickets: std::sync::OnceLock<Arc<super::tickets::EpochTicketer>>,
}

impl Default for CredentialStore {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            roots_changed: tokio::sync::watch::channel(0).0,
            changed: tokio::sync::watch::channel(0).0,
            tickets: std::sync::OnceLock::new(),
        }
    }
}

impl CredentialStore {
    pub fn load(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    pub fn store(&self, creds: Credentials) {
        metrics::gauge!(crate::metrics::CERT_EXPIRY).set(creds.leaf.not_after as f64);
        let new_roots = self
            .current
            .load()
            .as_ref()
            .is_none_or(|old| old.root_ders != creds.root_ders);
        // No client may resume a session that saw our previous certificate or roots.
        if let Some(t) = self.tickets.get() {
            t.rotate();
        }
        self.current.store(Some(Arc::new(creds)));
        if new_roots {
            self.roots_changed.send_modify(|g| *g += 1);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// Rotates `tickets` on every new certificate or roots, before they become visible.
    pub fn rotate_on_change(&self, tickets: Arc<super::tickets::EpochTicketer>) {
        let _ = self.tickets.set(tickets);
    }

    /// Wakes on every new certificate or roots.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes whenever the roots change.
    pub fn subscribe_roots(&self) -> tokio::sync::watch::Receiver<u64> {
        self.roots_changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{ca, key_der, leaf, Signer};

    fn from(
        chain: &[&Signer],
        key: &rcgen::KeyPair,
        roots: &[&Signer],
    ) -> Result<Credentials, CredentialError> {
        Credentials::from_der(
            chain.iter().map(|c| c.der.clone()).collect(),
            key_der(key),
            roots.iter().map(|r| r.der.clone()).collect(),
        )
    }

    #[test]
    fn credentials_are_refused_with_the_part_at_fault() {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let other_root = ca("other root", None, 3650, None);
        let (own, key) = leaf("inventory", &int);
        let (_, other_key) = leaf("inventory", &int);
        let creds = from(&[&own, &int], &key, &[&root]).unwrap();
        assert_eq!(creds.leaf.id, crate::test_pki::id("inventory"));

        let part = |r: Result<Credentials, CredentialError>| {
            r.map(|_| ()).map_err(|e| (e.part(), e.to_string()))
        };
        let (p, e) = part(from(&[&own, &int], &other_key, &[&root])).unwrap_err();
        assert_eq!(
            (p, e.as_str()),
            (
                CredentialPart::Key,
                "private key does not match the certificate"
            )
        );
        let (p, e) = part(from(&[&own, &int], &key, &[])).unwrap_err();
        assert_eq!(
            (p, e.as_str()),
            (CredentialPart::Roots, "holds no root certificate")
        );
        let (p, e) = part(from(&[&own, &int], &key, &[&other_root])).unwrap_err();
        assert_eq!(p, CredentialPart::Certificate);
        assert!(
            e.starts_with("certificate does not chain to the roots"),
            "{e}"
        );
        // A CA certificate is no workload identity.
        let (p, e) = part(from(&[&int, &root], &key, &[&root])).unwrap_err();
        assert_eq!(p, CredentialPart::Certificate);
        assert_eq!(
            e,
            "leaf certificate is not a valid SVID: a CA certificate is used as a leaf"
        );
        let (p, e) = part(Credentials::from_pem(b"", b"", b"")).unwrap_err();
        assert_eq!(
            (p, e.as_str()),
            (CredentialPart::Key, "holds no PEM private key")
        );
        let key_pem = key.serialize_pem();
        let (p, e) = part(Credentials::from_pem(b"", key_pem.as_bytes(), b"")).unwrap_err();
        assert_eq!(
            (p, e.as_str()),
            (CredentialPart::Certificate, "holds no PEM certificate")
        );
    }

    #[test]
    fn roots_watchers_wake_only_when_the_roots_change() {
        let root = ca("root", None, 3650, None);
        let int = ca("intermediate", Some(&root), 30, None);
        let next_root = ca("next root", None, 3650, None);
        let store = CredentialStore::default();
        let (mut changed, mut roots) = (store.subscribe(), store.subscribe_roots());
        let renewed = |roots: &[&Signer]| {
            let (own, key) = leaf("inventory", &int);
            from(&[&own, &int], &key, roots).unwrap()
        };
        store.store(renewed(&[&root]));
        assert!(
            changed.has_changed().unwrap() && roots.has_changed().unwrap(),
            "first"
        );
        changed.mark_unchanged();
        roots.mark_unchanged();
        store.store(renewed(&[&root]));
        assert!(changed.has_changed().unwrap(), "a new certificate");
        assert!(!roots.has_changed().unwrap(), "the same roots");
        changed.mark_unchanged();
        store.store(renewed(&[&root, &next_root]));
        assert!(
            changed.has_changed().unwrap() && roots.has_changed().unwrap(),
            "new roots"
        );
    }
}
