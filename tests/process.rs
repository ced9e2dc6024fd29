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
        "--static-dir",
        concat!(env!("CARGO_MANIFEST_DIR"), "/static"),
    ])
    .args(args)
    .env_remove("AMQP_URL")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(url) = amqp {
        cmd.env("AMQP_URL", url);
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
        "--max-frame-bytes",
        "--allowed-origins",
        "--log-format",
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
    assert!(queue_exists(&format!("{prefix}.user.ivan")).await);
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
    assert!(!queue_exists(&format!("{prefix}.user.ivan")).await);
}

#[tokio::test]
async fn embedded_bus_needs_no_broker_and_sigint_exits_0() {
    let p = spawn(&["--log-format", "json"], None);
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
