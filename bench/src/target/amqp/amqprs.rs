//! The `noack` and `ack` baselines on amqprs (`--amqp-client amqprs`): a second
//! well-kept Rust AMQP client beside lapin, all on tokio tasks (lapin reads each
//! connection on a thread of its own). It answers what a client's own cost per
//! delivery would be if Warren used it instead of lapin (issue 14 §2; see
//! docs/BENCHMARKS.md, "2026-12-01: which AMQP client").
//!
//! The same topology and settlement as the other clients: per client a channel
//! (spread over `--amqp-connections`), an exclusive server-named queue bound to
//! the room's exchange and a consumer; with `ack`, prefetch 256 and one
//! `multiple` ack per 64 deliveries.

use amqprs::BasicProperties;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConsumerMessage, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use tokio::sync::mpsc::UnboundedReceiver;

use super::raw::Target;
use super::{ACK_EVERY, PREFETCH};
use crate::cli::AmqpMode;
use crate::payload;

/// Open `count` connections to `url`.
pub async fn connect(url: &str, count: usize) -> Result<Vec<Connection>> {
    let target = Target::parse(url)?;
    let mut args =
        OpenConnectionArguments::new(&target.host, target.port, &target.user, &target.password);
    args.virtual_host(&target.vhost);
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        let connection = Connection::open(&args)
            .await
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("connecting to {url} with amqprs"))?;
        connections.push(connection);
    }
    Ok(connections)
}

/// One client's channel, queue and consumer on `connection`.
pub async fn subscribe(
    connection: &Connection,
    exchange: &str,
    mode: AmqpMode,
) -> Result<(AmqprsOutbox, AmqprsInbox)> {
    let failed = |e: amqprs::error::Error| anyhow!("amqprs: {e}");
    let channel = connection.open_channel(None).await.map_err(failed)?;
    let acking = mode != AmqpMode::Noack;
    if acking {
        channel
            .basic_qos(BasicQosArguments::new(0, PREFETCH, false))
            .await
            .map_err(failed)?;
    }
    let (queue, _, _) = channel
        .queue_declare(
            QueueDeclareArguments::new("")
                .exclusive(true)
                .auto_delete(true)
                .finish(),
        )
        .await
        .map_err(failed)?
        .context("the broker named no queue")?;
    channel
        .queue_bind(QueueBindArguments::new(&queue, exchange, ""))
        .await
        .map_err(failed)?;
    let (_, deliveries) = channel
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "")
                .manual_ack(acking)
                .finish(),
        )
        .await
        .map_err(failed)?;
    let outbox = AmqprsOutbox {
        channel: channel.clone(),
        exchange: exchange.to_owned(),
    };
    let inbox = AmqprsInbox {
        channel,
        deliveries,
        acking,
        unacked: 0,
        last_tag: 0,
    };
    Ok((outbox, inbox))
}

pub struct AmqprsOutbox {
    channel: Channel,
    exchange: String,
}

impl AmqprsOutbox {
    pub async fn send(&mut self, room: &str, sender: usize, seq: u32, text: &str) -> Result<()> {
        let body = payload::broker_document(room, sender, seq, text);
        self.channel
            .basic_publish(
                BasicProperties::default(),
                body.into_bytes(),
                BasicPublishArguments::new(&self.exchange, ""),
            )
            .await
            .map_err(|e| anyhow!("amqprs: {e}"))
    }

    pub async fn close(self) {
        let _ = self.channel.close().await;
    }
}

pub struct AmqprsInbox {
    channel: Channel,
    deliveries: UnboundedReceiver<ConsumerMessage>,
    acking: bool,
    /// Deliveries taken since the last ack, and the newest one's tag.
    unacked: u32,
    last_tag: u64,
}

impl AmqprsInbox {
    /// Cancel-safe, as the receiver needs (it polls with `now_or_never`):
    /// nothing is awaited once a delivery is taken. An ack that is due goes
    /// out at the next call, before waiting for the next delivery; a dropped
    /// call has not sent it and leaves it due.
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        if self.acking && self.unacked >= ACK_EVERY {
            let ack = BasicAckArguments::new(self.last_tag, true);
            if let Err(e) = self.channel.basic_ack(ack).await {
                return Some(Err(anyhow!("amqprs: {e}")));
            }
            self.unacked = 0;
        }
        let message = self.deliveries.recv().await?;
        if self.acking {
            self.unacked += 1;
            self.last_tag = message.deliver.as_ref().map(|d| d.delivery_tag())?;
        }
        Some(Ok(Bytes::from(message.content.unwrap_or_default())))
    }
}
