//! The built-in CA: a root and an intermediate, leaf signing from CSRs (security rule 2, what a
//! CSR may ask, docs/security.md) and the server's own certificate (security rule 1, who the
//! server is).
//!
//! The root and intermediate are created with rcgen on the first start in an empty data_dir, or
//! an intermediate signed by an offline root is imported from PEM files. Leaves always come from
//! the server's own template; from a CSR only the public key and its single URI SAN are taken.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;
use ward_config::identity::{IdentityError, SpiffeId, TrustDomain};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How far in the past a leaf's notBefore is set, for peers whose clocks run a little behind.
const BACKDATE: time::Duration = time::Duration::seconds(60);

/// Why the CA could not be created, imported or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A PEM file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A certificate or key is malformed or breaks a rule of the hierarchy.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    /// rcgen refused to build a certificate.
    #[error("cannot create the {what} certificate: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
}

/// Why a CSR was refused; every variant maps to INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Not a DER PKCS#10 request.
    #[error("the CSR is not a well-formed DER PKCS#10 request")]
    Malformed,
    /// The self-signature does not verify with the CSR's own key.
    #[error("the CSR's signature does not verify with its public key")]
    BadSignature,
    /// The key is not a named-curve ECDSA P-256 key.
    #[error("the CSR's key must be an ECDSA P-256 (named curve) key")]
    KeyType,
    /// A SAN other than one URI (DNS, IP, e-mail, ...).
    #[error("the CSR may carry only one URI SAN, the SPIFFE ID; it has another kind of SAN")]
    OtherSan,
    /// No URI SAN, or more than one.
    #[error("the CSR must carry exactly one URI SAN, the SPIFFE ID; it has {0}")]
    UriCount(usize),
    /// Basic constraints CA, a path length, keyCertSign/cRLSign or name/policy constraints.
    #[error(
        "the CSR asks for a CA-related extension ({0}), which a workload certificate never has"
    )]
    CaExtension(&'static str),
    /// An extension the server cannot read is marked critical, or one failed to parse.
    #[error("the CSR carries an extension the server cannot read")]
    BadExtension,
    /// The URI SAN is not `spiffe://<td>/ns/<ns>/svc/<svc>`.
    #[error("the CSR's URI SAN is not a workload SPIFFE ID: {0}")]
    SpiffeId(IdentityError),
    /// The SPIFFE ID is of another trust domain.
    #[error("the CSR's SPIFFE ID is not in trust domain {0}")]
    TrustDomain(String),
}

/// What a verified CSR asks for: the only two things ever taken from it.
#[derive(Debug)]
pub struct CsrRequest {
    pub spiffe_id: SpiffeId,
    /// The DER SubjectPublicKeyInfo.
    pub public_key: Vec<u8>,
}

/// A signed certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub der: CertificateDer<'static>,
    /// Lowercase hex of the serial number.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// A root CA certificate as published to proxies.
#[derive(Debug, Clone)]
pub struct RootCert {
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The persistent CA material: what the storage keeps.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct CaMaterial {
    /// Root certificates, PEM; the first is the active one.
    pub roots_pem: Vec<String>,
    /// The root's private key (PKCS#8 PEM); `None` with an offline root.
    pub root_key_pem: Option<String>,
    pub intermediate_cert_pem: String,
    /// PKCS#8 PEM.
    pub intermediate_key_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("roots", &self.roots_pem.len())
            .field("root_key", &self.root_key_pem.as_ref().map(|_| "[elided]"))
            .field("intermediate_key", &"[elided]")
            .finish()
    }
}

/// A loaded CA that signs leaves.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    intermediate_der: CertificateDer<'static>,
    intermediate_not_before: OffsetDateTime,
    intermediate_not_after: OffsetDateTime,
    roots: Vec<RootCert>,
    leaf_ttl: std::time::Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("intermediate_not_after", &self.intermediate_not_after)
            .finish_non_exhaustive()
    }
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> CaError {
    CaError::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

/// A random positive serial of 20 bytes (at least 150 random bits).
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 20];
    rand::fill(&mut b);
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

