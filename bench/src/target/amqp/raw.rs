//! A raw AMQP 0-9-1 client: the leanest consumer the bench can be, so the
//! `noack` and `ack` baselines measure the broker and not the client.
//!
//! lapin costs ~6–7 µs of client CPU per delivery here (perf: its I/O thread's
//! frame parsing, buffer moves and allocations, then a channel hop and a task
//! wake-up per delivery; see docs/BENCHMARKS.md), about a third of what the
//! broker spends, and on two cores that comes out of the broker's share. This
//! client does the least a consumer must: per connection one task that reads
//! the socket in large chunks, splits frames without copying, and hands each
//! channel's bodies over as one batch per read. With `ack`, the same task sends
//! one `basic.ack` (`multiple`) per 64 deliveries of a channel, all of one read's
//! acks in one write.
//!
//! It speaks only what the bench needs: the handshake (PLAIN, no heartbeats),
//! `channel.open`, `basic.qos`, `queue.declare` (exclusive, auto-delete,
//! server-named), `queue.bind`, `basic.consume`, `basic.publish` (no properties,
//! or Warren's numbering in headers or `message-id`), `basic.ack` and
//! `connection.close`. Anything else the broker sends during
//! setup (a `channel.close`, say) fails that setup step with the broker's text.

use std::sync::{Arc, Mutex as StdMutex};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
/// How much the reader asks the socket for at once.
const READ_CHUNK: usize = 256 * 1024;
/// What we propose as `frame_max`; bench bodies are a few hundred bytes.
const FRAME_MAX: u32 = 131_072;

/// (class, method) ids.
const CONNECTION_START_OK: (u16, u16) = (10, 11);
const CONNECTION_TUNE: (u16, u16) = (10, 30);
const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
const CONNECTION_OPEN: (u16, u16) = (10, 40);
const CONNECTION_CLOSE: (u16, u16) = (10, 50);
const CHANNEL_OPEN: (u16, u16) = (20, 10);
const CHANNEL_CLOSE: (u16, u16) = (20, 40);
const QUEUE_DECLARE: (u16, u16) = (50, 10);
const QUEUE_BIND: (u16, u16) = (50, 20);
const BASIC_QOS: (u16, u16) = (60, 10);
const BASIC_CONSUME: (u16, u16) = (60, 20);
const BASIC_PUBLISH: (u16, u16) = (60, 40);
const BASIC_DELIVER: (u16, u16) = (60, 60);
const BASIC_ACK: (u16, u16) = (60, 80);

/// How a channel's consumer settles deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// `no-ack` consumer.
    Auto,
    /// Manual acks: `prefetch`, one `multiple` ack per `every` deliveries.
    Ack { prefetch: u16, every: u32 },
}

/// One channel, as the reader task sees it.
#[derive(Default)]
struct Route {
    /// Where method replies go while the channel is set up.
    replies: Option<mpsc::UnboundedSender<Bytes>>,
    /// Where the channel's delivery bodies go, a batch per read.
    deliveries: Option<mpsc::UnboundedSender<Vec<Bytes>>>,
    /// With manual acks: ack once this many are unacknowledged (0: no acks).
    ack_every: u32,
    unacked: u32,
    last_tag: u64,
}

/// One AMQP connection and the task that reads it.
pub struct Connection {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    /// Indexed by channel id. A std Mutex: the reader holds it only while it
    /// hands out one read's frames, never across an await.
    routes: Arc<StdMutex<Vec<Route>>>,
    next_channel: StdMutex<u16>,
    reader: JoinHandle<()>,
}

impl Connection {
    pub async fn open(url: &str) -> Result<Self> {
        let target = Target::parse(url)?;
        let mut stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .with_context(|| format!("connecting to {}:{}", target.host, target.port))?;
        stream.set_nodelay(true)?;
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        // connection.start: whatever it offers, we answer PLAIN.
        read_method(&mut stream, &mut buf).await?;
        let mut args = BytesMut::new();
        args.put_u32(0); // client-properties: an empty table
        put_short(&mut args, "PLAIN");
        let response = format!("\0{}\0{}", target.user, target.password);
        args.put_u32(response.len() as u32);
        args.put_slice(response.as_bytes());
        put_short(&mut args, "en_US");
        stream
            .write_all(&method_frame(0, CONNECTION_START_OK, &args))
            .await?;
        let tune = read_method(&mut stream, &mut buf).await?;
        if method_id(&tune) != CONNECTION_TUNE {
            bail!("expected connection.tune, got {:?}", method_id(&tune));
        }
        let channel_max = u16::from_be_bytes([tune[4], tune[5]]);
        let frame_max = u32::from_be_bytes([tune[6], tune[7], tune[8], tune[9]]);
        let mut args = BytesMut::new();
        args.put_u16(channel_max);
        args.put_u32(if frame_max == 0 {
            FRAME_MAX
        } else {
            frame_max.min(FRAME_MAX)
        });
        args.put_u16(0); // no heartbeats: a run is short and never idle
        stream
            .write_all(&method_frame(0, CONNECTION_TUNE_OK, &args))
            .await?;
        let mut args = BytesMut::new();
        put_short(&mut args, &target.vhost);
        put_short(&mut args, "");
        args.put_u8(0);
        stream
            .write_all(&method_frame(0, CONNECTION_OPEN, &args))
            .await?;
        read_method(&mut stream, &mut buf).await?; // open-ok
        let (read, write) = stream.into_split();
        let writer = Arc::new(Mutex::new(write));
        let routes = Arc::new(StdMutex::new(Vec::new()));
        let reader = tokio::spawn(read_loop(read, buf, routes.clone(), writer.clone()));
        Ok(Self {
            writer,
            routes,
            next_channel: StdMutex::new(1),
            reader,
        })
    }

