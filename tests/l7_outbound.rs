//! The http outbound (`[[upstreams]] protocol = "http"`), end to end: real `ward` processes,
//! real clients (curl over HTTP/1.1 and HTTP/2 with prior knowledge, python's http.client, the
//! h2 crate's client) to `order`'s upstream listener, two `inventory` http inbounds as the endpoints, each in front of
//! an app that says which one served the request and echoes the request header it received.

use ward_test_support as common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::pki::{spiffe_id, Pki, TRUST_DOMAIN};
use common::proc::{ProxyConfig, TempDir, WardProcess};
use common::py::{Python, GRPC_CLIENT, GRPC_SERVER, WS_CLIENT, WS_SERVER};
use common::{write_tls_files, TlsFiles};

/// Set to end every `GET /hold` answer of every [`NamedApp`]; the condvar wakes the holders.
static HOLDS_RELEASED: (Mutex<bool>, std::sync::Condvar) =
    (Mutex::new(false), std::sync::Condvar::new());

/// An HTTP/1.1 app that answers 200 with `served-by=<name>` and the request header it received
/// as the body; `GET /stall` is answered only after 5 s. Keeps every header it received.
struct NamedApp {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl NamedApp {
    fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let kept = kept.clone();
                thread::spawn(move || Self::serve(name, conn, kept));
            }
        });
        NamedApp { addr, heads }
    }

    /// Requests with no body or a Content-Length body, kept alive until the client closes.
    fn serve(name: &str, mut conn: TcpStream, kept: Arc<Mutex<Vec<String>>>) {
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
            let body_len: usize = header_values(&head, "content-length")
                .first()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + body_len {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..end + 4 + body_len);
            kept.lock().unwrap().push(head.clone());
            if head.starts_with("GET /hold ") {
                // Headers and a first chunk at once, the end only once the test releases it.
                let start = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nheld\n\r\n";
                if conn.write_all(start.as_bytes()).is_err() {
                    return;
                }
                // Bounded: the answer ends after 30 s whether or not the test released it.
                let (released, wake) = &HOLDS_RELEASED;
                let held = released.lock().unwrap();
                drop(
                    wake.wait_timeout_while(held, Duration::from_secs(30), |r| !*r)
                        .unwrap(),
                );
                if conn.write_all(b"0\r\n\r\n").is_err() {
                    return;
                }
                continue;
            }
            if head.starts_with("GET /stall ") {
                // Slower than the caller's request_timeout (a fixed wait is the point here).
                thread::sleep(Duration::from_secs(5));
            }
            let body = format!("served-by={name}\n{head}");
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
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

/// `order`'s proxy with an http upstream `inventory` whose endpoints are two `inventory` http
/// inbounds (`a` and `b`, each in front of a [`NamedApp`]), or other addresses.
struct Mesh {
    _dir: TempDir,
    pki: Pki,
    /// `order`'s `[tls]` files.
    order_files: TlsFiles,
    apps: Vec<NamedApp>,
    inbounds: Vec<WardProcess>,
    order: WardProcess,
}

impl Mesh {
    /// `extra` endpoints (unreachable ones, say) come first in the upstream's list; `limits`
    /// is `order`'s `[limits]` table.
    fn start(prefix: &str, inbounds: &[&'static str], extra: &[SocketAddr], limits: &str) -> Self {
        Self::start_as("inventory", "allow", prefix, inbounds, extra, limits)
    }

    /// [`Mesh::start`] with endpoints that are sidecars of `service` (`inventory` is expected)
    /// whose intention for `order` is `action`.
    fn start_as(
        service: &str,
        action: &str,
        prefix: &str,
        inbounds: &[&'static str],
        extra: &[SocketAddr],
        limits: &str,
    ) -> Self {
        Self::start_full(service, action, prefix, inbounds, extra, limits, None)
    }

    /// One `inventory` http inbound (`a`) in front of the app at `local_app` (a [`NamedApp`]
    /// is started but gets no request); `limits` is `order`'s `[limits]` table.
    fn in_front_of(prefix: &str, local_app: SocketAddr, limits: &str) -> Self {
        Self::start_full(
            "inventory",
            "allow",
            prefix,
            &["a"],
            &[],
            limits,
            Some(local_app),
        )
    }

    fn start_full(
        service: &str,
        action: &str,
        prefix: &str,
        inbounds: &[&'static str],
        extra: &[SocketAddr],
        limits: &str,
        local_app: Option<SocketAddr>,
    ) -> Self {
        let dir = TempDir::new(prefix);
        let pki = Pki::new(TRUST_DOMAIN);
        let id = pki.leaf(service);
        let files = write_tls_files(&dir, service, &pki, &id);
        let mut apps = Vec::new();
        let mut procs = Vec::new();
        for name in inbounds {
            let app = NamedApp::start(name);
            let toml = ProxyConfig::new(service, &files.cert, &files.key, &files.ca)
                .inbound("127.0.0.1:0", local_app.unwrap_or(app.addr))
                .rule("order", action)
                .to_toml()
                .replacen("protocol = \"tcp\"", "protocol = \"http\"", 1);
            let config = dir.join(&format!("{service}-{name}.toml"));
            std::fs::write(&config, toml).unwrap();
            procs.push(WardProcess::start(
                &format!("{service}-{name}"),
                &config,
                &["inbound"],
            ));
            apps.push(app);
        }
        let order = pki.leaf("order");
        let order_files = write_tls_files(&dir, "order", &pki, &order);
        let files = order_files.clone();
        let mut endpoints = extra.to_vec();
        endpoints.extend(procs.iter().map(|p| p.inbound()));
        let mut toml = ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
            .upstream("inventory", &endpoints)
            .to_toml()
            .replacen("protocol = \"tcp\"", "protocol = \"http\"", 1);
        toml.push_str(&format!("\n[limits]\n{limits}\n"));
        let config = dir.join("order.toml");
        std::fs::write(&config, toml).unwrap();
        let order = WardProcess::start("order", &config, &["upstream.inventory"]);
        Mesh {
            _dir: dir,
            pki,
            order_files,
            apps,
            inbounds: procs,
            order,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.order.upstream("inventory"))
    }

    /// `ward_tls_handshakes_total` of every proxy: `order`'s outbound ones, and the inbound
    /// ones of the `inventory` sidecars.
    fn handshakes(&self) -> (f64, f64) {
        let inbound = self
            .inbounds
            .iter()
            .map(|p| p.handshakes_total("inbound"))
            .sum();
        (self.order.handshakes_total("outbound"), inbound)
    }

    /// `ward_http_requests_total` of `order`'s requests the `inventory` inbounds answered `code`.
    fn inbound_requests(&self, code: &str) -> f64 {
        self.inbounds
            .iter()
            .map(|p| {
                common::net::metric_sum(
                    &p.metrics(),
                    "ward_http_requests_total",
                    &[("direction", "inbound"), ("peer", "order"), ("code", code)],
                )
            })
            .sum()
    }

    fn outbound_requests(&self, code: &str) -> f64 {
        common::net::metric_sum(
            &self.order.metrics(),
            "ward_http_requests_total",
            &[
                ("direction", "outbound"),
                ("peer", "inventory"),
                ("code", code),
            ],
        )
    }
}

/// The `served-by` of each answer body, in order.
fn served_by(bodies: &str) -> Vec<String> {
    bodies
        .lines()
        .filter_map(|l| l.strip_prefix("served-by="))
        .map(str::to_owned)
        .collect()
}

/// Runs python's http.client: `count` GETs of `path` on ONE keep-alive connection to `addr`;
/// prints each answer's status and body. `None` (and a loud skip) without python3.
fn python_gets(addr: SocketAddr, path: &str, count: usize) -> Option<String> {
    if !common::tool_available("python3", &["-c", "import http.client"]) {
        return None;
    }
    let script = r#"
import http.client, sys
host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
conn = http.client.HTTPConnection(host, port, timeout=20)
for _ in range(count):
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read().decode()
    print(r.status)
    print(body)
    if r.will_close:
        print("CLOSED")
        break
conn.close()
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(path)
        .arg(count.to_string())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// curl to `urls` in one run (curl reuses its connection across them); `-w` adds a line
/// `CURL <http_version> <http_code> <num_connects>` after each answer.
fn curl(urls: &[String], args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args([
            "-w",
            "\nCURL %{http_version} %{http_code} %{num_connects}\n",
        ])
        .args(args)
        .args(urls)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `(version, code, connects)` of each `CURL` line.
fn curl_results(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("CURL "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].to_owned())
        })
        .collect()
}

/// GETs of `paths`, one after another on ONE HTTP/2 connection with prior knowledge (the h2
/// crate's client): each answer's status and body.
fn h2c_gets(addr: SocketAddr, paths: &[&str]) -> Vec<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut answers = Vec::new();
        for path in paths {
            let mut send = send.clone().ready().await.unwrap();
            let req = http::Request::get(format!("http://{addr}{path}"))
                .body(())
                .unwrap();
            let (response, _) = send.send_request(req, true).unwrap();
            let response = tokio::time::timeout(Duration::from_secs(20), response)
                .await
                .expect("an answer within 20 s")
                .unwrap();
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let mut text = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                text.extend_from_slice(&chunk);
            }
            answers.push((status, String::from_utf8_lossy(&text).into_owned()));
        }
        answers
    })
}

