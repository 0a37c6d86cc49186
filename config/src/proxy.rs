//! `ward proxy` configuration (reference: docs/proxy-config.md).

use crate::duration::Duration;
use crate::error::{parse_toml, ConfigError};
use crate::identity::{Name, TrustDomain};
use crate::intentions::{Action, Rule, Source};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub service: ServiceConfig,
    pub inbound: Option<InboundConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub credentials: CredentialSource,
    pub admin: AdminConfig,
    pub limits: Limits,
    pub transparent: Option<TransparentConfig>,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: Name,
    pub namespace: Name,
    pub trust_domain: Option<TrustDomain>,
}

/// The L4/L7 protocol a listener carries: `tcp` forwards bytes, `http` forwards requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Http,
}

#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub listen: SocketAddr,
    pub local_app: SocketAddr,
    pub protocol: Protocol,
}

/// `[transparent]`: listeners for the connections `ward redirect` sends to the proxy.
#[derive(Debug, Clone)]
pub struct TransparentConfig {
    /// Where arriving connections are redirected; each needs mutual TLS and goes to the app at
    /// its original destination port on the pod's own address.
    pub inbound_listen: Option<SocketAddr>,
    /// Where the app's outgoing connections are redirected (loopback only).
    pub outbound_listen: Option<SocketAddr>,
    pub outbound_policy: OutboundPolicy,
    /// The ports `ward redirect --exclude-inbound-ports` leaves out, written as the flag is
    /// (`22,8000-8080`): a tunnel stream may not name them (they are reached without the mesh,
    /// or fenced by other means).
    pub exclude_inbound_ports: Vec<std::ops::RangeInclusive<u16>>,
}

/// What the transparent outbound does with a destination no mesh service owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundPolicy {
    /// Refused (the default: fail closed).
    RegistryOnly,
    /// Passed through in plain TCP.
    AllowAny,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub service: Name,
    /// The upstream's namespace; the proxy's own when not written.
    pub namespace: Option<Name>,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// Static endpoints; empty means "from the control plane's catalog".
    pub endpoints: Vec<SocketAddr>,
}

/// Where certificates and intentions come from.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// `[tls]` files written by another agent, plus static `[intentions]`.
    Files {
        tls: TlsFiles,
        intentions: StaticIntentions,
    },
    /// `[control_plane]`: certificates and intentions from `ward server`.
    ControlPlane(ControlPlaneConfig),
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct StaticIntentions {
    pub default: Action,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// The server's `https://host:port` address.
    pub address: String,
    pub ca_file: PathBuf,
    pub token_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// One info line per admitted inbound connection at its close and per refused handshake.
    pub connection_log: bool,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// The file sets `max_connections`: capping it to fit the open-file limit is worth a
    /// warning then, and silent for the default.
    pub max_connections_set: bool,
    pub handshake_timeout: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    pub drain_timeout: std::time::Duration,
    /// How long listeners keep accepting after a drain starts, while `/ready` answers 503.
    pub drain_delay: std::time::Duration,
    pub max_pending_handshakes: usize,
    pub max_pending_handshakes_per_ip: usize,
    /// What one `ward-mux/1` tunnel may buffer each way: the bytes its peer may send before
    /// this side has handed them on (the HTTP/2 connection window, shared out as the windows
    /// of its 100 streams), and the bytes queued for the peer.
    pub max_tunnel_buffer_bytes: usize,
    /// http inbound: a client that has not sent a whole request header by then is cut.
    pub header_read_timeout: std::time::Duration,
    /// http inbound: a request header larger than this is answered 431.
    pub max_header_bytes: usize,
    /// http upstream: how long a request may wait for the response header (else 504).
    pub request_timeout: std::time::Duration,
}

/// The bounds of `limits.max_header_bytes`: hyper's smallest HTTP/1 read buffer, and 16 MiB.
pub const HEADER_BYTES_RANGE: std::ops::RangeInclusive<usize> = 8192..=(16 << 20);

