//! X.509-SVID rules on a leaf certificate: one URI SAN that is a ward SPIFFE ID, not a CA,
//! serverAuth and clientAuth usage.

use rustls_pki_types::CertificateDer;
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

/// When the peer's presented chain stops being valid: the earliest of the leaf's not_after and
/// those of the certificates sent with it that are valid at `now` (the handshake's time). A
/// tunnel admits streams only until then, so an intermediate that expires before its leaf ends
/// the tunnel's use too. Certificates that do not parse or are not valid at `now` cannot be on
/// the path the verifier built, and are left out.
pub fn chain_not_after(leaf_not_after: i64, chain: &[CertificateDer<'_>], now: i64) -> i64 {
    chain
        .iter()
        .skip(1)
        .filter_map(|der| X509Certificate::from_der(der).ok())
        .map(|(_, cert)| {
            let v = cert.validity();
            (v.not_before.timestamp(), v.not_after.timestamp())
        })
        .filter(|&(not_before, not_after)| not_before <= now && now <= not_after)
        .fold(leaf_not_after, |earliest, (_, not_after)| {
            earliest.min(not_after)
        })
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
    fn an_intermediate_that_expires_first_ends_the_chain() {
        let now = crate::now_unix();
        let short = chain(1);
        let leaf = info(&short[0]);
        let end = chain_not_after(leaf.not_after, &short, now);
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
        assert_eq!(chain_not_after(leaf.not_after, &long, now), leaf.not_after);
    }

    #[test]
    fn certificates_off_the_path_do_not_count() {
        let now = crate::now_unix();
        let good = chain(30);
        let leaf = info(&good[0]);
        // An intermediate that expired a day ago cannot be on a path verified now.
        let expired = chain(-1).remove(1);
        let with_extras = vec![
            good[0].clone(),
            good[1].clone(),
            expired,
            CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]),
        ];
        assert_eq!(
            chain_not_after(leaf.not_after, &with_extras, now),
            leaf.not_after
        );
    }
}