    /// Open a channel with an exclusive server-named queue bound to `exchange`
    /// and a consumer on it; returns the channel id and its deliveries.
    pub async fn subscribe(
        &self,
        exchange: &str,
        settle: Settle,
    ) -> Result<(u16, mpsc::UnboundedReceiver<Vec<Bytes>>)> {
        let channel = {
            let mut next = self.next_channel.lock().expect("not poisoned");
            let id = *next;
            *next += 1;
            id
        };
        let (reply_tx, mut replies) = mpsc::unbounded_channel();
        let (delivery_tx, deliveries) = mpsc::unbounded_channel();
        {
            let mut routes = self.routes.lock().expect("not poisoned");
            if routes.len() <= channel as usize {
                routes.resize_with(channel as usize + 1, Route::default);
            }
            let route = &mut routes[channel as usize];
            route.replies = Some(reply_tx);
            route.deliveries = Some(delivery_tx);
            if let Settle::Ack { every, .. } = settle {
                route.ack_every = every;
            }
        }
        let mut call = async |id: (u16, u16), args: &[u8]| -> Result<Bytes> {
            self.writer
                .lock()
                .await
                .write_all(&method_frame(channel, id, args))
                .await?;
            let reply = replies
                .recv()
                .await
                .ok_or_else(|| anyhow!("the connection closed"))?;
            if method_id(&reply) == CHANNEL_CLOSE {
                bail!("the broker closed the channel: {}", close_text(&reply));
            }
            Ok(reply)
        };
        call(CHANNEL_OPEN, &[0]).await?;
        if let Settle::Ack { prefetch, .. } = settle {
            let mut args = BytesMut::new();
            args.put_u32(0); // prefetch-size
            args.put_u16(prefetch);
            args.put_u8(0); // global: no
            call(BASIC_QOS, &args).await?;
        }
        let mut args = BytesMut::new();
        args.put_u16(0);
        put_short(&mut args, "");
        args.put_u8(0b0000_1100); // exclusive, auto-delete
        args.put_u32(0);
        let declared = call(QUEUE_DECLARE, &args).await?;
        let name_len = declared[4] as usize;
        let queue = std::str::from_utf8(&declared[5..5 + name_len])?.to_string();
        let mut args = BytesMut::new();
        args.put_u16(0);
        put_short(&mut args, &queue);
        put_short(&mut args, exchange);
        put_short(&mut args, "");
        args.put_u8(0);
        args.put_u32(0);
        call(QUEUE_BIND, &args).await?;
        let mut args = BytesMut::new();
        args.put_u16(0);
        put_short(&mut args, &queue);
        put_short(&mut args, "");
        args.put_u8(if settle == Settle::Auto { 0b10 } else { 0 }); // no-ack
        args.put_u32(0);
        call(BASIC_CONSUME, &args).await?;
        Ok((channel, deliveries))
    }

    /// Publish `body` to `exchange` on `channel`: without properties, or with
    /// Warren's numbering.
    pub async fn publish(
        &self,
        channel: u16,
        exchange: &str,
        body: &[u8],
        numbering: Option<Numbering>,
    ) -> Result<()> {
        let mut args = BytesMut::new();
        args.put_u16(0);
        put_short(&mut args, exchange);
        put_short(&mut args, "");
        args.put_u8(0);
        let mut frames = method_frame(channel, BASIC_PUBLISH, &args);
        let mut header = BytesMut::new();
        header.put_u16(BASIC_PUBLISH.0);
        header.put_u16(0); // weight
        header.put_u64(body.len() as u64);
        match numbering {
            None => header.put_u16(0), // no properties
            Some(Numbering::Headers(link, number)) => {
                header.put_u16(PROPERTY_HEADERS);
                put_numbering(&mut header, link, number);
            }
            Some(Numbering::MessageId(link, number)) => {
                header.put_u16(PROPERTY_MESSAGE_ID);
                put_short(&mut header, &format!("{link:x}.{number}"));
            }
        }
        put_frame(&mut frames, FRAME_HEADER, channel, &header);
        put_frame(&mut frames, FRAME_BODY, channel, body);
        self.writer.lock().await.write_all(&frames).await?;
        Ok(())
    }

