//! RabbitMQ's own count of the messages it took in and the deliveries it made,
//! read around a run with `rabbitmqctl eval` (the broker's global counters,
//! kept by RabbitMQ itself since 3.9, no plugin needed). Their ratio shows what
//! a mode costs the broker: one delivery per member per message in the card's
//! mode, one per node in per-node fanout. Deliveries out of streams (Warren's
//! history stream, which every node reads) are counted apart from deliveries
//! out of queues.
//!
//! The counters are broker-wide, so anything else publishing meanwhile counts
//! too; the bench reads them with the clients connected and idle, before the
//! first send and after the last receive.

use std::process::Command;

use serde::{Deserialize, Serialize};

/// Totals since the broker started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerCounters {
    /// Messages publishers sent to the broker.
    pub received: u64,
    /// Messages the broker handed to consumers (or `basic.get`) out of queues.
    pub delivered: u64,
    /// Messages the broker handed to consumers out of streams.
    #[serde(default)]
    pub delivered_from_streams: u64,
}

impl std::ops::Sub for BrokerCounters {
    type Output = BrokerCounters;
    fn sub(self, before: BrokerCounters) -> BrokerCounters {
        BrokerCounters {
            received: self.received.saturating_sub(before.received),
            delivered: self.delivered.saturating_sub(before.delivered),
            delivered_from_streams: self
                .delivered_from_streams
                .saturating_sub(before.delivered_from_streams),
        }
    }
}

/// Sums each counter over every protocol, and deliveries over queue types
/// other than streams and over streams.
const EXPRESSION: &str = "O = rabbit_global_counters:overview(), \
     S = fun(K, P) -> lists:sum([maps:get(K, V, 0) || {L, V} <- maps:to_list(O), P(L)]) end, \
     Stream = fun(L) -> lists:member({queue_type, rabbit_stream_queue}, L) end, \
     {S(messages_received_total, fun(_) -> true end), \
      S(messages_delivered_total, fun(L) -> not Stream(L) end), \
      S(messages_delivered_total, Stream)}.";

/// The broker's counters now, from the local node; `None` when `rabbitmqctl`
/// is missing or cannot reach it (the run is still measured, without them).
pub fn read() -> Option<BrokerCounters> {
    let output = Command::new("rabbitmqctl")
        .args(["eval", EXPRESSION])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

/// `{Received,Delivered,FromStreams}` as `rabbitmqctl eval` prints the tuple.
fn parse(printed: &str) -> Option<BrokerCounters> {
    let inner = printed.trim().strip_prefix('{')?.strip_suffix('}')?;
    let numbers: Vec<u64> = inner
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()
        .ok()?;
    let [received, delivered, delivered_from_streams] = numbers[..] else {
        return None;
    };
    Some(BrokerCounters {
        received,
        delivered,
        delivered_from_streams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_printed_tuple() {
        assert_eq!(
            parse("{10200,1020150,20000}\n"),
            Some(BrokerCounters {
                received: 10200,
                delivered: 1020150,
                delivered_from_streams: 20000,
            })
        );
        assert_eq!(parse("Error: unable to perform an operation"), None);
        assert_eq!(parse("{1,x,2}"), None);
        assert_eq!(parse("{1,2}"), None);
    }

    #[test]
    fn a_difference_never_goes_below_zero() {
        let before = BrokerCounters {
            received: 5,
            delivered: 9,
            delivered_from_streams: 1,
        };
        let after = BrokerCounters {
            received: 7,
            delivered: 3,
            delivered_from_streams: 4,
        };
        assert_eq!(
            after - before,
            BrokerCounters {
                received: 2,
                delivered: 0,
                delivered_from_streams: 3,
            }
        );
    }
}