/// The bounds of `limits.max_tunnel_buffer_bytes`: a 64 KiB window (one tunnel frame) for each
/// of a tunnel's 100 streams, and HTTP/2's largest window.
pub const TUNNEL_BUFFER_RANGE: std::ops::RangeInclusive<usize> =
    (100 * 65_536)..=(i32::MAX as usize);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_set: false,
            handshake_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(3600),
            drain_timeout: std::time::Duration::from_secs(30),
            drain_delay: std::time::Duration::ZERO,
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_ip: 64,
            // 640 KiB per stream: several times a bulk stream's bandwidth-delay product within
            // a datacentre, and a peer pins 64 MiB per tunnel instead of 400.
            max_tunnel_buffer_bytes: 64 * 1024 * 1024,
            header_read_timeout: std::time::Duration::from_secs(10),
            max_header_bytes: 65_536,
            // Envoy's default route timeout.
            request_timeout: std::time::Duration::from_secs(15),
        }
    }
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    service: RawService,
    inbound: Option<RawInbound>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    control_plane: Option<RawControlPlane>,
    tls: Option<RawTls>,
    intentions: Option<RawIntentions>,
    transparent: Option<RawTransparent>,
    admin: Option<RawAdmin>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Name,
    namespace: Option<Name>,
    trust_domain: Option<TrustDomain>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    listen: SocketAddr,
    local_app: SocketAddr,
    protocol: Option<Protocol>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    service: Name,
    namespace: Option<Name>,
    listen: SocketAddr,
    protocol: Option<Protocol>,
    #[serde(default)]
    endpoints: Vec<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControlPlane {
    address: String,
    ca_file: PathBuf,
    token_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    ca_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntentions {
    default: Option<Action>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    source: String,
    action: Option<Action>,
    permissions: Option<Vec<crate::permission::RawPermission>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransparent {
    inbound_listen: Option<SocketAddr>,
    outbound_listen: Option<SocketAddr>,
    outbound_policy: Option<OutboundPolicy>,
    exclude_inbound_ports: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<SocketAddr>,
    connection_log: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    handshake_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    drain_delay: Option<Duration>,
    max_pending_handshakes: Option<usize>,
    max_pending_handshakes_per_ip: Option<usize>,
    max_tunnel_buffer_bytes: Option<usize>,
    header_read_timeout: Option<Duration>,
    max_header_bytes: Option<usize>,
    request_timeout: Option<Duration>,
}

impl ProxyConfig {
    /// Reads and validates a config file. Relative paths inside it are taken from the file's
    /// own directory, so a config and its certificates can move together.
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
        let invalid = |key: &str, msg: &str| ConfigError::invalid(path, key, msg);

        let transparent = match raw.transparent {
            None => None,
            Some(t) => {
                if t.inbound_listen.is_none() && t.outbound_listen.is_none() {
                    return Err(invalid(
                        "transparent",
                        "needs inbound_listen, outbound_listen or both",
                    ));
                }
                if let Some(out) = t.outbound_listen {
                    if !out.ip().is_loopback() {
                        return Err(invalid(
                            "transparent.outbound_listen",
                            &format!(
                                "{out} is not a loopback address; the redirect sends the app's connections to loopback, and a plain listener must stay local"
                            ),
                        ));
                    }
                }
                if raw.control_plane.is_none() {
                    return Err(invalid(
                        "transparent",
                        "needs [control_plane]: the catalog says which service owns an address",
                    ));
                }
                // The transparent inbound decides at L4 only; beside an http inbound the
                // intentions carry L7 permissions, which it would take as a plain allow.
                let http_inbound = raw
                    .inbound
                    .as_ref()
                    .is_some_and(|i| i.protocol == Some(Protocol::Http));
                if t.inbound_listen.is_some() && http_inbound {
                    return Err(invalid(
                        "transparent.inbound_listen",
                        "cannot be used with [inbound] protocol = \"http\": the transparent inbound decides per connection, not per request, so it would let L7 permissions through",
                    ));
                }
                let exclude_inbound_ports =
                    crate::ports::parse_list(t.exclude_inbound_ports.as_deref().unwrap_or(""))
                        .map_err(|e| {
                            invalid("transparent.exclude_inbound_ports", &e.to_string())
                        })?;
                Some(TransparentConfig {
                    inbound_listen: t.inbound_listen,
                    outbound_listen: t.outbound_listen,
                    outbound_policy: t.outbound_policy.unwrap_or(OutboundPolicy::RegistryOnly),
                    exclude_inbound_ports,
                })
            }
        };

        let service = ServiceConfig {
            name: raw.service.name,
            namespace: raw
                .service
                .namespace
                .unwrap_or_else(Name::default_namespace),
            trust_domain: raw.service.trust_domain,
        };

        let inbound = match raw.inbound {
            None => None,
            Some(i) => {
                let protocol = i.protocol.unwrap_or(Protocol::Tcp);
                Some(InboundConfig {
                    listen: i.listen,
                    local_app: i.local_app,
                    protocol,
                })
            }
        };

        let mut upstreams = Vec::with_capacity(raw.upstreams.len());
        for (n, u) in raw.upstreams.into_iter().enumerate() {
            let key = |k: &str| format!("upstreams[{n}].{k}");
            if !u.listen.ip().is_loopback() {
                return Err(invalid(
                    &key("listen"),
                    &format!(
                        "{} is not a loopback address; plain upstream listeners must stay local",
                        u.listen
                    ),
                ));
            }
            let protocol = u.protocol.unwrap_or(Protocol::Tcp);
            if upstreams
                .iter()
                .any(|o: &UpstreamConfig| o.service == u.service && o.namespace == u.namespace)
            {
                return Err(invalid(
                    &key("service"),
                    &format!("upstream {:?} is listed twice", u.service.as_str()),
                ));
            }
            upstreams.push(UpstreamConfig {
                service: u.service,
                namespace: u.namespace,
                listen: u.listen,
                protocol,
                endpoints: u.endpoints,
            });
        }

        let credentials = match (raw.tls, raw.control_plane) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "control_plane",
                    "use either [tls] or [control_plane], not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "tls",
                    "one of [tls] (certificate files) or [control_plane] is required",
                ))
            }
            (Some(tls), None) => {
                let intentions = match raw.intentions {
                    None => StaticIntentions {
                        default: Action::Deny,
                        rules: Vec::new(),
                    },
                    Some(i) => StaticIntentions {
                        default: i.default.unwrap_or(Action::Deny),
                        rules: static_rules(
                            path,
                            i.rules,
                            &service.namespace,
                            inbound.as_ref().map(|i| i.protocol),
                        )?,
                    },
                };
                for (n, u) in upstreams.iter().enumerate() {
                    if u.endpoints.is_empty() {
                        return Err(invalid(
                            &format!("upstreams[{n}].endpoints"),
                            "is empty; without [control_plane] there is no catalog to find endpoints in",
                        ));
                    }
                }
                CredentialSource::Files {
                    tls: TlsFiles {
                        cert_file: resolve(tls.cert_file),
                        key_file: resolve(tls.key_file),
                        ca_file: resolve(tls.ca_file),
                    },
                    intentions,
                }
            }
            (None, Some(cp)) => {
                if raw.intentions.is_some() {
                    return Err(invalid(
                        "intentions",
                        "static intentions go with [tls]; with [control_plane] they come from the server",
                    ));
                }
                if !cp.address.starts_with("https://") {
                    return Err(invalid(
                        "control_plane.address",
                        &format!("{:?} must be an https:// address", cp.address),
                    ));
                }
                CredentialSource::ControlPlane(ControlPlaneConfig {
                    address: cp.address,
                    ca_file: resolve(cp.ca_file),
                    token_file: cp.token_file.map(resolve),
                    state_dir: cp.state_dir.map(resolve),
                })
            }
        };

        let mut limits = Limits::default();
        if let Some(l) = raw.limits {
            // Upper bound: far above any real need, and within what a semaphore can hold.
            const MAX_COUNT: usize = 1 << 24;
            let positive = |key: &str, v: Option<usize>, dflt: usize| match v {
                Some(0) => Err(invalid(&format!("limits.{key}"), "must be at least 1")),
                Some(v) if v > MAX_COUNT => Err(invalid(
                    &format!("limits.{key}"),
                    &format!("must be at most {MAX_COUNT}"),
                )),
                Some(v) => Ok(v),
                None => Ok(dflt),
            };
            let nonzero = |key: &str, v: Option<Duration>, dflt: std::time::Duration| match v {
                Some(d) if d.0.is_zero() => Err(invalid(
                    &format!("limits.{key}"),
                    "must be longer than zero",
                )),
                Some(d) => Ok(d.0),
                None => Ok(dflt),
            };
            let within = |key: &str,
                          v: Option<usize>,
                          range: std::ops::RangeInclusive<usize>,
                          why: &str,
                          dflt: usize| match v {
                Some(v) if !range.contains(&v) => Err(invalid(
                    &format!("limits.{key}"),
                    &format!("{v} is outside {}..={}{why}", range.start(), range.end()),
                )),
                Some(v) => Ok(v),
                None => Ok(dflt),
            };
            limits = Limits {
                max_connections: positive(
                    "max_connections",
                    l.max_connections,
                    limits.max_connections,
                )?,
                max_connections_set: l.max_connections.is_some(),
                handshake_timeout: nonzero(
                    "handshake_timeout",
                    l.handshake_timeout,
                    limits.handshake_timeout,
                )?,
                idle_timeout: nonzero("idle_timeout", l.idle_timeout, limits.idle_timeout)?,
                drain_timeout: l.drain_timeout.map(|d| d.0).unwrap_or(limits.drain_timeout),
                drain_delay: l.drain_delay.map(|d| d.0).unwrap_or(limits.drain_delay),
                max_pending_handshakes: positive(
                    "max_pending_handshakes",
                    l.max_pending_handshakes,
                    limits.max_pending_handshakes,
                )?,
                max_pending_handshakes_per_ip: positive(
                    "max_pending_handshakes_per_ip",
                    l.max_pending_handshakes_per_ip,
                    limits.max_pending_handshakes_per_ip,
                )?,
                max_tunnel_buffer_bytes: within(
                    "max_tunnel_buffer_bytes",
                    l.max_tunnel_buffer_bytes,
                    TUNNEL_BUFFER_RANGE,
                    " (a 64 KiB window for each of 100 streams, to HTTP/2's largest window)",
                    limits.max_tunnel_buffer_bytes,
                )?,
                header_read_timeout: nonzero(
                    "header_read_timeout",
                    l.header_read_timeout,
                    limits.header_read_timeout,
                )?,
                max_header_bytes: within(
                    "max_header_bytes",
                    l.max_header_bytes,
                    HEADER_BYTES_RANGE,
                    "",
                    limits.max_header_bytes,
                )?,
                request_timeout: nonzero(
                    "request_timeout",
                    l.request_timeout,
                    limits.request_timeout,
                )?,
            };
        }

        let admin = AdminConfig {
            listen: raw
                .admin
                .as_ref()
                .and_then(|a| a.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 19000))),
            connection_log: raw
                .admin
                .as_ref()
                .and_then(|a| a.connection_log)
                .unwrap_or(true),
        };

        // Two listeners on one fixed address would fail at bind; say which keys clash first.
        let mut listens: Vec<(String, SocketAddr)> = vec![("admin.listen".into(), admin.listen)];
        if let Some(i) = &inbound {
            listens.push(("inbound.listen".into(), i.listen));
        }
        for (n, u) in upstreams.iter().enumerate() {
            listens.push((format!("upstreams[{n}].listen"), u.listen));
        }
        if let Some(t) = &transparent {
            let keys = ["transparent.inbound_listen", "transparent.outbound_listen"];
            for (key, addr) in keys.into_iter().zip([t.inbound_listen, t.outbound_listen]) {
                listens.extend(addr.map(|a| (key.to_owned(), a)));
            }
        }
        for (i, (key, addr)) in listens.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listens[..i].iter().find(|(_, a)| a == addr) {
                return Err(invalid(
                    key,
                    &format!("{addr} is already used by `{other}`"),
                ));
            }
        }

        Ok(ProxyConfig {
            service,
            inbound,
            upstreams,
            credentials,
            admin,
            limits,
            transparent,
        })
    }
}

