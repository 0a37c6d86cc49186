//! Issue 2, "Must show": replacing the `[tls]` files under a running proxy. An open
//! connection keeps working; new handshakes present the new certificate (compared by serial);
//! a garbage file is refused and the last good certificate stays in use.

use ward_test_support as common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::pki::Identity;
use common::tls::{probe, tls_connect, TlsClient};
use common::{wait_until, Inventory};

/// Writes `content` to a temp name beside `target`, then renames it over `target`
/// (as Vault Agent and cert-manager do).
fn atomic_replace(target: &Path, content: &str) {
    let tmp = target.with_extension("pem.tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, target).unwrap();
}

/// Key first, then certificate: between the two renames they do not match.
fn rotate(inv: &Inventory, new: &Identity) {
    atomic_replace(&inv.files.key, &new.key_pem);
    atomic_replace(&inv.files.cert, &new.chain_pem);
}

fn assert_still_works(conn: &mut TlsClient, what: &str) {
    let msg = format!("long-lived connection still works: {what}\n");
    let got = conn
        .echo(msg.as_bytes())
        .unwrap_or_else(|f| panic!("the established connection broke ({what}): {f:?}"));
    assert_eq!(got, msg.as_bytes());
}

/// Deadline-waits until a fresh handshake presents `serial`.
fn wait_for_serial(inv: &Inventory, order: &Identity, serial: &str, what: &str) {
    let check = inv.server_check();
    let mut last = None;
    let seen = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let p = probe(inv.proxy.inbound(), Some(order), &check);
        last = Some((p.result.clone(), p.server_serial.clone()));
        (p.result.is_ok() && p.server_serial.as_deref() == Some(serial)).then_some(())
    });
    assert!(
        seen.is_some(),
        "{what}: no new handshake presented serial {serial} within 10 s; last probe: {last:?}"
    );
}

#[test]
fn certificate_files_replaced_under_a_running_proxy() {
    let inv = Inventory::start("reload");
    let order = inv.pki.leaf("order");
    let check = inv.server_check();
    let old_serial = inv.identity.serial.clone();

    // A long-lived connection, established on the first certificate.
    let mut conn = tls_connect(inv.proxy.inbound(), Some(&order), &check)
        .expect("handshake with the first certificate");
    assert_still_works(&mut conn, "before any reload");
    assert_eq!(conn.server_serial().as_deref(), Some(old_serial.as_str()));
    assert_eq!(
        inv.proxy.config_serial().as_deref(),
        Some(old_serial.as_str()),
        "/config certificate.serial before reload"
    );

    // 1. Key renamed first: for a while the key does not match the certificate. The proxy keeps
    //    the old pair; watch for longer than its reload interval (~2 s).
    let second = inv.pki.leaf("inventory");
    atomic_replace(&inv.files.key, &second.key_pem);
    let window = Instant::now() + Duration::from_millis(2500);
    let mut rounds = 0;
    while Instant::now() < window && rounds < 50 {
        rounds += 1;
        let p = probe(inv.proxy.inbound(), Some(&order), &check);
        assert!(
            p.result.is_ok() && p.server_serial.as_deref() == Some(old_serial.as_str()),
            "with a new key and the old certificate on disk, handshakes must keep using the old \
             pair (round {rounds}): {:?}, serial {:?}",
            p.result,
            p.server_serial
        );
        // rounds through a window in which nothing may change, not waiting for a condition
        std::thread::sleep(Duration::from_millis(100));
    }
    atomic_replace(&inv.files.cert, &second.chain_pem);
    wait_for_serial(
        &inv,
        &order,
        &second.serial,
        "after replacing key then certificate",
    );
    assert_still_works(&mut conn, "after the first rotation");
    let cfg_serial = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        inv.proxy.config_serial().filter(|s| *s == second.serial)
    });
    assert!(
        cfg_serial.is_some(),
        "/config certificate.serial should be {} after reload, is {:?}",
        second.serial,
        inv.proxy.config_serial()
    );
    assert_ne!(second.serial, old_serial);

    // 2. A garbage certificate file: refused with a log line, the last good pair stays.
    let lines_before = inv.proxy.stderr_len();
    atomic_replace(
        &inv.files.cert,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let cert_name = inv
        .files
        .cert
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let logged = inv
        .proxy
        .wait_for_stderr(lines_before, Duration::from_secs(10), |l| {
            l.contains(&cert_name) || l.contains("cert_file")
        });
    assert!(
        logged.is_some(),
        "no log line naming {cert_name} (or tls.cert_file) within 10 s of writing a garbage file; \
         stderr since:\n{}",
        inv.proxy.stderr_lines()[lines_before..].join("\n")
    );
    // Past the reload interval, new handshakes still present the last good certificate.
    let window = Instant::now() + Duration::from_millis(2500);
    let mut rounds = 0;
    while Instant::now() < window && rounds < 50 {
        rounds += 1;
        let p = probe(inv.proxy.inbound(), Some(&order), &check);
        assert!(
            p.result.is_ok() && p.server_serial.as_deref() == Some(second.serial.as_str()),
            "after a garbage certificate file, handshakes must keep the last good certificate \
             (round {rounds}): {:?}, serial {:?}",
            p.result,
            p.server_serial
        );
        // rounds through a window in which nothing may change, not waiting for a condition
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        inv.proxy.config_serial().as_deref(),
        Some(second.serial.as_str()),
        "/config keeps the last good certificate"
    );
    assert_still_works(&mut conn, "after the garbage file");

    // 3. A good pair again: reloading still works after a refused file.
    let third = inv.pki.leaf("inventory");
    rotate(&inv, &third);
    wait_for_serial(
        &inv,
        &order,
        &third.serial,
        "after a good pair follows the garbage",
    );
    assert_still_works(&mut conn, "after the second rotation");
}
