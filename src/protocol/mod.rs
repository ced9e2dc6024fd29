//! The wire protocol, v2: every JSON frame a client or server sends.
//!
//! Frames are JSON objects tagged by `type`. This module is the only place JSON
//! is shaped; `docs/PROTOCOL.md` documents the same types for client authors.
//!
//! - this file: the frames the server sends, and how a chat message becomes one
//!   ([`ServerFrame::chat`], its [`MessageIds`] and [`now_ms`] timestamps);
//! - [`client`]: the frames a client sends, parsed and validated;
//! - [`bodies`]: the JSON bodies of the HTTP routes.

pub mod bodies;
pub mod client;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{ClientError, ErrorCode};
use crate::names::{RoomName, UserId};

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Always the first frame. A v1 client that named a room in the URL is
    /// subscribed to it from here on, and gets its member list here.
    Welcome {
        user: String,
        /// This connection's id.
        session: String,
        node: String,
        /// The rooms this connection is subscribed to.
        rooms: Vec<String>,
        /// The room named in the URL (v1), with its members as in `subscribed`.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        room: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        members: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        members_total: Option<usize>,
        /// Seconds this connection's queue outlives a dropped socket: reconnect
        /// within them with `?resume=<session>` to get what was missed. Absent
        /// when the server does not offer resume.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        resume_grace_secs: Option<u64>,
        /// Deliveries this connection may hold unacknowledged before the server
        /// waits for an `ack_upto` (only with `acks=client`).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        ack_window: Option<u16>,
        /// Anonymous servers only: proof of this session for HTTP publishing
        /// as `user` (see `tokens`); it dies with the session.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        token: Option<String>,
    },
    /// The answer to `?resume=`, right after `welcome` and the `subscribed` of
    /// each room restored. `recovered: true`: the old queue was found and
    /// `session` is the old session, whose undelivered and unacknowledged
    /// messages follow, in order, before live traffic. `recovered: false`: the
    /// queue was gone (the grace ran out, or it was never this user's); this
    /// is a new session, subscribed to `rooms` afresh, and what was sent
    /// meanwhile must come from history.
    Resumed {
        session: String,
        recovered: bool,
        rooms: Vec<String>,
    },
    /// The connection's queue is bound to `room`: every message published to it
    /// from here on reaches the connection.
    Subscribed {
        room: String,
        /// Everyone in the room, on every node, this user included (at most
        /// `--presence-max-members` of them, sorted).
        members: Vec<String>,
        /// How many members the room has in all.
        members_total: usize,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
        reference: Option<String>,
    },
    /// The session's token expires at `expires_at` (Unix seconds): send a
    /// `refresh` before then, or the session ends with close 4001.
    TokenExpiring { expires_at: u64 },
    /// A `refresh` was accepted: the session's token now expires then.
    Refreshed {
        expires_at: u64,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
        reference: Option<String>,
    },
    /// No message of `room` reaches the connection from here on.
    Unsubscribed {
        room: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
        reference: Option<String>,
    },
    /// A chat message in a room. Published once, serialised once, delivered as is.
    Message {
        id: String,
        room: String,
        from: String,
        text: String,
        ts: u64,
    },
    /// A direct message from one user to another, in any room, on any node.
    Direct {
        id: String,
        from: String,
        to: String,
        text: String,
        ts: u64,
        /// The sender asked to be told when the recipient has it: a connection
        /// of `to` that acknowledges it (`ack_upto`) sends `delivered`.
        #[serde(skip_serializing_if = "std::ops::Not::not", default)]
        receipt: bool,
    },
    /// A connection of `to` acknowledged the direct message `id` the sender
    /// asked a receipt for. One per acknowledging connection.
    Delivered { id: String, to: String },
    /// The connection's queue dropped `missed` messages here, because the
    /// connection fell further behind than the queue holds: in `room`, or,
    /// with no `room`, among its direct messages (and receipts). Sent in order,
    /// where the messages were lost; it carries no `seq` and is not
    /// acknowledged.
    Gap {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        room: Option<String>,
        missed: u64,
    },
    /// Who joined and left the room since the last presence frame (batched).
    Presence {
        room: String,
        joins: Vec<String>,
        leaves: Vec<String>,
        /// Only on a resync, after the client missed presence frames: the whole
        /// member list, which replaces what the client had.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        members: Option<Vec<String>>,
    },
    /// The broker confirmed the client's message carrying `ref`.
    Ack {
        #[serde(rename = "ref")]
        reference: String,
        id: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
        reference: Option<String>,
        /// On `rate_limited`: how long to wait before sending again.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        retry_after_ms: Option<u64>,
    },
}

