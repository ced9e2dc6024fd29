//! The embedded in-process bus: one node, no broker, the same semantics.
//!
//! A room is a `tokio::sync::broadcast` channel of serialised frames; a user id is
//! an entry in a set, refused while taken just as RabbitMQ refuses a second
//! declaration of an exclusive queue. Frames are checked as UTF-8 once, when
//! published, and then shared (`Utf8Bytes`, a reference count) by every member
//! and written to each socket as they are: never copied or re-serialised.
//!
//! Slow receivers: each room keeps the last [`ROOM_BUFFER`] frames. A receiver
//! that falls further behind loses the oldest frames it has not read (like the
//! RabbitMQ queues' `x-overflow: drop-head`), and the loss is logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tracing::warn;
use tungstenite::Utf8Bytes;

use super::{BusError, Inbox, Lease, Publisher, Subscription};
use crate::names::{RoomName, UserId};

/// Frames a room holds for its slowest reader. A broadcast channel allocates its
/// whole ring up front, so this is per room, not per member.
pub const ROOM_BUFFER: usize = 1024;

#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Live rooms. A std Mutex: it is never held across an await.
    rooms: Mutex<HashMap<RoomName, broadcast::Sender<Utf8Bytes>>>,
    /// User ids with a live subscription, and where their direct messages go: the
    /// embedded twin of exclusive queues.
    users: Mutex<HashMap<UserId, mpsc::Sender<Utf8Bytes>>>,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn subscribe(&self, room: &RoomName, user: &UserId) -> Result<Subscription, BusError> {
        let (direct_tx, direct) = mpsc::channel(ROOM_BUFFER);
        match self.inner.users.lock().unwrap().entry(user.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => return Err(BusError::UserTaken),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(direct_tx);
            }
        }
        let (sender, receiver) = {
            let mut rooms = self.inner.rooms.lock().unwrap();
            let sender = rooms
                .entry(room.clone())
                .or_insert_with(|| broadcast::channel(ROOM_BUFFER).0)
                .clone();
            let receiver = sender.subscribe();
            (sender, receiver)
        };
        Ok(Subscription {
            publisher: Publisher::Memory(MemoryPublisher {
                sender,
                bus: self.clone(),
            }),
            inbox: Inbox::Memory(MemoryInbox { receiver, direct }),
            lease: Lease::Memory(MemoryLease {
                bus: self.clone(),
                room: room.clone(),
                user: Some(user.clone()),
            }),
        })
    }

    pub fn is_connected(&self, user: &UserId) -> bool {
        self.inner.users.lock().unwrap().contains_key(user)
    }

    pub fn publish_room(&self, room: &RoomName, payload: Bytes) {
        if let Some(sender) = self.inner.rooms.lock().unwrap().get(room) {
            let _ = sender.send(to_text(payload));
        }
    }

    pub fn publish_direct(&self, to: &UserId, payload: Bytes) -> Result<(), BusError> {
        let users = self.inner.users.lock().unwrap();
        let Some(queue) = users.get(to) else {
            return Err(BusError::NoRecipient);
        };
        // A recipient this far behind loses the new message, like a full
        // RabbitMQ queue would drop its oldest: either way a slow reader loses.
        if queue.try_send(to_text(payload)).is_err() {
            warn!(%to, "direct message dropped: recipient too slow");
        }
        Ok(())
    }

    /// Rooms with at least one member; for tests and diagnostics.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.lock().unwrap().len()
    }

    /// Users with a live subscription; for tests and diagnostics.
    pub fn user_count(&self) -> usize {
        self.inner.users.lock().unwrap().len()
    }
}

pub struct MemoryPublisher {
    sender: broadcast::Sender<Utf8Bytes>,
    bus: MemoryBus,
}

impl MemoryPublisher {
    pub fn publish(&self, payload: Bytes) -> Result<(), BusError> {
        // An error only means nobody is subscribed, which cannot happen while the
        // publisher's own session holds a receiver; either way nothing is lost.
        let _ = self.sender.send(to_text(payload));
        Ok(())
    }

    pub fn publish_direct(&self, to: &UserId, payload: Bytes) -> Result<(), BusError> {
        self.bus.publish_direct(to, payload)
    }
}

