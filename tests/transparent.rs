//! Transparent mode end to end (issue 20, "Must show"): real hosts made of network namespaces on
//! one bridge (`support/src/netns.rs`: `Lan`), `ward redirect install` in each pod, a
//! `ward proxy` with `[transparent]` as the uid the rules exempt, apps that know nothing of the
//! mesh, and a `ward server --dev` on its own host. One LAN per (backend, address family) serves
//! every check of that run:
//!
//! - `a` (service `order`) calls `b`'s address and app port with plain curl: the answer comes
//!   from `b`'s app through both sidecars, and a capture of `a`'s link shows TCP to `b`'s port
//!   15006 only, never the app's port, and never the app's marker;
//! - a rogue host `c` (no proxy) calls `b`'s app port in plain HTTP and with a self-signed client
//!   certificate: no answer, `b`'s app accepts nothing; `b`'s app bound only to loopback is
//!   reachable neither from `a` through the sidecars nor from `c`;
//! - with `outbound_policy = "registry_only"` `a`'s call to a host outside the mesh (`ext`) is
//!   refused and counted (`ward_transparent_refused_total{reason="not_in_mesh"}`); from `a2`
//!   (`order` too, `allow_any`) it goes through;
//! - the proxies' own connections are not redirected: one call is one outbound connection of the
//!   proxy, and no `loop` refusal.
//!
//! Needs root, iproute2, iptables, nftables, tcpdump, curl, python3 and setpriv; elsewhere each
//! test says SKIPPED (`.ci/run` installs them).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use ward_test_support as common;

use common::cp::{export_value, CliOutput};
use common::net::metric_sum;
use common::netns::{Family, Host, Lan, Spawned, TcpFlow, Uid};
use common::proc::{toml_path, toml_str, ward_bin, TempDir};

/// What `b`'s app answers; never on the wire between the pods.
const MARKER: &str = "inventory-app-marker-5c1e9b";
/// What `b`'s loopback-only app answers.
const LOOPBACK_MARKER: &str = "loopback-only-app-marker-77d0";
/// What the server outside the mesh answers.
const EXT_MARKER: &str = "outside-the-mesh-marker-3a41";

/// The uid `ward redirect install --proxy-uid` exempts and the proxies run as.
const PROXY_UID: Uid = Uid(1337);
/// The apps' (and the callers') uid: redirected.
const APP_UID: Uid = Uid(4000);
const APP_PORT: u16 = 8080;
const LOOPBACK_APP_PORT: u16 = 9090;
const ADMIN: &str = "127.0.0.1:19000";
const CP_PORT: u16 = 8502;

