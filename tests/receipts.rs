//! Delivery receipts: a direct message sent with `"receipt":true` earns its
//! sender a `delivered` frame when a connection of the recipient has
//! acknowledged it (`ack_upto`), across nodes; one sent without earns none.
//! On both buses (two nodes on RabbitMQ).

mod common;

use common::*;
use serde_json::{Value, json};

on_both_buses!(a_receipt_comes_once_the_recipient_acknowledged);

async fn a_receipt_comes_once_the_recipient_acknowledged(bus: BusKind) {
    let prefix = unique_prefix("receipts");
    let first = start(config(bus, &prefix)).await;
    let second = match bus.is_amqp() {
        true => Some(start(config(bus, &prefix)).await),
        false => None,
    };
    let there = second.as_ref().unwrap_or(&first).local_addr();
    let mut alice = connect_user(first.local_addr(), "alice").await;
    let mut bob = connect_with(there, "user=bob&acks=client").await;

    let direct = |text: &str, receipt: bool, reference: &str| json!({"type":"direct","to":"bob","text":text,"receipt":receipt,"ref":reference});
    // One that asks for a receipt, one that does not, then one that does.
    let mut ids = Vec::new();
    for (text, receipt, reference) in [
        ("one", true, "d1"),
        ("two", false, "d2"),
        ("three", true, "d3"),
    ] {
        send_json(&mut alice.socket, direct(text, receipt, reference)).await;
        let ack = next_matching(&mut alice.socket, |f| f["type"] == "ack").await;
        assert_eq!(ack["ref"], reference);
        ids.push(ack["id"].as_str().unwrap().to_owned());
    }
    let mut seqs = Vec::new();
    for text in ["one", "two", "three"] {
        let got = next_matching(&mut bob.socket, |f| f["type"] == "direct").await;
        assert_eq!(got["text"], text);
        assert_eq!(
            got.get("receipt").and_then(Value::as_bool).unwrap_or(false),
            text != "two"
        );
        seqs.push(got["seq"].as_u64().unwrap());
    }

    // Nothing while bob has them unacknowledged.
    assert_silent(&mut alice.socket, std::time::Duration::from_millis(300)).await;
    // His ack of the first two earns the receipt of the first.
    send_json(&mut bob.socket, json!({"type":"ack_upto","seq":seqs[1]})).await;
    let delivered = next_matching(&mut alice.socket, |f| f["type"] != "presence").await;
    assert_eq!(
        delivered,
        json!({"type":"delivered","id":ids[0],"to":"bob"})
    );
    // "two" asked for none: the next receipt is the third's.
    send_json(&mut bob.socket, json!({"type":"ack_upto","seq":seqs[2]})).await;
    let delivered = next_matching(&mut alice.socket, |f| f["type"] != "presence").await;
    assert_eq!(
        delivered,
        json!({"type":"delivered","id":ids[2],"to":"bob"})
    );
}
