//! Publishing and asking without a session: HTTP POSTs publish on the node's
//! one channel for them ([`HttpChannel`]), and the probes ask the broker which
//! of a user's session slots are held.
//!
//! What HTTP POSTs publish is numbered for gap detection (`bus::gaps`) like a
//! session's publishes: one channel keeps them in order, which numbers need,
//! and numbers are taken in the order they go out on it.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind, PublisherConfirm};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::publisher::{AmqpConfirm, DirectCopy, numbered_to_exchange, publish_direct};
use super::{
    AmqpBus, NOT_FOUND, RESOURCE_LOCKED, declare_direct, on_short_channel, reply_code, unavailable,
};
use crate::bus::BusError;
use crate::bus::gaps::Numbering;
use crate::bus::pool::PooledConnection;
use crate::names::{RoomName, SessionId, UserId};

/// The node's channel for HTTP publishes, opened at the first and again after
/// it is lost, in confirm mode, with its numbering. A new channel numbers
/// afresh under a new publisher id: what the old one numbered but never
/// published must not look dropped.
#[derive(Default)]
pub struct HttpChannel {
    open: tokio::sync::Mutex<Option<OpenHttpChannel>>,
}

struct OpenHttpChannel {
    conn: Arc<PooledConnection>,
    channel: Channel,
    numbering: Numbering,
}

/// What an HTTP POST publishes.
enum HttpPublish {
    Room {
        exchange: String,
    },
    Direct {
        exchange: String,
        to: UserId,
        from: UserId,
    },
}

impl AmqpBus {
    /// Publish a POST's message to `room`. Whether the room has anyone in it
    /// is asked on a short channel of its own: a passive declare of a missing
    /// exchange closes the channel it runs on.
    pub async fn publish_room(&self, room: &RoomName, payload: Bytes) -> Result<(), BusError> {
        let exchange = self.names.room_exchange(room);
        let conn = self.connection()?;
        let name = exchange.clone();
        let exists = on_short_channel(&conn, |channel| async move {
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
        })
        .await;
        match exists {
            // Nobody is in the room: there is no one to deliver to.
            Err(e) if reply_code(&e) == Some(NOT_FOUND) => return Ok(()),
            Err(e) => return Err(unavailable(e)),
            Ok(()) => {}
        }
        if let Some(stream) = &self.history {
            // The room is bound to the stream: see `history_link` on why.
            stream.readable().await;
        }
        self.publish_http(HttpPublish::Room { exchange }, payload)
            .await
    }

    /// A direct message to every connection of `to`, and a copy to every
    /// connection of `from` (its other tabs show the conversation).
    pub async fn publish_direct(
        &self,
        to: &UserId,
        from: &UserId,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let publish = HttpPublish::Direct {
            exchange: self.names.direct_exchange(),
            to: to.clone(),
            from: from.clone(),
        };
        self.publish_http(publish, payload).await
    }

    /// Publish on the node's [`HttpChannel`], and wait for the broker's
    /// confirm. The numbering and the publish run in a task of their own, so
    /// that a caller who gives up cannot leave a number taken and its message
    /// unpublished. A caller who gave up while the task waited for the
    /// channel (its POST was answered 503) is not published for later.
    async fn publish_http(&self, publish: HttpPublish, payload: Bytes) -> Result<(), BusError> {
        let bus = self.clone();
        let waiting = CancellationToken::new();
        let _gave_up_on_drop = waiting.clone().drop_guard();
        let published = tokio::spawn(async move {
            let mut open = bus.http.open.lock().await;
            if waiting.is_cancelled() {
                return Err(BusError::TimedOut);
            }
            if open
                .as_ref()
                .is_none_or(|open| !open.channel.status().connected())
            {
                if let Some(lost) = open.take() {
                    lost.conn.channel_closed();
                }
                *open = Some(bus.open_http_channel().await?);
            }
            let OpenHttpChannel {
                channel, numbering, ..
            } = open.as_ref().expect("just opened");
            let published = match &publish {
                HttpPublish::Room { exchange } => {
                    numbered_to_exchange(channel, exchange, &payload, numbering).await
                }
                HttpPublish::Direct { exchange, to, from } => {
                    let confirm = publish_direct(
                        channel,
                        exchange,
                        to,
                        &payload,
                        DirectCopy::Recipient,
                        None,
                        Some(numbering),
                    )
                    .await;
                    if from != to && confirm.is_ok() {
                        // Numbered with the messages to `from`: without an
                        // origin, a receiver cannot tell a copy from those.
                        publish_direct(
                            channel,
                            exchange,
                            from,
                            &payload,
                            DirectCopy::Sender,
                            None,
                            Some(numbering),
                        )
                        .await
                        .map(drop)
                        .map_err(unavailable)?;
                    }
                    confirm
                }
            };
            published.map_err(unavailable)
        });
        match published.await {
            Ok(confirm) => AmqpConfirm(confirm?).await,
            Err(e) => Err(BusError::Unavailable(e.to_string())),
        }
    }

