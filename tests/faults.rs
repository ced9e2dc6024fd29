//! Broker faults on a private RabbitMQ cluster (`scripts/rabbit-cluster`, three
//! nodes, or one for the restarts, beside the machine's broker, never touching
//! it), and a slow consumer on the machine's broker. Each test that breaks a
//! broker starts its own cluster on its own ports and stops it, whatever
//! happens. Every test prints its figures for `scripts/faults`.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fault::{env_count, millis, page_backoff, percentile, report, secs};
use common::process::Node;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// One private cluster at a time: three at once would starve a small
/// machine, and the tests measure timing.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A private three-node cluster, stopped on drop.
struct Cluster {
    env: Vec<(&'static str, String)>,
    urls: Vec<String>,
}

impl Cluster {
    /// Start `nodes` private nodes (3: a cluster; 1: a single broker).
    fn start(test: &str, nodes: usize) -> Cluster {
        // Ports away from the machine's broker and from other runs.
        let base = 6000 + (rand::random::<u16>() % 300) * 3;
        let env = vec![
            ("WARREN_RABBIT_NODES", nodes.to_string()),
            (
                "WARREN_RABBIT_DIR",
                format!("/tmp/warren-rabbit-{test}-{base}"),
            ),
            ("WARREN_RABBIT_BASE_PORT", base.to_string()),
            ("WARREN_RABBIT_NAME", format!("wf{base}-")),
        ];
        let out = Self::script(&env, &["start"]);
        let urls = String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(',')
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(urls.len(), nodes, "{out:?}");
        Cluster { env, urls }
    }

    fn script(env: &[(&'static str, String)], args: &[&str]) -> std::process::Output {
        let out = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/rabbit-cluster"
        ))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("scripts/rabbit-cluster runs");
        assert!(out.status.success(), "rabbit-cluster {args:?}: {out:?}");
        out
    }

    fn run(&self, args: &[&str]) {
        Self::script(&self.env, args);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/rabbit-cluster"
        ))
        .arg("stop")
        .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
        .output();
    }
}

