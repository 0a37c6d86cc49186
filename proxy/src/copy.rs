//! Bidirectional byte copy between a peer and a local socket: half-close carried across, no
//! buffer held while idle, an idle timeout, and byte counters updated as data flows.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes per read: one per-thread scratch buffer, so its size costs no per-connection memory;
/// 64 KiB lets one write carry four full TLS records.
const BUF_SIZE: usize = 64 * 1024;

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both sides finished.
    Done,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// Closed by the proxy (intention deny, drain deadline).
    Closed,
    /// An I/O error on either side.
    Failed(io::Error),
}

/// When bytes last moved, for the idle timeout.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// One direction's state. Data is read into a per-thread scratch buffer and written straight
/// through; only what the writer could not take at once is kept, in `leftover`, which is freed
/// as soon as it drains. An idle connection therefore holds no copy buffer at all.
#[derive(Default)]
struct OneWay {
    leftover: Vec<u8>,
    pos: usize,
    eof: bool,
    done: bool,
}

enum Step {
    Pending,
    Eof,
    Moved(usize),
    Failed(io::Error),
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice());
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "the writer accepted no bytes")
}

impl OneWay {
    /// Moves bytes from `r` to `w` until one of them is not ready; `Ready` once the EOF has
    /// been passed on (half-close) or on an error.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        counter: &metrics::Counter,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.pos < self.leftover.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.leftover[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(write_zero()));
                }
                self.pos += n;
            }
            if !self.leftover.is_empty() {
                self.leftover = Vec::new();
                self.pos = 0;
            }
            // TLS holds records until flushed; never wait on a read with bytes unsent.
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            if self.eof {
                // Half-close: pass the EOF on and keep the other direction running.
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with(|scratch| {
                let mut buf = scratch.borrow_mut();
                let mut rb = ReadBuf::new(&mut buf[..]);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => return Step::Pending,
                    Poll::Ready(Err(e)) => return Step::Failed(e),
                    Poll::Ready(Ok(())) => {}
                }
                let n = rb.filled().len();
                if n == 0 {
                    return Step::Eof;
                }
                let mut off = 0;
                while off < n {
                    match Pin::new(&mut *w).poll_write(cx, &buf[off..n]) {
                        Poll::Ready(Ok(0)) => return Step::Failed(write_zero()),
                        Poll::Ready(Ok(k)) => off += k,
                        Poll::Ready(Err(e)) => return Step::Failed(e),
                        Poll::Pending => {
                            self.leftover = buf[off..n].to_vec();
                            break;
                        }
                    }
                }
                Step::Moved(n)
            });
            match step {
                Step::Pending => return Poll::Pending,
                Step::Failed(e) => return Poll::Ready(Err(e)),
                Step::Eof => self.eof = true,
                Step::Moved(n) => {
                    counter.increment(n as u64);
                    *moved = true;
                }
            }
        }
    }
}

/// Copies `peer` <-> `local` until both directions end, one fails, the connection is idle for
/// `idle`, or `close` fires. `rx` counts bytes from the peer, `tx` bytes to it.
pub async fn bidirectional<P, L>(
    peer: P,
    local: L,
    idle: Duration,
    close: &CancellationToken,
    rx: &metrics::Counter,
    tx: &metrics::Counter,
) -> CopyEnd
where
    P: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (mut peer, mut local) = (peer, local);
    let (mut inward, mut outward) = (OneWay::default(), OneWay::default());
    // Both directions in one task, without a lock between the halves of each stream.
    let copy = std::future::poll_fn(|cx| {
        let mut moved = false;
        let a = inward.poll(cx, &mut peer, &mut local, rx, &mut moved);
        let b = outward.poll(cx, &mut local, &mut peer, tx, &mut moved);
        if moved {
            activity.touch();
        }
        both(a, b)
    });
    supervise(copy, &activity, idle, close).await
}

/// Two directions of one connection: done when both are, failed when either fails.
pub(crate) fn both(a: Poll<io::Result<()>>, b: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
    match (a, b) {
        (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
        _ => Poll::Pending,
    }
}

/// Runs `copy` until it ends, no byte moves for `idle` (as `activity` records), or `close`
/// fires.
pub(crate) async fn supervise<F>(
    copy: F,
    activity: &Activity,
    idle: Duration,
    close: &CancellationToken,
) -> CopyEnd
where
    F: std::future::Future<Output = io::Result<()>>,
{
    let watchdog = async {
        loop {
            let quiet = activity.idle_for();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        // A close (deny, drain deadline) wins over bytes that are ready to move.
        biased;
        _ = close.cancelled() => CopyEnd::Closed,
        r = copy => match r {
            Ok(()) => CopyEnd::Done,
            Err(e) => CopyEnd::Failed(e),
        },
        _ = watchdog => CopyEnd::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Tiny pipes force partial writes (the `leftover` path) in both directions; every byte
    /// arrives in order and the EOF is passed on in each direction separately.
    #[tokio::test]
    async fn copies_both_ways_through_small_pipes_with_half_close() {
        let (mut client, peer) = tokio::io::duplex(97);
        let (local, mut app) = tokio::io::duplex(61);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let close = CancellationToken::new();
        let rx = metrics::Counter::noop();
        let tx = metrics::Counter::noop();
        let proxy = tokio::spawn(async move {
            bidirectional(peer, local, Duration::from_secs(10), &close, &rx, &tx).await
        });
        // The app echoes everything, then closes after the client's EOF.
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                let n = app.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                app.write_all(&buf[..n]).await.unwrap();
            }
            app.shutdown().await.unwrap();
            got
        });
        let sent = data.clone();
        let (mut cr, mut cw) = tokio::io::split(&mut client);
        let writer = async move {
            cw.write_all(&sent).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let reader = async move {
            let mut back = Vec::new();
            cr.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(writer, reader);
        assert_eq!(
            back, data,
            "echoed back byte-exact after the client's half-close"
        );
        assert_eq!(echo.await.unwrap(), data);
        assert!(matches!(proxy.await.unwrap(), CopyEnd::Done));
    }

    #[tokio::test]
    async fn idle_connections_time_out() {
        let (_client, peer) = tokio::io::duplex(64);
        let (local, _app) = tokio::io::duplex(64);
        let close = CancellationToken::new();
        let c = metrics::Counter::noop();
        let end = bidirectional(peer, local, Duration::from_millis(50), &close, &c, &c).await;
        assert!(matches!(end, CopyEnd::Idle));
    }
}
