//! Bidirectional byte copy between a peer and a local socket: half-close carried across,
//! fixed buffers, an idle timeout, and byte counters updated as data flows.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes per read; one buffer per direction per connection.
const BUF_SIZE: usize = 16 * 1024;

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

struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

async fn one_way<R, W>(
    mut r: R,
    mut w: W,
    activity: &Activity,
    counter: &metrics::Counter,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the EOF on and keep the other direction running.
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        counter.increment(n as u64);
        activity.touch();
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
    P: AsyncRead + AsyncWrite,
    L: AsyncRead + AsyncWrite,
{
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (pr, pw) = tokio::io::split(peer);
    let (lr, lw) = tokio::io::split(local);
    let copy = async {
        tokio::try_join!(
            one_way(pr, lw, &activity, rx),
            one_way(lr, pw, &activity, tx)
        )
    };
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
        r = copy => match r {
            Ok(_) => CopyEnd::Done,
            Err(e) => CopyEnd::Failed(e),
        },
        _ = watchdog => CopyEnd::Idle,
        _ = close.cancelled() => CopyEnd::Closed,
    }
}
