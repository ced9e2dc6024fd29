//! Per-node room fanout (`--room-fanout per-node`): the node binds one queue
//! of its own, its *feed*, to the exchange of every room its sessions are in,
//! and fans each delivery out in process to those sessions. The broker
//! delivers a room message once per node instead of once per member, which
//! is what a large room needs: N members on M nodes cost the broker M
//! deliveries, not N.
//!
//! - The feed (`<prefix>.fanout.<node>.<generation>`) is an exclusive queue on
//!   one pooled connection, declared when the first session joins a room and
//!   declared again (a new generation) after its connection is lost. Bound to a
//!   room's exchange while at least one local session is in the room; the
//!   last one to leave unbinds it.
//! - Each session has an in-process queue of room frames (a bounded `mpsc`,
//!   `--queue-max-length` frames), read by its inbox beside its own broker
//!   queue, which still carries its direct messages. A frame is checked as
//!   UTF-8 once and shared by every member (`Utf8Bytes`, a reference count).
//! - A session whose queue is full loses the new frame, as on the embedded bus;
//!   nobody else waits for it. The loss is counted ([`Dropped`]) and the
//!   session told with a `gap` frame where it happened.
//! - When the feed's connection is lost every member's queue is closed: its
//!   session ends `unavailable` and its client reconnects, as a session whose
//!   own queue's connection was lost does.
//!
//! Binding, unbinding and declaring the feed are broker round trips and take
//! turns (one at a time per node); joining a room the feed is already bound to
//! takes none.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicQosOptions};
use lapin::{Acker, Channel, Consumer};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, warn};
use tungstenite::Utf8Bytes;

use super::history_link::StreamSpec;
use super::publisher::{bind_room, unbind_room};
use super::{Names, bounded_queue, burst, consume, declare_exclusive, delivered_text, unavailable};
use crate::bus::BusError;
use crate::bus::dropped::Dropped;
use crate::bus::gaps::Gaps;
use crate::bus::pool::{Pool, PooledConnection};
use crate::names::SessionId;

/// A room frame on its way to a session: the room's exchange (what the inbox
/// follows), the frame, and how many of the room's frames the session's
/// queue could not take just before it (told with a `gap` frame).
pub type RoomFrame = (Arc<str>, Utf8Bytes, u64);

/// A session's side of the feed: its queue of room frames, and the counts of
/// what that queue could not take, which its inbox tells.
#[derive(Clone)]
pub struct FeedMember {
    pub(super) queue: mpsc::Sender<RoomFrame>,
    pub(super) dropped: Arc<Dropped>,
}

/// A member of one room: its queue and its count of drops in that room.
struct Member {
    queue: mpsc::Sender<RoomFrame>,
    dropped: Arc<Dropped>,
    count: Arc<AtomicU64>,
}

impl Member {
    fn of(member: &FeedMember, exchange: &Arc<str>) -> Self {
        Member {
            queue: member.queue.clone(),
            dropped: member.dropped.clone(),
            count: member.dropped.room(exchange),
        }
    }
}

/// Deliveries the broker may push to the feed before it acknowledges: the
/// dispatcher only hands frames to in-process queues, so it keeps up; the
/// bound keeps a stalled node's memory in check.
const FEED_PREFETCH: u16 = 2048;
/// Deliveries dispatched per wake-up before the feed acknowledges them (with
/// `multiple`): one ack for a burst, not one per delivery.
const FEED_ACK_EVERY: usize = 512;

/// The node's feed and who gets what it delivers. Cheap to share (`Arc`).
pub struct NodeFanout {
    pool: Pool,
    names: Names,
    node_id: String,
    queue_max_length: u32,
    history: Option<Arc<StreamSpec>>,
    /// Broker operations on the feed, one at a time.
    turn: tokio::sync::Mutex<()>,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    feed: Option<Feed>,
    /// Increases with every feed declared; a dispatcher only clears the
    /// state of its own generation.
    generation: u64,
    /// Rooms the feed is bound to, by exchange.
    rooms: HashMap<Arc<str>, Members>,
    /// The numbers of what the feed received, to find what its own queue
    /// dropped.
    gaps: Gaps,
}

#[derive(Clone)]
struct Feed {
    conn: Arc<PooledConnection>,
    queue: String,
    generation: u64,
}

type Members = HashMap<SessionId, Member>;

impl NodeFanout {
    pub(super) fn new(
        pool: Pool,
        names: Names,
        node_id: &str,
        queue_max_length: u32,
        history: Option<Arc<StreamSpec>>,
    ) -> Self {
        Self {
            pool,
            names,
            node_id: node_id.to_owned(),
            queue_max_length,
            history,
            turn: tokio::sync::Mutex::new(()),
            state: Arc::default(),
        }
    }

