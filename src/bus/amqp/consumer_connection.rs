//! A broker connection of Warren's own that only consumes: with
//! `--amqp-consumer own`, sessions read their queues' deliveries here instead
//! of through lapin, which stays for everything else (declares, binds,
//! publishes with confirms, the node's own links).
//!
//! Why: lapin costs Warren about half its CPU per delivery in the card's mode
//! (docs/BENCHMARKS.md, "Where Warren's remaining µs per delivery go"): an
//! I/O thread per connection that parses each frame and hands each delivery
//! to the consumer's task through a queue of its own, a cross-thread wake-up
//! per delivery. Here one tokio task per connection reads the socket in large
//! chunks, splits frames without copying, and hands each channel all of one
//! read's deliveries at once: a wake-up per session per read. Acks from every
//! session go into one buffer that one writer task flushes, so a busy node
//! writes them together.
//!
//! It speaks the part of AMQP 0-9-1 a consumer needs, with lapin's own codec
//! (`amq-protocol`) for methods and content headers: the handshake (PLAIN,
//! heartbeats), `channel.open`, `basic.qos`, `basic.consume`, deliveries
//! (method, header, body frames), `basic.ack`, the broker's `basic.cancel`
//! (a deleted queue), `channel.close` either way and `connection.close`.
//! Plain TCP only: an `amqps://` broker keeps lapin's consumers.
//!
//! A channel's id is reused only after its `close-ok`, as the protocol asks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// A frame's type, channel and size come before its payload.
const FRAME_HEAD: usize = 7;
/// How much the reader asks the socket for at once: many deliveries per read
/// when the broker is busy.
const READ_CHUNK: usize = 64 * 1024;
/// Larger frames are refused: we ask for at most
/// [`crate::bus::pool::DEFAULT_FRAME_MAX`] unless the URL sets more.
const FRAME_SIZE_LIMIT: usize = 16 * 1024 * 1024;
/// The whole handshake, from TCP connect to `connection.open-ok`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful close waits for the broker's `close-ok`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong, as a session sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsumerError {
    /// The broker closed the channel (a missing queue: 404; another
    /// connection consumes it exclusively: 403).
    #[error("the broker closed the channel: {code} {text}")]
    ChannelClosed { code: u16, text: String },
    /// The broker cancelled the consumer (its queue was deleted).
    #[error("the broker cancelled the subscription")]
    Cancelled,
    #[error("the broker connection was lost: {0}")]
    ConnectionLost(String),
    /// We closed the channel.
    #[error("the channel was closed")]
    Closed,
    /// The connection carries as many channels as the broker allows.
    #[error("no free channel on the consumer connection")]
    NoChannel,
    #[error("cannot connect to the broker: {0}")]
    Connect(String),
}

impl ConsumerError {
    /// The broker's reply code, when it closed the channel.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            ConsumerError::ChannelClosed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One delivery, whole.
pub struct Delivered {
    pub tag: u64,
    pub redelivered: bool,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    pub data: Vec<u8>,
}

/// What the reader hands a channel's holder.
enum Incoming {
    /// A reply to a method the holder sent (`open-ok`, `qos-ok`,
    /// `consume-ok`); their content is not needed.
    Reply,
    /// One read's deliveries on this channel, in order.
    Deliveries(Vec<Delivered>),
    /// The channel ended; nothing more comes.
    Ended(ConsumerError),
}

/// A delivery whose header or body frames are still to come.
struct Partial {
    delivered: Delivered,
    /// The body's size, once its content header arrived.
    size: Option<u64>,
}

/// One open channel, as the reader sees it.
struct Route {
    to_holder: mpsc::UnboundedSender<Incoming>,
    /// Boxed: a route waits idle far more often than it assembles.
    partial: Option<Box<Partial>>,
    /// This read's completed deliveries, handed over when the read is done.
    batch: Vec<Delivered>,
    /// Set when we sent `channel.close`; told when it is answered.
    closed: Option<oneshot::Sender<()>>,
}

impl Route {
    /// Hand over this read's deliveries before anything else goes to the
    /// holder, so it sees them in the broker's order.
    fn flush(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let _ = self.to_holder.send(Incoming::Deliveries(batch));
        }
    }

    fn end(mut self, error: ConsumerError) {
        self.flush();
        let _ = self.to_holder.send(Incoming::Ended(error));
        if let Some(closed) = self.closed.take() {
            let _ = closed.send(());
        }
    }
}

/// Channels by id (index), and the ids free to reuse.
struct Channels {
    routes: Vec<Option<Route>>,
    free: Vec<u16>,
    max: u16,
    /// Set when the connection ended: no channel opens any more.
    ended: Option<String>,
}

