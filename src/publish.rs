//! HTTP publishing: `POST /rooms/<room>/messages` and `POST /users/<user>/messages`.
//!
//! For clients without a socket (SSE readers, scripts, `curl`). The body is JSON,
//! read with a hard size limit before any of it is buffered past that limit; the
//! frame is built and serialised exactly as a WebSocket session would, published,
//! and answered `202 {"id"}` only once the broker has confirmed it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tracing::debug;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use crate::bus::BusError;
use crate::error::{ClientError, ErrorCode};
use crate::http::error_response;
use crate::metrics::Transport;
use crate::names::{RoomName, UserId};
use crate::protocol::{AcceptedBody, DirectPost, RoomPost, ServerFrame, validate_text};
use crate::server::Node;
use crate::session::now_ms;

/// How long a client may take to send a whole body: a trickle must not hold a
/// connection (or shutdown) hostage.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

fn client_error(code: ErrorCode, message: impl Into<String>) -> ClientError {
    ClientError::new(code, message)
}

/// Read a JSON body of at most `limit` bytes. A declared Content-Length over the
/// limit is refused before reading; an undeclared (chunked) body is refused as
/// soon as it passes the limit.
async fn read_json<T, S, B>(
    content_type: Option<String>,
    content_length: Option<u64>,
    body: S,
    limit: usize,
) -> Result<T, ClientError>
where
    T: DeserializeOwned,
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
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
    let mut body = body;
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
        let mut chunk = chunk
            .map_err(|e| client_error(ErrorCode::InvalidJson, format!("body unreadable: {e}")))?;
        if buffer.len() + chunk.remaining() > limit {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buffer.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    serde_json::from_slice(&buffer).map_err(|e| {
        client_error(
            ErrorCode::InvalidJson,
            format!("body is not the expected JSON: {e}"),
        )
    })
}

fn user_field(value: Option<serde_json::Value>, field: &str) -> Result<UserId, ClientError> {
    match value {
        Some(serde_json::Value::String(user)) => Ok(UserId::parse(&user)?),
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

fn bus_refusal(error: BusError) -> Response {
    debug!(%error, "HTTP publish failed");
    error_response(&match error {
        BusError::NoRecipient => {
            client_error(ErrorCode::UserNotFound, "no user by that id is connected")
        }
        BusError::UserTaken | BusError::Unavailable(_) => client_error(
            ErrorCode::Unavailable,
            "the message broker is unavailable; retry shortly",
        ),
    })
}

fn observe(node: &Node, published_at: std::time::Instant, kind: &'static str, accepted: bool) {
    let metrics = &node.settings.metrics;
    if accepted {
        metrics.received(kind, Transport::Http);
    }
    metrics
        .confirm_seconds
        .observe(published_at.elapsed().as_secs_f64());
}

/// Who speaks and what, from a POST body: a valid sender id that this request
/// may speak as, and a valid text. The same checks for rooms and directs.
async fn speaker(
    node: &Node,
    sender: Option<serde_json::Value>,
    field: &str,
    token: Option<String>,
    text: Option<serde_json::Value>,
) -> Result<(String, String), ClientError> {
    let from = user_field(sender, field)?;
    authorize(node, &from, token.as_deref()).await?;
    let text =
        validate_text(text, node.config.max_text_bytes).map_err(|(c, m)| client_error(c, m))?;
    Ok((from.to_string(), text))
}

/// May this request speak as `from`? With its session's token, yes; without,
/// only while no session anywhere holds the id (see [`crate::tokens`]).
async fn authorize(node: &Node, from: &UserId, token: Option<&str>) -> Result<(), ClientError> {
    if token.is_some_and(|t| node.settings.tokens.verify(from, t)) {
        return Ok(());
    }
    if crate::handshake::is_held(node, from).await? {
        return Err(client_error(
            ErrorCode::TokenRequired,
            format!(
                "{from} is connected: only its session may post as it (send the token from its welcome)"
            ),
        ));
    }
    Ok(())
}

fn ready(node: &Node) -> Result<(), ClientError> {
    if node.bus.readiness().is_err() || node.shutdown.is_cancelled() {
        return Err(client_error(
            ErrorCode::Unavailable,
            "the message broker is unavailable; retry shortly",
        ));
    }
    Ok(())
}

/// Where an HTTP-published message goes, as the path named it.
enum Target {
    Room(String),
    User(String),
}

/// The same, validated.
enum Destination {
    Room(RoomName),
    User(UserId),
}

/// `POST /rooms/<room>/messages` with `{"user": "...", "text": "..."}`.
pub async fn room_message<S, B>(
    room: String,
    node: Arc<Node>,
    content_type: Option<String>,
    content_length: Option<u64>,
    body: S,
) -> Result<Response, Infallible>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    Ok(publish(Target::Room(room), node, content_type, content_length, body).await)
}

/// `POST /users/<user>/messages` with `{"from": "...", "text": "..."}`.
pub async fn direct_message<S, B>(
    to: String,
    node: Arc<Node>,
    content_type: Option<String>,
    content_length: Option<u64>,
    body: S,
) -> Result<Response, Infallible>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    Ok(publish(Target::User(to), node, content_type, content_length, body).await)
}

async fn publish<S, B>(
    target: Target,
    node: Arc<Node>,
    content_type: Option<String>,
    content_length: Option<u64>,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let limit = node.config.max_frame_bytes;
    let id = node.settings.ids.next_id();
    // Validate the address first (a bad one is refused without reading the
    // body), then the body, then build the frame exactly as a session would.
    let prepared = async {
        let built = match &target {
            Target::Room(room) => {
                let room = RoomName::parse(room)?;
                let post: RoomPost = read_json(content_type, content_length, body, limit).await?;
                let (from, text) = speaker(&node, post.user, "user", post.token, post.text).await?;
                let frame = ServerFrame::Message {
                    id: id.clone(),
                    room: room.to_string(),
                    from,
                    text,
                    ts: now_ms(),
                };
                (frame, Destination::Room(room))
            }
            Target::User(to) => {
                let to = UserId::parse(to)?;
                let post: DirectPost = read_json(content_type, content_length, body, limit).await?;
                let (from, text) = speaker(&node, post.from, "from", post.token, post.text).await?;
                let frame = ServerFrame::Direct {
                    id: id.clone(),
                    from,
                    to: to.to_string(),
                    text,
                    ts: now_ms(),
                };
                (frame, Destination::User(to))
            }
        };
        ready(&node)?;
        Ok::<_, ClientError>(built)
    }
    .await;
    let (frame, destination) = match prepared {
        Ok(built) => built,
        Err(e) => return error_response(&e),
    };
    let payload = Bytes::from(frame.to_json());
    let published_at = std::time::Instant::now();
    let (kind, result) = match destination {
        Destination::User(to) => ("direct", node.bus.publish_direct(&to, payload).await),
        Destination::Room(room) => ("message", node.bus.publish_room(&room, payload).await),
    };
    observe(&node, published_at, kind, result.is_ok());
    match result {
        Ok(()) => accepted(id),
        Err(e) => bus_refusal(e),
    }
}
