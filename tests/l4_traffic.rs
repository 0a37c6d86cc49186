//! Issue 2, "Must show": `order` reaches `inventory`'s app through its upstream listener and
//! inventory's inbound; 16 MiB echo byte-exact; half-close; the bytes between the sidecars are
//! ciphertext (a marker the apps exchange never shows on the wire).

use ward_test_support as common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::net::{contains_bytes, pseudo_random, Relay};
use common::proc::{ProxyConfig, WardProcess};
use common::{write_tls_files, Inventory};

/// `order`'s proxy with one upstream `inventory` whose endpoint is `endpoint`.
fn start_order(inv: &Inventory, endpoint: SocketAddr) -> WardProcess {
    let order = inv.pki.leaf("order");
    let files = write_tls_files(&inv.dir, "order", &inv.pki, &order);
    let config = inv.dir.join("order.toml");
    ProxyConfig::new("order", &files.cert, &files.key, &files.ca)
        .upstream("inventory", &[endpoint])
        .write(&config);
    WardProcess::start("order", &config, &["upstream.inventory"])
}

/// Reads until EOF (or error / the deadline); returns the bytes and the error, if any.
fn read_to_eof(mut s: TcpStream, limit: usize, timeout: Duration) -> (Vec<u8>, Option<String>) {
    let deadline = Instant::now() + timeout;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if Instant::now() > deadline {
            return (got, Some("deadline passed before EOF".into()));
        }
        match s.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > limit {
                    return (got, Some("more bytes than were sent".into()));
                }
            }
            Err(e) => return (got, Some(format!("read error: {e}"))),
        }
    }
}

#[test]
fn sixteen_mib_echoed_byte_exact_through_both_sidecars() {
    let inv = Inventory::start("traffic-16m");
    let order = start_order(&inv, inv.proxy.inbound());

    const LEN: usize = 16 << 20;
    let data = Arc::new(pseudo_random(LEN, 0x5eed_2024));
    let client = TcpStream::connect_timeout(&order.upstream("inventory"), Duration::from_secs(5))
        .expect("connect order's upstream listener");
    client
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let reader = {
        let s = client.try_clone().unwrap();
        thread::spawn(move || read_to_eof(s, LEN, Duration::from_secs(25)))
    };
    let mut w = client;
    for chunk in data.chunks(64 * 1024) {
        w.write_all(chunk)
            .expect("write to order's upstream listener");
    }
    w.flush().unwrap();
    // Half-close: we are done sending, but the rest of the echo must still come back.
    w.shutdown(Shutdown::Write).expect("shutdown write half");
    let (got, err) = reader.join().unwrap();

    assert_eq!(
        err,
        None,
        "reading the echo: got {} of {} bytes",
        got.len(),
        LEN
    );
    assert_eq!(got.len(), LEN, "echo length");
    if let Some(i) = got.iter().zip(data.iter()).position(|(a, b)| a != b) {
        panic!("echo differs from what was sent at byte offset {i}");
    }
    assert_eq!(inv.app.accepted(), 1, "the app accepted one connection");
}

#[test]
fn reply_arrives_after_the_client_shuts_down_its_write_half() {
    let inv = Inventory::start("traffic-halfclose");
    let order = start_order(&inv, inv.proxy.inbound());

    let msg = b"half-close: the whole reply must still arrive after our FIN\n".repeat(100);
    let mut s = TcpStream::connect_timeout(&order.upstream("inventory"), Duration::from_secs(5))
        .expect("connect order's upstream listener");
    s.write_all(&msg).unwrap();
    // Nothing read yet: the reply is all still in flight when we send FIN.
    s.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_to_eof(s, msg.len(), Duration::from_secs(15));
    assert_eq!(err, None, "got {} of {} bytes", got.len(), msg.len());
    assert_eq!(got, msg, "reply after half-close");
    assert_eq!(inv.app.accepted(), 1);
}

#[test]
fn marker_exchanged_in_clear_never_appears_between_the_sidecars() {
    let inv = Inventory::start("traffic-marker");
    // order -> relay (records every byte both ways) -> inventory's inbound
    let relay = Relay::start(inv.proxy.inbound());
    let order = start_order(&inv, relay.addr);

    let marker: &[u8] = b"WARD-CLEARTEXT-MARKER-5b1f0e93";
    let mut msg = Vec::new();
    for i in 0..64 {
        msg.extend_from_slice(format!("line {i}: ").as_bytes());
        msg.extend_from_slice(marker);
        msg.push(b'\n');
    }
    let mut s = TcpStream::connect_timeout(&order.upstream("inventory"), Duration::from_secs(5))
        .expect("connect order's upstream listener");
    s.write_all(&msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_to_eof(s, msg.len(), Duration::from_secs(15));
    assert_eq!(err, None);
    assert_eq!(got, msg, "the echo came back through the mesh");

    // The apps did see the marker in clear...
    assert!(
        contains_bytes(&inv.app.received(), marker),
        "the app behind inventory received the marker"
    );
    // ...and the wire between the sidecars carried data both ways, as TLS, never the marker.
    assert!(relay.connections() >= 1, "traffic went through the relay");
    let up = relay.sent_to_target();
    let down = relay.received_from_target();
    assert!(
        up.len() > msg.len() && down.len() > msg.len(),
        "relay saw {} bytes up and {} down for a {}-byte exchange",
        up.len(),
        down.len(),
        msg.len()
    );
    assert_eq!(
        up[0], 0x16,
        "first byte on the wire is a TLS handshake record"
    );
    assert!(
        !contains_bytes(&up, marker),
        "marker visible in clear from order's sidecar to inventory's"
    );
    assert!(
        !contains_bytes(&down, marker),
        "marker visible in clear from inventory's sidecar to order's"
    );
    assert!(
        !contains_bytes(&up, b"line 1: "),
        "application bytes visible in clear"
    );
}
