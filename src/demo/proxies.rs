//! The demo's sidecars: real `ward proxy` processes (this same binary), their configs, and
//! their lifecycle.

use anyhow::Context;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A private working directory, removed at the end unless kept for a post-mortem.
pub struct DemoDir {
    path: PathBuf,
    keep: bool,
}

impl DemoDir {
    /// A new directory of this process's own under the system's temporary directory. It holds
    /// the demo's private keys and tokens: `mkdir` fails on any name already there (a symlink
    /// included), so no other user can have prepared it, and its random part makes a name taken
    /// by someone else cost only another try.
    pub fn new() -> anyhow::Result<Self> {
        use std::hash::{BuildHasher, Hasher};
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        for _ in 0..16 {
            // std's per-process random hash keys: unpredictable enough for a name.
            let random = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let path = base.join(format!("ward-demo-{}-{random:016x}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        anyhow::bail!(
            "cannot create a private directory in {}: every name tried already exists",
            base.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What every sidecar needs to reach the control plane.
pub struct ControlPlane {
    pub address: String,
    pub ca_file: PathBuf,
}

pub fn inventory_config(cp: &ControlPlane, token: &Path, app: SocketAddr) -> String {
    format!(
        r#"[service]
name = "inventory"
[inbound]
listen = "127.0.0.1:0"
local_app = "{app}"
[control_plane]
address = "{}"
ca_file = "{}"
token_file = "{}"
[admin]
listen = "127.0.0.1:0"
[limits]
drain_timeout = "2s"
"#,
        cp.address,
        cp.ca_file.display(),
        token.display()
    )
}

pub fn order_config(cp: &ControlPlane, token: &Path) -> String {
    format!(
        r#"[service]
name = "order"
[[upstreams]]
service = "inventory"
listen = "127.0.0.1:0"
# no endpoints: they come from the control plane's catalog
[control_plane]
address = "{}"
ca_file = "{}"
token_file = "{}"
[admin]
listen = "127.0.0.1:0"
[limits]
drain_timeout = "2s"
"#,
        cp.address,
        cp.ca_file.display(),
        token.display()
    )
}

/// A started sidecar and the addresses it bound.
pub struct Started {
    addrs: HashMap<String, SocketAddr>,
    /// The process's stdout lines (the server's export lines).
    pub stdout: Vec<String>,
}

impl Started {
    pub fn addr(&self, role: &str) -> SocketAddr {
        self.addrs[role]
    }
}

/// The processes the demo started; only these are ever signalled.
pub struct Children {
    procs: Vec<(String, Child)>,
    /// Passed on to each process (its log file is in the demo's format).
    log_format: crate::LogFormat,
}

/// Reads `listening role=X addr=Y` from a log line.
fn listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = line.split("listening role=").nth(1)?;
    let (role, rest) = rest.split_once(' ')?;
    // Up to a space, or the closing quote of a JSON log's `message`.
    let addr = rest
        .strip_prefix("addr=")?
        .split(|c: char| c.is_whitespace() || c == '"')
        .next()?;
    Some((role.to_owned(), addr.parse().ok()?))
}

impl Children {
    pub fn new(log_format: crate::LogFormat) -> Self {
        Children {
            procs: Vec::new(),
            log_format,
        }
    }

    /// Starts `ward proxy` with `config`, copies its log to `<name>.log`, and waits until it has
    /// bound `roles` and answers /ready.
    pub async fn start_proxy(
        &mut self,
        dir: &DemoDir,
        name: &str,
        config: &str,
        roles: &[&str],
    ) -> anyhow::Result<Started> {
        let config_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, config)?;
        let args = [
            "proxy".as_ref(),
            "--config".as_ref(),
            config_path.as_os_str(),
            "--workers".as_ref(),
            "1".as_ref(),
        ];
        let started = self.spawn(dir, name, &args, roles, 0)?;
        let admin = started.addr("admin");
        let deadline = Instant::now() + Duration::from_secs(15);
        while super::apps::http_get(admin, "/ready")
            .await
            .map(|(s, _)| s.contains(" 200 "))
            != Some(true)
        {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the {name} sidecar did not become ready; see {}",
                    dir.path().join(format!("{name}.log")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(started)
    }

    /// Starts `ward server --dev` and waits for its three export lines.
    pub fn start_server(&mut self, dir: &DemoDir) -> anyhow::Result<Started> {
        let data = dir.path().join("server");
        let args = [
            "server".as_ref(),
            "--dev".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--admin-listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--leaf-ttl".as_ref(),
            super::LEAF_TTL.as_ref(),
        ];
        self.spawn(dir, "server", &args, &["grpc", "admin"], 3)
    }

    /// Spawns this binary with `args`, logs stderr to `<name>.log`, and waits for the
    /// `listening` lines of `roles` and for `stdout_lines` lines on stdout.
    fn spawn(
        &mut self,
        dir: &DemoDir,
        name: &str,
        args: &[&std::ffi::OsStr],
        roles: &[&str],
        stdout_lines: usize,
    ) -> anyhow::Result<Started> {
        let exe = std::env::current_exe().context("cannot find the ward binary")?;
        let mut child = Command::new(exe)
            .args(["--log-format", self.log_format.as_str()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the {name} process"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        self.procs.push((name.to_owned(), child));

        let (tx, rx) = mpsc::channel();
        let mut log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
        let err_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                let _ = err_tx.send(Err(line));
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(Ok(line));
            }
        });

        let deadline = Instant::now() + Duration::from_secs(15);
        let mut addrs = HashMap::new();
        let mut out = Vec::new();
        let mut last = String::new();
        while !roles.iter().all(|r| addrs.contains_key(*r)) || out.len() < stdout_lines {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(line)) => out.push(line),
                Ok(Err(line)) => {
                    if let Some((role, addr)) = listening(&line) {
                        addrs.insert(role, addr);
                    }
                    last = line;
                }
                Err(_) => anyhow::bail!("the {name} process did not start: {last}"),
            }
        }
        Ok(Started { addrs, stdout: out })
    }

    /// SIGTERM (a drain) to each sidecar, then SIGKILL to any still running after 5 s.
    pub async fn stop(&mut self) {
        for (_, child) in &self.procs {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, child) in &mut self.procs {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    _ => {
                        eprintln!("the {name} sidecar did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.procs.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{listening, DemoDir};

    #[test]
    fn the_demo_directory_is_new_and_private_never_one_prepared_by_another_user() {
        use std::os::unix::fs::PermissionsExt;
        // What another local user could prepare: the name the demo used to take (its pid), as
        // a symlink to a directory of theirs.
        let theirs = std::env::temp_dir().join(format!("ward-demo-test-{}", std::process::id()));
        std::fs::create_dir_all(&theirs).unwrap();
        let trap = std::env::temp_dir().join(format!("ward-demo-{}", std::process::id()));
        let _ = std::fs::remove_file(&trap);
        std::os::unix::fs::symlink(&theirs, &trap).unwrap();
        let first = DemoDir::new().unwrap();
        let second = DemoDir::new().unwrap();
        std::fs::write(first.path().join("key.pem"), "secret").unwrap();
        let left_in_theirs = std::fs::read_dir(&theirs).unwrap().count();
        let _ = std::fs::remove_file(&trap);
        let _ = std::fs::remove_dir_all(&theirs);
        assert_eq!(
            left_in_theirs, 0,
            "nothing written where another user can read"
        );
        assert_ne!(first.path(), trap.as_path());
        assert_ne!(first.path(), second.path());
        let meta = std::fs::symlink_metadata(first.path()).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn listening_reads_text_and_json_lines() {
        let want = Some(("admin".to_owned(), "127.0.0.1:4000".parse().unwrap()));
        let text = "2026-01-01T00:00:00.000001Z  INFO listening role=admin addr=127.0.0.1:4000";
        assert_eq!(listening(text), want);
        let json = r#"{"timestamp":"2026-01-01T00:00:00.000001Z","level":"INFO","message":"listening role=admin addr=127.0.0.1:4000","target":"ward"}"#;
        assert_eq!(listening(json), want);
    }
}