/// Scenario 3 of issue 15: the broker freezes (SIGSTOP). Warren notices within
/// two heartbeats, turns not ready, tells its clients (1013), refuses new ones
/// without hanging, and serves again as soon as the broker thaws.
#[tokio::test]
async fn a_frozen_broker_is_noticed_and_service_returns_after_it_thaws() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("freeze", 3))
        .await
        .unwrap();
    let mut cfg = config(BusKind::Amqp, &unique_prefix("freeze"));
    cfg.amqp_url = Some(format!("{}?heartbeat=5", cluster.urls[0]));
    cfg.amqp_connections = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut before = connect(addr, "cold", "before").await;
    assert_eq!(get(addr, "/readyz").await.0, 200);

    cluster.run(&["freeze", "1"]);
    let frozen_at = Instant::now();
    while get(addr, "/readyz").await.0 != 503 {
        assert!(
            frozen_at.elapsed() < Duration::from_secs(15),
            "not noticed in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = frozen_at.elapsed();
    println!("frozen broker noticed after {noticed:?} (heartbeat 5 s)");
    assert!(
        noticed <= Duration::from_secs(11),
        "{noticed:?}: more than two heartbeats"
    );
    // The open session is told, and ends with 1013 (try again later).
    assert_eq!(close_code(&mut before.socket).await, Some(1013));
    // A new one is refused at once, not left hanging.
    let asked = Instant::now();
    let (status, body) = refused(addr, "room=cold&user=during", None).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "{:?}",
        asked.elapsed()
    );

    cluster.run(&["thaw", "1"]);
    let thawed_at = Instant::now();
    while get(addr, "/readyz").await.0 != 200 {
        assert!(
            thawed_at.elapsed() < Duration::from_secs(30),
            "not ready 30 s after the thaw"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_again = thawed_at.elapsed();
    println!("ready again {ready_again:?} after the thaw");
    let mut after = connect(addr, "cold", "after").await;
    send_json(
        &mut after.socket,
        json!({"type":"message","text":"warm again","ref":"w"}),
    )
    .await;
    let ack = next_matching(&mut after.socket, |f| f["ref"] == "w").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    server.shutdown().await;
    drop(cluster);
    report(json!({
        "scenario": 3,
        "title": "the broker freezes (SIGSTOP), heartbeat 5 s",
        "load": "1 client; a handshake during the freeze",
        "recovery": format!("noticed after {}; ready {} after the thaw", secs(noticed), secs(ready_again)),
        "notes": "open session told (unavailable, 1013); a new handshake refused 503 at once",
        "pass": true,
    }));
}

/// Scenario 2 of issue 15: the cluster node Warren is connected to is killed
/// (SIGKILL) while a sender chats. Its sessions are told (1013), reconnect at
/// once and land on the surviving nodes (Warren fails over along its URL
/// list); chat goes on. What was in the members' queues on the dead node is
/// lost (classic queues have no replica), and counted.
#[tokio::test]
async fn a_killed_cluster_node_moves_its_sessions_to_the_survivors() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("kill", 3))
        .await
        .unwrap();
    let mut cfg = config(BusKind::Amqp, &unique_prefix("kill"));
    cfg.amqp_url = Some(cluster.urls.join(","));
    let server = start(cfg).await;
    let addr = server.local_addr();
    let users: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let mut readers = Vec::new();
    for user in &users {
        readers.push(tokio::spawn(read_until_closed(
            connect(addr, "kill", user).await,
        )));
    }
    // Chat in flight when the node dies: a sender 20 times a second.
    let sending = tokio::spawn(send_until_closed(connect(addr, "kill", "sender").await));
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.run(&["kill", "1"]);
    let killed_at = Instant::now();
    // Every session is told to come back later...
    let mut received = Vec::new();
    let mut told = Duration::ZERO;
    for reader in readers {
        let (texts, code, closed_at) = reader.await.unwrap();
        assert_eq!(code, Some(1013));
        told = told.max(closed_at.saturating_duration_since(killed_at));
        received.push(texts);
    }
    let acked = sending.await.unwrap();
    // What the broker confirmed to the sender and a member never got: it was
    // in that member's queue on the killed node (classic queues, no replica).
    let lost: usize = received
        .iter()
        .map(|texts| acked.iter().filter(|t| !texts.contains(*t)).count())
        .sum();
    let deliveries = acked.len() * received.len();
    println!(
        "node killed: {} acked before it; {lost} of {deliveries} deliveries lost",
        acked.len()
    );
    // ...and comes back as soon as the node takes it again.
    let mut back = Vec::new();
    for user in &users {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let attempt =
                tokio_tungstenite::connect_async(ws_url(addr, &format!("room=kill&user={user}")))
                    .await;
            if let Ok((mut socket, _)) = attempt {
                let welcome = next_json(&mut socket).await;
                back.push(Client { socket, welcome });
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user} never got back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let all_back = killed_at.elapsed();
    println!("node killed: all 20 told after {told:?}, all back after {all_back:?}");
    // The room works again, for everyone.
    send_json(
        &mut back[0].socket,
        json!({"type":"message","text":"survived"}),
    )
    .await;
    for client in &mut back {
        let got = next_matching(&mut client.socket, |f| f["type"] == "message").await;
        assert_eq!(got["text"], "survived");
    }
    server.shutdown().await;
    drop(cluster);
    report(json!({
        "scenario": 2,
        "title": "a cluster node SIGKILLed (Warren has all 3 URLs)",
        "load": "20 clients in one room, one sender at 20 msg/s",
        "recovery": format!("all told (1013) {}, all back {}", secs(told), secs(all_back)),
        "lost": format!("{lost} of {deliveries}"),
        "notes": format!(
            "a sender at 20 msg/s: {} messages acked before the kill, {lost} of their {deliveries} deliveries never arrived (one still in a member's queue on the killed node goes with it); a message after it reached all 20",
            acked.len()
        ),
        "pass": true,
    }));
}

/// Every chat message text `client` receives until its connection ends: the
/// texts, its close code, and when it ended.
async fn read_until_closed(mut client: Client) -> (HashSet<String>, Option<u16>, Instant) {
    let mut texts = HashSet::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), client.socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let f: serde_json::Value = serde_json::from_str(&text).unwrap();
                if f["type"] == "message" {
                    texts.insert(f["text"].as_str().unwrap().to_owned());
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (texts, frame.map(|f| u16::from(f.code)), Instant::now());
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (texts, None, Instant::now()),
            Err(_) => panic!("a client's connection never ended"),
        }
    }
}

