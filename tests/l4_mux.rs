//! Issue 7 / security rule 9 (a multiplexed tunnel between sidecars, docs/security.md):
//! `ward-mux/1`, the tunnel between two ward sidecars.
//!
//! - ward -> ward: many TCP connections (sequential and concurrent) ride one mutual-TLS
//!   connection, each one forwarded byte-exact to its own app connection;
//! - a TLS client that does not offer `ward-mux/1` (say it offers h2 and http/1.1) gets plain
//!   L4 on the same port: the tunnel is chosen by ALPN only;
//! - on a tunnel, a stream that is not a CONNECT to the inbound's own service is refused and
//!   nothing is connected to the app;
//! - a caller that intentions deny gets no tunnel either: refused in the handshake;
//! - beyond 100 concurrent streams the pool opens a second tunnel connection;
//! - against a TLS inbound that does not select `ward-mux/1`, each connection gets its own;
//! - a draining inbound (SIGTERM) lets open streams finish and carries no new one;
//! - new roots on the inbound: GOAWAY on its tunnels; the open stream keeps working and new
//!   connections ride a new tunnel (a second handshake), none failing;
//! - a peer that resets more than 256 streams before their answer loses its tunnel
//!   (ENHANCE_YOUR_CALM), 200 are tolerated;
//! - a tunnel whose peer stops answering (no reset, no FIN) is closed after an unanswered PING
//!   by each side, and so are its streams;
//! - a tunnel admits no stream once its peer's chain has expired, the intermediate's end
//!   counting as the leaf's does; a certificate the peer sends that is not on its verified
//!   path (a second intermediate that ends sooner) ends neither its streams nor a pooled
//!   tunnel.
//!
//! An intention turning to deny closes open tunnel streams and refuses new ones within 1 s:
//! tests/control_plane.rs (`allow_to_deny_...`), whose order -> inventory path is a tunnel.

use ward_test_support as common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cp::echo_once;
use common::net::{contains_bytes as contains, metric_sum, pseudo_random, Relay};
use common::pki::{Identity, Pki};
use common::proc::{ProxyConfig, WardProcess};
use common::tls::{provider, AcceptAny};
use common::{wait_until, write_tls_files, Inventory};

const ALPN: &[u8] = b"ward-mux/1";
const TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

