//! The RabbitMQ bus: an exclusive queue per session, bound to its room's fanout
//! exchange.
//!
//! Topology, with `<prefix>` from `--prefix`:
//! - `<prefix>.room.<room>`: a fanout exchange, auto-deleted when its last queue
//!   unbinds, so empty rooms leave nothing behind.
//! - `<prefix>.user.<user>`: the session's queue; exclusive, so the broker refuses a
//!   second holder of the user id anywhere in the cluster (`405 RESOURCE_LOCKED` →
//!   `user_taken`). It is bounded (`x-max-length`, `x-overflow: drop-head`): a
//!   client too slow to keep up loses its oldest messages instead of growing the
//!   broker's memory.
//!
//! Each session gets its own channel. A channel-level error (user taken, an
//! exchange deleted under our feet) closes only that channel, never another
//! user's; publisher confirms and per-channel ordering make acks meaningful and
//! keep each sender's messages in order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Consumer, ExchangeKind, PublisherConfirm};
use tracing::{debug, warn};
use tungstenite::Utf8Bytes;

use super::pool::{Pool, PooledConnection};
use super::{BusError, Inbox, Lease, Publisher, Subscription};
use crate::names::{RoomName, UserId};

/// Deliveries the broker may push to a session before the session acknowledges
/// them. Bounds what a slow socket can pile up in this process; the rest waits in
/// the session's queue on the broker.
pub const PREFETCH: u16 = 256;

/// How long deleting a session's queue may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// AMQP reply codes we act on.
const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;

/// Retries of a declaration that met a queue still held by a previous session of
/// the same user (it may be closing on another node), before `user_taken`.
const TAKEN_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

#[derive(Clone)]
pub struct AmqpBus {
    pool: Pool,
    prefix: Arc<str>,
    queue_max_length: u32,
}

impl AmqpBus {
    pub fn new(pool: Pool, prefix: &str, queue_max_length: u32) -> Self {
        Self {
            pool,
            prefix: prefix.into(),
            queue_max_length,
        }
    }

    pub fn exchange_name(&self, room: &RoomName) -> String {
        format!("{}.room.{room}", self.prefix)
    }

    pub fn queue_name(&self, user: &UserId) -> String {
        format!("{}.user.{user}", self.prefix)
    }

    pub fn readiness(&self) -> Result<(), String> {
        self.pool.readiness()
    }

