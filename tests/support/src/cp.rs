//! The control plane in the end-to-end tests: `ward server --dev` as a child process (kill -9
//! and restart on the same data dir and port), the operator CLI, proxy configs with
//! `[control_plane]`, and traffic generators that record every failure.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::net::{free_port, http_get, metric_sum, EchoApp};
use super::proc::{collect_lines, strip_ansi, toml_path, toml_str, ward_bin, Lines, TempDir};
use super::proc::{parse_listening, WardProcess};
use super::wait_until;

// ---- the CLI -------------------------------------------------------------------------------

/// A `ward` command that was expected to exit.
#[derive(Debug)]
pub struct CliOutput {
    pub args: Vec<String>,
    /// `None`: killed after the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }

    /// Panics (with everything it printed) unless it exited 0.
    pub fn expect_ok(self, what: &str) -> Self {
        assert!(
            self.success(),
            "{what}: `ward {}` failed: {self}",
            self.args.join(" ")
        );
        self
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `ward ARGS` with `env` (and WARD_ADDR/WARD_TOKEN/WARD_CACERT removed unless `env` sets
/// them), waiting up to `timeout` for it to exit (killed after).
pub fn run_ward(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> CliOutput {
    let start = Instant::now();
    let mut cmd = Command::new(ward_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .env_remove("WARD_ADDR")
        .env_remove("WARD_TOKEN")
        .env_remove("WARD_CACERT")
        .env_remove("WARD_LOG")
        .env_remove("WARD_FORMAT")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn ward");
    let exit = crate::proc::wait_for_exit(child, start, timeout);
    CliOutput {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: exit.status,
        stdout: exit.stdout,
        stderr: exit.stderr,
        elapsed: exit.elapsed,
    }
}

/// Every `(source, destination)` of the intention objects anywhere in `v` (the JSON of
/// `ward intention list --output json`).
pub fn intention_pairs(v: &serde_json::Value) -> BTreeSet<(String, String)> {
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                if let (Some(s), Some(d)) = (
                    m.get("source").and_then(|s| s.as_str()),
                    m.get("destination").and_then(|d| d.as_str()),
                ) {
                    out.insert((s.to_string(), d.to_string()));
                }
                m.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut out);
    out
}

// ---- the server ----------------------------------------------------------------------------

/// One run of `ward server --dev`.
struct Incarnation {
    child: Child,
    stdout: Lines,
    stderr: Lines,
    /// The thread copying stderr into `stderr`: finished once the pipe is at EOF.
    stderr_reader: thread::JoinHandle<()>,
}

impl Incarnation {
    /// After the process ended: waits (2 s at most) until its last stderr lines are in `stderr`.
    fn drain_stderr(&self) {
        wait_until(Duration::from_secs(2), Duration::from_millis(10), || {
            self.stderr_reader.is_finished().then_some(())
        });
    }
}

/// `ward server --dev --data-dir DIR`, killed through its own `Child` on drop; kill -9 and
/// restart (same data dir, same port) keep the struct, with the new admin token.
pub struct DevServer {
    pub label: String,
    pub data_dir: PathBuf,
    leaf_ttl: Option<String>,
    /// `Some(toml)`: runs `ward server --config` with this text after its `[server]` and
    /// `[admin]` tables, instead of `--dev`.
    config: Option<String>,
    run: Option<Incarnation>,
    /// stderr of the runs that were killed, for the failure output.
    history: Vec<String>,
    /// `https://127.0.0.1:PORT` (WARD_ADDR).
    pub address: String,
    pub token: String,
    pub ca_file: PathBuf,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub started_at: Instant,
}

/// The value of `export NAME=VALUE` among `lines` (what `ward server --dev` prints), quotes removed.
pub fn export_value(lines: &[String], name: &str) -> Option<String> {
    let prefix = format!("export {name}=");
    lines.iter().find_map(|l| {
        l.trim()
            .strip_prefix(&prefix)
            .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
    })
}

impl DevServer {
    /// Starts a server on a free port of 127.0.0.1 keeping its state in `data_dir`.
    pub fn start(label: &str, data_dir: &Path, leaf_ttl: Option<&str>) -> Self {
        Self::start_inner(label, data_dir, leaf_ttl, None)
    }

    /// As [`DevServer::start`], but from a config file (`ward server --config`): `extra` is
    /// appended after the `[server]` (listen, data_dir) and `[admin]` tables. The admin token
    /// is the one the first start wrote to `<data_dir>/admin.token`.
    pub fn start_with_config(label: &str, data_dir: &Path, extra: &str) -> Self {
        Self::start_inner(label, data_dir, None, Some(extra.to_string()))
    }

    /// Replaces the config text appended by [`DevServer::start_with_config`]; it takes
    /// effect at the next [`DevServer::restart`].
    pub fn set_config(&mut self, extra: &str) {
        assert!(
            self.config.is_some(),
            "[{}] not a --config server",
            self.label
        );
        self.config = Some(extra.to_string());
    }

    fn start_inner(
        label: &str,
        data_dir: &Path,
        leaf_ttl: Option<&str>,
        config: Option<String>,
    ) -> Self {
        let mut s = DevServer {
            label: label.to_string(),
            data_dir: data_dir.to_path_buf(),
            leaf_ttl: leaf_ttl.map(str::to_string),
            config,
            run: None,
            history: Vec::new(),
            address: String::new(),
            token: String::new(),
            ca_file: PathBuf::new(),
            grpc: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            started_at: Instant::now(),
        };
        // A port outside the ephemeral range: restart() binds it again, and while the server is
        // down no other test's bind(0) or outgoing connection can take it.
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        if let Err(e) = s.launch(listen) {
            panic!("[{label}] {e}");
        }
        s
    }

    /// One attempt to start on `listen`; on success the fields describe the new run.
    fn launch(&mut self, listen: SocketAddr) -> Result<(), String> {
        let mut cmd = Command::new(ward_bin());
        if let Some(extra) = &self.config {
            // Beside the data dir, never in it (a foreign file there is refused).
            let path = self.data_dir.with_extension("toml");
            let text = format!(
                "[server]\nlisten = \"{listen}\"\ndata_dir = {}\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n",
                toml_path(&self.data_dir)
            );
            std::fs::write(&path, text).expect("write the server config");
            cmd.arg("server").arg("--config").arg(path);
        } else {
            cmd.arg("server")
                .arg("--dev")
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--admin-listen")
                .arg("127.0.0.1:0");
            if let Some(ttl) = &self.leaf_ttl {
                cmd.arg("--leaf-ttl").arg(ttl);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env_remove("WARD_ADDR")
            .env_remove("WARD_TOKEN")
            .env_remove("WARD_CACERT");
        match std::env::var("WARD_TEST_LOG") {
            Ok(v) => {
                cmd.env("WARD_LOG", &v).env("RUST_LOG", &v);
            }
            Err(_) => {
                cmd.env_remove("WARD_LOG").env_remove("RUST_LOG");
            }
        }
        let mut child = cmd.spawn().expect("spawn ward server");
        let stdout: Lines = Arc::default();
        let stderr: Lines = Arc::default();
        collect_lines(child.stdout.take().unwrap(), stdout.clone());
        let stderr_reader = collect_lines(child.stderr.take().unwrap(), stderr.clone());
        let mut run = Incarnation {
            child,
            stdout,
            stderr,
            stderr_reader,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run.stdout.lock().unwrap().clone();
            let err: Vec<String> = run
                .stderr
                .lock()
                .unwrap()
                .iter()
                .map(|l| strip_ansi(l))
                .collect();
            let mut grpc = None;
            let mut admin = None;
            for l in &err {
                match parse_listening(l) {
                    Some((r, a)) if r == "grpc" => grpc = Some(a),
                    Some((r, a)) if r == "admin" => admin = Some(a),
                    _ => {}
                }
            }
            let exports = match (&self.config, grpc) {
                (None, _) => (
                    export_value(&out, "WARD_ADDR"),
                    export_value(&out, "WARD_TOKEN"),
                    export_value(&out, "WARD_CACERT"),
                ),
                // Outside --dev the token is in a file and the roots in ca.pem.
                (Some(_), Some(g)) => (
                    Some(format!("https://{g}")),
                    std::fs::read_to_string(self.data_dir.join("admin.token"))
                        .ok()
                        .map(|t| t.trim().to_string()),
                    Some(self.data_dir.join("ca.pem").to_string_lossy().into_owned()),
                ),
                (Some(_), None) => (None, None, None),
            };
            if let (Some(g), Some(a), (Some(addr), Some(token), Some(ca))) = (grpc, admin, exports)
            {
                self.grpc = g;
                self.admin = a;
                self.address = addr;
                self.token = token;
                self.ca_file = PathBuf::from(ca);
                self.started_at = Instant::now();
                self.run = Some(run);
                return Ok(());
            }
            if let Ok(Some(status)) = run.child.try_wait() {
                run.drain_stderr();
                let text = run.stderr.lock().unwrap().join("\n");
                self.history.push(text.clone());
                return Err(format!(
                    "ward server exited with {status} before it was up\nstdout:\n{}\nstderr:\n{text}",
                    out.join("\n")
                ));
            }
            if Instant::now() > deadline {
                let _ = run.child.kill();
                let _ = run.child.wait();
                let text = run.stderr.lock().unwrap().join("\n");
                self.history.push(text.clone());
                return Err(format!(
                    "ward server printed no export lines and listening lines within 20 s\nstdout:\n{}\nstderr:\n{text}",
                    out.join("\n")
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 (`Child::kill`), then reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut run) = self.run.take() {
            let _ = run.child.kill();
            let _ = run.child.wait();
            run.drain_stderr();
            self.history.push(run.stderr.lock().unwrap().join("\n"));
        }
    }

    /// Starts again with the same data dir on the same port (retrying while the port is not
    /// free yet); the admin token is the new run's.
    pub fn restart(&mut self) {
        assert!(
            self.run.is_none(),
            "[{}] restart of a running server",
            self.label
        );
        let listen = self.grpc;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.launch(listen) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("[{}] restart on {listen} failed: {e}", self.label)
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.run {
            Some(r) => matches!(r.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The env of the CLI for this server, with `token` as WARD_TOKEN.
    pub fn env_with_token<'a>(&'a self, token: &'a str) -> [(&'a str, &'a str); 3] {
        [
            ("WARD_ADDR", self.address.as_str()),
            ("WARD_TOKEN", token),
            ("WARD_CACERT", self.ca_file.to_str().expect("utf-8 path")),
        ]
    }

    /// `ward ARGS` against this server with its admin token (30 s timeout).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        run_ward(
            args,
            &self.env_with_token(&self.token),
            Duration::from_secs(30),
        )
    }

    /// `ward token create --service NAME [extra]`: the token (panics if the CLI fails).
    pub fn token_create(&self, service: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--service", service];
        args.extend_from_slice(extra);
        let out = self.cli(&args).expect_ok("token create");
        let token = out.stdout.trim().to_string();
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "token create printed more than a token: {out}"
        );
        token
    }

    /// `ward intention create --source S --destination D --action A [--replace]`, exit 0.
    pub fn intention_create(&self, source: &str, dest: &str, action: &str, replace: bool) {
        let mut args = vec![
            "intention",
            "create",
            "--source",
            source,
            "--destination",
            dest,
            "--action",
            action,
        ];
        if replace {
            args.push("--replace");
        }
        self.cli(&args).expect_ok("intention create");
    }

    /// `ward intention list --output json`, parsed.
    pub fn intention_list(&self) -> serde_json::Value {
        let out = self
            .cli(&["intention", "list", "--output", "json"])
            .expect_ok("intention list");
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("intention list --output json is not JSON ({e}): {out}"))
    }

    pub fn stderr_text(&self) -> String {
        let mut parts = self.history.clone();
        if let Some(r) = &self.run {
            parts.push(r.stderr.lock().unwrap().join("\n"));
        }
        parts.join("\n----- (server restarted) -----\n")
    }

    /// Writes `token` to `<dir>/<name>.token` (as `ward token create > name.token` does).
    pub fn token_file(dir: &TempDir, name: &str, token: &str) -> PathBuf {
        let p = dir.join(&format!("{name}.token"));
        std::fs::write(&p, format!("{token}\n")).expect("write token file");
        p
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if let Some(mut run) = self.run.take() {
            let _ = run.child.kill();
            let _ = run.child.wait();
            self.history.push(run.stderr.lock().unwrap().join("\n"));
        }
        if thread::panicking() {
            eprintln!(
                "===== [{}] ward server stderr =====\n{}\n===== end [{}] =====",
                self.label,
                self.history.join("\n----- (server restarted) -----\n"),
                self.label
            );
        }
    }
}

// ---- proxies with [control_plane] ------------------------------------------------------------

/// A proxy config whose certificates, intentions and endpoints come from the server.
#[derive(Clone, Debug)]
pub struct CpProxyConfig {
    pub service: String,
    /// `(listen, local_app)`
    pub inbound: Option<(String, String)>,
    /// `(service, listen)`, no endpoints: they come from the catalog.
    pub upstreams: Vec<(String, String)>,
    pub address: String,
    pub ca_file: PathBuf,
    pub token_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub admin_listen: String,
}

impl CpProxyConfig {
    pub fn new(service: &str, server: &DevServer, token_file: &Path) -> Self {
        CpProxyConfig {
            service: service.to_string(),
            inbound: None,
            upstreams: Vec::new(),
            address: server.address.clone(),
            ca_file: server.ca_file.clone(),
            token_file: Some(token_file.to_path_buf()),
            state_dir: None,
            admin_listen: "127.0.0.1:0".to_string(),
        }
    }

    pub fn inbound(mut self, local_app: SocketAddr) -> Self {
        self.inbound = Some(("127.0.0.1:0".to_string(), local_app.to_string()));
        self
    }

    /// As [`CpProxyConfig::inbound`], listening on `listen` (an `IP:port`).
    pub fn inbound_on(mut self, listen: &str, local_app: SocketAddr) -> Self {
        self.inbound = Some((listen.to_string(), local_app.to_string()));
        self
    }

    pub fn upstream(mut self, service: &str) -> Self {
        self.upstreams
            .push((service.to_string(), "127.0.0.1:0".to_string()));
        self
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        s.push_str("[service]\n");
        s.push_str(&format!("name = {}\n", toml_str(&self.service)));
        s.push_str("namespace = \"default\"\n");
        if let Some((listen, app)) = &self.inbound {
            s.push_str("\n[inbound]\n");
            s.push_str(&format!("listen = {}\n", toml_str(listen)));
            s.push_str(&format!("local_app = {}\n", toml_str(app)));
            s.push_str("protocol = \"tcp\"\n");
        }
        for (svc, listen) in &self.upstreams {
            s.push_str("\n[[upstreams]]\n");
            s.push_str(&format!("service = {}\n", toml_str(svc)));
            s.push_str(&format!("listen = {}\n", toml_str(listen)));
            s.push_str("protocol = \"tcp\"\n");
        }
        s.push_str("\n[control_plane]\n");
        s.push_str(&format!("address = {}\n", toml_str(&self.address)));
        s.push_str(&format!("ca_file = {}\n", toml_path(&self.ca_file)));
        if let Some(t) = &self.token_file {
            s.push_str(&format!("token_file = {}\n", toml_path(t)));
        }
        if let Some(d) = &self.state_dir {
            s.push_str(&format!("state_dir = {}\n", toml_path(d)));
        }
        s.push_str("\n[admin]\n");
        s.push_str(&format!("listen = {}\n", toml_str(&self.admin_listen)));
        s
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_toml()).expect("write proxy config");
    }
}

/// The roles a proxy with this config logs `listening` lines for.
fn roles_of(cfg: &CpProxyConfig) -> Vec<String> {
    let mut roles = Vec::new();
    if cfg.inbound.is_some() {
        roles.push("inbound".to_string());
    }
    for (svc, _) in &cfg.upstreams {
        roles.push(format!("upstream.{svc}"));
    }
    roles
}

/// Writes `cfg` to `<dir>/<label>.toml` and starts the proxy, without waiting for `/ready`.
pub fn spawn_proxy(dir: &TempDir, label: &str, cfg: &CpProxyConfig) -> WardProcess {
    let path = dir.join(&format!("{label}.toml"));
    cfg.write(&path);
    let roles = roles_of(cfg);
    let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
    WardProcess::spawn(label, &path, &roles)
}

/// As [`spawn_proxy`], then waits (20 s) for `/ready`: a certificate and intentions are in.
pub fn start_proxy(dir: &TempDir, label: &str, cfg: &CpProxyConfig) -> WardProcess {
    let p = spawn_proxy(dir, label, cfg);
    assert!(
        p.wait_ready(Duration::from_secs(20)),
        "[{label}] GET /ready did not answer 200 within 20 s\nstderr:\n{}",
        p.stderr_text()
    );
    p
}

/// A metric of a process's admin endpoint (0 if absent; NaN if the endpoint does not answer).
pub fn metric(p: &WardProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    match http_get(p.admin(), "/metrics") {
        Ok(r) if r.status == 200 => metric_sum(&r.body, name, labels),
        _ => f64::NAN,
    }
}

/// `intentions.version` of `/config` (None while there is no snapshot).
pub fn intentions_version(p: &WardProcess) -> Option<u64> {
    p.config_json()
        .pointer("/intentions/version")
        .and_then(|v| v.as_u64())
}

/// The mesh of issue 3: a dev server; `inventory`'s proxy (inbound -> counting echo app) and
/// `order`'s proxy (upstream `inventory` with no endpoints), each with a join token of its own.
/// No intention is written yet (default deny). Fields drop proxies first, then the server.
pub struct Mesh {
    pub order: WardProcess,
    pub inventory: WardProcess,
    pub app: EchoApp,
    pub server: DevServer,
    pub dir: TempDir,
}

impl Mesh {
    pub fn start(prefix: &str, leaf_ttl: Option<&str>) -> Self {
        Self::start_with(prefix, |data| {
            DevServer::start(&format!("{prefix}-server"), data, leaf_ttl)
        })
    }

    /// As [`Mesh::start`], with the server `server` starts on the data dir it is given.
    pub fn start_with(prefix: &str, server: impl FnOnce(&Path) -> DevServer) -> Self {
        let dir = TempDir::new(prefix);
        let server = server(&dir.join("server-data"));
        let app = EchoApp::start();
        let inv_token = server.token_create("inventory", &[]);
        let inv_file = DevServer::token_file(&dir, "inventory", &inv_token);
        let inventory = start_proxy(
            &dir,
            "inventory",
            &CpProxyConfig::new("inventory", &server, &inv_file).inbound(app.addr),
        );
        let order_token = server.token_create("order", &[]);
        let order_file = DevServer::token_file(&dir, "order", &order_token);
        let order = start_proxy(
            &dir,
            "order",
            &CpProxyConfig::new("order", &server, &order_file).upstream("inventory"),
        );
        Mesh {
            order,
            inventory,
            app,
            server,
            dir,
        }
    }

    /// Order's plain upstream listener for `inventory`.
    pub fn upstream(&self) -> SocketAddr {
        self.order.upstream("inventory")
    }

    /// Writes `order -> inventory allow` and waits (10 s) until an echo goes through.
    pub fn allow_order(&self) {
        self.server
            .intention_create("order", "inventory", "allow", false);
        let up = self.upstream();
        let mut last = String::new();
        let ok = wait_until(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || match echo_once(up, b"allow-check\n", Duration::from_secs(3)) {
                Ok(()) => Some(()),
                Err(e) => {
                    last = e;
                    None
                }
            },
        );
        assert!(
            ok.is_some(),
            "after `intention create order -> inventory allow`, no echo through order's upstream within 10 s; last error: {last}"
        );
    }
}

// ---- traffic -------------------------------------------------------------------------------

/// One new connection: send `payload`, read the same bytes back.
pub fn echo_once(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    let _ = s.set_nodelay(true);
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    read_echo(&mut s, payload)
}

fn read_echo(s: &mut TcpStream, payload: &[u8]) -> Result<(), String> {
    let mut got = vec![0u8; payload.len()];
    let mut n = 0;
    while n < got.len() {
        match s.read(&mut got[n..]) {
            Ok(0) => {
                return Err(format!(
                    "connection closed after {n} of {} echoed bytes",
                    payload.len()
                ))
            }
            Ok(k) => n += k,
            Err(e) => return Err(format!("read after {n} bytes: {e}")),
        }
    }
    if got != payload {
        return Err(format!(
            "echo differs: sent {:?}, got {:?}",
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&got)
        ));
    }
    Ok(())
}

/// A connection kept open, exchanging a few bytes at a time.
pub struct LongLived {
    stream: TcpStream,
    seq: u64,
}

impl LongLived {
    pub fn open(addr: SocketAddr) -> Result<Self, String> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.set_nodelay(true);
        Ok(LongLived { stream: s, seq: 0 })
    }

    /// Sends a numbered line and reads it back.
    pub fn exchange(&mut self) -> Result<(), String> {
        self.seq += 1;
        let msg = format!("long-lived {}\n", self.seq);
        self.stream
            .write_all(msg.as_bytes())
            .map_err(|e| format!("write #{}: {e}", self.seq))?;
        read_echo(&mut self.stream, msg.as_bytes()).map_err(|e| format!("#{}: {e}", self.seq))
    }
}

/// A failure seen by a traffic generator, `at` after it started.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Duration,
    pub when: Instant,
    pub error: String,
}

#[derive(Default)]
struct TrafficState {
    new_ok: AtomicUsize,
    new_failures: Mutex<Vec<Failure>>,
    long_ok: AtomicUsize,
    long_failures: Mutex<Vec<Failure>>,
}

/// What [`Traffic`] saw.
#[derive(Debug)]
pub struct TrafficReport {
    pub ran: Duration,
    pub new_ok: usize,
    pub new_failures: Vec<Failure>,
    pub long_ok: usize,
    pub long_failures: Vec<Failure>,
}

impl TrafficReport {
    pub fn summary(&self) -> String {
        // Failures in bursts (less than 500 ms apart): when, how many, the first error.
        let show = |v: &[Failure]| {
            let mut bursts: Vec<(Duration, Duration, usize, String)> = Vec::new();
            for f in v {
                match bursts.last_mut() {
                    Some(b) if f.at.saturating_sub(b.1) < Duration::from_millis(500) => {
                        b.1 = f.at;
                        b.2 += 1;
                    }
                    _ => bursts.push((f.at, f.at, 1, f.error.clone())),
                }
            }
            bursts
                .iter()
                .map(|(a, b, n, e)| format!("  {n} from {a:.2?} to {b:.2?}, first: {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "ran {:?}: new connections {} ok, {} failed\n{}\nlong-lived exchanges {} ok, {} failed\n{}",
            self.ran,
            self.new_ok,
            self.new_failures.len(),
            show(&self.new_failures),
            self.long_ok,
            self.long_failures.len(),
            show(&self.long_failures)
        )
    }
}

/// Sleeps until `next + every` and makes that the new `next`: one round per `every` however long
/// a round took (a late round starts the schedule again from now).
fn pace(next: &mut Instant, every: Duration) {
    *next += every;
    let now = Instant::now();
    if *next > now {
        // pacing the traffic, not waiting for a condition
        thread::sleep(*next - now);
    } else {
        *next = now;
    }
}

/// Background traffic through `addr`: a new connection every `every` (each echoes a few bytes)
/// and one long-lived connection exchanging a line every `every`; every failure is recorded
/// (the long-lived one is reopened after a failure, so later failures count too).
pub struct Traffic {
    stop: Arc<AtomicBool>,
    state: Arc<TrafficState>,
    started: Instant,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(addr: SocketAddr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(TrafficState::default());
        let started = Instant::now();
        let mut threads = Vec::new();
        {
            let (stop, state) = (stop.clone(), state.clone());
            threads.push(thread::spawn(move || {
                let mut n: u64 = 0;
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let payload = format!("new connection {n}\n");
                    match echo_once(addr, payload.as_bytes(), Duration::from_secs(5)) {
                        Ok(()) => {
                            state.new_ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => state.new_failures.lock().unwrap().push(Failure {
                            at: started.elapsed(),
                            when: Instant::now(),
                            error: format!("connection {n}: {e}"),
                        }),
                    }
                    pace(&mut next, every);
                }
            }));
        }
        {
            let (stop, state) = (stop.clone(), state.clone());
            threads.push(thread::spawn(move || {
                let mut conn: Option<LongLived> = None;
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let r = match &mut conn {
                        Some(c) => c.exchange(),
                        None => LongLived::open(addr).and_then(|mut c| {
                            let r = c.exchange();
                            conn = Some(c);
                            r
                        }),
                    };
                    match r {
                        Ok(()) => {
                            state.long_ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            conn = None;
                            state.long_failures.lock().unwrap().push(Failure {
                                at: started.elapsed(),
                                when: Instant::now(),
                                error: e,
                            });
                        }
                    }
                    pace(&mut next, every);
                }
            }));
        }
        Traffic {
            stop,
            state,
            started,
            threads,
        }
    }

    pub fn failures(&self) -> usize {
        self.state.new_failures.lock().unwrap().len()
            + self.state.long_failures.lock().unwrap().len()
    }

    pub fn stop(mut self) -> TrafficReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        TrafficReport {
            ran: self.started.elapsed(),
            new_ok: self.state.new_ok.load(Ordering::SeqCst),
            new_failures: self.state.new_failures.lock().unwrap().clone(),
            long_ok: self.state.long_ok.load(Ordering::SeqCst),
            long_failures: self.state.long_failures.lock().unwrap().clone(),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A long-lived connection exchanging a line every `every` on its own thread until the first
/// failure, which it records with the instant it happened.
pub struct LongLivedWatch {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failure: Arc<Mutex<Option<(Instant, String)>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LongLivedWatch {
    pub fn start(addr: SocketAddr, every: Duration) -> Result<Self, String> {
        let mut conn = LongLived::open(addr)?;
        conn.exchange()?;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(1));
        let failure = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, ok, failure) = (stop.clone(), ok.clone(), failure.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match conn.exchange() {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            *failure.lock().unwrap() = Some((Instant::now(), e));
                            return;
                        }
                    }
                    // pacing the exchanges, not waiting for a condition
                    thread::sleep(every);
                }
            })
        };
        Ok(LongLivedWatch {
            stop,
            ok,
            failure,
            thread: Some(thread),
        })
    }

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    pub fn failure(&self) -> Option<(Instant, String)> {
        self.failure.lock().unwrap().clone()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LongLivedWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
