//! `ward server --config FILE` / `ward server --dev`.

use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};
use ward_config::server::ServerConfig;
use ward_config::Duration;

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
    let (config, temp_dir) = if cmd.dev {
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
        let mut cfg = ServerConfig::dev(dir, cmd.listen, cmd.leaf_ttl.map(|d| d.get()));
        if let Some(a) = cmd.admin_listen {
            cfg.admin.listen = a;
        }
        (cfg, temp)
    } else {
        let path = cmd.config.expect("clap requires --config without --dev");
        (ServerConfig::load(&path)?, None)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let result = rt.block_on(async move {
        let handle = ward_control_plane::build(config).await?;
        tracing::info!("listening role=grpc addr={}", handle.grpc_addr);
        tracing::info!("listening role=admin addr={}", handle.admin_addr);
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
