//! The embedded in-process bus: one node, no broker, the same semantics.
//!
//! Each session has a queue (a bounded `mpsc` channel), as on RabbitMQ. A room
//! is the set of queues subscribed to it; a user is the set of its sessions'
//! queues, for direct messages. Publishing puts the frame in every member
//! queue. Frames are checked as UTF-8 once, when published, and then shared
//! (`Utf8Bytes`, a reference count) by every member and written to each socket
//! as they are: never copied or re-serialised.
//!
//! Slow receivers: a queue holds `--queue-max-length` frames, at most
//! [`QUEUE_LENGTH`]. A receiver that falls further behind loses the new frames
//! that do not fit (RabbitMQ's bounded queues drop the oldest instead; either
//! way a receiver that cannot keep up loses, and nobody else waits for it).
//! The loss is counted per room and for direct messages (`dropped.rs`), and the
//! session gets a `gap` frame where the frames were lost.
//!
//! With a resume grace, a session whose socket dropped leaves its queue
//! [`parked`]: still bound, still filling, with what the client had not
//! acknowledged put back in front, until the client resumes it or the grace
//! runs out. A session's consumer is in [`inbox`].
//!
//! A third of this file is its unit tests.

mod inbox;
mod parked;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;
use tungstenite::Utf8Bytes;

pub use inbox::MemoryInbox;

use super::history::Rings;
use super::{
    AckMode, BusError, Inbox, Lease, Link, Opening, Release, Subscription, TAKEOVER_WAITS,
};
use crate::bus::dropped::Dropped;
use crate::names::{RoomName, SessionId, UserId};
use parked::{Parked, Parking};

/// The most frames a session's queue holds for a slow reader, whatever
/// `--queue-max-length` says: each is a reference to a shared frame, but a
/// node holds one queue per session.
pub const QUEUE_LENGTH: usize = 1024;

/// One queued delivery, with where it came from so the inbox can filter.
#[derive(Clone)]
struct Item {
    source: Source,
    frame: Utf8Bytes,
    /// Frames of the same source this queue could not take just before this
    /// one; the inbox tells them once, and zeroes this.
    missed: u64,
}

#[derive(Clone)]
enum Source {
    Room(Arc<str>),
    /// `origin`: the sending session, on the sender's own copy.
    Direct(Option<SessionId>),
}

impl Item {
    fn frame(&self) -> &str {
        self.frame.as_str()
    }
}

/// A session's queue: where frames go, and what did not fit.
#[derive(Clone)]
struct Queue {
    sender: mpsc::Sender<Item>,
    dropped: Arc<Dropped>,
}

#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

/// A room: its name, shared by every delivery, and its members' queues, each
/// with its count of this room's frames it could not take.
struct Room {
    name: Arc<str>,
    members: HashMap<SessionId, (Queue, Arc<AtomicU64>)>,
}

#[derive(Default)]
struct Inner {
    /// Rooms with at least one member. A std Mutex: never held across an await.
    rooms: Mutex<HashMap<RoomName, Room>>,
    /// Users with at least one session, and their sessions' queues.
    users: Mutex<HashMap<UserId, HashMap<SessionId, Queue>>>,
    /// Sessions whose socket dropped, waiting to be resumed.
    parked: Mutex<HashMap<SessionId, parked::Entry>>,
    /// How long a parked session waits; `None`: sessions are never parked.
    resume_grace: Option<Duration>,
    /// Each room's last messages, recorded as they are published.
    rings: Option<Arc<Rings>>,
    /// Frames a session's queue holds (`--queue-max-length`, at most
    /// [`QUEUE_LENGTH`]).
    queue_length: usize,
}

