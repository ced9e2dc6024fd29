//! A session's link on RabbitMQ: publishing (to a room's exchange, or a direct
//! message through the direct exchange, each answered by the broker's confirm),
//! and binding its queue to rooms and unbinding it (or, with per-node fanout,
//! joining and leaving the rooms of the node's feed). Every publish of a link
//! is numbered in its headers, so that receivers see what their queue dropped
//! ([`crate::bus::gaps`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tracing::debug;

use super::history_link::StreamSpec;
use super::node_fanout::{FeedMember, NodeFanout};
use super::{
    NOT_FOUND, Names, VANISHED_EXCHANGE_RETRIES, bind, declare_fanout, on_short_channel,
    reply_code, unavailable,
};
use crate::bus::gaps::Numbering;
use crate::bus::pool::PooledConnection;
use crate::bus::{BusError, Guarantee};
use crate::names::{RoomName, SessionId, UserId};

pub struct AmqpLink {
    pub(super) conn: Arc<PooledConnection>,
    /// The session's own channel; it also carries its consumer. In confirm
    /// mode from its first publish that needs a confirm on (`confirming`):
    /// a session whose client never asks for an `ack` costs the broker no
    /// confirms, which in a busy room cost it as much per delivery as a
    /// fifth of the delivery itself (every confirm of a fanout publish
    /// waits on every bound queue).
    pub(super) channel: Channel,
    pub(super) confirming: AtomicBool,
    /// The connection's queue.
    pub(super) queue: String,
    pub(super) user: UserId,
    pub(super) session: SessionId,
    pub(super) names: Names,
    /// `names.direct_exchange()`, built once rather than per direct message.
    pub(super) direct_exchange: String,
    /// The history stream, bound to every room the session binds to.
    pub(super) history: Option<Arc<StreamSpec>>,
    /// With per-node fanout: the node's feed, and this session's queue of
    /// room frames that joining a room registers with it. Rooms are then
    /// joined there, never bound to the session's own queue.
    pub(super) node_fanout: Option<(Arc<NodeFanout>, FeedMember)>,
    /// This channel's numbering of its publishes, per destination (boxed:
    /// the link is part of every session's task).
    pub(super) numbering: Box<Numbering>,
}

impl AmqpLink {
    /// Publish to a room the session is subscribed to (so its exchange
    /// exists), confirmed as `guarantee` asks (once the channel confirms,
    /// everything it publishes is confirmed).
    pub async fn publish(
        &self,
        room: &RoomName,
        payload: Bytes,
        guarantee: Guarantee,
    ) -> Result<AmqpConfirm, BusError> {
        if guarantee == Guarantee::Confirmed {
            self.confirm_from_now().await?;
        }
        let exchange = self.names.room_exchange(room);
        let properties = BasicProperties::default()
            .with_message_id(self.numbering.message_id(&exchange, "", false));
        publish_with(&self.channel, &exchange, &payload, properties)
            .await
            .map(AmqpConfirm)
            .map_err(unavailable)
    }

    /// A direct message to every connection of `to`, and a copy to this
    /// user's other connections (marked with this session, whose own inbox
    /// skips it). The confirm is the recipient's: [`BusError::NoRecipient`]
    /// when `to` has no connection anywhere.
    pub async fn publish_direct(
        &self,
        to: &UserId,
        payload: Bytes,
    ) -> Result<AmqpConfirm, BusError> {
        self.confirm_from_now().await?;
        let exchange = &self.direct_exchange;
        let confirm = publish_direct(
            &self.channel,
            exchange,
            to,
            &payload,
            DirectCopy::Recipient,
            None,
            Some(&self.numbering),
        )
        .await
        .map_err(unavailable)?;
        if *to != self.user {
            publish_direct(
                &self.channel,
                exchange,
                &self.user,
                &payload,
                DirectCopy::Sender,
                Some(&self.session),
                Some(&self.numbering),
            )
            .await
            .map_err(unavailable)?;
        }
        Ok(AmqpConfirm(confirm))
    }

    /// A receipt to every connection of `to`: not mandatory (nobody there is
    /// no error). Its confirm is awaited, because lapin keeps a confirm that
    /// is dropped unread for the channel's lifetime.
    pub async fn publish_receipt(&self, to: &UserId, payload: Bytes) -> Result<(), BusError> {
        self.confirm_from_now().await?;
        let confirm = publish_direct(
            &self.channel,
            &self.direct_exchange,
            to,
            &payload,
            DirectCopy::Sender,
            None,
            Some(&self.numbering),
        )
        .await
        .map_err(unavailable)?;
        AmqpConfirm(confirm).await
    }

