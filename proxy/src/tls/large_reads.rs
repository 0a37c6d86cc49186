//! Large socket reads under TLS. rustls reads ciphertext 4 KiB at a time, so a 16 KiB record
//! costs four `read` calls; this adapter reads up to 64 KiB per call and serves rustls from
//! that buffer. The buffer belongs to the connection only until rustls has taken all of it
//! (normally within a few polls), then goes back to a small per-thread stock, so an idle
//! connection holds no buffer and a busy one neither allocates nor copies per read beyond the
//! copy into rustls.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const READ_SIZE: usize = 64 * 1024;
/// Buffers kept per thread for reuse: enough for the connections that are mid-buffer at once
/// in practice; more are allocated (and freed) as needed.
const STOCK: usize = 2;

thread_local! {
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; READ_SIZE].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < STOCK {
            s.push(buf);
        }
    });
}

/// A socket whose reads are batched; writes pass straight through.
pub struct LargeReads<T> {
    inner: T,
    /// Read but not yet taken: `pending[pos..end]`; `None` when everything was taken.
    pending: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
}

/// Never shows the bytes: buffers are reused across connections.
impl<T: std::fmt::Debug> std::fmt::Debug for LargeReads<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pending = if self.pending.is_some() {
            self.end - self.pos
        } else {
            0
        };
        f.debug_struct("LargeReads")
            .field("inner", &self.inner)
            .field("pending_bytes", &pending)
            .finish()
    }
}

impl<T> LargeReads<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
            pos: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Hands `buf.remaining()` bytes at most of `big[from..end]` to `buf`; keeps the rest.
    fn serve(&mut self, big: Box<[u8]>, from: usize, end: usize, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(end - from);
        buf.put_slice(&big[from..from + n]);
        if from + n == end {
            give_back(big);
        } else {
            self.pending = Some(big);
            self.pos = from + n;
            self.end = end;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LargeReads<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(big) = this.pending.take() {
            let (pos, end) = (this.pos, this.end);
            this.serve(big, pos, end, buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_SIZE {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut big = take_buffer();
        let mut read = ReadBuf::new(&mut big[..]);
        let got = match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => read.filled().len(),
            Poll::Ready(Err(e)) => {
                give_back(big);
                return Poll::Ready(Err(e));
            }
            Poll::Pending => {
                give_back(big);
                return Poll::Pending;
            }
        };
        this.serve(big, 0, got, buf);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LargeReads<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = LargeReads::new(b);
        let mut out = Vec::new();
        read_to_end(&mut r, &mut out, 4096).await;
        assert_eq!(out, data);
        assert!(r.pending.is_none(), "nothing held once drained");
    }

    /// Appends what `r` yields to `out`, reading `chunk` bytes at most at a time.
    async fn read_to_end(
        r: &mut LargeReads<tokio::io::DuplexStream>,
        out: &mut Vec<u8>,
        chunk: usize,
    ) {
        let mut buf = vec![0u8; chunk];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn connections_sharing_the_stock_see_only_their_own_bytes() {
        // More connections mid-buffer than the stock holds, read in turns; later 64 KiB reads
        // and the short last reads of the first two land in reused buffers: any stale byte
        // would break an equality below.
        let lens = [150_000, 70_001, 65_536 + 17];
        let mut readers = Vec::new();
        let mut datas = Vec::new();
        for (i, len) in lens.into_iter().enumerate() {
            let (mut a, b) = tokio::io::duplex(256 * 1024);
            let data = pattern(i as u8 * 7 + 1, len);
            a.write_all(&data).await.unwrap();
            drop(a);
            readers.push(LargeReads::new(b));
            datas.push(data);
        }
        let mut outs = vec![Vec::new(); lens.len()];
        let mut open = lens.len();
        let mut chunk = [0u8; 3000];
        for _ in 0..10_000 {
            if open == 0 {
                break;
            }
            open = 0;
            for (r, out) in readers.iter_mut().zip(outs.iter_mut()) {
                let n = r.read(&mut chunk).await.unwrap();
                out.extend_from_slice(&chunk[..n]);
                open += usize::from(n > 0);
            }
        }
        assert_eq!(open, 0, "every connection reached its end");
        for (out, data) in outs.iter().zip(&datas) {
            assert_eq!(out, data);
        }
        assert!(readers.iter().all(|r| r.pending.is_none()));
        assert!(
            SPARE.with(|s| s.borrow().len()) <= STOCK,
            "the stock stays bounded"
        );
    }

    #[tokio::test]
    async fn a_large_read_gets_the_pending_bytes_first() {
        let (mut a, b) = tokio::io::duplex(512 * 1024);
        let data = pattern(3, 300_000);
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = LargeReads::new(b);
        let mut small = [0u8; 100];
        let n = r.read(&mut small).await.unwrap();
        assert_eq!(n, 100);
        assert!(r.pending.is_some(), "the rest of the 64 KiB read waits");
        let mut out = small.to_vec();
        read_to_end(&mut r, &mut out, 2 * READ_SIZE).await;
        assert_eq!(out, data);
    }

    #[test]
    fn debug_does_not_show_the_bytes() {
        let mut r = LargeReads::new(());
        let mut secret = vec![0u8; READ_SIZE];
        secret[..6].copy_from_slice(b"secret");
        r.pending = Some(secret.into_boxed_slice());
        (r.pos, r.end) = (0, 6);
        let shown = format!("{r:?}");
        assert_eq!(shown, "LargeReads { inner: (), pending_bytes: 6 }");
    }
}
