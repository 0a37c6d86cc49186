//! Links the release `ward` binary with its steady-state code first and together
//! (`perf/ward.order`, written by `perf/link-order.sh`): after startup the proxy runs only
//! that code, and grouping it keeps the pages a connection faults in few (see
//! proxy/src/startup_memory.rs and perf/README.md). The order changes where functions sit,
//! never what they do; a function missing from the list is placed after the listed ones.
//!
//! The names in the list are matched to the link's own symbols by `perf/link-order-cc`, the
//! workspace's linker (`.cargo/config.toml`), ignoring the parts of a name that code changes
//! alter, so the list keeps working as the code moves on (perf/README.md).
//!
//! Applied to release builds only, and only when a probe program links with the option under
//! the same compiler, target, flags and linker (lld has it; GNU ld and gold do not), so no
//! toolchain fails to build ward because of it. `WARD_LINK_ORDER=0` turns it off.
//!
//! It also sets `WARD_REVISION`, the short git revision of the checkout (`unknown` outside
//! one), for `ward version` and the `ward_build_info` metric.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const ORDER_FILE: &str = "perf/ward.order";

fn main() {
    emit_revision();
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    for var in [
        "WARD_LINK_ORDER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_LINKER",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let target = env("TARGET").to_uppercase().replace('-', "_");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_{target}_LINKER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_{target}_RUSTFLAGS");

    if env("WARD_LINK_ORDER") == "0" || env("PROFILE") != "release" {
        return;
    }
    let order = Path::new(&env("CARGO_MANIFEST_DIR")).join(ORDER_FILE);
    if !order.is_file() {
        println!("cargo:warning={ORDER_FILE} is missing: ward links in the default order");
        return;
    }
    let args = [
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        // Names of the list this build does not have (other dependency or rustc versions).
        "-Wl,--no-warn-symbol-ordering".to_string(),
    ];
    if !probe_links(&args) {
        return; // not lld: the default order
    }
    if let Some(made_with) = made_with(&order) {
        let rustc = rustc_version();
        if !rustc.is_empty() && made_with != rustc {
            println!(
                "cargo:warning={ORDER_FILE} was made with {made_with}, this is {rustc}: most \
                 names will not match (regenerate: bash perf/link-order.sh)"
            );
        }
    }
    for arg in args {
        println!("cargo:rustc-link-arg-bin=ward={arg}");
    }
}

/// `cargo:rustc-env=WARD_REVISION=<short sha>`, rebuilt when HEAD moves: a checkout or a
/// commit changes `HEAD` or the branch it points to (a loose ref, or `packed-refs`).
fn emit_revision() {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(env("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let revision = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WARD_REVISION={revision}");
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        // `--git-path` finds a worktree's HEAD and the shared refs alike. Only existing files:
        // cargo reruns a script on every build while a watched file is missing.
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]) {
            if Path::new(&path).is_file() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_default()
}

/// Links an empty program with `args` the way cargo will link ward.
fn probe_links(args: &[String]) -> bool {
    let Ok(out_dir) = std::env::var("OUT_DIR") else {
        return false;
    };
    let out = PathBuf::from(out_dir).join("link-order-probe");
    let mut cmd = Command::new(env("RUSTC"));
    cmd.args(["--crate-type", "bin", "--crate-name", "probe", "--target"])
        .arg(env("TARGET"))
        .arg("-o")
        .arg(&out)
        .arg("-");
    let flags = env("CARGO_ENCODED_RUSTFLAGS");
    cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        cmd.arg(format!("-Clinker={linker}"));
    }
    for arg in args {
        cmd.arg(format!("-Clink-arg={arg}"));
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = stdin.write_all(b"fn main() {}\n");
    }
    let ok = child.wait().map(|s| s.success()).unwrap_or(false);
    let _ = std::fs::remove_file(&out);
    ok
}

/// The `# rustc ...` header line of the order file.
fn made_with(order: &Path) -> Option<String> {
    let text = std::fs::read_to_string(order).ok()?;
    let first = text.lines().next()?;
    first.strip_prefix("# ").map(|v| v.trim().to_string())
}

fn rustc_version() -> String {
    Command::new(env("RUSTC"))
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
