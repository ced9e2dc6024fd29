//! How many sessions each user id holds on this node, and which session slots.
//!
//! A user may hold up to `--sessions-per-user` sessions across the cluster.
//! Each session holds one *slot*, a number below that limit. On RabbitMQ a slot
//! is also an exclusive queue (`<prefix>.slot.<user>.<n>`), so the broker
//! arbitrates between nodes exactly; this file keeps the node's own view, so
//! two local sessions never race for the same slot and the embedded bus (one
//! node) needs nothing more.
//!
//! A client that drops its socket and reconnects at once can find every slot
//! still held by sessions that are closing. A claim therefore waits, for a short
//! grace period, for a local slot to free before answering `too_many_sessions`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::names::UserId;

/// How long a new session waits for a previous session of the same user to end
/// when all its slots are held.
pub const RECONNECT_GRACE: Duration = Duration::from_millis(1500);

#[derive(Clone, Default)]
pub struct Claims {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The slots each user holds on this node. A std Mutex: never held across
    /// an await.
    held: Mutex<HashMap<UserId, BTreeSet<u16>>>,
    /// Woken whenever a slot is freed.
    freed: Notify,
}

/// One session slot of a user id; dropping it frees the slot.
pub struct Claim {
    claims: Claims,
    user: UserId,
    slot: u16,
}

impl Claim {
    pub fn slot(&self) -> u16 {
        self.slot
    }
}

impl Claims {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claim the lowest slot below `max` that this node does not hold, waiting
    /// up to `grace` for one to free when all are held here.
    pub async fn claim(&self, user: &UserId, max: u16, grace: Duration) -> Option<Claim> {
        let deadline = Instant::now() + grace;
        loop {
            let freed = self.inner.freed.notified();
            if let Some(claim) = self.claim_above(user, max, None) {
                return Some(claim);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// Claim the lowest slot below `max`, above `after` if given, that this
    /// node does not hold; without waiting. For a slot another node turned
    /// out to hold.
    pub fn claim_above(&self, user: &UserId, max: u16, after: Option<u16>) -> Option<Claim> {
        let mut held = self.inner.held.lock().unwrap();
        let slots = held.entry(user.clone()).or_default();
        let first = after.map_or(0, |slot| slot + 1);
        let free = (first..max).find(|slot| !slots.contains(slot));
        let Some(slot) = free else {
            if slots.is_empty() {
                held.remove(user);
            }
            return None;
        };
        slots.insert(slot);
        Some(Claim {
            claims: self.clone(),
            user: user.clone(),
            slot,
        })
    }

    /// Whether `user` has a session on this node.
    pub fn is_claimed(&self, user: &UserId) -> bool {
        self.inner.held.lock().unwrap().contains_key(user)
    }

    /// Sessions this node holds for `user`.
    pub fn sessions_of(&self, user: &UserId) -> usize {
        self.inner
            .held
            .lock()
            .unwrap()
            .get(user)
            .map_or(0, BTreeSet::len)
    }

    /// User ids with at least one session on this node.
    pub fn count(&self) -> usize {
        self.inner.held.lock().unwrap().len()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.claims.inner.held.lock().unwrap();
        if let Some(slots) = held.get_mut(&self.user) {
            slots.remove(&self.slot);
            if slots.is_empty() {
                held.remove(&self.user);
            }
        }
        drop(held);
        self.claims.inner.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        UserId::parse("alice").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn gives_each_session_its_own_slot_up_to_the_limit() {
        let claims = Claims::new();
        let a = claims.claim(&alice(), 2, Duration::ZERO).await.unwrap();
        let b = claims.claim(&alice(), 2, Duration::ZERO).await.unwrap();
        assert_eq!((a.slot(), b.slot()), (0, 1));
        assert!(
            claims
                .claim(&alice(), 2, Duration::from_secs(1))
                .await
                .is_none()
        );
        assert_eq!(claims.sessions_of(&alice()), 2);
        drop(a);
        // The lowest free slot is taken again.
        assert_eq!(
            claims
                .claim(&alice(), 2, Duration::ZERO)
                .await
                .unwrap()
                .slot(),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_user_waits_for_a_slot_to_free() {
        let claims = Claims::new();
        let first = claims.claim(&alice(), 1, Duration::ZERO).await.unwrap();
        let waiter = {
            let claims = claims.clone();
            tokio::spawn(async move { claims.claim(&alice(), 1, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        drop(first);
        let second = waiter.await.unwrap();
        assert_eq!(second.as_ref().map(Claim::slot), Some(0));
        assert_eq!(claims.count(), 1);
        drop(second);
        assert_eq!(claims.count(), 0);
    }

    #[test]
    fn skips_slots_another_node_holds() {
        let claims = Claims::new();
        let first = claims.claim_above(&alice(), 3, None).unwrap();
        // Slot 0 turned out to be held elsewhere: move on, and let it go here.
        let next = claims.claim_above(&alice(), 3, Some(first.slot())).unwrap();
        drop(first);
        assert_eq!(next.slot(), 1);
        assert_eq!(claims.sessions_of(&alice()), 1);
        assert!(claims.claim_above(&alice(), 3, Some(2)).is_none());
    }
}