impl Channels {
    fn route(&mut self, id: u16) -> Option<&mut Route> {
        self.routes
            .get_mut(usize::from(id))
            .and_then(Option::as_mut)
    }

    fn take(&mut self, id: u16) -> Option<Route> {
        let route = self.routes.get_mut(usize::from(id)).and_then(Option::take);
        if route.is_some() {
            self.free.push(id);
        }
        route
    }

    fn allocate(&mut self, route: Route) -> Result<u16, ConsumerError> {
        if let Some(reason) = &self.ended {
            return Err(ConsumerError::ConnectionLost(reason.clone()));
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let next = self.routes.len().max(1);
                if next > usize::from(self.max) {
                    return Err(ConsumerError::NoChannel);
                }
                if self.routes.is_empty() {
                    // Channel 0 is the connection's own.
                    self.routes.push(None);
                }
                self.routes.push(None);
                u16::try_from(next).map_err(|_| ConsumerError::NoChannel)?
            }
        };
        self.routes[usize::from(id)] = Some(route);
        Ok(id)
    }
}

/// Frames waiting for the writer.
struct Outgoing {
    frames: Vec<u8>,
    ended: bool,
}

struct Shared {
    channels: Mutex<Channels>,
    outgoing: Mutex<Outgoing>,
    wake_writer: Notify,
    /// Cancelled when the connection ends, for whatever reason.
    lost: CancellationToken,
    /// Told when the broker answers our `connection.close`.
    close_ok: Notify,
}

impl Shared {
    /// Queue `frames` for the writer; an error once the connection ended.
    fn send(&self, frames: &[AMQPFrame]) -> Result<(), ConsumerError> {
        {
            let mut out = self.outgoing.lock().unwrap();
            if out.ended {
                return Err(ConsumerError::ConnectionLost("connection closed".into()));
            }
            for frame in frames {
                let buf = std::mem::take(&mut out.frames);
                out.frames = encode(frame, buf);
            }
        }
        self.wake_writer.notify_one();
        Ok(())
    }

    /// The connection ended: every channel's holder is told, nothing more is
    /// written, and no channel opens any more.
    fn end(&self, reason: &str) {
        self.outgoing.lock().unwrap().ended = true;
        let routes = {
            let mut channels = self.channels.lock().unwrap();
            if channels.ended.is_some() {
                return;
            }
            channels.ended = Some(reason.to_owned());
            std::mem::take(&mut channels.routes)
        };
        for route in routes.into_iter().flatten() {
            route.end(ConsumerError::ConnectionLost(reason.to_owned()));
        }
        self.lost.cancel();
        self.close_ok.notify_waiters();
        self.wake_writer.notify_one();
    }
}

/// One consuming connection to the broker and its reader and writer tasks.
pub struct ConsumerConnection {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ConsumerConnection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ConsumerConnection {
    /// Connect and shake hands; `None` for a broker this connection cannot
    /// speak to (TLS), whose sessions then consume through lapin.
    pub async fn open(uri: &AMQPUri, name: &str) -> Option<Result<Self, ConsumerError>> {
        if uri.scheme != AMQPScheme::AMQP {
            return None;
        }
        let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::connect(uri, name)).await;
        Some(match opened {
            Ok(opened) => opened,
            Err(_) => Err(ConsumerError::Connect("handshake timed out".into())),
        })
    }