    /// The node's channel for HTTP publishes, in confirm mode, with the direct
    /// exchange declared: sessions' opens declare it, but a direct message
    /// may be posted before any session opened (or after the last node to close
    /// deleted it), and a publish to a missing exchange closes the channel
    /// (404) instead of returning the message as unroutable (`user_not_found`).
    /// A channel opened before such a deletion fails its next direct publish
    /// once (503; the client retries) and is opened again.
    async fn open_http_channel(&self) -> Result<OpenHttpChannel, BusError> {
        let conn = self.connection()?;
        let channel = conn.open_channel().await.map_err(unavailable)?;
        let direct = self.names.direct_exchange();
        let ready = async {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            declare_direct(&channel, &direct).await
        };
        if let Err(e) = ready.await {
            debug!(error = %e, "the channel for HTTP publishes failed to open");
            let _ = channel.close(200, "failed".into()).await;
            conn.channel_closed();
            return Err(unavailable(e));
        }
        Ok(OpenHttpChannel {
            conn,
            channel,
            numbering: Numbering::default(),
        })
    }

    pub(super) async fn publish_alone<F, Fut>(&self, publish: F) -> Result<(), BusError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = lapin::Result<Option<PublisherConfirm>>>,
    {
        let conn = self.connection()?;
        // Counted until closed, also when the caller gives up mid-way.
        let counted = conn.open_counted().await.map_err(unavailable)?;
        let channel = counted.channel();
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
        counted.close("published").await;
        result
    }

    /// Whether all of `user`'s session slots below `max` are held: a new
    /// session would be refused.
    pub async fn is_full(&self, user: &UserId, max: u16) -> Result<bool, BusError> {
        for slot in 0..max {
            if !self.slot_held(user, slot).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether a session's queue exists (on any node).
    pub async fn session_alive(
        &self,
        user: &UserId,
        session: &SessionId,
    ) -> Result<bool, BusError> {
        self.queue_exists(self.names.connection_queue(user, session))
            .await
    }

    /// How many consumers `queue` has, or `None` when there is no such queue
    /// (or only an exclusive one: resume is off on the node that declared it).
    pub(super) async fn queue_consumers(&self, queue: &str) -> Result<Option<u32>, BusError> {
        Ok(match self.queue_state(queue.to_owned()).await? {
            QueueState::Open { consumers } => Some(consumers),
            QueueState::Missing | QueueState::Exclusive => None,
        })
    }

    /// A passive declare of one slot's queue, on a channel of its own.
    async fn slot_held(&self, user: &UserId, slot: u16) -> Result<bool, BusError> {
        self.queue_exists(self.names.slot_queue(user, slot)).await
    }

    /// Whether `queue` exists, another connection's exclusive one included.
    async fn queue_exists(&self, queue: String) -> Result<bool, BusError> {
        Ok(self.queue_state(queue).await? != QueueState::Missing)
    }

    /// A passive declare of `queue`, on a channel of its own.
    async fn queue_state(&self, queue: String) -> Result<QueueState, BusError> {
        let conn = self.connection()?;
        let declared = on_short_channel(&conn, |channel| async move {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
        })
        .await;
        match declared {
            Ok(found) => Ok(QueueState::Open {
                consumers: found.consumer_count(),
            }),
            // A passive declare of a missing queue closes the channel with 404.
            Err(e) if reply_code(&e) == Some(NOT_FOUND) => Ok(QueueState::Missing),
            // Another connection's exclusive queue (a held slot, say).
            Err(e) if reply_code(&e) == Some(RESOURCE_LOCKED) => Ok(QueueState::Exclusive),
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// What a passive declare found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueState {
    Missing,
    /// Exclusive to another connection: it exists, but nothing more is told.
    Exclusive,
    Open {
        consumers: u32,
    },
}
