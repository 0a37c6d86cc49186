//! README.md's walk-through by hand, run as written: the ```` ```sh walkthrough ```` blocks, in
//! order, in one bash in a temporary directory, with the built `ward` first on the PATH and
//! every port the text names replaced by a free one. The call through the mesh before the
//! intention must fail, the places that say why must show it, and the call after must succeed.

use ward_test_support as common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::net::free_port;
use common::proc::TempDir;

/// The ports the README's blocks use.
const PORTS: [&str; 7] = ["8502", "8501", "8080", "21000", "9191", "19000", "19001"];

/// The blocks fenced as ```` ```sh walkthrough ````, in order.
fn walkthrough_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match &mut current {
            None if line.trim() == "```sh walkthrough" => current = Some(String::new()),
            Some(block) if line.trim() == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// `text` with each whole number `from` replaced by `to` (not inside a longer number).
fn replace_port(text: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(from) {
        let before = rest[..i].chars().last();
        let after = rest[i + from.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(|c| c.is_ascii_digit()) || after.is_some_and(|c| c.is_ascii_digit()) {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

/// One bash, fed a block at a time; its process group is ended on drop (the blocks start
/// background jobs).
struct Shell {
    child: Child,
    lines: mpsc::Receiver<String>,
}

const DONE: &str = "@@walkthrough-block-exit ";

impl Shell {
    fn start(dir: &TempDir) -> Self {
        let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_ward"))
            .parent()
            .unwrap()
            .to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc", "-s"])
            .current_dir(dir.path())
            .env("PATH", path)
            .env("NO_COLOR", "1")
            .env_remove("WARD_ADDR")
            .env_remove("WARD_TOKEN")
            .env_remove("WARD_CACERT")
            .env_remove("WARD_FORMAT")
            .env_remove("WARD_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("bash starts");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let err_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = err_tx.send(format!("stderr: {line}"));
            }
        });
        Shell { child, lines: rx }
    }

    /// Runs `block`; returns its exit status (that of its last command) and what it printed.
    fn run(&mut self, block: &str, within: Duration) -> (Option<i32>, String) {
        let stdin = self.child.stdin.as_mut().unwrap();
        write!(stdin, "{block}\necho \"{DONE}$?\"\n").unwrap();
        stdin.flush().unwrap();
        let deadline = Instant::now() + within;
        let mut printed = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => match line.strip_prefix(DONE) {
                    Some(code) => return (code.trim().parse().ok(), printed),
                    None => {
                        printed.push_str(&line);
                        printed.push('\n');
                    }
                },
                Err(_) => break,
            }
        }
        (None, printed)
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.child.wait();
    }
}

#[test]
fn the_readme_walkthrough_runs_to_the_end() {
    for tool in ["python3", "curl", "timeout"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            common::skipped(&format!(
                "the README walk-through needs {tool}, which is missing"
            ));
            return;
        }
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut blocks = walkthrough_blocks(&readme);
    assert!(
        blocks.len() >= 6,
        "found {} walkthrough blocks",
        blocks.len()
    );
    for port in PORTS {
        let free = free_port().to_string();
        for block in &mut blocks {
            *block = replace_port(block, port, &free);
        }
    }

    let dir = TempDir::new("readme");
    let mut shell = Shell::start(&dir);
    let mut log = String::new();
    let (mut denied, mut why, mut allowed) = (false, false, false);
    for block in &blocks {
        let (code, printed) = shell.run(block, Duration::from_secs(60));
        log.push_str(&format!("$ {block}{printed}=> exit {code:?}\n"));
        let context = || {
            let logs: String = ["server.log", "inventory.log", "order.log"]
                .iter()
                .map(|f| {
                    let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                    format!("--- {f} ---\n{text}")
                })
                .collect();
            format!("{log}{logs}")
        };
        let code = code.unwrap_or_else(|| panic!("a block did not finish:\n{}", context()));
        if block.starts_with("curl -sS http") {
            // The call before any intention: refused.
            assert_ne!(
                code,
                0,
                "the call without an intention went through:\n{}",
                context()
            );
            assert!(!printed.contains("42 widgets"), "{}", context());
            denied = true;
            continue;
        }
        assert_eq!(code, 0, "a block failed:\n{}", context());
        if block.contains("decision=\"deny\"") {
            assert!(
                printed.contains("decision=\"deny\"") && printed.contains("access_denied"),
                "{}",
                context()
            );
            why = true;
        }
        if block.contains("--action allow") {
            assert!(printed.contains("42 widgets in stock"), "{}", context());
            allowed = true;
        }
    }
    assert!(
        denied && why && allowed,
        "the walk-through lost a step:\n{log}"
    );
}

#[test]
fn ports_are_replaced_whole() {
    assert_eq!(
        replace_port("a 127.0.0.1:8080 18080 80801 8080", "8080", "1"),
        "a 127.0.0.1:1 18080 80801 1"
    );
}
