//! The ceiling: Warren's topology straight on RabbitMQ, without WebSockets or
//! Warren.
//!
//! One fanout exchange for the room; per client a channel (spread over
//! `--amqp-connections`, one by default), an exclusive server-named queue bound
//! to the exchange, and a consumer. Every mode carries the JSON document Warren
//! puts on the broker, so the broker moves the same bytes. What differs is what
//! the client asks of the broker ([`AmqpMode`]):
//!
//! - `noack`: no-ack consumers, no publisher confirms, plain queues. The least a
//!   client can ask for: what this broker delivers at best.
//! - `ack`: manual acks, prefetch 256, one `multiple` ack per 64 deliveries. What
//!   a client that wants flow control pays.
//! - `warren`: Warren's choices, for the record: publisher confirms, prefetch
//!   256, acks per 64 deliveries or 250 ms, the same bounded drop-head queues.
//!
//! `noack` and `ack` run on [`raw`], a minimal client that costs the bench far
//! less CPU per delivery than lapin (`--amqp-client lapin` measures them on lapin
//! instead, `--amqp-client amqprs` on [`amqprs`]); `warren` runs on lapin, whose
//! confirms it needs.

mod amqprs;
mod raw;

use std::collections::VecDeque;
use std::sync::Arc;

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
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};

use super::{Client, Inbox as AnyInbox, Outbox as AnyOutbox};
use crate::cli::{AmqpClient, AmqpMode, AmqpNumbering};
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
    /// lapin's: the clients' with lapin, or only the one that declares and
    /// deletes the exchange with the raw client.
    connections: Vec<Connection>,
    /// The raw client's connections, when the clients use it (else empty).
    raw: Vec<Arc<raw::Connection>>,
    /// amqprs's connections, when the clients use it (else empty).
    amqprs: Vec<::amqprs::connection::Connection>,
    exchange: String,
    mode: AmqpMode,
    /// How the raw client's messages carry Warren's numbering.
    numbering: AmqpNumbering,
}

impl Room {
    pub async fn open(
        url: &str,
        connections: usize,
        room: String,
        mode: AmqpMode,
        client: AmqpClient,
        numbering: AmqpNumbering,
    ) -> Result<Self> {
        let raw = client == AmqpClient::Raw && mode != AmqpMode::Warren;
        let on_amqprs = client == AmqpClient::Amqprs && mode != AmqpMode::Warren;
        let connections = connections.max(1);
        let mut opened = Vec::new();
        for _ in 0..if raw || on_amqprs { 1 } else { connections } {
            opened.push(
                Connection::connect(url, ConnectionProperties::default())
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            );
        }
        let exchange = format!("{room}.fanout");
        super::declare_room_exchange(&opened[0], &exchange).await?;
        let mut raw_connections = Vec::new();
        if raw {
            for _ in 0..connections {
                raw_connections.push(Arc::new(raw::Connection::open(url).await?));
            }
        }
        let amqprs = if on_amqprs {
            amqprs::connect(url, connections).await?
        } else {
            Vec::new()
        };
        Ok(Self {
            connections: opened,
            raw: raw_connections,
            amqprs,
            exchange,
            mode,
            numbering,
        })
    }

    pub fn name(&self) -> &str {
        &self.exchange
    }

