//! Sessions whose socket dropped, on the embedded bus: their queue stays bound
//! to its rooms and its user and keeps filling, with what the client had not
//! acknowledged put back in front, until the client resumes the session or the
//! grace runs out and the queue goes as if released.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Item, MemoryBus, Queue};
use crate::names::{RoomName, SessionId, UserId};
use crate::protocol::frame_head;

/// What a session's consumer hands back when it ends: its receiver, and the
/// frames to give first to whoever resumes it, oldest first.
pub(super) struct InboxState {
    pub(super) receiver: mpsc::Receiver<Item>,
    pub(super) frames: VecDeque<Item>,
}

/// Where a dropped inbox leaves its state for its lease to park.
#[derive(Clone, Default)]
pub(super) struct Parking(Arc<Mutex<Option<InboxState>>>);

impl Parking {
    pub(super) fn leave(&self, state: InboxState) {
        *self.0.lock().unwrap() = Some(state);
    }

    pub(super) fn take(&self) -> Option<InboxState> {
        self.0.lock().unwrap().take()
    }
}

/// A session's queue without a connection.
pub(super) struct Parked {
    pub(super) user: UserId,
    pub(super) queue: Queue,
    pub(super) rooms: Arc<Mutex<BTreeSet<RoomName>>>,
    pub(super) inbox: InboxState,
}

/// A parked session in the bus's map, told apart from a later parking of the
/// same session by its stamp.
pub(super) struct Entry {
    pub(super) parked: Parked,
    stamp: Arc<()>,
}

impl Parked {
    /// A new session's queue, bound to nothing yet.
    pub(super) fn fresh(user: UserId, queue: Queue, receiver: mpsc::Receiver<Item>) -> Self {
        Parked {
            user,
            queue,
            rooms: Arc::new(Mutex::new(BTreeSet::new())),
            inbox: InboxState {
                receiver,
                frames: VecDeque::new(),
            },
        }
    }

    /// Resumed by a client that processed everything up to `last_id`: the
    /// frames it already has are dropped (all of them, when `last_id` is
    /// among those given again; none when it is not).
    pub(super) fn resumed(mut self, last_id: Option<&str>) -> Self {
        let frames = &mut self.inbox.frames;
        if let Some(last_id) = last_id
            && let Some(at) = frames
                .iter()
                .position(|item| frame_head(item.frame()).and_then(|(_, id)| id) == Some(last_id))
        {
            frames.drain(..=at);
        }
        self
    }
}

/// Park `session` for `grace`; when nobody resumed it by then, forget it.
pub(super) fn park(bus: &MemoryBus, session: SessionId, parked: Parked, grace: Duration) {
    let stamp = Arc::new(());
    let mine = Arc::downgrade(&stamp);
    bus.inner
        .parked
        .lock()
        .unwrap()
        .insert(session.clone(), Entry { parked, stamp });
    let bus = bus.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let expired = {
            let mut parked = bus.inner.parked.lock().unwrap();
            let still_mine = parked
                .get(&session)
                .is_some_and(|e| mine.upgrade().is_some_and(|m| Arc::ptr_eq(&m, &e.stamp)));
            if still_mine {
                parked.remove(&session)
            } else {
                None
            }
        };
        if let Some(Entry { parked, .. }) = expired {
            bus.forget(&session, &parked.user, &parked.rooms);
        }
    });
}
