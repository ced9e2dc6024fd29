//! One receiver's exact accounting of what it got.
//!
//! Every client must receive all N×M messages. A bitmap per sender tells a
//! duplicate from a first delivery; the highest sequence seen per sender tells a
//! reordered one (it arrived after a later message of the same sender). Latency
//! goes into an HDR histogram per receiver; they are merged at the end, so the hot
//! path takes no lock.

use hdrhistogram::Histogram;

use crate::payload::Stamp;

/// Latencies up to an hour, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

pub struct Tally {
    messages: u32,
    /// Per sender, a bit per sequence number already received.
    seen: Vec<Vec<u64>>,
    /// Per sender, the highest sequence number received so far (+1; 0 = none).
    highest: Vec<u32>,
    pub unique: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Frames that were not bench messages of this run.
    pub foreign: u64,
    pub latency_us: Histogram<u64>,
    /// When the last new message arrived, on the [`crate::payload::now_us`] clock.
    pub last_us: u64,
}

impl Tally {
    pub fn new(senders: usize, messages: u32) -> Self {
        let words = (messages as usize).div_ceil(64);
        Self {
            messages,
            seen: vec![vec![0; words]; senders],
            highest: vec![0; senders],
            unique: 0,
            duplicated: 0,
            reordered: 0,
            foreign: 0,
            latency_us: new_histogram(),
            last_us: 0,
        }
    }

    pub fn expected(&self) -> u64 {
        self.seen.len() as u64 * u64::from(self.messages)
    }

    pub fn complete(&self) -> bool {
        self.unique >= self.expected()
    }

    pub fn record(&mut self, stamp: Stamp, now_us: u64) {
        if stamp.sender >= self.seen.len() || stamp.seq >= self.messages {
            self.foreign += 1;
            return;
        }
        let (word, bit) = (stamp.seq as usize / 64, stamp.seq % 64);
        let seen = &mut self.seen[stamp.sender][word];
        if *seen & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        *seen |= 1 << bit;
        self.unique += 1;
        self.last_us = now_us;
        let highest = &mut self.highest[stamp.sender];
        if stamp.seq + 1 < *highest {
            self.reordered += 1;
        } else {
            *highest = stamp.seq + 1;
        }
        let _ = self
            .latency_us
            .record(now_us.saturating_sub(stamp.sent_us).max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(sender: usize, seq: u32) -> Stamp {
        Stamp {
            sender,
            seq,
            sent_us: 0,
        }
    }

    #[test]
    fn counts_duplicates_and_reorders_exactly() {
        let mut tally = Tally::new(2, 3);
        for (sender, seq) in [(0, 0), (0, 2), (0, 1), (0, 1), (1, 0), (1, 1), (1, 2)] {
            tally.record(stamp(sender, seq), 10);
        }
        assert_eq!(tally.unique, 6);
        assert_eq!(tally.duplicated, 1);
        assert_eq!(tally.reordered, 1);
        assert!(tally.complete());
    }

    #[test]
    fn ignores_what_is_not_ours() {
        let mut tally = Tally::new(1, 1);
        tally.record(stamp(5, 0), 1);
        tally.record(stamp(0, 9), 1);
        assert_eq!((tally.unique, tally.foreign), (0, 2));
    }
}
