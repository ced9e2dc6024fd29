//! A small pool of AMQP connections that session channels are multiplexed over.
//!
//! Opening an AMQP connection per WebSocket would cost the broker a process tree
//! and a TCP socket per user; instead a node keeps a few connections
//! (`--amqp-connections`) and gives each session its own *channel* on the least
//! loaded one. RabbitMQ allows 2,047 channels per connection; we stop at
//! [`MAX_CHANNELS_PER_CONNECTION`].
//!
//! Each slot has a supervisor task that connects, watches the connection, and on
//! loss reconnects with exponential backoff and jitter, trying the configured
//! URLs in order. Sessions whose channels died with the connection learn it from
//! their own consumer and close with 1013; new sessions land on the new connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use rand::Rng;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::amqp::consumer_connection::ConsumerConnection;
use crate::config::AmqpConsumer;

/// Channels a pooled connection carries at most (RabbitMQ's default limit is 2,047).
pub const MAX_CHANNELS_PER_CONNECTION: usize = 2000;

/// The largest AMQP frame we propose when the URL does not set `frame_max`.
/// lapin keeps two ring buffers of 32 frames per connection, so RabbitMQ's
/// default (128 KiB) costs 8 MiB resident per pooled connection. Chat messages
/// are small; a larger one is just carried in several frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// How long to wait before reconnect attempt `attempt` (0-based): exponential,
/// capped, with "equal jitter" (half fixed, half random) so that many nodes
/// losing one broker do not come back in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    let ceiling = exp.min(BACKOFF_CAP);
    let half = ceiling / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// One live AMQP connection and how many session channels ride on it.
pub struct PooledConnection {
    pub connection: Connection,
    /// With `--amqp-consumer own`: the consuming connection of Warren's own
    /// beside it, where this connection's sessions read their queues. The
    /// two live and die together.
    pub consumers: Option<ConsumerConnection>,
    /// Channels counted on this connection, from the start of their open to
    /// the end of their close; picks the least loaded one.
    channels: AtomicUsize,
    /// Channels it may count: [`MAX_CHANNELS_PER_CONNECTION`], or fewer when
    /// the broker allows fewer (`channel_max`).
    capacity: usize,
    /// Cancelled when the supervisor sees this connection die, so every session
    /// on it learns at once even if its consumer stays silent.
    pub lost: CancellationToken,
    /// The broker refuses publishes on this connection (a memory or disk alarm).
    blocked: std::sync::atomic::AtomicBool,
}

impl PooledConnection {
    /// Open a channel and count it. Pair with [`PooledConnection::channel_closed`],
    /// called once the channel is closed.
    pub async fn open_channel(self: &Arc<Self>) -> lapin::Result<Channel> {
        self.open_counted().await.map(CountedChannel::into_inner)
    }

    /// Open a channel and count it until it is closed, whoever closes it.
    ///
    /// Cancel-safe: a caller that gives up mid-open (a `bounded` timeout)
    /// does not stop lapin, which opens the channel anyway once the broker
    /// answers. The open therefore runs in a task of its own, and a channel
    /// nobody is left to take is closed there, and only then uncounted: the
    /// count never falls below the channels really open on the connection
    /// (it did, and a storm of abandoned opens ran into lapin's channel limit).
    ///
    /// On a connection already lost, or lost while the channel opens, it fails
    /// at once: lapin's open would wait for an answer that never comes, and
    /// whoever waits may hold something others need (the feed's turn did).
    pub async fn open_counted(self: &Arc<Self>) -> lapin::Result<CountedChannel> {
        if self.lost.is_cancelled() || !self.is_connected() {
            return Err(connection_lost());
        }
        self.channels.fetch_add(1, Ordering::Relaxed);
        let conn = self.clone();
        let opening = tokio::spawn(async move {
            match conn.connection.create_channel().await {
                Ok(channel) => Ok(CountedChannel {
                    conn,
                    channel: Some(channel),
                }),
                Err(e) => {
                    conn.channel_closed();
                    Err(e)
                }
            }
        });
        // Given up on, the open finishes in its task, and a channel nobody
        // takes is closed there.
        let opened = tokio::select! {
            opened = opening => opened,
            () = self.lost.cancelled() => return Err(connection_lost()),
        };
        match opened {
            Ok(opened) => opened,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(std::io::Error::other(e).into()),
        }
    }