pub struct MemoryInbox {
    receiver: broadcast::Receiver<Utf8Bytes>,
    direct: mpsc::Receiver<Utf8Bytes>,
}

impl MemoryInbox {
    pub async fn recv(&mut self) -> Result<Utf8Bytes, BusError> {
        loop {
            let received = tokio::select! {
                Some(frame) = self.direct.recv() => return Ok(frame),
                received = self.receiver.recv() => received,
            };
            match received {
                Ok(frame) => return Ok(frame),
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    warn!(lost, "slow receiver dropped the oldest frames");
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(BusError::Unavailable("room closed".into()));
                }
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Result<Utf8Bytes, BusError>> {
        if let Ok(frame) = self.direct.try_recv() {
            return Some(Ok(frame));
        }
        loop {
            match self.receiver.try_recv() {
                Ok(frame) => return Some(Ok(frame)),
                Err(broadcast::error::TryRecvError::Empty) => return None,
                Err(broadcast::error::TryRecvError::Lagged(lost)) => {
                    warn!(lost, "slow receiver dropped the oldest frames");
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Some(Err(BusError::Unavailable("room closed".into())));
                }
            }
        }
    }
}

/// Checked once, when published; every member then shares the same bytes (a
/// reference count, no copy). Only the server publishes, and only serde_json
/// output, so the lossy branch is a guard, not a path.
fn to_text(frame: Bytes) -> Utf8Bytes {
    Utf8Bytes::try_from(frame.clone())
        .unwrap_or_else(|_| Utf8Bytes::from(String::from_utf8_lossy(&frame).into_owned()))
}

pub struct MemoryLease {
    bus: MemoryBus,
    room: RoomName,
    user: Option<UserId>,
}

impl MemoryLease {
    pub fn release(mut self) {
        self.free();
    }

    fn free(&mut self) {
        let Some(user) = self.user.take() else { return };
        self.bus.inner.users.lock().unwrap().remove(&user);
        let mut rooms = self.bus.inner.rooms.lock().unwrap();
        if rooms
            .get(&self.room)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            rooms.remove(&self.room);
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
    use crate::bus::Publish;
    use crate::protocol::Destination;

    fn names(room: &str, user: &str) -> (RoomName, UserId) {
        (RoomName::parse(room).unwrap(), UserId::parse(user).unwrap())
    }

    #[tokio::test]
    async fn fans_out_in_order_and_isolates_rooms() {
        let bus = MemoryBus::new();
        let (lobby, alice) = names("lobby", "alice");
        let (_, bob) = names("lobby", "bob");
        let (other, carol) = names("other", "carol");
        let a = bus.subscribe(&lobby, &alice).unwrap();
        let mut b = bus.subscribe(&lobby, &bob).unwrap();
        let mut c = bus.subscribe(&other, &carol).unwrap();
        for i in 0..3 {
            a.publisher
                .publish(
                    &Destination::Room(lobby.clone()),
                    Bytes::from(format!("{i}")),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
        for i in 0..3 {
            assert_eq!(b.inbox.recv().await.unwrap().as_str(), format!("{i}"));
        }
        assert!(c.inbox.try_recv().is_none());
        // Direct messages cross rooms; unknown recipients are reported.
        a.publisher
            .publish(&Destination::User(carol.clone()), Bytes::from("dm"))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(c.inbox.recv().await.unwrap().as_str(), "dm");
        let nobody = UserId::parse("nobody").unwrap();
        let confirm = a
            .publisher
            .publish(&Destination::User(nobody), Bytes::from("x"))
            .await
            .unwrap();
        assert_eq!(confirm.await, Err(BusError::NoRecipient));
    }

    #[tokio::test]
    async fn a_user_id_is_exclusive_until_released() {
        let bus = MemoryBus::new();
        let (lobby, alice) = names("lobby", "alice");
        let first = bus.subscribe(&lobby, &alice).unwrap();
        assert_eq!(
            bus.subscribe(&lobby, &alice).err(),
            Some(BusError::UserTaken)
        );
        first.into_lease().release().await;
        assert_eq!(bus.room_count(), 0);
        assert_eq!(bus.user_count(), 0);
        assert!(bus.subscribe(&lobby, &alice).is_ok());
    }
}