/// An HTTP app answering `MARKER` to every GET on `PORT` at each `ADDR`, one line `accepted IP`
/// per connection it accepts, `ready` once it listens. No name lookups (the hosts have no DNS).
const APP: &str = r#"
import socket, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler
marker, port, addrs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = (marker + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
def server(addr):
    class Server(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        allow_reuse_address = True
        daemon_threads = True
        def server_bind(self):
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()
        def get_request(self):
            conn, peer = super().get_request()
            print("accepted", peer[0], flush=True)
            return conn, peer
    return Server((addr, port), Handler)
servers = [server(a) for a in addrs]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// A TLS client presenting the certificate in `CERT`/`KEY` (trusting any server) that sends a GET:
/// prints `answer ...` with what came back, or `refused REASON`.
const TLS_CLIENT: &str = r#"
import socket, ssl, sys
host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.load_cert_chain(cert, key)
try:
    with socket.create_connection((host, port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    print("answer", data.decode(errors="replace").replace("\r\n", " "))
except (ssl.SSLError, OSError) as e:
    print("refused", getattr(e, "reason", None) or e)
"#;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Iptables,
    Nftables,
}

impl Backend {
    fn flag(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        }
    }
}

/// Whether this machine can run the tests; says SKIPPED with the reason when not.
fn can_run() -> bool {
    common::netns::can_run(&["tcpdump", "curl", "setpriv"])
}

/// The checks of one run that do not stop it: every one is tried, and the test fails at the end
/// naming each that did not hold (so one run says which parts of the mode work).
#[derive(Default)]
struct Checks {
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: impl FnOnce() -> String) {
        if ok {
            self.passed.push(what.to_owned());
        } else {
            self.failed.push(format!("{what}\n{}", detail()));
        }
    }

    /// As [`Checks::check`] for a check that shows something only when `shown` holds (a check of
    /// the call from a to b, when that call went through): fails as not shown otherwise.
    fn check_if(&mut self, what: &str, shown: bool, ok: bool, detail: impl FnOnce() -> String) {
        if shown {
            self.check(what, ok, detail);
        } else {
            self.check(what, false, || {
                "not shown: a's call to b's app did not go through".to_owned()
            });
        }
    }

    fn finish(self, run: &str, took: Duration) {
        eprintln!(
            "{run}: {} checks passed in {took:.1?}: {}",
            self.passed.len(),
            self.passed.join("; ")
        );
        assert!(
            self.failed.is_empty(),
            "{run}: {} of {} checks failed:\n\n{}",
            self.failed.len(),
            self.failed.len() + self.passed.len(),
            self.failed.join("\n\n")
        );
    }
}

/// `ward server --dev` in host `cp`, as root, and the CLI's environment for it.
struct Server {
    process: Spawned,
    env: Vec<(String, String)>,
    ca_file: PathBuf,
    address: String,
}

impl Server {
    fn start(cp: &Host, family: Family, dir: &TempDir) -> Self {
        let listen = cp.addr(family, CP_PORT);
        let data = dir.join("server-data");
        let bin = ward_bin().to_str().expect("UTF-8 path");
        let process = cp.ns.spawn(
            "server",
            None,
            bin,
            &[
                "server",
                "--dev",
                "--data-dir",
                data.to_str().expect("UTF-8 path"),
                "--listen",
                &listen,
                "--admin-listen",
                "127.0.0.1:0",
            ],
        );
        let names = ["WARD_ADDR", "WARD_TOKEN", "WARD_CACERT"];
        let up = process.stdout.wait_until(Duration::from_secs(20), |lines| {
            names.iter().all(|n| export_value(lines, n).is_some())
        });
        assert!(
            up,
            "ward server --dev printed no export lines within 20 s\n{}",
            process.output_text()
        );
        let lines = process.stdout.lines();
        let env: Vec<(String, String)> = names
            .iter()
            .map(|n| ((*n).to_owned(), export_value(&lines, n).unwrap()))
            .collect();
        let ca_file = PathBuf::from(&env[2].1);
        Server {
            process,
            address: format!("https://{listen}"),
            env,
            ca_file,
        }
    }

    /// `ward ARGS` in host `cp` against the server, with its admin token; must succeed.
    fn cli(&self, cp: &Host, args: &[&str]) -> CliOutput {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let bin = ward_bin().to_str().expect("UTF-8 path");
        let out = cp.ns.exec_env(bin, args, &env, None);
        assert!(
            out.success(),
            "ward {}: {out}\nserver:\n{}",
            args.join(" "),
            self.process.output_text()
        );
        out
    }

    /// The one intention of these tests: `order` may call `inventory`.
    fn allow_order_to_inventory(&self, cp: &Host) {
        let args = "intention create --source order --destination inventory --action allow";
        self.cli(cp, &args.split(' ').collect::<Vec<_>>());
    }

    fn token(&self, cp: &Host, service: &str) -> String {
        let out = self.cli(cp, &["token", "create", "--service", service]);
        out.stdout.trim().to_owned()
    }
}

/// A pod: the redirect installed, and `ward proxy` with `[transparent]` as [`PROXY_UID`].
struct Pod {
    proxy: Spawned,
}

impl Pod {
    /// Installs the redirect in `host` with `backend`, writes the proxy's files to a directory
    /// of its own (owned by the proxy's uid) and starts it; returns once `/ready` answers 200.
    fn start(
        host: &Host,
        backend: Backend,
        service: &str,
        policy: &str,
        server: &Server,
        token: &str,
        dir: &TempDir,
    ) -> Self {
        let exempt = PROXY_UID.0.to_string();
        Self::start_redirecting(
            host,
            backend,
            service,
            policy,
            server,
            token,
            dir,
            &exempt,
            &[],
        )
    }

    /// [`Self::start`] with the redirect exempting `exempt_uid` and taking `extra` flags.
    #[allow(clippy::too_many_arguments)]
    fn start_redirecting(
        host: &Host,
        backend: Backend,
        service: &str,
        policy: &str,
        server: &Server,
        token: &str,
        dir: &TempDir,
        exempt_uid: &str,
        extra: &[&str],
    ) -> Self {
        let mut args = vec![
            "redirect",
            "install",
            "--backend",
            backend.flag(),
            "--proxy-uid",
            exempt_uid,
        ];
        args.extend_from_slice(extra);
        let install = host.ns.ward(&args);
        assert!(
            install.success(),
            "[{}] redirect install: {install}",
            host.name
        );
        let own = dir.join(&format!("pod-{}", host.name));
        std::fs::create_dir_all(&own).unwrap();
        let ca = own.join("ca.pem");
        std::fs::copy(&server.ca_file, &ca).expect("copy the server's CA");
        let token_file = own.join(format!("{service}.token"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let config = own.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "[service]\nname = {}\n\n[transparent]\ninbound_listen = \"0.0.0.0:15006\"\n\
                 outbound_listen = \"127.0.0.1:15001\"\noutbound_policy = {}\n\n\
                 [control_plane]\naddress = {}\nca_file = {}\ntoken_file = {}\n\n\
                 [admin]\nlisten = {}\n",
                toml_str(service),
                toml_str(policy),
                toml_str(&server.address),
                toml_path(&ca),
                toml_path(&token_file),
                toml_str(ADMIN),
            ),
        )
        .unwrap();
        for p in [&own, &ca, &token_file, &config] {
            std::os::unix::fs::chown(p, Some(PROXY_UID.0), Some(PROXY_UID.0)).unwrap();
        }
        let log = std::env::var("WARD_TEST_LOG").unwrap_or_else(|_| "info".to_owned());
        let bin = proxy_bin(dir);
        let proxy = host.ns.spawn_env(
            &format!("{} proxy", host.name),
            Some(PROXY_UID),
            bin.to_str().expect("UTF-8 path"),
            &["proxy", "--config", config.to_str().expect("UTF-8 path")],
            &[("WARD_LOG", &log)],
        );
        let pod = Pod { proxy };
        pod.wait_ready(host);
        pod
    }

    /// Waits (20 s) for the admin listener's `listening` line, then for `/ready` to answer 200:
    /// a certificate and the intentions are in.
    fn wait_ready(&self, host: &Host) {
        let admin = self
            .proxy
            .stderr
            .wait_line(0, Duration::from_secs(20), |l| {
                l.contains("listening role=admin")
            });
        assert!(
            admin.is_some(),
            "[{}] the proxy did not start its admin listener within 20 s (it exited, or said nothing)\n{}",
            host.name,
            self.proxy.output_text()
        );
        let url = format!("http://{ADMIN}/ready");
        let ready = common::wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            let out = host.curl(None, 2, &["-o", "/dev/null", "-w", "%{http_code}", &url]);
            (out.stdout.trim() == "200").then_some(())
        });
        assert!(
            ready.is_some(),
            "[{}] GET /ready did not answer 200 within 20 s\n{}",
            host.name,
            self.proxy.output_text()
        );
    }
}

