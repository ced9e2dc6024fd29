//! Direct messages, presence and the live node list: across nodes through
//! RabbitMQ, and on the embedded bus for one node.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn set(users: &[&str]) -> BTreeSet<String> {
    users.iter().map(|u| u.to_string()).collect()
}

/// Follow presence frames on `socket` until the member set (starting from
/// `members`) equals `want`. Fails after [`WAIT`].
async fn await_members(
    socket: &mut Socket,
    members: &mut BTreeSet<String>,
    want: &BTreeSet<String>,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while members != want {
        let frame = tokio::time::timeout_at(deadline, next_frame(socket))
            .await
            .unwrap_or_else(|_| panic!("members stayed {members:?}, wanted {want:?}"));
        if frame["type"] == "presence" {
            apply_presence(members, &frame);
        }
    }
}

async fn two_nodes(test: &str, ttl_secs: u64) -> (warren::RunningServer, warren::RunningServer) {
    let prefix = unique_prefix(test);
    let mut a = config(BusKind::Amqp, &prefix);
    a.node_id = Some("node-a".into());
    a.presence_ttl_secs = ttl_secs;
    let mut b = config(BusKind::Amqp, &prefix);
    b.node_id = Some("node-b".into());
    b.presence_ttl_secs = ttl_secs;
    let a = start(a).await;
    let b = start(b).await;
    // Each node learns the other from its hello; wait until both list both.
    for node in [&a, &b] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, _, body) = get(node.local_addr(), "/cluster").await;
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["nodes"].as_array().unwrap().len() == 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes never saw each other: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (a, b)
}

on_both_buses!(
    direct_messages_on_one_node,
    members_and_presence_diffs_on_one_node,
    large_rooms_cap_the_list_and_stop_diffs,
);

async fn large_rooms_cap_the_list_and_stop_diffs(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("large"));
    cfg.presence_max_members = 3;
    cfg.presence_batch_ms = 20;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut watcher = connect(addr, "big", "a-watcher").await;
    let mut seen = names(&watcher.welcome["members"]);
    let mut others = Vec::new();
    for u in ["b", "c"] {
        others.push(connect(addr, "big", u).await);
    }
    await_members(
        &mut watcher.socket,
        &mut seen,
        &set(&["a-watcher", "b", "c"]),
    )
    .await;
    // Over the cap: the welcome lists three of five, and says five.
    others.push(connect(addr, "big", "d").await);
    let fifth = connect(addr, "big", "e").await;
    assert_eq!(fifth.welcome["members"].as_array().unwrap().len(), 3);
    assert_eq!(fifth.welcome["members_total"], 5);
    let (_, _, body) = get(addr, "/rooms/big/members").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["members"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    // Large mode is the absence of frames, so only time shows it: let several
    // batch intervals pass (the test runs with 20 ms batches) while the room is
    // over the cap; none of them may send the watcher a diff.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Back under the cap: one frame with the whole list.
    drop(fifth);
    drop(others.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    let resync = loop {
        let f = tokio::time::timeout_at(deadline, next_frame(&mut watcher.socket))
            .await
            .expect("a resync once the room is small again");
        if f["type"] == "presence" && f["members"].is_array() {
            break f;
        }
        // While large, no diff may name d or e.
        if f["type"] == "presence" {
            let named: BTreeSet<String> = names(&f["joins"])
                .into_iter()
                .chain(names(&f["leaves"]))
                .collect();
            assert!(
                !named.contains("d") && !named.contains("e"),
                "a diff in a large room: {f}"
            );
        }
    };
    assert_eq!(names(&resync["members"]), set(&["a-watcher", "b", "c"]));
    server.shutdown().await;
}

async fn direct_messages_on_one_node(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("dm1"))).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "room-a", "alice").await;
    let mut bob = connect(addr, "room-b", "bob").await;
    send_json(
        &mut alice.socket,
        json!({"type":"direct","to":"bob","text":"psst","ref":"d1"}),
    )
    .await;
    let dm = next_json(&mut bob.socket).await;
    assert_eq!(dm["type"], "direct");
    assert_eq!(
        (dm["from"].as_str(), dm["to"].as_str(), dm["text"].as_str()),
        (Some("alice"), Some("bob"), Some("psst"))
    );
    let ack = next_json(&mut alice.socket).await;
    assert_eq!(ack, json!({"type":"ack","ref":"d1","id":dm["id"]}));

    // To nobody: user_not_found with the ref, and no ack for it.
    send_json(
        &mut alice.socket,
        json!({"type":"direct","to":"nobody","text":"hello?","ref":"d2"}),
    )
    .await;
    let err = next_json(&mut alice.socket).await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("user_not_found"), Some("d2"))
    );
    // To yourself works.
    send_json(
        &mut alice.socket,
        json!({"type":"direct","to":"alice","text":"note to self","ref":"d3"}),
    )
    .await;
    let mut two = [
        next_json(&mut alice.socket).await,
        next_json(&mut alice.socket).await,
    ];
    two.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    assert_eq!(two[0]["type"], "ack");
    assert_eq!(
        two[0]["ref"], "d3",
        "the first ack after user_not_found is d3's"
    );
    assert_eq!(
        (two[1]["type"].as_str(), two[1]["text"].as_str()),
        (Some("direct"), Some("note to self"))
    );
    // Validation is the same as for room messages.
    send_json(
        &mut alice.socket,
        json!({"type":"direct","to":"b b","text":"x"}),
    )
    .await;
    assert_eq!(next_json(&mut alice.socket).await["code"], "invalid_user");
    send_json(
        &mut alice.socket,
        json!({"type":"direct","to":"bob","text":"  "}),
    )
    .await;
    assert_eq!(
        next_json(&mut alice.socket).await["code"],
        "invalid_message"
    );
    server.shutdown().await;
}

