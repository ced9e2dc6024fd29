//! The WebSocket transport: `GET /ws`, admitted by [`crate::handshake`], then the
//! socket handed to [`crate::session::serve`] as a [`WebSocket`] transport.
//!
//! warp answers the HTTP side, but the upgrade itself is done here: warp 0.4's
//! `ws()` leaves tungstenite's read buffer at 128 KiB per connection (resident,
//! and zero-filled before every read), which dominates an idle connection's
//! memory. We answer the 101 ourselves, take hyper's upgraded connection, and
//! build the WebSocket with a small read buffer ([`READ_BUFFER`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tracing::{Instrument, debug, info_span};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};
use warp::Filter;
use warp::http::StatusCode;
use warp::http::header::{CONNECTION, HeaderMap, HeaderValue, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use warp::reply::{Reply, Response};

use crate::error::{ClientError, ErrorCode};
use crate::handshake::{self, Admitted, Handshake};
use crate::metrics;
use crate::node::Node;
use crate::session::{self, Inbound, SessionEnd, Transport, TransportError, WRITE_TIMEOUT};

/// Bytes tungstenite reads from the socket at a time, and the buffer every
/// connection keeps resident for it. Chat frames are small (a 1 KiB read holds a
/// few; gorilla/websocket's chat example uses the same size); a larger frame just
/// takes more reads. At 128 KiB this was most of what an idle connection cost;
/// 4 → 1 KiB took 10,000 idle connections in one room from 22.1 to about 18 KiB
/// each (docs/BENCHMARKS.md).
pub const READ_BUFFER: usize = 1024;

/// A request that asks for a WebSocket, with what the upgrade needs.
pub struct UpgradeRequest {
    pub key: String,
    pub on_upgrade: OnUpgrade,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `Some` when the request is a valid WebSocket upgrade (RFC 6455 §4.2.1),
/// `None` for a plain request.
pub fn upgrade_request()
-> impl Filter<Extract = (Option<UpgradeRequest>,), Error = Infallible> + Clone {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<OnUpgrade>())
        .map(|headers: HeaderMap, on_upgrade: Option<OnUpgrade>| {
            let connection_upgrade = header(&headers, "connection").is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            });
            let websocket =
                header(&headers, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
            let version_13 = header(&headers, "sec-websocket-version") == Some("13");
            let key = header(&headers, "sec-websocket-key").map(str::to_owned);
            match (
                connection_upgrade && websocket && version_13,
                key,
                on_upgrade,
            ) {
                (true, Some(key), Some(on_upgrade)) => Some(UpgradeRequest { key, on_upgrade }),
                _ => None,
            }
        })
}

/// How long the closing handshake may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /ws`, with or without the upgrade headers. Without them it answers what an
/// upgrade would get: the refusal, or 426 when the upgrade would be accepted.
pub async fn handle(
    node: Arc<Node>,
    query: HashMap<String, String>,
    origin: Option<String>,
    host: Option<String>,
    client: Option<std::net::IpAddr>,
    upgrade: Option<UpgradeRequest>,
) -> Response {
    let admitted = async {
        let mut request = Handshake::from_query(&query)?;
        request.client = client;
        handshake::precheck(&node, origin.as_deref(), host.as_deref())?;
        let Some(upgrade) = upgrade else {
            handshake::probe(&node, &request).await?;
            return Err(ClientError::new(
                ErrorCode::UpgradeRequired,
                "this endpoint speaks WebSocket; the upgrade would be accepted",
            ));
        };
        Ok((handshake::admit(&node, request).await?, upgrade))
    };
    match admitted.await {
        Ok((admitted, upgrade)) => accept(node, admitted, upgrade),
        Err(refusal) => refusal.into_response(),
    }
}

/// Answer 101 and run the session on the upgraded connection.
fn accept(node: Arc<Node>, admitted: Admitted, upgrade: UpgradeRequest) -> Response {
    let UpgradeRequest { key, on_upgrade } = upgrade;
    let span = info_span!(
        "session",
        transport = "ws",
        user = %admitted.identity.user,
        session = %admitted.identity.session
    );
    // Boxed: the task keeps what it captured for its whole life, and `serve`
    // takes `admitted` apart into its own state; inline, it would be held twice.
    let admitted = Box::new(admitted);
    // Tracked from here, so shutdown waits for it even before the upgrade lands.
    let sessions = node.sessions.clone();
    let session = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let max = node.config.max_frame_bytes;
                let io = TokioIo::new(upgraded);
                session::serve(node, *admitted, |welcome| open(io, welcome, max)).await;
            }
            Err(e) => {
                // The client left between our 101 and its first byte.
                debug!(error = %e, "upgrade did not complete");
                admitted.abandon().await;
            }
        }
    }
    .instrument(span);
    sessions.spawn(session);
    switching_protocols(&key)
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade with `key`.
pub fn switching_protocols(key: &str) -> Response {
    let mut response =
        warp::reply::with_status(warp::reply(), StatusCode::SWITCHING_PROTOCOLS).into_response();
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(key.as_bytes());
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    response
}

pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// An upgraded connection as a server-side WebSocket with Warren's buffers and
/// limits.
pub async fn server_socket(io: TokioIo<Upgraded>, max_frame_bytes: usize) -> Socket {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes));
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
}

/// Write `welcome`, then wrap the connection as a WebSocket with Warren's
/// buffers and limits.
async fn open(
    mut io: TokioIo<Upgraded>,
    welcome: String,
    max_frame_bytes: usize,
) -> Result<(WebSocket, impl futures_util::Stream<Item = Inbound> + Unpin), TransportError> {
    write_welcome(&mut io, welcome).await?;
    let socket = server_socket(io, max_frame_bytes).await;
    let (sink, stream): (SplitSink<Socket, Message>, SplitStream<Socket>) = socket.split();
    Ok((WebSocket { sink }, stream.map(to_inbound)))
}

/// Send `welcome` as one WebSocket text frame straight onto the upgraded
/// connection, before tungstenite owns it. tungstenite's write buffer keeps the
/// capacity of the largest message it ever sent, and in a large room `welcome`
/// (the member list) is by far the largest: written through tungstenite it would
/// stay resident, per connection, for the connection's life.
async fn write_welcome<S>(io: &mut S, welcome: String) -> Result<(), TransportError>
where
    S: AsyncWrite + Unpin,
{
    let mut wire = Vec::with_capacity(welcome.len() + 10);
    Frame::message(welcome, OpCode::Data(Data::Text), true)
        .format(&mut wire)
        .map_err(|e| TransportError::Failed(e.to_string()))?;
    match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(&wire)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(TransportError::Failed(e.to_string())),
        Err(_) => Err(TransportError::Failed("write timed out".into())),
    }
}

fn to_inbound(item: Result<Message, tungstenite::Error>) -> Inbound {
    match item {
        Ok(Message::Text(text)) => Inbound::Text(text.as_str().to_owned()),
        Ok(Message::Binary(_)) => Inbound::Binary,
        Ok(Message::Close(_)) => Inbound::Close,
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Inbound::Control,
        Err(tungstenite::Error::Capacity(_)) => Inbound::TooLarge,
        Err(tungstenite::Error::Utf8(_)) => Inbound::InvalidUtf8,
        // The connection ended without a close frame (a proxy in front passes
        // a client's reset on as an EOF): the network's doing, not the
        // client's, and the session may be resumed.
        Err(tungstenite::Error::Protocol(
            e @ tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        )) => Inbound::Failed(e.to_string()),
        Err(tungstenite::Error::Protocol(e)) => Inbound::ProtocolError(e.to_string()),
        Err(e) => Inbound::Failed(e.to_string()),
    }
}

/// The outgoing half of a session's WebSocket.
pub struct WebSocket {
    sink: SplitSink<Socket, Message>,
}

fn failed(e: tungstenite::Error) -> TransportError {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            TransportError::Closed
        }
        e => TransportError::Failed(e.to_string()),
    }
}

impl Transport for WebSocket {
    const KIND: metrics::Transport = metrics::Transport::WebSocket;
    const PINGS: bool = true;
    const RESUMABLE: bool = true;

    async fn send(&mut self, frames: Vec<Utf8Bytes>) -> Result<(), TransportError> {
        let mut messages =
            futures_util::stream::iter(frames.into_iter().map(|f| Ok(Message::Text(f))));
        self.sink.send_all(&mut messages).await.map_err(failed)
    }

    async fn ping(&mut self) -> Result<(), TransportError> {
        self.sink
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(failed)
    }

    async fn close(&mut self, end: &SessionEnd) {
        if let Some((code, reason)) = end.close_frame() {
            let frame = Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            }));
            let _ = tokio::time::timeout(WRITE_TIMEOUT, self.sink.send(frame)).await;
        }
        // A client that stopped reading would hold `close` forever: bound it.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.close()).await;
    }
}
