//! A Warren client: `ws://…/ws?room=&user=` (or `&token=` for a Warren that
//! requires tokens), subscribed once `welcome` arrives.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Client, Inbox as AnyInbox, Outbox as AnyOutbox};
use crate::payload;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

pub async fn connect(url: &str, room: &str, user: &str, token: Option<&str>) -> Result<Client> {
    let url = match token {
        Some(token) => format!("{url}?room={room}&token={token}"),
        None => format!("{url}?room={room}&user={user}"),
    };
    // Nagle off, as the server does: latency is what is measured.
    let (socket, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let (sink, mut stream) = socket.split();
    // The first frame is `welcome`: from then on the session's queue is bound.
    match stream.next().await {
        Some(Ok(Message::Text(text))) if text.as_str().contains(r#""type":"welcome""#) => {}
        Some(Ok(other)) => bail!("expected welcome from {url}, got {other:?}"),
        Some(Err(e)) => return Err(e).with_context(|| format!("waiting for welcome from {url}")),
        None => bail!("{url} closed before welcome"),
    }
    Ok(Client {
        outbox: AnyOutbox::Warren(Outbox { sink }),
        inbox: AnyInbox::Warren(Inbox { stream }),
    })
}

pub struct Outbox {
    sink: SplitSink<Socket, Message>,
}

impl Outbox {
    pub async fn send(&mut self, text: &str, flush: bool) -> Result<()> {
        let frame = Message::text(payload::warren_client_frame(text));
        if flush {
            self.sink.send(frame).await?;
        } else {
            self.sink.feed(frame).await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        Ok(self.sink.flush().await?)
    }

    pub async fn close(mut self) {
        let _ = self.sink.close().await;
    }
}

pub struct Inbox {
    stream: SplitStream<Socket>,
}

impl Inbox {
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            // Pings are answered by tungstenite while we read.
            match self.stream.next().await? {
                Ok(Message::Text(text)) => return Some(Ok(Bytes::from(text))),
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}
