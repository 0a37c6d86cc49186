//! Server state: the [`Storage`] trait (the seam for an etcd backend later) and its embedded
//! redb implementation.
//!
//! Every write is one redb transaction committed with immediate durability (fsync) before the
//! caller acknowledges anything (security rule 11, server state, docs/security.md). The state file
//! is created under a temporary name, filled with the new CA in its first transaction and only then
//! renamed into place, so `state.redb` exists exactly when a CA was durably stored; a `state.redb`
//! that cannot be read is an error naming it, never a reason to create a new CA.

use crate::ca::CaMaterial;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The state file in `data_dir`.
pub const STATE_FILE: &str = "state.redb";
const STATE_TMP: &str = "state.redb.tmp";
/// The schema written by this build.
const FORMAT: &str = "1";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const INTENTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("intentions");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certs");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");

const META_FORMAT: &str = "format";
const META_CA: &str = "ca";
const META_ADMIN: &str = "admin_token_sha256";
const META_INTENTIONS_VERSION: &str = "intentions_version";
/// `allow` or `deny`; absent in state written before it was stored.
const META_INTENTIONS_DEFAULT: &str = "intentions_default";

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The state file or data_dir could not be opened, read or written.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// The state file opened but its content is not what this build wrote.
    #[error("{}: cannot read the server state: {reason}; refusing to start (the file is left untouched)", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

/// A stored intention (see `intentions.rs` for the rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentionRecord {
    pub dest_namespace: String,
    pub dest_service: String,
    /// `*`, `svc` (the destination's namespace) or `ns/svc`.
    pub source: String,
    /// `allow` or `deny` for an L4 rule; `None` for an L7 rule.
    pub action: Option<String>,
    /// The L7 permissions, as the protobuf encoding of `ward.v1.Permission` list, base64.
    #[serde(default)]
    pub permissions: Vec<String>,
    pub version: u64,
    pub created_at: i64,
}

impl IntentionRecord {
    pub fn key(&self) -> String {
        intention_key(&self.dest_namespace, &self.dest_service, &self.source)
    }
}

/// The storage key of an intention.
pub fn intention_key(dest_ns: &str, dest_svc: &str, source: &str) -> String {
    format!("{dest_ns}/{dest_svc}|{source}")
}

/// A stored join token: its hash only, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// SHA-256 of the token, lowercase hex.
    pub sha256: String,
    pub spiffe_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub uses: u32,
    pub uses_left: u32,
}

/// A certificate the server issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: String,
    pub spiffe_id: String,
    pub issued_at: i64,
    pub not_after: i64,
    /// `token` or `renewal`.
    pub via: String,
}

/// A registered sidecar instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub spiffe_id: String,
    pub address: String,
    /// `tcp` or `http`.
    pub protocol: String,
    /// The port of the instance's transparent inbound; absent in state written before it was
    /// stored, and for an instance that runs none.
    #[serde(default)]
    pub transparent_port: Option<u16>,
    pub registered_at: i64,
}

/// Everything the server loads at start.
#[derive(Debug, Clone)]
pub struct State {
    pub ca: CaMaterial,
    /// SHA-256 of the admin token, lowercase hex.
    pub admin_token_sha256: String,
    pub intentions_version: u64,
    /// The stored `[intentions] default` (`allow` or `deny`), if any was stored.
    pub intentions_default: Option<String>,
    pub intentions: Vec<IntentionRecord>,
    pub tokens: Vec<(String, TokenRecord)>,
    pub instances: Vec<InstanceRecord>,
}

/// What a token redemption decided, inside the storage's write.
pub type Redeem<E> = Result<TokenRecord, E>;

