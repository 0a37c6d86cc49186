//! Applying [`super::rules`]: read what is installed with the system tools, build the
//! transactions, and pipe each to its tool (`iptables-restore --noflush`,
//! `ip6tables-restore --noflush`, `nft -f -`).

use super::rules::{self, Family, IptablesState, NftFamily};
use super::{Backend, Spec};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Why the rules could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("`{tool}` was not found on the PATH (install {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("`{tool}` could not be run: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    #[error(
        "the IPv6 rules were refused, so the IPv4 rules just installed were removed again: {0}"
    )]
    Ipv6AfterIpv4(Box<ApplyError>),
}

/// What the host offers: found once, passed in so that planning is the same in a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// The kernel has IPv6 in this network namespace.
    pub ipv6: bool,
    /// `ip6tables-restore` and `ip6tables-save` are on the PATH.
    pub ip6tables: bool,
}

impl Host {
    pub fn probe() -> Self {
        Self {
            // Present whenever IPv6 is, even with no address configured yet.
            ipv6: Path::new("/proc/net/if_inet6").exists(),
            ip6tables: on_path("ip6tables-restore") && on_path("ip6tables-save"),
        }
    }
}

/// One run of a tool with its whole input: one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub tool: &'static str,
    pub args: &'static [&'static str],
    pub input: String,
}

/// What `install` or `remove` will do; `--dry-run` prints it and stops there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Said loudly on stderr (IPv6 left out, and why).
    pub warnings: Vec<String>,
    /// Said on stdout when there is nothing to do.
    pub notes: Vec<String>,
    /// An install with iptables: if the IPv6 step fails, remove the IPv4 rules it just wrote.
    undo_ipv4_if_ipv6_fails: bool,
}

impl Plan {
    /// Exactly what would be piped to the tools, in order (each input starts with a comment
    /// naming its tool).
    pub fn text(&self) -> String {
        self.steps.iter().map(|s| s.input.as_str()).collect()
    }
}

/// `--noflush`: only what the input names changes; `--wait`: queue behind another writer of
/// the tables instead of failing.
const RESTORE_ARGS: &[&str] = &["--wait", "--noflush"];
const NFT_ARGS: &[&str] = &["-f", "-"];

/// The IP versions ward writes on this host with iptables, and a warning for a missing IPv6.
fn iptables_families(host: Host) -> (Vec<Family>, Option<String>) {
    if !host.ipv6 {
        let why = "this host has no IPv6 (no /proc/net/if_inet6): only IPv4 connections are \
                   redirected";
        (vec![Family::V4], Some(why.to_owned()))
    } else if !host.ip6tables {
        let why = "ip6tables-restore or ip6tables-save is not on the PATH: only IPv4 \
                   connections are redirected, IPv6 ones are NOT";
        (vec![Family::V4], Some(why.to_owned()))
    } else {
        (vec![Family::V4, Family::V6], None)
    }
}

/// The steps that install `spec`, from what is installed now (read with the tools).
pub fn plan_install(spec: &Spec, backend: Backend, host: Host) -> Result<Plan, ApplyError> {
    let mut plan = Plan::default();
    match backend {
        Backend::Iptables => {
            let (families, warning) = iptables_families(host);
            plan.warnings.extend(warning);
            plan.undo_ipv4_if_ipv6_fails = true;
            for family in families {
                let now = read_iptables(family)?;
                plan.steps.push(Step {
                    tool: family.restore_tool(),
                    args: RESTORE_ARGS,
                    input: rules::iptables_install(spec, family, &now),
                });
            }
        }
        Backend::Nftables => {
            let family = if host.ipv6 {
                NftFamily::Inet
            } else {
                plan.warnings.push(
                    "this host has no IPv6 (no /proc/net/if_inet6): `table ip ward`, only IPv4 \
                     connections are redirected"
                        .to_owned(),
                );
                NftFamily::Ip
            };
            let present = read_nft()?;
            plan.steps.push(Step {
                tool: "nft",
                args: NFT_ARGS,
                input: rules::nft_install(spec, family, &present),
            });
        }
    }
    Ok(plan)
}

