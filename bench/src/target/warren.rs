//! A Warren client: `ws://…/ws?room=&user=` (or `&token=` for a Warren that
//! requires tokens), subscribed once `welcome` arrives.
//!
//! With `--acks client` it connects with `&acks=client` and acknowledges as
//! clients/js does: `{"type":"ack_upto","seq":n}` once a quarter of the
//! `ack_window` (64 of 256) is unacknowledged, or 100 ms after the oldest
//! unacknowledged delivery arrived. The inbox sends those on the socket the
//! outbox publishes on, so the two share the sink.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::ws::{SharedSink, Socket};
use super::{Client, Inbox as AnyInbox, Outbox as AnyOutbox};
use crate::cli::WarrenAcks;
use crate::payload;

/// The `ack_window` a server that does not say one gets (Warren's `ACK_WINDOW`).
const DEFAULT_ACK_WINDOW: u64 = 256;
/// clients/js's `ackDelayMs`.
const ACK_DELAY: Duration = Duration::from_millis(100);

/// A day-long HS256 token for `user`, for a Warren that requires tokens.
pub fn token(secret: &str, user: &str) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 86_400;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims { sub: user, exp },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing does not fail")
}

pub async fn connect(
    url: &str,
    room: &str,
    user: &str,
    token: Option<&str>,
    acks: WarrenAcks,
) -> Result<Client> {
    let mut url = match token {
        Some(token) => format!("{url}?room={room}&token={token}"),
        None => format!("{url}?room={room}&user={user}"),
    };
    if acks == WarrenAcks::Client {
        url.push_str("&acks=client");
    }
    // Nagle off, as the server does: latency is what is measured.
    let (socket, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let (sink, mut stream) = socket.split();
    // The first frame is `welcome`: from then on the session's queue is bound.
    let welcome = match stream.next().await {
        Some(Ok(Message::Text(text))) if text.as_str().contains(r#""type":"welcome""#) => text,
        Some(Ok(other)) => bail!("expected welcome from {url}, got {other:?}"),
        Some(Err(e)) => return Err(e).with_context(|| format!("waiting for welcome from {url}")),
        None => bail!("{url} closed before welcome"),
    };
    let acking = match acks {
        WarrenAcks::None => None,
        WarrenAcks::Client => {
            let window = serde_json::from_str::<serde_json::Value>(welcome.as_str())
                .ok()
                .and_then(|w| w.get("ack_window")?.as_u64())
                .unwrap_or(DEFAULT_ACK_WINDOW);
            Some(Acking {
                every: (window / 4).max(1),
                received: 0,
                acked: 0,
                since: None,
            })
        }
    };
    let sink = SharedSink::new(sink);
    Ok(Client {
        outbox: AnyOutbox::Warren(Outbox { sink: sink.clone() }),
        inbox: AnyInbox::Warren(Inbox {
            stream,
            sink,
            acking,
        }),
    })
}

pub struct Outbox {
    sink: SharedSink,
}

impl Outbox {
    pub async fn send(&mut self, text: &str, flush: bool) -> Result<()> {
        let frame = Message::text(payload::warren_client_frame(text));
        self.sink.send(frame, flush).await
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.sink.flush().await
    }

    pub async fn close(self) {
        self.sink.close(None).await;
    }
}

/// Where a client with `acks=client` stands.
struct Acking {
    /// Acknowledge once this many deliveries are unacknowledged.
    every: u64,
    /// The highest `seq` received.
    received: u64,
    /// The highest `seq` acknowledged.
    acked: u64,
    /// When the oldest unacknowledged delivery arrived.
    since: Option<Instant>,
}

pub struct Inbox {
    stream: SplitStream<Socket>,
    sink: SharedSink,
    acking: Option<Acking>,
}

impl Inbox {
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            let since = self.acking.as_ref().and_then(|a| a.since);
            let ack_due = async move {
                match since {
                    Some(since) => tokio::time::sleep_until(since + ACK_DELAY).await,
                    None => std::future::pending().await,
                }
            };
            // Pings are answered by tungstenite while we read.
            let next = tokio::select! {
                next = self.stream.next() => next?,
                () = ack_due => {
                    if let Err(e) = self.ack().await {
                        return Some(Err(e));
                    }
                    continue;
                }
            };
            match next {
                Ok(Message::Text(text)) => {
                    if let Some(acking) = self.acking.as_mut()
                        && let Some(seq) = payload::delivery_seq(text.as_bytes())
                    {
                        acking.received = acking.received.max(seq);
                        acking.since.get_or_insert_with(Instant::now);
                        if acking.received - acking.acked >= acking.every
                            && let Err(e) = self.ack().await
                        {
                            return Some(Err(e));
                        }
                    }
                    return Some(Ok(Bytes::from(text)));
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(e) => return Some(Err(e.into())),
            }
        }
    }

    /// `ack_upto` everything received so far.
    async fn ack(&mut self) -> Result<()> {
        let Some(acking) = self.acking.as_mut() else {
            return Ok(());
        };
        acking.since = None;
        if acking.received <= acking.acked {
            return Ok(());
        }
        acking.acked = acking.received;
        let frame = Message::text(payload::warren_ack_frame(acking.received));
        self.sink.send(frame, true).await
    }
}