/// Send to the sender's room 20 times a second until its connection ends:
/// the texts the broker confirmed.
async fn send_until_closed(mut sender: Client) -> Vec<String> {
    let mut acked = Vec::new();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sent += 1;
                let frame = json!({"type":"message","text":format!("m{sent}"),"ref":format!("m{sent}")});
                if sender.socket.send(Message::text(frame.to_string())).await.is_err() {
                    return acked;
                }
            }
            frame = sender.socket.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let f: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if f["type"] == "ack" {
                        acked.push(f["ref"].as_str().unwrap().to_owned());
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return acked,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Scenario 4 of issue 15: a memory alarm (the watermark set absurdly low).
/// The broker blocks publishers: Warren reports itself not ready, a message
/// sent meanwhile is refused explicitly (`unavailable`, never silently
/// dropped), and service returns when the watermark is restored.
#[tokio::test]
async fn a_memory_alarm_refuses_publishes_explicitly_and_passes() {
    const SENDERS: usize = 20;
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("alarm", 3))
        .await
        .unwrap();
    let prefix = unique_prefix("alarm");
    // A process of its own: its memory is the node's alone.
    let node = Node::spawn(
        &prefix,
        "alarm-1",
        "127.0.0.1:0",
        &["--amqp-url", &cluster.urls[0]],
    );
    let addr = node.addr;
    let pid = node.child.id();
    let phase = Arc::new(AtomicUsize::new(CALM));
    let stop = CancellationToken::new();
    let peaks: Arc<[AtomicU64; RESTORED + 1]> = Arc::default();
    let sampler = tokio::spawn(sample_rss(pid, phase.clone(), peaks.clone(), stop.clone()));
    // Senders that keep trying through the alarm, as pages would.
    let senders: Vec<_> = (0..SENDERS)
        .map(|i| tokio::spawn(keep_sending(addr, i, stop.clone())))
        .collect();
    let mut client = connect(addr, "alarm", "a").await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    phase.store(ALARMED, Ordering::Relaxed);
    cluster.run(&["ctl", "1", "set_vm_memory_high_watermark", "0.0001"]);
    let alarmed_at = Instant::now();
    readyz_becomes(addr, 503).await;
    let seen = alarmed_at.elapsed();
    println!("memory alarm seen after {seen:?}");
    let sent_at = Instant::now();
    send_json(
        &mut client.socket,
        json!({"type":"message","text":"blocked?","ref":"b"}),
    )
    .await;
    let answer = next_matching(&mut client.socket, |f| f["ref"] == "b").await;
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert!(
        sent_at.elapsed() < Duration::from_secs(7),
        "refused after {:?}",
        sent_at.elapsed()
    );
    let refused_after = sent_at.elapsed();
    println!("a message during the alarm refused after {refused_after:?}");
    // The senders keep at it for a while under the alarm.
    tokio::time::sleep(Duration::from_secs(10)).await;

    cluster.run(&["ctl", "1", "set_vm_memory_high_watermark", "0.4"]);
    let restored_at = Instant::now();
    readyz_becomes(addr, 200).await;
    let ready_again = restored_at.elapsed();
    phase.store(RESTORED, Ordering::Relaxed);
    println!("ready again {ready_again:?} after the watermark was restored");
    let mut after = connect(addr, "alarm", "b").await;
    send_json(
        &mut after.socket,
        json!({"type":"message","text":"flowing","ref":"f"}),
    )
    .await;
    let ack = next_matching(&mut after.socket, |f| f["ref"] == "f").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (mut acked, mut refused) = (0, 0);
    for sender in senders {
        let (a, r) = sender.await.unwrap();
        acked += a;
        refused += r;
    }
    sampler.await.unwrap();
    drop(node);
    drop(cluster);

    let rss = |p: usize| peaks[p].load(Ordering::Relaxed);
    println!(
        "memory alarm: {SENDERS} senders, {acked} acked, {refused} refused; node peak RSS {} KiB before, {} KiB during, {} KiB after",
        rss(CALM),
        rss(ALARMED),
        rss(RESTORED)
    );
    assert!(refused > 0, "the senders met the alarm");
    // Bounded: sends that cannot be published are refused, not queued up.
    assert!(
        rss(ALARMED) <= rss(CALM) + 32 * 1024,
        "RSS {} → {} KiB during the alarm",
        rss(CALM),
        rss(ALARMED)
    );
    report(json!({
        "scenario": 4,
        "title": "a memory alarm (watermark 0.0001)",
        "load": format!("{SENDERS} clients sending 10 msg/s each, and one probe"),
        "recovery": format!("alarm seen {}; ready {} after the restore", secs(seen), secs(ready_again)),
        "rss": format!(
            "node peak {} MiB before, {} MiB during, {} MiB after",
            rss(CALM) / 1024,
            rss(ALARMED) / 1024,
            rss(RESTORED) / 1024
        ),
        "notes": format!(
            "a message during the alarm refused (unavailable) after {}; {acked} acked, {refused} refused in all",
            secs(refused_after)
        ),
        "pass": true,
    }));
}

