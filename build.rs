//! Links the release `ward` binary with its steady-state code first and together
//! (`perf/ward.order`, written by `perf/link-order.sh`): after startup the proxy runs only
//! that code, and grouping it keeps the pages a connection faults in few (see
//! proxy/src/footprint.rs). The order changes where functions sit, never what they do; a
//! function missing from the list is placed after the listed ones.
//!
//! Applied only where the linker is known to be lld: release builds for
//! x86_64-unknown-linux-gnu with rustc 1.90 or later (which links with its own lld there by
//! default). `WARD_LINK_ORDER=0` turns it off, e.g. with a custom linker.

use std::path::Path;
use std::process::Command;

const ORDER_FILE: &str = "perf/ward.order";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=WARD_LINK_ORDER");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    if env("WARD_LINK_ORDER") == "0"
        || env("PROFILE") != "release"
        || env("TARGET") != "x86_64-unknown-linux-gnu"
        || !rustc_links_with_lld(&env("RUSTC"))
    {
        return;
    }
    let order = Path::new(&env("CARGO_MANIFEST_DIR")).join(ORDER_FILE);
    if order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=ward=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // Functions of the list that this build does not have (other dependency versions).
        println!("cargo:rustc-link-arg-bin=ward=-Wl,--no-warn-symbol-ordering");
    }
}

/// rustc 1.90+ links x86_64-unknown-linux-gnu with its bundled lld unless told otherwise.
fn rustc_links_with_lld(rustc: &str) -> bool {
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let chosen = [
        "RUSTC_LINKER",
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER",
    ];
    if flags.contains("linker") || chosen.iter().any(|k| std::env::var_os(k).is_some()) {
        return false; // a chosen linker or linker flavour: do not assume lld
    }
    let Ok(out) = Command::new(rustc).arg("-V").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&out.stdout);
    // "rustc 1.95.0 (...)"
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
