//! HTTP publishing: `POST /rooms/<room>/messages` and `POST /users/<user>/messages`.
//!
//! For clients without a socket (SSE readers, scripts, `curl`). The body is a
//! JSON object, read with a hard size limit before any of it is buffered past
//! that limit; the frame is built and serialised exactly as a WebSocket session
//! would ([`ServerFrame::chat`]), published, and answered `202 {"id"}` only once
//! the broker has confirmed it (bounded by [`crate::bus::BROKER_TIMEOUT`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use tracing::debug;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use crate::auth::{AuthError, Grant};
use crate::bus::BusError;
use crate::error::{ClientError, ErrorCode};
use crate::metrics::Transport;
use crate::names::{RoomName, UserId};
use crate::node::{Node, NotReady};
use crate::protocol::bodies::{AcceptedBody, ApiPost, DirectPost, RoomPost};
use crate::protocol::client::validate_text;
use crate::protocol::{Destination, ServerFrame};

/// How long a client may take to send a whole body: a trickle must not hold a
/// connection (or shutdown) hostage.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

fn client_error(code: ErrorCode, message: impl Into<String>) -> ClientError {
    ClientError::new(code, message)
}

fn user_field(
    value: Option<serde_json::Value>,
    field: &str,
) -> Result<Option<UserId>, ClientError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(user)) => Ok(Some(UserId::parse(&user)?)),
        _ => Err(client_error(
            ErrorCode::InvalidUser,
            format!("{field} must be a user id"),
        )),
    }
}

fn accepted(id: String) -> Response {
    warp::reply::with_status(
        warp::reply::json(&AcceptedBody { id }),
        StatusCode::ACCEPTED,
    )
    .into_response()
}

fn bus_refusal(error: BusError) -> ClientError {
    debug!(%error, "HTTP publish failed");
    match error {
        BusError::NoRecipient => {
            client_error(ErrorCode::UserNotFound, "no user by that id is connected")
        }
        BusError::SlotTaken
        | BusError::SessionGone
        | BusError::Unavailable(_)
        | BusError::TimedOut => ClientError::unavailable(),
    }
}

fn observe(node: &Node, published_at: std::time::Instant, kind: &'static str, accepted: bool) {
    let metrics = &node.metrics;
    if accepted {
        metrics.received(kind, Transport::Http);
    }
    metrics
        .confirm_seconds
        .observe(published_at.elapsed().as_secs_f64());
}

/// Who speaks, from a POST: the sender this request may speak as, and what
/// it may do.
///
/// - With a JWT key: `Authorization: Bearer <token>`; the sender is the
///   token's `sub` (a `user`/`from` in the body must be the same).
/// - Anonymous: the body names the sender, and `token` is the posting token of
///   a live session of that id ([`crate::tokens`]).
async fn speaker(
    node: &Node,
    named: Option<UserId>,
    posting_token: Option<String>,
    authorization: &Option<String>,
) -> Result<Grant, ClientError> {
    let bearer = bearer(authorization.as_deref());
    let posting_token = posting_token.as_deref();
    if !node.auth.is_anonymous() {
        let Some(bearer) = bearer else {
            return Err(AuthError::Required.into());
        };
        let grant = node.auth.verify(bearer).await?;
        if let Some(named) = named
            && named != grant.user
        {
            return Err(client_error(
                ErrorCode::InvalidToken,
                format!("the token is for {}, not {named}", grant.user),
            ));
        }
        return Ok(grant);
    }
    let Some(user) = named else {
        return Err(client_error(
            ErrorCode::InvalidUser,
            "name the sender (user, or from) and send its session's posting token",
        ));
    };
    let Some(token) = posting_token else {
        return Err(client_error(
            ErrorCode::TokenRequired,
            format!(
                "posting as {user} needs the token of one of its sessions (the token of its \
                 welcome); applications publish through the server API"
            ),
        ));
    };
    let alive = match node.tokens.session_of(&user, token) {
        Some(session) => node
            .bus
            .session_alive(&user, &session)
            .await
            .map_err(|_| ClientError::unavailable())?,
        None => false,
    };
    if !alive {
        return Err(client_error(
            ErrorCode::InvalidToken,
            format!("that token is not one of {user}'s live sessions"),
        ));
    }
    node.auth
        .admit(None, Some(user))
        .await
        .map_err(ClientError::from)
}

/// `Authorization: Bearer <token>`, if the header says so.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Is `header` one of the server API's keys? Compared in constant time.
fn api_key_ok(node: &Node, header: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = bearer(header) else {
        return false;
    };
    node.config.api_keys.iter().fold(false, |found, key| {
        found | bool::from(key.as_bytes().ct_eq(given.as_bytes()))
    })
}

/// Whether this node publishes now. A draining node still does: its open
/// event streams post through it until they are closed.
fn ready(node: &Node) -> Result<(), ClientError> {
    match node.readiness() {
        Ok(()) | Err(NotReady::Draining) => Ok(()),
        Err(reason) => Err(reason.into()),
    }
}

/// Where an HTTP-published message goes, as the path named it.
pub enum Target {
    /// `POST /rooms/<room>/messages` with `{"user": "...", "text": "..."}`.
    Room(String),
    /// `POST /users/<user>/messages` with `{"from": "...", "text": "..."}`.
    User(String),
    /// `POST /api/rooms/<room>/messages` with `{"text": "...", "from": "..."}`
    /// (`from` optional, default `system`): the application's backend, with
    /// an API key.
    Api(String),
}