/// Sample `pid`'s RSS every 100 ms until `stop`, keeping each phase's peak
/// (the phase being `phase`'s index into `peaks`).
async fn sample_rss<const N: usize>(
    pid: u32,
    phase: Arc<AtomicUsize>,
    peaks: Arc<[AtomicU64; N]>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_millis(100));
    while !stop.is_cancelled() {
        every.tick().await;
        if let Some(rss) = common::process::rss_kib(pid) {
            peaks[phase.load(Ordering::Relaxed)].fetch_max(rss, Ordering::Relaxed);
        }
    }
}

/// Scenario 4's phases, for the node's RSS.
const CALM: usize = 0;
const ALARMED: usize = 1;
const RESTORED: usize = 2;

/// Send to room `alarm` ten times a second until `stop`, reconnecting (after a
/// pause) whenever the connection ends or is refused: what was acked and what
/// was refused `unavailable`.
async fn keep_sending(addr: std::net::SocketAddr, i: usize, stop: CancellationToken) -> (u64, u64) {
    let (mut acked, mut refused) = (0, 0);
    let url = ws_url(addr, &format!("room=alarm&user=s{i}"));
    while !stop.is_cancelled() {
        let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = socket.close(None).await;
                    break;
                }
                _ = tick.tick() => {
                    let frame = json!({"type":"message","text":"x","ref":"r"});
                    if socket.send(Message::text(frame.to_string())).await.is_err() {
                        break;
                    }
                }
                frame = socket.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let f: serde_json::Value = serde_json::from_str(&text).unwrap();
                        match (f["type"].as_str(), f["code"].as_str()) {
                            (Some("ack"), _) => acked += 1,
                            (Some("error"), Some("unavailable")) => refused += 1,
                            _ => {}
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (acked, refused)
}

// ---------------------------------------------------------------------------
// Scenario 1: broker restarts under chat

/// How long a receiver must have stayed connected past a message's ack for
/// the message to count as lost if it never arrived. A session closed sooner
/// was cut by the restart itself, which deletes its queue and whatever waits
/// in it: at most once, as docs/PROTOCOL.md says, and the client was told.
const GRACE: Duration = Duration::from_secs(1);

/// One connection of a chatting client, from its `welcome` to its end.
struct ChatSession {
    opened: Instant,
    /// When it ended, and whether the test ended it (not a fault).
    closed: Instant,
    by_the_test: bool,
    close_code: Option<u16>,
    /// An `unavailable` error frame without a `ref` came first: the node lost
    /// its broker and said so.
    told: bool,
    received: HashSet<String>,
    duplicates: usize,
}

/// A message the broker confirmed to its sender.
struct Acked {
    id: String,
    sent_at: Instant,
    acked_at: Instant,
}

/// What one chatting client saw over the whole run.
#[derive(Default)]
struct ChatLog {
    sessions: Vec<ChatSession>,
    acked: Vec<Acked>,
    /// Sends answered `unavailable`: refused explicitly.
    refused: usize,
    /// Sends with no answer when their socket closed: the client knows they
    /// are unconfirmed (docs/PROTOCOL.md, close codes).
    unconfirmed: usize,
    /// Handshakes answered 503 (or 409) while the broker was away.
    handshakes_refused: usize,
}

/// What a chatting client tells the test as it happens.
enum ChatEvent {
    Welcome(usize),
    Closed(usize, Instant),
    /// A `resume-*` marker arrived.
    Marker(usize, String),
    /// Asked to stop sending, it has every answer it waits for.
    Settled(usize),
}

/// One of the room's clients: sends a message with a `ref` every second,
/// records acks, refusals and deliveries, and reconnects as the page does.
async fn chatter(
    i: usize,
    addr: std::net::SocketAddr,
    events: tokio::sync::mpsc::UnboundedSender<ChatEvent>,
    quiet: CancellationToken,
    stop: CancellationToken,
) -> ChatLog {
    let url = ws_url(addr, &format!("room=restart&user=c{i}"));
    let mut log = ChatLog::default();
    let mut attempt = 0;
    let mut sent = 0u64;
    loop {
        if !log.sessions.is_empty() || attempt > 0 {
            tokio::select! {
                _ = stop.cancelled() => return log,
                _ = tokio::time::sleep(page_backoff(attempt)) => {}
            }
            attempt += 1;
        }
        let mut socket = match tokio_tungstenite::connect_async(&url).await {
            Ok((socket, _)) => socket,
            Err(tungstenite::Error::Http(r)) if matches!(r.status().as_u16(), 409 | 503) => {
                log.handshakes_refused += 1;
                attempt = attempt.max(1);
                continue;
            }
            Err(e) => panic!("c{i}: {e}"),
        };
        let welcome = next_json(&mut socket).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        attempt = 0;
        let mut session = ChatSession {
            opened: Instant::now(),
            closed: Instant::now(),
            by_the_test: false,
            close_code: None,
            told: false,
            received: HashSet::new(),
            duplicates: 0,
        };
        let _ = events.send(ChatEvent::Welcome(i));
        let mut pending: HashMap<String, Instant> = HashMap::new();
        let mut settled = false;
        let first =
            tokio::time::Instant::now() + Duration::from_millis(rand::random_range(0..1000));
        let mut tick = tokio::time::interval_at(first, Duration::from_secs(1));
        loop {
            if quiet.is_cancelled() && pending.is_empty() && !settled {
                settled = true;
                let _ = events.send(ChatEvent::Settled(i));
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = socket.close(None).await;
                    session.by_the_test = true;
                    break;
                }
                _ = tick.tick(), if !quiet.is_cancelled() => {
                    sent += 1;
                    let reference = sent.to_string();
                    let frame = json!({"type":"message","text":format!("c{i} #{sent}"),"ref":reference});
                    // A failed send shows up as the socket's end, read next.
                    if socket.send(Message::text(frame.to_string())).await.is_ok() {
                        pending.insert(reference, Instant::now());
                    }
                }
                frame = socket.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let f: serde_json::Value = serde_json::from_str(&text).unwrap();
                        let reference = f["ref"].as_str().unwrap_or_default();
                        match f["type"].as_str() {
                            Some("ack") => {
                                let sent_at = pending.remove(reference).expect("an ack for a send");
                                log.acked.push(Acked {
                                    id: f["id"].as_str().unwrap().to_owned(),
                                    sent_at,
                                    acked_at: Instant::now(),
                                });
                            }
                            Some("error") if f["code"] == "unavailable" => {
                                if pending.remove(reference).is_some() {
                                    log.refused += 1;
                                } else {
                                    session.told = true;
                                }
                            }
                            Some("error") => panic!("c{i}: unexpected {f}"),
                            Some("message") => {
                                let id = f["id"].as_str().unwrap().to_owned();
                                if !session.received.insert(id) {
                                    session.duplicates += 1;
                                }
                                let text = f["text"].as_str().unwrap();
                                if text.starts_with("resume-") {
                                    let _ = events.send(ChatEvent::Marker(i, text.to_owned()));
                                }
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        session.close_code = frame.map(|f| u16::from(f.code));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
        session.closed = Instant::now();
        log.unconfirmed += pending.len();
        let by_the_test = session.by_the_test;
        log.sessions.push(session);
        if by_the_test {
            return log;
        }
        let _ = events.send(ChatEvent::Closed(i, Instant::now()));
    }
}

/// The test's view of the room, built from the clients' events.
struct RoomView {
    events: tokio::sync::mpsc::UnboundedReceiver<ChatEvent>,
    connected: Vec<bool>,
    last_closed: Option<Instant>,
    markers: HashMap<String, HashSet<usize>>,
    settled: HashSet<usize>,
}

impl RoomView {
    /// Take events until `done` holds; fails after `limit`.
    async fn until(&mut self, what: &str, limit: Duration, done: impl Fn(&RoomView) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"))
                .expect("clients are running");
            match event {
                ChatEvent::Welcome(i) => self.connected[i] = true,
                ChatEvent::Closed(i, at) => {
                    self.connected[i] = false;
                    self.last_closed = Some(at);
                }
                ChatEvent::Marker(i, text) => {
                    self.markers.entry(text).or_default().insert(i);
                }
                ChatEvent::Settled(i) => {
                    self.settled.insert(i);
                }
            }
        }
    }

    fn all_connected(&self) -> bool {
        self.connected.iter().all(|c| *c)
    }

    fn none_connected(&self) -> bool {
        self.connected.iter().all(|c| !*c)
    }

    fn marker_seen_by_all(&self, marker: &str) -> bool {
        self.markers
            .get(marker)
            .is_some_and(|who| who.len() == self.connected.len())
    }
}

/// Post `marker` to the room through the server API and wait until every
/// client has it. Each session's queue is FIFO, so whatever was acked before
/// the marker was posted has reached a client that has the marker.
async fn marker_round(view: &mut RoomView, addr: std::net::SocketAddr, marker: &str) {
    assert_eq!(api_post(addr, "restart", None, marker).await, 202);
    view.until(marker, WAIT, |v| v.marker_seen_by_all(marker))
        .await;
}

async fn readyz_becomes(addr: std::net::SocketAddr, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while get(addr, "/readyz").await.0 != status {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Scenario 1 of issue 15: the broker restarted (`stop_app`, `start_app`)
/// again and again (3 times here, 20 from scripts/faults) under 50 clients
/// chatting on two Warren nodes. Each time every session is told
/// (`unavailable`, 1013), every node reconnects by itself, the clients come
/// back with the page's backoff and chat resumes; no message acked to its
/// sender goes missing at a receiver that stayed connected, none arrives
/// twice.
#[tokio::test]
async fn broker_restarts_under_chat_lose_no_acked_message() {
    const CLIENTS: usize = 50;
    let restarts = env_count("WARREN_FAULTS_RESTARTS", 3);
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("restart", 1))
        .await
        .unwrap();
    let prefix = unique_prefix("restart");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut cfg = config(BusKind::Amqp, &prefix);
        cfg.amqp_url = Some(cluster.urls[0].clone());
        nodes.push(start(cfg).await);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.local_addr()).collect();
    // Unbounded: a recorder, read by the test between broker commands; a
    // bound would slow the clients down while it waits for rabbitmqctl.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let quiet = CancellationToken::new();
    let stop = CancellationToken::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(chatter(
                i,
                addrs[i % 2],
                tx.clone(),
                quiet.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut view = RoomView {
        events: rx,
        connected: vec![false; CLIENTS],
        last_closed: None,
        markers: HashMap::new(),
        settled: HashSet::new(),
    };
    view.until(
        "all connected",
        Duration::from_secs(30),
        RoomView::all_connected,
    )
    .await;
    marker_round(&mut view, addrs[0], "resume-start").await;

    let mut told_after = Vec::new();
    let mut ready_after = Vec::new();
    let mut recovered = Vec::new();
    for round in 0..restarts {
        // Chat a while: the load between faults, not a wait for an event.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stopped_at = Instant::now();
        let ctl = cluster.env.clone();
        tokio::task::spawn_blocking(move || Cluster::script(&ctl, &["ctl", "1", "stop_app"]))
            .await
            .unwrap();
        view.until(
            "all told",
            Duration::from_secs(30),
            RoomView::none_connected,
        )
        .await;
        told_after.push(view.last_closed.unwrap() - stopped_at);
        for addr in &addrs {
            readyz_becomes(*addr, 503).await;
        }

        let ctl = cluster.env.clone();
        tokio::task::spawn_blocking(move || Cluster::script(&ctl, &["ctl", "1", "start_app"]))
            .await
            .unwrap();
        let back_at = Instant::now();
        for addr in &addrs {
            readyz_becomes(*addr, 200).await;
        }
        ready_after.push(back_at.elapsed());
        view.until("all back", Duration::from_secs(60), RoomView::all_connected)
            .await;
        marker_round(&mut view, addrs[round % 2], &format!("resume-{round}")).await;
        recovered.push(back_at.elapsed());
        println!(
            "restart {}: all told {:?} after stop_app; after start_app, nodes ready {:?}, chat resumed {:?}",
            round + 1,
            told_after[round],
            ready_after[round],
            recovered[round]
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    quiet.cancel();
    view.until("settled", WAIT, |v| v.settled.len() == CLIENTS)
        .await;
    marker_round(&mut view, addrs[1], "resume-end").await;
    stop.cancel();
    let mut logs = Vec::new();
    for client in clients {
        logs.push(client.await.unwrap());
    }
    for node in nodes {
        node.shutdown().await;
    }
    drop(cluster);

    // Every acked message, at every session that was open before it was sent
    // and stayed open GRACE past its ack (or to the end).
    let sessions: Vec<&ChatSession> = logs.iter().flat_map(|l| &l.sessions).collect();
    let acked: Vec<&Acked> = logs.iter().flat_map(|l| &l.acked).collect();
    let (mut checked, mut lost, mut cut) = (0, 0, 0);
    let mut lost_messages = HashSet::new();
    let mut nowhere = 0;
    for m in &acked {
        let mut anywhere = false;
        for s in &sessions {
            let got = s.received.contains(&m.id);
            anywhere |= got;
            // Only sessions in the room when it was sent.
            if s.opened >= m.sent_at || s.closed <= m.sent_at {
                continue;
            }
            if s.by_the_test || s.closed >= m.acked_at + GRACE {
                checked += 1;
                if !got {
                    lost += 1;
                    lost_messages.insert(&m.id);
                }
            } else if !got {
                cut += 1;
            }
        }
        if !anywhere {
            nowhere += 1;
        }
    }
    let duplicated: usize = sessions.iter().map(|s| s.duplicates).sum();
    let faulted: Vec<&&ChatSession> = sessions.iter().filter(|s| !s.by_the_test).collect();
    let told_1013 = faulted
        .iter()
        .filter(|s| s.told && s.close_code == Some(1013))
        .count();
    let refused: usize = logs.iter().map(|l| l.refused).sum();
    let unconfirmed: usize = logs.iter().map(|l| l.unconfirmed).sum();
    let handshakes: usize = logs.iter().map(|l| l.handshakes_refused).sum();
    let mut sorted = recovered.clone();
    let median = percentile(&mut sorted, 50.0);
    let max = percentile(&mut sorted, 100.0);
    let told_max = percentile(&mut told_after, 100.0);
    let ready_median = percentile(&mut ready_after, 50.0);
    let ready_max = percentile(&mut ready_after, 100.0);
    println!(
        "{restarts} restarts, {CLIENTS} clients: {} acked, {checked} deliveries checked, \
         {lost} lost, {duplicated} duplicated; {cut} deliveries cut by a restart, \
         {nowhere} acked messages delivered nowhere; {refused} sends refused, \
         {unconfirmed} unconfirmed at a close, {handshakes} handshakes refused; \
         {told_1013} of {} faulted sessions told (unavailable + 1013); \
         recovery median {median:?}, max {max:?} (nodes ready median {ready_median:?})",
        acked.len(),
        faulted.len(),
    );
    assert_eq!(faulted.len(), CLIENTS * restarts, "one fault per session");
    assert_eq!(told_1013, faulted.len(), "every session told");
    assert_eq!(lost, 0, "acked but never delivered: {lost_messages:?}");
    assert_eq!(duplicated, 0);
    assert!(acked.len() > CLIENTS * restarts, "the clients chatted");
    report(json!({
        "scenario": 1,
        "title": "broker restart (stop_app/start_app), one private node",
        "load": format!("{CLIENTS} clients on 2 Warren nodes, 1 msg/s each, {restarts} restarts"),
        "recovery": format!(
            "chat resumed after start_app: median {}, max {} (nodes ready: median {}, max {}); \
             all told within {} of stop_app",
            secs(median), secs(max), secs(ready_median), secs(ready_max), secs(told_max)
        ),
        "lost": lost,
        "duplicated": duplicated,
        "notes": format!(
            "{} acked, {checked} deliveries checked; {cut} deliveries cut by a restart \
             (queue deleted with the broker, receiver told), {nowhere} acked delivered nowhere; \
             {refused} sends refused (unavailable), {unconfirmed} unanswered at a 1013 close, \
             {handshakes} handshakes refused 503",
            acked.len()
        ),
        "pass": lost == 0 && duplicated == 0 && nowhere == 0,
    }));
}

// ---------------------------------------------------------------------------
// Scenario 7: a slow consumer

/// Phases of the slow-consumer run, for the latency and memory figures.
const WARMING: usize = 0;
const WITHOUT_SLOW: usize = 1;
const WITH_SLOW: usize = 2;
const AFTER: usize = 3;

/// A client of the busy room that keeps reading: sends a message stamped
/// with the time every 100 ms, and records how long each message it receives
/// took, by the phase it arrived in.
async fn pace_keeper(
    i: usize,
    addr: std::net::SocketAddr,
    epoch: Instant,
    phase: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> Vec<Vec<Duration>> {
    let mut client = connect(addr, "busy", &format!("p{i}")).await;
    let mut latencies = vec![Vec::new(); AFTER + 1];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Near the largest text (4 KiB): the room moves about 400 KiB/s to each
    // reader, so a stalled socket fills within seconds.
    let padding = "x".repeat(3900);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return latencies,
            _ = tick.tick() => {
                let text = format!("{} {padding}", epoch.elapsed().as_micros());
                send_json(&mut client.socket, json!({"type":"message","text":text})).await;
            }
            frame = client.socket.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let f: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if f["type"] == "message" {
                        let stamp = f["text"].as_str().unwrap().split(' ').next().unwrap();
                        let sent = Duration::from_micros(stamp.parse().unwrap());
                        latencies[phase.load(Ordering::Relaxed)].push(epoch.elapsed() - sent);
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("p{i}: {other:?}"),
            }
        }
    }
}

/// Scenario 7 of issue 15: a client that stops reading in a busy room. The
/// node stops writing to it once its socket is full, drops it when a write has
/// waited `WRITE_TIMEOUT` (10 s), and deletes its queue; meanwhile the node's
/// memory stays bounded (the queue on the broker is capped, drop-head, and
/// the node holds at most a prefetch window per session) and the other
/// clients keep their pace.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_the_room_keeps_its_pace() {
    const READERS: usize = 10;
    let _turn = ONE_AT_A_TIME.lock().await;
    let prefix = unique_prefix("slow");
    // A process of its own: its memory is the node's alone.
    // No resume grace: the node's giving up shows as the client leaving the
    // room at once, not when its queue's grace would end.
    let args = [
        "--publish-rate",
        "1000",
        "--publish-burst",
        "1000",
        "--resume-grace-secs",
        "0",
    ];
    let node = Node::spawn(&prefix, "slow-1", "127.0.0.1:0", &args);
    let addr = node.addr;
    let pid = node.child.id();
    let epoch = Instant::now();
    let phase = Arc::new(AtomicUsize::new(WARMING));
    let stop = CancellationToken::new();
    let peaks: Arc<[AtomicU64; AFTER + 1]> = Arc::default();
    let sampler = tokio::spawn(sample_rss(pid, phase.clone(), peaks.clone(), stop.clone()));
    let readers: Vec<_> = (0..READERS)
        .map(|i| tokio::spawn(pace_keeper(i, addr, epoch, phase.clone(), stop.clone())))
        .collect();
    // The room's pace, without the slow client (the first second warms up).
    tokio::time::sleep(Duration::from_secs(1)).await;
    phase.store(WITHOUT_SLOW, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(6)).await;

    // A client with a small receive buffer (a phone on a bad link) joins and
    // never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut slow, _) =
        tokio_tungstenite::client_async(ws_url(addr, "room=busy&user=slow"), stream)
            .await
            .unwrap();
    let welcome = slow.next().await.unwrap().unwrap();
    assert!(
        welcome.to_text().unwrap().contains("welcome"),
        "{welcome:?}"
    );
    phase.store(WITH_SLOW, Ordering::Relaxed);
    let stopped_reading = Instant::now();
    // The node gives up on it: it leaves the room...
    let deadline = stopped_reading + Duration::from_secs(60);
    loop {
        let (_, _, members) = get(addr, "/rooms/busy/members").await;
        if !members.contains("\"slow\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow client was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped_after = stopped_reading.elapsed();
    phase.store(AFTER, Ordering::Relaxed);
    // ...and its connection ends (no close frame: it would not be read).
    while let Some(Ok(_)) = tokio::time::timeout(WAIT, slow.next())
        .await
        .expect("the slow client's socket ends")
    {}
    stop.cancel();
    let mut latencies = vec![Vec::new(); AFTER + 1];
    for reader in readers {
        for (phase, samples) in reader.await.unwrap().into_iter().enumerate() {
            latencies[phase].extend(samples);
        }
    }
    sampler.await.unwrap();
    drop(node);

    let (without, with) = (WITHOUT_SLOW, WITH_SLOW);
    let p50 = |p: usize| percentile(&mut latencies[p].clone(), 50.0);
    let p99 = |p: usize| percentile(&mut latencies[p].clone(), 99.0);
    let rss = |p: usize| peaks[p].load(Ordering::Relaxed);
    println!(
        "slow consumer: dropped {dropped_after:?} after it stopped reading; \
         others' p50/p99 {:?}/{:?} without it ({} samples), {:?}/{:?} with it ({} samples); \
         node peak RSS {} KiB without, {} KiB with",
        p50(without),
        p99(without),
        latencies[without].len(),
        p50(with),
        p99(with),
        latencies[with].len(),
        rss(without),
        rss(with),
    );
    assert!(dropped_after < Duration::from_secs(40), "{dropped_after:?}");
    // Generous: the two phases run one after the other on a shared 2-core
    // machine, where other builds come and go (2× + 50 ms failed once so, at
    // a load average of 6). A room held up by the slow client would wait for
    // its 10 s write timeout. scripts/faults judges the issue's 2× itself.
    assert!(
        p99(with) <= p99(without) * 2 + Duration::from_millis(500),
        "p99 {:?} without, {:?} with",
        p99(without),
        p99(with)
    );
    assert!(
        rss(with) <= rss(without) + 32 * 1024,
        "RSS {} → {} KiB",
        rss(without),
        rss(with)
    );
    report(json!({
        "scenario": 7,
        "title": "a slow consumer (stops reading, 4 KiB receive buffer)",
        "load": format!("{READERS} clients × 10 msg/s of 4 KiB in one room"),
        "recovery": format!("slow client dropped {} after it stopped reading", secs(dropped_after)),
        "rss": format!("node peak {} MiB without, {} MiB with", rss(without) / 1024, rss(with) / 1024),
        "notes": format!(
            "others' p50/p99 {}/{} without, {}/{} with",
            millis(p50(without)), millis(p99(without)), millis(p50(with)), millis(p99(with))
        ),
        "pass": p99(with) <= p99(without) * 2,
    }));
}
