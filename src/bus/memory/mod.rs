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
//! With a resume grace, a session whose socket dropped leaves its queue
//! [`parked`]: still bound, still filling, with what the client had not
//! acknowledged put back in front, until the client resumes it or the grace
//! runs out. A session's consumer is in [`inbox`].
//!
//! A third of this file is its unit tests.

mod inbox;
mod parked;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;
use tungstenite::Utf8Bytes;

pub use inbox::MemoryInbox;

use super::history::Rings;
use super::{
    AckMode, BusError, Inbox, Lease, Link, Opening, Release, Subscription, TAKEOVER_WAITS,
};
use crate::names::{RoomName, SessionId, UserId};
use parked::{Parked, Parking};

/// Frames a session's queue holds for a slow reader.
pub const QUEUE_LENGTH: usize = 1024;

/// One queued delivery, with where it came from so the inbox can filter.
#[derive(Clone)]
enum Item {
    Room(Arc<str>, Utf8Bytes),
    /// `origin`: the sending session, on the sender's own copy.
    Direct(Option<SessionId>, Utf8Bytes),
}

impl Item {
    fn frame(&self) -> &str {
        match self {
            Item::Room(_, frame) | Item::Direct(_, frame) => frame.as_str(),
        }
    }
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
    /// Sessions whose socket dropped, waiting to be resumed.
    parked: Mutex<HashMap<SessionId, parked::Entry>>,
    /// How long a parked session waits; `None`: sessions are never parked.
    resume_grace: Option<Duration>,
    /// Each room's last messages, recorded as they are published.
    rings: Option<Arc<Rings>>,
}

impl MemoryBus {
    pub fn new(resume_grace: Option<Duration>, rings: Arc<Rings>) -> Self {
        Self {
            inner: Arc::new(Inner {
                resume_grace,
                rings: Some(rings),
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
        let (queue, receiver) = mpsc::channel(QUEUE_LENGTH);
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
            inbox: Inbox::Memory(MemoryInbox::new(
                inbox,
                session,
                user,
                acks,
                parking.clone(),
            )),
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
        let bus = MemoryBus::new(None, Rings::new(0));
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
        let bus = MemoryBus::new(None, Rings::new(0));
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
        let bus = MemoryBus::new(None, Rings::new(0));
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
        let bus = MemoryBus::new(None, Rings::new(0));
        let a = open(&bus, "alice", &["lobby", "other"]).await;
        let b = open(&bus, "alice", &["lobby"]).await;
        assert_eq!((bus.room_count(), bus.user_count()), (2, 1));
        a.into_lease().release(Release::Delete).await;
        assert_eq!((bus.room_count(), bus.user_count()), (1, 1));
        b.into_lease().release(Release::Delete).await;
        assert_eq!((bus.room_count(), bus.user_count()), (0, 0));
    }
}
