//! A running node: its shared state ([`Node`]), its listener, and its shutdown.
//!
//! Shutdown follows mini-redis: one [`CancellationToken`] tells the accept loop
//! and every session to stop; sessions close their sockets with 1001 and delete
//! their queues; a [`TaskTracker`] lets the node wait for all of them before it
//! closes its broker connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bus::Bus;
use crate::bus::amqp::AmqpBus;
use crate::bus::memory::MemoryBus;
use crate::bus::pool::Pool;
use crate::claims::Claims;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::presence::{Presence, PresenceTiming};
use crate::session::{MessageIds, SessionSettings, StopSignals};
use crate::tokens::Tokens;

/// What every request handler and session of a node shares.
pub struct Node {
    pub config: Config,
    pub bus: Bus,
    /// User ids with a session on this node.
    pub claims: Claims,
    pub settings: Arc<SessionSettings>,
    /// Cancelled once, when the node starts shutting down: stop accepting.
    pub shutdown: CancellationToken,
    /// Cancelled when a drain begins: not ready, no new sessions, old ones stay.
    pub draining: CancellationToken,
    /// Who is where, across the cluster.
    pub presence: Presence,
    /// What sessions watch to know when to close, and with which code.
    pub stop: StopSignals,
    /// Every session task, so shutdown can wait for their cleanup.
    pub sessions: TaskTracker,
}

/// A node serving on a bound port.
pub struct RunningServer {
    addr: SocketAddr,
    node: Arc<Node>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// Bind `config.listen` (port 0 picks a free port), connect the bus, and serve.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let listener =
            listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{:06x}", rand::random::<u32>() & 0xff_ffff));
        let metrics = Arc::new(Metrics::new());
        let bus = match &config.amqp_url {
            None => Bus::Memory(MemoryBus::new()),
            Some(urls) => {
                let urls: Vec<String> = urls
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(String::from)
                    .collect();
                anyhow::ensure!(!urls.is_empty(), "--amqp-url is empty");
                let pool = Pool::start(
                    urls,
                    config.amqp_connections,
                    &format!("warren {node_id}"),
                    metrics.broker_reconnects.clone(),
                )
                .await;
                Bus::Amqp(AmqpBus::new(pool, &config.prefix, config.queue_max_length))
            }
        };
        let drain_jitter = Duration::from_secs(config.drain_jitter_secs);
        let presence = Presence::start(
            bus.clone(),
            node_id.clone(),
            PresenceTiming {
                ttl: Duration::from_secs(config.presence_ttl_secs.max(1)),
                batch: Duration::from_millis(config.presence_batch_ms.max(10)),
                max_members: config.presence_max_members,
            },
        );
        let node = Arc::new(Node {
            settings: Arc::new(SessionSettings {
                tokens: Tokens::new(config.session_secret.as_deref()),
                metrics: metrics.clone(),
                node_id: node_id.clone(),
                max_text_bytes: config.max_text_bytes,
                ping_interval: config.ping_interval(),
                ids: MessageIds::new(),
            }),
            config,
            bus,
            claims: Claims::new(),
            presence,
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            stop: StopSignals {
                shutdown: CancellationToken::new(),
                restart: CancellationToken::new(),
                restart_jitter: drain_jitter,
            },
            sessions: TaskTracker::new(),
        });
        info!(%addr, node = %node_id, bus = node.bus.kind(), "listening");
        let task = tokio::spawn(serve(node.clone(), listener));
        Ok(Self { addr, node, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Stop accepting, close every session with 1001, delete their queues, close
    /// the broker connections; returns when all of it is done.
    pub async fn shutdown(self) {
        self.node.shutdown.cancel();
        self.node.stop.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Drain for a restart: turn not-ready at once (the balancer stops sending new
    /// users), keep serving for `drain`, then close every session with 1012 spread
    /// over the drain jitter, and shut down. `abort` (e.g. a second signal) cuts
    /// the drain short into an immediate [`RunningServer::shutdown`].
    pub async fn drain(self, drain: Duration, abort: impl std::future::Future<Output = ()>) {
        let node = self.node.clone();
        node.draining.cancel();
        info!(?drain, jitter = ?node.stop.restart_jitter, "draining");
        let graceful = async {
            tokio::time::sleep(drain).await;
            node.stop.restart.cancel();
            // Sessions close themselves within the jitter; give them that long,
            // plus a margin for their queue deletions.
            node.sessions.close();
            let _ = tokio::time::timeout(
                node.stop.restart_jitter + Duration::from_secs(5),
                node.sessions.wait(),
            )
            .await;
        };
        tokio::select! {
            _ = graceful => {}
            _ = abort => info!("drain aborted; stopping now"),
        }
        self.shutdown().await;
    }

    /// Wait until the node has stopped (after [`Node::shutdown`] was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Bind the listening socket. TCP_NODELAY is set on it because Linux passes it
/// on to every accepted connection, and warp's accept loop offers no hook to set
/// it per connection: chat frames are small writes, and Nagle's algorithm with
/// delayed ACKs would hold them back by up to 40 ms.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// After shutdown begins, how long open HTTP requests (a slow upload, say) may
/// take before they are cut.
const HTTP_GRACE: Duration = Duration::from_secs(5);
/// How long sessions may take to close and delete their queues at shutdown.
const SESSIONS_GRACE: Duration = Duration::from_secs(15);

async fn serve(node: Arc<Node>, listener: TcpListener) {
    let routes = crate::http::routes(node.clone());
    let http = warp::serve(routes)
        .incoming(listener)
        .graceful(node.shutdown.clone().cancelled_owned())
        .run();
    let cut_off = async {
        node.shutdown.cancelled().await;
        tokio::time::sleep(HTTP_GRACE).await;
    };
    tokio::select! {
        _ = http => {}
        _ = cut_off => warn!("HTTP requests still open after the grace period; cutting them"),
    }
    node.sessions.close();
    if tokio::time::timeout(SESSIONS_GRACE, node.sessions.wait())
        .await
        .is_err()
    {
        warn!("sessions still closing after the grace period; stopping anyway");
    }
    node.presence.stop().await;
    node.bus.close().await;
    info!("stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "Nagle would delay small frames"
        );
    }
}
