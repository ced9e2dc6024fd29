//! The WebSocket sending half that the WebSocket targets (Warren, Web-STOMP,
//! Socket.IO) share between a client's sender task and its receiver, which
//! also writes: acks, pongs, heart-beats.

use std::sync::Arc;

use anyhow::Result;
use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One socket's sink, shared. A tokio Mutex, because it is held across the
/// write's await.
#[derive(Clone)]
pub struct SharedSink(Arc<Mutex<SplitSink<Socket, Message>>>);

impl SharedSink {
    pub fn new(sink: SplitSink<Socket, Message>) -> Self {
        Self(Arc::new(Mutex::new(sink)))
    }

    /// Send `frame`; with `flush` false it may wait in the buffer for the next
    /// flush.
    pub async fn send(&self, frame: Message, flush: bool) -> Result<()> {
        let mut sink = self.0.lock().await;
        if flush {
            sink.send(frame).await?;
        } else {
            sink.feed(frame).await?;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<()> {
        Ok(self.0.lock().await.flush().await?)
    }

    /// Send `goodbye` if any, then close; errors are irrelevant by now.
    pub async fn close(&self, goodbye: Option<Message>) {
        let mut sink = self.0.lock().await;
        if let Some(goodbye) = goodbye {
            let _ = sink.send(goodbye).await;
        }
        let _ = sink.close().await;
    }
}
