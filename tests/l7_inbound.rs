//! The http inbound (`[inbound] protocol = "http"`), end to end: real `ward`, real curl over
//! mutual TLS (HTTP/2 and HTTP/1.1), an app that answers with the request header it received;
//! gRPC and WebSocket (python grpcio and websockets) through two sidecars; raw HTTP/1.1 and
//! HTTP/2 bytes for the malformed and abusive clients.

use ward_test_support as common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::pki::{spiffe_id, Identity, Pki, TRUST_DOMAIN};
use common::proc::{ProxyConfig, TempDir, WardProcess};
use common::py::{Python, GRPC_CLIENT, GRPC_SERVER, WS_CLIENT, WS_SERVER};
use common::tls::{tls_connect, Failure, ServerCheck};
use common::{write_tls_files, TlsFiles};

/// An HTTP/1.1 app that answers every request with 200 and, as the body, the request header
/// it received; keeps every header it received.
struct HeaderEchoApp {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl HeaderEchoApp {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let kept = kept.clone();
                thread::spawn(move || Self::serve(conn, kept));
            }
        });
        HeaderEchoApp { addr, heads }
    }

    /// Requests with no body or a Content-Length body, kept alive until the client closes.
    fn serve(mut conn: TcpStream, kept: Arc<Mutex<Vec<String>>>) {
        conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let body_len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + body_len {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..end + 4 + body_len);
            kept.lock().unwrap().push(head.clone());
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{head}",
                head.len()
            );
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// The values of header `name` in a request head (case-insensitive name).
fn header_values(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

/// `inventory`'s http inbound in front of a [`HeaderEchoApp`], allowing `order`, denying
/// `legacy`; `limits` is appended as the `[limits]` table.
struct Mesh {
    dir: TempDir,
    pki: Pki,
    app: HeaderEchoApp,
    proxy: WardProcess,
}

impl Mesh {
    fn start(prefix: &str, limits: &str) -> Self {
        Self::start_for(prefix, limits, None)
    }

    /// As [`Mesh::start`], with `local_app` instead of the header echo app when given.
    fn start_for(prefix: &str, limits: &str, local_app: Option<SocketAddr>) -> Self {
        let dir = TempDir::new(prefix);
        let pki = Pki::new(TRUST_DOMAIN);
        let inventory = pki.leaf("inventory");
        let files = write_tls_files(&dir, "inventory", &pki, &inventory);
        let app = HeaderEchoApp::start();
        let mut toml = ProxyConfig::new("inventory", &files.cert, &files.key, &files.ca)
            .inbound("127.0.0.1:0", local_app.unwrap_or(app.addr))
            .rule("order", "allow")
            .rule("legacy", "deny")
            .to_toml()
            .replacen("protocol = \"tcp\"", "protocol = \"http\"", 1);
        toml.push_str(&format!("\n[limits]\n{limits}\n"));
        let config = dir.join("inventory.toml");
        std::fs::write(&config, toml).unwrap();
        let proxy = WardProcess::start("inventory", &config, &["inbound"]);
        Mesh {
            dir,
            pki,
            app,
            proxy,
        }
    }

    /// `service`'s certificate files, for curl.
    fn client_files(&self, service: &str) -> (Identity, TlsFiles) {
        let id = self.pki.leaf(service);
        let files = write_tls_files(&self.dir, service, &self.pki, &id);
        (id, files)
    }

    /// `order`'s sidecar, whose `[[upstreams]] inventory` (tcp) leads to this inbound: the
    /// first of the two sidecars between an `order` app and `inventory`'s app.
    fn order_sidecar(&self) -> WardProcess {
        let (_, files) = self.client_files("order");
        let order_config = self.dir.join("order.toml");
        ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
            .upstream("inventory", &[self.proxy.inbound()])
            .write(&order_config);
        WardProcess::start("order", &order_config, &["upstream.inventory"])
    }

    /// A TLS connection as `order` (no ALPN: the inbound sniffs HTTP/2 or HTTP/1.1).
    fn connect_as_order(&self) -> common::tls::TlsClient {
        let order = self.pki.leaf("order");
        tls_connect(self.proxy.inbound(), Some(&order), &self.check())
            .unwrap_or_else(|f| panic!("handshake: {f:?}"))
    }

    /// `ward_http_requests_total` of `order`'s requests answered `code`.
    fn requests(&self, code: &str) -> f64 {
        common::net::metric_sum(
            &self.proxy.metrics(),
            "ward_http_requests_total",
            &[("direction", "inbound"), ("peer", "order"), ("code", code)],
        )
    }

    fn check(&self) -> ServerCheck {
        ServerCheck::mesh(
            &self.pki.root.cert_der,
            &spiffe_id(TRUST_DOMAIN, "inventory"),
        )
    }

    /// The `x-forwarded-client-cert` the app must see for `caller`.
    fn xfcc_for(caller: &Identity, service: &str) -> String {
        let hash: String = sha256(caller.leaf_der().as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "By={};Hash={hash};URI={}",
            spiffe_id(TRUST_DOMAIN, "inventory"),
            spiffe_id(TRUST_DOMAIN, service)
        )
    }
}

fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

/// What curl printed: the body, then the HTTP version and status on a last line.
struct Curl {
    ok: bool,
    body: String,
    version: String,
    status: String,
    stderr: String,
}

/// curl to the inbound with `files`'s certificate. `-k`: the mesh certificates carry only a
/// SPIFFE URI, no host name curl could check; the server's identity is not under test here.
fn curl(inbound: SocketAddr, files: &TlsFiles, args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "20", "--cert"])
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .arg("--cacert")
        .arg(&files.ca)
        .args(["-w", "\n%{http_version} %{http_code}"])
        .args(args)
        .arg(format!("https://{inbound}/stock/item?q=1"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (version, status) = last.split_once(' ').unwrap_or((last, ""));
    Curl {
        ok: out.status.success(),
        body: body.to_owned(),
        version: version.to_owned(),
        status: status.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn have_curl() -> bool {
    common::tool_available("curl", &["--version"])
}

#[test]
fn curl_over_http2_and_http1_gets_the_app_answer_with_one_true_xfcc() {
    if !have_curl() {
        return;
    }
    let mesh = Mesh::start("l7-curl", "");
    let (order, files) = mesh.client_files("order");
    let want = Mesh::xfcc_for(&order, "order");
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let got = curl(
            mesh.proxy.inbound(),
            &files,
            &[
                flag,
                "-H",
                "x-forwarded-client-cert: By=spiffe://evil/ns/default/svc/admin;URI=forged",
                "-H",
                "X-Forwarded-Client-Cert: URI=spiffe://ward.local/ns/default/svc/admin",
                "-H",
                "connection: x-hop",
                "-H",
                "x-hop: must-not-reach-the-app",
            ],
        );
        assert!(got.ok, "{flag}: curl failed: {}", got.stderr);
        assert_eq!(
            (got.version.as_str(), got.status.as_str()),
            (version, "200"),
            "{flag}"
        );
        assert!(
            got.body.starts_with("GET /stock/item?q=1 HTTP/1.1\r\n"),
            "{flag}: {}",
            got.body
        );
        assert_eq!(
            header_values(&got.body, "x-forwarded-client-cert"),
            std::slice::from_ref(&want),
            "{flag}: {}",
            got.body
        );
        if flag == "--http1.1" {
            // (HTTP/2 has no `Connection`: curl drops it there, and x-hop is an ordinary header.)
            assert!(
                header_values(&got.body, "x-hop").is_empty(),
                "{flag}: {}",
                got.body
            );
        }
        assert_eq!(
            header_values(&got.body, "host"),
            [mesh.proxy.inbound().to_string()],
            "{flag}"
        );
    }
    assert_eq!(mesh.app.heads().len(), 2);
    let ok = |code: &str| {
        common::net::metric_sum(
            &mesh.proxy.metrics(),
            "ward_http_requests_total",
            &[("direction", "inbound"), ("peer", "order"), ("code", code)],
        )
    };
    assert_eq!(ok("200"), 2.0, "{}", mesh.proxy.metrics());
    assert!(mesh
        .proxy
        .metrics()
        .contains("ward_http_request_duration_seconds_bucket"));
}

#[test]
fn a_ward_outbound_carries_http_to_an_http_inbound() {
    let mesh = Mesh::start("l7-outbound", "");
    let order_proxy = mesh.order_sidecar();
    let mut s = TcpStream::connect(order_proxy.upstream("inventory")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /via-outbound HTTP/1.1\r\nhost: inventory\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let heads = mesh.app.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let xfcc = header_values(&heads[0], "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{heads:?}");
    assert!(
        xfcc[0].ends_with(&format!(";URI={}", spiffe_id(TRUST_DOMAIN, "order"))),
        "{xfcc:?}"
    );
}

#[test]
fn a_denied_caller_is_refused_in_the_handshake() {
    let mesh = Mesh::start("l7-deny", "");
    let legacy = mesh.pki.leaf("legacy");
    let failure = match tls_connect(mesh.proxy.inbound(), Some(&legacy), &mesh.check()) {
        Err(f) => f,
        Ok(mut c) => {
            let _ = c.stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
            let mut buf = [0u8; 64];
            match c.stream.read(&mut buf) {
                Ok(0) => Failure::Closed,
                Ok(n) => panic!("answered: {:?}", String::from_utf8_lossy(&buf[..n])),
                Err(e) => common::tls::classify(&e),
            }
        }
    };
    assert_eq!(
        failure,
        Failure::Alert(rustls::AlertDescription::AccessDenied)
    );
    assert!(mesh.app.heads().is_empty());
    assert_eq!(mesh.proxy.handshakes("inbound", "denied"), 1.0);
}

#[test]
fn a_slow_loris_is_cut_by_header_read_timeout_while_others_are_served() {
    let mesh = Mesh::start("l7-loris", "header_read_timeout = \"1s\"");
    let order = mesh.pki.leaf("order");
    let mut loris = tls_connect(mesh.proxy.inbound(), Some(&order), &mesh.check())
        .unwrap_or_else(|f| panic!("handshake: {f:?}"));
    loris
        .stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: inventory\r\nx-partial: ")
        .unwrap();
    loris.stream.flush().unwrap();
    // Another client is served meanwhile.
    let mut other = tls_connect(mesh.proxy.inbound(), Some(&order), &mesh.check()).unwrap();
    other
        .stream
        .write_all(b"GET /fast HTTP/1.1\r\nhost: inventory\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = other.stream.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // The stalled client: cut (EOF or reset) well before the read timeout of 10 s.
    let started = Instant::now();
    let cut = loop {
        match loris.stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) if started.elapsed() < Duration::from_secs(9) => continue,
            Ok(n) => break Err(format!("answered {:?}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) => match common::tls::classify(&e) {
                Failure::Timeout => break Err("not cut within 10 s".to_owned()),
                _ => break Ok(()),
            },
        }
    };
    assert_eq!(cut, Ok(()));
    assert_eq!(
        mesh.app.heads().len(),
        1,
        "only the complete request reached the app"
    );
}

#[test]
fn an_oversized_header_is_answered_431() {
    if !have_curl() {
        return;
    }
    let mesh = Mesh::start("l7-431", "max_header_bytes = 16384");
    let (_, files) = mesh.client_files("order");
    let big = format!("x-big: {}", "a".repeat(20_000));
    // Over HTTP/2 the 20 kB header spans a HEADERS and a CONTINUATION frame: the header list
    // is bounded across them.
    for flag in ["--http1.1", "--http2"] {
        let got = curl(mesh.proxy.inbound(), &files, &[flag, "-H", &big]);
        assert_eq!(got.status, "431", "{flag}: {} {}", got.body, got.stderr);
    }
    let fits = format!("x-big: {}", "a".repeat(8_000));
    let got = curl(mesh.proxy.inbound(), &files, &["--http1.1", "-H", &fits]);
    assert_eq!(got.status, "200", "{}", got.stderr);
    assert_eq!(mesh.app.heads().len(), 1);
    // The HTTP/1.1 refusal is counted (for HTTP/2, h2 answers 431 itself, unseen by ward).
    assert_eq!(mesh.requests("431"), 1.0, "{}", mesh.proxy.metrics());
}

#[test]
fn grpc_server_streaming_crosses_two_sidecars_with_its_trailers() {
    let dir = TempDir::new("l7-grpc-app");
    let Some(app) = Python::start(&dir, "grpc_server.py", GRPC_SERVER, &[], "grpc") else {
        return;
    };
    let app_addr: SocketAddr = format!("127.0.0.1:{}", app.first_line.trim())
        .parse()
        .unwrap_or_else(|_| panic!("grpc server printed {:?}", app.first_line));
    let mesh = Mesh::start_for("l7-grpc", "", Some(app_addr));
    // app (h2c) -> order's tcp upstream -> TLS without ALPN -> inventory's http inbound,
    // which sees the HTTP/2 preface -> h2c to the grpc app.
    let order = mesh.order_sidecar();
    let target = order.upstream("inventory").to_string();
    let out = Python::run(&dir, "grpc_client.py", GRPC_CLIENT, &[&target]);
    let calls: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {out}")))
        .collect();
    assert_eq!(calls.len(), 2, "{out}");
    let messages = serde_json::json!(["update-0:item", "update-1:item", "update-2:item"]);
    assert_eq!(calls[0]["messages"], messages, "{out}");
    assert_eq!(calls[0]["code"], "OK", "{out}");
    assert_eq!(
        calls[0]["trailers"],
        serde_json::json!([["x-stock-trailer", "kept"]]),
        "{out}"
    );
    // A non-OK status and its message arrive in the trailers after the streamed messages.
    assert_eq!(
        calls[1]["messages"],
        serde_json::json!(["update-0:missing", "update-1:missing", "update-2:missing"]),
        "{out}"
    );
    assert_eq!(calls[1]["code"], "NOT_FOUND", "{out}");
    assert_eq!(calls[1]["details"], "no such item", "{out}");
    assert_eq!(
        calls[1]["trailers"],
        serde_json::json!([["x-stock-trailer", "kept"]]),
        "{out}"
    );
    assert_eq!(mesh.requests("200"), 2.0, "{}", mesh.proxy.metrics());
}

#[test]
fn a_websocket_echo_crosses_two_sidecars() {
    let dir = TempDir::new("l7-ws-app");
    let Some(app) = Python::start(
        &dir,
        "ws_server.py",
        WS_SERVER,
        &[],
        "websockets.sync.server",
    ) else {
        return;
    };
    let app_addr: SocketAddr = format!("127.0.0.1:{}", app.first_line.trim())
        .parse()
        .unwrap_or_else(|_| panic!("websocket server printed {:?}", app.first_line));
    let mesh = Mesh::start_for("l7-ws", "", Some(app_addr));
    let order = mesh.order_sidecar();
    let target = order.upstream("inventory").to_string();
    let out = Python::run(&dir, "ws_client.py", WS_CLIENT, &[&target]);
    assert_eq!(out, "hello through two sidecars\nbinary True\n");
    assert_eq!(mesh.requests("101"), 1.0, "{}", mesh.proxy.metrics());
}

/// Reads what `client` gets until EOF, a reset or its 10 s read timeout (then `timed_out`).
fn read_all(client: &mut common::tls::TlsClient) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match client.stream.read(&mut buf) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, common::tls::classify(&e) == Failure::Timeout),
        }
    }
}

