//! Issue 3, "Must show": the control plane end to end, with the real `ward server`, `ward proxy`
//! and operator CLI processes, all on 127.0.0.1.
//!
//! - join tokens give `inventory` and `order` their certificates and traffic flows once
//!   `order -> inventory` is allowed; a used token, another service's token and admin calls
//!   without (or with a wrong) admin token are refused;
//! - 20 s leaves: two minutes of traffic across at least four renewals with zero failures;
//! - kill -9 of the server: the data plane keeps working; after the restart the proxies
//!   reconnect and apply a change written after it;
//! - allow -> deny: new handshakes refused and the open connection closed, each within 1 s;
//! - kill -9 during a burst of intention writes: every acknowledged write survives;
//! - a proxy whose certificate cannot be renewed warns once 80 % of its life has passed.

use ward_test_support as common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::cp::{
    echo_once, intention_pairs, intentions_version, metric, run_ward, spawn_proxy, start_proxy,
    CpProxyConfig, DevServer, LongLivedWatch, Mesh, Traffic,
};
use common::net::EchoApp;
use common::proc::{TempDir, WardProcess};
use common::wait_until;
use ward_config::time::now_unix;

const SHORT: Duration = Duration::from_secs(3);

fn inbound_denied(p: &WardProcess) -> f64 {
    metric(
        p,
        "ward_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "denied")],
    )
}

fn deny_decisions(p: &WardProcess) -> f64 {
    metric(
        p,
        "ward_intention_decisions_total",
        &[
            ("source", "order"),
            ("destination", "inventory"),
            ("decision", "deny"),
        ],
    )
}

fn connected(p: &WardProcess) -> f64 {
    metric(p, "ward_control_plane_connected", &[])
}

fn renewals_ok(p: &WardProcess) -> f64 {
    metric(p, "ward_cert_renewals_total", &[("result", "ok")])
}

/// Every non-zero `ward_tls_handshakes_total` series of `p`, for failure reports.
fn handshake_series(p: &WardProcess) -> String {
    common::net::parse_prometheus(&p.metrics())
        .into_iter()
        .filter(|s| s.name == "ward_tls_handshakes_total" && s.value != 0.0)
        .map(|s| format!("{:?}={}", s.labels, s.value))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `/ready` must not answer 200 at any poll during `period`.
fn assert_never_ready(p: &WardProcess, period: Duration, why: &str) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        let status = p.ready_status();
        assert_ne!(
            status,
            Some(200),
            "[{}] became ready although {why}\nstderr:\n{}",
            p.label,
            p.stderr_text()
        );
        // polls through a period in which nothing may happen, not waiting for a condition
        thread::sleep(Duration::from_millis(100));
    }
}

/// Polls new connections through `addr` until one fails; returns how long after `since` that
/// was, or `None` if none failed within `timeout`.
fn first_refusal(
    addr: std::net::SocketAddr,
    since: Instant,
    timeout: Duration,
) -> Option<Duration> {
    wait_until(timeout, Duration::from_millis(20), || {
        echo_once(addr, b"is this still allowed?\n", Duration::from_secs(2))
            .err()
            .map(|_| since.elapsed())
    })
}

/// A raw `Admin.CreateToken` with `authorization` set to `bearer` (or absent).
fn raw_admin_create_token(server: &DevServer, bearer: Option<&str>) -> Result<(), tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let target = ward_control_client::channel::ServerTarget::parse(
            &server.address,
            &server.ca_file,
            None,
        )
        .expect("WARD_ADDR and WARD_CACERT of the dev server");
        let channel = target.connect(None).await.expect("TLS to the server");
        let mut req = tonic::Request::new(ward_proto::v1::CreateTokenRequest {
            service: "rogue".into(),
            namespace: String::new(),
            ttl_seconds: 0,
            uses: 0,
        });
        if let Some(b) = bearer {
            req.metadata_mut()
                .insert(ward_proto::AUTHORIZATION, b.parse().unwrap());
        }
        ward_proto::v1::admin_client::AdminClient::new(channel)
            .create_token(req)
            .await
            .map(|_| ())
    })
}

