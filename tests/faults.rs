//! Broker faults on a private RabbitMQ cluster (`scripts/rabbit-cluster`, three
//! nodes beside the machine's broker, never touching it). Each test starts its
//! own cluster on its own ports and stops it, whatever happens.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// One private cluster at a time: three at once would starve a small
/// machine, and the tests measure timing.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A private three-node cluster, stopped on drop.
struct Cluster {
    env: Vec<(&'static str, String)>,
    urls: Vec<String>,
}

impl Cluster {
    fn start(test: &str) -> Cluster {
        // Ports away from the machine's broker and from other runs.
        let base = 6000 + (rand::random::<u16>() % 300) * 3;
        let env = vec![
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
        assert_eq!(urls.len(), 3, "{out:?}");
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
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("freeze"))
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
    println!("ready again {:?} after the thaw", thawed_at.elapsed());
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
}

/// Scenario 2 of issue 15: the cluster node Warren is connected to is killed
/// (SIGKILL). Its sessions are told (1013), reconnect at once and land on the
/// surviving nodes (Warren fails over along its URL list); chat goes on.
#[tokio::test]
async fn a_killed_cluster_node_moves_its_sessions_to_the_survivors() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("kill"))
        .await
        .unwrap();
    let mut cfg = config(BusKind::Amqp, &unique_prefix("kill"));
    cfg.amqp_url = Some(cluster.urls.join(","));
    let server = start(cfg).await;
    let addr = server.local_addr();
    let users: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let mut clients = Vec::new();
    for user in &users {
        clients.push(connect(addr, "kill", user).await);
    }

    cluster.run(&["kill", "1"]);
    let killed_at = Instant::now();
    // Every session is told to come back later...
    for client in &mut clients {
        assert_eq!(close_code(&mut client.socket).await, Some(1013));
    }
    let told = killed_at.elapsed();
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
}

/// Scenario 4 of issue 15: a memory alarm (the watermark set absurdly low).
/// The broker blocks publishers: Warren reports itself not ready, a message
/// sent meanwhile is refused explicitly (`unavailable`, never silently
/// dropped), and service returns when the watermark is restored.
#[tokio::test]
async fn a_memory_alarm_refuses_publishes_explicitly_and_passes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("alarm"))
        .await
        .unwrap();
    let mut cfg = config(BusKind::Amqp, &unique_prefix("alarm"));
    cfg.amqp_url = Some(cluster.urls[0].clone());
    cfg.amqp_connections = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut client = connect(addr, "alarm", "a").await;

    cluster.run(&["ctl", "1", "set_vm_memory_high_watermark", "0.0001"]);
    let alarmed_at = Instant::now();
    while get(addr, "/readyz").await.0 != 503 {
        assert!(
            alarmed_at.elapsed() < Duration::from_secs(15),
            "the alarm never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("memory alarm seen after {:?}", alarmed_at.elapsed());
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
    println!(
        "a message during the alarm refused after {:?}",
        sent_at.elapsed()
    );

    cluster.run(&["ctl", "1", "set_vm_memory_high_watermark", "0.4"]);
    let restored_at = Instant::now();
    while get(addr, "/readyz").await.0 != 200 {
        assert!(
            restored_at.elapsed() < Duration::from_secs(30),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "ready again {:?} after the watermark was restored",
        restored_at.elapsed()
    );
    let mut after = connect(addr, "alarm", "b").await;
    send_json(
        &mut after.socket,
        json!({"type":"message","text":"flowing","ref":"f"}),
    )
    .await;
    let ack = next_matching(&mut after.socket, |f| f["ref"] == "f").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    server.shutdown().await;
    drop(cluster);
}
