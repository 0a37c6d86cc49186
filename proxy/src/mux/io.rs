//! One tunnel stream as a byte stream, so the copy loop that forwards a TCP connection
//! forwards a stream the same way: END_STREAM is the half-close, a reset is an error.

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The receiving half: on the outbound it first waits for the inbound's answer to the CONNECT.
enum Recv {
    Answer(h2::client::ResponseFuture),
    Body(RecvStream),
}

/// A tunnel stream. `Guard` is held for the stream's life (the pool counts streams with it).
pub struct StreamIo<G = ()> {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Received bytes not yet read.
    chunk: Bytes,
    shut: bool,
    _guard: G,
}

impl StreamIo<()> {
    /// The inbound's side of an accepted stream.
    pub fn accepted(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self::new(send, Recv::Body(recv), ())
    }
}

impl<G> StreamIo<G> {
    /// The outbound's side: bytes may be written at once; reads wait for the inbound's 200.
    pub fn opened(send: SendStream<Bytes>, answer: h2::client::ResponseFuture, guard: G) -> Self {
        Self::new(send, Recv::Answer(answer), guard)
    }

    fn new(send: SendStream<Bytes>, recv: Recv, guard: G) -> Self {
        Self {
            send,
            recv,
            chunk: Bytes::new(),
            shut: false,
            _guard: guard,
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("tunnel I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl<G: Unpin> AsyncRead for StreamIo<G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Recv::Body(body) = &mut this.recv {
                if !this.chunk.is_empty() {
                    let n = this.chunk.len().min(buf.remaining());
                    buf.put_slice(&this.chunk[..n]);
                    this.chunk.advance(n);
                    // Reopen the window for what the reader took.
                    let _ = body.flow_control().release_capacity(n);
                    return Poll::Ready(Ok(()));
                }
                match ready!(body.poll_data(cx)) {
                    Some(Ok(data)) => this.chunk = data,
                    Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                    None => return Poll::Ready(Ok(())),
                }
                continue;
            }
            let Recv::Answer(answer) = &mut this.recv else {
                unreachable!("handled above")
            };
            let response = ready!(Pin::new(answer).poll(cx)).map_err(to_io)?;
            if response.status() != http::StatusCode::OK {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("the inbound refused the stream ({})", response.status()),
                )));
            }
            this.recv = Recv::Body(response.into_body());
        }
    }
}

impl<G: Unpin> AsyncWrite for StreamIo<G> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        // poll_capacity only reports an increase, so ask it only when nothing is assigned.
        let mut granted = send.capacity();
        while granted == 0 {
            granted = match ready!(send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel stream is closed",
                    )))
                }
            };
        }
        let n = granted.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    /// The tunnel connection's task writes and flushes the frames.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
