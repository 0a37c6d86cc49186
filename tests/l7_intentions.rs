//! L7 intentions on the http inbound, end to end: real `ward` processes, raw HTTP/1.1 request
//! lines over mutual TLS (so no client normalizes the path before the proxy sees it), curl over
//! HTTP/2, a ward outbound with a tcp upstream, and `ward intention create --file` on a dev
//! server.

use ward_test_support as common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::cp::{start_proxy, CpProxyConfig, DevServer};
use common::pki::{spiffe_id, Pki, TRUST_DOMAIN};
use common::proc::{ProxyConfig, TempDir, WardProcess};
use common::tls::{tls_connect, ServerCheck};
use common::write_tls_files;

/// `order`'s L7 rule: GET under `/stock/` but not `/stock/secret`, never `/admin`.
const PERMISSIONS: &str = r#"permissions = [
  { action = "deny", path_prefix = "/stock/secret" },
  { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
  { action = "deny", path_exact = "/admin" },
]"#;

/// An HTTP/1.1 app that answers every request 200 with its request line as the body, and keeps
/// the request lines it received.
struct RequestLog {
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl RequestLog {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let kept = kept.clone();
                thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
                    let mut writer = conn.try_clone().unwrap();
                    let mut reader = BufReader::new(conn);
                    // Requests without a body (all this file sends), kept alive.
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        loop {
                            let mut h = String::new();
                            match reader.read_line(&mut h) {
                                Ok(0) | Err(_) => return,
                                Ok(_) if h == "\r\n" => break,
                                Ok(_) => {}
                            }
                        }
                        let line = line.trim_end().to_owned();
                        kept.lock().unwrap().push(line.clone());
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{line}",
                            line.len()
                        );
                        if writer.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RequestLog { addr, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// Sends one request line (no body) on `s` and reads the answer: status and body.
fn exchange<S: Read + Write>(s: &mut S, method: &str, target: &str) -> (u16, String) {
    let req = format!("{method} {target} HTTP/1.1\r\nhost: inventory\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.flush().unwrap();
    read_response(s).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

/// One HTTP/1.1 response with a content-length body, read byte by byte (the stream stays
/// usable for the next response).
fn read_response<S: Read>(s: &mut S) -> Result<(u16, String), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no content-length in {head:?}"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `inventory`'s http inbound with static intentions: `order` has [`PERMISSIONS`].
struct StaticMesh {
    dir: TempDir,
    pki: Pki,
    app: RequestLog,
    proxy: WardProcess,
}

impl StaticMesh {
    fn start(prefix: &str) -> Self {
        let dir = TempDir::new(prefix);
        let pki = Pki::new(TRUST_DOMAIN);
        let files = write_tls_files(&dir, "inventory", &pki, &pki.leaf("inventory"));
        let app = RequestLog::start();
        let l7 = format!(
            "{{ source = \"order\", {} }}",
            PERMISSIONS.replace('\n', " ")
        );
        let toml = ProxyConfig::new("inventory", &files.cert, &files.key, &files.ca)
            .inbound("127.0.0.1:0", app.addr)
            .rule("order", "allow")
            .to_toml()
            .replacen("protocol = \"tcp\"", "protocol = \"http\"", 1)
            .replacen("{ source = \"order\", action = \"allow\" }", &l7, 1);
        assert!(toml.contains("/stock/secret"), "{toml}");
        let config = dir.join("inventory.toml");
        std::fs::write(&config, toml).unwrap();
        let proxy = WardProcess::start("inventory", &config, &["inbound"]);
        StaticMesh {
            dir,
            pki,
            app,
            proxy,
        }
    }

    fn check(&self) -> ServerCheck {
        ServerCheck::mesh(
            &self.pki.root.cert_der,
            &spiffe_id(TRUST_DOMAIN, "inventory"),
        )
    }

    fn decisions(&self, decision: &str) -> f64 {
        common::net::metric_sum(
            &self.proxy.metrics(),
            "ward_intention_decisions_total",
            &[
                ("source", "order"),
                ("destination", "inventory"),
                ("decision", decision),
            ],
        )
    }
}

/// Each request, sent as written on one kept-alive mutual-TLS connection, is decided as its
/// normalized path says; an allowed one reaches the app with that path, a denied one (403) or
/// a refused one (400) never does.
#[test]
fn every_request_is_decided_on_its_normalized_path_and_forwarded_as_matched() {
    let mesh = StaticMesh::start("l7-static");
    let order = mesh.pki.leaf("order");
    let mut c = tls_connect(mesh.proxy.inbound(), Some(&order), &mesh.check())
        .unwrap_or_else(|f| panic!("handshake: {f:?}"));
    // (method, target as sent, status, the request line the app sees if allowed)
    let cases: &[(&str, &str, u16, Option<&str>)] = &[
        ("GET", "/stock/1", 200, Some("GET /stock/1 HTTP/1.1")),
        ("GET", "/admin", 403, None),
        // The classic bypass shapes are /admin once normalized.
        ("GET", "/stock/../admin", 403, None),
        ("GET", "/stock/%2e%2e/admin", 403, None),
        ("GET", "/%61dmin", 403, None),
        ("GET", "//admin", 403, None),
        // Paths are case-sensitive: /admin/ and /ADMIN are other paths, which no permission
        // allows (a deny for every spelling is a path_regex such as `(?i)/admin(/.*)?`).
        ("GET", "/admin/", 403, None),
        ("GET", "/ADMIN", 403, None),
        // An encoded separator would be a separator to an app that decodes it: 400.
        ("GET", "/stock%2F..%2Fadmin", 400, None),
        ("GET", "/stock/..%5Cadmin", 400, None),
        ("GET", "/stock/%zz", 400, None),
        // Not an origin-form path: 400.
        ("OPTIONS", "*", 400, None),
        // The deny on /stock/secret is found however the path is written.
        ("GET", "/stock//secret/1", 403, None),
        ("GET", "/stock/./secret/1", 403, None),
        ("GET", "/stock/%73ecret/1", 403, None),
        // Methods are case-sensitive too.
        ("POST", "/stock/1", 403, None),
        ("get", "/stock/1", 403, None),
        // Allowed: the app receives the path that was matched, the query as sent.
        (
            "GET",
            "/stock/x/../%31?q=/../admin",
            200,
            Some("GET /stock/1?q=/../admin HTTP/1.1"),
        ),
        ("GET", "//stock//2", 200, Some("GET /stock/2 HTTP/1.1")),
        // The parser drops a fragment before anything is matched; it never reaches the app.
        (
            "GET",
            "/stock/3#/../../admin",
            200,
            Some("GET /stock/3 HTTP/1.1"),
        ),
    ];
    let mut want_lines = Vec::new();
    for (method, target, status, line) in cases {
        let (got, body) = exchange(&mut c.stream, method, target);
        assert_eq!(got, *status, "{method} {target}: {body}");
        match line {
            Some(l) => {
                assert_eq!(body, *l, "{method} {target}");
                want_lines.push(l.to_string());
            }
            None => {
                // A short answer of the proxy's own that names no rule and no path.
                assert!(!body.contains("admin") && !body.contains("stock"), "{body}");
                assert!(!body.contains("permission"), "{body}");
            }
        }
    }
    assert_eq!(
        mesh.app.lines(),
        want_lines,
        "the app saw only allowed requests"
    );
    // The handshake's decision, then one per request that reached the permissions (the 400s
    // did not).
    assert_eq!(
        mesh.decisions("allow"),
        1.0 + 4.0,
        "{}",
        mesh.proxy.metrics()
    );
    assert_eq!(mesh.decisions("deny"), 12.0, "{}", mesh.proxy.metrics());
    let config = mesh.proxy.config_json();
    assert_eq!(
        config.pointer("/intentions/rules/0"),
        Some(&serde_json::json!({ "source": "order", "permissions": 3 })),
        "{config}"
    );
}

/// The same decisions over HTTP/2 (curl, `--path-as-is` so it sends the dot segments).
#[test]
fn http2_requests_are_decided_the_same_way() {
    if !common::tool_available("curl", &["--version"]) {
        common::skipped("curl is not installed");
        return;
    }
    let mesh = StaticMesh::start("l7-h2");
    let order = mesh.pki.leaf("order");
    let files = write_tls_files(&mesh.dir, "order", &mesh.pki, &order);
    for (target, status) in [
        ("/stock/1", "200"),
        ("/stock/../admin", "403"),
        ("/admin", "403"),
        ("/stock//secret/1", "403"),
    ] {
        let out = Command::new("curl")
            .args(["-sS", "-k", "--http2", "--path-as-is", "--max-time", "20"])
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
            .arg(format!("https://{}{target}", mesh.proxy.inbound()))
            .output()
            .expect("run curl");
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got,
            format!("2 {status}"),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(mesh.app.lines(), ["GET /stock/1 HTTP/1.1"]);
}

/// A caller whose upstream is `tcp` reaches an http inbound over plain TLS (the inbound never
/// offers the tunnel): its bytes are parsed as HTTP and every request is decided; none gets
/// past the permissions as raw bytes.
#[test]
fn a_tcp_upstream_caller_gets_no_raw_bytes_past_the_permissions() {
    let mesh = StaticMesh::start("l7-tcp-upstream");
    let order = mesh.pki.leaf("order");
    let files = write_tls_files(&mesh.dir, "order", &mesh.pki, &order);
    let order_config = mesh.dir.join("order.toml");
    ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[mesh.proxy.inbound()])
        .write(&order_config);
    let order_proxy = WardProcess::start("order", &order_config, &["upstream.inventory"]);
    let mut s = TcpStream::connect(order_proxy.upstream("inventory")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(exchange(&mut s, "GET", "/admin").0, 403);
    assert_eq!(exchange(&mut s, "GET", "/stock/../admin").0, 403);
    assert_eq!(
        exchange(&mut s, "GET", "/stock/1"),
        (200, "GET /stock/1 HTTP/1.1".into())
    );
    assert_eq!(exchange(&mut s, "DELETE", "/stock/1").0, 403);
    // Bytes that are not HTTP are refused by the parser, not copied to the app.
    let mut raw = TcpStream::connect(order_proxy.upstream("inventory")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"\x16\x03\x01 not http at all\r\n\r\nGET /admin HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert_eq!(mesh.app.lines(), ["GET /stock/1 HTTP/1.1"]);
}

/// A caller whose upstream is `http` (each request over pooled HTTP/2) is decided request by
/// request in the same way.
#[test]
fn an_http_upstream_caller_is_decided_request_by_request() {
    let mesh = StaticMesh::start("l7-http-upstream");
    let order = mesh.pki.leaf("order");
    let files = write_tls_files(&mesh.dir, "order", &mesh.pki, &order);
    let order_config = mesh.dir.join("order.toml");
    let toml = ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[mesh.proxy.inbound()])
        .to_toml()
        .replacen("protocol = \"tcp\"", "protocol = \"http\"", 1);
    std::fs::write(&order_config, toml).unwrap();
    let order_proxy = WardProcess::start("order", &order_config, &["upstream.inventory"]);
    let mut s = TcpStream::connect(order_proxy.upstream("inventory")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(exchange(&mut s, "GET", "/admin").0, 403);
    assert_eq!(exchange(&mut s, "GET", "/stock/../admin").0, 403);
    assert_eq!(exchange(&mut s, "GET", "/stock//secret/1").0, 403);
    assert_eq!(
        exchange(&mut s, "GET", "/stock/1"),
        (200, "GET /stock/1 HTTP/1.1".into())
    );
    assert_eq!(exchange(&mut s, "POST", "/stock/1").0, 403);
    assert_eq!(mesh.app.lines(), ["GET /stock/1 HTTP/1.1"]);
}

/// `inventory`'s proxy with `[control_plane]` and an inbound of `protocol` in front of `app`,
/// started with a join token of its own and ready (certificate and intentions in).
fn inventory(server: &DevServer, dir: &TempDir, app: SocketAddr, protocol: &str) -> WardProcess {
    let token = server.token_create("inventory", &[]);
    let file = DevServer::token_file(dir, &format!("inventory-{protocol}"), &token);
    let toml = CpProxyConfig::new("inventory", server, &file)
        .inbound(app)
        .to_toml()
        .replacen(
            "protocol = \"tcp\"",
            &format!("protocol = \"{protocol}\""),
            1,
        );
    let path = dir.join(&format!("inventory-{protocol}.toml"));
    std::fs::write(&path, toml).unwrap();
    let p = WardProcess::spawn(&format!("inventory-{protocol}"), &path, &["inbound"]);
    assert!(
        p.wait_ready(Duration::from_secs(20)),
        "inventory ({protocol}) not ready: {}",
        p.stderr_text()
    );
    p
}

/// `ward intention create --source order --destination inventory --file FILE [--replace]`.
fn create_l7(server: &DevServer, file: &Path, replace: bool) -> common::cp::CliOutput {
    let mut args = vec![
        "intention",
        "create",
        "--source",
        "order",
        "--destination",
        "inventory",
        "--file",
        file.to_str().unwrap(),
    ];
    if replace {
        args.push("--replace");
    }
    server.cli(&args)
}

/// [`create_l7`], retried: the server takes permissions once inventory has registered as http
/// (just after /ready).
fn create_l7_once_registered(server: &DevServer, file: &Path) {
    let mut last = String::new();
    let created = common::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let out = create_l7(server, file, false);
        if out.success() {
            Some(())
        } else {
            last = out.to_string();
            None
        }
    });
    assert!(created.is_some(), "intention create --file: {last}");
}

/// Security rule 6: an L7 rule that reaches a tcp inbound (the destination registered as http
/// when the rule was written, then came back with a tcp inbound) denies its source, counts in
/// `ward_intention_errors_total`, and lets no byte reach the app.
#[test]
fn an_l7_rule_that_reaches_a_tcp_inbound_denies_its_source() {
    let dir = TempDir::new("l7-on-tcp");
    let server = DevServer::start("l7-on-tcp-server", &dir.join("server-data"), None);
    let app = RequestLog::start();
    let http = inventory(&server, &dir, app.addr, "http");
    let l7 = dir.join("l7.toml");
    std::fs::write(&l7, PERMISSIONS).unwrap();
    create_l7_once_registered(&server, &l7);
    drop(http);
    let tcp = inventory(&server, &dir, app.addr, "tcp");
    assert!(
        common::cp::metric(&tcp, "ward_intention_errors_total", &[]) >= 1.0,
        "{}",
        tcp.metrics()
    );
    let order_token = server.token_create("order", &[]);
    let order_file = DevServer::token_file(&dir, "order", &order_token);
    let order = start_proxy(
        &dir,
        "order",
        &CpProxyConfig::new("order", &server, &order_file).upstream("inventory"),
    );
    // Until the tcp inbound has refused order's handshake (the catalog may still list the http
    // instance, gone, for a while).
    let denied = common::wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        if let Ok(mut s) = TcpStream::connect(order.upstream("inventory")) {
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = s.write_all(b"GET /stock/1 HTTP/1.1\r\nhost: inventory\r\n\r\n");
            let _ = read_response(&mut s);
        }
        (tcp.handshakes("inbound", "denied") >= 1.0).then_some(())
    });
    assert!(denied.is_some(), "{}", tcp.metrics());
    assert_eq!(tcp.handshakes("inbound", "ok"), 0.0, "{}", tcp.metrics());
    assert!(app.lines().is_empty(), "{:?}", app.lines());
}

/// `ward intention create --file` on a dev server reaches the proxy (registered as http), and a
/// change applies to the next request on an open, kept-alive connection; `intention check`
/// names the permission that decided.
#[test]
fn an_l7_intention_from_the_cli_is_enforced_and_a_change_applies_to_the_next_request() {
    let dir = TempDir::new("l7-cli");
    let server = DevServer::start("l7-cli-server", &dir.join("server-data"), None);
    let app = RequestLog::start();
    let _inventory = inventory(&server, &dir, app.addr, "http");
    let order_token = server.token_create("order", &[]);
    let order_file = DevServer::token_file(&dir, "order", &order_token);
    let order = start_proxy(
        &dir,
        "order",
        &CpProxyConfig::new("order", &server, &order_file).upstream("inventory"),
    );

    let l7 = dir.join("l7.toml");
    std::fs::write(&l7, PERMISSIONS).unwrap();
    let create = |file: &Path, replace: bool| create_l7(&server, file, replace);
    create_l7_once_registered(&server, &l7);

    // A destination registered as tcp takes no permissions: the server refuses them.
    let billing_token = server.token_create("billing", &[]);
    let billing_file = DevServer::token_file(&dir, "billing", &billing_token);
    let _billing = start_proxy(
        &dir,
        "billing",
        &CpProxyConfig::new("billing", &server, &billing_file).inbound(app.addr),
    );
    let registered =
        common::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            let out = server.cli(&["catalog", "endpoints", "billing"]);
            out.success().then_some(())
        });
    assert!(registered.is_some(), "billing did not register");
    let out = server.cli(&[
        "intention",
        "create",
        "--source",
        "order",
        "--destination",
        "billing",
        "--file",
        l7.to_str().unwrap(),
    ]);
    assert!(
        !out.success(),
        "permissions taken for a tcp destination: {out}"
    );
    assert!(out.stderr.contains("need an http destination"), "{out}");

