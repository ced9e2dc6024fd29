//! Publishing from a session: to its room's exchange, or a direct message to
//! one user's queue, each answered by the broker's confirm.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use super::{Names, unavailable};
use crate::bus::BusError;
use crate::names::UserId;

pub struct AmqpPublisher {
    pub(super) channel: Channel,
    /// The session's room's exchange.
    pub(super) exchange: String,
    pub(super) names: Names,
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
        publish_to_queue(&self.channel, &self.names.user_queue(to), &payload)
            .await
            .map(AmqpConfirm)
            .map_err(unavailable)
    }
}

/// Publish to a fanout exchange: every queue bound to it gets a copy.
pub(super) async fn publish_to_exchange(
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
pub(super) async fn publish_to_queue(
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
