//! Durations written as `"500ms"`, `"2s"`, `"15m"`, `"1h"`, `"1h30m"`.

use std::fmt;

/// A duration that does not parse: the text as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like \"500ms\", \"2s\", \"15m\" or \"1h\"")]
pub struct DurationError(pub String);

/// A duration parsed from the config's human form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }

    /// Parses a sequence of `<integer><unit>` with units ms, s, m, h, d.
    pub fn parse(s: &str) -> Result<Self, DurationError> {
        let bad = || DurationError(s.to_owned());
        if s.is_empty() {
            return Err(bad());
        }
        let mut total = std::time::Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = match &rest[..unit_len] {
                "ms" => std::time::Duration::from_millis(1),
                "s" => std::time::Duration::from_secs(1),
                "m" => std::time::Duration::from_secs(60),
                "h" => std::time::Duration::from_secs(3600),
                "d" => std::time::Duration::from_secs(86400),
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            let part = unit
                .checked_mul(u32::try_from(n).map_err(|_| bad())?)
                .ok_or_else(bad)?;
            total = total.checked_add(part).ok_or_else(bad)?;
        }
        Ok(Self(total))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl std::str::FromStr for Duration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as D;

    #[test]
    fn parses() {
        assert_eq!(Duration::parse("500ms").unwrap().0, D::from_millis(500));
        assert_eq!(Duration::parse("2s").unwrap().0, D::from_secs(2));
        assert_eq!(Duration::parse("15m").unwrap().0, D::from_secs(900));
        assert_eq!(Duration::parse("1h30m").unwrap().0, D::from_secs(5400));
        assert_eq!(
            Duration::parse("87600h").unwrap().0,
            D::from_secs(87600 * 3600)
        );
        for bad in ["", "ten", "10", "s", "1x", "-1s", "1.5s", " 1s"] {
            assert_eq!(
                Duration::parse(bad),
                Err(DurationError(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn displays() {
        assert_eq!(Duration::parse("24h").unwrap().to_string(), "24h");
        assert_eq!(Duration::parse("90s").unwrap().to_string(), "90s");
        assert_eq!(Duration::parse("250ms").unwrap().to_string(), "250ms");
    }
}