/// The `[intentions]` rules for this proxy's own service, whose namespace is `namespace`.
/// `inbound` is the protocol of `[inbound]`: L7 permissions are taken only for `http`, the one
/// inbound that decides each request (security rule 6, fail closed, docs/security.md).
fn static_rules(
    path: &Path,
    raw: Vec<RawRule>,
    namespace: &Name,
    inbound: Option<Protocol>,
) -> Result<Vec<Rule>, ConfigError> {
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.len());
    for (n, r) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("intentions.rules[{n}].{k}");
        let source = Source::parse(&r.source).map_err(|e| {
            ConfigError::invalid(path, key("source"), format!("{:?}: {e}", r.source))
        })?;
        let rule = match (r.action, &r.permissions) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    path,
                    key("permissions"),
                    "a rule has either an action (L4) or permissions (L7), not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    path,
                    key("action"),
                    "is required (\"allow\" or \"deny\"), or permissions for an http inbound",
                ))
            }
            (Some(action), None) => Rule::l4(source.clone(), action),
            (None, Some(list)) => {
                match inbound {
                    Some(Protocol::Http) => {}
                    Some(Protocol::Tcp) => {
                        return Err(ConfigError::invalid(
                            path,
                            key("permissions"),
                            "L7 permissions need [inbound] protocol = \"http\"; a tcp inbound cannot check requests",
                        ))
                    }
                    None => {
                        return Err(ConfigError::invalid(
                            path,
                            key("permissions"),
                            "L7 permissions need an [inbound] with protocol = \"http\", and there is no [inbound]",
                        ))
                    }
                }
                let permissions = crate::permission::parse_permissions(list).map_err(|e| {
                    ConfigError::invalid(
                        path,
                        format!("intentions.rules[{n}].{}", e.key),
                        e.problem.to_string(),
                    )
                })?;
                Rule::l7(source.clone(), permissions)
            }
        };
        // Compared with namespaces written out: `legacy` and `default/legacy` are one caller
        // here, and two rules for it would leave the decision to their order.
        let same = source.qualified(namespace);
        if let Some(m) = rules
            .iter()
            .position(|o| o.source.qualified(namespace) == same)
        {
            return Err(ConfigError::invalid(
                path,
                key("source"),
                format!(
                    "{:?} names the same caller as intentions.rules[{m}].source ({}); write one rule per caller",
                    r.source, rules[m].source
                ),
            ));
        }
        rules.push(rule);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[service]