/// A GET from a well-behaved client on its own connection: the app's 200.
fn assert_served(mesh: &Mesh) {
    let mut other = mesh.connect_as_order();
    other
        .stream
        .write_all(b"GET /fine HTTP/1.1\r\nhost: inventory\r\nconnection: close\r\n\r\n")
        .unwrap();
    let (answer, _) = read_all(&mut other);
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "another client: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn a_request_without_a_host_reaches_the_app_with_local_apps() {
    let mesh = Mesh::start("l7-no-host", "");
    let mut c = mesh.connect_as_order();
    // HTTP/1.0 needs no Host; the app speaks HTTP/1.1, which does.
    c.stream
        .write_all(b"GET /stock/1 HTTP/1.0\r\nconnection: close\r\n\r\n")
        .unwrap();
    let (answer, timed_out) = read_all(&mut c);
    assert!(!timed_out);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let heads = mesh.app.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with("GET /stock/1 HTTP/1.1\r\n"),
        "{heads:?}"
    );
    assert_eq!(
        header_values(&heads[0], "host"),
        [mesh.app.addr.to_string()],
        "{heads:?}"
    );
}

#[test]
fn an_upgrade_the_app_declines_is_an_ordinary_exchange() {
    let mesh = Mesh::start("l7-upgrade-declined", "");
    let mut c = mesh.connect_as_order();
    // The header echo app answers 200 to the handshake: the connection stays HTTP/1.1.
    c.stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nhost: inventory\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\
              GET /next HTTP/1.1\r\nhost: inventory\r\nconnection: close\r\n\r\n",
        )
        .unwrap();
    let (answer, timed_out) = read_all(&mut c);
    assert!(!timed_out);
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let heads = mesh.app.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    // The handshake reached the app with its upgrade headers, and only those hop-by-hop ones.
    assert_eq!(
        header_values(&heads[0], "upgrade"),
        ["websocket"],
        "{heads:?}"
    );
    assert_eq!(
        header_values(&heads[0], "connection"),
        ["upgrade"],
        "{heads:?}"
    );
    assert!(header_values(&heads[1], "upgrade").is_empty(), "{heads:?}");
}

