//! The error codes a client can see, in one place.
//!
//! Every error a client can cause — over HTTP before the upgrade or as an
//! `error` frame afterwards — is one [`ErrorCode`]. Its wire name, HTTP status and
//! default text live here so `docs/PROTOCOL.md` can list them from one table.

use serde::Serialize;
use warp::http::StatusCode;

/// A documented, client-visible error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRoom,
    InvalidUser,
    OriginNotAllowed,
    UserTaken,
    UserNotFound,
    Unavailable,
    UpgradeRequired,
    NotFound,
    MethodNotAllowed,
    InvalidJson,
    UnknownType,
    InvalidMessage,
    MessageTooLarge,
    UnsupportedFrame,
    UnsupportedMediaType,
    RequestTimeout,
    InvalidRequest,
    TokenRequired,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidUser => "invalid_user",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::UserTaken => "user_taken",
            ErrorCode::UserNotFound => "user_not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UpgradeRequired => "upgrade_required",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::UnsupportedFrame => "unsupported_frame",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::TokenRequired => "token_required",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status this code is answered with, where it is answered over HTTP.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRoom
            | ErrorCode::InvalidUser
            | ErrorCode::InvalidJson
            | ErrorCode::UnknownType
            | ErrorCode::InvalidMessage
            | ErrorCode::UnsupportedFrame => StatusCode::BAD_REQUEST,
            ErrorCode::OriginNotAllowed | ErrorCode::TokenRequired => StatusCode::FORBIDDEN,
            ErrorCode::NotFound | ErrorCode::UserNotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::UserTaken => StatusCode::CONFLICT,
            ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error a client caused or must be told about: a code and a human sentence.
///
/// Internal details (broker error texts, stack of causes) never go into
/// `message`; they are logged where the error happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ClientError {
    pub code: ErrorCode,
    pub message: String,
}

impl ClientError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<crate::names::NameError> for ClientError {
    fn from(e: crate::names::NameError) -> Self {
        let code = match e {
            crate::names::NameError::InvalidRoom => ErrorCode::InvalidRoom,
            crate::names::NameError::InvalidUser => ErrorCode::InvalidUser,
        };
        ClientError::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde() {
        for code in [
            ErrorCode::InvalidRoom,
            ErrorCode::UserTaken,
            ErrorCode::MessageTooLarge,
            ErrorCode::UnsupportedFrame,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(ErrorCode::UserTaken.status(), StatusCode::CONFLICT);
        assert_eq!(ErrorCode::OriginNotAllowed.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            ErrorCode::Unavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
