//! Bounds on callers (security rule 15, bounds, docs/security.md): a token bucket per
//! identity for `Identity.Sign`, and one long-lived stream of each kind per instance.

use crate::metrics::Metrics;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tonic::Status;
use ward_config::server::ServerLimits;

/// A token bucket per identity for `Identity.Sign` (security rule 15, bounds, docs/security.md).
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    burst: f64,
    per_second: f64,
}

impl RateLimiter {
    pub fn new(limits: &ServerLimits) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            burst: f64::from(limits.sign_burst.max(1)),
            per_second: limits.sign_per_second.max(0.0),
        }
    }

    /// Takes one call from `key`'s bucket.
    pub fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() > 100_000 {
            let (burst, rate) = (self.burst, self.per_second);
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = b.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The kinds of long-lived stream an instance may hold one of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamKind {
    Roots,
    Intentions,
    Endpoints,
    Register,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Roots => "WatchRoots",
            StreamKind::Intentions => "WatchIntentions",
            StreamKind::Endpoints => "WatchEndpoints",
            StreamKind::Register => "Register",
        }
    }
}

/// One stream of a kind per instance (security rule 15, bounds, docs/security.md).
#[derive(Default)]
pub(crate) struct StreamSlots {
    open: Arc<Mutex<HashSet<(StreamKind, String)>>>,
}

pub(crate) struct Slot {
    open: Arc<Mutex<HashSet<(StreamKind, String)>>>,
    key: (StreamKind, String),
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.metrics.stream_closed(self.key.0);
    }
}

impl StreamSlots {
    pub fn acquire(
        &self,
        kind: StreamKind,
        instance: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<Slot, Status> {
        let key = (kind, instance.to_owned());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !open.insert(key.clone()) {
            return Err(Status::resource_exhausted(format!(
                "this instance already has a {} stream open; one of each kind is allowed",
                kind.as_str()
            )));
        }
        metrics.stream_opened(kind);
        Ok(Slot {
            open: self.open.clone(),
            key,
            metrics: metrics.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_buckets_per_identity() {
        let l = RateLimiter::new(&ServerLimits {
            sign_burst: 3,
            sign_per_second: 0.0,
            ..ServerLimits::default()
        });
        assert!(l.allow("a") && l.allow("a") && l.allow("a"));
        assert!(!l.allow("a"));
        assert!(l.allow("b"), "another identity has its own bucket");
    }

    #[test]
    fn one_stream_of_a_kind_per_instance() {
        let slots = StreamSlots::default();
        let m = Arc::new(Metrics::default());
        let a = slots.acquire(StreamKind::Intentions, "i1", &m).unwrap();
        let err = slots
            .acquire(StreamKind::Intentions, "i1", &m)
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let _b = slots.acquire(StreamKind::Roots, "i1", &m).unwrap();
        let _c = slots.acquire(StreamKind::Intentions, "i2", &m).unwrap();
        drop(a);
        slots.acquire(StreamKind::Intentions, "i1", &m).unwrap();
    }
}
