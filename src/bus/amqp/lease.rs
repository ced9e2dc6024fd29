//! A session's hold on its queues (its slot and its connection queue) and its
//! channel, and their release: the slot always goes; the connection queue
//! goes too, or, when it is resumable and the session may come back, stays
//! for the grace (`x-expires` deletes it after), with everything the client
//! had not acknowledged back in it, and beside it the session's park note
//! (`<prefix>.note.<user>.<session>`, see [`crate::bus::gaps::ParkNote`]) for
//! the session that resumes it. With per-node fanout the session also leaves
//! the rooms of the node's feed.

use std::sync::Arc;

use lapin::options::QueueDeleteOptions;
use lapin::{Channel, Consumer};
use tracing::{debug, warn};

use super::consumer_connection::ConsumerChannel;
use super::inbox::ParkSlot;
use super::node_fanout::NodeFanout;
use super::publisher::publish_to_queue;
use super::{QueueLife, RELEASE_TIMEOUT, declare_queue};
use crate::bus::Release;
use crate::bus::pool::PooledConnection;
use crate::names::SessionId;

pub(super) struct LeaseState {
    pub(super) conn: Arc<PooledConnection>,
    pub(super) channel: Channel,
    /// What to delete, in the order declared: the slot first, then the
    /// connection's queue. Deleted in reverse, so the slot frees last.
    pub(super) queues: Vec<String>,
    /// When the connection's queue outlives its channel (`x-expires`), so it
    /// may be kept for a resume: where its inbox leaves its park note, the
    /// note's queue, and how long that lives unread.
    pub(super) parking: Option<Parking>,
    /// With per-node fanout: the node's feed, whose rooms the session leaves.
    pub(super) node_fanout: Option<(Arc<NodeFanout>, SessionId)>,
    /// A handle on the session's consumer, let go only once the channel is
    /// closed: lapin cancels a consumer when its last handle goes, and a
    /// cancel before the close leaves the queue without a consumer while
    /// the channel still holds what it had not acknowledged. A resume that
    /// sees no consumer then consumes newer messages before those come back.
    /// Boxed: a consumer is large, and every session's task holds its lease.
    pub(super) consumer: Option<Box<Consumer>>,
    /// With Warren's own consumer connection: the session's channel there.
    /// Closed after the park note is left and before the queue is deleted:
    /// its close puts back what the client had not acknowledged, and only
    /// then does a resume see the queue without a consumer.
    pub(super) own_channel: Option<ConsumerChannel>,
}

pub(super) struct Parking {
    pub(super) slot: ParkSlot,
    pub(super) note_queue: String,
    pub(super) note_args: lapin::types::FieldTable,
}

pub struct AmqpLease {
    pub(super) state: Option<LeaseState>,
}

impl AmqpLease {
    pub(super) fn queues(&self) -> &[String] {
        self.state.as_ref().map_or(&[], |state| &state.queues)
    }

    pub(super) fn add_queue(&mut self, queue: String) {
        if let Some(state) = &mut self.state {
            state.queues.push(queue);
        }
    }

    /// Hold the session's consumer until the channel closes (see
    /// [`LeaseState::consumer`]).
    pub(super) fn hold_consumer(&mut self, consumer: Consumer) {
        if let Some(state) = &mut self.state {
            state.consumer = Some(Box::new(consumer));
        }
    }

    /// Hold the session's channel on Warren's own consumer connection, to
    /// close at release (see [`LeaseState::own_channel`]).
    pub(super) fn hold_own_channel(&mut self, channel: ConsumerChannel) {
        if let Some(state) = &mut self.state {
            state.own_channel = Some(channel);
        }
    }

    /// The broker closed the channel before anything was declared: nothing
    /// is left to delete, only the channel to uncount.
    pub(super) fn forget_channel(&mut self) {
        if let Some(state) = self.state.take() {
            state.conn.channel_closed();
        }
    }

    pub async fn release(mut self, queue: Release) {
        if let Some(mut state) = self.state.take() {
            if queue == Release::KeepForResume && state.parking.is_some() {
                // Only the slot goes; closing the channel puts what the client
                // had not acknowledged back in the queue, in order.
                state.queues.truncate(1);
            } else {
                state.parking = None;
            }
            // A broker that stopped answering must not hold the session (and
            // shutdown) forever; the exclusive queue dies with its connection,
            // which shutdown closes anyway. The release goes on in its own
            // task: cut short, it would leave its channel open and counted.
            let releasing = tokio::spawn(release(state));
            if tokio::time::timeout(RELEASE_TIMEOUT, releasing)
                .await
                .is_err()
            {
                warn!("queue deletion timed out; it goes on in the background");
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

/// Put the parked session's note in its queue, on the session's channel: the
/// channel closes after it, and a resume waits for that, so the note is there
/// before the resume looks. Without one a resume starts its numbers afresh.
async fn leave_note(channel: &Channel, parking: Parking) {
    let Some(note) = parking.slot.lock().unwrap().take() else {
        return;
    };
    let queue = parking.note_queue.as_str();
    let left = async {
        declare_queue(channel, queue, QueueLife::Kept, parking.note_args).await?;
        publish_to_queue(channel, queue, &note.to_bytes()).await
    }
    .await;
    if let Err(e) = left {
        debug!(%queue, error = %e, "could not leave the park note");
    }
}

/// Delete the queues and close the channel. If the session's channel is already
/// dead but its connection lives, the exclusive queues live too: delete them
/// through a fresh channel. If the connection is dead, the broker has deleted them.
pub(super) async fn release(state: LeaseState) {
    let LeaseState {
        conn,
        channel,
        queues,
        parking,
        node_fanout,
        consumer,
        own_channel,
    } = state;
    if let Some((fanout, session)) = node_fanout {
        fanout.forget(&session).await;
    }
    if !conn.is_connected() {
        // Nothing to ask a broker that is gone (lapin would wait for its
        // answer): it deleted the exclusive queues with the connection, and a
        // resumable queue expires on its own. Its client resumes without a note.
        conn.channel_closed();
        debug!(?queues, "released with the connection");
        return;
    }
    if let Some(parking) = parking {
        leave_note(&channel, parking).await;
    }
    if let Some(own_channel) = own_channel {
        own_channel.close().await;
    }
    let mut channel = Some(channel);
    for queue in queues.iter().rev() {
        if let Some(open) = &channel
            && open
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .is_ok()
        {
            continue;
        }
        channel = None;
        if !conn.is_connected() {
            break;
        }
        // Counted like any other, so the count stays within lapin's limit.
        match conn.open_counted().await {
            Ok(fresh) => {
                if let Err(e) = fresh
                    .channel()
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                {
                    warn!(%queue, error = %e, "could not delete a session queue");
                }
                fresh.close("session ended").await;
            }
            Err(e) => warn!(%queue, error = %e, "could not delete a session queue"),
        }
    }
    if let Some(channel) = channel {
        let _ = channel.close(200, "session ended".into()).await;
    }
    drop(consumer);
    conn.channel_closed();
    debug!(?queues, "released");
}
