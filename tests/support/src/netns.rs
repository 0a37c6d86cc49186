//! Hosts made of Linux network namespaces, for the tests of transparent mode (`ward redirect`,
//! `[transparent]`): a [`Netns`] alone, or a [`Lan`] of hosts on one bridge. Everything is made
//! by the test and deleted when dropped (also when the test fails), so the machine's own
//! interfaces and rules are never touched. Needs root and the tools [`can_run`] checks; elsewhere
//! the test says SKIPPED.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::cp::CliOutput;
use crate::proc::{strip_ansi, wait_for_exit, ward_bin};

/// The tools every namespace test uses.
pub const TOOLS: &[&str] = &[
    "ip",
    "iptables-save",
    "iptables-restore",
    "ip6tables-save",
    "ip6tables-restore",
    "nft",
    "python3",
];

/// Whether this machine can run a namespace test that also needs `extra` tools (besides
/// [`TOOLS`]): root, the tools, IPv6. Says SKIPPED with the reason when not.
pub fn can_run(extra: &[&str]) -> bool {
    let uid = Command::new("id").arg("-u").output();
    let root = uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        crate::skipped("not root: network namespaces and nat rules need root");
        return false;
    }
    let missing: Vec<&str> = TOOLS
        .iter()
        .chain(extra)
        .copied()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
        .collect();
    if !missing.is_empty() {
        crate::skipped(&format!(
            "{} not installed (CI installs iproute2, iptables, nftables, python3, tcpdump, curl; setpriv is util-linux)",
            missing.join(", ")
        ));
        return false;
    }
    if !Path::new("/proc/net/if_inet6").exists() {
        crate::skipped("this kernel has no IPv6: the IPv6 half cannot be checked");
        return false;
    }
    true
}

