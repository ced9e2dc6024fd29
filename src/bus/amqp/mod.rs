//! The RabbitMQ bus: an exclusive queue per connection, bound to the fanout
//! exchange of every room it subscribes to and, by its user id, to one direct
//! exchange for direct messages.
//!
//! Topology, with `<prefix>` from `--prefix`:
//! - `<prefix>.conn.<user>.<session>`: the connection's queue, consumed by one
//!   consumer at a time (an exclusive consumer). With `--resume-grace-secs`
//!   above 0 it outlives a dropped socket by that long (`x-expires`), holding
//!   what the client missed, until the client resumes it from any node (the
//!   user in its name ties the resume handle to the user); at 0 it is
//!   deleted with the session: exclusive, or, when Warren's own consumer
//!   connection reads it ([`consumer_connection`]), auto-deleted with its
//!   consumer. It is bounded (`x-max-length`,
//!   `x-overflow: drop-head`): a client too slow to keep up loses its oldest
//!   messages instead of growing the broker's memory.
//! - `<prefix>.note.<user>.<session>`: while a session is parked for a resume,
//!   where the numbers of its deliveries stood ([`crate::bus::gaps::ParkNote`]),
//!   read once by the resume.
//! - `<prefix>.room.<room>`: a fanout exchange per room, auto-deleted when its
//!   last queue unbinds, so empty rooms leave nothing behind. Subscribing binds
//!   the connection's queue to it; unsubscribing unbinds it.
//! - `<prefix>.fanout.<node>.<n>`: with `--room-fanout per-node`, the node's
//!   feed, bound to the rooms its sessions are in instead of their own queues
//!   ([`node_fanout`]); connection queues then carry direct messages only.
//! - `<prefix>.direct`: one direct exchange; every connection's queue is bound
//!   to it with its user id as the routing key, so a direct message published
//!   with the recipient's id reaches all of the recipient's connections on every
//!   node, and `mandatory` returns it when the recipient has none. The last node
//!   to close deletes it (`if-unused`).
//! - `<prefix>.slot.<user>.<n>`: an exclusive queue with no bindings, held by
//!   one session of `user`. At most `--sessions-per-user` slots exist per user,
//!   and the broker refuses a second holder of a slot anywhere in the cluster
//!   (`405 RESOURCE_LOCKED`): the per-user session limit is exact across nodes.
//!
//! Each session gets its own channel, for its consumer and its publishes:
//! publisher confirms and per-channel ordering make acks meaningful and keep
//! each sender's messages in order. With `--amqp-consumer own` (the default)
//! its consumer is on a second channel, on the consuming connection of
//! Warren's own that pairs each pooled lapin connection
//! ([`consumer_connection`]): lapin then declares, binds and publishes, and
//! the session's deliveries skip lapin's I/O thread. Anything that can fail with a channel-level
//! error (a taken slot, an exchange deleted under our feet) runs on a channel
//! that may die: a short-lived one, never a session's.
//!
//! This file declares the topology and opens sessions; a session's side of it
//! is in [`publisher`] (publish with confirms, bind to rooms), [`inbox`]
//! (consume, ack in batches, skip what it does not follow) and [`lease`] (queue
//! deletion, and the close of the consumer's channel); [`sessionless`] publishes for HTTP POSTs and asks about slots;
//! [`presence_link`] is the node's gossip queue.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicQosOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer, ExchangeKind};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

pub mod consumer_connection;
pub mod history_link;
pub mod inbox;
pub mod lease;
pub mod node_fanout;
pub mod presence_link;
pub mod publisher;
pub mod sessionless;

pub use inbox::AmqpInbox;
pub use lease::AmqpLease;
pub use presence_link::AmqpPresenceLink;
pub use publisher::{AmqpConfirm, AmqpLink};

use super::gaps::ParkNote;
use super::history::Rings;
use consumer_connection::ConsumerError;
use history_link::StreamSpec;
use inbox::{ParkSlot, Source};
use lease::{LeaseState, Parking};
use sessionless::HttpChannel;

