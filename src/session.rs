//! One chat session: the loop between a client's socket and its subscription.
//!
//! It is generic over the socket's two halves (a `Sink` of outgoing messages and a
//! `Stream` of [`Inbound`] events), so unit tests drive it with in-memory channels
//! and the server with a real WebSocket. It never knows which bus it talks to.
//!
//! The loop waits on four things at once: the client's next frame, the next
//! delivery from the bus, the next publisher confirm, and the keep-alive timer.
//! Deliveries arrive already serialised and go to the socket untouched, batched
//! into one flush when several are ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::bus::{BusError, Confirm, Subscription};
use crate::error::{ClientError, ErrorCode};
use crate::metrics::{Metrics, Transport};
use crate::names::{RoomName, UserId};
use crate::presence::Joined;
use crate::protocol::{ClientFrame, ServerFrame};
use crate::tokens::Tokens;

/// Close codes this server sends (RFC 6455 §7.4.1 and the IANA registry).
pub mod close_code {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The node is draining for a restart: reconnect (to another node).
    pub const SERVICE_RESTART: u16 = 1012;
    /// The client keeps sending invalid frames.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A WebSocket message over `--max-frame-bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The broker is unreachable: reconnect later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Publishes awaiting their confirm, per session. Past this the session stops
/// reading the client until confirms come back: back-pressure, not buffering.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Deliveries written before one flush.
const WRITE_BATCH: usize = 256;
/// A socket that cannot take a write for this long is dropped: it is dead or too
/// slow to serve, and waiting longer would only hold its queue's backlog hostage.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long handing one message to the broker may take before the broker is
/// considered stuck and the session closes with 1013.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the closing handshake may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Invalid frames tolerated per [`ERROR_WINDOW`] before the socket is closed with
/// 1008. Honest mistakes get an error frame each; a flood is abuse.
pub const ERROR_BUDGET: u32 = 100;
const ERROR_WINDOW: Duration = Duration::from_secs(10);

/// What the socket half of a session reports.
#[derive(Debug)]
pub enum Inbound {
    Text(String),
    Binary,
    /// Pings and pongs: proof of life, answered by the WebSocket layer itself.
    Control,
    Close,
    /// A message over the size limit; the connection cannot go on.
    TooLarge,
    /// The transport failed.
    Failed(String),
}

/// Unique message ids across a cluster: a random per-process prefix and a counter.
pub struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for MessageIds {
    fn default() -> Self {
        Self::new()
    }
}

impl MessageIds {
    pub fn new() -> Self {
        Self {
            prefix: format!("{:012x}", rand::random::<u64>() >> 16),
            next: AtomicU64::new(0),
        }
    }

    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.prefix)
    }
}

/// What every session of a node shares.
pub struct SessionSettings {
    pub metrics: Arc<Metrics>,
    /// Issues the posting token every `welcome` carries.
    pub tokens: Tokens,
    pub node_id: String,
    pub max_text_bytes: usize,
    pub ping_interval: Duration,
    pub ids: MessageIds,
}

/// Why a session ended; logged once by the task that ran it.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    ClientClosed,
    ClientGone(String),
    Shutdown,
    Restart,
    BrokerLost,
    TooLarge,
    Abusive,
    Silent,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A close frame with `code` and a short reason.
fn close_with(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

async fn write<S>(sink: &mut S, message: Message) -> Result<(), String>
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    match tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("write timed out".into()),
    }
}

async fn write_frame<S>(metrics: &Metrics, sink: &mut S, frame: &ServerFrame) -> Result<(), String>
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    if let ServerFrame::Error { code, .. } = frame {
        metrics.error(*code);
    }
    write(sink, Message::text(frame.to_json())).await
}

