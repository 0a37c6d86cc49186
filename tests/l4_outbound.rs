//! Issue 2, "Must show": the outbound refuses an upstream that presents a valid mesh
//! certificate of a different service (impersonation).
//!
//! `payments`' proxy (allowing `order`) serves an echo app. `order`'s proxy has two upstreams
//! pointing at that same endpoint: `payments` (right identity: works) and `inventory` (the
//! endpoint says payments: must be refused, counted as `bad_identity`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::net::EchoApp;
use common::pki::{Pki, TRUST_DOMAIN};
use common::proc::{ProxyConfig, TempDir, WardProcess};
use common::{wait_until, write_tls_files};

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
