//! The integration-test harness: real servers on port 0, real WebSocket clients,
//! the real RabbitMQ at `AMQP_URL` (default: the local broker).
//!
//! Every test gets its own exchange/queue prefix so tests sharing the broker never
//! see each other's traffic.
//!
//! [`process`] runs `warren` as a separate process (its own memory, SIGKILL);
//! [`fault`] is what the fault scenarios share (the page's reconnect backoff,
//! percentiles, the figures line `scripts/faults` collects).

#![allow(dead_code)]

pub mod fault;
pub mod process;
pub mod resume;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use warren::{Config, RunningServer};

/// The server API key every test server accepts.
pub const TEST_API_KEY: &str = "test-api-key";

/// Publish `text` to `room` through the server API, as `from` (or `system`);
/// the HTTP status.
pub async fn api_post(addr: SocketAddr, room: &str, from: Option<&str>, text: &str) -> u16 {
    let mut body = serde_json::json!({"text": text});
    if let Some(from) = from {
        body["from"] = from.into();
    }
    reqwest::Client::new()
        .post(format!("http://{addr}/api/rooms/{room}/messages"))
        .bearer_auth(TEST_API_KEY)
        .json(&body)
        .send()
        .await
        .expect("the server answers")
        .status()
        .as_u16()
}

/// How long any awaited event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A unique prefix for one test's exchanges and queues.
pub fn unique_prefix(test: &str) -> String {
    format!("t{:08x}.{test}", rand::random::<u32>())
}

/// Run each named `async fn(BusKind)` as four tests: one on the embedded
/// bus, and three on RabbitMQ: one in each room fanout mode, and one with
/// lapin reading the sessions' queues (`--amqp-consumer lapin`) instead of
/// Warren's own consumer connection. The session code does not know which
/// bus it talks to, how rooms reach it, nor what reads its queue, and these
/// tests hold it to that.
#[macro_export]
macro_rules! on_both_buses {
    // Tests of what only a queue per connection gives (a resume that
    // recovers room messages): no per-node variant.
    (per_connection: $($name:ident),* $(,)?) => {
        mod memory_bus_queue_per_connection {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::Memory).await; } )*
        }
        mod amqp_bus_queue_per_connection {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::Amqp).await; } )*
        }
        mod amqp_lapin_consumer_queue_per_connection {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::AmqpLapinConsumer).await; } )*
        }
    };
    ($($name:ident),* $(,)?) => {
        mod memory_bus {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::Memory).await; } )*
        }
        mod amqp_bus {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::Amqp).await; } )*
        }
        mod amqp_per_node {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::AmqpPerNode).await; } )*
        }
        mod amqp_lapin_consumer {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::AmqpLapinConsumer).await; } )*
        }
    };
}

/// Run each named `async fn(BusKind)` on RabbitMQ in both room fanout modes
/// (tests of several nodes, or of the broker, that the embedded bus has no
/// part in).
#[macro_export]
macro_rules! in_both_fanout_modes {
    ($($name:ident),* $(,)?) => {
        mod queue_per_connection {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::Amqp).await; } )*
        }
        mod feed_per_node {
            $( #[tokio::test] async fn $name() { super::$name(super::BusKind::AmqpPerNode).await; } )*
        }
    };
}

/// Which bus a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    Memory,
    /// RabbitMQ, a queue per connection bound to each room (the default).
    Amqp,
    /// RabbitMQ with `--room-fanout per-node`.
    AmqpPerNode,
    /// RabbitMQ, a queue per connection, read through lapin
    /// (`--amqp-consumer lapin`).
    AmqpLapinConsumer,
}

impl BusKind {
    pub fn is_amqp(self) -> bool {
        self != BusKind::Memory
    }
}

/// The prefixes this test binary used on the shared broker.
static ON_BROKER: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Note that `prefix` is used on the shared broker: when this test binary
/// exits, its direct and presence exchanges (`<prefix>.direct`,
/// `<prefix>.presence`) are deleted. A node deletes them on shutdown when it
/// is the last one, but tests that drop their servers, or kill their nodes,
/// can leave them (the rest goes with the nodes' connections: exclusive and
/// expiring queues, auto-deleted exchanges with their last binding).
pub fn on_broker(prefix: &str) {
    // Quoted into an Erlang binary at exit: nothing that needs escaping.
    assert!(
        prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "prefix {prefix:?}"
    );
    let mut prefixes = ON_BROKER.lock().unwrap();
    if prefixes.is_empty() {
        // SAFETY: registers a plain `extern "C" fn` that never unwinds.
        let registered = unsafe { libc::atexit(delete_direct_exchanges) } == 0;
        assert!(registered, "cannot register the broker clean-up");
    }
    prefixes.insert(prefix.to_owned());
}

