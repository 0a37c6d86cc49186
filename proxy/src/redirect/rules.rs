//! The rules for a [`Spec`]: the exact text piped to `iptables-restore --noflush`,
//! `ip6tables-restore --noflush` or `nft -f -`, from the spec and from what is installed now.
//! Pure: [`super::apply`] reads the state and runs the tools.
//!
//! The order of the outbound rules is the promise: the proxy's own user first (its connections
//! are never redirected, so there is no loop), then loopback, the excluded networks and ports,
//! and only then the redirect. Everything is TCP: UDP (DNS) is never touched.

use super::{Cidr, Spec};
use std::net::IpAddr;

/// ward's chains in the nat table; the only chains `install` creates and `remove` deletes.
pub const INBOUND_CHAIN: &str = "WARD_INBOUND";
pub const OUTBOUND_CHAIN: &str = "WARD_OUTBOUND";
const CHAINS: [&str; 2] = [INBOUND_CHAIN, OUTBOUND_CHAIN];
/// The built-in chain that jumps to each of ward's.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)];

/// ward's nftables table: `table inet ward` (IPv4 and IPv6), or `table ip ward` on a host
/// without IPv6.
pub const NFT_TABLE: &str = "ward";

/// An IP version, for iptables (IPv4) or ip6tables (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `iptables-restore` or `ip6tables-restore`.
    pub fn restore_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// `iptables-save` or `ip6tables-save`.
    pub fn save_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, cidr: &Cidr) -> bool {
        matches!(
            (self, cidr.addr),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// ward's part of one nat table, read from `iptables-save -t nat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IptablesState {
    /// ward's chains that exist.
    pub chains: Vec<String>,
    /// Rules outside ward's chains that jump to one of them, as saved (`-A CHAIN ...`).
    pub jumps: Vec<String>,
}

impl IptablesState {
    /// ward's chains and the jumps to them in `save`, the output of `iptables-save -t nat`.
    pub fn parse(save: &str) -> Self {
        let mut state = Self::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
                continue;
            }
            if !in_nat {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("");
                if CHAINS.contains(&name) {
                    state.chains.push(name.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let mut words = rule.split_whitespace();
                let chain = words.next().unwrap_or("");
                let words: Vec<&str> = words.collect();
                let jumps_to_ward = words
                    .windows(2)
                    .any(|w| matches!(w[0], "-j" | "-g") && CHAINS.contains(&w[1]));
                if jumps_to_ward && !CHAINS.contains(&chain) {
                    state.jumps.push(line.to_owned());
                }
            }
        }
        state
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// `-D` lines for the jumps found, exactly as saved (a rule that is not there would fail
    /// the whole transaction, so only what was read is deleted).
    fn delete_jumps(&self, out: &mut String) {
        for jump in &self.jumps {
            out.push_str("-D ");
            out.push_str(&jump["-A ".len()..]);
            out.push('\n');
        }
    }
}

/// The rules of ward's two chains and the jumps to them, as `iptables-restore` lines.
pub fn iptables_rules(spec: &Spec, family: Family) -> Vec<String> {
    let mut r = Vec::new();
    // Inserted first: ward's redirect decides before any other nat rule of the namespace.
    for (builtin, chain) in JUMPS {
        r.push(format!("-I {builtin} 1 -p tcp -j {chain}"));
    }
    let inb = INBOUND_CHAIN;
    for ports in &spec.exclude_inbound_ports {
        r.push(format!(
            "-A {inb} -p tcp -m tcp --dport {} -j RETURN",
            ports.iptables()
        ));
    }
    r.push(format!(
        "-A {inb} -p tcp -j REDIRECT --to-ports {}",
        spec.inbound_port
    ));
    let out = OUTBOUND_CHAIN;
    r.push(format!(
        "-A {out} -m owner --uid-owner {} -j RETURN",
        spec.proxy_uid.get()
    ));
    r.push(format!("-A {out} -d {} -j RETURN", family.loopback()));
    for cidr in spec.exclude_cidrs.iter().filter(|c| family.holds(c)) {
        r.push(format!("-A {out} -d {cidr} -j RETURN"));
    }
    for ports in &spec.exclude_outbound_ports {
        r.push(format!(
            "-A {out} -p tcp -m tcp --dport {} -j RETURN",
            ports.iptables()
        ));
    }
    r.push(format!(
        "-A {out} -p tcp -j REDIRECT --to-ports {}",
        spec.outbound_port
    ));
    r
}

/// The `iptables-restore --noflush` input that installs `spec`, replacing whatever ward had
/// installed (`now`) in the same transaction: declaring an existing chain flushes it, and the
/// old jumps are deleted before the new ones are inserted.
pub fn iptables_install(spec: &Spec, family: Family, now: &IptablesState) -> String {
    let mut t = format!(
        "# ward redirect install: {} --noflush ({})\n*nat\n",
        family.restore_tool(),
        family.name()
    );
    for chain in CHAINS {
        t.push_str(&format!(":{chain} - [0:0]\n"));
    }
    now.delete_jumps(&mut t);
    for rule in iptables_rules(spec, family) {
        t.push_str(&rule);
        t.push('\n');
    }
    t.push_str("COMMIT\n");
    t
}

/// The `iptables-restore --noflush` input that removes ward's jumps and chains, or `None` when
/// there is nothing of ward's in the table.
pub fn iptables_remove(family: Family, now: &IptablesState) -> Option<String> {
    if now.is_empty() {
        return None;
    }
    let mut t = format!(
        "# ward redirect remove: {} --noflush ({})\n*nat\n",
        family.restore_tool(),
        family.name()
    );
    now.delete_jumps(&mut t);
    // Flush all before deleting any: one of ward's chains may still jump to another.
    for chain in &now.chains {
        t.push_str(&format!("-F {chain}\n"));
    }
    for chain in &now.chains {
        t.push_str(&format!("-X {chain}\n"));
    }
    t.push_str("COMMIT\n");
    Some(t)
}

/// The family of an nftables table named [`NFT_TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NftFamily {
    /// IPv4 and IPv6 in one table.
    Inet,
    /// IPv4 only, for a host without IPv6.
    Ip,
}

impl NftFamily {
    fn keyword(self) -> &'static str {
        match self {
            NftFamily::Inet => "inet",
            NftFamily::Ip => "ip",
        }
    }
}

