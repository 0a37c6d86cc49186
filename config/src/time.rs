//! The wall clock as ward counts certificate validity and record timestamps.

/// Seconds since the Unix epoch (0 if the clock reads earlier).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