fn client_config(id: &Identity, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
        .with_client_auth_cert(id.chain_der.clone(), id.key_der())
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

fn mux_streams(p: &WardProcess, direction: &str, result: &str) -> f64 {
    metric_sum(
        &p.metrics(),
        "ward_mux_streams_total",
        &[("direction", direction), ("result", result)],
    )
}

fn opened(p: &WardProcess, direction: &str) -> f64 {
    metric_sum(
        &p.metrics(),
        "ward_connections_opened_total",
        &[("direction", direction)],
    )
}

/// Writes `msg` on `s` and reads back as many bytes (the echo app's answer).
fn echo_on(s: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

/// `order`'s proxy with `inventory` as its upstream, started with `extra` arguments.
fn order_proxy(inv: &Inventory, extra: &[&str]) -> WardProcess {
    let files = write_tls_files(&inv.dir, "order", &inv.pki, &inv.pki.leaf("order"));
    let cfg = inv.dir.join("order.toml");
    ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[inv.proxy.inbound()])
        .write(&cfg);
    let p = WardProcess::spawn_with_args("order", &cfg, &["upstream.inventory"], extra);
    assert!(p.wait_ready(TIMEOUT), "order's proxy became ready");
    p
}

#[test]
fn many_connections_share_one_tunnel_and_each_is_forwarded_byte_exact() {
    let inv = Inventory::start("mux-pool");
    // One side on the single-threaded runtime (`--workers 1`), the other on the default one.
    let order = order_proxy(&inv, &["--workers", "1"]);
    let up = order.upstream("inventory");

    for i in 0..30 {
        let msg = format!("sequential {i}\n");
        echo_once(up, msg.as_bytes(), TIMEOUT)
            .unwrap_or_else(|e| panic!("sequential connection {i}: {e}"));
    }
    // 30 at once, each with its own 256 KiB payload, written and read back concurrently.
    let workers: Vec<_> = (0..30u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pseudo_random(256 * 1024, i + 1);
                let mut s = std::net::TcpStream::connect_timeout(&up, TIMEOUT).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut w = s.try_clone().unwrap();
                let sent = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                s.read_to_end(&mut back)
                    .unwrap_or_else(|e| panic!("concurrent connection {i}: {e}"));
                writer.join().unwrap();
                assert!(
                    back == data,
                    "connection {i}: echo differs from what was sent"
                );
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a concurrent connection failed");
    }

    assert_eq!(
        order.handshakes("outbound", "ok"),
        1.0,
        "60 connections from order to inventory cost one outbound handshake"
    );
    assert_eq!(order.handshakes_total("outbound"), 1.0);
    assert_eq!(inv.proxy.handshakes("inbound", "ok"), 1.0);
    assert_eq!(mux_streams(&order, "outbound", "ok"), 60.0);
    assert_eq!(mux_streams(&inv.proxy, "inbound", "ok"), 60.0);
    assert_eq!(mux_streams(&inv.proxy, "inbound", "refused"), 0.0);
    assert_eq!(opened(&order, "outbound"), 60.0);
    assert_eq!(opened(&inv.proxy, "inbound"), 60.0);
    assert_eq!(
        inv.app.accepted(),
        60,
        "each stream is its own connection to the app"
    );
}

#[test]
fn a_client_that_does_not_offer_the_tunnel_gets_plain_l4_on_the_same_port() {
    let inv = Inventory::start("mux-alpn");
    let order = inv.pki.leaf("order");
    for (alpn, expect_mux) in [
        (vec![b"h2".as_slice(), b"http/1.1".as_slice()], false),
        (vec![], false),
        (vec![b"h2".as_slice(), ALPN], true),
    ] {
        let tcp = std::net::TcpStream::connect_timeout(&inv.proxy.inbound(), TIMEOUT).unwrap();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        let conn = rustls::ClientConnection::new(
            client_config(&order, &alpn),
            "inventory.ward".try_into().unwrap(),
        )
        .unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .unwrap_or_else(|e| panic!("handshake offering {alpn:?}: {e}"));
        }
        let selected = s.conn.alpn_protocol().map(|p| p.to_vec());
        if expect_mux {
            assert_eq!(selected.as_deref(), Some(ALPN), "offered {alpn:?}");
            // Raw bytes where the tunnel's HTTP/2 preface belongs: the connection is closed
            // and nothing reaches the app.
            let _ = s.write_all(b"plain\n");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            assert!(
                !contains(&buf[..n], b"plain"),
                "raw bytes on a tunnel were echoed: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            continue;
        }
        assert_eq!(selected, None, "offering {alpn:?} selects no protocol");
        s.write_all(b"plain\n").unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("echo offering {alpn:?}: {e}"));
        assert_eq!(&buf, b"plain\n", "plain L4 echo offering {alpn:?}");
    }
    assert_eq!(
        inv.app.accepted(),
        2,
        "the two plain clients reached the app"
    );
}

/// Opens a tunnel to `addr` as `id`, then runs `f` with its h2 client.
fn with_tunnel<F, Fut>(addr: std::net::SocketAddr, id: &Identity, f: F) -> Result<(), String>
where
    F: FnOnce(h2::client::SendRequest<bytes::Bytes>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = client_config(id, &[ALPN]);
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = connector
            .connect("inventory.ward".try_into().unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("h2 preface: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        tokio::time::timeout(TIMEOUT, f(send))
            .await
            .map_err(|_| "the tunnel exchange timed out".to_string())?
    })
}