/// The broker is gone or stuck: tell the client why (`unavailable`, with the
/// frame's `ref` if one was waiting) and close with 1013 so it reconnects later.
async fn broker_lost<S>(
    metrics: &Metrics,
    sink: &mut S,
    message: &str,
    reference: Option<String>,
) -> SessionEnd
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    let error = ClientError::new(ErrorCode::Unavailable, message);
    let _ = write_frame(metrics, sink, &ServerFrame::error(&error, reference)).await;
    let _ = write(
        sink,
        close_with(close_code::TRY_AGAIN_LATER, "broker unavailable"),
    )
    .await;
    SessionEnd::BrokerLost
}

/// The frame every receiver gets for a client's accepted frame: the server sets
/// `id`, `from` and `ts`, so a client cannot forge them.
fn outgoing(accepted: ClientFrame, id: &str, member: &Member) -> ServerFrame {
    match accepted {
        ClientFrame::Message { text, .. } => ServerFrame::Message {
            id: id.to_owned(),
            room: member.room.to_string(),
            from: member.user.to_string(),
            text,
            ts: now_ms(),
        },
        ClientFrame::Direct { to, text, .. } => ServerFrame::Direct {
            id: id.to_owned(),
            from: member.user.to_string(),
            to: to.to_string(),
            text,
            ts: now_ms(),
        },
    }
}

/// Counts a publish as in flight for as long as it lives: a session that ends
/// with confirms pending drops them, and the count must drop with them.
struct InFlight(Arc<Metrics>);

impl InFlight {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.publish_in_flight.inc();
        Self(metrics)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.publish_in_flight.dec();
    }
}

/// Await one publish's confirm, timing it and counting it as in flight meanwhile.
async fn confirmed(
    in_flight: InFlight,
    published_at: std::time::Instant,
    reference: Option<String>,
    id: String,
    confirm: Confirm,
) -> (Option<String>, String, Result<(), BusError>) {
    let result = confirm.await;
    in_flight
        .0
        .confirm_seconds
        .observe(published_at.elapsed().as_secs_f64());
    (reference, id, result)
}

/// Who a session is and where.
pub struct Member {
    pub room: RoomName,
    pub user: UserId,
}

/// How a node tells its sessions to end.
#[derive(Clone, Default)]
pub struct StopSignals {
    /// Close now with 1001: the node is stopping.
    pub shutdown: CancellationToken,
    /// Close with 1012 at a random moment within `restart_jitter`: the node is
    /// being drained for a restart, and spreading the closes spreads the
    /// reconnect storm over the remaining nodes.
    pub restart: CancellationToken,
    pub restart_jitter: Duration,
}

impl StopSignals {
    /// Resolves when this session's turn to close for a drain has come.
    pub async fn restart_due(&self) {
        self.restart.cancelled().await;
        let jitter = self.restart_jitter.mul_f64(rand::random::<f64>());
        tokio::time::sleep(jitter).await;
    }
}

/// The `welcome` frame a session starts with, as JSON. It takes the member list
/// out of `joined`: in a large room that list is the biggest thing a session
/// ever holds, and nothing needs it once it is sent.
pub fn welcome(joined: &mut Joined, member: &Member, settings: &SessionSettings) -> String {
    ServerFrame::Welcome {
        user: member.user.to_string(),
        room: member.room.to_string(),
        node: settings.node_id.clone(),
        members: std::mem::take(&mut joined.members),
        members_total: joined.total,
        token: settings.tokens.issue(&member.user),
    }
    .to_json()
}