/// The `ward` binary, where [`PROXY_UID`] may run it: the one cargo built, or a copy in `dir`
/// when a directory above it is closed to other users (a checkout under `/root`).
fn proxy_bin(dir: &TempDir) -> PathBuf {
    let built = ward_bin();
    if common::netns::reachable_by_all(built) {
        return built.to_path_buf();
    }
    let copy = dir.join("ward");
    if !copy.exists() {
        std::fs::hard_link(built, &copy)
            .or_else(|_| std::fs::copy(built, &copy).map(drop))
            .expect("copy the ward binary where the proxy's uid can run it");
    }
    copy
}

/// The proxy's `/metrics` in `host`.
fn metrics(host: &Host) -> String {
    let out = host.curl(None, 5, &[&format!("http://{ADMIN}/metrics")]);
    assert!(out.success(), "[{}] GET /metrics: {out}", host.name);
    out.stdout
}

/// A python app of [`APP`] as `user` in `host`, answering `marker` on `port` at `addrs`.
fn start_app(
    host: &Host,
    dir: &TempDir,
    user: Uid,
    marker: &str,
    port: u16,
    addrs: &[&str],
) -> Spawned {
    let script = dir.join("app.py");
    if !script.exists() {
        std::fs::write(&script, APP).unwrap();
    }
    let port = port.to_string();
    let mut args = vec![script.to_str().expect("UTF-8 path"), marker, &port];
    args.extend_from_slice(addrs);
    let app = host.ns.spawn(
        &format!("{} app {marker}", host.name),
        Some(user),
        "python3",
        &args,
    );
    let ready = app
        .stdout
        .wait_line(0, Duration::from_secs(10), |l| l == "ready");
    assert!(
        ready.is_some(),
        "[{}] the app on {port} did not start\n{}",
        host.name,
        app.output_text()
    );
    app
}