/// ward's tables in `nft list tables` output (`table inet ward`, `table ip ward`).
pub fn nft_tables(list: &str) -> Vec<NftFamily> {
    let mut found = Vec::new();
    for line in list.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let family = match words.as_slice() {
            ["table", "inet", name] if *name == NFT_TABLE => NftFamily::Inet,
            ["table", "ip", name] if *name == NFT_TABLE => NftFamily::Ip,
            _ => continue,
        };
        if !found.contains(&family) {
            found.push(family);
        }
    }
    found
}

/// The `nft -f -` input that installs `spec` in ward's table of `family`, replacing it (and
/// deleting ward's table of the other family, `present`) in one transaction: `table` then
/// `delete table` makes the delete succeed whether or not the table existed.
pub fn nft_install(spec: &Spec, family: NftFamily, present: &[NftFamily]) -> String {
    let f = family.keyword();
    let mut t = "# ward redirect install: nft -f -\n".to_owned();
    for other in present.iter().filter(|&&p| p != family) {
        t.push_str(&format!("delete table {} {NFT_TABLE}\n", other.keyword()));
    }
    t.push_str(&format!(
        "table {f} {NFT_TABLE}\ndelete table {f} {NFT_TABLE}\ntable {f} {NFT_TABLE} {{\n"
    ));
    // priority -100: dstnat, where iptables' nat PREROUTING and OUTPUT run too.
    t.push_str("\tchain inbound {\n\t\ttype nat hook prerouting priority -100; policy accept;\n");
    for ports in &spec.exclude_inbound_ports {
        t.push_str(&format!("\t\ttcp dport {ports} return\n"));
    }
    t.push_str(&format!(
        "\t\tmeta l4proto tcp redirect to :{}\n\t}}\n",
        spec.inbound_port
    ));
    t.push_str("\tchain outbound {\n\t\ttype nat hook output priority -100; policy accept;\n");
    t.push_str(&format!("\t\tmeta skuid {} return\n", spec.proxy_uid.get()));
    let families: &[Family] = match family {
        NftFamily::Inet => &[Family::V4, Family::V6],
        NftFamily::Ip => &[Family::V4],
    };
    for &fam in families {
        let (selector, loopback) = match fam {
            Family::V4 => ("ip", "127.0.0.0/8"),
            Family::V6 => ("ip6", "::1"),
        };
        t.push_str(&format!("\t\t{selector} daddr {loopback} return\n"));
        for cidr in spec.exclude_cidrs.iter().filter(|c| fam.holds(c)) {
            t.push_str(&format!("\t\t{selector} daddr {cidr} return\n"));
        }
    }
    for ports in &spec.exclude_outbound_ports {
        t.push_str(&format!("\t\ttcp dport {ports} return\n"));
    }
    t.push_str(&format!(
        "\t\tmeta l4proto tcp redirect to :{}\n\t}}\n}}\n",
        spec.outbound_port
    ));
    t
}