/// Where a chat message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Everyone in a room.
    Room(RoomName),
    /// Every session of one user, wherever it is connected.
    User(UserId),
}

impl Destination {
    /// The `kind` label the metrics count this message under.
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Room(_) => "message",
            Destination::User(_) => "direct",
        }
    }
}

impl ServerFrame {
    pub fn error(err: &ClientError, reference: Option<String>) -> Self {
        ServerFrame::Error {
            code: err.code,
            message: err.message.clone(),
            reference,
            retry_after_ms: err.retry_after_ms,
        }
    }

    /// The frame every receiver gets for an accepted chat message, whatever
    /// transport it came by: the server sets `id`, `from` and `ts`, so a client
    /// cannot forge them.
    pub fn chat(id: String, from: &UserId, to: &Destination, text: String) -> Self {
        match to {
            Destination::Room(room) => ServerFrame::Message {
                id,
                room: room.to_string(),
                from: from.to_string(),
                text,
                ts: now_ms(),
            },
            Destination::User(to) => ServerFrame::Direct {
                id,
                from: from.to_string(),
                to: to.to_string(),
                text,
                ts: now_ms(),
                receipt: false,
            },
        }
    }

    /// A direct message whose sender asks to be told it was delivered.
    pub fn asking_receipt(mut self, asked: bool) -> Self {
        if let ServerFrame::Direct { receipt, .. } = &mut self {
            *receipt = asked;
        }
        self
    }

    /// The frame as JSON text. Serialising these types cannot fail (no maps with
    /// non-string keys, no custom serialisers), so this returns a `String` directly.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialise")
    }
}

/// Wall-clock Unix time in milliseconds: the `ts` of chat frames and the
/// timestamps nodes gossip.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unique message ids across a cluster: a random per-process prefix and a counter.
pub struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for MessageIds {
    fn default() -> Self {
        Self {
            prefix: format!("{:012x}", rand::random::<u64>() >> 16),
            next: AtomicU64::new(0),
        }
    }
}

impl MessageIds {
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.prefix)
    }
}

/// A serialised server frame with a per-connection `seq` added as its last
/// field, for clients that acknowledge deliveries. Frames are JSON objects
/// written by serde_json, so the closing brace is the last byte; appending
/// keeps `type` and `id` first, where [`frame_head`] reads them.
pub fn with_seq(frame: &str, seq: u64) -> String {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    let mut out = String::with_capacity(body.len() + 32);
    out.push_str(body);
    if !body.ends_with('{') {
        out.push(',');
    }
    // Writing to a String cannot fail.
    let _ = write!(out, "\"seq\":{seq}}}");
    out
}

