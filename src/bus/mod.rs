//! The bus: how a session reaches every other session in its room.
//!
//! One abstraction, two homes:
//! - [`amqp`]: RabbitMQ. Every session gets its own exclusive queue
//!   (`<prefix>.conn.<session>`), bound to the fanout exchange of each room it
//!   subscribes to (`<prefix>.room.<room>`) and, by its user id, to the direct
//!   exchange for direct messages; on a channel of its own multiplexed over a
//!   small pool of AMQP connections ([`pool`]). With `--room-fanout per-node`
//!   rooms reach sessions through one queue per node instead
//!   ([`amqp::node_fanout`]).
//! - [`memory`]: the embedded in-process bus, one node, the same semantics.
//!
//! A session only sees [`Subscription`]: a [`Link`] to publish and to bind its
//! queue to rooms, an [`Inbox`] of delivered frames (already-serialised JSON,
//! forwarded as is) from the rooms it follows and its direct messages, and a
//! [`Lease`] whose release deletes its queue. The session code does not know
//! which bus it talks to; it uses the [`SessionLink`] trait, which its unit
//! tests implement with a stand-in.
//!
//! A queue that overflows tells its session how much it dropped, with a `gap`
//! frame in the inbox ([`gaps`] on RabbitMQ, counted at the queue on the
//! embedded bus).
//!
//! Every broker operation a client waits on is bounded by [`BROKER_TIMEOUT`]: a
//! half-open link must cost the client a `503 unavailable`, never a hang.
//!
//! The file is a little over 400 lines because every operation dispatches to
//! both buses here, in one place, rather than behind a trait object.

pub mod acks;
pub mod amqp;
pub mod dropped;
pub mod gaps;
pub mod history;
pub mod memory;
pub mod pool;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tracing::debug;

use crate::config::Config;
use crate::names::{RoomName, SessionId, UserId};
use crate::protocol::Destination;

/// How long one broker operation a client waits on (subscribing, publishing)
/// may take before the broker is considered stuck.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often, and after how long, a resume looks again for the old
/// connection to let go of its queue (once it notices its socket died); about
/// three seconds in all, within [`BROKER_TIMEOUT`].
const TAKEOVER_WAITS: [Duration; 6] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
];

/// `operation`, bounded by [`BROKER_TIMEOUT`].
pub(crate) async fn bounded<T>(
    operation: impl Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    tokio::time::timeout(BROKER_TIMEOUT, operation)
        .await
        .unwrap_or(Err(BusError::TimedOut))
}

/// What can go wrong on the bus, as the session needs to tell it apart.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BusError {
    /// Another session (on this node or any other) holds this session slot of
    /// the user.
    #[error("session slot already held")]
    SlotTaken,
    /// A direct message found no queue: its recipient is not connected anywhere.
    #[error("no such user is connected")]
    NoRecipient,
    /// The broker is unreachable or refused the operation; retry later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The broker did not answer within [`BROKER_TIMEOUT`]: it is stuck, or the
    /// link to it is half open.
    #[error("the broker did not answer in time")]
    TimedOut,
    /// The session to resume has no queue any more (its grace ran out, it was
    /// never this user's, or resume is off), or another connection still
    /// holds it.
    #[error("the session cannot be resumed")]
    SessionGone,
}

/// What a publisher asks of the bus about one room message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// The broker's confirm: the sender is told it was taken (`ack`), or
    /// that it was not.
    Confirmed,
    /// The client asked for no `ack` (it sent no `ref`): handed to the
    /// broker in order, and its failure is reported only if the broker
    /// connection fails under it. Costs the broker no confirm.
    BestEffort,
}

/// Who acknowledges a session's deliveries to the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// The server, once a delivery is written to the socket: what the socket
    /// had not yet sent when it dropped is lost.
    #[default]
    Server,
    /// The client, with `ack_upto`: a delivery stays on the bus until the client
    /// says it processed it, and a resumed session gets it again.
    Client,
}

/// What a session asks of the bus when it opens.
pub struct Opening<'a> {
    pub session: &'a SessionId,
    pub user: &'a UserId,
    /// The user's session slot it holds (see [`crate::claims`]).
    pub slot: u16,
    pub acks: AckMode,
    /// Take over this session's queue, which outlived its socket, instead of
    /// declaring a new one ([`BusError::SessionGone`] when it is gone).
    pub resume: Option<Resume<'a>>,
    /// A room to bind the queue to as part of the open (the URL's): an open
    /// that succeeds is bound to it. Cheaper than a bind after it: a new
    /// session's queue is bound on the RabbitMQ channel the open runs on.
    pub room: Option<&'a RoomName>,
}

