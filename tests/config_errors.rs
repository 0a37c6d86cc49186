//! Issue 2, "Must show": each bad config file makes `ward proxy` exit non-zero within 10 s with
//! exactly one line on stderr naming the offending key (and the config file), and starts no
//! listener. A port already in use: the same, naming the address.

use ward_test_support as common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::net::{free_port, is_listening, EchoApp};
use common::pki::{Pki, TRUST_DOMAIN};
use common::proc::{run_proxy_to_exit, strip_ansi, toml_path, TempDir, WardProcess};
use common::write_tls_files;

/// A valid config, split in sections so that each case breaks exactly one thing.
struct Parts {
    top: String,
    service: String,
    inbound: String,
    upstreams: String,
    tls: String,
    intentions: String,
    admin: String,
    limits: String,
}

impl Parts {
    fn render(&self) -> String {
        [
            &self.top,
            &self.service,
            &self.inbound,
            &self.upstreams,
            &self.tls,
            &self.intentions,
            &self.admin,
            &self.limits,
        ]
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("\n")
    }
}

struct Fixture {
    dir: TempDir,
    _app: EchoApp,
    /// Fixed ports written into the config; nothing may listen there afterwards.
    inbound: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    parts: Parts,
}

fn fixture(prefix: &str) -> Fixture {
    let dir = TempDir::new(prefix);
    let pki = Pki::new(TRUST_DOMAIN);
    let files = write_tls_files(&dir, "order", &pki, &pki.leaf("order"));
    let app = EchoApp::start();
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let endpoint = format!("127.0.0.1:{}", free_port());
    let parts = Parts {
        top: String::new(),
        service: format!(
            "[service]\nname = \"order\"\nnamespace = \"default\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n"
        ),
        inbound: format!(
            "[inbound]\nlisten = \"{inbound}\"\nlocal_app = \"{}\"\nprotocol = \"tcp\"\n",
            app.addr
        ),
        upstreams: format!(
            "[[upstreams]]\nservice = \"inventory\"\nlisten = \"{upstream}\"\nprotocol = \"tcp\"\nendpoints = [\"{endpoint}\"]\n"
        ),
        tls: format!(
            "[tls]\ncert_file = {}\nkey_file = {}\nca_file = {}\n",
            toml_path(&files.cert),
            toml_path(&files.key),
            toml_path(&files.ca)
        ),
        intentions: "[intentions]\ndefault = \"deny\"\nrules = [{ source = \"web\", action = \"allow\" }]\n"
            .to_string(),
        admin: format!("[admin]\nlisten = \"{admin}\"\n"),
        limits: "[limits]\nhandshake_timeout = \"10s\"\n".to_string(),
    };
    Fixture {
        dir,
        _app: app,
        inbound,
        admin,
        upstream,
        parts,
    }
}

/// Runs the config and checks the contract; `must_name` are substrings the one stderr line
/// must contain. With `names_config_file`, the line must also name the config file.
fn expect_config_error(
    name: &str,
    edit: impl FnOnce(&mut Fixture),
    must_name: &[&str],
    names_config_file: bool,
) {
    let mut fx = fixture(name);
    edit(&mut fx);
    let config: PathBuf = fx.dir.join(&format!("bad-{name}.toml"));
    std::fs::write(&config, fx.parts.render()).unwrap();
    let exit = run_proxy_to_exit(&config, Duration::from_secs(10));
    let context = format!(
        "case {name}\nconfig:\n{}\nexit: {:?} after {:?}\nstderr:\n{}\nstdout:\n{}",
        fx.parts.render(),
        exit.status,
        exit.elapsed,
        exit.stderr,
        exit.stdout
    );

    let status = exit
        .status
        .unwrap_or_else(|| panic!("did not exit within 10 s\n{context}"));
    assert!(!status.success(), "must exit non-zero\n{context}");
    let stderr = strip_ansi(&exit.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "stderr must hold exactly one non-empty line\n{context}"
    );
    let line = lines[0];
    assert!(
        !line.contains("listening"),
        "a listener was started\n{context}"
    );
    for want in must_name {
        assert!(
            line.contains(want),
            "the error line must name `{want}`\n{context}"
        );
    }
    if names_config_file {
        let file = config.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            line.contains(&file),
            "the error line must name the config file `{file}`\n{context}"
        );
    }
    for (what, addr) in [
        ("inbound.listen", fx.inbound),
        ("admin.listen", fx.admin),
        ("upstreams.listen", fx.upstream),
    ] {
        assert!(
            !is_listening(addr),
            "something listens on {addr} ({what}) after the failed start\n{context}"
        );
    }
}

