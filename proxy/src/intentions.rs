//! The intentions snapshot the data plane reads: an index keyed by source, so a decision is
//! one or two hash lookups whatever the rule count, and never waits on the control plane.
//!
//! A rule with L7 permissions admits its source's connections (an L4 allow) and decides each
//! request by its permissions, compiled once here when the snapshot is built; the http inbound
//! asks [`IntentionStore::decide_request`] on every request, so a new snapshot applies to the
//! next request of an open connection.

use crate::l7::authorize::{self, CompiledPermissions};
use arc_swap::ArcSwapOption;
use http::{HeaderMap, Method};
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

/// The decision for one request on an http inbound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestDecision {
    /// The caller's decision as the handshake takes it, on the current snapshot.
    pub l4: Decision,
    /// For an L7 rule, what its permissions decided; `None` for an L4 rule (or an L4 deny).
    pub l7: Option<authorize::Decision>,
}

impl RequestDecision {
    pub fn is_allow(&self) -> bool {
        self.l4.is_allow() && self.l7.is_none_or(|d| d.is_allow())
    }
}

/// A rule's permissions, as compiled when the snapshot is built.
#[derive(Debug)]
enum L7 {
    /// An L4 rule.
    None,
    Compiled(CompiledPermissions),
    /// Permissions this build cannot compile: the rule denies its source (fail closed).
    Unenforceable,
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
    /// The compiled permissions of `rules[i]`.
    l7: Vec<L7>,
}

