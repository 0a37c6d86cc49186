//! How glibc's allocator keeps the memory the data path frees.
//!
//! A bulk stream allocates and frees buffers of up to 64 KiB many thousand times a second:
//! socket reads, TLS records, HTTP/2 frames. With glibc's default (a 128 KiB trim threshold),
//! each free that leaves more than that free at the top of the heap gives it back to the kernel,
//! and the next allocation faults fresh zeroed pages in again: a profile of both hops under one
//! iperf3 stream spent about a tenth of their CPU in page faults, page clearing and memory-cgroup
//! charging. Keeping up to `TRIM_THRESHOLD` free for reuse took single-stream bulk through the
//! two hops from 4.1-4.5 to 5.0-5.3 Gbit/s in the same run (perf/profile-notes.md, "L4 bulk and
//! the crypto provider").
//!
//! The cost is bounded: at most `TRIM_THRESHOLD` of freed memory stays resident per malloc
//! arena after a burst (glibc makes up to 8 arenas per core, as threads contend; `--workers 1`
//! runs one thread). The startup release (`startup_memory.rs`) still trims everything once,
//! when the proxy becomes ready. Setting the threshold also fixes glibc's mmap threshold at its
//! 128 KiB default (it no longer grows with use): the data path's buffers are at most 64 KiB,
//! so they stay on the heap; this is the setting that was measured.

/// Free memory at the top of a heap that glibc keeps instead of returning it to the kernel.
pub const TRIM_THRESHOLD: usize = 8 << 20;

/// Sets the trim threshold; whether the allocator took it (always false off glibc).
pub fn keep_freed_memory() -> bool {
    set_trim_threshold(TRIM_THRESHOLD)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_trim_threshold(bytes: usize) -> bool {
    let Ok(value) = libc::c_int::try_from(bytes) else {
        return false;
    };
    // SAFETY: mallopt only changes a tuning parameter of the allocator; it takes no pointer and
    // is safe to call at any time.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, value) };
    rc == 1
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_trim_threshold(_bytes: usize) -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #[test]
    fn glibc_takes_the_trim_threshold() {
        assert!(super::keep_freed_memory());
    }
}
