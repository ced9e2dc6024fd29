//! The frames a client sends over a WebSocket, parsed and validated, and the
//! rules every chat text follows whatever carries it.

use serde::Deserialize;

use crate::error::{ClientError, ErrorCode};
use crate::names::{RoomName, UserId};

/// Longest `ref` a client may attach to a frame.
pub const MAX_REF_LEN: usize = 64;

/// A frame a client sends, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"type":"message","room":"lobby","text":"hi","ref":"c1"}`; `room` may
    /// be left out while the connection has exactly one subscription.
    Message {
        room: Option<RoomName>,
        text: String,
        reference: Option<String>,
    },
    /// `{"type":"subscribe","room":"lobby","ref":"c3"}`, optionally with
    /// `"history":50` (the last 50 messages) or `"since":"<id>"` (those after
    /// it) before live traffic.
    Subscribe {
        room: RoomName,
        reference: Option<String>,
        history: Option<HistoryRequest>,
    },
    /// `{"type":"unsubscribe","room":"lobby","ref":"c4"}`
    Unsubscribe {
        room: RoomName,
        reference: Option<String>,
    },
    /// `{"type":"refresh","token":"…","ref":"c5"}`: a fresh token for the session.
    Refresh {
        token: String,
        reference: Option<String>,
    },
    /// `{"type":"direct","to":"bob","text":"hi","ref":"c2"}`; with
    /// `"receipt":true` the sender is told when a connection of `bob` has
    /// acknowledged it (`delivered`).
    Direct {
        to: UserId,
        text: String,
        reference: Option<String>,
        receipt: bool,
    },
    /// `{"type":"ack_upto","seq":42}`: every delivery up to `seq` is processed
    /// (connections opened with `acks=client`); no answer unless refused.
    AckUpto { seq: u64 },
}

/// The history a `subscribe` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryRequest {
    /// The last `n` messages.
    Last(usize),
    /// The messages after this id.
    Since(String),
}

/// Longest message id a client may name (ids are far shorter).
pub const MAX_ID_LEN: usize = 128;

/// What a client frame looks like on the wire, before validation.
#[derive(Deserialize)]
struct RawMessage {
    text: Option<serde_json::Value>,
    to: Option<serde_json::Value>,
    room: Option<serde_json::Value>,
    token: Option<serde_json::Value>,
    seq: Option<serde_json::Value>,
    history: Option<serde_json::Value>,
    since: Option<serde_json::Value>,
    receipt: Option<serde_json::Value>,
}

/// The kinds of frame a client may send.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Direct,
    Subscribe,
    Unsubscribe,
    Refresh,
    AckUpto,
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
        let kind = match kind {
            "message" => Kind::Message,
            "direct" => Kind::Direct,
            "subscribe" => Kind::Subscribe,
            "unsubscribe" => Kind::Unsubscribe,
            "refresh" => Kind::Refresh,
            "ack_upto" => Kind::AckUpto,
            other => {
                return Err(reject(
                    ErrorCode::UnknownType,
                    format!("unknown frame type {:?}", truncate(other, 32)),
                ));
            }
        };
        let raw: RawMessage = serde_json::from_value(value.clone())
            .map_err(|e| reject(ErrorCode::InvalidMessage, e.to_string()))?;
        if kind == Kind::AckUpto {
            return match raw.seq.as_ref().and_then(serde_json::Value::as_u64) {
                Some(seq) => Ok(ClientFrame::AckUpto { seq }),
                None => Err(reject(
                    ErrorCode::InvalidMessage,
                    "seq must be the seq of a delivery (a non-negative integer)".into(),
                )),
            };
        }
        if kind == Kind::Refresh {
            return match raw.token {
                Some(serde_json::Value::String(token)) => {
                    Ok(ClientFrame::Refresh { token, reference })
                }
                _ => Err(reject(
                    ErrorCode::InvalidToken,
                    "token must be the new token".into(),
                )),
            };
        }
        let room = match raw.room {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(room)) => Some(
                RoomName::parse(&room)
                    .map_err(|e| reject(ErrorCode::InvalidRoom, e.to_string()))?,
            ),
            Some(_) => {
                return Err(reject(
                    ErrorCode::InvalidRoom,
                    "room must be a room name".into(),
                ));
            }
        };
        match kind {
            Kind::Subscribe | Kind::Unsubscribe => {
                let Some(room) = room else {
                    return Err(reject(
                        ErrorCode::InvalidRoom,
                        "room must name the room".into(),
                    ));
                };
                return Ok(if kind == Kind::Subscribe {
                    let history = match (raw.history, raw.since) {
                        (
                            None | Some(serde_json::Value::Null),
                            None | Some(serde_json::Value::Null),
                        ) => None,
                        (Some(n), None | Some(serde_json::Value::Null)) => match n.as_u64() {
                            Some(n) => Some(HistoryRequest::Last(
                                usize::try_from(n).unwrap_or(usize::MAX),
                            )),
                            None => {
                                return Err(reject(
                                    ErrorCode::InvalidMessage,
                                    "history must be how many messages (a non-negative integer)"
                                        .into(),
                                ));
                            }
                        },
                        (
                            None | Some(serde_json::Value::Null),
                            Some(serde_json::Value::String(id)),
                        ) if !id.is_empty() && id.len() <= MAX_ID_LEN => {
                            Some(HistoryRequest::Since(id))
                        }
                        (None | Some(serde_json::Value::Null), Some(_)) => {
                            return Err(reject(
                                ErrorCode::InvalidMessage,
                                format!("since must be a message id (at most {MAX_ID_LEN} bytes)"),
                            ));
                        }
                        (Some(_), Some(_)) => {
                            return Err(reject(
                                ErrorCode::InvalidMessage,
                                "ask for history or since, not both".into(),
                            ));
                        }
                    };
                    ClientFrame::Subscribe {
                        room,
                        reference,
                        history,
                    }
                } else {
                    ClientFrame::Unsubscribe { room, reference }
                });
            }
            Kind::Message | Kind::Direct | Kind::Refresh | Kind::AckUpto => {}
        }
        let to = if kind == Kind::Direct {
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
        let text = validate_text(raw.text, max_text_bytes).map_err(|error| Rejected {
            error,
            reference: reference.clone(),
        })?;
        let receipt = match raw.receipt {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Bool(true)) if to.is_some() => true,
            Some(_) => {
                return Err(reject(
                    ErrorCode::InvalidMessage,
                    "receipt is true or false, on a direct message".into(),
                ));
            }
        };
        Ok(match to {
            Some(to) => ClientFrame::Direct {
                to,
                text,
                reference,
                receipt,
            },
            None => ClientFrame::Message {
                room,
                text,
                reference,
            },
        })
    }
}

