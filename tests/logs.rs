//! Logs of a real `ward server --dev`: `--log-format json` / `WARD_LOG_FORMAT`, no colour in a
//! file, the level filter from `WARD_LOG` or `RUST_LOG`, a bad filter refused naming it; and of
//! `ward proxy` and `ward server` at start: no open-file-limit warning for the defaults; the
//! proxy's connection log.

use ward_test_support as common;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::cp::run_ward;
use common::proc::{collect_lines, parse_listening, ward_bin, Lines, TempDir};
use common::wait_until;

/// A `ward server --dev` whose stderr goes to a file (not a terminal), killed on drop.
struct Server {
    dir: TempDir,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// `ward GLOBAL server --dev ... SERVER_ARGS` with `env` (and no logging variables otherwise);
    /// waits until the log has both `listening` lines.
    fn start(prefix: &str, global: &[&str], server_args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new(prefix);
        let log = dir.join("server.log");
        let mut cmd = Command::new(ward_bin());
        cmd.args(global)
            .arg("server")
            .arg("--dev")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(server_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for var in [
            "NO_COLOR",
            "WARD_LOG",
            "RUST_LOG",
            "WARD_LOG_FORMAT",
            "WARD_ADDR",
            "WARD_TOKEN",
            "WARD_CACERT",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn ward server");
        let mut server = Server { dir, child, log };
        let started = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            let text = server.text();
            let roles: Vec<String> = text
                .lines()
                .filter_map(parse_listening)
                .map(|(r, _)| r)
                .collect();
            (roles.iter().any(|r| r == "grpc") && roles.iter().any(|r| r == "admin")).then_some(())
        });
        if started.is_none() {
            let status = server.child.try_wait();
            panic!(
                "ward server did not log its listening lines ({status:?}):\n{}",
                server.text()
            );
        }
        server
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn addr(&self, role: &str) -> std::net::SocketAddr {
        self.text()
            .lines()
            .filter_map(parse_listening)
            .find(|(r, _)| r == role)
            .map(|(_, a)| a)
            .expect("listening line")
    }

    /// Waits up to `timeout` for a log line that `f` accepts.
    fn wait_line(&self, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        wait_until(timeout, Duration::from_millis(50), || {
            self.text().lines().find(|l| f(l)).map(str::to_owned)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// `server --dev` on loopback port 0 with `data` as its data dir.
fn server_args(data: &std::path::Path) -> Vec<&str> {
    let data = data.to_str().expect("UTF-8 temp path");
    vec![
        "server",
        "--dev",
        "--data-dir",
        data,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]
}

/// `YYYY-MM-DDTHH:MM:SS[.frac]Z`: an RFC 3339 time in UTC.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let base = digits(0..4)
        && at(4, b'-')
        && digits(5..7)
        && at(7, b'-')
        && digits(8..10)
        && at(10, b'T')
        && digits(11..13)
        && at(13, b':')
        && digits(14..16)
        && at(16, b':')
        && digits(17..19);
    let rest = s.get(19..).unwrap_or("");
    let rest = match rest.strip_prefix('.') {
        Some(frac) if frac.starts_with(|c: char| c.is_ascii_digit()) => {
            frac.trim_start_matches(|c: char| c.is_ascii_digit())
        }
        Some(_) => return false,
        None => rest,
    };
    base && rest == "Z"
}

/// Every line of `text` as a JSON object with an RFC 3339 `timestamp`, a `level` and a
/// `message`; returns them.
fn json_lines(text: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    assert!(!text.trim().is_empty(), "no log lines");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}\nlog:\n{text}"));
            let obj = v
                .as_object()
                .cloned()
                .unwrap_or_else(|| panic!("not an object: {l}"));
            let ts = obj.get("timestamp").and_then(|t| t.as_str()).unwrap_or("");
            assert!(is_rfc3339_utc(ts), "timestamp not RFC 3339 UTC: {l}");
            assert!(
                obj.get("level").and_then(|t| t.as_str()).is_some(),
                "no level: {l}"
            );
            assert!(
                obj.get("message").and_then(|t| t.as_str()).is_some(),
                "no message: {l}"
            );
            obj
        })
        .collect()
}

fn assert_json_log(server: &Server) {
    let text = server.text();
    assert!(
        !text.contains('\u{1b}'),
        "escape code in a JSON log:\n{text}"
    );
    let lines = json_lines(&text);
    for role in ["grpc", "admin"] {
        let want = format!("listening role={role} addr=");
        assert!(
            lines.iter().any(|o| o["level"] == "INFO"
                && o["message"].as_str().is_some_and(|m| m.starts_with(&want))),
            "no INFO `{want}` message:\n{text}"
        );
    }
}

#[test]
fn log_format_json_flag_writes_one_json_object_a_line() {
    let server = Server::start("logs-json-flag", &["--log-format", "json"], &[], &[]);
    assert_json_log(&server);
}

#[test]
fn ward_log_format_env_writes_json() {
    let server = Server::start("logs-json-env", &[], &[], &[("WARD_LOG_FORMAT", "json")]);
    assert_json_log(&server);
}

#[test]
fn log_format_flag_wins_over_the_env_var() {
    // The flag is global: after the subcommand too.
    let server = Server::start(
        "logs-flag-wins",
        &[],
        &["--log-format", "text"],
        &[("WARD_LOG_FORMAT", "json")],
    );
    let text = server.text();
    assert!(
        text.lines()
            .any(|l| !l.starts_with('{') && l.contains(" INFO listening role=admin addr=")),
        "expected text lines:\n{text}"
    );
}

#[test]
fn bad_log_format_is_refused_naming_it() {
    let dir = TempDir::new("logs-bad-format");
    let data = dir.join("data");
    let out = run_ward(
        &server_args(&data),
        &[("WARD_LOG_FORMAT", "xml")],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{out}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains("WARD_LOG_FORMAT") && lines[0].contains("xml"),
        "{out}"
    );
}

#[test]
fn text_log_in_a_file_has_no_colour_and_rfc3339_times() {
    // NO_COLOR is not set: stderr being a file is enough.
    let server = Server::start("logs-no-colour", &[], &[], &[]);
    let text = server.text();
    assert!(
        !text.contains('\u{1b}'),
        "escape code in a log file:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("listening role=admin addr="))
        .unwrap_or_else(|| panic!("no listening line:\n{text}"));
    let (ts, rest) = line.split_once(' ').unwrap();
    assert!(is_rfc3339_utc(ts), "time not RFC 3339 UTC: {line}");
    assert!(
        rest.trim_start()
            .starts_with("INFO listening role=admin addr="),
        "{line}"
    );
}

#[test]
fn rust_log_is_read_when_ward_log_is_unset() {
    let server = Server::start("logs-rust-log", &[], &[], &[("RUST_LOG", "debug")]);
    // Not TLS: the gRPC listener refuses the handshake and says so at debug.
    let mut tcp = TcpStream::connect(server.addr("grpc")).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(tcp);
    let found = server.wait_line(Duration::from_secs(10), |l| {
        l.contains("DEBUG") && l.contains("TLS handshake refused")
    });
    assert!(
        found.is_some(),
        "no DEBUG line with RUST_LOG=debug:\n{}",
        server.text()
    );
}

#[test]
fn ward_log_wins_over_rust_log() {
    let server = Server::start(
        "logs-ward-log-wins",
        &[],
        &[],
        &[("WARD_LOG", "info"), ("RUST_LOG", "debug")],
    );
    let mut tcp = TcpStream::connect(server.addr("grpc")).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(tcp);
    // rust_log_is_read_when_ward_log_is_unset shows the line comes at debug; here it must not.
    let found = server.wait_line(Duration::from_secs(3), |l| {
        l.contains("TLS handshake refused")
    });
    assert!(
        found.is_none(),
        "WARD_LOG=info logged debug:\n{}",
        server.text()
    );
}

#[test]
fn bad_level_filter_is_refused_naming_the_variable() {
    let dir = TempDir::new("logs-bad-filter");
    let data = dir.join("data");
    for var in ["WARD_LOG", "RUST_LOG"] {
        let value = "foo=bar=baz";
        let out = run_ward(
            &server_args(&data),
            &[(var, value)],
            Duration::from_secs(10),
        );
        assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{var}: {out}");
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "{var}: {out}");
        assert!(
            lines[0].contains(var) && lines[0].contains(value),
            "{var}: {out}"
        );
    }
}

/// Colour on a terminal (a pseudo-terminal here), none there with `NO_COLOR`.
#[test]
fn colour_only_on_a_terminal_without_no_color() {
    for (no_color, want_colour) in [(None, true), (Some("1"), false)] {
        let dir = TempDir::new("logs-tty");
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let mut cmd = Command::new(ward_bin());
        cmd.args(server_args(&dir.join("data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(pty.slave));
        for var in ["NO_COLOR", "WARD_LOG", "RUST_LOG", "WARD_LOG_FORMAT"] {
            cmd.env_remove(var);
        }
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let mut child = cmd.spawn().expect("spawn ward server");
        // The terminal's last write end goes with `cmd`: reads end (EIO) when the child does.
        drop(cmd);
        let lines: Lines = Default::default();
        collect_lines(std::fs::File::from(pty.master), lines.clone());
        let started = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            let lines = lines.lock().unwrap();
            lines
                .iter()
                .any(|l| parse_listening(l).is_some_and(|(r, _)| r == "admin"))
                .then(|| lines.join("\n"))
        });
        let _ = child.kill();
        let _ = child.wait();
        let text = started
            .unwrap_or_else(|| panic!("no listening line:\n{}", lines.lock().unwrap().join("\n")));
        assert_eq!(
            text.contains('\u{1b}'),
            want_colour,
            "NO_COLOR={no_color:?}, colour wanted: {want_colour}:\n{text}"
        );
    }
}

/// The warning of a `max_connections` capped to fit the open-file limit.
const CAPPED: &str = "exceeds what the open file limit";

/// Security rule 15 (bounds, docs/security.md): the defaults are capped silently to fit the
/// open-file limit; only a value the operator wrote is worth a warning.
#[test]
fn proxy_defaults_start_without_a_file_limit_warning() {
    let inv = Inventory::start("logs-proxy-defaults", |toml| toml);
    // Asserting that something does not happen: the warning would follow the listening lines.
    std::thread::sleep(Duration::from_millis(300));
    let text = inv.proxy.stderr_text();
    assert!(!text.contains(CAPPED), "warning with the defaults:\n{text}");
}

/// `inventory`'s proxy in front of an echo app, allowing `order` (default deny), with `edit`
/// applied to its config text.
struct Inventory {
    _dir: TempDir,
    pki: common::pki::Pki,
    _app: common::net::EchoApp,
    proxy: common::proc::WardProcess,
}

impl Inventory {
    fn start(prefix: &str, edit: impl FnOnce(String) -> String) -> Self {
        let dir = TempDir::new(prefix);
        let pki = common::pki::Pki::new(common::pki::TRUST_DOMAIN);
        let files = common::write_tls_files(&dir, "inventory", &pki, &pki.leaf("inventory"));
        let app = common::net::EchoApp::start();
        let config = dir.join("inventory.toml");
        let toml = common::proc::ProxyConfig::new("inventory", &files.cert, &files.key, &files.ca)
            .inbound("127.0.0.1:0", app.addr)
            .rule("order", "allow")
            .to_toml();
        std::fs::write(&config, edit(toml)).unwrap();
        let proxy = common::proc::WardProcess::start("inventory", &config, &["inbound"]);
        Inventory {
            _dir: dir,
            pki,
            _app: app,
            proxy,
        }
    }
}

#[test]
fn proxy_max_connections_set_above_the_file_limit_warns() {
    // More than any open-file limit allows (two descriptors a connection).
    let inv = Inventory::start("logs-proxy-capped", |toml| {
        toml + "\n[limits]\nmax_connections = 16777216\n"
    });
    let proxy = &inv.proxy;
    let line = proxy.wait_for_stderr(0, Duration::from_secs(10), |l| l.contains(CAPPED));
    let line = line.unwrap_or_else(|| panic!("no warning:\n{}", proxy.stderr_text()));
    assert!(
        line.contains("WARN") && line.contains("limits.max_connections = 16777216"),
        "{line}"
    );
}

#[test]
fn server_defaults_start_without_a_file_limit_warning() {
    let server = Server::start("logs-server-defaults", &[], &[], &[]);
    // Asserting that something does not happen: the warning would follow the listening lines.
    std::thread::sleep(Duration::from_millis(300));
    let text = server.text();
    assert!(!text.contains(CAPPED), "warning with the defaults:\n{text}");
}

/// An admitted connection that echoes `hello\n` and closes cleanly, and a refused one from
/// `legacy` (denied by default); the proxy's `ward_connections_closed_total` has counted the
/// first when this returns.
fn one_admitted_one_refused(inv: &Inventory) {
    use common::tls::{probe, tls_connect, ServerCheck};
    use std::io::Read;
    let inbound = inv.proxy.inbound();
    let order = inv.pki.leaf("order");
    let mut conn = tls_connect(inbound, Some(&order), &ServerCheck::any()).unwrap();
    assert_eq!(conn.echo(b"hello\n").unwrap(), b"hello\n");
    conn.stream.conn.send_close_notify();
    let mut rest = Vec::new();
    let _ = conn.stream.read_to_end(&mut rest);
    drop(conn);
    let refused = probe(inbound, Some(&inv.pki.leaf("legacy")), &ServerCheck::any());
    assert!(refused.result.is_err(), "legacy was admitted");
    let closed = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let text = inv.proxy.metrics();
        let closed = common::net::metric_sum(&text, "ward_connections_closed_total", &[]);
        let denied =
            common::net::metric_sum(&text, "ward_tls_handshakes_total", &[("result", "denied")]);
        (closed == 1.0 && denied == 1.0).then_some(())
    });
    assert!(closed.is_some(), "{}", inv.proxy.metrics());
}

