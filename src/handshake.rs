//! Admission: everything that can refuse a new session, for every transport.
//!
//! A WebSocket upgrade and a Server-Sent Events stream are admitted the same way,
//! before any byte of the stream is sent, so a refusal is an HTTP status with a
//! JSON body: validate room and user → check Origin → check the node is ready →
//! claim the user id on this node → subscribe on the bus (declare and bind the
//! session's queue). The first event the client then reads (`welcome`) means it is
//! already subscribed.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::warn;

use crate::bus::{BusError, Subscription};
use crate::claims::{Claim, RECONNECT_GRACE};
use crate::error::{ClientError, ErrorCode};
use crate::names::{RoomName, UserId};
use crate::server::Node;

/// Who asks to join which room.
pub struct Handshake {
    pub room: RoomName,
    pub user: UserId,
}

impl Handshake {
    /// From `?room=&user=`; both optional (the lobby; a `guest-<random>` id).
    pub fn from_query(query: &HashMap<String, String>) -> Result<Self, ClientError> {
        Self::new(
            query.get("room").map(String::as_str),
            query.get("user").map(String::as_str),
        )
    }

    pub fn new(room: Option<&str>, user: Option<&str>) -> Result<Self, ClientError> {
        let room = RoomName::parse_or_default(room)?;
        let user = match user {
            Some(user) => UserId::parse(user)?,
            None => UserId::guest(),
        };
        Ok(Handshake { room, user })
    }
}

/// A session that may start: its user id is held and its queue is bound.
pub struct Admitted {
    pub room: RoomName,
    pub user: UserId,
    pub claim: Claim,
    pub subscription: Subscription,
}

/// Is a session from `origin` allowed on a server reached as `host`? Requests
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

fn refuse(code: ErrorCode, message: impl Into<String>) -> ClientError {
    ClientError::new(code, message)
}

fn unavailable() -> ClientError {
    refuse(
        ErrorCode::Unavailable,
        "the message broker is unavailable; retry shortly",
    )
}

fn user_taken() -> ClientError {
    refuse(ErrorCode::UserTaken, "that user id is already connected")
}

/// The checks that need no claim and no broker round trip.
pub fn precheck(node: &Node, origin: Option<&str>, host: Option<&str>) -> Result<(), ClientError> {
    if !origin_allowed(origin, host, &node.config.allowed_origins) {
        return Err(refuse(
            ErrorCode::OriginNotAllowed,
            "this origin may not open a session here",
        ));
    }
    if node.shutdown.is_cancelled() || node.draining.is_cancelled() {
        return Err(refuse(
            ErrorCode::Unavailable,
            "this node is shutting down; connect again to reach another",
        ));
    }
    if let Err(reason) = node.bus.readiness() {
        warn!(%reason, "refusing a session: bus not ready");
        return Err(unavailable());
    }
    Ok(())
}

/// Claim the user id and subscribe. Call after [`precheck`].
pub async fn admit(node: &Arc<Node>, handshake: Handshake) -> Result<Admitted, ClientError> {
    let Handshake { room, user } = handshake;
    let Some(claim) = node.claims.claim(&user, RECONNECT_GRACE).await else {
        return Err(user_taken());
    };
    match node.bus.subscribe(&room, &user).await {
        Ok(subscription) => Ok(Admitted {
            room,
            user,
            claim,
            subscription,
        }),
        Err(BusError::UserTaken) => Err(user_taken()),
        Err(BusError::NoRecipient) => unreachable!("subscribing publishes nothing"),
        Err(BusError::Unavailable(reason)) => {
            warn!(%reason, %user, "subscribe failed");
            Err(unavailable())
        }
    }
}

/// What admission would answer, without subscribing: for a plain GET of a
/// session endpoint, since browsers cannot read a refused upgrade's status.
/// `Ok` means the session would be admitted.
pub async fn probe(node: &Node, handshake: &Handshake) -> Result<(), ClientError> {
    if is_held(node, &handshake.user).await? {
        return Err(user_taken());
    }
    Ok(())
}

/// Does a session anywhere hold `user`? This node's claims first (no broker
/// round trip), then the broker's exclusive queues.
pub async fn is_held(node: &Node, user: &UserId) -> Result<bool, ClientError> {
    if node.claims.is_claimed(user) {
        return Ok(true);
    }
    node.bus.is_connected(user).await.map_err(|_| unavailable())
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