    /// Say goodbye; the broker deletes the exclusive queues with the connection.
    pub async fn close(self) {
        let mut args = BytesMut::new();
        args.put_u16(200);
        put_short(&mut args, "bench done");
        args.put_u32(0);
        let mut writer = self.writer.lock().await;
        let _ = writer
            .write_all(&method_frame(0, CONNECTION_CLOSE, &args))
            .await;
        let _ = writer.shutdown().await;
        self.reader.abort();
    }
}

/// Read the socket until it closes: split frames, batch bodies per channel,
/// route setup replies, ack when due.
async fn read_loop(
    mut read: OwnedReadHalf,
    mut buf: BytesMut,
    routes: Arc<StdMutex<Vec<Route>>>,
    writer: Arc<Mutex<OwnedWriteHalf>>,
) {
    let mut batches: Vec<Vec<Bytes>> = Vec::new();
    let mut touched: Vec<u16> = Vec::new();
    let mut acks = BytesMut::new();
    loop {
        {
            let mut routes = routes.lock().expect("not poisoned");
            while let Some((kind, channel, payload)) = next_frame(&mut buf) {
                let Some(route) = routes.get_mut(channel as usize) else {
                    continue;
                };
                match kind {
                    FRAME_BODY => {
                        let at = channel as usize;
                        if batches.len() <= at {
                            batches.resize_with(at + 1, Vec::new);
                        }
                        if batches[at].is_empty() {
                            touched.push(channel);
                        }
                        batches[at].push(payload);
                    }
                    FRAME_METHOD if method_id(&payload) == BASIC_DELIVER => {
                        if route.ack_every == 0 {
                            continue; // a no-ack consumer
                        }
                        route.last_tag = delivery_tag(&payload);
                        route.unacked += 1;
                        if route.unacked >= route.ack_every {
                            route.unacked = 0;
                            let mut args = [0u8; 9];
                            args[..8].copy_from_slice(&route.last_tag.to_be_bytes());
                            args[8] = 1; // multiple
                            acks.put_slice(&method_frame(channel, BASIC_ACK, &args));
                        }
                    }
                    FRAME_METHOD => {
                        if let Some(replies) = &route.replies {
                            let _ = replies.send(payload);
                        }
                    }
                    _ => {} // content headers, heartbeats
                }
            }
            for channel in touched.drain(..) {
                let batch = std::mem::take(&mut batches[channel as usize]);
                if let Some(deliveries) = &routes[channel as usize].deliveries {
                    let _ = deliveries.send(batch);
                }
            }
        }
        if !acks.is_empty() {
            let frames = acks.split().freeze();
            if writer.lock().await.write_all(&frames).await.is_err() {
                break;
            }
        }
        buf.reserve(READ_CHUNK);
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // Dropping the routes' senders ends every inbox.
    routes.lock().expect("not poisoned").clear();
}

/// The next whole frame in `buf`: (type, channel, payload), without a copy.
fn next_frame(buf: &mut BytesMut) -> Option<(u8, u16, Bytes)> {
    if buf.len() < 7 {
        return None;
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if buf.len() < 7 + size + 1 {
        return None;
    }
    let mut frame = buf.split_to(7 + size + 1).freeze();
    let kind = frame.get_u8();
    let channel = frame.get_u16();
    frame.advance(4);
    debug_assert_eq!(frame[size], FRAME_END);
    frame.truncate(size);
    Some((kind, channel, frame))
}

/// Read one method frame during the handshake (before the reader task owns the
/// socket).
async fn read_method(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Bytes> {
    loop {
        if let Some((kind, _, payload)) = next_frame(buf) {
            if kind != FRAME_METHOD {
                continue;
            }
            if method_id(&payload) == CONNECTION_CLOSE {
                bail!("the broker closed the connection: {}", close_text(&payload));
            }
            return Ok(payload);
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("the broker closed the connection during the handshake");
        }
    }
}

fn method_id(payload: &[u8]) -> (u16, u16) {
    if payload.len() < 4 {
        return (0, 0);
    }
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    )
}

/// basic.deliver: consumer-tag (short string), then the delivery tag.
fn delivery_tag(payload: &[u8]) -> u64 {
    let at = 5 + payload[4] as usize;
    payload
        .get(at..at + 8)
        .map_or(0, |t| u64::from_be_bytes(t.try_into().expect("8 bytes")))
}

/// The reply text of a connection.close / channel.close.
fn close_text(payload: &[u8]) -> String {
    let len = payload.get(6).copied().unwrap_or(0) as usize;
    payload
        .get(7..7 + len)
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default()
}

/// Warren's numbering of a message: its link's id and its number.
pub enum Numbering {
    /// In two headers, as Warren publishes.
    Headers(i64, i64),
    /// In the `message-id` property.
    MessageId(i64, i64),
}

/// `basic` property flags: a headers table follows; a message id follows.
const PROPERTY_HEADERS: u16 = 1 << 13;
const PROPERTY_MESSAGE_ID: u16 = 1 << 7;

/// A field table of Warren's two numbering headers, as signed 64-bit
/// integers (`l`), the types Warren's publisher uses.
fn put_numbering(buf: &mut BytesMut, publisher: i64, seq: i64) {
    let mut table = BytesMut::new();
    for (name, value) in [("x-warren-pub", publisher), ("x-warren-seq", seq)] {
        put_short(&mut table, name);
        table.put_u8(b'l');
        table.put_i64(value);
    }
    buf.put_u32(table.len() as u32);
    buf.put_slice(&table);
}

fn put_short(buf: &mut BytesMut, s: &str) {
    buf.put_u8(s.len() as u8);
    buf.put_slice(s.as_bytes());
}

fn put_frame(buf: &mut BytesMut, kind: u8, channel: u16, payload: &[u8]) {
    buf.put_u8(kind);
    buf.put_u16(channel);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    buf.put_u8(FRAME_END);
}

fn method_frame(channel: u16, (class, method): (u16, u16), args: &[u8]) -> BytesMut {
    let mut payload = BytesMut::with_capacity(4 + args.len());
    payload.put_u16(class);
    payload.put_u16(method);
    payload.put_slice(args);
    let mut frame = BytesMut::with_capacity(8 + payload.len());
    put_frame(&mut frame, FRAME_METHOD, channel, &payload);
    frame
}

/// What an `amqp://user:password@host:port/vhost` URL names (amqprs's own
/// parser leaves the vhost percent-encoded, so [`super::amqprs`] reads it
/// here too).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) user: String,
    pub(super) password: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) vhost: String,
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| anyhow!("{url}: only amqp:// URLs"))?;
        let (auth, rest) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
        let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
        let (address, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().context("the port")?),
            None => (address, 5672),
        };
        Ok(Self {
            user: percent_decode(user),
            password: percent_decode(password),
            host: host.to_string(),
            port,
            // An empty path is the default vhost.
            vhost: if vhost.is_empty() {
                "/".into()
            } else {
                percent_decode(vhost)
            },
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_headers_are_a_field_table_of_two_long_longs() {
        let mut buf = BytesMut::new();
        put_numbering(&mut buf, 7, -2);
        let mut expected = BytesMut::new();
        expected.put_u32(2 * (1 + 12 + 1 + 8));
        expected.put_slice(b"\x0cx-warren-publ");
        expected.put_i64(7);
        expected.put_slice(b"\x0cx-warren-seql");
        expected.put_i64(-2);
        assert_eq!(buf, expected);
    }

    #[test]
    fn reads_the_bench_url() {
        assert_eq!(
            Target::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap(),
            Target {
                user: "guest".into(),
                password: "guest".into(),
                host: "127.0.0.1".into(),
                port: 5672,
                vhost: "/".into()
            }
        );
    }

    #[test]
    fn splits_frames_and_waits_for_whole_ones() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, FRAME_BODY, 7, b"hello");
        put_frame(&mut buf, FRAME_BODY, 8, b"world");
        let whole = buf.len();
        buf.truncate(whole - 1); // the second frame's end has not arrived
        assert_eq!(
            next_frame(&mut buf),
            Some((FRAME_BODY, 7, Bytes::from_static(b"hello")))
        );
        assert_eq!(next_frame(&mut buf), None);
        buf.put_u8(FRAME_END);
        assert_eq!(
            next_frame(&mut buf),
            Some((FRAME_BODY, 8, Bytes::from_static(b"world")))
        );
    }

    #[test]
    fn reads_a_delivery_tag() {
        let mut args = BytesMut::new();
        put_short(&mut args, "ctag");
        args.put_u64(4242);
        args.put_u8(0);
        let frame = method_frame(1, BASIC_DELIVER, &args);
        let mut buf = BytesMut::from(&frame[..]);
        let (_, _, payload) = next_frame(&mut buf).unwrap();
        assert_eq!(method_id(&payload), BASIC_DELIVER);
        assert_eq!(delivery_tag(&payload), 4242);
    }
}