use super::pool::{Pool, PooledConnection};
use super::{
    BusError, Inbox, Lease, Link, Opening, Release, Resume, SessionLink, Subscription,
    TAKEOVER_WAITS,
};
use crate::config::RoomFanout;
use crate::names::{RoomName, SessionId, UserId};
use node_fanout::NodeFanout;

/// Deliveries the broker may push to a session before the session acknowledges
/// them. Bounds what a slow socket can pile up in this process; the rest waits in
/// the session's queue on the broker.
pub const PREFETCH: u16 = super::acks::ACK_WINDOW;

/// How long deleting a session's queue may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// A session's queue consumed from Warren's own connection at
/// `--resume-grace-secs 0` is auto-deleted when its consumer goes; should the
/// node die between its declare and its consume, it expires after this long
/// unused instead of staying forever.
const ORPHAN_EXPIRY: Duration = Duration::from_secs(60);

/// Sessions a node opens on the broker at once. Each open is a handful of
/// round trips (slot, channel, confirm mode, queue, bind, consume); thousands
/// at once (a reconnect storm) queue up at the broker until every one of them
/// takes longer than [`super::BROKER_TIMEOUT`] and is abandoned, and the
/// clients' retries add to the queue. Past this many, opens wait their turn.
const OPENS_AT_ONCE: usize = 64;

/// How long an open waits for its turn before the client is refused (503,
/// which the page retries with its backoff): well within the broker bound,
/// so a storm is answered with quick refusals, not 5 s timeouts.
const OPEN_TURN_WAIT: Duration = Duration::from_secs(1);

/// AMQP reply codes we act on.
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;

/// How often a bind is tried again when the room's exchange vanished between
/// its declaration and the bind (its last member left at that moment).
const VANISHED_EXCHANGE_RETRIES: usize = 3;

/// Every exchange and queue name Warren uses, under one `--prefix`.
#[derive(Clone)]
pub struct Names {
    prefix: Arc<str>,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// A room's fanout exchange.
    pub fn room_exchange(&self, room: &RoomName) -> String {
        format!("{}.room.{room}", self.prefix)
    }

    /// The room whose fanout exchange is `exchange`, if it is one.
    pub fn room_of<'e>(&self, exchange: &'e str) -> Option<&'e str> {
        exchange
            .strip_prefix(self.prefix.as_ref())?
            .strip_prefix(".room.")
    }

    /// A connection's queue.
    pub fn connection_queue(&self, user: &UserId, session: &SessionId) -> String {
        format!("{}.conn.{user}.{session}", self.prefix)
    }

    /// The direct exchange every connection's queue is bound to by user id.
    pub fn direct_exchange(&self) -> String {
        format!("{}.direct", self.prefix)
    }

    /// One of a user's session slots.
    pub fn slot_queue(&self, user: &UserId, slot: u16) -> String {
        format!("{}.slot.{user}.{slot}", self.prefix)
    }

    /// Where a parked session's numbers stood, for the session resuming it.
    pub fn note_queue(&self, user: &UserId, session: &SessionId) -> String {
        format!("{}.note.{user}.{session}", self.prefix)
    }

    /// The stream every room's messages are kept in, for history.
    pub fn history_stream(&self) -> String {
        format!("{}.history", self.prefix)
    }

    /// The fanout exchange nodes gossip presence on.
    pub fn presence_exchange(&self) -> String {
        format!("{}.presence", self.prefix)
    }

    /// A node's feed of room messages with per-node fanout; each feed
    /// declared (after a lost connection) is a new generation.
    pub fn fanout_queue(&self, node_id: &str, generation: u64) -> String {
        format!("{}.fanout.{node_id}.{generation}", self.prefix)
    }

    /// A node's queue on the presence exchange.
    pub fn node_queue(&self, node_id: &str) -> String {
        format!("{}.node.{node_id}", self.prefix)
    }
}