#[test]
fn join_tokens_give_certificates_traffic_flows_and_bad_credentials_are_refused() {
    let mesh = Mesh::start("cp-join", None);

    // Both proxies run with a certificate from the server for their own identity.
    for (p, svc) in [(&mesh.inventory, "inventory"), (&mesh.order, "order")] {
        let cfg = p.config_json();
        let id = cfg
            .pointer("/certificate/spiffe_id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        assert!(
            id.starts_with("spiffe://") && id.ends_with(&format!("/ns/default/svc/{svc}")),
            "[{svc}] /config certificate.spiffe_id = {id:?}; /config: {cfg}"
        );
        assert!(
            intentions_version(p).is_some(),
            "[{svc}] /config has no intentions snapshot: {cfg}"
        );
    }

    // Before any intention, default deny: inventory refuses order in the handshake.
    let up = mesh.upstream();
    let denied = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = echo_once(up, b"before any intention\n", SHORT);
        (inbound_denied(&mesh.inventory) >= 1.0).then_some(r)
    });
    match denied {
        Some(r) => assert!(r.is_err(), "order reached the app with no intention (default deny)"),
        None => panic!(
            "no `ward_tls_handshakes_total{{direction=\"inbound\",result=\"denied\"}}` on inventory \
             within 10 s of connecting through order's catalog-fed upstream (endpoints from the \
             catalog not there, or default deny not applied)"
        ),
    }
    assert_eq!(
        mesh.app.accepted(),
        0,
        "the app saw a connection before any intention"
    );

    // order -> inventory allow: traffic flows.
    mesh.allow_order();
    for i in 0..20 {
        echo_once(up, format!("order {i}\n").as_bytes(), SHORT)
            .unwrap_or_else(|e| panic!("echo {i} through order's upstream: {e}"));
    }
    assert!(
        mesh.app.accepted() >= 21,
        "the app accepted {}",
        mesh.app.accepted()
    );

    // A second proxy with order's token, which order's proxy has already used.
    let used = mesh.dir.join("order.token");
    let reused = spawn_proxy(
        &mesh.dir,
        "order-reused-token",
        &CpProxyConfig::new("order", &mesh.server, &used).upstream("inventory"),
    );
    let line = reused.wait_for_stderr(0, Duration::from_secs(10), |l| {
        let l = l.to_ascii_lowercase();
        l.contains("token") && (l.contains("already been used") || l.contains("refused"))
    });
    assert!(
        line.is_some(),
        "[order-reused-token] no log line saying the used join token was refused within 10 s\nstderr:\n{}",
        reused.stderr_text()
    );
    assert_never_ready(&reused, SHORT, "its join token had already been used");
    drop(reused);

    // A proxy configured as inventory, given a fresh token of order's: its CSR for inventory is
    // refused.
    let order_token = mesh.server.token_create("order", &[]);
    let order_file = DevServer::token_file(&mesh.dir, "order-2", &order_token);
    let other_app = EchoApp::start();
    let spoof = spawn_proxy(
        &mesh.dir,
        "inventory-with-order-token",
        &CpProxyConfig::new("inventory", &mesh.server, &order_file).inbound(other_app.addr),
    );
    let line = spoof.wait_for_stderr(0, Duration::from_secs(10), |l| {
        let l = l.to_ascii_lowercase();
        l.contains("token") && (l.contains("permissiondenied") || l.contains("bound to"))
    });
    assert!(
        line.is_some(),
        "[inventory-with-order-token] no log line saying order's token was refused for inventory's CSR within 10 s\nstderr:\n{}",
        spoof.stderr_text()
    );
    assert_never_ready(&spoof, SHORT, "it asked for inventory with order's token");
    assert_eq!(other_app.accepted(), 0);
    drop(spoof);

    // The refused request consumed nothing (security rule 4, join tokens, docs/security.md): the
    // same token still gets `order` its certificate.
    let order2 = start_proxy(
        &mesh.dir,
        "order-2",
        &CpProxyConfig::new("order", &mesh.server, &order_file).upstream("inventory"),
    );
    let up2 = order2.upstream("inventory");
    let r = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        echo_once(up2, b"second order instance\n", SHORT).ok()
    });
    assert!(
        r.is_some(),
        "the second order proxy's upstream never echoed"
    );

    // Admin calls with a wrong admin token: the CLI exits non-zero saying unauthenticated.
    let wrong = "not-the-admin-token-0123456789abcdef";
    for args in [
        &["token", "create", "--service", "rogue"][..],
        &[
            "intention",
            "create",
            "--source",
            "rogue",
            "--destination",
            "inventory",
            "--action",
            "allow",
        ][..],
        &["intention", "list"][..],
    ] {
        let out = run_ward(
            args,
            &mesh.server.env_with_token(wrong),
            Duration::from_secs(20),
        );
        assert!(
            !out.success(),
            "`ward {}` with a wrong admin token succeeded: {out}",
            args.join(" ")
        );
        assert!(
            out.stderr.to_ascii_lowercase().contains("unauthenticated"),
            "`ward {}` with a wrong admin token: stderr does not say unauthenticated: {out}",
            args.join(" ")
        );
    }
    // Without WARD_TOKEN the CLI refuses before calling, naming it.
    let env = mesh.server.env_with_token("");
    let no_token = [env[0], env[2]];
    let out = run_ward(
        &["token", "create", "--service", "rogue"],
        &no_token,
        Duration::from_secs(20),
    );
    assert!(
        !out.success(),
        "token create without WARD_TOKEN succeeded: {out}"
    );
    assert!(out.stderr.contains("WARD_TOKEN"), "{out}");
    // And the server itself refuses an Admin call without (or with a wrong) bearer token.
    for bearer in [None, Some(format!("Bearer {wrong}"))] {
        match raw_admin_create_token(&mesh.server, bearer.as_deref()) {
            Ok(()) => panic!("Admin.CreateToken with authorization {bearer:?} succeeded"),
            Err(s) => assert_eq!(
                s.code(),
                tonic::Code::Unauthenticated,
                "Admin.CreateToken with authorization {bearer:?}: {s:?}"
            ),
        }
    }
    // Nothing the refused calls asked for was written.
    let pairs = intention_pairs(&mesh.server.intention_list());
    assert_eq!(
        pairs,
        BTreeSet::from([("order".to_string(), "inventory".to_string())]),
        "intentions after the refused calls"
    );
}