async fn request_status(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> http::StatusCode {
    let (answer, _body) = send.send_request(req, true).expect("send the request");
    answer.await.expect("an answer").status()
}

#[test]
fn a_stream_that_is_not_a_connect_to_this_service_is_refused_and_connects_nothing() {
    let inv = Inventory::start("mux-target");
    let order = inv.pki.leaf("order");
    with_tunnel(inv.proxy.inbound(), &order, |mut send| async move {
        for (req, want, what) in [
            (
                http::Request::connect("payments.default").body(()).unwrap(),
                http::StatusCode::MISDIRECTED_REQUEST,
                "a CONNECT to another service",
            ),
            (
                http::Request::connect("127.0.0.1:22").body(()).unwrap(),
                http::StatusCode::MISDIRECTED_REQUEST,
                "a CONNECT to an address",
            ),
            (
                http::Request::connect("inventory.other").body(()).unwrap(),
                http::StatusCode::MISDIRECTED_REQUEST,
                "a CONNECT to the service in another namespace",
            ),
            (
                http::Request::get("https://inventory.default/")
                    .body(())
                    .unwrap(),
                http::StatusCode::METHOD_NOT_ALLOWED,
                "a GET",
            ),
        ] {
            let got = request_status(&mut send, req).await;
            assert_eq!(got, want, "{what}");
        }
        // The right target works on the same tunnel, byte-exact both ways.
        let req = http::Request::connect("inventory.default")
            .body(())
            .unwrap();
        let (answer, mut up) = send.send_request(req, false).unwrap();
        let resp = answer.await.expect("an answer to the CONNECT");
        assert_eq!(resp.status(), http::StatusCode::OK);
        up.send_data(bytes::Bytes::from_static(b"through the tunnel\n"), true)
            .unwrap();
        let mut body = resp.into_body();
        let mut back = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("echo data");
            let _ = body.flow_control().release_capacity(chunk.len());
            back.extend_from_slice(&chunk);
        }
        assert_eq!(back, b"through the tunnel\n");
        Ok(())
    })
    .expect("the tunnel");
    assert_eq!(
        inv.app.accepted(),
        1,
        "only the CONNECT to inventory reached the app"
    );
    assert_eq!(mux_streams(&inv.proxy, "inbound", "refused"), 4.0);
    assert_eq!(mux_streams(&inv.proxy, "inbound", "ok"), 1.0);
}

#[test]
fn a_tunnel_admits_no_stream_once_the_peers_intermediate_has_expired() {
    let inv = Inventory::start("mux-chain-end");
    // order's leaf is valid for a day, the intermediate it comes with for 5 s more.
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(5);
    let order = inv.pki.leaf_from_intermediate_until("order", until);
    let admitted = Arc::new(AtomicUsize::new(0));
    let counted = admitted.clone();
    with_tunnel(inv.proxy.inbound(), &order, |mut send| async move {
        let connect = || {
            http::Request::connect("inventory.default")
                .body(())
                .unwrap()
        };
        let before = request_status(&mut send, connect()).await;
        assert_eq!(
            before,
            http::StatusCode::OK,
            "a stream while the chain is valid"
        );
        counted.fetch_add(1, Ordering::SeqCst);
        // A stream every 100 ms on the same tunnel until one is refused: none may be refused
        // before the intermediate's not_after, none admitted once it has passed (its second).
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let status = request_status(&mut send, connect()).await;
            let now = time::OffsetDateTime::now_utc();
            if status == http::StatusCode::OK {
                assert!(
                    now < until + time::Duration::seconds(2),
                    "a stream admitted at {now}, after the intermediate's not_after {until}"
                );
                counted.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            assert_eq!(
                status,
                http::StatusCode::FORBIDDEN,
                "a stream after the intermediate's not_after, on the tunnel opened before it"
            );
            assert!(
                now >= until,
                "a stream refused at {now}, before the intermediate's not_after {until}"
            );
            return Ok(());
        }
    })
    .expect("the tunnel");
    // Each admitted stream connected to the app before its answer; the refused one did not.
    let admitted = admitted.load(Ordering::SeqCst);
    wait_until(TIMEOUT, POLL, || {
        (inv.app.accepted() >= admitted).then_some(())
    });
    assert_eq!(
        inv.app.accepted(),
        admitted,
        "only the streams opened while the chain was valid reached the app"
    );
}

