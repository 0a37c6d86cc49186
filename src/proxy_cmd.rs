//! `ward proxy`: load the config, start the sidecar, drain on SIGTERM.

use anyhow::Context;
use std::path::Path;
use tokio::signal::unix::{signal, SignalKind};
use ward_config::proxy::ProxyConfig;

pub fn run(path: &Path, check: bool, workers: Option<usize>) -> anyhow::Result<()> {
    // Before any thread exists: which libraries the release of startup memory may touch.
    ward_proxy::startup_memory::note_startup_libraries();
    // Buffers the data path frees are reused, not given back to the kernel and faulted in again.
    if !ward_proxy::heap::keep_freed_memory() {
        tracing::debug!("the allocator did not take the trim threshold");
    }
    let mut config = ProxyConfig::load(path)?;
    if check {
        // What start would refuse, without starting: every file it reads, every address it binds.
        let at = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
        match &config.credentials {
            ward_config::proxy::CredentialSource::Files { tls, .. } => {
                ward_proxy::files::load(tls, &config.service)
                    .map(drop)
                    .map_err(|e| at(&e))?
            }
            ward_config::proxy::CredentialSource::ControlPlane(cp) => {
                ward_control_client::check(cp, &config.service).map_err(|e| at(&e))?
            }
        }
        ward_proxy::check_user(&config).map_err(|e| at(&e))?;
        ward_proxy::check_listeners(&config).map_err(|e| at(&e))?;
        println!("{}: ok", path.display());
        return Ok(());
    }
    // The control-plane client checks its files (CA, token, state) before anything binds.
    let control = match &config.credentials {
        ward_config::proxy::CredentialSource::ControlPlane(cp) => Some(
            ward_control_client::prepare(cp, &config.service)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        ward_config::proxy::CredentialSource::Files { .. } => None,
    };
    // Warn only once the proxy is up: a config or bind error stays the one line on stderr.
    // Each forwarded connection holds two sockets.
    let limits = &mut config.limits;
    let capped = crate::nofile::fit_connection_limit(
        "limits.max_connections",
        &mut limits.max_connections,
        limits.max_connections_set,
        2,
    );

    let prometheus = ward_proxy::metrics::exporter()
        .install_recorder()
        .context("cannot install the metrics recorder")?;

    // One worker: a current-thread runtime. It has no LIFO slot, so a tunnel stream that
    // queues data and wakes its connection's task does not run that task next: the task
    // runs after the other ready streams and writes all their frames in one write (faster
    // and cheaper per request through a tunnel: perf/profile-notes.md, "Figures behind code
    // comments").
    let mut rt = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    let rt = rt.build().context("cannot start the runtime")?;
    rt.block_on(async move {
        let handle = ward_proxy::build(config, Some(prometheus))
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if let Some(warning) = capped {
            tracing::warn!("{warning}");
        }
        if let Some(prepared) = control {
            tokio::spawn(ward_control_client::run(
                prepared,
                handle.mesh(),
                handle.stopped(),
            ));
        }
        tokio::spawn(release_startup_memory_when_ready(handle.readiness()));
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let drained = async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                // POST /drain starts the same drain.
                _ = handle_drain_started(&handle) => {}
            }
            handle.drain();
            // A second signal exits at once.
            tokio::select! {
                _ = term.recv() => std::process::exit(1),
                _ = int.recv() => std::process::exit(1),
                _ = handle.wait() => {}
            }
        };
        drained.await;
        Ok(())
    })
}

/// Startup's code and heap are not needed once the proxy is ready (see
/// `ward_proxy::startup_memory`); polls readiness for at most two minutes.
async fn release_startup_memory_when_ready(ready: impl Fn() -> bool) {
    for _ in 0..2400 {
        if ready() {
            let released = ward_proxy::startup_memory::release_startup_memory();
            tracing::debug!(bytes = released, "released startup memory");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn handle_drain_started(handle: &ward_proxy::ProxyHandle) {
    handle.drain_started().await
}