impl MemoryBus {
    /// A bus whose session queues hold `queue_length` frames (at most
    /// [`QUEUE_LENGTH`], at least one).
    pub fn new(resume_grace: Option<Duration>, rings: Arc<Rings>, queue_length: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                resume_grace,
                rings: Some(rings),
                queue_length: queue_length.clamp(1, QUEUE_LENGTH),
                ..Inner::default()
            }),
        }
    }

    /// The history this bus has recorded.
    pub fn rings(&self) -> Arc<Rings> {
        self.inner.rings.clone().unwrap_or_else(|| Rings::new(0))
    }

    /// A session's queue, reachable by direct messages to the user, or the
    /// parked queue of the session it resumes. The slot limit is the node's
    /// claims' to keep: this bus serves one node.
    pub async fn open(&self, opening: &Opening<'_>) -> Result<Subscription, BusError> {
        let Opening {
            session,
            user,
            acks,
            ref resume,
            ..
        } = *opening;
        if let Some(resume) = resume {
            let parked = self.unpark(session, user).await?;
            return Ok(self.subscription(session, user, acks, parked.resumed(resume.last_id)));
        }
        let (sender, receiver) = mpsc::channel(self.inner.queue_length.max(1));
        let queue = Queue {
            sender,
            dropped: Arc::default(),
        };
        self.inner
            .users
            .lock()
            .unwrap()
            .entry(user.clone())
            .or_default()
            .insert(session.clone(), queue.clone());
        let parked = Parked::fresh(user.clone(), queue, receiver);
        Ok(self.subscription(session, user, acks, parked))
    }

    fn subscription(
        &self,
        session: &SessionId,
        user: &UserId,
        acks: AckMode,
        parked: Parked,
    ) -> Subscription {
        let Parked {
            queue,
            rooms,
            inbox,
            ..
        } = parked;
        let parking = self.inner.resume_grace.map(|_| Parking::default());
        Subscription {
            link: Link::Memory(MemoryLink {
                bus: self.clone(),
                session: session.clone(),
                user: user.clone(),
                queue: queue.clone(),
                rooms: rooms.clone(),
            }),
            inbox: Inbox::Memory(Box::new(MemoryInbox::new(
                inbox,
                queue.dropped.clone(),
                session,
                user,
                acks,
                parking.clone(),
            ))),
            lease: Lease::Memory(MemoryLease {
                bus: self.clone(),
                session: session.clone(),
                user: Some(user.clone()),
                rooms,
                queue,
                parking,
            }),
        }
    }

    /// Take `user`'s parked `session`, waiting a little for a session whose
    /// socket died unnoticed to end and park.
    async fn unpark(&self, session: &SessionId, user: &UserId) -> Result<Parked, BusError> {
        let mut waits = TAKEOVER_WAITS.iter();
        loop {
            {
                let mut parked = self.inner.parked.lock().unwrap();
                match parked.get(session) {
                    Some(entry) if entry.parked.user == *user => {
                        return Ok(parked.remove(session).expect("just seen").parked);
                    }
                    Some(_) => return Err(BusError::SessionGone),
                    None => {}
                }
            }
            let live = self
                .inner
                .users
                .lock()
                .unwrap()
                .get(user)
                .is_some_and(|sessions| sessions.contains_key(session));
            match waits.next() {
                Some(wait) if live => tokio::time::sleep(*wait).await,
                _ => return Err(BusError::SessionGone),
            }
        }
    }

    pub fn session_alive(&self, session: &SessionId) -> bool {
        let users = self.inner.users.lock().unwrap();
        users
            .values()
            .any(|sessions| sessions.contains_key(session))
    }

    pub fn publish_room(&self, room: &RoomName, payload: Bytes) {
        let frame = to_text(payload);
        if let Some(rings) = &self.inner.rings {
            rings.record(&frame);
        }
        if let Some(room) = self.inner.rooms.lock().unwrap().get(room) {
            for (queue, dropped) in room.members.values() {
                deliver(queue, dropped, Source::Room(room.name.clone()), &frame);
            }
        }
    }

    /// A direct message to every session of `to`, and a copy to every session
    /// of `from` (marked with `origin`, whose own inbox skips it).
    pub fn publish_direct(
        &self,
        to: &UserId,
        from: &UserId,
        origin: Option<&SessionId>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let frame = to_text(payload);
        let users = self.inner.users.lock().unwrap();
        let Some(recipients) = users.get(to) else {
            return Err(BusError::NoRecipient);
        };
        for queue in recipients.values() {
            deliver(queue, &queue.dropped.direct, Source::Direct(None), &frame);
        }
        if from != to
            && let Some(senders) = users.get(from)
        {
            // Not to the sending session itself, which would skip it: a copy
            // its full queue could not take would be told as a loss.
            let others = senders.iter().filter(|(s, _)| Some(*s) != origin);
            for (_, queue) in others {
                let source = Source::Direct(origin.cloned());
                deliver(queue, &queue.dropped.direct, source, &frame);
            }
        }
        Ok(())
    }

    fn bind(&self, room: &RoomName, session: &SessionId, queue: &Queue) {
        let mut rooms = self.inner.rooms.lock().unwrap();
        let entry = rooms.entry(room.clone()).or_insert_with(|| Room {
            name: room.as_str().into(),
            members: HashMap::new(),
        });
        let dropped = queue.dropped.room(&entry.name);
        entry
            .members
            .insert(session.clone(), (queue.clone(), dropped));
    }

    fn unbind(&self, room: &RoomName, session: &SessionId) {
        let mut rooms = self.inner.rooms.lock().unwrap();
        if let Some(entry) = rooms.get_mut(room) {
            if let Some((queue, _)) = entry.members.remove(session) {
                queue.dropped.forget(room.as_str());
            }
            if entry.members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Rooms with at least one member; for tests and diagnostics.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.lock().unwrap().len()
    }

    /// Users with at least one session; for tests and diagnostics.
    pub fn user_count(&self) -> usize {
        self.inner.users.lock().unwrap().len()
    }
}