#[test]
fn requests_on_one_client_connection_alternate_across_both_endpoints() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    let mesh = Mesh::start("l7out-rr", &["a", "b"], &[], "");
    // Round robin per request: each answer from the other endpoint than the one before.
    let alternate = |by: &[String], what: &str| {
        assert_eq!(by.len(), 6, "{what}: {by:?}");
        for pair in by.windows(2) {
            assert_ne!(pair[0], pair[1], "{what}: {by:?}");
        }
    };
    let urls: Vec<String> = (0..6).map(|i| mesh.url(&format!("/item/{i}"))).collect();
    let out = curl(&urls, &["--http1.1"]);
    let results = curl_results(&out);
    // One client connection: curl connected for the first request only.
    let connects: Vec<&str> = results.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(connects, ["1", "0", "0", "0", "0", "0"], "{out}");
    for (v, code, _) in &results {
        assert_eq!((v.as_str(), code.as_str()), ("1.1", "200"), "{out}");
    }
    alternate(&served_by(&out), "curl --http1.1");

    // HTTP/2 with prior knowledge: curl (one connection per run: curl 7.88 fails to reuse an
    // h2c connection, curl/curl#10634), and six requests on one connection with h2's client.
    let mut by = Vec::new();
    for url in &urls {
        let out = curl(std::slice::from_ref(url), &["--http2-prior-knowledge"]);
        assert_eq!(curl_results(&out)[0].0, "2", "{out}");
        assert_eq!(curl_results(&out)[0].1, "200", "{out}");
        by.extend(served_by(&out));
    }
    alternate(&by, "curl --http2-prior-knowledge");
    let paths = ["/h2/0", "/h2/1", "/h2/2", "/h2/3", "/h2/4", "/h2/5"];
    let answers = h2c_gets(mesh.order.upstream("inventory"), &paths);
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let bodies: String = answers.iter().map(|(_, b)| b.as_str()).collect();
    alternate(&served_by(&bodies), "h2 client");

    if let Some(out) = python_gets(mesh.order.upstream("inventory"), "/py", 6) {
        assert!(!out.contains("CLOSED"), "{out}");
        alternate(&served_by(&out), "python http.client");
    }
    let served = mesh.apps[0].heads().len() + mesh.apps[1].heads().len();
    assert_eq!(served as f64, mesh.outbound_requests("200"));
    assert!(served >= 18, "{served}");
    assert!(mesh.order.metrics().contains(
        "ward_http_request_duration_seconds_bucket{direction=\"outbound\",peer=\"inventory\""
    ));
}