#[test]
fn unknown_key_at_top_level() {
    expect_config_error(
        "unknown-top",
        |fx| fx.parts.top = "colour = \"blue\"\n".into(),
        &["colour"],
        true,
    );
}

#[test]
fn unknown_key_in_inbound() {
    expect_config_error(
        "unknown-inbound",
        |fx| fx.parts.inbound.push_str("backlog = 128\n"),
        &["backlog"],
        true,
    );
}

#[test]
fn missing_service_section() {
    expect_config_error(
        "missing-service",
        |fx| fx.parts.service = String::new(),
        &["service"],
        true,
    );
}

#[test]
fn invalid_service_name() {
    expect_config_error(
        "bad-service-name",
        |fx| fx.parts.service = fx.parts.service.replace("\"order\"", "\"Order_1\""),
        &["service.name"],
        true,
    );
}

#[test]
fn inbound_listen_is_not_an_address() {
    expect_config_error(
        "listen-not-addr",
        |fx| {
            let old = format!("listen = \"{}\"", fx.inbound);
            fx.parts.inbound = fx
                .parts
                .inbound
                .replace(&old, "listen = \"not-an-address\"");
        },
        &["inbound.listen"],
        true,
    );
}

#[test]
fn upstream_listen_must_be_loopback() {
    expect_config_error(
        "upstream-not-loopback",
        |fx| {
            let old = format!("listen = \"{}\"", fx.upstream);
            let new = format!("listen = \"0.0.0.0:{}\"", fx.upstream.port());
            fx.parts.upstreams = fx.parts.upstreams.replace(&old, &new);
        },
        &["upstreams", "listen"],
        true,
    );
}

#[test]
fn cert_file_does_not_exist() {
    expect_config_error(
        "missing-cert-file",
        |fx| {
            let missing = fx.dir.join("does-not-exist-cert.pem");
            fx.parts.tls = fx.parts.tls.replace(
                fx.parts.tls.lines().nth(1).unwrap(),
                &format!("cert_file = {}", toml_path(&missing)),
            );
        },
        &["does-not-exist-cert.pem"],
        false,
    );
}

#[test]
fn neither_tls_nor_control_plane() {
    expect_config_error(
        "no-identity-source",
        |fx| fx.parts.tls = String::new(),
        &["tls", "control_plane"],
        true,
    );
}

#[test]
fn bad_duration() {
    expect_config_error(
        "bad-duration",
        |fx| fx.parts.limits = "[limits]\nhandshake_timeout = \"ten\"\n".into(),
        &["handshake_timeout"],
        true,
    );
}

#[test]
fn invalid_toml_syntax() {
    expect_config_error(
        "invalid-toml",
        |fx| fx.parts.top = "this is [not toml\n".into(),
        &[],
        true,
    );
}

#[test]
fn inbound_port_already_in_use() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    expect_config_error(
        "port-in-use",
        |fx| {
            let old = format!("listen = \"{}\"", fx.inbound);
            fx.parts.inbound = fx
                .parts
                .inbound
                .replace(&old, &format!("listen = \"{taken}\""));
        },
        &[&taken.to_string()],
        false,
    );
    drop(holder);
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `[control_plane]` in place of `[tls]`, keeping state in `state_dir`. The server address has
/// nothing behind it: the state_dir is checked before anything is dialled.
fn control_plane_parts(fx: &mut Fixture, state_dir: &Path) {
    let token = fx.dir.join("order.token");
    std::fs::write(&token, "not-a-real-token\n").unwrap();
    fx.parts.tls = format!(
        "[control_plane]\naddress = \"https://127.0.0.1:{}\"\nca_file = {}\ntoken_file = {}\nstate_dir = {}\n",
        free_port(),
        toml_path(&fx.dir.join("order-roots.pem")),
        toml_path(&token),
        toml_path(state_dir)
    );
    fx.parts.intentions = String::new();
}

