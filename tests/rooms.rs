//! Protocol v2: one connection in many rooms, one user with many connections.
//! Each rule of docs/PROTOCOL.md's v2 frames, on both buses, and across two
//! nodes on RabbitMQ. Orderings are asserted with barriers (a later frame that
//! must come after the one that must not), never with sleeps.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

on_both_buses!(
    a_connection_subscribes_to_several_rooms_and_unsubscribes,
    a_message_names_its_room_unless_there_is_only_one,
    the_room_limit_per_connection_is_enforced,
    a_direct_message_reaches_every_connection_of_both_users_but_the_sending_one,
    two_tabs_in_a_room_are_one_member_and_closing_one_does_not_leave,
);

/// Frames up to and including the first that matches `until`, presence
/// frames included.
async fn frames_until(client: &mut Client, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let frame = next_frame(&mut client.socket).await;
        let done = until(&frame);
        seen.push(frame);
        if done {
            return seen;
        }
    }
}

async fn a_connection_subscribes_to_several_rooms_and_unsubscribes(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("v2subs"))).await;
    let addr = server.local_addr();
    let mut alice = connect_user(addr, "alice").await;
    assert_eq!(alice.welcome["rooms"], json!([]));
    assert_eq!(alice.welcome["session"].as_str().unwrap().len(), 32);
    let mut bob = connect(addr, "one", "bob").await;
    assert_eq!(bob.welcome["rooms"], json!(["one"]));

    let one = subscribe(&mut alice, "one").await;
    assert_eq!(
        names(&one["members"]),
        BTreeSet::from(["alice".into(), "bob".into()])
    );
    assert_eq!(one["members_total"], 2);
    subscribe(&mut alice, "two").await;
    // Subscribing twice changes nothing and answers the same way.
    let again = subscribe(&mut alice, "one").await;
    assert_eq!(again["room"], "one");

    // Bob's message in "one" reaches alice after her `subscribed`.
    send_json(
        &mut bob.socket,
        json!({"type":"message","text":"to one","ref":"b1"}),
    )
    .await;
    let got = next_matching(&mut alice.socket, |f| f["type"] == "message").await;
    assert_eq!(
        (got["room"].as_str(), got["text"].as_str()),
        (Some("one"), Some("to one"))
    );

    send_json(
        &mut alice.socket,
        json!({"type":"unsubscribe","room":"one","ref":"u1"}),
    )
    .await;
    let answer = next_matching(&mut alice.socket, |f| f["ref"] == "u1").await;
    assert_eq!(
        answer,
        json!({"type":"unsubscribed","room":"one","ref":"u1"})
    );
    // After `unsubscribed`, nothing of "one" reaches alice. Barrier: bob's
    // next message goes to "one", then a direct message to alice, both from
    // his one connection, so the room message would come first.
    send_json(
        &mut bob.socket,
        json!({"type":"message","text":"after unsubscribe"}),
    )
    .await;
    send_json(
        &mut bob.socket,
        json!({"type":"direct","to":"alice","text":"barrier"}),
    )
    .await;
    let seen = frames_until(&mut alice, |f| f["text"] == "barrier").await;
    assert!(
        !seen.iter().any(|f| f["text"] == "after unsubscribe"),
        "a message of an unsubscribed room arrived: {seen:?}"
    );
    // Unsubscribing from a room she is not in is refused, with the ref.
    send_json(
        &mut alice.socket,
        json!({"type":"unsubscribe","room":"one","ref":"u2"}),
    )
    .await;
    let refused = next_matching(&mut alice.socket, |f| f["ref"] == "u2").await;
    assert_eq!(refused["code"], "not_subscribed");
    server.shutdown().await;
}

