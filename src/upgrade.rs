//! The WebSocket transport: `GET /ws`, admitted by [`crate::handshake`], then the
//! socket handed to [`crate::session`].
//!
//! warp answers the HTTP side, but the upgrade itself is done here: warp 0.4's
//! `ws()` leaves tungstenite's read buffer at 128 KiB per connection (resident,
//! and zero-filled before every read), which dominates an idle connection's
//! memory. We answer the 101 ourselves, take hyper's upgraded connection, and
//! build the WebSocket with a small read buffer ([`READ_BUFFER`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use futures_util::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::WebSocketStream;
use tracing::{Instrument, debug, info, info_span};
use tungstenite::Message;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::{Role, WebSocketConfig};
use warp::Filter;
use warp::http::StatusCode;
use warp::http::header::{CONNECTION, HeaderMap, HeaderValue, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use warp::reply::{Reply, Response};

use crate::error::{ClientError, ErrorCode};
use crate::handshake::{self, Admitted, Handshake};
use crate::http::error_response;
use crate::metrics::Transport;
use crate::server::Node;
use crate::session::{self, Inbound, Member, SessionEnd};

/// Bytes tungstenite reads from the socket at a time, and the buffer every
/// connection keeps resident for it. Chat frames are small (a 1 KiB read holds a
/// few; gorilla/websocket's chat example uses the same size); a larger frame just
/// takes more reads. At 128 KiB this was most of what an idle connection cost;
/// 4 → 1 KiB took 10,000 idle connections in one room from 22.1 to about 18 KiB
/// each (docs/BENCHMARKS.md).
pub const READ_BUFFER: usize = 1024;

/// A request that asks for a WebSocket, with what the upgrade needs.
pub struct UpgradeRequest {
    key: String,
    on_upgrade: OnUpgrade,
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

/// `GET /ws`, with or without the upgrade headers. Without them it answers what an
/// upgrade would get: the refusal, or 426 when the upgrade would be accepted.
pub async fn handle(
    node: Arc<Node>,
    query: HashMap<String, String>,
    origin: Option<String>,
    host: Option<String>,
    upgrade: Option<UpgradeRequest>,
) -> Result<Response, Infallible> {
    let request = match Handshake::from_query(&query) {
        Ok(h) => h,
        Err(e) => return Ok(error_response(&e)),
    };
    if let Err(refusal) = handshake::precheck(&node, origin.as_deref(), host.as_deref()) {
        return Ok(error_response(&refusal));
    }
    let Some(upgrade) = upgrade else {
        return Ok(error_response(
            &match handshake::probe(&node, &request).await {
                Err(refusal) => refusal,
                Ok(()) => ClientError::new(
                    ErrorCode::UpgradeRequired,
                    "this endpoint speaks WebSocket; the upgrade would be accepted",
                ),
            },
        ));
    };
    match handshake::admit(&node, request).await {
        Ok(admitted) => Ok(accept(node, admitted, upgrade)),
        Err(refusal) => Ok(error_response(&refusal)),
    }
}

/// Answer 101 and run the session on the upgraded connection.
fn accept(node: Arc<Node>, admitted: Admitted, upgrade: UpgradeRequest) -> Response {
    let UpgradeRequest { key, on_upgrade } = upgrade;
    let span =
        info_span!("session", transport = "ws", user = %admitted.user, room = %admitted.room);
    // Tracked from here, so shutdown waits for it even before the upgrade lands.
    let sessions = node.sessions.clone();
    sessions.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    // The client left between our 101 and its first byte.
                    debug!(error = %e, "upgrade did not complete");
                    let Admitted {
                        claim,
                        subscription,
                        ..
                    } = admitted;
                    subscription.lease.release().await;
                    drop(claim);
                    return;
                }
            };
            run(node, admitted, TokioIo::new(upgraded)).await;
        }
        .instrument(span),
    );
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

async fn run<S>(node: Arc<Node>, admitted: Admitted, mut io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Admitted {
        room,
        user,
        claim,
        subscription,
    } = admitted;
    let open = node.settings.metrics.connections(Transport::WebSocket);
    open.inc();
    info!("connected");
    let mut joined = node.presence.join(room.as_str(), user.as_str()).await;
    let member = Member { room, user };
    let welcome = session::welcome(&mut joined, &member, &node.settings);
    let (end, lease) = match write_welcome(&mut io, welcome).await {
        Err(e) => (SessionEnd::ClientGone(e.to_string()), subscription.lease),
        Ok(()) => {
            let max = node.config.max_frame_bytes;
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .max_message_size(Some(max))
                .max_frame_size(Some(max));
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            let (sink, stream) = socket.split();
            let inbound = stream.map(to_inbound);
            session::run(
                sink,
                inbound,
                subscription,
                joined,
                &member,
                &node.settings,
                &node.stop,
            )
            .await
        }
    };
    node.presence
        .leave(member.room.as_str(), member.user.as_str())
        .await;
    lease.release().await;
    drop(claim);
    open.dec();
    info!(?end, "disconnected");
}

/// Send `welcome` as one WebSocket text frame straight onto the upgraded
/// connection, before tungstenite owns it. tungstenite's write buffer keeps the
/// capacity of the largest message it ever sent, and in a large room `welcome`
/// (the member list) is by far the largest: written through tungstenite it would
/// stay resident, per connection, for the connection's life.
async fn write_welcome<S>(io: &mut S, welcome: String) -> std::io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let mut wire = Vec::with_capacity(welcome.len() + 10);
    Frame::message(welcome, OpCode::Data(Data::Text), true)
        .format(&mut wire)
        .map_err(std::io::Error::other)?;
    match tokio::time::timeout(session::WRITE_TIMEOUT, io.write_all(&wire)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "write timed out",
        )),
    }
}

fn to_inbound(item: Result<Message, tungstenite::Error>) -> Inbound {
    match item {
        Ok(Message::Text(text)) => Inbound::Text(text.as_str().to_owned()),
        Ok(Message::Binary(_)) => Inbound::Binary,
        Ok(Message::Close(_)) => Inbound::Close,
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Inbound::Control,
        Err(tungstenite::Error::Capacity(_)) => Inbound::TooLarge,
        Err(e) => Inbound::Failed(e.to_string()),
    }
}
