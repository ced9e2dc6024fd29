//! A node's presence queue and the channel it gossips on.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::{Channel, Consumer};

use super::publisher::publish_to_exchange;
use super::unavailable;
use crate::bus::BusError;
use crate::bus::pool::PooledConnection;

/// A node's presence queue and the channel it publishes gossip on.
pub struct AmqpPresenceLink {
    pub(super) conn: Arc<PooledConnection>,
    pub(super) channel: Channel,
    pub(super) consumer: Consumer,
    pub(super) exchange: String,
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