async fn a_message_names_its_room_unless_there_is_only_one(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("v2target"))).await;
    let addr = server.local_addr();
    let mut alice = connect_user(addr, "alice").await;
    let no_room = json!({"type":"message","text":"where?","ref":"m0"});
    send_json(&mut alice.socket, no_room.clone()).await;
    let answer = next_matching(&mut alice.socket, |f| f["ref"] == "m0").await;
    assert_eq!(answer["code"], "not_subscribed", "{answer}");

    subscribe(&mut alice, "a").await;
    // One subscription: `room` may be left out.
    send_json(
        &mut alice.socket,
        json!({"type":"message","text":"implied","ref":"m1"}),
    )
    .await;
    let echo = next_matching(&mut alice.socket, |f| f["type"] == "message").await;
    assert_eq!(
        (echo["room"].as_str(), echo["text"].as_str()),
        (Some("a"), Some("implied"))
    );

    subscribe(&mut alice, "b").await;
    send_json(
        &mut alice.socket,
        json!({"type":"message","text":"which?","ref":"m2"}),
    )
    .await;
    let answer = next_matching(&mut alice.socket, |f| {
        f["ref"] == "m2" && f["type"] != "ack"
    })
    .await;
    assert_eq!(answer["code"], "invalid_room", "{answer}");
    send_json(
        &mut alice.socket,
        json!({"type":"message","room":"c","text":"not mine","ref":"m3"}),
    )
    .await;
    let answer = next_matching(&mut alice.socket, |f| {
        f["ref"] == "m3" && f["type"] != "ack"
    })
    .await;
    assert_eq!(answer["code"], "not_subscribed", "{answer}");
    send_json(
        &mut alice.socket,
        json!({"type":"message","room":"b","text":"named","ref":"m4"}),
    )
    .await;
    let echo = next_matching(&mut alice.socket, |f| f["text"] == "named").await;
    assert_eq!(echo["room"], "b");
    server.shutdown().await;
}

async fn the_room_limit_per_connection_is_enforced(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("v2limit"));
    cfg.max_rooms_per_connection = 2;
    let server = start(cfg).await;
    let mut alice = connect(server.local_addr(), "first", "alice").await;
    subscribe(&mut alice, "second").await;
    send_json(
        &mut alice.socket,
        json!({"type":"subscribe","room":"third","ref":"t"}),
    )
    .await;
    let answer = next_matching(&mut alice.socket, |f| f["ref"] == "t").await;
    assert_eq!(answer["code"], "too_many_rooms", "{answer}");
    // A room already held still answers `subscribed`; leaving one frees a place.
    subscribe(&mut alice, "second").await;
    send_json(
        &mut alice.socket,
        json!({"type":"unsubscribe","room":"first","ref":"u"}),
    )
    .await;
    next_matching(&mut alice.socket, |f| f["ref"] == "u").await;
    subscribe(&mut alice, "third").await;
    server.shutdown().await;
}

async fn a_direct_message_reaches_every_connection_of_both_users_but_the_sending_one(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("v2dm"))).await;
    let addr = server.local_addr();
    let mut alice1 = connect(addr, "dm", "alice").await;
    let mut alice2 = connect_user(addr, "alice").await;
    let mut bob1 = connect_user(addr, "bob").await;
    let mut bob2 = connect_user(addr, "bob").await;

    send_json(
        &mut alice1.socket,
        json!({"type":"direct","to":"bob","text":"psst","ref":"d1"}),
    )
    .await;
    for (who, client) in [
        ("bob1", &mut bob1),
        ("bob2", &mut bob2),
        ("alice2", &mut alice2),
    ] {
        let dm = next_matching(&mut client.socket, |f| f["type"] == "direct").await;
        assert_eq!(
            (dm["from"].as_str(), dm["to"].as_str(), dm["text"].as_str()),
            (Some("alice"), Some("bob"), Some("psst")),
            "{who}"
        );
    }
    // The sending connection gets the ack, not a copy. Barrier: its next
    // publish, a room message, comes back after anything the DM sent it.
    send_json(
        &mut alice1.socket,
        json!({"type":"message","text":"barrier"}),
    )
    .await;
    let seen = frames_until(&mut alice1, |f| f["text"] == "barrier").await;
    assert!(
        seen.iter().any(|f| f["type"] == "ack" && f["ref"] == "d1"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|f| f["type"] == "direct"),
        "the sender's own connection got its DM back: {seen:?}"
    );

    // `user_not_found` only once the user has no connection anywhere.
    drop(bob1);
    send_json(
        &mut alice1.socket,
        json!({"type":"direct","to":"bob","text":"still one","ref":"d2"}),
    )
    .await;
    let answer = next_matching(&mut alice1.socket, |f| f["ref"] == "d2").await;
    assert_eq!(answer["type"], "ack", "{answer}");
    assert_eq!(
        next_matching(&mut bob2.socket, |f| f["type"] == "direct").await["text"],
        "still one"
    );
    bob2.socket.close(None).await.unwrap();
    drop(bob2);
    // Wait until both of bob's sessions are gone from this node.
    let bob = warren::names::UserId::parse("bob").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.node().claims.is_claimed(&bob) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob's sessions never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    send_json(
        &mut alice1.socket,
        json!({"type":"direct","to":"bob","text":"gone","ref":"d3"}),
    )
    .await;
    let answer = next_matching(&mut alice1.socket, |f| f["ref"] == "d3").await;
    assert_eq!(answer["code"], "user_not_found", "{answer}");
    server.shutdown().await;
}

