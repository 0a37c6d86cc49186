//! The `ward` binary: sidecar, operator CLI and demo in one.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod cert_inspect;
mod cli;
mod demo;
mod nofile;
mod proxy_cmd;

/// `0.1.0 (abc1234)`: the version and the git revision it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("WARD_REVISION"), ")");

#[derive(Parser)]
#[command(
    name = "ward",
    version = VERSION,
    about = "ward: a service-mesh sidecar with mutual TLS and intentions enforced in the handshake"
)]
struct Cli {
    /// Log format on stderr: `text` (default), or `json` for one JSON object a line. Default
    /// from WARD_LOG_FORMAT.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// How `ward proxy`, `ward server` and the demo's processes write their logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line an event: time, level, message, fields.
    Text,
    /// One JSON object a line: `timestamp`, `level`, `message`, the fields, `target`.
    Json,
}

impl LogFormat {
    /// The flag, else `WARD_LOG_FORMAT`, else text. Read here rather than by clap so that a bad
    /// value's error names the variable.
    fn resolve(flag: Option<LogFormat>) -> Result<LogFormat, String> {
        if let Some(f) = flag {
            return Ok(f);
        }
        match std::env::var("WARD_LOG_FORMAT") {
            Err(std::env::VarError::NotPresent) => Ok(LogFormat::Text),
            Ok(v) if v.trim().is_empty() => Ok(LogFormat::Text),
            Ok(v) => LogFormat::from_str(&v, true).map_err(|_| {
                format!("WARD_LOG_FORMAT={v:?} is not a log format (expected text or json)")
            }),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err("WARD_LOG_FORMAT is not UTF-8".to_owned())
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Proxy {
        /// The proxy's TOML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Check what start would, then exit: the config, the files it reads, and that every
        /// listen address can be bound (bound, then released).
        #[arg(long)]
        check: bool,
        /// Runtime worker threads (default: one per core).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Run the control plane.
    Server(cli::server::ServerCmd),
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: cli::token::TokenCmd,
    },
    /// Intentions: which service may call which.
    Intention {
        #[command(subcommand)]
        command: cli::intention::IntentionCmd,
    },
    /// The mesh CA: trust domain and roots.
    Ca {
        #[command(subcommand)]
        command: cli::ca::CaCmd,
    },
    /// The catalog: registered services and their sidecar addresses.
    Catalog {
        #[command(subcommand)]
        command: cli::catalog::CatalogCmd,
    },
    /// Transparent mode's nat rules: redirect this network namespace's TCP connections to the
    /// proxy (iptables or nftables).
    Redirect {
        #[command(subcommand)]
        command: cli::redirect::RedirectCmd,
    },
    /// Play the whole story on this machine: two services behind sidecars and a rogue client.
    Demo {
        /// Leave after the attacks and the order instead of staying up until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Certificate tools.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Print the version and the git revision it was built from.
    Version,
    /// Print a shell completion script, e.g. `source <(ward completion bash)`.
    Completion {
        /// The shell the script is for.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Decode a PEM certificate: SPIFFE ID, issuer, validity.
    Inspect {
        /// A PEM file of one or more certificates.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// The level filter: `WARD_LOG`, else `RUST_LOG`, else `info`. A value that does not parse is
/// an error naming the variable: a typo must not silently run at another level.
fn log_filter() -> Result<tracing_subscriber::EnvFilter, String> {
    for var in ["WARD_LOG", "RUST_LOG"] {
        let value = match std::env::var(var) {
            Ok(v) if v.trim().is_empty() => continue,
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => continue,
            Err(std::env::VarError::NotUnicode(_)) => return Err(format!("{var} is not UTF-8")),
        };
        return tracing_subscriber::EnvFilter::builder()
            .parse(&value)
            .map_err(|e| format!("{var}={value:?} is not a log filter: {e}").replace('\n', " "));
    }
    Ok(tracing_subscriber::EnvFilter::new("info"))
}

/// Logs go to stderr, timestamps in RFC 3339 UTC (the default timer) in both formats. Colour
/// only for a person: stderr is a terminal and `NO_COLOR` is unset or empty.
fn init_logging(format: LogFormat) -> Result<(), String> {
    let filter = log_filter()?;
    let stderr = std::io::stderr;
    match format {
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(stderr)
                .with_ansi(ansi)
                .with_target(false)
                .init();
        }
        LogFormat::Json => {
            // `message` at the top level, next to `timestamp` and `level`, as in other
            // tools' JSON logs.
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_env_filter(filter)
                .with_writer(stderr)
                .with_ansi(false)
                .init();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // The revision the root build script found, for `ward_build_info` on /metrics.
    ward_proxy::process_metrics::set_revision(env!("WARD_REVISION"));
    let matches = Cli::command().get_matches();
    if let Some(e) = cli::Output::env_error(&matches) {
        return usage_error(&e);
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let log_format = match LogFormat::resolve(cli.log_format) {
        Ok(f) => f,
        Err(e) => return usage_error(&e),
    };
    // The long-running commands log; the demo's processes check the filter themselves.
    if matches!(cli.command, Command::Proxy { .. } | Command::Server(_)) {
        if let Err(e) = init_logging(log_format) {
            return usage_error(&e);
        }
    }
    // `intention check` keeps 1 for deny, so its errors exit 2 (as `consul intention check`).
    let error_code = match &cli.command {
        Command::Intention {
            command: cli::intention::IntentionCmd::Check { .. },
        } => 2,
        _ => 1,
    };
    let result = match cli.command {
        Command::Proxy {
            config,
            check,
            workers,
        } => proxy_cmd::run(&config, check, workers.map(usize::from)).map(|()| ExitCode::SUCCESS),
        Command::Server(cmd) => cli::server::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Token { command } => cli::token::run(command).map(|()| ExitCode::SUCCESS),
        Command::Intention { command } => cli::intention::run(command),
        Command::Ca { command } => cli::ca::run(command).map(|()| ExitCode::SUCCESS),
        Command::Catalog { command } => cli::catalog::run(command).map(|()| ExitCode::SUCCESS),
        Command::Redirect { command } => cli::redirect::run(command).map(|()| ExitCode::SUCCESS),
        Command::Demo { once } => demo::run(once, log_format).map(|()| ExitCode::SUCCESS),
        Command::Cert {
            command: CertCommand::Inspect { file },
        } => cert_inspect::run(&file).map(|()| ExitCode::SUCCESS),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ward", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("ward {VERSION}");
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One sentence on stderr, naming what is at fault.
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(error_code)
        }
    }
}

/// A bad flag or variable: one line, exit code 2 as for clap's own usage errors.
fn usage_error(e: &str) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

fn one_line(e: &anyhow::Error) -> String {
    cli::error_line(e.chain())
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command, flag and argument explains itself in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                // clap's own --help / --version carry their text.
                if matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                // A command explains itself in its parent's list too.
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "ward", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