    async fn connect(uri: &AMQPUri, name: &str) -> Result<Self, ConsumerError> {
        let connect_error = |e: std::io::Error| ConsumerError::Connect(e.to_string());
        let host = uri.authority.host.as_str();
        let mut stream = TcpStream::connect((host, uri.authority.port))
            .await
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .map_err(connect_error)?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let handshake = |what: &str, got: &AMQPClass| {
            ConsumerError::Connect(format!("expected {what}, the broker sent {got:?}"))
        };
        match read_method(&mut stream, &mut buf).await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(_)) => {}
            other => return Err(handshake("connection.start", &other)),
        }
        let userinfo = &uri.authority.userinfo;
        let start_ok = connection::StartOk {
            client_properties: client_properties(name),
            mechanism: "PLAIN".into(),
            response: LongString::from(format!("\0{}\0{}", userinfo.username, userinfo.password)),
            locale: "en_US".into(),
        };
        write_frames(
            &mut stream,
            &[AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
            )],
        )
        .await?;
        let tune = match read_method(&mut stream, &mut buf).await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) => tune,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                return Err(ConsumerError::Connect(close.reply_text.to_string()));
            }
            other => return Err(handshake("connection.tune", &other)),
        };
        let tune_ok = negotiate(&tune, uri);
        let heartbeat =
            (tune_ok.heartbeat > 0).then(|| Duration::from_secs(u64::from(tune_ok.heartbeat)));
        let channel_max = tune_ok.channel_max;
        let open = connection::Open {
            virtual_host: uri.vhost.clone().into(),
        };
        write_frames(
            &mut stream,
            &[
                AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
                ),
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open))),
            ],
        )
        .await?;
        match read_method(&mut stream, &mut buf).await? {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                return Err(ConsumerError::Connect(close.reply_text.to_string()));
            }
            other => return Err(handshake("connection.open-ok", &other)),
        }
        let shared = Arc::new(Shared {
            channels: Mutex::new(Channels {
                routes: Vec::new(),
                free: Vec::new(),
                max: channel_max,
                ended: None,
            }),
            outgoing: Mutex::new(Outgoing {
                frames: Vec::new(),
                ended: false,
            }),
            wake_writer: Notify::new(),
            lost: CancellationToken::new(),
            close_ok: Notify::new(),
        });
        let (read_half, write_half) = stream.into_split();
        let reader = tokio::spawn({
            let shared = shared.clone();
            async move {
                let reason = read_loop(&shared, read_half, buf, heartbeat).await;
                debug!(%reason, "consumer connection ended");
                shared.end(&reason);
            }
        });
        let writer = tokio::spawn({
            let shared = shared.clone();
            async move {
                let reason = write_loop(&shared, write_half, heartbeat).await;
                shared.end(&reason);
            }
        });
        Ok(Self {
            shared,
            tasks: vec![reader, writer],
        })
    }

    /// Cancelled once the connection ended.
    pub fn lost(&self) -> CancellationToken {
        self.shared.lost.clone()
    }

    /// Open a channel and consume `queue` on it, acknowledging by hand with
    /// at most `prefetch` unacknowledged; `exclusive`: as its only consumer.
    /// A future dropped before it returns closes the channel it opened.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        exclusive: bool,
    ) -> Result<QueueConsumer, ConsumerError> {
        let (to_holder, mut incoming) = mpsc::unbounded_channel();
        let id = self.shared.channels.lock().unwrap().allocate(Route {
            to_holder,
            partial: None,
            batch: Vec::new(),
            closed: None,
        })?;
        let channel = ConsumerChannel {
            shared: self.shared.clone(),
            id,
        };
        let mut opening = OpeningGuard(Some(channel.clone()));
        let consume = basic::Consume {
            queue: queue.into(),
            exclusive,
            ..Default::default()
        };
        self.shared.send(&[
            AMQPFrame::Method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
            AMQPFrame::Method(
                id,
                AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                    prefetch_count: prefetch,
                    global: false,
                })),
            ),
            AMQPFrame::Method(id, AMQPClass::Basic(basic::AMQPMethod::Consume(consume))),
        ])?;
        // The replies come in the order the methods went; a failing method
        // closes the channel and the rest are not answered.
        for _ in 0..3 {
            match incoming.recv().await {
                Some(Incoming::Reply) => {}
                Some(Incoming::Ended(e)) => {
                    opening.0 = None;
                    return Err(e);
                }
                Some(Incoming::Deliveries(_)) | None => {
                    return Err(ConsumerError::ConnectionLost(
                        "the channel ended while opening".into(),
                    ));
                }
            }
        }
        opening.0 = None;
        Ok(QueueConsumer {
            channel,
            incoming,
            ready: VecDeque::new(),
            ended: None,
        })
    }

    /// Close the connection, waiting a little for the broker's answer.
    pub async fn close(&self) {
        let close = connection::Close {
            reply_code: 200,
            reply_text: "node shutting down".into(),
            class_id: 0,
            method_id: 0,
        };
        let answered = self.shared.close_ok.notified();
        let sent = self.shared.send(&[AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        )]);
        if sent.is_ok() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, answered).await;
        }
        self.shared.end("closed");
    }
}

/// Closes a channel whose open was given up part-way.
struct OpeningGuard(Option<ConsumerChannel>);

impl Drop for OpeningGuard {
    fn drop(&mut self) {
        if let Some(channel) = self.0.take() {
            channel.start_close();
        }
    }
}

/// A handle on one consumer channel: its acks, and its close (which puts
/// back in the queue, in order, whatever it had not acknowledged).
#[derive(Clone)]
pub struct ConsumerChannel {
    shared: Arc<Shared>,
    id: u16,
}