#[test]
fn an_upgrade_to_h2c_never_reaches_the_app() {
    let mesh = Mesh::start("l7-upgrade-h2c", "");
    let mut c = mesh.connect_as_order();
    // Were the app to accept it, the connection would carry HTTP/2 requests the inbound does
    // not parse: it reaches the app as a plain HTTP/1.1 request.
    c.stream
        .write_all(
            b"GET /admin HTTP/1.1\r\nhost: inventory\r\nconnection: Upgrade, HTTP2-Settings, close\r\n\
              upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        .unwrap();
    let (answer, timed_out) = read_all(&mut c);
    assert!(!timed_out);
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let heads = mesh.app.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    for name in ["upgrade", "http2-settings"] {
        assert!(header_values(&heads[0], name).is_empty(), "{heads:?}");
    }
}

#[test]
fn malformed_requests_are_answered_400_and_counted() {
    let mesh = Mesh::start("l7-malformed", "");
    let cases: [(&str, &[u8]); 6] = [
        (
            "CR inside a header value",
            b"GET / HTTP/1.1\r\nhost: inventory\r\nx-evil: a\rb\r\n\r\n",
        ),
        (
            "a header value folded onto a second line",
            b"GET / HTTP/1.1\r\nhost: inventory\r\nx-evil: a\r\n b\r\n\r\n",
        ),
        (
            "a pseudo-header in HTTP/1.1",
            b"GET / HTTP/1.1\r\nhost: inventory\r\n:path: /admin\r\n\r\n",
        ),
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nhost: inventory\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello",
        ),
        (
            "a Transfer-Encoding other than chunked",
            b"POST / HTTP/1.1\r\nhost: inventory\r\ntransfer-encoding: gzip, identity\r\n\r\n",
        ),
        (
            "whitespace before the colon",
            b"GET / HTTP/1.1\r\nhost : inventory\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        let mut c = mesh.connect_as_order();
        c.stream.write_all(request).unwrap();
        let (answer, timed_out) = read_all(&mut c);
        assert!(!timed_out, "{what}: the connection was left open");
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{what}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(mesh.app.heads().is_empty(), "{:?}", mesh.app.heads());
    assert_eq!(
        mesh.requests("400"),
        cases.len() as f64,
        "{}",
        mesh.proxy.metrics()
    );
    assert_served(&mesh);
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The error code of the first GOAWAY among HTTP/2 `frames` from the server.
fn goaway_code(frames: &[u8]) -> Option<u32> {
    let mut at = 0;
    while at + 9 <= frames.len() {
        let len = u32::from_be_bytes([0, frames[at], frames[at + 1], frames[at + 2]]) as usize;
        let payload = &frames[(at + 9).min(frames.len())..(at + 9 + len).min(frames.len())];
        if frames[at + 3] == GOAWAY && payload.len() >= 8 {
            return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        at += 9 + len;
    }
    None
}

/// The server's answer to an abusive HTTP/2 client that wrote `frames` after its preface (the
/// writes may fail once the server has closed): whether a GOAWAY with ENHANCE_YOUR_CALM came.
fn h2_abuse(mesh: &Mesh, frames: &[Vec<u8>]) -> Option<u32> {
    let mut c = mesh.connect_as_order();
    c.stream.write_all(PREFACE).unwrap();
    c.stream.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    let mut write_failed = false;
    for chunk in frames.chunks(64) {
        if c.stream.write_all(&chunk.concat()).is_err() {
            write_failed = true;
            break;
        }
    }
    let (answer, timed_out) = if write_failed {
        read_tls_only(&mut c)
    } else {
        read_all(&mut c)
    };
    assert!(!timed_out, "the abusive connection was left open");
    goaway_code(answer.strip_prefix(PREFACE).unwrap_or(&answer))
}

/// What the server sent, read once our own write has failed (the server closed while the flood
/// was still coming): rustls's stream would first retry the write it still holds and fail
/// again, so the records already received are read and decrypted directly. The server's
/// kernel resets a connection closed with unread input, but what reached our socket before
/// the reset is still read.
fn read_tls_only(client: &mut common::tls::TlsClient) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let s = &mut client.stream;
    for _ in 0..10_000 {
        let more = match s.conn.read_tls(&mut s.sock) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => return (got, common::tls::classify(&e) == Failure::Timeout),
        };
        if s.conn.process_new_packets().is_err() {
            return (got, false);
        }
        while let Ok(n) = s.conn.reader().read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        if !more {
            return (got, false);
        }
    }
    (got, false)
}

#[test]
fn a_continuation_flood_is_cut_while_others_are_served() {
    let mesh = Mesh::start("l7-continuation", "");
    // `:method GET`, then header fragments that never end: each CONTINUATION adds a small
    // literal header and none carries END_HEADERS.
    let mut frames = vec![frame(HEADERS, END_STREAM, 1, &[0x82])];
    let literal = [&[0x00, 0x03][..], b"x-a", &[0x08], b"aaaaaaaa"].concat();
    frames.extend((0..5000).map(|_| frame(CONTINUATION, 0, 1, &literal)));
    assert_eq!(h2_abuse(&mesh, &frames), Some(ENHANCE_YOUR_CALM));
    assert!(mesh.app.heads().is_empty());
    assert_served(&mesh);
}

#[test]
fn a_rapid_reset_client_gets_goaway_while_others_are_served() {
    let mesh = Mesh::start("l7-rapid-reset", "");
    // GET / on a new stream, cancelled at once (CVE-2023-44487), a thousand times.
    let get = [0x82, 0x87, 0x84, 0x41, 0x09];
    let get = [&get[..], b"inventory"].concat();
    let cancel = 0x8u32.to_be_bytes();
    let frames: Vec<Vec<u8>> = (0..1000u32)
        .flat_map(|i| {
            let id = 2 * i + 1;
            [
                frame(HEADERS, END_HEADERS | END_STREAM, id, &get),
                frame(RST_STREAM, 0, id, &cancel),
            ]
        })
        .collect();
    assert_eq!(h2_abuse(&mesh, &frames), Some(ENHANCE_YOUR_CALM));
    assert_served(&mesh);
}

#[test]
fn a_stalled_request_body_is_cut_by_idle_timeout_while_others_are_served() {
    let mesh = Mesh::start("l7-body-idle", "idle_timeout = \"2s\"");
    let mut stalled = mesh.connect_as_order();
    stalled
        .stream
        .write_all(b"POST /upload HTTP/1.1\r\nhost: inventory\r\ncontent-length: 100\r\n\r\nfirst")
        .unwrap();
    assert_served(&mesh);
    // Cut (EOF, reset or a 408-style answer) before the client's 10 s read timeout.
    let (_, timed_out) = read_all(&mut stalled);
    assert!(!timed_out, "a stalled body was not cut by idle_timeout");
    assert!(mesh.app.heads().iter().all(|h| !h.contains("/upload")));
}

#[test]
fn a_stalled_http2_body_is_cut_by_idle_timeout_on_a_busy_connection() {
    let mesh = Mesh::start("l7-h2-body-idle", "idle_timeout = \"2s\"");
    let mut c = mesh.connect_as_order();
    // POST /upload with content-length 100, then 5 bytes of it and no more.
    let post = [
        &[0x83, 0x87, 0x44, 0x07][..],
        b"/upload",
        &[0x41, 0x09],
        b"inventory",
        &[0x5c, 0x03],
        b"100",
    ]
    .concat();
    let start = [
        PREFACE.to_vec(),
        frame(SETTINGS, 0, 0, &[]),
        frame(HEADERS, END_HEADERS, 1, &post),
        frame(DATA, 0, 1, b"first"),
    ]
    .concat();
    c.stream.write_all(&start).unwrap();
    // Reads wait at most 200 ms, the PINGs' period.
    c.stream
        .sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // PINGs keep the connection busy, so only the stream's own idle timeout can end it.
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut ended = None;
    // Until the stream ends, for up to 10 s (idle_timeout is 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next_ping = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_ping {
            c.stream.write_all(&frame(PING, 0, 0, &[0; 8])).unwrap();
            next_ping += Duration::from_millis(200);
        }
        match c.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        ended = frames(&got)
            .into_iter()
            .find(|&(kind, stream)| stream == 1 && (kind == HEADERS || kind == RST_STREAM));
        if ended.is_some() {
            break;
        }
    }
    assert!(
        ended.is_some(),
        "stream 1 was neither answered nor reset: {:?}",
        frames(&got)
    );
    assert!(mesh.app.heads().iter().all(|h| !h.contains("/upload")));
    assert_served(&mesh);
}

/// The type and stream of each whole HTTP/2 frame in `bytes` (the server's preface is one).
fn frames(bytes: &[u8]) -> Vec<(u8, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let stream = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
        out.push((bytes[at + 3], stream));
        at += 9 + len;
    }
    out
}