#[test]
fn a_certificate_off_the_peers_verified_path_does_not_end_its_tunnel() {
    let inv = Inventory::start("mux-off-path");
    // order's path (leaf, intermediate) is valid for a day. It also sends a second intermediate
    // of the same name valid for 5 s more, which is not on that path (as a cross-signed
    // certificate of a CA rotation would not be): its end must not end order's streams.
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(5);
    let order = inv
        .pki
        .leaf("order")
        .with_extra(&inv.pki.intermediate_until(until));
    let admitted = Arc::new(AtomicUsize::new(0));
    let counted = admitted.clone();
    with_tunnel(inv.proxy.inbound(), &order, |mut send| async move {
        let connect = || {
            http::Request::connect("inventory.default")
                .body(())
                .unwrap()
        };
        // A stream every 200 ms on the same tunnel until 2 s past the extra certificate's end.
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            let status = request_status(&mut send, connect()).await;
            let now = time::OffsetDateTime::now_utc();
            assert_eq!(
                status,
                http::StatusCode::OK,
                "a stream at {now}, the certificate off the path ended at {until}"
            );
            assert!(
                counted.load(Ordering::SeqCst) > 0 || now < until,
                "the first stream came at {now}, after the extra certificate's end {until}: too slow a start to test anything"
            );
            counted.fetch_add(1, Ordering::SeqCst);
            if now > until + time::Duration::seconds(2) {
                return Ok(());
            }
        }
    })
    .expect("the tunnel");
    let admitted = admitted.load(Ordering::SeqCst);
    wait_until(TIMEOUT, POLL, || {
        (inv.app.accepted() >= admitted).then_some(())
    });
    assert_eq!(inv.app.accepted(), admitted, "every stream reached the app");
}

#[test]
fn a_certificate_off_the_servers_verified_path_does_not_retire_the_pooled_tunnel() {
    // inventory's path is valid for a day; it also sends a second intermediate of the same
    // name, not on that path, valid for 12 s more (time for two proxies to start on a loaded
    // machine).
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(12);
    let inv = Inventory::start_as(
        "mux-off-path-pool",
        |pki| {
            pki.leaf("inventory")
                .with_extra(&pki.intermediate_until(until))
        },
        |c| c,
    );
    let order = order_proxy(&inv, &[]);
    let up = order.upstream("inventory");
    echo_once(up, b"before\n", TIMEOUT).expect("an echo through the tunnel");
    assert!(
        time::OffsetDateTime::now_utc() < until,
        "the first tunnel opened before the extra certificate's end (a slow start voids the test)"
    );
    let past = wait_until(Duration::from_secs(20), POLL, || {
        (time::OffsetDateTime::now_utc() > until + time::Duration::seconds(1)).then_some(())
    });
    assert!(past.is_some());
    echo_once(up, b"after\n", TIMEOUT).expect("an echo after the extra certificate's end");
    assert_eq!(
        order.handshakes_total("outbound"),
        1.0,
        "both connections rode the tunnel opened first: it was not retired"
    );
    assert_eq!(inv.proxy.handshakes_total("inbound"), 1.0);
    assert_eq!(inv.app.accepted(), 2);
}

