//! The WebSocket handshake: everything that can refuse a client happens here,
//! before the upgrade, so a refusal is an HTTP status with a JSON body.
//!
//! Order: validate room and user → check Origin → claim the user id on this node
//! → subscribe on the bus (declare and bind the session's queue). Only then does
//! the socket upgrade, so the first frame the client reads (`welcome`) means it is
//! already subscribed.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use tracing::{Instrument, info, info_span, warn};

use warp::reply::{Reply, Response};
use warp::ws::{Message, Ws};

use crate::bus::BusError;
use crate::claims::RECONNECT_GRACE;
use crate::error::{ClientError, ErrorCode};
use crate::http::error_response;
use crate::names::{RoomName, UserId};
use crate::server::Node;
use crate::session::{self, Inbound, Member};

/// The query of `GET /ws`: `room` and `user`, both optional.
pub struct Handshake {
    pub room: RoomName,
    pub user: UserId,
}

impl Handshake {
    pub fn from_query(query: &HashMap<String, String>) -> Result<Self, ClientError> {
        let room = RoomName::parse_or_default(query.get("room").map(String::as_str))?;
        let user = match query.get("user") {
            Some(user) => UserId::parse(user)?,
            None => UserId::guest(),
        };
        Ok(Handshake { room, user })
    }
}

/// Is a WebSocket from `origin` allowed on a server reached as `host`? Requests
/// without an Origin (non-browser clients) are; a browser page is when it was
/// served by this same host, or its origin is listed (`*` lists every origin).
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    host.is_some_and(|host| host.eq_ignore_ascii_case(authority))
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Response {
    error_response(&ClientError::new(code, message))
}

/// `GET /ws`, with or without the upgrade headers. Without them it answers what an
/// upgrade would get: the refusal, or 426 when the upgrade would be accepted.
pub async fn handle(
    node: Arc<Node>,
    query: HashMap<String, String>,
    origin: Option<String>,
    host: Option<String>,
    ws: Option<Ws>,
) -> Result<Response, std::convert::Infallible> {
    let handshake = match Handshake::from_query(&query) {
        Ok(h) => h,
        Err(e) => return Ok(error_response(&e)),
    };
    if !origin_allowed(
        origin.as_deref(),
        host.as_deref(),
        &node.config.allowed_origins,
    ) {
        return Ok(refuse(
            ErrorCode::OriginNotAllowed,
            "this origin may not open a WebSocket here",
        ));
    }
    if node.shutdown.is_cancelled() || node.draining.is_cancelled() {
        return Ok(refuse(
            ErrorCode::Unavailable,
            "this node is shutting down; connect again to reach another",
        ));
    }
    if let Err(reason) = node.bus.readiness() {
        warn!(%reason, "refusing a session: bus not ready");
        return Ok(refuse(
            ErrorCode::Unavailable,
            "the message broker is unavailable; retry shortly",
        ));
    }
    let Some(ws) = ws else {
        return Ok(probe(&node, &handshake).await);
    };
    Ok(upgrade(node, handshake, ws).await)
}

async fn probe(node: &Node, handshake: &Handshake) -> Response {
    let taken = node.claims.is_claimed(&handshake.user) || {
        match node.bus.is_connected(&handshake.user).await {
            Ok(taken) => taken,
            Err(_) => {
                return refuse(
                    ErrorCode::Unavailable,
                    "the message broker is unavailable; retry shortly",
                );
            }
        }
    };
    if taken {
        return user_taken();
    }
    refuse(
        ErrorCode::UpgradeRequired,
        "this endpoint speaks WebSocket; the upgrade would be accepted",
    )
}

fn user_taken() -> Response {
    refuse(ErrorCode::UserTaken, "that user id is already connected")
}

async fn upgrade(node: Arc<Node>, handshake: Handshake, ws: Ws) -> Response {
    let Handshake { room, user } = handshake;
    let Some(claim) = node.claims.claim(&user, RECONNECT_GRACE).await else {
        return user_taken();
    };
    let subscription = match node.bus.subscribe(&room, &user).await {
        Ok(s) => s,
        Err(BusError::UserTaken) => return user_taken(),
        Err(BusError::NoRecipient) => unreachable!("subscribing publishes nothing"),
        Err(BusError::Unavailable(reason)) => {
            warn!(%reason, %user, "subscribe failed");
            return refuse(
                ErrorCode::Unavailable,
                "the message broker is unavailable; retry shortly",
            );
        }
    };
    // The session counts as a tracked task from here, so shutdown waits for it
    // even before warp runs the upgrade callback.
    let task = node.sessions.token();
    let max = node.config.max_frame_bytes;
    let span = info_span!("session", %user, %room);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            async move {
                let _task = task;
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
                let Member { room, user } = member;
                node.presence.leave(room.as_str(), user.as_str()).await;
                lease.release().await;
                drop(claim);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(None, Some("h:1"), &none));
        assert!(origin_allowed(Some("http://h:1"), Some("h:1"), &none));
        assert!(origin_allowed(Some("https://H:1/"), Some("h:1"), &none));
        assert!(!origin_allowed(Some("http://evil:1"), Some("h:1"), &none));
        assert!(!origin_allowed(Some("http://h:1"), None, &none));
        let listed = vec!["https://chat.example".to_string()];
        assert!(origin_allowed(
            Some("https://chat.example"),
            Some("h:1"),
            &listed
        ));
        assert!(!origin_allowed(
            Some("https://other.example"),
            Some("h:1"),
            &listed
        ));
        assert!(origin_allowed(
            Some("https://any"),
            Some("h:1"),
            &["*".to_string()]
        ));
    }

    #[test]
    fn handshake_defaults() {
        let h = Handshake::from_query(&HashMap::new()).unwrap();
        assert_eq!(h.room.as_str(), "lobby");
        assert!(h.user.as_str().starts_with("guest-"));
        let bad: HashMap<_, _> = [("room".to_string(), "a b".to_string())].into();
        assert_eq!(
            Handshake::from_query(&bad).err().unwrap().code,
            ErrorCode::InvalidRoom
        );
        let bad: HashMap<_, _> = [("user".to_string(), "".to_string())].into();
        assert_eq!(
            Handshake::from_query(&bad).err().unwrap().code,
            ErrorCode::InvalidUser
        );
    }
}