/// Run one session until the client leaves, the broker goes, or the node stops.
/// The caller has already sent the [`welcome`] and releases the subscription's
/// lease afterwards.
pub async fn run<S, R>(
    mut sink: S,
    mut inbound: R,
    subscription: Subscription,
    joined: Joined,
    member: &Member,
    settings: &Arc<SessionSettings>,
    stop: &StopSignals,
) -> (SessionEnd, crate::bus::Lease)
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
    R: Stream<Item = Inbound> + Unpin,
{
    let Member { room, .. } = member;
    let Subscription {
        publisher,
        mut inbox,
        lease,
    } = subscription;
    let end = async {
        let mut joined = joined;
        let mut confirms = FuturesOrdered::new();
        let mut ping = tokio::time::interval_at(
            Instant::now() + settings.ping_interval,
            settings.ping_interval,
        );
        let mut last_heard = Instant::now();
        let mut errors_in_window = 0u32;
        let mut window_start = Instant::now();
        let restart_due = stop.restart_due();
        tokio::pin!(restart_due);

        loop {
            // Not biased: under load every branch gets its turn, so a busy room's
            // deliveries cannot starve the client's own frames (or vice versa).
            tokio::select! {
                _ = stop.shutdown.cancelled() => {
                    let _ = write(&mut sink, close_with(close_code::GOING_AWAY, "server shutting down")).await;
                    return SessionEnd::Shutdown;
                }
                _ = &mut restart_due => {
                    let _ = write(&mut sink, close_with(close_code::SERVICE_RESTART, "node restarting; reconnect")).await;
                    return SessionEnd::Restart;
                }
                delivery = inbox.recv() => {
                    let Ok(first) = delivery else {
                        return broker_lost(&settings.metrics, &mut sink, "lost the message broker; reconnect shortly", None).await;
                    };
                    // Batch whatever else is ready into one flush.
                    let mut batch = vec![first];
                    while batch.len() < WRITE_BATCH {
                        match inbox.try_recv() {
                            Some(Ok(text)) => batch.push(text),
                            _ => break,
                        }
                    }
                    let handed_over = batch.len();
                    settings.metrics.delivered(Transport::WebSocket, handed_over as u64);
                    let mut messages = futures_util::stream::iter(batch.into_iter().map(|t| Ok(Message::text(t))));
                    match tokio::time::timeout(WRITE_TIMEOUT, sink.send_all(&mut messages)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return SessionEnd::ClientGone(e.to_string()),
                        Err(_) => return SessionEnd::ClientGone("write timed out".into()),
                    }
                    inbox.settle(handed_over).await;
                }
                update = joined.updates.recv() => match update {
                    Ok(frame) => {
                        if let Err(e) = write(&mut sink, Message::text(frame)).await {
                            return SessionEnd::ClientGone(e);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        // Diffs cannot be replayed: send the whole list instead.
                        debug!(missed = n, "presence frames missed; resyncing the client");
                        let frame = joined.resync(room.as_str()).await;
                        if let Err(e) = write_frame(&settings.metrics, &mut sink, &frame).await {
                            return SessionEnd::ClientGone(e);
                        }
                    }
                    // The node is stopping; the shutdown branch ends the session.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        joined.updates = tokio::sync::broadcast::channel(1).1;
                    }
                },
                Some((reference, id, result)) = confirms.next(), if !confirms.is_empty() => {
                    let frame = match (result, reference) {
                        (Ok(()), Some(reference)) => ServerFrame::Ack { reference, id },
                        (Ok(()), None) => continue,
                        (Err(BusError::NoRecipient), reference) => ServerFrame::error(
                            &ClientError::new(ErrorCode::UserNotFound, "no user by that id is connected"),
                            reference,
                        ),
                        (Err(e), reference) => {
                            debug!(error = %e, "publish not confirmed");
                            ServerFrame::error(&ClientError::new(ErrorCode::Unavailable, "the message was not delivered; the broker is unavailable"), reference)
                        }
                    };
                    if let Err(e) = write_frame(&settings.metrics, &mut sink, &frame).await {
                        return SessionEnd::ClientGone(e);
                    }
                }
                event = inbound.next(), if confirms.len() < MAX_IN_FLIGHT => {
                    last_heard = Instant::now();
                    let rejected = match event {
                        None => return SessionEnd::ClientGone("socket ended".into()),
                        Some(Inbound::Close) => return SessionEnd::ClientClosed,
                        Some(Inbound::Failed(e)) => return SessionEnd::ClientGone(e),
                        Some(Inbound::TooLarge) => {
                            let _ = write(&mut sink, close_with(close_code::MESSAGE_TOO_BIG, "message too big")).await;
                            return SessionEnd::TooLarge;
                        }
                        Some(Inbound::Control) => continue,
                        Some(Inbound::Binary) => Some((ClientError::new(ErrorCode::UnsupportedFrame, "binary frames are not supported; send JSON text"), None)),
                        Some(Inbound::Text(text)) => match ClientFrame::parse(&text, settings.max_text_bytes) {
                            Err(rejected) => Some((rejected.error, rejected.reference)),
                            Ok(accepted) => {
                                let (kind, to, reference) = match &accepted {
                                    ClientFrame::Message { reference, .. } => ("message", None, reference.clone()),
                                    ClientFrame::Direct { to, reference, .. } => ("direct", Some(to.clone()), reference.clone()),
                                };
                                let id = settings.ids.next_id();
                                let payload = Bytes::from(outgoing(accepted, &id, member).to_json());
                                let published_at = std::time::Instant::now();
                                let publish = async {
                                    match &to {
                                        None => publisher.publish(payload).await,
                                        Some(to) => publisher.publish_direct(to, payload).await,
                                    }
                                };
                                // A broker that stops reading (a memory alarm, a half-open
                                // link) must not freeze the session: bound the publish,
                                // and let shutdown through while it waits.
                                let published = tokio::select! {
                                    published = tokio::time::timeout(PUBLISH_TIMEOUT, publish) => match published {
                                        Ok(published) => published,
                                        Err(_) => {
                                            return broker_lost(&settings.metrics, &mut sink, "the message broker is not accepting messages; reconnect shortly", reference).await;
                                        }
                                    },
                                    _ = stop.shutdown.cancelled() => {
                                        let _ = write(&mut sink, close_with(close_code::GOING_AWAY, "server shutting down")).await;
                                        return SessionEnd::Shutdown;
                                    }
                                };
                                match published {
                                    Ok(confirm) => {
                                        settings.metrics.received(kind, Transport::WebSocket);
                                        let in_flight = InFlight::new(settings.metrics.clone());
                                        confirms.push_back(confirmed(in_flight, published_at, reference, id, confirm));
                                    }
                                    Err(e) => {
                                        debug!(error = %e, "publish failed");
                                        // The broker's fault, not the client's: tell it, but
                                        // don't count it against the abuse budget.
                                        let frame = ServerFrame::error(&ClientError::new(ErrorCode::Unavailable, "the message was not delivered; the broker is unavailable"), reference);
                                        if let Err(e) = write_frame(&settings.metrics, &mut sink, &frame).await {
                                            return SessionEnd::ClientGone(e);
                                        }
                                    }
                                }
                                None
                            }
                        },
                    };
                    if let Some((error, reference)) = rejected {
                        if window_start.elapsed() > ERROR_WINDOW {
                            window_start = Instant::now();
                            errors_in_window = 0;
                        }
                        errors_in_window += 1;
                        if errors_in_window > ERROR_BUDGET {
                            let _ = write(&mut sink, close_with(close_code::POLICY_VIOLATION, "too many invalid frames")).await;
                            return SessionEnd::Abusive;
                        }
                        if let Err(e) = write_frame(&settings.metrics, &mut sink, &ServerFrame::error(&error, reference)).await {
                            return SessionEnd::ClientGone(e);
                        }
                    }
                }
                _ = ping.tick() => {
                    // While back-pressure stops us reading, the client's pongs sit
                    // unread: that is not silence.
                    let reading = confirms.len() < MAX_IN_FLIGHT;
                    if reading && last_heard.elapsed() > settings.ping_interval * 2 {
                        let _ = write(&mut sink, close_with(close_code::GOING_AWAY, "no answer to pings")).await;
                        return SessionEnd::Silent;
                    }
                    if let Err(e) = write(&mut sink, Message::Ping(Bytes::new())).await {
                        return SessionEnd::ClientGone(e);
                    }
                }
            }
        }
    }
    .await;
    // A client that stopped reading would hold `close` forever: bound it.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
    drop(inbox);
    drop(publisher);
    (end, lease)
}