/// The `accepted IP` lines an app printed so far.
fn accepted(app: &Spawned) -> Vec<String> {
    app.stdout
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("accepted "))
        .collect()
}

/// The `accepted IP` lines after the first `since`, once there is at least one (5 s at most: the
/// app prints the line before it answers, but the test reads it from a pipe on another thread).
fn accepted_since(app: &Spawned, since: usize) -> Vec<String> {
    let count = |lines: &[String]| lines.iter().filter(|l| l.starts_with("accepted ")).count();
    app.stdout
        .wait_until(Duration::from_secs(5), |lines| count(lines) > since);
    accepted(app).split_off(since)
}

/// `http://ADDR/` (the IPv6 address in brackets).
fn url(host: &Host, family: Family, port: u16) -> String {
    format!("http://{}/", host.addr(family, port))
}

/// One run: a LAN, the server, pods `a`, `a2` (`order`) and `b` (`inventory`), the apps, a
/// rogue `c` and `ext` outside the mesh; every check of the module doc.
fn run(backend: Backend, family: Family) {
    let started = Instant::now();
    let label = format!("{} over {family:?}", backend.flag());
    let dir = TempDir::new("transparent");
    let lan = Lan::new(&["cp", "a", "b", "c", "ext", "a2"]);
    let (cp, a, b, c, ext, a2) = (
        lan.host("cp"),
        lan.host("a"),
        lan.host("b"),
        lan.host("c"),
        lan.host("ext"),
        lan.host("a2"),
    );
    let mut checks = Checks::default();

    let server = Server::start(cp, family, &dir);
    server.allow_order_to_inventory(cp);

    // b: the app on every address and one on loopback only, then its sidecar.
    let app = start_app(b, &dir, APP_UID, MARKER, APP_PORT, &["0.0.0.0", "::"]);
    let loopback_app = start_app(
        b,
        &dir,
        APP_UID,
        LOOPBACK_MARKER,
        LOOPBACK_APP_PORT,
        &["127.0.0.1", "::1"],
    );
    let outside = start_app(ext, &dir, APP_UID, EXT_MARKER, APP_PORT, &["0.0.0.0", "::"]);
    let inventory_token = server.token(cp, "inventory");
    let _b_pod = Pod::start(
        b,
        backend,
        "inventory",
        "registry_only",
        &server,
        &inventory_token,
        &dir,
    );
    let order_token = server.token(cp, "order");
    let _a_pod = Pod::start(
        a,
        backend,
        "order",
        "registry_only",
        &server,
        &order_token,
        &dir,
    );
    let order2_token = server.token(cp, "order");
    let _a2_pod = Pod::start(
        a2,
        backend,
        "order",
        "allow_any",
        &server,
        &order2_token,
        &dir,
    );
    let setup = started.elapsed();

    // The first call goes through once a's proxy knows b's address from the catalog. If it
    // never does, the checks that need no call from a to b still run.
    let b_app = url(b, family, APP_PORT);
    let mut a_calls = 0;
    let mut last = None;
    let through = common::wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        a_calls += 1;
        let out = a.curl(Some(APP_UID), 5, &[&b_app]);
        let ok = out.stdout.contains(MARKER);
        last = Some(out);
        ok.then_some(())
    });
    checks.check(
        "a's calls to b's app go through within 20 s of the proxies' start (the catalog has b)",
        through.is_some(),
        || {
            let last = last.map(|o| o.to_string()).unwrap_or_default();
            format!("{a_calls} tries; the last: {last}")
        },
    );

    // One call, measured: the capture of a's link, a's outbound connections, b's app.
    let before = metrics(a);
    let accepted_before = accepted(&app).len();
    let capture = a.capture(&dir.join("a.pcap"));
    let out = a.curl(Some(APP_UID), 5, &[&b_app]);
    a_calls += 1;
    let packets = capture.stop();
    let after = metrics(a);
    let reached = out.stdout.contains(MARKER);
    checks.check(
        "a's plain curl to b's address and app port gets b's app's answer",
        reached,
        || out.to_string(),
    );
    let b_ip = b.ip(family);
    let between: Vec<_> = packets
        .tcp()
        .into_iter()
        .filter(|f| f.src == b_ip || f.dst == b_ip)
        .collect();
    let b_port = |f: &TcpFlow| {
        if f.dst == b_ip {
            f.dst_port
        } else {
            f.src_port
        }
    };
    checks.check(
        "the capture of a's link shows the call as TCP to b's port 15006",
        between.iter().any(|f| f.dst == b_ip && f.dst_port == 15006),
        || packets.text.clone(),
    );
    checks.check_if(
        "every packet between a and b is on b's port 15006, none on the app's port",
        reached,
        between.iter().all(|f| b_port(f) == 15006),
        || packets.text.clone(),
    );
    checks.check_if(
        "the app's marker is nowhere in the capture of a's link",
        reached,
        !packets.text.contains(MARKER),
        || packets.text.clone(),
    );
    let outbound = |m: &str| {
        metric_sum(
            m,
            "ward_connections_opened_total",
            &[("direction", "outbound")],
        )
    };
    checks.check(
        "one call is one outbound connection of a's proxy (its own connections are not redirected)",
        outbound(&after) - outbound(&before) == 1.0,
        || format!("before:\n{before}\nafter:\n{after}"),
    );
    let new = accepted_since(&app, accepted_before);
    checks.check(
        "b's app accepted the call from b's own address, not from loopback",
        new == [format!("accepted {}", b.ip(family))],
        || format!("{new:?}"),
    );

    // c, with no sidecar: plain HTTP, and TLS with a self-signed certificate.
    let accepted_before = accepted(&app).len();
    let plain = c.curl(None, 5, &[&b_app]);
    checks.check(
        "c's plain HTTP to b's app port gets no HTTP answer",
        !plain.success() && !plain.stdout.contains(MARKER),
        || plain.to_string(),
    );
    let rogue = common::pki::self_signed(common::pki::TRUST_DOMAIN, "order");
    let (cert, key) = (dir.join("rogue-cert.pem"), dir.join("rogue-key.pem"));
    std::fs::write(&cert, &rogue.chain_pem).unwrap();
    std::fs::write(&key, &rogue.key_pem).unwrap();
    let client = dir.join("tls_client.py");
    std::fs::write(&client, TLS_CLIENT).unwrap();
    let b_host = b.ip(family).to_string();
    let tls = c.ns.exec(
        "python3",
        &[
            client.to_str().unwrap(),
            &b_host,
            &APP_PORT.to_string(),
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
        ],
        None,
    );
    checks.check(
        "c's TLS with a self-signed client certificate to b's app port is refused",
        tls.success() && !tls.stdout.contains("HTTP/") && !tls.stdout.contains(MARKER),
        || tls.to_string(),
    );

    // The loopback-only app, from a through both sidecars and from c.
    let loopback_url = url(b, family, LOOPBACK_APP_PORT);
    let from_a = a.curl(Some(APP_UID), 5, &[&loopback_url]);
    a_calls += 1;
    let from_c = c.curl(None, 5, &[&loopback_url]);
    checks.check_if(
        "b's app bound to loopback only answers neither a (through the sidecars) nor c",
        reached,
        !from_a.stdout.contains(LOOPBACK_MARKER) && !from_c.stdout.contains(LOOPBACK_MARKER),
        || format!("from a: {from_a}\nfrom c: {from_c}"),
    );

    // A call that goes through afterwards: its accept line follows any that c's calls caused
    // (the same listener, one accept at a time).
    let control = a.curl(Some(APP_UID), 5, &[&b_app]);
    a_calls += 1;
    let new = accepted_since(&app, accepted_before);
    checks.check(
        "b's app accepted nothing from c's calls (only a's call after them)",
        control.stdout.contains(MARKER) && new.len() == 1,
        || format!("a's call: {control}\naccepted since c's calls: {new:?}"),
    );
    let loopback_accepts = accepted(&loopback_app);
    checks.check(
        "b's loopback-only app accepted nothing",
        loopback_accepts.is_empty(),
        || format!("{loopback_accepts:?}"),
    );

    // Outside the mesh: registry_only (a) refuses, allow_any (a2) passes through.
    let ext_url = url(ext, family, APP_PORT);
    let refused = |m: &str, reason: &str| {
        metric_sum(m, "ward_transparent_refused_total", &[("reason", reason)])
    };
    let before = metrics(a);
    let denied = a.curl(Some(APP_UID), 5, &[&ext_url]);
    let after = metrics(a);
    checks.check(
        "with registry_only, a's call to a host outside the mesh gets no answer",
        !denied.stdout.contains(EXT_MARKER),
        || denied.to_string(),
    );
    checks.check(
        "ward_transparent_refused_total{reason=\"not_in_mesh\"} counts it once",
        refused(&after, "not_in_mesh") - refused(&before, "not_in_mesh") == 1.0,
        || format!("before:\n{before}\nafter:\n{after}"),
    );
    checks.check(
        "the host outside the mesh accepted nothing from a",
        accepted(&outside).is_empty(),
        || format!("{:?}", accepted(&outside)),
    );
    let passed = a2.curl(Some(APP_UID), 5, &[&ext_url]);
    checks.check(
        "with allow_any, a2's call to the host outside the mesh goes through",
        passed.stdout.contains(EXT_MARKER),
        || passed.to_string(),
    );

    // No loop, no storm: a's proxy opened at most one outbound connection per call a made.
    let end = metrics(a);
    checks.check_if(
        "a's proxy refused no connection as a loop",
        reached,
        refused(&end, "loop") == 0.0,
        || end.clone(),
    );
    checks.check_if(
        &format!("a's proxy opened at most one outbound connection per call ({a_calls} calls)"),
        reached,
        outbound(&end) <= f64::from(a_calls),
        || end.clone(),
    );
    checks.finish(
        &format!("{label} (set up in {setup:.1?})"),
        started.elapsed(),
    );
}

