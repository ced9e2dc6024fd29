//! Admission: everything that can refuse a new session, for every transport.
//!
//! A WebSocket upgrade and a Server-Sent Events stream are admitted the same way,
//! before any byte of the stream is sent, so a refusal is an HTTP status with a
//! JSON body: validate room and user → check Origin → check the node is ready →
//! claim the user id on this node → subscribe on the bus (declare and bind the
//! session's queue, bounded by [`crate::bus::BROKER_TIMEOUT`]). The first event
//! the client then reads (`welcome`) means it is already subscribed.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::warn;

use crate::bus::{BusError, Subscription};
use crate::claims::{Claim, RECONNECT_GRACE};
use crate::error::{ClientError, ErrorCode};
use crate::names::{RoomName, UserId};
use crate::node::Node;

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

/// Who a session is and where.
pub struct Member {
    pub room: RoomName,
    pub user: UserId,
}

/// A session that may start: its user id is held and its queue is bound.
pub struct Admitted {
    pub member: Member,
    pub claim: Claim,
    pub subscription: Subscription,
}

impl Admitted {
    /// Give the place back when the session never started (the client left
    /// between the 101 and the upgrade): delete the queue, free the user id.
    pub async fn abandon(self) {
        self.subscription.into_lease().release().await;
        drop(self.claim);
    }
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

fn user_taken() -> ClientError {
    ClientError::new(ErrorCode::UserTaken, "that user id is already connected")
}

/// The checks that need no claim and no broker round trip.
pub fn precheck(node: &Node, origin: Option<&str>, host: Option<&str>) -> Result<(), ClientError> {
    if !origin_allowed(origin, host, &node.config.allowed_origins) {
        return Err(ClientError::new(
            ErrorCode::OriginNotAllowed,
            "this origin may not open a session here",
        ));
    }
    node.readiness().map_err(|reason| {
        warn!(?reason, "refusing a session: not ready");
        ClientError::from(reason)
    })
}

/// Claim the user id and subscribe. Call after [`precheck`].
pub async fn admit(node: &Arc<Node>, handshake: Handshake) -> Result<Admitted, ClientError> {
    let Handshake { room, user } = handshake;
    let Some(claim) = node.claims.claim(&user, RECONNECT_GRACE).await else {
        return Err(user_taken());
    };
    match node.bus.subscribe(&room, &user).await {
        Ok(subscription) => Ok(Admitted {
            member: Member { room, user },
            claim,
            subscription,
        }),
        Err(BusError::UserTaken) => Err(user_taken()),
        Err(e) => {
            warn!(error = %e, %user, "subscribe failed");
            Err(ClientError::unavailable())
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
    node.bus
        .is_connected(user)
        .await
        .map_err(|_| ClientError::unavailable())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[tokio::test]
    async fn an_abandoned_admission_leaves_nothing_behind() {
        // The embedded bus forgets a room once its last inbox goes; a failed
        // upgrade used to release the queue while the inbox still lived.
        let node = Node::start(Config::defaults()).await.unwrap();
        let handshake = Handshake::new(Some("lobby"), Some("alice")).unwrap();
        let admitted = admit(&node, handshake).await.unwrap();
        let crate::bus::Bus::Memory(bus) = &node.bus else {
            panic!("the default configuration runs on the embedded bus");
        };
        assert_eq!((bus.room_count(), bus.user_count()), (1, 1));
        admitted.abandon().await;
        assert_eq!((bus.room_count(), bus.user_count()), (0, 0));
        assert!(!node.claims.is_claimed(&UserId::parse("alice").unwrap()));
        node.stop().await;
    }

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
