//! `ward redirect install|remove`: the nat rules that send a pod's TCP connections to its
//! sidecar (transparent mode).
//!
//! - [`Spec`] and its parts: what the operator asked for, each value checked as it is parsed.
//! - [`rules`]: the rules for a spec, a pure function of it and of what is installed now (the
//!   text piped to `iptables-restore --noflush` or `nft -f -`).
//! - [`apply`]: reads the current state and runs the system tools, one transaction each.
//!
//! Connections arriving at the namespace go to the inbound port; connections it opens go to
//! the outbound port, except those of the proxy's own user (no loop), to loopback, to an
//! excluded CIDR or port. Only ward's own chains (`WARD_INBOUND`, `WARD_OUTBOUND` and one jump
//! to each) or its own nftables table (`ward`) are written, so `remove` restores what was there.

pub mod apply;
pub mod rules;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A value of a `ward redirect` flag that cannot be used. The flag itself is named by the
/// caller (clap, or [`Spec::check`] for the rules between flags).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("uid 0 is refused: exempting root would leave every root process unredirected")]
    RootUid,
    #[error("{0:?} is not a user id (expected a number from 1 to 4294967294)")]
    BadUid(String),
    #[error("{0:?} is not a port (expected 1 to 65535)")]
    BadPort(String),
    #[error("{0:?} is not a port range: its first port is above its last")]
    ReversedRange(String),
    #[error("{0:?} is not a CIDR (expected an address with an optional /prefix, e.g. 10.0.0.0/8 or fd00::/8)")]
    BadCidr(String),
    #[error("{cidr:?} has bits set past its /{prefix} prefix (did you mean {network}?)")]
    HostBits {
        cidr: String,
        prefix: u8,
        network: String,
    },
    #[error("--inbound-port and --outbound-port are both {0}: they must be two listeners")]
    SamePorts(u16),
}

/// The proxy's user id, whose own connections are never redirected. Never 0: every root
/// process would then pass unredirected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyUid(u32);

impl ProxyUid {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for ProxyUid {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        // u32::MAX is (uid_t)-1, "no user" to the kernel.
        match s.trim().parse::<u32>() {
            Ok(0) => Err(SpecError::RootUid),
            Ok(u32::MAX) | Err(_) => Err(SpecError::BadUid(s.to_owned())),
            Ok(uid) => Ok(Self(uid)),
        }
    }
}

/// A port number, 1 to 65535.
pub fn parse_port(s: &str) -> Result<u16, SpecError> {
    ward_config::ports::parse_port(s).map_err(SpecError::from)
}

impl From<ward_config::ports::PortError> for SpecError {
    fn from(e: ward_config::ports::PortError) -> Self {
        match e {
            ward_config::ports::PortError::Bad(s) => SpecError::BadPort(s),
            ward_config::ports::PortError::Reversed(s) => SpecError::ReversedRange(s),
        }
    }
}

/// One port (`22`) or an inclusive range (`8000-8080`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let range = ward_config::ports::parse_range(s)?;
        Ok(Self {
            first: *range.start(),
            last: *range.end(),
        })
    }
}

impl PortRange {
    /// As iptables' `--dport` writes it: `22` or `8000:8080`.
    fn iptables(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }
}

impl fmt::Display for PortRange {
    /// As nftables and the flag write it: `22` or `8000-8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A network: an address and a prefix length, with no bit set past the prefix (a typo such as
/// `10.0.0.1/8` is refused rather than silently widened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::BadCidr(s.to_owned());
        let t = s.trim();
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: "+8" or " 8" are typos, not prefixes.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        let network = mask(addr, prefix);
        if network != addr {
            return Err(SpecError::HostBits {
                cidr: s.to_owned(),
                prefix,
                network: format!("{network}/{prefix}"),
            });
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// What `ward redirect install` is asked for, each value already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub proxy_uid: ProxyUid,
    /// Where connections arriving at the namespace go (`[transparent] inbound_listen`).
    pub inbound_port: u16,
    /// Where connections the namespace opens go (`[transparent] outbound_listen`).
    pub outbound_port: u16,
    /// Destination ports of arriving connections left alone.
    pub exclude_inbound_ports: Vec<PortRange>,
    /// Destination ports of outgoing connections left alone.
    pub exclude_outbound_ports: Vec<PortRange>,
    /// Destination networks of outgoing connections left alone.
    pub exclude_cidrs: Vec<Cidr>,
}

impl Spec {
    /// The rules between flags (each flag's own value is checked as it is parsed).
    pub fn check(&self) -> Result<(), SpecError> {
        if self.inbound_port == self.outbound_port {
            return Err(SpecError::SamePorts(self.inbound_port));
        }
        Ok(())
    }
}

/// Which system tool writes the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore` / `ip6tables-restore`: chains in the nat table.
    Iptables,
    /// `nft`: a table of ward's own.
    Nftables,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_zero_and_garbage_are_refused() {
        assert_eq!("0".parse::<ProxyUid>(), Err(SpecError::RootUid));
        assert!(SpecError::RootUid.to_string().contains("root"));
        assert_eq!("1337".parse::<ProxyUid>().map(ProxyUid::get), Ok(1337));
        for bad in ["", "-1", "root", "4294967295", "4294967296", "1.5"] {
            assert_eq!(
                bad.parse::<ProxyUid>(),
                Err(SpecError::BadUid(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ports_and_ranges() {
        assert_eq!(parse_port("15001"), Ok(15001));
        for bad in ["0", "65536", "", "x", "-1"] {
            assert_eq!(
                parse_port(bad),
                Err(SpecError::BadPort(bad.to_owned())),
                "{bad:?}"
            );
        }
        let r: PortRange = "8000-8080".parse().unwrap();
        assert_eq!((r.first, r.last), (8000, 8080));
        assert_eq!(
            (r.to_string(), r.iptables()),
            ("8000-8080".into(), "8000:8080".into())
        );
        let one: PortRange = "22".parse().unwrap();
        assert_eq!(
            (one.to_string(), one.iptables()),
            ("22".into(), "22".into())
        );
        assert_eq!(
            "9-8".parse::<PortRange>(),
            Err(SpecError::ReversedRange("9-8".into()))
        );
        assert_eq!(
            "1-70000".parse::<PortRange>(),
            Err(SpecError::BadPort("70000".into()))
        );
        assert_eq!(
            "0-5".parse::<PortRange>(),
            Err(SpecError::BadPort("0".into()))
        );
    }

    #[test]
    fn cidrs_are_checked_not_widened() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(SpecError::HostBits {
                cidr: "10.0.0.1/8".into(),
                prefix: 8,
                network: "10.0.0.0/8".into()
            })
        );
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "example.com",
            "",
        ] {
            assert_eq!(
                bad.parse::<Cidr>(),
                Err(SpecError::BadCidr(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn inbound_and_outbound_ports_must_differ() {
        let spec = Spec {
            proxy_uid: ProxyUid(1337),
            inbound_port: 15001,
            outbound_port: 15001,
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            exclude_cidrs: vec![],
        };
        let e = spec.check().unwrap_err();
        assert!(e.to_string().contains("--inbound-port"), "{e}");
        assert!(e.to_string().contains("--outbound-port"), "{e}");
    }
}
