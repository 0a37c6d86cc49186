//! The drain: listeners stop accepting, open connections may finish, and whatever is still
//! open at `drain_timeout` is closed.

use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    /// Fires when the drain starts: listeners stop accepting.
    pub stop_accepting: CancellationToken,
    /// Fires at the drain deadline: open connections are closed.
    pub force_close: CancellationToken,
    /// Every connection task, so a drain can wait for them.
    pub tracker: TaskTracker,
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts the drain: /ready turns 503 at once and the listeners stop accepting.
    pub fn begin_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: listeners closed, waiting for open connections");
        }
        self.stop_accepting.cancel();
    }
}