/// Run once, as the test binary exits: one `rabbitmqctl eval` deletes every
/// noted prefix's direct and presence exchanges (those already gone are
/// skipped).
extern "C" fn delete_direct_exchanges() {
    let prefixes = ON_BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let names: Vec<String> = prefixes
        .iter()
        .flat_map(|p| {
            [
                format!("<<\"{p}.direct\">>"),
                format!("<<\"{p}.presence\">>"),
            ]
        })
        .collect();
    let expression = format!(
        "[rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, N), false, <<\"tests\">>) \
         || N <- [{}]], ok.",
        names.join(",")
    );
    let Ok(mut ctl) = std::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", &expression])
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        eprintln!("cannot run rabbitmqctl: the tests' exchanges stay on the broker");
        return;
    };
    // Bounded: a CLI that hangs must not hang the test binary's exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match ctl.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                let _ = ctl.kill();
                eprintln!("rabbitmqctl eval failed: the tests' exchanges stay on the broker");
                return;
            }
        }
    }
}

pub fn config(bus: BusKind, prefix: &str) -> Config {
    if bus.is_amqp() {
        on_broker(prefix);
    }
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.amqp_url = match bus {
        BusKind::Memory => None,
        BusKind::Amqp | BusKind::AmqpPerNode | BusKind::AmqpLapinConsumer => Some(amqp_url()),
    };
    if bus == BusKind::AmqpPerNode {
        c.room_fanout = warren::config::RoomFanout::PerNode;
    }
    if bus == BusKind::AmqpLapinConsumer {
        c.amqp_consumer = warren::config::AmqpConsumer::Lapin;
    }
    c.prefix = prefix.to_owned();
    // Nodes of one test cluster share the posting-token secret, as a real one must.
    c.session_secret = Some(format!("secret-{prefix}"));
    c.amqp_connections = 2;
    // Tests send bursts far above a person's rate; the publish limit has its
    // own test (tests/auth.rs).
    c.publish_rate = 1_000_000;
    c.publish_burst = 1_000_000;
    c.api_keys = vec![TEST_API_KEY.to_owned()];
    // Every test client comes from 127.0.0.1; the per-address limits have
    // their own test.
    c.max_connections_per_ip = 1_000_000;
    c.connections_per_ip_per_sec = 1_000_000;
    c.static_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/static").into();
    // A dropped socket ends its session at once (its queue goes, its user
    // leaves), as these tests of everything else expect; tests/resume.rs
    // runs with a grace, as a default server does.
    c.resume_grace_secs = 0;
    // History is a durable stream on the shared broker: only tests/history.rs
    // keeps it, and deletes it after.
    c.history_per_room = 0;
    c
}

pub async fn start(config: Config) -> RunningServer {
    // `RUST_LOG=warren=debug cargo test … -- --nocapture` shows the servers' logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let server = RunningServer::start(config).await.expect("server starts");
    assert!(
        server.node().bus.readiness().is_ok(),
        "bus must be ready for the test"
    );
    server
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connected chat client that has read its `welcome`.
pub struct Client {
    pub socket: Socket,
    pub welcome: Value,
}

pub fn ws_url(addr: SocketAddr, query: &str) -> String {
    format!("ws://{addr}/ws?{query}")
}

/// Connect, expecting the upgrade to succeed and `welcome` to be the first frame.
pub async fn connect(addr: SocketAddr, room: &str, user: &str) -> Client {
    connect_with(addr, &format!("room={room}&user={user}")).await
}

/// Connect as `user` in no room (protocol v2).
pub async fn connect_user(addr: SocketAddr, user: &str) -> Client {
    connect_with(addr, &format!("user={user}")).await
}

/// Connect with `query`, expecting `welcome` first.
pub async fn connect_with(addr: SocketAddr, query: &str) -> Client {
    let (mut socket, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(ws_url(addr, query)))
            .await
            .expect("connect in time")
            .unwrap_or_else(|e| panic!("connect with {query}: {e}"));
    let welcome = next_json(&mut socket).await;
    assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
    Client { socket, welcome }
}

/// Try to connect and return the refusal: HTTP status and JSON body.
pub async fn refused(addr: SocketAddr, query: &str, origin: Option<&str>) -> (u16, Value) {
    let mut request = ws_url(addr, query).into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("answer in time")
    {
        Ok(_) => panic!("upgrade unexpectedly accepted for {query}"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.body().clone().unwrap_or_default();
            let json: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("refusal body is JSON ({e}): {body:?}"));
            (status, json)
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The next text frame other than `presence`, as JSON; skips pings/pongs. Fails
/// on timeout or close. Presence frames arrive whenever members come and go;
/// tests about presence read them with [`next_frame`].
pub async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let frame = next_frame(socket).await;
        if frame["type"] != "presence" {
            return frame;
        }
    }
}

/// The next text frame of any type, as JSON.
pub async fn next_frame(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("socket healthy");
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).expect("frames are JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Read frames until one matches `pred`; returns it. Fails on timeout.
pub async fn next_matching(socket: &mut Socket, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, next_json(socket))
            .await
            .expect("the expected frame in time");
        if pred(&frame) {
            return frame;
        }
    }
}