    /// Put the channel in confirm mode, once. A session publishes from its
    /// own task, one publish at a time, so two never race here. A direct
    /// message needs it too: a returned `mandatory` publish (nobody to
    /// deliver to) is reported through its confirm.
    async fn confirm_from_now(&self) -> Result<(), BusError> {
        if self.confirming.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        self.confirming.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub async fn bind(&self, room: &RoomName) -> Result<(), BusError> {
        if let Some((fanout, member)) = &self.node_fanout {
            return fanout
                .join(&self.names.room_exchange(room), &self.session, member)
                .await;
        }
        bind_room(
            &self.conn,
            &self.queue,
            &self.names.room_exchange(room),
            self.history.as_deref(),
        )
        .await
    }

    pub async fn unbind(&self, room: &RoomName) -> Result<(), BusError> {
        if let Some((fanout, _)) = &self.node_fanout {
            return fanout
                .leave(&self.names.room_exchange(room), &self.session)
                .await;
        }
        unbind_room(&self.conn, &self.queue, &self.names.room_exchange(room)).await
    }
}

/// Publish to a fanout exchange: every queue bound to it gets a copy.
pub(super) async fn publish_to_exchange(
    channel: &Channel,
    exchange: &str,
    payload: &[u8],
) -> lapin::Result<PublisherConfirm> {
    publish_with(channel, exchange, payload, BasicProperties::default()).await
}

/// As [`publish_to_exchange`], numbered by `numbering`.
pub(super) async fn numbered_to_exchange(
    channel: &Channel,
    exchange: &str,
    payload: &[u8],
    numbering: &Numbering,
) -> lapin::Result<PublisherConfirm> {
    let properties =
        BasicProperties::default().with_message_id(numbering.message_id(exchange, "", false));
    publish_with(channel, exchange, payload, properties).await
}

/// As [`publish_to_exchange`], with `properties` (a link's numbering).
async fn publish_with(
    channel: &Channel,
    exchange: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            payload,
            properties,
        )
        .await
}

/// Publish straight into `queue` (through the default exchange).
pub(super) async fn publish_to_queue(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
) -> lapin::Result<PublisherConfirm> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            payload,
            BasicProperties::default(),
        )
        .await
}

/// Which copy of a direct message a publish is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DirectCopy {
    /// The recipient's: `mandatory`, so a user with no connection anywhere
    /// comes back as a returned message (the bindings *are* the registry of
    /// who is online).
    Recipient,
    /// The sender's, for its other connections: a sender with no other
    /// connection is no error.
    Sender,
}

/// Publish a direct message to every connection of `to` through the direct
/// exchange. `origin` marks the copy its own session must skip; `numbering`,
/// a session link's, numbers it (a marked copy apart from the rest).
pub(super) async fn publish_direct(
    channel: &Channel,
    exchange: &str,
    to: &UserId,
    payload: &[u8],
    copy: DirectCopy,
    origin: Option<&SessionId>,
    numbering: Option<&Numbering>,
) -> lapin::Result<PublisherConfirm> {
    let mut properties = BasicProperties::default();
    if let Some(numbering) = numbering {
        properties = properties.with_message_id(numbering.message_id(
            exchange,
            to.as_str(),
            origin.is_some(),
        ));
    }
    if let Some(origin) = origin {
        properties = properties.with_correlation_id(origin.as_str().into());
    }
    channel
        .basic_publish(
            exchange.into(),
            to.as_str().into(),
            BasicPublishOptions {
                mandatory: copy == DirectCopy::Recipient,
                ..Default::default()
            },
            payload,
            properties,
        )
        .await
}

/// Resolves when the broker confirms (or refuses) one publish.
pub struct AmqpConfirm(pub(super) PublisherConfirm);

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

/// Bind `queue` (and the history stream, when there is one) to `room`'s fanout
/// exchange, declaring it, on a short-lived channel of `conn`: an exchange
/// auto-deleted between declare and bind closes the channel it happens on,
/// which must not be the session's. A missing stream (the node's reader has
/// not declared it yet) is declared before the next attempt.
pub(super) async fn bind_room(
    conn: &Arc<PooledConnection>,
    queue: &str,
    exchange: &str,
    history: Option<&StreamSpec>,
) -> Result<(), BusError> {
    if let Some(stream) = history {
        stream.readable().await;
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = on_short_channel(conn, |channel| async move {
            declare_fanout(&channel, exchange).await?;
            bind(&channel, queue, exchange, "").await?;
            if let Some(stream) = history {
                bind(&channel, &stream.name, exchange, "").await?;
            }
            Ok(())
        })
        .await;
        match result {
            Err(e) if reply_code(&e) == Some(NOT_FOUND) && attempts < VANISHED_EXCHANGE_RETRIES => {
                if let Some(stream) = history {
                    let declared =
                        on_short_channel(
                            conn,
                            |channel| async move { stream.declare(&channel).await },
                        )
                        .await;
                    if let Err(e) = declared {
                        debug!(error = %e, "declaring the history stream failed");
                    }
                }
            }
            other => return other.map_err(unavailable),
        }
    }
}

/// Unbind `queue` from a room's exchange, on a short-lived channel of `conn`.
pub(super) async fn unbind_room(
    conn: &Arc<PooledConnection>,
    queue: &str,
    exchange: &str,
) -> Result<(), BusError> {
    let result = on_short_channel(conn, |channel| async move {
        channel
            .queue_unbind(
                queue.into(),
                exchange.into(),
                "".into(),
                FieldTable::default(),
            )
            .await
    })
    .await;
    match result {
        // The exchange is gone: nothing is bound to it any more.
        Err(e) if reply_code(&e) == Some(NOT_FOUND) => Ok(()),
        other => other.map_err(unavailable),
    }
}