/// Security rule 11 (server state, docs/security.md): a `state_dir` that is not the proxy's own
/// (here shared and sticky, holding someone else's file) is refused with its mode and the reason,
/// and never chmod-ed.
#[test]
fn state_dir_not_of_its_own_is_refused_and_left_unchanged() {
    let shared = TempDir::new("shared-state");
    std::fs::write(shared.join("someone-else.txt"), "x").unwrap();
    set_mode(shared.path(), 0o1777);
    expect_config_error(
        "shared-state-dir",
        |fx| control_plane_parts(fx, shared.path()),
        &["control_plane.state_dir", "1777", "world-writable"],
        true,
    );
    assert_eq!(
        format!("{:04o}", mode(shared.path())),
        "1777",
        "the state_dir was changed"
    );
    assert_eq!(std::fs::read_dir(shared.path()).unwrap().count(), 1);
}

/// An empty `state_dir` of the running user's is tightened to 0700 before the proxy listens.
#[test]
fn an_empty_state_dir_of_its_own_is_tightened_to_0700() {
    let mut fx = fixture("own-state-dir");
    let state = fx.dir.join("state");
    std::fs::create_dir(&state).unwrap();
    set_mode(&state, 0o755);
    control_plane_parts(&mut fx, &state);
    let config = fx.dir.join("own-state.toml");
    std::fs::write(&config, fx.parts.render()).unwrap();
    let proxy = WardProcess::spawn("own-state", &config, &[]);
    assert_eq!(
        format!("{:04o}", mode(&state)),
        "0700",
        "{}",
        proxy.stderr_text()
    );
    drop(proxy);
}

/// One caller written two ways (`legacy` is in the proxy's own namespace, `default`): two
/// rules for it would leave the decision to their order, so the config is refused.
const SAME_CALLER_TWICE: &str = "[intentions]\ndefault = \"deny\"\nrules = [{ source = \"default/legacy\", action = \"allow\" }, { source = \"legacy\", action = \"deny\" }]\n";

#[test]
fn one_caller_in_two_rules() {
    expect_config_error(
        "same-caller-twice",
        |fx| fx.parts.intentions = SAME_CALLER_TWICE.into(),
        &["intentions.rules[1].source", "legacy"],
        true,
    );
}

#[test]
fn check_refuses_one_caller_in_two_rules() {
    let mut fx = fixture("check-same-caller");
    fx.parts.intentions = SAME_CALLER_TWICE.into();
    let (ok, _, stderr) = check_config(&fx, "same-caller");
    assert!(!ok, "--check passed:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("intentions.rules[1].source") && lines[0].contains("same-caller.toml"),
        "{stderr}"
    );
}

/// `ward proxy --check FILE`: its exit status, stdout and stderr (colour stripped).
fn check_config(fx: &Fixture, name: &str) -> (bool, String, String) {
    let config = fx.dir.join(&format!("{name}.toml"));
    std::fs::write(&config, fx.parts.render()).unwrap();
    let out = std::process::Command::new(common::proc::ward_bin())
        .args(["proxy", "--check", "--config"])
        .arg(&config)
        .env_remove("WARD_LOG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        strip_ansi(&String::from_utf8_lossy(&out.stderr)),
    )
}

