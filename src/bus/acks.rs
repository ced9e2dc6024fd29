//! Client acknowledgements (`acks=client`): each delivery gets the next
//! per-connection `seq`, and stays the bus's responsibility until the client
//! sends `ack_upto` with that seq or a later one. Shared by both buses: what
//! each keeps per unacknowledged delivery (`T`) is its own (RabbitMQ's acker,
//! the embedded bus's frame to deliver again).

use std::collections::VecDeque;

use thiserror::Error;
use tungstenite::Utf8Bytes;

use crate::protocol::with_seq;

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

/// The unacknowledged deliveries of one connection, oldest first.
pub struct ClientAcks<T> {
    /// The seq of the last delivery stamped; the first is 1.
    last: u64,
    pending: VecDeque<(u64, T)>,
}

impl<T> Default for ClientAcks<T> {
    fn default() -> Self {
        Self {
            last: 0,
            pending: VecDeque::new(),
        }
    }
}

impl<T> ClientAcks<T> {
    /// `frame` with the next seq, remembering `kept` until it is acknowledged.
    pub fn stamp(&mut self, frame: &str, kept: T) -> Utf8Bytes {
        self.last += 1;
        self.pending.push_back((self.last, kept));
        Utf8Bytes::from(with_seq(frame, self.last))
    }

    /// Whether the connection holds [`ACK_WINDOW`] unacknowledged deliveries.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= usize::from(ACK_WINDOW)
    }

    /// Settle every delivery up to `seq`: what was kept for them, oldest first.
    /// Acknowledging a seq already acknowledged settles nothing.
    pub fn ack_upto(&mut self, seq: u64) -> Result<Vec<T>, AckError> {
        if seq > self.last {
            return Err(AckError::BeyondSent {
                asked: seq,
                last: self.last,
            });
        }
        let mut settled = Vec::new();
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            settled.extend(self.pending.pop_front().map(|(_, kept)| kept));
        }
        Ok(settled)
    }

    /// What is still unacknowledged, oldest first.
    pub fn into_unacked(self) -> impl Iterator<Item = T> {
        self.pending.into_iter().map(|(_, kept)| kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_run_from_one_and_acks_are_cumulative() {
        let mut acks = ClientAcks::default();
        let first = acks.stamp(r#"{"type":"message","id":"a"}"#, 'a');
        assert_eq!(first.as_str(), r#"{"type":"message","id":"a","seq":1}"#);
        acks.stamp(r#"{"type":"message","id":"b"}"#, 'b');
        acks.stamp(r#"{"type":"message","id":"c"}"#, 'c');
        assert_eq!(acks.ack_upto(2), Ok(vec!['a', 'b']));
        assert_eq!(acks.ack_upto(2), Ok(vec![]), "acking again settles nothing");
        assert_eq!(acks.ack_upto(1), Ok(vec![]), "nor does an older seq");
        assert_eq!(
            acks.ack_upto(4),
            Err(AckError::BeyondSent { asked: 4, last: 3 })
        );
        assert!(!acks.is_full());
        assert_eq!(acks.into_unacked().collect::<Vec<_>>(), vec!['c']);
    }
}
