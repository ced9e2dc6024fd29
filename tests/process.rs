//! The `warren` binary as an operator runs it: flags, signals, exit codes.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::*;

struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str], amqp: Option<String>) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        // No durable history stream left on the shared broker.
        "--history-per-room",
        "0",
        "--static-dir",
        concat!(env!("CARGO_MANIFEST_DIR"), "/static"),
    ])
    .args(args)
    .env_remove("AMQP_URL")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(url) = amqp {
        cmd.env("AMQP_URL", url);
        if let Some(at) = args.iter().position(|a| *a == "--prefix") {
            on_broker(args[at + 1]);
        }
    }
    let mut child = cmd.spawn().expect("warren starts");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    Process { child, addr }
}

fn signal(p: &Process, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn exit_code(mut p: Process) -> Option<i32> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "warren did not exit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--amqp-url",
        "--prefix",
        "--node-id",
        "--static-dir",
        "--max-text-bytes",
        "--resume-grace-secs",
        "--history-per-room",
        "--history-max-age",
        "--history-max-bytes",
        "--max-frame-bytes",
        "--allowed-origins",
        "--log-format",
        "--nap-us",
        "WARREN_LISTEN",
        "AMQP_URL",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test]
async fn sigterm_drains_then_closes_with_1012_deletes_queues_and_exits_0() {
    let prefix = unique_prefix("sigterm");
    let p = spawn(
        &[
            "--prefix",
            &prefix,
            "--node-id",
            "proc-1",
            "--drain-secs",
            "2",
            "--drain-jitter-secs",
            "1",
        ],
        Some(amqp_url()),
    );
    let mut c = connect(p.addr, "sig", "ivan").await;
    assert_eq!(c.welcome["node"], "proc-1");
    let queue = format!(
        "{prefix}.conn.ivan.{}",
        c.welcome["session"].as_str().unwrap()
    );
    assert!(queue_exists(&queue).await);
    signal(&p, "-TERM");
    // Draining: not ready at once, no new sessions, but the open one still works.
    let deadline = tokio::time::Instant::now() + WAIT;
    while get(p.addr, "/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stayed ready"
        );
    }
    let (status, body) = refused(p.addr, "room=sig&user=late", None).await;
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (503, "unavailable")
    );
    send_json(
        &mut c.socket,
        serde_json::json!({"type":"message","text":"still","ref":"d"}),
    )
    .await;
    assert_eq!(
        next_matching(&mut c.socket, |f| f["type"] == "ack").await["ref"],
        "d"
    );
    // Then the node asks its clients to reconnect elsewhere, and exits cleanly.
    assert_eq!(close_code(&mut c.socket).await, Some(1012));
    assert_eq!(exit_code(p).await, Some(0));
    assert!(!queue_exists(&format!("{prefix}.slot.ivan.0")).await);
}

#[tokio::test]
async fn embedded_bus_needs_no_broker_and_sigint_exits_0() {
    let p = spawn(&["--log-format", "json"], None);
    chat_then_interrupt(p).await;
}

/// The runtime's nap is on by default (the other tests here run with it);
/// without it a node works the same.
#[tokio::test]
async fn a_node_whose_runtime_never_naps_delivers_and_exits_0() {
    let p = spawn(&["--nap-us", "0"], None);
    chat_then_interrupt(p).await;
}

/// Two users chat through `p`, then SIGINT closes their sockets with 1001 and
/// the node exits 0.
async fn chat_then_interrupt(p: Process) {
    let mut a = connect(p.addr, "solo", "judy").await;
    let mut b = connect(p.addr, "solo", "ken").await;
    send_json(
        &mut a.socket,
        serde_json::json!({"type":"message","text":"embedded"}),
    )
    .await;
    assert_eq!(next_json(&mut b.socket).await["text"], "embedded");
    signal(&p, "-INT");
    assert_eq!(close_code(&mut a.socket).await, Some(1001));
    assert_eq!(exit_code(p).await, Some(0));
}

#[tokio::test]
async fn a_node_killed_with_sigkill_leaves_member_lists_and_the_cluster_within_the_ttl() {
    const TTL: u64 = 2;
    let prefix = unique_prefix("kill");
    let doomed = spawn(
        &[
            "--prefix",
            &prefix,
            "--node-id",
            "doomed",
            "--presence-ttl-secs",
            &TTL.to_string(),
        ],
        Some(amqp_url()),
    );
    let mut cfg = config(BusKind::Amqp, &prefix);
    cfg.node_id = Some("survivor".into());
    cfg.presence_ttl_secs = TTL;
    let survivor = start(cfg).await;

    let _victim = connect(doomed.addr, "arena", "victim").await;
    let mut watcher = connect(survivor.local_addr(), "arena", "watcher").await;
    // Wait until the survivor knows the victim (and the doomed node).
    let mut members: std::collections::BTreeSet<String> = watcher.welcome["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !members.contains("victim") {
        let f = tokio::time::timeout_at(deadline, next_frame(&mut watcher.socket))
            .await
            .expect("victim's join");
        if f["type"] == "presence" {
            members.extend(
                f["joins"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_str().unwrap().to_owned()),
            );
        }
    }

    let mut doomed = doomed;
    doomed.child.kill().unwrap(); // SIGKILL: no goodbye, no cleanup
    doomed.child.wait().unwrap();

    // The leave must come within the TTL plus one heartbeat and batch of slack.
    let bound = std::time::Duration::from_millis(TTL * 1000 + 1500);
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let f = tokio::time::timeout_at(deadline, next_frame(&mut watcher.socket))
            .await
            .expect("the killed node's user left within the TTL");
        if f["type"] == "presence"
            && f["leaves"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m == "victim")
        {
            break;
        }
    }
    let (_, _, body) = get(survivor.local_addr(), "/cluster").await;
    let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["survivor"]);
    survivor.shutdown().await;
}
