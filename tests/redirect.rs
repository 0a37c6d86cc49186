//! `ward redirect install|remove` with the real tools (iptables-restore, ip6tables-restore,
//! nft) inside network namespaces each test makes and removes itself: the host's own rules
//! are never touched. Needs root, `ip`, the iptables tools, `nft` and python3; elsewhere each
//! test says SKIPPED (`.ci/run` installs them).

use std::path::Path;
use std::process::{Command, Stdio};
use ward_test_support as common;

use common::cp::CliOutput;
use common::netns::Netns;
use common::proc::{ward_bin, TempDir};

/// Whether this machine can run the tests; says SKIPPED with the reason when not.
fn can_run() -> bool {
    common::netns::can_run(&[])
}

/// Everything iptables and nftables hold in `ns`, comparable across runs: `iptables-save` and
/// `ip6tables-save` less their dated comments and counters, and `nft list ruleset`.
fn rules(ns: &Netns) -> String {
    let mut all = String::new();
    for (label, tool) in [("ipv4", "iptables-save"), ("ipv6", "ip6tables-save")] {
        all.push_str(&format!("=== {label}\n"));
        all.push_str(&normalize_save(&ns.sh(tool)));
    }
    all.push_str("=== nft\n");
    for line in ns.sh("nft list ruleset").lines() {
        all.push_str(&without_counter(line));
        all.push('\n');
    }
    all
}

/// iptables-save output without its `# Generated ... on <date>` lines and with the chains'
/// packet counters zeroed.
fn normalize_save(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        match line.rfind(" [") {
            Some(i) if line.starts_with(':') && line.ends_with(']') => {
                out.push_str(&line[..i]);
                out.push_str(" [0:0]");
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// An nft rule without its packet and byte counts (`counter packets 3 bytes 180` -> `counter`):
/// iptables-nft gives every rule a counter.
fn without_counter(line: &str) -> String {
    let Some(start) = line.find("counter packets ") else {
        return line.to_owned();
    };
    let rest = &line[start + "counter".len()..];
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        ["packets", _, "bytes", _, tail @ ..] => {
            let mut out = format!("{}counter", &line[..start]);
            for word in tail {
                out.push(' ');
                out.push_str(word);
            }
            out
        }
        _ => line.to_owned(),
    }
}

/// Rules a namespace may already hold (a CNI's, a firewall's): ward must leave them as they
/// are, and its jumps go before them.
const OTHER_RULES: &str = "
iptables -t nat -N OTHER
iptables -t nat -A PREROUTING -p tcp --dport 2222 -j OTHER
iptables -t nat -A OUTPUT -d 192.0.2.1 -j RETURN
iptables -t nat -A OTHER -j RETURN
iptables -A INPUT -p tcp --dport 22 -j ACCEPT
ip6tables -t nat -A OUTPUT -d 2001:db8::1 -j RETURN
ip6tables -A INPUT -p tcp --dport 22 -j ACCEPT
nft add table inet other
nft add chain inet other input '{ type filter hook input priority 0; policy accept; }'
nft add rule inet other input tcp dport 22 accept
";

fn expect_ok(out: CliOutput, what: &str) -> CliOutput {
    assert!(out.success(), "{what}: {out}");
    out
}

fn install(ns: &Netns, backend: &str, extra: &[&str]) -> CliOutput {
    let mut args = vec![
        "redirect",
        "install",
        "--backend",
        backend,
        "--proxy-uid",
        "4242",
    ];
    args.extend(extra);
    expect_ok(ns.ward(&args), &format!("install --backend {backend}"))
}

fn remove(ns: &Netns, backend: &str) -> CliOutput {
    expect_ok(
        ns.ward(&["redirect", "remove", "--backend", backend]),
        &format!("remove --backend {backend}"),
    )
}

/// Install twice (same flags: the same rules as once), again with other flags (ward's rules
/// replaced, nothing doubled), then remove: the namespace's rules are exactly as before.
fn install_twice_then_remove(backend: &str, seed: bool) {
    let ns = Netns::new();
    if seed {
        ns.sh(OTHER_RULES);
    }
    let before = rules(&ns);

    install(&ns, backend, &["--exclude-cidrs", "10.0.0.0/8,fd00::/8"]);
    let once = rules(&ns);
    assert_ne!(once, before, "install changed nothing");
    match backend {
        "iptables" => {
            for family in ["=== ipv4", "=== ipv6"] {
                let part = section(&once, family);
                assert!(
                    part.contains("-A WARD_OUTBOUND -m owner --uid-owner 4242 -j RETURN"),
                    "{family}: {once}"
                );
                assert_eq!(part.matches("-j WARD_OUTBOUND").count(), 1, "{once}");
                assert_eq!(part.matches("-j WARD_INBOUND").count(), 1, "{once}");
            }
            assert!(
                once.contains("-A WARD_OUTBOUND -d 10.0.0.0/8 -j RETURN"),
                "{once}"
            );
            assert!(
                once.contains("-A WARD_OUTBOUND -d fd00::/8 -j RETURN"),
                "{once}"
            );
        }
        _ => {
            assert!(once.contains("table inet ward {"), "{once}");
            assert!(once.contains("meta skuid 4242 return"), "{once}");
            assert!(once.contains("ip6 daddr fd00::/8 return"), "{once}");
        }
    }

    install(&ns, backend, &["--exclude-cidrs", "10.0.0.0/8,fd00::/8"]);
    assert_eq!(
        rules(&ns),
        once,
        "a second install with the same flags changed the rules"
    );

    install(
        &ns,
        backend,
        &["--outbound-port", "16001", "--exclude-inbound-ports", "22"],
    );
    let other = rules(&ns);
    assert!(!other.contains("10.0.0.0/8"), "old rules left: {other}");
    assert!(other.contains("16001"), "{other}");
    if backend == "iptables" {
        assert_eq!(other.matches("-j WARD_OUTBOUND").count(), 2, "{other}");
    } else {
        assert_eq!(other.matches("table inet ward").count(), 1, "{other}");
    }

    let out = remove(&ns, backend);
    assert!(!out.stdout.contains("nothing to remove"), "{out}");
    let after = rules(&ns);
    if backend == "nftables" {
        assert_eq!(after, before, "remove did not restore the rules");
    } else {
        // iptables-save and ip6tables-save exactly as before beside other rules; in an empty
        // namespace, and in the nft view, but for what iptables-nft creates and cannot delete.
        if seed {
            assert_eq!(
                section(&after, "=== ipv4").to_owned() + section(&after, "=== ipv6"),
                section(&before, "=== ipv4").to_owned() + section(&before, "=== ipv6"),
                "remove did not restore the rules"
            );
        }
        assert_eq!(
            without_empty_nat(&after),
            without_empty_nat(&before),
            "remove did not restore the rules"
        );
    }

    // Nothing installed: a no-op that says so and exits 0.
    let out = remove(&ns, backend);
    assert!(out.stdout.contains("nothing to remove"), "{out}");
    assert_eq!(rules(&ns), after);
}

/// The lines of one `=== label` section of [`rules`].
fn section<'a>(rules: &'a str, label: &str) -> &'a str {
    let start = rules.find(label).expect("section");
    let rest = &rules[start + label.len()..];
    &rest[..rest.find("===").unwrap_or(rest.len())]
}