impl ConsumerChannel {
    /// Queue a `basic.ack`; acks go out in call order. Once the channel or
    /// the connection is gone there is nothing to ack.
    pub fn ack(&self, tag: u64, multiple: bool) {
        let ack = basic::Ack {
            delivery_tag: tag,
            multiple,
        };
        let _ = self.shared.send(&[AMQPFrame::Method(
            self.id,
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)),
        )]);
    }

    /// Close the channel and wait until the broker has (bounded by
    /// [`CLOSE_TIMEOUT`]); at once when it is already gone.
    pub async fn close(&self) {
        if let Some(closed) = self.start_close() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed).await;
        }
    }

    /// Send `channel.close` unless it was sent already or the channel is
    /// gone; what tells its answer.
    fn start_close(&self) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut channels = self.shared.channels.lock().unwrap();
            let route = channels.route(self.id)?;
            if route.closed.is_some() {
                return None;
            }
            route.closed = Some(tx);
        }
        let close = channel::Close {
            reply_code: 200,
            reply_text: "session ended".into(),
            class_id: 0,
            method_id: 0,
        };
        self.shared
            .send(&[AMQPFrame::Method(
                self.id,
                AMQPClass::Channel(channel::AMQPMethod::Close(close)),
            )])
            .ok()?;
        Some(rx)
    }
}

/// A queue's consumer: its deliveries in order, and its channel for acks.
pub struct QueueConsumer {
    channel: ConsumerChannel,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// Deliveries of the last batch not yet taken.
    ready: VecDeque<Delivered>,
    /// Why the channel ended, once it did; told after what came before it.
    ended: Option<ConsumerError>,
}

impl QueueConsumer {
    pub fn channel(&self) -> &ConsumerChannel {
        &self.channel
    }

    /// The next delivery; an error once the channel ended.
    pub async fn next(&mut self) -> Result<Delivered, ConsumerError> {
        loop {
            if let Some(ready) = self.take_ready() {
                return ready;
            }
            let incoming = self.incoming.recv().await;
            self.receive(incoming);
        }
    }

    /// The next delivery if one is here already.
    pub fn try_next(&mut self) -> Option<Result<Delivered, ConsumerError>> {
        loop {
            if let Some(ready) = self.take_ready() {
                return Some(ready);
            }
            let incoming = self.incoming.recv().now_or_never()?;
            self.receive(incoming);
        }
    }

    fn take_ready(&mut self) -> Option<Result<Delivered, ConsumerError>> {
        if let Some(delivered) = self.ready.pop_front() {
            return Some(Ok(delivered));
        }
        self.ended.clone().map(Err)
    }

    fn receive(&mut self, incoming: Option<Incoming>) {
        match incoming {
            Some(Incoming::Deliveries(batch)) => self.ready.extend(batch),
            Some(Incoming::Ended(e)) => self.ended = Some(e),
            // A late reply (our close's) carries nothing for the holder.
            Some(Incoming::Reply) => {}
            None => self.ended = Some(ConsumerError::Closed),
        }
    }
}

/// What we answer `connection.tune` with: the broker's limits, lowered by the
/// URL's `frame_max`, `channel_max` and `heartbeat` (a URL's 0 heartbeat turns
/// them off), with [`crate::bus::pool::DEFAULT_FRAME_MAX`] as lapin's pool uses.
fn negotiate(tune: &connection::Tune, uri: &AMQPUri) -> connection::TuneOk {
    let lower = |ours: u32, theirs: u32| match theirs {
        0 => ours,
        theirs => ours.min(theirs),
    };
    let frame_max = lower(
        uri.query
            .frame_max
            .unwrap_or(crate::bus::pool::DEFAULT_FRAME_MAX),
        tune.frame_max,
    );
    let channel_max = lower(
        u32::from(uri.query.channel_max.unwrap_or(u16::MAX)),
        u32::from(tune.channel_max),
    );
    let heartbeat = match uri.query.heartbeat {
        Some(ours) => lower(u32::from(ours), u32::from(tune.heartbeat)),
        None => u32::from(tune.heartbeat),
    };
    connection::TuneOk {
        channel_max: u16::try_from(channel_max).unwrap_or(u16::MAX),
        frame_max,
        heartbeat: u16::try_from(heartbeat).unwrap_or(u16::MAX),
    }
}

fn client_properties(name: &str) -> FieldTable {
    let mut capabilities = FieldTable::default();
    // Without it RabbitMQ drops a consumer of a deleted queue silently.
    capabilities.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
    let mut properties = FieldTable::default();
    properties.insert("product".into(), AMQPValue::LongString("warren".into()));
    properties.insert("connection_name".into(), AMQPValue::LongString(name.into()));
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    properties
}

fn encode(frame: &AMQPFrame, buf: Vec<u8>) -> Vec<u8> {
    match gen_frame(frame)(WriteContext::from(buf)) {
        Ok(written) => written.write,
        // Writing into a Vec cannot run out of room; our frames are all
        // well-formed.
        Err(e) => unreachable!("encoding an AMQP frame into memory failed: {e}"),
    }
}

