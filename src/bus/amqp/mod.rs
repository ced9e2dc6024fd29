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
//!
//! This file declares the topology and subscribes; a session's side of it is in
//! [`publisher`] (publish with confirms), [`inbox`] (consume, ack in batches),
//! [`lease`] (queue deletion) and [`presence_link`] (the node's gossip queue).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer, ExchangeKind, PublisherConfirm};
use tracing::{debug, warn};

pub mod inbox;
pub mod lease;
pub mod presence_link;
pub mod publisher;

pub use inbox::AmqpInbox;
pub use lease::AmqpLease;
pub use presence_link::AmqpPresenceLink;
pub use publisher::{AmqpConfirm, AmqpPublisher};

use lease::LeaseState;
use publisher::{publish_to_exchange, publish_to_queue};

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

/// Every exchange and queue name Warren uses, under one `--prefix`.
#[derive(Clone)]
pub struct Names {
    prefix: Arc<str>,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// A room's fanout exchange.
    pub fn room_exchange(&self, room: &RoomName) -> String {
        format!("{}.room.{room}", self.prefix)
    }

    /// A session's queue, named after the user id it holds.
    pub fn user_queue(&self, user: &UserId) -> String {
        format!("{}.user.{user}", self.prefix)
    }

    /// The fanout exchange nodes gossip presence on.
    pub fn presence_exchange(&self) -> String {
        format!("{}.presence", self.prefix)
    }

    /// A node's queue on the presence exchange.
    pub fn node_queue(&self, node_id: &str) -> String {
        format!("{}.node.{node_id}", self.prefix)
    }
}

/// The arguments of every queue Warren declares: at most `max_length`
/// messages, dropping the oldest first, so a consumer too slow to keep up
/// loses its oldest messages instead of growing the broker's memory.
fn bounded_queue(max_length: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(max_length.into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    args
}

/// A node's presence queue holds this much gossip at most: if the presence task
/// stalls, old gossip goes first (the next snapshot supersedes it anyway).
const PRESENCE_QUEUE_LENGTH: u32 = 1000;

#[derive(Clone)]
pub struct AmqpBus {
    pool: Pool,
    names: Names,
    queue_max_length: u32,
}

impl AmqpBus {
    pub fn new(pool: Pool, prefix: &str, queue_max_length: u32) -> Self {
        Self {
            pool,
            names: Names::new(prefix),
            queue_max_length,
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The least loaded live connection, or why there is none.
    fn connection(&self) -> Result<Arc<PooledConnection>, BusError> {
        self.pool
            .pick()
            .ok_or_else(|| BusError::Unavailable(self.pool.readiness().err().unwrap_or_default()))
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
        let exchange = self.names.room_exchange(room);
        let queue = self.names.user_queue(user);
        let conn = self.connection()?;
        let mut taken_retries = TAKEN_RETRIES.iter();
        let mut vanished_exchange_retries = 3;
        loop {
            let channel = conn.open_channel().await.map_err(unavailable)?;
            // From here the channel (and, once declared, the queue) is leased:
            // if the caller gives up (the subscribe timed out), dropping the
            // lease deletes the queue and closes the channel.
            let mut lease = AmqpLease {
                state: Some(LeaseState {
                    conn: conn.clone(),
                    channel: channel.clone(),
                    queue: queue.clone(),
                }),
            };
            match self.declare(&channel, &exchange, &queue).await {
                Ok(consumer) => {
                    debug!(%queue, %exchange, channel = channel.id(), "subscribed");
                    return Ok(Subscription {
                        publisher: Publisher::Amqp(AmqpPublisher {
                            channel,
                            exchange: exchange.clone(),
                            names: self.names.clone(),
                        }),
                        inbox: Inbox::Amqp(Box::new(AmqpInbox::new(consumer, conn.lost.clone()))),
                        lease: Lease::Amqp(lease),
                    });
                }
                Err(e) if reply_code(&e) == Some(RESOURCE_LOCKED) => {
                    // The broker closed this channel; the queue belongs to another
                    // connection, i.e. another session of this user id.
                    lease.forget_channel();
                    match taken_retries.next() {
                        Some(delay) => tokio::time::sleep(*delay).await,
                        None => return Err(BusError::UserTaken),
                    }
                }
                Err(e) if reply_code(&e) == Some(NOT_FOUND) && vanished_exchange_retries > 0 => {
                    // The room's auto-delete exchange went away between our declare
                    // and bind (its last member left). Our queue survives on this
                    // connection; declare both again on a fresh channel.
                    lease.forget_channel();
                    vanished_exchange_retries -= 1;
                }
                Err(e) => {
                    warn!(%queue, error = %e, "subscribe failed");
                    lease.release().await;
                    return Err(unavailable(e));
                }
            }
        }
    }

    /// Declare this node's presence queue, bound to `<prefix>.presence`.
    pub async fn presence_link(&self, node_id: &str) -> Result<AmqpPresenceLink, BusError> {
        let conn = self.connection()?;
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let exchange = self.names.presence_exchange();
        let queue = self.names.node_queue(node_id);
        // Presence is soft state, refreshed by every heartbeat: no acks.
        let args = bounded_queue(PRESENCE_QUEUE_LENGTH);
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
        let exchange = self.names.room_exchange(room);
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
        let queue = self.names.user_queue(to);
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
        let conn = self.connection()?;
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
        let conn = self.connection()?;
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let declared = channel
            .queue_declare(
                self.names.user_queue(user).into(),
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
        let args = bounded_queue(self.queue_max_length);
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