    pub fn channel_closed(&self) {
        self.channels.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    fn load(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.load() < self.capacity
    }
}

/// A channel counted against its connection. Closing it, or dropping it
/// (a holder that gave up), closes the channel and only then uncounts it.
pub struct CountedChannel {
    conn: Arc<PooledConnection>,
    /// `None` once handed over or closed.
    channel: Option<Channel>,
}

impl CountedChannel {
    pub fn channel(&self) -> &Channel {
        self.channel
            .as_ref()
            .expect("a counted channel is open until closed")
    }

    /// Hand the channel over: its new holder closes it and then calls
    /// [`PooledConnection::channel_closed`].
    pub fn into_inner(mut self) -> Channel {
        self.channel
            .take()
            .expect("a counted channel is open until closed")
    }

    /// Close the channel, then uncount it.
    pub async fn close(mut self, reason: &str) {
        if let Some(channel) = self.channel.take() {
            close_and_uncount(self.conn.clone(), channel, reason.to_owned()).await;
        }
    }
}

impl Drop for CountedChannel {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(close_and_uncount(
                self.conn.clone(),
                channel,
                "abandoned".to_owned(),
            ));
        }
    }
}

/// Close `channel` (unless the broker or the connection already did), then
/// uncount it: lapin keeps a channel on its connection until its close is
/// answered.
async fn close_and_uncount(conn: Arc<PooledConnection>, channel: Channel, reason: String) {
    if channel.status().connected() {
        let _ = channel.close(200, reason.as_str().into()).await;
    }
    conn.channel_closed();
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// Whether each slot opens a consuming connection of Warren's own too.
    own_consumers: bool,
    /// The current connection of each slot, `None` while (re)connecting. A std
    /// RwLock: held only to clone or swap an `Arc`.
    slots: Vec<RwLock<Option<Arc<PooledConnection>>>>,
    urls: Vec<String>,
    name: String,
    /// Why the broker is unusable, for `/readyz`, when no slot is connected.
    last_error: Mutex<String>,
    stop: CancellationToken,
    supervisors: TaskTracker,
    /// Counts lost connections, for `/metrics`.
    reconnects: prometheus_client::metrics::counter::Counter,
}

impl Pool {
    /// Start `size` supervised connections to the first reachable of `urls` and wait
    /// for each one's first attempt, so readiness is known when this returns. A
    /// broker that is down is not an error here: the supervisors keep trying.
    pub async fn start(
        urls: Vec<String>,
        size: usize,
        name: &str,
        reconnects: prometheus_client::metrics::counter::Counter,
        consumer: AmqpConsumer,
    ) -> Self {
        let inner = Arc::new(PoolInner {
            own_consumers: consumer == AmqpConsumer::Own,
            slots: (0..size.max(1)).map(|_| RwLock::new(None)).collect(),
            urls,
            name: name.to_owned(),
            last_error: Mutex::new("connecting to the broker".into()),
            stop: CancellationToken::new(),
            supervisors: TaskTracker::new(),
            reconnects,
        });
        let mut first_attempts = Vec::new();
        for slot in 0..inner.slots.len() {
            let (tx, rx) = oneshot::channel();
            first_attempts.push(rx);
            inner.supervisors.spawn(supervise(inner.clone(), slot, tx));
        }
        for rx in first_attempts {
            let _ = rx.await;
        }
        Pool { inner }
    }

    /// The connected connection with the fewest channels, if any has room.
    pub fn pick(&self) -> Option<Arc<PooledConnection>> {
        self.inner
            .slots
            .iter()
            .filter_map(|slot| slot.read().unwrap().clone())
            .filter(|c| c.is_connected() && !c.blocked.load(Ordering::Relaxed) && c.has_room())
            .min_by_key(|c| c.load())
    }

    /// Connections currently up.
    pub fn connected(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|slot| {
                slot.read()
                    .unwrap()
                    .as_ref()
                    .is_some_and(|c| c.is_connected())
            })
            .count()
    }

    /// `Ok` when a new session could get a channel; otherwise a reason fit for
    /// clients (no hosts, no broker error texts: those are logged).
    pub fn readiness(&self) -> Result<(), String> {
        let connected: Vec<_> = self
            .inner
            .slots
            .iter()
            .filter_map(|slot| slot.read().unwrap().clone())
            .filter(|c| c.is_connected())
            .collect();
        if connected.is_empty() {
            Err(self.inner.last_error.lock().unwrap().clone())
        } else if connected.iter().all(|c| c.blocked.load(Ordering::Relaxed)) {
            Err("the broker is refusing messages (resource alarm)".into())
        } else if connected.iter().all(|c| !c.has_room()) {
            Err("at capacity: every broker connection carries its maximum of sessions".into())
        } else {
            Ok(())
        }
    }

    /// Stop reconnecting and close every connection.
    /// Cancelled when the pool closes.
    pub fn stopping(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    pub async fn close(&self) {
        self.inner.stop.cancel();
        self.inner.supervisors.close();
        self.inner.supervisors.wait().await;
    }
}