/// A dropped session's queue, taken over.
pub struct Resume<'a> {
    /// The id of the last delivery the client processed: that one and any
    /// before it that come again are not delivered twice.
    pub last_id: Option<&'a str>,
}

/// The bus a node runs on. Cheap to clone.
#[derive(Clone)]
pub enum Bus {
    Memory(memory::MemoryBus),
    Amqp(amqp::AmqpBus),
}

impl Bus {
    /// The bus `config` asks for: RabbitMQ at `--amqp-url` (a comma-separated
    /// list fails over in order), or the embedded bus when it is unset. Waits for
    /// each pooled connection's first attempt, then (with a broker, and history
    /// kept) up to [`BROKER_TIMEOUT`] for the history reader; a broker that is
    /// down is not an error (the pool keeps trying), an empty URL list is.
    pub async fn connect(
        config: &Config,
        node_id: &str,
        reconnects: prometheus_client::metrics::counter::Counter,
    ) -> Result<Bus, BusError> {
        let rings = history::Rings::new(config.history_per_room);
        let Some(urls) = &config.amqp_url else {
            return Ok(Bus::Memory(memory::MemoryBus::new(
                config.resume_grace(),
                rings,
                usize::try_from(config.queue_max_length).unwrap_or(usize::MAX),
            )));
        };
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() {
            return Err(BusError::Unavailable("--amqp-url is empty".into()));
        }
        let pool = pool::Pool::start(
            urls,
            config.amqp_connections,
            &format!("warren {node_id}"),
            reconnects,
            config.amqp_consumer,
        )
        .await;
        let settings = amqp::AmqpSettings {
            prefix: &config.prefix,
            node_id,
            queue_max_length: config.queue_max_length,
            resume_grace: config.resume_grace(),
            history: rings
                .enabled()
                .then_some((config.history_max_age, config.history_max_bytes)),
            room_fanout: config.room_fanout,
        };
        let bus = amqp::AmqpBus::new(settings, pool, rings);
        bus.start_history_reader().await;
        Ok(Bus::Amqp(bus))
    }

    /// Room history, as this node has read it.
    pub fn history(&self) -> std::sync::Arc<history::Rings> {
        match self {
            Bus::Memory(bus) => bus.rings(),
            Bus::Amqp(bus) => bus.rings(),
        }
    }

    /// A marker in the history stream before a subscribe that asks for the
    /// last messages binds ([`history`]): `None` on the embedded bus (it
    /// records as it publishes), with no history kept, or when it could not be
    /// put (the page then ends where the subscribe's second marker does).
    pub async fn history_mark(&self) -> Option<history::Marker> {
        match self {
            Bus::Amqp(bus) if bus.rings().enabled() => {
                let put = bus
                    .rings()
                    .put_marker(|id| async move { bus.put_marker(&id).await })
                    .await;
                put.inspect_err(|e| debug!(error = %e, "no marker before the bind"))
                    .ok()
            }
            _ => None,
        }
    }

    /// Resolves when [`Bus::history`] holds every room message published
    /// before the call (at once on the embedded bus, which records as it
    /// publishes), with where a page meeting live traffic must end. Bounded
    /// by [`BROKER_TIMEOUT`].
    pub async fn history_caught_up(&self) -> Result<history::Cut, BusError> {
        match self {
            Bus::Memory(_) => Ok(history::Cut::NOW),
            // No history kept: no stream, no reader, nothing to wait for.
            Bus::Amqp(bus) if !bus.rings().enabled() => Ok(history::Cut::NOW),
            Bus::Amqp(bus) => {
                bus.rings()
                    .wait_for_marker(|id| async move { bus.put_marker(&id).await })
                    .await
            }
        }
    }

