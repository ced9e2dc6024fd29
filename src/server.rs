//! A node serving on a bound port: the listener, and shutdown in order.
//!
//! Shutdown follows mini-redis: one token ([`crate::node::Lifecycle::shutdown`])
//! tells the accept loop and every session to stop; sessions close their sockets
//! with 1001 and delete their queues; a [`tokio_util::task::TaskTracker`] lets
//! the node wait for all of them before it closes its broker connections. A
//! drain ([`RunningServer::drain`]) comes first on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::Config;
use crate::node::Node;

/// A node serving on a bound port.
pub struct RunningServer {
    addr: SocketAddr,
    node: Arc<Node>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// Bind `config.listen` (port 0 picks a free port), start the node, and serve.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let listener =
            listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let node = Node::start(config).await?;
        info!(%addr, node = %node.id, bus = node.bus.kind(), "listening");
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
        self.node.lifecycle.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Drain for a restart: turn not-ready at once (the balancer stops sending new
    /// users), keep serving for `drain`, then close every session with 1012 spread
    /// over the drain jitter, and shut down. `abort` (e.g. a second signal) cuts
    /// the drain short into an immediate [`RunningServer::shutdown`].
    pub async fn drain(self, drain: Duration, abort: impl std::future::Future<Output = ()>) {
        let node = self.node.clone();
        let lifecycle = &node.lifecycle;
        lifecycle.draining.cancel();
        info!(?drain, jitter = ?lifecycle.restart_jitter, "draining");
        let graceful = async {
            tokio::time::sleep(drain).await;
            lifecycle.restart.cancel();
            // Sessions close themselves within the jitter; give them that long,
            // plus a margin for their queue deletions.
            node.sessions.close();
            let _ = tokio::time::timeout(
                lifecycle.restart_jitter + Duration::from_secs(5),
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
}

/// Bind the listening socket ([`crate::listener::serve`] sets TCP_NODELAY on
/// each connection it accepts).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// After shutdown begins, how long open HTTP requests (a slow upload, say) may
/// take before they are cut.
const HTTP_GRACE: Duration = Duration::from_secs(5);
/// How long sessions may take to close and delete their queues at shutdown.
const SESSIONS_GRACE: Duration = Duration::from_secs(15);

async fn serve(node: Arc<Node>, listener: TcpListener) {
    let shutdown = node.lifecycle.shutdown.clone();
    let metrics = node.metrics.clone();
    let http = crate::listener::serve(
        listener,
        warp::service(crate::routes::routes(node.clone())),
        node.config.max_pending_connections,
        shutdown.clone(),
        move |code| metrics.error(code),
    );
    let cut_off = async {
        shutdown.cancelled().await;
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
    node.stop().await;
    info!("stopped");
}
