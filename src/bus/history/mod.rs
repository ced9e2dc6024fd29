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
//! ([`Rings::wait_for_marker`]), so the rings hold everything published before
//! the bind. The page ends at the marker (a [`Cut`]), not at whatever the
//! reader has read since, because what was published after the marker comes
//! live, and a page reaching past it would put those messages ahead of older
//! live ones. A message published between the bind and the marker arrives
//! both ways: the session drops the live copy of any message the page held.
//!
//! A page of the last N must also reach back past the bind: when more than N
//! messages came between the bind and the marker, the last N before the marker
//! would start after the first live ones. So a subscribe asking for the last
//! N puts a first marker *before* it binds ([`Rings::put_marker`]): the page
//! is the last N before that one, then everything up to the second.

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

/// Where a page of history ends: everything the rings had recorded when a
/// marker came back, or everything they hold now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut(Option<u64>);

impl Cut {
    /// Everything recorded so far, whenever the page is taken.
    pub const NOW: Cut = Cut(None);
}

/// A marker in the stream, on its way to this node's reader.
pub struct Marker {
    seen: oneshot::Receiver<Cut>,
}

impl Marker {
    /// Where the reader read it. Bounded by [`super::BROKER_TIMEOUT`]. (Once
    /// read, a marker's entry is gone; one that never comes back leaves its
    /// entry behind, a few bytes, until the node stops.)
    pub async fn cut(self) -> Result<Cut, BusError> {
        super::bounded(async {
            self.seen
                .await
                .map_err(|_| BusError::Unavailable("the history reader stopped".into()))
        })
        .await
    }
}

/// One kept message: its place among everything the rings recorded, its id and
/// its frame.
struct Kept {
    seq: u64,
    id: Box<str>,
    frame: Utf8Bytes,
}

/// One room's last messages.
struct Ring {
    messages: VecDeque<Kept>,
    /// Whether the ring ever dropped a message to make room.
    overflowed: bool,
    /// The place of the last message it dropped (0: none).
    dropped_upto: u64,
}

impl Ring {
    fn page(&self, range: std::ops::Range<usize>, complete: bool) -> Page {
        Page {
            messages: self
                .messages
                .range(range)
                .map(|k| k.frame.clone())
                .collect(),
            complete,
        }
    }

    /// How many kept messages lie at or before `cut`.
    fn end_at(&self, cut: Cut) -> usize {
        match cut.0 {
            None => self.messages.len(),
            Some(upto) => self.messages.partition_point(|k| k.seq <= upto),
        }
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.messages.iter().position(|k| *k.id == *id)
    }
}

#[derive(Default)]
struct Rooms {
    rooms: HashMap<Box<str>, Ring>,
    /// Messages recorded, in every room, since the node started.
    recorded: u64,
}

/// Every room's last messages, as this node has read them.
pub struct Rings {
    kept: Mutex<Rooms>,
    per_room: usize,
    /// Markers put into the stream, waiting for the reader to reach them.
    markers: Mutex<HashMap<String, oneshot::Sender<Cut>>>,
}

impl Rings {
    pub fn new(per_room: usize) -> Arc<Self> {
        Arc::new(Self {
            kept: Mutex::new(Rooms::default()),
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
        let mut kept = self.kept.lock().unwrap();
        kept.recorded += 1;
        let seq = kept.recorded;
        let ring = kept.rooms.entry(room.into()).or_insert_with(|| Ring {
            messages: VecDeque::new(),
            overflowed: false,
            dropped_upto: 0,
        });
        if ring.messages.len() >= self.per_room
            && let Some(dropped) = ring.messages.pop_front()
        {
            ring.overflowed = true;
            ring.dropped_upto = dropped.seq;
        }
        ring.messages.push_back(Kept {
            seq,
            id: id.into(),
            frame: frame.clone(),
        });
    }

    /// The last `limit` messages of `room` up to `from`, then every one after
    /// it up to `cut`: all a session bound between the two may get live. If
    /// the ring has already dropped some of those after `from` (more came
    /// while the session bound than the ring keeps), no page can meet the
    /// live messages: it is empty, and incomplete.
    pub fn last_then(&self, room: &RoomName, limit: usize, from: Cut, cut: Cut) -> Page {
        let kept = self.kept.lock().unwrap();
        let Some(ring) = kept.rooms.get(room.as_str()) else {
            return Page {
                messages: Vec::new(),
                complete: true,
            };
        };
        if from.0.is_some_and(|from| ring.dropped_upto > from) {
            return Page::default();
        }
        let from = ring.end_at(from);
        let start = from.saturating_sub(limit);
        let end = ring.end_at(cut).max(from);
        ring.page(start..end, start > 0 || !ring.overflowed)
    }

    /// The last `limit` messages of `room`, or the last `limit` before the
    /// message `before` (which must be kept, else the page is empty and
    /// incomplete): for HTTP pages, which meet no live traffic.
    pub fn last(&self, room: &RoomName, limit: usize, before: Option<&str>) -> Page {
        let kept = self.kept.lock().unwrap();
        let Some(ring) = kept.rooms.get(room.as_str()) else {
            return Page {
                messages: Vec::new(),
                complete: true,
            };
        };
        let end = match before {
            None => ring.messages.len(),
            Some(before) => match ring.position(before) {
                Some(at) => at,
                None => return Page::default(),
            },
        };
        let start = end.saturating_sub(limit);
        ring.page(start..end, start > 0 || !ring.overflowed)
    }

    /// At most `limit` messages of `room` after the message `since` and up to
    /// `cut`, oldest first. When `since` is no longer kept, the oldest kept are
    /// given and the page says it is incomplete.
    pub fn since(&self, room: &RoomName, since: &str, limit: usize, cut: Cut) -> Page {
        let kept = self.kept.lock().unwrap();
        let Some(ring) = kept.rooms.get(room.as_str()) else {
            return Page {
                messages: Vec::new(),
                complete: false,
            };
        };
        let (start, complete) = match ring.position(since) {
            Some(at) => (at + 1, true),
            None => (0, false),
        };
        let end = (start + limit).min(ring.end_at(cut)).max(start);
        ring.page(start..end, complete)
    }

    /// Resolves when the rings hold every message published before the call:
    /// `put` puts a marker with the id it is given into the stream, and the
    /// reader reads it back. The cut is where the marker was. Bounded by
    /// [`super::BROKER_TIMEOUT`].
    pub async fn wait_for_marker<F, Fut>(&self, put: F) -> Result<Cut, BusError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), BusError>>,
    {
        self.put_marker(put).await?.cut().await
    }

    /// Put a marker into the stream (`put` puts one with the id it is given),
    /// without waiting for the reader to reach it. Bounded by
    /// [`super::BROKER_TIMEOUT`].
    pub async fn put_marker<F, Fut>(&self, put: F) -> Result<Marker, BusError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), BusError>>,
    {
        let id = crate::names::SessionId::random().to_string();
        let (tx, seen) = oneshot::channel();
        self.markers.lock().unwrap().insert(id.clone(), tx);
        match super::bounded(put(id.clone())).await {
            Ok(()) => Ok(Marker { seen }),
            Err(e) => {
                self.markers.lock().unwrap().remove(&id);
                Err(e)
            }
        }
    }