/// `program args`, which must exit 0.
pub fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test, deleted when dropped (also when the test fails).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ward-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// `ip netns exec NAME program`: `program` runs in the namespace, with this process's
    /// environment, `NO_COLOR=1`, stdin closed and stdout and stderr piped.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        cmd
    }

    /// `program args` inside the namespace, `input` on its stdin; waits up to 60 s.
    pub fn exec(&self, program: &str, args: &[&str], input: Option<&str>) -> CliOutput {
        self.exec_env(program, args, &[], input)
    }

    /// As [`Netns::exec`], with `env` added to the environment.
    pub fn exec_env(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        input: Option<&str>,
    ) -> CliOutput {
        let start = Instant::now();
        let mut cmd = self.command(program);
        cmd.args(args).envs(env.iter().copied());
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("spawn ip netns exec");
        if let Some(input) = input {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin piped");
            stdin.write_all(input.as_bytes()).expect("write stdin");
        }
        let exit = wait_for_exit(child, start, Duration::from_secs(60));
        CliOutput {
            args: std::iter::once(program)
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
            status: exit.status,
            stdout: exit.stdout,
            stderr: exit.stderr,
            elapsed: exit.elapsed,
        }
    }

    /// A shell script inside the namespace, which must succeed; its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.exec("sh", &["-ec", script], None);
        assert!(out.success(), "in {}: {script}: {out}", self.name);
        out.stdout
    }

    /// `ward ARGS` inside the namespace.
    pub fn ward(&self, args: &[&str]) -> CliOutput {
        let bin = ward_bin().to_str().expect("UTF-8 path").to_owned();
        self.exec(&bin, args, None)
    }

    /// Starts `program args` in the namespace as `user` (`None`: as root) and returns at once;
    /// its stdout and stderr are kept line by line. Killed (by its PID) when dropped.
    pub fn spawn(&self, label: &str, user: Option<Uid>, program: &str, args: &[&str]) -> Spawned {
        self.spawn_env(label, user, program, args, &[])
    }

    /// As [`Netns::spawn`], with `env` added to the environment.
    pub fn spawn_env(
        &self,
        label: &str,
        user: Option<Uid>,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Spawned {
        // `ip netns exec` and `setpriv` exec the next program: the child's PID is the program's.
        let mut cmd = match user {
            None => {
                let mut cmd = self.command(program);
                cmd.args(args);
                cmd
            }
            Some(Uid(uid)) => {
                let mut cmd = self.command("setpriv");
                let id = uid.to_string();
                cmd.args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
                    .arg(executable_by_all(program))
                    .args(args);
                cmd
            }
        };
        let mut child = cmd
            .envs(env.iter().copied())
            .spawn()
            .unwrap_or_else(|e| panic!("[{label}] spawn {program}: {e}"));
        let stdout = Output::read(child.stdout.take().expect("stdout piped"));
        let stderr = Output::read(child.stderr.take().expect("stderr piped"));
        Spawned {
            label: label.to_owned(),
            child,
            stdout,
            stderr,
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The first `program` on `PATH` that any user may run (the file and every directory above
/// it world-executable), else `program` itself: a process run as another user than root cannot
/// reach, say, a python3 installed under `/root`.
pub fn executable_by_all(program: &str) -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter_map(|dir| std::fs::canonicalize(dir.join(program)).ok())
        .find(|file| file.is_file() && reachable_by_all(file))
        .map(|file| file.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.to_owned())
}

/// Whether any user may open or run `path`: it and every directory above it have the
/// others' execute bit (symbolic links resolved).
pub fn reachable_by_all(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::canonicalize(path).is_ok_and(|file| {
        file.ancestors()
            .all(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
    })
}

/// A user (and group) id a spawned process runs as: `setpriv --reuid U --regid U --clear-groups`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uid(pub u32);

/// The lines a process printed on one stream, with a condvar to wait for the next one.
pub struct Output {
    lines: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

impl Output {
    /// Reads `r` line by line on a thread, until EOF.
    fn read<R: Read + Send + 'static>(r: R) -> Arc<Self> {
        let out = Arc::new(Output {
            lines: Mutex::new((Vec::new(), false)),
            changed: Condvar::new(),
        });
        let o = out.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf).unwrap_or(0);
                let mut state = o.lines.lock().unwrap();
                if n == 0 {
                    state.1 = true;
                    o.changed.notify_all();
                    return;
                }
                let line = String::from_utf8_lossy(&buf);
                state
                    .0
                    .push(strip_ansi(line.trim_end_matches(['\n', '\r'])));
                o.changed.notify_all();
            }
        });
        out
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().0.clone()
    }

    /// The first line at index `since` or later that satisfies `pred`, waiting up to `timeout`
    /// for it (`None` if it did not come, or the stream ended without it).
    pub fn wait_line(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lines.lock().unwrap();
        loop {
            if let Some(l) = state.0.iter().skip(since).find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                return None;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits until the stream has ended, at most until `deadline`; whether it did.
    pub fn wait_closed(&self, deadline: Instant) -> bool {
        let mut state = self.lines.lock().unwrap();
        loop {
            let now = Instant::now();
            if state.1 || now >= deadline {
                return state.1;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits up to `timeout` until `pred` holds for the lines so far (`false` if it never did).
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lines.lock().unwrap();
        loop {
            if pred(&state.0) {
                return true;
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                return false;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// A long-running process in a namespace, killed by its PID when dropped; what it printed is
/// shown if the test fails.
pub struct Spawned {
    pub label: String,
    child: Child,
    pub stdout: Arc<Output>,
    pub stderr: Arc<Output>,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (a name such as `INT` or `TERM`) to it by its PID.
    pub fn signal(&self, signal: &str) {
        run_ok("kill", &[&format!("-{signal}"), &self.pid().to_string()]);
    }

    /// Waits up to `timeout` for it to exit (after a [`Spawned::signal`]); whether it did.
    /// Its stdout and stderr close when it exits (it is their only writer), so their ends are
    /// the condition; then it is reaped.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let closed = self.stdout.wait_closed(deadline) && self.stderr.wait_closed(deadline);
        closed && self.child.wait().is_ok()
    }

    /// Everything it printed so far, for a failure message.
    pub fn output_text(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.lines().join("\n"),
            self.stderr.lines().join("\n")
        )
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "===== [{}] =====\n{}\n===== end [{}] =====",
                self.label,
                self.output_text(),
                self.label
            );
        }
    }
}

/// One host of a [`Lan`]: its own namespace, `eth0` on the bridge with `10.77.0.N/24` and
/// `fd77::N/64`.
pub struct Host {
    pub name: String,
    pub ns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// The interface of every [`Host`] on the bridge.
pub const HOST_IFACE: &str = "eth0";

impl Host {
    /// Its address of `family`.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.v4),
            Family::V6 => IpAddr::V6(self.v6),
        }
    }

    /// `IP:port` of its address of `family`, the IPv6 one in brackets.
    pub fn addr(&self, family: Family, port: u16) -> String {
        match family {
            Family::V4 => format!("{}:{port}", self.v4),
            Family::V6 => format!("[{}]:{port}", self.v6),
        }
    }

    /// `curl ARGS` in the host as `user` (`None`: root), with `--max-time` `secs`.
    pub fn curl(&self, user: Option<Uid>, secs: u32, args: &[&str]) -> CliOutput {
        let secs = secs.to_string();
        let mut all = vec!["--silent", "--show-error", "--max-time", &secs];
        all.extend_from_slice(args);
        match user {
            None => self.ns.exec("curl", &all, None),
            Some(Uid(uid)) => {
                let id = uid.to_string();
                let curl = executable_by_all("curl");
                let mut with = vec!["--reuid", &id, "--regid", &id, "--clear-groups", &curl];
                with.extend(all);
                self.ns.exec("setpriv", &with, None)
            }
        }
    }

    /// Starts capturing the packets of its `eth0` into `file` (see [`Capture`]).
    pub fn capture(&self, file: &Path) -> Capture {
        Capture::start(&self.ns, HOST_IFACE, file)
    }
}

/// IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A LAN: a namespace holding the bridge `br0`, and hosts (each its own namespace) attached to
/// it by veth pairs. The hosts' namespaces are deleted first when dropped, then the bridge's.
pub struct Lan {
    // Field order is drop order: hosts before the bridge.
    hosts: Vec<Host>,
    pub bridge: Netns,
}

impl Lan {
    /// A LAN with one host per name, the `i`-th (from 0) at `10.77.0.{i+1}` and `fd77::{i+1}`.
    pub fn new(names: &[&str]) -> Self {
        assert!(names.len() < 250, "a /24 has room for 250 hosts here");
        let bridge = Netns::new();
        bridge.sh("ip link add br0 type bridge\nip link set br0 up");
        let mut lan = Lan {
            hosts: Vec::new(),
            bridge,
        };
        for (i, name) in names.iter().enumerate() {
            let n = i + 1;
            let ns = Netns::new();
            // The host's end is made in its namespace, the peer in the bridge's: interface names
            // are per namespace, so no name can collide with another test's.
            ns.sh(&format!(
                "ip link add {HOST_IFACE} type veth peer name v{n} netns {bridge}
                 ip link set {HOST_IFACE} up
                 ip addr add 10.77.0.{n}/24 dev {HOST_IFACE}
                 ip -6 addr add fd77::{n}/64 dev {HOST_IFACE} nodad",
                bridge = lan.bridge.name
            ));
            lan.bridge
                .sh(&format!("ip link set v{n} master br0\nip link set v{n} up"));
            lan.hosts.push(Host {
                name: (*name).to_owned(),
                ns,
                v4: Ipv4Addr::new(10, 77, 0, n as u8),
                v6: format!("fd77::{n}").parse().expect("IPv6 address"),
            });
        }
        lan
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} on this LAN"))
    }
}

/// `tcpdump -U -w FILE` on one interface of a namespace, stopped (SIGINT, by PID) by
/// [`Capture::stop`] or killed when dropped.
pub struct Capture {
    file: PathBuf,
    process: Spawned,
}

impl Capture {
    /// Starts tcpdump and returns once it says it is listening.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> Self {
        let path = file.to_str().expect("UTF-8 path");
        // -Z root: tcpdump drops to user tcpdump by default, who may not write in the test's dir.
        // --immediate-mode: without it, packets still in the kernel's ring buffer when tcpdump
        // is stopped are counted "received by filter" but never written (seen on 6.x kernels).
        let process = ns.spawn(
            "tcpdump",
            None,
            "tcpdump",
            &[
                "--immediate-mode",
                "-U",
                "-n",
                "-Z",
                "root",
                "-i",
                iface,
                "-w",
                path,
            ],
        );
        let listening = process
            .stderr
            .wait_line(0, Duration::from_secs(10), |l| l.contains("listening on"));
        assert!(
            listening.is_some(),
            "tcpdump on {iface} did not start listening within 10 s\n{}",
            process.output_text()
        );
        Capture {
            file: file.to_path_buf(),
            process,
        }
    }

    /// Stops the capture and reads it back: `tcpdump -n -r FILE -A` (headers and ASCII).
    pub fn stop(mut self) -> Packets {
        self.process.signal("INT");
        let exited = self.process.wait_exit(Duration::from_secs(10));
        assert!(
            exited,
            "tcpdump did not exit within 10 s of SIGINT\n{}",
            self.process.output_text()
        );
        let path = self.file.to_str().expect("UTF-8 path");
        let out = Command::new("tcpdump")
            .args(["-n", "-r", path, "-A"])
            .output()
            .expect("run tcpdump -r");
        assert!(
            out.status.success(),
            "tcpdump -r {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Packets {
            text: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    }
}

/// What a [`Capture`] saw, as `tcpdump -n -A` prints it.
pub struct Packets {
    pub text: String,
}

/// One TCP packet's addresses, from a `tcpdump -n` header line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpFlow {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

impl Packets {
    /// The TCP packets' addresses, in order.
    pub fn tcp(&self) -> Vec<TcpFlow> {
        self.text.lines().filter_map(parse_tcp_header).collect()
    }

    /// How many packets of each flow (`src:port > dst:port`).
    pub fn tcp_counts(&self) -> HashMap<TcpFlow, usize> {
        let mut counts = HashMap::new();
        for f in self.tcp() {
            *counts.entry(f).or_insert(0) += 1;
        }
        counts
    }
}

/// `HH:MM:SS.frac IP 10.77.0.2.40000 > 10.77.0.3.15006: Flags [S], ...` (IP6 alike, the port after
/// the last dot) -> the addresses; `None` for any other line.
fn parse_tcp_header(line: &str) -> Option<TcpFlow> {
    let mut words = line.split_whitespace();
    let _time = words.next()?;
    let proto = words.next()?;
    if proto != "IP" && proto != "IP6" {
        return None;
    }
    let src = words.next()?;
    if words.next()? != ">" {
        return None;
    }
    let dst = words.next()?.strip_suffix(':')?;
    if words.next()? != "Flags" {
        return None;
    }
    let split = |s: &str| -> Option<(IpAddr, u16)> {
        let (ip, port) = s.rsplit_once('.')?;
        Some((ip.parse().ok()?, port.parse().ok()?))
    };
    let (src, src_port) = split(src)?;
    let (dst, dst_port) = split(dst)?;
    Some(TcpFlow {
        src,
        src_port,
        dst,
        dst_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcpdump_header_lines_parse() {
        let f = parse_tcp_header(
            "21:40:01.123456 IP 10.77.0.2.40312 > 10.77.0.3.15006: Flags [S], seq 1, length 0",
        )
        .unwrap();
        assert_eq!(f.src, "10.77.0.2".parse::<IpAddr>().unwrap());
        assert_eq!((f.src_port, f.dst_port), (40312, 15006));
        let f = parse_tcp_header(
            "21:40:01.123456 IP6 fd77::2.40312 > fd77::3.15006: Flags [P.], seq 1:10, length 9",
        )
        .unwrap();
        assert_eq!(f.dst, "fd77::3".parse::<IpAddr>().unwrap());
        assert_eq!(f.dst_port, 15006);
        assert!(parse_tcp_header("21:40:01.1 ARP, Request who-has 10.77.0.3").is_none());
        assert!(parse_tcp_header("\t0x0000:  4500 003c").is_none());
    }
}
