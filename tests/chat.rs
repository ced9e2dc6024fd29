//! Session behaviour over real WebSockets, run on both buses: the embedded one and
//! RabbitMQ. The same test bodies run twice (see `on_both_buses!`).

#[macro_use]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

on_both_buses!(
    two_clients_exchange_messages,
    rooms_are_isolated,
    order_per_sender_holds,
    bad_input_gets_its_code_and_the_connection_stays_usable,
    oversized_websocket_message_closes_with_1009,
    a_flood_of_invalid_frames_is_closed_as_abuse,
    too_many_sessions_on_one_node_and_immediate_reconnect,
    handshake_refusals_are_json,
    http_endpoints,
);

async fn two_clients_exchange_messages(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("two"))).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "lobby", "alice").await;
    let mut bob = connect(addr, "lobby", "bob").await;
    assert_eq!(alice.welcome["user"], "alice");
    assert_eq!(alice.welcome["room"], "lobby");
    assert_eq!(alice.welcome["node"], server.node().id.as_str());

    send_json(
        &mut alice.socket,
        json!({"type": "message", "text": "hi bob", "ref": "c1"}),
    )
    .await;
    let at_bob = next_json(&mut bob.socket).await;
    assert_eq!(at_bob["type"], "message");
    assert_eq!(at_bob["from"], "alice");
    assert_eq!(at_bob["room"], "lobby");
    assert_eq!(at_bob["text"], "hi bob");
    assert!(at_bob["ts"].as_u64().unwrap() > 1_600_000_000_000);
    let id = at_bob["id"].as_str().unwrap().to_owned();

    // The sender gets its own message back and an ack naming the same id.
    // (Ack and echo travel different paths; either may come first.)
    let mut two = [
        next_json(&mut alice.socket).await,
        next_json(&mut alice.socket).await,
    ];
    two.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    let [ack, echo] = two;
    assert_eq!(ack, json!({"type": "ack", "ref": "c1", "id": id}));
    assert_eq!(echo["type"], "message");
    assert_eq!(echo["id"], id.as_str());

    // A client cannot forge `from`; a message without `ref` gets no ack.
    send_json(
        &mut bob.socket,
        json!({"type": "message", "text": "hello", "from": "mallory"}),
    )
    .await;
    let at_alice = next_json(&mut alice.socket).await;
    assert_eq!(at_alice["from"], "bob");
    assert_eq!(at_alice["text"], "hello");
    let at_bob = next_json(&mut bob.socket).await;
    assert_eq!(at_bob["type"], "message", "no ack without ref: {at_bob}");
    assert_ne!(at_bob["id"], id.as_str(), "ids are unique");
    server.shutdown().await;
}

async fn rooms_are_isolated(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("rooms"))).await;
    let addr = server.local_addr();
    let mut red = connect(addr, "red", "r1").await;
    let mut red2 = connect(addr, "red", "r2").await;
    let mut blue = connect(addr, "blue", "b1").await;
    send_json(
        &mut red.socket,
        json!({"type": "message", "text": "red only"}),
    )
    .await;
    // The message reached its own room...
    assert_eq!(next_json(&mut red2.socket).await["text"], "red only");
    // ...and a message sent after it in the other room is the first blue sees.
    send_json(
        &mut blue.socket,
        json!({"type": "message", "text": "blue only"}),
    )
    .await;
    let first_blue = next_json(&mut blue.socket).await;
    assert_eq!(first_blue["text"], "blue only");
    assert_eq!(first_blue["room"], "blue");
    assert_silent(&mut red2.socket, Duration::from_millis(300)).await;
    server.shutdown().await;
}

async fn order_per_sender_holds(bus: BusKind) {
    const N: usize = 300;
    let server = start(config(bus, &unique_prefix("order"))).await;
    let addr = server.local_addr();
    let mut a = connect(addr, "ord", "a").await;
    let mut b = connect(addr, "ord", "b").await;
    let mut watcher = connect(addr, "ord", "watcher").await;
    // Interleave two senders without waiting for anything in between.
    for i in 0..N {
        a.socket
            .feed(Message::text(
                json!({"type":"message","text":format!("{i}")}).to_string(),
            ))
            .await
            .unwrap();
        b.socket
            .feed(Message::text(
                json!({"type":"message","text":format!("{i}")}).to_string(),
            ))
            .await
            .unwrap();
    }
    a.socket.flush().await.unwrap();
    b.socket.flush().await.unwrap();
    let mut next: HashMap<String, usize> = HashMap::new();
    for _ in 0..2 * N {
        let frame = next_json(&mut watcher.socket).await;
        let from = frame["from"].as_str().unwrap().to_owned();
        let seq: usize = frame["text"].as_str().unwrap().parse().unwrap();
        let expected = next.entry(from.clone()).or_default();
        assert_eq!(seq, *expected, "out of order from {from}");
        *expected += 1;
    }
    assert_eq!(next["a"], N);
    assert_eq!(next["b"], N);
    server.shutdown().await;
}

