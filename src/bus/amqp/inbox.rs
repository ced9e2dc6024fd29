//! A session's consumer: deliveries in order, only from what the session
//! follows, acknowledged in batches by the server once written to the socket
//! or, with client acks, when the client says so (`ack_upto`). With per-node
//! fanout, room frames come from the node's feed beside the consumer, which
//! then carries only direct messages.
//!
//! A resumed session's queue first gives again what the old connection had
//! received but not acknowledged (RabbitMQ marks them `redelivered`). Those
//! up to the client's `last_id` were processed already: they are held back
//! until that id shows up and then dropped, or let through when it does not.
//!
//! Where the queue dropped messages (it was full), a `gap` frame goes out in
//! their place, found by the publishers' numbers ([`crate::bus::gaps`]). A
//! session that may be resumed leaves a [`ParkNote`] when it ends, where its
//! numbers stood, so that drops while the session is parked are told too.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicAckOptions;
use lapin::types::{DeliveryTag, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use tokio::sync::mpsc;
use tracing::debug;
use tungstenite::Utf8Bytes;

use super::consumer_connection::{ConsumerError, Delivered, QueueConsumer};
use super::node_fanout::RoomFrame;
use super::{Names, PREFETCH, delivered_text, unavailable};
use crate::bus::acks::{AckError, ClientAcks, Receipt, Settled};
use crate::bus::dropped::Dropped;
use crate::bus::gaps::{Gaps, Number, Observed, ParkNote, gap_frame};
use crate::bus::{AckMode, BusError};
use crate::names::{RoomName, SessionId, UserId};
use crate::protocol::frame_head;

/// Deliveries acknowledged with one `basic.ack` (`multiple`) at most, when the
/// server acknowledges.
///
/// A server ack never guards against loss beyond the socket: it only hands
/// prefetch credit back to the broker.
/// Acking every delivery of a steady room cost the broker a frame per delivery
/// and lapin a wake-up of its I/O thread; a quarter of the window keeps credit
/// flowing while sending one ack where there were up to 64.
const ACK_EVERY: u32 = PREFETCH as u32 / 4;
/// How long a handed-over delivery may wait for a fuller ack. Bounded so that a
/// room going quiet still returns its credit, and far below RabbitMQ's consumer
/// timeout (30 minutes by default), past which it closes the channel.
const ACK_DELAY: Duration = Duration::from_millis(250);
/// How long redelivered messages are held back looking for the resuming
/// client's `last_id` once no more arrive: they come in one burst, so a pause
/// means the id is not among them.
const REPLAY_PAUSE: Duration = Duration::from_millis(100);

/// Where a session's deliveries come from.
pub(super) enum Source {
    /// lapin's consumer, and the session's channel its acks go out on (see
    /// [`Source::ack`]).
    Lapin {
        consumer: Consumer,
        channel: Channel,
    },
    /// A consumer on the connection of Warren's own (`--amqp-consumer own`).
    Own(QueueConsumer),
}

impl Source {
    async fn next(&mut self) -> Result<Delivered, BusError> {
        match self {
            Source::Lapin { consumer, .. } => from_lapin(consumer.next().await),
            Source::Own(consumer) => consumer.next().await.map_err(from_own),
        }
    }

    /// The next delivery if one is here already.
    fn try_next(&mut self) -> Option<Result<Delivered, BusError>> {
        match self {
            Source::Lapin { consumer, .. } => consumer.next().now_or_never().map(from_lapin),
            Source::Own(consumer) => consumer.try_next().map(|next| next.map_err(from_own)),
        }
    }

    /// Queue a `basic.ack` on the session's channel, in call order, without
    /// waiting for it to be written: nothing a session does after an ack
    /// depends on it, and an ack awaited inside a future that is dropped
    /// (`recv` is one branch of the session's `select!`) must still go out
    /// before any later one.
    ///
    /// Not through a lapin delivery's `Acker`: lapin hands an acker's ack to
    /// a task of its own, and two such tasks may run in either order (tokio
    /// runs the newest spawned first). A `multiple` ack of a lower tag
    /// arriving after one of a higher tag names an unknown tag, and the
    /// broker closes the channel (`406 PRECONDITION_FAILED`); that happened
    /// to the bench's lapin client whenever an ack's future was dropped. The
    /// channel queues its frames at the first poll, in order.
    fn ack(&self, tag: DeliveryTag, multiple: bool) {
        match self {
            Source::Lapin { channel, .. } => {
                let ack = channel.basic_ack(tag, BasicAckOptions { multiple });
                if let Some(Err(e)) = ack.now_or_never() {
                    debug!(error = %e, "ack failed; the channel is gone");
                }
            }
            Source::Own(consumer) => consumer.channel().ack(tag, multiple),
        }
    }
}

fn from_lapin(
    next: Option<lapin::Result<lapin::message::Delivery>>,
) -> Result<Delivered, BusError> {
    match next {
        Some(Ok(delivery)) => Ok(Delivered {
            tag: delivery.delivery_tag,
            redelivered: delivery.redelivered,
            exchange: delivery.exchange,
            routing_key: delivery.routing_key,
            properties: delivery.properties,
            data: delivery.data,
        }),
        Some(Err(e)) => Err(unavailable(e)),
        None => Err(cancelled()),
    }
}

fn from_own(e: ConsumerError) -> BusError {
    match e {
        ConsumerError::Cancelled => cancelled(),
        e => BusError::Unavailable(e.to_string()),
    }
}

fn cancelled() -> BusError {
    BusError::Unavailable("the broker cancelled the subscription".into())
}

pub struct AmqpInbox {
    source: Source,
    /// With per-node fanout: the room frames the node's feed hands this
    /// session (the consumer then carries only direct messages).
    room_frames: Option<(mpsc::Receiver<RoomFrame>, Arc<Dropped>)>,
    /// Messages told missed (gap frames) since [`Self::take_missed`].
    told_missed: u64,
    /// Who acknowledges: with client acks, each frame gets a seq and its
    /// delivery tag (none for a room frame of the node's feed, acked by the
    /// node) waits here for the client's `ack_upto`.
    client_acks: Option<ClientAcks<Option<DeliveryTag>>>,
    /// A resumed session's redelivered messages, held back until `last_id`.
    replay: Option<Replay>,
    /// Frames ready to hand out before the consumer's next.
    ready: VecDeque<Utf8Bytes>,
    /// With client acks: skipped deliveries, to ack before the next wait.
    skipped: Vec<DeliveryTag>,
    /// The newest delivery handed to the socket but not yet acknowledged; acking
    /// it with `multiple` settles everything before it too.
    unsettled: Option<DeliveryTag>,
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
    /// The last number seen per publisher and destination, to find drops.
    gaps: Gaps,
    /// When the session may be resumed: its numbered deliveries not yet
    /// acknowledged, oldest first, and where its note goes when it ends.
    parking: Option<(VecDeque<Unacked>, ParkSlot)>,
}

/// Where an ended session's inbox leaves its [`ParkNote`] for its lease.
pub(super) type ParkSlot = Arc<Mutex<Option<ParkNote>>>;

/// A numbered delivery handed out and not yet acknowledged.
struct Unacked {
    /// Its seq on the connection (0 when the server acknowledges).
    client_seq: u64,
    number: Number,
    frame: Utf8Bytes,
}

/// Redelivered messages held back while looking for the client's last id.
struct Replay {
    last_id: String,
    held: Vec<Held>,
}

/// A redelivered message held back: its text, its delivery tag, what its
/// numbers showed, and the exchange it came from (for the gap frame before it).
struct Held {
    text: String,
    tag: DeliveryTag,
    observed: Observed,
    exchange: ShortString,
}

/// What one delivery turned out to be.
enum Taken {
    Frame(Utf8Bytes),
    Skipped,
}

impl AmqpInbox {
    pub(super) fn new(
        source: Source,
        room_frames: Option<(mpsc::Receiver<RoomFrame>, Arc<Dropped>)>,
        lost: tokio_util::sync::CancellationToken,
        names: &Names,
        session: &SessionId,
        acks: AckMode,
        user: &UserId,
    ) -> Self {
        Self {
            source,
            room_frames,
            told_missed: 0,
            client_acks: (acks == AckMode::Client).then(|| ClientAcks::new(user)),
            replay: None,
            ready: VecDeque::new(),
            skipped: Vec::new(),
            unsettled: None,
            unsettled_count: 0,
            unsettled_since: None,
            lost,
            following: HashSet::new(),
            direct_exchange: names.direct_exchange(),
            session: session.clone(),
            names: names.clone(),
            gaps: Gaps::default(),
            parking: None,
        }
    }

    /// A session that may be resumed: it leaves its [`ParkNote`] in `slot`
    /// when it ends.
    pub(super) fn parks_into(mut self, slot: Option<ParkSlot>) -> Self {
        self.parking = slot.map(|slot| (VecDeque::new(), slot));
        self
    }

    /// A resumed session: what comes again up to `last_id` was processed, and
    /// the numbers stand where the parked session's `note` left them.
    pub(super) fn resumed(&mut self, last_id: Option<&str>, note: Option<ParkNote>) {
        if let Some(note) = note {
            self.gaps.resume_from(note, last_id);
        }
        if let Some(last_id) = last_id {
            self.replay = Some(Replay {
                last_id: last_id.to_owned(),
                held: Vec::new(),
            });
        }
    }

    /// Deliver `room`'s messages from now on.
    pub fn follow(&mut self, room: &RoomName) {
        let exchange = self.names.room_exchange(room);
        self.gaps.forget(&exchange);
        self.following.insert(exchange);
    }

    /// Skip `room`'s messages from now on, even those already queued.
    pub fn unfollow(&mut self, room: &RoomName) {
        let exchange = self.names.room_exchange(room);
        if let Some((_, dropped)) = &self.room_frames {
            dropped.forget(&exchange);
        }
        self.gaps.left(&exchange);
        self.following.remove(&exchange);
    }

    /// The next delivery. While waiting, acks what was handed over once
    /// [`ACK_DELAY`] has passed, so a quiet room does not sit on its credit.
    pub async fn recv(&mut self) -> Result<Utf8Bytes, BusError> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(frame);
            }
            if self.tell_feed_drops() {
                continue;
            }
            self.ack_skipped();
            let since = self.unsettled_since;
            let ack_due = async move {
                match since {
                    Some(since) => tokio::time::sleep_until(since + ACK_DELAY).await,
                    None => std::future::pending().await,
                }
            };
            let holding = self.replay.as_ref().is_some_and(|r| !r.held.is_empty());
            // With client acks a full window takes nothing more from the
            // feed (the broker's prefetch holds back the consumer's): the
            // session's queue fills, and past its length drops, told as a gap.
            let window_full = self.window_full();
            let room_frame = async {
                match &mut self.room_frames {
                    Some((frames, _)) if !window_full => frames.recv().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                next = self.source.next() => match self.take(next)? {
                    Taken::Frame(frame) => return Ok(frame),
                    Taken::Skipped => {}
                },
                frame = room_frame => {
                    if let Some(frame) = self.take_room_frame(frame)? {
                        return Ok(frame);
                    }
                }
                _ = self.lost.cancelled() => {
                    return Err(BusError::Unavailable("the broker connection was lost".into()));
                }
                () = ack_due => self.ack(),
                () = tokio::time::sleep(REPLAY_PAUSE), if holding => self.end_replay(),
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Result<Utf8Bytes, BusError>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Some(Ok(frame));
            }
            let window_full = self.window_full();
            if let Some((frames, _)) = &mut self.room_frames
                && !window_full
            {
                let next = match frames.try_recv() {
                    Ok(frame) => Some(frame),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if self.tell_feed_drops() {
                            continue;
                        }
                        None
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => return Some(Err(feed_lost())),
                };
                if let Some(frame) = next {
                    match self.take_room_frame(Some(frame)) {
                        Ok(Some(frame)) => return Some(Ok(frame)),
                        Ok(None) => continue,
                        Err(e) => return Some(Err(e)),
                    }
                }
            }
            let next = self.source.try_next()?;
            match self.take(next) {
                Ok(Taken::Frame(frame)) => return Some(Ok(frame)),
                Ok(Taken::Skipped) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    fn take(&mut self, next: Result<Delivered, BusError>) -> Result<Taken, BusError> {
        let delivery = next?;
        if !self.wanted(&delivery.exchange, &delivery.properties) {
            self.skip(delivery.tag);
            return Ok(Taken::Skipped);
        }
        let observed = self.gaps.observe(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &delivery.properties,
        );
        let text = delivered_text(delivery.data);
        if let Some(replay) = &mut self.replay {
            if delivery.redelivered {
                let last =
                    frame_head(&text).and_then(|(_, id)| id) == Some(replay.last_id.as_str());
                replay.held.push(Held {
                    text,
                    tag: delivery.tag,
                    observed,
                    exchange: delivery.exchange,
                });
                if last {
                    // Everything held was processed before the socket
                    // dropped, so nothing dropped between them was missed.
                    let processed = std::mem::take(&mut replay.held);
                    self.replay = None;
                    for held in processed {
                        self.skip(held.tag);
                    }
                } else if replay.held.len() >= usize::from(PREFETCH) {
                    self.end_replay();
                }
                return Ok(Taken::Skipped);
            }
            self.end_replay();
        }
        if observed.missed > 0 || !self.ready.is_empty() {
            self.tell_missed(delivery.exchange.as_str(), observed.missed);
            let frame = self.hand_out(text, delivery.tag, observed.number);
            self.ready.push_back(frame);
            return Ok(Taken::Skipped);
        }
        Ok(Taken::Frame(self.hand_out(
            text,
            delivery.tag,
            observed.number,
        )))
    }

    /// A gap frame for `missed` messages before the next frame, if any.
    /// Not stamped: a gap frame takes no seq and needs no ack.
    fn tell_missed(&mut self, exchange: &str, missed: u64) {
        if missed > 0 {
            self.told_missed += missed;
            let room = self.names.room_of(exchange);
            self.ready.push_back(gap_frame(room, missed));
        }
    }

    /// A room frame from the node's feed: handed out if the session follows
    /// its room. `None`: the feed was lost, and with it this session's rooms.
    fn take_room_frame(&mut self, frame: Option<RoomFrame>) -> Result<Option<Utf8Bytes>, BusError> {
        let Some((exchange, frame, missed)) = frame else {
            return Err(feed_lost());
        };
        if !self.following.contains(&*exchange) {
            return Ok(None);
        }
        let frame = match &mut self.client_acks {
            Some(acks) => acks.stamp(&frame, None),
            None => frame,
        };
        if missed > 0 {
            // The gap first, where the frames were lost; the frame after it.
            self.told_missed += missed;
            self.ready.push_back(frame);
            return Ok(Some(gap_frame(self.names.room_of(&exchange), missed)));
        }
        Ok(Some(frame))
    }

    /// With client acks, whether the client holds a full window unacknowledged.
    fn window_full(&self) -> bool {
        self.client_acks.as_ref().is_some_and(ClientAcks::is_full)
    }

    /// Once the feed's queue is read empty: gap frames for what it could
    /// not take after its last frame, in the rooms followed. Whether any.
    fn tell_feed_drops(&mut self) -> bool {
        let Some((frames, dropped)) = &self.room_frames else {
            return false;
        };
        if !frames.is_empty() {
            return false;
        }
        let mut told = false;
        for (exchange, missed) in dropped.drain() {
            let Some(exchange) = exchange else { continue };
            if self.following.contains(&*exchange) {
                self.told_missed += missed;
                let gap = gap_frame(self.names.room_of(&exchange), missed);
                self.ready.push_back(gap);
                told = true;
            }
        }
        told
    }

    /// Drops found since the last call, for the metrics.
    pub fn take_missed(&mut self) -> u64 {
        std::mem::take(&mut self.told_missed)
    }

    /// `last_id` was not among the redelivered messages: they are all new to
    /// the client, in their order, with what was dropped between them.
    fn end_replay(&mut self) {
        if let Some(replay) = self.replay.take() {
            for held in replay.held {
                self.tell_missed(held.exchange.as_str(), held.observed.missed);
                let frame = self.hand_out(held.text, held.tag, held.observed.number);
                self.ready.push_back(frame);
            }
        }
    }

    /// A delivery on its way to the client: stamped with its seq when the
    /// client acknowledges, else remembered for the server's next ack; and,
    /// when the session may be resumed, kept in mind until acknowledged.
    fn hand_out(&mut self, text: String, tag: DeliveryTag, number: Option<Number>) -> Utf8Bytes {
        let (frame, client_seq) = match &mut self.client_acks {
            Some(acks) => (acks.stamp(&text, Some(tag)), acks.last_stamped()),
            None => {
                self.unsettled = Some(tag);
                (Utf8Bytes::from(text), 0)
            }
        };
        if let (Some((unacked, _)), Some(number)) = (&mut self.parking, number) {
            unacked.push_back(Unacked {
                client_seq,
                number,
                frame: frame.clone(),
            });
        }
        frame
    }

    /// A delivery the client never sees still holds prefetch credit: settle it.
    fn skip(&mut self, tag: DeliveryTag) {
        match &self.client_acks {
            // Nothing the client has yet to acknowledge comes before it, so
            // acking it with `multiple` (at the next ack) settles only skips.
            None => {
                self.unsettled = Some(tag);
                self.count_unsettled(1);
            }
            // Acked alone, soon: the client may never send an `ack_upto` that
            // would cover it (it sees nothing to ack), and it must not hold
            // the window shut.
            Some(_) => self.skipped.push(tag),
        }
    }

    /// Ack the skipped deliveries one by one, in order, and always before an
    /// `ack_upto`'s `multiple` ack: a tag acked twice closes the channel.
    fn ack_skipped(&mut self) {
        for tag in std::mem::take(&mut self.skipped) {
            self.source.ack(tag, false);
        }
    }

    /// The client processed every delivery up to `seq`: the receipts owed.
    pub fn ack_upto(&mut self, seq: u64) -> Result<Vec<Receipt>, AckError> {
        let Some(acks) = &mut self.client_acks else {
            return Err(AckError::NotAcking);
        };
        let Settled { mut kept, receipts } = acks.ack_upto(seq)?;
        if let Some((unacked, _)) = &mut self.parking {
            while unacked.front().is_some_and(|u| u.client_seq <= seq) {
                unacked.pop_front();
            }
        }
        self.ack_skipped();
        // The newest broker delivery settles every one before it; room frames
        // of the node's feed have nothing to settle here.
        if let Some(tag) = kept.drain(..).rev().flatten().next() {
            self.source.ack(tag, true);
        }
        Ok(receipts)
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
    pub fn settle(&mut self, handed_over: usize) {
        if self.client_acks.is_some() || self.unsettled.is_none() {
            return;
        }
        self.count_unsettled(handed_over);
        if self.unsettled_count >= ACK_EVERY {
            self.ack();
        }
    }

    fn ack(&mut self) {
        self.unsettled_count = 0;
        self.unsettled_since = None;
        if let Some((unacked, _)) = &mut self.parking {
            unacked.clear();
        }
        if let Some(tag) = self.unsettled.take() {
            self.source.ack(tag, true);
        }
    }
}

impl Drop for AmqpInbox {
    /// Leave the note for the lease, which keeps it with the queue if the
    /// session is parked.
    fn drop(&mut self) {
        if let Some((unacked, slot)) = &self.parking {
            let unacked = unacked.iter().map(|u| {
                let id = frame_head(&u.frame).and_then(|(_, id)| id.map(str::to_owned));
                (u.number, id)
            });
            *slot.lock().unwrap() = Some(self.gaps.park(unacked));
        }
    }
}

/// The node's feed of room messages ended (its broker connection was lost):
/// the session ends, as when its own queue's connection is lost.
fn feed_lost() -> BusError {
    BusError::Unavailable("the node's room feed was lost".into())
}