#[test]
fn a_thousand_sequential_requests_cost_at_most_two_handshakes() {
    let mesh = Mesh::start("l7out-1000", &["a", "b"], &[], "");
    let Some(out) = python_gets(mesh.order.upstream("inventory"), "/seq", 1000) else {
        return;
    };
    assert!(!out.contains("CLOSED"), "the client connection was closed");
    let by = served_by(&out);
    assert_eq!(by.len(), 1000);
    assert_eq!(by.iter().filter(|b| *b == "a").count(), 500);
    assert_eq!(mesh.outbound_requests("200"), 1000.0);
    // One HTTP/2 connection per endpoint, each opened with one handshake, on both sides.
    let (outbound, inbound) = mesh.handshakes();
    assert!(
        (1.0..=2.0).contains(&outbound),
        "order made {outbound} handshakes"
    );
    assert_eq!(
        mesh.order.handshakes("outbound", "ok"),
        outbound,
        "every handshake ok"
    );
    assert!(
        inbound <= 2.0,
        "the inventory sidecars took {inbound} handshakes"
    );
}

#[test]
fn the_app_behind_the_inbound_gets_one_xfcc_with_the_callers_id_and_no_hop_by_hop_header() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    let mesh = Mesh::start("l7out-xfcc", &["a"], &[], "");
    let forged = "x-forwarded-client-cert: By=spiffe://evil/ns/default/svc/admin;URI=forged";
    let out = curl(
        &[mesh.url("/who?x=1")],
        &[
            "--http1.1",
            "-H",
            forged,
            "-H",
            "connection: x-hop",
            "-H",
            "x-hop: must-not-cross",
            "-H",
            "x-kept: 1",
        ],
    );
    assert_eq!(curl_results(&out)[0].1, "200", "{out}");
    let heads = mesh.apps[0].heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = &heads[0];
    assert!(head.starts_with("GET /who?x=1 HTTP/1.1\r\n"), "{head}");
    let xfcc = header_values(head, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{head}");
    assert!(
        xfcc[0].starts_with(&format!("By={};", spiffe_id(TRUST_DOMAIN, "inventory")))
            && xfcc[0].ends_with(&format!(";URI={}", spiffe_id(TRUST_DOMAIN, "order"))),
        "{xfcc:?}"
    );
    assert!(header_values(head, "x-hop").is_empty(), "{head}");
    assert_eq!(header_values(head, "x-kept"), ["1"], "{head}");
    // The app's Host reaches the app behind the inbound.
    assert_eq!(
        header_values(head, "host"),
        [mesh.order.upstream("inventory").to_string()],
        "{head}"
    );
}

