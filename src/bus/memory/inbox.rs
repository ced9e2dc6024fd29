//! A session's consumer on the embedded bus: its queue's frames, only from
//! what it follows, first the frames a resumed session gets again; with client
//! acks, each stamped with its seq and kept until acknowledged.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;
use tungstenite::Utf8Bytes;

use super::Item;
use super::parked::{InboxState, Parking};
use crate::bus::acks::{AckError, ClientAcks, Receipt};
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
}

impl MemoryInbox {
    pub(super) fn new(
        state: InboxState,
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
        }
    }

    pub fn follow(&mut self, room: &RoomName) {
        self.following.insert(room.as_str().into());
    }

    pub fn unfollow(&mut self, room: &RoomName) {
        self.following.remove(room.as_str());
    }

    pub async fn recv(&mut self) -> Result<Utf8Bytes, BusError> {
        if self.window_full() {
            // The session's loop polls this again after the client's ack.
            std::future::pending::<()>().await;
        }
        loop {
            let item =
                match self.frames.pop_front() {
                    Some(item) => item,
                    None => self.receiver.recv().await.ok_or_else(|| {
                        BusError::Unavailable("the session's queue is gone".into())
                    })?,
                };
            if let Some(frame) = self.hand_out(item) {
                return Ok(frame);
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Result<Utf8Bytes, BusError>> {
        loop {
            if self.window_full() {
                return None;
            }
            let item = match self.frames.pop_front() {
                Some(item) => item,
                None => match self.receiver.try_recv() {
                    Ok(item) => item,
                    Err(mpsc::error::TryRecvError::Empty) => return None,
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

    /// The frame to write for `item`, or `None` when the session skips it.
    fn hand_out(&mut self, item: Item) -> Option<Utf8Bytes> {
        let wanted = match &item {
            Item::Room(room, _) => self.following.contains(room),
            Item::Direct(origin, _) => origin.as_ref() != Some(&self.session),
        };
        if !wanted {
            return None;
        }
        Some(match &mut self.client_acks {
            Some(acks) => acks.stamp_with(item, Item::frame),
            None => match item {
                Item::Room(_, frame) | Item::Direct(_, frame) => frame,
            },
        })
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
