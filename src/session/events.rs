//! The session loop: client frames in, publishes out, deliveries forwarded as
//! they are, acks once the bus confirms.
//!
//! [`Session::run`] waits on every event source at once and hands each event to
//! one method (`on_delivery`, `on_presence`, `on_confirm`, `on_client`,
//! `on_tick`) that returns [`ControlFlow`]: `Break` carries the reason the
//! session ends. Deliveries arrive already serialised and go to the transport
//! untouched, batched into one flush when several are ready.
//!
//! It is generic over the transport and the publisher, so the unit tests below
//! drive it with in-memory channels, a stand-in publisher and paused time. They
//! are half of this file's length; the session itself is about 400 lines.

use std::ops::ControlFlow::{self, Break, Continue};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tracing::debug;
use tungstenite::Utf8Bytes;

use super::rooms::Rooms;
use super::{Inbound, SessionEnd, Transport};
use crate::auth::Grant;
use crate::bus::acks::Receipt;
use crate::bus::{BusError, Guarantee, Inbox, SessionLink};
use crate::error::{ClientError, ErrorCode};
use crate::handshake::Identity;
use crate::metrics::Metrics;
use crate::names::RoomName;
use crate::node::Node;
use crate::presence::Joined;
use crate::protocol::client::{ClientFrame, Rejected};
use crate::protocol::{Destination, ServerFrame};

/// Publishes awaiting their confirm, per session. Past this the session stops
/// reading the client until confirms come back: back-pressure, not buffering.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Deliveries written before one flush.
const WRITE_BATCH: usize = 256;
/// A client that cannot take a write for this long is dropped: it is dead or too
/// slow to serve, and waiting longer would only hold its queue's backlog hostage.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Invalid frames tolerated per [`ERROR_WINDOW`] before the socket is closed with
/// 1008. Honest mistakes get an error frame each; a flood is abuse.
pub const ERROR_BUDGET: u32 = 100;
const ERROR_WINDOW: Duration = Duration::from_secs(10);

/// One session between its `welcome` and its end.
pub struct Session<'a, T, P: SessionLink> {
    pub(super) node: &'a Node,
    pub(super) identity: &'a Identity,
    /// What the session's token allows, until when; a `refresh` replaces it.
    pub(super) grant: Grant,
    /// Bumped whenever the token timer must be set again (a warning sent, a
    /// refresh taken).
    pub(super) token_epoch: u64,
    /// Whether the client was told its token is about to expire.
    pub(super) warned: bool,
    /// The client's chat frames per second (`--publish-rate`, `--publish-burst`).
    limiter: governor::DefaultDirectRateLimiter,
    /// The outgoing half of the client's connection.
    outbound: T,
    pub(super) link: P,
    pub(super) inbox: Inbox,
    pub(super) rooms: Rooms,
    /// The client's publishes awaiting the bus's confirm, in publish order.
    confirms: FuturesOrdered<Pending<P::Confirm>>,
    /// When the client last sent anything, pongs included.
    last_heard: Instant,
    /// Ids of the messages a history page gave: their live copies, if they
    /// come too, are dropped.
    pub(super) replayed: std::collections::HashSet<Box<str>>,
    /// Refused frames in the current [`ERROR_WINDOW`], and when it began.
    refused: u32,
    window_start: Instant,
}

impl<'a, T: Transport, P: SessionLink> Session<'a, T, P> {
    pub fn new(
        node: &'a Node,
        identity: &'a Identity,
        grant: Grant,
        outbound: T,
        link: P,
        inbox: Inbox,
    ) -> Self {
        Self {
            node,
            identity,
            grant,
            token_epoch: 0,
            warned: false,
            limiter: publish_limiter(&node.config),
            outbound,
            link,
            inbox,
            rooms: Rooms::default(),
            confirms: FuturesOrdered::new(),
            last_heard: Instant::now(),
            replayed: std::collections::HashSet::new(),
            refused: 0,
            window_start: Instant::now(),
        }
    }

    /// A room the session is already bound to and joined (the URL named it).
    pub fn joined(&mut self, room: RoomName, joined: Joined) {
        self.rooms.add(room, joined.updates);
    }

    /// The rooms the session is still in, to leave.
    pub fn into_rooms(self) -> std::collections::BTreeSet<RoomName> {
        self.rooms.into_names()
    }

