//! Publishing and asking without a session: HTTP POSTs publish on a
//! short-lived channel of their own, and the probes ask the broker which of a
//! user's session slots are held.
//!
//! What they publish is not numbered for gap detection (`bus::gaps`): a
//! channel that publishes one message per destination and closes could never
//! show a gap.

use std::future::Future;

use bytes::Bytes;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind, PublisherConfirm};

use super::publisher::{AmqpConfirm, DirectCopy, publish_direct, publish_to_exchange};
use super::{AmqpBus, NOT_FOUND, RESOURCE_LOCKED, on_short_channel, reply_code, unavailable};
use crate::bus::BusError;
use crate::names::{RoomName, SessionId, UserId};

impl AmqpBus {
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

    /// A direct message to every connection of `to`, and a copy to every
    /// connection of `from` (its other tabs show the conversation).
    pub async fn publish_direct(
        &self,
        to: &UserId,
        from: &UserId,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let exchange = self.names.direct_exchange();
        self.publish_alone(|channel| async move {
            let confirm = publish_direct(
                &channel,
                &exchange,
                to,
                &payload,
                DirectCopy::Recipient,
                None,
                None,
            )
            .await?;
            if from != to {
                publish_direct(
                    &channel,
                    &exchange,
                    from,
                    &payload,
                    DirectCopy::Sender,
                    None,
                    None,
                )
                .await?;
            }
            Ok(Some(confirm))
        })
        .await
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
