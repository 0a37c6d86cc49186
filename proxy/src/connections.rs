//! Registry of forwarded inbound connections, so an intention that turns to deny closes the
//! connections it no longer allows (security rule 10, deny closes what it no longer allows,
//! docs/security.md).

use crate::intentions::IntentionStore;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use ward_config::{Name, SpiffeId};

struct Tracked {
    peer: SpiffeId,
    close: CancellationToken,
}

/// The open inbound connections and who they belong to.
#[derive(Default)]
pub struct ConnectionRegistry {
    next: AtomicU64,
    conns: DashMap<u64, Tracked>,
}

/// Removes its connection from the registry when dropped; `closed()` fires on a deny.
pub struct Registration {
    registry: Arc<ConnectionRegistry>,
    id: u64,
    pub close: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.conns.remove(&self.id);
    }
}

impl ConnectionRegistry {
    /// Registers a connection before its first byte is forwarded, then checks it against the
    /// current snapshot: a change published between the handshake's decision and this
    /// registration is caught here, one published after it by [`Self::revalidate`].
    pub fn register(
        self: &Arc<Self>,
        peer: SpiffeId,
        close: CancellationToken,
        intentions: &IntentionStore,
        local: &Name,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns.insert(
            id,
            Tracked {
                peer: peer.clone(),
                close: close.clone(),
            },
        );
        if !intentions
            .decide(&peer, local)
            .is_some_and(|d| d.is_allow())
        {
            close.cancel();
        }
        Registration {
            registry: self.clone(),
            id,
            close,
        }
    }

    /// Closes every registered connection the current snapshot denies; returns how many.
    pub fn revalidate(&self, intentions: &IntentionStore, local: &Name) -> usize {
        let mut closed = 0;
        for entry in self.conns.iter() {
            let t = entry.value();
            if t.close.is_cancelled() {
                continue;
            }
            if !intentions
                .decide(&t.peer, local)
                .is_some_and(|d| d.is_allow())
            {
                t.close.cancel();
                closed += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// Re-checks open connections on every new intentions version until `stop` fires.
pub async fn watch_intentions(
    registry: Arc<ConnectionRegistry>,
    intentions: Arc<IntentionStore>,
    local: Name,
    stop: CancellationToken,
) {
    let mut rx = intentions.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let n = registry.revalidate(&intentions, &local);
        if n > 0 {
            tracing::info!(
                closed = n,
                "closed connections that the new intentions deny"
            );
        }
    }
}
