//! A test PKI: root CA -> intermediate CA (pathLen 0) -> X.509-SVID leaves, ECDSA P-256,
//! plus the broken leaves the refusal tests need.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

pub const TRUST_DOMAIN: &str = "ward.local";

/// `spiffe://<td>/ns/default/svc/<svc>`.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/default/svc/{service}")
}

/// Random bytes without an extra dependency: each `RandomState` is randomly keyed.
pub fn random_bytes(n: usize) -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        out.extend_from_slice(&h.finish().to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A positive 128-bit serial whose DER encoding needs no padding byte.
fn random_serial() -> SerialNumber {
    let mut bytes = random_bytes(16);
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

/// Lowercase hex, no colons, no leading zeros: the form serials are compared in.
pub fn normalize_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The normalized serial of a DER certificate.
pub fn serial_of_der(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    normalize_serial(&cert.raw_serial_as_string())
}

/// The URI SANs of a DER certificate.
pub fn uri_sans_of_der(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                out.push(u.to_string());
            }
        }
    }
    out
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A CA that can issue certificates.
pub struct Ca {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// What goes into a leaf.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub common_name: String,
    pub uris: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Issue a CA certificate (basicConstraints cA=TRUE) instead of an end entity.
    pub ca: bool,
}

impl LeafSpec {
    /// A valid X.509-SVID for `service` in `trust_domain`, valid from an hour ago for a day.
    pub fn new(trust_domain: &str, service: &str) -> Self {
        LeafSpec {
            common_name: service.to_string(),
            uris: vec![spiffe_id(trust_domain, service)],
            not_before: now() - Duration::hours(1),
            not_after: now() + Duration::hours(24),
            ca: false,
        }
    }

    fn params(&self) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.common_name.as_str());
        p.distinguished_name = dn;
        p.subject_alt_names = self
            .uris
            .iter()
            .map(|u| SanType::URI(Ia5String::try_from(u.as_str()).expect("ia5 uri")))
            .collect();
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if self.ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
            ];
        } else {
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        p
    }
}

/// A certificate chain and its private key.
pub struct Identity {
    /// The leaf alone (PEM).
    pub leaf_pem: String,
    /// The leaf followed by its issuing intermediate, if any (PEM), as `tls.cert_file` wants.
    pub chain_pem: String,
    /// Only the certificates after the leaf (PEM); empty for a self-signed leaf.
    pub extra_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    pub chain_der: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    /// Normalized serial of the leaf (see [`normalize_serial`]).
    pub serial: String,
}

/// Where [`Identity::write`] put the files.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub chain: PathBuf,
    pub leaf: PathBuf,
    /// `None` when the chain is the leaf alone.
    pub extra: Option<PathBuf>,
    pub key: PathBuf,
}

impl Identity {
    pub fn leaf_der(&self) -> &CertificateDer<'static> {
        &self.chain_der[0]
    }

    /// The same identity with `extra` appended to the chain it presents (not on its path).
    pub fn with_extra(mut self, extra: &Ca) -> Self {
        self.chain_pem.push_str(&extra.cert_pem);
        self.extra_pem.push_str(&extra.cert_pem);
        self.chain_der.push(extra.cert_der.clone());
        self
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// Writes `<name>.chain.pem`, `<name>.leaf.pem`, `<name>.extra.pem` (if any), `<name>.key.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> IdentityFiles {
        let chain = dir.join(format!("{name}.chain.pem"));
        let leaf = dir.join(format!("{name}.leaf.pem"));
        let key = dir.join(format!("{name}.key.pem"));
        std::fs::write(&chain, &self.chain_pem).expect("write chain");
        std::fs::write(&leaf, &self.leaf_pem).expect("write leaf");
        std::fs::write(&key, &self.key_pem).expect("write key");
        let extra = if self.extra_pem.is_empty() {
            None
        } else {
            let p = dir.join(format!("{name}.extra.pem"));
            std::fs::write(&p, &self.extra_pem).expect("write extra");
            Some(p)
        };
        IdentityFiles {
            chain,
            leaf,
            extra,
            key,
        }
    }
}

/// An intermediate (pathLen 0) signed by `root`, valid from 20 days ago until `not_after`.
fn intermediate(root: &Ca, trust_domain: &str, not_after: OffsetDateTime) -> Ca {
    let mut int_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("ward test intermediate {trust_domain}"),
    );
    int_params.distinguished_name = dn;
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    int_params.not_before = now() - Duration::days(20);
    int_params.not_after = not_after;
    int_params.serial_number = Some(random_serial());
    int_params.use_authority_key_identifier_extension = true;
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("intermediate key");
    let int_cert = int_params
        .signed_by(&int_key, &root.issuer)
        .expect("intermediate cert");
    Ca {
        cert_pem: int_cert.pem(),
        cert_der: int_cert.der().clone(),
        issuer: Issuer::new(int_params, int_key),
    }
}

/// A leaf from `spec`, signed by `ca`; the chain carries `ca`'s certificate.
fn issue_by(ca: &Ca, spec: &LeafSpec) -> Identity {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let cert = spec
        .params()
        .signed_by(&key, &ca.issuer)
        .expect("sign leaf");
    let leaf_pem = cert.pem();
    Identity {
        chain_pem: format!("{}{}", leaf_pem, ca.cert_pem),
        extra_pem: ca.cert_pem.clone(),
        leaf_pem,
        key_pem: key.serialize_pem(),
        serial: serial_of_der(cert.der()),
        chain_der: vec![cert.der().clone(), ca.cert_der.clone()],
        key_pkcs8: key.serialize_der(),
    }
}

