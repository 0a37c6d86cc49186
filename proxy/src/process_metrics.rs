//! What every ward process serves on `/metrics` besides its own set: `ward_build_info` and the
//! `process_*` metrics that Prometheus client libraries export, read from `/proc/self` at each
//! scrape. `ward proxy` and `ward server` both append [`render`] to their answer.
//!
//! Written as text rather than through the metrics library: CPU time is a fractional counter,
//! which the library's integer counters cannot hold, and nothing here is on a hot path.

use std::fmt::Write;
use std::sync::OnceLock;

static REVISION: OnceLock<&'static str> = OnceLock::new();

/// The git revision the binary was built from, for `ward_build_info`; set once at start by the
/// binary, whose build script knows it. Unset (a library test) it is `unknown`.
pub fn set_revision(revision: &'static str) {
    let _ = REVISION.set(revision);
}

/// `/proc` reports CPU times in USER_HZ ticks, fixed at 100 per second on Linux.
const USER_HZ: f64 = 100.0;

/// Appends `ward_build_info` and every `process_*` metric that could be read.
pub fn render(out: &mut String) {
    let revision = REVISION.get().copied().unwrap_or("unknown");
    family(
        out,
        "ward_build_info",
        "gauge",
        "Always 1; the labels name the ward version and the git revision it was built from.",
    );
    let _ = writeln!(
        out,
        "ward_build_info{{version=\"{}\",revision=\"{}\"}} 1",
        escape(env!("CARGO_PKG_VERSION")),
        escape(revision)
    );

    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let stat = stat.as_deref().and_then(parse_stat);
    if let Some(s) = stat {
        family(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(
            out,
            "process_cpu_seconds_total {}",
            (s.utime + s.stime) as f64 / USER_HZ
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for (field, name, help) in [
        (
            "VmRSS:",
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        ),
        (
            "VmSize:",
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        ),
    ] {
        if let Some(kib) = status_kib(&status, field) {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", kib * 1024);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        family(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        let _ = writeln!(out, "process_open_fds {}", fds.count());
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    if let Some(max) = max_open_files(&limits) {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(out, "process_max_fds {max}");
    }
    let boot = std::fs::read_to_string("/proc/stat").ok();
    if let (Some(s), Some(btime)) = (stat, boot.as_deref().and_then(boot_time)) {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(
            out,
            "process_start_time_seconds {}",
            btime as f64 + s.starttime as f64 / USER_HZ
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    /// Ticks after boot.
    starttime: u64,
}

/// Fields 14, 15 and 22 of `/proc/self/stat` (proc(5)); the command name (field 2) may hold
/// spaces and parentheses, so fields are counted from its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let after_comm = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3 (state)
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// `VmRSS:   1234 kB` -> 1234.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// The soft limit of `Max open files` in `/proc/self/limits` (`None` if unlimited).
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `btime` of `/proc/stat`: the boot time in Unix seconds.
fn boot_time(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("btime "))?;
    line["btime ".len()..].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 2400 0 0 0 \
                    150 37 0 0 20 0 9 0 123456 1000000 250 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime: 150,
                stime: 37,
                starttime: 123456
            })
        );
        assert_eq!(parse_stat("4242 (truncated) S 1 2"), None);
    }

    #[test]
    fn status_limits_and_boot_time_are_read() {
        let status = "Name:\tward\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(2048));
        assert_eq!(status_kib(status, "VmSize:"), Some(123456));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), None);
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn every_family_has_help_and_type_and_the_revision_is_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut out = String::new();
        render(&mut out);
        for name in [
            "ward_build_info",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("# HELP {name} ")), "{name}:\n{out}");
            assert!(out.contains(&format!("# TYPE {name} ")), "{name}:\n{out}");
        }
    }
}
