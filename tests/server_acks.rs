//! A session's acks to RabbitMQ go out in the order it makes them, even when
//! the wait for one is dropped: `Inbox::recv` is one branch of the session's
//! `select!`, and it acks what waited [`ACK_DELAY`] (250 ms) from inside. A
//! later `multiple` ack overtaking an earlier one names a tag already
//! acknowledged, and the broker closes the session's channel (406
//! `PRECONDITION_FAILED`): the session would end as if the broker were lost.
//! lapin's per-delivery `Acker` sent each ack from a task of its own, and
//! tokio runs the newest spawned task first. RabbitMQ only: the embedded bus
//! has no acks.

mod common;

use std::time::Duration;

use futures_util::FutureExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren::bus::amqp::Names;
use warren::bus::{AckMode, Bus, Opening, Release, Subscription};
use warren::names::{RoomName, SessionId, UserId};

use common::{BusKind, amqp_url, config, unique_prefix};

/// Deliveries acked with one `multiple` ack (Warren's `ACK_EVERY`).
const ACK_EVERY: usize = 64;
/// Rounds of "an ack dropped, then a full batch acked": each one can reorder.
const ROUNDS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_wait_for_an_ack_does_not_reorder_acks() {
    let prefix = unique_prefix("server-acks");
    let bus = Bus::connect(
        &config(BusKind::Amqp, &prefix),
        "acks-1",
        Default::default(),
    )
    .await
    .expect("the bus connects");
    let room = RoomName::parse("acks").unwrap();
    let user = UserId::parse("reader").unwrap();
    let session = SessionId::random();
    let opening = Opening {
        session: &session,
        user: &user,
        slot: 0,
        acks: AckMode::Server,
        resume: None,
        room: Some(&room),
    };
    let Subscription {
        link,
        mut inbox,
        lease,
    } = bus.open(&opening).await.expect("the session opens");
    inbox.follow(&room);

    let publisher = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("a publisher connects");
    let channel = publisher.create_channel().await.unwrap();
    let exchange = Names::new(&prefix).room_exchange(&room);
    // On a worker thread, as a session runs (tasks spawned from a worker
    // run newest first there; not so from the test's own thread).
    let (to, room_exchange) = (channel.clone(), exchange.clone());
    let publish = move |n: usize| publish(to.clone(), room_exchange.clone(), n);
    let session_like = tokio::spawn(async move {
        for round in 0..ROUNDS {
            // A few deliveries handed over and left unsettled past ACK_DELAY.
            publish(3).await;
            for _ in 0..3 {
                let frame = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
                frame
                    .expect("a delivery in time")
                    .expect("the channel is open");
            }
            inbox.settle(3);
            tokio::time::sleep(Duration::from_millis(300)).await;
            // A full batch waiting behind them, then `recv` polled once and
            // dropped, as the session's `select!` drops it when another
            // branch is ready: its ack of the three is due (and, until this
            // was mended, awaited there).
            publish(ACK_EVERY).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut taken = usize::from(inbox.recv().now_or_never().is_some());
            // The batch taken and acked at once, without yielding between.
            while taken < ACK_EVERY {
                match inbox.try_recv() {
                    Some(frame) => {
                        frame.unwrap_or_else(|e| panic!("round {round}: {e}"));
                        taken += 1;
                    }
                    None => {
                        let frame = tokio::time::timeout(Duration::from_secs(5), inbox.recv());
                        frame
                            .await
                            .expect("a delivery in time")
                            .unwrap_or_else(|e| panic!("round {round}: {e}"));
                        taken += 1;
                    }
                }
            }
            inbox.settle(ACK_EVERY);
        }
        // Still open: one more delivery comes through.
        publish(1).await;
        let last = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
        last.expect("a delivery in time")
            .expect("the session's channel is still open");
        inbox
    });
    let inbox = session_like.await.expect("no round failed");

    drop(inbox);
    drop(link);
    lease.release(Release::Delete).await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = publisher.close(200, "done".into()).await;
    bus.close().await;
}

/// Publish `n` chat frames to the room's exchange, as another node would.
async fn publish(channel: lapin::Channel, exchange: String, n: usize) {
    for i in 0..n {
        let body = format!(r#"{{"type":"message","id":"m{i}","text":"x"}}"#);
        channel
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
}