async fn two_tabs_in_a_room_are_one_member_and_closing_one_does_not_leave(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("v2tabs"))).await;
    let addr = server.local_addr();
    let mut watcher = connect(addr, "tabs", "watcher").await;
    let mut tab1 = connect(addr, "tabs", "alice").await;
    let tab2 = connect(addr, "tabs", "alice").await;
    let members = |v: &Value| names(&v["members"]);
    assert_eq!(
        members(&tab2.welcome),
        BTreeSet::from(["alice".into(), "watcher".into()]),
        "one member for two tabs"
    );
    let (_, _, body) = get(addr, "/rooms/tabs/members").await;
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["members"], json!(["alice", "watcher"]));
    // The watcher is told alice joined (presence batches changes, so a join
    // and a leave within one batch would tell it nothing).
    frames_until(&mut watcher, |f| {
        f["type"] == "presence"
            && f["joins"]
                .as_array()
                .is_some_and(|j| j.contains(&json!("alice")))
    })
    .await;

    // The second tab closes; once its session has ended on the node, alice
    // is still in the room.
    drop(tab2);
    let alice = warren::names::UserId::parse("alice").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.node().claims.sessions_of(&alice) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed tab never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, _, body) = get(addr, "/rooms/tabs/members").await;
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        listed["members"],
        json!(["alice", "watcher"]),
        "alice flickered out"
    );

    // The last tab leaves the room: now the watcher sees alice leave, and
    // that is the first presence frame naming her since she joined.
    send_json(
        &mut tab1.socket,
        json!({"type":"unsubscribe","room":"tabs","ref":"bye"}),
    )
    .await;
    let seen = frames_until(&mut watcher, |f| {
        f["type"] == "presence"
            && f["leaves"]
                .as_array()
                .is_some_and(|l| l.contains(&json!("alice")))
    })
    .await;
    let earlier_leaves = seen[..seen.len() - 1]
        .iter()
        .filter(|f| f["type"] == "presence")
        .filter(|f| {
            f["leaves"]
                .as_array()
                .is_some_and(|l| l.contains(&json!("alice")))
        })
        .count();
    assert_eq!(earlier_leaves, 0, "{seen:?}");
    server.shutdown().await;
}

