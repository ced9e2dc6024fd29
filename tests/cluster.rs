//! Several nodes on one RabbitMQ, and the broker coming and going. These need the
//! real broker; the embedded bus is one node by definition.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

in_both_fanout_modes!(
    clients_on_different_nodes_talk_both_ways,
    losing_the_broker_closes_sessions_with_1013_and_recovers,
);

async fn two_nodes(
    test: &str,
    bus: BusKind,
) -> (warren::RunningServer, warren::RunningServer, String) {
    let prefix = unique_prefix(test);
    let mut a = config(bus, &prefix);
    a.node_id = Some("node-a".into());
    let mut b = config(bus, &prefix);
    b.node_id = Some("node-b".into());
    (start(a).await, start(b).await, prefix)
}

async fn clients_on_different_nodes_talk_both_ways(bus: BusKind) {
    let (a, b, _) = two_nodes("xnode", bus).await;
    let mut alice = connect(a.local_addr(), "lobby", "alice").await;
    let mut bob = connect(b.local_addr(), "lobby", "bob").await;
    assert_eq!(alice.welcome["node"], "node-a");
    assert_eq!(bob.welcome["node"], "node-b");

    send_json(
        &mut alice.socket,
        json!({"type":"message","text":"from A","ref":"a1"}),
    )
    .await;
    let got = next_json(&mut bob.socket).await;
    assert_eq!(
        (got["from"].as_str(), got["text"].as_str()),
        (Some("alice"), Some("from A"))
    );

    send_json(
        &mut bob.socket,
        json!({"type":"message","text":"from B","ref":"b1"}),
    )
    .await;
    let got = next_matching(&mut alice.socket, |f| {
        f["type"] == "message" && f["from"] == "bob"
    })
    .await;
    assert_eq!(got["text"], "from B");
    let ack = next_matching(&mut bob.socket, |f| f["type"] == "ack").await;
    assert_eq!(ack["ref"], "b1");
    a.shutdown().await;
    b.shutdown().await;
}

/// The per-user session limit holds across nodes exactly: with 2 sessions
/// per user, one on each node, a third is refused on either; one freed is
/// usable at once, through the other node.
#[tokio::test]
async fn too_many_sessions_across_nodes_and_reconnect_on_the_other_node() {
    let prefix = unique_prefix("xtaken");
    let nodes: Vec<_> = ["node-a", "node-b"]
        .into_iter()
        .map(|id| {
            let mut c = config(BusKind::Amqp, &prefix);
            c.node_id = Some(id.into());
            c.sessions_per_user = 2;
            c
        })
        .collect();
    let a = start(nodes[0].clone()).await;
    let b = start(nodes[1].clone()).await;
    let mut first = connect(a.local_addr(), "lobby", "grace").await;
    let _second = connect(b.local_addr(), "lobby", "grace").await;
    for node in [&a, &b] {
        let (status, body) = refused(node.local_addr(), "room=lobby&user=grace", None).await;
        assert_eq!(
            (status, body["code"].as_str().unwrap()),
            (409, "too_many_sessions")
        );
    }
    // The plain GET on either node knows too.
    let (status, _, _) = get(b.local_addr(), "/ws?user=grace").await;
    assert_eq!(status, 409);
    first.socket.close(None).await.unwrap();
    drop(first);
    // Straight back, through the other node.
    let back = connect(b.local_addr(), "lobby", "grace").await;
    assert_eq!(back.welcome["node"], "node-b");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn no_queue_is_left_after_disconnects_or_shutdown() {
    let prefix = unique_prefix("leak");
    let server = start(config(BusKind::Amqp, &prefix)).await;
    let addr = server.local_addr();
    let users: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(connect(addr, "leaky", u).await);
    }
    // Each connection's queue, and the slot it holds of its user.
    let queues: Vec<(String, String)> = clients
        .iter()
        .zip(&users)
        .map(|(c, u)| {
            let session = c.welcome["session"].as_str().unwrap();
            (
                format!("{prefix}.conn.{u}.{session}"),
                format!("{prefix}.slot.{u}.0"),
            )
        })
        .collect();
    for (queue, slot) in &queues {
        assert!(queue_exists(queue).await, "{queue} while connected");
        assert!(queue_exists(slot).await, "{slot} while connected");
    }
    assert!(exchange_exists(&format!("{prefix}.room.leaky")).await);
    // Three leave politely, one just drops its TCP connection.
    for mut c in clients.drain(..3) {
        c.socket.close(None).await.unwrap();
    }
    drop(clients.remove(0));
    for (queue, slot) in &queues[..4] {
        wait_queue_gone(queue).await;
        wait_queue_gone(slot).await;
    }
    // The last one is closed by a graceful shutdown, with 1001; when shutdown
    // returns its queues are already gone.
    let mut last = clients.remove(0);
    let shutdown = tokio::spawn(server.shutdown());
    assert_eq!(close_code(&mut last.socket).await, Some(1001));
    shutdown.await.unwrap();
    assert!(!queue_exists(&queues[4].0).await);
    assert!(!queue_exists(&queues[4].1).await);
    // The room's exchange is auto-deleted with its last queue, and the direct
    // exchange by the last node to close.
    assert!(!exchange_exists(&format!("{prefix}.room.leaky")).await);
    assert!(!exchange_exists(&format!("{prefix}.direct")).await);
}