/// A receiver this far behind loses the new frame, never blocks the sender;
/// `dropped` counts it, and the next frame from `source` that fits carries
/// the count.
fn deliver(queue: &Queue, dropped: &AtomicU64, source: Source, frame: &Utf8Bytes) {
    let item = Item {
        source,
        frame: frame.clone(),
        missed: dropped.swap(0, Ordering::AcqRel),
    };
    if let Err(mpsc::error::TrySendError::Full(item)) = queue.sender.try_send(item) {
        debug!("a slow receiver's queue is full; frame dropped for it");
        queue.dropped.count(dropped, item.missed + 1);
    }
}

/// Checked once, when published; every member then shares the same bytes (a
/// reference count, no copy). Only the server publishes, and only serde_json
/// output, so the lossy branch is a guard, not a path.
fn to_text(frame: Bytes) -> Utf8Bytes {
    Utf8Bytes::try_from(frame.clone())
        .unwrap_or_else(|_| Utf8Bytes::from(String::from_utf8_lossy(&frame).into_owned()))
}

pub struct MemoryLink {
    bus: MemoryBus,
    session: SessionId,
    user: UserId,
    queue: Queue,
    /// The rooms this session's queue is in, shared with its lease.
    rooms: Arc<Mutex<BTreeSet<RoomName>>>,
}

impl MemoryLink {
    pub fn publish(&self, room: &RoomName, payload: Bytes) -> Result<(), BusError> {
        self.bus.publish_room(room, payload);
        Ok(())
    }

    pub fn publish_direct(&self, to: &UserId, payload: Bytes) -> Result<(), BusError> {
        self.bus
            .publish_direct(to, &self.user, Some(&self.session), payload)
    }

    /// A receipt to every session of `to`, and nowhere else.
    pub fn publish_receipt(&self, to: &UserId, payload: Bytes) {
        // From `to` to `to`: no sender's copy. Nobody connected: no one to tell.
        let _ = self.bus.publish_direct(to, to, None, payload);
    }

    pub fn bind(&self, room: &RoomName) {
        self.bus.bind(room, &self.session, &self.queue);
        self.rooms.lock().unwrap().insert(room.clone());
    }

    pub fn unbind(&self, room: &RoomName) {
        self.bus.unbind(room, &self.session);
        self.rooms.lock().unwrap().remove(room);
    }
}

pub struct MemoryLease {
    bus: MemoryBus,
    session: SessionId,
    user: Option<UserId>,
    rooms: Arc<Mutex<BTreeSet<RoomName>>>,
    queue: Queue,
    /// Where the session's inbox leaves its receiver when it is dropped, when
    /// the bus parks sessions.
    parking: Option<Parking>,
}

