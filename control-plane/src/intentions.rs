//! The intentions store: validation, versioned snapshots, and `check`.
//!
//! Rules: one intention per source and destination; `*` only as a source; an L4 rule has an
//! action, an L7 rule has permissions and is accepted only for a destination registered as
//! `http`. Every change bumps one global version, persisted with the change, and publishes a new
//! immutable snapshot on a `watch` channel that the `Mesh.WatchIntentions` streams follow.

use crate::storage::{intention_key, IntentionRecord, Storage, StorageError};
use base64::Engine;
use prost::Message;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use tokio::sync::watch;
use ward_config::identity::{IdentityError, Name};
use ward_config::intentions::{Action, Source};
use ward_config::permission::PermissionError;
use ward_proto::v1;

/// A service in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: Name,
    pub name: Name,
}

impl ServiceRef {
    /// `svc` (namespace `default`) or `ns/svc`.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        match s.split_once('/') {
            Some((ns, svc)) => Ok(Self {
                namespace: Name::new(ns)?,
                name: Name::new(svc)?,
            }),
            None => Ok(Self {
                namespace: Name::default_namespace(),
                name: Name::new(s)?,
            }),
        }
    }

    /// From the proto form; an empty namespace is `default`.
    pub fn from_proto(r: &v1::ServiceRef) -> Result<Self, IdentityError> {
        Ok(Self {
            namespace: if r.namespace.is_empty() {
                Name::default_namespace()
            } else {
                Name::new(&r.namespace)?
            },
            name: Name::new(&r.name)?,
        })
    }

    pub fn to_proto(&self) -> v1::ServiceRef {
        v1::ServiceRef {
            name: self.name.to_string(),
            namespace: self.namespace.to_string(),
        }
    }

    /// `svc` in the default namespace, else `ns/svc`.
    pub fn display_short(&self) -> String {
        if self.namespace.as_str() == "default" {
            self.name.to_string()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What an intention does.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    L4(Action),
    /// Ordered permissions, kept in their proto form for the proxies.
    L7(Vec<v1::Permission>),
}

/// A validated intention.
#[derive(Debug, Clone, PartialEq)]
pub struct Intention {
    pub destination: ServiceRef,
    /// Canonical: a service in the destination's namespace has `namespace: None`.
    pub source: Source,
    pub kind: Kind,
    pub version: u64,
    pub created_at: i64,
}

/// Why an intention was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum IntentionError {
    #[error("source {0:?}: {1}")]
    Source(String, IdentityError),
    #[error("destination {0:?}: {1}")]
    Destination(String, IdentityError),
    #[error("destination must be a service, not \"*\"")]
    WildcardDestination,
    #[error("an intention has either an action (allow or deny) or permissions, not both")]
    ActionAndPermissions,
    #[error("action is required: allow or deny (or permissions for an http destination)")]
    NoAction,
    #[error(transparent)]
    Permission(#[from] PermissionError),
    #[error("L7 permissions need an http destination; {0} is not registered as http")]
    NotHttp(String),
    #[error("an intention from {from} to {to} already exists")]
    Exists { from: String, to: String },
    #[error("no intention from {from} to {to}")]
    NotFound { from: String, to: String },
    #[error("\"*\" is not a caller; check a concrete source service")]
    WildcardCheck,
    #[error(transparent)]
    Storage(#[from] Arc<StorageError>),
}

/// Why a stored intention could not be read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("{0}")]
    Name(#[from] IdentityError),
    #[error("{0}")]
    Source(IntentionError),
    #[error("action {0:?}")]
    Action(String),
    #[error("{0}")]
    Base64(#[from] base64::DecodeError),
    #[error("{0}")]
    Permission(#[from] prost::DecodeError),
}

/// A stored intention this build cannot read, named by its storage key.
#[derive(Debug, thiserror::Error)]
#[error("intention {key}: {reason}")]
pub struct LoadError {
    pub key: String,
    pub reason: RecordError,
}

/// A decision and the rule that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// For an L7 rule: `Allow` (the connection is admitted, requests are judged one by one).
    pub action: Action,
    pub rule: Option<Intention>,
    pub reason: String,
}

/// An immutable view of the policy at one version: every intention and the default. Its version
/// changes with either, so a proxy that holds a version holds exactly this policy.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: u64,
    /// What applies when no intention matches.
    pub default: Action,
    pub rules: BTreeMap<String, Intention>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            version: 0,
            default: Action::Deny,
            rules: BTreeMap::new(),
        }
    }
}