/// The `nft -f -` input that deletes ward's tables, or `None` when there is none.
pub fn nft_remove(present: &[NftFamily]) -> Option<String> {
    if present.is_empty() {
        return None;
    }
    let mut t = "# ward redirect remove: nft -f -\n".to_owned();
    for family in present {
        t.push_str(&format!("delete table {} {NFT_TABLE}\n", family.keyword()));
    }
    Some(t)
}

/// Only what the unit tests need to build a spec by hand.
#[cfg(test)]
fn spec_for_tests(
    uid: u32,
    inbound: u16,
    outbound: u16,
    in_ports: &[&str],
    out_ports: &[&str],
    cidrs: &[&str],
) -> Spec {
    Spec {
        proxy_uid: super::ProxyUid(uid),
        inbound_port: inbound,
        outbound_port: outbound,
        exclude_inbound_ports: in_ports.iter().map(|p| p.parse().unwrap()).collect(),
        exclude_outbound_ports: out_ports.iter().map(|p| p.parse().unwrap()).collect(),
        exclude_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> Spec {
        spec_for_tests(1337, 15006, 15001, &[], &[], &[])
    }

    fn excluding() -> Spec {
        spec_for_tests(
            1337,
            15006,
            15001,
            &["22", "15020-15021"],
            &["53"],
            &["10.0.0.0/8", "fd00::/8", "192.0.2.7"],
        )
    }

    #[test]
    fn iptables_ipv4_rules_exempt_the_proxy_before_anything_is_redirected() {
        assert_eq!(
            iptables_rules(&excluding(), Family::V4),
            [
                "-I PREROUTING 1 -p tcp -j WARD_INBOUND",
                "-I OUTPUT 1 -p tcp -j WARD_OUTBOUND",
                "-A WARD_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                "-A WARD_INBOUND -p tcp -m tcp --dport 15020:15021 -j RETURN",
                "-A WARD_INBOUND -p tcp -j REDIRECT --to-ports 15006",
                "-A WARD_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
                "-A WARD_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                "-A WARD_OUTBOUND -d 10.0.0.0/8 -j RETURN",
                "-A WARD_OUTBOUND -d 192.0.2.7/32 -j RETURN",
                "-A WARD_OUTBOUND -p tcp -m tcp --dport 53 -j RETURN",
                "-A WARD_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn iptables_ipv6_rules_take_only_ipv6_networks() {
        let rules = iptables_rules(&excluding(), Family::V6);
        assert!(rules.contains(&"-A WARD_OUTBOUND -d ::1/128 -j RETURN".to_owned()));
        assert!(rules.contains(&"-A WARD_OUTBOUND -d fd00::/8 -j RETURN".to_owned()));
        assert!(!rules
            .iter()
            .any(|r| r.contains("10.0.0.0") || r.contains("127.")));
        // The uid exemption comes before every redirect, in both families.
        let uid = rules.iter().position(|r| r.contains("--uid-owner 1337"));
        let redirect = rules.iter().position(|r| r.contains("--to-ports 15001"));
        assert!(uid < redirect, "{rules:#?}");
    }

    #[test]
    fn iptables_install_with_nothing_installed() {
        assert_eq!(
            iptables_install(&plain(), Family::V4, &IptablesState::default()),
            "# ward redirect install: iptables-restore --noflush (IPv4)\n\
             *nat\n\
             :WARD_INBOUND - [0:0]\n\
             :WARD_OUTBOUND - [0:0]\n\
             -I PREROUTING 1 -p tcp -j WARD_INBOUND\n\
             -I OUTPUT 1 -p tcp -j WARD_OUTBOUND\n\
             -A WARD_INBOUND -p tcp -j REDIRECT --to-ports 15006\n\
             -A WARD_OUTBOUND -m owner --uid-owner 1337 -j RETURN\n\
             -A WARD_OUTBOUND -d 127.0.0.0/8 -j RETURN\n\
             -A WARD_OUTBOUND -p tcp -j REDIRECT --to-ports 15001\n\
             COMMIT\n"
        );
    }

    /// What `iptables-save -t nat` prints after an install beside other rules of the host.
    const SAVED: &str =
        "# Generated by iptables-save v1.8.9 (nf_tables) on Mon Dec  7 18:34:59 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:WARD_INBOUND - [0:0]
:WARD_OUTBOUND - [0:0]
-A PREROUTING -p tcp -j WARD_INBOUND
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -p tcp -j WARD_OUTBOUND
-A OUTPUT -m comment --comment \"not -j WARD_OUTBOUND\" -j DOCKER
-A WARD_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A WARD_OUTBOUND -m owner --uid-owner 1337 -j RETURN
-A WARD_OUTBOUND -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Mon Dec  7 18:34:59 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:WARD_INBOUND - [0:0]
-A INPUT -j WARD_INBOUND
COMMIT
";

    #[test]
    fn the_state_is_wards_chains_and_jumps_in_the_nat_table_only() {
        let state = IptablesState::parse(SAVED);
        assert_eq!(state.chains, ["WARD_INBOUND", "WARD_OUTBOUND"]);
        assert_eq!(
            state.jumps,
            [
                "-A PREROUTING -p tcp -j WARD_INBOUND",
                "-A OUTPUT -p tcp -j WARD_OUTBOUND"
            ]
        );
        assert!(IptablesState::parse("").is_empty());
        assert!(IptablesState::parse("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").is_empty());
    }

    #[test]
    fn a_second_install_replaces_the_first_in_one_transaction() {
        let now = IptablesState::parse(SAVED);
        let t = iptables_install(&excluding(), Family::V4, &now);
        // The old jumps go before the new ones come, so there is one of each after.
        let lines: Vec<&str> = t.lines().collect();
        let del = lines
            .iter()
            .position(|l| *l == "-D PREROUTING -p tcp -j WARD_INBOUND");
        let ins = lines
            .iter()
            .position(|l| *l == "-I PREROUTING 1 -p tcp -j WARD_INBOUND");
        assert!(del.is_some() && del < ins, "{t}");
        assert!(lines.contains(&"-D OUTPUT -p tcp -j WARD_OUTBOUND"), "{t}");
        // The other rules of the table are not named.
        assert!(!t.contains("DOCKER"), "{t}");
        assert_eq!(lines.iter().filter(|l| **l == "COMMIT").count(), 1, "{t}");
    }

    #[test]
    fn remove_deletes_only_wards_jumps_and_chains() {
        let t = iptables_remove(Family::V6, &IptablesState::parse(SAVED)).unwrap();
        assert_eq!(
            t,
            "# ward redirect remove: ip6tables-restore --noflush (IPv6)\n\
             *nat\n\
             -D PREROUTING -p tcp -j WARD_INBOUND\n\
             -D OUTPUT -p tcp -j WARD_OUTBOUND\n\
             -F WARD_INBOUND\n\
             -F WARD_OUTBOUND\n\
             -X WARD_INBOUND\n\
             -X WARD_OUTBOUND\n\
             COMMIT\n"
        );
        assert_eq!(iptables_remove(Family::V4, &IptablesState::default()), None);
    }

    #[test]
    fn nft_inet_table_for_both_families() {
        assert_eq!(
            nft_install(&excluding(), NftFamily::Inet, &[]),
            "# ward redirect install: nft -f -\n\
             table inet ward\n\
             delete table inet ward\n\
             table inet ward {\n\
             \tchain inbound {\n\
             \t\ttype nat hook prerouting priority -100; policy accept;\n\
             \t\ttcp dport 22 return\n\
             \t\ttcp dport 15020-15021 return\n\
             \t\tmeta l4proto tcp redirect to :15006\n\
             \t}\n\
             \tchain outbound {\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tmeta skuid 1337 return\n\
             \t\tip daddr 127.0.0.0/8 return\n\
             \t\tip daddr 10.0.0.0/8 return\n\
             \t\tip daddr 192.0.2.7/32 return\n\
             \t\tip6 daddr ::1 return\n\
             \t\tip6 daddr fd00::/8 return\n\
             \t\ttcp dport 53 return\n\
             \t\tmeta l4proto tcp redirect to :15001\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn nft_ip_table_without_ipv6_replaces_an_inet_one() {
        let t = nft_install(&excluding(), NftFamily::Ip, &[NftFamily::Inet]);
        assert!(t.contains("delete table inet ward\n"), "{t}");
        assert!(t.contains("table ip ward {\n"), "{t}");
        assert!(!t.contains("ip6 "), "{t}");
        assert!(t.contains("meta skuid 1337 return"), "{t}");
    }

    #[test]
    fn nft_tables_found_and_removed() {
        let list =
            "table ip nat\ntable inet ward\ntable ip6 ward\ntable ip ward\ntable inet wardx\n";
        assert_eq!(nft_tables(list), [NftFamily::Inet, NftFamily::Ip]);
        assert_eq!(
            nft_remove(&nft_tables(list)).unwrap(),
            "# ward redirect remove: nft -f -\ndelete table inet ward\ndelete table ip ward\n"
        );
        assert_eq!(nft_remove(&[]), None);
    }
}
