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
//! - Every publish of a session's link carries two AMQP headers (never in the
//!   JSON the client sees): [`PUBLISHER_HEADER`], the link's random id, and
//!   [`SEQ_HEADER`], a number that rises by one per destination. A link is one
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
//! HTTP publishes carry no numbers: each opens a channel of its own, so each
//! would be a publisher of one message per destination, whose number is always
//! 1 and can never show a gap.
//!
//! What this cannot see, so `missed` is a lower bound: drops of a publisher's
//! messages before the first of its messages this inbox saw in that room (they
//! cannot be told from messages published before the session subscribed),
//! drops of HTTP publishes, and, after a resume, drops before the first
//! delivery of each publisher on the new connection (its inbox starts afresh).
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
use lapin::types::{AMQPValue, FieldTable};
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
    /// The headers of the next message to `exchange` with `routing_key`
    /// (`copy`: a sender's copy for its other connections).
    pub fn headers(&self, exchange: &str, routing_key: &str, copy: bool) -> FieldTable {
        let (id, seq) = self.next(destination(exchange, routing_key, copy));
        let mut headers = FieldTable::default();
        headers.insert(PUBLISHER_HEADER.into(), AMQPValue::LongLongInt(id));
        headers.insert(SEQ_HEADER.into(), AMQPValue::LongLongInt(seq));
        headers
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

/// One inbox's last number seen per (publisher, destination), and the drops
/// found that the metrics have not counted yet.
#[derive(Default)]
pub struct Gaps {
    newer: HashMap<(i64, u64), i64>,
    older: HashMap<(i64, u64), i64>,
    uncounted: u64,
}

impl Gaps {
    /// How many messages of the same publisher and destination were dropped
    /// just before this delivery (0 for a message without numbers).
    pub fn observe(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
    ) -> u64 {
        let Some((publisher, seq)) = numbers(properties) else {
            return 0;
        };
        let copy = properties.correlation_id().is_some();
        let key = (publisher, destination(exchange, routing_key, copy));
        let last = match self.newer.get_mut(&key) {
            Some(last) => std::mem::replace(last, (*last).max(seq)),
            None => {
                let last = self.older.remove(&key);
                self.remember(key, last.map_or(seq, |l| l.max(seq)));
                match last {
                    Some(last) => last,
                    // The first heard from this publisher here: no baseline.
                    None => return 0,
                }
            }
        };
        let missed = u64::try_from(seq.saturating_sub(last).saturating_sub(1)).unwrap_or(0);
        self.uncounted += missed;
        missed
    }

    fn remember(&mut self, key: (i64, u64), seq: i64) {
        if self.newer.len() >= REMEMBERED / 2 {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(key, seq);
    }

    /// Forget every publisher's count for `exchange`: the session subscribes
    /// to it (again), and what was published while it was not bound is not
    /// missed.
    pub fn forget(&mut self, exchange: &str) {
        let room = destination(exchange, "", false);
        self.newer.retain(|(_, d), _| *d != room);
        self.older.retain(|(_, d), _| *d != room);
    }

    /// Drops found since the last call, for the metrics.
    pub fn take_uncounted(&mut self) -> u64 {
        std::mem::take(&mut self.uncounted)
    }
}

/// The publisher id and number a delivery carries, if any.
fn numbers(properties: &BasicProperties) -> Option<(i64, i64)> {
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
            BasicProperties::default().with_headers(numbering.headers(exchange, key, copy));
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
    fn a_jump_is_what_was_dropped_and_a_repeat_is_none() {
        let numbering = Numbering::default();
        let sent = lobby(&numbering, 10);
        let mut gaps = Gaps::default();
        let mut seen = |i: usize| gaps.observe(LOBBY, "", &sent[i]);
        assert_eq!(seen(0), 0);
        assert_eq!(seen(1), 0);
        assert_eq!(seen(5), 3, "2, 3 and 4 were dropped");
        assert_eq!(seen(3), 0, "a redelivery is no gap");
        assert_eq!(seen(6), 0, "nor does it lower what was seen");
        assert_eq!(seen(9), 2);
        assert_eq!(gaps.take_uncounted(), 5);
        assert_eq!(gaps.take_uncounted(), 0);
    }

    #[test]
    fn publishers_and_destinations_are_counted_apart() {
        let (alice, bob) = (Numbering::default(), Numbering::default());
        let mut gaps = Gaps::default();
        let mut observe = |p: BasicProperties, exchange, key| gaps.observe(exchange, key, &p);
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
        assert_eq!(gaps.observe(DIRECT, "alice", &to_self), 0);
        let to_self = numbered(&alice, DIRECT, "alice", false);
        assert_eq!(gaps.observe(DIRECT, "alice", &to_self), 0);
    }

    #[test]
    fn unnumbered_messages_and_first_sightings_are_no_gap() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.observe(LOBBY, "", &BasicProperties::default()), 0);
        let sent = lobby(&Numbering::default(), 5);
        assert_eq!(
            gaps.observe(LOBBY, "", &sent[4]),
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
        assert_eq!(gaps.observe(LOBBY, "", &sent[4]), 0);
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
        assert_eq!(gaps.observe(LOBBY, "", &sent[3]), 1, "still remembered");
    }

    #[test]
    fn a_link_with_too_many_destinations_starts_again_as_another_publisher() {
        let numbering = Numbering::default();
        let first = numbers(&numbered(&numbering, LOBBY, "", false)).unwrap();
        for i in 0..NUMBERED_DESTINATIONS {
            numbering.headers(DIRECT, &format!("u{i}"), false);
        }
        let again = numbers(&numbered(&numbering, LOBBY, "", false)).unwrap();
        assert_ne!(again.0, first.0);
        assert_eq!(again.1, 1);
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