name = "inventory"
[inbound]
listen = "127.0.0.1:21000"
local_app = "127.0.0.1:8080"
[[upstreams]]
service = "payments"
listen = "127.0.0.1:9191"
endpoints = ["127.0.0.1:21001"]
[tls]
cert_file = "cert.pem"
key_file = "/abs/key.pem"
ca_file = "roots.pem"
[intentions]
default = "deny"
rules = [{ source = "order", action = "allow" }, { source = "legacy", action = "deny" }]
[limits]
handshake_timeout = "2s"
"#;

    fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::parse(Path::new("/etc/ward/proxy.toml"), text)
    }

    /// The one-line error for `text`.
    fn refused(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.service.namespace.as_str(), "default");
        assert_eq!(
            c.limits.handshake_timeout,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(c.limits.max_connections, 100_000);
        assert!(!c.limits.max_connections_set);
        let set = parse(&GOOD.replace("[limits]\n", "[limits]\nmax_connections = 7\n")).unwrap();
        assert_eq!(set.limits.max_connections, 7);
        assert!(set.limits.max_connections_set);
        assert_eq!(c.limits.drain_delay, std::time::Duration::ZERO);
        let delayed =
            parse(&GOOD.replace("[limits]\n", "[limits]\ndrain_delay = \"5s\"\n")).unwrap();
        assert_eq!(
            delayed.limits.drain_delay,
            std::time::Duration::from_secs(5)
        );
        assert!(c.admin.connection_log);
        let quiet = parse(&format!("{GOOD}\n[admin]\nconnection_log = false\n")).unwrap();
        assert!(!quiet.admin.connection_log);
        assert_eq!(quiet.admin.listen, c.admin.listen);
        let CredentialSource::Files { tls, intentions } = c.credentials else {
            panic!("files")
        };
        assert_eq!(tls.cert_file, Path::new("/etc/ward/cert.pem"));
        assert_eq!(tls.key_file, Path::new("/abs/key.pem"));
        assert_eq!(intentions.rules.len(), 2);
    }

    const TRANSPARENT: &str = r#"
