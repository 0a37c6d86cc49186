//! Forwarding between one tunnel stream and a TCP socket. END_STREAM is the half-close, a
//! reset is an error, and no byte is copied in user space beyond what HTTP/2 framing needs:
//! socket reads go into buffers handed to h2 as they are, and received DATA chunks are
//! written to the socket straight from h2's buffers.

use super::pool::StreamSlot;
use crate::copy::{self, Activity, CopyEnd};
use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Bytes per socket read, at most (and at most what flow control lets the stream send).
const READ_SIZE: usize = 64 * 1024;
/// The first read's buffer; it doubles after a read that fills it and halves after one that
/// uses less than a quarter, so a request of a few hundred bytes does not cost a large
/// allocation (which the allocator would hand back to the kernel on free) and a bulk stream
/// soon reads 64 KiB at a time (256 KiB reads measured slower: perf/profile-notes.md,
/// "Figures behind code comments").
const FIRST_READ_SIZE: usize = 4 * 1024;
const MIN_READ_SIZE: usize = 1024;

/// The receiving half: on the outbound it first waits for the inbound's answer to the CONNECT,
/// at most until the deadline.
enum Recv {
    Answer(h2::client::ResponseFuture, Pin<Box<tokio::time::Sleep>>),
    Body(RecvStream),
}

/// A tunnel stream. On the outbound it holds its slot in the pool for its whole life.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: Recv,
    slot: Option<StreamSlot>,
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("tunnel I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl StreamIo {
    /// The inbound's side of an accepted stream.
    pub fn accepted(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv: Recv::Body(recv),
            slot: None,
        }
    }

    /// The outbound's side: bytes may be sent at once; received ones wait for the inbound's
    /// 200, for at most `answer_within` (then the tunnel is presumed dead and retired).
    pub(crate) fn opened(
        send: SendStream<Bytes>,
        answer: h2::client::ResponseFuture,
        answer_within: Duration,
        slot: StreamSlot,
    ) -> Self {
        let deadline = Box::pin(tokio::time::sleep(answer_within));
        Self {
            send,
            recv: Recv::Answer(answer, deadline),
            slot: Some(slot),
        }
    }

    /// The next received chunk; `None` at END_STREAM.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            match &mut self.recv {
                Recv::Body(body) => {
                    return match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => Poll::Ready(Ok(Some(data))),
                        Some(Err(e)) => Poll::Ready(Err(to_io(e))),
                        None => Poll::Ready(Ok(None)),
                    }
                }
                Recv::Answer(answer, deadline) => {
                    let response = match Pin::new(answer).poll(cx) {
                        Poll::Ready(r) => r.map_err(to_io)?,
                        Poll::Pending => {
                            ready!(deadline.as_mut().poll(cx));
                            if let Some(slot) = &self.slot {
                                slot.retire();
                            }
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the inbound did not answer the stream in time",
                            )));
                        }
                    };
                    if response.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("the inbound refused the stream ({})", response.status()),
                        )));
                    }
                    self.recv = Recv::Body(response.into_body());
                }
            }
        }
    }

    /// Reopens the window for `n` bytes the socket took.
    fn release(&mut self, n: usize) {
        if let Recv::Body(body) = &mut self.recv {
            let _ = body.flow_control().release_capacity(n);
        }
    }

    /// Waits until the stream may send at least one byte; how many it may send now.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        // poll_capacity reports only increases, so ask it only when nothing is assigned.
        let mut granted = self.send.capacity();
        while granted == 0 {
            granted = match ready!(self.send.poll_capacity(cx)) {
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
        Poll::Ready(Ok(granted))
    }
}

/// Socket -> stream.
struct Up {
    /// The size of the next read's buffer (see `FIRST_READ_SIZE`).
    read_size: usize,
    eof: bool,
    done: bool,
}

impl Default for Up {
    fn default() -> Self {
        Self {
            read_size: FIRST_READ_SIZE,
            eof: false,
            done: false,
        }
    }
}

impl Up {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut TcpStream,
        stream: &mut StreamIo,
        counter: &metrics::Counter,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                stream.send.send_data(Bytes::new(), true).map_err(to_io)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Read only what flow control lets us send, so nothing waits in our buffers; and
            // allocate only once the socket has data, so an idle stream holds no buffer.
            let room = ready!(stream.poll_send_capacity(cx, READ_SIZE))?.min(self.read_size);
            ready!(socket.poll_read_ready(cx))?;
            let mut buf = BytesMut::with_capacity(room);
            // poll_read (not try_read): a short read tells tokio the socket is drained, which
            // saves the read that would only return EAGAIN.
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *socket),
                cx,
                &mut buf
            )) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    if n == room {
                        self.read_size = (self.read_size * 2).min(READ_SIZE);
                    } else if n < room / 4 {
                        self.read_size = (self.read_size / 2).max(MIN_READ_SIZE);
                    }
                    stream.send.send_data(buf.freeze(), false).map_err(to_io)?;
                    counter.increment(n as u64);
                    *moved = true;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Stream -> socket.
#[derive(Default)]
struct Down {
    chunk: Bytes,
    eof: bool,
    done: bool,
}

impl Down {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut StreamIo,
        socket: &mut TcpStream,
        counter: &metrics::Counter,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while !self.chunk.is_empty() {
                let n = ready!(Pin::new(&mut *socket).poll_write(cx, &self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.chunk.advance(n);
                stream.release(n);
                counter.increment(n as u64);
                *moved = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *socket).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match ready!(stream.poll_chunk(cx))? {
                Some(data) => self.chunk = data,
                None => self.eof = true,
            }
        }
    }
}

/// Forwards `stream` <-> `socket` until both directions end, one fails, nothing moves for
/// `idle`, or `close` fires. `rx` counts bytes from the stream's peer, `tx` bytes to it.
pub async fn forward(
    mut stream: StreamIo,
    mut socket: TcpStream,
    idle: Duration,
    close: &CancellationToken,
    rx: metrics::Counter,
    tx: metrics::Counter,
) -> CopyEnd {
    let activity = Activity::new();
    let (mut up, mut down) = (Up::default(), Down::default());
    let copy = std::future::poll_fn(|cx| {
        let mut moved = false;
        let a = down.poll(cx, &mut stream, &mut socket, &rx, &mut moved);
        let b = up.poll(cx, &mut socket, &mut stream, &tx, &mut moved);
        if moved {
            activity.touch();
        }
        copy::both(a, b)
    });
    copy::supervise(copy, &activity, idle, close).await
}