#[test]
fn a_denied_caller_asking_for_the_tunnel_is_refused_in_the_handshake() {
    let inv = Inventory::start("mux-deny");
    let legacy = inv.pki.leaf("legacy");
    let denied = inv.proxy.handshakes("inbound", "denied");
    let err = with_tunnel(inv.proxy.inbound(), &legacy, |send| async move {
        let req = http::Request::connect("inventory.default")
            .body(())
            .unwrap();
        let mut send = send.ready().await.map_err(|e| e.to_string())?;
        let (answer, _) = send.send_request(req, true).map_err(|e| e.to_string())?;
        answer.await.map_err(|e| e.to_string())?;
        Ok(())
    })
    .err();
    // In TLS 1.3 the client finishes before the server judges its certificate, so the refusal
    // (access_denied, or the broken pipe behind it) shows on the first tunnel exchange.
    let err = err.expect("legacy must not get a tunnel");
    eprintln!("legacy's tunnel attempt failed as it must: {err}");
    let counted = common::wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (inv.proxy.handshakes("inbound", "denied") >= denied + 1.0).then_some(())
    });
    assert!(counted.is_some(), "the refusal is counted as denied");
    assert_eq!(inv.proxy.handshakes("inbound", "denied"), denied + 1.0);
    assert_eq!(inv.app.accepted(), 0);
}

#[test]
fn beyond_100_concurrent_streams_a_second_tunnel_is_opened() {
    let inv = Inventory::start("mux-second");
    let order = order_proxy(&inv, &[]);
    let up = order.upstream("inventory");
    let mut held = Vec::new();
    for i in 0..150 {
        let mut s = std::net::TcpStream::connect_timeout(&up, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let msg = format!("held {i}\n");
        s.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("held connection {i}: {e}"));
        assert_eq!(buf, msg.as_bytes());
        held.push(s);
    }
    assert_eq!(
        order.handshakes("outbound", "ok"),
        2.0,
        "150 open connections need two tunnels of at most 100 streams"
    );
    assert_eq!(inv.app.accepted(), 150);
    drop(held);
}

/// A TLS 1.3 server with `id`'s certificate that selects no ALPN (a TLS terminator that is not
/// ward), echoing each of up to `max` connections; counts the connections it accepted.
fn plain_tls_echo(id: &Identity, max: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(id.chain_der.clone(), id.key_der())
            .unwrap(),
    );
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().take(max) {
            let Ok(tcp) = tcp else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let config = config.clone();
            std::thread::spawn(move || {
                tcp.set_read_timeout(Some(TIMEOUT)).ok();
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[test]
fn an_inbound_that_does_not_select_the_tunnel_gets_a_connection_per_client_connection() {
    let inv = Inventory::start("mux-fallback");
    let (addr, accepted) = plain_tls_echo(&inv.pki.leaf("inventory"), 16);
    let files = write_tls_files(&inv.dir, "order", &inv.pki, &inv.pki.leaf("order"));
    let cfg = inv.dir.join("order-fallback.toml");
    ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[addr])
        .write(&cfg);
    let order = WardProcess::start("order", &cfg, &["upstream.inventory"]);
    let up = order.upstream("inventory");
    for i in 0..3 {
        let msg = format!("fallback {i}\n");
        echo_once(up, msg.as_bytes(), TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} through a non-tunnel inbound: {e}"));
    }
    // Three at once as well: none waits behind another's handshake.
    let workers: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                echo_once(up, format!("at once {i}\n").as_bytes(), TIMEOUT)
                    .unwrap_or_else(|e| panic!("concurrent connection {i}: {e}"))
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
    assert_eq!(order.handshakes("outbound", "ok"), 6.0);
    assert_eq!(mux_streams(&order, "outbound", "ok"), 0.0);
}

#[test]
fn a_draining_inbound_lets_open_streams_finish_and_takes_no_new_ones() {
    let mut inv = Inventory::start("mux-drain");
    let order = order_proxy(&inv, &[]);
    let up = order.upstream("inventory");
    let mut open = std::net::TcpStream::connect_timeout(&up, TIMEOUT).unwrap();
    open.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut echo = |msg: &[u8]| {
        open.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        open.read_exact(&mut buf).map(|_| buf)
    };
    assert_eq!(echo(b"before\n").unwrap(), b"before\n");
    let accepted = inv.app.accepted();

    let ok = std::process::Command::new("kill")
        .args(["-TERM", &inv.proxy.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM inventory's proxy");
    let draining = common::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        (inv.proxy.ready_status() == Some(503)).then_some(())
    });
    assert!(draining.is_some(), "inventory's /ready turns 503");

    // The open stream keeps working through the drain (GOAWAY spares it) ...
    assert_eq!(
        echo(b"during\n").expect("the open stream during the drain"),
        b"during\n"
    );
    // ... and new connections from order are not carried to the draining inbound.
    for i in 0..3 {
        assert!(
            echo_once(up, b"new\n", Duration::from_secs(5)).is_err(),
            "new connection {i} reached the draining inbound's app"
        );
    }
    assert_eq!(inv.app.accepted(), accepted);
    assert!(
        inv.proxy.try_wait().is_none(),
        "inventory waits for its open stream"
    );

    // Once the last stream ends, the tunnel closes and the process exits 0.
    drop(open);
    let status = common::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        inv.proxy.try_wait()
    })
    .unwrap_or_else(|| {
        panic!(
            "inventory still running 10 s after its last stream ended\n{}",
            inv.proxy.stderr_text()
        )
    });
    assert!(status.success(), "drain exit status: {status}");
}

