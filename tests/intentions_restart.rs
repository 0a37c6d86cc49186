//! A proxy never keeps an older policy than the server's after the server restarts: neither
//! when the restart changes `[intentions] default`, nor when the server's `data_dir` was
//! restored from a backup taken before the policy the proxy holds. Real `ward server --config`
//! and `ward proxy` processes on 127.0.0.1.

use ward_test_support as common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cp::{echo_once, intentions_version, metric, DevServer, Mesh};
use common::proc::WardProcess;
use common::wait_until;

const ALLOW: &str = "[intentions]\ndefault = \"allow\"\n";
const DENY: &str = "[intentions]\ndefault = \"deny\"\n";

/// `inventory` (inbound to an echo app) and `order` (upstream `inventory` from the catalog)
/// behind a `ward server --config`.
struct Pair(Mesh);

impl std::ops::Deref for Pair {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.0
    }
}

impl Pair {
    fn start(prefix: &str, server_config: &str) -> Self {
        Pair(Mesh::start_with(prefix, |data| {
            DevServer::start_with_config(prefix, data, server_config)
        }))
    }

    /// Waits (10 s) until an echo through order's upstream goes through.
    fn expect_admitted(&self, when: &str) {
        let up = self.upstream();
        let mut last = String::new();
        let ok = wait_until(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || match echo_once(up, b"admitted?\n", Duration::from_secs(3)) {
                Ok(()) => Some(()),
                Err(e) => {
                    last = e;
                    None
                }
            },
        );
        assert!(
            ok.is_some(),
            "{when}: order's call to inventory was not admitted within 10 s; last error: {last}"
        );
    }

    fn inbound_denied(&self) -> f64 {
        metric(
            &self.inventory,
            "ward_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "denied")],
        )
    }

    /// kill -9, lets `between` change what the next start reads, then restarts and waits (15 s)
    /// until inventory's proxy is connected again; returns when it was seen connected.
    fn restart(&mut self, between: impl FnOnce(&mut DevServer)) -> Instant {
        // Connected before the kill, so the wait below sees a reconnect, not the old stream.
        wait_connected(&self.inventory, "before the restart");
        self.0.server.kill9();
        assert!(
            wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                (connected(&self.inventory) == 0.0).then_some(())
            })
            .is_some(),
            "inventory's proxy still reports ward_control_plane_connected 1 10 s after the server was killed"
        );
        between(&mut self.0.server);
        self.0.server.restart();
        wait_connected(&self.inventory, "after the restart")
    }

    /// Asserts that order is refused in inventory's handshake within 1 s of `reconnected`
    /// (polled for 10 s, so a slow machine fails on the bound with the time it took).
    fn expect_refused_after(&self, reconnected: Instant, what: &str) {
        let up = self.upstream();
        let denied_before = self.inbound_denied();
        let refused = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let r = echo_once(up, b"refused?\n", Duration::from_secs(2));
            (r.is_err() && self.inbound_denied() > denied_before).then(|| reconnected.elapsed())
        });
        let Some(after) = refused else {
            panic!(
                "{what}: order (no intention) was still admitted by inventory 10 s after its proxy reconnected; inventory's intentions version {:?}",
                intentions_version(&self.inventory)
            );
        };
        eprintln!("{what}: refused {after:?} after inventory's proxy reconnected");
        assert!(
            after <= Duration::from_secs(1),
            "{what}: order was refused only {after:?} after inventory's proxy reconnected (at most 1 s)"
        );
    }
}

fn connected(p: &WardProcess) -> f64 {
    metric(p, "ward_control_plane_connected", &[])
}

fn wait_connected(p: &WardProcess, when: &str) -> Instant {
    wait_until(Duration::from_secs(15), Duration::from_millis(10), || {
        (connected(p) == 1.0).then(Instant::now)
    })
    .unwrap_or_else(|| panic!("[{}] not connected to the server 15 s {when}", p.label))
}

/// `cp -a` (keeps modes and owners, as a restore from a backup does).
fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// The operator restarts the server with `default = "deny"` instead of `"allow"`: the same rules,
/// so a version that counts only rule writes would not change and the proxy would keep admitting.
#[test]
fn restart_with_default_deny_refuses_a_caller_without_a_rule() {
    let mut pair = Pair::start("policy-default", ALLOW);
    pair.expect_admitted("default allow, no intention");
    let reconnected = pair.restart(|s| s.set_config(DENY));
    pair.expect_refused_after(reconnected, "restarted with default deny");
}

/// A `data_dir` restored from a backup taken before `order -> inventory allow` was written: the
/// restored state has an older version than the proxy holds, and its policy must win anyway.
#[test]
fn restored_data_dir_policy_reaches_proxies_holding_a_newer_version() {
    let mut pair = Pair::start("policy-restore", DENY);
    let backup = pair.server.data_dir.with_extension("backup");
    // The backup, taken while the server is stopped: default deny and no rule.
    pair.restart(|s| copy_dir(&s.data_dir, &backup));
    pair.server
        .intention_create("order", "inventory", "allow", false);
    pair.expect_admitted("after `intention create order -> inventory allow`");

    let reconnected = pair.restart(|s| {
        std::fs::remove_dir_all(&s.data_dir).expect("remove the data dir");
        copy_dir(&backup, &s.data_dir);
    });
    pair.expect_refused_after(reconnected, "restored from the backup without the allow");
}