#[test]
fn two_minutes_of_traffic_across_20s_leaf_renewals_has_zero_failures() {
    let mesh = Mesh::start("cp-renew", Some("20s"));
    mesh.allow_order();
    for p in [&mesh.inventory, &mesh.order] {
        let cfg = p.config_json();
        let left = cfg
            .pointer("/certificate/not_after_unix")
            .and_then(|v| v.as_i64())
            .map(|na| na - now_unix());
        assert!(
            matches!(left, Some(l) if l <= 25),
            "[{}] with --leaf-ttl 20s the leaf has {left:?} s left; /config: {cfg}",
            p.label
        );
    }

    let traffic = Traffic::start(mesh.upstream(), Duration::from_millis(100));
    let procs = [&mesh.inventory, &mesh.order];
    let mut serials: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        for (i, p) in procs.iter().enumerate() {
            if let Some(s) = p.config_serial() {
                if serials[i].last() != Some(&s) {
                    serials[i].push(s);
                }
            }
        }
        // polls through the 120 s of traffic, in which no connection may fail
        thread::sleep(Duration::from_millis(250));
    }
    let report = traffic.stop();
    let distinct: Vec<usize> = serials
        .iter()
        .map(|v| v.iter().collect::<BTreeSet<_>>().len())
        .collect();
    let oks: Vec<f64> = procs.iter().map(|p| renewals_ok(p)).collect();
    let errors: Vec<f64> = procs
        .iter()
        .map(|p| metric(p, "ward_cert_renewals_total", &[("result", "error")]))
        .collect();
    eprintln!(
        "renewal run: {}\ndistinct serials inventory={} order={}; renewals ok {oks:?}, error {errors:?}",
        report.summary(),
        distinct[0],
        distinct[1]
    );
    for p in procs {
        eprintln!("[{}] {}", p.label, handshake_series(p));
    }
    assert!(
        report.new_failures.is_empty() && report.long_failures.is_empty(),
        "traffic failures across renewals:\n{}",
        report.summary()
    );
    assert!(
        report.new_ok >= 800,
        "only {} new connections in two minutes at one per 100 ms\n{}",
        report.new_ok,
        report.summary()
    );
    assert!(report.long_ok >= 800, "{}", report.summary());
    for (i, p) in procs.iter().enumerate() {
        assert!(
            distinct[i] >= 5,
            "[{}] /config showed {} distinct serials in 120 s with 20 s leaves (want the first + at least 4 renewals): {:?}",
            p.label,
            distinct[i],
            serials[i]
        );
        assert!(
            oks[i] >= 4.0,
            "[{}] ward_cert_renewals_total{{result=\"ok\"}} = {}",
            p.label,
            oks[i]
        );
    }
}

