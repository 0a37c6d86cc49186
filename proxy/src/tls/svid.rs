//! X.509-SVID rules on a leaf certificate: one URI SAN that is a ward SPIFFE ID, not a CA,
//! serverAuth and clientAuth usage.

use ward_config::{SpiffeId, TrustDomain};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a leaf is not an acceptable mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    #[error("certificate does not parse")]
    Malformed,
    #[error("certificate has no URI SAN")]
    NoUri,
    #[error("certificate has more than one URI SAN")]
    SeveralUris,
    #[error("URI SAN is not a ward SPIFFE ID")]
    BadSpiffeId,
    #[error("SPIFFE ID is in trust domain {0:?}, not ours")]
    OtherTrustDomain(String),
    #[error("a CA certificate is used as a leaf")]
    CaAsLeaf,
    #[error("certificate lacks the {0} extended key usage")]
    MissingEku(&'static str),
}

/// What the proxy reads from a leaf it verified or loaded.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub id: SpiffeId,
    /// Lowercase hex of the serial number.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl LeafInfo {
    /// Whether `now` (Unix seconds) is inside the validity period.
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// Parses `der` and applies the SVID rules; `trust_domain` is checked when given.
pub fn check_leaf(der: &[u8], trust_domain: Option<&TrustDomain>) -> Result<LeafInfo, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    if cert.is_ca() {
        return Err(SvidError::CaAsLeaf);
    }
    // X.509-SVID: a leaf may not sign certificates or CRLs.
    if let Ok(Some(ku)) = cert.key_usage() {
        if ku.value.key_cert_sign() || ku.value.crl_sign() {
            return Err(SvidError::CaAsLeaf);
        }
    }
    let mut uri = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                if uri.replace(*u).is_some() {
                    return Err(SvidError::SeveralUris);
                }
            }
        }
    }
    let uri = uri.ok_or(SvidError::NoUri)?;
    let id = SpiffeId::parse(uri).map_err(|_| SvidError::BadSpiffeId)?;
    if let Some(td) = trust_domain {
        if &id.trust_domain != td {
            return Err(SvidError::OtherTrustDomain(id.trust_domain.to_string()));
        }
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) => {
            if !eku.value.client_auth {
                return Err(SvidError::MissingEku("clientAuth"));
            }
            if !eku.value.server_auth {
                return Err(SvidError::MissingEku("serverAuth"));
            }
        }
        _ => return Err(SvidError::MissingEku("serverAuth and clientAuth")),
    }
    Ok(LeafInfo {
        id,
        serial: hex_lower(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// When a verified path is valid (Unix seconds): from the latest not_before to the earliest
/// not_after of its leaf and of the intermediates on it. A tunnel admits streams only until
/// then, so an intermediate that expires before its leaf ends the tunnel's use too; a
/// certificate the peer sent that is not on the path (a cross-signed intermediate of a CA
/// rotation, say) does not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathValidity {
    pub not_before: i64,
    pub not_after: i64,
}

impl PathValidity {
    /// Whether `now` (Unix seconds) is inside the validity period.
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// The validity of the path made of `leaf` and `intermediates` (DER, the ones the verifier put
/// on the path); an intermediate that does not parse refuses the path.
pub fn path_validity(
    leaf: &LeafInfo,
    intermediates: impl IntoIterator<Item = impl AsRef<[u8]>>,
) -> Result<PathValidity, SvidError> {
    let mut v = PathValidity {
        not_before: leaf.not_before,
        not_after: leaf.not_after,
    };
    for der in intermediates {
        let (_, cert) =
            X509Certificate::from_der(der.as_ref()).map_err(|_| SvidError::Malformed)?;
        v.not_before = v.not_before.max(cert.validity().not_before.timestamp());
        v.not_after = v.not_after.min(cert.validity().not_after.timestamp());
    }
    Ok(v)
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls_pki_types::CertificateDer;
    use time::{Duration, OffsetDateTime};

    /// root -> intermediate (valid `int_days` more days) -> leaf (valid 2 more days).
    fn chain(int_days: i64) -> Vec<CertificateDer<'static>> {
        let now = OffsetDateTime::now_utc();
        let mut root = CertificateParams::default();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_key = KeyPair::generate().unwrap();
        let root_issuer = Issuer::new(root, root_key);
        let mut int = CertificateParams::default();
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.not_before = now - Duration::days(3);
        int.not_after = now + Duration::days(int_days);
        let int_key = KeyPair::generate().unwrap();
        let int_cert = int.signed_by(&int_key, &root_issuer).unwrap();
        let int_issuer = Issuer::new(int, int_key);
        let mut leaf = CertificateParams::default();
        leaf.subject_alt_names = vec![SanType::URI(
            "spiffe://mesh.test/ns/default/svc/order"
                .try_into()
                .unwrap(),
        )];
        leaf.not_before = now - Duration::hours(1);
        leaf.not_after = now + Duration::days(2);
        let leaf_cert = leaf
            .signed_by(&KeyPair::generate().unwrap(), &int_issuer)
            .unwrap();
        vec![leaf_cert.der().clone(), int_cert.der().clone()]
    }

    fn info(der: &CertificateDer<'_>) -> LeafInfo {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        LeafInfo {
            id: SpiffeId::parse("spiffe://mesh.test/ns/default/svc/order").unwrap(),
            serial: String::new(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        }
    }

    #[test]
    fn an_intermediate_that_expires_first_ends_the_path() {
        let now = crate::now_unix();
        let short = chain(1);
        let leaf = info(&short[0]);
        let end = path_validity(&leaf, [&short[1]]).unwrap().not_after;
        assert!(
            end < leaf.not_after,
            "the intermediate's end, not the leaf's"
        );
        assert!(
            (end - (now + 86_400)).abs() < 60,
            "about a day from now: {end}"
        );

        let long = chain(30);
        let leaf = info(&long[0]);
        let v = path_validity(&leaf, [&long[1]]).unwrap();
        assert_eq!(v.not_after, leaf.not_after);
        assert!(v.not_before >= leaf.not_before && v.valid_at(now));
    }

    #[test]
    fn an_intermediate_that_does_not_parse_refuses_the_path() {
        let good = chain(30);
        let leaf = info(&good[0]);
        let garbage = [0x30u8, 0x03, 0x02, 0x01, 0x00];
        assert_eq!(
            path_validity(&leaf, [good[1].as_ref(), &garbage[..]]),
            Err(SvidError::Malformed)
        );
    }
}