    /// Open a session's place on the bus, holding the user's session slot: a
    /// queue that direct messages to the user reach at once, and rooms once
    /// bound; or, resuming, the old session's queue with everything still in
    /// it. Bounded by [`BROKER_TIMEOUT`] (a resume that waits for the old
    /// connection to let go of its queue gets most of it).
    pub async fn open(&self, opening: &Opening<'_>) -> Result<Subscription, BusError> {
        match self {
            Bus::Memory(bus) => {
                let subscription = bus.open(opening).await?;
                if let Some(room) = opening.room {
                    subscription.link.bind(room).await?;
                }
                Ok(subscription)
            }
            Bus::Amqp(bus) => bounded(bus.open(opening)).await,
        }
    }

    /// Whether a resumed session gets the room messages its client missed
    /// from its own queue (`resumed.recovered`); with per-node fanout rooms
    /// are not kept per connection, and the client asks history instead.
    pub fn resumes_rooms(&self) -> bool {
        match self {
            Bus::Memory(_) => true,
            Bus::Amqp(bus) => bus.resumes_rooms(),
        }
    }

    /// Whether `user`'s `session` is alive anywhere the bus reaches (its queue
    /// exists).
    pub async fn session_alive(
        &self,
        user: &UserId,
        session: &SessionId,
    ) -> Result<bool, BusError> {
        match self {
            Bus::Memory(bus) => Ok(bus.session_alive(session)),
            Bus::Amqp(bus) => bounded(bus.session_alive(user, session)).await,
        }
    }

    /// Whether all of `user`'s `max` session slots are held anywhere the bus
    /// reaches, so a new session would be refused. The embedded bus serves
    /// one node, whose claims know that already: always `false` there.
    pub async fn is_full(&self, user: &UserId, max: u16) -> Result<bool, BusError> {
        match self {
            Bus::Memory(_) => Ok(false),
            Bus::Amqp(bus) => bounded(bus.is_full(user, max)).await,
        }
    }

    /// The node's link for presence gossip between nodes (one queue per node on a
    /// presence fanout exchange). The embedded bus has no other nodes: its link
    /// carries nothing.
    pub async fn presence_link(&self, node_id: &str) -> Result<PresenceLink, BusError> {
        match self {
            Bus::Memory(_) => Ok(PresenceLink::Alone),
            Bus::Amqp(bus) => bus
                .presence_link(node_id)
                .await
                .map(|link| PresenceLink::Amqp(Box::new(link))),
        }
    }

    /// Publish without a session (HTTP publishing) as `from`, waiting for the
    /// broker's confirm, bounded by [`BROKER_TIMEOUT`]. A room nobody is in
    /// takes the message and drops it; a direct message to a user who is not
    /// connected anywhere is [`BusError::NoRecipient`], and its copy goes to
    /// `from`'s connections.
    pub async fn publish(
        &self,
        to: &Destination,
        from: &UserId,
        payload: Bytes,
    ) -> Result<(), BusError> {
        match (self, to) {
            (Bus::Memory(bus), Destination::Room(room)) => {
                bus.publish_room(room, payload);
                Ok(())
            }
            (Bus::Memory(bus), Destination::User(user)) => {
                bus.publish_direct(user, from, None, payload)
            }
            (Bus::Amqp(bus), Destination::Room(room)) => {
                bounded(bus.publish_room(room, payload)).await
            }
            (Bus::Amqp(bus), Destination::User(user)) => {
                bounded(bus.publish_direct(user, from, payload)).await
            }
        }
    }

    /// `Ok` when new sessions can subscribe and publish, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        match self {
            Bus::Memory(_) => Ok(()),
            Bus::Amqp(bus) => bus.readiness(),
        }
    }

    /// Whether this node reads the room history stream now (RabbitMQ with
    /// history kept); the embedded bus records history as it publishes.
    pub fn history_reading(&self) -> bool {
        match self {
            Bus::Memory(_) => false,
            Bus::Amqp(bus) => bus.history_reading(),
        }
    }

    /// Broker connections up (0 on the embedded bus).
    pub fn broker_connections(&self) -> usize {
        match self {
            Bus::Memory(_) => 0,
            Bus::Amqp(bus) => bus.connected(),
        }
    }

    /// Which bus this is, for logs and `/readyz`.
    pub fn kind(&self) -> &'static str {
        match self {
            Bus::Memory(_) => "memory",
            Bus::Amqp(_) => "amqp",
        }
    }

    /// Close broker connections. Call after every session has released its lease.
    pub async fn close(&self) {
        match self {
            Bus::Memory(_) => {}
            Bus::Amqp(bus) => bus.close().await,
        }
    }
}