/// The version after `current`: above it, and at least the wall clock in microseconds since the
/// Unix epoch. Proxies ignore a snapshot whose version is not above the one they hold (security
/// rule 6, fail closed, docs/security.md), so versions must keep rising across restarts, and also
/// when a `data_dir` is restored from a backup whose stored version is older than what proxies
/// hold: tying them to the clock puts every new version above any published before it (the clock
/// moving forward between them). Below 2^53 until the year 2255, so JSON readers keep it exact.
pub fn next_version(current: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    current.saturating_add(1).max(now)
}

impl Snapshot {
    /// The intentions whose destination is `dest`.
    pub fn for_destination<'a>(
        &'a self,
        dest: &'a ServiceRef,
    ) -> impl Iterator<Item = &'a Intention> {
        self.rules.values().filter(move |i| &i.destination == dest)
    }

    /// Exact source beats `*`; no match falls to `default`.
    pub fn check(&self, source: &ServiceRef, dest: &ServiceRef, default: Action) -> Decision {
        let mut wildcard = None;
        for i in self.for_destination(dest) {
            match &i.source {
                Source::Any => wildcard = Some(i),
                Source::Service { namespace, name } => {
                    let ns = namespace.as_ref().unwrap_or(&dest.namespace);
                    if ns == &source.namespace && name == &source.name {
                        return decision(i, "the intention for this source");
                    }
                }
            }
        }
        match wildcard {
            Some(i) => decision(i, "the intention for any source (*)"),
            None => Decision {
                action: default,
                rule: None,
                reason: format!(
                    "no intention from {} to {} matches; the default policy is {default}",
                    source, dest
                ),
            },
        }
    }
}

fn decision(i: &Intention, which: &str) -> Decision {
    match &i.kind {
        Kind::L4(a) => Decision {
            action: *a,
            rule: Some(i.clone()),
            reason: format!("{which} says {a}"),
        },
        Kind::L7(p) => Decision {
            action: Action::Allow,
            rule: Some(i.clone()),
            reason: format!(
                "{which} has {} L7 permission(s); each request is judged by them, one that matches none is denied",
                p.len()
            ),
        },
    }
}

fn canonical_source(s: &str, dest: &ServiceRef) -> Result<Source, IntentionError> {
    let src = Source::parse(s).map_err(|e| IntentionError::Source(s.to_owned(), e))?;
    Ok(match src {
        Source::Service {
            namespace: Some(ns),
            name,
        } if ns == dest.namespace => Source::Service {
            namespace: None,
            name,
        },
        other => other,
    })
}

fn action_from_proto(a: i32) -> Option<Action> {
    match v1::Action::try_from(a).ok()? {
        v1::Action::Allow => Some(Action::Allow),
        v1::Action::Deny => Some(Action::Deny),
        v1::Action::Unspecified => None,
    }
}

pub fn action_to_proto(a: Action) -> v1::Action {
    match a {
        Action::Allow => v1::Action::Allow,
        Action::Deny => v1::Action::Deny,
    }
}

impl Intention {
    /// Validates a proto intention. `is_http` tells whether a destination is registered as http.
    pub fn from_proto(
        p: &v1::Intention,
        is_http: impl Fn(&ServiceRef) -> bool,
    ) -> Result<Self, IntentionError> {
        if p.destination == "*" {
            return Err(IntentionError::WildcardDestination);
        }
        let destination = ServiceRef::parse(&p.destination)
            .map_err(|e| IntentionError::Destination(p.destination.clone(), e))?;
        let source = canonical_source(&p.source, &destination)?;
        let action = action_from_proto(p.action);
        let kind = match (action, p.permissions.is_empty()) {
            (Some(_), false) => return Err(IntentionError::ActionAndPermissions),
            (Some(a), true) => Kind::L4(a),
            (None, true) => return Err(IntentionError::NoAction),
            (None, false) => {
                ward_proto::permission::parse(&p.permissions)?;
                if !is_http(&destination) {
                    return Err(IntentionError::NotHttp(destination.display_short()));
                }
                Kind::L7(p.permissions.clone())
            }
        };
        Ok(Self {
            destination,
            source,
            kind,
            version: 0,
            created_at: 0,
        })
    }

