//! Admission: everything that can refuse a new session, for every transport.
//!
//! A WebSocket upgrade and a Server-Sent Events stream are admitted the same way,
//! before any byte of the stream is sent, so a refusal is an HTTP status with a
//! JSON body: validate the query → check Origin → check the node is ready →
//! claim one of the user's session slots (this node's claims, then the bus's
//! slot queues across the cluster) → open the session's queue on the bus and,
//! when the URL names a room (v1 clients, event streams), bind it there; all
//! bounded by [`crate::bus::BROKER_TIMEOUT`]. The first event the client then
//! reads (`welcome`) means it is already subscribed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::auth::Grant;
use crate::bus::{AckMode, BusError, Opening, Release, SessionLink, Subscription};
use crate::claims::{Claim, RECONNECT_GRACE};
use crate::error::{ClientError, ErrorCode};
use crate::limits::OpenConnection;
use crate::names::{RoomName, SessionId, UserId};
use crate::node::Node;

/// How long to wait before scanning a user's slots again when every one was
/// held on some node: a client that reconnected at once may be racing its
/// old session's cleanup on another node.
const TAKEN_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

/// Who asks to connect, with what token, and the room the URL names, if any.
pub struct Handshake {
    pub room: Option<RoomName>,
    /// The self-asserted id (`?user=`); with tokens, it must be the token's.
    pub user: Option<UserId>,
    pub token: Option<String>,
    /// The client's address, when known, for the per-address limits.
    pub client: Option<std::net::IpAddr>,
    /// `acks=client`: the client acknowledges deliveries with `ack_upto`.
    pub acks: AckMode,
    /// `resume=<session>&rooms=a,b&last_id=<id>`: the session to resume.
    pub resume: Option<ResumeRequest>,
}

/// A client reconnecting to a session whose socket dropped.
pub struct ResumeRequest {
    pub session: SessionId,
    /// The rooms it was subscribed to, to subscribe again (a queue kept for
    /// resume is still bound to them; a new one is not).
    pub rooms: Vec<RoomName>,
    /// The id of the last message it processed.
    pub last_id: Option<String>,
}

/// Longest `last_id` a resume may name (message ids are far shorter).
const MAX_LAST_ID: usize = 128;

impl Handshake {
    /// From `?room=&user=&token=&acks=&resume=&rooms=&last_id=`; all optional
    /// (no room; a `guest-<random>` id when anonymous).
    pub fn from_query(query: &HashMap<String, String>) -> Result<Self, ClientError> {
        let mut handshake = Self::new(
            query.get("room").map(String::as_str),
            query.get("user").map(String::as_str),
            query.get("token").cloned(),
        )?;
        handshake.acks = match query.get("acks").map(String::as_str) {
            None | Some("server") => AckMode::Server,
            Some("client") => AckMode::Client,
            Some(other) => {
                return Err(ClientError::new(
                    ErrorCode::InvalidRequest,
                    format!("acks must be client or server, not {other:?}"),
                ));
            }
        };
        handshake.resume = query
            .get("resume")
            .map(|session| ResumeRequest::parse(session, query))
            .transpose()?;
        Ok(handshake)
    }

    pub fn new(
        room: Option<&str>,
        user: Option<&str>,
        token: Option<String>,
    ) -> Result<Self, ClientError> {
        let room = room.map(RoomName::parse).transpose()?;
        let user = user.map(UserId::parse).transpose()?;
        Ok(Handshake {
            room,
            user,
            token,
            client: None,
            acks: AckMode::Server,
            resume: None,
        })
    }
}

impl ResumeRequest {
    fn parse(session: &str, query: &HashMap<String, String>) -> Result<Self, ClientError> {
        let session = SessionId::parse(session).ok_or_else(|| {
            ClientError::new(
                ErrorCode::InvalidSession,
                "resume must be the session of an earlier welcome",
            )
        })?;
        let rooms = match query.get("rooms").map(String::as_str) {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(RoomName::parse)
                .collect::<Result<_, _>>()?,
        };
        let last_id = query.get("last_id").cloned();
        if last_id.as_ref().is_some_and(|id| id.len() > MAX_LAST_ID) {
            return Err(ClientError::new(
                ErrorCode::InvalidRequest,
                format!("last_id is at most {MAX_LAST_ID} bytes"),
            ));
        }
        Ok(ResumeRequest {
            session,
            rooms,
            last_id,
        })
    }
}

/// Who the handshake's token (or, anonymous, its `?user=`) says the client is,
/// and whether it may read the URL's room.
pub async fn authenticate(node: &Node, handshake: &Handshake) -> Result<Grant, ClientError> {
    let grant = node
        .auth
        .admit(handshake.token.as_deref(), handshake.user.clone())
        .await?;
    if let Some(claimed) = &handshake.user
        && *claimed != grant.user
    {
        return Err(ClientError::new(
            ErrorCode::InvalidToken,
            format!("the token is for {}, not {claimed}", grant.user),
        ));
    }
    if let Some(room) = &handshake.room
        && !grant.permissions.may_read(room)
    {
        return Err(forbidden_room(room));
    }
    Ok(grant)
}