#[test]
fn server_kill9_keeps_traffic_flowing_and_proxies_apply_a_change_after_restart() {
    let mut mesh = Mesh::start("cp-crash", None);
    mesh.allow_order();
    let up = mesh.upstream();
    let ca_before = std::fs::read(&mesh.server.ca_file).unwrap();
    let version_before =
        intentions_version(&mesh.inventory).expect("inventory's intentions version");
    for p in [&mesh.inventory, &mesh.order] {
        assert!(
            wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
                (connected(p) == 1.0).then_some(())
            })
            .is_some(),
            "[{}] ward_control_plane_connected is {} while the server is up",
            p.label,
            connected(p)
        );
    }
    let mut long = LongLivedWatch::start(up, Duration::from_millis(100))
        .unwrap_or_else(|e| panic!("long-lived connection through order: {e}"));

    mesh.server.kill9();
    let killed = Instant::now();

    // While the server is down: new and existing connections keep working.
    let traffic = Traffic::start(up, Duration::from_millis(100));
    let mut notes = Vec::new();
    for p in [&mesh.inventory, &mesh.order] {
        let dropped = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            (connected(p) == 0.0).then_some(killed.elapsed())
        });
        match dropped {
            Some(t) => eprintln!("[{}] ward_control_plane_connected 0 after {t:?}", p.label),
            None => notes.push(format!(
                "[{}] ward_control_plane_connected still {} 10 s after the server was killed",
                p.label,
                connected(p)
            )),
        }
    }
    // The server stays down 6 s, during which traffic must not fail: a period, not a condition.
    while killed.elapsed() < Duration::from_secs(6) {
        thread::sleep(Duration::from_millis(100));
    }
    let down_failures = traffic.failures();

    // Restart on the same data dir and port, traffic still running: the proxies reconnect.
    mesh.server.restart();
    let restarted = Instant::now();
    assert_eq!(
        std::fs::read(&mesh.server.ca_file).unwrap(),
        ca_before,
        "the restarted server has another CA"
    );
    for p in [&mesh.inventory, &mesh.order] {
        let back = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            (connected(p) == 1.0).then_some(restarted.elapsed())
        });
        match back {
            Some(t) => eprintln!("[{}] reconnected {t:?} after the restart", p.label),
            None => panic!(
                "[{}] ward_control_plane_connected is {} 15 s after the server restarted\nnotes: {notes:?}",
                p.label,
                connected(p)
            ),
        }
    }
    // A little more traffic once both are back, then the report.
    // 2 s in which no connection may fail: a period, not a condition.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(100));
    }
    let report = traffic.stop();
    eprintln!(
        "traffic from the kill to 2 s after the reconnect ({down_failures} failures while down, restart {:?} after the kill):\n{}",
        restarted - killed,
        report.summary()
    );
    if report.new_failures.len() + report.long_failures.len() > 0 || report.new_ok < 40 {
        notes.push(format!(
            "traffic between the already-started proxies failed around the server's kill -9 / restart ({down_failures} failures while it was down, the rest after the restart at {:?}):\n{}",
            restarted - killed,
            report.summary()
        ));
    }
    if let Some(f) = long.failure() {
        notes.push(format!(
            "the long-lived connection opened before the kill failed {:?} after the kill: {}",
            f.0.saturating_duration_since(killed),
            f.1
        ));
    }

    // A change written to the restarted server reaches the reconnected proxies.
    let denied_before = inbound_denied(&mesh.inventory);
    mesh.server
        .cli(&[
            "intention",
            "delete",
            "--source",
            "order",
            "--destination",
            "inventory",
        ])
        .expect_ok("intention delete after the restart");
    let acked = Instant::now();
    let refused = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let r = echo_once(up, b"after the delete\n", Duration::from_secs(2));
        (r.is_err() && inbound_denied(&mesh.inventory) > denied_before).then(|| acked.elapsed())
    });
    assert!(
        refused.is_some(),
        "10 s after `intention delete order -> inventory` (default deny) written to the restarted server, inventory has not refused order's handshake (denied {} -> {}; last attempt: {:?})\nnotes: {notes:?}",
        denied_before,
        inbound_denied(&mesh.inventory),
        echo_once(up, b"after the delete\n", Duration::from_secs(2))
    );
    let closed = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        long.failure()
    });
    long.stop();
    let version_after = intentions_version(&mesh.inventory);
    eprintln!(
        "after the restart: new handshakes refused {:?} after the delete was acknowledged, long-lived connection closed {:?} after it; intentions version {version_before} -> {version_after:?}",
        refused,
        closed.as_ref().map(|(t, _)| t.saturating_duration_since(acked))
    );
    assert!(
        closed.is_some(),
        "the long-lived connection admitted by the deleted allow was still open 5 s after the delete\nnotes: {notes:?}"
    );
    assert!(
        matches!(version_after, Some(v) if v > version_before),
        "inventory's intentions version went {version_before} -> {version_after:?} across the restart and a delete"
    );
    assert!(notes.is_empty(), "{}", notes.join("\n"));
}