    pub fn key(&self) -> String {
        intention_key(
            self.destination.namespace.as_str(),
            self.destination.name.as_str(),
            &self.source.to_string(),
        )
    }

    pub fn to_proto(&self) -> v1::Intention {
        let (action, permissions) = match &self.kind {
            Kind::L4(a) => (action_to_proto(*a) as i32, Vec::new()),
            Kind::L7(p) => (v1::Action::Unspecified as i32, p.clone()),
        };
        v1::Intention {
            source: self.source.to_string(),
            destination: self.destination.display_short(),
            action,
            permissions,
            version: self.version,
            created_at: self.created_at,
        }
    }

    fn to_record(&self) -> IntentionRecord {
        let (action, permissions) = match &self.kind {
            Kind::L4(a) => (Some(a.as_str().to_owned()), Vec::new()),
            Kind::L7(p) => (
                None,
                p.iter()
                    .map(|p| base64::engine::general_purpose::STANDARD.encode(p.encode_to_vec()))
                    .collect(),
            ),
        };
        IntentionRecord {
            dest_namespace: self.destination.namespace.to_string(),
            dest_service: self.destination.name.to_string(),
            source: self.source.to_string(),
            action,
            permissions,
            version: self.version,
            created_at: self.created_at,
        }
    }

    fn from_record(r: &IntentionRecord) -> Result<Self, RecordError> {
        let destination = ServiceRef {
            namespace: Name::new(&r.dest_namespace)?,
            name: Name::new(&r.dest_service)?,
        };
        let source = canonical_source(&r.source, &destination).map_err(RecordError::Source)?;
        let kind = match &r.action {
            Some(a) => Kind::L4(Action::parse(a).ok_or_else(|| RecordError::Action(a.clone()))?),
            None => Kind::L7(
                r.permissions
                    .iter()
                    .map(|b| {
                        let bytes = base64::engine::general_purpose::STANDARD.decode(b)?;
                        Ok(v1::Permission::decode(bytes.as_slice())?)
                    })
                    .collect::<Result<_, RecordError>>()?,
            ),
        };
        Ok(Self {
            destination,
            source,
            kind,
            version: r.version,
            created_at: r.created_at,
        })
    }
}

/// The store: persisted, versioned, watched.
pub struct Intentions {
    storage: Arc<dyn Storage>,
    tx: watch::Sender<Arc<Snapshot>>,
    write: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Intentions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Intentions")
            .field("version", &self.tx.borrow().version)
            .finish_non_exhaustive()
    }
}