/// One session's place on the bus.
pub struct Subscription {
    pub link: Link,
    pub inbox: Inbox,
    pub lease: Lease,
}

impl Subscription {
    /// Give up the link and the inbox, keeping only the lease to release.
    pub fn into_lease(self) -> Lease {
        let Subscription { link, inbox, lease } = self;
        drop(inbox);
        drop(link);
        lease
    }
}

/// What a session does on the bus: [`Link`] on a real bus; a stand-in in the
/// session's unit tests, which need confirms that arrive when they say so.
pub trait SessionLink {
    /// Resolves when the bus has taken responsibility for the frame, or refused it.
    type Confirm: Future<Output = Result<(), BusError>> + Unpin + Send + 'static;

    /// Hand `payload` to the bus for `to`: a room the session is bound to, or a
    /// user. Frames published through one link reach every receiver in the
    /// order they were published. A direct message's confirm fails with
    /// [`BusError::NoRecipient`] when nobody by that id is connected; direct
    /// messages are always confirmed, room messages as `guarantee` asks.
    fn publish(
        &self,
        to: &Destination,
        payload: Bytes,
        guarantee: Guarantee,
    ) -> impl Future<Output = Result<Self::Confirm, BusError>> + Send;

    /// A `delivered` receipt to every connection of `to` (no copy anywhere
    /// else, no confirm awaited; nobody connected is no error).
    fn publish_receipt(
        &self,
        to: &UserId,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Bind the session's queue to `room`: when this returns, everything
    /// published to the room afterwards reaches the queue.
    fn bind(&self, room: &RoomName) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Unbind the session's queue from `room`.
    fn unbind(&self, room: &RoomName) -> impl Future<Output = Result<(), BusError>> + Send;
}

/// A session's link on the bus it runs on.
pub enum Link {
    Memory(memory::MemoryLink),
    // Boxed: channel, names and the node's fanout make it several times the
    // embedded bus's link.
    Amqp(Box<amqp::AmqpLink>),
}

impl SessionLink for Link {
    type Confirm = Confirm;

    async fn publish(
        &self,
        to: &Destination,
        payload: Bytes,
        guarantee: Guarantee,
    ) -> Result<Confirm, BusError> {
        match (self, to) {
            (Link::Memory(l), Destination::Room(room)) => {
                Ok(Confirm::Done(Some(l.publish(room, payload))))
            }
            (Link::Memory(l), Destination::User(user)) => {
                Ok(Confirm::Done(Some(l.publish_direct(user, payload))))
            }
            (Link::Amqp(l), Destination::Room(room)) => {
                l.publish(room, payload, guarantee).await.map(Confirm::Amqp)
            }
            // Boxed: two publishes in a row make a large future, which would
            // otherwise grow every session's task, idle or not.
            (Link::Amqp(l), Destination::User(user)) => Box::pin(l.publish_direct(user, payload))
                .await
                .map(Confirm::Amqp),
        }
    }

    async fn publish_receipt(&self, to: &UserId, payload: Bytes) -> Result<(), BusError> {
        match self {
            Link::Memory(l) => {
                l.publish_receipt(to, payload);
                Ok(())
            }
            Link::Amqp(l) => l.publish_receipt(to, payload).await,
        }
    }

    async fn bind(&self, room: &RoomName) -> Result<(), BusError> {
        match self {
            Link::Memory(l) => {
                l.bind(room);
                Ok(())
            }
            Link::Amqp(l) => bounded(l.bind(room)).await,
        }
    }

    async fn unbind(&self, room: &RoomName) -> Result<(), BusError> {
        match self {
            Link::Memory(l) => {
                l.unbind(room);
                Ok(())
            }
            Link::Amqp(l) => bounded(l.unbind(room)).await,
        }
    }
}

/// Gossip between nodes about who is connected where.
pub enum PresenceLink {
    /// A single node: nothing to tell, nothing to hear.
    Alone,
    Amqp(Box<amqp::AmqpPresenceLink>),
}

impl PresenceLink {
    pub async fn publish(&self, payload: Bytes) -> Result<(), BusError> {
        match self {
            PresenceLink::Alone => Ok(()),
            PresenceLink::Amqp(link) => link.publish(payload).await,
        }
    }

