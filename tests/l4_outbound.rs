//! Issue 2, "Must show": the outbound refuses an upstream that presents a valid mesh
//! certificate of a different service (impersonation).
//!
//! `payments`' proxy (allowing `order`) serves an echo app. `order`'s proxy has two upstreams
//! pointing at that same endpoint: `payments` (right identity: works) and `inventory` (the
//! endpoint says payments: must be refused, counted as `bad_identity`).
//!
//! Also: an endpoint that failed lately is tried anyway when it is the only one, and a caller
//! that the inbound refuses counts and logs the refusal on its own side.

use ward_test_support as common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use common::cp::echo_once;
use common::net::{metric_sum, EchoApp};
use common::pki::{Identity, Pki, TRUST_DOMAIN};
use common::proc::{ProxyConfig, TempDir, WardProcess};
use common::tls::provider;
use common::{wait_until, write_tls_files, Inventory};
use rustls::pki_types::{CertificateDer, UnixTime};

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn outbound_refuses_a_valid_mesh_certificate_of_another_service() {
    let dir = TempDir::new("outbound");
    let pki = Pki::new(TRUST_DOMAIN);

    let payments_app = EchoApp::start();
    let payments_files = write_tls_files(&dir, "payments", &pki, &pki.leaf("payments"));
    let payments_cfg = dir.join("payments.toml");
    ProxyConfig::new(
        "payments",
        &payments_files.cert,
        &payments_files.key,
        &payments_files.ca,
    )
    .inbound("127.0.0.1:0", payments_app.addr)
    .rule("order", "allow")
    .write(&payments_cfg);
    let payments = WardProcess::start("payments", &payments_cfg, &["inbound"]);

    let order_files = write_tls_files(&dir, "order", &pki, &pki.leaf("order"));
    let order_cfg = dir.join("order.toml");
    ProxyConfig::new(
        "order",
        &order_files.cert,
        &order_files.key,
        &order_files.ca,
    )
    .upstream("inventory", &[payments.inbound()])
    .upstream("payments", &[payments.inbound()])
    .write(&order_cfg);
    let order = WardProcess::start(
        "order",
        &order_cfg,
        &["upstream.inventory", "upstream.payments"],
    );

    // 1. Impersonation: "inventory" answered by a valid payments certificate.
    let bad_before = order.handshakes("outbound", "bad_identity");
    let total_before = order.handshakes_total("outbound");
    let mut s = TcpStream::connect_timeout(&order.upstream("inventory"), Duration::from_secs(5))
        .expect("connect order's upstream listener for inventory");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The app may write first; nothing it sends may be answered.
    let _ = s.write_all(b"GET /stock HTTP/1.0\r\n\r\n");
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "order's app got {n} bytes from an impersonating upstream: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("order's proxy did not close the app's connection within 10 s")
        }
        Err(_) => {} // reset: closed without data
    }
    drop(s);
    let bad_after = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let v = order.handshakes("outbound", "bad_identity");
        (v >= bad_before + 1.0).then_some(v)
    })
    .unwrap_or_else(|| order.handshakes("outbound", "bad_identity"));
    assert_eq!(
        bad_after,
        bad_before + 1.0,
        "ward_tls_handshakes_total{{direction=\"outbound\",result=\"bad_identity\"}} must go up by one"
    );
    assert_eq!(
        order.handshakes_total("outbound"),
        total_before + 1.0,
        "exactly one outbound series moved"
    );
    assert_eq!(
        payments_app.accepted(),
        0,
        "nothing reached the app behind the impersonating endpoint"
    );

    // 2. Positive control: the same endpoint, expected as payments, works.
    let ok_before = order.handshakes("outbound", "ok");
    let mut s = TcpStream::connect_timeout(&order.upstream("payments"), Duration::from_secs(5))
        .expect("connect order's upstream listener for payments");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg = b"hello payments\n";
    s.write_all(msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read echo from payments");
    assert_eq!(got, msg, "echo through the right upstream");
    let ok_after = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let v = order.handshakes("outbound", "ok");
        (v >= ok_before + 1.0).then_some(v)
    })
    .unwrap_or_else(|| order.handshakes("outbound", "ok"));
    assert_eq!(ok_after, ok_before + 1.0, "outbound ok went up by one");
    assert_eq!(payments_app.accepted(), 1);
}

/// A TLS 1.3 server config with `id`'s certificate, no client certificate asked.
fn server_config(id: &Identity) -> Arc<rustls::ServerConfig> {
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(id.chain_der.clone(), id.key_der())
            .unwrap(),
    )
}

