//! The operator CLI: `ward server`, `ward token`, `ward intention`, `ward ca`, `ward catalog`,
//! `ward redirect`.
//!
//! Admin commands read `WARD_ADDR` (https:// only), `WARD_TOKEN` (or `--token-file`) and
//! `WARD_CACERT` (or the matching flags) and talk to the server's `Admin` gRPC service.

pub mod admin;
pub mod ca;
pub mod catalog;
pub mod intention;
pub mod output;
pub mod redirect;
pub mod server;
pub mod token;

use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
}

/// Where the server is and how to authenticate to it.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The server's address, `https://host:port`.
    #[arg(long = "address", env = "WARD_ADDR", value_name = "URL")]
    pub address: Option<String>,
    /// The admin token. Discouraged on the command line: any local user can read a process's
    /// arguments (ps, /proc); prefer WARD_TOKEN or --token-file.
    #[arg(
        long = "token",
        env = "WARD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Read the admin token from FILE (one line; e.g. the server's admin.token). Takes the
    /// place of --token / WARD_TOKEN.
    #[arg(long = "token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signs the server's certificate.
    #[arg(long = "ca-cert", env = "WARD_CACERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Output format (default from WARD_FORMAT, else table).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::from_env().ok().flatten().unwrap_or_default())]
    pub output: Output,
}

impl Output {
    /// `WARD_FORMAT` (as `VAULT_FORMAT`): `None` when unset or empty.
    fn from_env() -> Result<Option<Output>, String> {
        match std::env::var("WARD_FORMAT") {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => Output::from_str(v.trim(), true).map(Some).map_err(|_| {
                format!("WARD_FORMAT={v:?} is not an output format (expected table or json)")
            }),
            Err(std::env::VarError::NotUnicode(_)) => Err("WARD_FORMAT is not UTF-8".to_owned()),
        }
    }

    /// The error for a bad `WARD_FORMAT`, if the parsed command took its format from it: the
    /// flag wins over the variable, and commands without `--output` never read it.
    pub fn env_error(matches: &clap::ArgMatches) -> Option<String> {
        let mut m = matches;
        while let Some((_, sub)) = m.subcommand() {
            m = sub;
        }
        let defaulted = m.ids().any(|id| id == "output")
            && m.value_source("output") == Some(clap::parser::ValueSource::DefaultValue);
        if defaulted {
            Output::from_env().err()
        } else {
            None
        }
    }
}

/// A tokio runtime for one CLI command.
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    Ok(rt.block_on(f))
}

/// An error and its sources as one line, `a: b: c`. A source whose text its wrapper already
/// printed is left out: some errors (tonic's `ConnectError`, a `#[error("...: {0}")]` that is
/// also the `#[source]`) both show their source and return it, which read "Connection refused
/// (os error 111): Connection refused (os error 111)".
pub fn error_line<'a>(
    chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut out = String::new();
    let mut shown = String::new();
    for e in chain {
        let text = e.to_string();
        if !shown.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        shown = text;
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::error_line;
    use std::error::Error;
    use std::fmt;

    /// Prints its source and returns it, as tonic's `ConnectError` does.
    #[derive(Debug)]
    struct Transparent(std::io::Error);
    impl fmt::Display for Transparent {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.fmt(f)
        }
    }
    impl Error for Transparent {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_source_already_shown_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(111);
        let e = anyhow::Error::new(Transparent(io)).context("cannot connect");
        let line = error_line(e.chain());
        assert_eq!(line.matches("os error 111").count(), 1, "{line}");
        assert!(line.starts_with("cannot connect: "), "{line}");
        // distinct links all stay
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_line(e.chain()), "outer: middle: inner");
    }
}