/// The arguments of every queue Warren declares: at most `max_length`
/// messages, dropping the oldest first, so a consumer too slow to keep up
/// loses its oldest messages instead of growing the broker's memory.
fn bounded_queue(max_length: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(max_length.into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    args
}

/// A connection's queue that outlives its consumer by `grace` (`x-expires`
/// counts from the moment its last consumer goes).
fn resumable_queue(max_length: u32, grace: Duration) -> FieldTable {
    let mut args = bounded_queue(max_length);
    let millis = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    args.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
    args
}

/// A node's presence queue holds this much gossip at most: if the presence task
/// stalls, old gossip goes first (the next snapshot supersedes it anyway).
const PRESENCE_QUEUE_LENGTH: u32 = 1000;

/// What [`AmqpBus::new`] takes from the configuration.
pub struct AmqpSettings<'a> {
    pub prefix: &'a str,
    pub node_id: &'a str,
    pub queue_max_length: u32,
    /// How long a connection's queue outlives its socket; `None`: exclusive.
    pub resume_grace: Option<Duration>,
    /// The history stream's maximum age and size, when history is kept.
    pub history: Option<(Duration, u64)>,
    pub room_fanout: RoomFanout,
}

/// Why [`AmqpBus::open_queue`] did not open, with everything it did undone.
enum Unopened {
    Bus(BusError),
    /// The room's exchange, or the history stream, was not there to bind
    /// to (see [`AmqpBus::open`]).
    RoomVanished,
}

impl From<BusError> for Unopened {
    fn from(e: BusError) -> Self {
        Unopened::Bus(e)
    }
}

#[derive(Clone)]
pub struct AmqpBus {
    pool: Pool,
    names: Names,
    queue_max_length: u32,
    /// How long a connection's queue outlives its socket; `None`: exclusive.
    resume_grace: Option<Duration>,
    /// The history stream, when history is kept, and what its reader fills.
    history: Option<Arc<StreamSpec>>,
    rings: Arc<Rings>,
    /// Turns to open a session ([`OPENS_AT_ONCE`]).
    opening: Arc<Semaphore>,
    /// With `--room-fanout per-node`: the node's feed of room messages.
    node_fanout: Option<Arc<NodeFanout>>,
    /// The node's channel for HTTP publishes.
    http: Arc<HttpChannel>,
}

impl AmqpBus {
    pub fn new(settings: AmqpSettings<'_>, pool: Pool, rings: Arc<Rings>) -> Self {
        let names = Names::new(settings.prefix);
        let history = settings.history.map(|(max_age, max_bytes)| {
            Arc::new(StreamSpec::new(names.history_stream(), max_age, max_bytes))
        });
        let node_fanout = (settings.room_fanout == RoomFanout::PerNode).then(|| {
            Arc::new(NodeFanout::new(
                pool.clone(),
                names.clone(),
                settings.node_id,
                settings.queue_max_length,
                history.clone(),
            ))
        });
        Self {
            pool,
            queue_max_length: settings.queue_max_length,
            resume_grace: settings.resume_grace,
            history,
            names,
            rings,
            opening: Arc::new(Semaphore::new(OPENS_AT_ONCE)),
            node_fanout,
            http: Arc::default(),
        }
    }

    /// Whether a resumed session's queue holds the room messages its client
    /// missed (with per-node fanout only its direct messages: rooms come
    /// from history).
    pub fn resumes_rooms(&self) -> bool {
        self.node_fanout.is_none()
    }