#[test]
fn an_unreachable_endpoint_is_passed_over_and_none_reachable_is_502() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    let dead = SocketAddr::from(([127, 0, 0, 1], common::net::free_port()));
    let mesh = Mesh::start("l7out-dead", &["a"], &[dead], "");
    let urls: Vec<String> = (0..4).map(|i| mesh.url(&format!("/up/{i}"))).collect();
    let out = curl(&urls, &["--http1.1"]);
    let codes: Vec<String> = curl_results(&out).into_iter().map(|r| r.1).collect();
    assert_eq!(codes, ["200"; 4], "{out}");
    assert_eq!(served_by(&out), ["a"; 4], "{out}");

    let none = Mesh::start("l7out-none", &[], &[dead], "");
    let out = curl(&[none.url("/down")], &["--http2-prior-knowledge"]);
    assert_eq!(curl_results(&out)[0].1, "502", "{out}");
    assert!(
        out.contains("no endpoint of the upstream is reachable"),
        "{out}"
    );
    assert_eq!(none.outbound_requests("502"), 1.0);
}

#[test]
fn a_response_slower_than_request_timeout_is_answered_504() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    let mesh = Mesh::start("l7out-504", &["a"], &[], "request_timeout = \"1s\"");
    let out = curl(&[mesh.url("/stall"), mesh.url("/fine")], &["--http1.1"]);
    let codes: Vec<String> = curl_results(&out).into_iter().map(|r| r.1).collect();
    assert_eq!(codes, ["504", "200"], "{out}");
    assert_eq!(mesh.outbound_requests("504"), 1.0);
}