/// Measures the 1 s bounds of security rule 10 (deny closes what it no longer allows,
/// docs/security.md), so nextest runs it with no other test beside it (`threads-required` in
/// .config/nextest.toml): a burst of 200 CLI processes or two minutes of traffic sharing the 2
/// CI cores would be measured as well.
#[test]
fn allow_to_deny_refuses_new_handshakes_and_closes_the_open_connection_within_1s() {
    let mesh = Mesh::start("cp-deny", None);
    mesh.allow_order();
    let up = mesh.upstream();
    let long = LongLivedWatch::start(up, Duration::from_millis(50))
        .unwrap_or_else(|e| panic!("long-lived connection through order: {e}"));
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            (long.ok() >= 5).then_some(())
        })
        .is_some(),
        "the long-lived connection did not exchange data: {:?}",
        long.failure()
    );
    // order -> inventory is a ward-mux/1 tunnel: the long-lived connection is one of its
    // streams, and the deny must close it as it closes a plain connection.
    assert!(
        metric(
            &mesh.inventory,
            "ward_mux_streams_total",
            &[("direction", "inbound"), ("result", "ok")]
        ) >= 1.0,
        "order's connections reach inventory as tunnel streams"
    );
    let decisions_before = deny_decisions(&mesh.inventory);
    let handshakes_before = inbound_denied(&mesh.inventory);
    let version_before = intentions_version(&mesh.inventory).unwrap();

    let cli_started = Instant::now();
    mesh.server
        .cli(&[
            "intention",
            "create",
            "--source",
            "order",
            "--destination",
            "inventory",
            "--action",
            "deny",
            "--replace",
        ])
        .expect_ok("intention create --action deny --replace");
    let acked = Instant::now();

    let refused = first_refusal(up, acked, SHORT);
    let accepted_at_refusal = mesh.app.accepted();
    let closed = wait_until(SHORT, Duration::from_millis(10), || long.failure());
    eprintln!(
        "deny acknowledged after {:?}: first refused handshake {refused:?} after the ack, long-lived connection closed {:?} after it ({:?})",
        acked - cli_started,
        closed.as_ref().map(|(t, _)| t.saturating_duration_since(acked)),
        closed.as_ref().map(|(_, e)| e)
    );
    let refused =
        refused.expect("new connections from order still reach the app 3 s after the deny");
    assert!(
        refused <= Duration::from_secs(1),
        "the first refused handshake came {refused:?} after the deny was acknowledged (want <= 1 s)"
    );
    for i in 0..5 {
        assert!(
            echo_once(up, b"after deny\n", SHORT).is_err(),
            "connection {i} after the deny reached the app"
        );
    }
    assert_eq!(
        mesh.app.accepted(),
        accepted_at_refusal,
        "the app accepted connections after the deny took effect"
    );
    // Inventory refused them: the first refusal can be a stream refused on the tunnel in the
    // moment before the deny closed it (a deny decision, not a handshake), and the outbound
    // retries a failed stream once, so 6 connections make 6 to 12 deny decisions. The 5 after
    // the first came after the tunnel was closed: a denied handshake each. Both are counted
    // once the refusal is on its way, so wait for them.
    let counted = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let decisions = deny_decisions(&mesh.inventory) - decisions_before;
        let handshakes = inbound_denied(&mesh.inventory) - handshakes_before;
        (decisions >= 6.0 && handshakes >= 5.0).then_some(())
    });
    let decisions = deny_decisions(&mesh.inventory) - decisions_before;
    let handshakes = inbound_denied(&mesh.inventory) - handshakes_before;
    assert!(
        counted.is_some() && decisions <= 12.0,
        "over 6 refused connections inventory counted {decisions} deny decisions for order \
         (want 6 to 12) and {handshakes} denied handshakes (want at least 5)"
    );
    let (closed_at, why) = closed
        .expect("the open long-lived connection was still exchanging data 3 s after the deny");
    assert!(
        closed_at >= cli_started,
        "the long-lived connection failed before the deny was written: {why}"
    );
    let after = closed_at.saturating_duration_since(acked);
    assert!(
        after <= Duration::from_secs(1),
        "the open connection was closed {after:?} after the deny was acknowledged (want <= 1 s): {why}"
    );
    let v = intentions_version(&mesh.inventory);
    assert!(
        matches!(v, Some(v) if v > version_before),
        "inventory's /config intentions.version went {version_before} -> {v:?}"
    );
}