async fn write_frames(stream: &mut TcpStream, frames: &[AMQPFrame]) -> Result<(), ConsumerError> {
    let bytes = frames
        .iter()
        .fold(Vec::new(), |buf, frame| encode(frame, buf));
    stream
        .write_all(&bytes)
        .await
        .map_err(|e| ConsumerError::Connect(e.to_string()))
}

/// During the handshake: the next method on channel 0.
async fn read_method(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<AMQPClass, ConsumerError> {
    loop {
        match next_frame(buf) {
            Ok(Some((FRAME_METHOD, _, payload))) => return parse_method(&payload),
            Ok(Some(_)) => {}
            Ok(None) => {
                let n = stream
                    .read_buf(buf)
                    .await
                    .map_err(|e| ConsumerError::Connect(e.to_string()))?;
                if n == 0 {
                    return Err(ConsumerError::Connect(
                        "the broker closed the connection during the handshake".into(),
                    ));
                }
            }
            Err(e) => return Err(ConsumerError::Connect(e)),
        }
    }
}

fn parse_method(payload: &[u8]) -> Result<AMQPClass, ConsumerError> {
    amq_protocol::protocol::parse_class(payload)
        .map(|(_, class)| class)
        .map_err(|e| ConsumerError::Connect(format!("unparsable method: {e}")))
}

/// Split one whole frame off `buf`: its type, channel and payload (without
/// copying). `None` until a whole frame is there.
fn next_frame(buf: &mut BytesMut) -> Result<Option<(u8, u16, Bytes)>, String> {
    if buf.len() < FRAME_HEAD {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size > FRAME_SIZE_LIMIT {
        return Err(format!("a frame of {size} bytes"));
    }
    if buf.len() < FRAME_HEAD + size + 1 {
        buf.reserve(FRAME_HEAD + size + 1 - buf.len());
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    if buf[FRAME_HEAD + size] != FRAME_END {
        return Err(format!("a frame of type {kind} did not end with 0xCE"));
    }
    buf.advance(FRAME_HEAD);
    let payload = buf.split_to(size).freeze();
    buf.advance(1);
    Ok(Some((kind, channel, payload)))
}

/// Read frames until the connection ends; why it ended.
async fn read_loop(
    shared: &Shared,
    mut socket: OwnedReadHalf,
    mut buf: BytesMut,
    heartbeat: Option<Duration>,
) -> String {
    // Two heartbeats missed, as the protocol suggests, or none at all.
    let silence = heartbeat.map(|h| h * 2);
    let mut touched: Vec<u16> = Vec::new();
    loop {
        // Frames left from the handshake's read first.
        if let Err(reason) = on_read(shared, &mut buf, &mut touched) {
            return reason;
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let read = socket.read_buf(&mut buf);
        let read = match silence {
            Some(silence) => match tokio::time::timeout(silence, read).await {
                Ok(read) => read,
                Err(_) => return "the broker missed two heartbeats".into(),
            },
            None => read.await,
        };
        match read {
            Ok(0) => return "the broker closed the connection".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// Handle every whole frame one read brought, then hand each channel its
/// deliveries; `Err` ends the connection with that reason.
fn on_read(shared: &Shared, buf: &mut BytesMut, touched: &mut Vec<u16>) -> Result<(), String> {
    let mut channels = shared.channels.lock().unwrap();
    while let Some((kind, id, payload)) = next_frame(buf)? {
        on_frame(shared, &mut channels, touched, kind, id, payload)?;
    }
    for id in touched.drain(..) {
        if let Some(route) = channels.route(id) {
            route.flush();
        }
    }
    Ok(())
}

/// Handle one frame; `Err` ends the connection with that reason.
fn on_frame(
    shared: &Shared,
    channels: &mut Channels,
    touched: &mut Vec<u16>,
    kind: u8,
    id: u16,
    payload: Bytes,
) -> Result<(), String> {
    match kind {
        FRAME_HEARTBEAT => Ok(()),
        FRAME_METHOD if id == 0 => on_connection_method(shared, &payload),
        FRAME_METHOD => {
            let method = parse_method(&payload).map_err(|e| e.to_string())?;
            on_channel_method(shared, channels, id, method);
            Ok(())
        }
        FRAME_HEADER => {
            let Some(route) = channels.route(id) else {
                return Ok(());
            };
            let (_, header) = amq_protocol::frame::parsing::parse_content_header(&payload[..])
                .map_err(|e| format!("unparsable content header: {e}"))?;
            let Some(partial) = route.partial.as_mut() else {
                return Err("a content header without a delivery".into());
            };
            partial.delivered.properties = header.properties;
            partial.size = Some(header.body_size);
            partial
                .delivered
                .data
                .reserve(usize::try_from(header.body_size).unwrap_or(0));
            complete_if_whole(route, touched, id);
            Ok(())
        }
        FRAME_BODY => {
            let Some(route) = channels.route(id) else {
                return Ok(());
            };
            let Some(partial) = route.partial.as_mut().filter(|p| p.size.is_some()) else {
                return Err("a content body without a header".into());
            };
            partial.delivered.data.extend_from_slice(&payload);
            complete_if_whole(route, touched, id);
            Ok(())
        }
        other => Err(format!("unexpected frame type {other}")),
    }
}

fn complete_if_whole(route: &mut Route, touched: &mut Vec<u16>, id: u16) {
    let whole = route.partial.as_ref().is_some_and(|p| {
        p.size
            .is_some_and(|size| p.delivered.data.len() as u64 >= size)
    });
    if whole && let Some(partial) = route.partial.take() {
        if route.batch.is_empty() {
            touched.push(id);
        }
        route.batch.push(partial.delivered);
    }
}

fn on_connection_method(shared: &Shared, payload: &[u8]) -> Result<(), String> {
    match parse_method(payload).map_err(|e| e.to_string())? {
        AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
            let _ = shared.send(&[AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            )]);
            Err(format!(
                "the broker closed the connection: {} {}",
                close.reply_code, close.reply_text
            ))
        }
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
            shared.close_ok.notify_waiters();
            Err("closed".into())
        }
        // `connection.blocked` and the like concern publishers only.
        _ => Ok(()),
    }
}

fn on_channel_method(shared: &Shared, channels: &mut Channels, id: u16, method: AMQPClass) {
    match method {
        AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)) => {
            if let Some(route) = channels.route(id) {
                route.partial = Some(Box::new(Partial {
                    delivered: Delivered {
                        tag: deliver.delivery_tag,
                        redelivered: deliver.redelivered,
                        exchange: deliver.exchange,
                        routing_key: deliver.routing_key,
                        properties: BasicProperties::default(),
                        data: Vec::new(),
                    },
                    size: None,
                }));
            }
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(close)) => {
            let _ = shared.send(&[AMQPFrame::Method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            )]);
            if let Some(route) = channels.take(id) {
                route.end(ConsumerError::ChannelClosed {
                    code: close.reply_code,
                    text: close.reply_text.to_string(),
                });
            }
        }
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
            if let Some(route) = channels.take(id) {
                route.end(ConsumerError::Closed);
            }
        }
        AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
            if !cancel.nowait {
                let cancel_ok = basic::CancelOk {
                    consumer_tag: cancel.consumer_tag,
                };
                let _ = shared.send(&[AMQPFrame::Method(
                    id,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(cancel_ok)),
                )]);
            }
            if let Some(route) = channels.route(id) {
                route.flush();
                let _ = route
                    .to_holder
                    .send(Incoming::Ended(ConsumerError::Cancelled));
            }
        }
        _ => {
            if let Some(route) = channels.route(id) {
                route.flush();
                let _ = route.to_holder.send(Incoming::Reply);
            }
        }
    }
}