fn to_offset(t: std::time::Duration) -> time::Duration {
    time::Duration::try_from(t).unwrap_or(time::Duration::MAX)
}

fn add_capped(a: OffsetDateTime, d: std::time::Duration, cap: OffsetDateTime) -> OffsetDateTime {
    a.checked_add(to_offset(d)).map_or(cap, |t| t.min(cap))
}

/// Lowercase hex SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

impl CaMaterial {
    /// Creates a fresh root and intermediate for `td`.
    pub fn generate(
        td: &TrustDomain,
        root_ttl: std::time::Duration,
        intermediate_ttl: std::time::Duration,
    ) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        let gen = |what| move |source| CaError::Generate { what, source };
        let root_key = KeyPair::generate().map_err(gen("root"))?;
        let mut root = CertificateParams::default();
        root.distinguished_name = DistinguishedName::new();
        root.distinguished_name
            .push(DnType::OrganizationName, td.as_str());
        root.distinguished_name
            .push(DnType::CommonName, "ward root CA");
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        root.serial_number = Some(random_serial());
        root.not_before = now - BACKDATE;
        root.not_after = add_capped(
            now,
            root_ttl,
            OffsetDateTime::new_utc(
                time::Date::from_calendar_date(9999, time::Month::December, 31)
                    .expect("valid date"),
                time::Time::MIDNIGHT,
            ),
        );
        let root_cert = root.self_signed(&root_key).map_err(gen("root"))?;
        let root_issuer = Issuer::new(root.clone(), &root_key);

        let inter_key = KeyPair::generate().map_err(gen("intermediate"))?;
        let mut inter = CertificateParams::default();
        inter.distinguished_name = DistinguishedName::new();
        inter
            .distinguished_name
            .push(DnType::OrganizationName, td.as_str());
        inter
            .distinguished_name
            .push(DnType::CommonName, "ward intermediate CA");
        inter.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        inter.key_usages = root.key_usages.clone();
        inter.serial_number = Some(random_serial());
        inter.use_authority_key_identifier_extension = true;
        inter.not_before = now - BACKDATE;
        inter.not_after = add_capped(now, intermediate_ttl, root.not_after);
        let inter_cert = inter
            .signed_by(&inter_key, &root_issuer)
            .map_err(gen("intermediate"))?;

        Ok(Self {
            roots_pem: vec![root_cert.pem()],
            root_key_pem: Some(root_key.serialize_pem()),
            intermediate_cert_pem: inter_cert.pem(),
            intermediate_key_pem: inter_key.serialize_pem(),
        })
    }

    /// Reads an intermediate signed by an offline root from PEM files and checks it: a CA
    /// certificate with pathLenConstraint 0, signed by the root, matching its key.
    pub fn import(
        intermediate_cert_file: &Path,
        intermediate_key_file: &Path,
        root_cert_file: &Path,
    ) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let m = Self {
            intermediate_cert_pem: read(intermediate_cert_file)?,
            intermediate_key_pem: read(intermediate_key_file)?,
            roots_pem: vec![read(root_cert_file)?],
            root_key_pem: None,
        };
        let names = [
            intermediate_cert_file.display().to_string(),
            intermediate_key_file.display().to_string(),
            root_cert_file.display().to_string(),
        ];
        m.check(&names)?;
        Ok(m)
    }

    /// Checks the hierarchy; `names` = [intermediate cert, intermediate key, root cert] for
    /// errors.
    fn check(&self, names: &[String; 3]) -> Result<(), CaError> {
        let inter_der = pem_der(&self.intermediate_cert_pem, &names[0])?;
        let root_pem = self
            .roots_pem
            .first()
            .ok_or_else(|| invalid(&names[2], "holds no root certificate"))?;
        let root_der = pem_der(root_pem, &names[2])?;
        let (_, inter) = X509Certificate::from_der(&inter_der)
            .map_err(|_| invalid(&names[0], "is not a valid X.509 certificate"))?;
        let (_, root) = X509Certificate::from_der(&root_der)
            .map_err(|_| invalid(&names[2], "is not a valid X.509 certificate"))?;
        match inter.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca && bc.value.path_len_constraint == Some(0) => {}
            _ => {
                return Err(invalid(
                    &names[0],
                    "must be a CA certificate with pathLenConstraint 0",
                ))
            }
        }
        match root.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(invalid(&names[2], "is not a CA certificate")),
        }
        inter
            .verify_signature(Some(root.public_key()))
            .map_err(|_| {
                invalid(
                    &names[0],
                    format!("is not signed by the root in {}", names[2]),
                )
            })?;
        let key = KeyPair::from_pem(&self.intermediate_key_pem)
            .map_err(|_| invalid(&names[1], "is not a PKCS#8 PEM private key"))?;
        if key.public_key_raw() != inter.public_key().subject_public_key.data.as_ref() {
            return Err(invalid(
                &names[1],
                format!("does not match the certificate in {}", names[0]),
            ));
        }
        if inter.validity().not_after.to_datetime() <= OffsetDateTime::now_utc() {
            return Err(invalid(&names[0], "has expired"));
        }
        Ok(())
    }
}