/// The server's durable state. Every method commits durably before returning `Ok`.
pub trait Storage: Send + Sync + 'static {
    /// Reads the whole state.
    fn load(&self) -> Result<State, StorageError>;
    /// Replaces the CA material (an imported intermediate that changed on disk).
    fn put_ca(&self, ca: &CaMaterial) -> Result<(), StorageError>;
    fn set_admin_token_sha256(&self, hash: &str) -> Result<(), StorageError>;
    /// Writes (inserts or replaces) an intention and the new intentions version.
    fn put_intention(&self, rec: &IntentionRecord, version: u64) -> Result<(), StorageError>;
    /// Deletes an intention and writes the new intentions version.
    fn delete_intention(&self, key: &str, version: u64) -> Result<(), StorageError>;
    /// Writes the default intention (`allow` or `deny`) and the new intentions version.
    fn put_intentions_default(&self, default: &str, version: u64) -> Result<(), StorageError>;
    fn put_token(&self, index: &str, rec: &TokenRecord) -> Result<(), StorageError>;
    fn get_token(&self, index: &str) -> Result<Option<TokenRecord>, StorageError>;
    /// In one write: reads the token at `index`, lets `decide` check it and return the record
    /// with one use consumed, stores that record and `cert`, and commits. When `decide`
    /// refuses, nothing is written.
    fn redeem_token(
        &self,
        index: &str,
        decide: &mut dyn FnMut(Option<TokenRecord>) -> Redeem<crate::tokens::TokenError>,
        cert: &CertRecord,
    ) -> Result<Redeem<crate::tokens::TokenError>, StorageError>;
    fn record_cert(&self, cert: &CertRecord) -> Result<(), StorageError>;
    fn put_instance(&self, rec: &InstanceRecord) -> Result<(), StorageError>;
    fn delete_instance(&self, instance_id: &str) -> Result<(), StorageError>;
    /// Drops tokens expired before `now` and certificate records past their notAfter.
    fn purge_expired(&self, now: i64) -> Result<(), StorageError>;
}

/// The names ward writes in `data_dir` (with the temporary ones of its atomic writes): a
/// directory holding only these may be tightened to 0700.
const OWN_FILES: &[&str] = &[
    STATE_FILE,
    STATE_TMP,
    crate::admin_token::ADMIN_TOKEN_FILE,
    "admin.tmp",
    crate::server::CA_FILE,
    "ca.tmp",
];

/// Creates `data_dir` (0700) if needed; checks an existing one and tightens it to 0700 only
/// when it is the running user's and holds nothing but ward's files (security rule 11, server
/// state, docs/security.md).
pub fn prepare_data_dir(dir: &Path) -> Result<(), StorageError> {
    ward_config::private_dir::prepare(dir, OWN_FILES).map_err(|e| StorageError::File {
        path: dir.to_owned(),
        reason: format!("data_dir {e}"),
    })
}

/// Writes `contents` to `path` with mode 0600 through a temporary file, fsynced and renamed,
/// then fsyncs the directory.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), StorageError> {
    let err = |reason: String| StorageError::File {
        path: path.to_owned(),
        reason,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(format!("cannot create: {e}")))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| err(format!("cannot write: {e}")))?;
    fs::rename(&tmp, path).map_err(|e| err(format!("cannot rename into place: {e}")))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes a public file (mode 0644) atomically.
pub fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), StorageError> {
    write_private_file(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(|e| StorageError::File {
        path: path.to_owned(),
        reason: format!("cannot set mode 0644: {e}"),
    })
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::File {
            path: dir.to_owned(),
            reason: format!("cannot fsync directory: {e}"),
        })
}

/// The embedded backend: one redb file, `<data_dir>/state.redb`, mode 0600.
pub struct RedbStorage {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStorage")
            .field("path", &self.path)
            .finish()
    }
}

/// The first content of a new state file.
pub struct Initial<'a> {
    pub ca: &'a CaMaterial,
    pub admin_token_sha256: &'a str,
}

