//! The admin token (security rule 5, the admin token is never in a log, docs/security.md): stored
//! as a SHA-256 hash; never in a log.
//!
//! Outside `--dev`, the first start writes it once to `<data_dir>/admin.token` (0600) and the
//! server prints only that path. With `--dev` it is handed back for the export lines, and every
//! dev start makes a new one (the old hash is replaced), since the value cannot be shown again.

use crate::storage::{write_private_file, StorageError};
use crate::tokens::{generate, hash_eq, sha256_hex, Secret, ADMIN_PREFIX};
use std::path::{Path, PathBuf};

/// The file the first non-dev start writes the admin token to.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The in-memory verifier of the admin token.
#[derive(Clone)]
pub struct AdminToken {
    sha256: String,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken([elided])")
    }
}

impl AdminToken {
    pub fn from_sha256(sha256: String) -> Self {
        Self { sha256 }
    }

    /// Compares a presented token in constant time.
    pub fn verify(&self, presented: &str) -> bool {
        presented.starts_with(ADMIN_PREFIX) && hash_eq(&sha256_hex(presented), &self.sha256)
    }
}

/// A new admin token.
pub fn new_secret() -> Secret {
    generate(ADMIN_PREFIX)
}

/// The path of the admin token file in `data_dir`.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_TOKEN_FILE)
}

/// Writes the token once (0600, fsynced) and returns its path.
pub fn write_token_file(data_dir: &Path, secret: &Secret) -> Result<PathBuf, StorageError> {
    let path = token_path(data_dir);
    write_private_file(&path, format!("{}\n", secret.value).as_bytes())?;
    Ok(path)
}

/// The `authorization` metadata is present but not `Bearer <token>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the authorization metadata must be `Bearer <token>`")]
pub struct BadAuthorization;

/// Takes the token out of `authorization: Bearer <token>`.
pub fn bearer(md: &tonic::metadata::MetadataMap) -> Result<Option<&str>, BadAuthorization> {
    let Some(v) = md.get(ward_proto::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| BadAuthorization)?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .ok_or(BadAuthorization)?;
    Ok(Some(t.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn verifies_only_the_token() {
        let s = new_secret();
        let a = AdminToken::from_sha256(s.sha256.clone());
        assert!(a.verify(&s.value));
        assert!(!a.verify(&new_secret().value));
        assert!(!a.verify(""));
        assert!(!a.verify(&s.sha256), "the hash is not the token");
        assert!(!format!("{a:?}").contains(&s.sha256));
    }

    #[test]
    fn file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let s = new_secret();
        let p = write_token_file(dir.path(), &s).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), s.value);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bearer_parsing() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&md), Ok(None));
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&md), Ok(Some("abc")));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&md), Err(BadAuthorization));
    }
}
