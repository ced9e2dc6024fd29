//! `GET /rooms/<room>/messages?limit=&before=`: a room's history over HTTP,
//! the same pages a `subscribe` with `history` gets, for clients that page
//! back through a room or have no socket. With tokens, the caller needs a
//! token that may read the room (`Authorization: Bearer`).

use std::collections::HashMap;
use std::sync::Arc;

use warp::reply::{Reply, Response};

use super::publish::bearer;
use crate::error::{ClientError, ErrorCode};
use crate::handshake::forbidden_room;
use crate::names::RoomName;
use crate::node::Node;
use crate::protocol::client::MAX_ID_LEN;

/// Messages per page when `limit` is not given.
const DEFAULT_LIMIT: usize = 50;

pub async fn serve(
    node: Arc<Node>,
    room: String,
    query: HashMap<String, String>,
    authorization: Option<String>,
) -> Response {
    match page(&node, &room, &query, authorization.as_deref()).await {
        Ok(body) => {
            warp::reply::with_header(body, "content-type", "application/json").into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn page(
    node: &Node,
    room: &str,
    query: &HashMap<String, String>,
    authorization: Option<&str>,
) -> Result<String, ClientError> {
    let room = RoomName::parse(room)?;
    let grant = node.auth.admit(bearer(authorization), None).await?;
    if !grant.permissions.may_read(&room) {
        return Err(forbidden_room(&room));
    }
    let per_room = node.config.history_per_room;
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(n) => n.parse::<usize>().map_err(|_| {
            ClientError::new(
                ErrorCode::InvalidRequest,
                "limit must be how many messages (a non-negative integer)",
            )
        })?,
    };
    let before = query.get("before").map(String::as_str);
    if before.is_some_and(|id| id.is_empty() || id.len() > MAX_ID_LEN) {
        return Err(ClientError::new(
            ErrorCode::InvalidRequest,
            format!("before must be a message id (at most {MAX_ID_LEN} bytes)"),
        ));
    }
    // A page a little short is better than none: a stuck broker only means
    // the node may not have read the very latest messages.
    let caught_up = node.bus.history_caught_up().await.is_ok();
    let page = node.bus.history().last(&room, limit.min(per_room), before);
    let complete = page.complete && caught_up && per_room > 0;
    Ok(format!(
        r#"{{"room":{},"complete":{complete},"messages":{}}}"#,
        serde_json::Value::from(room.as_str()),
        page.to_json_array()
    ))
}