impl RedbStorage {
    /// Opens `<data_dir>/state.redb` if it exists (`None` if it does not). A file that exists
    /// but cannot be opened or holds no CA is an error naming it.
    pub fn open(data_dir: &Path) -> Result<Option<Self>, StorageError> {
        let path = data_dir.join(STATE_FILE);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StorageError::File {
                    path,
                    reason: format!("cannot read: {e}"),
                })
            }
            Ok(_) => {}
        }
        let db = redb::Database::open(&path).map_err(|e| StorageError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
        let s = Self { db, path };
        // A state without a CA is not a state this build wrote.
        s.load()?;
        Ok(Some(s))
    }

    /// Creates `<data_dir>/state.redb` holding `initial`: written under a temporary name,
    /// committed durably, then renamed into place.
    pub fn create(data_dir: &Path, initial: &Initial<'_>) -> Result<Self, StorageError> {
        let path = data_dir.join(STATE_FILE);
        let tmp = data_dir.join(STATE_TMP);
        let ferr = |p: &Path, reason: String| StorageError::File {
            path: p.to_owned(),
            reason,
        };
        let _ = fs::remove_file(&tmp);
        // Create the file 0600 before redb opens it, so it is never readable by others.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ferr(&tmp, format!("cannot create: {e}")))?;
        {
            let db = redb::Database::create(&tmp).map_err(|e| ferr(&tmp, e.to_string()))?;
            let s = Self {
                db,
                path: tmp.clone(),
            };
            s.write(|tx| {
                let mut meta = tx.open_table(META)?;
                meta.insert(META_FORMAT, FORMAT.as_bytes())?;
                meta.insert(META_CA, to_json(initial.ca).as_slice())?;
                meta.insert(META_ADMIN, initial.admin_token_sha256.as_bytes())?;
                meta.insert(META_INTENTIONS_VERSION, b"0".as_slice())?;
                drop(meta);
                for t in [INTENTIONS, TOKENS, CERTS, INSTANCES] {
                    tx.open_table(t)?;
                }
                Ok(())
            })?;
        }
        fs::rename(&tmp, &path)
            .map_err(|e| ferr(&path, format!("cannot rename into place: {e}")))?;
        sync_dir(data_dir)?;
        let db = redb::Database::open(&path).map_err(|e| StorageError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> StorageError {
        StorageError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, reason: impl std::fmt::Display) -> StorageError {
        StorageError::Corrupt {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Runs `f` in one write transaction committed with immediate durability.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StorageError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    fn read_all<T: DeserializeOwned>(
        &self,
        tx: &redb::ReadTransaction,
        def: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, T)>, StorageError> {
        let t = tx.open_table(def).map_err(|e| self.corrupt(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.corrupt(e))? {
            let (k, v) = row.map_err(|e| self.corrupt(e))?;
            let val = serde_json::from_slice(v.value())
                .map_err(|e| self.corrupt(format!("table {}, key {:?}: {e}", def, k.value())))?;
            out.push((k.value().to_owned(), val));
        }
        Ok(out)
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Storage for RedbStorage {
    fn load(&self) -> Result<State, StorageError> {
        let tx = self.db.begin_read().map_err(|e| self.corrupt(e))?;
        let meta = tx
            .open_table(META)
            .map_err(|e| self.corrupt(format!("no meta table ({e})")))?;
        let get = |k: &str| -> Result<Vec<u8>, StorageError> {
            meta.get(k)
                .map_err(|e| self.corrupt(e))?
                .map(|v| v.value().to_vec())
                .ok_or_else(|| self.corrupt(format!("missing {k:?}")))
        };
        let format = get(META_FORMAT)?;
        if format != FORMAT.as_bytes() {
            return Err(self.corrupt(format!(
                "format {:?} is not {FORMAT:?}, the one this build reads",
                String::from_utf8_lossy(&format)
            )));
        }
        let ca: CaMaterial = serde_json::from_slice(&get(META_CA)?)
            .map_err(|e| self.corrupt(format!("CA material: {e}")))?;
        let admin_token_sha256 = String::from_utf8(get(META_ADMIN)?)
            .map_err(|_| self.corrupt("admin token hash is not text"))?;
        let intentions_version = std::str::from_utf8(&get(META_INTENTIONS_VERSION)?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.corrupt("intentions version is not a number"))?;
        let intentions_default = match meta
            .get(META_INTENTIONS_DEFAULT)
            .map_err(|e| self.corrupt(e))?
        {
            None => None,
            Some(v) => Some(
                String::from_utf8(v.value().to_vec())
                    .map_err(|_| self.corrupt("default intention is not text"))?,
            ),
        };
        drop(meta);
        let intentions = self
            .read_all::<IntentionRecord>(&tx, INTENTIONS)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let tokens = self.read_all::<TokenRecord>(&tx, TOKENS)?;
        // Certificate records are write-mostly; reading them checks they are intact.
        self.read_all::<CertRecord>(&tx, CERTS)?;
        let instances = self
            .read_all::<InstanceRecord>(&tx, INSTANCES)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        Ok(State {
            ca,
            admin_token_sha256,
            intentions_version,
            intentions_default,
            intentions,
            tokens,
            instances,
        })
    }

    fn put_ca(&self, ca: &CaMaterial) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(META)?
                .insert(META_CA, to_json(ca).as_slice())?;
            Ok(())
        })
    }

    fn set_admin_token_sha256(&self, hash: &str) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(META)?.insert(META_ADMIN, hash.as_bytes())?;
            Ok(())
        })
    }

    fn put_intention(&self, rec: &IntentionRecord, version: u64) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(INTENTIONS)?
                .insert(rec.key().as_str(), to_json(rec).as_slice())?;
            tx.open_table(META)?
                .insert(META_INTENTIONS_VERSION, version.to_string().as_bytes())?;
            Ok(())
        })
    }

    fn delete_intention(&self, key: &str, version: u64) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(INTENTIONS)?.remove(key)?;
            tx.open_table(META)?
                .insert(META_INTENTIONS_VERSION, version.to_string().as_bytes())?;
            Ok(())
        })
    }

    fn put_intentions_default(&self, default: &str, version: u64) -> Result<(), StorageError> {
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            meta.insert(META_INTENTIONS_DEFAULT, default.as_bytes())?;
            meta.insert(META_INTENTIONS_VERSION, version.to_string().as_bytes())?;
            Ok(())
        })
    }

    fn put_token(&self, index: &str, rec: &TokenRecord) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(TOKENS)?
                .insert(index, to_json(rec).as_slice())?;
            Ok(())
        })
    }

    fn get_token(&self, index: &str) -> Result<Option<TokenRecord>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(TOKENS).map_err(|e| self.err(e))?;
        let Some(v) = t.get(index).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| self.corrupt(format!("token record: {e}")))
    }

    fn redeem_token(
        &self,
        index: &str,
        decide: &mut dyn FnMut(Option<TokenRecord>) -> Redeem<crate::tokens::TokenError>,
        cert: &CertRecord,
    ) -> Result<Redeem<crate::tokens::TokenError>, StorageError> {
        // redb allows one write transaction at a time, so the read, the check and the write
        // below are serialized against every other redemption.
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let decided = {
            let mut tokens = tx.open_table(TOKENS).map_err(|e| self.err(e))?;
            let current = match tokens.get(index).map_err(|e| self.err(e))? {
                None => None,
                Some(v) => Some(
                    serde_json::from_slice::<TokenRecord>(v.value())
                        .map_err(|e| self.corrupt(format!("token record: {e}")))?,
                ),
            };
            match decide(current) {
                Err(refused) => Err(refused),
                Ok(updated) => {
                    tokens
                        .insert(index, to_json(&updated).as_slice())
                        .map_err(|e| self.err(e))?;
                    tx.open_table(CERTS)
                        .map_err(|e| self.err(e))?
                        .insert(cert.serial.as_str(), to_json(cert).as_slice())
                        .map_err(|e| self.err(e))?;
                    Ok(updated)
                }
            }
        };
        match decided {
            Ok(updated) => {
                tx.commit().map_err(|e| self.err(e))?;
                Ok(Ok(updated))
            }
            Err(refused) => {
                tx.abort().map_err(|e| self.err(e))?;
                Ok(Err(refused))
            }
        }
    }

    fn record_cert(&self, cert: &CertRecord) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(CERTS)?
                .insert(cert.serial.as_str(), to_json(cert).as_slice())?;
            Ok(())
        })
    }

    fn put_instance(&self, rec: &InstanceRecord) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(INSTANCES)?
                .insert(rec.instance_id.as_str(), to_json(rec).as_slice())?;
            Ok(())
        })
    }

    fn delete_instance(&self, instance_id: &str) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(INSTANCES)?.remove(instance_id)?;
            Ok(())
        })
    }

    fn purge_expired(&self, now: i64) -> Result<(), StorageError> {
        self.write(|tx| {
            tx.open_table(TOKENS)?.retain(|_, v| {
                serde_json::from_slice::<TokenRecord>(v).map_or(true, |t| t.expires_at >= now)
            })?;
            tx.open_table(CERTS)?.retain(|_, v| {
                serde_json::from_slice::<CertRecord>(v).map_or(true, |c| c.not_after >= now)
            })?;
            Ok(())
        })
    }
}

