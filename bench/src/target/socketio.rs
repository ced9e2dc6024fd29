//! The peer users compare Warren with: Socket.IO 4 with the Redis adapter
//! (`bench/peers/socketio`), one or more nodes.
//!
//! The client speaks the wire format itself over a plain WebSocket, which is all
//! the websocket-only transport needs (Engine.IO v4, Socket.IO v5):
//!
//! - `ws://host:port/socket.io/?EIO=4&transport=websocket`; the server opens with
//!   `0{"sid":..}` (Engine.IO open);
//! - the client connects to the main namespace with `40{"room":..,"user":..}`
//!   (its `auth`); the peer joins the socket to that room before it answers
//!   `40{"sid":..}`, so that answer is the subscription, like Warren's `welcome`;
//! - `42["message","<text>"]` publishes; the peer broadcasts to the whole room,
//!   the sender included as Warren does, the document Warren sends
//!   (`{"type":"message","id","room","from","text","ts"}`) as the event's
//!   argument: `42["message",{..}]`;
//! - the server pings with `2`; the client answers `3`.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::ws::{SharedSink, Socket};
use super::{Client, Inbox as AnyInbox, Outbox as AnyOutbox};

/// What comes before the document in a `message` event.
const EVENT_HEAD: &str = r#"42["message","#;

pub struct Room {
    urls: Vec<String>,
    room: String,
}

impl Room {
    pub fn new(urls: &[String], room: String) -> Self {
        Self {
            urls: urls.to_vec(),
            room,
        }
    }

    pub fn name(&self) -> &str {
        &self.room
    }

    pub async fn connect(&self, index: usize) -> Result<Client> {
        let base = self.urls[index % self.urls.len()].trim_end_matches('/');
        let url = format!("{base}/socket.io/?EIO=4&transport=websocket");
        // Nagle off, as for the other WebSocket clients.
        let (socket, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let (mut sink, mut stream) = socket.split();
        expect(&mut stream, "0", &url).await?;
        let auth = serde_json::json!({ "room": self.room, "user": format!("u{index}") });
        sink.send(Message::text(format!("40{auth}"))).await?;
        expect(&mut stream, "40", &url).await?;
        let sink = SharedSink::new(sink);
        Ok(Client {
            outbox: AnyOutbox::Socketio(Outbox { sink: sink.clone() }),
            inbox: AnyInbox::Socketio(Inbox { stream, sink }),
        })
    }
}

/// Wait for a text frame starting with `head`.
async fn expect(stream: &mut SplitStream<Socket>, head: &str, url: &str) -> Result<()> {
    match stream.next().await {
        Some(Ok(Message::Text(text))) if text.as_str().starts_with(head) => Ok(()),
        Some(Ok(other)) => bail!("expected {head}… from {url}, got {other:?}"),
        Some(Err(e)) => Err(e).with_context(|| format!("waiting for {head}… from {url}")),
        None => bail!("{url} closed before {head}…"),
    }
}

/// `42["message","<text>"]`.
fn event_frame(text: &str) -> String {
    let text = serde_json::to_string(text).expect("a string serializes");
    format!("{EVENT_HEAD}{text}]")
}

/// The document inside a `message` event, or `None` for any other packet.
fn event_document(frame: &str) -> Option<&str> {
    frame.strip_prefix(EVENT_HEAD)?.strip_suffix(']')
}

pub struct Outbox {
    sink: SharedSink,
}

impl Outbox {
    pub async fn send(&mut self, text: &str, flush: bool) -> Result<()> {
        self.sink
            .send(Message::text(event_frame(text)), flush)
            .await
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.sink.flush().await
    }

    pub async fn close(self) {
        self.sink.close(None).await;
    }
}

pub struct Inbox {
    stream: SplitStream<Socket>,
    /// For answering the server's pings.
    sink: SharedSink,
}

impl Inbox {
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            match self.stream.next().await? {
                Ok(Message::Text(text)) => {
                    if let Some(document) = event_document(text.as_str()) {
                        // The document's place in the frame, to slice without a copy.
                        let start = EVENT_HEAD.len();
                        let end = start + document.len();
                        return Some(Ok(Bytes::from(text).slice(start..end)));
                    }
                    // Engine.IO ping: a node closes a client that does not pong
                    // within pingTimeout.
                    if text.as_str() == "2"
                        && let Err(e) = self.sink.send(Message::text("3"), true).await
                    {
                        return Some(Err(e));
                    }
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{self, Received, Stamp};

    #[test]
    fn an_event_reads_back_as_a_delivery() {
        let text = payload::text(4, 2, 99, 64);
        let sent = event_frame(&text);
        assert!(sent.starts_with(r#"42["message","4:2:99:"#));
        let document = payload::broker_document("room", 4, 2, &text);
        let received = format!("{EVENT_HEAD}{document}]");
        let inner = event_document(&received).expect("a message event");
        assert_eq!(
            payload::parse(inner.as_bytes()),
            Received::Message(Stamp {
                sender: 4,
                seq: 2,
                sent_us: 99
            })
        );
        assert_eq!(event_document("2"), None);
        assert_eq!(event_document(r#"42["other",1]"#), None);
    }
}
