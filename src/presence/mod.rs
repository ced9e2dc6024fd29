//! Presence: who is in each room across the cluster, and the live node list.
//!
//! One task per node owns a [`view::ClusterView`]. Sessions tell it when they
//! subscribe to a room and leave it; a user is a member of a room while any of
//! its sessions is subscribed (two tabs are one member). The task
//! - publishes this node's changes as batched deltas, and a full snapshot every
//!   heartbeat, on the broker's presence fanout exchange (one queue per node);
//! - applies other nodes' gossip, and forgets a node whose heartbeats stop for
//!   the TTL (a node killed without saying goodbye);
//! - every batch interval, sends each local room's sessions one `presence` frame
//!   with the joins and leaves since the last one, serialised once per room.
//!
//! Consistency is eventual: a live node's changes reach others within a batch
//! interval plus broker latency; a dead node's users linger at most the TTL plus
//! one batch interval. No registry outside RabbitMQ exists.

pub mod view;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};
use tungstenite::Utf8Bytes;

use crate::bus::{Bus, PresenceLink};
use crate::protocol::{ServerFrame, now_ms};
use view::{Change, ClusterView, Gossip, NodeInfo};

/// Presence frames a session may fall behind before it misses some.
const UPDATES_BUFFER: usize = 64;
/// How long one gossip publish may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Commands queued for the presence task; senders wait when it is full.
const COMMAND_BUFFER: usize = 1024;

/// Timing of presence.
#[derive(Debug, Clone, Copy)]
pub struct PresenceTiming {
    /// How long a silent node stays in member lists.
    pub ttl: Duration,
    /// How long joins and leaves are gathered into one delta / one frame.
    pub batch: Duration,
    /// Rooms larger than this get no live diffs and a capped `welcome` list.
    pub max_members: usize,
}

impl PresenceTiming {
    /// Heartbeats come three times per TTL, so one lost heartbeat is not a death.
    pub fn heartbeat(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }
}

/// What a session gets when it joins: the members now, and the changes to come.
pub struct Joined {
    /// The room's members, at most `max_members` of them (sorted).
    pub members: Vec<String>,
    /// How many members the room has in all.
    pub total: usize,
    /// Serialised `presence` frames for the session's room, shared by all its
    /// sessions (a reference count each, not a copy).
    pub updates: broadcast::Receiver<Utf8Bytes>,
    /// Where to ask for the whole list again after missing updates.
    pub presence: Presence,
}

enum Command {
    Join {
        room: String,
        user: String,
        reply: oneshot::Sender<(Vec<String>, usize, broadcast::Receiver<Utf8Bytes>)>,
    },
    Leave {
        room: String,
        user: String,
    },
    Members {
        room: String,
        reply: oneshot::Sender<Vec<String>>,
    },
    Nodes {
        reply: oneshot::Sender<Vec<NodeInfo>>,
    },
    Stop {
        done: oneshot::Sender<()>,
    },
}