/// Reads a stored JSON value (used by tests of other modules).
#[cfg(test)]
pub(crate) fn test_material() -> CaMaterial {
    CaMaterial::generate(
        &ward_config::TrustDomain::dev(),
        std::time::Duration::from_secs(86400 * 10),
        std::time::Duration::from_secs(86400),
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(dir: &Path) -> RedbStorage {
        let m = test_material();
        RedbStorage::create(
            dir,
            &Initial {
                ca: &m,
                admin_token_sha256: "ab",
            },
        )
        .unwrap()
    }

    /// The state of `dir` as a new open reads it.
    fn reopen(dir: &Path) -> State {
        RedbStorage::open(dir).unwrap().unwrap().load().unwrap()
    }

    #[test]
    fn empty_dir_has_no_state_and_create_then_reopen_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RedbStorage::open(dir.path()).unwrap().is_none());
        let s = create(dir.path());
        let rec = IntentionRecord {
            dest_namespace: "default".into(),
            dest_service: "inventory".into(),
            source: "order".into(),
            action: Some("allow".into()),
            permissions: vec![],
            version: 1,
            created_at: 0,
        };
        s.put_intention(&rec, 1).unwrap();
        let ca_before = s.load().unwrap().ca.intermediate_cert_pem;
        drop(s);
        let s = RedbStorage::open(dir.path()).unwrap().unwrap();
        let st = s.load().unwrap();
        assert_eq!(st.intentions, vec![rec]);
        assert_eq!(st.intentions_version, 1);
        assert_eq!(
            st.intentions_default, None,
            "state from before the default was stored"
        );
        assert_eq!(st.ca.intermediate_cert_pem, ca_before);
        s.put_intentions_default("allow", 7).unwrap();
        drop(s);
        let st = reopen(dir.path());
        assert_eq!(st.intentions_default.as_deref(), Some("allow"));
        assert_eq!(st.intentions_version, 7);
        assert!(!dir.path().join(STATE_TMP).exists());
        let mode = fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// An instance written by a build that stored no transparent port still loads (as one that
    /// runs none), and a stored port survives a reopen.
    #[test]
    fn instances_without_a_transparent_port_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let s = create(dir.path());
        // The record exactly as the previous build serialized it.
        let old = br#"{"instance_id":"a","spiffe_id":"spiffe://ward.local/ns/default/svc/inventory","address":"10.0.0.5:21000","protocol":"tcp","registered_at":5}"#;
        s.write(|tx| {
            tx.open_table(INSTANCES)?.insert("a", old.as_slice())?;
            Ok(())
        })
        .unwrap();
        let new = InstanceRecord {
            instance_id: "b".into(),
            spiffe_id: "spiffe://ward.local/ns/default/svc/web".into(),
            address: "10.0.0.6:15006".into(),
            protocol: "tcp".into(),
            transparent_port: Some(15006),
            registered_at: 6,
        };
        s.put_instance(&new).unwrap();
        drop(s);
        let st = reopen(dir.path());
        let ports: Vec<(String, Option<u16>)> = st
            .instances
            .into_iter()
            .map(|r| (r.instance_id, r.transparent_port))
            .collect();
        assert_eq!(ports, [("a".into(), None), ("b".into(), Some(15006))]);
    }

    #[test]
    fn corrupt_state_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"garbage garbage garbage").unwrap();
        let err = RedbStorage::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("state.redb"), "{err}");
        // The file is left as it was.
        assert_eq!(
            fs::read(dir.path().join(STATE_FILE)).unwrap(),
            b"garbage garbage garbage"
        );
    }

    #[test]
    fn redeem_refusal_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = create(dir.path());
        let tok = TokenRecord {
            sha256: "00".into(),
            spiffe_id: "spiffe://ward.local/ns/default/svc/order".into(),
            created_at: 0,
            expires_at: i64::MAX,
            uses: 1,
            uses_left: 1,
        };
        s.put_token("i", &tok).unwrap();
        let cert = CertRecord {
            serial: "01".into(),
            spiffe_id: tok.spiffe_id.clone(),
            issued_at: 0,
            not_after: 1,
            via: "token".into(),
        };
        let r = s
            .redeem_token("i", &mut |_| Err(crate::tokens::TokenError::UsedUp), &cert)
            .unwrap();
        assert!(r.is_err());
        assert_eq!(s.get_token("i").unwrap().unwrap().uses_left, 1);
    }

    #[test]
    fn data_dir_is_0700() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        prepare_data_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = d.join("k");
        write_private_file(&f, b"x").unwrap();
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