async fn bad_input_gets_its_code_and_the_connection_stays_usable(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("bad"));
    cfg.max_text_bytes = 16;
    let server = start(cfg).await;
    let mut c = connect(server.local_addr(), "bad", "carol").await;
    let cases: Vec<(String, &str)> = vec![
        ("this is not json".into(), "invalid_json"),
        ("[1,2,3]".into(), "invalid_json"),
        (
            json!({"type": "shout", "text": "x", "ref": "r1"}).to_string(),
            "unknown_type",
        ),
        (json!({"text": "no type"}).to_string(), "unknown_type"),
        (
            json!({"type": "message", "ref": "r2"}).to_string(),
            "invalid_message",
        ),
        (
            json!({"type": "message", "text": ""}).to_string(),
            "invalid_message",
        ),
        (
            json!({"type": "message", "text": "   \n "}).to_string(),
            "invalid_message",
        ),
        (
            json!({"type": "message", "text": 42}).to_string(),
            "invalid_message",
        ),
        (
            json!({"type": "message", "text": "x", "ref": "r".repeat(65)}).to_string(),
            "invalid_message",
        ),
        (
            json!({"type": "message", "text": "x".repeat(17), "ref": "r3"}).to_string(),
            "message_too_large",
        ),
    ];
    for (input, code) in &cases {
        send_text(&mut c.socket, input).await;
        let frame = next_json(&mut c.socket).await;
        assert_eq!(frame["type"], "error", "{input}");
        assert_eq!(frame["code"], *code, "{input}");
        assert!(!frame["message"].as_str().unwrap().is_empty());
    }
    // Errors echo the client's ref when it had one.
    send_json(
        &mut c.socket,
        json!({"type": "message", "text": "", "ref": "mine"}),
    )
    .await;
    assert_eq!(next_json(&mut c.socket).await["ref"], "mine");

    c.socket
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(next_json(&mut c.socket).await["code"], "unsupported_frame");

    // Exactly at the limit is fine, and the connection still works.
    send_json(
        &mut c.socket,
        json!({"type": "message", "text": "x".repeat(16), "ref": "ok"}),
    )
    .await;
    let ack = next_matching(&mut c.socket, |f| f["type"] == "ack").await;
    assert_eq!(ack["ref"], "ok");
    server.shutdown().await;
}

async fn oversized_websocket_message_closes_with_1009(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("big"));
    cfg.max_frame_bytes = 1024;
    let server = start(cfg).await;
    let mut c = connect(server.local_addr(), "big", "dave").await;
    let huge = json!({"type": "message", "text": "x".repeat(2000)}).to_string();
    send_text(&mut c.socket, &huge).await;
    assert_eq!(close_code(&mut c.socket).await, Some(1009));
    // The user id is free again once the session ended.
    let again = connect(server.local_addr(), "big", "dave").await;
    assert_eq!(again.welcome["user"], "dave");
    server.shutdown().await;
}

async fn a_flood_of_invalid_frames_is_closed_as_abuse(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("flood"))).await;
    let mut c = connect(server.local_addr(), "flood", "eve").await;
    for _ in 0..=warren::session::ERROR_BUDGET {
        c.socket.feed(Message::text("nope")).await.unwrap();
    }
    c.socket.flush().await.unwrap();
    let mut errors = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut c.socket))
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"error""#) => errors += 1,
            Some(Ok(Message::Text(_))) => {}
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(errors, warren::session::ERROR_BUDGET);
    assert_eq!(code, Some(1008));
    server.shutdown().await;
}

