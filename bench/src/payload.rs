//! The message every target carries.
//!
//! The text is `"<sender>:<seq>:<sent_us>:<padding>"`: a receiver needs no other
//! field to count lost, duplicated and reordered messages and to measure latency,
//! and it works the same whether the server set `from` (Warren) or not (AMQP,
//! STOMP). Send times are microseconds since the bench started, on one monotonic
//! clock, because the same process sends and receives.
//!
//! The raw AMQP and STOMP targets carry the same JSON document Warren puts on the
//! broker, so the broker moves the same bytes and every receiver parses the same
//! thing: the comparison measures Warren, not a difference in payload.
//!
//! A receiver reads a delivery without a JSON parser when it can ([`parse`]):
//! every target's message document starts with `{"type":"message"` and has one
//! `"text":"` whose value is ours, so finding it costs a scan, where a full parse
//! would cost the bench more CPU per delivery than the broker under test spends.
//! Anything else goes through serde.

use std::sync::OnceLock;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Microseconds since the first call: the one clock senders and receivers share.
pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The `text` of message `seq` from `sender`, padded with 'x' to `size` bytes.
pub fn text(sender: usize, seq: u32, sent_us: u64, size: usize) -> String {
    let mut text = format!("{sender}:{seq}:{sent_us}:");
    if text.len() < size {
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    text
}

/// What a client sends Warren: `{"type":"message","text":..}`, without a `ref`,
/// because acks would add frames the baselines do not have.
pub fn warren_client_frame(text: &str) -> String {
    #[derive(Serialize)]
    struct Outgoing<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        text: &'a str,
    }
    serde_json::to_string(&Outgoing {
        kind: "message",
        text,
    })
    .expect("a struct of strings serializes")
}

/// `{"type":"ack_upto","seq":n}`: a Warren client's acknowledgement.
pub fn warren_ack_frame(seq: u64) -> String {
    format!(r#"{{"type":"ack_upto","seq":{seq}}}"#)
}

/// The `seq` Warren stamps on a delivery with `acks=client`. It is the frame's
/// last field, so it is looked for from the end.
pub fn delivery_seq(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""seq":"#;
    let at = frame.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The document Warren publishes to the broker for a message; the baselines
/// publish the same shape themselves.
pub fn broker_document(room: &str, sender: usize, seq: u32, text: &str) -> String {
    #[derive(Serialize)]
    struct Document<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: &'a str,
        room: &'a str,
        from: &'a str,
        text: &'a str,
        ts: u64,
    }
    let id = format!("bench-{sender:x}-{seq:x}");
    let from = format!("u{sender}");
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    serde_json::to_string(&Document {
        kind: "message",
        id: &id,
        room,
        from: &from,
        text,
        ts,
    })
    .expect("a struct of strings serializes")
}

/// One received bench message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sender: usize,
    pub seq: u32,
    pub sent_us: u64,
}

/// What a received document is.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Message(Stamp),
    /// Another frame (an `ack`, an `error`): not a delivery.
    Other,
    /// A `message` whose text is not ours.
    Malformed,
}

/// Read a server frame / broker document.
pub fn parse(document: &[u8]) -> Received {
    const HEAD: &[u8] = br#"{"type":"message""#;
    const TEXT: &[u8] = br#""text":""#;
    if document.starts_with(HEAD)
        && let Some(at) = document.windows(TEXT.len()).position(|w| w == TEXT)
        && let Some(stamp) = std::str::from_utf8(&document[at + TEXT.len()..])
            .ok()
            .and_then(parse_text)
    {
        return Received::Message(stamp);
    }
    parse_json(document)
}

fn parse_json(document: &[u8]) -> Received {
    #[derive(Deserialize)]
    struct Incoming<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(default)]
        text: Option<&'a str>,
    }
    let Ok(incoming) = serde_json::from_slice::<Incoming<'_>>(document) else {
        return Received::Malformed;
    };
    if incoming.kind != "message" {
        return Received::Other;
    }
    incoming
        .text
        .and_then(parse_text)
        .map_or(Received::Malformed, Received::Message)
}

fn parse_text(text: &str) -> Option<Stamp> {
    let mut parts = text.splitn(4, ':');
    Some(Stamp {
        sender: parts.next()?.parse().ok()?,
        seq: parts.next()?.parse().ok()?,
        sent_us: parts.next()?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_document_reads_back() {
        let text = text(7, 42, 123_456, 64);
        assert_eq!(text.len(), 64);
        let doc = broker_document("room", 7, 42, &text);
        assert_eq!(
            parse(doc.as_bytes()),
            Received::Message(Stamp {
                sender: 7,
                seq: 42,
                sent_us: 123_456
            })
        );
    }

    #[test]
    fn the_scan_reads_what_serde_reads() {
        let text = text(3, 9, 77, 64);
        let doc = broker_document("room", 3, 9, &text);
        assert_eq!(parse(doc.as_bytes()), parse_json(doc.as_bytes()));
        // A text that is not ours falls through to serde, which says so.
        let doc = broker_document("room", 3, 9, "hello");
        assert_eq!(parse(doc.as_bytes()), Received::Malformed);
    }

    #[test]
    fn a_warren_seq_reads_back() {
        let frame = br#"{"type":"message","id":"a","text":"1:2:3:","seq":42}"#;
        assert_eq!(delivery_seq(frame), Some(42));
        assert_eq!(delivery_seq(br#"{"type":"message"}"#), None);
        assert_eq!(warren_ack_frame(42), r#"{"type":"ack_upto","seq":42}"#);
    }

    #[test]
    fn acks_are_not_deliveries() {
        assert_eq!(
            parse(br#"{"type":"ack","ref":"a","id":"b"}"#),
            Received::Other
        );
        assert_eq!(
            parse(br#"{"type":"message","text":"hello"}"#),
            Received::Malformed
        );
    }
}