#[tokio::test]
async fn the_direct_exchange_stays_while_another_node_has_sessions() {
    let prefix = unique_prefix("direct");
    let first = start(config(BusKind::Amqp, &prefix)).await;
    let second = start(config(BusKind::Amqp, &prefix)).await;
    let mut alice = connect_user(first.local_addr(), "alice").await;
    let mut bob = connect_user(second.local_addr(), "bob").await;
    let direct = format!("{prefix}.direct");
    assert!(exchange_exists(&direct).await);
    // The first node closes (alice with it); bob's queue on the second is
    // still bound, so the exchange stays and direct messages still reach him.
    let shutdown = tokio::spawn(first.shutdown());
    assert_eq!(close_code(&mut alice.socket).await, Some(1001));
    shutdown.await.unwrap();
    assert!(exchange_exists(&direct).await, "deleted under bob's queue");
    let mut carol = connect_user(second.local_addr(), "carol").await;
    send_json(
        &mut carol.socket,
        json!({"type": "direct", "to": "bob", "text": "still here"}),
    )
    .await;
    let got = next_matching(&mut bob.socket, |f| f["type"] == "direct").await;
    assert_eq!(got["text"], "still here");
    // The last node out takes it.
    let shutdown = tokio::spawn(second.shutdown());
    assert_eq!(close_code(&mut bob.socket).await, Some(1001));
    assert_eq!(close_code(&mut carol.socket).await, Some(1001));
    shutdown.await.unwrap();
    assert!(!exchange_exists(&direct).await);
}

#[tokio::test]
async fn an_unreachable_broker_is_503_and_not_ready() {
    // A port nothing listens on: bind one, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(BusKind::Amqp, &unique_prefix("down"));
    cfg.amqp_url = Some(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    let server = warren::RunningServer::start(cfg).await.unwrap();
    let addr = server.local_addr();
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["code"],
        "unavailable"
    );
    let (status, body) = refused(addr, "user=x", None).await;
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (503, "unavailable")
    );
    // Liveness is not readiness.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    server.shutdown().await;
}

/// A TCP proxy in front of the broker that the test can cut.
struct BrokerProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: std::sync::Mutex<CancellationToken>,
}

