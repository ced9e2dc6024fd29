//! Overflow is never silent: when a session's queue drops messages because its
//! client fell behind, the client gets a `gap` frame with how many, where they
//! were lost, and `/metrics` counts them; a room that keeps up gets none; and
//! what a parked session's queue drops before the client resumes it is told
//! after the resume, on any node. On both buses, against a small
//! `--queue-max-length`.

mod common;

use std::net::SocketAddr;

use common::resume::{drop_abruptly, resume_query, until_resumed};
use common::*;
use serde_json::{Value, json};

on_both_buses!(
    a_flood_past_a_full_queue_adds_up,
    a_flood_posted_over_http_adds_up_too,
    a_room_that_keeps_up_has_no_gap,
    direct_messages_dropped_while_parked_are_told_after_the_resume,
);

// With per-node fanout a parked session's rooms are not queued at all: its
// resume says `recovered: false` and the client turns to history.
on_both_buses!(
    per_connection:
    room_messages_dropped_while_parked_are_told_after_the_resume,
);

/// What the receiver's queue holds: far below what the flood sends past the
/// receiver's window of 256 unacknowledged deliveries.
const QUEUE_MAX_LENGTH: u32 = 50;
const FLOOD: u64 = 600;

/// What one client read of a flood: the numbers of the messages, in order,
/// and the `missed` of each gap frame.
#[derive(Default)]
struct Read {
    numbers: Vec<u64>,
    gaps: Vec<u64>,
    /// The number the next message must have: one more than the last, plus
    /// what a gap frame since said was missed.
    next: u64,
}

impl Read {
    fn accounted(&self) -> u64 {
        self.numbers.len() as u64 + self.gaps.iter().sum::<u64>()
    }
}

/// Take one frame of a flood (`kind` `message` in `room`, or `direct`).
fn take(read: &mut Read, frame: &Value, kind: &str, room: Option<&str>) -> bool {
    if frame["type"] == kind {
        let n: u64 = frame["text"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            n, read.next,
            "a gap frame stands exactly where messages were lost"
        );
        read.next = n + 1;
        read.numbers.push(n);
        true
    } else if frame["type"] == "gap" {
        assert_eq!(frame.get("room").and_then(Value::as_str), room, "{frame}");
        assert!(frame.get("seq").is_none(), "a gap takes no seq: {frame}");
        let missed = frame["missed"].as_u64().unwrap();
        assert!(missed > 0, "{frame}");
        read.gaps.push(missed);
        read.next += missed;
        true
    } else {
        false
    }
}

async fn dropped_total(addr: SocketAddr) -> u64 {
    let (status, _, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("warren_dropped_messages_total "))
        .unwrap_or_else(|| panic!("no dropped counter in {body}"))
        .parse()
        .unwrap()
}

/// Alice sends [`FLOOD`] numbered messages to `to` (a room or bob) and reads
/// every broker ack (and, in a room, her own copies) while bob, who
/// acknowledges deliveries himself, acknowledges none: his window fills, and
/// then his queue. Then bob acknowledges as he reads. Every message acked to
/// alice is, for each of them, either received, in order, or counted missed.
async fn flood(alice: &mut Client, bob: &mut Client, to: Value) -> (Read, Read) {
    let room = to.get("room").and_then(Value::as_str).map(str::to_owned);
    let kind = if room.is_some() { "message" } else { "direct" };
    for n in 0..FLOOD {
        let mut frame = to.clone();
        frame["text"] = n.to_string().into();
        frame["ref"] = format!("r{n}").into();
        send_json(&mut alice.socket, frame).await;
    }
    let mut acks = 0;
    let mut mine = Read::default();
    // Her own copies come back in a room; a direct message's does not.
    let own = if room.is_some() { FLOOD } else { 0 };
    while acks < FLOOD || mine.accounted() < own {
        let frame = next_json(&mut alice.socket).await;
        if frame["type"] == "ack" {
            acks += 1;
        } else {
            assert!(take(&mut mine, &frame, kind, room.as_deref()), "{frame}");
        }
    }

    (mine, read_flood(bob, kind, room.as_deref()).await)
}

