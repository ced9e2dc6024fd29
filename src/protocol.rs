//! The wire protocol, v1: every JSON frame a client or server sends.
//!
//! Frames are JSON objects tagged by `type`. This file is the only place JSON is
//! shaped; `docs/PROTOCOL.md` documents the same types for client authors.

use serde::{Deserialize, Serialize};

use crate::error::{ClientError, ErrorCode};
use crate::names::UserId;

/// Longest `ref` a client may attach to a frame.
pub const MAX_REF_LEN: usize = 64;

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Always the first frame: the session is subscribed from here on.
    Welcome {
        user: String,
        room: String,
        node: String,
        /// Everyone in the room, on every node, the new member included (at most
        /// `--presence-max-members` of them, sorted).
        members: Vec<String>,
        /// How many members the room has in all.
        members_total: usize,
        /// Proof of this session for HTTP publishing as `user` (see `tokens`).
        token: String,
    },
    /// A chat message in a room. Published once, serialised once, delivered as is.
    Message {
        id: String,
        room: String,
        from: String,
        text: String,
        ts: u64,
    },
    /// A direct message from one user to another, in any room, on any node.
    Direct {
        id: String,
        from: String,
        to: String,
        text: String,
        ts: u64,
    },
    /// Who joined and left the room since the last presence frame (batched).
    Presence {
        room: String,
        joins: Vec<String>,
        leaves: Vec<String>,
        /// Only on a resync, after the client missed presence frames: the whole
        /// member list, which replaces what the client had.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        members: Option<Vec<String>>,
    },
    /// The broker confirmed the client's message carrying `ref`.
    Ack {
        #[serde(rename = "ref")]
        reference: String,
        id: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
        reference: Option<String>,
    },
}

impl ServerFrame {
    pub fn error(err: &ClientError, reference: Option<String>) -> Self {
        ServerFrame::Error {
            code: err.code,
            message: err.message.clone(),
            reference,
        }
    }

    /// The frame as JSON text. Serialising these types cannot fail (no maps with
    /// non-string keys, no custom serialisers), so this returns a `String` directly.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialise")
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only tests and clients read error frames; keep the set closed.
        let s = String::deserialize(d)?;
        ALL_CODES
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s}")))
    }
}

const ALL_CODES: [ErrorCode; 19] = [
    ErrorCode::TokenRequired,
    ErrorCode::RequestTimeout,
    ErrorCode::InvalidRequest,
    ErrorCode::UnsupportedMediaType,
    ErrorCode::InvalidRoom,
    ErrorCode::InvalidUser,
    ErrorCode::OriginNotAllowed,
    ErrorCode::UserTaken,
    ErrorCode::UserNotFound,
    ErrorCode::Unavailable,
    ErrorCode::UpgradeRequired,
    ErrorCode::NotFound,
    ErrorCode::MethodNotAllowed,
    ErrorCode::InvalidJson,
    ErrorCode::UnknownType,
    ErrorCode::InvalidMessage,
    ErrorCode::MessageTooLarge,
    ErrorCode::UnsupportedFrame,
    ErrorCode::Internal,
];

/// The JSON body of every HTTP error: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl From<&ClientError> for ErrorBody {
    fn from(e: &ClientError) -> Self {
        ErrorBody {
            code: e.code,
            message: e.message.clone(),
        }
    }
}

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

/// The body of `POST /rooms/<room>/messages`: who speaks, and what.
#[derive(Debug, Deserialize)]
pub struct RoomPost {
    pub user: Option<serde_json::Value>,
    pub text: Option<serde_json::Value>,
    /// Required while `user` holds a session: that session's welcome token.
    pub token: Option<String>,
}

/// The body of `POST /users/<user>/messages`.
#[derive(Debug, Deserialize)]
pub struct DirectPost {
    pub from: Option<serde_json::Value>,
    pub text: Option<serde_json::Value>,
    /// Required while `from` holds a session: that session's welcome token.
    pub token: Option<String>,
}

