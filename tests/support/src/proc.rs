//! Running the real `ward` binary: temp dirs, proxy config files, the process wrapper.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::net::{http_get, metric_sum};
use super::wait_until;

/// The `ward` binary cargo built for the test being run. `env!("CARGO_BIN_EXE_ward")` exists only
/// in the root package's test targets, not in this crate: the runner's `CARGO_BIN_EXE_ward` is
/// used where it sets one at run time (nextest does), else `target/<profile>/ward` beside the
/// test binary's `deps/` directory.
pub fn ward_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = std::env::var_os("CARGO_BIN_EXE_ward")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let test = std::env::current_exe().expect("the test binary's path");
                // target/<profile>/deps/<test>-<hash> -> target/<profile>/ward
                let profile_dir = test
                    .parent()
                    .and_then(Path::parent)
                    .expect("the test binary is in target/<profile>/deps");
                profile_dir.join(format!("ward{}", std::env::consts::EXE_SUFFIX))
            });
        assert!(
            bin.is_file(),
            "no ward binary at {} (run the tests with cargo test or cargo nextest, which build it)",
            bin.display()
        );
        bin
    })
}

/// A directory under the system temp dir, removed on drop (kept if `WARD_TEST_KEEP` is set).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "ward-test-{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("WARD_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub service: String,
    pub listen: String,
    pub endpoints: Vec<String>,
}

/// The proxy config file (docs/proxy-config.md), with `[tls]` and static intentions.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub service: String,
    pub trust_domain: Option<String>,
    /// `(listen, local_app)`
    pub inbound: Option<(String, String)>,
    pub upstreams: Vec<UpstreamConfig>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    pub default_policy: String,
    /// `(source, action)`
    pub rules: Vec<(String, String)>,
    pub admin_listen: String,
    pub handshake_timeout: Option<String>,
}

impl ProxyConfig {
    pub fn new(service: &str, cert_file: &Path, key_file: &Path, ca_file: &Path) -> Self {
        ProxyConfig {
            service: service.to_string(),
            trust_domain: Some(super::pki::TRUST_DOMAIN.to_string()),
            inbound: None,
            upstreams: Vec::new(),
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            ca_file: ca_file.to_path_buf(),
            default_policy: "deny".to_string(),
            rules: Vec::new(),
            admin_listen: "127.0.0.1:0".to_string(),
            handshake_timeout: None,
        }
    }

    pub fn inbound(mut self, listen: &str, local_app: SocketAddr) -> Self {
        self.inbound = Some((listen.to_string(), local_app.to_string()));
        self
    }

    pub fn upstream(mut self, service: &str, endpoints: &[SocketAddr]) -> Self {
        self.upstreams.push(UpstreamConfig {
            service: service.to_string(),
            listen: "127.0.0.1:0".to_string(),
            endpoints: endpoints.iter().map(|a| a.to_string()).collect(),
        });
        self
    }

    pub fn rule(mut self, source: &str, action: &str) -> Self {
        self.rules.push((source.to_string(), action.to_string()));
        self
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        s.push_str("[service]\n");
        s.push_str(&format!("name = {}\n", toml_str(&self.service)));
        s.push_str("namespace = \"default\"\n");
        if let Some(td) = &self.trust_domain {
            s.push_str(&format!("trust_domain = {}\n", toml_str(td)));
        }
        if let Some((listen, app)) = &self.inbound {
            s.push_str("\n[inbound]\n");
            s.push_str(&format!("listen = {}\n", toml_str(listen)));
            s.push_str(&format!("local_app = {}\n", toml_str(app)));
            s.push_str("protocol = \"tcp\"\n");
        }
        for u in &self.upstreams {
            s.push_str("\n[[upstreams]]\n");
            s.push_str(&format!("service = {}\n", toml_str(&u.service)));
            s.push_str(&format!("listen = {}\n", toml_str(&u.listen)));
            s.push_str("protocol = \"tcp\"\n");
            let eps: Vec<String> = u.endpoints.iter().map(|e| toml_str(e)).collect();
            s.push_str(&format!("endpoints = [{}]\n", eps.join(", ")));
        }
        s.push_str("\n[tls]\n");
        s.push_str(&format!("cert_file = {}\n", toml_path(&self.cert_file)));
        s.push_str(&format!("key_file = {}\n", toml_path(&self.key_file)));
        s.push_str(&format!("ca_file = {}\n", toml_path(&self.ca_file)));
        s.push_str("\n[intentions]\n");
        s.push_str(&format!("default = {}\n", toml_str(&self.default_policy)));
        let rules: Vec<String> = self
            .rules
            .iter()
            .map(|(src, act)| {
                format!(
                    "{{ source = {}, action = {} }}",
                    toml_str(src),
                    toml_str(act)
                )
            })
            .collect();
        s.push_str(&format!("rules = [{}]\n", rules.join(", ")));
        s.push_str("\n[admin]\n");
        s.push_str(&format!("listen = {}\n", toml_str(&self.admin_listen)));
        if let Some(t) = &self.handshake_timeout {
            s.push_str("\n[limits]\n");
            s.push_str(&format!("handshake_timeout = {}\n", toml_str(t)));
        }
        s
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_toml()).expect("write proxy config");
    }
}

