//! The HTTP surface: every route in one place, as warp filters.
//!
//! - `GET /ws` → [`crate::upgrade`] (the WebSocket handshake)
//! - `GET /rooms/<room>/events` → [`crate::sse`] (Server-Sent Events)
//! - `POST /rooms/<room>/messages`, `POST /users/<user>/messages` → [`crate::publish`]
//! - `GET /rooms/<room>/members`, `GET /cluster` → [`crate::presence`]
//! - `GET /metrics` Prometheus text → [`crate::metrics`]
//! - `GET /healthz` liveness, `GET /readyz` readiness (the bus is usable)
//! - `GET /` and static assets from `--static-dir`, with a Content-Security-Policy
//! - anything else → 404 with the JSON error body
//!
//! Every error response, from a handler or a rejection, is built by
//! [`error_response`]: one status, one `{"code", "message"}` body.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use warp::http::StatusCode;
use warp::http::header::{HeaderMap, HeaderValue};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use crate::error::{ClientError, ErrorCode};
use crate::names::RoomName;
use crate::protocol::{ClusterBody, ErrorBody, MembersBody, StatusBody};
use crate::server::Node;

/// The page may load only its own scripts, styles and images, and open
/// WebSockets to its own host; no inline script, so injected markup cannot run.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss:; \
     img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; \
     base-uri 'none'; frame-ancestors 'none'";

/// The one shape of every HTTP error. The code rides along as a response
/// extension so the route tree can count errors by code in one place.
pub fn error_response(error: &ClientError) -> Response {
    let mut response = warp::reply::with_status(
        warp::reply::json(&ErrorBody::from(error)),
        error.code.status(),
    )
    .into_response();
    response.extensions_mut().insert(error.code);
    response
}

/// The Origin header. One that is not valid text is kept as a value no allowed
/// origin can match, so it is refused as `origin_not_allowed`, not as a 404.
fn origin() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::headers_cloned().map(|headers: HeaderMap| {
        headers.get("origin").map(|value| {
            value
                .to_str()
                .map(str::to_owned)
                .unwrap_or_else(|_| "\u{fffd}unreadable-origin".to_owned())
        })
    })
}

/// All routes of a node.
pub fn routes(node: Arc<Node>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with_node = {
        let node = node.clone();
        warp::any().map(move || node.clone())
    };

    let ws = warp::path!("ws")
        .and(warp::get())
        .and(with_node.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and(origin())
        .and(warp::header::optional::<String>("host"))
        .and(crate::upgrade::upgrade_request())
        .and_then(crate::upgrade::handle);

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(with_node.clone())
        .map(|node: Arc<Node>| status_reply(&node, "ok", StatusCode::OK));

    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_node.clone())
        .map(|node: Arc<Node>| readiness(&node));

    let members = warp::path!("rooms" / String / "members")
        .and(warp::get())
        .and(with_node.clone())
        .then(|room: String, node: Arc<Node>| async move {
            match RoomName::parse(&room) {
                Ok(room) => {
                    let members = node.presence.members(room.as_str()).await;
                    warp::reply::json(&MembersBody {
                        room: room.to_string(),
                        members,
                    })
                    .into_response()
                }
                Err(e) => error_response(&e.into()),
            }
        });

    let cluster = warp::path!("cluster")
        .and(warp::get())
        .and(with_node.clone())
        .then(|node: Arc<Node>| async move {
            let nodes = node.presence.nodes().await;
            warp::reply::json(&ClusterBody { nodes }).into_response()
        });

    let events = warp::path!("rooms" / String / "events")
        .and(warp::get())
        .and(with_node.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and(origin())
        .and(warp::header::optional::<String>("host"))
        .and(warp::header::optional::<String>("accept"))
        .and_then(crate::sse::handle);

    let room_post = warp::path!("rooms" / String / "messages")
        .and(warp::post())
        .and(with_node.clone())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .and_then(|room, node, content_type, length, body| {
            crate::publish::room_message(room, node, content_type, length, Box::pin(body))
        });

    let direct_post = warp::path!("users" / String / "messages")
        .and(warp::post())
        .and(with_node.clone())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .and_then(|user, node, content_type, length, body| {
            crate::publish::direct_message(user, node, content_type, length, Box::pin(body))
        });

    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_node.clone())
        .map(|node: Arc<Node>| {
            let ready = readiness(&node).status() == StatusCode::OK;
            let text = node
                .settings
                .metrics
                .render(node.bus.broker_connections(), ready);
            warp::reply::with_header(
                text,
                "content-type",
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .into_response()
        });

    let mut security = HeaderMap::new();
    security.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    security.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    security.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    security.insert("x-frame-options", HeaderValue::from_static("DENY"));
    let static_dir = node.config.static_dir.clone();
    // No method filter in front of the asset catch-all: it would turn every
    // non-GET request to any unknown path into a 405 instead of a 404.
    let index = warp::path::end()
        .and(warp::get().or(warp::head()).unify())
        .and(warp::fs::file(static_dir.join("index.html")));
    let assets = warp::fs::dir(static_dir);
    let page = index
        .or(assets)
        .unify()
        .with(warp::reply::with::headers(security))
        .map(Reply::into_response);

    // Each route is boxed: one unboxed chain of this many filters makes a type
    // deep enough to overflow the compiler's recursion limit in release builds.
    let sessions = ws.boxed().or(events.boxed()).unify().boxed();
    let publishing = room_post.boxed().or(direct_post.boxed()).unify().boxed();
    let state = healthz
        .boxed()
        .or(readyz.boxed())
        .unify()
        .or(members.boxed())
        .unify()
        .or(cluster.boxed())
        .unify()
        .or(metrics.boxed())
        .unify()
        .boxed();
    sessions
        .or(publishing)
        .unify()
        .or(state)
        .unify()
        .or(page.boxed())
        .unify()
        .recover(handle_rejection)
        .unify()
        .map(move |response: Response| {
            if let Some(code) = response.extensions().get::<ErrorCode>() {
                node.settings.metrics.error(*code);
            }
            response
        })
}

fn status_reply(node: &Node, status: &str, code: StatusCode) -> Response {
    let body = StatusBody {
        status: status.into(),
        node: node.settings.node_id.clone(),
        bus: node.bus.kind().into(),
    };
    warp::reply::with_status(warp::reply::json(&body), code).into_response()
}

fn readiness(node: &Node) -> Response {
    if node.shutdown.is_cancelled() {
        return error_response(&ClientError::new(ErrorCode::Unavailable, "shutting down"));
    }
    if node.draining.is_cancelled() {
        return error_response(&ClientError::new(
            ErrorCode::Unavailable,
            "draining for a restart",
        ));
    }
    match node.bus.readiness() {
        Ok(()) => status_reply(node, "ready", StatusCode::OK),
        Err(reason) => error_response(&ClientError::new(ErrorCode::Unavailable, reason)),
    }
}

async fn handle_rejection(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if rejection.is_not_found() {
        ClientError::new(ErrorCode::NotFound, "no such resource")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ClientError::new(ErrorCode::MethodNotAllowed, "method not allowed here")
    } else {
        tracing::debug!(?rejection, "unhandled rejection");
        ClientError::new(ErrorCode::InvalidRequest, "the request could not be read")
    };
    Ok(error_response(&error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_carry_their_code() {
        let r = error_response(&ClientError::new(ErrorCode::InvalidUser, "x"));
        assert_eq!(
            r.extensions().get::<ErrorCode>(),
            Some(&ErrorCode::InvalidUser)
        );
    }
}
