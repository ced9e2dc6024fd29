//! The JSON bodies of the HTTP routes (the error body is [`crate::error::ErrorBody`]).

use serde::{Deserialize, Serialize};

/// `GET /rooms/<room>/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersBody {
    pub room: String,
    pub members: Vec<String>,
}

/// `GET /cluster`: every live node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterBody {
    pub nodes: Vec<crate::presence::view::NodeInfo>,
}

/// `202 Accepted` for an HTTP-published message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedBody {
    pub id: String,
}

/// The body of `POST /rooms/<room>/messages`: who speaks, and what. Fields stay
/// loose JSON values so that each wrong one gets its own error code.
#[derive(Debug, Deserialize)]
pub struct RoomPost {
    pub user: Option<serde_json::Value>,
    pub text: Option<serde_json::Value>,
    /// Anonymous servers: the posting token of one of `user`'s sessions.
    pub token: Option<String>,
}

/// The body of `POST /users/<user>/messages`.
#[derive(Debug, Deserialize)]
pub struct DirectPost {
    pub from: Option<serde_json::Value>,
    pub text: Option<serde_json::Value>,
    /// Anonymous servers: the posting token of one of `from`'s sessions.
    pub token: Option<String>,
}

/// The body of `POST /api/rooms/<room>/messages` (the server API).
#[derive(Debug, Deserialize)]
pub struct ApiPost {
    pub from: Option<serde_json::Value>,
    pub text: Option<serde_json::Value>,
}

/// The body of `/healthz`, a ready `/readyz`, and an acceptable SSE probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusBody {
    pub status: String,
    pub node: String,
    pub bus: String,
}
