//! The history stream on RabbitMQ: declaring `<prefix>.history` and binding it
//! to room exchanges, this node's reader of it (which fills the history
//! rings), and the markers a session puts into it to learn that the reader
//! has caught up.
//!
//! Nothing binds a room to the stream, opens a session whose rooms are bound
//! to it, or publishes a POST to a room, until this node's reader consumes it ([`StreamSpec::readable`]),
//! and a node starts serving only once it does (at most [`BROKER_TIMEOUT`]
//! later): RabbitMQ 3.10 answers a new stream's `declare-ok` before the
//! stream's writer runs, and a publish routed to it meanwhile crashes the
//! publishing channel, which closes its whole connection (541
//! `INTERNAL_ERROR`, every session on it lost). RabbitMQ's source (a later
//! version than 3.10) refuses a stream consumer until the stream has a
//! running member on the broker's node; in a cluster that member may be a
//! replica, not the writer, so there the wait narrows the window rather than
//! closing it.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, Channel, Consumer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use tungstenite::Utf8Bytes;

use super::publisher::publish_to_queue;
use super::{AmqpBus, burst, unavailable};
use crate::bus::history::Rings;
use crate::bus::{BROKER_TIMEOUT, BusError};
use crate::protocol::frame_head;

/// The history stream's name and its retention, and whether this node reads it.
#[derive(Debug)]
pub struct StreamSpec {
    pub name: String,
    pub max_age: Duration,
    pub max_bytes: u64,
    /// True while this node's reader consumes the stream: the broker has a
    /// running member of it, so publishes routed to it are safe.
    pub(super) reading: watch::Sender<bool>,
}

/// Stream deliveries the reader may hold unacknowledged (streams need acks
/// for credit, nothing else).
const READ_AHEAD: u16 = 1000;
/// Deliveries recorded per wake-up before the reader acknowledges them (with
/// `multiple`); under [`READ_AHEAD`], so the broker never waits for credit.
const ACK_EVERY: usize = 256;
/// How long the reader waits before trying again after losing the stream, at
/// most; it starts at [`FIRST_RETRY`] and doubles, so that a stream whose
/// writer is still starting (a node's first start) is read within
/// milliseconds of it, not a second later.
const RETRY: Duration = Duration::from_secs(1);
/// The reader's first wait before trying again.
const FIRST_RETRY: Duration = Duration::from_millis(25);
/// How long a bind or an open waits for the reader ([`StreamSpec::readable`])
/// before going on without it: under a second, so a node whose stream cannot
/// be read slows its opens by that much and no more.
const READABLE_WAIT: Duration = Duration::from_millis(800);

impl StreamSpec {
    pub fn new(name: String, max_age: Duration, max_bytes: u64) -> Self {
        Self {
            name,
            max_age,
            max_bytes,
            reading: watch::channel(false).0,
        }
    }

    /// Return once this node's reader consumes the stream, at once when it
    /// already does, or after [`READABLE_WAIT`] (see the module doc).
    pub(super) async fn readable(&self) {
        if !self.read_within(READABLE_WAIT).await {
            debug!(stream = %self.name, "binding to the history stream before it is read");
        }
    }

    /// Whether this node's reader consumes the stream within `limit`.
    async fn read_within(&self, limit: Duration) -> bool {
        let mut reading = self.reading.subscribe();
        tokio::time::timeout(limit, reading.wait_for(|on| *on))
            .await
            .is_ok()
    }

    /// Declare the stream (durable, as streams must be) with its retention.
    pub(super) async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", self.max_age.as_secs().max(1)).into()),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.max_bytes).unwrap_or(i64::MAX)),
        );
        channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map(drop)
    }
}

