//! Shared helpers for the end-to-end tests of `tests/`: each file there starts the real `ward`
//! binary ([`proc::ward_bin`]) and imports this crate as `common`
//! (`use ward_test_support as common;`).

pub mod cp;
pub mod net;
pub mod netns;
pub mod pki;
pub mod proc;
pub mod py;
pub mod tls;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use rustls::AlertDescription;

use net::EchoApp;
use pki::{Identity, Pki, TRUST_DOMAIN};
use proc::{ProxyConfig, TempDir, WardProcess};

/// Calls `f` every `interval` until it returns `Some`, or `timeout` passes (`None`).
pub fn wait_until<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(interval);
    }
}

/// The `[tls]` files of one proxy.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Writes `<name>-cert.pem` (chain), `<name>-key.pem` and `<name>-roots.pem` for a proxy.
pub fn write_tls_files(dir: &TempDir, name: &str, pki: &Pki, id: &Identity) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join(&format!("{name}-cert.pem")),
        key: dir.join(&format!("{name}-key.pem")),
        ca: dir.join(&format!("{name}-roots.pem")),
    };
    std::fs::write(&files.cert, &id.chain_pem).unwrap();
    std::fs::write(&files.key, &id.key_pem).unwrap();
    pki.write_roots(&files.ca);
    files
}

/// `inventory`'s proxy in front of a counting echo app, allowing `order` and explicitly
/// denying `legacy` (default deny).
pub struct Inventory {
    pub dir: TempDir,
    pub pki: Pki,
    pub app: EchoApp,
    pub proxy: WardProcess,
    pub files: TlsFiles,
    pub config: PathBuf,
    pub identity: Identity,
}

impl Inventory {
    pub fn start(prefix: &str) -> Self {
        Self::start_with(prefix, |c| c)
    }

    /// As [`Inventory::start`], with `edit` applied to the config before it is written.
    pub fn start_with(prefix: &str, edit: impl FnOnce(ProxyConfig) -> ProxyConfig) -> Self {
        Self::start_as(prefix, |pki| pki.leaf("inventory"), edit)
    }

    /// As [`Inventory::start_with`], presenting the identity `issue` makes from the mesh's PKI.
    pub fn start_as(
        prefix: &str,
        issue: impl FnOnce(&Pki) -> Identity,
        edit: impl FnOnce(ProxyConfig) -> ProxyConfig,
    ) -> Self {
        let dir = TempDir::new(prefix);
        let pki = Pki::new(TRUST_DOMAIN);
        let identity = issue(&pki);
        let files = write_tls_files(&dir, "inventory", &pki, &identity);
        let app = EchoApp::start();
        let config = dir.join("inventory.toml");
        edit(
            ProxyConfig::new("inventory", &files.cert, &files.key, &files.ca)
                .inbound("127.0.0.1:0", app.addr)
                .rule("order", "allow")
                .rule("legacy", "deny"),
        )
        .write(&config);
        let proxy = WardProcess::start("inventory", &config, &["inbound"]);
        Inventory {
            dir,
            pki,
            app,
            proxy,
            files,
            config,
            identity,
        }
    }

    /// What a client requires of inventory's certificate.
    pub fn server_check(&self) -> tls::ServerCheck {
        tls::ServerCheck::mesh(
            &self.pki.root.cert_der,
            &pki::spiffe_id(TRUST_DOMAIN, "inventory"),
        )
    }
}

/// One handshake that `inventory` must refuse.
pub struct RefusalCase {
    pub name: &'static str,
    /// `None`: no client certificate.
    pub identity: Option<Identity>,
    /// The alert the client must receive.
    pub alert: AlertDescription,
    /// `ward_tls_handshakes_total{direction="inbound",result=..}` that must go up by one.
    pub result: &'static str,
    /// What `openssl s_client` (OpenSSL 3) prints for that alert.
    pub openssl_text: &'static str,
    /// Python `ssl.SSLError.reason` for that alert.
    pub python_reason: &'static str,
}