    pub fn connected(&self) -> usize {
        self.pool.connected()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn subscribe(
        &self,
        room: &RoomName,
        user: &UserId,
    ) -> Result<Subscription, BusError> {
        let exchange = self.exchange_name(room);
        let queue = self.queue_name(user);
        let conn = self.pool.pick().ok_or_else(|| {
            BusError::Unavailable(self.pool.readiness().err().unwrap_or_default())
        })?;
        let mut taken_retries = TAKEN_RETRIES.iter();
        let mut vanished_exchange_retries = 3;
        loop {
            let channel = conn.open_channel().await.map_err(unavailable)?;
            match self.declare(&channel, &exchange, &queue).await {
                Ok(consumer) => {
                    debug!(%queue, %exchange, channel = channel.id(), "subscribed");
                    return Ok(Subscription {
                        publisher: Publisher::Amqp(AmqpPublisher {
                            channel: channel.clone(),
                            exchange: exchange.clone(),
                            prefix: self.prefix.clone(),
                        }),
                        inbox: Inbox::Amqp(Box::new(AmqpInbox::new(consumer, conn.lost.clone()))),
                        lease: Lease::Amqp(AmqpLease {
                            state: Some(LeaseState {
                                conn: conn.clone(),
                                channel,
                                queue,
                            }),
                        }),
                    });
                }
                Err(e) if reply_code(&e) == Some(RESOURCE_LOCKED) => {
                    // The broker closed this channel; the queue belongs to another
                    // connection, i.e. another session of this user id.
                    conn.channel_closed();
                    match taken_retries.next() {
                        Some(delay) => tokio::time::sleep(*delay).await,
                        None => return Err(BusError::UserTaken),
                    }
                }
                Err(e) if reply_code(&e) == Some(NOT_FOUND) && vanished_exchange_retries > 0 => {
                    // The room's auto-delete exchange went away between our declare
                    // and bind (its last member left). Our queue survives on this
                    // connection; declare both again on a fresh channel.
                    conn.channel_closed();
                    vanished_exchange_retries -= 1;
                }
                Err(e) => {
                    warn!(%queue, error = %e, "subscribe failed");
                    release(LeaseState {
                        conn: conn.clone(),
                        channel,
                        queue,
                    })
                    .await;
                    return Err(unavailable(e));
                }
            }
        }
    }

    /// Declare this node's presence queue, bound to `<prefix>.presence`.
    pub async fn presence_link(&self, node_id: &str) -> Result<AmqpPresenceLink, BusError> {
        let conn = self.pool.pick().ok_or_else(|| {
            BusError::Unavailable(self.pool.readiness().err().unwrap_or_default())
        })?;
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let exchange = format!("{}.presence", self.prefix);
        let queue = format!("{}.node.{node_id}", self.prefix);
        // Presence is soft state, refreshed by every heartbeat: no acks.
        // Bounded like a session's queue: if this node's presence task stalls,
        // old gossip goes first (the next snapshot supersedes it anyway).
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1000));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        let declared = subscribe_to_fanout(&channel, &exchange, &queue, args, true).await;
        match declared {
            Ok(consumer) => Ok(AmqpPresenceLink {
                conn,
                channel,
                consumer,
                exchange,
            }),
            Err(e) => {
                conn.channel_closed();
                Err(unavailable(e))
            }
        }
    }

    /// Publish on a short-lived channel of its own: a passive declare of a missing
    /// exchange closes the channel it runs on, which must not be a session's.
    pub async fn publish_room(&self, room: &RoomName, payload: Bytes) -> Result<(), BusError> {
        let exchange = self.exchange_name(room);
        self.publish_alone(|channel| async move {
            let exists = channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match exists {
                // Nobody is in the room: there is no one to deliver to.
                Err(e) if reply_code(&e) == Some(NOT_FOUND) => return Ok(None),
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            publish_to_exchange(&channel, &exchange, &payload)
                .await
                .map(Some)
        })
        .await
    }

    pub async fn publish_direct(&self, to: &UserId, payload: Bytes) -> Result<(), BusError> {
        let queue = self.queue_name(to);
        self.publish_alone(|channel| async move {
            publish_to_queue(&channel, &queue, &payload).await.map(Some)
        })
        .await
    }

    async fn publish_alone<F, Fut>(&self, publish: F) -> Result<(), BusError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = lapin::Result<Option<PublisherConfirm>>>,
    {
        let conn = self.pool.pick().ok_or_else(|| {
            BusError::Unavailable(self.pool.readiness().err().unwrap_or_default())
        })?;
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let result = async {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(unavailable)?;
            match publish(channel.clone()).await.map_err(unavailable)? {
                Some(confirm) => AmqpConfirm(confirm).await,
                None => Ok(()),
            }
        }
        .await;
        if channel.status().connected() {
            let _ = channel.close(200, "published".into()).await;
        }
        conn.channel_closed();
        result
    }

    pub async fn is_connected(&self, user: &UserId) -> Result<bool, BusError> {
        let conn = self.pool.pick().ok_or_else(|| {
            BusError::Unavailable(self.pool.readiness().err().unwrap_or_default())
        })?;
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let declared = channel
            .queue_declare(
                self.queue_name(user).into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        conn.channel_closed();
        match declared {
            Ok(_) => {
                let _ = channel.close(200, "checked".into()).await;
                Ok(true)
            }
            // A passive declare of a missing queue closes the channel with 404.
            Err(e) if reply_code(&e) == Some(NOT_FOUND) => Ok(false),
            // Another connection's exclusive queue: someone holds the id.
            Err(e) if reply_code(&e) == Some(RESOURCE_LOCKED) => Ok(true),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn declare(
        &self,
        channel: &Channel,
        exchange: &str,
        queue: &str,
    ) -> lapin::Result<Consumer> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions { global: false })
            .await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(self.queue_max_length.into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        subscribe_to_fanout(channel, exchange, queue, args, false).await
    }
}

/// Declare a fanout exchange (auto-deleted with its last queue) and an exclusive,
/// auto-deleted queue bound to it, and consume the queue. The one topology both
/// sessions and presence links use.
async fn subscribe_to_fanout(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    arguments: FieldTable,
    no_ack: bool,
) -> lapin::Result<Consumer> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.into(),
            queue.into(),
            BasicConsumeOptions {
                no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

fn unavailable(e: lapin::Error) -> BusError {
    BusError::Unavailable(e.to_string())
}

pub struct AmqpPublisher {
    channel: Channel,
    exchange: String,
    prefix: Arc<str>,
}

impl AmqpPublisher {
    pub async fn publish(&self, payload: Bytes) -> Result<AmqpConfirm, BusError> {
        publish_to_exchange(&self.channel, &self.exchange, &payload)
            .await
            .map(AmqpConfirm)
            .map_err(unavailable)
    }

    /// Publish straight to the recipient's queue through the default exchange.
    /// `mandatory` makes the broker return the message when no such queue exists,
    /// which the confirm reports as [`BusError::NoRecipient`]: the queue *is* the
    /// registry of who is online, so no user→node table is needed.
    pub async fn publish_direct(
        &self,
        to: &UserId,
        payload: Bytes,
    ) -> Result<AmqpConfirm, BusError> {
        publish_to_queue(
            &self.channel,
            &format!("{}.user.{to}", self.prefix),
            &payload,
        )
        .await
        .map(AmqpConfirm)
        .map_err(unavailable)
    }
}

/// Publish to a fanout exchange: every queue bound to it gets a copy.
async fn publish_to_exchange(
    channel: &Channel,
    exchange: &str,
    payload: &[u8],
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default(),
        )
        .await
}

/// Publish straight to a queue through the default exchange, `mandatory`, so a
/// missing queue (an offline user) comes back as a returned message.
async fn publish_to_queue(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            BasicProperties::default(),
        )
        .await
}

/// Resolves when the broker confirms (or refuses) one publish.
pub struct AmqpConfirm(PublisherConfirm);

impl Future for AmqpConfirm {
    type Output = Result<(), BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|confirmation| match confirmation {
                Ok(Confirmation::Ack(Some(_returned))) => Err(BusError::NoRecipient),
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
                Ok(Confirmation::Nack(_)) => Err(BusError::Unavailable(
                    "the broker refused the message".into(),
                )),
                Err(e) => Err(unavailable(e)),
            })
    }
}

