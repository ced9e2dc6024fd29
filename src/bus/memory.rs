//! The embedded in-process bus: one node, no broker, the same semantics.
//!
//! Each session has a queue (a bounded `mpsc` channel), as on RabbitMQ. A room
//! is the set of queues subscribed to it; a user is the set of its sessions'
//! queues, for direct messages. Publishing puts the frame in every member
//! queue. Frames are checked as UTF-8 once, when published, and then shared
//! (`Utf8Bytes`, a reference count) by every member and written to each socket
//! as they are: never copied or re-serialised.
//!
//! Slow receivers: a queue holds [`QUEUE_LENGTH`] frames. A receiver that falls
//! further behind loses the new frames that do not fit, and the loss is logged
//! (RabbitMQ's bounded queues drop the oldest instead; either way a receiver
//! that cannot keep up loses, and nobody else waits for it).
//!
//! A quarter of this file is its unit tests.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;
use tungstenite::Utf8Bytes;

use super::{BusError, Inbox, Lease, Link, Subscription};
use crate::names::{RoomName, SessionId, UserId};

/// Frames a session's queue holds for a slow reader.
pub const QUEUE_LENGTH: usize = 1024;

/// One queued delivery, with where it came from so the inbox can filter.
enum Item {
    Room(Arc<str>, Utf8Bytes),
    /// `origin`: the sending session, on the sender's own copy.
    Direct(Option<SessionId>, Utf8Bytes),
}

type Queue = mpsc::Sender<Item>;

#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

/// A room: its name, shared by every delivery, and its members' queues.
struct Room {
    name: Arc<str>,
    members: HashMap<SessionId, Queue>,
}

