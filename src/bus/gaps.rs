//! Overflow made visible: how many messages a session's bounded queue dropped,
//! and where, so the session can send a `gap` frame in their place.
//!
//! On RabbitMQ a session's queue keeps at most `--queue-max-length` messages
//! and drops the oldest past that (`x-overflow: drop-head`), telling nobody.
//! Dead-lettering what it drops cannot help: into the session's own queue it
//! would cascade through the full queue, and a drop queue per session would
//! double the broker's queues. So publishers number what they publish
//! ([`Numbering`]) and each inbox compares the numbers ([`Gaps`]):
//!
//! - Every publish of a session's link carries its numbering in the AMQP
//!   `message-id` property (never in the JSON the client sees):
//!   `<publisher>.<number>`, the link's random id in hex and a number that
//!   rises by one per destination. Until issue 14 it travelled in two headers,
//!   [`PUBLISHER_HEADER`] and [`SEQ_HEADER`]; the broker then spent ~10 µs
//!   more CPU on every delivery (docs/BENCHMARKS.md), and `message-id` costs
//!   nothing measurable. Inboxes still read the headers, so nodes of both
//!   kinds can run side by side during an upgrade. A link is one
//!   channel, and only a channel keeps publishes in order, so the numbering
//!   is per link. A destination is a room's exchange; a user, through the
//!   direct exchange (direct messages and receipts); and, numbered apart, the
//!   sender's copies of its own direct messages to its user's other
//!   connections (its own connection skips those, so they must not share a
//!   count with what it sees).
//! - An inbox keeps the last number it saw per (publisher, destination). A
//!   delivery whose number jumps by more than one means the queue dropped the
//!   difference minus one, just before it. A number that is not greater (a
//!   resumed queue giving again what was not acknowledged) is no gap.
//!
//! HTTP publishes are numbered the same way: a node publishes them all on one
//! channel of its own, a publisher like any session's link
//! (`bus/amqp/sessionless.rs`).
//!
//! A session that may be resumed leaves a [`ParkNote`] when its socket drops:
//! where its numbers stood, so that the inbox resuming it (on any node) goes on
//! counting from there, and what the queue dropped while nobody read it is
//! told too (`bus/amqp/lease.rs` keeps the note on the broker).
//!
//! What this cannot see, so `missed` is a lower bound: drops of a publisher's
//! messages before the first of its messages this inbox saw in that room (they
//! cannot be told from messages published before the session subscribed), and
//! drops while parked when the note is missing (a resume that took it failed,
//! and the next try starts afresh).
//!
//! Memory: an inbox remembers at most [`REMEMBERED`] (publisher, destination)
//! pairs, in two generations: when the newer fills, the older is forgotten and
//! the newer becomes the older, so a pair heard from recently is kept and the
//! cost stays O(1) per delivery. A forgotten pair starts again at its next
//! delivery, as a new one. A link's [`Numbering`] keeps at most
//! [`NUMBERED_DESTINATIONS`] counters; past that it forgets them all and takes
//! a new id, so receivers see a new publisher rather than numbers going back.
//!
//! On the embedded bus none of this is needed: it counts drops where a queue
//! refuses a frame (`bus::memory`).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use tungstenite::Utf8Bytes;

use crate::protocol::ServerFrame;

/// The AMQP header naming the link that published a message.
pub const PUBLISHER_HEADER: &str = "x-warren-pub";
/// The AMQP header numbering a link's messages to one destination.
pub const SEQ_HEADER: &str = "x-warren-seq";
/// (publisher, destination) pairs an inbox remembers, both generations.
pub const REMEMBERED: usize = 1024;
/// Destinations one link numbers before it starts afresh under a new id.
pub const NUMBERED_DESTINATIONS: usize = 4096;

/// Where a message goes, as both sides key it: the exchange, the routing key
/// and whether it is a sender's copy. Hashed to 64 bits with a fixed hasher:
/// a collision would merge two counts, at odds of about n²/2⁶⁵.
fn destination(exchange: &str, routing_key: &str, copy: bool) -> u64 {
    std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one((
        exchange,
        routing_key,
        copy,
    ))
}

/// One link's numbering of what it publishes. Its publishes go out one at a
/// time (the session awaits each), so numbers are taken in publish order.
pub struct Numbering {
    /// A std Mutex: held only to take a number, never across an await.
    state: Mutex<NumberingState>,
}

struct NumberingState {
    id: i64,
    last: HashMap<u64, i64>,
}

impl Default for Numbering {
    fn default() -> Self {
        Self {
            state: Mutex::new(NumberingState {
                id: rand::random(),
                last: HashMap::new(),
            }),
        }
    }
}