    /// Run until the client leaves, the broker goes, or the node stops; then
    /// close the transport with the reason.
    pub async fn run<R>(&mut self, mut inbound: R) -> SessionEnd
    where
        R: Stream<Item = Inbound> + Unpin,
    {
        let node = self.node;
        let lifecycle = &node.lifecycle;
        let interval = node.config.ping_interval();
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        let restart_due = lifecycle.restart_due();
        tokio::pin!(restart_due);
        let mut token_timer = Box::pin(tokio::time::sleep_until(self.token_deadline()));
        let mut token_epoch = self.token_epoch;
        let end = loop {
            // Not biased: under load every branch gets its turn, so a busy room's
            // deliveries cannot starve the client's own frames (or vice versa).
            let flow = tokio::select! {
                _ = lifecycle.shutdown.cancelled() => Break(SessionEnd::Shutdown),
                _ = &mut restart_due => Break(SessionEnd::Restart),
                delivery = self.inbox.recv() => self.on_delivery(delivery).await,
                update = self.rooms.next_presence() => self.on_presence(update).await,
                Some(confirmed) = self.confirms.next(), if !self.confirms.is_empty() => {
                    self.on_confirm(confirmed).await
                }
                event = inbound.next(), if self.confirms.len() < MAX_IN_FLIGHT => {
                    self.on_client(event).await
                }
                _ = ping.tick(), if T::PINGS => self.on_tick(interval).await,
                _ = &mut token_timer, if self.grant.expires_at.is_some() => {
                    self.on_token_timer().await
                }
            };
            if token_epoch != self.token_epoch {
                token_epoch = self.token_epoch;
                token_timer.as_mut().reset(self.token_deadline());
            }
            if let Break(end) = flow {
                break end;
            }
        };
        self.outbound.close(&end).await;
        end
    }

