//! Join tokens (security rule 4, join tokens) and the admin token (security rule 5, the admin
//! token is never in a log; both in docs/security.md) share their secret handling:
//! 256 random bits, stored only as a SHA-256 hash, compared in constant time.
//!
//! A join token is bound to one SPIFFE ID, expires, and has a number of uses. A use is consumed
//! in the same durable write that records the certificate it paid for (see
//! [`crate::storage::Storage::redeem_token`]), so N uses yield at most N certificates.

use crate::storage::TokenRecord;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of join tokens (recognizable by secret scanners).
pub const JOIN_PREFIX: &str = "wardjt_";
/// Prefix of admin tokens.
pub const ADMIN_PREFIX: &str = "wardat_";

/// Why a join token was refused. Every variant is UNAUTHENTICATED on the wire except
/// [`TokenError::WrongIdentity`] (PERMISSION_DENIED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not of the form ward join tokens have.
    #[error("the join token is malformed")]
    Malformed,
    /// No token with this value is known (never created, or purged after expiry).
    #[error("the join token is not known to this server")]
    Unknown,
    /// The token's lifetime has passed.
    #[error("the join token has expired")]
    Expired,
    /// Every use of the token has been spent.
    #[error("the join token has already been used (no uses left)")]
    UsedUp,
    /// The CSR asks for another identity than the token is bound to.
    #[error("the join token is bound to {bound}, but the CSR asks for {asked}")]
    WrongIdentity { bound: String, asked: String },
}

/// A freshly generated secret: the value to hand out once, and what is stored.
pub struct Secret {
    /// The token itself. Never logged, never stored.
    pub value: String,
    /// SHA-256 of `value`, lowercase hex.
    pub sha256: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([elided])")
    }
}

/// Generates `prefix` + 256 random bits, base64url.
pub fn generate(prefix: &str) -> Secret {
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    let value = format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    );
    let sha256 = sha256_hex(&value);
    Secret { value, sha256 }
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Constant-time comparison of two hex hashes.
pub fn hash_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A presented join token, reduced to what the server looks up and compares.
#[derive(Clone)]
pub struct Presented {
    /// The storage key: the first 32 hex digits of the hash.
    pub index: String,
    pub sha256: String,
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presented([elided])")
    }
}

/// The storage key of a token hash. Looking up by a prefix of the hash and then comparing the
/// whole hash in constant time leaks nothing about the token.
pub fn index_of(sha256: &str) -> String {
    sha256.get(..32).unwrap_or(sha256).to_owned()
}

impl Presented {
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        let body = token
            .strip_prefix(JOIN_PREFIX)
            .ok_or(TokenError::Malformed)?;
        if body.len() != 43
            || !body
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(TokenError::Malformed);
        }
        let sha256 = sha256_hex(token);
        Ok(Self {
            index: index_of(&sha256),
            sha256,
        })
    }

    /// Checks a stored record against this token at `now` (Unix seconds), without consuming.
    pub fn check(&self, rec: Option<&TokenRecord>, now: i64) -> Result<(), TokenError> {
        let rec = rec.ok_or(TokenError::Unknown)?;
        if !hash_eq(&rec.sha256, &self.sha256) {
            return Err(TokenError::Unknown);
        }
        if now >= rec.expires_at {
            return Err(TokenError::Expired);
        }
        if rec.uses_left == 0 {
            return Err(TokenError::UsedUp);
        }
        Ok(())
    }

    /// Checks and returns the record with one use consumed.
    pub fn consume(&self, rec: Option<TokenRecord>, now: i64) -> Result<TokenRecord, TokenError> {
        self.check(rec.as_ref(), now)?;
        let mut rec = rec.ok_or(TokenError::Unknown)?;
        rec.uses_left -= 1;
        Ok(rec)
    }
}

/// Why a token could not be created; INVALID_ARGUMENT, naming the CLI flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    #[error("--ttl {asked}s is longer than [tokens] max_ttl ({max}s)")]
    TtlTooLong { asked: u64, max: u64 },
    #[error("--uses {asked} is more than [tokens] max_uses ({max})")]
    TooManyUses { asked: u32, max: u32 },
    #[error("--service {0:?}: {1}")]
    Service(String, ward_config::IdentityError),
    #[error("--namespace {0:?}: {1}")]
    Namespace(String, ward_config::IdentityError),
}

/// Resolves the requested ttl and uses against the `[tokens]` limits (0 = default).
pub fn limits(
    cfg: &ward_config::server::TokensConfig,
    ttl_seconds: u64,
    uses: u32,
) -> Result<(u64, u32), CreateError> {
    let max = cfg.max_ttl.as_secs();
    let ttl = if ttl_seconds == 0 {
        cfg.default_ttl.as_secs()
    } else {
        ttl_seconds
    };
    if ttl > max {
        return Err(CreateError::TtlTooLong { asked: ttl, max });
    }
    let uses = if uses == 0 { 1 } else { uses };
    if uses > cfg.max_uses {
        return Err(CreateError::TooManyUses {
            asked: uses,
            max: cfg.max_uses,
        });
    }
    Ok((ttl, uses))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t: &Secret, uses_left: u32, expires_at: i64) -> TokenRecord {
        TokenRecord {
            sha256: t.sha256.clone(),
            spiffe_id: "spiffe://ward.local/ns/default/svc/order".into(),
            created_at: 0,
            expires_at,
            uses: 1,
            uses_left,
        }
    }

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let a = generate(JOIN_PREFIX);
        let b = generate(JOIN_PREFIX);
        assert_ne!(a.value, b.value);
        assert_eq!(a.value.len(), JOIN_PREFIX.len() + 43, "256 bits base64url");
        assert_eq!(a.sha256, sha256_hex(&a.value));
        assert!(!format!("{a:?}").contains(&a.value));
    }

    #[test]
    fn check_and_consume() {
        let t = generate(JOIN_PREFIX);
        let p = Presented::parse(&t.value).unwrap();
        assert_eq!(p.check(Some(&rec(&t, 1, 100)), 10), Ok(()));
        assert_eq!(p.check(None, 10), Err(TokenError::Unknown));
        assert_eq!(
            p.check(Some(&rec(&t, 1, 100)), 100),
            Err(TokenError::Expired)
        );
        assert_eq!(p.check(Some(&rec(&t, 0, 100)), 10), Err(TokenError::UsedUp));
        let other = generate(JOIN_PREFIX);
        assert_eq!(
            p.check(Some(&rec(&other, 1, 100)), 10),
            Err(TokenError::Unknown)
        );
        let after = p.consume(Some(rec(&t, 2, 100)), 10).unwrap();
        assert_eq!(after.uses_left, 1);
        for bad in ["", "wardjt_", "wardat_xxx", "wardjt_short", &t.value[1..]] {
            assert!(Presented::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_cap_and_name_the_flag() {
        let cfg = ward_config::server::TokensConfig::default();
        assert_eq!(limits(&cfg, 0, 0).unwrap(), (900, 1));
        assert_eq!(limits(&cfg, 60, 5).unwrap(), (60, 5));
        assert!(limits(&cfg, 86401, 1)
            .unwrap_err()
            .to_string()
            .contains("--ttl"));
        assert!(limits(&cfg, 60, 101)
            .unwrap_err()
            .to_string()
            .contains("--uses"));
    }
}