async fn supervise(pool: Arc<PoolInner>, slot: usize, first_attempt: oneshot::Sender<()>) {
    let mut first_attempt = Some(first_attempt);
    let mut attempt: u32 = 0;
    loop {
        let connected = tokio::select! {
            _ = pool.stop.cancelled() => return,
            connected = connect_any(&pool, slot) => connected,
        };
        match connected {
            Ok((conn, consumers)) => {
                attempt = 0;
                // A channel_max of 0 would mean no limit but lapin's own.
                let channel_max = match conn.configuration().channel_max() {
                    0 => usize::from(u16::MAX),
                    max => usize::from(max),
                };
                let consumers_lost = consumers.as_ref().map(ConsumerConnection::lost);
                let conn = Arc::new(PooledConnection {
                    connection: conn,
                    consumers,
                    channels: AtomicUsize::new(0),
                    capacity: MAX_CHANNELS_PER_CONNECTION.min(channel_max),
                    lost: CancellationToken::new(),
                    blocked: std::sync::atomic::AtomicBool::new(false),
                });
                let mut events = conn.connection.events_listener();
                *pool.slots[slot].write().unwrap() = Some(conn.clone());
                if let Some(tx) = first_attempt.take() {
                    let _ = tx.send(());
                }
                // The events stream reports connection errors; the status check
                // catches a connection that died without an event.
                let mut check = tokio::time::interval(Duration::from_secs(1));
                let reason = loop {
                    tokio::select! {
                        _ = pool.stop.cancelled() => {
                            pool.slots[slot].write().unwrap().take();
                            let close = conn.connection.close(200, "node shutting down".into());
                            let close_consumers = async {
                                if let Some(consumers) = &conn.consumers {
                                    consumers.close().await;
                                }
                            };
                            let closing = futures_util::future::join(close, close_consumers);
                            let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
                            return;
                        }
                        () = async {
                            match &consumers_lost {
                                Some(lost) => lost.cancelled().await,
                                None => std::future::pending().await,
                            }
                        } => break "the consumer connection was lost".to_string(),
                        event = events.next() => match event {
                            // Channel errors (a passive declare's 404, a taken
                            // user's 405) are reported here too, as AMQP "soft"
                            // errors; they close one channel, not the connection.
                            Some(lapin::Event::Error(e)) if e.is_amqp_soft_error() => {
                                debug!(slot, error = %e, "channel-level error; connection still up");
                            }
                            Some(lapin::Event::Error(e)) => break e.to_string(),
                            Some(lapin::Event::ConnectionBlocked(reason)) => {
                                warn!(slot, %reason, "the broker blocked publishing (resource alarm)");
                                conn.blocked.store(true, Ordering::Relaxed);
                            }
                            Some(lapin::Event::ConnectionUnblocked) => {
                                info!(slot, "the broker unblocked publishing");
                                conn.blocked.store(false, Ordering::Relaxed);
                            }
                            Some(_) => {}
                            None => break "connection events ended".to_string(),
                        },
                        _ = check.tick() => {
                            if !conn.is_connected() {
                                break "connection closed".to_string();
                            }
                        }
                    }
                };
                pool.slots[slot].write().unwrap().take();
                conn.lost.cancel();
                // Whichever of the two died, the other goes too (a slot's
                // sessions need both), in the background: a broker that
                // stopped answering must not hold up the reconnect.
                if conn.consumers.is_some() {
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        if let Some(consumers) = &conn.consumers {
                            consumers.close().await;
                        }
                        if conn.is_connected() {
                            let close = conn.connection.close(200, "reconnecting".into());
                            let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
                        }
                    });
                }
                pool.reconnects.inc();
                warn!(slot, %reason, "lost the broker connection; reconnecting");
                *pool.last_error.lock().unwrap() =
                    "lost the broker connection; reconnecting".into();
            }
            Err(reason) => {
                warn!(slot, %reason, attempt, "cannot reach the broker");
                *pool.last_error.lock().unwrap() = "the broker is unreachable; retrying".into();
                if let Some(tx) = first_attempt.take() {
                    let _ = tx.send(());
                }
            }
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = pool.stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Connect to the first of the pool's URLs that answers, with the consuming
/// connection beside it when the pool opens those (none for a TLS broker).
async fn connect_any(
    pool: &PoolInner,
    slot: usize,
) -> Result<(Connection, Option<ConsumerConnection>), String> {
    let mut last = String::from("no broker URL configured");
    for url in &pool.urls {
        let name = format!("{} #{slot}", pool.name);
        let props = ConnectionProperties::default().with_connection_name(name.clone().into());
        let uri = match broker_uri(url) {
            Ok(uri) => uri,
            Err(e) => {
                last = format!("{}: {e}", redact(url));
                continue;
            }
        };
        let connect = Connection::connect_uri(uri.clone(), props);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(conn)) if pool.own_consumers => {
                match ConsumerConnection::open(&uri, &format!("{name} consumers")).await {
                    Some(Ok(consumers)) => {
                        info!(slot, url = %redact(url), "connected to the broker (own consumers)");
                        return Ok((conn, Some(consumers)));
                    }
                    Some(Err(e)) => {
                        let _ = conn.close(200, "consumer connection failed".into()).await;
                        last = format!("{}: {e}", redact(url));
                    }
                    None => {
                        info!(slot, url = %redact(url), "connected to the broker (TLS: lapin consumes)");
                        return Ok((conn, None));
                    }
                }
            }
            Ok(Ok(conn)) => {
                info!(slot, url = %redact(url), "connected to the broker");
                return Ok((conn, None));
            }
            Ok(Err(e)) => last = format!("{}: {e}", redact(url)),
            Err(_) => last = format!("{}: connect timed out", redact(url)),
        }
    }
    Err(last)
}

