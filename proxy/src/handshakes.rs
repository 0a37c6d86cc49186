//! TLS handshakes in progress, capped globally and per source IP (security rule 15, bounds,
//! docs/security.md), so that silent connections from one address cannot take every slot. Used
//! by the proxy's inbound and by `ward server`'s gRPC listener. An IPv6 source counts by its /64:
//! one host is usually given a whole /64 and can pick any address in it.

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
        let ip = source_of(ip);
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

/// What the per-IP cap counts `ip` as: an IPv4 address (also when a dual-stack listener sees it
/// as IPv4-mapped), or an IPv6 address's /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
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

    #[test]
    fn an_ipv6_source_counts_by_its_64() {
        let slots = HandshakeSlots::new(10, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = slots.begin(ip("2001:db8:1:2::1")).unwrap();
        let _b = slots.begin(ip("2001:db8:1:2:ffff:ffff:ffff:fffe")).unwrap();
        // Any other address of the same /64 is the same source.
        assert!(slots.begin(ip("2001:db8:1:2:1234::9")).is_none());
        // The next /64 is another.
        let _c = slots.begin(ip("2001:db8:1:3::1")).unwrap();
    }
}