/// The refusal of a room the grant does not allow.
pub fn forbidden_room(room: &RoomName) -> ClientError {
    ClientError::new(ErrorCode::Forbidden, format!("you may not use room {room}"))
}

/// Who a session is: its user, and its own id.
pub struct Identity {
    pub user: UserId,
    pub session: SessionId,
}

/// A session that may start: its slot is held, its queue declared, and bound
/// to `room` when the URL named one (and to the rooms a resume restores).
pub struct Admitted {
    pub identity: Identity,
    /// What its token allows, until when.
    pub grant: Grant,
    /// Its place among its address's connections; freed with the session.
    pub open: Option<OpenConnection>,
    pub room: Option<RoomName>,
    pub claim: Claim,
    pub subscription: Subscription,
    pub acks: AckMode,
    /// The answer to a `?resume=`.
    pub resumed: Option<Resumed>,
}

/// What came of a resume: the rooms subscribed again (bound and followed,
/// not yet joined) and whether the old queue was recovered.
pub struct Resumed {
    pub recovered: bool,
    pub rooms: Vec<RoomName>,
}

impl Admitted {
    /// Give the place back when the session never started (the client left
    /// between the 101 and the upgrade): delete the queue, free the slot.
    pub async fn abandon(self) {
        // A resumed queue goes too: its client is gone again before it began.
        self.subscription
            .into_lease()
            .release(Release::Delete)
            .await;
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

fn too_many_sessions(node: &Node) -> ClientError {
    ClientError::new(
        ErrorCode::TooManySessions,
        format!(
            "this user id already has {} connections",
            node.config.sessions_per_user
        ),
    )
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

/// Claim a session slot, open the session's queue (or resume the old one), and
/// bind it to the URL's room and the rooms a resume restores. Call after
/// [`precheck`].
pub async fn admit(node: &Arc<Node>, handshake: Handshake) -> Result<Admitted, ClientError> {
    let address_slot = handshake
        .client
        .map(|ip| node.limits.admit(ip, &node.metrics))
        .transpose()?;
    let grant = authenticate(node, &handshake).await?;
    let Handshake {
        room, acks, resume, ..
    } = handshake;
    let user = grant.user.clone();
    // Rooms the token no longer allows are not restored.
    let mut restore: Vec<RoomName> = resume
        .as_ref()
        .map(|r| {
            r.rooms
                .iter()
                .filter(|room| grant.permissions.may_read(room))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    restore.sort();
    restore.dedup();
    restore.retain(|r| Some(r) != room.as_ref());
    let limit = node.config.max_rooms_per_connection;
    if restore.len() + usize::from(room.is_some()) > limit {
        return Err(ClientError::new(
            ErrorCode::TooManyRooms,
            format!("a connection may be in at most {limit} rooms"),
        ));
    }
    let mut opened = None;
    if let Some(request) = &resume {
        let wanted = crate::bus::Resume {
            last_id: request.last_id.as_deref(),
        };
        match open(
            node,
            &user,
            &request.session,
            acks,
            Some(wanted),
            room.as_ref(),
        )
        .await
        {
            Ok((claim, subscription)) => {
                opened = Some((request.session.clone(), claim, subscription, true))
            }
            Err(Opened::Gone) => {}
            Err(Opened::Refused(e)) => return Err(e),
        }
    }
    let (session, claim, mut subscription, recovered) = match opened {
        Some(opened) => opened,
        None => {
            let session = SessionId::random();
            let (claim, subscription) = open(node, &user, &session, acks, None, room.as_ref())
                .await
                .map_err(Opened::into_error)?;
            (session, claim, subscription, false)
        }
    };
    // With per-node fanout the queue holds only direct messages: the
    // client must ask history for its rooms, and is told so.
    let rooms_recovered = recovered && node.bus.resumes_rooms();
    node.metrics
        .resumed(resume.as_ref().map(|_| rooms_recovered));
    // The open bound the URL's room. A recovered queue is still bound to the
    // rooms its old session had subscribed; binding them again costs little
    // and covers a client that lists one the old session never got to bind.
    for room in &restore {
        if let Err(e) = subscription.link.bind(room).await {
            warn!(error = %e, %user, %room, "binding the session's queue failed");
            // A recovered queue still holds what its client missed: keep it.
            let queue = if recovered {
                Release::KeepForResume
            } else {
                Release::Delete
            };
            subscription.into_lease().release(queue).await;
            return Err(ClientError::unavailable());
        }
    }
    for room in room.iter().chain(&restore) {
        subscription.inbox.follow(room);
    }
    Ok(Admitted {
        identity: Identity { user, session },
        grant,
        open: address_slot,
        room,
        claim,
        subscription,
        acks,
        resumed: resume.map(|_| Resumed {
            recovered: rooms_recovered,
            rooms: restore,
        }),
    })
}

/// Why [`open`] did not open.
enum Opened {
    /// The session to resume is gone: open a new one instead.
    Gone,
    Refused(ClientError),
}

impl Opened {
    fn into_error(self) -> ClientError {
        match self {
            Opened::Gone => ClientError::unavailable(),
            Opened::Refused(e) => e,
        }
    }
}

/// Hold one of `user`'s session slots and open the session's queue (or take
/// over the old one, resuming), bound to `room`. A slot this node does not hold may be held by
/// another: the bus says so, and the next one is tried. When every slot is
/// held, try again a few times (a reconnecting client races its old session's
/// end) before refusing.
async fn open(
    node: &Node,
    user: &UserId,
    session: &SessionId,
    acks: AckMode,
    resume: Option<crate::bus::Resume<'_>>,
    room: Option<&RoomName>,
) -> Result<(Claim, Subscription), Opened> {
    let max = node.config.sessions_per_user;
    let mut retries = TAKEN_RETRIES.iter();
    loop {
        let Some(mut claim) = node.claims.claim(user, max, RECONNECT_GRACE).await else {
            return Err(Opened::Refused(too_many_sessions(node)));
        };
        loop {
            let opening = Opening {
                session,
                user,
                slot: claim.slot(),
                acks,
                resume: resume
                    .as_ref()
                    .map(|r| crate::bus::Resume { last_id: r.last_id }),
                room,
            };
            match node.bus.open(&opening).await {
                Ok(subscription) => return Ok((claim, subscription)),
                Err(BusError::SlotTaken) => {}
                Err(BusError::SessionGone) => return Err(Opened::Gone),
                Err(e) => {
                    warn!(error = %e, %user, "opening a session failed");
                    return Err(Opened::Refused(ClientError::unavailable()));
                }
            }
            match node.claims.claim_above(user, max, Some(claim.slot())) {
                Some(next) => claim = next,
                None => break,
            }
        }
        match retries.next() {
            Some(delay) => tokio::time::sleep(*delay).await,
            None => return Err(Opened::Refused(too_many_sessions(node))),
        }
    }
}

/// What admission would answer, without opening anything: for a plain GET of
/// a session endpoint, since browsers cannot read a refused upgrade's status.
/// `Ok` means the session would be admitted.
pub async fn probe(node: &Node, handshake: &Handshake) -> Result<(), ClientError> {
    let grant = authenticate(node, handshake).await?;
    let max = node.config.sessions_per_user;
    let full = node.claims.sessions_of(&grant.user) >= usize::from(max)
        || node
            .bus
            .is_full(&grant.user, max)
            .await
            .map_err(|_| ClientError::unavailable())?;
    if full {
        return Err(too_many_sessions(node));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[tokio::test]
    async fn an_abandoned_admission_leaves_nothing_behind() {
        // A failed upgrade must give back the queue, the room and the slot.
        let node = Node::start(Config::defaults()).await.unwrap();
        let handshake = Handshake::new(Some("lobby"), Some("alice"), None).unwrap();
        let admitted = admit(&node, handshake).await.unwrap();
        let crate::bus::Bus::Memory(bus) = &node.bus else {
            panic!("the default configuration runs on the embedded bus");
        };
        assert_eq!((bus.room_count(), bus.user_count()), (1, 1));
        assert!(node.claims.is_claimed(&UserId::parse("alice").unwrap()));
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
        assert_eq!(
            (h.room, h.user, h.token, h.client, h.acks),
            (None, None, None, None, AckMode::Server)
        );
        assert!(h.resume.is_none());
        let query = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let session = "0123456789abcdef0123456789abcdef";
        let h = Handshake::from_query(&query(&[
            ("acks", "client"),
            ("resume", session),
            ("rooms", "a,b"),
            ("last_id", "x-1"),
        ]))
        .unwrap();
        assert_eq!(h.acks, AckMode::Client);
        let resume = h.resume.unwrap();
        assert_eq!(resume.session.as_str(), session);
        assert_eq!(resume.rooms.len(), 2);
        assert_eq!(resume.last_id.as_deref(), Some("x-1"));
        for (bad, code) in [
            (query(&[("resume", "nope")]), ErrorCode::InvalidSession),
            (
                query(&[("resume", session), ("rooms", "a,b c")]),
                ErrorCode::InvalidRoom,
            ),
            (query(&[("acks", "sometimes")]), ErrorCode::InvalidRequest),
        ] {
            assert_eq!(Handshake::from_query(&bad).err().unwrap().code, code);
        }
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