#[test]
fn an_endpoint_that_is_not_the_upstream_service_is_refused_and_gets_no_request() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    // A genuine mesh sidecar, allowing order, but of `billing`, not `inventory`.
    let mesh = Mesh::start_as("billing", "allow", "l7out-impostor", &["a"], &[], "");
    let out = curl(&[mesh.url("/secret")], &["--http1.1"]);
    assert_eq!(curl_results(&out)[0].1, "502", "{out}");
    assert_eq!(mesh.order.handshakes("outbound", "bad_identity"), 1.0);
    assert!(mesh.apps[0].heads().is_empty());
    assert_eq!(mesh.outbound_requests("502"), 1.0);
}

#[test]
fn a_caller_the_upstream_denies_gets_502_and_the_refusal_is_counted() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    let mesh = Mesh::start_as("inventory", "deny", "l7out-denied", &["a"], &[], "");
    let out = curl(&[mesh.url("/stock")], &["--http2-prior-knowledge"]);
    assert_eq!(curl_results(&out)[0].1, "502", "{out}");
    // The inbound's alert arrives after our side of the handshake: counted as what it means.
    assert_eq!(mesh.order.handshakes("outbound", "denied"), 1.0);
    assert_eq!(mesh.order.handshakes("outbound", "ok"), 0.0);
    assert!(mesh.apps[0].heads().is_empty());
}

#[test]
fn a_new_certificate_of_the_caller_is_used_from_the_next_request() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    let mesh = Mesh::start("l7out-renew", &["a"], &[], "");
    let xfcc_hash = |n: usize| {
        let heads = mesh.apps[0].heads();
        let xfcc = header_values(&heads[n], "x-forwarded-client-cert");
        xfcc[0]
            .split(';')
            .find(|p| p.starts_with("Hash="))
            .unwrap()
            .to_owned()
    };
    let out = curl(&[mesh.url("/before"), mesh.url("/before")], &["--http1.1"]);
    assert!(curl_results(&out).iter().all(|r| r.1 == "200"), "{out}");
    assert_eq!(mesh.order.handshakes("outbound", "ok"), 1.0);

    // order's files replaced (key first, then certificate, each renamed into place).
    let renewed = mesh.pki.leaf("order");
    for (file, pem) in [
        (&mesh.order_files.key, &renewed.key_pem),
        (&mesh.order_files.cert, &renewed.chain_pem),
    ] {
        let tmp = file.with_extension("pem.tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, file).unwrap();
    }
    let serial = common::pki::serial_of_der(renewed.leaf_der());
    let loaded = common::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (mesh.order.config_serial().as_deref() == Some(serial.as_str())).then_some(())
    });
    assert!(loaded.is_some(), "order did not load its new certificate");

    // The pooled connection, opened with the old certificate, takes no new request.
    let out = curl(&[mesh.url("/after")], &["--http1.1"]);
    assert_eq!(curl_results(&out)[0].1, "200", "{out}");
    assert_eq!(mesh.order.handshakes("outbound", "ok"), 2.0);
    assert_eq!(xfcc_hash(0), xfcc_hash(1));
    assert_ne!(
        xfcc_hash(1),
        xfcc_hash(2),
        "the new certificate is presented"
    );
}

