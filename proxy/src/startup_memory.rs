//! Once the proxy is ready, give back memory that only its startup needed.
//!
//! Startup (config and CLI parsing, TLS setup, certificate parsing, the runtime) runs code
//! spread over most of the binary, and the kernel maps up to 64 KiB around every page it
//! faults in (fault-around); those clean pages of the executable then count in RSS for the
//! life of the process although nothing runs them again. So, when ready, the proxy drops its
//! mappings of the read-only segments of its executable and of the shared libraries it loaded
//! (libc, libm, the loader: `MADV_DONTNEED`; the pages stay in the page cache, shared with
//! every other process, and fault back in from the file when next used) and hands freed heap
//! back to the system (`malloc_trim`). The steady-state code faults back what it uses; only
//! startup's share of the RSS goes.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// The shared libraries' mappings at startup: (start, end, inode).
static STARTUP_LIBRARIES: OnceLock<Vec<(usize, usize, u64)>> = OnceLock::new();

/// Records the shared libraries mapped before the proxy starts any thread. Only those are
/// released later: libraries loaded at startup are never unloaded, so their mappings cannot
/// have been replaced by the time the release runs, whereas a library that another thread
/// is loading (glibc's NSS modules, on a name lookup) could be mid-relocation.
pub fn note_startup_libraries() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let libs = maps
        .lines()
        .filter_map(Header::parse)
        .filter(|h| h.path.is_some_and(is_shared_library))
        .filter_map(|h| Some((h.start, h.end, h.inode?)))
        .collect();
    let _ = STARTUP_LIBRARIES.set(libs);
}

/// Drops the mappings of the clean read-only pages of the executable and of the shared
/// libraries loaded at startup, and trims the heap; returns the bytes of mappings released
/// (best effort: any failure leaves memory as it was).
pub fn release_startup_memory() -> usize {
    let released = release_file_mappings().unwrap_or(0);
    trim_heap();
    released
}

/// A mapping of our executable or of a shared library that holds only file pages, never a
/// private copy.
struct Clean {
    start: usize,
    len: usize,
}

fn release_file_mappings() -> std::io::Result<usize> {
    let exe_inode = std::fs::metadata("/proc/self/exe")?.ino();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let startup = STARTUP_LIBRARIES.get().map(Vec::as_slice).unwrap_or(&[]);
    let mut released = 0;
    for m in clean_mappings(&smaps, exe_inode, startup) {
        // SAFETY: `m` is a private, read-only mapping of our executable or of a library loaded
        // at startup (neither is ever unmapped or replaced), whose smaps entry shows no
        // anonymous (copied-on-write) page, resident or swapped, so every page in it is an
        // unmodified page of the file. MADV_DONTNEED on such a mapping only removes page-table
        // entries; the next access faults the same bytes back in from the file. No memory
        // content changes.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_DONTNEED) };
        if rc == 0 {
            released += m.len;
        }
    }
    Ok(released)
}

/// The first line of a mapping in /proc/self/maps or smaps.
struct Header<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    inode: Option<u64>,
    path: Option<&'a str>,
}

impl<'a> Header<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let perms = fields.next()?;
        let inode = fields.nth(2).and_then(|i| i.parse::<u64>().ok());
        Some(Header {
            start,
            end,
            perms,
            inode,
            path: fields.next(),
        })
    }
}