    /// A session's queue of room frames, as long as its broker queue.
    pub(super) fn session_queue(&self) -> (FeedMember, mpsc::Receiver<RoomFrame>) {
        let (queue, frames) =
            mpsc::channel(usize::try_from(self.queue_max_length).unwrap_or(usize::MAX));
        let member = FeedMember {
            queue,
            dropped: Arc::default(),
        };
        (member, frames)
    }

    /// Deliver `exchange`'s messages to `member` (a session's queue): when
    /// this returns, everything published to the room afterwards reaches it.
    pub(super) async fn join(
        self: &Arc<Self>,
        exchange: &str,
        session: &SessionId,
        member: &FeedMember,
    ) -> Result<(), BusError> {
        if self.join_bound(exchange, session, member) {
            return Ok(());
        }
        let (fanout, exchange, session, member) = (
            self.clone(),
            exchange.to_owned(),
            session.clone(),
            member.clone(),
        );
        run_to_end(async move { fanout.bind_and_join(&exchange, &session, &member).await }).await
    }

    /// Bind the feed to `exchange` (declaring the feed if need be), then join.
    async fn bind_and_join(
        &self,
        exchange: &str,
        session: &SessionId,
        member: &FeedMember,
    ) -> Result<(), BusError> {
        let _turn = self.turn.lock().await;
        if self.join_bound(exchange, session, member) {
            return Ok(());
        }
        let feed = self.feed().await?;
        bind_room(&feed.conn, &feed.queue, exchange, self.history.as_deref()).await?;
        let mut state = self.state.lock().unwrap();
        if state.generation != feed.generation || state.feed.is_none() {
            return Err(BusError::Unavailable(
                "the node's room feed was lost while binding".into(),
            ));
        }
        // Numbers that went on while the feed was not bound are no gap.
        state.gaps.forget(exchange);
        let exchange: Arc<str> = exchange.into();
        let joined = Member::of(member, &exchange);
        state
            .rooms
            .entry(exchange)
            .or_default()
            .insert(session.clone(), joined);
        Ok(())
    }

    /// Join a room the feed is bound to already, without a round trip.
    fn join_bound(&self, exchange: &str, session: &SessionId, member: &FeedMember) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some((exchange, mut members)) = state.rooms.remove_entry(exchange) else {
            return false;
        };
        members.insert(session.clone(), Member::of(member, &exchange));
        state.rooms.insert(exchange, members);
        true
    }

    /// Stop delivering `exchange`'s messages to `session`; the last member
    /// out unbinds the feed.
    pub(super) async fn leave(
        self: &Arc<Self>,
        exchange: &str,
        session: &SessionId,
    ) -> Result<(), BusError> {
        let emptied = {
            let mut state = self.state.lock().unwrap();
            state.rooms.get_mut(exchange).is_some_and(|members| {
                members.remove(session);
                members.is_empty()
            })
        };
        if emptied {
            let (fanout, exchange) = (self.clone(), exchange.to_owned());
            run_to_end(async move { fanout.unbind_if_empty(&exchange).await }).await?;
        }
        Ok(())
    }

    /// `session` ended: it leaves every room it was in.
    pub(super) async fn forget(&self, session: &SessionId) {
        let emptied: Vec<Arc<str>> = {
            let mut state = self.state.lock().unwrap();
            state
                .rooms
                .iter_mut()
                .filter_map(|(exchange, members)| {
                    (members.remove(session).is_some() && members.is_empty())
                        .then(|| exchange.clone())
                })
                .collect()
        };
        for exchange in emptied {
            if let Err(e) = self.unbind_if_empty(&exchange).await {
                debug!(%exchange, error = %e, "unbinding the node's feed failed");
            }
        }
    }

    /// Unbind the feed from `exchange` unless someone joined since it emptied.
    /// The room is forgotten before the unbind, so a join meanwhile waits its
    /// turn and binds again after it.
    async fn unbind_if_empty(&self, exchange: &str) -> Result<(), BusError> {
        let _turn = self.turn.lock().await;
        let feed = {
            let mut state = self.state.lock().unwrap();
            if !state.rooms.get(exchange).is_some_and(HashMap::is_empty) {
                return Ok(());
            }
            state.rooms.remove(exchange);
            state.feed.clone()
        };
        match feed {
            Some(feed) => unbind_room(&feed.conn, &feed.queue, exchange).await,
            None => Ok(()),
        }
    }

    /// The live feed, declared (and its dispatcher started) if there is none.
    /// Called with the turn held.
    async fn feed(&self) -> Result<Feed, BusError> {
        if let Some(feed) = &self.state.lock().unwrap().feed
            && feed.conn.is_connected()
        {
            return Ok(feed.clone());
        }
        let conn = self.pool.pick().ok_or_else(|| {
            BusError::Unavailable(self.pool.readiness().err().unwrap_or_default())
        })?;
        let generation = self.state.lock().unwrap().generation + 1;
        let queue = self.names.fanout_queue(&self.node_id, generation);
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let declared = async {
            channel
                .basic_qos(FEED_PREFETCH, BasicQosOptions { global: false })
                .await?;
            declare_exclusive(&channel, &queue, bounded_queue(self.queue_max_length)).await?;
            consume(&channel, &queue, false, true).await
        }
        .await;
        let consumer = match declared {
            Ok(consumer) => consumer,
            Err(e) => {
                let _ = channel.close(200, "feed not declared".into()).await;
                conn.channel_closed();
                return Err(unavailable(e));
            }
        };
        let feed = Feed {
            conn: conn.clone(),
            queue,
            generation,
        };
        {
            let mut state = self.state.lock().unwrap();
            state.generation = generation;
            state.feed = Some(feed.clone());
            // The old feed's bindings died with its queue.
            state.rooms.clear();
        }
        debug!(queue = %feed.queue, "declared the node's room feed");
        tokio::spawn(dispatch(
            self.state.clone(),
            channel,
            consumer,
            feed.clone(),
        ));
        Ok(feed)
    }
}