[service]
name = "inventory"
[transparent]
inbound_listen = "0.0.0.0:15006"
outbound_listen = "127.0.0.1:15001"
[control_plane]
address = "https://10.0.0.1:8502"
ca_file = "ca.pem"
"#;

    #[test]
    fn transparent_mode_takes_its_listeners_and_refuses_what_would_leak() {
        let c = parse(TRANSPARENT).unwrap();
        let t = c.transparent.expect("[transparent]");
        assert_eq!(t.inbound_listen, Some("0.0.0.0:15006".parse().unwrap()));
        assert_eq!(t.outbound_listen, Some("127.0.0.1:15001".parse().unwrap()));
        // Fail closed unless the operator opens it.
        assert_eq!(t.outbound_policy, OutboundPolicy::RegistryOnly);
        assert!(t.exclude_inbound_ports.is_empty());
        let excluded = parse(&TRANSPARENT.replace(
            "[control_plane]",
            "exclude_inbound_ports = \"22,8000-8080\"\n[control_plane]",
        ))
        .unwrap();
        assert_eq!(
            excluded.transparent.unwrap().exclude_inbound_ports,
            [22..=22, 8000..=8080]
        );
        let open = parse(&TRANSPARENT.replace(
            "[control_plane]",
            "outbound_policy = \"allow_any\"\n[control_plane]",
        ))
        .unwrap();
        assert_eq!(
            open.transparent.unwrap().outbound_policy,
            OutboundPolicy::AllowAny
        );
        let cases: &[(&str, &str, &str)] = &[
            (
                "127.0.0.1:15001",
                "0.0.0.0:15001",
                "key `transparent.outbound_listen`: 0.0.0.0:15001 is not a loopback address",
            ),
            (
                "inbound_listen = \"0.0.0.0:15006\"\noutbound_listen = \"127.0.0.1:15001\"\n",
                "",
                "key `transparent`: needs inbound_listen, outbound_listen or both",
            ),
            (
                "[control_plane]\naddress = \"https://10.0.0.1:8502\"\nca_file = \"ca.pem\"\n",
                "[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nca_file = \"ca\"\n",
                "key `transparent`: needs [control_plane]",
            ),
            (
                "[control_plane]",
                "outbound_policy = \"open\"\n[control_plane]",
                "transparent.outbound_policy",
            ),
            (
                "[control_plane]",
                "[inbound]\nlisten = \"0.0.0.0:21000\"\nlocal_app = \"127.0.0.1:8080\"\nprotocol = \"http\"\n[control_plane]",
                "key `transparent.inbound_listen`: cannot be used with [inbound] protocol = \"http\"",
            ),
            (
                "[control_plane]",
                "exclude_inbound_ports = \"22,0\"\n[control_plane]",
                "key `transparent.exclude_inbound_ports`: \"0\" is not a port",
            ),
            (
                "[control_plane]",
                "exclude_inbound_ports = \"9-8\"\n[control_plane]",
                "key `transparent.exclude_inbound_ports`: \"9-8\" is not a port range",
            ),
            (
                "127.0.0.1:15001",
                "127.0.0.1:19000",
                "key `transparent.outbound_listen`: 127.0.0.1:19000 is already used by `admin.listen`",
            ),
        ];
        for (from, to, expected) in cases {
            let text = TRANSPARENT.replace(from, to);
            assert_ne!(text, TRANSPARENT, "{from}");
            let err = refused(&text);
            assert!(err.contains(expected), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("[inbound]\n", "[inbound]\nbogus = 1\n", "bogus"),
            (
                "listen = \"127.0.0.1:21000\"",
                "listen = \"nope\"",
                "inbound.listen",
            ),
            (
                "name = \"inventory\"",
                "name = \"Inventory_1\"",
                "service.name",
            ),
            (
                "listen = \"127.0.0.1:9191\"",
                "listen = \"0.0.0.0:9191\"",
                "upstreams[0].listen",
            ),
            (
                "handshake_timeout = \"2s\"",
                "handshake_timeout = \"ten\"",
                "limits.handshake_timeout",
            ),
            (
                "{ source = \"order\", action = \"allow\" }",
                "{ source = \"order\", action = \"maybe\" }",
                "intentions.rules[0].action",
            ),
            (
                "{ source = \"order\", action = \"allow\" }",
                "{ source = \"Order\", action = \"allow\" }",
                "intentions.rules[0].source",
            ),
            (
                "{ source = \"legacy\", action = \"deny\" }",
                "{ source = \"order\", action = \"deny\" }",
                "intentions.rules[1].source",
            ),
            (
                "{ source = \"order\", action = \"allow\" }",
                "{ source = \"default/legacy\", action = \"allow\" }",
                "intentions.rules[1].source",
            ),
            ("[tls]", "[tlsx]", "tlsx"),
            (
                "endpoints = [\"127.0.0.1:21001\"]",
                "endpoints = []",
                "upstreams[0].endpoints",
            ),
            (
                "listen = \"127.0.0.1:9191\"",
                "listen = \"127.0.0.1:21000\"",
                "upstreams[0].listen",
            ),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "{from}");
            let err = refused(&GOOD.replacen(from, to, 1));
            assert!(err.contains(key), "{to}: {err}");
            assert!(err.contains("/etc/ward/proxy.toml"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn needs_a_credential_source() {
        let text = GOOD.replace("[tls]", "[other]").replace("cert_file", "# ");
        assert!(parse(&text).is_err());
        let no_tls: String = GOOD.split("[tls]").next().unwrap().to_owned();
        let err = refused(&no_tls);
        assert!(err.contains("`tls`"), "{err}");
    }

    #[test]
    fn limits_have_an_upper_bound() {
        let text = GOOD.replace(
            "handshake_timeout = \"2s\"",
            "max_pending_handshakes = 4000000000000000000",
        );
        let err = refused(&text);
        assert!(err.contains("limits.max_pending_handshakes"), "{err}");
    }

    #[test]
    fn tunnel_buffer_is_bounded_both_ways() {
        let set = |v: &str| {
            parse(&GOOD.replace(
                "handshake_timeout = \"2s\"",
                &format!("max_tunnel_buffer_bytes = {v}"),
            ))
        };
        assert_eq!(
            set("8388608").unwrap().limits.max_tunnel_buffer_bytes,
            8 << 20
        );
        for bad in ["1048576", "4294967296"] {
            let err = set(bad).unwrap_err().to_string();
            assert!(
                err.contains("limits.max_tunnel_buffer_bytes") && err.contains(bad),
                "{err}"
            );
        }
        assert_eq!(
            parse(GOOD).unwrap().limits.max_tunnel_buffer_bytes,
            64 << 20
        );
    }

    #[test]
    fn http_is_taken_on_the_inbound_and_on_upstreams() {
        let http = parse(&GOOD.replace(
            "local_app = \"127.0.0.1:8080\"",
            "local_app = \"127.0.0.1:8080\"\nprotocol = \"http\"",
        ))
        .unwrap();
        assert_eq!(http.inbound.unwrap().protocol, Protocol::Http);
        let upstream = parse(&GOOD.replace(
            "service = \"payments\"",
            "service = \"payments\"\nprotocol = \"http\"",
        ))
        .unwrap();
        assert_eq!(upstream.upstreams[0].protocol, Protocol::Http);
        let err = refused(&GOOD.replace(
            "service = \"payments\"",
            "service = \"payments\"\nprotocol = \"grpc\"",
        ));
        assert!(err.contains("protocol"), "{err}");
    }

    #[test]
    fn static_permissions_need_an_http_inbound() {
        let l7 = r#"{ source = "web", permissions = [
  { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
  { action = "deny", path_exact = "/admin", headers = [{ name = "x-env", exact = "prod" }] },
] }"#;
        let with = |protocol: &str, rule: &str| {
            GOOD.replace(
                "local_app = \"127.0.0.1:8080\"",
                &format!("local_app = \"127.0.0.1:8080\"\nprotocol = \"{protocol}\""),
            )
            .replace("{ source = \"legacy\", action = \"deny\" }", rule)
        };
        let c = parse(&with("http", l7)).unwrap();
        let CredentialSource::Files { intentions, .. } = c.credentials else {
            panic!("files")
        };
        let rule = &intentions.rules[1];
        assert_eq!(
            rule.action,
            Action::Allow,
            "an L7 rule admits the connection"
        );
        let p = rule.permissions.as_ref().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].path,
            Some(crate::permission::PathMatch::Prefix("/stock/".into()))
        );
        assert!(intentions.rules[0].permissions.is_none());

        // Refused on a tcp inbound and without an inbound: one sentence naming the key.
        let no_inbound = with("http", l7).replace(
            "[inbound]\nlisten = \"127.0.0.1:21000\"\nlocal_app = \"127.0.0.1:8080\"\nprotocol = \"http\"\n",
            "",
        );
        assert!(!no_inbound.contains("[inbound]"));
        for (text, words) in [
            (with("tcp", l7), "protocol = \"http\"; a tcp inbound"),
            (no_inbound, "there is no [inbound]"),
        ] {
            let err = refused(&text);
            assert!(
                err.contains("key `intentions.rules[1].permissions`") && err.contains(words),
                "{err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
        // A bad permission is named by its full key; both kinds in one rule are refused.
        let cases = [
            (
                r#"{ source = "web", permissions = [{ action = "allow", path_prefix = "stock" }] }"#,
                "intentions.rules[1].permissions[0].path_prefix",
            ),
            (
                r#"{ source = "web", permissions = [{ action = "allow", paht = "/" }] }"#,
                "paht",
            ),
            (
                r#"{ source = "web", permissions = [] }"#,
                "intentions.rules[1].permissions",
            ),
            (
                r#"{ source = "web", action = "allow", permissions = [{ action = "allow" }] }"#,
                "intentions.rules[1].permissions",
            ),
            (r#"{ source = "web" }"#, "intentions.rules[1].action"),
        ];
        for (rule, key) in cases {
            let err = refused(&with("http", rule));
            assert!(err.contains(key), "{rule}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn http_limits() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.limits.header_read_timeout,
            std::time::Duration::from_secs(10)
        );
        assert_eq!(c.limits.max_header_bytes, 65_536);
        assert_eq!(c.limits.request_timeout, std::time::Duration::from_secs(15));
        let set = |kv: &str| parse(&GOOD.replace("handshake_timeout = \"2s\"", kv));
        let l =
            set("header_read_timeout = \"1s\"\nmax_header_bytes = 16384\nrequest_timeout = \"2m\"")
                .unwrap()
                .limits;
        assert_eq!(l.header_read_timeout, std::time::Duration::from_secs(1));
        assert_eq!(l.max_header_bytes, 16_384);
        assert_eq!(l.request_timeout, std::time::Duration::from_secs(120));
        for (kv, key) in [
            ("header_read_timeout = \"0s\"", "limits.header_read_timeout"),
            ("request_timeout = \"0s\"", "limits.request_timeout"),
            ("max_header_bytes = 100", "limits.max_header_bytes"),
            ("max_header_bytes = 100000000", "limits.max_header_bytes"),
        ] {
            let err = set(kv).unwrap_err().to_string();
            assert!(err.contains(key), "{kv}: {err}");
        }
    }

    #[test]
    fn control_plane_must_be_https() {
        let cp = GOOD
            .split("[tls]")
            .next()
            .unwrap()
            .replace("endpoints = [\"127.0.0.1:21001\"]", "")
            + "[control_plane]\naddress = \"http://127.0.0.1:8502\"\nca_file = \"ca.pem\"\n";
        let err = refused(&cp);
        assert!(err.contains("control_plane.address"), "{err}");
    }
}
