//! Issue 2, Build 5 and 7: drain on SIGTERM; resumed sessions are counted and authorized. The
//! server's admin listener: `GET /config`, and `POST /drain` stopping it as SIGTERM does.

use ward_test_support as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::net::{http_get, http_request, is_listening, EchoApp};
use common::pki::{Pki, TRUST_DOMAIN};
use common::proc::{ProxyConfig, TempDir, WardProcess};
use common::tls::tls_connect;
use common::{wait_until, write_tls_files};

struct Setup {
    _dir: TempDir,
    pki: Pki,
    app: EchoApp,
    proxy: WardProcess,
}

fn start(drain_timeout: &str) -> Setup {
    start_with(&format!("drain_timeout = \"{drain_timeout}\"\n"))
}

/// The proxy with `limits` as its `[limits]` table.
fn start_with(limits: &str) -> Setup {
    let dir = TempDir::new("drain");
    let pki = Pki::new(TRUST_DOMAIN);
    let identity = pki.leaf("inventory");
    let files = write_tls_files(&dir, "inventory", &pki, &identity);
    let app = EchoApp::start();
    let config = dir.join("inventory.toml");
    let toml = ProxyConfig::new("inventory", &files.cert, &files.key, &files.ca)
        .inbound("127.0.0.1:0", app.addr)
        .rule("order", "allow")
        .to_toml()
        + "\n[limits]\n"
        + limits;
    std::fs::write(&config, toml).unwrap();
    let proxy = WardProcess::start("inventory", &config, &["inbound"]);
    Setup {
        _dir: dir,
        pki,
        app,
        proxy,
    }
}

fn sigterm(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {pid}");
}

fn wait_exit(p: &mut WardProcess, within: Duration) -> std::process::ExitStatus {
    let status = wait_until(within, Duration::from_millis(20), || p.try_wait());
    status.unwrap_or_else(|| panic!("proxy still running after {within:?}\n{}", p.stderr_text()))
}

#[test]
fn sigterm_drains_open_connections_then_exits_zero() {
    let mut s = start("20s");
    let order = s.pki.leaf("order");
    let inbound = s.proxy.inbound();
    let mut conn = tls_connect(inbound, Some(&order), &common::tls::ServerCheck::any()).unwrap();
    assert_eq!(conn.echo(b"before\n").unwrap(), b"before\n");

    sigterm(s.proxy.pid());
    let not_ready = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (s.proxy.ready_status() == Some(503)).then_some(())
    });
    assert!(
        not_ready.is_some(),
        "/ready turns 503 when the drain starts, while the open connection still runs"
    );
    let closed = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (!is_listening(inbound)).then_some(())
    });
    assert!(closed.is_some(), "the inbound listener stops accepting");
    // The open connection keeps working during the drain, and the process waits for it.
    assert_eq!(conn.echo(b"during\n").unwrap(), b"during\n");
    // Asserts that nothing happens (no exit) for a while: a fixed wait, not a condition.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        s.proxy.try_wait().is_none(),
        "still running while a connection is open"
    );
    drop(conn);
    let st = wait_exit(&mut s.proxy, Duration::from_secs(5));
    assert_eq!(st.code(), Some(0), "drained exit is 0");
    assert_eq!(s.app.accepted(), 1);
}

/// With `drain_delay`, SIGTERM turns `/ready` 503 at once while the listener keeps accepting for
/// the delay (so an orchestrator's probe sees the drain before new connections are refused); then
/// the listener closes and the process exits 0 once the open connections end.
#[test]
fn drain_delay_keeps_accepting_while_ready_is_503() {
    let mut s = start_with("drain_timeout = \"20s\"\ndrain_delay = \"4s\"\n");
    let order = s.pki.leaf("order");
    let inbound = s.proxy.inbound();
    let any = common::tls::ServerCheck::any();
    let mut before = tls_connect(inbound, Some(&order), &any).unwrap();
    assert_eq!(before.echo(b"before\n").unwrap(), b"before\n");

    sigterm(s.proxy.pid());
    let not_ready = wait_until(Duration::from_secs(3), Duration::from_millis(10), || {
        (s.proxy.ready_status() == Some(503)).then_some(())
    });
    assert!(
        not_ready.is_some(),
        "/ready turns 503 when the drain starts"
    );
    // Within drain_delay: a new connection is still accepted and served.
    let mut during = tls_connect(inbound, Some(&order), &any).unwrap();
    assert_eq!(during.echo(b"during\n").unwrap(), b"during\n");
    assert_eq!(
        s.proxy.ready_status(),
        Some(503),
        "still 503 while accepting"
    );

    let closed = wait_until(Duration::from_secs(15), Duration::from_millis(20), || {
        (!is_listening(inbound)).then_some(())
    });
    assert!(
        closed.is_some(),
        "the inbound listener closes after drain_delay"
    );
    assert!(
        tls_connect(inbound, Some(&order), &any).is_err(),
        "a new connection is refused once the listener closed"
    );
    // Both open connections keep working, and the process waits for them.
    assert_eq!(before.echo(b"after\n").unwrap(), b"after\n");
    assert_eq!(during.echo(b"after\n").unwrap(), b"after\n");
    // Asserts that nothing happens (no exit) for a while: a fixed wait, not a condition.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        s.proxy.try_wait().is_none(),
        "still running while connections are open"
    );
    drop((before, during));
    let st = wait_exit(&mut s.proxy, Duration::from_secs(5));
    assert_eq!(st.code(), Some(0), "drained exit is 0");
    assert_eq!(s.app.accepted(), 2);
}

