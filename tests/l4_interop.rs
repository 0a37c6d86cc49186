//! Issue 2, "Must show": the refusals seen from clients nobody here wrote, `openssl s_client`
//! and Python's `ssl` module, run as subprocesses: each fails with the fitting TLS alert, and a
//! valid `order` gets its echo.
//!
//! Issue 21, item 3: two ward sidecars agree on the hybrid post-quantum key exchange
//! X25519MLKEM768; a classical client (OpenSSL offering X25519 and P-256 only) gets X25519 from
//! a ward inbound, and a ward outbound agrees on X25519 with a classical server.

use ward_test_support as common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::cp::echo_once;
use common::net::metric_sum;
use common::pki::IdentityFiles;
use common::proc::{ProxyConfig, WardProcess};
use common::{refusal_cases, tool_available, wait_until, write_tls_files, Inventory};

struct Output {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

fn pipe_reader<R: Read + Send + 'static>(mut r: R) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    buf
}

/// Runs `child` to completion (killing it after `timeout`). If `until_stdout` is given, stdin
/// is closed as soon as stdout contains it (the client then exits); otherwise stdin stays open
/// until the process exits by itself, so a client only stops on what the server does.
fn drive(mut child: Child, input: &[u8], until_stdout: Option<&str>, timeout: Duration) -> Output {
    let mut stdin = child.stdin.take();
    if let Some(s) = stdin.as_mut() {
        let _ = s.write_all(input);
        let _ = s.flush();
    }
    let out = pipe_reader(child.stdout.take().unwrap());
    let err = pipe_reader(child.stderr.take().unwrap());
    let status = wait_until(timeout, Duration::from_millis(20), || {
        if let Some(want) = until_stdout {
            if stdin.is_some() && String::from_utf8_lossy(&out.lock().unwrap()).contains(want) {
                stdin = None; // EOF on stdin: the client shuts down
            }
        }
        child.try_wait().ok().flatten()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(stdin);
    // let the pipe readers finish
    wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
        (Arc::strong_count(&out) == 1 && Arc::strong_count(&err) == 1).then_some(())
    });
    let stdout = String::from_utf8_lossy(&out.lock().unwrap()).to_string();
    let stderr = String::from_utf8_lossy(&err.lock().unwrap()).to_string();
    Output {
        status,
        stdout,
        stderr,
    }
}

fn openssl(addr: SocketAddr, roots: &Path, id: Option<&IdentityFiles>, input: &[u8]) -> Output {
    openssl_with(addr, roots, id, input, &[])
}

/// [`openssl`] with `extra` arguments for `s_client`.
fn openssl_with(
    addr: SocketAddr,
    roots: &Path,
    id: Option<&IdentityFiles>,
    input: &[u8],
    extra: &[&str],
) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-tls1_3")
        .arg("-CAfile")
        .arg(roots)
        .arg("-verify_return_error")
        .args(extra);
    if let Some(id) = id {
        cmd.arg("-cert").arg(&id.leaf).arg("-key").arg(&id.key);
        if let Some(extra) = &id.extra {
            cmd.arg("-cert_chain").arg(extra);
        }
    }
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    let until = if input.is_empty() {
        None
    } else {
        Some(std::str::from_utf8(input).unwrap().trim())
    };
    drive(child, input, until, Duration::from_secs(15))
}

const PY_CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.maximum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.load_verify_locations(ca)
if cert != "-":
    ctx.load_cert_chain(cert, key)