/// Deliveries acknowledged with one `basic.ack` (`multiple`) at most.
///
/// A session's queue is exclusive and deleted with the session, so an ack never
/// guards against loss here: it only hands prefetch credit back to the broker.
/// Acking every delivery of a steady room cost the broker a frame per delivery
/// and lapin a wake-up of its I/O thread; a quarter of the window keeps credit
/// flowing while sending one ack where there were up to 64.
const ACK_EVERY: u32 = PREFETCH as u32 / 4;
/// How long a handed-over delivery may wait for a fuller ack. Bounded so that a
/// room going quiet still returns its credit, and far below RabbitMQ's consumer
/// timeout (30 minutes by default), past which it closes the channel.
const ACK_DELAY: Duration = Duration::from_millis(250);

pub struct AmqpInbox {
    consumer: Consumer,
    /// The newest delivery handed to the socket but not yet acknowledged; acking
    /// it with `multiple` settles everything before it too.
    unsettled: Option<Acker>,
    /// How many deliveries that ack would settle, and since when the oldest waits.
    unsettled_count: u32,
    unsettled_since: Option<tokio::time::Instant>,
    /// The pool's word that this session's connection died.
    lost: tokio_util::sync::CancellationToken,
}

impl AmqpInbox {
    fn new(consumer: Consumer, lost: tokio_util::sync::CancellationToken) -> Self {
        Self {
            consumer,
            unsettled: None,
            unsettled_count: 0,
            unsettled_since: None,
            lost,
        }
    }