/// The rules every chat text follows, whatever carries it (WebSocket or HTTP).
pub fn validate_text(
    text: Option<serde_json::Value>,
    max_text_bytes: usize,
) -> Result<String, ClientError> {
    let text = match text {
        Some(serde_json::Value::String(text)) => text,
        Some(_) => {
            return Err(ClientError::new(
                ErrorCode::InvalidMessage,
                "text must be a string",
            ));
        }
        None => {
            return Err(ClientError::new(
                ErrorCode::InvalidMessage,
                "text is missing",
            ));
        }
    };
    if text.len() > max_text_bytes {
        return Err(ClientError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "text is {} bytes; the limit is {max_text_bytes}",
                text.len()
            ),
        ));
    }
    if text.trim().is_empty() {
        return Err(ClientError::new(ErrorCode::InvalidMessage, "text is empty"));
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
                room: None,
                text: "hi".into(),
                reference: Some("c1".into())
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"message","room":"r","text":"hi"}"#, 10).unwrap(),
            ClientFrame::Message {
                room: Some(RoomName::parse("r").unwrap()),
                text: "hi".into(),
                reference: None
            }
        );
        assert_eq!(
            code(r#"{"type":"message","room":"a b","text":"hi"}"#),
            ErrorCode::InvalidRoom
        );
        assert_eq!(
            code(r#"{"type":"message","room":7,"text":"hi"}"#),
            ErrorCode::InvalidRoom
        );
    }

    #[test]
    fn subscriptions() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"subscribe","room":"r","ref":"c3"}"#, 10).unwrap(),
            ClientFrame::Subscribe {
                room: RoomName::parse("r").unwrap(),
                reference: Some("c3".into()),
                history: None,
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"subscribe","room":"r","history":50}"#, 10).unwrap(),
            ClientFrame::Subscribe {
                room: RoomName::parse("r").unwrap(),
                reference: None,
                history: Some(HistoryRequest::Last(50)),
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"subscribe","room":"r","since":"a-1"}"#, 10).unwrap(),
            ClientFrame::Subscribe {
                room: RoomName::parse("r").unwrap(),
                reference: None,
                history: Some(HistoryRequest::Since("a-1".into())),
            }
        );
        for bad in [
            r#"{"type":"subscribe","room":"r","history":-1}"#,
            r#"{"type":"subscribe","room":"r","history":"5"}"#,
            r#"{"type":"subscribe","room":"r","since":7}"#,
            r#"{"type":"subscribe","room":"r","since":""}"#,
            r#"{"type":"subscribe","room":"r","history":5,"since":"a"}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::InvalidMessage, "{bad}");
        }
        assert_eq!(
            ClientFrame::parse(r#"{"type":"unsubscribe","room":"r"}"#, 10).unwrap(),
            ClientFrame::Unsubscribe {
                room: RoomName::parse("r").unwrap(),
                reference: None
            }
        );
        assert_eq!(code(r#"{"type":"subscribe"}"#), ErrorCode::InvalidRoom);
        assert_eq!(
            code(r#"{"type":"unsubscribe","room":"no/slash"}"#),
            ErrorCode::InvalidRoom
        );
    }

    #[test]
    fn acks() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ack_upto","seq":42}"#, 10).unwrap(),
            ClientFrame::AckUpto { seq: 42 }
        );
        for bad in [
            r#"{"type":"ack_upto"}"#,
            r#"{"type":"ack_upto","seq":-1}"#,
            r#"{"type":"ack_upto","seq":"7"}"#,
            r#"{"type":"ack_upto","seq":1.5}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::InvalidMessage, "{bad}");
        }
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
                reference: Some("c2".into()),
                receipt: false,
            }
        );
        assert!(matches!(
            ClientFrame::parse(
                r#"{"type":"direct","to":"bob","text":"hi","receipt":true}"#,
                10
            ),
            Ok(ClientFrame::Direct { receipt: true, .. })
        ));
        assert_eq!(
            code(r#"{"type":"direct","to":"bob","text":"hi","receipt":"yes"}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"message","text":"hi","receipt":true}"#),
            ErrorCode::InvalidMessage
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
}
