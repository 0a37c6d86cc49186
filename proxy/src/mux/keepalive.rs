//! PINGs on a tunnel connection, both ways: a peer whose host vanished without a reset would
//! otherwise hold the connection's streams until their idle timeout (an hour by default). A
//! PING goes out every `every` (the handshake timeout); a peer that has not answered one by
//! the next is taken as gone. The PONG is read when the connection is polled, so callers poll
//! the connection before [`Keepalive::peer_gone`] in each round: a PONG already received
//! never loses to the deadline. (A PONG queues behind whatever the peer's socket has yet to
//! send; with the default 10 s that is seconds of a saturated link.)

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;
use tokio::time::{interval, Interval, MissedTickBehavior};

pub struct Keepalive {
    ping_pong: Option<h2::PingPong>,
    tick: Interval,
    awaiting_pong: bool,
}

impl Keepalive {
    /// `ping_pong` from the connection (`None`: no PINGs, never reports a dead peer).
    pub fn new(ping_pong: Option<h2::PingPong>, every: Duration) -> Self {
        let mut tick = interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.reset();
        Self {
            ping_pong,
            tick,
            awaiting_pong: false,
        }
    }

    /// Resolves when the peer left a PING unanswered for a whole period. Cancel-safe: call it
    /// again in every `select!` round while the connection is driven.
    pub async fn peer_gone(&mut self) {
        loop {
            let Some(pp) = self.ping_pong.as_mut() else {
                return std::future::pending().await;
            };
            if !self.awaiting_pong {
                self.tick.tick().await;
                self.awaiting_pong = pp.send_ping(h2::Ping::opaque()).is_ok();
                continue;
            }
            tokio::select! {
                // A PONG that is in together with the deadline counts.
                biased;
                pong = poll_fn(|cx| match pp.poll_pong(cx) {
                    Poll::Ready(r) => Poll::Ready(r.is_ok()),
                    Poll::Pending => Poll::Pending,
                }) => {
                    self.awaiting_pong = false;
                    if !pong {
                        // The connection failed: driving it ends the caller's loop.
                        self.ping_pong = None;
                    }
                }
                _ = self.tick.tick() => return,
            }
        }
    }
}