    /// The history this node has read.
    pub fn rings(&self) -> Arc<Rings> {
        self.rings.clone()
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The least loaded live connection, or why there is none.
    fn connection(&self) -> Result<Arc<PooledConnection>, BusError> {
        self.pool
            .pick()
            .ok_or_else(|| BusError::Unavailable(self.pool.readiness().err().unwrap_or_default()))
    }

    pub fn readiness(&self) -> Result<(), String> {
        self.pool.readiness()
    }

    pub fn connected(&self) -> usize {
        self.pool.connected()
    }

    /// Close the broker connections, deleting the direct and presence
    /// exchanges first if no queue is bound to them.
    pub async fn close(&self) {
        // At once and bounded together: a broker that stops answering must
        // hold a shutdown up once, not once per exchange.
        let deletes = futures_util::future::join(
            self.delete_exchange_if_unused(self.names.direct_exchange()),
            self.delete_exchange_if_unused(self.names.presence_exchange()),
        );
        if tokio::time::timeout(RELEASE_TIMEOUT, deletes)
            .await
            .is_err()
        {
            debug!("the shared exchanges stay: the broker did not answer");
        }
        self.pool.close().await;
    }

    /// The direct exchange is the one name of a prefix that nothing else
    /// deletes: rooms' exchanges go with their last binding, but the direct
    /// one is declared without `auto_delete`, so that it never disappears
    /// while sessions come and go. The presence exchange is auto-deleted, but
    /// a node closed between declaring it and binding its queue to it (its
    /// presence link opening as it shuts down) leaves it with no binding to
    /// lose. The last node to close takes them: with `if-unused` the broker
    /// refuses (406, on a short channel) while any queue on any node (a
    /// session's, parked for a resume, or a node's presence queue) is bound.
    /// An open elsewhere that declared the exchange just before, and binds
    /// just after, fails that once (`404`) and is retried by its client.
    async fn delete_exchange_if_unused(&self, exchange: String) {
        let Ok(conn) = self.connection() else {
            return;
        };
        let name = exchange.clone();
        let delete = on_short_channel(&conn, |channel| async move {
            let options = ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            };
            channel.exchange_delete(name.as_str().into(), options).await
        });
        match delete.await {
            Ok(()) => debug!(%exchange, "deleted the exchange: nothing was bound to it"),
            Err(e) => debug!(%exchange, error = %e, "the exchange stays"),
        }
    }

    /// Open a session's place on the bus: hold the user's session slot,
    /// declare the connection's queue bound to the direct exchange by user id
    /// (or, resuming, find the old one), and consume it.
    /// [`BusError::SlotTaken`] when another node holds the slot.
    pub async fn open(&self, opening: &Opening<'_>) -> Result<Subscription, BusError> {
        let queue = self.names.connection_queue(opening.user, opening.session);
        if opening.resume.is_some() {
            if self.resume_grace.is_none() {
                return Err(BusError::SessionGone);
            }
            self.wait_until_unconsumed(&queue).await?;
        }
        // A turn is taken after a resume's wait for the old consumer: that
        // wait sleeps, and must not hold a turn meanwhile.
        let Ok(Ok(_turn)) =
            tokio::time::timeout(OPEN_TURN_WAIT, self.opening.clone().acquire_owned()).await
        else {
            return Err(BusError::Unavailable(
                "too many sessions opening at once; retry shortly".into(),
            ));
        };
        // A new session's own queue is bound to its room on the session's
        // channel, with the rest of the open: a short channel of its own
        // cost the broker more than the rest of the open together (a
        // channel is a few Erlang processes to start and to stop).
        let room_exchange = opening
            .room
            .filter(|_| opening.resume.is_none() && self.node_fanout.is_none())
            .map(|room| self.names.room_exchange(room));
        let subscription = match self
            .open_queue(opening, &queue, room_exchange.as_deref())
            .await
        {
            Ok(subscription) if room_exchange.is_some() => return Ok(subscription),
            Ok(subscription) => subscription,
            Err(Unopened::RoomVanished) => {
                // The room's exchange went (its last member left) between
                // its declare and the bind, or the history stream is not
                // declared yet; the open was undone. Open again and bind on
                // short channels, where that is retried.
                match self.open_queue(opening, &queue, None).await {
                    Ok(subscription) => subscription,
                    // No room is bound in this open, so it cannot vanish;
                    // should that change, it fails like any other open.
                    Err(Unopened::RoomVanished) => {
                        return Err(BusError::Unavailable("the room vanished".into()));
                    }
                    Err(Unopened::Bus(e)) => return Err(e),
                }
            }
            Err(Unopened::Bus(e)) => return Err(e),
        };
        let Some(room) = opening.room else {
            return Ok(subscription);
        };
        match subscription.link.bind(room).await {
            Ok(()) => Ok(subscription),
            Err(e) => {
                // A resumed queue still holds what its client missed: keep it.
                let release = match opening.resume {
                    Some(_) => Release::KeepForResume,
                    None => Release::Delete,
                };
                subscription.into_lease().release(release).await;
                Err(e)
            }
        }
    }