/// Write what the sessions queued, a heartbeat when there was nothing to
/// write for half the heartbeat, until the connection ends; why it ended.
async fn write_loop(
    shared: &Shared,
    mut socket: OwnedWriteHalf,
    heartbeat: Option<Duration>,
) -> String {
    let mut spare = Vec::new();
    loop {
        let woken = shared.wake_writer.notified();
        let frames = {
            let mut out = shared.outgoing.lock().unwrap();
            if out.ended && out.frames.is_empty() {
                return "closed".into();
            }
            std::mem::replace(&mut out.frames, std::mem::take(&mut spare))
        };
        if !frames.is_empty() {
            if let Err(e) = socket.write_all(&frames).await {
                return e.to_string();
            }
            spare = frames;
            spare.clear();
            continue;
        }
        spare = frames;
        match heartbeat {
            Some(heartbeat) => {
                if tokio::time::timeout(heartbeat / 2, woken).await.is_err() {
                    let beat = encode(&AMQPFrame::Heartbeat, Vec::new());
                    if let Err(e) = socket.write_all(&beat).await {
                        return e.to_string();
                    }
                }
            }
            None => woken.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_whole_frames_and_waits_for_the_rest() {
        let ack = AMQPFrame::Method(
            3,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 7,
                multiple: true,
            })),
        );
        let bytes = encode(&AMQPFrame::Heartbeat, encode(&ack, Vec::new()));
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 3]);
        let (kind, channel, payload) = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!((kind, channel), (FRAME_METHOD, 3));
        match parse_method(&payload).unwrap() {
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                assert_eq!((ack.delivery_tag, ack.multiple), (7, true));
            }
            other => panic!("{other:?}"),
        }
        assert!(next_frame(&mut buf).unwrap().is_none(), "half a heartbeat");
        buf.extend_from_slice(&bytes[bytes.len() - 3..]);
        let (kind, channel, payload) = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!((kind, channel, payload.len()), (FRAME_HEARTBEAT, 0, 0));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_frame_without_its_end_marker_is_refused() {
        let mut bytes = encode(&AMQPFrame::Heartbeat, Vec::new());
        *bytes.last_mut().unwrap() = 0;
        assert!(next_frame(&mut BytesMut::from(&bytes[..])).is_err());
    }

    fn broker_url() -> String {
        std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    async fn open_own() -> ConsumerConnection {
        let uri: AMQPUri = broker_url().parse().unwrap();
        ConsumerConnection::open(&uri, "warren consumer_connection test")
            .await
            .expect("plain amqp")
            .expect("the broker at AMQP_URL is up")
    }

    /// A lapin connection and channel, and the test's queue declared on it:
    /// not exclusive (the consumer is on the other connection), deleted by
    /// the test, and expiring a minute after a test that failed first.
    async fn lapin_queue(queue: &str) -> (lapin::Connection, lapin::Channel) {
        use lapin::options::QueueDeclareOptions;
        let conn =
            lapin::Connection::connect(&broker_url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::default(), arguments)
            .await
            .unwrap();
        (conn, channel)
    }

    async fn delete(channel: &lapin::Channel, queue: &str) {
        channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .unwrap();
    }

    async fn publish(channel: &lapin::Channel, queue: &str, body: &[u8], id: &str) {
        use lapin::options::BasicPublishOptions;
        let properties = BasicProperties::default().with_message_id(id.into());
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
    }

    async fn next_within(consumer: &mut QueueConsumer) -> Result<Delivered, ConsumerError> {
        tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery or an end within 10 s")
    }

    fn test_queue(name: &str) -> String {
        format!("t{:08x}.own.{name}", rand::random::<u32>())
    }

    /// Deliveries come whole and in order with their properties: an empty
    /// body, a small one, and one larger than a frame (several body
    /// frames); unacknowledged ones stop at the prefetch, and an ack lets
    /// the rest through.
    #[tokio::test]
    async fn delivers_whole_messages_in_order_within_the_prefetch() {
        let queue = test_queue("order");
        let (_lapin, channel) = lapin_queue(&queue).await;
        let own = open_own().await;
        let mut consumer = own.consume(&queue, 2, true).await.unwrap();
        let large = vec![b'x'; 3 * crate::bus::pool::DEFAULT_FRAME_MAX as usize + 17];
        let bodies: [&[u8]; 4] = [b"", b"small", &large, b"last"];
        for (i, body) in bodies.iter().enumerate() {
            publish(&channel, &queue, body, &format!("m{i}")).await;
        }
        let first = next_within(&mut consumer).await.unwrap();
        let second = next_within(&mut consumer).await.unwrap();
        for (i, d) in [&first, &second].into_iter().enumerate() {
            assert_eq!(d.data, bodies[i]);
            assert_eq!(
                d.properties.message_id().as_ref().map(|id| id.as_str()),
                Some(format!("m{i}").as_str())
            );
            assert_eq!(d.routing_key.as_str(), queue);
            assert!(!d.redelivered);
        }
        // The prefetch of 2 holds the rest back until the two are acked.
        let held = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
        assert!(held.is_err(), "a third delivery beyond the prefetch");
        consumer.channel().ack(second.tag, true);
        let third = next_within(&mut consumer).await.unwrap();
        assert_eq!(third.data.len(), large.len());
        assert_eq!(third.data, large);
        let fourth = next_within(&mut consumer).await.unwrap();
        assert_eq!(fourth.data, b"last");
        assert!(fourth.tag > third.tag && third.tag > second.tag);
        consumer.channel().close().await;
        own.close().await;
        delete(&channel, &queue).await;
    }

    /// A missing queue closes only its channel (404); another exclusive
    /// consumer of a queue is refused (403); the connection stays usable.
    #[tokio::test]
    async fn channel_errors_carry_the_brokers_code_and_spare_the_connection() {
        let queue = test_queue("codes");
        let (_lapin, channel) = lapin_queue(&queue).await;
        let own = open_own().await;
        let missing = own.consume(&format!("{queue}.missing"), 8, true).await;
        assert_eq!(missing.err().and_then(|e| e.reply_code()), Some(404));
        let first = own.consume(&queue, 8, true).await.unwrap();
        let second = own.consume(&queue, 8, true).await;
        assert_eq!(second.err().and_then(|e| e.reply_code()), Some(403));
        assert!(!own.lost().is_cancelled());
        first.channel().close().await;
        own.close().await;
        assert!(own.lost().is_cancelled());
        delete(&channel, &queue).await;
    }

    /// Closing a consumer's channel puts back what it had not acknowledged,
    /// marked redelivered; deleting its queue cancels the consumer.
    #[tokio::test]
    async fn a_close_puts_back_the_unacknowledged_and_a_delete_cancels() {
        let queue = test_queue("close");
        let (_lapin, channel) = lapin_queue(&queue).await;
        let own = open_own().await;
        let mut first = own.consume(&queue, 8, true).await.unwrap();
        publish(&channel, &queue, b"once", "m0").await;
        let delivered = next_within(&mut first).await.unwrap();
        assert!(!delivered.redelivered);
        first.channel().close().await;
        assert!(matches!(
            next_within(&mut first).await,
            Err(ConsumerError::Closed)
        ));

        let mut second = own.consume(&queue, 8, true).await.unwrap();
        let again = next_within(&mut second).await.unwrap();
        assert_eq!(
            (again.data.as_slice(), again.redelivered),
            (&b"once"[..], true)
        );
        delete(&channel, &queue).await;
        assert!(matches!(
            next_within(&mut second).await,
            Err(ConsumerError::Cancelled)
        ));
        second.channel().close().await;
        own.close().await;
    }

    /// A broker that shakes hands with a 1 s heartbeat and then says
    /// nothing: we beat every half second meanwhile, and call the
    /// connection lost once two of its beats are missed.
    #[tokio::test]
    async fn a_silent_broker_is_lost_after_two_missed_heartbeats() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let broker = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut header = [0u8; 8];
            socket.read_exact(&mut header).await.unwrap();
            assert_eq!(&header, b"AMQP\x00\x00\x09\x01");
            let method = |m| AMQPFrame::Method(0, AMQPClass::Connection(m));
            let start = connection::Start {
                version_minor: 9,
                mechanisms: "PLAIN".into(),
                locales: "en_US".into(),
                ..Default::default()
            };
            write_frames(&mut socket, &[method(connection::AMQPMethod::Start(start))])
                .await
                .unwrap();
            let mut buf = BytesMut::new();
            let start_ok = read_method(&mut socket, &mut buf).await.unwrap();
            assert!(matches!(
                start_ok,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(_))
            ));
            let tune = connection::Tune {
                channel_max: 16,
                frame_max: 4096,
                heartbeat: 1,
            };
            write_frames(&mut socket, &[method(connection::AMQPMethod::Tune(tune))])
                .await
                .unwrap();
            match read_method(&mut socket, &mut buf).await.unwrap() {
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(ok)) => {
                    assert_eq!(ok.heartbeat, 1);
                }
                other => panic!("{other:?}"),
            }
            read_method(&mut socket, &mut buf).await.unwrap();
            let open_ok = connection::OpenOk {};
            write_frames(
                &mut socket,
                &[method(connection::AMQPMethod::OpenOk(open_ok))],
            )
            .await
            .unwrap();
            // Silent from here: count the client's heartbeats until it hangs up.
            let mut beats = 0;
            loop {
                while let Some((kind, _, _)) = next_frame(&mut buf).unwrap() {
                    beats += usize::from(kind == FRAME_HEARTBEAT);
                }
                if socket.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return beats;
                }
            }
        });
        let uri: AMQPUri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
            .parse()
            .unwrap();
        let own = ConsumerConnection::open(&uri, "silent broker test")
            .await
            .unwrap()
            .unwrap();
        let opened = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), own.lost().cancelled())
            .await
            .expect("the silent broker is noticed");
        let noticed = opened.elapsed();
        assert!(
            noticed >= Duration::from_millis(1900) && noticed < Duration::from_secs(5),
            "{noticed:?}"
        );
        let lost = own.consume("anything", 1, true).await;
        assert!(matches!(lost, Err(ConsumerError::ConnectionLost(_))));
        drop(own);
        let beats = tokio::time::timeout(Duration::from_secs(10), broker)
            .await
            .expect("the client hangs up")
            .unwrap();
        assert!(beats >= 3, "{beats} heartbeats in two seconds");
    }

    #[test]
    fn the_url_lowers_what_the_broker_offers() {
        let tune = connection::Tune {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        };
        let plain: AMQPUri = "amqp://guest:guest@127.0.0.1:5672/%2f".parse().unwrap();
        let ok = negotiate(&tune, &plain);
        assert_eq!(
            (ok.channel_max, ok.frame_max, ok.heartbeat),
            (2047, crate::bus::pool::DEFAULT_FRAME_MAX, 60)
        );
        let lowered: AMQPUri = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10&channel_max=100"
            .parse()
            .unwrap();
        let ok = negotiate(&tune, &lowered);
        assert_eq!((ok.channel_max, ok.heartbeat), (100, 10));
    }
}