/// `--check` refuses what start would refuse: an unreadable `control_plane.token_file`, and a
/// listen address already taken, each named in one line; a good config still prints ok.
#[test]
fn check_refuses_what_start_would_refuse() {
    let mut fx = fixture("check-start");
    let tls = fx.parts.tls.clone();
    let token = fx.dir.join("order.token");
    std::fs::write(&token, "a-join-token\n").unwrap();
    let control_plane = |token: &Path| {
        format!(
            "[control_plane]\naddress = \"https://127.0.0.1:{}\"\nca_file = {}\ntoken_file = {}\n",
            free_port(),
            toml_path(&fx.dir.join("order-roots.pem")),
            toml_path(token)
        )
    };
    fx.parts.tls = control_plane(&token);
    fx.parts.intentions = String::new();
    let (ok, stdout, stderr) = check_config(&fx, "good");
    assert!(ok && stdout.contains("good.toml: ok"), "{stdout}{stderr}");

    let missing = fx.dir.join("missing.token");
    fx.parts.tls = control_plane(&missing);
    let (ok, _, stderr) = check_config(&fx, "no-token");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!ok, "--check passed without its token file:\n{stderr}");
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("control_plane.token_file")
            && lines[0].contains("missing.token")
            && lines[0].contains("no-token.toml"),
        "{stderr}"
    );

    // A port in use, with `[tls]` files: the admin listener's, then an upstream's.
    fx.parts.tls = tls;
    fx.parts.intentions = "[intentions]\ndefault = \"deny\"\n".into();
    for (key, addr) in [
        ("admin.listen", fx.admin),
        ("upstreams[0].listen", fx.upstream),
    ] {
        let holder = TcpListener::bind(addr).unwrap();
        let (ok, _, stderr) = check_config(&fx, "port-taken");
        drop(holder);
        assert!(!ok, "--check passed with {addr} taken:\n{stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(&addr.to_string()),
            "{stderr}"
        );
        assert_eq!(stderr.lines().filter(|l| !l.trim().is_empty()).count(), 1);
    }
    let (ok, stdout, stderr) = check_config(&fx, "port-free");
    assert!(ok && stdout.contains(": ok"), "{stdout}{stderr}");
}

/// L7 permissions in the static `[intentions]`: a tcp inbound cannot check requests, so start
/// and `--check` refuse them there, naming the key; an http inbound takes them.
const L7_RULE: &str = "[intentions]\ndefault = \"deny\"\nrules = [{ source = \"web\", permissions = [{ action = \"allow\", path_prefix = \"/stock/\", methods = [\"GET\"] }, { action = \"deny\", path_exact = \"/admin\" }] }]\n";

#[test]
fn static_permissions_on_a_tcp_inbound_are_refused() {
    expect_config_error(
        "l7-on-tcp",
        |fx| fx.parts.intentions = L7_RULE.into(),
        &["intentions.rules[0].permissions", "protocol = \"http\""],
        true,
    );
}

#[test]
fn check_takes_static_permissions_only_on_an_http_inbound() {
    let mut fx = fixture("check-l7");
    fx.parts.intentions = L7_RULE.into();
    let (ok, _, stderr) = check_config(&fx, "l7-tcp");
    assert!(
        !ok,
        "--check passed with permissions on a tcp inbound:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("intentions.rules[0].permissions")
            && lines[0].contains("a tcp inbound cannot check requests")
            && lines[0].contains("l7-tcp.toml"),
        "{stderr}"
    );
    fx.parts.inbound = fx
        .parts
        .inbound
        .replace("protocol = \"tcp\"", "protocol = \"http\"");
    let (ok, stdout, stderr) = check_config(&fx, "l7-http");
    assert!(
        ok,
        "--check refused permissions on an http inbound:\n{stderr}"
    );
    assert!(stdout.contains("ok"), "{stdout}");
}

/// Transparent mode as root (which `ward redirect` never exempts, so the proxy's own
/// connections would come back to it): start refuses it before anything listens, and so does
/// `--check`, each in one line naming `[transparent]` and root.
#[test]
fn transparent_mode_as_root_is_refused_by_start_and_by_check() {
    if !common::proc::runs_as_root() {
        common::skipped("not root: the refusal applies to a proxy running as root");
        return;
    }
    let transparent = free_port();
    expect_config_error(
        "transparent-root",
        |fx| {
            let state = fx.dir.join("state");
            control_plane_parts(fx, &state);
            fx.parts.top = format!("[transparent]\ninbound_listen = \"127.0.0.1:{transparent}\"\n");
        },
        &["[transparent]", "runs as root"],
        true,
    );

    let mut fx = fixture("check-transparent-root");
    let state = fx.dir.join("state");
    control_plane_parts(&mut fx, &state);
    fx.parts.top = format!("[transparent]\ninbound_listen = \"127.0.0.1:{transparent}\"\n");
    let (ok, stdout, stderr) = check_config(&fx, "transparent-root");
    assert!(
        !ok,
        "--check passed a transparent proxy running as root:\n{stdout}{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("[transparent]")
            && lines[0].contains("runs as root")
            && lines[0].contains("transparent-root.toml"),
        "{stderr}"
    );
}