    /// Open the session's queue, as [`AmqpBus::open`] says, on a fresh
    /// channel, bound to `room_exchange` too when one is given (a new
    /// session's only).
    async fn open_queue(
        &self,
        opening: &Opening<'_>,
        queue: &str,
        room_exchange: Option<&str>,
    ) -> Result<Subscription, Unopened> {
        let Opening {
            session,
            user,
            slot,
            acks,
            ref resume,
            ..
        } = *opening;
        let queue = queue.to_owned();
        let conn = self.connection()?;
        let channel = conn
            .open_channel()
            .await
            .map_err(|e| Unopened::Bus(unavailable(e)))?;
        // From here the channel (and, once declared, the queues) is leased: if
        // the caller gives up (the open timed out), dropping the lease deletes
        // the queues and closes the channel.
        let park_slot = self.resume_grace.map(|_| ParkSlot::default());
        let mut lease = AmqpLease {
            state: Some(LeaseState {
                conn: conn.clone(),
                channel: channel.clone(),
                queues: vec![self.names.slot_queue(user, slot)],
                parking: park_slot
                    .clone()
                    .zip(self.resume_grace)
                    .map(|(slot, grace)| Parking {
                        slot,
                        note_queue: self.names.note_queue(user, session),
                        note_args: resumable_queue(1, grace),
                    }),
                node_fanout: self
                    .node_fanout
                    .as_ref()
                    .map(|fanout| (fanout.clone(), session.clone())),
                consumer: None,
                own_channel: None,
            }),
        };
        // A new queue is the lease's from its declare on. A resumed one only
        // once this open has it: an open given up part-way (its caller's
        // bound ran out) drops the lease, and a dropped lease deletes its
        // queues; the old queue, with everything its client missed, must
        // stay for the client's next try.
        if resume.is_none() {
            lease.add_queue(queue.clone());
        }
        let slot_queue = lease.queues()[0].clone();
        let own_consumers = conn.consumers.as_ref();
        match self
            .declare_session(
                &channel,
                (&slot_queue, &queue),
                user,
                resume.is_some(),
                room_exchange,
                own_consumers.is_none(),
            )
            .await
        {
            Ok(consumer) => {
                let source = match (consumer, own_consumers) {
                    (Some(consumer), _) => {
                        lease.hold_consumer(consumer.clone());
                        Source::Lapin {
                            consumer,
                            channel: channel.clone(),
                        }
                    }
                    (None, Some(own)) => match own.consume(&queue, PREFETCH, true).await {
                        Ok(consumer) => {
                            lease.hold_own_channel(consumer.channel().clone());
                            Source::Own(consumer)
                        }
                        Err(e) => return Err(unconsumed(e, &queue, resume.is_some(), lease).await),
                    },
                    (None, None) => {
                        unreachable!("declare_session consumes without a consumer connection")
                    }
                };
                // The last await of a resume: only then is the queue the
                // lease's (see above).
                let note = match resume {
                    Some(_) => {
                        let note = self
                            .take_note(&conn, &self.names.note_queue(user, session))
                            .await;
                        lease.add_queue(queue.clone());
                        note
                    }
                    None => None,
                };
                debug!(%queue, %user, slot, channel = channel.id(), resumed = resume.is_some(), "opened");
                let (member, room_frames) = match &self.node_fanout {
                    Some(fanout) => {
                        let (member, frames) = fanout.session_queue();
                        (Some((fanout.clone(), member)), Some(frames))
                    }
                    None => (None, None),
                };
                let mut inbox = AmqpInbox::new(
                    source,
                    room_frames.map(|frames| {
                        let dropped = member.as_ref().map(|(_, m)| m.dropped.clone());
                        (frames, dropped.unwrap_or_default())
                    }),
                    conn.lost.clone(),
                    &self.names,
                    session,
                    acks,
                    user,
                )
                .parks_into(park_slot);
                if let Some(Resume { last_id }) = resume {
                    inbox.resumed(last_id.as_deref(), note);
                }
                Ok(Subscription {
                    link: Link::Amqp(Box::new(AmqpLink {
                        conn: conn.clone(),
                        channel,
                        queue,
                        user: user.clone(),
                        session: session.clone(),
                        names: self.names.clone(),
                        direct_exchange: self.names.direct_exchange(),
                        history: self.history.clone(),
                        node_fanout: member,
                        confirming: AtomicBool::new(false),
                        numbering: Default::default(),
                    })),
                    inbox: Inbox::Amqp(Box::new(inbox)),
                    lease: Lease::Amqp(lease),
                })
            }
            Err(e) if reply_code(&e) == Some(RESOURCE_LOCKED) => {
                // Another connection holds the slot. The broker closed this
                // channel at the slot's declare, and ran nothing sent after
                // it: nothing was declared.
                lease.forget_channel();
                Err(BusError::SlotTaken.into())
            }
            Err(e) if room_exchange.is_some() && reply_code(&e) == Some(NOT_FOUND) => {
                lease.release(Release::Delete).await;
                Err(Unopened::RoomVanished)
            }
            Err(e)
                if resume.is_some()
                    && matches!(reply_code(&e), Some(NOT_FOUND | ACCESS_REFUSED)) =>
            {
                // Expired, or taken by another resume, since we looked: the
                // lease holds only the slot.
                lease.release(Release::Delete).await;
                Err(BusError::SessionGone.into())
            }
            Err(e) => {
                warn!(%queue, error = %e, "opening a session's queue failed");
                lease.release(Release::Delete).await;
                Err(unavailable(e).into())
            }
        }
    }

