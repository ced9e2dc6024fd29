//! A session's consumer on the embedded bus: its queue's frames, only from
//! what it follows, first the frames a resumed session gets again; with client
//! acks, each stamped with its seq and kept until acknowledged. What the
//! queue could not take is told with a `gap` frame where it was lost.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;
use tungstenite::Utf8Bytes;

use super::parked::{InboxState, Parking};
use super::{Item, Source};
use crate::bus::acks::{AckError, ClientAcks, Receipt};
use crate::bus::dropped::Dropped;
use crate::bus::gaps::gap_frame;
use crate::bus::{AckMode, BusError};
use crate::names::{RoomName, SessionId, UserId};

pub struct MemoryInbox {
    receiver: mpsc::Receiver<Item>,
    /// Given before the receiver's: what a resumed session gets again.
    frames: VecDeque<Item>,
    following: HashSet<Arc<str>>,
    session: SessionId,
    client_acks: Option<ClientAcks<Item>>,
    /// Where this inbox leaves its state when dropped, for a resume.
    parking: Option<Parking>,
    /// What the queue could not take and no later frame carried.
    dropped: Arc<Dropped>,
    /// `gap` frames to give before anything else. Not stamped with a seq,
    /// not kept for a resume: a gap is told once.
    gaps: VecDeque<Utf8Bytes>,
    /// Frames told missing since [`Self::take_missed`], for the metrics.
    missed: u64,
}

impl MemoryInbox {
    pub(super) fn new(
        state: InboxState,
        dropped: Arc<Dropped>,
        session: &SessionId,
        user: &UserId,
        acks: AckMode,
        parking: Option<Parking>,
    ) -> Self {
        Self {
            receiver: state.receiver,
            frames: state.frames,
            following: HashSet::new(),
            session: session.clone(),
            client_acks: (acks == AckMode::Client).then(|| ClientAcks::new(user)),
            parking,
            dropped,
            gaps: VecDeque::new(),
            missed: 0,
        }
    }

    pub fn follow(&mut self, room: &RoomName) {
        self.following.insert(room.as_str().into());
    }

    pub fn unfollow(&mut self, room: &RoomName) {
        self.following.remove(room.as_str());
    }

    pub async fn recv(&mut self) -> Result<Utf8Bytes, BusError> {
        loop {
            if let Some(ready) = self.try_recv() {
                return ready;
            }
            if self.window_full() {
                // The session's loop polls this again after the client's ack.
                std::future::pending::<()>().await;
            }
            let item = self
                .receiver
                .recv()
                .await
                .ok_or_else(|| BusError::Unavailable("the session's queue is gone".into()))?;
            if let Some(frame) = self.hand_out(item) {
                return Ok(frame);
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Result<Utf8Bytes, BusError>> {
        loop {
            if let Some(gap) = self.gaps.pop_front() {
                return Some(Ok(gap));
            }
            if self.window_full() {
                return None;
            }
            let item = match self.frames.pop_front() {
                Some(item) => item,
                None => match self.receiver.try_recv() {
                    Ok(item) => item,
                    // All read: what was dropped after it is told now.
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.drain_dropped();
                        return self.gaps.pop_front().map(Ok);
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        return Some(Err(BusError::Unavailable(
                            "the session's queue is gone".into(),
                        )));
                    }
                },
            };
            if let Some(frame) = self.hand_out(item) {
                return Some(Ok(frame));
            }
        }
    }

    /// The client processed every delivery up to `seq`: the receipts owed.
    pub fn ack_upto(&mut self, seq: u64) -> Result<Vec<Receipt>, AckError> {
        let acks = self.client_acks.as_mut().ok_or(AckError::NotAcking)?;
        acks.ack_upto(seq).map(|settled| settled.receipts)
    }

    /// With client acks, a full window sends nothing more until an ack.
    fn window_full(&self) -> bool {
        self.client_acks.as_ref().is_some_and(ClientAcks::is_full)
    }

    /// Frames received so far that the queue could not take.
    pub fn take_missed(&mut self) -> u64 {
        std::mem::take(&mut self.missed)
    }

    /// The frame to write for `item`, or `None` when the session skips it.
    /// An item that carries a count of frames lost before it gives the `gap`
    /// frame first, and waits in front of the queue.
    fn hand_out(&mut self, mut item: Item) -> Option<Utf8Bytes> {
        let room = match &item.source {
            Source::Room(room) if self.following.contains(room) => Some(room.clone()),
            Source::Room(_) => return None,
            Source::Direct(origin) if origin.as_ref() == Some(&self.session) => return None,
            Source::Direct(_) => None,
        };
        if item.missed > 0 {
            let missed = std::mem::take(&mut item.missed);
            self.missed += missed;
            self.frames.push_front(item);
            return Some(gap_frame(room.as_deref(), missed));
        }
        Some(match &mut self.client_acks {
            Some(acks) => acks.stamp_with(item, Item::frame),
            None => item.frame,
        })
    }

    /// Gap frames for what the queue dropped after the last frame it took,
    /// in the rooms followed and among direct messages.
    fn drain_dropped(&mut self) {
        for (room, missed) in self.dropped.drain() {
            if room.as_ref().is_none_or(|r| self.following.contains(r)) {
                self.missed += missed;
                self.gaps.push_back(gap_frame(room.as_deref(), missed));
            }
        }
    }
}

impl Drop for MemoryInbox {
    fn drop(&mut self) {
        let Some(parking) = &self.parking else { return };
        // What the client had not acknowledged comes first, then what it was
        // never given, then the queue.
        let mut frames: VecDeque<Item> = self
            .client_acks
            .take()
            .map(|acks| acks.into_unacked().collect())
            .unwrap_or_default();
        frames.extend(self.frames.drain(..));
        let (_, closed) = mpsc::channel(1);
        let receiver = std::mem::replace(&mut self.receiver, closed);
        parking.leave(InboxState { receiver, frames });
    }
}