/// Bob reads a flood of [`FLOOD`] to him, acknowledging as he reads: every
/// message sent is received, in order, or counted missed where it was lost.
async fn read_flood(bob: &mut Client, kind: &str, room: Option<&str>) -> Read {
    let mut his = Read::default();
    while his.accounted() < FLOOD {
        let frame = next_json(&mut bob.socket).await;
        assert!(take(&mut his, &frame, kind, room), "{frame}");
        if let Some(seq) = frame["seq"].as_u64() {
            send_json(&mut bob.socket, json!({"type":"ack_upto","seq":seq})).await;
        }
    }
    assert_eq!(his.accounted(), FLOOD, "received + missed = sent and acked");
    eprintln!(
        "{kind} flood of {FLOOD}: bob received {} and was told {:?} missed",
        his.numbers.len(),
        his.gaps
    );
    assert!(
        !his.gaps.is_empty(),
        "a queue of {QUEUE_MAX_LENGTH} behind a window of 256 must drop some of {FLOOD}"
    );
    his
}

async fn a_flood_past_a_full_queue_adds_up(bus: BusKind) {
    let mut config = config(bus, &unique_prefix("overflow"));
    config.queue_max_length = QUEUE_MAX_LENGTH;
    let server = start(config).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "flood", "alice").await;
    let mut bob = connect_with(addr, "room=flood&user=bob&acks=client").await;

    let (mine, his) = flood(
        &mut alice,
        &mut bob,
        json!({"type":"message","room":"flood"}),
    )
    .await;
    let in_room = his.gaps.iter().sum::<u64>() + mine.gaps.iter().sum::<u64>();
    assert_eq!(dropped_total(addr).await, in_room);

    let (_, his) = flood(&mut alice, &mut bob, json!({"type":"direct","to":"bob"})).await;
    assert_eq!(
        dropped_total(addr).await,
        in_room + his.gaps.iter().sum::<u64>()
    );
    server.shutdown().await;
}

/// As [`a_flood_past_a_full_queue_adds_up`], with the flood posted over
/// HTTP: to the room through the server API, and to bob with alice's posting
/// token.
async fn a_flood_posted_over_http_adds_up_too(bus: BusKind) {
    let mut config = config(bus, &unique_prefix("httpflood"));
    config.queue_max_length = QUEUE_MAX_LENGTH;
    let server = start(config).await;
    let addr = server.local_addr();
    let alice = connect_user(addr, "alice").await;
    let token = alice.welcome["token"].as_str().unwrap().to_owned();
    let mut bob = connect_with(addr, "room=flood&user=bob&acks=client").await;

    for n in 0..FLOOD {
        assert_eq!(
            api_post(addr, "flood", Some("alice"), &n.to_string()).await,
            202
        );
    }
    let his = read_flood(&mut bob, "message", Some("flood")).await;
    let in_room = his.gaps.iter().sum::<u64>();
    assert_eq!(dropped_total(addr).await, in_room);

    let client = reqwest::Client::new();
    for n in 0..FLOOD {
        let status = client
            .post(format!("http://{addr}/users/bob/messages"))
            .json(&json!({"from":"alice","text":n.to_string(),"token":token}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 202);
    }
    let his = read_flood(&mut bob, "direct", None).await;
    assert_eq!(
        dropped_total(addr).await,
        in_room + his.gaps.iter().sum::<u64>()
    );
    server.shutdown().await;
}

async fn a_room_that_keeps_up_has_no_gap(bus: BusKind) {
    let mut config = config(bus, &unique_prefix("nogap"));
    config.queue_max_length = QUEUE_MAX_LENGTH;
    let server = start(config).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "calm", "alice").await;
    let mut bob = connect(addr, "calm", "bob").await;
    // One at a time, each read by both before the next: the queues never fill.
    for n in 0..200 {
        send_json(
            &mut alice.socket,
            json!({"type":"message","room":"calm","text":n.to_string()}),
        )
        .await;
        for client in [&mut alice, &mut bob] {
            let frame = next_json(&mut client.socket).await;
            assert_eq!(frame["type"], "message", "{frame}");
            assert_eq!(frame["text"], n.to_string());
        }
    }
    assert_eq!(dropped_total(addr).await, 0);
    server.shutdown().await;
}

async fn room_messages_dropped_while_parked_are_told_after_the_resume(bus: BusKind) {
    parked_flood(bus, json!({"type":"message","room":"park"})).await;
}