/// Reads until the far side closes; what arrived.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the connection was not closed within {TIMEOUT:?}")
            }
            Err(_) => return got, // reset: closed
        }
    }
}

/// An upstream with one endpoint: the first connection meets an impostor there (a valid mesh
/// certificate of another service), then the genuine inbound takes over the port. The next
/// connection works at once: an endpoint that failed lately is skipped only while another is
/// left to try.
#[test]
fn after_an_impostor_the_genuine_inbound_on_the_same_port_is_used_at_once() {
    let dir = TempDir::new("outbound-takeover");
    let pki = Pki::new(TRUST_DOMAIN);

    // The impostor accepts one connection and frees the port, then answers that handshake only
    // once the genuine inbound listens there, so its refusal is fresh when the next comes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap();
    let (accepted_tx, accepted_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let impostor_config = server_config(&pki.leaf("payments"));
    let impostor = thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        drop(listener);
        accepted_tx.send(()).unwrap();
        go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut tls = rustls::ServerConnection::new(impostor_config).unwrap();
        // Ends with the caller's alert when it refuses the certificate.
        while tls.is_handshaking() && tls.complete_io(&mut tcp).is_ok() {}
    });

    let order_files = write_tls_files(&dir, "order", &pki, &pki.leaf("order"));
    let order_cfg = dir.join("order.toml");
    let mut order_config = ProxyConfig::new(
        "order",
        &order_files.cert,
        &order_files.key,
        &order_files.ca,
    )
    .upstream("inventory", &[endpoint]);
    // Room for the genuine inbound to start while the impostor holds the handshake.
    order_config.handshake_timeout = Some("30s".to_string());
    order_config.write(&order_cfg);
    let order = WardProcess::start("order", &order_cfg, &["upstream.inventory"]);
    let up = order.upstream("inventory");
    let bad_before = order.handshakes("outbound", "bad_identity");

    let first = thread::spawn(move || {
        let mut s = TcpStream::connect_timeout(&up, TIMEOUT).expect("connect order's upstream");
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let _ = s.write_all(b"to the impostor\n");
        read_to_close(&mut s)
    });
    accepted_rx
        .recv_timeout(TIMEOUT)
        .expect("order's outbound reached the impostor");

    let app = EchoApp::start();
    let inventory_files = write_tls_files(&dir, "inventory", &pki, &pki.leaf("inventory"));
    let inventory_cfg = dir.join("inventory.toml");
    ProxyConfig::new(
        "inventory",
        &inventory_files.cert,
        &inventory_files.key,
        &inventory_files.ca,
    )
    .inbound(&endpoint.to_string(), app.addr)
    .rule("order", "allow")
    .write(&inventory_cfg);
    let inventory = WardProcess::start("inventory", &inventory_cfg, &["inbound"]);
    assert_eq!(
        inventory.inbound(),
        endpoint,
        "the genuine inbound took the port"
    );

    go_tx.send(()).unwrap();
    let got = first.join().unwrap();
    assert!(
        got.is_empty(),
        "the impostor's answer reached order's app: {got:?}"
    );
    impostor.join().unwrap();

    // The next connection, right after the refusal, reaches the genuine inbound.
    let lines_before = order.stderr_len();
    echo_once(up, b"to the genuine inbound\n", TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "the connection right after the impostor's refusal failed: {e}\norder's stderr:\n{}",
            order.stderr_text()
        )
    });
    assert_eq!(app.accepted(), 1);
    assert_eq!(
        order.handshakes("outbound", "bad_identity"),
        bad_before + 1.0,
        "the impostor was refused as bad_identity"
    );
    let unreachable = order
        .stderr_lines()
        .iter()
        .skip(lines_before)
        .any(|l| l.contains("no endpoint of the upstream is reachable"));
    assert!(!unreachable, "order logged the upstream as unreachable");
}

/// `service`'s proxy with `inventory` as its upstream at `endpoint`, with `inv`'s mesh.
fn caller(inv: &Inventory, service: &str, endpoint: std::net::SocketAddr) -> WardProcess {
    let files = write_tls_files(&inv.dir, service, &inv.pki, &inv.pki.leaf(service));
    let cfg = inv.dir.join(&format!("{service}.toml"));
    ProxyConfig::new(service, &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[endpoint])
        .write(&cfg);
    WardProcess::start(service, &cfg, &["upstream.inventory"])
}

fn outbound_sum(p: &WardProcess, name: &str, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("direction", "outbound")];
    labels.extend_from_slice(extra);
    metric_sum(&p.metrics(), name, &labels)
}