/// What iptables-nft leaves behind in a namespace and no iptables tool can delete: the first
/// write to a nat table creates it (in a namespace that had none) and the base chains it names
/// (`PREROUTING` beside an `OUTPUT` that was there). Left without a rule they redirect nothing
/// and `iptables-save` shows no difference but the table itself. Drops from `rules` an `*nat`
/// section of only built-in chains with policy ACCEPT, and from the nft part every nat base chain
/// with no rule and a nat table left with no chain.
fn without_empty_nat(rules: &str) -> String {
    let builtin = [
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
    ];
    let lines: Vec<&str> = rules.lines().collect();
    let mut out: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let closer = match line {
            "*nat" => "COMMIT",
            "table ip nat {" | "table ip6 nat {" => "}",
            _ => {
                out.push(line);
                i += 1;
                continue;
            }
        };
        let end = i + lines[i..]
            .iter()
            .position(|l| *l == closer)
            .expect("closed");
        let body = &lines[i + 1..end];
        if closer == "COMMIT" {
            if !body.iter().all(|l| builtin.contains(l)) {
                out.extend(&lines[i..=end]);
            }
        } else {
            // The table's chains, each kept only if it holds a rule.
            let mut chains: Vec<&[&str]> = Vec::new();
            let mut j = 0;
            while j < body.len() {
                if body[j].trim().starts_with("chain ") {
                    let close = j + body[j..].iter().position(|l| l.trim() == "}").expect("}");
                    let chain = &body[j..=close];
                    let inside = &chain[1..chain.len() - 1];
                    let is_type = |l: &&str| l.trim().starts_with("type nat hook ");
                    // A user chain (no `type`) is kept even when empty: only base chains go.
                    if !inside.iter().any(is_type) || !inside.iter().all(is_type) {
                        chains.push(chain);
                    }
                    j = close;
                }
                j += 1;
            }
            if !chains.is_empty() {
                out.push(line);
                for (k, chain) in chains.iter().enumerate() {
                    if k > 0 {
                        out.push("");
                    }
                    out.extend(chain.iter());
                }
                out.push("}");
            }
        }
        i = end + 1;
    }
    out.iter().map(|l| format!("{l}\n")).collect()
}