    /// The next delivery. While waiting, acks what was handed over once
    /// [`ACK_DELAY`] has passed, so a quiet room does not sit on its credit.
    pub async fn recv(&mut self) -> Result<Utf8Bytes, BusError> {
        loop {
            let since = self.unsettled_since;
            let ack_due = async move {
                match since {
                    Some(since) => tokio::time::sleep_until(since + ACK_DELAY).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                next = self.consumer.next() => return self.take(next),
                _ = self.lost.cancelled() => {
                    return Err(BusError::Unavailable("the broker connection was lost".into()));
                }
                () = ack_due => self.ack().await,
            }
        }
    }

    pub fn try_recv(&mut self) -> Option<Result<Utf8Bytes, BusError>> {
        let next = self.consumer.next().now_or_never()?;
        Some(self.take(next))
    }

    fn take(
        &mut self,
        next: Option<lapin::Result<lapin::message::Delivery>>,
    ) -> Result<Utf8Bytes, BusError> {
        match next {
            Some(Ok(delivery)) => {
                self.unsettled = Some(delivery.acker);
                // Only Warren publishes to these exchanges, and only serde_json
                // output; a foreign non-UTF-8 message is replaced, not trusted.
                Ok(Utf8Bytes::from(
                    String::from_utf8(delivery.data)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                ))
            }
            Some(Err(e)) => Err(unavailable(e)),
            None => Err(BusError::Unavailable(
                "the broker cancelled the subscription".into(),
            )),
        }
    }

    /// Everything taken so far is on the socket. Ack it once [`ACK_EVERY`]
    /// deliveries wait; fewer are acked by [`Self::recv`] after [`ACK_DELAY`].
    pub async fn settle(&mut self, handed_over: usize) {
        if self.unsettled.is_none() {
            return;
        }
        self.unsettled_count = self
            .unsettled_count
            .saturating_add(u32::try_from(handed_over).unwrap_or(u32::MAX));
        self.unsettled_since
            .get_or_insert_with(tokio::time::Instant::now);
        if self.unsettled_count >= ACK_EVERY {
            self.ack().await;
        }
    }

    async fn ack(&mut self) {
        self.unsettled_count = 0;
        self.unsettled_since = None;
        if let Some(acker) = self.unsettled.take()
            && let Err(e) = acker.ack(BasicAckOptions { multiple: true }).await
        {
            debug!(error = %e, "ack failed; the channel is gone");
        }
    }
}

struct LeaseState {
    conn: Arc<PooledConnection>,
    channel: Channel,
    queue: String,
}

pub struct AmqpLease {
    state: Option<LeaseState>,
}

impl AmqpLease {
    pub async fn release(mut self) {
        if let Some(state) = self.state.take() {
            // A broker that stopped answering must not hold the session (and
            // shutdown) forever; the exclusive queue dies with its connection,
            // which shutdown closes anyway.
            if tokio::time::timeout(RELEASE_TIMEOUT, release(state))
                .await
                .is_err()
            {
                warn!("queue deletion timed out; the queue goes with its connection");
            }
        }
    }
}

impl Drop for AmqpLease {
    fn drop(&mut self) {
        // A session that panicked still must not leak its queue.
        if let Some(state) = self.state.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(release(state));
        }
    }
}

/// Delete the queue and close the channel. If the session's channel is already
/// dead but its connection lives, the exclusive queue lives too: delete it through
/// a fresh channel. If the connection is dead, the broker has deleted the queue.
async fn release(state: LeaseState) {
    let LeaseState {
        conn,
        channel,
        queue,
    } = state;
    let deleted = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    if deleted.is_ok() {
        let _ = channel.close(200, "session ended".into()).await;
    } else if conn.is_connected() {
        match conn.connection.create_channel().await {
            Ok(fresh) => {
                if let Err(e) = fresh
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                {
                    warn!(%queue, error = %e, "could not delete the session queue");
                }
                let _ = fresh.close(200, "session ended".into()).await;
            }
            Err(e) => warn!(%queue, error = %e, "could not delete the session queue"),
        }
    }
    conn.channel_closed();
    debug!(%queue, "released");
}

/// A node's presence queue and the channel it publishes gossip on.
pub struct AmqpPresenceLink {
    conn: Arc<PooledConnection>,
    channel: Channel,
    consumer: Consumer,
    exchange: String,
}

impl AmqpPresenceLink {
    pub async fn publish(&self, payload: Bytes) -> Result<(), BusError> {
        publish_to_exchange(&self.channel, &self.exchange, &payload)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    pub async fn recv(&mut self) -> Result<Bytes, BusError> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => Ok(Bytes::from(delivery.data)),
            Some(Err(e)) => Err(unavailable(e)),
            None => Err(BusError::Unavailable("presence consumer cancelled".into())),
        }
    }
}

impl Drop for AmqpPresenceLink {
    fn drop(&mut self) {
        self.conn.channel_closed();
        let channel = self.channel.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            // Closing the channel cancels the consumer; the auto-delete queue goes.
            handle.spawn(async move {
                let _ = channel.close(200, "presence link closed".into()).await;
            });
        }
    }
}
