//! The connection log (`[admin] connection_log`, docs/proxy-config.md): one info line per
//! admitted inbound connection (or tunnel stream) when it closes, and one per refused inbound
//! handshake, at most [`REFUSALS_PER_SECOND`] a second. Cheap on the copy path: an enabled log
//! adds one relaxed atomic add per chunk copied and one line at the close.

use crate::copy::CopyEnd;
use crate::metrics::HandshakeResult;
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use ward_config::identity::escape_peer_value;
use ward_config::SpiffeId;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Refused-handshake lines a second; a flood of refusals must not flood the log.
pub const REFUSALS_PER_SECOND: u32 = 10;

tokio::task_local! {
    /// What the peer of the handshake in progress presented, once the verifier refused it.
    static PRESENTED: RefCell<Option<String>>;
}

/// The inbound's connection log.
pub struct ConnectionLog {
    enabled: bool,
    refusals: LineBudget,
}

impl ConnectionLog {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            refusals: LineBudget::new(REFUSALS_PER_SECOND, Duration::from_secs(1)),
        }
    }

    /// Runs an inbound handshake; with the log on, also returns the identity the peer presented
    /// if the verifier refused it.
    pub async fn handshake<F: Future>(&self, handshake: F) -> (F::Output, Option<String>) {
        if !self.enabled {
            return (handshake.await, None);
        }
        PRESENTED
            .scope(RefCell::new(None), async {
                let out = handshake.await;
                (out, PRESENTED.with(|p| p.take()))
            })
            .await
    }

    /// One line for a refused inbound handshake (or a session refused right after it).
    pub fn refused(&self, peer: SocketAddr, presented: Option<&str>, result: HandshakeResult) {
        if !self.enabled {
            return;
        }
        let Some(suppressed) = self.refusals.admit() else {
            return;
        };
        tracing::info!(
            peer_addr = %peer,
            presented = %presented.unwrap_or("-"),
            result = %result.as_str(),
            suppressed,
            "inbound connection refused"
        );
    }

    /// Starts the line of an admitted connection from `addr` whose peer is `id`; `None` with
    /// the log off.
    pub fn admitted(&self, addr: SocketAddr, id: &SpiffeId) -> Option<Admitted> {
        self.enabled.then(|| Admitted {
            addr,
            peer: escape_peer_value(&id.to_string()),
            started: Instant::now(),
            rx: Arc::default(),
            tx: Arc::default(),
        })
    }
}

/// Held by the inbound verifier while it judges a chain: unless [`NoteIfRefused::admitted`], its
/// drop notes the identity the leaf presents for the connection log, when one is listening (see
/// [`ConnectionLog::handshake`]).
pub(crate) struct NoteIfRefused<'a>(pub &'a [u8]);

impl NoteIfRefused<'_> {
    pub(crate) fn admitted(self) {
        std::mem::forget(self);
    }
}

impl Drop for NoteIfRefused<'_> {
    fn drop(&mut self) {
        let _ = PRESENTED.try_with(|p| *p.borrow_mut() = Some(presented_identity(self.0)));
    }
}

/// The URI SANs of a leaf, escaped and cut to a bounded length (the peer chose them).
pub(crate) fn presented_identity(der: &[u8]) -> String {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return "(certificate does not parse)".to_owned();
    };
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if uris.is_empty() {
        return "(no URI SAN)".to_owned();
    }
    escape_peer_value(&uris.join(","))
}

/// An admitted connection, until its line is written at the close.
pub struct Admitted {
    addr: SocketAddr,
    /// The peer's SPIFFE ID, escaped.
    peer: String,
    started: Instant,
    rx: Arc<Tally>,
    tx: Arc<Tally>,
}

impl Admitted {
    /// The connection's byte counters, `rx` and `tx`, counting for this line as well.
    pub(crate) fn count(
        &self,
        rx: metrics::Counter,
        tx: metrics::Counter,
    ) -> (metrics::Counter, metrics::Counter) {
        let tee = |inner, tally: &Arc<Tally>| {
            metrics::Counter::from_arc(Arc::new(Tee {
                inner,
                tally: tally.clone(),
            }))
        };
        (tee(rx, &self.rx), tee(tx, &self.tx))
    }

    /// The line at the close.
    pub(crate) fn closed(self, end: &CopyEnd) {
        let (reason, error) = match end {
            CopyEnd::Done => ("ended", None),
            CopyEnd::Idle => ("idle_timeout", None),
            CopyEnd::Closed => ("closed_by_proxy", None),
            CopyEnd::Failed(e) => ("error", Some(e)),
        };
        tracing::info!(
            peer = %self.peer,
            peer_addr = %self.addr,
            rx_bytes = self.rx.0.load(Ordering::Relaxed),
            tx_bytes = self.tx.0.load(Ordering::Relaxed),
            duration_s = self.started.elapsed().as_secs_f64(),
            reason = %reason,
            error = error.map(tracing::field::display),
            "inbound connection closed"
        );
    }
}

#[derive(Default)]
struct Tally(AtomicU64);

/// A byte counter that also adds to one connection's tally.
struct Tee {
    inner: metrics::Counter,
    tally: Arc<Tally>,
}

impl metrics::CounterFn for Tee {
    fn increment(&self, value: u64) {
        self.inner.increment(value);
        self.tally.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.inner.absolute(value);
        self.tally.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// At most `lines` log lines each `every`; the next line admitted says how many were left out.
pub(crate) struct LineBudget {
    lines: u32,
    every: Duration,
    /// The start of the current window and the lines written in it.
    window: Mutex<Option<(Instant, u32)>>,
    left_out: AtomicU64,
}

impl LineBudget {
    pub(crate) fn new(lines: u32, every: Duration) -> Self {
        Self {
            lines,
            every,
            window: Mutex::new(None),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *window {
            Some((start, written)) if now < *start + self.every => {
                if *written >= self.lines {
                    self.left_out.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                *written += 1;
            }
            _ => *window = Some((now, 1)),
        }
        Some(self.left_out.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_admits_n_lines_a_window_and_counts_the_rest() {
        let budget = LineBudget::new(2, Duration::from_secs(1));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), None);
        assert_eq!(budget.admit(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(budget.admit(), Some(2));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), None);
    }

    #[test]
    fn a_presented_identity_is_escaped_and_bounded() {
        let mut params = rcgen::CertificateParams::default();
        let long = format!("spiffe://ward.local/ns/x/svc/{}\n", "a".repeat(1000));
        params.subject_alt_names = vec![rcgen::SanType::URI(long.as_str().try_into().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let shown = presented_identity(cert.der());
        assert!(
            shown.starts_with("spiffe://ward.local/ns/x/svc/aaa"),
            "{shown}"
        );
        assert!(
            shown.chars().count() <= 260 && shown.ends_with('…'),
            "{shown}"
        );
        assert_eq!(presented_identity(b"junk"), "(certificate does not parse)");
    }
}
