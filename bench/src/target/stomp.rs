//! The peer: RabbitMQ's Web-STOMP plugin, STOMP 1.2 over WebSocket.
//!
//! `SUBSCRIBE destination:/exchange/<room>` makes the plugin declare an exclusive,
//! auto-delete queue per subscription bound to that exchange: the same
//! queue-per-connection design as Warren. The plugin does not declare the
//! exchange itself, so the room declares it over AMQP first. Subscriptions use the
//! plugin's defaults (`ack:auto`), and `SEND` asks for no receipt: that is how a
//! browser client would use Web-STOMP.
//!
//! Enable the plugin with `rabbitmq-plugins enable rabbitmq_web_stomp`; it listens
//! on port 15674 at `/ws`.
//!
//! The plugin closes a WebSocket that has sent nothing for 60 s (its cowboy
//! `idle_timeout`), deliveries notwithstanding. At N = 200 a client sends its 100
//! messages in seconds and then only receives for minutes, so every client sends
//! STOMP heart-beats (`heart-beat:10000,0`, an EOL every 10 s), as a browser
//! client library does.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use lapin::{Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::ws::{SharedSink, Socket};
use super::{Client, Inbox as AnyInbox, Outbox as AnyOutbox};
use crate::payload;

/// How often a client sends a heart-beat; promised in CONNECT.
const HEART_BEAT: Duration = Duration::from_secs(10);

pub struct Room {
    /// Kept to delete the exchange at the end.
    amqp: Connection,
    url: String,
    exchange: String,
}

impl Room {
    pub async fn open(amqp_url: &str, stomp_url: &str, room: String) -> Result<Self> {
        let amqp = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {amqp_url}"))?;
        let exchange = format!("{room}.stomp");
        super::declare_room_exchange(&amqp, &exchange).await?;
        Ok(Self {
            amqp,
            url: stomp_url.to_string(),
            exchange,
        })
    }

    pub fn name(&self) -> &str {
        &self.exchange
    }

    pub async fn connect(&self, index: usize) -> Result<Client> {
        let mut request = self.url.as_str().into_client_request()?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("v12.stomp"),
        );
        // Nagle off, as for the Warren client, so both are measured alike.
        let (socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        let (mut sink, stream) = socket.split();
        let mut inbox = Inbox {
            stream,
            ready: VecDeque::new(),
        };
        sink.send(Message::text(
            "CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\nheart-beat:10000,0\n\n\0",
        ))
        .await?;
        inbox.expect("CONNECTED").await?;
        // The receipt says the queue is declared and bound: the client is subscribed.
        sink.send(Message::text(format!(
            "SUBSCRIBE\nid:0\ndestination:/exchange/{}\nreceipt:sub-{index}\n\n\0",
            self.exchange
        )))
        .await?;
        inbox.expect("RECEIPT").await?;
        let sink = SharedSink::new(sink);
        let heart_beat = tokio::spawn(beat(sink.clone()));
        Ok(Client {
            outbox: AnyOutbox::Stomp(Outbox {
                sink,
                heart_beat,
                destination: format!("/exchange/{}", self.exchange),
            }),
            inbox: AnyInbox::Stomp(inbox),
        })
    }

    pub async fn close(self) {
        super::delete_room_exchange(&self.amqp, &self.exchange).await;
        let _ = self.amqp.close(200, "bench done".into()).await;
    }
}

/// Send a STOMP heart-beat (an EOL) every [`HEART_BEAT`] until the socket fails.
async fn beat(sink: SharedSink) {
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + HEART_BEAT, HEART_BEAT);
    loop {
        every.tick().await;
        if sink.send(Message::text("\n"), true).await.is_err() {
            return;
        }
    }
}

pub struct Outbox {
    sink: SharedSink,
    heart_beat: JoinHandle<()>,
    destination: String,
}

impl Outbox {
    pub async fn send(
        &mut self,
        room: &str,
        sender: usize,
        seq: u32,
        text: &str,
        flush: bool,
    ) -> Result<()> {
        let body = payload::broker_document(room, sender, seq, text);
        let frame = Message::text(format!(
            "SEND\ndestination:{}\ncontent-type:application/json\ncontent-length:{}\n\n{body}\0",
            self.destination,
            body.len()
        ));
        self.sink.send(frame, flush).await
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.sink.flush().await
    }

    pub async fn close(self) {
        self.heart_beat.abort();
        self.sink
            .close(Some(Message::text("DISCONNECT\n\n\0")))
            .await;
    }
}

pub struct Inbox {
    stream: SplitStream<Socket>,
    /// Bodies of MESSAGE frames already read but not yet handed out (one WebSocket
    /// message may carry several STOMP frames).
    ready: VecDeque<Bytes>,
}

/// One STOMP frame: its command and body.
struct Frame {
    command: Bytes,
    body: Bytes,
}

impl Inbox {
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            if let Some(body) = self.ready.pop_front() {
                return Some(Ok(body));
            }
            let frames = match self.read().await? {
                Ok(frames) => frames,
                Err(e) => return Some(Err(e)),
            };
            for frame in frames {
                match &frame.command[..] {
                    b"MESSAGE" => self.ready.push_back(frame.body),
                    b"ERROR" => {
                        return Some(Err(anyhow::anyhow!(
                            "STOMP error: {}",
                            String::from_utf8_lossy(&frame.body)
                        )));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Wait for a frame with `command`, failing on anything else that matters.
    async fn expect(&mut self, command: &str) -> Result<()> {
        loop {
            let Some(frames) = self.read().await else {
                bail!("Web-STOMP closed the connection before {command}");
            };
            for frame in frames? {
                if &frame.command[..] == command.as_bytes() {
                    return Ok(());
                }
                if &frame.command[..] == b"ERROR" {
                    bail!("STOMP error: {}", String::from_utf8_lossy(&frame.body));
                }
            }
        }
    }

    async fn read(&mut self) -> Option<Result<Vec<Frame>>> {
        loop {
            match self.stream.next().await? {
                Ok(Message::Text(text)) => return Some(Ok(parse_frames(Bytes::from(text)))),
                Ok(Message::Binary(data)) => return Some(Ok(parse_frames(data))),
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

/// Split a WebSocket message into STOMP frames: `COMMAND\nheaders\n\nbody\0`,
/// possibly preceded by heart-beat newlines. Our bodies never contain NUL, so the
/// NUL terminator is enough to find a frame's end.
fn parse_frames(data: Bytes) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let start = rest
            .iter()
            .position(|b| *b != b'\n' && *b != b'\r')
            .unwrap_or(rest.len());
        let _ = rest.split_to(start);
        if rest.is_empty() {
            break;
        }
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        let frame = rest.split_to(end);
        if !rest.is_empty() {
            let _ = rest.split_to(1);
        }
        let command_end = frame
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or(frame.len());
        let body_start = frame
            .windows(2)
            .position(|w| w == b"\n\n")
            .map_or(frame.len(), |p| p + 2);
        frames.push(Frame {
            command: frame.slice(..command_end),
            body: frame.slice(body_start..),
        });
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_on_nul() {
        let frames = parse_frames(Bytes::from_static(
            b"\nMESSAGE\ndestination:/x\n\n{\"a\":1}\0RECEIPT\nreceipt-id:r\n\n\0",
        ));
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[0].command[..], b"MESSAGE");
        assert_eq!(&frames[0].body[..], b"{\"a\":1}");
        assert_eq!(&frames[1].command[..], b"RECEIPT");
        assert!(frames[1].body.is_empty());
    }
}