/// The `type` and, when it has one, the `id` of a serialised server frame,
/// read without parsing the rest: Server-Sent Events name each event by type
/// and id, and the frames arrive as the bytes every receiver shares. Relies on
/// serde writing fields in declaration order (`type` first, then `id` for
/// `message` and `direct`), which the tests below pin.
pub fn frame_head(frame: &str) -> Option<(&str, Option<&str>)> {
    let rest = frame.strip_prefix(r#"{"type":""#)?;
    let (kind, rest) = rest.split_once('"')?;
    let id = rest
        .strip_prefix(r#","id":""#)
        .and_then(|r| r.split_once('"'))
        .map(|(id, _)| id);
    Some((kind, id))
}

/// The body of `/healthz` and a ready `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusBody {
    pub status: String,
    pub node: String,
    pub bus: String,
}

/// A frame a client sends, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"type":"message","text":"hi","ref":"c1"}`
    Message {
        text: String,
        reference: Option<String>,
    },
    /// `{"type":"direct","to":"bob","text":"hi","ref":"c2"}`
    Direct {
        to: UserId,
        text: String,
        reference: Option<String>,
    },
}

/// What a client frame looks like on the wire, before validation.
#[derive(Deserialize)]
struct RawMessage {
    text: Option<serde_json::Value>,
    to: Option<serde_json::Value>,
}

/// A frame that could not be accepted, with the `ref` to echo when one was readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: ClientError,
    pub reference: Option<String>,
}

impl ClientFrame {
    /// Parse and validate one text frame. `max_text_bytes` bounds `text` in UTF-8 bytes.
    pub fn parse(input: &str, max_text_bytes: usize) -> Result<ClientFrame, Rejected> {
        let value: serde_json::Value = serde_json::from_str(input).map_err(|e| Rejected {
            error: ClientError::new(
                ErrorCode::InvalidJson,
                format!("frame is not valid JSON: {e}"),
            ),
            reference: None,
        })?;
        let Some(object) = value.as_object() else {
            return Err(Rejected {
                error: ClientError::new(ErrorCode::InvalidJson, "frame must be a JSON object"),
                reference: None,
            });
        };
        let reference = match object.get("ref") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(r)) if r.chars().count() <= MAX_REF_LEN => {
                Some(r.clone())
            }
            Some(_) => {
                return Err(Rejected {
                    error: ClientError::new(
                        ErrorCode::InvalidMessage,
                        format!("ref must be a string of at most {MAX_REF_LEN} characters"),
                    ),
                    reference: None,
                });
            }
        };
        let reject = |code, message: String| Rejected {
            error: ClientError::new(code, message),
            reference: reference.clone(),
        };
        let kind = match object.get("type") {
            Some(serde_json::Value::String(kind)) => kind.as_str(),
            Some(_) => {
                return Err(reject(
                    ErrorCode::UnknownType,
                    "type must be a string".into(),
                ));
            }
            None => return Err(reject(ErrorCode::UnknownType, "frame has no type".into())),
        };
        let direct = match kind {
            "message" => false,
            "direct" => true,
            other => {
                return Err(reject(
                    ErrorCode::UnknownType,
                    format!("unknown frame type {:?}", truncate(other, 32)),
                ));
            }
        };
        let raw: RawMessage = serde_json::from_value(value.clone())
            .map_err(|e| reject(ErrorCode::InvalidMessage, e.to_string()))?;
        let to = if direct {
            match raw.to {
                Some(serde_json::Value::String(to)) => Some(
                    UserId::parse(&to)
                        .map_err(|e| reject(ErrorCode::InvalidUser, e.to_string()))?,
                ),
                _ => {
                    return Err(reject(
                        ErrorCode::InvalidUser,
                        "to must name the recipient's user id".into(),
                    ));
                }
            }
        } else {
            None
        };
        let text = validate_text(raw.text, max_text_bytes).map_err(|(code, m)| reject(code, m))?;
        Ok(match to {
            Some(to) => ClientFrame::Direct {
                to,
                text,
                reference,
            },
            None => ClientFrame::Message { text, reference },
        })
    }
}

