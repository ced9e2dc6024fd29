//! The cluster as one node sees it: who is in which room on which node.
//!
//! Pure state, no I/O: the presence task feeds it local joins and leaves and the
//! gossip other nodes publish, and asks it for member lists. Each node is the
//! authority on its own sessions; everything about other nodes is a copy that is
//! refreshed by their deltas and snapshots and dropped when their heartbeats stop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What nodes tell each other on the presence exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Gossip {
    /// Everything a node hosts; doubles as its heartbeat. `hello` asks every other
    /// node to answer with its own snapshot (a node that just started knows no one).
    Snapshot {
        node: String,
        connections: usize,
        rooms: BTreeMap<String, Vec<String>>,
        #[serde(default)]
        hello: bool,
        ts: u64,
    },
    /// Joins and leaves on a node since its last delta, in order.
    Delta { node: String, changes: Vec<Change> },
    /// A node stopping cleanly: forget it now rather than at the TTL.
    Goodbye { node: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub room: String,
    pub user: String,
    pub joined: bool,
}

/// One live node, as `GET /cluster` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub connections: usize,
    pub rooms: usize,
    /// Unix time in ms of the last heartbeat or gossip heard from the node.
    pub last_seen_ms: u64,
}

#[derive(Debug, Default)]
struct RemoteNode {
    rooms: BTreeMap<String, BTreeSet<String>>,
    connections: usize,
    last_seen: Option<Instant>,
    last_seen_ms: u64,
}

/// What applying a piece of gossip changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rooms whose member set may have changed.
    pub rooms: BTreeSet<String>,
    /// The gossip came from a node we did not know, or asked for a reply.
    pub reply_due: bool,
}

pub struct ClusterView {
    me: String,
    ttl: Duration,
    /// Per local room, each member's number of sessions in it: a user with
    /// two tabs in a room is one member, until both have left.
    local: BTreeMap<String, BTreeMap<String, usize>>,
    remote: HashMap<String, RemoteNode>,
}

impl ClusterView {
    pub fn new(me: &str, ttl: Duration) -> Self {
        Self {
            me: me.to_owned(),
            ttl,
            local: BTreeMap::new(),
            remote: HashMap::new(),
        }
    }

    /// One more session of `user` in `room`; true when it is the user's first
    /// (the user joins the room).
    pub fn join_local(&mut self, room: &str, user: &str) -> bool {
        let sessions = self
            .local
            .entry(room.to_owned())
            .or_default()
            .entry(user.to_owned())
            .or_default();
        *sessions += 1;
        *sessions == 1
    }

    /// One session of `user` fewer in `room`; true when it was the user's last
    /// (the user leaves the room).
    pub fn leave_local(&mut self, room: &str, user: &str) -> bool {
        let Some(users) = self.local.get_mut(room) else {
            return false;
        };
        let Some(sessions) = users.get_mut(user) else {
            return false;
        };
        *sessions -= 1;
        if *sessions > 0 {
            return false;
        }
        users.remove(user);
        if users.is_empty() {
            self.local.remove(room);
        }
        true
    }