/// The `type` and, when it has one, the `id` of a serialised server frame,
/// read without parsing the rest: Server-Sent Events name each event by type
/// and id, and the frames arrive as the bytes every receiver shares. Relies on
/// serde writing fields in declaration order (`type` first, then `id` for
/// `message` and `direct`), which the tests below pin.
pub fn frame_head(frame: &str) -> Option<(&str, Option<&str>)> {
    let rest = frame.strip_prefix(r#"{"type":""#)?;
    let (kind, rest) = rest.split_once('"')?;
    let id = rest
        .strip_prefix(r#","id":""#)
        .and_then(|r| r.split_once('"'))
        .map(|(id, _)| id);
    Some((kind, id))
}

/// The `room` of a serialised `message` frame, read without parsing it, like
/// [`frame_head`]: `room` follows `id` in a `message`.
pub fn frame_room(frame: &str) -> Option<&str> {
    let rest = frame.strip_prefix(r#"{"type":"message","id":""#)?;
    let (_, rest) = rest.split_once('"')?;
    let rest = rest.strip_prefix(r#","room":""#)?;
    rest.split_once('"').map(|(room, _)| room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_heads() {
        let message = ServerFrame::Message {
            id: "m-1".into(),
            room: "r".into(),
            from: "a".into(),
            text: "\"type\":\"x\"".into(),
            ts: 1,
        };
        assert_eq!(
            frame_head(&message.to_json()),
            Some(("message", Some("m-1")))
        );
        let direct = ServerFrame::Direct {
            id: "d-1".into(),
            from: "a".into(),
            to: "b".into(),
            text: "t".into(),
            ts: 1,
            receipt: false,
        };
        assert_eq!(frame_head(&direct.to_json()), Some(("direct", Some("d-1"))));
        let presence = ServerFrame::Presence {
            room: "r".into(),
            joins: vec![],
            leaves: vec![],
            members: None,
        };
        assert_eq!(frame_head(&presence.to_json()), Some(("presence", None)));
        assert_eq!(frame_head("nonsense"), None);
        assert_eq!(frame_room(&message.to_json()), Some("r"));
        assert_eq!(frame_room(&direct.to_json()), None);
        assert_eq!(frame_room(&presence.to_json()), None);
        assert_eq!(
            with_seq(&message.to_json(), 7),
            message
                .to_json()
                .replace(",\"ts\":1}", ",\"ts\":1,\"seq\":7}")
        );
    }

    #[test]
    fn chat_frames_are_stamped_by_the_server() {
        let alice = UserId::parse("alice").unwrap();
        let lobby = Destination::Room(RoomName::parse("lobby").unwrap());
        let ServerFrame::Message {
            id, room, from, ts, ..
        } = ServerFrame::chat("m1".into(), &alice, &lobby, "hi".into())
        else {
            panic!("a room destination makes a message frame");
        };
        assert_eq!(
            (id.as_str(), room.as_str(), from.as_str()),
            ("m1", "lobby", "alice")
        );
        assert!(ts > 1_600_000_000_000, "ts is Unix milliseconds");
        let bob = Destination::User(UserId::parse("bob").unwrap());
        assert!(matches!(
            ServerFrame::chat("d1".into(), &alice, &bob, "hi".into()),
            ServerFrame::Direct { ref to, .. } if to == "bob"
        ));
        assert_eq!(lobby.kind(), "message");
        assert_eq!(bob.kind(), "direct");
    }

    #[test]
    fn message_ids_are_unique() {
        let ids = MessageIds::default();
        let other = MessageIds::default();
        let a = ids.next_id();
        assert_ne!(a, ids.next_id());
        assert_ne!(a, other.next_id(), "each process has its own prefix");
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let frame = ServerFrame::Message {
            id: "m1".into(),
            room: "lobby".into(),
            from: "alice".into(),
            text: "hi".into(),
            ts: 5,
        };
        assert_eq!(
            frame.to_json(),
            r#"{"type":"message","id":"m1","room":"lobby","from":"alice","text":"hi","ts":5}"#
        );
        let err = ServerFrame::Error {
            code: ErrorCode::InvalidJson,
            message: "bad".into(),
            reference: None,
            retry_after_ms: None,
        };
        assert_eq!(
            err.to_json(),
            r#"{"type":"error","code":"invalid_json","message":"bad"}"#
        );
        let ack = ServerFrame::Ack {
            reference: "c1".into(),
            id: "m1".into(),
        };
        assert_eq!(ack.to_json(), r#"{"type":"ack","ref":"c1","id":"m1"}"#);
        let gap = ServerFrame::Gap {
            room: Some("lobby".into()),
            missed: 3,
        };
        assert_eq!(gap.to_json(), r#"{"type":"gap","room":"lobby","missed":3}"#);
        let direct_gap = ServerFrame::Gap {
            room: None,
            missed: 1,
        };
        assert_eq!(direct_gap.to_json(), r#"{"type":"gap","missed":1}"#);
        let back: ServerFrame = serde_json::from_str(&err.to_json()).unwrap();
        assert_eq!(back, err);
    }
}
