//! Issue 2, Build 5 / security rule 8 (resumption and early data, docs/security.md): a resumed
//! session is authorized as a full handshake is.
//! A caller that resumed while allowed is refused, with `access_denied`, once an intention
//! denies it; the app sees nothing of it. A session whose verified intermediate has expired
//! since its ticket was issued is refused on resumption and counted as `expired`.

use ward_test_support as common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use common::cp::{intentions_version, start_proxy, CpProxyConfig, DevServer};
use common::net::EchoApp;
use common::pki::Identity;
use common::proc::TempDir;
use common::tls::{provider, AcceptAny};
use common::{wait_until, Inventory};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// One connection with the shared `config`: its handshake kind and the echo's outcome.
fn attempt(
    config: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> (Option<rustls::HandshakeKind>, Result<(), String>) {
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), "inventory.ward".try_into().unwrap())
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let result = (|| {
        s.write_all(b"resume?\n").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        (&buf == b"resume?\n")
            .then_some(())
            .ok_or("wrong echo".to_string())
    })();
    let kind = s.conn.handshake_kind();
    s.conn.send_close_notify();
    let _ = s.flush();
    (kind, result)
}

#[test]
fn a_resumed_caller_is_refused_once_an_intention_denies_it() {
    let dir = TempDir::new("resume");
    let server = DevServer::start("resume-server", &dir.join("server-data"), None);
    let app = EchoApp::start();
    let inv_token = server.token_create("inventory", &[]);
    let inventory = start_proxy(
        &dir,
        "inventory",
        &CpProxyConfig::new(
            "inventory",
            &server,
            &DevServer::token_file(&dir, "inventory", &inv_token),
        )
        .inbound(app.addr),
    );
    // A genuine `order` identity: a proxy keeps its key and certificate in its state_dir.
    let order_token = server.token_create("order", &[]);
    let state = dir.join("order-state");
    let mut order_cfg = CpProxyConfig::new(
        "order",
        &server,
        &DevServer::token_file(&dir, "order", &order_token),
    );
    order_cfg.state_dir = Some(state.clone());
    let _order = start_proxy(&dir, "order", &order_cfg);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(state.join("cert.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(state.join("key.pem")).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
            .with_client_auth_cert(chain, key)
            .unwrap(),
    );

    server.intention_create("order", "inventory", "allow", false);
    let inbound = inventory.inbound();
    let allowed = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        attempt(&config, inbound).1.ok()
    });
    assert!(allowed.is_some(), "order reaches the app once allowed");
    let (kind, result) = attempt(&config, inbound);
    assert_eq!(
        kind,
        Some(rustls::HandshakeKind::Resumed),
        "the next connection resumes"
    );
    assert!(
        result.is_ok(),
        "a resumed allowed session is served: {result:?}"
    );

    let version = intentions_version(&inventory).unwrap();
    server.intention_create("order", "inventory", "deny", true);
    let applied = wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
        (intentions_version(&inventory).is_some_and(|v| v > version)).then_some(())
    });
    assert!(applied.is_some(), "inventory applied the deny");
    let accepted = app.accepted();
    let denied_before = inventory.handshakes("inbound", "denied");

    let (kind, result) = attempt(&config, inbound);
    assert_ne!(
        kind,
        Some(rustls::HandshakeKind::Resumed),
        "no session admitted under the old rules resumes"
    );
    let err = result.expect_err("a denied caller is refused");
    assert!(
        err.to_lowercase().contains("accessdenied"),
        "refused with access_denied: {err}"
    );
    assert_eq!(
        app.accepted(),
        accepted,
        "the app saw nothing of the denied caller"
    );
    // The proxy counts the refusal once its alert is on the wire: wait for the count, then
    // check it is exactly one.
    let denied = || inventory.handshakes("inbound", "denied") - denied_before;
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (denied() >= 1.0).then_some(())
    });
    assert_eq!(denied(), 1.0, "one denied handshake counted");
}

/// A client config that presents `id` and keeps its session tickets.
fn resuming_client(id: &Identity) -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
            .with_client_auth_cert(id.chain_der.clone(), id.key_der())
            .unwrap(),
    )
}

#[test]
fn a_resumption_whose_intermediate_expired_since_the_ticket_is_refused() {
    let inv = Inventory::start("resume-chain-end");
    // order's leaf is valid for a day, the intermediate it comes with for 6 s more.
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(6);
    let order = inv.pki.leaf_from_intermediate_until("order", until);
    let config = resuming_client(&order);
    let inbound = inv.proxy.inbound();

    let (kind, result) = attempt(&config, inbound);
    assert_eq!(kind, Some(rustls::HandshakeKind::Full));
    assert!(
        result.is_ok(),
        "order is served while its chain is valid: {result:?}"
    );
    let (kind, result) = attempt(&config, inbound);
    assert_eq!(
        kind,
        Some(rustls::HandshakeKind::Resumed),
        "the next connection resumes"
    );
    assert!(
        result.is_ok(),
        "a resumed valid session is served: {result:?}"
    );
    assert!(
        time::OffsetDateTime::now_utc() < until,
        "both connections ran before the intermediate's end (a slow start voids the test)"
    );

    let past = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        (time::OffsetDateTime::now_utc() > until + time::Duration::seconds(1)).then_some(())
    });
    assert!(past.is_some());
    let accepted = inv.app.accepted();
    let expired_before = inv.proxy.handshakes("inbound", "expired");
    let (kind, result) = attempt(&config, inbound);
    assert_eq!(
        kind,
        Some(rustls::HandshakeKind::Resumed),
        "the client resumed the session its ticket holds"
    );
    assert!(
        result.is_err(),
        "a resumption after the verified intermediate's end ({until}) is refused"
    );
    assert_eq!(
        inv.app.accepted(),
        accepted,
        "the app saw nothing of the refused resumption"
    );
    let expired = || inv.proxy.handshakes("inbound", "expired") - expired_before;
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (expired() >= 1.0).then_some(())
    });
    assert_eq!(expired(), 1.0, "one expired handshake counted");

    // A full handshake with the same chain is refused too, with certificate_expired.
    let fresh = resuming_client(&order);
    let (kind, result) = attempt(&fresh, inbound);
    assert_ne!(kind, Some(rustls::HandshakeKind::Resumed));
    let err = result.expect_err("an expired chain is refused");
    assert!(
        err.to_lowercase().contains("certificateexpired"),
        "refused with certificate_expired: {err}"
    );
}
