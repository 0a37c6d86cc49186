//! TLS 1.3 session tickets whose keys live at most an hour and are replaced whenever the
//! intentions or the trust roots change (security rule 8, resumption and early data,
//! docs/security.md).
//!
//! rustls does not run the certificate verifier on a resumed session. Tying the ticket key to
//! an epoch keeps that safe: every ticket that still decrypts was issued under the roots and
//! intentions in force now, after a full verification. After any change, a returning client
//! falls back to a full handshake, so a now-denied caller gets `access_denied` in the
//! handshake as usual. The inbound still re-checks a resumed peer before forwarding a byte
//! (see `inbound.rs`): the path its full handshake verified must be valid now (else its chain
//! is verified again, at the current time), and its intention must allow it.

use arc_swap::ArcSwap;
use rustls::server::ProducesTickets;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a ticket (and its key) may live.
pub const MAX_TICKET_LIFETIME: Duration = Duration::from_secs(3600);

struct Epoch {
    started: Instant,
    keys: Arc<dyn ProducesTickets>,
}

/// Per-process, in-memory ticket keys, replaced hourly and on every [`EpochTicketer::rotate`].
pub struct EpochTicketer {
    current: ArcSwap<Epoch>,
}

impl std::fmt::Debug for EpochTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochTicketer")
    }
}

fn new_epoch() -> Option<Epoch> {
    match super::provider::ticketer() {
        Ok(keys) => Some(Epoch {
            started: Instant::now(),
            keys,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create session ticket keys; resumption stays off");
            None
        }
    }
}

impl EpochTicketer {
    pub fn new() -> Option<Self> {
        Some(Self {
            current: ArcSwap::from_pointee(new_epoch()?),
        })
    }

    /// Forgets every ticket issued so far.
    pub fn rotate(&self) {
        if let Some(e) = new_epoch() {
            self.current.store(Arc::new(e));
        }
    }

    fn epoch(&self) -> arc_swap::Guard<Arc<Epoch>> {
        let e = self.current.load();
        if e.started.elapsed() < MAX_TICKET_LIFETIME {
            return e;
        }
        drop(e);
        self.rotate();
        self.current.load()
    }
}

impl ProducesTickets for EpochTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // What is left of this epoch: a ticket never outlives its key.
        let left = MAX_TICKET_LIFETIME.saturating_sub(self.epoch().started.elapsed());
        left.as_secs().max(1) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.epoch().keys.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.epoch().keys.decrypt(cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_forgets_old_tickets() {
        let t = EpochTicketer::new().unwrap();
        let ticket = t.encrypt(b"session").unwrap();
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert!(t.lifetime() <= 3600);
        t.rotate();
        assert_eq!(t.decrypt(&ticket), None);
    }
}
