//! Which user ids have a session on this node.
//!
//! The bus is the cluster-wide authority on user ids (RabbitMQ's exclusive
//! queues), but two sessions of one node share AMQP connections, and a connection
//! may re-declare its own exclusive queue. So the node also refuses a second local
//! session of a user id itself.
//!
//! A client that drops its socket and reconnects at once races its old session's
//! cleanup. A claim therefore waits, for a short grace period, for the current
//! holder to let go before answering `user_taken`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::names::UserId;

/// How long a new session waits for a previous session of the same user to end.
pub const RECONNECT_GRACE: Duration = Duration::from_millis(1500);

#[derive(Clone, Default)]
pub struct Claims {
    /// Holder of each claimed id, as the receiving end of a channel whose sender
    /// the holder's [`Claim`] owns: when the claim drops, waiters wake. A std Mutex:
    /// never held across an await.
    held: Arc<Mutex<HashMap<UserId, watch::Receiver<()>>>>,
}

/// A user id held by one session; dropping it frees the id.
pub struct Claim {
    claims: Claims,
    user: UserId,
    released: Option<watch::Sender<()>>,
}

impl Claims {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claim `user`, waiting up to `grace` for a current holder to end.
    pub async fn claim(&self, user: &UserId, grace: Duration) -> Option<Claim> {
        let deadline = Instant::now() + grace;
        loop {
            let mut holder = {
                let mut held = self.held.lock().unwrap();
                match held.get(user) {
                    Some(holder) => holder.clone(),
                    None => {
                        let (tx, rx) = watch::channel(());
                        held.insert(user.clone(), rx);
                        return Some(Claim {
                            claims: self.clone(),
                            user: user.clone(),
                            released: Some(tx),
                        });
                    }
                }
            };
            // `changed` fails once the holder's sender is dropped, i.e. released.
            if tokio::time::timeout_at(deadline, holder.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    pub fn is_claimed(&self, user: &UserId) -> bool {
        self.held.lock().unwrap().contains_key(user)
    }

    pub fn count(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let sender = self.released.take();
        let mut held = self.claims.held.lock().unwrap();
        if let (Some(sender), Some(holder)) = (&sender, held.get(&self.user))
            && holder.same_channel(&sender.subscribe())
        {
            held.remove(&self.user);
        }
        drop(held);
        drop(sender);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refuses_a_held_id_after_the_grace_period() {
        let claims = Claims::new();
        let alice = UserId::parse("alice").unwrap();
        let _first = claims.claim(&alice, Duration::ZERO).await.unwrap();
        assert!(claims.claim(&alice, Duration::from_secs(1)).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn hands_the_id_over_when_the_holder_ends() {
        let claims = Claims::new();
        let alice = UserId::parse("alice").unwrap();
        let first = claims.claim(&alice, Duration::ZERO).await.unwrap();
        let waiter = {
            let claims = claims.clone();
            let alice = alice.clone();
            tokio::spawn(async move { claims.claim(&alice, Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        drop(first);
        let second = waiter.await.unwrap();
        assert!(second.is_some());
        assert_eq!(claims.count(), 1);
        drop(second);
        assert_eq!(claims.count(), 0);
    }
}