    /// The note a parked session left for the session resuming it, taken
    /// (it is read once). On a channel of its own: a session parked before
    /// it could leave one has none, and a missing queue closes the channel.
    async fn take_note(&self, conn: &Arc<PooledConnection>, queue: &str) -> Option<ParkNote> {
        let taken = on_short_channel(conn, |channel| async move {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await?;
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await?;
            Ok(got)
        })
        .await;
        match taken {
            Ok(Some(got)) => ParkNote::from_bytes(&got.delivery.data),
            Ok(None) => None,
            Err(e) => {
                debug!(%queue, error = %e, "no park note; numbers start afresh");
                None
            }
        }
    }

    /// Wait until no connection consumes `queue`: the old connection of a
    /// session being resumed lets go of it when it notices its socket died.
    /// [`BusError::SessionGone`] when there is no such queue, or it is still
    /// held after [`TAKEOVER_WAITS`].
    async fn wait_until_unconsumed(&self, queue: &str) -> Result<(), BusError> {
        let mut waits = TAKEOVER_WAITS.iter();
        loop {
            match self.queue_consumers(queue).await? {
                None => return Err(BusError::SessionGone),
                Some(0) => return Ok(()),
                Some(_) => match waits.next() {
                    Some(wait) => tokio::time::sleep(*wait).await,
                    None => return Err(BusError::SessionGone),
                },
            }
        }
    }

