//! Real certificates for the unit tests: CAs, X.509-SVIDs and the stores and configs built
//! from them.

use crate::inputs::ProxyInputs;
use crate::intentions::{IntentionSnapshot, IntentionStore};
use crate::tls::{CredentialStore, Credentials};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};
use ward_config::intentions::{Action, Rule, Source};
use ward_config::proxy::{Limits, ServiceConfig};
use ward_config::{Name, SpiffeId};

pub const TRUST_DOMAIN: &str = "mesh.test";

/// A certificate, and the issuer it makes for the next one.
pub struct Signer {
    pub der: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
    pub not_after: i64,
}

/// A CA named `name` (pathLen 0 unless it is a root), signed by `by` (a root if `None`),
/// valid until `days` from now, with `key` (a new one if `None`).
pub fn ca(name: &str, by: Option<&Signer>, days: i64, key: Option<&KeyPair>) -> Signer {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(match by {
        Some(_) => BasicConstraints::Constrained(0),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - Duration::days(3);
    p.not_after = now + Duration::days(days);
    let key = match key {
        Some(k) => KeyPair::from_pem(&k.serialize_pem()).unwrap(),
        None => KeyPair::generate().unwrap(),
    };
    let cert = match by {
        Some(by) => p.signed_by(&key, &by.issuer),
        None => p.self_signed(&key),
    }
    .unwrap();
    Signer {
        der: cert.der().clone(),
        not_after: p.not_after.unix_timestamp(),
        issuer: Issuer::new(p, key),
    }
}

/// The SPIFFE ID of `service` in namespace `default` of the test trust domain.
pub fn id(service: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/default/svc/{service}")).unwrap()
}

/// An X.509-SVID for `uri`, valid from `from` to `until` (offsets from now), signed by `by`.
pub fn svid(uri: &str, by: &Signer, from: Duration, until: Duration) -> (Signer, KeyPair) {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "svid");
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now + from;
    p.not_after = now + until;
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &by.issuer).unwrap();
    let copy = KeyPair::from_pem(&key.serialize_pem()).unwrap();
    let signer = Signer {
        der: cert.der().clone(),
        not_after: p.not_after.unix_timestamp(),
        issuer: Issuer::new(p, key),
    };
    (signer, copy)
}

/// An X.509-SVID for `service`, valid for two more days, signed by `by`.
pub fn leaf(service: &str, by: &Signer) -> (Signer, KeyPair) {
    svid(
        &id(service).to_string(),
        by,
        -Duration::hours(1),
        Duration::days(2),
    )
}

pub fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::try_from(key.serialize_der()).unwrap()
}

/// A store holding `service`'s credentials under `roots`, through `int`.
pub fn store_for(service: &str, int: &Signer, roots: &[&Signer]) -> Arc<CredentialStore> {
    let (own, key) = leaf(service, int);
    let store = CredentialStore::default();
    store.store(
        Credentials::from_der(
            vec![own.der, int.der.clone()],
            key_der(&key),
            roots.iter().map(|r| r.der.clone()).collect(),
        )
        .unwrap(),
    );
    Arc::new(store)
}

/// A store holding `inventory`'s credentials under `root`, through `int`.
pub fn store(root: &Signer, int: &Signer) -> CredentialStore {
    Arc::into_inner(store_for("inventory", int, &[root])).unwrap()
}

/// Intentions for a service of namespace `default`: `default`, with `allow` as exceptions.
pub fn snapshot(version: u64, default: Action, allow: &[&str]) -> IntentionSnapshot {
    let rules = allow
        .iter()
        .map(|s| Rule::l4(Source::parse(s).unwrap(), Action::Allow))
        .collect();
    IntentionSnapshot::new(version, default, rules, &Name::new("default").unwrap())
}

/// A store holding [`snapshot`] version 1.
pub fn intentions(default: Action, allow: &[&str]) -> Arc<IntentionStore> {
    let store = IntentionStore::default();
    store.publish(snapshot(1, default, allow));
    Arc::new(store)
}

/// What the listeners of `service` (namespace `default`) read, with default limits.
pub fn inputs(
    service: &str,
    credentials: Arc<CredentialStore>,
    intentions: Arc<IntentionStore>,
) -> Arc<ProxyInputs> {
    let service = ServiceConfig {
        name: Name::new(service).unwrap(),
        namespace: Name::new("default").unwrap(),
        trust_domain: None,
    };
    Arc::new(ProxyInputs::new(
        service,
        credentials,
        intentions,
        Limits::default(),
    ))
}
