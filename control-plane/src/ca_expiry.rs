//! When the CA's certificates end: the figures `ward_ca_expiry_timestamp_seconds{ca}` exports
//! and the warning the server logs well before either ends.
//!
//! The warning starts once a third of a certificate's life is left: the point at which a CA
//! that renews itself (at two thirds of its life) would already have replaced it, so from there
//! on an operator has to act. For the default intermediate (8760h) that is four months ahead.

use crate::ca::Ca;
use time::OffsetDateTime;

/// One certificate's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From this moment on, the server warns.
    fn warn_from(&self) -> OffsetDateTime {
        self.not_after - (self.not_after - self.not_before) / 3
    }
}

/// The validity of the active root and of the intermediate that signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaExpiry {
    pub root: Option<Validity>,
    pub intermediate: Validity,
}

impl CaExpiry {
    pub fn of(ca: &Ca) -> Self {
        Self {
            // Roots are kept active first.
            root: ca.roots().first().map(|r| Validity {
                not_before: r.not_before,
                not_after: r.not_after,
            }),
            intermediate: Validity {
                not_before: ca.intermediate_not_before(),
                not_after: ca.intermediate_not_after(),
            },
        }
    }

    /// One line per certificate that has a third of its life or less left at `now`.
    pub fn warnings(&self, now: OffsetDateTime) -> Vec<String> {
        let mut out = Vec::new();
        let certs = [
            ("intermediate", Some(self.intermediate)),
            ("root", self.root),
        ];
        for (which, validity) in certs {
            let Some(v) = validity else { continue };
            if now < v.warn_from() {
                continue;
            }
            let left = v.not_after - now;
            out.push(if left.is_negative() {
                format!("the {which} CA certificate expired at {}", v.not_after)
            } else {
                format!(
                    "the {which} CA certificate expires at {} (in {} days): replace it before then",
                    v.not_after,
                    left.whole_days()
                )
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn year_from(start: OffsetDateTime) -> Validity {
        Validity {
            not_before: start,
            not_after: start + Duration::days(360),
        }
    }

    #[test]
    fn warns_once_a_third_of_the_life_is_left() {
        let start = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let e = CaExpiry {
            root: Some(Validity {
                not_before: start,
                not_after: start + Duration::days(3600),
            }),
            intermediate: year_from(start),
        };
        assert!(e.warnings(start + Duration::days(239)).is_empty());
        let w = e.warnings(start + Duration::days(241));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("intermediate") && w[0].contains("in 119 days"),
            "{w:?}"
        );
        let w = e.warnings(start + Duration::days(361));
        assert!(
            w[0].contains("the intermediate CA certificate expired"),
            "{w:?}"
        );
        let w = e.warnings(start + Duration::days(2401));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[1].contains("root") && w[1].contains("in 1199 days"),
            "{w:?}"
        );
    }
}
