//! `ward server` configuration (reference: docs/server-config.md).
//!
//! Tables: `[server]`, `[ca]`, `[tokens]`, `[catalog]`, `[storage]`, `[admin]`; every key has a
//! default, so an empty file (or `--dev`) is a working configuration.

use crate::duration::Duration;
use crate::error::{parse_toml, ConfigError};
use crate::identity::TrustDomain;
use crate::intentions::Action;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC over TLS.
    pub listen: SocketAddr,
    /// Extra DNS names and IPs for the server certificate.
    pub advertise: Vec<AdvertiseName>,
    pub data_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub ca: CaConfig,
    pub tokens: TokensConfig,
    pub catalog: CatalogConfig,
    pub storage: StorageConfig,
    pub admin: ServerAdminConfig,
    /// Bounds of the gRPC listener (`[server] max_connections` and the handshake caps).
    pub connections: ConnectionLimits,
    /// The policy when no intention matches (`[intentions] default`, `deny` unless set).
    pub default_intention: Action,
    /// `--dev`: the admin token is handed back to the caller (for the export lines) instead of
    /// being written to `<data_dir>/admin.token`.
    pub dev: bool,
    /// Bounds that have no config key yet.
    pub limits: ServerLimits,
}

/// An `advertise` entry that is neither an IP address nor a DNS name: the text as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or a DNS name")]
pub struct AdvertiseError(pub String);

/// A `[server] advertise` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdvertiseName {
    Dns(String),
    Ip(IpAddr),
}

#[derive(Debug, Clone)]
pub struct CaConfig {
    pub leaf_ttl: std::time::Duration,
    pub intermediate_ttl: std::time::Duration,
    pub root_ttl: std::time::Duration,
    /// An intermediate signed by an offline root: the server never holds the root key.
    pub import: Option<CaImport>,
}

/// PEM files of an intermediate CA signed by an offline root.
#[derive(Debug, Clone)]
pub struct CaImport {
    pub intermediate_cert_file: PathBuf,
    pub intermediate_key_file: PathBuf,
    pub root_cert_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct TokensConfig {
    pub default_ttl: std::time::Duration,
    /// Caps `token create --ttl`.
    pub max_ttl: std::time::Duration,
    /// Caps `token create --uses`.
    pub max_uses: u32,
}

#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// An instance whose proxy stream is gone this long is removed.
    pub deregister_after: std::time::Duration,
    /// Live instances one identity (one service) may hold.
    pub max_instances_per_identity: usize,
    /// `Mesh.Register` keeps the IP the caller sends instead of its connection's source IP.
    pub trust_registered_address: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// redb in `data_dir`.
    Embedded,
}

#[derive(Debug, Clone)]
pub struct ServerAdminConfig {
    /// `/metrics`, `/ready`, `/live`.
    pub listen: SocketAddr,
}

/// The gRPC listener's bounds (security rule 15, bounds, docs/security.md), as the proxy's
/// `[limits]`; keys of `[server]`.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once, handshaking or established.
    pub max_connections: usize,
    /// The file sets `max_connections`: capping it to fit the open-file limit is worth a
    /// warning then, and silent for the default.
    pub max_connections_set: bool,
    /// TLS handshakes in progress.
    pub max_pending_handshakes: usize,
    /// TLS handshakes in progress from one source IP.
    pub max_pending_handshakes_per_ip: usize,
    /// How long a TLS handshake may take, counted from TCP accept.
    pub handshake_timeout: std::time::Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_set: false,
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_ip: 64,
            handshake_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// Bounds without a config key (security rule 15, bounds, docs/security.md); tests and
/// embedders may change them.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Sign calls one identity may make in a burst.
    pub sign_burst: u32,
    /// Sign calls per second one identity may make after its burst.
    pub sign_per_second: f64,
    /// Largest gRPC message accepted.
    pub max_message_size: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            sign_burst: 50,
            sign_per_second: 5.0,
            max_message_size: 4 * 1024 * 1024,
        }
    }
}

const DEFAULT_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 8502);
const DEFAULT_ADMIN: ([u8; 4], u16) = ([127, 0, 0, 1], 8501);
const DEFAULT_DATA_DIR: &str = "/var/lib/ward";
const H: u64 = 3600;

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            leaf_ttl: std::time::Duration::from_secs(24 * H),
            intermediate_ttl: std::time::Duration::from_secs(8760 * H),
            root_ttl: std::time::Duration::from_secs(87600 * H),
            import: None,
        }
    }
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            default_ttl: std::time::Duration::from_secs(15 * 60),
            max_ttl: std::time::Duration::from_secs(24 * H),
            max_uses: 100,
        }
    }
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            deregister_after: std::time::Duration::from_secs(30),
            max_instances_per_identity: 10_000,
            trust_registered_address: false,
        }
    }
}