#[test]
fn every_acknowledged_intention_write_survives_kill9_during_a_burst() {
    const WRITES: usize = 200;
    const WORKERS: usize = 4;
    let dir = TempDir::new("cp-burst");
    let mut server = DevServer::start("cp-burst-server", &dir.join("server-data"), None);
    let env: Vec<(String, String)> = server
        .env_with_token(&server.token)
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let env = Arc::new(env);
    let next = Arc::new(AtomicUsize::new(1));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (env, next, acked, failed) =
                (env.clone(), next.clone(), acked.clone(), failed.clone());
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i > WRITES {
                    return;
                }
                let source = format!("s{i}");
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let out = run_ward(
                    &[
                        "intention",
                        "create",
                        "--source",
                        &source,
                        "--destination",
                        "inventory",
                        "--action",
                        "allow",
                    ],
                    &env,
                    Duration::from_secs(20),
                );
                if out.success() {
                    acked.lock().unwrap().push(source);
                } else {
                    failed.lock().unwrap().push((source, out.stderr));
                }
            })
        })
        .collect();

    // Kill the server partway through the burst.
    let partway = wait_until(Duration::from_secs(90), Duration::from_millis(2), || {
        (acked.lock().unwrap().len() >= 50).then_some(())
    });
    server.kill9();
    let acked_at_kill = acked.lock().unwrap().len();
    assert!(
        partway.is_some(),
        "only {acked_at_kill} intention writes acknowledged within 90 s; failures: {:?}",
        failed.lock().unwrap().iter().take(5).collect::<Vec<_>>()
    );
    for w in workers {
        w.join().unwrap();
    }
    let acked: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let failed = failed.lock().unwrap().clone();
    let failed_before_kill: Vec<_> = failed
        .iter()
        .filter(|(_, e)| !e.to_ascii_lowercase().contains("connect"))
        .take(5)
        .collect();
    eprintln!(
        "burst: {} acknowledged ({} when the server was killed), {} failed; some non-connect failures: {failed_before_kill:?}",
        acked.len(),
        acked_at_kill,
        failed.len()
    );
    assert!(
        !failed.is_empty() && acked.len() < WRITES,
        "the kill did not land inside the burst ({} of {WRITES} acknowledged)",
        acked.len()
    );

    server.restart();
    let listed = intention_pairs(&server.intention_list());
    let listed_sources: BTreeSet<String> = listed
        .iter()
        .filter(|(_, d)| d == "inventory")
        .map(|(s, _)| s.clone())
        .collect();
    let missing: Vec<&String> = acked.difference(&listed_sources).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged intention writes are gone after kill -9 and restart: {missing:?}\n(listed {} intentions)",
        missing.len(),
        listed.len()
    );
    let attempted: BTreeSet<String> = (1..=WRITES).map(|i| format!("s{i}")).collect();
    let unexpected: Vec<_> = listed
        .iter()
        .filter(|(s, d)| d != "inventory" || !attempted.contains(s))
        .collect();
    assert!(
        unexpected.is_empty(),
        "intentions nobody wrote: {unexpected:?}"
    );
    eprintln!(
        "after restart: {} intentions listed ({} acknowledged, {} unacknowledged writes also landed)",
        listed_sources.len(),
        acked.len(),
        listed_sources.len() - acked.len()
    );
}

