//! A session's consumer: deliveries in order, acknowledged in batches, and
//! only from what the session follows.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicAckOptions;
use lapin::types::ShortString;
use lapin::{Acker, BasicProperties, Consumer};
use tracing::debug;
use tungstenite::Utf8Bytes;

use super::{Names, PREFETCH, unavailable};
use crate::bus::BusError;
use crate::names::{RoomName, SessionId};

/// Deliveries acknowledged with one `basic.ack` (`multiple`) at most.
///
/// A session's queue is exclusive and deleted with the session, so an ack never
/// guards against loss here: it only hands prefetch credit back to the broker.
/// Acking every delivery of a steady room cost the broker a frame per delivery
/// and lapin a wake-up of its I/O thread; a quarter of the window keeps credit
/// flowing while sending one ack where there were up to 64.
const ACK_EVERY: u32 = PREFETCH as u32 / 4;
/// How long a handed-over delivery may wait for a fuller ack. Bounded so that a
/// room going quiet still returns its credit, and far below RabbitMQ's consumer
/// timeout (30 minutes by default), past which it closes the channel.
const ACK_DELAY: Duration = Duration::from_millis(250);

pub struct AmqpInbox {
    consumer: Consumer,
    /// The newest delivery handed to the socket but not yet acknowledged; acking
    /// it with `multiple` settles everything before it too.
    unsettled: Option<Acker>,
    /// How many deliveries that ack would settle, and since when the oldest waits.
    unsettled_count: u32,
    unsettled_since: Option<tokio::time::Instant>,
    /// The pool's word that this session's connection died.
    lost: tokio_util::sync::CancellationToken,
    /// The exchanges of the rooms the session follows. A delivery from any
    /// other room (still queued when it unsubscribed) is skipped.
    following: HashSet<String>,
    /// Deliveries from here are direct messages.
    direct_exchange: String,
    /// Copies of this session's own direct messages carry its id; it skips them.
    session: SessionId,
    names: Names,
}

/// What one delivery turned out to be.
enum Taken {
    Frame(Utf8Bytes),
    Skipped,
}

impl AmqpInbox {
    pub(super) fn new(
        consumer: Consumer,
        lost: tokio_util::sync::CancellationToken,
        names: &Names,
        session: &SessionId,
    ) -> Self {
        Self {
            consumer,
            unsettled: None,
            unsettled_count: 0,
            unsettled_since: None,
            lost,
            following: HashSet::new(),
            direct_exchange: names.direct_exchange(),
            session: session.clone(),
            names: names.clone(),
        }
    }

    /// Deliver `room`'s messages from now on.
    pub fn follow(&mut self, room: &RoomName) {
        self.following.insert(self.names.room_exchange(room));
    }

    /// Skip `room`'s messages from now on, even those already queued.
    pub fn unfollow(&mut self, room: &RoomName) {
        self.following.remove(&self.names.room_exchange(room));
    }

    /// The next delivery. While waiting, acks what was handed over once
    /// [`ACK_DELAY`] has passed, so a quiet room does not sit on its credit.
    pub async fn recv(&mut self) -> Result<Utf8Bytes, BusError> {
        loop {
            let since = self.unsettled_since;
            let ack_due = async move {
                match since {
                    Some(since) => tokio::time::sleep_until(since + ACK_DELAY).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                next = self.consumer.next() => match self.take(next)? {
                    Taken::Frame(frame) => return Ok(frame),
                    Taken::Skipped => {}
                },
                _ = self.lost.cancelled() => {
                    return Err(BusError::Unavailable("the broker connection was lost".into()));
                }
                () = ack_due => self.ack().await,
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Result<Utf8Bytes, BusError>> {
        loop {
            let next = self.consumer.next().now_or_never()?;
            match self.take(next) {
                Ok(Taken::Frame(frame)) => return Some(Ok(frame)),
                Ok(Taken::Skipped) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    fn take(
        &mut self,
        next: Option<lapin::Result<lapin::message::Delivery>>,
    ) -> Result<Taken, BusError> {
        match next {
            Some(Ok(delivery)) => {
                self.unsettled = Some(delivery.acker);
                if !self.wanted(&delivery.exchange, &delivery.properties) {
                    // Settled like a delivered one: it holds prefetch credit too.
                    self.count_unsettled(1);
                    return Ok(Taken::Skipped);
                }
                // Only Warren publishes to these exchanges, and only serde_json
                // output; a foreign non-UTF-8 message is replaced, not trusted.
                Ok(Taken::Frame(Utf8Bytes::from(
                    String::from_utf8(delivery.data)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                )))
            }
            Some(Err(e)) => Err(unavailable(e)),
            None => Err(BusError::Unavailable(
                "the broker cancelled the subscription".into(),
            )),
        }
    }

    fn wanted(&self, exchange: &ShortString, properties: &BasicProperties) -> bool {
        let exchange = exchange.as_str();
        if exchange == self.direct_exchange {
            properties
                .correlation_id()
                .as_ref()
                .is_none_or(|origin| origin.as_str() != self.session.as_str())
        } else {
            self.following.contains(exchange)
        }
    }

    fn count_unsettled(&mut self, n: usize) {
        self.unsettled_count = self
            .unsettled_count
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        self.unsettled_since
            .get_or_insert_with(tokio::time::Instant::now);
    }

    /// Everything taken so far is on the socket. Ack it once [`ACK_EVERY`]
    /// deliveries wait; fewer are acked by [`Self::recv`] after [`ACK_DELAY`].
    pub async fn settle(&mut self, handed_over: usize) {
        if self.unsettled.is_none() {
            return;
        }
        self.count_unsettled(handed_over);
        if self.unsettled_count >= ACK_EVERY {
            self.ack().await;
        }
    }

    async fn ack(&mut self) {
        self.unsettled_count = 0;
        self.unsettled_since = None;
        if let Some(acker) = self.unsettled.take()
            && let Err(e) = acker.ack(BasicAckOptions { multiple: true }).await
        {
            debug!(error = %e, "ack failed; the channel is gone");
        }
    }
}
