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

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