    /// Deliveries from the bus: this one and whatever else is ready, in one flush.
    async fn on_delivery(&mut self, first: Result<Utf8Bytes, BusError>) -> ControlFlow<SessionEnd> {
        let Ok(first) = first else {
            return self
                .broker_lost("lost the message broker; reconnect shortly", None)
                .await;
        };
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            match self.inbox.try_recv() {
                Some(Ok(frame)) => batch.push(frame),
                // An error is met again, and handled, by the next `recv`.
                _ => break,
            }
        }
        if !self.replayed.is_empty() {
            self.drop_replayed(&mut batch);
            if batch.is_empty() {
                return Continue(());
            }
        }
        let missed = self.inbox.take_missed();
        if missed > 0 {
            self.metrics().dropped.inc_by(missed);
        }
        let count = batch.len();
        self.write(batch).await?;
        self.metrics().delivered(T::KIND, count as u64);
        self.inbox.settle(count);
        Continue(())
    }

    /// The bus's answer to one of the client's publishes.
    async fn on_confirm(&mut self, confirmed: Confirmed) -> ControlFlow<SessionEnd> {
        let Confirmed {
            reference,
            id,
            result,
        } = confirmed;
        let frame = match (result, reference) {
            (Ok(()), Some(reference)) => ServerFrame::Ack { reference, id },
            (Ok(()), None) => return Continue(()),
            (Err(BusError::NoRecipient), reference) => ServerFrame::error(
                &ClientError::new(ErrorCode::UserNotFound, "no user by that id is connected"),
                reference,
            ),
            (Err(e), reference) => {
                debug!(error = %e, "publish not confirmed");
                ServerFrame::error(&not_delivered(), reference)
            }
        };
        self.write_frame(&frame).await
    }

    /// Whatever the client's connection reports.
    async fn on_client(&mut self, event: Option<Inbound>) -> ControlFlow<SessionEnd> {
        self.last_heard = Instant::now();
        let refused = match event {
            None => return Break(SessionEnd::ClientGone("socket ended".into())),
            Some(Inbound::Close) => return Break(SessionEnd::ClientClosed),
            Some(Inbound::Failed(e)) => return Break(SessionEnd::ClientGone(e)),
            Some(Inbound::TooLarge) => return Break(SessionEnd::TooLarge),
            Some(Inbound::InvalidUtf8) => return Break(SessionEnd::InvalidUtf8),
            Some(Inbound::ProtocolError(e)) => return Break(SessionEnd::ProtocolError(e)),
            Some(Inbound::Control) => return Continue(()),
            Some(Inbound::Binary) => Rejected {
                error: ClientError::new(
                    ErrorCode::UnsupportedFrame,
                    "binary frames are not supported; send JSON text",
                ),
                reference: None,
            },
            Some(Inbound::Text(text)) => {
                match ClientFrame::parse(&text, self.node.config.max_text_bytes) {
                    // Boxed, like publishing below: binding runs lapin's
                    // channel futures, large and rare; inline, they would grow
                    // every idle session's task.
                    Ok(ClientFrame::Subscribe {
                        room,
                        reference,
                        history,
                    }) => {
                        return Box::pin(self.subscribe(room, reference, history)).await;
                    }
                    Ok(ClientFrame::Unsubscribe { room, reference }) => {
                        return Box::pin(self.unsubscribe(room, reference)).await;
                    }
                    Ok(ClientFrame::Refresh { token, reference }) => {
                        return Box::pin(self.refresh(token, reference)).await;
                    }
                    Ok(ClientFrame::AckUpto { seq }) => match self.inbox.ack_upto(seq) {
                        Ok(receipts) if receipts.is_empty() => return Continue(()),
                        Ok(receipts) => return Box::pin(self.send_receipts(receipts)).await,
                        Err(e) => Rejected {
                            error: ClientError::new(ErrorCode::InvalidMessage, e.to_string()),
                            reference: None,
                        },
                    },
                    Ok(ClientFrame::Message {
                        room,
                        text,
                        reference,
                    }) => match self.rooms.target(room) {
                        Ok(room) if self.grant.permissions.may_write(&room) => {
                            return Box::pin(self.publish(
                                Destination::Room(room),
                                text,
                                reference,
                                false,
                            ))
                            .await;
                        }
                        Ok(room) => Rejected {
                            error: crate::handshake::forbidden_room(&room),
                            reference,
                        },
                        Err(error) => Rejected { error, reference },
                    },
                    Ok(ClientFrame::Direct { reference, .. })
                        if !self.grant.permissions.may_send_direct() =>
                    {
                        Rejected {
                            error: ClientError::new(
                                ErrorCode::Forbidden,
                                "you may not send direct messages",
                            ),
                            reference,
                        }
                    }
                    Ok(ClientFrame::Direct {
                        to,
                        text,
                        reference,
                        receipt,
                    }) => {
                        return Box::pin(self.publish(
                            Destination::User(to),
                            text,
                            reference,
                            receipt,
                        ))
                        .await;
                    }
                    Err(rejected) => rejected,
                }
            }
        };
        self.refuse(refused).await
    }

    /// Tell the senders of acknowledged direct messages that asked for it
    /// (`delivered`), wherever they are connected. A receipt that cannot be
    /// sent is lost, not retried: it is a courtesy, and the message itself
    /// was delivered.
    async fn send_receipts(&mut self, receipts: Vec<Receipt>) -> ControlFlow<SessionEnd> {
        for receipt in receipts {
            let frame = ServerFrame::Delivered {
                id: receipt.id,
                to: self.identity.user.to_string(),
            };
            let payload = Bytes::from(frame.to_json());
            if let Err(e) =
                on_broker(self.node, self.link.publish_receipt(&receipt.from, payload)).await?
            {
                debug!(error = %e, "a receipt was not sent");
            }
        }
        Continue(())
    }

    /// The keep-alive timer: ping the client, or drop it if it went silent.
    async fn on_tick(&mut self, interval: Duration) -> ControlFlow<SessionEnd> {
        // While back-pressure stops us reading, the client's pongs sit unread:
        // that is not silence.
        let reading = self.confirms.len() < MAX_IN_FLIGHT;
        if reading && self.last_heard.elapsed() > interval * 2 {
            return Break(SessionEnd::Silent);
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.outbound.ping()).await {
            Ok(Ok(())) => Continue(()),
            Ok(Err(e)) => Break(SessionEnd::ClientGone(e.to_string())),
            Err(_) => Break(SessionEnd::ClientGone("write timed out".into())),
        }
    }

    /// Publish an accepted chat message and queue its confirm.
    async fn publish(
        &mut self,
        to: Destination,
        text: String,
        reference: Option<String>,
        receipt: bool,
    ) -> ControlFlow<SessionEnd> {
        if let Err(not_until) = self.limiter.check() {
            use governor::clock::Clock;
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            self.metrics().rate_limited("publish");
            let error = ClientError::rate_limited("too many messages; slow down", wait);
            return self.refuse(Rejected { error, reference }).await;
        }
        let id = self.node.ids.next_id();
        let frame = ServerFrame::chat(id.clone(), &self.identity.user, &to, text);
        let payload = Bytes::from(frame.asking_receipt(receipt).to_json());
        let published_at = std::time::Instant::now();
        // A broker that stops reading (a memory alarm, a half-open link) must
        // not freeze the session: bound the publish, and let shutdown through.
        // No `ref`, no `ack` asked for: the broker need not confirm it.
        let guarantee = if reference.is_some() {
            Guarantee::Confirmed
        } else {
            Guarantee::BestEffort
        };
        let published = on_broker(self.node, self.link.publish(&to, payload, guarantee)).await?;
        match published {
            Ok(confirm) => {
                self.metrics().received(to.kind(), T::KIND);
                self.confirms.push_back(Pending {
                    confirm,
                    in_flight: InFlight::new(self.node.metrics.clone()),
                    published_at,
                    reference,
                    id,
                });
                Continue(())
            }
            Err(BusError::TimedOut) => {
                self.broker_lost(
                    "the message broker is not accepting messages; reconnect shortly",
                    reference,
                )
                .await
            }
            Err(e) => {
                // The broker's fault, not the client's: tell it, but don't
                // count it against the abuse budget.
                debug!(error = %e, "publish failed");
                self.write_frame(&ServerFrame::error(&not_delivered(), reference))
                    .await
            }
        }
    }

    /// Answer a refused frame with its error, unless the client has used up its
    /// budget of them: then it is abusive and the session ends.
    pub(super) async fn refuse(&mut self, refused: Rejected) -> ControlFlow<SessionEnd> {
        if self.window_start.elapsed() > ERROR_WINDOW {
            self.window_start = Instant::now();
            self.refused = 0;
        }
        self.refused += 1;
        if self.refused > ERROR_BUDGET {
            return Break(SessionEnd::Abusive);
        }
        self.write_frame(&ServerFrame::error(&refused.error, refused.reference))
            .await
    }

    /// The broker is gone or stuck: tell the client why (`unavailable`, with the
    /// `ref` of the frame that was waiting, if any), then end with 1013.
    pub(super) async fn broker_lost(
        &mut self,
        message: &str,
        reference: Option<String>,
    ) -> ControlFlow<SessionEnd> {
        let error = ClientError::new(ErrorCode::Unavailable, message);
        let _ = self
            .write_frame(&ServerFrame::error(&error, reference))
            .await;
        Break(SessionEnd::BrokerLost)
    }

    pub(super) async fn write_frame(&mut self, frame: &ServerFrame) -> ControlFlow<SessionEnd> {
        if let ServerFrame::Error { code, .. } = frame {
            self.metrics().error(*code);
        }
        self.write(vec![Utf8Bytes::from(frame.to_json())]).await
    }

    pub(super) async fn write(&mut self, frames: Vec<Utf8Bytes>) -> ControlFlow<SessionEnd> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.outbound.send(frames)).await {
            Ok(Ok(())) => Continue(()),
            Ok(Err(e)) => Break(SessionEnd::ClientGone(e.to_string())),
            Err(_) => Break(SessionEnd::ClientGone("write timed out".into())),
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.node.metrics
    }
}