impl Numbering {
    /// The `message-id` of the next message to `exchange` with `routing_key`
    /// (`copy`: a sender's copy for its other connections).
    pub fn message_id(&self, exchange: &str, routing_key: &str, copy: bool) -> ShortString {
        let (id, seq) = self.next(destination(exchange, routing_key, copy));
        // The id as its bits, in hex: at most 16 digits, negative or not.
        format!("{:x}.{seq}", id as u64).into()
    }

    fn next(&self, destination: u64) -> (i64, i64) {
        let mut state = self.state.lock().unwrap();
        if state.last.len() >= NUMBERED_DESTINATIONS && !state.last.contains_key(&destination) {
            state.last.clear();
            state.id = rand::random();
        }
        let id = state.id;
        let seq = state.last.entry(destination).or_insert(0);
        *seq += 1;
        (id, *seq)
    }
}

/// A (publisher, destination) pair, as [`Gaps`] keys it.
pub type Pair = (i64, u64);

/// One numbered delivery: its pair and its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Number {
    pub pair: Pair,
    pub seq: i64,
}

/// What [`Gaps::observe`] found in one delivery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Messages of the same pair dropped just before it.
    pub missed: u64,
    /// Its numbers, if it has any.
    pub number: Option<Number>,
}

/// One inbox's last number seen per (publisher, destination), and where a
/// parked session's numbers stood (see [`ParkNote`]).
#[derive(Default)]
pub struct Gaps {
    newer: HashMap<Pair, i64>,
    older: HashMap<Pair, i64>,
    /// A resumed session's numbers from before its socket dropped: each used
    /// once, the first time its pair is heard from again.
    parked: HashMap<Pair, i64>,
}

impl Gaps {
    /// How many messages of the same publisher and destination were dropped
    /// just before this delivery (none for a message without numbers), and
    /// its numbers.
    pub fn observe(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
    ) -> Observed {
        let Some((publisher, seq)) = numbers(properties) else {
            return Observed::default();
        };
        let copy = properties.correlation_id().is_some();
        let key = (publisher, destination(exchange, routing_key, copy));
        let number = Some(Number { pair: key, seq });
        let last = match self.newer.get_mut(&key) {
            Some(last) => std::mem::replace(last, (*last).max(seq)),
            None => {
                let last = self.older.remove(&key).or_else(|| self.parked.remove(&key));
                self.remember(key, last.map_or(seq, |l| l.max(seq)));
                match last {
                    Some(last) => last,
                    // The first heard from this publisher here: no baseline.
                    None => return Observed { missed: 0, number },
                }
            }
        };
        let missed = u64::try_from(seq.saturating_sub(last).saturating_sub(1)).unwrap_or(0);
        Observed { missed, number }
    }

    /// Where the numbers stand for a session whose socket dropped: the last
    /// seen of each pair, except that a pair with deliveries the client had
    /// not acknowledged (`unacked`, oldest first) stands just before the first
    /// of them, since those come again.
    pub fn park(&self, unacked: impl IntoIterator<Item = (Number, Option<String>)>) -> ParkNote {
        let mut stood: HashMap<Pair, i64> = self
            .parked
            .iter()
            .chain(&self.older)
            .chain(&self.newer)
            .map(|(pair, seq)| (*pair, *seq))
            .collect();
        let unacked: Vec<(Number, Option<String>)> = unacked.into_iter().collect();
        let mut firsts = std::collections::HashSet::new();
        for (number, _) in &unacked {
            if firsts.insert(number.pair) {
                stood.insert(number.pair, number.seq - 1);
            }
        }
        ParkNote { stood, unacked }
    }

    /// A resumed session's numbers from its [`ParkNote`]. `last_id`, the last
    /// message the client says it processed, settles the unacknowledged
    /// deliveries up to it: their drops were no loss to the client.
    pub fn resume_from(&mut self, note: ParkNote, last_id: Option<&str>) {
        let ParkNote { mut stood, unacked } = note;
        if let Some(at) = last_id.and_then(|id| {
            unacked
                .iter()
                .position(|(_, unacked_id)| unacked_id.as_deref() == Some(id))
        }) {
            for (number, _) in &unacked[..=at] {
                stood.insert(number.pair, number.seq);
            }
        }
        self.parked = stood;
        if self.parked.len() > REMEMBERED {
            // Bounded like the rest; a pair left out starts afresh.
            self.parked = self.parked.drain().take(REMEMBERED).collect();
        }
    }

