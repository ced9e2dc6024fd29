//! A session's hold on its queue and channel, and their release.

use std::sync::Arc;

use lapin::Channel;
use lapin::options::QueueDeleteOptions;
use tracing::{debug, warn};

use super::RELEASE_TIMEOUT;
use crate::bus::pool::PooledConnection;

pub(super) struct LeaseState {
    pub(super) conn: Arc<PooledConnection>,
    pub(super) channel: Channel,
    pub(super) queue: String,
}

pub struct AmqpLease {
    pub(super) state: Option<LeaseState>,
}

impl AmqpLease {
    /// The broker closed the channel and the queue is not ours: nothing is
    /// left to delete, only the channel to uncount.
    pub(super) fn forget_channel(&mut self) {
        if let Some(state) = self.state.take() {
            state.conn.channel_closed();
        }
    }

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
pub(super) async fn release(state: LeaseState) {
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