/// Run one broker operation for the client, bounded by
/// [`crate::bus::BROKER_TIMEOUT`] (a stuck broker answers
/// [`BusError::TimedOut`]) and cut short by shutdown (`Break`).
pub(super) async fn on_broker<R>(
    node: &Node,
    operation: impl Future<Output = Result<R, BusError>>,
) -> ControlFlow<SessionEnd, Result<R, BusError>> {
    let bounded = tokio::time::timeout(crate::bus::BROKER_TIMEOUT, operation);
    tokio::select! {
        result = bounded => Continue(result.unwrap_or(Err(BusError::TimedOut))),
        _ = node.lifecycle.shutdown.cancelled() => Break(SessionEnd::Shutdown),
    }
}

/// A connection's publish limit: `--publish-rate` per second on average, up to
/// `--publish-burst` at once.
fn publish_limiter(config: &crate::config::Config) -> governor::DefaultDirectRateLimiter {
    let rate = std::num::NonZeroU32::new(config.publish_rate.max(1)).expect("at least 1");
    let burst = std::num::NonZeroU32::new(config.publish_burst.max(1)).expect("at least 1");
    governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst))
}

fn not_delivered() -> ClientError {
    ClientError::new(
        ErrorCode::Unavailable,
        "the message was not delivered; the broker is unavailable",
    )
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

/// One publish awaiting its confirm.
struct Pending<C> {
    confirm: C,
    in_flight: InFlight,
    published_at: std::time::Instant,
    reference: Option<String>,
    id: String,
}

/// A publish's outcome, with what the client needs to match it.
struct Confirmed {
    reference: Option<String>,
    id: String,
    result: Result<(), BusError>,
}

impl<C> Future for Pending<C>
where
    C: Future<Output = Result<(), BusError>> + Unpin,
{
    type Output = Confirmed;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Confirmed> {
        let result = std::task::ready!(Pin::new(&mut self.confirm).poll(cx));
        let pending = self.get_mut();
        pending
            .in_flight
            .0
            .confirm_seconds
            .observe(pending.published_at.elapsed().as_secs_f64());
        Poll::Ready(Confirmed {
            reference: pending.reference.take(),
            id: std::mem::take(&mut pending.id),
            result,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::Value;
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::config::Config;
    use crate::metrics::Transport as Kind;
    use crate::names::{RoomName, SessionId, UserId};
    use crate::session::TransportError;
    use crate::session::close_code;
    use tokio::sync::broadcast;

    /// What the session wrote to its client.
    #[derive(Debug, PartialEq)]
    enum Out {
        Frame(Value),
        Ping,
        Close(Option<(u16, &'static str)>),
    }

    /// A transport that records what the session writes.
    struct Recorder(mpsc::Sender<Out>);

    impl Transport for Recorder {
        const KIND: Kind = Kind::WebSocket;
        const PINGS: bool = true;
        const RESUMABLE: bool = true;

        async fn send(&mut self, frames: Vec<Utf8Bytes>) -> Result<(), TransportError> {
            for frame in frames {
                let value = serde_json::from_str(frame.as_str()).expect("frames are JSON");
                self.0
                    .send(Out::Frame(value))
                    .await
                    .map_err(|_| TransportError::Closed)?;
            }
            Ok(())
        }

        async fn ping(&mut self) -> Result<(), TransportError> {
            self.0
                .send(Out::Ping)
                .await
                .map_err(|_| TransportError::Closed)
        }

        async fn close(&mut self, end: &SessionEnd) {
            let _ = self.0.send(Out::Close(end.close_frame())).await;
        }
    }

    /// One held publish: its payload, and the sender that resolves its confirm.
    type Held = (Value, oneshot::Sender<Result<(), BusError>>);

    /// A publisher whose confirms arrive when the test says so.
    #[derive(Clone, Default)]
    struct Gate {
        held: Arc<Mutex<Vec<Held>>>,
        /// Publishes never return at all: a broker that stopped reading.
        stuck: bool,
    }

    struct GateConfirm(oneshot::Receiver<Result<(), BusError>>);

    impl Future for GateConfirm {
        type Output = Result<(), BusError>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            Pin::new(&mut self.0)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(BusError::Unavailable("dropped".into()))))
        }
    }

    impl SessionLink for Gate {
        type Confirm = GateConfirm;

        /// The harness binds the session's real queue to its one room itself.
        async fn bind(&self, _room: &RoomName) -> Result<(), BusError> {
            Ok(())
        }

        async fn unbind(&self, _room: &RoomName) -> Result<(), BusError> {
            Ok(())
        }

        async fn publish_receipt(&self, _to: &UserId, _payload: Bytes) -> Result<(), BusError> {
            Ok(())
        }

        async fn publish(
            &self,
            _to: &Destination,
            payload: Bytes,
            _guarantee: Guarantee,
        ) -> Result<GateConfirm, BusError> {
            if self.stuck {
                std::future::pending::<()>().await;
            }
            let (tx, rx) = oneshot::channel();
            let frame = serde_json::from_slice(&payload).expect("payloads are JSON");
            self.held.lock().unwrap().push((frame, tx));
            Ok(GateConfirm(rx))
        }
    }

    impl Gate {
        fn count(&self) -> usize {
            self.held.lock().unwrap().len()
        }

        /// Resolve the `n`th publish's confirm.
        fn confirm(&self, n: usize, result: Result<(), BusError>) {
            let (_, tx) = std::mem::replace(
                &mut self.held.lock().unwrap()[n],
                (Value::Null, oneshot::channel().0),
            );
            let _ = tx.send(result);
        }
    }

    /// A session on the embedded bus, run in a task, with its two ends here.
    struct Harness {
        node: Arc<Node>,
        gate: Gate,
        out: mpsc::Receiver<Out>,
        client: mpsc::Sender<Inbound>,
        ended: tokio::task::JoinHandle<SessionEnd>,
    }

    const ROOM: &str = "lobby";

    async fn start(gate: Gate, joined: impl FnOnce(&Node) -> Joined) -> Harness {
        let mut config = Config::defaults();
        config.drain_jitter_secs = 5;
        config.publish_rate = 1_000_000;
        config.publish_burst = 1_000_000;
        let node = Node::start(config).await.unwrap();
        let room = RoomName::parse(ROOM).unwrap();
        let user = UserId::parse("alice").unwrap();
        let identity = Identity {
            user,
            session: SessionId::random(),
        };
        let mut subscription = node
            .bus
            .open(&crate::bus::Opening {
                session: &identity.session,
                user: &identity.user,
                slot: 0,
                acks: crate::bus::AckMode::Server,
                resume: None,
                room: None,
            })
            .await
            .unwrap();
        subscription.link.bind(&room).await.unwrap();
        subscription.inbox.follow(&room);
        let joined = joined(&node);
        let (out_tx, out) = mpsc::channel(4096);
        let (client, client_rx) = mpsc::channel(4096);
        let inbound = Box::pin(futures_util::stream::unfold(
            client_rx,
            |mut rx| async move { rx.recv().await.map(|event| (event, rx)) },
        ));
        let ended = tokio::spawn({
            let node = node.clone();
            let gate = gate.clone();
            async move {
                let crate::bus::Subscription { link, inbox, lease } = subscription;
                let grant = node
                    .auth
                    .admit(None, Some(identity.user.clone()))
                    .await
                    .expect("anonymous admission");
                let mut session =
                    Session::new(&node, &identity, grant, Recorder(out_tx), gate, inbox);
                session.joined(room, joined);
                let end = session.run(inbound).await;
                drop((link, lease));
                end
            }
        });
        Harness {
            node,
            gate,
            out,
            client,
            ended,
        }
    }

    /// A presence receiver that stays open and silent.
    fn quiet_presence(node: &Node) -> Joined {
        let (tx, updates) = broadcast::channel(1);
        std::mem::forget(tx);
        Joined {
            members: Vec::new(),
            total: 1,
            updates,
            presence: node.presence.clone(),
        }
    }

    impl Harness {
        /// Publish `frame` to `to` on the node's bus, as bob.
        async fn publish_as_bob(&self, to: &Destination, frame: &str) {
            let bob = UserId::parse("bob").unwrap();
            self.node
                .bus
                .publish(to, &bob, Bytes::from(frame.to_owned()))
                .await
                .unwrap();
        }

        async fn next(&mut self) -> Out {
            tokio::time::timeout(Duration::from_secs(3600), self.out.recv())
                .await
                .expect("the session writes in time")
                .expect("the session is still writing")
        }

        async fn next_frame(&mut self) -> Value {
            match self.next().await {
                Out::Frame(frame) => frame,
                other => panic!("expected a frame, got {other:?}"),
            }
        }

        async fn say(&self, text: &str) {
            self.client
                .send(Inbound::Text(text.to_owned()))
                .await
                .unwrap();
        }

        /// Wait (in paused time) until the gate holds `n` publishes.
        async fn published(&self, n: usize) {
            while self.gate.count() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        async fn end(self) -> SessionEnd {
            self.ended.await.unwrap()
        }
    }

    /// `warren_messages_delivered_total` for WebSocket sessions.
    fn delivered(node: &Node) -> u64 {
        let text = node.metrics.render(&crate::metrics::Readings {
            broker_connections: 0,
            ready: true,
            history_reading: false,
        });
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"warren_messages_delivered_total{transport="ws"} "#));
        line.expect("the counter is rendered").parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_reach_the_client_in_order() {
        let mut h = start(Gate::default(), quiet_presence).await;
        let room = Destination::Room(RoomName::parse(ROOM).unwrap());
        for i in 0..600 {
            h.publish_as_bob(&room, &format!(r#"{{"type":"message","n":{i}}}"#))
                .await;
        }
        for i in 0..600 {
            assert_eq!(h.next_frame().await["n"], i);
        }
        assert_eq!(delivered(&h.node), 600);
    }

    /// Regression: WebSocket sessions counted a delivery before the socket
    /// write, SSE after it. Only what reached the transport counts.
    #[tokio::test(start_paused = true)]
    async fn a_delivery_the_transport_refused_is_not_counted() {
        let mut h = start(Gate::default(), quiet_presence).await;
        let room = Destination::Room(RoomName::parse(ROOM).unwrap());
        h.publish_as_bob(&room, r#"{"type":"message","n":0}"#).await;
        assert_eq!(h.next_frame().await["n"], 0);
        // The client goes away: the next write fails.
        h.out.close();
        h.publish_as_bob(&room, r#"{"type":"message","n":1}"#).await;
        let node = h.node.clone();
        assert!(matches!(h.end().await, SessionEnd::ClientGone(_)));
        assert_eq!(delivered(&node), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn confirms_become_acks_and_errors_in_publish_order() {
        let mut h = start(Gate::default(), quiet_presence).await;
        h.say(r#"{"type":"message","text":"one","ref":"c1"}"#).await;
        h.say(r#"{"type":"direct","to":"bob","text":"two","ref":"c2"}"#)
            .await;
        h.say(r#"{"type":"message","text":"no ref"}"#).await;
        h.say(r#"{"type":"message","text":"four","ref":"c4"}"#)
            .await;
        h.published(4).await;
        let published = h.gate.held.lock().unwrap()[0].0.clone();
        assert_eq!(published["from"], "alice", "the server sets the sender");
        assert_eq!(published["room"], ROOM);
        // Confirms arriving out of order are still answered in publish order.
        h.gate.confirm(3, Err(BusError::Unavailable("nack".into())));
        h.gate.confirm(2, Ok(()));
        h.gate.confirm(1, Err(BusError::NoRecipient));
        h.gate.confirm(0, Ok(()));
        let ack = h.next_frame().await;
        assert_eq!(
            (ack["type"].as_str(), ack["ref"].as_str()),
            (Some("ack"), Some("c1"))
        );
        assert_eq!(ack["id"], published["id"]);
        let missing = h.next_frame().await;
        assert_eq!(missing["code"], "user_not_found");
        assert_eq!(missing["ref"], "c2");
        let refused = h.next_frame().await;
        assert_eq!(refused["code"], "unavailable");
        assert_eq!(
            refused["ref"], "c4",
            "the publish without a ref is not answered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_error_budget_closes_an_abusive_client_with_1008() {
        let mut h = start(Gate::default(), quiet_presence).await;
        for _ in 0..ERROR_BUDGET {
            h.say("not json").await;
        }
        for _ in 0..ERROR_BUDGET {
            assert_eq!(h.next_frame().await["code"], "invalid_json");
        }
        // A new window forgives the old mistakes.
        tokio::time::advance(ERROR_WINDOW + Duration::from_secs(1)).await;
        for _ in 0..ERROR_BUDGET {
            h.client.send(Inbound::Binary).await.unwrap();
        }
        for _ in 0..ERROR_BUDGET {
            assert_eq!(h.next_frame().await["code"], "unsupported_frame");
        }
        h.say("{}").await;
        assert_eq!(
            h.next().await,
            Out::Close(Some((
                close_code::POLICY_VIOLATION,
                "too many invalid frames"
            )))
        );
        assert_eq!(h.end().await, SessionEnd::Abusive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_pinged_then_dropped() {
        let mut h = start(Gate::default(), quiet_presence).await;
        let interval = h.node.config.ping_interval();
        let started = Instant::now();
        assert_eq!(h.next().await, Out::Ping);
        assert_eq!(started.elapsed(), interval);
        // A pong is a sign of life: the next silence is counted from it.
        h.client.send(Inbound::Control).await.unwrap();
        assert_eq!(h.next().await, Out::Ping);
        assert_eq!(h.next().await, Out::Ping);
        assert_eq!(
            h.next().await,
            Out::Close(Some((close_code::GOING_AWAY, "no answer to pings")))
        );
        assert!(started.elapsed() >= interval * 4);
        assert_eq!(h.end().await, SessionEnd::Silent);
    }

    #[tokio::test(start_paused = true)]
    async fn back_pressure_stops_reading_at_max_in_flight() {
        let mut h = start(Gate::default(), quiet_presence).await;
        for i in 0..=MAX_IN_FLIGHT {
            h.say(&format!(
                r#"{{"type":"message","text":"{i}","ref":"r{i}"}}"#
            ))
            .await;
        }
        h.published(MAX_IN_FLIGHT).await;
        // Minutes pass: the session reads no further, and, not reading, does
        // not take the client's silence for death.
        tokio::time::sleep(h.node.config.ping_interval() * 3).await;
        assert_eq!(h.gate.count(), MAX_IN_FLIGHT);
        h.gate.confirm(0, Ok(()));
        h.published(MAX_IN_FLIGHT + 1).await;
        loop {
            match h.next().await {
                Out::Ping => continue,
                Out::Frame(ack) => {
                    assert_eq!(ack["ref"], "r0");
                    break;
                }
                Out::Close(c) => panic!("closed under back-pressure: {c:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_with_1001() {
        let mut h = start(Gate::default(), quiet_presence).await;
        h.node.lifecycle.shutdown.cancel();
        assert_eq!(
            h.next().await,
            Out::Close(Some((close_code::GOING_AWAY, "server shutting down")))
        );
        assert_eq!(h.end().await, SessionEnd::Shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_closes_with_1012_within_the_jitter() {
        let mut h = start(Gate::default(), quiet_presence).await;
        let started = Instant::now();
        h.node.lifecycle.restart.cancel();
        assert_eq!(
            h.next().await,
            Out::Close(Some((
                close_code::SERVICE_RESTART,
                "node restarting; reconnect"
            )))
        );
        assert!(started.elapsed() <= h.node.lifecycle.restart_jitter);
        assert_eq!(h.end().await, SessionEnd::Restart);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_ends_the_session() {
        let h = start(Gate::default(), quiet_presence).await;
        h.client.send(Inbound::Close).await.unwrap();
        assert_eq!(h.end().await, SessionEnd::ClientClosed);
        let h = start(Gate::default(), quiet_presence).await;
        h.client.send(Inbound::TooLarge).await.unwrap();
        assert_eq!(h.end().await, SessionEnd::TooLarge);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_broker_ends_the_session_with_unavailable_and_1013() {
        let gate = Gate {
            stuck: true,
            ..Gate::default()
        };
        let mut h = start(gate, quiet_presence).await;
        let started = Instant::now();
        h.say(r#"{"type":"message","text":"hi","ref":"c1"}"#).await;
        let error = h.next_frame().await;
        assert_eq!(
            (error["code"].as_str(), error["ref"].as_str()),
            (Some("unavailable"), Some("c1"))
        );
        assert_eq!(started.elapsed(), crate::bus::BROKER_TIMEOUT);
        assert_eq!(
            h.next().await,
            Out::Close(Some((close_code::TRY_AGAIN_LATER, "broker unavailable")))
        );
        assert_eq!(h.end().await, SessionEnd::BrokerLost);
    }

    /// Regression: a presence channel closed outside a shutdown used to be
    /// replaced by another closed one, and the session spun on it. A spinning
    /// task keeps paused time from advancing, so the ping below would never
    /// come; the watchdog thread turns that hang into a failure.
    #[test]
    fn a_closed_presence_channel_does_not_spin() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut h = start(Gate::default(), |node| {
                    let (_, updates) = broadcast::channel(1);
                    Joined {
                        members: Vec::new(),
                        total: 1,
                        updates,
                        presence: node.presence.clone(),
                    }
                })
                .await;
                assert_eq!(h.next().await, Out::Ping);
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(20))
            .expect("the session spun on a closed presence channel");
    }
}
