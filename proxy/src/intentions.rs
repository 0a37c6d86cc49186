//! The intentions snapshot the data plane reads: an index keyed by source, so a decision is
//! one or two hash lookups whatever the rule count, and never waits on the control plane.

use arc_swap::ArcSwapOption;
use std::collections::HashMap;
use std::sync::Arc;
use ward_config::intentions::{Action, Rule, Source};
use ward_config::{Name, SpiffeId};

/// Why the decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The rule at this index of the snapshot's rules.
    Rule(usize),
    /// No rule matched; the default policy applied.
    Default,
    /// The source's rule could not be enforced as written (security rule 6, fail closed,
    /// docs/security.md): denied.
    Unenforceable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.action == Action::Allow
    }
}

/// An immutable set of rules for one destination service.
#[derive(Debug)]
pub struct IntentionSnapshot {
    pub version: u64,
    pub default: Action,
    pub rules: Vec<Rule>,
    /// namespace -> service -> rule index. Sources without a namespace are filed under the
    /// destination's namespace.
    exact: HashMap<Name, HashMap<Name, usize>>,
    any: Option<usize>,
}

impl IntentionSnapshot {
    /// Indexes `rules` written for a destination in `local_namespace`.
    pub fn new(version: u64, default: Action, rules: Vec<Rule>, local_namespace: &Name) -> Self {
        let mut exact: HashMap<Name, HashMap<Name, usize>> = HashMap::new();
        let mut any = None;
        for (i, rule) in rules.iter().enumerate() {
            match &rule.source {
                Source::Any => {
                    any.get_or_insert(i);
                }
                Source::Service { namespace, name } => {
                    let ns = namespace.clone().unwrap_or_else(|| local_namespace.clone());
                    exact
                        .entry(ns)
                        .or_default()
                        .entry(name.clone())
                        .or_insert(i);
                }
            }
        }
        Self {
            version,
            default,
            rules,
            exact,
            any,
        }
    }

    /// Exact source beats `*`; no match falls to the default policy. The trust domain was
    /// already checked against ours by the verifier.
    pub fn decide(&self, peer: &SpiffeId) -> Decision {
        let idx = self
            .exact
            .get(peer.namespace.as_str())
            .and_then(|m| m.get(peer.service.as_str()))
            .copied()
            .or(self.any);
        match idx {
            Some(i) => Decision {
                action: self.rules[i].action,
                reason: Reason::Rule(i),
            },
            None => Decision {
                action: self.default,
                reason: Reason::Default,
            },
        }
    }
}

/// Holds the current snapshot; empty (deny everything) until the first one arrives.
pub struct IntentionStore {
    current: ArcSwapOption<IntentionSnapshot>,
    changed: tokio::sync::watch::Sender<u64>,
    /// Session-ticket keys to replace before a new snapshot is visible (security rule 8,
    /// resumption and early data, docs/security.md).
    tickets: std::sync::OnceLock<Arc<crate::tls::tickets::EpochTicketer>>,
}

impl std::fmt::Debug for IntentionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntentionStore")
    }
}

impl Default for IntentionStore {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            changed: tokio::sync::watch::channel(0).0,
            tickets: std::sync::OnceLock::new(),
        }
    }
}

impl IntentionStore {
    pub fn load(&self) -> Option<Arc<IntentionSnapshot>> {
        self.current.load_full()
    }

    /// The decision for `peer`, or `None` before the first snapshot (callers deny).
    pub fn decide(&self, peer: &SpiffeId, _destination: &Name) -> Option<Decision> {
        self.current.load().as_ref().map(|s| s.decide(peer))
    }

    /// Whether `peer` may reach `destination` now (deny before the first snapshot), counted
    /// in `ward_intention_decisions_total`.
    pub fn authorize(&self, peer: &SpiffeId, destination: &Name) -> bool {
        let allowed = self.decide(peer, destination).is_some_and(|d| d.is_allow());
        metrics::counter!(
            crate::metrics::INTENTION_DECISIONS,
            "source" => peer.service.to_string(),
            "destination" => destination.to_string(),
            "decision" => if allowed { "allow" } else { "deny" },
        )
        .increment(1);
        allowed
    }