    // One kept-alive connection through order's tcp upstream for everything below.
    let mut s = TcpStream::connect(order.upstream("inventory")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let allowed = common::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let mut probe = TcpStream::connect(order.upstream("inventory")).ok()?;
        probe.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        (exchange(&mut probe, "GET", "/stock/0").0 == 200).then_some(())
    });
    assert!(
        allowed.is_some(),
        "the L7 intention did not reach the proxy"
    );
    assert_eq!(
        exchange(&mut s, "GET", "/stock/1"),
        (200, "GET /stock/1 HTTP/1.1".into())
    );
    assert_eq!(exchange(&mut s, "GET", "/admin").0, 403);
    assert_eq!(exchange(&mut s, "GET", "/stock/../admin").0, 403);

    let check = server.cli(&[
        "intention",
        "check",
        "--source",
        "order",
        "--destination",
        "inventory",
        "--method",
        "GET",
        "--path",
        "/stock/1",
    ]);
    assert!(check.success(), "{check}");
    assert!(
        check.stdout.contains("#1 "),
        "the permission that allowed: {check}"
    );
    let check = server.cli(&[
        "intention",
        "check",
        "--source",
        "order",
        "--destination",
        "inventory",
        "--path",
        "/stock//secret/1",
    ]);
    assert_eq!(check.status.and_then(|s| s.code()), Some(1), "{check}");
    assert!(
        check.stdout.contains("#0 "),
        "the permission that denied: {check}"
    );

    // Now /stock/ is closed and /admin open: the next request on the same connection sees it.
    let changed = dir.join("l7-changed.toml");
    std::fs::write(
        &changed,
        "permissions = [{ action = \"allow\", path_exact = \"/admin\", methods = [\"GET\"] }]\n",
    )
    .unwrap();
    create(&changed, true).expect_ok("intention create --replace --file");
    let mut seen = Vec::new();
    let flipped = common::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let (status, _) = exchange(&mut s, "GET", "/stock/1");
        seen.push(status);
        (status == 403).then_some(())
    });
    assert!(
        flipped.is_some(),
        "GET /stock/1 on the open connection: {seen:?}"
    );
    assert_eq!(
        exchange(&mut s, "GET", "/admin"),
        (200, "GET /admin HTTP/1.1".into())
    );
    let lines = app.lines();
    assert!(!lines.iter().any(|l| l.contains("..")), "{lines:?}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("GET /admin HTTP/1.1")
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("/admin")).count(),
        1,
        "/admin reached the app only once it was allowed: {lines:?}"
    );

    // The source turned to deny as a whole: its open connection is closed, as on L4.
    server.intention_create("order", "inventory", "deny", true);
    let mut byte = [0u8; 1];
    let closed = common::wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || match s.read(&mut byte) {
            Ok(0) => Some(()),
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut =>
            {
                Some(())
            }
            _ => None,
        },
    );
    assert!(
        closed.is_some(),
        "the denied source's connection stayed open"
    );
}