/// Root -> intermediate (pathLen 0) for one trust domain.
pub struct Pki {
    pub trust_domain: String,
    pub root: Ca,
    pub intermediate: Ca,
}

impl Pki {
    pub fn new(trust_domain: &str) -> Self {
        let mut root_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("ward test root {trust_domain}"));
        root_params.distinguished_name = dn;
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        root_params.not_before = now() - Duration::days(30);
        root_params.not_after = now() + Duration::days(3650);
        root_params.serial_number = Some(random_serial());
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("root key");
        let root_cert = root_params.self_signed(&root_key).expect("root cert");
        let root = Ca {
            cert_pem: root_cert.pem(),
            cert_der: root_cert.der().clone(),
            issuer: Issuer::new(root_params, root_key),
        };

        let intermediate = intermediate(&root, trust_domain, now() + Duration::days(365));
        Pki {
            trust_domain: trust_domain.to_string(),
            root,
            intermediate,
        }
    }

    /// The roots file content (`tls.ca_file`).
    pub fn roots_pem(&self) -> String {
        self.root.cert_pem.clone()
    }

    pub fn write_roots(&self, path: &Path) {
        std::fs::write(path, self.roots_pem()).expect("write roots");
    }

    /// A leaf from `spec`, signed by the intermediate; the chain carries the intermediate.
    pub fn issue(&self, spec: &LeafSpec) -> Identity {
        issue_by(&self.intermediate, spec)
    }

    /// A valid day-long leaf for `service` from a second intermediate under the same root that
    /// is valid only until `not_after`: a chain that expires before its leaf.
    pub fn leaf_from_intermediate_until(
        &self,
        service: &str,
        not_after: OffsetDateTime,
    ) -> Identity {
        let short = intermediate(&self.root, &self.trust_domain, not_after);
        issue_by(&short, &LeafSpec::new(&self.trust_domain, service))
    }

    /// A second intermediate under the same root (same subject name, its own key) valid until
    /// `not_after`, for chains that carry a certificate off their verified path.
    pub fn intermediate_until(&self, not_after: OffsetDateTime) -> Ca {
        intermediate(&self.root, &self.trust_domain, not_after)
    }

    /// A valid mesh identity for `service`.
    pub fn leaf(&self, service: &str) -> Identity {
        self.issue(&LeafSpec::new(&self.trust_domain, service))
    }

    /// Valid in every respect except that it expired yesterday.
    pub fn expired(&self, service: &str) -> Identity {
        let mut spec = LeafSpec::new(&self.trust_domain, service);
        spec.not_before = now() - Duration::days(2);
        spec.not_after = now() - Duration::days(1);
        self.issue(&spec)
    }

    /// Valid in every respect except that it becomes valid tomorrow.
    pub fn not_yet_valid(&self, service: &str) -> Identity {
        let mut spec = LeafSpec::new(&self.trust_domain, service);
        spec.not_before = now() + Duration::days(1);
        spec.not_after = now() + Duration::days(2);
        self.issue(&spec)
    }

    /// Signed by our intermediate, but the SPIFFE ID is in another trust domain.
    pub fn other_trust_domain(&self, service: &str, other_td: &str) -> Identity {
        let mut spec = LeafSpec::new(&self.trust_domain, service);
        spec.uris = vec![spiffe_id(other_td, service)];
        self.issue(&spec)
    }

    /// Signed by our intermediate, with `service`'s SPIFFE ID and a second URI SAN.
    pub fn two_uris(&self, service: &str, second: &str) -> Identity {
        let mut spec = LeafSpec::new(&self.trust_domain, service);
        spec.uris.push(spiffe_id(&self.trust_domain, second));
        self.issue(&spec)
    }

    /// A valid-looking leaf for `service` signed by another mesh leaf (`inventory`'s, cA=FALSE,
    /// from our intermediate); the chain carries that leaf and the intermediate: a broken chain.
    pub fn issued_by_leaf(&self, service: &str) -> Identity {
        let signer_params = LeafSpec::new(&self.trust_domain, "inventory").params();
        let signer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("signer key");
        let signer = signer_params
            .signed_by(&signer_key, &self.intermediate.issuer)
            .expect("signer leaf");
        let signer_ca = Ca {
            cert_pem: signer.pem(),
            cert_der: signer.der().clone(),
            issuer: Issuer::new(signer_params, signer_key),
        };
        let mut id = issue_by(&signer_ca, &LeafSpec::new(&self.trust_domain, service));
        id.chain_pem.push_str(&self.intermediate.cert_pem);
        id.extra_pem.push_str(&self.intermediate.cert_pem);
        id.chain_der.push(self.intermediate.cert_der.clone());
        id
    }

    /// A CA certificate (cA=TRUE) carrying `service`'s SPIFFE ID, signed by our intermediate.
    pub fn ca_as_leaf(&self, service: &str) -> Identity {
        let mut spec = LeafSpec::new(&self.trust_domain, service);
        spec.ca = true;
        self.issue(&spec)
    }
}

/// A self-signed leaf with `service`'s SPIFFE ID and CN (no chain).
pub fn self_signed(trust_domain: &str, service: &str) -> Identity {
    let spec = LeafSpec::new(trust_domain, service);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = spec.params().self_signed(&key).expect("self-signed");
    let leaf_pem = cert.pem();
    Identity {
        chain_pem: leaf_pem.clone(),
        extra_pem: String::new(),
        leaf_pem,
        key_pem: key.serialize_pem(),
        serial: serial_of_der(cert.der()),
        chain_der: vec![cert.der().clone()],
        key_pkcs8: key.serialize_der(),
    }
}