    pub async fn connect(&self, index: usize) -> Result<Client> {
        if !self.raw.is_empty() {
            let raw = &self.raw[index % self.raw.len()];
            let settle = match self.mode {
                AmqpMode::Noack => raw::Settle::Auto,
                _ => raw::Settle::Ack {
                    prefetch: PREFETCH,
                    every: ACK_EVERY,
                },
            };
            let (channel, deliveries) = raw.subscribe(&self.exchange, settle).await?;
            return Ok(Client {
                outbox: AnyOutbox::Amqp(Outbox::Raw(RawOutbox {
                    connection: raw.clone(),
                    channel,
                    exchange: self.exchange.clone(),
                    numbering: self.numbering,
                })),
                inbox: AnyInbox::Amqp(Inbox::Raw(RawInbox {
                    deliveries,
                    ready: VecDeque::new(),
                })),
            });
        }
        if !self.amqprs.is_empty() {
            let connection = &self.amqprs[index % self.amqprs.len()];
            let (outbox, inbox) = amqprs::subscribe(connection, &self.exchange, self.mode).await?;
            return Ok(Client {
                outbox: AnyOutbox::Amqp(Outbox::Amqprs(outbox)),
                inbox: AnyInbox::Amqp(Inbox::Amqprs(inbox)),
            });
        }
        let channel = self.connections[index % self.connections.len()]
            .create_channel()
            .await?;
        let warren = self.mode == AmqpMode::Warren;
        if warren {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        if self.mode != AmqpMode::Noack {
            channel
                .basic_qos(PREFETCH, BasicQosOptions { global: false })
                .await?;
        }
        let mut args = FieldTable::default();
        if warren {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(QUEUE_MAX_LENGTH),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("drop-head".into()),
            );
        }
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
                BasicConsumeOptions {
                    no_ack: self.mode == AmqpMode::Noack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let acks_channel = channel.clone();
        Ok(Client {
            outbox: AnyOutbox::Amqp(Outbox::Lapin(LapinOutbox {
                channel,
                exchange: self.exchange.clone(),
                confirms: warren.then(FuturesUnordered::new),
            })),
            inbox: AnyInbox::Amqp(Inbox::Lapin(Box::new(LapinInbox::new(
                consumer,
                acks_channel,
                self.mode,
            )))),
        })
    }

    pub async fn close(self) {
        // The outboxes, which share the raw connection, are closed by now.
        for raw in self.raw.into_iter().filter_map(Arc::into_inner) {
            raw.close().await;
        }
        for connection in self.amqprs {
            let _ = connection.close().await;
        }
        super::delete_room_exchange(&self.connections[0], &self.exchange).await;
        for connection in self.connections {
            let _ = connection.close(200, "bench done".into()).await;
        }
    }
}

pub enum Outbox {
    Lapin(LapinOutbox),
    Raw(RawOutbox),
    Amqprs(amqprs::AmqprsOutbox),
}

impl Outbox {
    pub async fn send(&mut self, room: &str, sender: usize, seq: u32, text: &str) -> Result<()> {
        match self {
            Outbox::Lapin(o) => o.send(room, sender, seq, text).await,
            Outbox::Raw(o) => {
                let body = payload::broker_document(room, sender, seq, text);
                // As Warren numbers: its link's id, and a number per message.
                let (link, number) = (sender as i64, i64::from(seq) + 1);
                let numbering = match o.numbering {
                    AmqpNumbering::None => None,
                    AmqpNumbering::Headers => Some(raw::Numbering::Headers(link, number)),
                    AmqpNumbering::MessageId => Some(raw::Numbering::MessageId(link, number)),
                };
                o.connection
                    .publish(o.channel, &o.exchange, body.as_bytes(), numbering)
                    .await
            }
            Outbox::Amqprs(o) => o.send(room, sender, seq, text).await,
        }
    }

    pub async fn flush(&mut self) -> Result<()> {
        match self {
            Outbox::Lapin(o) => o.flush().await,
            // Written as sent; no confirms.
            Outbox::Raw(_) | Outbox::Amqprs(_) => Ok(()),
        }
    }

    pub async fn close(self) {
        match self {
            Outbox::Lapin(o) => o.close().await,
            // The channel closes with the connection, when the room closes.
            Outbox::Raw(_) => {}
            Outbox::Amqprs(o) => o.close().await,
        }
    }
}

pub struct RawOutbox {
    connection: Arc<raw::Connection>,
    channel: u16,
    exchange: String,
    numbering: AmqpNumbering,
}

pub enum Inbox {
    /// Boxed: it holds the channel its acks go out on.
    Lapin(Box<LapinInbox>),
    Raw(RawInbox),
    Amqprs(amqprs::AmqprsInbox),
}

impl Inbox {
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        match self {
            Inbox::Lapin(i) => i.next().await,
            Inbox::Raw(i) => {
                if i.ready.is_empty() {
                    i.ready.extend(i.deliveries.recv().await?);
                }
                i.ready.pop_front().map(Ok)
            }
            Inbox::Amqprs(i) => i.next().await,
        }
    }
}

pub struct RawInbox {
    /// The channel's bodies, a batch per read of the connection.
    deliveries: tokio::sync::mpsc::UnboundedReceiver<Vec<Bytes>>,
    ready: VecDeque<Bytes>,
}

pub struct LapinOutbox {
    channel: Channel,
    exchange: String,
    /// Publishes not yet confirmed, in the `warren` mode only; Warren keeps the
    /// same (bounded by its 1024 in-flight limit, which M never reaches here).
    confirms: Option<FuturesUnordered<PublisherConfirm>>,
}