async fn members_and_presence_diffs_on_one_node(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("pres1"))).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "hall", "alice").await;
    assert_eq!(names(&alice.welcome["members"]), set(&["alice"]));
    let bob = connect(addr, "hall", "bob").await;
    assert_eq!(names(&bob.welcome["members"]), set(&["alice", "bob"]));
    let mut seen = set(&["alice"]);
    await_members(&mut alice.socket, &mut seen, &set(&["alice", "bob"])).await;
    let (_, _, body) = get(addr, "/rooms/hall/members").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"room":"hall","members":["alice","bob"]})
    );
    drop(bob);
    await_members(&mut alice.socket, &mut seen, &set(&["alice"])).await;
    let (status, _, _) = get(addr, "/rooms/bad%20room/members").await;
    assert_eq!(status, 400);
    let (_, _, body) = get(addr, "/cluster").await;
    let cluster: Value = serde_json::from_str(&body).unwrap();
    let nodes = cluster["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["id"], server.node().id.as_str());
    assert_eq!(nodes[0]["connections"], 1);
    assert_eq!(nodes[0]["rooms"], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn direct_message_across_nodes_and_rooms() {
    let (a, b) = two_nodes("dm2", 30).await;
    let mut alice = connect(a.local_addr(), "north", "alice").await;
    let mut bob = connect(b.local_addr(), "south", "bob").await;
    send_json(
        &mut alice.socket,
        json!({"type":"direct","to":"bob","text":"across","ref":"x1"}),
    )
    .await;
    let dm = next_json(&mut bob.socket).await;
    assert_eq!(
        (
            dm["type"].as_str(),
            dm["from"].as_str(),
            dm["text"].as_str()
        ),
        (Some("direct"), Some("alice"), Some("across"))
    );
    assert_eq!(next_json(&mut alice.socket).await["ref"], "x1");
    send_json(
        &mut bob.socket,
        json!({"type":"direct","to":"alice","text":"back"}),
    )
    .await;
    assert_eq!(next_json(&mut alice.socket).await["text"], "back");
    send_json(
        &mut bob.socket,
        json!({"type":"direct","to":"offline","text":"?","ref":"x2"}),
    )
    .await;
    let err = next_json(&mut bob.socket).await;
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("user_not_found"), Some("x2"))
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn members_span_nodes_and_diffs_reach_every_node() {
    let (a, b) = two_nodes("pres2", 30).await;
    let mut alice = connect(a.local_addr(), "plaza", "alice").await;
    let mut seen_a = names(&alice.welcome["members"]);
    let mut bob = connect(b.local_addr(), "plaza", "bob").await;
    // Bob's welcome lists alice, from the other node, once her join has arrived.
    let mut seen_b = names(&bob.welcome["members"]);
    await_members(&mut bob.socket, &mut seen_b, &set(&["alice", "bob"])).await;
    await_members(&mut alice.socket, &mut seen_a, &set(&["alice", "bob"])).await;
    let carol = connect(a.local_addr(), "plaza", "carol").await;
    await_members(
        &mut bob.socket,
        &mut seen_b,
        &set(&["alice", "bob", "carol"]),
    )
    .await;
    await_members(
        &mut alice.socket,
        &mut seen_a,
        &set(&["alice", "bob", "carol"]),
    )
    .await;
    drop(carol);
    await_members(&mut bob.socket, &mut seen_b, &set(&["alice", "bob"])).await;
    await_members(&mut alice.socket, &mut seen_a, &set(&["alice", "bob"])).await;
    let (_, _, body) = get(b.local_addr(), "/rooms/plaza/members").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["members"],
        json!(["alice", "bob"])
    );
    a.shutdown().await;
    // A node that stops cleanly says goodbye: its users leave at once.
    await_members(&mut bob.socket, &mut seen_b, &set(&["bob"])).await;
    b.shutdown().await;
}

#[tokio::test]
async fn two_hundred_joins_arrive_as_a_few_batched_frames() {
    const N: usize = 200;
    let mut cfg = config(BusKind::Amqp, &unique_prefix("burst"));
    // Batches of 500 ms: the count must not hinge on how fast 200 clients can
    // connect on a busy machine.
    cfg.presence_batch_ms = 500;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut watcher = connect(addr, "burst", "watcher").await;
    let joins = (0..N).map(|i| async move { connect(addr, "burst", &format!("u{i}")).await });
    let mut clients = futures_util::future::join_all(joins).await;
    // The watcher sees all 200 joins...
    let mut seen = set(&["watcher"]);
    let mut want = seen.clone();
    want.extend((0..N).map(|i| format!("u{i}")));
    let mut frames = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen != want {
        let frame = tokio::time::timeout_at(deadline, next_frame(&mut watcher.socket))
            .await
            .expect("all joins in time");
        if frame["type"] == "presence" {
            frames += 1;
            seen.extend(names(&frame["joins"]));
        }
    }
    // ...in a handful of frames, not one per join.
    println!("watcher got {N} joins in {frames} presence frames");
    assert!(frames <= 20, "{frames} presence frames for {N} joins");
    // Every joiner got a handful at most, too; a ping round-trip through a
    // message proves each has read everything sent before it.
    send_json(&mut watcher.socket, json!({"type":"message","text":"sync"})).await;
    let mut most = 0;
    for c in &mut clients {
        let mut count = 0;
        loop {
            let f = next_frame(&mut c.socket).await;
            if f["type"] == "presence" {
                count += 1;
            } else if f["text"] == "sync" {
                break;
            }
        }
        most = most.max(count);
    }
    println!("the busiest joiner got {most} presence frames");
    assert!(most <= 20, "a joiner got {most} presence frames");
    server.shutdown().await;
}
