//! The ceiling: Warren's topology straight on RabbitMQ, without WebSockets or
//! Warren.
//!
//! One fanout exchange for the room; per client a channel (spread over a few
//! connections, like Warren's pool), an exclusive server-named queue bound to the
//! exchange, and a consumer. Publishing and consuming copy Warren's semantics so
//! the comparison is fair: publisher confirms on every channel, prefetch 256,
//! manual acks with `multiple` once per 64 deliveries or 250 ms, the same bounded queue
//! arguments, and the same JSON document as the body.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};

use super::{Client, Inbox as AnyInbox, Outbox as AnyOutbox};
use crate::payload;

/// Warren's `PREFETCH`, `ACK_EVERY` and `ACK_DELAY` (src/bus/amqp.rs).
const PREFETCH: u16 = 256;
const ACK_EVERY: u32 = PREFETCH as u32 / 4;
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(250);
/// The `--queue-max-length` scripts/bench gives Warren's nodes: big enough to
/// hold a whole run, so neither side drops messages for a client that falls
/// behind (at N=200 the production default of 10,000 cost both ~40%).
const QUEUE_MAX_LENGTH: i64 = 1_000_000;

pub struct Room {
    connections: Vec<Connection>,
    exchange: String,
}

impl Room {
    pub async fn open(url: &str, connections: usize, room: String) -> Result<Self> {
        let mut opened = Vec::new();
        for _ in 0..connections.max(1) {
            opened.push(
                Connection::connect(url, ConnectionProperties::default())
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            );
        }
        let exchange = format!("{room}.fanout");
        super::declare_room_exchange(&opened[0], &exchange).await?;
        Ok(Self {
            connections: opened,
            exchange,
        })
    }

    pub fn name(&self) -> &str {
        &self.exchange
    }

    pub async fn connect(&self, index: usize) -> Result<Client> {
        let channel = self.connections[index % self.connections.len()]
            .create_channel()
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions { global: false })
            .await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(QUEUE_MAX_LENGTH),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                self.exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                format!("bench-{index}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Client {
            outbox: AnyOutbox::Amqp(Outbox {
                channel,
                exchange: self.exchange.clone(),
                confirms: FuturesUnordered::new(),
            }),
            inbox: AnyInbox::Amqp(Inbox::new(consumer)),
        })
    }

    pub async fn close(self) {
        super::delete_room_exchange(&self.connections[0], &self.exchange).await;
        for connection in self.connections {
            let _ = connection.close(200, "bench done".into()).await;
        }
    }
}

pub struct Outbox {
    channel: Channel,
    exchange: String,
    /// Publishes not yet confirmed; Warren keeps the same (bounded by its 1024
    /// in-flight limit, which M never reaches here).
    confirms: FuturesUnordered<PublisherConfirm>,
}

impl Outbox {
    pub async fn send(&mut self, room: &str, sender: usize, seq: u32, text: &str) -> Result<()> {
        let body = payload::broker_document(room, sender, seq, text);
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await?;
        self.confirms.push(confirm);
        // Settle confirms that already arrived, so the set stays small.
        while let Some(Some(confirmation)) = self.confirms.next().now_or_never() {
            check(confirmation)?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        while let Some(confirmation) = self.confirms.next().await {
            check(confirmation)?;
        }
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "bench done".into()).await;
    }
}

fn check(confirmation: lapin::Result<Confirmation>) -> Result<()> {
    match confirmation? {
        Confirmation::Nack(_) => bail!("the broker refused a publish"),
        _ => Ok(()),
    }
}

pub struct Inbox {
    consumer: Consumer,
    unsettled: Option<Acker>,
    unsettled_count: u32,
    unsettled_since: Option<tokio::time::Instant>,
}

impl Inbox {
    fn new(consumer: Consumer) -> Self {
        Self {
            consumer,
            unsettled: None,
            unsettled_count: 0,
            unsettled_since: None,
        }
    }

    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        // Like Warren: one `multiple` ack per ACK_EVERY deliveries taken, or for
        // whatever was taken once ACK_DELAY has passed while waiting for more.
        loop {
            let since = self.unsettled_since;
            let ack_due = async move {
                match since {
                    Some(since) => tokio::time::sleep_until(since + ACK_DELAY).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                next = self.consumer.next() => next,
                () = ack_due => {
                    if let Err(e) = self.ack().await {
                        return Some(Err(e));
                    }
                    continue;
                }
            };
            return match next? {
                Ok(delivery) => {
                    self.unsettled = Some(delivery.acker);
                    self.unsettled_count += 1;
                    self.unsettled_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if self.unsettled_count >= ACK_EVERY
                        && let Err(e) = self.ack().await
                    {
                        return Some(Err(e));
                    }
                    Some(Ok(Bytes::from(delivery.data)))
                }
                Err(e) => Some(Err(e.into())),
            };
        }
    }

    async fn ack(&mut self) -> Result<()> {
        self.unsettled_count = 0;
        self.unsettled_since = None;
        if let Some(acker) = self.unsettled.take() {
            acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }
}