// ---- the file as written ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    ca: Option<RawCa>,
    tokens: Option<RawTokens>,
    catalog: Option<RawCatalog>,
    storage: Option<RawStorage>,
    admin: Option<RawAdmin>,
    intentions: Option<RawIntentions>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<SocketAddr>,
    #[serde(default)]
    advertise: Vec<String>,
    data_dir: Option<PathBuf>,
    trust_domain: Option<TrustDomain>,
    max_connections: Option<usize>,
    max_pending_handshakes: Option<usize>,
    max_pending_handshakes_per_ip: Option<usize>,
    handshake_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCa {
    leaf_ttl: Option<Duration>,
    intermediate_ttl: Option<Duration>,
    root_ttl: Option<Duration>,
    intermediate_cert_file: Option<PathBuf>,
    intermediate_key_file: Option<PathBuf>,
    root_cert_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    default_ttl: Option<Duration>,
    max_ttl: Option<Duration>,
    max_uses: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    deregister_after: Option<Duration>,
    max_instances_per_identity: Option<usize>,
    trust_registered_address: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    backend: Option<String>,
    endpoints: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIntentions {
    default: Option<Action>,
}

impl ServerConfig {
    /// Reads and validates a config file. Relative paths inside it are taken from the file's
    /// own directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `path` names the file in errors and anchors relative
    /// paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_toml(path, text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let invalid = |key: &str, msg: String| ConfigError::invalid(path, key, msg);

        let server = raw.server.unwrap_or_default();
        let mut advertise = Vec::with_capacity(server.advertise.len());
        for (n, a) in server.advertise.iter().enumerate() {
            let name = AdvertiseName::parse(a)
                .map_err(|e| invalid(&format!("server.advertise[{n}]"), e.to_string()))?;
            advertise.push(name);
        }
        let data_dir = server
            .data_dir
            .map(resolve)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty".into()));
        }
        // Upper bound: far above any real need, and within what a semaphore can hold.
        const MAX_COUNT: usize = 1 << 24;
        let count = |key: &str, v: Option<usize>, dflt: usize| match v {
            Some(0) => Err(invalid(key, "must be at least 1".into())),
            Some(v) if v > MAX_COUNT => Err(invalid(key, format!("must be at most {MAX_COUNT}"))),
            Some(v) => Ok(v),
            None => Ok(dflt),
        };
        let dl = ConnectionLimits::default();
        let connections = ConnectionLimits {
            max_connections: count(
                "server.max_connections",
                server.max_connections,
                dl.max_connections,
            )?,
            max_connections_set: server.max_connections.is_some(),
            max_pending_handshakes: count(
                "server.max_pending_handshakes",
                server.max_pending_handshakes,
                dl.max_pending_handshakes,
            )?,
            max_pending_handshakes_per_ip: count(
                "server.max_pending_handshakes_per_ip",
                server.max_pending_handshakes_per_ip,
                dl.max_pending_handshakes_per_ip,
            )?,
            handshake_timeout: match server.handshake_timeout {
                Some(d) if d.0.is_zero() => {
                    return Err(invalid(
                        "server.handshake_timeout",
                        "must be longer than zero".into(),
                    ))
                }
                Some(d) => d.0,
                None => dl.handshake_timeout,
            },
        };

        let rca = raw.ca.unwrap_or_default();
        let dflt = CaConfig::default();
        let nonzero = |key: &str, v: Option<Duration>, d: std::time::Duration| match v {
            Some(v) if v.0.is_zero() => Err(invalid(key, "must be longer than zero".into())),
            Some(v) => Ok(v.0),
            None => Ok(d),
        };
        let leaf_ttl = nonzero("ca.leaf_ttl", rca.leaf_ttl, dflt.leaf_ttl)?;
        let intermediate_ttl = nonzero(
            "ca.intermediate_ttl",
            rca.intermediate_ttl,
            dflt.intermediate_ttl,
        )?;
        let root_ttl = nonzero("ca.root_ttl", rca.root_ttl, dflt.root_ttl)?;
        if leaf_ttl > intermediate_ttl {
            return Err(invalid(
                "ca.leaf_ttl",
                format!(
                    "{} is longer than ca.intermediate_ttl ({})",
                    Duration(leaf_ttl),
                    Duration(intermediate_ttl)
                ),
            ));
        }
        if intermediate_ttl > root_ttl {
            return Err(invalid(
                "ca.intermediate_ttl",
                format!(
                    "{} is longer than ca.root_ttl ({})",
                    Duration(intermediate_ttl),
                    Duration(root_ttl)
                ),
            ));
        }
        let import = match (
            rca.intermediate_cert_file,
            rca.intermediate_key_file,
            rca.root_cert_file,
        ) {
            (None, None, None) => None,
            (Some(c), Some(k), Some(r)) => Some(CaImport {
                intermediate_cert_file: resolve(c),
                intermediate_key_file: resolve(k),
                root_cert_file: resolve(r),
            }),
            (c, k, _) => {
                let missing = if c.is_none() {
                    "ca.intermediate_cert_file"
                } else if k.is_none() {
                    "ca.intermediate_key_file"
                } else {
                    "ca.root_cert_file"
                };
                return Err(invalid(
                    missing,
                    "is required: an imported CA needs intermediate_cert_file, \
                     intermediate_key_file and root_cert_file"
                        .into(),
                ));
            }
        };

        let rt = raw.tokens.unwrap_or_default();
        let dt = TokensConfig::default();
        let default_ttl = nonzero("tokens.default_ttl", rt.default_ttl, dt.default_ttl)?;
        let max_ttl = nonzero("tokens.max_ttl", rt.max_ttl, dt.max_ttl)?;
        if default_ttl > max_ttl {
            return Err(invalid(
                "tokens.default_ttl",
                format!(
                    "{} is longer than tokens.max_ttl ({})",
                    Duration(default_ttl),
                    Duration(max_ttl)
                ),
            ));
        }
        let max_uses = rt.max_uses.unwrap_or(dt.max_uses);
        if max_uses == 0 {
            return Err(invalid("tokens.max_uses", "must be at least 1".into()));
        }

        let rc = raw.catalog.unwrap_or_default();
        let dc = CatalogConfig::default();
        let max_instances_per_identity = match rc.max_instances_per_identity {
            Some(0) => {
                return Err(invalid(
                    "catalog.max_instances_per_identity",
                    "must be at least 1".into(),
                ))
            }
            Some(n) => n,
            None => dc.max_instances_per_identity,
        };
        let catalog = CatalogConfig {
            deregister_after: rc.deregister_after.map_or(dc.deregister_after, |d| d.0),
            max_instances_per_identity,
            trust_registered_address: rc
                .trust_registered_address
                .unwrap_or(dc.trust_registered_address),
        };

        let rs = raw.storage.unwrap_or_default();
        let storage = match rs.backend.as_deref() {
            None | Some("embedded") => {
                if rs.endpoints.is_some() {
                    return Err(invalid(
                        "storage.endpoints",
                        "is only used with backend = \"etcd\"".into(),
                    ));
                }
                StorageConfig::Embedded
            }
            Some("etcd") => {
                return Err(invalid(
                    "storage.backend",
                    "\"etcd\" is not supported by this build yet; use \"embedded\"".into(),
                ))
            }
            Some(other) => {
                return Err(invalid(
                    "storage.backend",
                    format!("{other:?} is not a backend; use \"embedded\" or \"etcd\""),
                ))
            }
        };

        let listen = server
            .listen
            .unwrap_or_else(|| SocketAddr::from(DEFAULT_LISTEN));
        let admin = ServerAdminConfig {
            listen: raw
                .admin
                .and_then(|a| a.listen)
                .unwrap_or_else(|| SocketAddr::from(DEFAULT_ADMIN)),
        };
        if admin.listen == listen && listen.port() != 0 {
            return Err(invalid(
                "admin.listen",
                format!("{listen} is already used by `server.listen`"),
            ));
        }

        Ok(ServerConfig {
            listen,
            advertise,
            data_dir,
            trust_domain: server.trust_domain.unwrap_or_else(TrustDomain::dev),
            ca: CaConfig {
                leaf_ttl,
                intermediate_ttl,
                root_ttl,
                import,
            },
            tokens: TokensConfig {
                default_ttl,
                max_ttl,
                max_uses,
            },
            catalog,
            storage,
            admin,
            connections,
            default_intention: raw
                .intentions
                .and_then(|i| i.default)
                .unwrap_or(Action::Deny),
            dev: false,
            limits: ServerLimits::default(),
        })
    }

    /// The configuration of `ward server --dev [--data-dir DIR] [--listen ADDR] [--leaf-ttl D]`:
    /// the defaults, with the admin token handed back for the export lines.
    pub fn dev(
        data_dir: PathBuf,
        listen: Option<SocketAddr>,
        leaf_ttl: Option<std::time::Duration>,
    ) -> Self {
        let mut ca = CaConfig::default();
        if let Some(ttl) = leaf_ttl {
            ca.leaf_ttl = ttl.clamp(std::time::Duration::from_secs(1), ca.intermediate_ttl);
        }
        Self {
            listen: listen.unwrap_or_else(|| SocketAddr::from(DEFAULT_LISTEN)),
            advertise: Vec::new(),
            data_dir,
            trust_domain: TrustDomain::dev(),
            ca,
            tokens: TokensConfig::default(),
            catalog: CatalogConfig::default(),
            storage: StorageConfig::Embedded,
            admin: ServerAdminConfig {
                listen: SocketAddr::from(DEFAULT_ADMIN),
            },
            connections: ConnectionLimits::default(),
            default_intention: Action::Deny,
            dev: true,
            limits: ServerLimits::default(),
        }
    }
}

