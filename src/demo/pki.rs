//! The demo's certificates: a mesh root and intermediate, service leaves, and the attacker's
//! forgeries. (Until the control plane issues them, the demo plays the CA itself.)

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

pub const TRUST_DOMAIN: &str = "ward.local";

pub fn spiffe_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/svc/{service}")
}

pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf's PEM files on disk.
pub struct LeafFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(30);
    p
}

impl Ca {
    /// A root and an intermediate (pathLen 0) under it; leaves are signed by the intermediate.
    pub fn new(name: &str) -> anyhow::Result<(Ca, Ca)> {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(&format!("{name} root"), None);
        let root_cert = root_params.self_signed(&root_key)?;
        let root = Ca {
            cert_pem: root_cert.pem(),
            issuer: Issuer::new(root_params, root_key),
        };
        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let int_params = ca_params(&format!("{name} intermediate"), Some(0));
        let int_cert = int_params.signed_by(&int_key, &root.issuer)?;
        let intermediate = Ca {
            cert_pem: int_cert.pem(),
            issuer: Issuer::new(int_params, int_key),
        };
        Ok((root, intermediate))
    }

    /// A leaf for `service`, with its chain (leaf + this intermediate) written under `dir`.
    pub fn leaf(&self, dir: &Path, service: &str, file_stem: &str) -> anyhow::Result<LeafFiles> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = leaf_params(service)?.signed_by(&key, &self.issuer)?;
        write_leaf(dir, file_stem, &(cert.pem() + &self.cert_pem), &key)
    }
}

fn leaf_params(service: &str) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, service);
    p.subject_alt_names = vec![SanType::URI(spiffe_id(service).try_into()?)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(1);
    p.not_after = now + Duration::hours(24);
    Ok(p)
}

/// A self-signed certificate that claims `service`'s SPIFFE ID.
pub fn self_signed(dir: &Path, service: &str, file_stem: &str) -> anyhow::Result<LeafFiles> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = leaf_params(service)?.self_signed(&key)?;
    write_leaf(dir, file_stem, &cert.pem(), &key)
}

pub fn write_leaf(
    dir: &Path,
    stem: &str,
    chain_pem: &str,
    key: &KeyPair,
) -> anyhow::Result<LeafFiles> {
    let cert = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cert, chain_pem)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    Ok(LeafFiles {
        cert,
        key: key_path,
    })
}

pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

/// PEM text of one DER object.
pub fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}