impl AmqpBus {
    /// Put the marker `id` into the history stream, past everything published
    /// before it.
    pub(crate) async fn put_marker(&self, id: &str) -> Result<(), BusError> {
        let Some(stream) = &self.history else {
            return Ok(());
        };
        let payload = format!(r#"{{"type":"marker","id":"{id}"}}"#);
        let queue = stream.name.clone();
        self.publish_alone(|channel| async move {
            publish_to_queue(&channel, &queue, payload.as_bytes())
                .await
                .map(Some)
        })
        .await
    }

    /// Read the history stream into the rings until the pool closes: from its
    /// first offset, and after losing the broker from where the reader was.
    /// Returns once the reader is consuming, or after [`BROKER_TIMEOUT`]
    /// (the reader goes on trying), or at once with no broker connected (opens
    /// and binds then wait for the reader themselves, [`StreamSpec::readable`]):
    /// see the module doc for why.
    pub(crate) async fn start_history_reader(&self) {
        let Some(stream) = self.history.clone() else {
            return;
        };
        let bus = self.clone();
        let rings = self.rings.clone();
        let stop = self.pool.stopping();
        let started = stream.clone();
        tokio::spawn(async move {
            let mut next: Option<i64> = None;
            let mut retry = FIRST_RETRY;
            loop {
                match bus.open_reader(&stream, next).await {
                    Ok((channel, consumer)) => {
                        debug!(stream = %stream.name, ?next, "reading history");
                        stream.reading.send_replace(true);
                        let since = tokio::time::Instant::now();
                        next = read(consumer, &rings, &stop, next).await;
                        stream.reading.send_replace(false);
                        // A reader that read for a while starts its retries
                        // quick again; one that ends at once keeps backing off.
                        if since.elapsed() >= RETRY {
                            retry = FIRST_RETRY;
                        }
                        if channel.status().connected() {
                            let _ = channel.close(200, "history reader done".into()).await;
                        }
                    }
                    // Quick first retries are a stream still starting; a
                    // warning once they are spent.
                    Err(e) if retry < RETRY => {
                        debug!(error = %e, "cannot read the history stream yet")
                    }
                    Err(e) => warn!(error = %e, "cannot read the history stream; will retry"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY);
            }
        });
        if self.readiness().is_err() {
            // No broker yet: the reader starts with the connections.
            return;
        }
        if !started.read_within(BROKER_TIMEOUT).await {
            warn!(stream = %started.name, "the history stream has no reader yet; serving anyway");
        }
    }

    /// Whether this node's reader is consuming the history stream now.
    pub fn history_reading(&self) -> bool {
        self.history.as_ref().is_some_and(|s| *s.reading.borrow())
    }

    async fn open_reader(
        &self,
        stream: &StreamSpec,
        from: Option<i64>,
    ) -> Result<(Channel, Consumer), BusError> {
        let conn = self.connection()?;
        let channel = conn
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let opened = async {
            stream.declare(&channel).await?;
            channel
                .basic_qos(READ_AHEAD, BasicQosOptions { global: false })
                .await?;
            let mut args = FieldTable::default();
            args.insert(
                "x-stream-offset".into(),
                match from {
                    Some(offset) => AMQPValue::LongLongInt(offset),
                    None => AMQPValue::LongString("first".into()),
                },
            );
            channel
                .basic_consume(
                    stream.name.as_str().into(),
                    "history".into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
        }
        .await;
        match opened {
            Ok(consumer) => Ok((channel, consumer)),
            Err(e) => {
                let _ = channel.close(200, "history reader failed".into()).await;
                Err(unavailable(e))
            }
        }
    }
}

/// Record every delivery into `rings` until the stream or `stop` ends it; the
/// offset to read from next time.
async fn read(
    mut consumer: Consumer,
    rings: &Rings,
    stop: &CancellationToken,
    mut next: Option<i64>,
) -> Option<i64> {
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return next,
            delivery = consumer.next() => delivery,
        };
        let mut last: Option<Acker> = None;
        let mut ended = false;
        for delivery in burst(first, &mut consumer, ACK_EVERY) {
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                end => {
                    if let Some(Err(e)) = end {
                        warn!(error = %e, "lost the history stream; will read on from where it was");
                    }
                    ended = true;
                    break;
                }
            };
            if let Some(offset) = stream_offset(&delivery.properties) {
                next = Some(offset + 1);
            }
            last = Some(delivery.acker);
            let Ok(text) = String::from_utf8(delivery.data) else {
                continue;
            };
            let frame = Utf8Bytes::from(text);
            match frame_head(&frame) {
                Some(("marker", Some(id))) => rings.marker_seen(id),
                _ => rings.record(&frame),
            }
        }
        // Streams need acks only for credit: one `multiple` ack per burst.
        // One per message cost each node a broker write and a wake-up of
        // lapin's I/O thread per room message, more than per-node fanout's
        // whole delivery.
        if let Some(acker) = last {
            let _ = acker.ack(BasicAckOptions { multiple: true }).await;
        }
        if ended {
            return next;
        }
    }
}

/// The `x-stream-offset` RabbitMQ puts on every stream delivery.
fn stream_offset(properties: &lapin::BasicProperties) -> Option<i64> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-offset")?
    {
        AMQPValue::LongLongInt(offset) => Some(*offset),
        AMQPValue::LongInt(offset) => Some(i64::from(*offset)),
        _ => None,
    }
}