/// `inventory`'s proxy, enrolled with a token of its own, its inbound on 127.0.0.2 (reaching the
/// server from 127.0.0.1) forwarding to `app`.
fn inventory_on_127_0_0_2(dir: &TempDir, server: &DevServer, app: &EchoApp) -> WardProcess {
    let token = server.token_create("inventory", &[]);
    let file = DevServer::token_file(dir, "inventory", &token);
    start_proxy(
        dir,
        "inventory",
        &CpProxyConfig::new("inventory", server, &file).inbound_on("127.0.0.2:0", app.addr),
    )
}

/// The server takes a registered IP from the connection it sees (security rule 3): a sidecar
/// whose inbound listens on another IP (here 127.0.0.2, reaching the server from 127.0.0.1; in
/// production, a sidecar behind NAT) is told, in one WARN naming both addresses and the server
/// key that keeps the proxy's own.
#[test]
fn a_sidecar_registered_at_another_ip_than_its_inbound_warns() {
    let dir = TempDir::new("cp-register-elsewhere");
    let server = DevServer::start("cp-register-elsewhere-server", &dir.join("data"), None);
    let app = EchoApp::start();
    let inventory = inventory_on_127_0_0_2(&dir, &server, &app);
    let line = inventory.wait_for_stderr(0, Duration::from_secs(10), |l| {
        l.contains("WARN") && l.contains("registered") && l.contains("trust_registered_address")
    });
    let line = line.unwrap_or_else(|| {
        panic!(
            "no WARN about the registered address within 10 s:\n{}",
            inventory.stderr_text()
        )
    });
    assert!(
        line.contains("asked=127.0.0.2:") && line.contains("registered=127.0.0.1:"),
        "{line}"
    );
}

