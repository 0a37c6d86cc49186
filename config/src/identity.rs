//! Service names and SPIFFE IDs.
//!
//! ward's workload identities are exactly `spiffe://<td>/ns/<ns>/svc/<svc>`. The grammar is
//! narrower than the SPIFFE spec's path rules, so the spec's rejections (`.`, `..`, empty
//! segments, query, fragment, percent-encoding, port, user info, extra segments) all fall out of
//! the character rules below. Hand-written because it runs inside every handshake.

use std::fmt;

/// Why a name or SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A service or namespace name is empty or longer than 63 characters.
    #[error("must be 1 to 63 characters long")]
    NameLength,
    /// A service or namespace name has a character outside `[a-z0-9-]` or a `-` at an end.
    #[error("must use only a-z, 0-9 and '-', starting and ending with a letter or digit")]
    NameChars,
    /// A trust domain is empty, too long, or uses characters outside `[a-z0-9._-]`.
    #[error("trust domain must be 1 to 255 characters of a-z, 0-9, '.', '-', '_'")]
    TrustDomain,
    /// The ID does not start with `spiffe://`.
    #[error("SPIFFE ID must start with spiffe://")]
    Scheme,
    /// The path is not `/ns/<namespace>/svc/<service>`.
    #[error("SPIFFE ID path must be /ns/<namespace>/svc/<service>")]
    Path,
}

/// A service or namespace name: 1-63 characters of `[a-z0-9-]`, alphanumeric at both ends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Checks `s` against the name rules.
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        check_name(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The namespace used when none is written.
    pub fn default_namespace() -> Self {
        Self("default".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_name(s: &str) -> Result<(), IdentityError> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return Err(IdentityError::NameLength);
    }
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !ok(b[0]) || !ok(b[b.len() - 1]) || !b.iter().all(|&c| ok(c) || c == b'-') {
        return Err(IdentityError::NameChars);
    }
    Ok(())
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Name {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        check_name(&s)?;
        Ok(Self(s))
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::try_from(s.clone())
            .map_err(|e| serde::de::Error::custom(format!("invalid name {s:?}: {e}")))
    }
}

/// A SPIFFE trust domain, e.g. `ward.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdentityError::TrustDomain)
        }
    }

    /// The development default.
    pub fn dev() -> Self {
        Self("ward.local".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>/ward/server`: the control plane's own identity, which no CSR may obtain.
    pub fn server_uri(&self) -> String {
        format!("spiffe://{}/ward/server", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid trust domain {s:?}: {e}")))
    }
}

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/svc/<service>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: TrustDomain,
    pub namespace: Name,
    pub service: Name,
}

impl SpiffeId {
    pub fn new(trust_domain: TrustDomain, namespace: Name, service: Name) -> Self {
        Self {
            trust_domain,
            namespace,
            service,
        }
    }

    /// Parses exactly `spiffe://<td>/ns/<ns>/svc/<svc>`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri.strip_prefix("spiffe://").ok_or(IdentityError::Scheme)?;
        let (td, path) = rest.split_once('/').ok_or(IdentityError::Path)?;
        // Port, user info, query and fragment all use characters the trust-domain rule refuses.
        let trust_domain = TrustDomain::new(td)?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("svc"), Some(svc), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::Path);
        };
        let namespace = Name::new(ns).map_err(|_| IdentityError::Path)?;
        let service = Name::new(svc).map_err(|_| IdentityError::Path)?;
        Ok(Self {
            trust_domain,
            namespace,
            service,
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/svc/{}",
            self.trust_domain, self.namespace, self.service
        )
    }
}

/// Escapes a value taken from a peer's certificate for a log line and cuts it at 256 bytes.
pub fn escape_peer_value(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() >= 256 {
            out.push('…');
            break;
        }
        out.extend(c.escape_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "order", "web-2", "0", &"a".repeat(63)] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Order", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(Name::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spiffe_ids() {
        let id = SpiffeId::parse("spiffe://ward.local/ns/default/svc/order").unwrap();
        assert_eq!(id.service.as_str(), "order");
        assert_eq!(id.namespace.as_str(), "default");
        assert_eq!(id.trust_domain.as_str(), "ward.local");
        assert_eq!(id.to_string(), "spiffe://ward.local/ns/default/svc/order");
        for bad in [
            "http://ward.local/ns/default/svc/order",
            "SPIFFE://ward.local/ns/default/svc/order",
            "spiffe://ward.local",
            "spiffe://ward.local/",
            "spiffe:///ns/default/svc/order",
            "spiffe://ward.local:8080/ns/default/svc/order",
            "spiffe://user@ward.local/ns/default/svc/order",
            "spiffe://WARD.local/ns/default/svc/order",
            "spiffe://ward.local/ns/default/svc/order/",
            "spiffe://ward.local/ns/default/svc/order/extra",
            "spiffe://ward.local/ns//svc/order",
            "spiffe://ward.local/ns/./svc/order",
            "spiffe://ward.local/ns/../svc/order",
            "spiffe://ward.local/ns/default/svc/ord%65r",
            "spiffe://ward.local/ns/default/svc/order?x=1",
            "spiffe://ward.local/ns/default/svc/order#f",
            "spiffe://ward.local/ward/server",
            "spiffe://ward.local/svc/order/ns/default",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn escaping_cuts_and_escapes() {
        assert_eq!(escape_peer_value("a\nb"), "a\\nb");
        assert!(escape_peer_value(&"x".repeat(1000)).len() < 300);
    }
}
