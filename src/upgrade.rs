//! The WebSocket transport: `GET /ws`, admitted by [`crate::handshake`], then the
//! socket handed to [`crate::session`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use futures_util::StreamExt;
use tracing::{Instrument, info, info_span};
use warp::reply::{Reply, Response};
use warp::ws::{Message, Ws};

use crate::error::{ClientError, ErrorCode};
use crate::handshake::{self, Admitted, Handshake};
use crate::http::error_response;
use crate::metrics::Transport;
use crate::server::Node;
use crate::session::{self, Inbound, Member};

/// `GET /ws`, with or without the upgrade headers. Without them it answers what an
/// upgrade would get: the refusal, or 426 when the upgrade would be accepted.
pub async fn handle(
    node: Arc<Node>,
    query: HashMap<String, String>,
    origin: Option<String>,
    host: Option<String>,
    ws: Option<Ws>,
) -> Result<Response, Infallible> {
    let request = match Handshake::from_query(&query) {
        Ok(h) => h,
        Err(e) => return Ok(error_response(&e)),
    };
    if let Err(refusal) = handshake::precheck(&node, origin.as_deref(), host.as_deref()) {
        return Ok(error_response(&refusal));
    }
    let Some(ws) = ws else {
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
        Ok(admitted) => Ok(upgrade(node, admitted, ws)),
        Err(refusal) => Ok(error_response(&refusal)),
    }
}

fn upgrade(node: Arc<Node>, admitted: Admitted, ws: Ws) -> Response {
    let Admitted {
        room,
        user,
        claim,
        subscription,
    } = admitted;
    // The session counts as a tracked task from here, so shutdown waits for it
    // even before warp runs the upgrade callback.
    let task = node.sessions.token();
    let max = node.config.max_frame_bytes;
    let span = info_span!("session", transport = "ws", %user, %room);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            async move {
                let _task = task;
                let open = node.settings.metrics.connections(Transport::WebSocket);
                open.inc();
                info!("connected");
                let (sink, stream) = socket.split();
                let inbound = stream.map(to_inbound);
                let joined = node.presence.join(room.as_str(), user.as_str()).await;
                let member = Member { room, user };
                let (end, lease) = session::run(
                    sink,
                    inbound,
                    subscription,
                    joined,
                    &member,
                    &node.settings,
                    &node.stop,
                )
                .await;
                node.presence
                    .leave(member.room.as_str(), member.user.as_str())
                    .await;
                lease.release().await;
                drop(claim);
                open.dec();
                info!(?end, "disconnected");
            }
            .instrument(span)
        })
        .into_response()
}

fn to_inbound(item: Result<Message, warp::Error>) -> Inbound {
    match item {
        Ok(m) if m.is_text() => Inbound::Text(m.to_str().unwrap_or_default().to_owned()),
        Ok(m) if m.is_binary() => Inbound::Binary,
        Ok(m) if m.is_close() => Inbound::Close,
        Ok(_) => Inbound::Control,
        Err(e) if is_capacity_error(&e) => Inbound::TooLarge,
        Err(e) => Inbound::Failed(e.to_string()),
    }
}

fn is_capacity_error(e: &warp::Error) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}
