//! Client acknowledgements (`acks=client`): each delivery gets the next
//! per-connection `seq`, and stays the bus's responsibility until the client
//! sends `ack_upto` with that seq or a later one. Shared by both buses: what
//! each keeps per unacknowledged delivery (`T`) is its own (RabbitMQ's delivery tag,
//! the embedded bus's frame to deliver again). A direct message to this
//! connection's user that asked for a receipt yields a [`Receipt`] when it is
//! acknowledged.

use std::collections::VecDeque;

use thiserror::Error;
use tungstenite::Utf8Bytes;

use crate::names::UserId;
use crate::protocol::{frame_head, with_seq};

/// Deliveries a connection may hold unacknowledged: past this the bus sends
/// it nothing more until it acknowledges (RabbitMQ's prefetch, and the
/// embedded bus's equivalent).
pub const ACK_WINDOW: u16 = 256;

/// An `ack_upto` that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AckError {
    #[error("seq {asked} was never sent on this connection (the last was {last})")]
    BeyondSent { asked: u64, last: u64 },
    #[error("this connection acknowledges nothing: open it with acks=client")]
    NotAcking,
}

/// A direct message acknowledged by its recipient, whose sender asked to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message.
    pub id: String,
    /// Its sender, who is told.
    pub from: UserId,
}

/// What an `ack_upto` settled.
pub struct Settled<T> {
    /// What was kept for each delivery, oldest first.
    pub kept: Vec<T>,
    pub receipts: Vec<Receipt>,
}

/// The unacknowledged deliveries of one connection, oldest first.
pub struct ClientAcks<T> {
    /// Whose connection: a receipt is only for a direct message to them.
    user: UserId,
    /// The seq of the last delivery stamped; the first is 1.
    last: u64,
    pending: VecDeque<(u64, T, Option<Receipt>)>,
}

impl<T> ClientAcks<T> {
    pub fn new(user: &UserId) -> Self {
        Self {
            user: user.clone(),
            last: 0,
            pending: VecDeque::new(),
        }
    }

    /// `frame` with the next seq, remembering `kept` until it is acknowledged.
    pub fn stamp(&mut self, frame: &str, kept: T) -> Utf8Bytes {
        self.last += 1;
        let receipt = self.receipt_for(frame);
        self.pending.push_back((self.last, kept, receipt));
        Utf8Bytes::from(with_seq(frame, self.last))
    }

    /// As [`Self::stamp`], for a frame that `kept` itself holds: stamped
    /// without copying it first.
    pub fn stamp_with(
        &mut self,
        kept: T,
        frame_of: impl for<'b> FnOnce(&'b T) -> &'b str,
    ) -> Utf8Bytes {
        self.last += 1;
        let frame = frame_of(&kept);
        let receipt = self.receipt_for(frame);
        let stamped = Utf8Bytes::from(with_seq(frame, self.last));
        self.pending.push_back((self.last, kept, receipt));
        stamped
    }

    /// The receipt `frame` asks for, if it is a direct message to this user
    /// asking for one (a sender's copy on its other connections is not).
    fn receipt_for(&self, frame: &str) -> Option<Receipt> {
        #[derive(serde::Deserialize)]
        struct Asked {
            id: String,
            from: String,
            to: String,
            #[serde(default)]
            receipt: bool,
        }
        if !matches!(frame_head(frame), Some(("direct", Some(_)))) {
            return None;
        }
        let asked: Asked = serde_json::from_str(frame).ok()?;
        if !asked.receipt || asked.to != self.user.as_str() {
            return None;
        }
        Some(Receipt {
            id: asked.id,
            from: UserId::parse(&asked.from).ok()?,
        })
    }

    /// The seq of the last delivery stamped (0 before the first).
    pub fn last_stamped(&self) -> u64 {
        self.last
    }

    /// Whether the connection holds [`ACK_WINDOW`] unacknowledged deliveries.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= usize::from(ACK_WINDOW)
    }

    /// Settle every delivery up to `seq`: what was kept for them, oldest first.
    /// Acknowledging a seq already acknowledged settles nothing.
    pub fn ack_upto(&mut self, seq: u64) -> Result<Settled<T>, AckError> {
        if seq > self.last {
            return Err(AckError::BeyondSent {
                asked: seq,
                last: self.last,
            });
        }
        let mut settled = Settled {
            kept: Vec::new(),
            receipts: Vec::new(),
        };
        while self.pending.front().is_some_and(|(s, _, _)| *s <= seq) {
            if let Some((_, kept, receipt)) = self.pending.pop_front() {
                settled.kept.push(kept);
                settled.receipts.extend(receipt);
            }
        }
        Ok(settled)
    }

    /// What is still unacknowledged, oldest first.
    pub fn into_unacked(self) -> impl Iterator<Item = T> {
        self.pending.into_iter().map(|(_, kept, _)| kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_run_from_one_and_acks_are_cumulative() {
        let mut acks = ClientAcks::new(&UserId::parse("bob").unwrap());
        let kept = |acks: &mut ClientAcks<char>, seq| acks.ack_upto(seq).map(|s| s.kept);
        let first = acks.stamp(r#"{"type":"message","id":"a"}"#, 'a');
        assert_eq!(first.as_str(), r#"{"type":"message","id":"a","seq":1}"#);
        acks.stamp(r#"{"type":"message","id":"b"}"#, 'b');
        acks.stamp(r#"{"type":"message","id":"c"}"#, 'c');
        assert_eq!(kept(&mut acks, 2), Ok(vec!['a', 'b']));
        assert_eq!(
            kept(&mut acks, 2),
            Ok(vec![]),
            "acking again settles nothing"
        );
        assert_eq!(kept(&mut acks, 1), Ok(vec![]), "nor does an older seq");
        assert_eq!(
            kept(&mut acks, 4),
            Err(AckError::BeyondSent { asked: 4, last: 3 })
        );
        assert!(!acks.is_full());
        assert_eq!(acks.into_unacked().collect::<Vec<_>>(), vec!['c']);
    }

    #[test]
    fn an_acknowledged_direct_message_asking_for_it_yields_a_receipt() {
        let mut acks = ClientAcks::new(&UserId::parse("bob").unwrap());
        let direct = |id: &str, to: &str, receipt: bool| {
            format!(
                r#"{{"type":"direct","id":"{id}","from":"alice","to":"{to}","text":"t","ts":1{}}}"#,
                if receipt { r#","receipt":true"# } else { "" }
            )
        };
        acks.stamp(&direct("d1", "bob", true), ());
        acks.stamp(&direct("d2", "bob", false), ());
        // Alice's copy of her own message to carol, on her other connection.
        acks.stamp(&direct("d3", "carol", true), ());
        let receipts = acks.ack_upto(3).unwrap().receipts;
        assert_eq!(
            receipts,
            vec![Receipt {
                id: "d1".into(),
                from: UserId::parse("alice").unwrap()
            }]
        );
    }
}