/// Removes ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters then one final byte in 0x40..=0x7e
                for c2 in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c2) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The value of `key=` in a log line (token up to whitespace or a comma), quotes removed.
fn token_after(line: &str, key: &str) -> Option<String> {
    let mut search_from = 0;
    while let Some(rel) = line[search_from..].find(key) {
        let pos = search_from + rel;
        let boundary = pos == 0
            || !line[..pos]
                .chars()
                .next_back()
                .map(|c| c.is_alphanumeric() || c == '_' || c == '.')
                .unwrap_or(false);
        if boundary {
            let rest = &line[pos + key.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == ',' || c == '}')
                .unwrap_or(rest.len());
            let tok = rest[..end].trim_matches('"').to_string();
            if !tok.is_empty() {
                return Some(tok);
            }
        }
        search_from = pos + key.len();
    }
    None
}

/// `listening role=<ROLE> addr=<IP:PORT>` -> `(ROLE, addr)`.
pub fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    let role = token_after(&line, "role=")?;
    let addr = token_after(&line, "addr=")?.parse().ok()?;
    Some((role, addr))
}

pub type Lines = Arc<Mutex<Vec<String>>>;

/// Collects the lines of `r` into `lines` on a thread (until EOF).
pub fn collect_lines<R: Read + Send + 'static>(r: R, lines: Lines) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    lines.lock().unwrap().push(line);
                }
            }
        }
    })
}

/// `ward proxy --config CONFIG`; `verbose` honours WARD_TEST_LOG (never for exit-status tests,
/// which count stderr lines).
fn ward_command(config: &Path, verbose: bool) -> Command {
    let mut cmd = Command::new(ward_bin());
    cmd.arg("proxy")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1");
    // Default log level unless a developer asks for more with WARD_TEST_LOG=debug.
    match std::env::var("WARD_TEST_LOG").ok().filter(|_| verbose) {
        Some(v) => {
            cmd.env("WARD_LOG", &v).env("RUST_LOG", &v);
        }
        None => {
            cmd.env_remove("WARD_LOG").env_remove("RUST_LOG");
        }
    }
    cmd
}

/// A running `ward proxy`, killed (through its own `Child`) on drop.
pub struct WardProcess {
    pub label: String,
    child: Child,
    stderr: Lines,
    stdout: Lines,
    listeners: HashMap<String, SocketAddr>,
}

impl WardProcess {
    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `ward proxy --config CONFIG`, waits for a `listening` line for `admin` and each
    /// of `roles` (e.g. `inbound`, `upstream.inventory`), then for `/ready` to answer 200.
    pub fn start(label: &str, config: &Path, roles: &[&str]) -> Self {
        Self::start_ready_within(label, config, roles, Duration::from_secs(10))
    }

    /// As [`WardProcess::start`], waiting up to `ready_timeout` for `/ready`.
    pub fn start_ready_within(
        label: &str,
        config: &Path,
        roles: &[&str],
        ready_timeout: Duration,
    ) -> Self {
        let p = Self::spawn(label, config, roles);
        if !p.wait_ready(ready_timeout) {
            panic!(
                "[{label}] GET /ready on {} did not answer 200 within {ready_timeout:?}\nstderr:\n{}",
                p.admin(),
                p.stderr_text()
            );
        }
        p
    }

    /// `GET /ready` status now (`None` if the admin listener does not answer).
    pub fn ready_status(&self) -> Option<u16> {
        http_get(self.admin(), "/ready").ok().map(|r| r.status)
    }