    /// Hold the slot `slot_queue` and open the session's `queue` on
    /// `channel` (or, resuming, consume the old one), bound to
    /// `room_exchange` when one is given, the methods sent in batches of at
    /// most four, so an open waits three round trips, not one per method.
    /// The queue is consumed here only when `consume_here`; otherwise
    /// Warren's own consumer connection consumes it next (`None`).
    ///
    /// Not all at once: lapin keeps a queue of expected replies per channel
    /// (260 bytes each) that keeps, for the channel's life, the capacity of
    /// the most ever in flight on it. Nine at once left 4 KiB with every
    /// session; four, its smallest allocation, leave 1 KiB
    /// (docs/CAPACITY.md). Its later methods wait one at a time (rooms are
    /// bound on short channels).
    ///
    /// `try_join!` polls its futures in order, and each sends its method on
    /// its first poll, so they go out in this order; the broker runs a
    /// channel's methods in order. When one fails the broker closes the
    /// channel and discards the rest, and lapin fails every reply still
    /// expected on it with that one error: the reply code is the failing
    /// method's, whichever future reports it, and nothing after it was done
    /// (no later batch is sent).
    async fn declare_session(
        &self,
        channel: &Channel,
        (slot_queue, queue): (&str, &str),
        user: &UserId,
        resuming: bool,
        room_exchange: Option<&str>,
        consume_here: bool,
    ) -> lapin::Result<Option<Consumer>> {
        if let Some(stream) = &self.history {
            // Its rooms are bound to the stream: its first publish must not
            // find the stream without its writer.
            stream.readable().await;
        }
        let slot = declare_exclusive(channel, slot_queue, FieldTable::default());
        let qos = async {
            if consume_here {
                channel
                    .basic_qos(PREFETCH, BasicQosOptions { global: false })
                    .await?;
            }
            Ok(())
        };
        if resuming {
            // The queue, its bindings to its rooms and to the direct exchange
            // are all still there.
            let consume = async {
                match consume_here {
                    true => consume(channel, queue, false, true).await.map(Some),
                    false => Ok(None),
                }
            };
            let ((), (), consumer) = futures_util::try_join!(slot, qos, consume)?;
            return Ok(consumer);
        }
        let direct = self.names.direct_exchange();
        let exchange = declare_direct(channel, &direct);
        let declare = match (self.resume_grace, consume_here) {
            (Some(grace), _) => declare_queue(
                channel,
                queue,
                QueueLife::Kept,
                resumable_queue(self.queue_max_length, grace),
            ),
            (None, true) => declare_queue(
                channel,
                queue,
                QueueLife::Exclusive,
                bounded_queue(self.queue_max_length),
            ),
            // Consumed from Warren's own connection, so not exclusive to
            // this one: deleted when that consumer goes, and after
            // ORPHAN_EXPIRY should the node die before it consumes.
            (None, false) => declare_queue(
                channel,
                queue,
                QueueLife::WithItsConsumer,
                resumable_queue(self.queue_max_length, ORPHAN_EXPIRY),
            ),
        };
        let bind_direct = bind(channel, queue, &direct, user.as_str());
        let room = async {
            let Some(exchange) = room_exchange else {
                return Ok(());
            };
            let declare = declare_fanout(channel, exchange);
            let bind_queue = bind(channel, queue, exchange, "");
            let bind_history = async {
                match &self.history {
                    Some(stream) => bind(channel, &stream.name, exchange, "").await,
                    None => Ok(()),
                }
            };
            futures_util::try_join!(declare, bind_queue, bind_history).map(drop)
        };
        futures_util::try_join!(slot, qos, exchange, declare)?;
        futures_util::try_join!(bind_direct, room)?;
        if !consume_here {
            return Ok(None);
        }
        consume(channel, queue, false, self.resume_grace.is_some())
            .await
            .map(Some)
    }

    /// Declare this node's presence queue, bound to `<prefix>.presence`.
    pub async fn presence_link(&self, node_id: &str) -> Result<AmqpPresenceLink, BusError> {
        let conn = self.connection()?;
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let exchange = self.names.presence_exchange();
        let queue = self.names.node_queue(node_id);
        // Presence is soft state, refreshed by every heartbeat: no acks.
        let args = bounded_queue(PRESENCE_QUEUE_LENGTH);
        let declared = async {
            declare_fanout(&channel, &exchange).await?;
            declare_exclusive(&channel, &queue, args).await?;
            bind(&channel, &queue, &exchange, "").await?;
            consume(&channel, &queue, true, false).await
        }
        .await;
        match declared {
            Ok(consumer) => Ok(AmqpPresenceLink {
                conn,
                channel,
                consumer,
                exchange,
            }),
            Err(e) => {
                conn.channel_closed();
                Err(unavailable(e))
            }
        }
    }
}

/// Run `operation` on a channel of its own, then close it. Cancel-safe: a
/// caller that gives up (a `bounded` timeout) leaves the channel to be closed,
/// and uncounted, in the background.
async fn on_short_channel<F, Fut, T>(conn: &Arc<PooledConnection>, operation: F) -> lapin::Result<T>
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = lapin::Result<T>>,
{
    let channel = conn.open_counted().await?;
    let result = operation(channel.channel().clone()).await;
    channel.close("done").await;
    result
}