#[test]
fn grpc_unary_and_server_streaming_cross_the_http_upstream_with_their_trailers() {
    let dir = TempDir::new("l7out-grpc-app");
    let Some(app) = Python::start(&dir, "grpc_server.py", GRPC_SERVER, &[], "grpc") else {
        return;
    };
    // app (h2c) -> order's http upstream -> pooled HTTP/2 mutual TLS -> inventory's http
    // inbound -> h2c to the grpc app.
    let mesh = Mesh::in_front_of("l7out-grpc", app.port_addr(), "");
    let target = mesh.order.upstream("inventory").to_string();
    let out = Python::run(&dir, "grpc_client.py", GRPC_CLIENT, &[&target, "Watch,Get"]);
    let calls: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {out}")))
        .collect();
    assert_eq!(calls.len(), 4, "{out}");
    let trailer = serde_json::json!([["x-stock-trailer", "kept"]]);
    let expected = [
        (
            serde_json::json!(["update-0:item", "update-1:item", "update-2:item"]),
            "OK",
            "",
        ),
        // A non-OK status and its message arrive in the trailers after the streamed messages.
        (
            serde_json::json!(["update-0:missing", "update-1:missing", "update-2:missing"]),
            "NOT_FOUND",
            "no such item",
        ),
        (serde_json::json!(["stock:item"]), "OK", ""),
        // A unary error is a trailers-only response: status, details and trailer in one HEADERS.
        (serde_json::json!([]), "NOT_FOUND", "no such item"),
    ];
    for (call, (messages, code, details)) in calls.iter().zip(expected) {
        assert_eq!(call["messages"], messages, "{out}");
        assert_eq!(call["code"], code, "{out}");
        if !details.is_empty() {
            assert_eq!(call["details"], details, "{out}");
        }
        assert_eq!(call["trailers"], trailer, "{out}");
    }
    assert_eq!(
        mesh.outbound_requests("200"),
        4.0,
        "{}",
        mesh.order.metrics()
    );
    assert_eq!(mesh.inbound_requests("200"), 4.0);
    // All four on the pooled HTTP/2 connection.
    assert_eq!(mesh.order.handshakes("outbound", "ok"), 1.0);
}

#[test]
fn a_websocket_echo_crosses_the_http_upstream() {
    let dir = TempDir::new("l7out-ws-app");
    let Some(app) = Python::start(
        &dir,
        "ws_server.py",
        WS_SERVER,
        &[],
        "websockets.sync.server",
    ) else {
        return;
    };
    let mesh = Mesh::in_front_of("l7out-ws", app.port_addr(), "");
    let target = mesh.order.upstream("inventory").to_string();
    let out = Python::run(&dir, "ws_client.py", WS_CLIENT, &[&target]);
    assert_eq!(out, "hello through two sidecars\nbinary True\n");
    assert_eq!(
        mesh.outbound_requests("101"),
        1.0,
        "{}",
        mesh.order.metrics()
    );
    assert_eq!(mesh.inbound_requests("101"), 1.0);
}

/// An app that switches every request to protocol `x-echo` (answers 101), then echoes the
/// bytes it reads until the client half-closes, then writes `bye` and closes.
fn start_echo_upgrade_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x-echo\r\n\r\n";
                if conn.write_all(answer).is_err() {
                    return;
                }
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) if conn.write_all(&buf[..n]).is_ok() => {}
                        _ => return,
                    }
                }
                let _ = conn.write_all(b"bye");
            });
        }
    });
    addr
}