/// Two nodes on one broker: a user's connections on both get its direct
/// messages, and a room's members span both.
#[tokio::test]
async fn direct_messages_and_rooms_span_nodes() {
    let prefix = unique_prefix("v2nodes");
    let mut a = config(BusKind::Amqp, &prefix);
    a.node_id = Some("node-a".into());
    let mut b = config(BusKind::Amqp, &prefix);
    b.node_id = Some("node-b".into());
    let (a, b) = (start(a).await, start(b).await);
    let mut alice_a = connect_user(a.local_addr(), "alice").await;
    let mut alice_b = connect_user(b.local_addr(), "alice").await;
    let mut bob = connect_user(a.local_addr(), "bob").await;
    send_json(
        &mut bob.socket,
        json!({"type":"direct","to":"alice","text":"both nodes","ref":"x"}),
    )
    .await;
    for client in [&mut alice_a, &mut alice_b] {
        let dm = next_matching(&mut client.socket, |f| f["type"] == "direct").await;
        assert_eq!(dm["text"], "both nodes");
    }
    // Rooms on both nodes: alice subscribes on B to a room bob is in on A.
    subscribe(&mut bob, "span").await;
    subscribe(&mut alice_b, "span").await;
    send_json(
        &mut bob.socket,
        json!({"type":"message","room":"span","text":"across"}),
    )
    .await;
    let got = next_matching(&mut alice_b.socket, |f| f["type"] == "message").await;
    assert_eq!(
        (got["room"].as_str(), got["text"].as_str()),
        (Some("span"), Some("across"))
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The broker's view: 3 connections of 2 users, each in 2 rooms, hold exactly
/// 3 connection queues, each bound to its user's key on the direct exchange
/// and to its 2 rooms; plus 3 slot queues, unbound. None of it outlives them.
#[tokio::test]
async fn the_topology_is_one_queue_per_connection_and_nothing_after() {
    let prefix = unique_prefix("v2topo");
    let server = start(config(BusKind::Amqp, &prefix)).await;
    let addr = server.local_addr();
    let mut clients = vec![
        connect_user(addr, "alice").await,
        connect_user(addr, "alice").await,
        connect_user(addr, "bob").await,
    ];
    for client in &mut clients {
        subscribe(client, "r1").await;
        subscribe(client, "r2").await;
    }
    // Besides the node's own presence queue (`<prefix>.node.<id>`).
    let queues: Vec<String> = broker_list(&["list_queues", "name"], &prefix)
        .into_iter()
        .filter(|q| !q.starts_with(&format!("{prefix}.node.")))
        .collect();
    let conn: Vec<&String> = queues.iter().filter(|q| q.contains(".conn.")).collect();
    let slots: Vec<&String> = queues.iter().filter(|q| q.contains(".slot.")).collect();
    assert_eq!(
        (conn.len(), slots.len(), queues.len()),
        (3, 3, 3 + 3),
        "{queues:?}"
    );
    let bindings = broker_list(
        &[
            "list_bindings",
            "source_name",
            "destination_name",
            "routing_key",
        ],
        &prefix,
    );
    for client in &clients {
        let user = client.welcome["user"].as_str().unwrap();
        let queue = format!(
            "{prefix}.conn.{user}.{}",
            client.welcome["session"].as_str().unwrap()
        );
        // (source exchange, routing key) of each binding of this queue, but
        // the default exchange's implicit one.
        let of_queue: BTreeSet<(String, String)> = bindings
            .iter()
            .map(|b| b.split('\t').collect::<Vec<_>>())
            .filter(|f| f.len() >= 2 && f[1] == queue && !f[0].is_empty())
            .map(|f| (f[0].to_owned(), f.get(2).copied().unwrap_or("").to_owned()))
            .collect();
        let expected = BTreeSet::from([
            (format!("{prefix}.direct"), user.to_owned()),
            (format!("{prefix}.room.r1"), String::new()),
            (format!("{prefix}.room.r2"), String::new()),
        ]);
        assert_eq!(of_queue, expected, "{queue}");
    }
    for client in clients.drain(..) {
        drop(client);
    }
    for queue in queues {
        wait_queue_gone(&queue).await;
    }
    assert!(!exchange_exists(&format!("{prefix}.room.r1")).await);
    assert!(!exchange_exists(&format!("{prefix}.room.r2")).await);
    server.shutdown().await;
}

/// A client that sends no `ref` asked for no `ack`: its session's channel
/// never enters confirm mode, so its messages cost the broker no confirms;
/// its first message with a `ref` turns confirms on, and is acked.
#[tokio::test]
async fn a_sender_that_asks_for_no_ack_costs_the_broker_no_confirms() {
    let prefix = unique_prefix("noconfirm");
    let mut cfg = config(BusKind::Amqp, &prefix);
    let node = format!("{prefix}-node");
    cfg.node_id = Some(node.clone());
    let server = start(cfg).await;
    let mut alice = connect(server.local_addr(), "quiet", "alice").await;
    for text in ["one", "two"] {
        send_json(&mut alice.socket, json!({"type":"message","text":text})).await;
        let echo = next_matching(&mut alice.socket, |f| f["type"] == "message").await;
        assert_eq!(echo["text"], text);
    }
    assert_eq!(confirming_channels(&node), 0);
    send_json(
        &mut alice.socket,
        json!({"type":"message","text":"three","ref":"r3"}),
    )
    .await;
    let ack = next_matching(&mut alice.socket, |f| f["type"] == "ack").await;
    assert_eq!(ack["ref"], "r3");
    assert_eq!(confirming_channels(&node), 1);
    server.shutdown().await;
}

/// Channels in confirm mode on the AMQP connections of node `node`.
fn confirming_channels(node: &str) -> usize {
    let connections: Vec<String> = broker_list(
        &["list_connections", "name", "client_properties"],
        &format!("\"warren {node} #"),
    )
    .into_iter()
    .filter_map(|line| line.split('\t').next().map(str::to_owned))
    .collect();
    assert!(!connections.is_empty(), "the node's connections");
    broker_list(&["list_channels", "name", "confirm"], "->")
        .into_iter()
        .filter(|line| {
            connections
                .iter()
                .any(|c| line.starts_with(&format!("{c} (")))
        })
        .filter(|line| line.ends_with("\ttrue"))
        .count()
}
