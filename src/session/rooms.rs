//! A session's rooms: subscribing and unsubscribing, which room a message
//! goes to, and each room's presence frames.
//!
//! Subscribing binds the session's queue to the room on the bus, then tells
//! the inbox to follow the room, joins presence and answers `subscribed`: any
//! message published after `subscribed` reaches the client. Unsubscribing
//! works the other way round, and the inbox stops following the room first,
//! so nothing of it reaches the client after `unsubscribed`, not even what was
//! already queued.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tracing::{debug, warn};
use tungstenite::Utf8Bytes;

use super::events::{Session, on_broker};
use super::{SessionEnd, Transport};
use crate::bus::{BusError, SessionLink};
use crate::error::{ClientError, ErrorCode};
use crate::names::RoomName;
use crate::protocol::ServerFrame;
use crate::protocol::client::{HistoryRequest, Rejected};

/// What a client is told when the broker stops answering mid-session.
pub(super) const STUCK: &str = "the message broker is not answering; reconnect shortly";

/// The rooms a session is subscribed to, and their presence frames.
#[derive(Default)]
pub struct Rooms {
    subscribed: BTreeSet<RoomName>,
    /// Each room's serialised `presence` frames. A room whose channel closed
    /// (the node is stopping) drops out of the map, so a closed channel is
    /// never polled again.
    presence: StreamMap<RoomName, BroadcastStream<Utf8Bytes>>,
}

/// The next presence event of one of the session's rooms.
pub type PresenceEvent = (RoomName, Result<Utf8Bytes, BroadcastStreamRecvError>);

impl Rooms {
    pub fn add(&mut self, room: RoomName, updates: broadcast::Receiver<Utf8Bytes>) {
        self.presence
            .insert(room.clone(), BroadcastStream::new(updates));
        self.subscribed.insert(room);
    }

    fn remove(&mut self, room: &RoomName) -> bool {
        self.presence.remove(room);
        self.subscribed.remove(room)
    }

    pub fn contains(&self, room: &RoomName) -> bool {
        self.subscribed.contains(room)
    }

    pub fn into_names(self) -> BTreeSet<RoomName> {
        self.subscribed
    }

    /// The next presence frame of any room; never, while there is none.
    pub async fn next_presence(&mut self) -> PresenceEvent {
        if self.presence.is_empty() {
            return std::future::pending().await;
        }
        match self.presence.next().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }

    /// The room a `message` goes to: the one it names, which must be
    /// subscribed, or the only subscription when it names none.
    pub fn target(&self, named: Option<RoomName>) -> Result<RoomName, ClientError> {
        match named {
            Some(room) if self.subscribed.contains(&room) => Ok(room),
            Some(room) => Err(ClientError::new(
                ErrorCode::NotSubscribed,
                format!("subscribe to {room} before sending to it"),
            )),
            None => match self.subscribed.len() {
                1 => Ok(self.subscribed.first().cloned().expect("one room")),
                0 => Err(ClientError::new(
                    ErrorCode::NotSubscribed,
                    "subscribe to a room before sending messages",
                )),
                n => Err(ClientError::new(
                    ErrorCode::InvalidRoom,
                    format!("this connection is in {n} rooms: name the room"),
                )),
            },
        }
    }
}