/// A client connection to `order`'s upstream listener switched to `x-echo` (see
/// [`start_echo_upgrade_app`]).
fn upgraded_to_echo(mesh: &Mesh) -> TcpStream {
    let mut c = TcpStream::connect(mesh.order.upstream("inventory")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"GET /raw HTTP/1.1\r\nhost: inventory\r\nconnection: upgrade\r\nupgrade: x-echo\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            c.read(&mut byte).unwrap(),
            1,
            "{:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert_eq!(header_values(&head, "upgrade"), ["x-echo"], "{head}");
    c
}

#[test]
fn any_upgrade_is_spliced_through_the_http_upstream_with_half_close_carried() {
    let mesh = Mesh::in_front_of("l7out-upgrade", start_echo_upgrade_app(), "");
    let mut c = upgraded_to_echo(&mesh);
    // Bytes both ways, in several rounds, then our half-close reaches the app, whose last
    // bytes still come back.
    for round in 0..3 {
        let sent = format!("round {round}: {}", "x".repeat(100_000));
        c.write_all(sent.as_bytes()).unwrap();
        let mut got = vec![0u8; sent.len()];
        c.read_exact(&mut got).unwrap();
        assert!(got == sent.as_bytes(), "round {round}");
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    c.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "bye");
    assert_eq!(mesh.outbound_requests("101"), 1.0);
    assert_eq!(mesh.inbound_requests("101"), 1.0);
}

#[test]
fn an_upgrade_the_app_declines_stays_a_plain_exchange() {
    let mesh = Mesh::start("l7out-upgrade-declined", &["a"], &[], "");
    let mut c = TcpStream::connect(mesh.order.upstream("inventory")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The app answers 200 to the handshake: the connection stays HTTP/1.1 for the next request.
    c.write_all(
        b"GET /ws HTTP/1.1\r\nhost: inventory\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\
          GET /next HTTP/1.1\r\nhost: inventory\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert_eq!(served_by(&answer), ["a", "a"], "{answer}");
    let heads = mesh.apps[0].heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    // The handshake reached the app with its upgrade headers, and only those hop-by-hop ones.
    assert!(heads[0].starts_with("GET /ws HTTP/1.1\r\n"), "{heads:?}");
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
    assert_eq!(mesh.outbound_requests("200"), 2.0);
}

#[test]
fn an_upgraded_connection_through_the_http_upstream_is_closed_at_the_drain_deadline() {
    let limits = "drain_timeout = \"1s\"";
    let mut mesh = Mesh::in_front_of("l7out-upgrade-drain", start_echo_upgrade_app(), limits);
    let mut c = upgraded_to_echo(&mesh);
    c.write_all(b"before").unwrap();
    let mut got = [0u8; 6];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before");
    let ok = Command::new("kill")
        .args(["-TERM", &mesh.order.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM order");
    let exited = common::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        mesh.order.try_wait()
    });
    let exited = exited.unwrap_or_else(|| panic!("order still running after its drain deadline"));
    assert_eq!(exited.code(), Some(0));
    // The open splice kept the drain waiting until its deadline (not cut when it began).
    let log = mesh.order.stderr_text();
    assert!(log.contains("drain_timeout reached"), "{log}");
    // The splice was cut at the deadline: EOF or a reset, not the client's read timeout.
    let mut rest = Vec::new();
    match c.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the upgraded connection was left open: {e}"
        ),
    }
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn an_upgrade_keeps_the_identity_check_and_the_refusals_of_the_pooled_path() {
    let upgrade = |mesh: &Mesh| {
        let mut c = TcpStream::connect(mesh.order.upstream("inventory")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(
            b"GET /ws HTTP/1.1\r\nhost: inventory\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
              connection: close\r\n\r\n",
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    };
    // A genuine mesh sidecar, allowing order, but of `billing`, not `inventory`.
    let impostor = Mesh::start_as("billing", "allow", "l7out-up-impostor", &["a"], &[], "");
    let answer = upgrade(&impostor);
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert_eq!(impostor.order.handshakes("outbound", "bad_identity"), 1.0);
    assert!(impostor.apps[0].heads().is_empty());
    // An upstream whose intention denies order: its alert is counted as what it means.
    let denied = Mesh::start_as("inventory", "deny", "l7out-up-denied", &["a"], &[], "");
    let answer = upgrade(&denied);
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert_eq!(denied.order.handshakes("outbound", "denied"), 1.0);
    assert_eq!(denied.order.handshakes("outbound", "ok"), 0.0);
    assert!(denied.apps[0].heads().is_empty());
    assert_eq!(denied.outbound_requests("502"), 1.0);
}

#[test]
fn a_request_body_slower_than_request_timeout_is_not_cut_with_504() {
    // request_timeout bounds the wait for the response header once the request is sent
    // (Envoy's route timeout starts at the downstream end of stream); an upload that takes
    // longer than it, to an app that answers once it has the whole body, must not be a 504.
    let mesh = Mesh::start("l7out-upload", &["a"], &[], "request_timeout = \"1s\"");
    let mut c = TcpStream::connect(mesh.order.upstream("inventory")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"POST /upload HTTP/1.1\r\nhost: inventory\r\ncontent-length: 10\r\n\r\n12345")
        .unwrap();
    // The rest of the body comes later than request_timeout (a fixed wait is the point here).
    thread::sleep(Duration::from_millis(2500));
    let _ = c.write_all(b"67890");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_request_the_h2_client_refuses_does_not_retire_the_shared_connection() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    let mesh = Mesh::start("l7out-retire", &["a"], &[], "");
    let out = curl(&[mesh.url("/before")], &["--http1.1"]);
    assert_eq!(curl_results(&out)[0].1, "200", "{out}");
    assert_eq!(mesh.order.handshakes("outbound", "ok"), 1.0);
    // A CONNECT with a body: hyper's HTTP/2 client refuses it locally, before any frame is
    // sent, and nothing about the connection to the endpoint is wrong.
    let mut c = TcpStream::connect(mesh.order.upstream("inventory")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(
        b"CONNECT inventory:80 HTTP/1.1\r\nhost: inventory:80\r\ncontent-length: 5\r\n\r\nhello",
    )
    .unwrap();
    let mut answer = [0u8; 512];
    let n = c.read(&mut answer).unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    drop(c);
    let out = curl(&[mesh.url("/after")], &["--http1.1"]);
    assert_eq!(curl_results(&out)[0].1, "200", "{out}");
    assert_eq!(
        mesh.order.handshakes("outbound", "ok"),
        1.0,
        "the pooled connection was retired by one request's local error (CONNECT answered: {answer:?})"
    );
}

#[test]
fn a_request_with_two_hosts_or_userinfo_in_its_authority_is_a_400() {
    // RFC 9112 3.2 (one Host, no userinfo) and RFC 9113 8.3.1: which host is meant must not be
    // ambiguous, so the proxy refuses rather than picking one.
    let mesh = Mesh::start("l7out-host", &["a"], &[], "");
    let bad: [&[u8]; 3] = [
        b"GET /a HTTP/1.1\r\nhost: inventory\r\nhost: other\r\n\r\n",
        b"GET /b HTTP/1.1\r\nhost: user@inventory\r\n\r\n",
        b"GET http://user:pw@inventory/c HTTP/1.1\r\nhost: inventory\r\n\r\n",
    ];
    for request in bad {
        let mut c = TcpStream::connect(mesh.order.upstream("inventory")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(request).unwrap();
        let mut answer = [0u8; 512];
        let n = c.read(&mut answer).unwrap_or(0);
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{}: {answer}",
            String::from_utf8_lossy(request)
        );
    }
    assert!(mesh.apps[0].heads().is_empty(), "nothing reached the app");
}

#[test]
fn a_request_beyond_the_endpoints_stream_limit_is_not_queued_into_a_504() {
    if !common::tool_available("curl", &["--version"]) {
        return;
    }
    // The http inbound takes 100 concurrent streams per connection. With 100 responses still
    // streaming from a healthy endpoint, one more request must get a stream (a second
    // connection, as the tcp path's tunnel pool opens when one is full), not wait for one
    // until request_timeout.
    let mesh = Mesh::start("l7out-streams", &["a"], &[], "request_timeout = \"2s\"");
    let addr = mesh.order.upstream("inventory");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut responses = Vec::new();
        for _ in 0..100 {
            let mut send = send.clone().ready().await.unwrap();
            let req = http::Request::get(format!("http://{addr}/hold"))
                .body(())
                .unwrap();
            responses.push(send.send_request(req, true).unwrap().0);
        }
        let mut held = Vec::new();
        for r in responses {
            let r = tokio::time::timeout(Duration::from_secs(20), r)
                .await
                .expect("a response header within 20 s")
                .unwrap();
            assert_eq!(r.status(), 200);
            held.push(r);
        }
        (send, held)
    });
    let out = curl(&[mesh.url("/fine")], &["--http1.1"]);
    *HOLDS_RELEASED.0.lock().unwrap() = true;
    HOLDS_RELEASED.1.notify_all();
    drop(held);
    assert_eq!(curl_results(&out)[0].1, "200", "{out}");
}
