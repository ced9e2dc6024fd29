//! What a session's in-process queue (the embedded bus's, or the one per-node
//! fanout feeds) could not take: counted where
//! the queue refuses a frame, per room and for direct messages, until the
//! session is told with a `gap` frame.
//!
//! The embedded bus drops the *new* frame when a queue is full, so the frames
//! lost come after everything queued. A count is told at the right place in
//! two ways: the next frame of the same room (or the next direct message) that
//! does fit carries the count so far ([`super::Item::missed`]), and what no
//! later frame carried is told once the session has read all its queue
//! ([`Dropped::drain`]). Each drop is in exactly one of the counter, one
//! frame, or one drain: both take it with a swap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One session queue's untold drops.
#[derive(Default)]
pub(crate) struct Dropped {
    /// Set when a count below rose, so the inbox looks at them only then.
    pending: AtomicBool,
    /// Direct messages (and receipts) to the session's user.
    pub(crate) direct: Arc<AtomicU64>,
    /// Each room the queue is bound to; each room's members hold their count
    /// too, so publishing counts without taking this lock.
    rooms: Mutex<HashMap<Arc<str>, Arc<AtomicU64>>>,
}

impl Dropped {
    /// `room`'s count, for the room's member list.
    pub(crate) fn room(&self, room: &Arc<str>) -> Arc<AtomicU64> {
        self.rooms
            .lock()
            .unwrap()
            .entry(room.clone())
            .or_default()
            .clone()
    }

    /// The queue left `room`: what it dropped there no longer matters.
    pub(crate) fn forget(&self, room: &str) {
        self.rooms.lock().unwrap().remove(room);
    }

    /// One more frame counted by `count` did not fit.
    pub(crate) fn count(&self, count: &AtomicU64, frames: u64) {
        count.fetch_add(frames, Ordering::AcqRel);
        self.pending.store(true, Ordering::Release);
    }

    /// Every count not carried by a later frame, taken: `None` for direct
    /// messages, else the room.
    pub(crate) fn drain(&self) -> Vec<(Option<Arc<str>>, u64)> {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut counts = Vec::new();
        let direct = self.direct.swap(0, Ordering::AcqRel);
        if direct > 0 {
            counts.push((None, direct));
        }
        for (room, count) in self.rooms.lock().unwrap().iter() {
            let n = count.swap(0, Ordering::AcqRel);
            if n > 0 {
                counts.push((Some(room.clone()), n));
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_each_count_once() {
        let dropped = Dropped::default();
        assert!(dropped.drain().is_empty());
        let lobby: Arc<str> = "lobby".into();
        let count = dropped.room(&lobby);
        dropped.count(&count, 2);
        dropped.count(&dropped.direct, 1);
        let mut drained = dropped.drain();
        drained.sort();
        assert_eq!(drained, vec![(None, 1), (Some(lobby.clone()), 2)]);
        assert!(dropped.drain().is_empty());
        dropped.count(&count, 1);
        dropped.forget("lobby");
        assert!(dropped.drain().is_empty(), "a room left is not told");
    }
}
