//! Room history: a `subscribe` that asks for history gets the room's last
//! messages, then live ones, with no gap and no duplicate between them, also
//! while the room is busy; `GET /rooms/<room>/messages` pages back through the
//! same history; on RabbitMQ it is kept in a stream and outlives the node.
//! On both buses. Each test deletes its history stream from the shared broker.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{Value, json};
use warren::config::Config;

on_both_buses!(
    joining_after_200_messages_asking_for_50_gets_the_last_50_then_live_ones,
    history_and_live_traffic_meet_with_no_gap_and_no_duplicate,
    history_pages_over_http,
);

fn with_history(bus: BusKind, prefix: &str) -> Config {
    let mut c = config(bus, prefix);
    c.history_per_room = 100;
    c
}

/// `count` numbered messages `n{from}`… into the sender's room, all acked.
async fn send_acked(sender: &mut Client, from: usize, count: usize) {
    for i in from..from + count {
        send_json(
            &mut sender.socket,
            json!({"type":"message","text":format!("n{i}"),"ref":format!("r{i}")}),
        )
        .await;
    }
    for _ in 0..count {
        next_matching(&mut sender.socket, |f| f["type"] == "ack").await;
    }
}

/// Subscribe `client` to `room` asking for its last `count` messages; the
/// `history` frame that answers.
async fn subscribe_with_history(client: &mut Client, room: &str, count: usize) -> Value {
    send_json(
        &mut client.socket,
        json!({"type":"subscribe","room":room,"history":count}),
    )
    .await;
    next_matching(&mut client.socket, |f| f["type"] == "history").await
}

