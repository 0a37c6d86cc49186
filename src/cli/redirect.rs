//! `ward redirect install|remove`: the nat rules of transparent mode, written with iptables or
//! nftables (`ward_proxy::redirect`).

use ward_proxy::redirect::apply::{self, Host, Plan};
use ward_proxy::redirect::{parse_port, Backend, Cidr, PortRange, ProxyUid, Spec};

#[derive(Debug, clap::Subcommand)]
pub enum RedirectCmd {
    /// Redirect this network namespace's TCP connections to the proxy: arriving ones to
    /// --inbound-port, outgoing ones to --outbound-port, except the proxy's own (--proxy-uid),
    /// loopback and the exclusions. Running it again replaces ward's rules in one transaction.
    Install {
        /// The user id the proxy runs as: its own connections are never redirected. 0 is
        /// refused (it would exempt every root process).
        #[arg(long, value_name = "UID", value_parser = parse_uid)]
        proxy_uid: ProxyUid,
        /// Where arriving connections go: the port of `[transparent] inbound_listen`.
        #[arg(long, value_name = "PORT", default_value = "15006", value_parser = port)]
        inbound_port: u16,
        /// Where outgoing connections go: the port of `[transparent] outbound_listen`.
        #[arg(long, value_name = "PORT", default_value = "15001", value_parser = port)]
        outbound_port: u16,
        /// Arriving connections to these ports are left alone (e.g. ssh, or the admin port a
        /// probe reads): PORT or FIRST-LAST, comma-separated or repeated.
        #[arg(long, value_name = "PORTS", value_delimiter = ',', value_parser = port_range)]
        exclude_inbound_ports: Vec<PortRange>,
        /// Outgoing connections to these ports are left alone: PORT or FIRST-LAST,
        /// comma-separated or repeated.
        #[arg(long, value_name = "PORTS", value_delimiter = ',', value_parser = port_range)]
        exclude_outbound_ports: Vec<PortRange>,
        /// Outgoing connections to these networks are left alone (IPv4 or IPv6, e.g.
        /// 10.0.0.0/8,fd00::/8), comma-separated or repeated.
        #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = cidr)]
        exclude_cidrs: Vec<Cidr>,
        #[command(flatten)]
        common: Common,
    },
    /// Delete ward's chains (or nftables table) and the jumps to them, leaving the rest of the
    /// tables as it was; does nothing, and exits 0, when nothing is installed.
    Remove {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// Which tool writes the rules: iptables (iptables-restore and ip6tables-restore, chains
    /// WARD_INBOUND and WARD_OUTBOUND in the nat table) or nftables (nft, `table inet ward`).
    #[arg(long, value_enum, default_value = "iptables")]
    backend: BackendArg,
    /// Print exactly what would be piped to the tools, and change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Iptables,
    Nftables,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Iptables => Backend::Iptables,
            BackendArg::Nftables => Backend::Nftables,
        }
    }
}

fn parse_uid(s: &str) -> Result<ProxyUid, String> {
    s.parse()
        .map_err(|e: ward_proxy::redirect::SpecError| e.to_string())
}

fn port(s: &str) -> Result<u16, String> {
    parse_port(s).map_err(|e| e.to_string())
}

fn port_range(s: &str) -> Result<PortRange, String> {
    s.parse()
        .map_err(|e: ward_proxy::redirect::SpecError| e.to_string())
}

fn cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
        .map_err(|e: ward_proxy::redirect::SpecError| e.to_string())
}

pub fn run(cmd: RedirectCmd) -> anyhow::Result<()> {
    let host = Host::probe();
    let (plan, common, done) = match cmd {
        RedirectCmd::Install {
            proxy_uid,
            inbound_port,
            outbound_port,
            exclude_inbound_ports,
            exclude_outbound_ports,
            exclude_cidrs,
            common,
        } => {
            let spec = Spec {
                proxy_uid,
                inbound_port,
                outbound_port,
                exclude_inbound_ports,
                exclude_outbound_ports,
                exclude_cidrs,
            };
            spec.check()?;
            let plan = apply::plan_install(&spec, common.backend.into(), host)?;
            let done = format!(
                "installed: inbound to port {inbound_port}, outbound to port {outbound_port}, \
                 uid {} exempt",
                proxy_uid.get()
            );
            (plan, common, done)
        }
        RedirectCmd::Remove { common } => {
            let plan = apply::plan_remove(common.backend.into(), host)?;
            (plan, common, "removed ward's redirect rules".to_owned())
        }
    };
    report(&plan, common, &done)
}

fn report(plan: &Plan, common: Common, done: &str) -> anyhow::Result<()> {
    for warning in &plan.warnings {
        eprintln!("WARNING: {warning}");
    }
    if common.dry_run {
        print!("{}", plan.text());
        for note in &plan.notes {
            println!("# {note}");
        }
        return Ok(());
    }
    apply::apply(plan)?;
    for note in &plan.notes {
        println!("{note}");
    }
    if !plan.steps.is_empty() {
        let tools: Vec<&str> = plan.steps.iter().map(|s| s.tool).collect();
        println!("{done} ({})", tools.join(", "));
    }
    Ok(())
}