/// The rules every chat text follows, whatever carries it (WebSocket or HTTP).
pub fn validate_text(
    text: Option<serde_json::Value>,
    max_text_bytes: usize,
) -> Result<String, (ErrorCode, String)> {
    let text = match text {
        Some(serde_json::Value::String(text)) => text,
        Some(_) => return Err((ErrorCode::InvalidMessage, "text must be a string".into())),
        None => return Err((ErrorCode::InvalidMessage, "text is missing".into())),
    };
    if text.len() > max_text_bytes {
        return Err((
            ErrorCode::MessageTooLarge,
            format!(
                "text is {} bytes; the limit is {max_text_bytes}",
                text.len()
            ),
        ));
    }
    if text.trim().is_empty() {
        return Err((ErrorCode::InvalidMessage, "text is empty".into()));
    }
    Ok(text)
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(input: &str) -> ErrorCode {
        ClientFrame::parse(input, 10).unwrap_err().error.code
    }

    #[test]
    fn accepts_a_message() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"message","text":"hi","ref":"c1"}"#, 10).unwrap(),
            ClientFrame::Message {
                text: "hi".into(),
                reference: Some("c1".into())
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"message","text":"hi"}"#, 10).unwrap(),
            ClientFrame::Message {
                text: "hi".into(),
                reference: None
            }
        );
    }

    #[test]
    fn refuses_bad_frames_with_their_codes() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"text":"x"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"message"}"#), ErrorCode::InvalidMessage);
        assert_eq!(
            code(r#"{"type":"message","text":""}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"message","text":" \n\t"}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"message","text":5}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"message","text":"12345678901"}"#),
            ErrorCode::MessageTooLarge
        );
        let long_ref = "r".repeat(65);
        assert_eq!(
            code(&format!(
                r#"{{"type":"message","text":"x","ref":"{long_ref}"}}"#
            )),
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn direct_messages() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"direct","to":"bob","text":"hi","ref":"c2"}"#, 10)
                .unwrap(),
            ClientFrame::Direct {
                to: UserId::parse("bob").unwrap(),
                text: "hi".into(),
                reference: Some("c2".into())
            }
        );
        assert_eq!(
            code(r#"{"type":"direct","text":"hi"}"#),
            ErrorCode::InvalidUser
        );
        assert_eq!(
            code(r#"{"type":"direct","to":"b b","text":"hi"}"#),
            ErrorCode::InvalidUser
        );
        assert_eq!(
            code(r#"{"type":"direct","to":"bob","text":" "}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"direct","to":"bob","text":"12345678901"}"#),
            ErrorCode::MessageTooLarge
        );
    }

    #[test]
    fn frame_heads() {
        let message = ServerFrame::Message {
            id: "m-1".into(),
            room: "r".into(),
            from: "a".into(),
            text: "\"type\":\"x\"".into(),
            ts: 1,
        };
        assert_eq!(
            frame_head(&message.to_json()),
            Some(("message", Some("m-1")))
        );
        let direct = ServerFrame::Direct {
            id: "d-1".into(),
            from: "a".into(),
            to: "b".into(),
            text: "t".into(),
            ts: 1,
        };
        assert_eq!(frame_head(&direct.to_json()), Some(("direct", Some("d-1"))));
        let presence = ServerFrame::Presence {
            room: "r".into(),
            joins: vec![],
            leaves: vec![],
            members: None,
        };
        assert_eq!(frame_head(&presence.to_json()), Some(("presence", None)));
        assert_eq!(frame_head("nonsense"), None);
    }

    #[test]
    fn echoes_the_ref_of_a_rejected_frame() {
        let rejected =
            ClientFrame::parse(r#"{"type":"message","text":"","ref":"c9"}"#, 10).unwrap_err();
        assert_eq!(rejected.reference.as_deref(), Some("c9"));
    }

    #[test]
    fn text_limit_counts_utf8_bytes() {
        // Five characters, eleven bytes.
        assert_eq!(
            code(r#"{"type":"message","text":"éééé€"}"#),
            ErrorCode::MessageTooLarge
        );
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let frame = ServerFrame::Message {
            id: "m1".into(),
            room: "lobby".into(),
            from: "alice".into(),
            text: "hi".into(),
            ts: 5,
        };
        assert_eq!(
            frame.to_json(),
            r#"{"type":"message","id":"m1","room":"lobby","from":"alice","text":"hi","ts":5}"#
        );
        let err = ServerFrame::Error {
            code: ErrorCode::InvalidJson,
            message: "bad".into(),
            reference: None,
        };
        assert_eq!(
            err.to_json(),
            r#"{"type":"error","code":"invalid_json","message":"bad"}"#
        );
        let ack = ServerFrame::Ack {
            reference: "c1".into(),
            id: "m1".into(),
        };
        assert_eq!(ack.to_json(), r#"{"type":"ack","ref":"c1","id":"m1"}"#);
        let back: ServerFrame = serde_json::from_str(&err.to_json()).unwrap();
        assert_eq!(back, err);
    }
}
