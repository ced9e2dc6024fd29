//! Room history: the last `--history-per-room` messages of every room, for
//! `subscribe` with `history` or `since`, and `GET /rooms/<room>/messages`.
//!
//! The messages live in RabbitMQ: one stream, `<prefix>.history`, bound to
//! every room's exchange and bounded by `--history-max-age` and
//! `--history-max-bytes` (see ARCHITECTURE.md for why one stream and not one
//! per room). Each node reads it from its first offset when it starts, and
//! from where it was after a broker reconnect
//! (`bus/amqp/history_link.rs`), into the [`Rings`] here: so history
//! survives every Warren node's restart, and a request is answered from
//! memory. On the embedded bus the bus itself records each room message into
//! the rings as it publishes it.
//!
//! A page of history and the live messages after it must meet with no gap and
//! no duplicate. A session binds its queue to the room first, so everything
//! published from then on reaches it live; then it puts a
//! marker into the stream and waits for this node's reader to reach it
//! ([`Rings::wait_for_marker`]), so
//! the rings hold everything published before the bind. A message published
//! between the two arrives both ways: the session drops the live copy of any
//! message the page held.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tungstenite::Utf8Bytes;

use super::BusError;
use crate::names::RoomName;
use crate::protocol::{frame_head, frame_room};

/// A page of a room's history: message frames, oldest first.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<Utf8Bytes>,
    /// `false`: older messages exist than the node keeps (or `since` named one
    /// it no longer has), so the page may not reach back as far as asked.
    pub complete: bool,
}

impl Page {
    /// The `id` of each message in the page.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.messages
            .iter()
            .filter_map(|m| frame_head(m).and_then(|(_, id)| id))
    }

    /// The page as a JSON array of the message frames, as they were sent.
    pub fn to_json_array(&self) -> String {
        let mut out =
            String::with_capacity(2 + self.messages.iter().map(|m| m.len() + 1).sum::<usize>());
        out.push('[');
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(m.as_str());
        }
        out.push(']');
        out
    }
}

/// One room's last messages.
struct Ring {
    messages: VecDeque<(Box<str>, Utf8Bytes)>,
    /// Whether the ring ever dropped a message to make room.
    overflowed: bool,
}

impl Ring {
    fn page(&self, range: std::ops::Range<usize>, complete: bool) -> Page {
        Page {
            messages: self.messages.range(range).map(|(_, m)| m.clone()).collect(),
            complete,
        }
    }
}

/// Every room's last messages, as this node has read them.
pub struct Rings {
    rooms: Mutex<HashMap<Box<str>, Ring>>,
    per_room: usize,
    /// Markers put into the stream, waiting for the reader to reach them.
    markers: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

impl Rings {
    pub fn new(per_room: usize) -> Arc<Self> {
        Arc::new(Self {
            rooms: Mutex::new(HashMap::new()),
            per_room,
            markers: Mutex::new(HashMap::new()),
        })
    }

    /// Whether history is kept at all (`--history-per-room` above 0).
    pub fn enabled(&self) -> bool {
        self.per_room > 0
    }

    /// Keep `frame` if it is a room's chat message. Anything else (presence,
    /// markers, foreign bytes) is not history.
    pub fn record(&self, frame: &Utf8Bytes) {
        if self.per_room == 0 {
            return;
        }
        let Some(("message", Some(id))) = frame_head(frame) else {
            return;
        };
        let Some(room) = frame_room(frame) else {
            return;
        };
        let mut rooms = self.rooms.lock().unwrap();
        let ring = rooms.entry(room.into()).or_insert_with(|| Ring {
            messages: VecDeque::new(),
            overflowed: false,
        });
        if ring.messages.len() >= self.per_room {
            ring.messages.pop_front();
            ring.overflowed = true;
        }
        ring.messages.push_back((id.into(), frame.clone()));
    }

    /// The last `limit` messages of `room`, or the last `limit` before the
    /// message `before` (which must be kept, else the page is empty and
    /// incomplete).
    pub fn last(&self, room: &RoomName, limit: usize, before: Option<&str>) -> Page {
        let rooms = self.rooms.lock().unwrap();
        let Some(ring) = rooms.get(room.as_str()) else {
            return Page {
                messages: Vec::new(),
                complete: true,
            };
        };
        let end = match before {
            None => ring.messages.len(),
            Some(before) => match ring.messages.iter().position(|(id, _)| **id == *before) {
                Some(at) => at,
                None => return Page::default(),
            },
        };
        let start = end.saturating_sub(limit);
        ring.page(start..end, start > 0 || !ring.overflowed)
    }

