//! ward-perf: benchmarks for ward.
//!
//! - `benches/handshake_check.rs`, `benches/copy.rs`: criterion micro-benchmarks of the hot path
//!   (`cargo bench -p ward-perf`).
//! - `run.sh`: the end-to-end load harness against haproxy, nginx and stunnel (see README.md).
//! - this library: the PKI both use, root -> intermediate (pathLen 0) -> ECDSA P-256
//!   X.509-SVID leaves, as `ward server` would issue them.

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

/// The trust domain of the benchmark PKI.
pub const TRUST_DOMAIN: &str = "ward.local";

/// `spiffe://<td>/ns/default/svc/<service>`.
pub fn spiffe_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/svc/{service}")
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A leaf: PEM of the leaf followed by the intermediate, and its PKCS#8 key.
pub struct Leaf {
    /// Leaf then intermediate, as `[tls] cert_file` wants.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
}

/// Root and intermediate CA.
pub struct Pki {
    /// The root certificate (PEM), the trust anchor.
    pub root_pem: String,
    /// The intermediate certificate (PEM).
    pub intermediate_pem: String,
    intermediate: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str, path_len: Option<u8>, days: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(days);
    p.serial_number = Some(random_serial());
    p
}

impl Pki {
    /// A fresh root (10 years) and intermediate (1 year, pathLen 0), ECDSA P-256.
    pub fn new() -> Result<Self, rcgen::Error> {
        let root_params = ca_params("ward perf root", None, 3650);
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root_cert = root_params.self_signed(&root_key)?;
        let root = Issuer::new(root_params, root_key);

        let mut int_params = ca_params("ward perf intermediate", Some(0), 365);
        int_params.use_authority_key_identifier_extension = true;
        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let int_cert = int_params.signed_by(&int_key, &root)?;
        Ok(Self {
            root_pem: root_cert.pem(),
            intermediate_pem: int_cert.pem(),
            intermediate: Issuer::new(int_params, int_key),
        })
    }

    /// An X.509-SVID for `service`: one URI SAN (its SPIFFE ID), CA:FALSE, digitalSignature,
    /// serverAuth + clientAuth, valid for 30 days. `dns` adds DNS SANs (for peers such as
    /// nginx that check a host name against the server certificate; ward ignores them).
    pub fn leaf(&self, service: &str, dns: &[&str]) -> Result<Leaf, rcgen::Error> {
        let mut p = CertificateParams::default();
        p.distinguished_name = name(service);
        p.subject_alt_names = vec![SanType::URI(Ia5String::try_from(spiffe_id(service))?)];
        for d in dns {
            p.subject_alt_names
                .push(SanType::DnsName(Ia5String::try_from(*d)?));
        }
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(30);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = p.signed_by(&key, &self.intermediate)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.intermediate_pem),
            key_pem: key.serialize_pem(),
        })
    }
}