try:
    with socket.create_connection((host, port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"hello-from-python\n")
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            print("RECEIVED " + data.decode(errors="replace").strip())
            sys.exit(0 if data else 4)
except ssl.SSLError as e:
    print("SSLERROR %s | %s" % (e.reason, e))
    sys.exit(3)
except OSError as e:
    print("OSERROR %s" % e)
    sys.exit(5)
"#;

fn python(addr: SocketAddr, roots: &Path, id: Option<&IdentityFiles>) -> Output {
    let (cert, key) = match id {
        Some(id) => (
            id.chain.to_string_lossy().to_string(),
            id.key.to_string_lossy().to_string(),
        ),
        None => ("-".to_string(), "-".to_string()),
    };
    let child = Command::new("python3")
        .arg("-c")
        .arg(PY_CLIENT)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(roots)
        .arg(cert)
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    drive(child, b"", None, Duration::from_secs(20))
}

#[test]
fn openssl_s_client_sees_the_refusals_as_alerts() {
    if !tool_available("openssl", &["version"]) {
        return;
    }
    let inv = Inventory::start("interop-openssl");
    let addr = inv.proxy.inbound();
    let mut failures = Vec::new();
    for (i, case) in refusal_cases(&inv.pki).into_iter().enumerate() {
        let files = case
            .identity
            .as_ref()
            .map(|id| id.write(inv.dir.path(), &format!("openssl-case{i}")));
        let out = openssl(addr, &inv.files.ca, files.as_ref(), b"");
        let text = out.all();
        let ok = out.status.map(|s| !s.success()).unwrap_or(false)
            && text.to_lowercase().contains(case.openssl_text);
        if !ok {
            failures.push(format!(
                "{}: want a failing exit and `{}`; exit {:?}, output:\n{}",
                case.name, case.openssl_text, out.status, text
            ));
        }
    }
    if inv.app.accepted() != 0 {
        failures.push(format!(
            "the app accepted {} connection(s) during the refusals",
            inv.app.accepted()
        ));
    }

    // Positive control.
    let order = inv.pki.leaf("order").write(inv.dir.path(), "openssl-order");
    let out = openssl(addr, &inv.files.ca, Some(&order), b"hello-from-openssl\n");
    if !out.stdout.contains("hello-from-openssl") {
        failures.push(format!(
            "valid order: no echo; exit {:?}, output:\n{}",
            out.status,
            out.all()
        ));
    }
    if !out.stdout.contains("Verify return code: 0 (ok)") {
        failures.push(format!(
            "valid order: openssl did not verify inventory's chain against the mesh root:\n{}",
            out.all()
        ));
    }
    if inv.app.accepted() != 1 {
        failures.push(format!(
            "valid order: app accepted {} connection(s), want 1",
            inv.app.accepted()
        ));
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n----\n")
    );
}

#[test]
fn python_ssl_sees_the_refusals_as_alerts() {
    if !tool_available("python3", &["-c", "import ssl"]) {
        return;
    }
    let inv = Inventory::start("interop-python");
    let addr = inv.proxy.inbound();
    let mut failures = Vec::new();
    for (i, case) in refusal_cases(&inv.pki).into_iter().enumerate() {
        let files = case
            .identity
            .as_ref()
            .map(|id| id.write(inv.dir.path(), &format!("python-case{i}")));
        let out = python(addr, &inv.files.ca, files.as_ref());
        let want = format!("SSLERROR {}", case.python_reason);
        let ok = out.status.and_then(|s| s.code()) == Some(3) && out.stdout.contains(&want);
        if !ok {
            failures.push(format!(
                "{}: want `{}`; exit {:?}, output:\n{}",
                case.name,
                want,
                out.status,
                out.all()
            ));
        }
    }
    if inv.app.accepted() != 0 {
        failures.push(format!(
            "the app accepted {} connection(s) during the refusals",
            inv.app.accepted()
        ));
    }

    // Positive control.
    let order = inv.pki.leaf("order").write(inv.dir.path(), "python-order");
    let out = python(addr, &inv.files.ca, Some(&order));
    if !(out.status.map(|s| s.success()).unwrap_or(false)
        && out.stdout.contains("RECEIVED hello-from-python"))
    {
        failures.push(format!(
            "valid order: no echo; exit {:?}, output:\n{}",
            out.status,
            out.all()
        ));
    }
    if inv.app.accepted() != 1 {
        failures.push(format!(
            "valid order: app accepted {} connection(s), want 1",
            inv.app.accepted()
        ));
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n----\n")
    );
}

/// `ward_tls_key_exchanges_total{direction,group}` of `p`.
fn key_exchanges(p: &WardProcess, direction: &str, group: &str) -> f64 {
    metric_sum(
        &p.metrics(),
        "ward_tls_key_exchanges_total",
        &[("direction", direction), ("group", group)],
    )
}

#[test]
fn two_sidecars_agree_on_post_quantum_key_exchange_and_a_classical_client_on_x25519() {
    let inv = Inventory::start("interop-kx");
    let files = write_tls_files(&inv.dir, "order", &inv.pki, &inv.pki.leaf("order"));
    let cfg = inv.dir.join("order.toml");
    ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[inv.proxy.inbound()])
        .write(&cfg);
    let order = WardProcess::start("order", &cfg, &["upstream.inventory"]);
    echo_once(
        order.upstream("inventory"),
        b"hello-through-the-mesh\n",
        Duration::from_secs(10),
    )
    .expect("echo through order's and inventory's sidecars");

    // The outbound counts its handshake once the tunnel's first frame arrived, which the echo
    // waited for; the inbound counts it before it forwards. No handshake used a classical group.
    for (p, direction) in [(&order, "outbound"), (&inv.proxy, "inbound")] {
        assert!(
            key_exchanges(p, direction, "X25519MLKEM768") >= 1.0,
            "{direction}: a handshake with the hybrid group; metrics:\n{}",
            p.metrics()
        );
        assert_eq!(key_exchanges(p, direction, "X25519"), 0.0, "{direction}");
    }

    if !tool_available("openssl", &["version"]) {
        return;
    }
    let id = inv.pki.leaf("order").write(inv.dir.path(), "openssl-kx");
    let out = openssl_with(
        inv.proxy.inbound(),
        &inv.files.ca,
        Some(&id),
        b"hello-from-openssl\n",
        &["-groups", "X25519:P-256"],
    );
    assert!(
        out.stdout.contains("hello-from-openssl"),
        "a classical client is served; exit {:?}, output:\n{}",
        out.status,
        out.all()
    );
    assert!(
        // OpenSSL 3.0 names the group as "Server Temp Key", 3.2 and later as "Negotiated TLS1.3
        // group" (3.5 would offer the hybrid group by default, hence `-groups`).
        out.stdout.contains("Server Temp Key: X25519,") || out.stdout.contains("group: X25519\n"),
        "openssl reports X25519 as the agreed group:\n{}",
        out.all()
    );
    assert_eq!(
        key_exchanges(&inv.proxy, "inbound", "X25519"),
        1.0,
        "{}",
        inv.proxy.metrics()
    );
}