    /// Everyone in `room` on every live node.
    pub fn members(&self, room: &str) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self
            .local
            .get(room)
            .map(|users| users.keys().cloned().collect())
            .unwrap_or_default();
        for node in self.remote.values() {
            if let Some(users) = node.rooms.get(room) {
                all.extend(users.iter().cloned());
            }
        }
        all
    }

    /// How many are in `room`, without listing them: O(nodes). Counts a user
    /// twice only in the moment a reconnect moves them between nodes.
    pub fn member_count(&self, room: &str) -> usize {
        self.local.get(room).map_or(0, BTreeMap::len)
            + self
                .remote
                .values()
                .filter_map(|n| n.rooms.get(room))
                .map(BTreeSet::len)
                .sum::<usize>()
    }

    /// This node's state for the others; `connections` is its session count.
    pub fn snapshot(&self, hello: bool, now_ms: u64, connections: usize) -> Gossip {
        Gossip::Snapshot {
            node: self.me.clone(),
            connections,
            rooms: self
                .local
                .iter()
                .map(|(room, users)| (room.clone(), users.keys().cloned().collect()))
                .collect(),
            hello,
            ts: now_ms,
        }
    }

    pub fn apply(&mut self, gossip: Gossip, now: Instant, now_ms: u64) -> Applied {
        let mut applied = Applied::default();
        let node_id = match &gossip {
            Gossip::Snapshot { node, .. }
            | Gossip::Delta { node, .. }
            | Gossip::Goodbye { node } => node,
        };
        if *node_id == self.me {
            return applied;
        }
        if let Gossip::Goodbye { node } = &gossip {
            if let Some(gone) = self.remote.remove(node) {
                applied.rooms.extend(gone.rooms.into_keys());
            }
            return applied;
        }
        let known = self.remote.contains_key(node_id);
        let node = self.remote.entry(node_id.clone()).or_default();
        node.last_seen = Some(now);
        node.last_seen_ms = now_ms;
        applied.reply_due = !known;
        match gossip {
            Gossip::Snapshot {
                connections,
                rooms,
                hello,
                ..
            } => {
                applied.reply_due |= hello;
                let rooms: BTreeMap<String, BTreeSet<String>> = rooms
                    .into_iter()
                    .map(|(room, users)| (room, users.into_iter().collect()))
                    .collect();
                // Rooms that differ between the old copy and the new one.
                for (room, users) in &rooms {
                    if node.rooms.get(room) != Some(users) {
                        applied.rooms.insert(room.clone());
                    }
                }
                for room in node.rooms.keys() {
                    if !rooms.contains_key(room) {
                        applied.rooms.insert(room.clone());
                    }
                }
                node.rooms = rooms;
                node.connections = connections;
            }
            Gossip::Delta { changes, .. } => {
                for change in changes {
                    applied.rooms.insert(change.room.clone());
                    if change.joined {
                        node.connections += 1;
                        node.rooms
                            .entry(change.room)
                            .or_default()
                            .insert(change.user);
                    } else {
                        node.connections = node.connections.saturating_sub(1);
                        if let Some(users) = node.rooms.get_mut(&change.room) {
                            users.remove(&change.user);
                            if users.is_empty() {
                                node.rooms.remove(&change.room);
                            }
                        }
                    }
                }
            }
            Gossip::Goodbye { .. } => unreachable!("handled above"),
        }
        applied
    }

    /// Forget nodes not heard from within the TTL; returns the rooms they were in.
    pub fn expire(&mut self, now: Instant) -> BTreeSet<String> {
        let ttl = self.ttl;
        let dead: Vec<String> = self
            .remote
            .iter()
            .filter(|(_, n)| {
                n.last_seen
                    .is_some_and(|seen| now.duration_since(seen) > ttl)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut rooms = BTreeSet::new();
        for id in dead {
            if let Some(node) = self.remote.remove(&id) {
                tracing::warn!(node = %id, "node expired: no heartbeat within the TTL");
                rooms.extend(node.rooms.into_keys());
            }
        }
        rooms
    }

    /// This node (with `connections` sessions) and every live remote node.
    pub fn nodes(&self, now_ms: u64, connections: usize) -> Vec<NodeInfo> {
        let mut nodes = vec![NodeInfo {
            id: self.me.clone(),
            connections,
            rooms: self.local.len(),
            last_seen_ms: now_ms,
        }];
        nodes.extend(self.remote.iter().map(|(id, n)| NodeInfo {
            id: id.clone(),
            connections: n.connections,
            rooms: n.rooms.len(),
            last_seen_ms: n.last_seen_ms,
        }));
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(users: &[&str]) -> BTreeSet<String> {
        users.iter().map(|u| u.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn merges_local_and_remote_members_and_expires_silent_nodes() {
        let mut view = ClusterView::new("a", Duration::from_secs(2));
        view.join_local("lobby", "alice");
        let snapshot = Gossip::Snapshot {
            node: "b".into(),
            connections: 1,
            rooms: [("lobby".to_string(), vec!["bob".to_string()])].into(),
            hello: true,
            ts: 0,
        };
        let applied = view.apply(snapshot, Instant::now(), 0);
        assert!(
            applied.reply_due,
            "a hello from a new node wants our snapshot"
        );
        assert_eq!(applied.rooms, set(&["lobby"]));
        assert_eq!(view.members("lobby"), set(&["alice", "bob"]));

        let delta = Gossip::Delta {
            node: "b".into(),
            changes: vec![
                Change {
                    room: "lobby".into(),
                    user: "carol".into(),
                    joined: true,
                },
                Change {
                    room: "lobby".into(),
                    user: "bob".into(),
                    joined: false,
                },
            ],
        };
        assert!(!view.apply(delta, Instant::now(), 0).reply_due);
        assert_eq!(view.members("lobby"), set(&["alice", "carol"]));
        assert_eq!(view.nodes(0, 0).len(), 2);

        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(view.expire(Instant::now()), set(&["lobby"]));
        assert_eq!(view.members("lobby"), set(&["alice"]));
        assert_eq!(view.nodes(0, 0).len(), 1);
    }

    #[test]
    fn ignores_its_own_gossip_and_forgets_nodes_that_say_goodbye() {
        let mut view = ClusterView::new("a", Duration::from_secs(2));
        let mine = view.snapshot(true, 0, 1);
        assert_eq!(view.apply(mine, Instant::now(), 0), Applied::default());
        let delta = Gossip::Delta {
            node: "b".into(),
            changes: vec![Change {
                room: "r".into(),
                user: "u".into(),
                joined: true,
            }],
        };
        view.apply(delta, Instant::now(), 0);
        assert_eq!(view.members("r"), set(&["u"]));
        let applied = view.apply(Gossip::Goodbye { node: "b".into() }, Instant::now(), 0);
        assert_eq!(applied.rooms, set(&["r"]));
        assert!(view.members("r").is_empty());
    }

    #[test]
    fn a_leave_then_rejoin_in_one_delta_keeps_the_user() {
        let mut view = ClusterView::new("a", Duration::from_secs(2));
        let delta = Gossip::Delta {
            node: "b".into(),
            changes: vec![
                Change {
                    room: "r".into(),
                    user: "u".into(),
                    joined: true,
                },
                Change {
                    room: "r".into(),
                    user: "u".into(),
                    joined: false,
                },
                Change {
                    room: "r".into(),
                    user: "u".into(),
                    joined: true,
                },
            ],
        };
        view.apply(delta, Instant::now(), 0);
        assert_eq!(view.members("r"), set(&["u"]));
    }
}