/// The refusals of issue 2 (and a leaf used as an issuer), against `pki` (the mesh `inventory` trusts).
pub fn refusal_cases(pki: &Pki) -> Vec<RefusalCase> {
    let foreign = Pki::new(TRUST_DOMAIN);
    let case = |name, identity, alert, result, openssl_text, python_reason| RefusalCase {
        name,
        identity,
        alert,
        result,
        openssl_text,
        python_reason,
    };
    use AlertDescription as A;
    vec![
        case(
            "no client certificate",
            None,
            A::CertificateRequired,
            "no_client_cert",
            "alert certificate required",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        ),
        case(
            "self-signed certificate with order's SPIFFE ID",
            Some(pki::self_signed(TRUST_DOMAIN, "order")),
            A::UnknownCA,
            "unknown_ca",
            "alert unknown ca",
            "TLSV1_ALERT_UNKNOWN_CA",
        ),
        case(
            "certificate from another CA whose CN and SAN say order",
            Some(foreign.leaf("order")),
            A::UnknownCA,
            "unknown_ca",
            "alert unknown ca",
            "TLSV1_ALERT_UNKNOWN_CA",
        ),
        case(
            "expired certificate",
            Some(pki.expired("order")),
            A::CertificateExpired,
            "expired",
            "alert certificate expired",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        ),
        case(
            "not yet valid certificate",
            Some(pki.not_yet_valid("order")),
            A::CertificateExpired,
            "expired",
            "alert certificate expired",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        ),
        case(
            "SPIFFE ID of another trust domain",
            Some(pki.other_trust_domain("order", "evil.local")),
            A::BadCertificate,
            "bad_identity",
            "alert bad certificate",
            "SSLV3_ALERT_BAD_CERTIFICATE",
        ),
        case(
            "two URI SANs",
            Some(pki.two_uris("order", "rogue")),
            A::BadCertificate,
            "bad_identity",
            "alert bad certificate",
            "SSLV3_ALERT_BAD_CERTIFICATE",
        ),
        case(
            "CA certificate used as a leaf",
            Some(pki.ca_as_leaf("order")),
            A::BadCertificate,
            "bad_identity",
            "alert bad certificate",
            "SSLV3_ALERT_BAD_CERTIFICATE",
        ),
        case(
            "order's certificate issued by a mesh leaf (inventory's)",
            Some(pki.issued_by_leaf("order")),
            A::UnknownCA,
            "unknown_ca",
            "alert unknown ca",
            "TLSV1_ALERT_UNKNOWN_CA",
        ),
        case(
            "valid identity rogue with no intention (default deny)",
            Some(pki.leaf("rogue")),
            A::AccessDenied,
            "denied",
            "alert access denied",
            "TLSV1_ALERT_ACCESS_DENIED",
        ),
        case(
            "valid identity legacy with an explicit deny",
            Some(pki.leaf("legacy")),
            A::AccessDenied,
            "denied",
            "alert access denied",
            "TLSV1_ALERT_ACCESS_DENIED",
        ),
    ]
}

/// Whether `program args` runs and exits 0; says SKIPPED (see [`skipped`]) otherwise.
pub fn tool_available(program: &str, args: &[&str]) -> bool {
    match std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => true,
        _ => {
            skipped(&format!(
                "`{program}` is not available here (CI installs it)"
            ));
            false
        }
    }
}

/// Says loudly that a check did not run, where a passing run shows it: the test runners hide
/// what a passing test prints, so the line also goes to `ward-skipped-tests.txt` beside the
/// `ward` binary (`target/debug/`), which `.ci/run` prints after the tests.
pub fn skipped(why: &str) {
    use std::io::Write;
    // libtest names a test's thread after it; a runner that runs the test on the main thread
    // names it in the arguments.
    let test = match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        _ => std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    };
    let line = format!("SKIPPED: {test}: {why}");
    let _ = writeln!(std::io::stderr(), "==========\n{line}\n==========");
    if let Some(dir) = proc::ward_bin().parent() {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("ward-skipped-tests.txt"))
            .and_then(|mut f| writeln!(f, "{line}"));
    }
}