impl IntentionSnapshot {
    /// Indexes `rules` written for a destination in `local_namespace` and compiles their
    /// permissions. A rule whose permissions cannot be compiled denies its source and counts in
    /// `ward_intention_errors_total` (security rule 6, fail closed, docs/security.md).
    pub fn new(version: u64, default: Action, rules: Vec<Rule>, local_namespace: &Name) -> Self {
        let mut exact: HashMap<Name, HashMap<Name, usize>> = HashMap::new();
        let mut any = None;
        let mut l7 = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            l7.push(match &rule.permissions {
                None => L7::None,
                Some(p) => match CompiledPermissions::compile(p) {
                    Ok(c) => L7::Compiled(c),
                    Err(e) => {
                        metrics::counter!(crate::metrics::INTENTION_ERRORS).increment(1);
                        tracing::warn!(
                            source = %rule.source,
                            "an intention whose permissions cannot be compiled denies its source: {e}"
                        );
                        L7::Unenforceable
                    }
                },
            });
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
            l7,
        }
    }

    /// Exact source beats `*`; no match falls to the default policy. The trust domain was
    /// already checked against ours by the verifier.
    /// An L7 rule admits its source here; its requests are decided by [`Self::decide_request`].
    pub fn decide(&self, peer: &SpiffeId) -> Decision {
        let idx = self
            .exact
            .get(peer.namespace.as_str())
            .and_then(|m| m.get(peer.service.as_str()))
            .copied()
            .or(self.any);
        match idx {
            Some(i) if matches!(self.l7[i], L7::Unenforceable) => Decision {
                action: Action::Deny,
                reason: Reason::Unenforceable,
            },
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

    /// One request of `peer`: its L4 decision, then, for an L7 rule, the first permission that
    /// matches (none: deny). `path` is the normalized path ([`crate::l7::path::normalize`]).
    pub fn decide_request(
        &self,
        peer: &SpiffeId,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> RequestDecision {
        let l4 = self.decide(peer);
        let l7 = match (l4.action, l4.reason) {
            (Action::Allow, Reason::Rule(i)) => match &self.l7[i] {
                L7::Compiled(c) => Some(c.decide(method, path, headers)),
                L7::None | L7::Unenforceable => None,
            },
            _ => None,
        };
        RequestDecision { l4, l7 }
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

    /// The decision for one request of `peer` on the current snapshot (see
    /// [`IntentionSnapshot::decide_request`]), or `None` before the first snapshot (deny).
    pub fn decide_request(
        &self,
        peer: &SpiffeId,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<RequestDecision> {
        self.current
            .load()
            .as_ref()
            .map(|s| s.decide_request(peer, method, path, headers))
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
        Rule::l4(Source::parse(src).unwrap(), action)
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

    fn l7_rule(src: &str, toml: &str) -> Rule {
        let raw = ward_config::permission::RawRule::from_toml(toml).unwrap();
        Rule::l7(Source::parse(src).unwrap(), raw.permissions().unwrap())
    }

    fn get(path: &str) -> (Method, String, HeaderMap) {
        (Method::GET, path.to_owned(), HeaderMap::new())
    }

    #[test]
    fn an_l7_rule_admits_the_connection_and_decides_each_request() {
        let ns = Name::new("default").unwrap();
        let s = IntentionSnapshot::new(
            1,
            Action::Deny,
            vec![
                l7_rule(
                    "order",
                    r#"permissions = [
  { action = "allow", path_prefix = "/stock/", methods = ["GET"] },
  { action = "deny", path_exact = "/admin" },
]"#,
                ),
                rule("web", Action::Allow),
            ],
            &ns,
        );
        let order = id("default", "order");
        assert!(s.decide(&order).is_allow(), "the handshake admits it");
        let (m, p, h) = get("/stock/1");
        let d = s.decide_request(&order, &m, &p, &h);
        assert!(d.is_allow());
        assert_eq!(d.l7.map(|d| d.permission), Some(Some(0)));
        let (m, p, h) = get("/admin");
        let d = s.decide_request(&order, &m, &p, &h);
        assert!(!d.is_allow());
        assert_eq!(d.l7.map(|d| d.permission), Some(Some(1)));
        // No permission matches: deny.
        let d = s.decide_request(&order, &Method::POST, "/stock/1", &h);
        assert_eq!(
            d.l7.map(|d| (d.permission, d.action)),
            Some((None, Action::Deny))
        );
        assert!(!d.is_allow());
        // An L4 rule decides every request as its handshake; no rule: the default.
        let d = s.decide_request(&id("default", "web"), &m, "/admin", &h);
        assert!(d.is_allow() && d.l7.is_none());
        let d = s.decide_request(&id("default", "rogue"), &m, "/stock/1", &h);
        assert!(!d.is_allow() && d.l7.is_none());
    }

    #[test]
    fn permissions_that_cannot_be_compiled_deny_their_source() {
        let ns = Name::new("default").unwrap();
        let bad = ward_config::permission::Permission {
            action: Action::Allow,
            path: Some(ward_config::permission::PathMatch::Regex("(".into())),
            methods: vec![],
            headers: vec![],
        };
        let s = IntentionSnapshot::new(
            1,
            Action::Allow,
            vec![Rule::l7(Source::parse("order").unwrap(), vec![bad])],
            &ns,
        );
        let order = id("default", "order");
        assert_eq!(
            s.decide(&order),
            Decision {
                action: Action::Deny,
                reason: Reason::Unenforceable
            }
        );
        let (m, p, h) = get("/");
        assert!(!s.decide_request(&order, &m, &p, &h).is_allow());
        assert!(
            s.decide(&id("default", "web")).is_allow(),
            "others keep the default"
        );
    }

    #[test]
    fn a_change_of_permissions_alone_is_a_new_policy() {
        let ns = Name::new("default").unwrap();
        let store = IntentionStore::default();
        let local = Name::new("inventory").unwrap();
        let rules = |prefix: &str| {
            vec![l7_rule(
                "order",
                &format!(r#"permissions = [{{ action = "allow", path_prefix = "{prefix}" }}]"#),
            )]
        };
        assert!(store.publish(IntentionSnapshot::new(2, Action::Deny, rules("/a"), &ns)));
        let mut changes = store.subscribe();
        changes.mark_unchanged();
        assert!(store.publish(IntentionSnapshot::new(3, Action::Deny, rules("/a"), &ns)));
        assert!(!changes.has_changed().unwrap(), "same permissions");
        assert!(store.publish(IntentionSnapshot::new(4, Action::Deny, rules("/b"), &ns)));
        assert!(changes.has_changed().unwrap(), "other permissions");
        let order = id("default", "order");
        let h = HeaderMap::new();
        let decide = |p: &str| {
            store
                .decide_request(&order, &Method::GET, p, &h)
                .unwrap()
                .is_allow()
        };
        assert!(decide("/b") && !decide("/a"));
        assert!(store.decide(&order, &local).unwrap().is_allow());
    }
}
