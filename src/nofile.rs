//! The open-file limit, and the connection caps that must fit in it (security rule 15, bounds,
//! docs/security.md).

/// File descriptors kept aside for listeners, files and the admin API.
const RESERVED_FDS: u64 = 64;

/// Raises the soft open-file limit to the hard one, then caps `max_connections` (`key` in the
/// config; each connection holds `fds_per_connection` descriptors) to what the limit allows.
/// Returns the warning to log once the process is up: the limit could not be raised, or the
/// operator `set` the value and it had to be capped. A default is capped silently: it was never
/// a promise.
pub fn fit_connection_limit(
    key: &str,
    max_connections: &mut usize,
    set: bool,
    fds_per_connection: u64,
) -> Option<String> {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(l) => l,
        Err(e) => return Some(format!("cannot raise the open file limit: {e}")),
    };
    let fits = usize::try_from(limit.saturating_sub(RESERVED_FDS) / fds_per_connection.max(1))
        .unwrap_or(usize::MAX)
        .max(1);
    if *max_connections <= fits {
        return None;
    }
    let message = format!(
        "{key} = {} exceeds what the open file limit {limit} allows; using {fits}",
        *max_connections
    );
    *max_connections = fits;
    if set {
        Some(message)
    } else {
        tracing::debug!("{message} (the default)");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::fit_connection_limit;

    /// More connections than any open-file limit allows.
    const HUGE: usize = 1 << 40;

    #[test]
    fn a_default_is_capped_silently() {
        let mut max = HUGE;
        assert_eq!(
            fit_connection_limit("limits.max_connections", &mut max, false, 2),
            None
        );
        assert!(max < HUGE);
    }

    #[test]
    fn a_value_set_is_capped_with_a_warning_naming_both() {
        let mut max = HUGE;
        let warning =
            fit_connection_limit("server.max_connections", &mut max, true, 1).expect("a warning");
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0;
        assert!(
            warning.starts_with(&format!("server.max_connections = {HUGE} exceeds"))
                && warning.contains(&format!("open file limit {limit} allows; using {max}")),
            "{warning}"
        );
    }

    #[test]
    fn a_value_that_fits_is_kept() {
        let mut max = 1;
        assert_eq!(
            fit_connection_limit("limits.max_connections", &mut max, true, 2),
            None
        );
        assert_eq!(max, 1);
    }
}