/// Run a broker operation on the feed in a task of its own and wait for it.
/// A caller that gives up (a `bounded` timeout) must not leave a feed half
/// declared, a binding unrecorded, or the feed bound to a room nobody here is
/// in (its exchange would never be auto-deleted): the task finishes anyway.
async fn run_to_end(
    operation: impl Future<Output = Result<(), BusError>> + Send + 'static,
) -> Result<(), BusError> {
    tokio::spawn(operation)
        .await
        .unwrap_or_else(|e| Err(BusError::Unavailable(e.to_string())))
}

/// Hand every delivery of the feed to the members of its room until the feed
/// is lost, then close every member's queue.
async fn dispatch(state: Arc<Mutex<State>>, channel: Channel, mut consumer: Consumer, feed: Feed) {
    let lost = feed.conn.lost.clone();
    'feed: loop {
        let first = tokio::select! {
            next = consumer.next() => next,
            () = lost.cancelled() => break,
        };
        let mut last: Option<Acker> = None;
        for next in burst(first, &mut consumer, FEED_ACK_EVERY) {
            match next {
                Some(Ok(delivery)) => {
                    last = Some(deliver(&state, delivery));
                }
                Some(Err(e)) => {
                    warn!(error = %e, "the node's room feed failed");
                    break 'feed;
                }
                None => break 'feed,
            }
        }
        if let Some(acker) = last
            && let Err(e) = acker.ack(BasicAckOptions { multiple: true }).await
        {
            debug!(error = %e, "acking the feed failed");
        }
    }
    {
        let mut state = state.lock().unwrap();
        if state.generation == feed.generation {
            // Dropping every member's sender ends its session's room queue.
            state.feed = None;
            state.rooms.clear();
        }
    }
    if channel.status().connected() {
        let _ = channel.close(200, "the feed ended".into()).await;
    }
    feed.conn.channel_closed();
    debug!(queue = %feed.queue, "the node's room feed ended");
}

/// One delivery to every member of its room; its acker, to settle it.
fn deliver(state: &Mutex<State>, delivery: lapin::message::Delivery) -> Acker {
    let lapin::message::Delivery {
        exchange,
        routing_key,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let exchange = exchange.as_str();
    let frame = Utf8Bytes::from(delivered_text(data));
    let mut state = state.lock().unwrap();
    // What the feed itself lost (its queue on the broker is bounded too) is
    // every member's loss.
    let lost_by_feed = state
        .gaps
        .observe(exchange, routing_key.as_str(), &properties)
        .missed;
    let Some((room, members)) = state.rooms.get_key_value(exchange) else {
        return acker;
    };
    for (session, member) in members {
        // The drops before this frame travel with it, so the gap is told
        // where it happened; if it does not fit either, they stay counted.
        let missed = member.count.swap(0, Ordering::AcqRel) + lost_by_feed;
        match member.queue.try_send((room.clone(), frame.clone(), missed)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                member.dropped.count(&member.count, missed + 1);
                debug!(%session, %room, "a session's room queue is full; frame dropped");
            }
            // The session ended; its lease makes it leave.
            Err(TrySendError::Closed(_)) => {}
        }
    }
    acker
}
