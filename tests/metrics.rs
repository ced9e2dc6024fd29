//! `/metrics` counts what actually flows.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::json;

/// Samples of the Prometheus text exposition, keyed by name{labels}.
async fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let (status, headers, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn counters_follow_the_traffic() {
    let mut cfg = config(BusKind::Amqp, &unique_prefix("metrics"));
    cfg.sessions_per_user = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let before = scrape(addr).await;
    assert_eq!(value(&before, "warren_ready"), 1.0);
    assert_eq!(
        value(&before, "warren_broker_connections"),
        2.0,
        "the test config pools 2"
    );

    let mut a = connect(addr, "m", "ma").await;
    let mut b = connect(addr, "m", "mb").await;
    for i in 0..3 {
        send_json(
            &mut a.socket,
            json!({"type":"message","text":format!("{i}"),"ref":format!("r{i}")}),
        )
        .await;
    }
    for _ in 0..3 {
        next_matching(&mut b.socket, |f| f["type"] == "message").await;
    }
    let mut acks = 0;
    while acks < 3 {
        if next_json(&mut a.socket).await["type"] == "ack" {
            acks += 1;
        }
    }
    send_text(&mut a.socket, "not json").await;
    assert_eq!(
        next_matching(&mut a.socket, |f| f["type"] == "error").await["code"],
        "invalid_json"
    );
    let (status, _) = refused(addr, "user=ma", None).await;
    assert_eq!(status, 409);

    let after = scrape(addr).await;
    let delta = |key: &str| value(&after, key) - value(&before, key);
    assert_eq!(value(&after, r#"warren_connections{transport="ws"}"#), 2.0);
    assert_eq!(
        delta(r#"warren_messages_received_total{kind="message",transport="ws"}"#),
        3.0
    );
    // Three messages, each to both members.
    assert!(delta(r#"warren_messages_delivered_total{transport="ws"}"#) >= 6.0);
    assert_eq!(delta(r#"warren_errors_total{code="invalid_json"}"#), 1.0);
    assert_eq!(
        delta(r#"warren_errors_total{code="too_many_sessions"}"#),
        1.0
    );
    assert_eq!(delta("warren_publish_confirm_seconds_count"), 3.0);
    assert_eq!(value(&after, "warren_publish_in_flight"), 0.0);

    drop(a);
    drop(b);
    let deadline = tokio::time::Instant::now() + WAIT;
    while value(&scrape(addr).await, r#"warren_connections{transport="ws"}"#) != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections gauge never fell"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}
