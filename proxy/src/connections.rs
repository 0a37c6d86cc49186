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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{id, intentions, snapshot};
    use ward_config::intentions::Action;

    fn local() -> Name {
        Name::new("inventory").unwrap()
    }

    /// Replaces the intentions with `default` and `allow` as exceptions, at `version`.
    fn publish(store: &IntentionStore, version: u64, default: Action, allow: &[&str]) {
        assert!(store.publish(snapshot(version, default, allow)));
    }

    #[test]
    fn a_connection_denied_by_the_time_it_registers_is_closed_at_once() {
        let registry = Arc::new(ConnectionRegistry::default());
        let allow_order = intentions(Action::Deny, &["order"]);
        let order = registry.register(
            id("order"),
            CancellationToken::new(),
            &allow_order,
            &local(),
        );
        assert!(!order.close.is_cancelled(), "allowed");
        let rogue = registry.register(
            id("rogue"),
            CancellationToken::new(),
            &allow_order,
            &local(),
        );
        assert!(rogue.close.is_cancelled(), "denied");
        let none_yet = IntentionStore::default();
        let early = registry.register(id("order"), CancellationToken::new(), &none_yet, &local());
        assert!(early.close.is_cancelled(), "no intentions yet: denied");
    }

    #[test]
    fn revalidation_closes_only_what_the_new_intentions_deny() {
        let registry = Arc::new(ConnectionRegistry::default());
        let store = intentions(Action::Deny, &["order", "payments"]);
        let register =
            |peer: &str| registry.register(id(peer), CancellationToken::new(), &store, &local());
        let (order, payments) = (register("order"), register("payments"));
        assert_eq!(registry.revalidate(&store, &local()), 0, "nothing changed");
        publish(&store, 2, Action::Deny, &["payments"]);
        assert_eq!(registry.revalidate(&store, &local()), 1);
        assert!(order.close.is_cancelled());
        assert!(!payments.close.is_cancelled());
        // A connection already closed is not counted again.
        assert_eq!(registry.revalidate(&store, &local()), 0);
    }

    #[test]
    fn a_connection_leaves_the_registry_when_it_ends() {
        let registry = Arc::new(ConnectionRegistry::default());
        let store = intentions(Action::Allow, &[]);
        let order = registry.register(id("order"), CancellationToken::new(), &store, &local());
        assert_eq!(registry.len(), 1);
        drop(order);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_new_intentions_version_closes_the_connections_it_denies() {
        let registry = Arc::new(ConnectionRegistry::default());
        let store = intentions(Action::Deny, &["order"]);
        let order = registry.register(id("order"), CancellationToken::new(), &store, &local());
        let stop = CancellationToken::new();
        let watch = tokio::spawn(watch_intentions(
            registry.clone(),
            store.clone(),
            local(),
            stop.clone(),
        ));
        // Let the watch subscribe (this runtime has one thread: it runs until it waits).
        tokio::task::yield_now().await;
        publish(&store, 2, Action::Deny, &[]);
        let closed =
            tokio::time::timeout(std::time::Duration::from_secs(10), order.close.cancelled()).await;
        assert!(closed.is_ok(), "the deny closed the connection");
        stop.cancel();
        watch.await.unwrap();
    }
}