/// Declare the direct exchange (`<prefix>.direct`). Every declaration of it
/// goes through here: the broker refuses one whose options differ from the
/// existing exchange's (406), so opens and HTTP publishes must agree.
async fn declare_direct(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declare a room-style fanout exchange, auto-deleted with its last binding.
async fn declare_fanout(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declare an exclusive queue, deleted when its connection closes (and by its
/// lease before that).
async fn declare_exclusive(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
) -> lapin::Result<()> {
    declare_queue(channel, queue, QueueLife::Exclusive, arguments).await
}

/// How long a queue lives, besides its lease's delete.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum QueueLife {
    /// Exclusive to the declaring connection, deleted with it.
    Exclusive,
    /// Deleted when its consumer goes (`auto-delete`): a session's queue
    /// consumed from another connection (Warren's own consumer connection).
    WithItsConsumer,
    /// Left to its arguments (`x-expires`) and its lease.
    Kept,
}

/// Declare a queue that lives as `life` says.
pub(super) async fn declare_queue(
    channel: &Channel,
    queue: &str,
    life: QueueLife,
    arguments: FieldTable,
) -> lapin::Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: life == QueueLife::Exclusive,
                auto_delete: life != QueueLife::Kept,
                ..Default::default()
            },
            arguments,
        )
        .await
        .map(drop)
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Consume `queue`; `exclusive`: as its only consumer, so two connections
/// resuming one session cannot both read it.
async fn consume(
    channel: &Channel,
    queue: &str,
    no_ack: bool,
    exclusive: bool,
) -> lapin::Result<Consumer> {
    channel
        .basic_consume(
            queue.into(),
            queue.into(),
            BasicConsumeOptions {
                no_ack,
                exclusive,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// A session's queue that Warren's own consumer connection could not
/// consume: gone or taken by another resume since we looked
/// ([`BusError::SessionGone`]), or the broker failed. The lease holds only
/// what this open declared, and is released.
async fn unconsumed(e: ConsumerError, queue: &str, resuming: bool, lease: AmqpLease) -> Unopened {
    lease.release(Release::Delete).await;
    if resuming && matches!(e.reply_code(), Some(NOT_FOUND | ACCESS_REFUSED)) {
        return BusError::SessionGone.into();
    }
    warn!(%queue, error = %e, "consuming a session's queue failed");
    BusError::Unavailable(e.to_string()).into()
}

fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// `first`, then what `stream` has ready now, up to `max` in all: what one
/// wake-up handles. Nothing is taken from the stream that is not returned
/// (taking one past `max` and dropping it lost a delivery per full burst).
pub(super) fn burst<S: futures_util::Stream + Unpin>(
    first: Option<S::Item>,
    stream: &mut S,
    max: usize,
) -> Vec<Option<S::Item>> {
    let mut items = vec![first];
    while items.len() < max {
        // `Some(None)`: the stream ended, which the caller must see too.
        match stream.next().now_or_never() {
            Some(next) => {
                let ended = next.is_none();
                items.push(next);
                if ended {
                    break;
                }
            }
            None => break,
        }
    }
    items
}

/// A delivery's body as text. Only Warren publishes to its exchanges, and
/// only serde_json output; a foreign non-UTF-8 message is replaced, not
/// trusted.
fn delivered_text(data: Vec<u8>) -> String {
    String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn unavailable(e: lapin::Error) -> BusError {
    BusError::Unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_takes_up_to_its_size_and_loses_nothing() {
        let mut stream = futures_util::stream::iter(1..=1000);
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let first = stream.next().now_or_never().flatten();
            let Some(first) = first else { break };
            let burst = burst(Some(first), &mut stream, 512);
            sizes.push(burst.len());
            seen.extend(burst.into_iter().flatten());
        }
        assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
        // The last burst ends with the stream's end.
        assert_eq!(sizes, vec![512, 489]);
    }

    #[test]
    fn a_burst_shows_the_end_of_the_stream() {
        let mut stream = futures_util::stream::iter([2, 3]);
        assert_eq!(
            burst(Some(1), &mut stream, 512),
            vec![Some(1), Some(2), Some(3), None]
        );
    }
}
