//! The HTTP surface: every route in one place, as warp filters.
//!
//! - `GET /ws` → [`crate::transport::websocket`] (the WebSocket handshake)
//! - `GET /rooms/<room>/events` → [`crate::transport::sse`] (Server-Sent Events)
//! - `POST /rooms/<room>/messages`, `POST /users/<user>/messages`, and the
//!   server API `POST /api/rooms/<room>/messages` → [`crate::transport::publish`]
//! - `GET /rooms/<room>/messages` → [`crate::transport::history`]
//! - `GET /rooms/<room>/members`, `GET /cluster` → [`crate::presence`]
//! - `GET /metrics` Prometheus text → [`crate::metrics`]
//! - `GET /echo`, only with `--echo-endpoint` → [`crate::transport::echo`]
//! - `GET /healthz` liveness, `GET /readyz` readiness ([`Node::readiness`])
//! - `GET /` and static assets from `--static-dir`, with a Content-Security-Policy;
//!   `GET /warren-client.js`, the JavaScript client library, from the binary
//! - anything else → 404 with the JSON error body
//!
//! Every error response, from a handler or a rejection, is a
//! [`ClientError`] turned into a reply: one status, one `{"code", "message"}`
//! body. Errors are counted by code here, once, for every route.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use crate::error::{ClientError, ErrorCode};
use crate::listener::Peer;
use crate::metrics::Readings;
use crate::names::RoomName;
use crate::node::{Node, NotReady};
use crate::protocol::bodies::{ClusterBody, MembersBody, StatusBody};
use crate::transport::{echo, history, publish, sse, websocket};
use warp::http::StatusCode;
use warp::http::header::{HeaderMap, HeaderValue};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

/// The page may load only its own scripts, styles and images, and open
/// WebSockets to its own host; no inline script, so injected markup cannot run.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss:; \
     img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; \
     base-uri 'none'; frame-ancestors 'none'";

/// The JavaScript client library (`clients/js`), which the chat page imports.
/// It is built into the binary, so a page always gets the client of the server
/// it talks to, whatever `--static-dir` holds.
const CLIENT_JS: &str = include_str!("../clients/js/warren-client.js");

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

/// A POST's body, with the headers that describe it.
fn posted_body() -> impl Filter<Extract = (publish::Body,), Error = Rejection> + Clone {
    warp::post()
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::stream())
        .map(publish::Body::new)
}

/// The client's address, for the per-address limits: the TCP peer, or what a
/// trusted proxy says ([`crate::limits`]).
fn client_ip(
    node: Arc<Node>,
) -> impl Filter<Extract = (Option<std::net::IpAddr>,), Error = Rejection> + Clone {
    warp::ext::optional::<Peer>()
        .and(warp::header::optional::<String>("x-forwarded-for"))
        .map(move |peer: Option<Peer>, forwarded: Option<String>| {
            node.limits
                .client_ip(peer.map(|p| p.0.ip()), forwarded.as_deref())
        })
}

/// A publishing route: the path names the target, the body the message.
fn post_to(
    path: impl Filter<Extract = (String,), Error = Rejection> + Clone,
    target: fn(String) -> publish::Target,
    node: Arc<Node>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    path.map(target)
        .and(posted_body())
        .and(warp::any().map(move || node.clone()))
        .then(publish::handle)
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
        .and(client_ip(node.clone()))
        .and(websocket::upgrade_request())
        .then(websocket::handle);

    let echo = {
        let enabled = node.config.echo_endpoint;
        let max = node.config.max_frame_bytes;
        warp::path!("echo")
            .and(warp::get())
            .and_then(move || async move {
                if enabled {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            })
            .untuple_one()
            .and(websocket::upgrade_request())
            .map(move |upgrade| echo::handle(max, upgrade))
    };

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
                Err(e) => ClientError::from(e).into_response(),
            }
        });

    let history = warp::path!("rooms" / String / "messages")
        .and(warp::get())
        .and(with_node.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::optional::<String>("authorization"))
        .then(
            |room: String,
             node: Arc<Node>,
             query: HashMap<String, String>,
             auth: Option<String>| { history::serve(node, room, query, auth) },
        );

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
        .and(client_ip(node.clone()))
        .then(sse::handle);

    let room_post = post_to(
        warp::path!("rooms" / String / "messages"),
        publish::Target::Room,
        node.clone(),
    );
    let direct_post = post_to(
        warp::path!("users" / String / "messages"),
        publish::Target::User,
        node.clone(),
    );
    let api_post = post_to(
        warp::path!("api" / "rooms" / String / "messages"),
        publish::Target::Api,
        node.clone(),
    );

    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_node.clone())
        .map(|node: Arc<Node>| {
            let text = node.metrics.render(&Readings {
                broker_connections: node.bus.broker_connections(),
                ready: node.readiness().is_ok(),
                history_reading: node.bus.history_reading(),
            });
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
    let client_js = warp::path!("warren-client.js")
        .and(warp::get().or(warp::head()).unify())
        .map(|| {
            warp::reply::with_header(CLIENT_JS, "content-type", "text/javascript; charset=utf-8")
                .into_response()
        });
    let page = client_js
        .or(index.or(assets).unify().map(Reply::into_response))
        .unify()
        .with(warp::reply::with::headers(security))
        .map(Reply::into_response);

    // Each route is boxed: one unboxed chain of this many filters makes a type
    // deep enough to overflow the compiler's recursion limit in release builds.
    let sessions = ws
        .boxed()
        .or(events.boxed())
        .unify()
        .or(echo.boxed())
        .unify()
        .boxed();
    let publishing = room_post
        .boxed()
        .or(direct_post.boxed())
        .unify()
        .or(api_post.boxed())
        .unify()
        .boxed();
    let state = healthz
        .boxed()
        .or(readyz.boxed())
        .unify()
        .or(members.boxed())
        .unify()
        .or(history.boxed())
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
                node.metrics.error(*code);
            }
            response
        })
}

fn status_reply(node: &Node, status: &str, code: StatusCode) -> Response {
    let body = StatusBody {
        status: status.into(),
        node: node.id.clone(),
        bus: node.bus.kind().into(),
    };
    warp::reply::with_status(warp::reply::json(&body), code).into_response()
}

/// `/readyz`: what [`Node::readiness`] says, with the broker's own reason for
/// operators (clients elsewhere get only `unavailable`).
fn readiness(node: &Node) -> Response {
    let message = match node.readiness() {
        Ok(()) => return status_reply(node, "ready", StatusCode::OK),
        Err(NotReady::ShuttingDown) => "shutting down".to_owned(),
        Err(NotReady::Draining) => "draining for a restart".to_owned(),
        Err(NotReady::Bus(reason)) => reason,
    };
    ClientError::new(ErrorCode::Unavailable, message).into_response()
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
    Ok(error.into_response())
}