#[test]
fn iptables_install_twice_then_remove_leaves_the_rules_as_before() {
    if can_run() {
        install_twice_then_remove("iptables", true);
        install_twice_then_remove("iptables", false);
    }
}

#[test]
fn nftables_install_twice_then_remove_leaves_the_ruleset_as_before() {
    if can_run() {
        install_twice_then_remove("nftables", true);
        install_twice_then_remove("nftables", false);
    }
}

#[test]
fn dry_run_prints_the_rules_and_changes_nothing() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    ns.sh(OTHER_RULES);
    let before = rules(&ns);
    for (backend, expected) in [
        (
            "iptables",
            "-A WARD_OUTBOUND -m owner --uid-owner 4242 -j RETURN",
        ),
        ("nftables", "meta skuid 4242 return"),
    ] {
        let out = ns.ward(&[
            "redirect",
            "install",
            "--dry-run",
            "--backend",
            backend,
            "--proxy-uid",
            "4242",
        ]);
        let out = expect_ok(out, "install --dry-run");
        assert!(out.stdout.contains(expected), "{out}");
        assert_eq!(rules(&ns), before, "--dry-run changed the rules");
        // What it printed is what the tool would take: feed it to the tool's own check.
        if backend == "iptables" {
            let v4 = &out.stdout[..out.stdout.find("# ward redirect install: ip6").unwrap()];
            let check = ns.exec("iptables-restore", &["--test", "--noflush"], Some(v4));
            assert!(check.success(), "{check}\n{}", out.stdout);
        } else {
            let check = ns.exec("nft", &["--check", "-f", "-"], Some(&out.stdout));
            assert!(check.success(), "{check}\n{}", out.stdout);
        }
        assert_eq!(rules(&ns), before, "the check changed the rules");
    }
    // Installed, a dry-run remove prints the deletions and leaves the rules in place.
    install(&ns, "nftables", &[]);
    let installed = rules(&ns);
    let out = expect_ok(
        ns.ward(&["redirect", "remove", "--dry-run", "--backend", "nftables"]),
        "remove --dry-run",
    );
    assert!(out.stdout.contains("delete table inet ward"), "{out}");
    assert_eq!(rules(&ns), installed);
}

#[test]
fn bad_flags_are_refused_naming_the_flag_and_nothing_is_applied() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let before = rules(&ns);
    let cases: &[(&[&str], &str)] = &[
        (&["--proxy-uid", "0"], "--proxy-uid"),
        (&["--proxy-uid", "ward"], "--proxy-uid"),
        (
            &["--proxy-uid", "4242", "--exclude-inbound-ports", "22,70000"],
            "--exclude-inbound-ports",
        ),
        (
            &["--proxy-uid", "4242", "--exclude-outbound-ports", "90-80"],
            "--exclude-outbound-ports",
        ),
        (
            &["--proxy-uid", "4242", "--exclude-cidrs", "10.0.0.1/8"],
            "--exclude-cidrs",
        ),
        (
            &["--proxy-uid", "4242", "--inbound-port", "0"],
            "--inbound-port",
        ),
        (
            &["--proxy-uid", "4242", "--inbound-port", "15001"],
            "--outbound-port",
        ),
    ];
    for backend in ["iptables", "nftables"] {
        for (flags, named) in cases {
            let mut args = vec!["redirect", "install", "--backend", backend];
            args.extend(*flags);
            let out = ns.ward(&args);
            assert!(
                !out.success() && out.status.is_some(),
                "{flags:?} accepted: {out}"
            );
            assert!(out.stderr.contains(named), "{flags:?}: {out}");
            assert_eq!(
                out.stderr
                    .lines()
                    .filter(|l| l.starts_with("error"))
                    .count(),
                1,
                "{out}"
            );
            assert_eq!(rules(&ns), before, "{flags:?} applied something");
        }
    }
    let out = ns.ward(&["redirect", "install", "--proxy-uid", "0"]);
    assert!(out.stderr.contains("root"), "{out}");
}