    /// Waits up to `timeout` for `/ready` to answer 200.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(50), || {
            (self.ready_status() == Some(200)).then_some(())
        })
        .is_some()
    }

    /// Starts `ward proxy --config CONFIG` and waits only for the `listening` lines of `admin`
    /// and each of `roles` (not for `/ready`).
    pub fn spawn(label: &str, config: &Path, roles: &[&str]) -> Self {
        Self::spawn_with_args(label, config, roles, &[])
    }

    /// As [`WardProcess::spawn`], with `extra` arguments after `--config CONFIG`.
    pub fn spawn_with_args(label: &str, config: &Path, roles: &[&str], extra: &[&str]) -> Self {
        let mut child = ward_command(config, true)
            .args(extra)
            .spawn()
            .expect("spawn ward proxy");
        let stderr: Lines = Arc::default();
        let stdout: Lines = Arc::default();
        collect_lines(child.stderr.take().unwrap(), stderr.clone());
        collect_lines(child.stdout.take().unwrap(), stdout.clone());
        let mut p = WardProcess {
            label: label.to_string(),
            child,
            stderr,
            stdout,
            listeners: HashMap::new(),
        };
        let mut wanted: Vec<&str> = vec!["admin"];
        wanted.extend_from_slice(roles);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for line in p.stderr.lock().unwrap().iter() {
                if let Some((role, addr)) = parse_listening(line) {
                    p.listeners.insert(role, addr);
                }
            }
            if wanted.iter().all(|r| p.listeners.contains_key(*r)) {
                break;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                // give the reader threads a moment to drain the pipes
                wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
                    (!p.stderr.lock().unwrap().is_empty()).then_some(())
                });
                panic!(
                    "[{label}] ward proxy exited with {status} before listening on {wanted:?}\nstderr:\n{}",
                    p.stderr_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "[{label}] no `listening role=.. addr=..` lines for {wanted:?} within 20 s (found {:?})\nstderr:\n{}",
                    p.listeners,
                    p.stderr_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn addr(&self, role: &str) -> SocketAddr {
        *self
            .listeners
            .get(role)
            .unwrap_or_else(|| panic!("[{}] no listener with role {role}", self.label))
    }

    pub fn admin(&self) -> SocketAddr {
        self.addr("admin")
    }

    pub fn inbound(&self) -> SocketAddr {
        self.addr("inbound")
    }

    pub fn upstream(&self, service: &str) -> SocketAddr {
        self.addr(&format!("upstream.{service}"))
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stderr_len(&self) -> usize {
        self.stderr.lock().unwrap().len()
    }

    pub fn stderr_text(&self) -> String {
        let mut s = self.stderr.lock().unwrap().join("\n");
        let out = self.stdout.lock().unwrap();
        if !out.is_empty() {
            s.push_str("\n--- stdout ---\n");
            s.push_str(&out.join("\n"));
        }
        s
    }

    /// Waits until a stderr line at index >= `since` satisfies `pred`; returns it.
    pub fn wait_for_stderr(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        wait_until(timeout, Duration::from_millis(50), || {
            let lines = self.stderr.lock().unwrap();
            lines
                .iter()
                .skip(since)
                .map(|l| strip_ansi(l))
                .find(|l| pred(l))
        })
    }

    pub fn metrics(&self) -> String {
        let r = http_get(self.admin(), "/metrics").expect("GET /metrics");
        assert_eq!(r.status, 200, "[{}] GET /metrics status", self.label);
        r.body
    }

    /// `ward_tls_handshakes_total{direction,result}` (0 if absent).
    pub fn handshakes(&self, direction: &str, result: &str) -> f64 {
        metric_sum(
            &self.metrics(),
            "ward_tls_handshakes_total",
            &[("direction", direction), ("result", result)],
        )
    }

    /// Sum of `ward_tls_handshakes_total{direction}` over all results.
    pub fn handshakes_total(&self, direction: &str) -> f64 {
        metric_sum(
            &self.metrics(),
            "ward_tls_handshakes_total",
            &[("direction", direction)],
        )
    }

    pub fn config_json(&self) -> serde_json::Value {
        let r = http_get(self.admin(), "/config").expect("GET /config");
        assert_eq!(r.status, 200, "[{}] GET /config status", self.label);
        serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("[{}] /config is not JSON ({e}): {}", self.label, r.body))
    }

    /// `certificate.serial` from `/config`, normalized.
    pub fn config_serial(&self) -> Option<String> {
        self.config_json()
            .pointer("/certificate/serial")
            .and_then(|v| v.as_str())
            .map(super::pki::normalize_serial)
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for WardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "===== [{}] ward proxy stderr =====\n{}\n===== end [{}] =====",
                self.label,
                self.stderr_text(),
                self.label
            );
        }
    }
}

/// Result of a `ward` run that is expected to exit.
#[derive(Debug)]
pub struct Exit {
    /// `None` if it had to be killed after the timeout.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
    pub stderr: String,
    pub stdout: String,
}

/// Runs `ward proxy --config CONFIG` and waits up to `timeout` for it to exit (kills it after).
pub fn run_proxy_to_exit(config: &Path, timeout: Duration) -> Exit {
    let start = Instant::now();
    let child = ward_command(config, false)
        .spawn()
        .expect("spawn ward proxy");
    wait_for_exit(child, start, timeout)
}

/// Waits until `timeout` after `start` for `child` (spawned with piped stdout and stderr) to
/// exit, killing it after; its output, read as it comes so a full pipe never blocks it.
pub fn wait_for_exit(mut child: Child, start: Instant, timeout: Duration) -> Exit {
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).to_string();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).to_string();
    Exit {
        status,
        elapsed,
        stderr,
        stdout,
    }
}

/// Whether this test process runs as root (the effective uid of `/proc/self/status`).
pub fn runs_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}