#[test]
fn transparent_mesh_with_iptables_over_ipv4() {
    if can_run() {
        run(Backend::Iptables, Family::V4);
    }
}

#[test]
fn transparent_mesh_with_iptables_over_ipv6() {
    if can_run() {
        run(Backend::Iptables, Family::V6);
    }
}

#[test]
fn transparent_mesh_with_nftables_over_ipv4() {
    if can_run() {
        run(Backend::Nftables, Family::V4);
    }
}

#[test]
fn transparent_mesh_with_nftables_over_ipv6() {
    if can_run() {
        run(Backend::Nftables, Family::V6);
    }
}

/// A proxy run as another uid than the redirect exempts (a misconfigured pod): its own
/// connection to b's sidecar comes back to its transparent outbound, which refuses it as a loop
/// instead of carrying it again, once per call: the call fails, nothing storms, and b's app sees
/// nothing.
#[test]
fn a_proxy_the_redirect_does_not_exempt_refuses_its_own_connections_as_a_loop() {
    if !can_run() {
        return;
    }
    let family = Family::V4;
    let dir = TempDir::new("transparent-loop");
    let lan = Lan::new(&["cp", "a", "b"]);
    let (cp, a, b) = (lan.host("cp"), lan.host("a"), lan.host("b"));
    let server = Server::start(cp, family, &dir);
    server.allow_order_to_inventory(cp);
    let app = start_app(b, &dir, APP_UID, MARKER, APP_PORT, &["0.0.0.0", "::"]);
    let token = server.token(cp, "inventory");
    let _b_pod = Pod::start(
        b,
        Backend::Iptables,
        "inventory",
        "registry_only",
        &server,
        &token,
        &dir,
    );
    // a exempts uid 4242, not the proxy's 1337; the control plane is left out so that the proxy
    // still gets its certificate and the catalog.
    let cp_net = format!("{}/32", cp.ip(family));
    let token = server.token(cp, "order");
    let _a_pod = Pod::start_redirecting(
        a,
        Backend::Iptables,
        "order",
        "registry_only",
        &server,
        &token,
        &dir,
        "4242",
        &["--exclude-cidrs", &cp_net],
    );
    let loops = |m: &str| metric_sum(m, "ward_transparent_refused_total", &[("reason", "loop")]);
    // The catalog reaches a's proxy soon after it is ready: wait until a call is refused as a
    // loop (the proxy knows b's sidecar then), at most 20 s.
    let b_app = url(b, family, APP_PORT);
    let mut calls = 0u32;
    let looped = common::wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        calls += 1;
        let out = a.curl(Some(APP_UID), 5, &[&b_app]);
        assert!(!out.stdout.contains(MARKER), "the call went through: {out}");
        (loops(&metrics(a)) >= 1.0).then_some(())
    });
    assert!(
        looped.is_some(),
        "no loop refusal after {calls} calls:\n{}",
        metrics(a)
    );
    // One more call: exactly one more loop refusal, not a storm of them.
    let before = loops(&metrics(a));
    let out = a.curl(Some(APP_UID), 5, &[&b_app]);
    assert!(!out.stdout.contains(MARKER), "the call went through: {out}");
    let after = metrics(a);
    assert_eq!(
        loops(&after) - before,
        1.0,
        "one loop refusal per call:\n{after}"
    );
    assert!(
        accepted(&app).is_empty(),
        "b's app accepted {:?}",
        accepted(&app)
    );
}

