//! Port lists as `ward redirect` and `[transparent] exclude_inbound_ports` write them:
//! `22,8000-8080`. One parser, so the config and the flag it mirrors take the same text.

use std::ops::RangeInclusive;

/// Why a port or port range cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("{0:?} is not a port (expected 1 to 65535)")]
    Bad(String),
    #[error("{0:?} is not a port range: its first port is above its last")]
    Reversed(String),
}

/// A port number, 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, PortError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PortError::Bad(s.to_owned())),
    }
}

/// One port (`22`) or an inclusive range (`8000-8080`).
pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, PortError> {
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (parse_port(a)?, parse_port(b)?),
        None => {
            let p = parse_port(s)?;
            (p, p)
        }
    };
    if first > last {
        return Err(PortError::Reversed(s.to_owned()));
    }
    Ok(first..=last)
}

/// Comma-separated ports and ranges; an empty text is an empty list.
pub fn parse_list(s: &str) -> Result<Vec<RangeInclusive<u16>>, PortError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',').map(parse_range).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_takes_ports_and_ranges_as_the_flag_does() {
        assert_eq!(parse_list("22,8000-8080"), Ok(vec![22..=22, 8000..=8080]));
        assert_eq!(parse_list(""), Ok(vec![]));
        assert_eq!(parse_list("22,0"), Err(PortError::Bad("0".into())));
        assert_eq!(parse_list("9-8"), Err(PortError::Reversed("9-8".into())));
        assert_eq!(parse_list("1-70000"), Err(PortError::Bad("70000".into())));
        assert_eq!(parse_list("22,"), Err(PortError::Bad("".into())));
    }
}