fn pem_der(pem: &str, name: &str) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|_| invalid(name, "holds no PEM CERTIFICATE block"))
}

/// PEM-encodes one DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

impl Ca {
    /// Loads stored or imported material; `source` names where it came from in errors.
    pub fn load(
        material: &CaMaterial,
        trust_domain: TrustDomain,
        leaf_ttl: std::time::Duration,
        source: &str,
    ) -> Result<Self, CaError> {
        let names = [
            format!("{source} (intermediate certificate)"),
            format!("{source} (intermediate key)"),
            format!("{source} (root certificate)"),
        ];
        material.check(&names)?;
        let inter_der = CertificateDer::from(pem_der(&material.intermediate_cert_pem, &names[0])?);
        let key = KeyPair::from_pem(&material.intermediate_key_pem)
            .map_err(|_| invalid(&names[1], "is not a PKCS#8 PEM private key"))?;
        let issuer = Issuer::from_ca_cert_der(&inter_der, key)
            .map_err(|e| invalid(&names[0], e.to_string()))?;
        let (_, inter) = X509Certificate::from_der(&inter_der)
            .map_err(|_| invalid(&names[0], "is not a valid X.509 certificate"))?;
        let intermediate_not_before = inter.validity().not_before.to_datetime();
        let intermediate_not_after = inter.validity().not_after.to_datetime();
        let mut roots = Vec::new();
        for pem in &material.roots_pem {
            let der = pem_der(pem, &names[2])?;
            let (_, c) = X509Certificate::from_der(&der)
                .map_err(|_| invalid(&names[2], "is not a valid X.509 certificate"))?;
            roots.push(RootCert {
                fingerprint: fingerprint(&der),
                not_before: c.validity().not_before.to_datetime(),
                not_after: c.validity().not_after.to_datetime(),
                der: CertificateDer::from(der),
            });
        }
        Ok(Self {
            trust_domain,
            issuer,
            intermediate_der: inter_der,
            intermediate_not_before,
            intermediate_not_after,
            roots,
            leaf_ttl,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust anchors, active first.
    pub fn roots(&self) -> &[RootCert] {
        &self.roots
    }

    /// The roots as one PEM bundle (what `ca.pem` holds).
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|r| cert_pem(&r.der)).collect()
    }

    pub fn intermediate(&self) -> &CertificateDer<'static> {
        &self.intermediate_der
    }