/// `--sessions-per-user 2`: a third connection of one user id is refused,
/// the first two are undisturbed, and a slot freed is at once usable again.
async fn too_many_sessions_on_one_node_and_immediate_reconnect(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("taken"));
    cfg.sessions_per_user = 2;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut first = connect(addr, "lobby", "frank").await;
    let _second = connect(addr, "elsewhere", "frank").await;
    assert_ne!(first.welcome["session"], _second.welcome["session"]);
    let (status, body) = refused(addr, "room=lobby&user=frank", None).await;
    assert_eq!(status, 409);
    assert_eq!(body["code"], "too_many_sessions");
    // In any room, or none: the limit is per user id.
    let (status, _) = refused(addr, "user=frank", None).await;
    assert_eq!(status, 409);
    // The first session was not disturbed by the refusals.
    send_json(
        &mut first.socket,
        json!({"type":"message","text":"still here","ref":"s"}),
    )
    .await;
    assert_eq!(
        next_matching(&mut first.socket, |f| f["type"] == "ack").await["ref"],
        "s"
    );
    // Disconnect and come straight back under the same id.
    first.socket.close(None).await.unwrap();
    drop(first);
    let back = connect(addr, "lobby", "frank").await;
    assert_eq!(back.welcome["user"], "frank");
    server.shutdown().await;
}

async fn handshake_refusals_are_json(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("refuse"))).await;
    let addr = server.local_addr();
    let (s, b) = refused(addr, "room=no%20spaces&user=x", None).await;
    assert_eq!((s, b["code"].as_str().unwrap()), (400, "invalid_room"));
    let long_room = "r".repeat(65);
    let (s, b) = refused(addr, &format!("room={long_room}&user=x"), None).await;
    assert_eq!((s, b["code"].as_str().unwrap()), (400, "invalid_room"));
    let (s, b) = refused(addr, "room=ok&user=", None).await;
    assert_eq!((s, b["code"].as_str().unwrap()), (400, "invalid_user"));
    let long_user = "u".repeat(33);
    let (s, b) = refused(addr, &format!("user={long_user}"), None).await;
    assert_eq!((s, b["code"].as_str().unwrap()), (400, "invalid_user"));
    let (s, b) = refused(addr, "user=ok", Some("http://evil.example")).await;
    assert_eq!(
        (s, b["code"].as_str().unwrap()),
        (403, "origin_not_allowed")
    );
    // Same origin is allowed by default.
    let same = format!("http://{addr}");
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url(
            addr,
            "user=same",
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("origin", same.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("same origin accepted");
    assert_eq!(next_json(&mut socket).await["type"], "welcome");
    // No room and no user: in no room yet, as a guest.
    let (mut guest, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    let welcome = next_json(&mut guest).await;
    assert_eq!(welcome["rooms"], json!([]));
    assert!(welcome.get("room").is_none(), "{welcome}");
    assert!(welcome["user"].as_str().unwrap().starts_with("guest-"));
    server.shutdown().await;
}

async fn http_endpoints(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("http"))).await;
    let addr = server.local_addr();
    let (status, _, body) = get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, body) = get(addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<html"), "the chat page");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let (status, headers, _) = get(addr, "/app.js").await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("content-security-policy"));
    // The client library the page imports comes from the binary.
    let (status, headers, body) = get(addr, "/warren-client.js").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");
    assert!(headers.contains_key("content-security-policy"));
    assert_eq!(
        body,
        include_str!("../clients/js/warren-client.js"),
        "the library as it is in clients/js"
    );
    let (status, _, body) = get(addr, "/no/such/thing").await;
    assert_eq!(status, 404);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["code"], "not_found");
    // A plain GET of /ws tells what an upgrade would get.
    let (status, _, body) = get(addr, "/ws?user=nobody").await;
    assert_eq!(status, 426, "{body}");
    let _holder = connect(addr, "lobby", "somebody").await;
    let (status, _, body) = get(addr, "/ws?user=somebody").await;
    assert_eq!(status, 426, "a second session is allowed: {body}");
    let mut holders = Vec::new();
    for _ in 1..server.node().config.sessions_per_user {
        holders.push(connect(addr, "lobby", "somebody").await);
    }
    let (status, _, body) = get(addr, "/ws?user=somebody").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("too_many_sessions"), "{body}");
    let (status, _, _) = get(addr, "/ws?user=bad%20name").await;
    assert_eq!(status, 400);
    server.shutdown().await;
}