impl MemoryLease {
    pub fn release(mut self, queue: Release) {
        let left = self.parking.as_ref().and_then(Parking::take);
        match (queue, left, self.bus.inner.resume_grace, self.user.take()) {
            (Release::KeepForResume, Some(inbox), Some(grace), Some(user)) => {
                let parked = Parked {
                    user,
                    queue: self.queue.clone(),
                    rooms: self.rooms.clone(),
                    inbox,
                };
                parked::park(&self.bus, self.session.clone(), parked, grace);
            }
            (_, _, _, user) => {
                self.user = user;
                self.free();
            }
        }
    }

    fn free(&mut self) {
        let Some(user) = self.user.take() else { return };
        self.bus.forget(&self.session, &user, &self.rooms);
    }
}

impl MemoryBus {
    /// Remove a session's queue from its user and its rooms.
    fn forget(&self, session: &SessionId, user: &UserId, rooms: &Mutex<BTreeSet<RoomName>>) {
        {
            let mut users = self.inner.users.lock().unwrap();
            if let Some(sessions) = users.get_mut(user) {
                sessions.remove(session);
                if sessions.is_empty() {
                    users.remove(user);
                }
            }
        }
        let rooms = std::mem::take(&mut *rooms.lock().unwrap());
        for room in rooms {
            self.unbind(&room, session);
        }
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Guarantee, SessionLink as _};
    use crate::protocol::Destination;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    async fn open(bus: &MemoryBus, name: &str, rooms: &[&str]) -> Subscription {
        let session = SessionId::random();
        let user = user(name);
        let mut s = bus
            .open(&Opening {
                session: &session,
                user: &user,
                slot: 0,
                acks: AckMode::Server,
                resume: None,
                room: None,
            })
            .await
            .unwrap();
        for r in rooms {
            s.link.bind(&room(r)).await.unwrap();
            s.inbox.follow(&room(r));
        }
        s
    }

    async fn send(s: &Subscription, to: Destination, text: &str) -> Result<(), BusError> {
        s.link
            .publish(&to, Bytes::from(text.to_owned()), Guarantee::Confirmed)
            .await?
            .await
    }

    #[tokio::test]
    async fn fans_out_in_order_and_isolates_rooms() {
        let bus = MemoryBus::new(None, Rings::new(0), QUEUE_LENGTH);
        let a = open(&bus, "alice", &["lobby"]).await;
        let mut b = open(&bus, "bob", &["lobby", "other"]).await;
        let mut c = open(&bus, "carol", &["other"]).await;
        for i in 0..3 {
            send(&a, Destination::Room(room("lobby")), &i.to_string())
                .await
                .unwrap();
        }
        for i in 0..3 {
            assert_eq!(b.inbox.recv().await.unwrap().as_str(), i.to_string());
        }
        assert!(c.inbox.try_recv().is_none());
        // Direct messages cross rooms; unknown recipients are reported.
        send(&a, Destination::User(user("carol")), "dm")
            .await
            .unwrap();
        assert_eq!(c.inbox.recv().await.unwrap().as_str(), "dm");
        assert_eq!(
            send(&a, Destination::User(user("nobody")), "x").await,
            Err(BusError::NoRecipient)
        );
    }