/// A handle on the node's presence task. Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    commands: mpsc::Sender<Command>,
    task: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Presence {
    /// Start the node's presence task. `sessions` tracks the node's sessions;
    /// its count is what `/cluster` and the gossip report as connections.
    pub fn start(
        bus: Bus,
        node_id: String,
        timing: PresenceTiming,
        sessions: tokio_util::task::TaskTracker,
    ) -> Self {
        let (commands, rx) = mpsc::channel(COMMAND_BUFFER);
        let task = tokio::spawn(run(bus, node_id, timing, sessions, rx));
        Self {
            commands,
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        }
    }

    pub async fn join(&self, room: &str, user: &str) -> Joined {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::Join {
                room: room.to_owned(),
                user: user.to_owned(),
                reply,
            })
            .await;
        match (sent, rx.await) {
            (Ok(()), Ok((members, total, updates))) => Joined {
                members,
                total,
                updates,
                presence: self.clone(),
            },
            // The task is gone (the node is stopping): an empty, silent presence.
            _ => Joined {
                members: vec![user.to_owned()],
                total: 1,
                updates: broadcast::channel(1).1,
                presence: self.clone(),
            },
        }
    }

    pub async fn leave(&self, room: &str, user: &str) {
        let _ = self
            .commands
            .send(Command::Leave {
                room: room.to_owned(),
                user: user.to_owned(),
            })
            .await;
    }

    pub async fn members(&self, room: &str) -> Vec<String> {
        let (reply, rx) = oneshot::channel();
        let _ = self
            .commands
            .send(Command::Members {
                room: room.to_owned(),
                reply,
            })
            .await;
        rx.await.unwrap_or_default()
    }

    pub async fn nodes(&self) -> Vec<NodeInfo> {
        let (reply, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Nodes { reply }).await;
        rx.await.unwrap_or_default()
    }

    /// Say goodbye to the other nodes and stop. Call after sessions have left.
    pub async fn stop(&self) {
        let (done, rx) = oneshot::channel();
        if self.commands.send(Command::Stop { done }).await.is_ok() {
            let _ = rx.await;
        }
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// The presence task's state besides the view.
struct Rooms {
    /// Per local room: where its sessions read presence frames.
    updates: HashMap<String, broadcast::Sender<Utf8Bytes>>,
    /// Per local room: the member set its sessions were last told about.
    announced: HashMap<String, BTreeSet<String>>,
    /// Rooms whose members may have changed since the last flush.
    dirty: BTreeSet<String>,
    /// Rooms over `max_members`: no diffs, and a capped list in `welcome`.
    large: std::collections::HashSet<String>,
    max_members: usize,
}

impl Rooms {
    /// Send each dirty local room one frame with what changed since the last one.
    fn flush(&mut self, view: &ClusterView) {
        for room in std::mem::take(&mut self.dirty) {
            let (Some(sender), Some(announced)) =
                (self.updates.get(&room), self.announced.get_mut(&room))
            else {
                continue;
            };
            let now = view.members(&room);
            if now.len() > self.max_members {
                // A large room: live diffs would cost every member a frame per
                // batch for every join. Its sessions keep the list they have;
                // `/rooms/<room>/members` stays exact.
                self.large.insert(room.clone());
                *announced = now;
                continue;
            }
            let frame = if self.large.remove(&room) {
                // Back under the cap: everyone gets the whole list again.
                *announced = now;
                ServerFrame::Presence {
                    room: room.clone(),
                    joins: Vec::new(),
                    leaves: Vec::new(),
                    members: Some(announced.iter().cloned().collect()),
                }
            } else {
                let joins: Vec<String> = now.difference(announced).cloned().collect();
                let leaves: Vec<String> = announced.difference(&now).cloned().collect();
                if joins.is_empty() && leaves.is_empty() {
                    continue;
                }
                *announced = now;
                ServerFrame::Presence {
                    room: room.clone(),
                    joins,
                    leaves,
                    members: None,
                }
            };
            let _ = sender.send(Utf8Bytes::from(frame.to_json()));
        }
    }
}

async fn connect_link(bus: &Bus, node_id: &str) -> Option<PresenceLink> {
    // Bounded: a broker connection that is half gone can leave a channel open
    // or a declare unanswered forever, and every join and leave waits on this
    // task.
    match tokio::time::timeout(PUBLISH_TIMEOUT, bus.presence_link(node_id)).await {
        Ok(Ok(link)) => Some(link),
        Ok(Err(e)) => {
            warn!(error = %e, "presence link unavailable; will retry");
            None
        }
        Err(_) => {
            warn!("presence link timed out; will retry");
            None
        }
    }
}

async fn publish(link: &mut Option<PresenceLink>, gossip: &Gossip) {
    let Some(l) = link else { return };
    let payload = Bytes::from(serde_json::to_vec(gossip).expect("gossip serialises"));
    // Bounded: sessions wait on this task to join and leave, so a broker that
    // stops reading must cost the link (rebuilt at the next heartbeat), not them.
    match tokio::time::timeout(PUBLISH_TIMEOUT, l.publish(payload)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "presence publish failed");
            *link = None;
        }
        Err(_) => {
            warn!("presence publish timed out");
            *link = None;
        }
    }
}

