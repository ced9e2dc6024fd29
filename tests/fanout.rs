//! Per-node room fanout (`--room-fanout per-node`), as the broker sees it and
//! as a client that resumes sees it: each node binds one feed queue to a room
//! its sessions are in, so the broker delivers a room message once per node;
//! the feed is unbound when the node's last member leaves; connection queues
//! carry only direct messages; and a resumed session is told to ask history
//! for its rooms, which has what it missed. Everything else about chat runs in
//! both modes in the other test files (`on_both_buses!`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::resume::*;
use common::*;
use serde_json::{Value, json};
use warren::config::Config;

fn per_node(prefix: &str, node: &str) -> Config {
    let mut c = config(BusKind::AmqpPerNode, prefix);
    c.node_id = Some(node.into());
    c
}

/// [`broker_list`], split at tabs.
fn broker_rows(args: &[&str], prefix: &str) -> Vec<Vec<String>> {
    broker_list(args, prefix)
        .iter()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// The queues bound to `exchange`.
fn bound_to(exchange: &str, prefix: &str) -> BTreeSet<String> {
    broker_rows(
        &["list_bindings", "source_name", "destination_name"],
        prefix,
    )
    .into_iter()
    .filter(|row| row.len() >= 2 && row[0] == exchange)
    .map(|row| row[1].clone())
    .collect()
}

/// Three members on node a and two on node b each send 20 messages: all five
/// get all 100, each sender's in order; the room's exchange has one queue
/// bound per node (its feed), and no connection queue; once everyone left,
/// the feeds are unbound and the room's exchange is gone.
#[tokio::test]
async fn each_node_binds_one_feed_per_room_and_every_member_gets_everything() {
    let prefix = unique_prefix("fanout");
    let (a, b) = (
        start(per_node(&prefix, "a")).await,
        start(per_node(&prefix, "b")).await,
    );
    let mut members = Vec::new();
    for (i, node) in [&a, &a, &a, &b, &b].into_iter().enumerate() {
        members.push(connect(node.local_addr(), "big", &format!("u{i}")).await);
    }
    let exchange = format!("{prefix}.room.big");
    let feeds = bound_to(&exchange, &prefix);
    assert_eq!(feeds.len(), 2, "one feed per node: {feeds:?}");
    for node in ["a", "b"] {
        let feed = format!("{prefix}.fanout.{node}.");
        assert!(feeds.iter().any(|q| q.starts_with(&feed)), "{feeds:?}");
    }
    // Connection queues are bound to the direct exchange only.
    for row in broker_rows(
        &["list_bindings", "source_name", "destination_name"],
        &prefix,
    ) {
        if row.len() >= 2 && row[1].contains(".conn.") && !row[0].is_empty() {
            assert_eq!(row[0], format!("{prefix}.direct"), "{row:?}");
        }
    }

    const EACH: usize = 20;
    for (i, member) in members.iter_mut().enumerate() {
        for n in 0..EACH {
            send_json(
                &mut member.socket,
                json!({"type":"message","text":format!("u{i}:{n}")}),
            )
            .await;
        }
    }
    for member in &mut members {
        let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for _ in 0..EACH * 5 {
            let m = next_matching(&mut member.socket, |f| f["type"] == "message").await;
            let (from, n) = m["text"].as_str().unwrap().split_once(':').unwrap();
            seen.entry(from.to_owned())
                .or_default()
                .push(n.parse().unwrap());
        }
        assert_eq!(seen.len(), 5, "{seen:?}");
        for numbers in seen.values() {
            assert_eq!(*numbers, (0..EACH).collect::<Vec<_>>());
        }
        assert_silent(&mut member.socket, Duration::from_millis(100)).await;
    }

    // One leaves on each node: the feeds stay bound for the others.
    let gone = members.remove(4);
    drop(gone);
    unsubscribe_and_wait(&mut members[0], "big").await;
    assert_eq!(bound_to(&exchange, &prefix).len(), 2);
    // The rest leave: nothing is bound any more, and the exchange goes.
    members.clear();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while exchange_exists(&exchange).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still bound: {:?}",
            bound_to(&exchange, &prefix)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    for node in ["a", "b"] {
        let leftover: Vec<Vec<String>> = broker_rows(&["list_queues", "name"], &prefix)
            .into_iter()
            .filter(|row| row[0].starts_with(&format!("{prefix}.fanout.{node}.")))
            .collect();
        assert!(leftover.is_empty(), "{leftover:?}");
    }
}

async fn unsubscribe_and_wait(client: &mut Client, room: &str) {
    send_json(
        &mut client.socket,
        json!({"type":"unsubscribe","room":room,"ref":"u"}),
    )
    .await;
    next_matching(&mut client.socket, |f| f["type"] == "unsubscribed").await;
}

/// Alice's connection on node a drops while bob sends; she resumes on node b:
/// `resumed` says `recovered:false` (her queue kept her direct messages, not
/// the room's), and the room's history since the last message she processed
/// holds exactly what she missed; a direct message sent meanwhile is still
/// delivered from her queue.
#[tokio::test]
async fn a_resume_is_told_to_ask_history_which_has_what_was_missed() {
    let prefix = unique_prefix("fanoutresume");
    let _stream = HistoryStream::of(BusKind::AmqpPerNode, &prefix);
    let with_resume = |node: &str| {
        let mut c = per_node(&prefix, node);
        c.resume_grace_secs = 30;
        c.history_per_room = 100;
        c
    };
    let (a, b) = (start(with_resume("a")).await, start(with_resume("b")).await);
    let mut bob = connect(a.local_addr(), "talk", "bob").await;
    let mut alice = connect_with(a.local_addr(), "room=talk&user=alice&acks=client").await;
    let session = alice.welcome["session"].as_str().unwrap().to_owned();

    send_numbered_acked(&mut bob, 0, 5).await;
    let (seen, last_id) = read_messages(&mut alice, 5).await;
    assert_eq!(seen.len(), 5);
    drop_abruptly(alice);
    send_numbered_acked(&mut bob, 5, 5).await;
    send_json(
        &mut bob.socket,
        json!({"type":"direct","to":"alice","text":"psst","ref":"d"}),
    )
    .await;
    next_matching(&mut bob.socket, |f| f["type"] == "ack").await;

    let mut alice = connect_with(
        b.local_addr(),
        &resume_query("alice", &session, "talk", Some(&last_id)),
    )
    .await;
    let (_, resumed) = until_resumed(&mut alice).await;
    assert_eq!(resumed["session"], session.as_str());
    assert_eq!(resumed["recovered"], false);
    assert_eq!(resumed["rooms"], json!(["talk"]));
    let dm = next_matching(&mut alice.socket, |f| f["type"] == "direct").await;
    assert_eq!(dm["text"], "psst");

    send_json(
        &mut alice.socket,
        json!({"type":"subscribe","room":"talk","since":last_id,"ref":"h"}),
    )
    .await;
    let history = next_matching(&mut alice.socket, |f| f["type"] == "history").await;
    let missed: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m: &Value| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(missed, ["n5", "n6", "n7", "n8", "n9"]);
    // Live traffic after it.
    send_numbered_acked(&mut bob, 10, 1).await;
    let live = next_matching(&mut alice.socket, |f| f["type"] == "message").await;
    assert_eq!(live["text"], "n10");
    a.shutdown().await;
    b.shutdown().await;
}

/// `count` messages `n{from}`… from `sender` to its room, each acked.
async fn send_numbered_acked(sender: &mut Client, from: usize, count: usize) {
    for i in from..from + count {
        send_json(
            &mut sender.socket,
            json!({"type":"message","text":format!("n{i}"),"ref":format!("r{i}")}),
        )
        .await;
        next_matching(&mut sender.socket, |f| f["type"] == "ack").await;
    }
}

/// A burst far past one dispatch round (512) reaches every member whole and
/// in order (a round once lost the delivery after its last).
#[tokio::test]
async fn a_long_burst_reaches_every_member_whole() {
    let prefix = unique_prefix("fanoutburst");
    let server = start(per_node(&prefix, "a")).await;
    let mut bob = connect(server.local_addr(), "burst", "bob").await;
    let mut carol = connect(server.local_addr(), "burst", "carol").await;
    const TOTAL: usize = 3000;
    for n in 0..TOTAL {
        send_json(
            &mut bob.socket,
            json!({"type":"message","text":format!("{n}")}),
        )
        .await;
    }
    for member in [&mut bob, &mut carol] {
        for n in 0..TOTAL {
            let m = next_matching(&mut member.socket, |f| f["type"] == "message").await;
            assert_eq!(m["text"], format!("{n}"));
        }
    }
    server.shutdown().await;
}