impl LapinOutbox {
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
        // Without confirm mode the future resolves at once to NotRequested.
        let Some(confirms) = self.confirms.as_mut() else {
            return Ok(());
        };
        confirms.push(confirm);
        // Settle confirms that already arrived, so the set stays small.
        while let Some(Some(confirmation)) = confirms.next().now_or_never() {
            check(confirmation)?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        if let Some(confirms) = self.confirms.as_mut() {
            while let Some(confirmation) = confirms.next().await {
                check(confirmation)?;
            }
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

pub struct LapinInbox {
    consumer: Consumer,
    /// The consumer's channel, which acks go out on.
    channel: Channel,
    mode: AmqpMode,
    /// The newest delivery taken and not yet acknowledged.
    unsettled: Option<u64>,
    unsettled_count: u32,
    unsettled_since: Option<tokio::time::Instant>,
}

impl LapinInbox {
    fn new(consumer: Consumer, channel: Channel, mode: AmqpMode) -> Self {
        Self {
            consumer,
            channel,
            mode,
            unsettled: None,
            unsettled_count: 0,
            unsettled_since: None,
        }
    }

    /// Cancel-safe, as the receiver needs (it polls with `now_or_never`):
    /// the only await is the next delivery, and acks are queued without one.
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        match self.mode {
            AmqpMode::Noack => match self.consumer.next().await? {
                Ok(delivery) => Some(Ok(Bytes::from(delivery.data))),
                Err(e) => Some(Err(e.into())),
            },
            // One `multiple` ack per ACK_EVERY deliveries (in `take`), no
            // timer: with prefetch 256 the broker never waits on the (at most
            // 63) unacked ones, and the queue dies with the run.
            AmqpMode::Ack => match self.consumer.next().await? {
                Ok(delivery) => Some(self.take(delivery)),
                Err(e) => Some(Err(e.into())),
            },
            AmqpMode::Warren => self.next_like_warren().await,
        }
    }

    async fn next_like_warren(&mut self) -> Option<Result<Bytes>> {
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
                    if let Err(e) = self.ack() {
                        return Some(Err(e));
                    }
                    continue;
                }
            };
            return match next? {
                Ok(delivery) => {
                    self.unsettled_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    Some(self.take(delivery))
                }
                Err(e) => Some(Err(e.into())),
            };
        }
    }

    /// A delivery handed over, and the ack it makes due.
    fn take(&mut self, delivery: lapin::message::Delivery) -> Result<Bytes> {
        self.unsettled = Some(delivery.delivery_tag);
        self.unsettled_count += 1;
        if self.unsettled_count >= ACK_EVERY {
            self.ack()?;
        }
        Ok(Bytes::from(delivery.data))
    }

    /// Queue a `multiple` ack of everything taken, on the channel itself.
    /// Not through the delivery's `Acker`: lapin hands an acker's ack to a task
    /// of its own, and two such tasks may run in either order; an ack of a lower
    /// tag after a `multiple` one of a higher tag is of an unknown tag, which
    /// closes the channel (PRECONDITION_FAILED). The channel queues its frames
    /// in call order, at the first poll.
    fn ack(&mut self) -> Result<()> {
        self.unsettled_count = 0;
        self.unsettled_since = None;
        if let Some(tag) = self.unsettled.take()
            && let Some(Err(e)) = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .now_or_never()
        {
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Args;
    use crate::scenario::fanout::run_all;

    /// Every client takes every delivery in every mode, on the real broker
    /// (`AMQP_URL`, as the integration tests use). 4 clients × 200 messages:
    /// each consumer acks several times while deliveries wait, which is when
    /// the receiver, taking a waiting delivery with `now_or_never`, met an ack
    /// still under way and dropped the delivery taken before it (lapin's
    /// `ack` and `warren` modes lost one per ack).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_client_and_mode_delivers_everything_on_rabbitmq() {
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        for (client, modes) in [
            ("raw", "noack,ack"),
            ("lapin", "noack,ack,warren"),
            ("amqprs", "noack,ack"),
        ] {
            let args = Args::parse_from([
                "warren-bench",
                "--target=amqp",
                &format!("--amqp-url={url}"),
                &format!("--amqp-client={client}"),
                &format!("--amqp-mode={modes}"),
                "--amqp-connections=2",
                "--clients=4",
                "--messages=200",
                "--quiet-wait=0",
                "--timeout=30",
                "--json",
            ]);
            let delivered = run_all(&args)
                .await
                .unwrap_or_else(|e| panic!("{client} ({modes}): {e:#}"));
            assert!(delivered, "{client} ({modes}) lost deliveries");
        }
    }
}