async fn run(
    bus: Bus,
    node_id: String,
    timing: PresenceTiming,
    sessions: tokio_util::task::TaskTracker,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut view = ClusterView::new(&node_id, timing.ttl);
    let mut rooms = Rooms {
        updates: HashMap::new(),
        announced: HashMap::new(),
        dirty: BTreeSet::new(),
        large: std::collections::HashSet::new(),
        max_members: timing.max_members.max(1),
    };
    let mut pending: Vec<Change> = Vec::new();
    let mut reply_due = false;
    let mut link = connect_link(&bus, &node_id).await;
    let mut said_hello = false;
    let mut batch = tokio::time::interval(timing.batch);
    batch.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(timing.heartbeat());
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        let gossip = async {
            match link.as_mut() {
                Some(l) => l.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Join { room, user, reply }) => {
                    if view.join_local(&room, &user) {
                        pending.push(Change { room: room.clone(), user: user.clone(), joined: true });
                    }
                    if !rooms.updates.contains_key(&room) {
                        rooms.updates.insert(room.clone(), broadcast::channel(UPDATES_BUFFER).0);
                        // New local room: announce as known everyone but the
                        // joiner, so the first flush tells the room about them.
                        let mut before = view.members(&room);
                        before.remove(&user);
                        rooms.announced.insert(room.clone(), before);
                    }
                    // A small room's welcome is exact. A large one's lists what
                    // its sessions were last told plus the joiner (at most the cap):
                    // O(cap) per join rather than O(room), and the next flush's
                    // state is relative to that anyway.
                    let announced = &rooms.announced[&room];
                    let (members, total) = if announced.len() < rooms.max_members {
                        let exact = view.members(&room);
                        let total = exact.len();
                        (exact.into_iter().take(rooms.max_members).collect(), total)
                    } else {
                        let total = view.member_count(&room);
                        let mut members: Vec<String> =
                            announced.iter().take(rooms.max_members).cloned().collect();
                        if !announced.contains(&user) {
                            members.push(user.clone());
                            members.sort();
                            members.truncate(rooms.max_members);
                        }
                        (members, total)
                    };
                    rooms.dirty.insert(room.clone());
                    let updates = rooms.updates[&room].subscribe();
                    let _ = reply.send((members, total, updates));
                }
                Some(Command::Leave { room, user }) => {
                    if view.leave_local(&room, &user) {
                        pending.push(Change { room: room.clone(), user, joined: false });
                    }
                    rooms.dirty.insert(room.clone());
                    if rooms.updates.get(&room).is_some_and(|s| s.receiver_count() == 0) {
                        rooms.updates.remove(&room);
                        rooms.announced.remove(&room);
                        rooms.large.remove(&room);
                    }
                }
                Some(Command::Members { room, reply }) => {
                    let _ = reply.send(view.members(&room).into_iter().collect());
                }
                Some(Command::Nodes { reply }) => {
                    let _ = reply.send(view.nodes(now_ms(), sessions.len()));
                }
                Some(Command::Stop { done }) => {
                    let goodbye = Gossip::Goodbye { node: node_id.clone() };
                    let goodbye = publish(&mut link, &goodbye);
                    // Without a goodbye the others expire us after the TTL anyway.
                    let _ = tokio::time::timeout(Duration::from_secs(2), goodbye).await;
                    drop(link);
                    let _ = done.send(());
                    return;
                }
            },
            received = gossip => match received {
                Ok(payload) => match serde_json::from_slice::<Gossip>(&payload) {
                    Ok(g) => {
                        let applied = view.apply(g, Instant::now(), now_ms());
                        reply_due |= applied.reply_due;
                        rooms.dirty.extend(applied.rooms);
                    }
                    Err(e) => debug!(error = %e, "ignoring malformed gossip"),
                },
                Err(e) => {
                    warn!(error = %e, "presence link lost");
                    link = None;
                }
            },
            _ = batch.tick() => {
                rooms.dirty.extend(view.expire(Instant::now()));
                if !pending.is_empty() {
                    let changes = std::mem::take(&mut pending);
                    publish(&mut link, &Gossip::Delta { node: node_id.clone(), changes }).await;
                }
                if reply_due {
                    reply_due = false;
                    publish(&mut link, &view.snapshot(false, now_ms(), sessions.len())).await;
                }
                rooms.flush(&view);
            }
            _ = heartbeat.tick() => {
                if link.is_none() {
                    link = connect_link(&bus, &node_id).await;
                    said_hello = false;
                }
                // The first snapshot on a (new) link says hello, so others answer
                // with theirs and this node learns the cluster at once.
                publish(&mut link, &view.snapshot(!said_hello, now_ms(), sessions.len())).await;
                said_hello = link.is_some();
            }
        }
    }
}