/// In a namespace with an address on a veth interface: which listener a TCP connection from
/// `uid` to `dst` port `port` reaches, the outbound port's (`outbound`) or the address's own
/// (`direct`).
const PROBE: &str = r#"
import encodings.idna, os, select, socket, sys  # idna: loaded before the client drops root
uid, family, dst, port, outbound_port = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
loopback = "::1" if family == "6" else "127.0.0.1"
def listen(addr, p):
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, p))
    s.listen(8)
    return s
outbound = listen(loopback, outbound_port)
direct = outbound if (dst, port) == (loopback, outbound_port) else listen(dst, port)
pid = os.fork()
if pid == 0:
    try:
        if uid != 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        c = socket.create_connection((dst, port), timeout=5)
        c.close()
        os._exit(0)
    except Exception as e:
        print("client:", e, file=sys.stderr)
        os._exit(1)
ready, _, _ = select.select([outbound, direct], [], [], 5)
_, status = os.waitpid(pid, 0)
print("outbound" if outbound in ready else "direct" if direct in ready else "none", status)
"#;

fn probe(ns: &Netns, script: &Path, uid: u32, dst: &str, port: u16) -> String {
    let family = if dst.contains(':') { "6" } else { "4" };
    let out = ns.exec(
        "python3",
        &[
            script.to_str().unwrap(),
            &uid.to_string(),
            family,
            dst,
            &port.to_string(),
            "15001",
        ],
        None,
    );
    assert!(out.success(), "probe: {out}");
    out.stdout.trim().to_owned()
}

#[test]
fn other_users_are_redirected_to_the_outbound_port_and_the_proxy_uid_is_not() {
    if !can_run() {
        return;
    }
    let dir = TempDir::new("redirect");
    let script = dir.join("probe.py");
    std::fs::write(&script, PROBE).unwrap();
    for backend in ["iptables", "nftables"] {
        let ns = Netns::new();
        ns.sh("ip link add wv0 type veth peer name wv1
             ip link set wv0 up
             ip link set wv1 up
             ip addr add 10.99.0.1/24 dev wv0
             ip addr add 10.99.0.2/24 dev wv0
             ip -6 addr add fd99::1/64 dev wv0 nodad
             ip -6 addr add fd99::2/64 dev wv0 nodad");
        // Before the install every connection reaches its address.
        assert_eq!(probe(&ns, &script, 0, "10.99.0.1", 8080), "direct 0");
        install(
            &ns,
            backend,
            &[
                "--exclude-outbound-ports",
                "9090",
                "--exclude-cidrs",
                "10.99.0.2/32,fd99::2",
            ],
        );
        for dst in ["10.99.0.1", "fd99::1"] {
            let case = |uid, port| format!("{backend} uid {uid} -> [{dst}]:{port}");
            // root and another user: to the proxy's outbound port.
            for uid in [0, 4343] {
                assert_eq!(
                    probe(&ns, &script, uid, dst, 8080),
                    "outbound 0",
                    "{}",
                    case(uid, 8080)
                );
            }
            // The proxy's own user: where it asked, never back to itself.
            assert_eq!(
                probe(&ns, &script, 4242, dst, 8080),
                "direct 0",
                "{}",
                case(4242, 8080)
            );
            // An excluded port.
            assert_eq!(
                probe(&ns, &script, 0, dst, 9090),
                "direct 0",
                "{}",
                case(0, 9090)
            );
        }
        // Excluded networks and loopback are not redirected.
        for dst in ["10.99.0.2", "fd99::2", "127.0.0.1", "::1"] {
            assert_eq!(
                probe(&ns, &script, 0, dst, 8080),
                "direct 0",
                "{backend} to [{dst}]:8080"
            );
        }
        remove(&ns, backend);
        assert_eq!(probe(&ns, &script, 0, "fd99::1", 8080), "direct 0");
    }
}

/// In the namespace that has the rules: which listener the next connection reaches, the
/// inbound port's (`inbound`) or the address's own (`direct`). Prints `ready` once listening.
const INBOUND_PROBE: &str = r#"
import select, socket, sys
family, addr, port, inbound_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
def listen(a, p):
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a, p))
    s.listen(8)
    return s