/// The connection log: one info line per admitted inbound connection at its close, one per
/// refused handshake.
#[test]
fn connection_log_has_a_line_per_admitted_and_refused_connection() {
    let inv = Inventory::start("logs-connlog", |toml| toml);
    one_admitted_one_refused(&inv);
    // The line whose message is `message`; it has each of `fields`.
    let line = |message: &str, fields: &[&str]| {
        let proxy = &inv.proxy;
        let line = proxy
            .wait_for_stderr(0, Duration::from_secs(10), |l| l.contains(message))
            .unwrap_or_else(|| panic!("no `{message}` line:\n{}", proxy.stderr_text()));
        for field in fields {
            assert!(line.contains(field), "no `{field}` in: {line}");
        }
    };
    line(
        "inbound connection closed",
        &[
            " INFO ",
            "peer=spiffe://ward.local/ns/default/svc/order",
            "peer_addr=127.0.0.1:",
            "rx_bytes=6",
            "tx_bytes=6",
            "duration_s=",
            "reason=ended",
        ],
    );
    line(
        "inbound connection refused",
        &[
            " INFO ",
            "peer_addr=127.0.0.1:",
            "presented=spiffe://ward.local/ns/default/svc/legacy",
            "result=denied",
        ],
    );
}

#[test]
fn connection_log_false_turns_the_lines_off() {
    let inv = Inventory::start("logs-connlog-off", |toml| {
        toml.replace("[admin]\n", "[admin]\nconnection_log = false\n")
    });
    one_admitted_one_refused(&inv);
    // Asserting that something does not happen: both connections are over by now.
    std::thread::sleep(Duration::from_millis(300));
    let text = inv.proxy.stderr_text();
    assert!(
        !text.contains("inbound connection closed") && !text.contains("inbound connection refused"),
        "connection log lines with connection_log = false:\n{text}"
    );
}