impl AdvertiseName {
    /// An IP address, or a DNS name of letters, digits, `-` and `.` labels.
    pub fn parse(s: &str) -> Result<Self, AdvertiseError> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if s.is_empty() || s.len() > 253 || !s.split('.').all(label_ok) {
            return Err(AdvertiseError(s.to_owned()));
        }
        Ok(Self::Dns(s.to_ascii_lowercase()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8502"
advertise = ["ward.internal", "10.0.0.1"]
data_dir = "state"
trust_domain = "example.org"
max_connections = 5000
max_pending_handshakes = 512
max_pending_handshakes_per_ip = 16
handshake_timeout = "5s"
[ca]
leaf_ttl = "1h"
intermediate_ttl = "8760h"
root_ttl = "87600h"
[tokens]
default_ttl = "15m"
max_ttl = "24h"
max_uses = 100
[catalog]
deregister_after = "30s"
max_instances_per_identity = 500
trust_registered_address = true
[storage]
backend = "embedded"
[admin]
listen = "127.0.0.1:8501"
"#;

    fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::parse(Path::new("/etc/ward/server.toml"), text)
    }

    /// The one-line error for `text`.
    fn refused(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/ward/state"));
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.ca.leaf_ttl, std::time::Duration::from_secs(3600));
        assert_eq!(
            c.advertise,
            vec![
                AdvertiseName::Dns("ward.internal".into()),
                AdvertiseName::Ip("10.0.0.1".parse().unwrap())
            ]
        );
        assert_eq!(c.storage, StorageConfig::Embedded);
        assert_eq!(c.catalog.max_instances_per_identity, 500);
        assert_eq!(c.connections.max_connections, 5000);
        assert!(c.connections.max_connections_set);
        assert_eq!(c.connections.max_pending_handshakes, 512);
        assert_eq!(c.connections.max_pending_handshakes_per_ip, 16);
        assert_eq!(
            c.connections.handshake_timeout,
            std::time::Duration::from_secs(5)
        );
        assert!(c.catalog.trust_registered_address);
        assert!(!c.dev);
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8502".parse().unwrap());
        assert_eq!(c.admin.listen, "127.0.0.1:8501".parse().unwrap());
        assert_eq!(c.data_dir, Path::new("/var/lib/ward"));
        assert_eq!(c.trust_domain.as_str(), "ward.local");
        assert_eq!(c.ca.leaf_ttl, std::time::Duration::from_secs(86400));
        assert_eq!(c.tokens.default_ttl, std::time::Duration::from_secs(900));
        assert_eq!(c.tokens.max_ttl, std::time::Duration::from_secs(86400));
        assert_eq!(c.tokens.max_uses, 100);
        assert_eq!(
            c.catalog.deregister_after,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(c.catalog.max_instances_per_identity, 10_000);
        assert!(!c.catalog.trust_registered_address);
        // The handshake caps of security rule 15 (bounds, docs/security.md), as the proxy's.
        assert_eq!(c.connections.max_pending_handshakes, 1024);
        assert_eq!(c.connections.max_pending_handshakes_per_ip, 64);
        assert_eq!(c.default_intention, Action::Deny);
    }

    #[test]
    fn dev_defaults() {
        let c = ServerConfig::dev(
            "/tmp/x".into(),
            Some("127.0.0.1:0".parse().unwrap()),
            Some(std::time::Duration::from_secs(20)),
        );
        assert!(c.dev);
        assert_eq!(c.ca.leaf_ttl, std::time::Duration::from_secs(20));
        assert_eq!(c.listen.port(), 0);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("[server]\n", "[server]\nbogus = 1\n", "bogus"),
            (
                "listen = \"127.0.0.1:8502\"",
                "listen = \"nope\"",
                "server.listen",
            ),
            (
                "trust_domain = \"example.org\"",
                "trust_domain = \"Ex ample\"",
                "server.trust_domain",
            ),
            ("\"ward.internal\"", "\"bad_name!\"", "server.advertise[0]"),
            (
                "max_connections = 5000",
                "max_connections = 0",
                "server.max_connections",
            ),
            (
                "max_pending_handshakes = 512",
                "max_pending_handshakes = 4000000000000000000",
                "server.max_pending_handshakes",
            ),
            (
                "max_pending_handshakes_per_ip = 16",
                "max_pending_handshakes_per_ip = 0",
                "server.max_pending_handshakes_per_ip",
            ),
            (
                "handshake_timeout = \"5s\"",
                "handshake_timeout = \"0s\"",
                "server.handshake_timeout",
            ),
            ("leaf_ttl = \"1h\"", "leaf_ttl = \"soon\"", "ca.leaf_ttl"),
            ("leaf_ttl = \"1h\"", "leaf_ttl = \"0s\"", "ca.leaf_ttl"),
            ("leaf_ttl = \"1h\"", "leaf_ttl = \"9000h\"", "ca.leaf_ttl"),
            (
                "root_ttl = \"87600h\"",
                "root_ttl = \"100h\"",
                "ca.intermediate_ttl",
            ),
            (
                "[ca]\n",
                "[ca]\nintermediate_cert_file = \"i.pem\"\n",
                "ca.intermediate_key_file",
            ),
            ("max_uses = 100", "max_uses = 0", "tokens.max_uses"),
            ("max_uses = 100", "max_uses = -1", "tokens.max_uses"),
            (
                "default_ttl = \"15m\"",
                "default_ttl = \"48h\"",
                "tokens.default_ttl",
            ),
            (
                "deregister_after = \"30s\"",
                "deregister_after = 30",
                "catalog.deregister_after",
            ),
            (
                "max_instances_per_identity = 500",
                "max_instances_per_identity = 0",
                "catalog.max_instances_per_identity",
            ),
            (
                "trust_registered_address = true",
                "trust_registered_address = \"yes\"",
                "catalog.trust_registered_address",
            ),
            (
                "backend = \"embedded\"",
                "backend = \"etcd\"",
                "storage.backend",
            ),
            (
                "backend = \"embedded\"",
                "backend = \"sqlite\"",
                "storage.backend",
            ),
            (
                "backend = \"embedded\"",
                "backend = \"embedded\"\nendpoints = []",
                "storage.endpoints",
            ),
            (
                "listen = \"127.0.0.1:8501\"",
                "listen = \"127.0.0.1:8502\"",
                "admin.listen",
            ),
            ("[storage]", "[storagex]", "storagex"),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "{from}");
            let err = refused(&GOOD.replacen(from, to, 1));
            assert!(err.contains(key), "{to}: {err}");
            assert!(err.contains("/etc/ward/server.toml"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn advertise_names_are_ips_or_dns_names() {
        assert_eq!(
            AdvertiseName::parse("Ward.Internal"),
            Ok(AdvertiseName::Dns("ward.internal".into()))
        );
        for bad in ["", "-ward.internal", "ward..internal", "ward internal"] {
            assert_eq!(
                AdvertiseName::parse(bad),
                Err(AdvertiseError(bad.to_owned())),
                "{bad}"
            );
        }
        let err = refused(&GOOD.replacen("\"ward.internal\"", "\"ward internal\"", 1));
        assert!(
            err.contains("server.advertise[0]") && err.contains("\"ward internal\""),
            "{err}"
        );
    }

    #[test]
    fn etcd_is_not_built_yet() {
        let err =
            refused("[storage]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n");
        assert!(err.contains("not supported by this build yet"), "{err}");
    }

    #[test]
    fn import_paths_resolve() {
        let c = parse(
            "[ca]\nintermediate_cert_file = \"i.pem\"\nintermediate_key_file = \"/k/i.key\"\nroot_cert_file = \"r.pem\"\n",
        )
        .unwrap();
        let imp = c.ca.import.unwrap();
        assert_eq!(imp.intermediate_cert_file, Path::new("/etc/ward/i.pem"));
        assert_eq!(imp.intermediate_key_file, Path::new("/k/i.key"));
        assert_eq!(imp.root_cert_file, Path::new("/etc/ward/r.pem"));
    }
}
