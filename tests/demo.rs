//! `ward demo`: the attacks are refused, the order is confirmed, and Ctrl-C stops everything.

use ward_test_support as common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::wait_until;

fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Collects stdout lines until one contains `marker` or the deadline passes.
fn read_until(rx: &mpsc::Receiver<String>, marker: &str, deadline: Instant) -> Vec<String> {
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains(marker);
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    seen
}

/// How long the demo may take to stop its processes and exit after SIGINT.
const STOP_WITHIN: Duration = Duration::from_secs(20);

fn sigint(child: &Child) -> bool {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// `child`'s exit status once it has exited, or None if it has not within [`STOP_WITHIN`].
fn exit_of(child: &mut Child) -> Option<ExitStatus> {
    wait_until(STOP_WITHIN, Duration::from_millis(50), || {
        child.try_wait().ok().flatten()
    })
}

/// The demo under test: if the test fails before its own SIGINT, the demo still gets one (it
/// stops the processes it started), and a SIGKILL if it has not exited in time.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None))
            && !(sigint(&self.0) && exit_of(&mut self.0).is_some())
        {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn sidecar_pids(parent: u32) -> Vec<u32> {
    let out = Command::new("ps")
        .args(["-o", "pid=", "--ppid", &parent.to_string()])
        .output()
        .expect("ps runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn demo_refuses_attacks_confirms_an_order_and_stops_on_ctrl_c() {
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_ward"))
            .arg("demo")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ward demo starts"),
    );
    let child = &mut demo.0;
    let rx = lines_of(child);
    let seen = read_until(
        &rx,
        "Ctrl-C to stop.",
        Instant::now() + Duration::from_secs(60),
    );
    let text = seen.join("\n");
    let refused = seen
        .iter()
        .filter(|l| l.contains("refused with TLS alert"))
        .count();
    let sidecars = sidecar_pids(child.id());

    assert!(
        text.contains("Ctrl-C to stop."),
        "demo did not reach its prompt:\n{text}"
    );
    assert_eq!(refused, 4, "all four attacks refused:\n{text}");
    assert!(text.contains("4 of 4 attacks refused"), "{text}");
    assert!(text.contains("saw 0 connections"), "{text}");
    assert!(text.contains("order confirmed: 1 x widget"), "{text}");
    assert!(text.contains("demo succeeded"), "{text}");
    assert_eq!(
        sidecars.len(),
        3,
        "the dev server and two sidecar processes run: {sidecars:?}"
    );

    // The order service answers while the demo stays up.
    let order = seen
        .iter()
        .find_map(|l| l.split("curl 'http://").nth(1))
        .and_then(|r| r.split('/').next())
        .expect("the curl line names the order app");
    let mut s = std::net::TcpStream::connect(order).expect("order app listens");
    use std::io::{Read, Write};
    s.write_all(b"GET /order?item=gear HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("order confirmed: 1 x gear"), "{resp}");

    assert!(sigint(child), "kill -INT {}", child.id());
    let Some(exit) = exit_of(child) else {
        // The demo cannot stop its processes now: end them here, by the PIDs seen above.
        let _ = child.kill();
        for pid in &sidecars {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        panic!("ward demo did not exit after SIGINT");
    };
    assert!(exit.success(), "clean exit: {exit:?}");
    for pid in sidecars {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "sidecar {pid} left behind"
        );
    }
}

/// `ward demo --once` tells the whole story and exits: after the order, the intention turns to
/// deny (an open connection closed, the next order refused, the caller's sidecar saying why),
/// is allowed again, and a certificate renews under traffic.
#[test]
fn demo_once_turns_the_intention_to_deny_and_back_and_renews_a_certificate() {
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_ward"))
            .args(["demo", "--once"])
            .env_remove("WARD_FORMAT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ward demo starts"),
    );
    let rx = lines_of(&mut demo.0);
    let seen = read_until(
        &rx,
        "stopping the sidecars",
        Instant::now() + Duration::from_secs(120),
    );
    let text = seen.join("\n");
    let exit = exit_of(&mut demo.0);
    assert!(
        exit.is_some_and(|e| e.success()),
        "ward demo --once: {exit:?}\n{text}"
    );
    // The story's lines, in this order.
    let story = [
        "order confirmed: 1 x widget",
        "the operator turns order -> inventory to deny:",
        "$ ward intention create --source order --destination inventory --action deny --replace",
        "written at version",
        "the open connection was closed",
        "the next order: HTTP/1.1 502",
        "order's sidecar says why:",
        "metric: ward_tls_handshakes_total{",
        "log:",
        "the operator allows it again:",
        "--action allow --replace",
        "order confirmed: 1 x widget",
        "renewed: serial",
        "0 failed",
        "demo succeeded",
    ];
    let mut at = 0;
    for want in story {
        match seen[at..].iter().position(|l| l.contains(want)) {
            Some(i) => at += i + 1,
            None => panic!("missing, or out of order: {want:?}\n{text}"),
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("log:") && l.contains("access_denied")),
        "the caller's log line names the alert:\n{text}"
    );
    assert!(
        !text.contains("Ctrl-C to stop."),
        "--once stays up:\n{text}"
    );
}