#[derive(Default)]
struct Inner {
    /// Rooms with at least one member. A std Mutex: never held across an await.
    rooms: Mutex<HashMap<RoomName, Room>>,
    /// Users with at least one session, and their sessions' queues.
    users: Mutex<HashMap<UserId, HashMap<SessionId, Queue>>>,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A session's queue, reachable by direct messages to `user`. The slot
    /// limit is the node's claims' to keep: this bus serves one node.
    pub fn open(&self, session: &SessionId, user: &UserId) -> Subscription {
        let (queue, receiver) = mpsc::channel(QUEUE_LENGTH);
        self.inner
            .users
            .lock()
            .unwrap()
            .entry(user.clone())
            .or_default()
            .insert(session.clone(), queue.clone());
        let rooms = Arc::new(Mutex::new(BTreeSet::new()));
        Subscription {
            link: Link::Memory(MemoryLink {
                bus: self.clone(),
                session: session.clone(),
                user: user.clone(),
                queue,
                rooms: rooms.clone(),
            }),
            inbox: Inbox::Memory(MemoryInbox {
                receiver,
                following: HashSet::new(),
                session: session.clone(),
            }),
            lease: Lease::Memory(MemoryLease {
                bus: self.clone(),
                session: session.clone(),
                user: Some(user.clone()),
                rooms,
            }),
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
        if let Some(room) = self.inner.rooms.lock().unwrap().get(room) {
            for queue in room.members.values() {
                deliver(queue, Item::Room(room.name.clone(), frame.clone()));
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
            deliver(queue, Item::Direct(None, frame.clone()));
        }
        if from != to
            && let Some(senders) = users.get(from)
        {
            for queue in senders.values() {
                deliver(queue, Item::Direct(origin.cloned(), frame.clone()));
            }
        }
        Ok(())
    }

    fn bind(&self, room: &RoomName, session: &SessionId, queue: &Queue) {
        self.inner
            .rooms
            .lock()
            .unwrap()
            .entry(room.clone())
            .or_insert_with(|| Room {
                name: room.as_str().into(),
                members: HashMap::new(),
            })
            .members
            .insert(session.clone(), queue.clone());
    }

    fn unbind(&self, room: &RoomName, session: &SessionId) {
        let mut rooms = self.inner.rooms.lock().unwrap();
        if let Some(entry) = rooms.get_mut(room) {
            entry.members.remove(session);
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

/// A receiver this far behind loses the new frame, never blocks the sender.
fn deliver(queue: &Queue, item: Item) {
    if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(item) {
        warn!("a slow receiver's queue is full; frame dropped for it");
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

    pub fn bind(&self, room: &RoomName) {
        self.bus.bind(room, &self.session, &self.queue);
        self.rooms.lock().unwrap().insert(room.clone());
    }

    pub fn unbind(&self, room: &RoomName) {
        self.bus.unbind(room, &self.session);
        self.rooms.lock().unwrap().remove(room);
    }
}

pub struct MemoryInbox {
    receiver: mpsc::Receiver<Item>,
    following: HashSet<Arc<str>>,
    session: SessionId,
}

impl MemoryInbox {
    pub fn follow(&mut self, room: &RoomName) {
        self.following.insert(room.as_str().into());
    }

    pub fn unfollow(&mut self, room: &RoomName) {
        self.following.remove(room.as_str());
    }

    pub async fn recv(&mut self) -> Result<Utf8Bytes, BusError> {
        loop {
            let Some(item) = self.receiver.recv().await else {
                return Err(BusError::Unavailable("the session's queue is gone".into()));
            };
            if let Some(frame) = self.wanted(item) {
                return Ok(frame);
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Result<Utf8Bytes, BusError>> {
        loop {
            match self.receiver.try_recv() {
                Ok(item) => {
                    if let Some(frame) = self.wanted(item) {
                        return Some(Ok(frame));
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Some(Err(BusError::Unavailable(
                        "the session's queue is gone".into(),
                    )));
                }
            }
        }
    }

    fn wanted(&self, item: Item) -> Option<Utf8Bytes> {
        match item {
            Item::Room(room, frame) => self.following.contains(&room).then_some(frame),
            Item::Direct(origin, frame) => {
                (origin.as_ref() != Some(&self.session)).then_some(frame)
            }
        }
    }
}

pub struct MemoryLease {
    bus: MemoryBus,
    session: SessionId,
    user: Option<UserId>,
    rooms: Arc<Mutex<BTreeSet<RoomName>>>,
}

impl MemoryLease {
    pub fn release(mut self) {
        self.free();
    }

    fn free(&mut self) {
        let Some(user) = self.user.take() else { return };
        {
            let mut users = self.bus.inner.users.lock().unwrap();
            if let Some(sessions) = users.get_mut(&user) {
                sessions.remove(&self.session);
                if sessions.is_empty() {
                    users.remove(&user);
                }
            }
        }
        let rooms = std::mem::take(&mut *self.rooms.lock().unwrap());
        for room in rooms {
            self.bus.unbind(&room, &self.session);
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
    use crate::bus::SessionLink as _;
    use crate::protocol::Destination;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    async fn open(bus: &MemoryBus, name: &str, rooms: &[&str]) -> Subscription {
        let mut s = bus.open(&SessionId::random(), &user(name));
        for r in rooms {
            s.link.bind(&room(r)).await.unwrap();
            s.inbox.follow(&room(r));
        }
        s
    }

    async fn send(s: &Subscription, to: Destination, text: &str) -> Result<(), BusError> {
        s.link
            .publish(&to, Bytes::from(text.to_owned()))
            .await?
            .await
    }

    #[tokio::test]
    async fn fans_out_in_order_and_isolates_rooms() {
        let bus = MemoryBus::new();
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
        let bus = MemoryBus::new();
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
        let bus = MemoryBus::new();
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
    async fn a_released_session_leaves_nothing_behind() {
        let bus = MemoryBus::new();
        let a = open(&bus, "alice", &["lobby", "other"]).await;
        let b = open(&bus, "alice", &["lobby"]).await;
        assert_eq!((bus.room_count(), bus.user_count()), (2, 1));
        a.into_lease().release().await;
        assert_eq!((bus.room_count(), bus.user_count()), (1, 1));
        b.into_lease().release().await;
        assert_eq!((bus.room_count(), bus.user_count()), (0, 0));
    }
}