/// One connection through `caller`'s upstream `inventory` at `endpoint`, which refuses it with
/// access_denied: the app gets nothing, the caller counts `denied` (not `ok`) and logs one
/// WARN line naming the upstream, the endpoint and the alert.
fn refusal_is_seen_by_the_caller(caller: &WardProcess, endpoint: std::net::SocketAddr) {
    let denied_before = caller.handshakes("outbound", "denied");
    let ok_before = caller.handshakes("outbound", "ok");
    let total_before = caller.handshakes_total("outbound");
    let lines_before = caller.stderr_len();

    let mut s = TcpStream::connect_timeout(&caller.upstream("inventory"), TIMEOUT)
        .expect("connect the caller's upstream listener");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let got = read_to_close(&mut s);
    assert!(
        got.is_empty(),
        "the app got {got:?} from a refusing inbound"
    );

    let denied = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let v = caller.handshakes("outbound", "denied");
        (v >= denied_before + 1.0).then_some(v)
    })
    .unwrap_or_else(|| caller.handshakes("outbound", "denied"));
    let metrics = caller.metrics();
    assert_eq!(
        denied,
        denied_before + 1.0,
        "ward_tls_handshakes_total{{direction=\"outbound\",result=\"denied\"}} must go up by one\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("ward_tls_handshakes_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        caller.handshakes("outbound", "ok"),
        ok_before,
        "a refused handshake is not ok"
    );
    assert_eq!(
        caller.handshakes_total("outbound"),
        total_before + 1.0,
        "exactly one outbound series moved"
    );

    let is_refusal_line = |l: &str| {
        l.contains("WARN")
            && l.contains("upstream=inventory")
            && l.contains(&format!("endpoint={endpoint}"))
            && l.contains("alert=access_denied")
    };
    let line = caller.wait_for_stderr(lines_before, Duration::from_secs(5), is_refusal_line);
    assert!(
        line.is_some(),
        "no WARN line names upstream, endpoint and alert:\n{}",
        caller.stderr_text()
    );
    let lines = caller.stderr_lines();
    let logged = lines
        .iter()
        .skip(lines_before)
        .map(|l| common::proc::strip_ansi(l))
        .filter(|l| is_refusal_line(l))
        .count();
    assert_eq!(logged, 1, "the refusal is logged once");
}

/// The inbound denies the caller (no intention) on a `ward-mux/1` tunnel: in TLS 1.3 the alert
/// comes after the caller's Finished, so the caller waits for the tunnel's first frame before
/// it counts the handshake, and opens no connection or tunnel stream for a refused one.
#[test]
fn a_caller_the_inbound_denies_counts_and_logs_the_refusal_on_a_tunnel() {
    let inv = Inventory::start("outbound-denied-tunnel");
    let rogue = caller(&inv, "rogue", inv.proxy.inbound());
    refusal_is_seen_by_the_caller(&rogue, inv.proxy.inbound());
    assert_eq!(
        outbound_sum(&rogue, "ward_mux_streams_total", &[("result", "ok")]),
        0.0,
        "no tunnel stream opened"
    );
    assert_eq!(
        outbound_sum(&rogue, "ward_connections_opened_total", &[]),
        0.0,
        "no connection opened"
    );
    assert_eq!(inv.app.accepted(), 0);
    assert_eq!(inv.proxy.handshakes("inbound", "denied"), 1.0);
}

/// Refuses every client certificate as an intention deny does (access_denied).
#[derive(Debug)]
struct DenyEveryone;

impl rustls::server::danger::ClientCertVerifier for DenyEveryone {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }
    ward_proxy::tls13_signatures!();
}

/// The same on a plain connection: a TLS inbound that is not ward (it selects no ALPN) and
/// refuses the caller's certificate. The caller counts at the server's first record or alert.
#[test]
fn a_caller_the_inbound_denies_counts_and_logs_the_refusal_on_a_plain_connection() {
    let inv = Inventory::start("outbound-denied-plain");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap();
    let id = inv.pki.leaf("inventory");
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(Arc::new(DenyEveryone))
            .with_single_cert(id.chain_der.clone(), id.key_der())
            .unwrap(),
    );
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { continue };
            let config = config.clone();
            thread::spawn(move || {
                tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut tls = rustls::ServerConnection::new(config).unwrap();
                // Ends after sending access_denied for the caller's certificate.
                while tls.is_handshaking() && tls.complete_io(&mut tcp).is_ok() {}
            });
        }
    });
    let order = caller(&inv, "order", endpoint);
    refusal_is_seen_by_the_caller(&order, endpoint);
}