/// The steps that remove ward's rules; none (and a note) when nothing of ward's is installed.
pub fn plan_remove(backend: Backend, host: Host) -> Result<Plan, ApplyError> {
    let mut plan = Plan::default();
    match backend {
        Backend::Iptables => {
            let (families, warning) = iptables_families(host);
            plan.warnings.extend(warning);
            for family in families {
                match rules::iptables_remove(family, &read_iptables(family)?) {
                    Some(input) => plan.steps.push(Step {
                        tool: family.restore_tool(),
                        args: RESTORE_ARGS,
                        input,
                    }),
                    None => plan.notes.push(format!(
                        "nothing to remove: no ward chain in the {} nat table",
                        family.name()
                    )),
                }
            }
        }
        Backend::Nftables => match rules::nft_remove(&read_nft()?) {
            Some(input) => plan.steps.push(Step {
                tool: "nft",
                args: NFT_ARGS,
                input,
            }),
            None => plan
                .notes
                .push("nothing to remove: no nftables table named ward".to_owned()),
        },
    }
    Ok(plan)
}

/// Runs the steps in order. Each step is one transaction; if an install's IPv6 step fails
/// after its IPv4 one was applied, the IPv4 rules are removed again so that one family is never
/// redirected without the other.
pub fn apply(plan: &Plan) -> Result<(), ApplyError> {
    // Parse and check every input first (`--test` commits nothing): a typo in one family then
    // changes nothing in either.
    for step in plan.steps.iter().filter(|s| s.tool != "nft") {
        let mut args = vec!["--test"];
        args.extend(step.args);
        run(step.tool, &args, &step.input)?;
    }
    for (i, step) in plan.steps.iter().enumerate() {
        if let Err(e) = run(step.tool, step.args, &step.input) {
            if plan.undo_ipv4_if_ipv6_fails && i > 0 && step.tool == Family::V6.restore_tool() {
                let undo = rules::iptables_remove(Family::V4, &read_iptables(Family::V4)?);
                if let Some(input) = undo {
                    run(Family::V4.restore_tool(), RESTORE_ARGS, &input)?;
                }
                return Err(ApplyError::Ipv6AfterIpv4(Box::new(e)));
            }
            return Err(e);
        }
    }
    Ok(())
}

fn read_iptables(family: Family) -> Result<IptablesState, ApplyError> {
    let save = run(family.save_tool(), &["-t", "nat"], "")?;
    Ok(IptablesState::parse(&save))
}

fn read_nft() -> Result<Vec<NftFamily>, ApplyError> {
    Ok(rules::nft_tables(&run("nft", &["list", "tables"], "")?))
}

fn package(tool: &str) -> &'static str {
    if tool == "nft" {
        "nftables"
    } else {
        "iptables"
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| std::fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file()))
    })
}

/// Runs `tool args` with `input` on stdin; its stdout, or an error with its stderr.
fn run(tool: &'static str, args: &[&str], input: &str) -> Result<String, ApplyError> {
    let child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApplyError::ToolMissing {
                tool,
                package: package(tool),
            })
        }
        Err(source) => return Err(ApplyError::Spawn { tool, source }),
    };
    // A tool that exits early closes its stdin; its exit status then says why.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| ApplyError::Spawn { tool, source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        return Err(ApplyError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: stderr.join("; "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_ipv6_or_ip6tables_only_ipv4_is_written_and_said_loudly() {
        let (families, warning) = iptables_families(Host {
            ipv6: true,
            ip6tables: true,
        });
        assert_eq!((families, warning), (vec![Family::V4, Family::V6], None));
        let (families, warning) = iptables_families(Host {
            ipv6: true,
            ip6tables: false,
        });
        assert_eq!(families, [Family::V4]);
        assert!(warning.unwrap().contains("ip6tables-restore"));
        let (families, warning) = iptables_families(Host {
            ipv6: false,
            ip6tables: true,
        });
        assert_eq!(families, [Family::V4]);
        assert!(warning.unwrap().contains("no IPv6"));
    }

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let e = run("ward-no-such-tool-nft", &[], "").unwrap_err();
        assert!(matches!(e, ApplyError::ToolMissing { .. }), "{e:?}");
        let e = ApplyError::ToolMissing {
            tool: "nft",
            package: package("nft"),
        };
        assert_eq!(
            e.to_string(),
            "`nft` was not found on the PATH (install nftables)"
        );
    }

    #[test]
    fn a_failing_tool_reports_its_stderr_on_one_line() {
        let e = run(
            "sh",
            &["-c", "echo 'line one' >&2; echo >&2; echo two >&2; exit 3"],
            "",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("`sh` failed (exit status: 3): line one; two"),
            "{text}"
        );
    }
}
