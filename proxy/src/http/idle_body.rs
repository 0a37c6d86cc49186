//! The body idle timeout: a request or response body whose sender stops sending while the
//! receiver waits for more is ended with an error after `idle_timeout`. On HTTP/1.1 the
//! connection's own idle timeout already does this; on HTTP/2 one stalled stream would
//! otherwise live as long as its connection's other streams keep it busy.

use super::h2_pool::Slot;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no body data for idle_timeout ({0:?})")]
pub(crate) struct BodyIdle(Duration);

/// `inner`, ended with [`BodyIdle`] once its receiver has waited `idle` for the next frame
/// (time the receiver spends not asking is not counted: a slow reader is not a stalled sender).
pub(crate) struct IdleBody<B> {
    inner: B,
    idle: Duration,
    /// Armed while the receiver waits.
    timer: Option<Pin<Box<Sleep>>>,
    /// A response's stream on a pooled upstream connection, given back once the body ends.
    stream: Option<Slot>,
}

impl<B> IdleBody<B> {
    pub(crate) fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            stream: None,
        }
    }

    /// A response body that came on `stream` of a pooled connection: the stream stays taken
    /// until the body has ended or is dropped.
    pub(crate) fn holding(inner: B, idle: Duration, stream: Slot) -> Self {
        Self {
            stream: Some(stream),
            ..Self::new(inner, idle)
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            self.timer = None;
            let ended = || frame.as_ref().is_none_or(|f| f.is_err()) || self.inner.is_end_stream();
            if self.stream.is_some() && ended() {
                self.stream = None;
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let idle = self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + idle)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.timer = None;
                Poll::Ready(Some(Err(Box::new(BodyIdle(idle)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How far the request body has gone out: the response clock starts once it is `Sent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not asked for yet (the request has not gone out).
    Waiting,
    /// Being sent: bounded by `idle_timeout`, not by `request_timeout`.
    Sending,
    /// Sent whole (or given up on).
    Sent,
}

/// A request body (with [`IdleBody`]'s stall bound) that reports through `phase` when it has
/// been sent whole, so that a slow upload does not eat the wait for the response.
pub(crate) struct SentBody<B> {
    inner: IdleBody<B>,
    /// None for a body that is empty from the start: there is nothing to report.
    phase: Option<tokio::sync::watch::Sender<Phase>>,
}

impl<B: Body> SentBody<B> {
    /// The body, and where its phase can be followed; none for a body with nothing to send
    /// (most requests: the channel would cost each of them an allocation and its wakeups).
    pub(crate) fn new(
        inner: B,
        idle: Duration,
    ) -> (Self, Option<tokio::sync::watch::Receiver<Phase>>) {
        let (phase, rx) = if inner.is_end_stream() {
            (None, None)
        } else {
            let (tx, rx) = tokio::sync::watch::channel(Phase::Waiting);
            (Some(tx), Some(rx))
        };
        let inner = IdleBody::new(inner, idle);
        (Self { inner, phase }, rx)
    }
}

impl<B> SentBody<B> {
    fn report(&self, now: Phase) {
        if let Some(phase) = &self.phase {
            if *phase.borrow() != now {
                phase.send_replace(now);
            }
        }
    }
}

impl<B> Drop for SentBody<B> {
    fn drop(&mut self) {
        // Dropped by the client: sent, failed or cancelled; nothing more will go out.
        self.report(Phase::Sent);
    }
}

impl<B> Body for SentBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self
            .phase
            .as_ref()
            .is_some_and(|p| *p.borrow() == Phase::Waiting)
        {
            self.report(Phase::Sending);
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        // The client stops asking once `is_end_stream` is true, so report it here.
        let done = match &frame {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if done {
            self.report(Phase::Sent);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body of what a channel receives.
    struct Chan(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Chan {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_after_idle_and_a_flowing_one_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut body = IdleBody::new(Chan(rx), Duration::from_secs(5));
        let sender = tokio::spawn(async move {
            // Frames 4 s apart keep it going; then silence, the channel left open.
            for _ in 0..3 {
                tx.send(Bytes::from_static(b"x")).await.unwrap();
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
            std::future::pending::<()>().await;
        });
        for _ in 0..3 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyIdle>(), "{err}");
        assert!(started.elapsed() >= Duration::from_secs(5));
        sender.abort();
    }
}