    /// The next gossip message from any node (this one included).
    pub async fn recv(&mut self) -> Result<Bytes, BusError> {
        match self {
            PresenceLink::Alone => std::future::pending().await,
            PresenceLink::Amqp(link) => link.recv().await,
        }
    }
}

/// The bus's answer to one publish.
pub enum Confirm {
    Done(Option<Result<(), BusError>>),
    Amqp(amqp::AmqpConfirm),
}

impl Future for Confirm {
    type Output = Result<(), BusError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Confirm::Done(result) => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(BusError::Unavailable("confirm polled twice".into()))),
            ),
            Confirm::Amqp(confirm) => Pin::new(confirm).poll(cx),
        }
    }
}

/// Frames delivered to this session, in order, from the rooms it follows and
/// its direct messages, as JSON text that the socket
/// takes as it is (`Utf8Bytes` is what tungstenite sends without copying).
pub enum Inbox {
    // Both boxed: each side holds its queue's state, and the session's task
    // holds the enum.
    Memory(Box<memory::MemoryInbox>),
    // The AMQP side holds a consumer, an acker and its ack timing.
    Amqp(Box<amqp::AmqpInbox>),
}

impl Inbox {
    /// The next delivered frame. An error means the session can no longer receive
    /// (the broker went away) and should end.
    pub async fn recv(&mut self) -> Result<tungstenite::Utf8Bytes, BusError> {
        match self {
            Inbox::Memory(i) => i.recv().await,
            Inbox::Amqp(i) => i.recv().await,
        }
    }

    /// Deliver `room`'s messages from now on (call once bound to it).
    pub fn follow(&mut self, room: &RoomName) {
        match self {
            Inbox::Memory(i) => i.follow(room),
            Inbox::Amqp(i) => i.follow(room),
        }
    }

    /// Skip `room`'s messages from now on, even those already queued (call
    /// before unbinding).
    pub fn unfollow(&mut self, room: &RoomName) {
        match self {
            Inbox::Memory(i) => i.unfollow(room),
            Inbox::Amqp(i) => i.unfollow(room),
        }
    }

    /// A frame that is ready now, without waiting; lets the session batch writes.
    pub fn try_recv(&mut self) -> Option<Result<tungstenite::Utf8Bytes, BusError>> {
        match self {
            Inbox::Memory(i) => i.try_recv(),
            Inbox::Amqp(i) => i.try_recv(),
        }
    }

    /// Tell the bus every frame received so far (`handed_over` since the last
    /// call) has been handed to the socket, so it may send more (the AMQP
    /// prefetch window). With [`AckMode::Client`] only the client settles.
    pub fn settle(&mut self, handed_over: usize) {
        match self {
            Inbox::Memory(_) => {}
            Inbox::Amqp(i) => i.settle(handed_over),
        }
    }

    /// Messages the session's queue dropped that were found since the last
    /// call (each told to the client in a `gap` frame), for the metrics.
    pub fn take_missed(&mut self) -> u64 {
        match self {
            Inbox::Memory(i) => i.take_missed(),
            Inbox::Amqp(i) => i.take_missed(),
        }
    }

    /// The client processed every delivery up to `seq` ([`AckMode::Client`]):
    /// the receipts that owes.
    pub fn ack_upto(&mut self, seq: u64) -> Result<Vec<acks::Receipt>, acks::AckError> {
        match self {
            Inbox::Memory(i) => i.ack_upto(seq),
            Inbox::Amqp(i) => i.ack_upto(seq),
        }
    }
}

/// The session's hold on its queue and its session slot on the bus.
pub enum Lease {
    Memory(memory::MemoryLease),
    Amqp(amqp::AmqpLease),
}

/// What becomes of a session's queue when the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Deleted: the client left, or may not come back.
    Delete,
    /// Kept for the resume grace (when the bus offers one), with whatever the
    /// client had not acknowledged back in it, for a `?resume=`.
    KeepForResume,
}

impl Lease {
    /// Free the session's slot and delete its queue or keep it for a resume.
    /// Every session calls this when it ends; dropping a lease unreleased
    /// spawns the deleting cleanup.
    pub async fn release(self, queue: Release) {
        match self {
            Lease::Memory(l) => l.release(queue),
            Lease::Amqp(l) => l.release(queue).await,
        }
    }
}