    #[tokio::test]
    async fn an_unfollowed_room_delivers_nothing_even_if_queued() {
        let bus = MemoryBus::new(None, Rings::new(0), QUEUE_LENGTH);
        let a = open(&bus, "alice", &["lobby"]).await;
        let mut b = open(&bus, "bob", &["lobby", "other"]).await;
        send(&a, Destination::Room(room("lobby")), "queued")
            .await
            .unwrap();
        b.inbox.unfollow(&room("lobby"));
        b.link.unbind(&room("lobby")).await.unwrap();
        send(&a, Destination::Room(room("lobby")), "later")
            .await
            .unwrap();
        send(&a, Destination::User(user("bob")), "dm")
            .await
            .unwrap();
        assert_eq!(b.inbox.recv().await.unwrap().as_str(), "dm");
        assert!(b.inbox.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_direct_message_reaches_every_session_of_both_users_but_its_own() {
        let bus = MemoryBus::new(None, Rings::new(0), QUEUE_LENGTH);
        let a1 = open(&bus, "alice", &[]).await;
        let mut a2 = open(&bus, "alice", &[]).await;
        let mut b1 = open(&bus, "bob", &[]).await;
        let mut b2 = open(&bus, "bob", &[]).await;
        send(&a1, Destination::User(user("bob")), "psst")
            .await
            .unwrap();
        assert_eq!(b1.inbox.recv().await.unwrap().as_str(), "psst");
        assert_eq!(b2.inbox.recv().await.unwrap().as_str(), "psst");
        assert_eq!(a2.inbox.recv().await.unwrap().as_str(), "psst");
        let mut a1 = a1;
        assert!(
            a1.inbox.try_recv().is_none(),
            "the sending session skips its copy"
        );
    }

    #[tokio::test]
    async fn a_full_queue_tells_what_it_dropped_where_it_dropped_it() {
        async fn to_lobby(s: &Subscription, i: u32) {
            send(s, Destination::Room(room("lobby")), &i.to_string())
                .await
                .unwrap();
        }
        async fn next(s: &mut Subscription) -> String {
            s.inbox.recv().await.unwrap().to_string()
        }
        let bus = MemoryBus::new(None, Rings::new(0), 3);
        let a = open(&bus, "alice", &["lobby"]).await;
        let mut b = open(&bus, "bob", &["lobby"]).await;
        for i in 0..5 {
            to_lobby(&a, i).await;
        }
        assert_eq!(next(&mut b).await, "0");
        // Room for one more: it carries the count of the two that did not fit.
        to_lobby(&a, 5).await;
        for expected in ["1", "2", r#"{"type":"gap","room":"lobby","missed":2}"#, "5"] {
            assert_eq!(next(&mut b).await, expected);
        }
        for i in 6..10 {
            to_lobby(&a, i).await;
        }
        send(&a, Destination::User(user("bob")), "dm")
            .await
            .unwrap();
        for expected in ["6", "7", "8"] {
            assert_eq!(next(&mut b).await, expected);
        }
        // Nothing carried the last drops: told once the queue is read.
        let mut told = vec![next(&mut b).await, next(&mut b).await];
        told.sort();
        assert_eq!(
            told,
            [
                r#"{"type":"gap","missed":1}"#,
                r#"{"type":"gap","room":"lobby","missed":1}"#
            ]
        );
        assert!(b.inbox.try_recv().is_none());
        assert_eq!(b.inbox.take_missed(), 4);
        assert_eq!(b.inbox.take_missed(), 0);
    }

    #[tokio::test]
    async fn drops_in_a_room_no_longer_followed_are_not_told() {
        let bus = MemoryBus::new(None, Rings::new(0), 2);
        let a = open(&bus, "alice", &["lobby"]).await;
        let mut b = open(&bus, "bob", &["lobby", "other"]).await;
        for i in 0..4 {
            send(&a, Destination::Room(room("lobby")), &i.to_string())
                .await
                .unwrap();
        }
        b.inbox.unfollow(&room("lobby"));
        b.link.unbind(&room("lobby")).await.unwrap();
        assert!(b.inbox.try_recv().is_none());
        assert_eq!(b.inbox.take_missed(), 0);
    }

    #[tokio::test]
    async fn a_released_session_leaves_nothing_behind() {
        let bus = MemoryBus::new(None, Rings::new(0), QUEUE_LENGTH);
        let a = open(&bus, "alice", &["lobby", "other"]).await;
        let b = open(&bus, "alice", &["lobby"]).await;
        assert_eq!((bus.room_count(), bus.user_count()), (2, 1));
        a.into_lease().release(Release::Delete).await;
        assert_eq!((bus.room_count(), bus.user_count()), (1, 1));
        b.into_lease().release(Release::Delete).await;
        assert_eq!((bus.room_count(), bus.user_count()), (0, 0));
    }
}