/// Read-only (`r-xp` or `r--p`) mappings with no anonymous page, resident or swapped, of the
/// executable (the file with `exe_inode`) or of a shared library (a file named `*.so` or
/// `*.so.*`) mapped at startup (`startup`: start, end, inode).
fn clean_mappings(smaps: &str, exe_inode: u64, startup: &[(usize, usize, u64)]) -> Vec<Clean> {
    struct Candidate {
        m: Clean,
        anon_kib: Option<u64>,
        swap_kib: Option<u64>,
    }
    fn finish(c: Option<Candidate>, out: &mut Vec<Clean>) {
        if let Some(c) = c {
            if c.anon_kib == Some(0) && c.swap_kib.unwrap_or(0) == 0 {
                out.push(c.m);
            }
        }
    }
    let mut out = Vec::new();
    let mut current: Option<Candidate> = None;
    for line in smaps.lines() {
        if let Some(h) = Header::parse(line) {
            finish(current.take(), &mut out);
            let ours = match h.inode {
                Some(ino) if ino == exe_inode => true,
                Some(ino) => {
                    h.path.is_some_and(is_shared_library)
                        && startup.contains(&(h.start, h.end, ino))
                }
                None => false,
            };
            current = (matches!(h.perms, "r-xp" | "r--p") && ours && h.end > h.start).then(|| {
                Candidate {
                    m: Clean {
                        start: h.start,
                        len: h.end - h.start,
                    },
                    anon_kib: None,
                    swap_kib: None,
                }
            });
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(key), Some(kib)) = (fields.next(), fields.next()) else {
            continue;
        };
        let kib = kib.parse::<u64>().ok();
        if let Some(c) = current.as_mut() {
            match key {
                "Anonymous:" => c.anon_kib = kib,
                "Swap:" => c.swap_kib = Some(kib.unwrap_or(u64::MAX)),
                _ => {}
            }
        }
    }
    finish(current, &mut out);
    out
}

/// `/usr/lib/x86_64-linux-gnu/libc.so.6`, `/lib64/ld-linux-x86-64.so.2`, `libfoo.so`.
fn is_shared_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    path.starts_with('/') && (name.ends_with(".so") || name.contains(".so."))
}

#[cfg(target_env = "gnu")]
fn trim_heap() {
    // SAFETY: malloc_trim only returns free heap memory to the system; it takes no pointer.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim_heap() {}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 4242 /usr/bin/ward
Rss:                1024 kB
Anonymous:             0 kB
55d0a0100000-55d0a0900000 r-xp 00100000 fd:01 4242 /usr/bin/ward
Rss:                7000 kB
Anonymous:             0 kB
55d0a0900000-55d0a0940000 r--p 00900000 fd:01 4242 /usr/bin/ward
Rss:                 256 kB
Anonymous:           256 kB
55d0a0940000-55d0a0950000 rw-p 00940000 fd:01 4242 /usr/bin/ward
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99 /usr/lib/libc.so.6
Anonymous:             0 kB
Swap:                  0 kB
7f0000100000-7f0000104000 r--p 00100000 fd:01 99 /usr/lib/libc.so.6
Anonymous:            16 kB
7f0000104000-7f0000108000 r--p 00104000 fd:01 99 /usr/lib/libc.so.6
Anonymous:             0 kB
Swap:                 16 kB
7f0000200000-7f0000201000 r--p 00000000 fd:01 77 /etc/ward/data.bin
Anonymous:             0 kB
7f0000300000-7f0000310000 r-xp 00000000 fd:01 55 /usr/lib/libnss_late.so.2
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
";

    /// The libraries mapped at startup (libnss_late was loaded later).
    const STARTUP: &[(usize, usize, u64)] = &[
        (0x7f0000000000, 0x7f0000100000, 99),
        (0x7f0000100000, 0x7f0000104000, 99),
        (0x7f0000104000, 0x7f0000108000, 99),
    ];

    #[test]
    fn only_clean_read_only_mappings_of_the_executable_and_libraries_are_released() {
        let found = clean_mappings(SMAPS, 4242, STARTUP);
        let ranges: Vec<(usize, usize)> = found.iter().map(|m| (m.start, m.len)).collect();
        assert_eq!(
            ranges,
            vec![
                (0x55d0a0000000, 0x100000),
                (0x55d0a0100000, 0x800000),
                (0x7f0000000000, 0x100000)
            ],
            "RELRO (anonymous pages, resident or swapped), writable data, other files, a library \
             loaded after startup and the vDSO stay mapped"
        );
    }

    #[test]
    fn releasing_keeps_the_process_running_its_code() {
        note_startup_libraries();
        let released = release_startup_memory();
        assert!(
            released > 0,
            "this test binary's text was found and released"
        );
        // Code and read-only data fault back in from the file.
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 500_500);
        assert_eq!(format!("{:?}", Some("still here")), "Some(\"still here\")");
    }
}
