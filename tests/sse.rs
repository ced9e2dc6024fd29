//! Server-Sent Events and HTTP publishing: the same rooms as WebSocket clients,
//! across nodes, with the same refusals.

#[macro_use]
mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal SSE reader over reqwest's byte stream.
struct EventStream {
    bytes:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

#[derive(Debug)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: Value,
}

impl EventStream {
    async fn open(url: &str) -> (u16, Result<EventStream, Value>) {
        let response = reqwest::get(url).await.expect("GET events");
        let status = response.status().as_u16();
        if status != 200 {
            return (status, Err(response.json().await.expect("JSON refusal")));
        }
        let ct = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        (
            status,
            Ok(EventStream {
                bytes: Box::pin(response.bytes_stream()),
                buffer: String::new(),
            }),
        )
    }

    /// The next event (comments skipped).
    async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return SseEvent {
                    event,
                    id,
                    data: serde_json::from_str(&data).expect("data is JSON"),
                };
            }
            let chunk = tokio::time::timeout(WAIT, self.bytes.next())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("stream healthy");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    async fn next_not_presence(&mut self) -> SseEvent {
        loop {
            let e = self.next().await;
            if e.event != "presence" {
                return e;
            }
        }
    }
}

async fn post(url: String, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

on_both_buses!(
    sse_and_websocket_share_a_room,
    http_errors_are_json_with_codes
);

async fn sse_and_websocket_share_a_room(bus: BusKind) {
    // One session per user (v1's rule), so the probes below can be refused.
    let mut cfg = config(bus, &unique_prefix("sse1"));
    cfg.sessions_per_user = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let (_, stream) =
        EventStream::open(&format!("http://{addr}/rooms/mixed/events?user=reader")).await;
    let mut reader = stream.unwrap();
    let welcome = reader.next().await;
    assert_eq!(welcome.event, "welcome");
    assert_eq!(welcome.data["user"], "reader");
    assert_eq!(welcome.data["members"], json!(["reader"]));
    let mut ws = connect(addr, "mixed", "writer").await;
    send_json(&mut ws.socket, json!({"type":"message","text":"to sse"})).await;
    let got = reader.next_not_presence().await;
    assert_eq!(got.event, "message");
    assert_eq!(got.data["text"], "to sse");
    assert_eq!(
        got.id.as_deref(),
        got.data["id"].as_str(),
        "id: is the message id"
    );

    // Speaking as a user takes the posting token of one of its sessions...
    let (status, body) = post(
        format!("http://{addr}/rooms/mixed/messages"),
        json!({"user":"reader","text":"forged"}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_required"))
    );
    let token = welcome.data["token"]
        .as_str()
        .expect("welcome carries a token")
        .to_owned();
    let (status, body) = post(
        format!("http://{addr}/rooms/mixed/messages"),
        json!({"user":"reader","text":"forged","token":"00ff"}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("invalid_token"))
    );
    let (status, body) = post(
        format!("http://{addr}/rooms/mixed/messages"),
        json!({"user":"reader","text":"from http","token":token}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let at_ws = next_matching(&mut ws.socket, |f| f["text"] == "from http").await;
    assert_eq!(
        (at_ws["from"].as_str(), at_ws["text"].as_str()),
        (Some("reader"), Some("from http"))
    );
    assert_eq!(at_ws["id"], body["id"]);
    assert_eq!(reader.next_not_presence().await.data["id"], body["id"]);

    // ...and an id nobody holds cannot post at all: that is the server API's.
    let (status, body) = post(
        format!("http://{addr}/users/reader/messages"),
        json!({"from":"script","text":"dm"}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_required"))
    );
    // The writer's posting token speaks for the writer (a DM to reader).
    let writer_token = ws.welcome["token"].as_str().unwrap().to_owned();
    let (status, body) = post(
        format!("http://{addr}/users/reader/messages"),
        json!({"from":"writer","text":"dm","token":writer_token}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let dm = reader.next_not_presence().await;
    assert_eq!(
        (dm.event.as_str(), dm.data["text"].as_str()),
        ("direct", Some("dm")),
        "{:?}",
        dm.data
    );
    let (status, body) = post(
        format!("http://{addr}/users/ghost/messages"),
        json!({"from":"writer","text":"dm","token":writer_token}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("user_not_found"))
    );
    // Asking with Accept: application/json only probes: no stream, no session.
    let probe = |user: &str| {
        reqwest::Client::new()
            .get(format!("http://{addr}/rooms/mixed/events?user={user}"))
            .header("accept", "application/json")
            .send()
    };
    let answer = probe("reader").await.unwrap();
    assert_eq!(answer.status().as_u16(), 409);
    let answer = probe("newcomer").await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(
        answer.json::<Value>().await.unwrap()["status"],
        "acceptable"
    );
    let (_, _, members) = get(addr, "/rooms/mixed/members").await;
    assert!(
        !members.contains("newcomer"),
        "a probe opened a session: {members}"
    );
    // The stream holds the id's one session: another transport is refused.
    let (status, body) = refused(addr, "room=mixed&user=reader", None).await;
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (409, "too_many_sessions")
    );
    let (status, refusal) =
        EventStream::open(&format!("http://{addr}/rooms/mixed/events?user=writer")).await;
    assert_eq!(
        (status, refusal.err().unwrap()["code"].as_str()),
        (409, Some("too_many_sessions"))
    );
    server.shutdown().await;
}

async fn http_errors_are_json_with_codes(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("sse2"));
    cfg.max_text_bytes = 10;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let url = format!("http://{addr}/rooms/r/messages");
    let client = reqwest::Client::new();
    // A live session of "u" and its posting token, so the body's own errors
    // are reached.
    let u = connect(addr, "r", "u").await;
    let token = u.welcome["token"].as_str().unwrap().to_owned();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client
                .post(&url)
                .header("content-type", "application/json")
                .body("{nope"),
            400,
            "invalid_json",
        ),
        (
            client.post(&url).json(&json!({"user":"u","token":token})),
            400,
            "invalid_message",
        ),
        (
            client
                .post(&url)
                .json(&json!({"user":"u","text":"   ","token":token})),
            400,
            "invalid_message",
        ),
        (
            client
                .post(&url)
                .json(&json!({"user":"bad name","text":"x"})),
            400,
            "invalid_user",
        ),
        (
            client.post(&url).json(&json!({"text":"x"})),
            400,
            "invalid_user",
        ),
        (
            client
                .post(format!("http://{addr}/rooms/bad%20room/messages"))
                .json(&json!({"user":"u","text":"x"})),
            400,
            "invalid_room",
        ),
        (
            client
                .post(&url)
                .json(&json!({"user":"u","text":"12345678901","token":token})),
            413,
            "message_too_large",
        ),
        (
            client
                .post(&url)
                .header("content-type", "text/plain")
                .body("hi"),
            415,
            "unsupported_media_type",
        ),
        (
            client
                .post(format!("http://{addr}/users/bad%20name/messages"))
                .json(&json!({"from":"u","text":"x"})),
            400,
            "invalid_user",
        ),
        // serde reads a struct from an array too; the docs promise an object.
        (
            client.post(&url).json(&json!(["u", "hi", null])),
            400,
            "invalid_json",
        ),
        (
            client
                .post(format!("http://{addr}/users/someone/messages"))
                .json(&json!(["u", "hi"])),
            400,
            "invalid_json",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code);
        assert!(body["message"].is_string());
    }
    // SSE refusals are the WebSocket's.
    for (query, status, code) in [
        ("rooms/bad%20room/events?user=x", 400, "invalid_room"),
        ("rooms/ok/events?user=bad%20name", 400, "invalid_user"),
    ] {
        let (s, body) = EventStream::open(&format!("http://{addr}/{query}")).await;
        assert_eq!(
            (s, body.err().unwrap()["code"].as_str().unwrap()),
            (status, code)
        );
    }
    let forbidden = client
        .get(format!("http://{addr}/rooms/ok/events?user=x"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status().as_u16(), 403);
    // A body that announces more than the limit is refused before it is sent.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        format!("POST /rooms/r/messages HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, raw.read(&mut answer))
        .await
        .expect("refused without the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("message_too_large"), "{answer}");
    // A chunked body is cut off as soon as it passes the limit.
    let endless =
        futures_util::stream::iter((0..10_000).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let response = client
        .post(&url)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(endless))
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 413);
    } // else: the server closed the connection mid-upload, which also refuses it
    server.shutdown().await;
}

#[tokio::test]
async fn sse_and_websocket_interoperate_across_nodes() {
    let prefix = unique_prefix("ssex");
    let a = start(config(BusKind::Amqp, &prefix)).await;
    let b = start(config(BusKind::Amqp, &prefix)).await;
    let (_, stream) = EventStream::open(&format!(
        "http://{}/rooms/x/events?user=sse-a",
        a.local_addr()
    ))
    .await;
    let mut sse = stream.unwrap();
    let welcome = sse.next().await;
    assert_eq!(welcome.event, "welcome");
    let token = welcome.data["token"].as_str().unwrap().to_owned();
    let mut ws = connect(b.local_addr(), "x", "ws-b").await;
    send_json(&mut ws.socket, json!({"type":"message","text":"B to A"})).await;
    let got = sse.next_not_presence().await;
    assert_eq!(
        (got.data["from"].as_str(), got.data["text"].as_str()),
        (Some("ws-b"), Some("B to A"))
    );
    // POSTed on A, received over WebSocket on B.
    let (status, _) = post(
        format!("http://{}/rooms/x/messages", a.local_addr()),
        json!({"user":"sse-a","text":"A to B","token":token}),
    )
    .await;
    assert_eq!(status, 202);
    let at_b = next_matching(&mut ws.socket, |f| f["text"] == "A to B").await;
    // The token holds on every node of the cluster (they share the secret).
    let (status, _) = post(
        format!("http://{}/rooms/x/messages", b.local_addr()),
        json!({"user":"sse-a","text":"via B","token":token}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        next_matching(&mut ws.socket, |f| f["text"] == "via B").await["from"],
        "sse-a"
    );
    assert_eq!(at_b["from"], "sse-a");
    // The SSE client leaves: its queue goes.
    drop(sse);
    wait_queue_gone(&format!("{prefix}.slot.sse-a.0")).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn curl_is_a_client() {
    let mut cfg = config(BusKind::Amqp, &unique_prefix("curl"));
    cfg.sse_keepalive_secs = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut curl = tokio::process::Command::new("curl")
        .args([
            "-sN",
            &format!("http://{addr}/rooms/lobby/events?user=curly"),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl is installed");
    let mut out = curl.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut posted = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains("via curl") {
        let n = tokio::time::timeout_at(deadline, out.read(&mut buf))
            .await
            .expect("curl output in time")
            .unwrap();
        assert!(n > 0, "curl ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if !posted && seen.contains("event:welcome") {
            posted = true;
            let status = api_post(addr, "lobby", Some("poster"), "via curl").await;
            assert_eq!(status, 202);
        }
    }
    assert!(seen.contains("event:message"), "{seen}");
    curl.kill().await.unwrap();
    let prefix = server.node().config.prefix.clone();
    wait_queue_gone(&format!("{prefix}.slot.curly.0")).await;
    // Keep-alive comments flow on an idle stream (1 s here).
    let mut idle = tokio::process::Command::new("curl")
        .args([
            "-sN",
            &format!("http://{addr}/rooms/quiet/events?user=idle"),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = idle.stdout.take().unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains("\n:") && !seen.starts_with(':') {
        let n = tokio::time::timeout_at(deadline, out.read(&mut buf))
            .await
            .expect("a keep-alive comment")
            .unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(idle);
    server.shutdown().await;
}