inbound = listen("::" if family == "6" else "0.0.0.0", inbound_port)
direct = listen(addr, port)
print("ready", flush=True)
ready, _, _ = select.select([inbound, direct], [], [], 10)
# Accepted and read to the client's close: exiting first would reset a connection the client
# may not have seen established yet.
for s in ready:
    conn, _ = s.accept()
    conn.settimeout(10)
    conn.recv(1)
print("inbound" if inbound in ready else "direct" if direct in ready else "none", flush=True)
"#;

const CONNECT: &str = r#"
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
"#;

/// Where a connection from `client` to `addr`:`port` in `pod` arrives.
fn inbound_probe(pod: &Netns, client: &Netns, dir: &TempDir, addr: &str, port: u16) -> String {
    use std::io::{BufRead, BufReader};
    let listener = dir.join("inbound_probe.py");
    let connect = dir.join("connect.py");
    std::fs::write(&listener, INBOUND_PROBE).unwrap();
    std::fs::write(&connect, CONNECT).unwrap();
    let family = if addr.contains(':') { "6" } else { "4" };
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pod.name, "python3"])
        .arg(&listener)
        .args([family, addr, &port.to_string(), "15006"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the listener");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(
        first.as_deref(),
        Some("ready"),
        "the listener did not start"
    );
    let out = client.exec(
        "python3",
        &[connect.to_str().unwrap(), addr, &port.to_string()],
        None,
    );
    // The listener answers within its own 10 s select.
    let which = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = child.wait();
    assert!(out.success(), "connect to [{addr}]:{port}: {out}");
    which
}

#[test]
fn connections_arriving_from_another_host_are_redirected_to_the_inbound_port() {
    if !can_run() {
        return;
    }
    let dir = TempDir::new("redirect-in");
    for backend in ["iptables", "nftables"] {
        let pod = Netns::new();
        let client = Netns::new();
        pod.sh(&format!(
            "ip link add wa type veth peer name wb netns {}
             ip link set wa up
             ip addr add 10.98.0.1/24 dev wa
             ip -6 addr add fd98::1/64 dev wa nodad",
            client.name
        ));
        client.sh("ip link set wb up
             ip addr add 10.98.0.2/24 dev wb
             ip -6 addr add fd98::2/64 dev wb nodad");
        install(&pod, backend, &["--exclude-inbound-ports", "9090"]);
        for addr in ["10.98.0.1", "fd98::1"] {
            assert_eq!(
                inbound_probe(&pod, &client, &dir, addr, 8080),
                "inbound",
                "{backend}: [{addr}]:8080"
            );
            assert_eq!(
                inbound_probe(&pod, &client, &dir, addr, 9090),
                "direct",
                "{backend}: [{addr}]:9090, an excluded port"
            );
        }
        remove(&pod, backend);
        assert_eq!(
            inbound_probe(&pod, &client, &dir, "fd98::1", 8080),
            "direct",
            "{backend}: after remove"
        );
    }
}

/// An `ip6tables-restore` that checks (`--test`) as the real one does and then refuses to apply:
/// a kernel or a tool that fails between the check and the write.
const REFUSING_IP6TABLES_RESTORE: &str = r#"#!/bin/sh
case " $* " in
  *" --test "*) exec "$REAL" "$@" ;;
esac
echo "ip6tables-restore: refused by the test" >&2
exit 4
"#;

#[test]
fn an_ipv6_failure_after_ipv4_was_written_leaves_nothing_installed() {
    use std::os::unix::fs::PermissionsExt;
    if !can_run() {
        return;
    }
    let dir = TempDir::new("redirect-v6-fails");
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v ip6tables-restore"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let fake = dir.join("ip6tables-restore");
    std::fs::write(&fake, REFUSING_IP6TABLES_RESTORE).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "PATH={}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ns = Netns::new();
    ns.sh(OTHER_RULES);
    let before = rules(&ns);
    let bin = ward_bin().to_str().unwrap().to_owned();
    let env_real = format!("REAL={}", real.trim());
    let out = ns.exec(
        "env",
        &[
            &path,
            &env_real,
            &bin,
            "redirect",
            "install",
            "--proxy-uid",
            "4242",
        ],
        None,
    );
    assert!(!out.success() && out.status.is_some(), "{out}");
    assert!(out.stderr.contains("IPv6 rules were refused"), "{out}");
    assert!(out.stderr.contains("refused by the test"), "{out}");
    assert_eq!(
        rules(&ns),
        before,
        "an install that failed left rules behind"
    );
}