    fn remember(&mut self, key: (i64, u64), seq: i64) {
        if self.newer.len() >= REMEMBERED / 2 {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(key, seq);
    }

    /// Forget every publisher's count for `exchange`: the session subscribes
    /// to it (again), and what was published while it was not bound is not
    /// missed. A resumed session's parked numbers stay: its queue stayed bound.
    pub fn forget(&mut self, exchange: &str) {
        let room = destination(exchange, "", false);
        self.newer.retain(|(_, d), _| *d != room);
        self.older.retain(|(_, d), _| *d != room);
    }

    /// The session left `exchange`: its parked numbers there no longer hold.
    pub fn left(&mut self, exchange: &str) {
        let room = destination(exchange, "", false);
        self.parked.retain(|(_, d), _| *d != room);
        self.forget(exchange);
    }
}

/// Where a parked session's numbers stood when its socket dropped, and the
/// deliveries its client had not acknowledged (with their ids), so that the
/// session that resumes it, on any node, can tell what its queue dropped
/// meanwhile. It travels through the broker as bytes ([`Self::to_bytes`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParkNote {
    stood: HashMap<Pair, i64>,
    unacked: Vec<(Number, Option<String>)>,
}

/// The first byte of a note: its layout's version.
const NOTE_VERSION: u8 = 1;

impl ParkNote {
    /// `version, count, (publisher, destination, seq)*, count, (publisher,
    /// destination, seq, id length, id)*`, integers little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![NOTE_VERSION];
        out.extend(
            u32::try_from(self.stood.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for ((publisher, destination), seq) in &self.stood {
            out.extend(publisher.to_le_bytes());
            out.extend(destination.to_le_bytes());
            out.extend(seq.to_le_bytes());
        }
        out.extend(
            u32::try_from(self.unacked.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for (number, id) in &self.unacked {
            out.extend(number.pair.0.to_le_bytes());
            out.extend(number.pair.1.to_le_bytes());
            out.extend(number.seq.to_le_bytes());
            let id = id.as_deref().unwrap_or("").as_bytes();
            out.extend(u16::try_from(id.len()).unwrap_or(0).to_le_bytes());
            out.extend(&id[..usize::from(u16::try_from(id.len()).unwrap_or(0))]);
        }
        out
    }

    /// The note in `bytes`, or `None` when they are not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut read = NoteReader(bytes);
        if read.take::<1>()? != [NOTE_VERSION] {
            return None;
        }
        let mut note = ParkNote::default();
        for _ in 0..read.u32()? {
            let pair = (read.i64()?, read.u64()?);
            note.stood.insert(pair, read.i64()?);
        }
        for _ in 0..read.u32()? {
            let pair = (read.i64()?, read.u64()?);
            let seq = read.i64()?;
            let len = usize::from(u16::from_le_bytes(read.take::<2>()?));
            let id = std::str::from_utf8(read.slice(len)?).ok()?;
            let id = (!id.is_empty()).then(|| id.to_owned());
            note.unacked.push((Number { pair, seq }, id));
        }
        read.0.is_empty().then_some(note)
    }
}

struct NoteReader<'a>(&'a [u8]);

impl NoteReader<'_> {
    fn slice(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.slice(N)?.try_into().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }
}

/// The publisher id and number a delivery carries, if any: in its
/// `message-id`, or in the headers nodes used before.
fn numbers(properties: &BasicProperties) -> Option<(i64, i64)> {
    if let Some(id) = properties.message_id() {
        let (publisher, seq) = id.as_str().split_once('.')?;
        return Some((
            u64::from_str_radix(publisher, 16).ok()? as i64,
            seq.parse().ok()?,
        ));
    }
    let headers = properties.headers().as_ref()?.inner();
    // Looked up by `&str` (ShortString borrows as one): no allocation per delivery.
    let value = |name: &str| match headers.get(name) {
        Some(AMQPValue::LongLongInt(v)) => Some(*v),
        _ => None,
    };
    Some((value(PUBLISHER_HEADER)?, value(SEQ_HEADER)?))
}

