//! HTTP/2 without ALPN: a client whose TLS agreed no protocol (a ward outbound's tcp upstream,
//! which offers only `ward-mux/1`, or any client offering none) is served HTTP/2 when it opens
//! with the connection preface (prior knowledge, as gRPC clients over a plain-TCP hop do), and
//! HTTP/1.1 otherwise.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads from `io` until its bytes are the whole preface or stop matching it (at most the
/// preface's 24 bytes); whether they were the preface, and `io` with them put back.
pub(crate) async fn preface<I: AsyncRead + Unpin>(mut io: I) -> io::Result<(bool, Rewind<I>)> {
    let mut seen = Vec::with_capacity(PREFACE.len());
    let mut chunk = [0u8; PREFACE.len()];
    while seen.len() < PREFACE.len() && PREFACE.starts_with(&seen) {
        let n = io.read(&mut chunk[..PREFACE.len() - seen.len()]).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&chunk[..n]);
    }
    Ok((seen == PREFACE, Rewind::new(io, seen)))
}

/// `io` whose first reads return `prefix` (bytes already read from it).
pub(crate) struct Rewind<I> {
    io: I,
    prefix: Vec<u8>,
    pos: usize,
}

impl<I> Rewind<I> {
    pub(crate) fn new(io: I, prefix: Vec<u8>) -> Self {
        Self { io, prefix, pos: 0 }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let from = self.pos;
            buf.put_slice(&self.prefix[from..from + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniffed(sent: &[u8]) -> (bool, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(sent).await.unwrap();
        drop(client);
        let (h2, mut io) = preface(server).await.unwrap();
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        (h2, all)
    }

    #[tokio::test]
    async fn the_preface_is_recognised_and_every_byte_is_put_back() {
        let h2 = [PREFACE, b"\x00\x00\x00\x04"].concat();
        assert_eq!(sniffed(&h2).await, (true, h2.clone()));
        let h1 = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
        assert_eq!(sniffed(&h1).await, (false, h1.clone()));
        // A client that stops inside the preface is not HTTP/2, and loses no byte.
        assert_eq!(sniffed(b"PRI * HT").await, (false, b"PRI * HT".to_vec()));
        // A request that starts like the preface but is not it.
        let near = b"PRI * HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(sniffed(&near).await, (false, near.clone()));
    }
}