    /// The reader reached the marker `id`, after everything it has recorded.
    pub(super) fn marker_seen(&self, id: &str) {
        if let Some(waiter) = self.markers.lock().unwrap().remove(id) {
            let _ = waiter.send(Cut(Some(self.kept.lock().unwrap().recorded)));
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
        assert_eq!(ids(&rings.since(&lobby, "m2", 1, Cut::NOW)), ["m3"]);
        let gone = rings.since(&lobby, "m0", 10, Cut::NOW);
        assert_eq!((ids(&gone), gone.complete), (vec!["m2", "m3", "m4"], false));
        assert_eq!(
            rings.last(&lobby, 2, None).to_json_array(),
            format!("[{},{}]", sent[3], sent[4])
        );
    }

    #[test]
    fn a_page_ends_where_the_marker_was() {
        let rings = Rings::new(10);
        let lobby = RoomName::parse("lobby").unwrap();
        let other = RoomName::parse("other").unwrap();
        rings.record(&message(&lobby, 0));
        rings.record(&message(&other, 1));
        rings.record(&message(&lobby, 2));
        let (tx, mut cut) = oneshot::channel();
        rings.markers.lock().unwrap().insert("k".into(), tx);
        rings.marker_seen("k");
        let cut = cut.try_recv().unwrap();
        // Read after the marker: these come live, so no page may hold them.
        rings.record(&message(&lobby, 3));
        rings.record(&message(&lobby, 4));
        assert_eq!(ids(&rings.last_then(&lobby, 10, cut, cut)), ["m0", "m2"]);
        assert_eq!(ids(&rings.last_then(&lobby, 1, cut, cut)), ["m2"]);
        assert_eq!(ids(&rings.since(&lobby, "m0", 10, cut)), ["m2"]);
        assert!(rings.since(&lobby, "m3", 10, cut).messages.is_empty());
        assert_eq!(ids(&rings.last(&lobby, 1, None)), ["m4"]);
    }

    #[test]
    fn a_page_of_the_last_n_reaches_back_past_the_bind() {
        let rings = Rings::new(10);
        let lobby = RoomName::parse("lobby").unwrap();
        let cut_here = |rings: &Rings, id: &str| {
            let (tx, mut cut) = oneshot::channel();
            rings.markers.lock().unwrap().insert(id.into(), tx);
            rings.marker_seen(id);
            cut.try_recv().unwrap()
        };
        (0..3).for_each(|n| rings.record(&message(&lobby, n)));
        let before_bind = cut_here(&rings, "before");
        // Published while the session bound: it may get these live.
        (3..6).for_each(|n| rings.record(&message(&lobby, n)));
        let after_bind = cut_here(&rings, "after");
        rings.record(&message(&lobby, 6));
        let page = rings.last_then(&lobby, 2, before_bind, after_bind);
        assert_eq!(ids(&page), ["m1", "m2", "m3", "m4", "m5"]);
        assert!(page.complete);
        let all = rings.last_then(&lobby, 10, before_bind, after_bind);
        assert_eq!(ids(&all), ["m0", "m1", "m2", "m3", "m4", "m5"]);

        // More came while a session bound than the ring keeps: what it lost
        // would fall between the page and the live messages.
        let small = Rings::new(3);
        small.record(&message(&lobby, 0));
        let before_bind = cut_here(&small, "before");
        (1..5).for_each(|n| small.record(&message(&lobby, n)));
        let after_bind = cut_here(&small, "after");
        let page = small.last_then(&lobby, 2, before_bind, after_bind);
        assert!(page.messages.is_empty() && !page.complete);
    }

    #[test]
    fn only_chat_messages_are_history() {
        let rings = Rings::new(3);
        rings.record(&Utf8Bytes::from(r#"{"type":"marker","id":"x"}"#));
        rings.record(&Utf8Bytes::from(
            r#"{"type":"direct","id":"d","from":"a","to":"b","text":"t","ts":1}"#,
        ));
        rings.record(&Utf8Bytes::from("not json"));
        assert!(rings.kept.lock().unwrap().rooms.is_empty());
        let off = Rings::new(0);
        off.record(&message(&RoomName::parse("r").unwrap(), 1));
        assert!(off.kept.lock().unwrap().rooms.is_empty());
    }
}