impl BrokerProxy {
    async fn start() -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(BrokerProxy {
            addr: listener.local_addr().unwrap(),
            up: Arc::new(AtomicBool::new(true)),
            cut: std::sync::Mutex::new(CancellationToken::new()),
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                if !p.up.load(Ordering::SeqCst) {
                    continue; // dropped: the broker is "down"
                }
                let cut = p.cut.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => {}
                    }
                });
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    fn go_down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn come_back(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn wait_ready(addr: SocketAddr, want: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if get(addr, "/readyz").await.0 == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never became {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn losing_the_broker_closes_sessions_with_1013_and_recovers(bus: BusKind) {
    let proxy = BrokerProxy::start().await;
    let prefix = unique_prefix("lost");
    let mut cfg = config(bus, &prefix);
    cfg.amqp_url = Some(proxy.url());
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut c = connect(addr, "lost", "heidi").await;

    proxy.go_down();
    let frame = next_json(&mut c.socket).await;
    assert_eq!(frame["type"], "error");
    assert_eq!(frame["code"], "unavailable");
    assert_eq!(close_code(&mut c.socket).await, Some(1013));
    wait_ready(addr, 503).await;
    let (status, body) = refused(addr, "room=lost&user=heidi", None).await;
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (503, "unavailable")
    );

    proxy.come_back();
    wait_ready(addr, 200).await;
    let mut again = connect(addr, "lost", "heidi").await;
    send_json(
        &mut again.socket,
        json!({"type":"message","text":"back","ref":"r"}),
    )
    .await;
    // Acked, and the room reaches the session again (with per-node fanout,
    // through a feed declared anew on the new connection), in either order.
    let (mut acked, mut echoed) = (false, false);
    while !(acked && echoed) {
        let frame = next_json(&mut again.socket).await;
        match frame["type"].as_str() {
            Some("ack") => acked = frame["ref"] == "r",
            Some("message") => echoed = frame["text"] == "back",
            _ => {}
        }
    }
    server.shutdown().await;
    // The queue died with the broker connection, and the new one was deleted.
    assert!(!queue_exists(&format!("{prefix}.slot.heidi.0")).await);
}

#[tokio::test]
async fn a_url_list_fails_over_to_the_next_broker() {
    // Two "brokers" (proxies to the one real broker): the node uses the first,
    // and when it dies, reconnects through the second.
    let first = BrokerProxy::start().await;
    let second = BrokerProxy::start().await;
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prefix = unique_prefix("failover");
    let mut cfg = config(BusKind::Amqp, &prefix);
    // An unreachable broker first in the list is skipped.
    cfg.amqp_url = Some(format!(
        "amqp://guest:guest@127.0.0.1:{dead}/%2f, {}, {}",
        first.url(),
        second.url()
    ));
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut c = connect(addr, "fo", "olga").await;
    first.go_down();
    assert_eq!(close_code(&mut c.socket).await, Some(1013));
    wait_ready(addr, 200).await;
    // Like a real client after 1013: retry while the node still answers 503
    // (its pool settling on the second broker), until the deadline.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut again = loop {
        match tokio_tungstenite::connect_async(ws_url(addr, "room=fo&user=olga")).await {
            Ok((mut socket, _)) => {
                let welcome = next_json(&mut socket).await;
                assert_eq!(welcome["type"], "welcome");
                break Client { socket, welcome };
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still 503 after {WAIT:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("reconnect: {e}"),
        }
    };
    send_json(
        &mut again.socket,
        json!({"type":"message","text":"via second","ref":"s"}),
    )
    .await;
    assert_eq!(
        next_matching(&mut again.socket, |f| f["type"] == "ack").await["ref"],
        "s"
    );
    let (_, _, metrics) = get(addr, "/metrics").await;
    let reconnects: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("warren_broker_reconnects_total "))
        .expect("the reconnect counter")
        .parse()
        .unwrap();
    assert!(reconnects >= 1.0, "{reconnects}");
    server.shutdown().await;
}

#[tokio::test]
async fn losing_only_the_consumer_connection_closes_its_sessions_and_recovers() {
    // Each pooled lapin connection has a consuming connection of Warren's
    // own beside it; the two live and die together. The broker closes only
    // the consuming one (as an operator's `close_connection` would).
    let prefix = unique_prefix("ownlost");
    let node = format!("{prefix}-node");
    let mut cfg = config(BusKind::Amqp, &prefix);
    cfg.node_id = Some(node.clone());
    cfg.amqp_connections = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut c = connect(addr, "ownlost", "ivan").await;

    let slot_connections = |kind: &str| {
        broker_list(
            &["list_connections", "pid", "client_properties"],
            &format!("\"warren {node} #0{kind}\""),
        )
    };
    let consumers = slot_connections(" consumers");
    assert_eq!(consumers.len(), 1, "{consumers:?}");
    let pid = consumers[0].split('\t').next().unwrap().to_owned();
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &pid, "test closes the consumers"])
        .status()
        .unwrap();
    assert!(closed.success());

    let frame = next_json(&mut c.socket).await;
    assert_eq!(frame["type"], "error");
    assert_eq!(frame["code"], "unavailable");
    assert_eq!(close_code(&mut c.socket).await, Some(1013));

    // The pair is replaced: one lapin and one consuming connection again,
    // and a new session chats.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (lapin, own) = (
            slot_connections("").len(),
            slot_connections(" consumers").len(),
        );
        if (lapin, own) == (1, 1)
            && slot_connections(" consumers")[0].split('\t').next() != Some(&pid)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never one pair again: {lapin} lapin, {own} own"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    wait_ready(addr, 200).await;
    let mut again = connect(addr, "ownlost", "ivan").await;
    send_json(
        &mut again.socket,
        json!({"type":"message","text":"back","ref":"r"}),
    )
    .await;
    let echoed = next_matching(&mut again.socket, |f| f["type"] == "message").await;
    assert_eq!(echoed["text"], "back");
    server.shutdown().await;
}

#[tokio::test]
async fn channel_errors_from_probes_and_posts_leave_other_sessions_alone() {
    // Probing a free name (a passive declare that fails with 404) and posting to
    // an empty room close only their own short-lived channels.
    let server = start(config(BusKind::Amqp, &unique_prefix("chanerr"))).await;
    let addr = server.local_addr();
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(connect(addr, "calm", &format!("calm{i}")).await);
    }
    for i in 0..5 {
        assert_eq!(get(addr, &format!("/ws?user=free{i}")).await.0, 426);
        let posted = api_post(addr, &format!("empty{i}"), None, "anyone?").await;
        assert_eq!(posted, 202);
    }
    assert_eq!(get(addr, "/readyz").await.0, 200);
    for (i, u) in users.iter_mut().enumerate() {
        let r = format!("still-{i}");
        send_json(&mut u.socket, json!({"type":"message","text":"ok","ref":r})).await;
        assert_eq!(
            next_matching(&mut u.socket, |f| f["type"] == "ack").await["ref"],
            r.as_str()
        );
    }
    server.shutdown().await;
}
