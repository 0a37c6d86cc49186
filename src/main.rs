//! The `ward` binary: sidecar, operator CLI and demo in one.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod cert_inspect;
mod cli;
mod demo;
mod proxy_cmd;

#[derive(Parser)]
#[command(
    name = "ward",
    version,
    about = "ward: a service-mesh sidecar with mutual TLS and intentions enforced in the handshake"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Proxy {
        /// The proxy's TOML config file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Validate the config (and load the certificate files) and exit.
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
}

#[derive(Subcommand)]
enum CertCommand {
    /// Decode a PEM certificate: SPIFFE ID, issuer, validity.
    Inspect { file: PathBuf },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Proxy {
            config,
            check,
            workers,
        } => {
            init_logging();
            proxy_cmd::run(&config, check, workers.map(usize::from))
        }
        Command::Server(cmd) => {
            init_logging();
            cli::server::run(cmd)
        }
        Command::Token { command } => cli::token::run(command),
        Command::Intention { command } => cli::intention::run(command),
        Command::Ca { command } => cli::ca::run(command),
        Command::Catalog { command } => cli::catalog::run(command),
        Command::Demo { once } => demo::run(once),
        Command::Cert {
            command: CertCommand::Inspect { file },
        } => cert_inspect::run(&file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One sentence on stderr, naming what is at fault.
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}
