//! `ward server --config FILE` / `ward server --dev`.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};
use ward_config::server::{CaConfig, ServerConfig};
use ward_config::Duration;
use ward_control_plane::storage::StorageError;
use ward_control_plane::ServerError;

#[derive(Debug, clap::Args)]
pub struct ServerCmd {
    /// The server's TOML config file.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        conflicts_with = "dev",
        required_unless_present = "dev"
    )]
    pub config: Option<PathBuf>,
    /// Development mode: defaults, a temporary data dir unless --data-dir, and the export lines
    /// (with the admin token) on stdout.
    #[arg(long)]
    pub dev: bool,
    /// With --dev: keep state in DIR.
    #[arg(long, value_name = "DIR", requires = "dev")]
    pub data_dir: Option<PathBuf>,
    /// With --dev: the gRPC listen address (default 127.0.0.1:8502).
    #[arg(long, value_name = "ADDR", requires = "dev")]
    pub listen: Option<SocketAddr>,
    /// With --dev: the admin listen address (default 127.0.0.1:8501).
    #[arg(long, value_name = "ADDR", requires = "dev")]
    pub admin_listen: Option<SocketAddr>,
    /// With --dev: the leaf certificate lifetime (default 24h).
    #[arg(long, value_name = "DURATION", requires = "dev")]
    pub leaf_ttl: Option<Duration>,
}

pub fn run(cmd: ServerCmd) -> anyhow::Result<()> {
    let dev = cmd.dev;
    let (mut config, temp_dir) = if cmd.dev {
        let (dir, temp) = match cmd.data_dir {
            Some(d) => (d, None),
            None => {
                // A fresh private directory (0700, unpredictable name): no one can pre-create it.
                let d = tempfile::Builder::new()
                    .prefix("ward-dev-")
                    .tempdir()
                    .context("cannot create a temporary data dir")?
                    .keep();
                (d.clone(), Some(d))
            }
        };
        let leaf_ttl = cmd.leaf_ttl.map(check_leaf_ttl).transpose()?;
        let mut cfg = ServerConfig::dev(dir, cmd.listen, leaf_ttl);
        if let Some(a) = cmd.admin_listen {
            cfg.admin.listen = a;
        }
        (cfg, temp)
    } else {
        let path = cmd.config.expect("clap requires --config without --dev");
        (ServerConfig::load(&path)?, None)
    };
    // Each gRPC connection holds one socket.
    let limits = &mut config.connections;
    let capped = crate::nofile::fit_connection_limit(
        "server.max_connections",
        &mut limits.max_connections,
        limits.max_connections_set,
        1,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let result = rt.block_on(async move {
        let handle = ward_control_plane::build(config).await.map_err(|e| {
            if dev {
                name_dev_flag(e)
            } else {
                e.into()
            }
        })?;
        tracing::info!("listening role=grpc addr={}", handle.grpc_addr);
        tracing::info!("listening role=admin addr={}", handle.admin_addr);
        // Once up: a config or bind error stays the one line on stderr.
        if let Some(warning) = capped {
            tracing::warn!("{warning}");
        }
        if let Some(lines) = handle.export_lines() {
            use std::io::Write;
            print!("{lines}");
            let _ = std::io::stdout().flush();
        } else if let Some(path) = &handle.admin_token_file {
            tracing::info!(
                "the admin token was written to {} (shown nowhere else)",
                path.display()
            );
        }
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            // POST /drain on the admin listener starts the same stop.
            () = handle.stop_requested() => {}
        }
        tracing::info!("stopping");
        handle.stop().await?;
        anyhow::Ok(())
    });
    if let Some(d) = temp_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    result
}

/// `--leaf-ttl` is refused, not clamped, outside what a config file's `[ca] leaf_ttl` allows.
fn check_leaf_ttl(ttl: Duration) -> anyhow::Result<std::time::Duration> {
    let max = CaConfig::default().intermediate_ttl;
    let ttl = ttl.get();
    if ttl < std::time::Duration::from_secs(1) || ttl > max {
        anyhow::bail!(
            "--leaf-ttl {}: must be at least 1s and at most the intermediate's lifetime, {}",
            Duration(ttl),
            Duration(max)
        );
    }
    Ok(ttl)
}

/// With `--dev` there is no config file: an error names the flag that set the value, not the
/// config key a file would have.
fn name_dev_flag(e: ServerError) -> anyhow::Error {
    match e {
        ServerError::Bind { key, addr, source } => {
            let flag = if key == "admin.listen" {
                "--admin-listen"
            } else {
                "--listen"
            };
            anyhow::Error::new(source).context(format!("cannot listen on {flag} {addr}"))
        }
        ServerError::NotEmpty { dir, found } => anyhow::anyhow!(
            "--data-dir {}: holds {found:?} and no ward state; a new CA is created only in an \
             empty directory",
            dir.display()
        ),
        // The directory checks (security rule 11) say which key they checked.
        ServerError::Storage(StorageError::File { path, reason })
            if reason.starts_with("data_dir ") =>
        {
            anyhow::anyhow!(
                "{}: --data-dir {}",
                path.display(),
                &reason["data_dir ".len()..]
            )
        }
        e => e.into(),
    }
}