#[test]
fn a_tunnel_whose_peer_stops_answering_is_closed_after_an_unanswered_ping() {
    // Both sides PING every 2 s (the handshake timeout).
    let inv = Inventory::start_with("mux-ping", |mut c| {
        c.handshake_timeout = Some("2s".into());
        c
    });
    // order -> relay -> inventory's inbound; the relay can freeze like a host that vanished.
    let relay = Relay::start(inv.proxy.inbound());
    let files = write_tls_files(&inv.dir, "order", &inv.pki, &inv.pki.leaf("order"));
    let cfg = inv.dir.join("order.toml");
    let mut config = ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[relay.addr]);
    config.handshake_timeout = Some("2s".into());
    config.write(&cfg);
    let order = WardProcess::spawn_with_args("order", &cfg, &["upstream.inventory"], &[]);
    assert!(order.wait_ready(TIMEOUT), "order's proxy became ready");

    let mut s =
        std::net::TcpStream::connect_timeout(&order.upstream("inventory"), TIMEOUT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut echo = |msg: &[u8]| echo_on(&mut s, msg);
    assert_eq!(echo(b"first\n").unwrap(), b"first\n");
    // An observation window, not a wait: PINGs go out and are answered, so two periods and
    // more later the stream still works.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(echo(b"second\n").unwrap(), b"second\n");
    assert_eq!(relay.connections(), 1, "one tunnel carried the stream");
    let inbound_active = || {
        metric_sum(
            &inv.proxy.metrics(),
            "ward_connections_active",
            &[("direction", "inbound")],
        )
    };
    assert_eq!(inbound_active(), 1.0, "the stream's app connection is open");

    relay.freeze();
    let frozen_at = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let r = s.read(&mut buf);
    let waited = frozen_at.elapsed();
    assert!(
        matches!(r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client connection is closed once the tunnel is found dead, got {r:?} after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(12),
        "closed within a PING interval plus a PONG timeout (2 s each) and margin, took {waited:?}"
    );
    assert!(
        order
            .wait_for_stderr(0, TIMEOUT, |l| l.contains("did not answer a PING"))
            .is_some(),
        "the outbound says why it closed the tunnel"
    );
    // The inbound's PINGs go unanswered too: it closes its side and the stream's app connection.
    assert!(
        inv.proxy
            .wait_for_stderr(0, TIMEOUT, |l| l.contains("did not answer a PING"))
            .is_some(),
        "the inbound finds the tunnel dead on its own"
    );
    wait_until(TIMEOUT, POLL, || (inbound_active() == 0.0).then_some(()));
    assert_eq!(
        inbound_active(),
        0.0,
        "the stream's app connection is closed"
    );
}

#[test]
fn new_roots_on_the_inbound_end_the_tunnel_for_new_streams_and_open_ones_finish() {
    let inv = Inventory::start("mux-roots");
    let order = order_proxy(&inv, &[]);
    let up = order.upstream("inventory");
    let mut open = std::net::TcpStream::connect_timeout(&up, TIMEOUT).unwrap();
    open.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut echo = |msg: &[u8]| echo_on(&mut open, msg);
    assert_eq!(echo(b"before\n").unwrap(), b"before\n");
    assert_eq!(order.handshakes("outbound", "ok"), 1.0);

    // The inbound's trust bundle gains a second root (order's root stays in it).
    let reloads =
        |p: &WardProcess| metric_sum(&p.metrics(), "ward_cert_reloads_total", &[("result", "ok")]);
    let before = reloads(&inv.proxy);
    let bundle = format!(
        "{}{}",
        inv.pki.roots_pem(),
        Pki::new("other.test").roots_pem()
    );
    let tmp = inv.files.ca.with_extension("pem.tmp");
    std::fs::write(&tmp, bundle).unwrap();
    std::fs::rename(&tmp, &inv.files.ca).unwrap();
    wait_until(TIMEOUT, POLL, || {
        (reloads(&inv.proxy) > before).then_some(())
    });
    assert!(
        reloads(&inv.proxy) > before,
        "the inbound loaded the new roots"
    );

    // New connections ride a new tunnel, checked against the new roots; none fails.
    let mut i = 0;
    wait_until(TIMEOUT, POLL, || {
        let msg = format!("after {i}\n");
        echo_once(up, msg.as_bytes(), TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {i} after the roots changed: {e}"));
        i += 1;
        (order.handshakes("outbound", "ok") >= 2.0).then_some(())
    });
    assert_eq!(
        order.handshakes("outbound", "ok"),
        2.0,
        "a second tunnel was opened after the GOAWAY"
    );
    assert_eq!(inv.proxy.handshakes("inbound", "ok"), 2.0);
    // The stream opened before the change still works.
    assert_eq!(echo(b"still open\n").unwrap(), b"still open\n");
}

#[test]
fn a_peer_that_resets_too_many_streams_before_their_answer_loses_its_tunnel() {
    // The app's accept queue is full, so every stream waits in its connect to the app: a
    // reset from the peer lands before the answer, which is what the budget counts.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (stuck, _queued) = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..4 {
            let c = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            if let Ok(Ok(c)) = c {
                queued.push(c);
            }
        }
        (addr, (listener, queued))
    });
    let inv = Inventory::start_with("mux-resets", |c| c.inbound("127.0.0.1:0", stuck));

    let (tolerated, closed) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(inv.proxy.inbound())
            .await
            .unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(client_config(&inv.pki.leaf("order"), &[ALPN]));
        let tls = connector
            .connect("inventory.ward".try_into().unwrap(), tcp)
            .await
            .expect("order's handshake");
        let (mut send, conn) = h2::client::handshake(tls).await.expect("h2 preface");
        let conn = tokio::spawn(conn);
        let mut reset_one = async || -> Result<(), h2::Error> {
            let req = http::Request::connect("inventory.default")
                .body(())
                .unwrap();
            send = send.clone().ready().await?;
            let (_answer, mut body) = send.send_request(req, false)?;
            // Long enough for the inbound to accept the stream and start connecting. A fixed
            // pause: nothing outside the inbound shows that it accepted the stream.
            tokio::time::sleep(Duration::from_millis(10)).await;
            body.send_reset(h2::Reason::CANCEL);
            Ok(())
        };
        for i in 0..200 {
            reset_one()
                .await
                .unwrap_or_else(|e| panic!("stream {i} of 200: {e}"));
        }
        // Asserts that nothing happens (the tunnel is not closed): a fixed wait, not a condition.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tolerated = !conn.is_finished();
        let mut sent = 200;
        while sent < 600 && reset_one().await.is_ok() {
            sent += 1;
        }
        let closed = tokio::time::timeout(TIMEOUT, conn).await;
        (tolerated, (sent, closed))
    });
    assert!(tolerated, "200 early resets stay within the budget (256)");
    let (sent, closed) = closed;
    let err = match closed {
        Ok(Ok(Err(e))) => e,
        other => panic!("the tunnel ends with an error after {sent} resets, got {other:?}"),
    };
    assert_eq!(
        err.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "closed with ENHANCE_YOUR_CALM: {err}"
    );
    assert!(
        (257..600).contains(&sent),
        "closed past the budget of 256, after {sent} streams"
    );
    assert!(
        inv.proxy
            .wait_for_stderr(0, TIMEOUT, |l| l
                .contains("too many streams reset before their answer"))
            .is_some(),
        "the inbound says why"
    );
}

