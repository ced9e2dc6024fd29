//! Clients that resume: dropping a connection as a network would, resuming,
//! and counting numbered messages (tests/resume.rs, tests/haproxy.rs).

use serde_json::{Value, json};
use tokio_tungstenite::MaybeTlsStream;

use super::{Client, next_json, next_matching, send_json};

/// Lose the connection as a network would: a TCP reset, no close frame.
/// End the TCP connection without a WebSocket close frame (a FIN): what a
/// proxy in front shows the server when its client's connection was reset.
pub fn drop_without_close(client: Client) {
    drop(client);
}

pub fn drop_abruptly(client: Client) {
    if let MaybeTlsStream::Plain(tcp) = client.socket.get_ref() {
        tcp.set_zero_linger().unwrap();
    }
    drop(client);
}

pub fn resume_query(user: &str, session: &str, rooms: &str, last_id: Option<&str>) -> String {
    let mut query = format!("user={user}&acks=client&resume={session}&rooms={rooms}");
    if let Some(id) = last_id {
        query.push_str(&format!("&last_id={id}"));
    }
    query
}

/// The frames after `welcome` up to `resumed`, and `resumed` itself.
pub async fn until_resumed(client: &mut Client) -> (Vec<Value>, Value) {
    let mut before = Vec::new();
    loop {
        let frame = next_json(&mut client.socket).await;
        if frame["type"] == "resumed" {
            return (before, frame);
        }
        before.push(frame);
    }
}

/// Read `count` chat messages, acknowledging every 32nd and the last; their
/// texts, and the last one's id.
pub async fn read_messages(client: &mut Client, count: usize) -> (Vec<String>, String) {
    let mut texts = Vec::with_capacity(count);
    let mut last_id = String::new();
    while texts.len() < count {
        let m = next_matching(&mut client.socket, |f| f["type"] == "message").await;
        texts.push(m["text"].as_str().unwrap().to_owned());
        last_id = m["id"].as_str().unwrap().to_owned();
        if texts.len() % 32 == 0 || texts.len() == count {
            let seq = m["seq"].as_u64().expect("deliveries carry a seq");
            send_json(&mut client.socket, json!({"type":"ack_upto","seq":seq})).await;
        }
    }
    (texts, last_id)
}

/// `count` numbered messages from `sender` into its room, each acked by the
/// server; the task ends when the last ack is in.
pub fn send_numbered(mut sender: Client, count: usize) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        for i in 0..count {
            send_json(
                &mut sender.socket,
                json!({"type":"message","text":format!("n{i}"),"ref":format!("r{i}")}),
            )
            .await;
        }
        for i in 0..count {
            let ack = next_matching(&mut sender.socket, |f| f["type"] == "ack").await;
            assert_eq!(ack["ref"], format!("r{i}"));
        }
        sender
    })
}

/// `texts` are `n0` … `n{total - 1}`, each once, in order.
pub fn assert_numbered(texts: &[String], total: usize) {
    let expected: Vec<String> = (0..total).map(|i| format!("n{i}")).collect();
    assert!(
        texts == expected,
        "lost, duplicated or reordered: {texts:?}"
    );
}