/// The sender of a server API message that names none.
pub const SYSTEM_SENDER: &str = "system";

/// A POST's body as it arrives: what its headers declare, and its bytes.
pub struct Body {
    content_type: Option<String>,
    content_length: Option<u64>,
    authorization: Option<String>,
    chunks: BoxStream<'static, Result<Bytes, warp::Error>>,
}

impl Body {
    pub fn new(
        content_type: Option<String>,
        content_length: Option<u64>,
        authorization: Option<String>,
        chunks: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + 'static,
    ) -> Self {
        Self {
            content_type,
            content_length,
            authorization,
            chunks: chunks
                .map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining()))
                .boxed(),
        }
    }

    /// Read a JSON body of at most `limit` bytes. A declared Content-Length over the
    /// limit is refused before reading; an undeclared (chunked) body is refused as
    /// soon as it passes the limit.
    async fn read<T: DeserializeOwned>(self, limit: usize) -> Result<T, ClientError> {
        let Body {
            content_type,
            content_length,
            chunks: mut body,
            ..
        } = self;
        let is_json = content_type
            .as_deref()
            .and_then(|ct| ct.split(';').next())
            .is_some_and(|ct| ct.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(client_error(
                ErrorCode::UnsupportedMediaType,
                "send the body as application/json",
            ));
        }
        let too_large = || {
            client_error(
                ErrorCode::MessageTooLarge,
                format!("the body is over {limit} bytes"),
            )
        };
        if content_length.is_some_and(|len| len > limit as u64) {
            return Err(too_large());
        }
        let mut buffer = BytesMut::new();
        let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
        loop {
            let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(_) => {
                    return Err(client_error(
                        ErrorCode::RequestTimeout,
                        "the body did not arrive in time",
                    ));
                }
            };
            let chunk = chunk.map_err(|e| {
                client_error(ErrorCode::InvalidJson, format!("body unreadable: {e}"))
            })?;
            if buffer.len() + chunk.len() > limit {
                return Err(too_large());
            }
            buffer.extend_from_slice(&chunk);
        }
        let invalid = |e: serde_json::Error| {
            client_error(
                ErrorCode::InvalidJson,
                format!("body is not the expected JSON: {e}"),
            )
        };
        // serde would read a struct from a JSON array too (`["alice","hi"]`):
        // accept only the object the docs describe.
        let value: serde_json::Value = serde_json::from_slice(&buffer).map_err(invalid)?;
        if !value.is_object() {
            return Err(client_error(
                ErrorCode::InvalidJson,
                "the body must be a JSON object",
            ));
        }
        serde_json::from_value(value).map_err(invalid)
    }
}

/// Publish one POSTed message and answer `202 {"id"}`, or the error.
pub async fn handle(target: Target, body: Body, node: Arc<Node>) -> Response {
    let limit = node.config.max_frame_bytes;
    // Validate the address first (a bad one is refused without reading the
    // body), then the body, then build the frame exactly as a session would.
    let prepared = async {
        let authorization = body.authorization.clone();
        let (from, to, text) = match &target {
            Target::Room(room) => {
                let room = RoomName::parse(room)?;
                let post: RoomPost = body.read(limit).await?;
                let named = user_field(post.user, "user")?;
                let grant = speaker(&node, named, post.token, &authorization).await?;
                if !grant.permissions.may_write(&room) {
                    return Err(crate::handshake::forbidden_room(&room));
                }
                let text = validate_text(post.text, node.config.max_text_bytes)?;
                (grant.user, Destination::Room(room), text)
            }
            Target::User(to) => {
                let to = UserId::parse(to)?;
                let post: DirectPost = body.read(limit).await?;
                let named = user_field(post.from, "from")?;
                let grant = speaker(&node, named, post.token, &authorization).await?;
                if !grant.permissions.may_send_direct() {
                    return Err(client_error(
                        ErrorCode::Forbidden,
                        "you may not send direct messages",
                    ));
                }
                let text = validate_text(post.text, node.config.max_text_bytes)?;
                (grant.user, Destination::User(to), text)
            }
            Target::Api(room) => {
                if !api_key_ok(&node, authorization.as_deref()) {
                    return Err(client_error(
                        ErrorCode::InvalidToken,
                        "the server API needs Authorization: Bearer <one of --api-key>",
                    ));
                }
                let room = RoomName::parse(room)?;
                let post: ApiPost = body.read(limit).await?;
                let from = user_field(post.from, "from")?
                    .unwrap_or_else(|| UserId::parse(SYSTEM_SENDER).expect("a valid id"));
                let text = validate_text(post.text, node.config.max_text_bytes)?;
                (from, Destination::Room(room), text)
            }
        };
        ready(&node)?;
        Ok::<_, ClientError>((from, to, text))
    }
    .await;
    let (from, to, text) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return e.into_response(),
    };
    let id = node.ids.next_id();
    let payload = Bytes::from(ServerFrame::chat(id.clone(), &from, &to, text).to_json());
    let published_at = std::time::Instant::now();
    let result = node.bus.publish(&to, &from, payload).await;
    observe(&node, published_at, to.kind(), result.is_ok());
    match result {
        Ok(()) => accepted(id),
        Err(e) => bus_refusal(e).into_response(),
    }
}