/// The `gap` frame for `missed` messages of `room`, or of the direct messages.
pub fn gap_frame(room: Option<&str>, missed: u64) -> Utf8Bytes {
    Utf8Bytes::from(
        ServerFrame::Gap {
            room: room.map(str::to_owned),
            missed,
        }
        .to_json(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOBBY: &str = "p.room.lobby";
    const DIRECT: &str = "p.direct";

    fn numbered(numbering: &Numbering, exchange: &str, key: &str, copy: bool) -> BasicProperties {
        let properties =
            BasicProperties::default().with_message_id(numbering.message_id(exchange, key, copy));
        if copy {
            properties.with_correlation_id("origin".into())
        } else {
            properties
        }
    }

    /// `n` messages from `numbering` to the lobby, as the inbox sees them.
    fn lobby(numbering: &Numbering, n: usize) -> Vec<BasicProperties> {
        (0..n)
            .map(|_| numbered(numbering, LOBBY, "", false))
            .collect()
    }

    #[test]
    fn numbers_rise_by_one_per_destination() {
        let numbering = Numbering::default();
        let seq = |p: &BasicProperties| numbers(p).unwrap().1;
        assert_eq!(seq(&numbered(&numbering, LOBBY, "", false)), 1);
        assert_eq!(seq(&numbered(&numbering, DIRECT, "bob", false)), 1);
        assert_eq!(seq(&numbered(&numbering, DIRECT, "alice", true)), 1);
        assert_eq!(seq(&numbered(&numbering, DIRECT, "alice", false)), 1);
        assert_eq!(seq(&numbered(&numbering, LOBBY, "", false)), 2);
        assert_eq!(seq(&numbered(&numbering, DIRECT, "bob", false)), 2);
    }

    #[test]
    fn a_message_id_gives_back_its_publisher_and_number() {
        for id in [i64::MIN, -1, 0, 42, i64::MAX] {
            let numbering = Numbering {
                state: Mutex::new(NumberingState {
                    id,
                    last: HashMap::new(),
                }),
            };
            let properties = numbered(&numbering, LOBBY, "", false);
            assert_eq!(numbers(&properties), Some((id, 1)), "{properties:?}");
        }
        let foreign = |id: &str| BasicProperties::default().with_message_id(id.into());
        assert_eq!(numbers(&foreign("not-ours")), None);
        assert_eq!(numbers(&foreign("zz.1")), None);
        assert_eq!(numbers(&foreign("1f.x")), None);
    }

    /// What nodes before the `message-id` numbering published: an inbox reads
    /// it, so old and new nodes can serve one cluster during an upgrade.
    #[test]
    fn the_headers_of_older_nodes_still_number_a_delivery() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(PUBLISHER_HEADER.into(), AMQPValue::LongLongInt(-7));
        headers.insert(SEQ_HEADER.into(), AMQPValue::LongLongInt(3));
        let properties = BasicProperties::default().with_headers(headers);
        assert_eq!(numbers(&properties), Some((-7, 3)));
    }

    #[test]
    fn a_jump_is_what_was_dropped_and_a_repeat_is_none() {
        let numbering = Numbering::default();
        let sent = lobby(&numbering, 10);
        let mut gaps = Gaps::default();
        let mut seen = |i: usize| gaps.observe(LOBBY, "", &sent[i]).missed;
        assert_eq!(seen(0), 0);
        assert_eq!(seen(1), 0);
        assert_eq!(seen(5), 3, "2, 3 and 4 were dropped");
        assert_eq!(seen(3), 0, "a redelivery is no gap");
        assert_eq!(seen(6), 0, "nor does it lower what was seen");
        assert_eq!(seen(9), 2);
    }

    #[test]
    fn publishers_and_destinations_are_counted_apart() {
        let (alice, bob) = (Numbering::default(), Numbering::default());
        let mut gaps = Gaps::default();
        let mut observe =
            |p: BasicProperties, exchange, key| gaps.observe(exchange, key, &p).missed;
        assert_eq!(observe(numbered(&alice, LOBBY, "", false), LOBBY, ""), 0);
        assert_eq!(observe(numbered(&bob, LOBBY, "", false), LOBBY, ""), 0);
        // Alice's message to carol and her copies for her own tabs: not seen here.
        numbered(&alice, DIRECT, "carol", false);
        numbered(&alice, DIRECT, "alice", true);
        assert_eq!(observe(numbered(&alice, LOBBY, "", false), LOBBY, ""), 0);
        assert_eq!(
            observe(numbered(&alice, DIRECT, "dave", false), DIRECT, "dave"),
            0
        );
        numbered(&bob, LOBBY, "", false);
        assert_eq!(observe(numbered(&bob, LOBBY, "", false), LOBBY, ""), 1);
        // A sender's copy is its own destination: a message to herself between
        // copies (which her sending connection skips) is no gap.
        let mut gaps = Gaps::default();
        numbered(&alice, DIRECT, "alice", true);
        let to_self = numbered(&alice, DIRECT, "alice", false);
        numbered(&alice, DIRECT, "alice", true);
        assert_eq!(gaps.observe(DIRECT, "alice", &to_self).missed, 0);
        let to_self = numbered(&alice, DIRECT, "alice", false);
        assert_eq!(gaps.observe(DIRECT, "alice", &to_self).missed, 0);
    }

    #[test]
    fn unnumbered_messages_and_first_sightings_are_no_gap() {
        let mut gaps = Gaps::default();
        assert_eq!(
            gaps.observe(LOBBY, "", &BasicProperties::default()).missed,
            0
        );
        let sent = lobby(&Numbering::default(), 5);
        assert_eq!(
            gaps.observe(LOBBY, "", &sent[4]).missed,
            0,
            "published before the session could know"
        );
    }

    #[test]
    fn subscribing_again_forgets_the_room() {
        let numbering = Numbering::default();
        let sent = lobby(&numbering, 5);
        let mut gaps = Gaps::default();
        gaps.observe(LOBBY, "", &sent[0]);
        gaps.forget(LOBBY);
        assert_eq!(gaps.observe(LOBBY, "", &sent[4]).missed, 0);
    }

    #[test]
    fn memory_is_bounded_and_recent_publishers_are_kept() {
        let mut gaps = Gaps::default();
        let steady = Numbering::default();
        let sent = lobby(&steady, 4);
        gaps.observe(LOBBY, "", &sent[0]);
        // Many one-off publishers, with the steady one heard from now and then.
        for i in 0..REMEMBERED * 3 {
            let one_off = lobby(&Numbering::default(), 1);
            gaps.observe(LOBBY, "", &one_off[0]);
            if i % (REMEMBERED / 4) == 0 {
                gaps.observe(LOBBY, "", &sent[1]);
            }
            assert!(gaps.newer.len() + gaps.older.len() <= REMEMBERED);
        }
        assert_eq!(
            gaps.observe(LOBBY, "", &sent[3]).missed,
            1,
            "still remembered"
        );
    }

    #[test]
    fn a_link_with_too_many_destinations_starts_again_as_another_publisher() {
        let numbering = Numbering::default();
        let first = numbers(&numbered(&numbering, LOBBY, "", false)).unwrap();
        for i in 0..NUMBERED_DESTINATIONS {
            numbering.message_id(DIRECT, &format!("u{i}"), false);
        }
        let again = numbers(&numbered(&numbering, LOBBY, "", false)).unwrap();
        assert_ne!(again.0, first.0);
        assert_eq!(again.1, 1);
    }

    /// Bob's session parks having seen alice's 1..=6 in the lobby and
    /// acknowledged 1..=3; his queue then drops 4..=9 and the resumed session
    /// first gets 10.
    fn parked_and_resumed(last_id: Option<&str>) -> u64 {
        let alice = Numbering::default();
        let sent = lobby(&alice, 10);
        let mut before = Gaps::default();
        let mut unacked = Vec::new();
        for (i, properties) in sent.iter().enumerate().take(6) {
            let observed = before.observe(LOBBY, "", properties);
            if i >= 3 {
                unacked.push((observed.number.unwrap(), Some(format!("m{}", i + 1))));
            }
        }
        let note = ParkNote::from_bytes(&before.park(unacked).to_bytes()).unwrap();
        let mut after = Gaps::default();
        after.resume_from(note, last_id);
        after.forget(LOBBY);
        after.observe(LOBBY, "", &sent[9]).missed
    }

    #[test]
    fn a_resumed_session_counts_what_its_queue_dropped_while_parked() {
        assert_eq!(parked_and_resumed(None), 6, "4 to 9: the client has none");
        assert_eq!(parked_and_resumed(Some("m5")), 4, "it processed 4 and 5");
        assert_eq!(parked_and_resumed(Some("m6")), 3);
        assert_eq!(parked_and_resumed(Some("elsewhere")), 6);
        assert!(ParkNote::from_bytes(b"").is_none());
        assert!(ParkNote::from_bytes(&[NOTE_VERSION, 1, 0, 0, 0]).is_none());
    }

    #[test]
    fn leaving_a_room_drops_its_parked_numbers() {
        let alice = Numbering::default();
        let sent = lobby(&alice, 5);
        let mut before = Gaps::default();
        before.observe(LOBBY, "", &sent[0]);
        let mut after = Gaps::default();
        after.resume_from(before.park([]), None);
        after.left(LOBBY);
        assert_eq!(after.observe(LOBBY, "", &sent[4]).missed, 0);
    }

    #[test]
    fn gap_frames() {
        assert_eq!(
            gap_frame(Some("lobby"), 2).as_str(),
            r#"{"type":"gap","room":"lobby","missed":2}"#
        );
        assert_eq!(gap_frame(None, 1).as_str(), r#"{"type":"gap","missed":1}"#);
    }
}