async fn direct_messages_dropped_while_parked_are_told_after_the_resume(bus: BusKind) {
    parked_flood(bus, json!({"type":"direct","to":"bob"})).await;
}

/// Alice sends `count` numbered messages to `to`, from `from` on, and waits
/// for the broker's ack of each.
async fn send_acked_to(alice: &mut Client, to: &Value, from: u64, count: u64) {
    for n in from..from + count {
        let mut frame = to.clone();
        frame["text"] = n.to_string().into();
        frame["ref"] = format!("r{n}").into();
        send_json(&mut alice.socket, frame).await;
    }
    let mut acks = 0;
    while acks < count {
        if next_json(&mut alice.socket).await["type"] == "ack" {
            acks += 1;
        }
    }
}

/// Bob (client acks) reads alice's first 10 messages to `to`, acknowledges
/// 5, and his connection is lost; alice sends [`FLOOD`] more, far past what
/// his parked queue keeps; bob resumes, on another node where there is one,
/// saying he processed all 10. Everything after those 10 is, for him, either
/// received in order or told missed exactly where it was lost; none of the
/// 5 he had is counted missed.
async fn parked_flood(bus: BusKind, to: Value) {
    const FIRST: u64 = 10;
    let room = to.get("room").and_then(Value::as_str).map(str::to_owned);
    let kind = if room.is_some() { "message" } else { "direct" };
    let prefix = unique_prefix("parkflood");
    let mut config = config(bus, &prefix);
    config.queue_max_length = QUEUE_MAX_LENGTH;
    config.resume_grace_secs = 30;
    let servers = if bus.is_amqp() {
        vec![start(config.clone()).await, start(config).await]
    } else {
        vec![start(config).await]
    };
    let (first, again) = (
        servers[0].local_addr(),
        servers.last().unwrap().local_addr(),
    );
    let mut alice = connect(first, "park", "alice").await;
    let mut bob = connect_with(first, "room=park&user=bob&acks=client").await;
    let session = bob.welcome["session"].as_str().unwrap().to_owned();

    send_acked_to(&mut alice, &to, 0, FIRST).await;
    let mut last_id = String::new();
    for n in 0..FIRST {
        let frame = next_matching(&mut bob.socket, |f| f["type"] == kind).await;
        assert_eq!(frame["text"], n.to_string());
        last_id = frame["id"].as_str().unwrap().to_owned();
        if n == 4 {
            send_json(
                &mut bob.socket,
                json!({"type":"ack_upto","seq":frame["seq"]}),
            )
            .await;
        }
    }
    // A barrier: frames are handled in order, so the ack is taken.
    send_json(
        &mut bob.socket,
        json!({"type":"subscribe","room":"barrier","ref":"barrier"}),
    )
    .await;
    next_matching(&mut bob.socket, |f| f["ref"] == "barrier").await;
    drop_abruptly(bob);

    send_acked_to(&mut alice, &to, FIRST, FLOOD).await;
    let mut bob = connect_with(
        again,
        &resume_query("bob", &session, "park", Some(&last_id)),
    )
    .await;
    let (_, resumed) = until_resumed(&mut bob).await;
    // With per-node fanout the rooms come from history, and it says so; the
    // direct messages in the session's queue are kept all the same.
    let rooms_kept = !matches!(bus, BusKind::AmqpPerNode);
    assert_eq!(resumed["recovered"], rooms_kept, "{resumed}");
    let mut his = Read {
        next: FIRST,
        ..Read::default()
    };
    while his.accounted() < FLOOD {
        let frame = next_json(&mut bob.socket).await;
        if take(&mut his, &frame, kind, room.as_deref())
            && let Some(seq) = frame["seq"].as_u64()
        {
            send_json(&mut bob.socket, json!({"type":"ack_upto","seq":seq})).await;
        }
    }
    eprintln!(
        "{kind}s while parked: bob received {} and was told {:?} missed",
        his.numbers.len(),
        his.gaps
    );
    assert!(
        !his.gaps.is_empty(),
        "a parked queue of {QUEUE_MAX_LENGTH} must drop some of {FLOOD}"
    );
    assert_eq!(
        his.accounted(),
        FLOOD,
        "received + missed = sent after his 10"
    );
}
