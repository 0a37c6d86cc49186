//! The drain: `/ready` answers 503 at once, listeners keep accepting for `drain_delay` (so load
//! balancers and endpoint lists can drop this instance first), then stop; open connections may
//! finish, and whatever is still open at `drain_timeout` is closed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    /// `[limits] drain_delay`: how long listeners keep accepting after the drain starts.
    delay: Duration,
    /// Fires when the drain starts (`/ready` answers 503).
    pub started: CancellationToken,
    /// Fires `drain_delay` after the start: listeners stop accepting.
    pub stop_accepting: CancellationToken,
    /// Fires at the drain deadline: open connections are closed.
    pub force_close: CancellationToken,
    /// Every connection task, so a drain can wait for them.
    pub tracker: TaskTracker,
}

impl Drain {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts the drain: /ready turns 503 at once and the listeners stop accepting after
    /// `drain_delay`.
    pub fn begin_drain(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        self.started.cancel();
        let runtime = tokio::runtime::Handle::try_current();
        let (false, Ok(runtime)) = (self.delay.is_zero(), runtime) else {
            tracing::info!("draining: listeners closed, waiting for open connections");
            self.stop_accepting.cancel();
            return;
        };
        let delay = ward_config::Duration(self.delay);
        tracing::info!(%delay, "draining: /ready answers 503, listeners close after drain_delay");
        let stop_accepting = self.stop_accepting.clone();
        runtime.spawn(async move {
            tokio::time::sleep(delay.get()).await;
            tracing::info!("drain_delay over: listeners closed, waiting for open connections");
            stop_accepting.cancel();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn listeners_close_drain_delay_after_the_start() {
        let drain = Drain::new(Duration::from_secs(5));
        drain.begin_drain();
        assert!(drain.is_draining() && drain.started.is_cancelled());
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!drain.stop_accepting.is_cancelled(), "still accepting");
        tokio::time::timeout(Duration::from_secs(2), drain.stop_accepting.cancelled())
            .await
            .expect("listeners close once drain_delay has passed");
    }

    #[tokio::test]
    async fn without_a_delay_listeners_close_at_once() {
        let drain = Drain::new(Duration::ZERO);
        drain.begin_drain();
        assert!(drain.started.is_cancelled() && drain.stop_accepting.is_cancelled());
    }
}