#[test]
fn drain_timeout_closes_what_is_left() {
    let mut s = start("1s");
    let order = s.pki.leaf("order");
    let mut conn = tls_connect(
        s.proxy.inbound(),
        Some(&order),
        &common::tls::ServerCheck::any(),
    )
    .unwrap();
    assert_eq!(conn.echo(b"hello\n").unwrap(), b"hello\n");
    let started = Instant::now();
    sigterm(s.proxy.pid());
    let st = wait_exit(&mut s.proxy, Duration::from_secs(6));
    assert_eq!(st.code(), Some(0));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited for drain_timeout"
    );
    assert!(
        conn.echo(b"after\n").is_err(),
        "the connection was closed at the deadline"
    );
}

#[test]
fn resumed_sessions_are_counted_and_served() {
    let s = start("1s");
    let order = s.pki.leaf("order");
    let provider = common::tls::provider();
    // One client config, so its ticket cache carries over between connections.
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(common::tls::AcceptAny(
                common::tls::provider(),
            )))
            .with_client_auth_cert(order.chain_der.clone(), order.key_der())
            .unwrap(),
    );
    let before = s.proxy.handshakes_total("inbound");
    let before_ok = s.proxy.handshakes("inbound", "ok");
    let mut kinds = Vec::new();
    for _ in 0..4 {
        let tcp = std::net::TcpStream::connect(s.proxy.inbound()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn =
            rustls::ClientConnection::new(config.clone(), "inventory.ward".try_into().unwrap())
                .unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        use std::io::{Read, Write};
        stream.write_all(b"ping\n").unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping\n");
        kinds.push(stream.conn.handshake_kind());
        // Read the tickets that follow the handshake before closing.
        stream.conn.send_close_notify();
        let _ = stream.flush();
    }
    assert_eq!(kinds[0], Some(rustls::HandshakeKind::Full));
    assert!(
        kinds[1..].contains(&Some(rustls::HandshakeKind::Resumed)),
        "later connections resume: {kinds:?}"
    );
    assert_eq!(
        s.proxy.handshakes_total("inbound") - before,
        4.0,
        "each connection counted once"
    );
    assert_eq!(s.proxy.handshakes("inbound", "ok") - before_ok, 4.0);
    assert_eq!(s.app.accepted(), 4);
}

/// Security rule 13 (admin listener, docs/security.md): a browser page on this host cannot drain
/// the proxy with a cross-site (no-cors) POST, which always carries `Origin`; a POST without it
/// (curl) still drains.
#[test]
fn post_drain_from_a_web_page_is_refused() {
    let mut s = start("1s");
    let admin = s.proxy.admin();
    let r = http_request(
        admin,
        "POST",
        "/drain",
        &[
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/plain"),
        ],
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(s.proxy.ready_status(), Some(200), "the proxy did not drain");
    assert!(is_listening(s.proxy.inbound()));

    let r = http_request(admin, "POST", "/drain", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Draining: /ready answers 503, or (no connection being open) the proxy already exited 0.
    let drained = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        if s.proxy.ready_status() == Some(503) {
            return Some(true);
        }
        s.proxy.try_wait().map(|st| st.success())
    });
    assert_eq!(
        drained,
        Some(true),
        "POST /drain without Origin drains\n{}",
        s.proxy.stderr_text()
    );
}

/// `ward server` serves the proxy's admin endpoints: `GET /config` shows what it runs with (no
/// token), and `POST /drain` stops it as SIGTERM does.
#[test]
fn server_admin_serves_config_and_post_drain_stops_it() {
    let dir = TempDir::new("server-drain");
    let mut server = common::cp::DevServer::start("server", &dir.join("data"), None);
    let r = http_get(server.admin, "/config").unwrap();
    assert_eq!(r.status, 200, "GET /config: {}", r.body);
    let config: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(config["trust_domain"], TRUST_DOMAIN, "{config}");
    assert_eq!(config["listen"], server.grpc.to_string(), "{config}");
    assert!(!r.body.contains(&server.token), "{}", r.body);

    let r = http_request(server.admin, "POST", "/drain", &[]).unwrap();
    assert_eq!(r.status, 200, "POST /drain: {}", r.body);
    let stopped = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (!server.is_running()).then_some(())
    });
    let log = server.stderr_text();
    assert!(stopped.is_some(), "still running after POST /drain\n{log}");
    assert!(log.contains("stopping") && !log.contains("error"), "{log}");
}