/// The close code the server ends the socket with (reading past other frames).
pub async fn close_code(socket: &mut Socket) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the close in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

pub async fn send_json(socket: &mut Socket, value: Value) {
    socket
        .send(Message::text(value.to_string()))
        .await
        .expect("send");
}

pub async fn send_text(socket: &mut Socket, text: &str) {
    socket
        .send(Message::text(text.to_owned()))
        .await
        .expect("send");
}

/// Assert no frame arrives within `window`. Used only to prove an absence (rooms
/// are isolated), after a positive event has shown the traffic itself flowed.
pub async fn assert_silent(socket: &mut Socket, window: Duration) {
    loop {
        match tokio::time::timeout(window, socket.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""type":"presence""#) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Does a queue exist on the broker? A passive declare on a throwaway channel.
pub async fn queue_exists(name: &str) -> bool {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("test broker connection");
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    // Another connection's exclusive queue answers 405 RESOURCE_LOCKED even to a
    // passive declare: it exists. Only 404 means it does not.
    let exists = match declared {
        Ok(_) => true,
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id() != 404,
            other => panic!("passive declare of {name} failed: {other:?}"),
        },
    };
    let _ = conn.close(200, "".into()).await;
    exists
}

/// Does an exchange exist on the broker? A passive declare.
pub async fn exchange_exists(name: &str) -> bool {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("test broker connection");
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .exchange_declare(
            name.into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "".into()).await;
    declared.is_ok()
}

/// Wait until `name` no longer exists on the broker (queue deletion is
/// asynchronous from the client's point of view). Fails after [`WAIT`].
pub async fn wait_queue_gone(name: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while queue_exists(name).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {name} leaked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `name`, a queue kept for a resume, has expired (`x-expires`).
/// Asks `rabbitmqctl`, because a passive declare counts as using the queue
/// and would put its expiry off. Fails after three [`WAIT`]s.
pub async fn wait_queue_expired(name: &str) {
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    loop {
        let listed = tokio::task::spawn_blocking(|| {
            let out = std::process::Command::new("rabbitmqctl")
                .args(["-q", "list_queues", "name", "--no-table-headers"])
                .output()
                .expect("rabbitmqctl runs (scripts/test installs RabbitMQ)");
            assert!(out.status.success(), "rabbitmqctl failed: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .await
        .unwrap();
        if !listed.lines().any(|line| line.trim() == name) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {name} never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A plain HTTP GET; status and body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("GET");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

/// The user ids in a JSON array of strings (`members`, `joins`, `leaves`).
pub fn names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

/// Apply a `presence` frame to a client's member list: a resync's `members`
/// replaces it, then joins and leaves.
pub fn apply_presence(members: &mut BTreeSet<String>, frame: &Value) {
    // A resync after missed frames carries the whole list.
    if frame["members"].is_array() {
        *members = names(&frame["members"]);
    }
    members.extend(names(&frame["joins"]));
    for gone in names(&frame["leaves"]) {
        members.remove(&gone);
    }
}

/// Subscribe to `room` and return the `subscribed` answer (skipping what
/// arrives before it, like presence).
pub async fn subscribe(client: &mut Client, room: &str) -> Value {
    let reference = format!("sub-{room}");
    send_json(
        &mut client.socket,
        serde_json::json!({"type": "subscribe", "room": room, "ref": reference}),
    )
    .await;
    let answer = next_matching(&mut client.socket, |f| {
        f["ref"] == reference.as_str() && f["type"] != "ack"
    })
    .await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    answer
}

/// Deletes a test's history stream (`<prefix>.history`, durable) from the
/// shared broker when the test ends, however it ends.
pub struct HistoryStream(Option<String>);

impl HistoryStream {
    pub fn of(bus: BusKind, prefix: &str) -> Self {
        HistoryStream(bus.is_amqp().then(|| format!("{prefix}.history")))
    }
}

impl Drop for HistoryStream {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["-q", "delete_queue", &name])
                .output();
        }
    }
}

/// Lines of `rabbitmqctl -q <args> --no-table-headers` that mention `prefix`.
pub fn broker_list(args: &[&str], prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .arg("--no-table-headers")
        .output()
        .expect("rabbitmqctl runs (scripts/test installs RabbitMQ)");
    assert!(out.status.success(), "rabbitmqctl failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(prefix))
        .map(str::to_owned)
        .collect()
}