/// Parse a broker URL, proposing [`DEFAULT_FRAME_MAX`] unless it sets its own
/// `?frame_max=`.
fn broker_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    Ok(uri)
}

/// The URL without its password, for logs and `/readyz`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The error of an operation on a connection the pool knows is lost.
fn connection_lost() -> lapin::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the broker connection was lost",
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for attempt in 0..30 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_CAP);
            let d = backoff(attempt);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(5)).collect();
        assert!(samples.len() > 1, "backoff must be jittered");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn proposes_a_small_frame_max_unless_the_url_sets_one() {
        let default = broker_uri("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(default.query.frame_max, Some(DEFAULT_FRAME_MAX));
        let own = broker_uri("amqp://127.0.0.1:5672/%2f?frame_max=131072").unwrap();
        assert_eq!(own.query.frame_max, Some(131072));
        assert!(broker_uri("http://nope").is_err());
    }

    /// lapin finishes opening a channel whose caller gave up, and only then
    /// closes it: until it has, the channel must stay counted, or the pool
    /// offers a connection that lapin refuses ("the maximum number of
    /// channels"), as it did under a reconnect storm. Uses the broker at
    /// `AMQP_URL` (the shared one by default).
    #[tokio::test]
    async fn a_channel_given_up_mid_open_stays_counted_until_it_is_closed() {
        const MAX: usize = 8;
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let url = format!("{url}?channel_max={MAX}");
        let counter = prometheus_client::metrics::counter::Counter::default();
        let pool = Pool::start(
            vec![url],
            1,
            "warren pool test",
            counter,
            AmqpConsumer::Lapin,
        )
        .await;
        let conn = pool.pick().expect("the broker at AMQP_URL is up");
        assert_eq!(conn.capacity, MAX, "capped at the broker's channel_max");

        for _ in 0..MAX {
            let open = conn.open_counted();
            tokio::pin!(open);
            // Started (the channel.open is on its way), then given up.
            assert!(futures_util::poll!(open.as_mut()).is_pending());
        }
        assert_eq!(conn.load(), MAX);
        assert!(
            pool.pick().is_none(),
            "offered while lapin still holds {MAX}"
        );
        assert!(pool.readiness().is_err());

        // They are closed in the background; then the count is back to 0
        // and all MAX channels can be opened again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while conn.load() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never uncounted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut held = Vec::new();
        for _ in 0..MAX {
            held.push(conn.open_counted().await.expect("lapin has room for it"));
        }
        assert!(pool.pick().is_none());
        for channel in held {
            channel.close("test done").await;
        }
        assert_eq!(conn.load(), 0);
        pool.close().await;
    }
}