/// Security rule 15 (bounds, docs/security.md): what one tunnel may make the inbound buffer is
/// bounded in total, not per stream. 32 CONNECT streams whose data nobody has read yet are granted
/// the inbound's flow-control windows: before the bound, 4 MiB each (128 MiB, and 400 MiB with 100
/// streams); now a share of `[limits] max_tunnel_buffer_bytes` (64 MiB by default) each, the same
/// for every stream (none can use up the others' window). No data is sent, so nothing is released
/// and the granted capacity is exactly what the inbound advertised.
#[test]
fn thirty_two_streams_are_granted_equal_shares_of_the_tunnel_buffer() {
    const STREAMS: usize = 32;
    const DEFAULT_BUFFER: usize = 64 << 20;
    let inv = Inventory::start("mux-buffer");
    let order = inv.pki.leaf("order");
    let config = client_config(&order, &[ALPN]);
    let addr = inv.proxy.inbound();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let granted: Vec<usize> = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect("inventory.ward".try_into().unwrap(), tcp)
            .await
            .expect("the tunnel handshake");
        // Our own send queue must not be what limits the grant.
        let (mut send, conn) = h2::client::Builder::new()
            .max_send_buffer_size(64 << 20)
            .handshake::<_, bytes::Bytes>(tls)
            .await
            .expect("the h2 preface");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            send = send.ready().await.expect("room for a stream");
            let req = http::Request::connect("inventory.default")
                .body(())
                .unwrap();
            let (answer, mut up) = send.send_request(req, false).unwrap();
            up.reserve_capacity(8 << 20);
            streams.push((answer, up));
        }
        for (answer, _) in &mut streams {
            let resp = tokio::time::timeout(TIMEOUT, answer)
                .await
                .expect("an answer within 10 s")
                .expect("an answer");
            assert_eq!(resp.status(), http::StatusCode::OK);
        }
        // Capacity arrives with the inbound's SETTINGS and WINDOW_UPDATE; wait until it stops
        // growing (at most 5 s).
        let grants = |s: &Vec<(_, h2::SendStream<bytes::Bytes>)>| -> Vec<usize> {
            s.iter().map(|(_, up)| up.capacity()).collect()
        };
        let mut last = grants(&streams);
        let mut stable_since = std::time::Instant::now();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && stable_since.elapsed() < Duration::from_millis(500)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = grants(&streams);
            if now != last {
                last = now;
                stable_since = std::time::Instant::now();
            }
        }
        last
    });
    let total: usize = granted.iter().sum();
    let (least, most) = (granted.iter().min(), granted.iter().max());
    eprintln!("{STREAMS} streams were granted {total} bytes in all, {least:?} to {most:?} each");
    assert!(
        total <= DEFAULT_BUFFER,
        "{STREAMS} streams were granted {total} bytes, more than the 64 MiB tunnel buffer"
    );
    assert!(
        least == most && least >= Some(&(64 * 1024)),
        "the streams were granted unequal or tiny windows: {granted:?}"
    );
}