    pub fn leaf_ttl(&self) -> std::time::Duration {
        self.leaf_ttl
    }

    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.intermediate_not_after
    }

    pub fn intermediate_not_before(&self) -> OffsetDateTime {
        self.intermediate_not_before
    }

    /// Verifies a CSR (security rule 2, what a CSR may ask, docs/security.md) and returns the only
    /// two things taken from it.
    pub fn verify_csr(&self, der: &[u8]) -> Result<CsrRequest, CsrError> {
        let (rest, csr) =
            X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed);
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let info = &csr.certification_request_info;
        let spki = &info.subject_pki;
        let p256 = spki.algorithm.algorithm
            == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
            && spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .is_some_and(|o| o == x509_parser::oid_registry::OID_EC_P256);
        // An uncompressed point: 0x04 || X || Y.
        let point = spki.subject_public_key.data.as_ref();
        if !p256 || point.len() != 65 || point[0] != 4 {
            return Err(CsrError::KeyType);
        }

        let mut uris: Vec<&str> = Vec::new();
        for attr in info.iter_attributes() {
            let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
                continue;
            };
            for ext in &req.extensions {
                match ext.parsed_extension() {
                    ParsedExtension::SubjectAlternativeName(san) => {
                        for name in &san.general_names {
                            match name {
                                GeneralName::URI(u) => uris.push(u),
                                _ => return Err(CsrError::OtherSan),
                            }
                        }
                    }
                    ParsedExtension::BasicConstraints(bc)
                        if bc.ca || bc.path_len_constraint.is_some() =>
                    {
                        return Err(CsrError::CaExtension("basicConstraints CA"));
                    }
                    ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                        return Err(CsrError::CaExtension("keyCertSign or cRLSign"));
                    }
                    ParsedExtension::NameConstraints(_) => {
                        return Err(CsrError::CaExtension("nameConstraints"))
                    }
                    ParsedExtension::PolicyConstraints(_)
                    | ParsedExtension::InhibitAnyPolicy(_) => {
                        return Err(CsrError::CaExtension("policy constraints"))
                    }
                    ParsedExtension::ParseError { .. } => return Err(CsrError::BadExtension),
                    ParsedExtension::UnsupportedExtension { .. } if ext.critical => {
                        return Err(CsrError::BadExtension)
                    }
                    // Everything else is ignored: the leaf comes from the server's template.
                    _ => {}
                }
            }
        }
        if uris.len() != 1 {
            return Err(CsrError::UriCount(uris.len()));
        }
        let spiffe_id = SpiffeId::parse(uris[0]).map_err(CsrError::SpiffeId)?;
        if spiffe_id.trust_domain != self.trust_domain {
            return Err(CsrError::TrustDomain(self.trust_domain.to_string()));
        }
        Ok(CsrRequest {
            spiffe_id,
            public_key: spki.raw.to_vec(),
        })
    }

    /// Signs a workload leaf for `id` over `public_key` (DER SPKI) from the server's template.
    pub fn issue_leaf(&self, id: &SpiffeId, public_key: &[u8]) -> Result<Issued, CaError> {
        self.issue_with(public_key, vec![id.to_string()], Vec::new(), self.leaf_ttl)
    }

    /// Signs the server's own gRPC certificate: URI SAN `spiffe://<td>/ward/server` plus the
    /// given IPs and DNS names. Returns the certificate and its fresh key.
    pub fn issue_server(
        &self,
        ips: &[IpAddr],
        dns: &[String],
        ttl: std::time::Duration,
    ) -> Result<(Issued, KeyPair), CaError> {
        let key = KeyPair::generate().map_err(|source| CaError::Generate {
            what: "server",
            source,
        })?;
        let mut sans: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for d in dns {
            let name = d
                .clone()
                .try_into()
                .map_err(|_| invalid("server.advertise", format!("{d:?} is not a DNS name")))?;
            sans.push(SanType::DnsName(name));
        }
        let issued = self.issue_with(
            &key.subject_public_key_info(),
            vec![self.trust_domain.server_uri()],
            sans,
            ttl,
        )?;
        Ok((issued, key))
    }

    fn issue_with(
        &self,
        public_key: &[u8],
        uris: Vec<String>,
        extra: Vec<SanType>,
        ttl: std::time::Duration,
    ) -> Result<Issued, CaError> {
        let gen = |source| CaError::Generate {
            what: "leaf",
            source,
        };
        let now = OffsetDateTime::now_utc();
        let not_before = (now - BACKDATE).max(self.intermediate_not_before);
        let not_after = add_capped(now, ttl, self.intermediate_not_after);
        if not_after <= now {
            return Err(invalid(
                "the intermediate CA",
                "has expired; no certificate can be issued",
            ));
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        for u in uris {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().map_err(gen)?));
        }
        p.subject_alt_names.extend(extra);
        let spki = rcgen::SubjectPublicKeyInfo::from_der(public_key).map_err(gen)?;
        let cert = p.signed_by(&spki, &self.issuer).map_err(gen)?;
        Ok(Issued {
            der: cert.der().clone(),
            serial: serial_hex,
            not_before,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::parse_x509_certificate;

    fn ca() -> Ca {
        let td = TrustDomain::dev();
        let m = CaMaterial::generate(
            &td,
            std::time::Duration::from_secs(87600 * 3600),
            std::time::Duration::from_secs(8760 * 3600),
        )
        .unwrap();
        Ca::load(&m, td, std::time::Duration::from_secs(3600), "test").unwrap()
    }

    fn csr(sans: Vec<SanType>, f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        f(&mut p);
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const ORDER: &str = "spiffe://ward.local/ns/default/svc/order";

    #[test]
    fn signs_a_good_csr_from_the_template() {
        let ca = ca();
        let req = ca.verify_csr(&csr(vec![uri(ORDER)], |_| {})).unwrap();
        assert_eq!(req.spiffe_id.to_string(), ORDER);
        let leaf = ca.issue_leaf(&req.spiffe_id, &req.public_key).unwrap();
        let (_, c) = parse_x509_certificate(&leaf.der).unwrap();
        // CA:FALSE, digitalSignature only, serverAuth+clientAuth, one URI SAN.
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names, vec![GeneralName::URI(ORDER)]);
        assert!(c.raw_serial().len() >= 16, "serial has at least 128 bits");
        assert_eq!(hex::encode(c.raw_serial()), leaf.serial);
        // notBefore at most 60 s in the past, notAfter = now + ttl.
        let now = OffsetDateTime::now_utc();
        let nb = c.validity().not_before.to_datetime();
        assert!(nb >= now - time::Duration::seconds(62) && nb <= now);
        let na = c.validity().not_after.to_datetime();
        assert!((na - (now + time::Duration::hours(1))).abs() < time::Duration::seconds(5));
        // Chains to the intermediate.
        let (_, inter) = parse_x509_certificate(ca.intermediate()).unwrap();
        c.verify_signature(Some(inter.public_key())).unwrap();
        let ibc = inter.basic_constraints().unwrap().unwrap().value;
        assert!(ibc.ca && ibc.path_len_constraint == Some(0));
    }

    #[test]
    fn serials_differ() {
        let ca = ca();
        let req = ca.verify_csr(&csr(vec![uri(ORDER)], |_| {})).unwrap();
        let a = ca.issue_leaf(&req.spiffe_id, &req.public_key).unwrap();
        let b = ca.issue_leaf(&req.spiffe_id, &req.public_key).unwrap();
        assert_ne!(a.serial, b.serial);
    }

    #[test]
    fn refuses_bad_csrs() {
        let ca = ca();
        let cases: Vec<(Vec<u8>, CsrError)> = vec![
            (
                csr(
                    vec![uri(ORDER), SanType::DnsName("order".try_into().unwrap())],
                    |_| {},
                ),
                CsrError::OtherSan,
            ),
            (
                csr(
                    vec![
                        uri(ORDER),
                        uri("spiffe://ward.local/ns/default/svc/inventory"),
                    ],
                    |_| {},
                ),
                CsrError::UriCount(2),
            ),
            (csr(vec![], |_| {}), CsrError::UriCount(0)),
            (
                csr(vec![uri(ORDER)], |p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
                }),
                CsrError::CaExtension("basicConstraints CA"),
            ),
            (
                csr(vec![uri(ORDER)], |p| {
                    p.key_usages = vec![KeyUsagePurpose::KeyCertSign]
                }),
                CsrError::CaExtension("keyCertSign or cRLSign"),
            ),
            (
                csr(vec![uri("spiffe://other.org/ns/default/svc/order")], |_| {}),
                CsrError::TrustDomain("ward.local".into()),
            ),
            (
                csr(vec![uri("spiffe://ward.local/ward/server")], |_| {}),
                CsrError::SpiffeId(IdentityError::Path),
            ),
            (b"not a csr".to_vec(), CsrError::Malformed),
        ];
        for (n, (der, want)) in cases.into_iter().enumerate() {
            assert_eq!(ca.verify_csr(&der).unwrap_err(), want, "case {n}");
        }
    }

    #[test]
    fn refuses_tampered_signature_and_other_keys() {
        let ca = ca();
        let mut der = csr(vec![uri(ORDER)], |_| {});
        // Flip a bit inside the URI: the signature no longer verifies.
        let pos = der.windows(5).position(|w| w == b"order").unwrap();
        der[pos] ^= 0x01;
        assert_eq!(ca.verify_csr(&der).unwrap_err(), CsrError::BadSignature);

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri(ORDER)];
        let der = p.serialize_request(&key).unwrap().der().to_vec();
        assert_eq!(ca.verify_csr(&der).unwrap_err(), CsrError::KeyType);
    }

    #[test]
    fn server_certificate_names() {
        let ca = ca();
        let (c, _key) = ca
            .issue_server(
                &["127.0.0.1".parse().unwrap()],
                &["ward.internal".into()],
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let (_, c) = parse_x509_certificate(&c.der).unwrap();
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        assert!(san
            .general_names
            .contains(&GeneralName::URI("spiffe://ward.local/ward/server")));
        assert!(san
            .general_names
            .contains(&GeneralName::DNSName("ward.internal")));
        assert!(san
            .general_names
            .contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    }

    #[test]
    fn import_checks_the_hierarchy() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::dev();
        let ttl = std::time::Duration::from_secs(3600 * 24);
        let m = CaMaterial::generate(&td, ttl * 10, ttl).unwrap();
        let other = CaMaterial::generate(&td, ttl * 10, ttl).unwrap();
        let w = |name: &str, s: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, s).unwrap();
            p
        };
        let ic = w("i.pem", &m.intermediate_cert_pem);
        let ik = w("i.key", &m.intermediate_key_pem);
        let rc = w("r.pem", &m.roots_pem[0]);
        let imported = CaMaterial::import(&ic, &ik, &rc).unwrap();
        assert!(imported.root_key_pem.is_none());
        Ca::load(&imported, td.clone(), ttl, "x").unwrap();

        let wrong_root = w("r2.pem", &other.roots_pem[0]);
        let err = CaMaterial::import(&ic, &ik, &wrong_root)
            .unwrap_err()
            .to_string();
        assert!(err.contains("i.pem") && err.contains("not signed"), "{err}");
        let wrong_key = w("k2.key", &other.intermediate_key_pem);
        let err = CaMaterial::import(&ic, &wrong_key, &rc)
            .unwrap_err()
            .to_string();
        assert!(err.contains("k2.key"), "{err}");
        // The root is not an intermediate with pathLen 0.
        let err = CaMaterial::import(&rc, &ik, &rc).unwrap_err().to_string();
        assert!(err.contains("pathLenConstraint"), "{err}");
        let err = CaMaterial::import(&dir.path().join("missing.pem"), &ik, &rc)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