fn texts(messages: &Value) -> Vec<String> {
    messages
        .as_array()
        .expect("an array of messages")
        .iter()
        .map(|m| {
            assert_eq!(m["type"], "message", "{m}");
            m["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("n{i}")).collect()
}

async fn joining_after_200_messages_asking_for_50_gets_the_last_50_then_live_ones(bus: BusKind) {
    let prefix = unique_prefix("hist50");
    let _stream = HistoryStream::of(bus, &prefix);
    let server = start(with_history(bus, &prefix)).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "h", "alice").await;
    send_acked(&mut alice, 0, 200).await;

    let mut carol = connect_user(addr, "carol").await;
    send_json(
        &mut carol.socket,
        json!({"type":"subscribe","room":"h","history":50,"ref":"s"}),
    )
    .await;
    let subscribed = next_json(&mut carol.socket).await;
    assert_eq!(
        (subscribed["type"].as_str(), subscribed["ref"].as_str()),
        (Some("subscribed"), Some("s"))
    );
    let history = next_json(&mut carol.socket).await;
    assert_eq!(history["type"], "history", "{history}");
    assert_eq!(
        (history["room"].as_str(), history["ref"].as_str()),
        (Some("h"), Some("s"))
    );
    assert_eq!(texts(&history["messages"]), numbered(150..200));
    assert_eq!(history["complete"], true);

    send_json(&mut alice.socket, json!({"type":"message","text":"live"})).await;
    let live = next_json(&mut carol.socket).await;
    assert_eq!(
        (live["type"].as_str(), live["text"].as_str()),
        (Some("message"), Some("live"))
    );

    // More than the node keeps: what it has, and a page that says so.
    send_json(
        &mut carol.socket,
        json!({"type":"subscribe","room":"h","history":1000}),
    )
    .await;
    next_matching(&mut carol.socket, |f| f["type"] == "subscribed").await;
    let history = next_matching(&mut carol.socket, |f| f["type"] == "history").await;
    let mut expected = numbered(101..200);
    expected.push("live".into());
    assert_eq!(texts(&history["messages"]), expected);
    assert_eq!(history["complete"], false);
}

async fn history_and_live_traffic_meet_with_no_gap_and_no_duplicate(bus: BusKind) {
    const TOTAL: usize = 600;
    let prefix = unique_prefix("histlive");
    let _stream = HistoryStream::of(bus, &prefix);
    let mut config = with_history(bus, &prefix);
    // However many come while carol subscribes, the node keeps them all: a
    // ring that dropped some could not meet live traffic (an empty page then
    // says so; see bus::history's unit tests).
    config.history_per_room = TOTAL;
    let server = start(config).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "busy", "alice").await;
    send_acked(&mut alice, 0, 20).await;
    // Alice keeps talking while carol joins with history.
    let sending = tokio::spawn(async move {
        send_acked(&mut alice, 20, TOTAL - 20).await;
        alice
    });
    let mut carol = connect_user(addr, "carol").await;
    send_json(
        &mut carol.socket,
        json!({"type":"subscribe","room":"busy","history":100}),
    )
    .await;
    next_matching(&mut carol.socket, |f| f["type"] == "subscribed").await;
    let history = next_matching(&mut carol.socket, |f| f["type"] == "history").await;
    let mut seen = texts(&history["messages"]);
    assert!(!seen.is_empty(), "20 messages came before the subscribe");
    while seen.last().map(String::as_str) != Some(&*format!("n{}", TOTAL - 1)) {
        let m = next_matching(&mut carol.socket, |f| f["type"] == "message").await;
        seen.push(m["text"].as_str().unwrap().to_owned());
    }
    let first: usize = seen[0][1..].parse().unwrap();
    assert_eq!(
        seen,
        numbered(first..TOTAL),
        "a gap or a duplicate where history met live"
    );
    sending.await.unwrap();
}

async fn get_json(addr: SocketAddr, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("http://{addr}{path}"));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn history_pages_over_http(bus: BusKind) {
    let prefix = unique_prefix("histhttp");
    let _stream = HistoryStream::of(bus, &prefix);
    let server = start(with_history(bus, &prefix)).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "paged", "alice").await;
    send_acked(&mut alice, 0, 30).await;

    let (status, page) = get_json(addr, "/rooms/paged/messages?limit=10", None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(texts(&page["messages"]), numbered(20..30));
    assert_eq!(
        (page["room"].as_str(), page["complete"].as_bool()),
        (Some("paged"), Some(true))
    );
    let oldest = page["messages"][0]["id"].as_str().unwrap().to_owned();
    let (_, older) = get_json(
        addr,
        &format!("/rooms/paged/messages?limit=15&before={oldest}"),
        None,
    )
    .await;
    assert_eq!(texts(&older["messages"]), numbered(5..20));
    let (_, default) = get_json(addr, "/rooms/paged/messages", None).await;
    assert_eq!(texts(&default["messages"]), numbered(0..30));
    let (_, empty) = get_json(addr, "/rooms/nobody-here/messages", None).await;
    assert_eq!(
        (empty["messages"].clone(), empty["complete"].clone()),
        (json!([]), json!(true))
    );

    for (path, status, code) in [
        ("/rooms/paged/messages?limit=many", 400, "invalid_request"),
        ("/rooms/no%20such/messages", 400, "invalid_room"),
    ] {
        let (got, body) = get_json(addr, path, None).await;
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{path}");
    }
}

#[tokio::test]
async fn history_needs_a_token_that_may_read_the_room() {
    use warren::auth::{Claims, mint};
    const SECRET: &str = "history-test-secret";
    let prefix = unique_prefix("histauth");
    let mut c = with_history(BusKind::Memory, &prefix);
    c.jwt_secret = Some(SECRET.into());
    let server = start(c).await;
    let addr = server.local_addr();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = |rooms: Option<Vec<String>>| {
        mint(
            SECRET,
            &Claims {
                sub: "dora".into(),
                exp,
                rooms,
                rooms_read: None,
            },
        )
    };
    let (status, body) = get_json(addr, "/rooms/vault/messages", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_required"))
    );
    let elsewhere = token(Some(vec!["lobby".into()]));
    let (status, body) = get_json(addr, "/rooms/vault/messages", Some(&elsewhere)).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, _) = get_json(addr, "/rooms/lobby/messages", Some(&elsewhere)).await;
    assert_eq!(status, 200);
}

/// The reader acknowledges the stream in bursts; the broker gives it credit
/// for 1,000 unacknowledged deliveries. A node that starts after 2,500 room
/// messages must read through all of them, and its page then ends at the last.
#[tokio::test]
async fn on_rabbitmq_a_node_reads_a_long_stream_past_its_credit() {
    let prefix = unique_prefix("histlong");
    let _stream = HistoryStream::of(BusKind::Amqp, &prefix);
    let first = start(with_history(BusKind::Amqp, &prefix)).await;
    let mut alice = connect(first.local_addr(), "long", "alice").await;
    send_acked(&mut alice, 0, 2500).await;

    let second = start(with_history(BusKind::Amqp, &prefix)).await;
    let mut carol = connect_user(second.local_addr(), "carol").await;
    let history = subscribe_with_history(&mut carol, "long", 50).await;
    assert_eq!(texts(&history["messages"]), numbered(2450..2500));
    assert_eq!(history["complete"], true);
    drop(alice);
    first.shutdown().await;
}