/// Transparent mode's part of the control plane, with the real server and CLI: a proxy with
/// only a transparent inbound (the control-plane client in this process, given the handles the
/// proxy gives it) is in the catalog at that inbound, and `ward catalog endpoints` shows its
/// transparent port (`-` for a sidecar that runs none); its one endpoints watch, although it
/// names no upstream, delivers every registered service into its address index.
#[test]
fn a_transparent_sidecar_registers_its_port_and_indexes_services_it_never_named() {
    use ward_proxy::transparent::index::{MeshIndex, Owner};

    let dir = TempDir::new("cp-transparent");
    // Each sidecar keeps the loopback IP it names, so that each IP has one owner in the index.
    let server = DevServer::start_with_config(
        "cp-transparent-server",
        &dir.join("data"),
        "[catalog]\ntrust_registered_address = true\n",
    );
    let app = EchoApp::start();
    let inventory = inventory_on_127_0_0_2(&dir, &server, &app);

    // `web`: no [inbound], no upstream, a transparent inbound (held bound for its port).
    let token = server.token_create("web", &[]);
    let control_plane = ward_config::proxy::ControlPlaneConfig {
        address: server.address.clone(),
        ca_file: server.ca_file.clone(),
        token_file: Some(DevServer::token_file(&dir, "web", &token)),
        state_dir: None,
    };
    let service = ward_config::proxy::ServiceConfig {
        name: ward_config::Name::new("web").unwrap(),
        namespace: ward_config::Name::default_namespace(),
        trust_domain: None,
    };
    let prepared = ward_control_client::prepare(&control_plane, &service).unwrap();
    let transparent_inbound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let transparent_addr = transparent_inbound.local_addr().unwrap();
    let index = Arc::new(MeshIndex::default());
    let mesh = ward_proxy::MeshHandles {
        credentials: Arc::default(),
        intentions: Arc::default(),
        upstreams: vec![],
        inbound_addr: None,
        inbound_protocol: None,
        transparent: Some(ward_proxy::TransparentHandles {
            index: index.clone(),
            inbound_addr: Some(transparent_addr),
        }),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.spawn(ward_control_client::run(prepared, mesh, stop.clone()));

    // Both sidecars reach the index through web's watch: itself and inventory, named by none.
    let owner = |ip: [u8; 4]| match index.owner(ip.into()) {
        Owner::Service {
            service, endpoint, ..
        } => Some((service.to_string(), endpoint)),
        _ => None,
    };
    let indexed = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        Some((owner([127, 0, 0, 1])?, owner([127, 0, 0, 2])?))
    });
    let Some(((web_svc, web), (inv_svc, inv))) = indexed else {
        panic!(
            "within 20 s the index did not list web at 127.0.0.1 and inventory at 127.0.0.2\n\
             server:\n{}\ninventory:\n{}",
            server.stderr_text(),
            inventory.stderr_text()
        );
    };
    assert_eq!(web_svc, "web");
    assert_eq!(web.address, transparent_addr);
    assert_eq!(web.transparent_port, Some(transparent_addr.port()));
    assert_eq!(inv_svc, "inventory");
    assert_eq!(inv.address, inventory.inbound());
    assert_eq!(inv.transparent_port, None);

    let port = transparent_addr.port().to_string();
    let table = server
        .cli(&["catalog", "endpoints", "web"])
        .expect_ok("catalog endpoints web");
    let header = table.stdout.lines().nth(1).unwrap_or_default();
    let row = table.stdout.lines().nth(2).unwrap_or_default();
    assert!(header.contains("TRANSPARENT"), "{table}");
    assert!(
        row.starts_with(&transparent_addr.to_string()) && row.split_whitespace().any(|c| c == port),
        "{table}"
    );
    let json = |svc: &str| -> serde_json::Value {
        let out = server
            .cli(&["catalog", "endpoints", svc, "--output", "json"])
            .expect_ok("catalog endpoints --output json");
        serde_json::from_str(out.stdout.trim()).unwrap()
    };
    assert_eq!(
        json("web")["endpoints"][0]["transparent_port"],
        transparent_addr.port()
    );
    assert!(json("inventory")["endpoints"][0]["transparent_port"].is_null());
    let table = server
        .cli(&["catalog", "endpoints", "inventory"])
        .expect_ok("catalog endpoints inventory");
    let row = table.stdout.lines().nth(2).unwrap_or_default();
    assert!(row.split_whitespace().any(|c| c == "-"), "{table}");

    stop.cancel();
    rt.block_on(client).unwrap();
    drop(transparent_inbound);
}

/// Issue 22, item 3: with the server gone, the proxies keep their certificates and retry; once
/// 80 % of a certificate's life has passed without a renewal, each proxy says so in a warning
/// of its own (the routine "renewal failed" lines say nothing of how close the end is).
#[test]
fn a_proxy_that_cannot_renew_warns_when_80_percent_of_its_certificate_life_is_gone() {
    let mut mesh = Mesh::start("cp-late-renewal", Some("10s"));
    let since = mesh.order.stderr_len();
    mesh.server.kill9();
    let warned = mesh
        .order
        .wait_for_stderr(since, Duration::from_secs(20), |l| {
            l.contains("used 80 % of its life and cannot be renewed")
        });
    let line = warned.unwrap_or_else(|| {
        panic!(
            "no late-renewal warning within 20 s of a 10 s certificate:\n{}",
            mesh.order.stderr_text()
        )
    });
    assert!(
        line.contains("WARN") && line.contains("not_after"),
        "{line}"
    );
}