/// Ends the `openssl s_server` it holds when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_ward_client_agrees_on_x25519_with_a_classical_server() {
    if !tool_available("openssl", &["version"]) {
        return;
    }
    let inv = Inventory::start("interop-kx-client");
    // inventory's identity on `openssl s_server` instead of ward: X25519 and P-256 only,
    // client certificate required, each line sent back reversed.
    let server_id = inv.pki.leaf("inventory").write(inv.dir.path(), "s-server");
    let port = common::net::free_port();
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_server",
        "-accept",
        &format!("127.0.0.1:{port}"),
        "-rev",
        "-tls1_3",
    ])
    .args([
        "-groups",
        "X25519:P-256",
        "-Verify",
        "3",
        "-verify_return_error",
    ])
    .arg("-cert")
    .arg(&server_id.leaf)
    .arg("-key")
    .arg(&server_id.key)
    .arg("-CAfile")
    .arg(&inv.files.ca);
    if let Some(extra) = &server_id.extra {
        cmd.arg("-cert_chain").arg(extra);
    }
    let server = Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_server"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listening = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        common::net::is_listening(addr).then_some(())
    });
    assert!(
        listening.is_some(),
        "openssl s_server did not listen on {addr}"
    );

    let files = write_tls_files(&inv.dir, "order", &inv.pki, &inv.pki.leaf("order"));
    let cfg = inv.dir.join("order-to-openssl.toml");
    ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[addr])
        .write(&cfg);
    let order = WardProcess::start("order", &cfg, &["upstream.inventory"]);
    let mut s = std::net::TcpStream::connect(order.upstream("inventory")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello\n").unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back)
        .expect("the reversed line from openssl s_server");
    assert_eq!(&back, b"olleh\n");
    // Counted before the server's first record reached the client (outbound.rs, `Answered`).
    assert!(
        key_exchanges(&order, "outbound", "X25519") == 1.0
            && key_exchanges(&order, "outbound", "X25519MLKEM768") == 0.0,
        "one outbound handshake with X25519:\n{}",
        order.metrics()
    );
    drop(server);
}
