//! A node: everything its sessions and request handlers share, in one place.
//!
//! [`Node::start`] connects the bus and starts presence; it binds no port (that
//! is the server's job), so unit tests build a whole node on the embedded
//! bus. The node also owns its lifecycle: the three moments a node goes through
//! when it stops ([`Lifecycle`]), and the one readiness rule every transport and
//! `/readyz` apply ([`Node::readiness`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, BusError};
use crate::claims::Claims;
use crate::config::Config;
use crate::error::{ClientError, ErrorCode};
use crate::metrics::Metrics;
use crate::presence::{Presence, PresenceTiming};
use crate::protocol::MessageIds;
use crate::tokens::Tokens;

/// What every request handler and session of a node shares.
pub struct Node {
    /// This node's id, in `welcome`, `/cluster` and presence gossip.
    pub id: String,
    pub config: Config,
    pub bus: Bus,
    /// Who is where, across the cluster.
    pub presence: Presence,
    pub metrics: Arc<Metrics>,
    /// Issues the posting token every `welcome` carries.
    pub tokens: Tokens,
    /// Who clients are: their tokens, verified ([`crate::auth`]).
    pub auth: crate::auth::Auth,
    /// Connections per client address ([`crate::limits`]).
    pub limits: crate::limits::ConnectionLimits,
    /// User ids with a session on this node.
    pub claims: Claims,
    /// The ids of the messages this node's clients send.
    pub ids: MessageIds,
    pub lifecycle: Lifecycle,
    /// Every session task, so shutdown can wait for their cleanup.
    pub sessions: TaskTracker,
}

/// How a node stops, as its sessions and handlers see it.
pub struct Lifecycle {
    /// Cancelled once, when the node starts shutting down: the accept loop
    /// stops, and every session closes now with 1001.
    pub shutdown: CancellationToken,
    /// Cancelled when a drain begins: the node turns not ready and admits no new
    /// session; open ones carry on.
    pub draining: CancellationToken,
    /// Cancelled when the drain's wait is over: each session closes with 1012 at
    /// a random moment within `restart_jitter`, which spreads the reconnect storm
    /// over the remaining nodes.
    pub restart: CancellationToken,
    pub restart_jitter: Duration,
}

impl Lifecycle {
    /// Resolves when this session's turn to close for a drain has come.
    pub async fn restart_due(&self) {
        self.restart.cancelled().await;
        let jitter = self.restart_jitter.mul_f64(rand::random::<f64>());
        tokio::time::sleep(jitter).await;
    }
}

/// Why a node is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    ShuttingDown,
    /// Draining for a restart: no new sessions, but open ones (and their HTTP
    /// publishes) are still served.
    Draining,
    /// The bus cannot be used, and why.
    Bus(String),
}

impl From<NotReady> for ClientError {
    fn from(reason: NotReady) -> Self {
        let message = match reason {
            NotReady::ShuttingDown => "this node is shutting down; connect again to reach another",
            NotReady::Draining => {
                "this node is draining for a restart; connect again to reach another"
            }
            // The reason is the broker's own text: for logs and /readyz, not clients.
            NotReady::Bus(_) => return ClientError::unavailable(),
        };
        ClientError::new(ErrorCode::Unavailable, message)
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
}

impl Node {
    /// Connect the bus (the broker, or the embedded bus when `config` names
    /// none) and start presence. A broker that is down is not an error: the node
    /// starts not ready and keeps trying.
    pub async fn start(config: Config) -> Result<Arc<Node>, StartError> {
        let id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{:06x}", rand::random::<u32>() & 0xff_ffff));
        let auth = crate::auth::Auth::from_config(&config)?;
        if auth.is_anonymous() {
            tracing::warn!(
                "no --jwt-secret, --jwt-public-key or --jwks-url: anonymous mode, user ids are \
                 self-asserted"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let bus = Bus::connect(&config, &id, metrics.broker_reconnects.clone()).await?;
        let sessions = TaskTracker::new();
        let presence = Presence::start(
            bus.clone(),
            id.clone(),
            PresenceTiming {
                ttl: Duration::from_secs(config.presence_ttl_secs.max(1)),
                batch: Duration::from_millis(config.presence_batch_ms.max(10)),
                max_members: config.presence_max_members,
            },
            sessions.clone(),
        );
        Ok(Arc::new(Node {
            tokens: Tokens::new(config.session_secret.as_deref()),
            auth,
            limits: crate::limits::ConnectionLimits::new(&config),
            lifecycle: Lifecycle {
                shutdown: CancellationToken::new(),
                draining: CancellationToken::new(),
                restart: CancellationToken::new(),
                restart_jitter: Duration::from_secs(config.drain_jitter_secs),
            },
            id,
            config,
            bus,
            presence,
            metrics,
            claims: Claims::new(),
            ids: MessageIds::default(),
            sessions,
        }))
    }

    /// Whether this node takes new sessions; `/readyz` answers the same.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.lifecycle.shutdown.is_cancelled() {
            return Err(NotReady::ShuttingDown);
        }
        if self.lifecycle.draining.is_cancelled() {
            return Err(NotReady::Draining);
        }
        self.bus.readiness().map_err(NotReady::Bus)
    }

    /// Stop presence (saying goodbye to the other nodes) and close the broker
    /// connections. Call once every session has ended.
    pub async fn stop(&self) {
        self.presence.stop().await;
        self.bus.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_the_lifecycle() {
        let node = Node::start(Config::defaults()).await.unwrap();
        assert_eq!(node.readiness(), Ok(()));
        node.lifecycle.draining.cancel();
        assert_eq!(node.readiness(), Err(NotReady::Draining));
        node.lifecycle.shutdown.cancel();
        assert_eq!(node.readiness(), Err(NotReady::ShuttingDown));
        node.stop().await;
    }
}