    /// At most `limit` messages of `room` after the message `since`, oldest
    /// first. When `since` is no longer kept, the oldest kept are given and the
    /// page says it is incomplete.
    pub fn since(&self, room: &RoomName, since: &str, limit: usize) -> Page {
        let rooms = self.rooms.lock().unwrap();
        let Some(ring) = rooms.get(room.as_str()) else {
            return Page {
                messages: Vec::new(),
                complete: false,
            };
        };
        let (start, complete) = match ring.messages.iter().position(|(id, _)| **id == *since) {
            Some(at) => (at + 1, true),
            None => (0, false),
        };
        let end = (start + limit).min(ring.messages.len());
        ring.page(start..end, complete)
    }

    /// Resolves when the rings hold every message published before the call:
    /// `put` puts a marker with the id it is given into the stream, and the
    /// reader reads it back. Bounded by [`super::BROKER_TIMEOUT`].
    pub async fn wait_for_marker<F, Fut>(&self, put: F) -> Result<(), BusError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), BusError>>,
    {
        let id = crate::names::SessionId::random().to_string();
        let (tx, seen) = oneshot::channel();
        self.markers.lock().unwrap().insert(id.clone(), tx);
        let waited = async {
            put(id.clone()).await?;
            seen.await
                .map_err(|_| BusError::Unavailable("the history reader stopped".into()))
        };
        let result = super::bounded(waited).await;
        if result.is_err() {
            self.markers.lock().unwrap().remove(&id);
        }
        result
    }

    /// The reader reached the marker `id`.
    pub(super) fn marker_seen(&self, id: &str) {
        if let Some(waiter) = self.markers.lock().unwrap().remove(id) {
            let _ = waiter.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::UserId;
    use crate::protocol::ServerFrame;

    fn message(room: &RoomName, n: usize) -> Utf8Bytes {
        let alice = UserId::parse("alice").unwrap();
        let frame = ServerFrame::chat(
            format!("m{n}"),
            &alice,
            &crate::protocol::Destination::Room(room.clone()),
            format!("text {n}"),
        );
        Utf8Bytes::from(frame.to_json())
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.ids().collect()
    }

    #[test]
    fn keeps_the_last_messages_of_each_room() {
        let rings = Rings::new(3);
        let lobby = RoomName::parse("lobby").unwrap();
        let other = RoomName::parse("other").unwrap();
        let sent: Vec<Utf8Bytes> = (0..5).map(|n| message(&lobby, n)).collect();
        for frame in &sent {
            rings.record(frame);
        }
        rings.record(&message(&other, 9));
        let page = rings.last(&lobby, 10, None);
        assert_eq!(ids(&page), ["m2", "m3", "m4"]);
        assert!(!page.complete, "m0 and m1 were dropped");
        let page = rings.last(&lobby, 2, None);
        assert_eq!(ids(&page), ["m3", "m4"]);
        assert!(page.complete);
        assert_eq!(ids(&rings.last(&lobby, 10, Some("m4"))), ["m2", "m3"]);
        assert_eq!(ids(&rings.last(&other, 10, None)), ["m9"]);
        let unknown = rings.last(&lobby, 10, Some("nope"));
        assert!(unknown.messages.is_empty() && !unknown.complete);
        assert_eq!(ids(&rings.since(&lobby, "m2", 1)), ["m3"]);
        let gone = rings.since(&lobby, "m0", 10);
        assert_eq!((ids(&gone), gone.complete), (vec!["m2", "m3", "m4"], false));
        assert_eq!(
            rings.last(&lobby, 2, None).to_json_array(),
            format!("[{},{}]", sent[3], sent[4])
        );
    }

    #[test]
    fn only_chat_messages_are_history() {
        let rings = Rings::new(3);
        rings.record(&Utf8Bytes::from(r#"{"type":"marker","id":"x"}"#));
        rings.record(&Utf8Bytes::from(
            r#"{"type":"direct","id":"d","from":"a","to":"b","text":"t","ts":1}"#,
        ));
        rings.record(&Utf8Bytes::from("not json"));
        assert!(rings.rooms.lock().unwrap().is_empty());
        let off = Rings::new(0);
        off.record(&message(&RoomName::parse("r").unwrap(), 1));
        assert!(off.rooms.lock().unwrap().is_empty());
    }
}