impl Intentions {
    /// Builds the store from loaded records, at `version` with `default`, both as stored; a
    /// record this build cannot read is an error.
    pub fn new(
        storage: Arc<dyn Storage>,
        version: u64,
        records: &[IntentionRecord],
        default: Action,
    ) -> Result<Self, LoadError> {
        let mut rules = BTreeMap::new();
        for r in records {
            let i = Intention::from_record(r).map_err(|reason| LoadError {
                key: r.key(),
                reason,
            })?;
            rules.insert(i.key(), i);
        }
        let (tx, _) = watch::channel(Arc::new(Snapshot {
            version,
            default,
            rules,
        }));
        Ok(Self {
            storage,
            tx,
            write: tokio::sync::Mutex::new(()),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Stores an intention (durably) and publishes the new snapshot; returns the stored rule.
    pub async fn create(
        &self,
        mut i: Intention,
        replace: bool,
    ) -> Result<Intention, IntentionError> {
        let _w = self.write.lock().await;
        let cur = self.snapshot();
        let key = i.key();
        if !replace && cur.rules.contains_key(&key) {
            return Err(IntentionError::Exists {
                from: i.source.to_string(),
                to: i.destination.display_short(),
            });
        }
        let version = next_version(cur.version);
        i.version = version;
        i.created_at = crate::now_unix();
        let rec = i.to_record();
        let storage = self.storage.clone();
        blocking(move || storage.put_intention(&rec, version)).await?;
        let mut next = (*cur).clone();
        next.version = version;
        next.rules.insert(key, i.clone());
        self.tx.send_replace(Arc::new(next));
        Ok(i)
    }

    /// Deletes the intention from `source` to `destination`; returns the new version.
    pub async fn delete(&self, source: &str, destination: &str) -> Result<u64, IntentionError> {
        let dest = ServiceRef::parse(destination)
            .map_err(|e| IntentionError::Destination(destination.to_owned(), e))?;
        let src = canonical_source(source, &dest)?;
        let key = intention_key(
            dest.namespace.as_str(),
            dest.name.as_str(),
            &src.to_string(),
        );
        let _w = self.write.lock().await;
        let cur = self.snapshot();
        if !cur.rules.contains_key(&key) {
            return Err(IntentionError::NotFound {
                from: src.to_string(),
                to: dest.display_short(),
            });
        }
        let version = next_version(cur.version);
        let storage = self.storage.clone();
        let k = key.clone();
        blocking(move || storage.delete_intention(&k, version)).await?;
        let mut next = (*cur).clone();
        next.version = version;
        next.rules.remove(&key);
        self.tx.send_replace(Arc::new(next));
        Ok(version)
    }

    /// Decides for a concrete caller.
    pub fn check(
        &self,
        source: &str,
        destination: &str,
    ) -> Result<(Decision, u64), IntentionError> {
        let dest = ServiceRef::parse(destination)
            .map_err(|e| IntentionError::Destination(destination.to_owned(), e))?;
        let src = match canonical_source(source, &dest)? {
            Source::Any => return Err(IntentionError::WildcardCheck),
            Source::Service { namespace, name } => ServiceRef {
                namespace: namespace.unwrap_or_else(|| dest.namespace.clone()),
                name,
            },
        };
        let snap = self.snapshot();
        Ok((snap.check(&src, &dest, snap.default), snap.version))
    }
}

/// Runs a storage call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, Arc<StorageError>> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Arc::new),
        Err(e) => Err(Arc::new(StorageError::File {
            path: std::path::PathBuf::from("<storage task>"),
            reason: e.to_string(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_config::permission::Problem;

    fn intention(source: &str, dest: &str, action: v1::Action) -> v1::Intention {
        v1::Intention {
            source: source.into(),
            destination: dest.into(),
            action: action as i32,
            ..Default::default()
        }
    }

    fn snap(rules: &[(&str, &str, v1::Action)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (src, dst, a) in rules {
            let i = Intention::from_proto(&intention(src, dst, *a), |_| false).unwrap();
            s.rules.insert(i.key(), i);
        }
        s
    }

    fn svc(s: &str) -> ServiceRef {
        ServiceRef::parse(s).unwrap()
    }

    #[test]
    fn next_version_rises_past_any_stored_version_and_the_clock() {
        let now_us = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        )
        .unwrap();
        // A restored state holds a small counter: the next version is past the clock.
        assert!(next_version(3) >= now_us);
        // A version ahead of the clock (written in the same microsecond, or by a server whose
        // clock was ahead) still rises.
        let ahead = now_us + 10_000_000;
        assert_eq!(next_version(ahead), ahead + 1);
        assert_eq!(next_version(u64::MAX), u64::MAX);
        let a = next_version(0);
        assert!(next_version(a) > a);
    }

    #[test]
    fn precedence_exact_beats_wildcard_then_default() {
        use v1::Action::{Allow, Deny};
        let s = snap(&[
            ("*", "inventory", Deny),
            ("order", "inventory", Allow),
            ("prod/web", "inventory", Allow),
        ]);
        let table: &[(&str, &str, Action, bool)] = &[
            ("order", "inventory", Action::Allow, true),
            ("rogue", "inventory", Action::Deny, true),
            ("prod/web", "inventory", Action::Allow, true),
            ("web", "inventory", Action::Deny, true),
            ("prod/order", "inventory", Action::Deny, true),
            ("order", "payments", Action::Deny, false),
        ];
        for (src, dst, want, has_rule) in table {
            let d = s.check(&svc(src), &svc(dst), Action::Deny);
            assert_eq!(d.action, *want, "{src} -> {dst}");
            assert_eq!(d.rule.is_some(), *has_rule, "{src} -> {dst}");
        }
        let d = s.check(&svc("order"), &svc("payments"), Action::Allow);
        assert_eq!(d.action, Action::Allow, "default policy allow");
    }

    #[test]
    fn validation() {
        let ok = |p: &v1::Intention| Intention::from_proto(p, |_| false);
        assert!(matches!(
            ok(&intention("order", "*", v1::Action::Allow)).unwrap_err(),
            IntentionError::WildcardDestination
        ));
        assert!(matches!(
            ok(&intention("Order", "inventory", v1::Action::Allow)).unwrap_err(),
            IntentionError::Source(..)
        ));
        assert!(matches!(
            ok(&intention("order", "inventory", v1::Action::Unspecified)).unwrap_err(),
            IntentionError::NoAction
        ));
        let mut l7 = intention("order", "inventory", v1::Action::Unspecified);
        l7.permissions = vec![v1::Permission {
            action: v1::Action::Allow as i32,
            path: Some(v1::permission::Path::PathPrefix("/stock/".into())),
            methods: vec!["GET".into()],
            headers: vec![],
        }];
        assert!(matches!(ok(&l7).unwrap_err(), IntentionError::NotHttp(_)));
        // Permissions are checked by the one parser the CLI uses too.
        let mut bad = l7.clone();
        bad.permissions[0].path = Some(v1::permission::Path::PathPrefix(format!(
            "/{}",
            "a".repeat(1024)
        )));
        assert!(matches!(
            Intention::from_proto(&bad, |_| true).unwrap_err(),
            IntentionError::Permission(PermissionError {
                problem: Problem::PathLength,
                ..
            })
        ));
        bad.permissions[0].path = None;
        bad.permissions[0].headers = vec![v1::HeaderMatch {
            name: "x-env".into(),
            r#match: Some(v1::header_match::Match::Present(false)),
        }];
        let e = Intention::from_proto(&bad, |_| true).unwrap_err();
        assert!(
            matches!(&e, IntentionError::Permission(p) if p.problem == Problem::PresentFalse),
            "{e}"
        );
        assert!(
            e.to_string().contains("permissions[0].headers[0].present"),
            "{e}"
        );
        assert!(Intention::from_proto(&l7, |_| true).is_ok());
        l7.action = v1::Action::Allow as i32;
        assert!(matches!(
            Intention::from_proto(&l7, |_| true).unwrap_err(),
            IntentionError::ActionAndPermissions
        ));
        // `default/order` and `order` are one source for a destination in `default`.
        let a = ok(&intention("default/order", "inventory", v1::Action::Allow)).unwrap();
        let b = ok(&intention("order", "default/inventory", v1::Action::Allow)).unwrap();
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn records_round_trip() {
        let mut l7 = intention("prod/web", "shop/api", v1::Action::Unspecified);
        l7.permissions = vec![v1::Permission {
            action: v1::Action::Deny as i32,
            path: Some(v1::permission::Path::PathExact("/admin".into())),
            methods: vec![],
            headers: vec![v1::HeaderMatch {
                name: "x-env".into(),
                r#match: Some(v1::header_match::Match::Present(true)),
            }],
        }];
        let i = Intention::from_proto(&l7, |_| true).unwrap();
        assert_eq!(Intention::from_record(&i.to_record()).unwrap(), i);
        // What this build cannot read is refused by kind, never guessed at.
        let mut bad = i.to_record();
        bad.permissions = vec!["not base64!".into()];
        assert!(matches!(
            Intention::from_record(&bad),
            Err(RecordError::Base64(_))
        ));
        let mut bad = i.to_record();
        bad.action = Some("permit".into());
        assert!(
            matches!(Intention::from_record(&bad), Err(RecordError::Action(a)) if a == "permit")
        );
        let mut bad = i.to_record();
        bad.dest_service = "Not_A_Name".into();
        assert!(matches!(
            Intention::from_record(&bad),
            Err(RecordError::Name(_))
        ));
    }
}
