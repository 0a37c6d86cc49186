//! TLS handshakes in progress, capped globally and per source IP (security rule 15, bounds,
//! docs/security.md), so that silent connections from one address cannot take every slot. Used
//! by the proxy's inbound and by `ward server`'s gRPC listener.

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps: `max_pending_handshakes` and `max_pending_handshakes_per_ip`.
pub struct HandshakeSlots {
    global: Arc<Semaphore>,
    per_ip: DashMap<IpAddr, usize>,
    max_per_ip: usize,
}

/// One handshake's slot; released when dropped.
pub struct PendingHandshake {
    slots: Arc<HandshakeSlots>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.slots.per_ip.entry(self.ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

impl HandshakeSlots {
    /// At most `max` handshakes at once, `max_per_ip` of them from one source IP (each at
    /// least 1).
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            global: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            per_ip: DashMap::new(),
            max_per_ip: max_per_ip.max(1),
        })
    }

    /// Takes a slot for `ip`, or `None` when a cap is reached.
    pub fn begin(self: &Arc<Self>, ip: IpAddr) -> Option<PendingHandshake> {
        // An IPv4 peer on a dual-stack listener counts as its IPv4 address.
        let ip = ip.to_canonical();
        let permit = self.global.clone().try_acquire_owned().ok()?;
        let mut n = self.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        drop(n);
        Some(PendingHandshake {
            slots: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_globally_and_per_ip() {
        let slots = HandshakeSlots::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = slots.begin(a).unwrap();
        let _a2 = slots.begin(a).unwrap();
        assert!(slots.begin(a).is_none(), "per-IP cap");
        // The same address seen through a dual-stack listener counts as the same IP.
        assert!(slots.begin("::ffff:127.0.0.1".parse().unwrap()).is_none());
        let _b1 = slots.begin(b).unwrap();
        assert!(slots.begin(b).is_none(), "global cap");
        drop(a1);
        let _a3 = slots.begin(a).unwrap();
        assert_eq!(
            slots.per_ip.len(),
            2,
            "counts are kept only for IPs in progress"
        );
    }
}
