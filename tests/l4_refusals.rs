//! Issue 2, "Must show": each bad caller is refused during the handshake with the fitting
//! alert, the app behind the inbound accepts nothing, and exactly the matching
//! `ward_tls_handshakes_total{direction="inbound",result=..}` series goes up by one.

use ward_test_support as common;

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::tls::{probe, Failure};
use common::{refusal_cases, wait_until, Inventory};

#[test]
fn inbound_refuses_bad_callers_in_the_handshake() {
    let inv = Inventory::start("refusals");
    let check = inv.server_check();
    let mut failures: Vec<String> = Vec::new();
    let mut handshakes_made = 0.0;
    let initial_total = inv.proxy.handshakes_total("inbound");

    for case in refusal_cases(&inv.pki) {
        let before = inv.proxy.handshakes("inbound", case.result);
        let total_before = inv.proxy.handshakes_total("inbound");
        let p = probe(inv.proxy.inbound(), case.identity.as_ref(), &check);
        handshakes_made += 1.0;
        match &p.result {
            Err(Failure::Alert(a)) if *a == case.alert => {}
            other => failures.push(format!(
                "{}: expected alert {:?}, got {:?}",
                case.name, case.alert, other
            )),
        }
        // The proxy may count just after sending the alert: wait for the series to move.
        let after = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            let v = inv.proxy.handshakes("inbound", case.result);
            (v >= before + 1.0).then_some(v)
        })
        .unwrap_or_else(|| inv.proxy.handshakes("inbound", case.result));
        let total_after = inv.proxy.handshakes_total("inbound");
        if after != before + 1.0 {
            failures.push(format!(
                "{}: ward_tls_handshakes_total{{direction=\"inbound\",result=\"{}\"}} went {} -> {} (want +1)",
                case.name, case.result, before, after
            ));
        }
        if total_after != total_before + 1.0 {
            failures.push(format!(
                "{}: inbound handshakes over all results went {} -> {} (want +1)",
                case.name, total_before, total_after
            ));
        }
        if inv.app.accepted() != 0 {
            failures.push(format!(
                "{}: the app behind the inbound accepted {} connection(s)",
                case.name,
                inv.app.accepted()
            ));
        }
    }

    // Positive control: a valid, allowed `order` gets through, counted as ok.
    let order = inv.pki.leaf("order");
    let ok_before = inv.proxy.handshakes("inbound", "ok");
    let p = probe(inv.proxy.inbound(), Some(&order), &check);
    handshakes_made += 1.0;
    if let Err(f) = &p.result {
        failures.push(format!("valid order: expected echo, got {f:?}"));
    }
    if p.server_serial.as_deref() != Some(inv.identity.serial.as_str()) {
        failures.push(format!(
            "valid order: server presented serial {:?}, want inventory's {}",
            p.server_serial, inv.identity.serial
        ));
    }
    let ok_after = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let v = inv.proxy.handshakes("inbound", "ok");
        (v >= ok_before + 1.0).then_some(v)
    })
    .unwrap_or_else(|| inv.proxy.handshakes("inbound", "ok"));
    if ok_after != ok_before + 1.0 {
        failures.push(format!(
            "valid order: result=\"ok\" went {ok_before} -> {ok_after} (want +1)"
        ));
    }
    if inv.app.accepted() != 1 {
        failures.push(format!(
            "after all cases the app accepted {} connection(s), want exactly 1 (the valid order)",
            inv.app.accepted()
        ));
    }
    // Each handshake adds exactly one to exactly one series, late increments included.
    let final_total = inv.proxy.handshakes_total("inbound");
    if final_total - initial_total != handshakes_made {
        failures.push(format!(
            "{handshakes_made} handshakes made, inbound total moved by {}",
            final_total - initial_total
        ));
    }

    assert!(
        failures.is_empty(),
        "{} failure(s):\n  {}\nmetrics:\n{}",
        failures.len(),
        failures.join("\n  "),
        inv.proxy
            .metrics()
            .lines()
            .filter(|l| l.contains("ward_tls_handshakes_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A client that connects and never sends a ClientHello is cut off at `handshake_timeout`
/// (counted from TCP accept) and counted as `result="timeout"`; the app sees nothing.
#[test]
fn silent_client_is_cut_off_at_the_handshake_timeout() {
    let inv = Inventory::start_with("refusals-timeout", |mut c| {
        c.handshake_timeout = Some("1s".to_string());
        c
    });
    let before = inv.proxy.handshakes("inbound", "timeout");
    let total_before = inv.proxy.handshakes_total("inbound");
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&inv.proxy.inbound(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    // Whatever the proxy writes before closing (at most an alert), it must close.
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) if start.elapsed() < Duration::from_secs(10) => continue,
            Ok(_) => break false,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false
            }
            Err(_) => break true,
        }
    };
    let elapsed = start.elapsed();
    assert!(closed, "the proxy kept a silent connection open for 10 s");
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(5),
        "closed after {elapsed:?}, want about 1 s (handshake_timeout)"
    );
    let after = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let v = inv.proxy.handshakes("inbound", "timeout");
        (v >= before + 1.0).then_some(v)
    })
    .unwrap_or_else(|| inv.proxy.handshakes("inbound", "timeout"));
    assert_eq!(after, before + 1.0, "result=\"timeout\" must go up by one");
    assert_eq!(inv.proxy.handshakes_total("inbound"), total_before + 1.0);
    assert_eq!(inv.app.accepted(), 0);
}