    /// Publishes `snapshot` unless it is not newer than the one held (security rule 6, fail
    /// closed, docs/security.md). Returns whether it was taken.
    pub fn publish(&self, snapshot: IntentionSnapshot) -> bool {
        let version = snapshot.version;
        let current = self.current.load();
        if current.as_ref().is_some_and(|s| s.version >= version) {
            return false;
        }
        if current
            .as_ref()
            .is_some_and(|s| s.default == snapshot.default && s.rules == snapshot.rules)
        {
            // The same policy under a new version (every server start publishes one): take the
            // version, and keep the tickets and connections, which it would admit again.
            self.current.store(Some(Arc::new(snapshot)));
            return true;
        }
        // Forget every session ticket first, so no session admitted under the old rules can be
        // resumed once the new ones are in force.
        if let Some(t) = self.tickets.get() {
            t.rotate();
        }
        self.current.store(Some(Arc::new(snapshot)));
        self.changed.send_replace(version);
        true
    }

    /// Rotates `tickets` on every published snapshot, before it becomes visible.
    pub fn rotate_on_change(&self, tickets: Arc<crate::tls::tickets::EpochTicketer>) {
        let _ = self.tickets.set(tickets);
    }

    /// Wakes on every published version.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, svc: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://ward.local/ns/{ns}/svc/{svc}")).unwrap()
    }

    fn rule(src: &str, action: Action) -> Rule {
        Rule {
            source: Source::parse(src).unwrap(),
            action,
        }
    }

    #[test]
    fn precedence() {
        let ns = Name::new("default").unwrap();
        let s = IntentionSnapshot::new(
            1,
            Action::Deny,
            vec![
                rule("*", Action::Allow),
                rule("legacy", Action::Deny),
                rule("prod/web", Action::Allow),
            ],
            &ns,
        );
        assert_eq!(s.decide(&id("default", "legacy")).action, Action::Deny);
        assert_eq!(s.decide(&id("default", "legacy")).reason, Reason::Rule(1));
        assert_eq!(s.decide(&id("default", "order")).reason, Reason::Rule(0));
        assert_eq!(s.decide(&id("prod", "web")).reason, Reason::Rule(2));

        let s = IntentionSnapshot::new(1, Action::Deny, vec![rule("order", Action::Allow)], &ns);
        assert!(s.decide(&id("default", "order")).is_allow());
        // Same service name in another namespace is another identity.
        assert_eq!(s.decide(&id("other", "order")).reason, Reason::Default);
        assert!(!s.decide(&id("default", "rogue")).is_allow());
    }

    #[test]
    fn store_refuses_older_snapshots() {
        let ns = Name::new("default").unwrap();
        let store = IntentionStore::default();
        let local = Name::new("inventory").unwrap();
        assert!(store.decide(&id("default", "order"), &local).is_none());
        assert!(store.publish(IntentionSnapshot::new(2, Action::Allow, vec![], &ns)));
        assert!(!store.publish(IntentionSnapshot::new(1, Action::Deny, vec![], &ns)));
        assert!(store
            .decide(&id("default", "order"), &local)
            .unwrap()
            .is_allow());
    }

    #[test]
    fn a_new_version_of_the_same_policy_is_taken_without_a_change() {
        let ns = Name::new("default").unwrap();
        let store = IntentionStore::default();
        let local = Name::new("inventory").unwrap();
        let rules = || vec![rule("order", Action::Allow)];
        assert!(store.publish(IntentionSnapshot::new(2, Action::Deny, rules(), &ns)));
        let mut changes = store.subscribe();
        changes.mark_unchanged();
        assert!(store.publish(IntentionSnapshot::new(3, Action::Deny, rules(), &ns)));
        assert!(!changes.has_changed().unwrap(), "same rules and default");
        assert!(!store.publish(IntentionSnapshot::new(3, Action::Allow, vec![], &ns)));
        assert!(store.publish(IntentionSnapshot::new(4, Action::Allow, rules(), &ns)));
        assert!(changes.has_changed().unwrap(), "another default");
        assert!(store
            .decide(&id("default", "rogue"), &local)
            .unwrap()
            .is_allow());
    }
}