impl<T: Transport, P: SessionLink> Session<'_, T, P> {
    /// `{"type":"subscribe"}`: bind, follow, join presence, answer; then the
    /// history asked for, if any.
    pub(super) async fn subscribe(
        &mut self,
        room: RoomName,
        reference: Option<String>,
        history: Option<HistoryRequest>,
    ) -> ControlFlow<SessionEnd> {
        if !self.grant.permissions.may_read(&room) {
            let error = crate::handshake::forbidden_room(&room);
            return self.refuse(Rejected { error, reference }).await;
        }
        let mut marked = None;
        if !self.rooms.contains(&room) {
            let limit = self.node.config.max_rooms_per_connection;
            if self.rooms.subscribed.len() >= limit {
                let error = ClientError::new(
                    ErrorCode::TooManyRooms,
                    format!("a connection may be in at most {limit} rooms"),
                );
                return self.refuse(Rejected { error, reference }).await;
            }
            // Before the bind: where the page of the last messages must reach.
            marked = match history {
                // Bounded by the broker timeout; without it the page ends
                // where the second marker does, as before.
                Some(HistoryRequest::Last(_)) => self.node.bus.history_mark().await,
                _ => None,
            };
            match on_broker(self.node, self.link.bind(&room)).await? {
                Ok(()) => {}
                Err(BusError::TimedOut) => return self.broker_lost(STUCK, reference).await,
                Err(e) => {
                    warn!(error = %e, %room, "subscribe failed");
                    return self.broker_refused(reference).await;
                }
            }
            self.inbox.follow(&room);
            self.join(room.clone(), reference.clone()).await?;
        } else {
            // Subscribing twice changes nothing, and answers the same way.
            let members = self.node.presence.members(room.as_str()).await;
            let frame = ServerFrame::Subscribed {
                room: room.to_string(),
                members_total: members.len(),
                members,
                reference: reference.clone(),
            };
            self.write_frame(&frame).await?;
        }
        match history {
            Some(request) => self.send_history(&room, request, reference, marked).await,
            None => ControlFlow::Continue(()),
        }
    }

    /// Join `room`'s presence (the queue is bound and followed) and answer
    /// `subscribed` with its members.
    async fn join(&mut self, room: RoomName, reference: Option<String>) -> ControlFlow<SessionEnd> {
        let joined = self
            .node
            .presence
            .join(room.as_str(), self.identity.user.as_str())
            .await;
        let frame = ServerFrame::Subscribed {
            room: room.to_string(),
            members: joined.members,
            members_total: joined.total,
            reference,
        };
        self.rooms.add(room, joined.updates);
        self.write_frame(&frame).await
    }

    /// A resumed session's start: join the restored rooms (already bound and
    /// followed) with a `subscribed` each, then say what came of the resume.
    pub async fn resumed(&mut self, resumed: crate::handshake::Resumed) -> ControlFlow<SessionEnd> {
        let rooms: Vec<String> = resumed.rooms.iter().map(ToString::to_string).collect();
        for room in resumed.rooms {
            self.join(room, None).await?;
        }
        self.write_frame(&ServerFrame::Resumed {
            session: self.identity.session.to_string(),
            recovered: resumed.recovered,
            rooms,
        })
        .await
    }

    /// `{"type":"unsubscribe"}`: stop following, leave presence, unbind, answer.
    pub(super) async fn unsubscribe(
        &mut self,
        room: RoomName,
        reference: Option<String>,
    ) -> ControlFlow<SessionEnd> {
        if !self.rooms.remove(&room) {
            let error = ClientError::new(
                ErrorCode::NotSubscribed,
                format!("this connection is not subscribed to {room}"),
            );
            return self.refuse(Rejected { error, reference }).await;
        }
        self.inbox.unfollow(&room);
        self.node
            .presence
            .leave(room.as_str(), self.identity.user.as_str())
            .await;
        // What is still queued or published before the unbind takes effect is
        // skipped by the inbox; a failed unbind only costs skipped deliveries.
        match on_broker(self.node, self.link.unbind(&room)).await? {
            Ok(()) => {}
            Err(BusError::TimedOut) => return self.broker_lost(STUCK, reference).await,
            Err(e) => debug!(error = %e, %room, "unbind failed; the inbox skips the room"),
        }
        self.write_frame(&ServerFrame::Unsubscribed {
            room: room.to_string(),
            reference,
        })
        .await
    }

    /// A presence frame of one of the session's rooms, or news that some were
    /// missed.
    pub(super) async fn on_presence(&mut self, event: PresenceEvent) -> ControlFlow<SessionEnd> {
        match event {
            (_, Ok(frame)) => self.write(vec![frame]).await,
            (room, Err(BroadcastStreamRecvError::Lagged(missed))) => {
                // Diffs cannot be replayed: send the whole list instead.
                debug!(missed, %room, "presence frames missed; resyncing the client");
                let frame = ServerFrame::Presence {
                    room: room.to_string(),
                    joins: Vec::new(),
                    leaves: Vec::new(),
                    members: Some(self.node.presence.members(room.as_str()).await),
                };
                self.write_frame(&frame).await
            }
        }
    }

    /// A subscribe the broker refused (not a stuck broker: that ends the
    /// session): the client's answer is `unavailable`, with its `ref`.
    async fn broker_refused(&mut self, reference: Option<String>) -> ControlFlow<SessionEnd> {
        let error = ClientError::new(
            ErrorCode::Unavailable,
            "the message broker did not take the subscription; retry shortly",
        );
        self.write_frame(&ServerFrame::error(&error, reference))
            .await
    }
}