/// The test bed itself: hosts of a LAN reach each other over IPv4 and IPv6, an app runs as its
/// own uid, and a capture sees the call and its bytes.
#[test]
fn the_lan_carries_both_families_between_hosts_and_the_capture_sees_them() {
    if !can_run() {
        return;
    }
    let dir = TempDir::new("lan");
    let lan = Lan::new(&["one", "two"]);
    let (one, two) = (lan.host("one"), lan.host("two"));
    let app = start_app(two, &dir, APP_UID, MARKER, APP_PORT, &["0.0.0.0", "::"]);
    for family in [Family::V4, Family::V6] {
        let capture = one.capture(&dir.join(&format!("{family:?}.pcap")));
        let out = one.curl(Some(APP_UID), 5, &[&url(two, family, APP_PORT)]);
        let packets = capture.stop();
        assert!(out.stdout.contains(MARKER), "{family:?}: {out}");
        assert!(
            packets.text.contains(MARKER),
            "{family:?}: {}",
            packets.text
        );
        let to_app = packets
            .tcp()
            .into_iter()
            .filter(|f| f.src == one.ip(family) && f.dst == two.ip(family))
            .count();
        assert!(
            to_app > 0
                && packets
                    .tcp()
                    .iter()
                    .all(|f| f.dst_port == APP_PORT || f.src_port == APP_PORT),
            "{}",
            packets.text
        );
    }
    let ips: Vec<String> = accepted(&app);
    assert_eq!(
        ips,
        [
            format!("accepted {}", one.v4),
            format!("accepted {}", one.v6)
        ]
    );
    // The app runs as its own uid.
    let status = std::fs::read_to_string(format!("/proc/{}/status", app.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().nth(1),
        Some(APP_UID.0.to_string().as_str()),
        "{uid}"
    );
}