#[tokio::test]
async fn on_rabbitmq_history_outlives_the_node() {
    let prefix = unique_prefix("histrestart");
    let _stream = HistoryStream::of(BusKind::Amqp, &prefix);
    let first = start(with_history(BusKind::Amqp, &prefix)).await;
    let mut alice = connect(first.local_addr(), "kept", "alice").await;
    send_acked(&mut alice, 0, 30).await;
    drop(alice);
    first.shutdown().await;

    // A node that starts afterwards reads the stream from its beginning.
    let second = start(with_history(BusKind::Amqp, &prefix)).await;
    let (status, page) =
        get_json(second.local_addr(), "/rooms/kept/messages?limit=100", None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(texts(&page["messages"]), numbered(0..30));
}

#[tokio::test]
async fn with_history_off_a_subscribe_asking_for_it_gets_an_empty_incomplete_page() {
    // On RabbitMQ with no stream to wait for: answered at once, never a stuck broker.
    let prefix = unique_prefix("histoff");
    let server = start(config(BusKind::Amqp, &prefix)).await;
    let mut carol = connect_user(server.local_addr(), "carol").await;
    send_json(
        &mut carol.socket,
        json!({"type":"subscribe","room":"off","history":10}),
    )
    .await;
    next_matching(&mut carol.socket, |f| f["type"] == "subscribed").await;
    let history = next_matching(&mut carol.socket, |f| f["type"] != "subscribed").await;
    assert_eq!(
        history,
        json!({"type":"history","room":"off","complete":false,"messages":[]})
    );
}

/// RabbitMQ 3.10 answers a new stream's declaration before the stream can
/// take messages, and a publish routed to it then closes the publisher's
/// whole connection (541). So a node with a new history stream serves only
/// once its reader consumes the stream, and says so in `/metrics`.
#[tokio::test]
async fn on_rabbitmq_a_node_serves_once_it_reads_a_new_history_stream() {
    let prefix = unique_prefix("histready");
    let _stream = HistoryStream::of(BusKind::Amqp, &prefix);
    let server = start(with_history(BusKind::Amqp, &prefix)).await;
    let (status, _, metrics) = get(server.local_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\nwarren_history_reading 1\n"),
        "the node serves before it reads its history stream:\n{metrics}"
    );
    // The first message, published at once, is kept and read back.
    let mut alice = connect(server.local_addr(), "first", "alice").await;
    send_acked(&mut alice, 0, 1).await;
    let mut carol = connect_user(server.local_addr(), "carol").await;
    let history = subscribe_with_history(&mut carol, "first", 10).await;
    assert_eq!(texts(&history["messages"]), numbered(0..1));
    server.shutdown().await;
}

/// `warren_history_reading` as `/metrics` shows it now.
async fn history_reading(addr: SocketAddr) -> bool {
    let (status, _, metrics) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    metrics.contains("\nwarren_history_reading 1\n")
}

/// Take the history stream away from the node and put a classic queue of the
/// same name in its place, which the node's reader can neither declare as a
/// stream nor consume: the reader keeps trying and failing.
async fn replace_stream_with_a_classic_queue(name: &str) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("test broker connection");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_delete(name.into(), Default::default())
            .await
            .unwrap();
        let durable = lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        // The reader may declare the stream again between the two: then the
        // classic declare is refused (406) and the swap is tried again.
        if channel
            .queue_declare(name.into(), durable, Default::default())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cannot put a classic queue in the stream's place"
        );
    }
    let _ = conn.close(200, "".into()).await;
}

/// A node whose history stream cannot be read says so, and goes on serving:
/// opens and subscribes wait for the reader only briefly, then go ahead.
#[tokio::test]
async fn on_rabbitmq_a_node_that_cannot_read_its_history_says_so_and_serves() {
    let prefix = unique_prefix("histgone");
    // Deletes whatever queue holds the stream's name at the end.
    let _stream = HistoryStream::of(BusKind::Amqp, &prefix);
    let server = start(with_history(BusKind::Amqp, &prefix)).await;
    let addr = server.local_addr();
    assert!(history_reading(addr).await);

    replace_stream_with_a_classic_queue(&format!("{prefix}.history")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while history_reading(addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "warren_history_reading stayed 1 with no stream to read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // polling a condition, with a deadline
    }

    let mut alice = connect(addr, "on", "alice").await;
    let mut bob = connect(addr, "on", "bob").await;
    send_json(
        &mut alice.socket,
        json!({"type":"message","text":"still here","ref":"r"}),
    )
    .await;
    let got = next_matching(&mut bob.socket, |f| f["type"] == "message").await;
    assert_eq!(got["text"], "still here");
    assert!(!history_reading(addr).await);
    drop((alice, bob));
    server.shutdown().await;
}
