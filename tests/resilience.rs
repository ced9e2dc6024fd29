//! Resilience: a broker that stops reading, a client that stalls an upload or
//! falls behind, a forged sender, a garbled header. Each test was written against
//! a bug found in review and failed until it was fixed. Every test uses its own
//! prefix and 127.0.0.1 only.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, _, body) = get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// 1. Shutdown waits forever for an HTTP request whose body never finishes.

#[tokio::test]
async fn shutdown_is_not_held_hostage_by_a_stalled_request_body() {
    let server = start(config(BusKind::Memory, &unique_prefix("rfstall"))).await;
    let addr = server.local_addr();
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        format!(
            "POST /rooms/r/messages HTTP/1.1\r\nhost: {addr}\r\n\
             content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"user\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The handler is now waiting for the rest of the body, which never comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    drop(raw);
    assert!(
        stopped.is_ok(),
        "shutdown (SIGINT, or the end of a SIGTERM drain) hung on one client that \
         stopped sending its POST body"
    );
}

// ---------------------------------------------------------------------------
// 2. warren_publish_in_flight leaks when a session ends with confirms pending.

#[tokio::test]
async fn publish_in_flight_returns_to_zero_after_a_session_ends_mid_burst() {
    let server = start(config(BusKind::Amqp, &unique_prefix("rfinflight"))).await;
    let addr = server.local_addr();
    let mut c = connect(addr, "inflight", "burst").await;
    for i in 0..1000 {
        c.socket
            .feed(Message::text(
                json!({"type":"message","text":format!("{i}"),"ref":format!("r{i}")}).to_string(),
            ))
            .await
            .unwrap();
    }
    // Close right behind the burst: the session reads the Close while most
    // confirms are still on their way.
    c.socket.close(None).await.unwrap();
    drop(c);
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(addr, r#"warren_connections{transport="ws"}"#).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "session never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_flight = metric(addr, "warren_publish_in_flight").await;
    server.shutdown().await;
    assert_eq!(
        in_flight, 0.0,
        "no session is open, yet the gauge says {in_flight} publishes await a confirm"
    );
}

// ---------------------------------------------------------------------------
// 3. A session busy with deliveries misses presence frames (Lagged is only
//    logged), and since presence is diff-only its member list stays wrong.

#[tokio::test]
async fn a_busy_session_ends_up_with_the_right_member_list() {
    let mut cfg = config(BusKind::Memory, &unique_prefix("rflag"));
    cfg.presence_batch_ms = 10;
    cfg.max_text_bytes = 60_000;
    cfg.max_frame_bytes = 65_536;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let http = reqwest::Client::new();
    let post = |text: String| {
        http.post(format!("http://{addr}/api/rooms/lag/messages"))
            .bearer_auth(TEST_API_KEY)
            .json(&json!({"from": "flooder", "text": text}))
            .send()
    };

    let mut watcher = connect(addr, "lag", "watcher").await;
    let mut members = names(&watcher.welcome["members"]);
    let gone = connect(addr, "lag", "gone").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !members.contains("gone") {
        let f = tokio::time::timeout_at(deadline, next_frame(&mut watcher.socket))
            .await
            .expect("gone's join");
        if f["type"] == "presence" {
            apply_presence(&mut members, &f);
        }
    }

    // The watcher stops reading for ~4 s (well under the 10 s write timeout)
    // while the room is busy: its session sits in a blocked write.
    let big = "x".repeat(60_000);
    for _ in 0..150 {
        assert_eq!(post(big.clone()).await.unwrap().status().as_u16(), 202);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(gone);
    let _early = connect(addr, "lag", "early").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..70 {
        let c = connect(addr, "lag", &format!("churn{i}")).await;
        tokio::time::sleep(Duration::from_millis(15)).await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert_eq!(post("sync".into()).await.unwrap().status().as_u16(), 202);

    // Catch up, then let the last flushes arrive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let f = tokio::time::timeout_at(deadline, next_frame(&mut watcher.socket))
            .await
            .expect("catching up");
        match f["type"].as_str() {
            Some("presence") => apply_presence(&mut members, &f),
            Some("message") if f["text"] == "sync" => break,
            _ => {}
        }
    }
    let settle = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(f) = tokio::time::timeout_at(settle, next_frame(&mut watcher.socket)).await {
        if f["type"] == "presence" {
            apply_presence(&mut members, &f);
        }
    }
    let (_, _, body) = get(addr, "/rooms/lag/members").await;
    let truth = names(&serde_json::from_str::<Value>(&body).unwrap()["members"]);
    server.shutdown().await;
    assert_eq!(
        members, truth,
        "the watcher's member list (welcome + presence diffs) diverged from /members"
    );
}

// ---------------------------------------------------------------------------
// 4. HTTP publishing lets anyone speak as a user who is connected right now.

#[tokio::test]
async fn http_publish_cannot_speak_for_a_connected_user() {
    let server = start(config(BusKind::Memory, &unique_prefix("rfspoof"))).await;
    let addr = server.local_addr();
    let mut alice = connect(addr, "bank", "alice").await;
    let mut bob = connect(addr, "bank", "bob").await;
    let http = reqwest::Client::new();
    let room = http
        .post(format!("http://{addr}/rooms/bank/messages"))
        .json(&json!({"user": "alice", "text": "bob, send the money to mallory"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let direct = http
        .post(format!("http://{addr}/users/bob/messages"))
        .json(&json!({"from": "alice", "text": "it's me, alice"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let _ = (&mut alice, &mut bob);
    server.shutdown().await;
    assert_ne!(
        room, 202,
        "a request with no credential published as the connected user alice"
    );
    assert_ne!(direct, 202, "… and sent a direct message as alice");
}

// ---------------------------------------------------------------------------
// 5/6. A broker that stops reading (memory/disk alarm → connection.blocked, or
//      a half-open network path): nothing on the shutdown path has a deadline.

/// A TCP proxy to the local broker whose client→broker direction can be frozen:
/// the broker "stops reading", as RabbitMQ does to a blocked publisher.
struct FreezingProxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl FreezingProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(broker) = TcpStream::connect("127.0.0.1:5672").await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut br, mut bw) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut br, &mut cw).await;
                });
                let f = f.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        if f.load(Ordering::SeqCst) {
                            // Stop reading; keep both sockets open.
                            std::future::pending::<()>().await;
                        }
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if f.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await;
                        }
                        if bw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FreezingProxy { addr, frozen }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// A configuration whose one broker connection runs through this proxy.
    fn config(&self, test: &str) -> warren::config::Config {
        let mut cfg = config(BusKind::Amqp, &unique_prefix(test));
        cfg.amqp_url = Some(self.url());
        cfg.amqp_connections = 1;
        cfg
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn shutdown_completes_when_the_broker_stops_answering() {
    let proxy = FreezingProxy::start().await;
    let cfg = proxy.config("rffrozen");
    let server = start(cfg).await;
    let mut c = connect(server.local_addr(), "frozen", "f1").await;
    proxy.freeze();
    let stopping = tokio::spawn(server.shutdown());
    // The session itself says goodbye (1001) ...
    assert_eq!(close_code(&mut c.socket).await, Some(1001));
    // ... but then waits, without a deadline, for queue.delete-ok, then the
    // presence goodbye, then connection.close-ok.
    let done = tokio::time::timeout(Duration::from_secs(15), stopping).await;
    assert!(
        done.is_ok(),
        "shutdown still running 15 s after the broker stopped answering"
    );
}

#[tokio::test]
async fn a_publish_the_broker_cannot_take_does_not_wedge_the_session() {
    let proxy = FreezingProxy::start().await;
    let mut cfg = proxy.config("rfwedge");
    cfg.max_text_bytes = 60_000;
    cfg.max_frame_bytes = 65_536;
    let server = start(cfg).await;
    let c = connect(server.local_addr(), "wedge", "w1").await;
    let (mut tx, mut rx) = c.socket.split();
    // Keep reading, so the echoes never block the session's writes.
    let (code_tx, code_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let code = loop {
            match rx.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => break None,
            }
        };
        let _ = code_tx.send(code);
    });
    proxy.freeze();
    // ~9 MB of publishes: more than the kernel buffers between lapin and the
    // frozen broker hold, so one `basic_publish(..).await` never resolves.
    let big = json!({"type":"message","text":"y".repeat(60_000)}).to_string();
    tokio::spawn(async move {
        for _ in 0..150 {
            if tx.send(Message::text(big.clone())).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Shutdown's first step is the session's 1001; a session parked inside
    // `publisher.publish(..).await` never gets back to its select! to see it.
    let _stopping = tokio::spawn(server.shutdown());
    match tokio::time::timeout(Duration::from_secs(8), code_rx).await {
        Ok(code) => assert_eq!(code.unwrap(), Some(1001), "the socket ended without 1001"),
        Err(_) => panic!("no close within 8 s of shutdown: the session is stuck in a publish"),
    }
}

/// A handshake subscribes (declares and binds a queue) and an HTTP POST waits
/// for the broker's confirm: with the broker no longer reading, both must give
/// up within the broker timeout and say `unavailable`, not hang.
#[tokio::test]
async fn a_handshake_and_a_post_give_up_when_the_broker_stops_answering() {
    let proxy = FreezingProxy::start().await;
    let cfg = proxy.config("rfhang");
    let server = start(cfg).await;
    let addr = server.local_addr();
    // Before the freeze, both work.
    let first = connect(addr, "hang", "h1").await;
    proxy.freeze();

    let began = std::time::Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(9),
        refused(addr, "room=hang&user=h2", None),
    )
    .await
    .expect("the handshake hung on a broker that stopped answering");
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));

    // A POST with a posting token asks the broker whether its session lives.
    let post = reqwest::Client::new()
        .post(format!("http://{addr}/rooms/hang/messages"))
        .json(&json!({"user": "h1", "text": "anyone?", "token": first.welcome["token"]}))
        .send();
    let response = tokio::time::timeout(Duration::from_secs(9), post)
        .await
        .expect("the POST hung on a broker that stopped answering")
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    // Both waited for the broker, not longer than its bound each.
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );
    let _stopping = tokio::spawn(server.shutdown());
}

/// Send raw bytes, read the answer until the server closes.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut answer))
        .await
        .expect("the server closes after refusing an unreadable request")
        .unwrap();
    String::from_utf8(answer).unwrap()
}

/// hyper refuses a request head it cannot parse before any route runs; the
/// answer must still carry the JSON error body the docs promise.
#[tokio::test]
async fn requests_that_are_not_http_get_the_json_error_body() {
    let server = start(config(BusKind::Memory, &unique_prefix("rfparse"))).await;
    let addr = server.local_addr();
    let post = |length: &str| {
        format!("POST /rooms/r/messages HTTP/1.1\r\nhost: x\r\n{length}\r\n\r\n").into_bytes()
    };
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (post("content-length: abc"), "400", "invalid_request"),
        (post("content-length: -1"), "400", "invalid_request"),
        (
            post("content-length: 5\r\ncontent-length: 6"),
            "400",
            "invalid_request",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            "414",
            "uri_too_long",
        ),
    ];
    for (request, status, code) in cases {
        let answer = raw_exchange(addr, &request).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert_eq!(body["code"], code, "{body}");
        assert!(body["message"].is_string());
    }
    // A good request before a bad one on the same connection is answered as usual.
    let answer = raw_exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\ncontent-length: -3\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(r#""code":"invalid_request","message":"the request is not valid HTTP/1.1 (check its request line and Content-Length)"}"#), "{answer}");
    assert_eq!(
        metric(addr, r#"warren_errors_total{code="invalid_request"}"#).await,
        4.0
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 7. An Origin header warp cannot read as a str (obs-text bytes) is answered
//    404 not_found by the rejection handler, not 403 origin_not_allowed.

#[tokio::test]
async fn an_unreadable_origin_is_refused_as_origin_not_allowed() {
    let server = start(config(BusKind::Memory, &unique_prefix("rforigin"))).await;
    let addr = server.local_addr();
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut request =
        format!("GET /ws?user=o HTTP/1.1\r\nhost: {addr}\r\norigin: http://ev").into_bytes();
    request.push(0xe9);
    request.extend_from_slice(b"il.example\r\nconnection: close\r\n\r\n");
    raw.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    server.shutdown().await;
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("origin_not_allowed"),
        "{answer}"
    );
}

// ---------------------------------------------------------------------------
// 8. Deliveries are acknowledged in batches (one `multiple` ack per 64, see
//    src/bus/amqp.rs). A room that goes quiet must still acknowledge what it
//    delivered: unacked deliveries hold prefetch credit, and past RabbitMQ's
//    consumer timeout (30 minutes) the broker closes the session's channel.

/// Unacknowledged messages of `queue`, as `rabbitmqctl` reports them.
fn unacked(queue: &str) -> u64 {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_unacknowledged",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl runs (scripts/test installs RabbitMQ)");
    assert!(out.status.success(), "rabbitmqctl failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == queue).then(|| fields.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("queue {queue} is not listed"))
}

#[tokio::test]
async fn a_room_that_goes_quiet_acknowledges_what_it_delivered() {
    let prefix = unique_prefix("rfquiet");
    let server = start(config(BusKind::Amqp, &prefix)).await;
    let mut c = connect(server.local_addr(), "quiet", "hush").await;
    for i in 0..5 {
        send_json(
            &mut c.socket,
            json!({"type":"message","text":format!("m{i}")}),
        )
        .await;
    }
    for i in 0..5 {
        let m = next_matching(&mut c.socket, |f| f["type"] == "message").await;
        assert_eq!(m["text"], format!("m{i}"));
    }
    let queue = format!(
        "{prefix}.conn.hush.{}",
        c.welcome["session"].as_str().unwrap()
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let q = queue.clone();
        let waiting = tokio::task::spawn_blocking(move || unacked(&q))
            .await
            .unwrap();
        if waiting == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{waiting} deliveries stay unacknowledged after the room went quiet"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}
