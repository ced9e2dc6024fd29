//! The error codes a client can see, in one place.
//!
//! Every error a client can cause — over HTTP before the upgrade or as an
//! `error` frame afterwards — is one [`ErrorCode`]. The [`error_codes!`] table
//! below is the only list of them: each code's wire name and HTTP status are
//! written once, and the enum, its (de)serialisation and [`ErrorCode::ALL`]
//! (which the tests compare with `docs/PROTOCOL.md`) all come from it.
//!
//! A [`ClientError`] answers itself over HTTP ([`warp::Reply`]): one status, one
//! `{"code", "message"}` body, so no transport needs the routes to refuse.

use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

/// Defines [`ErrorCode`] from one table of `Variant => "wire_name", STATUS`.
macro_rules! error_codes {
    ($($variant:ident => $wire:literal, $status:ident;)*) => {
        /// A documented, client-visible error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum ErrorCode {
            $( #[serde(rename = $wire)] $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the table's order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $wire,)* }
            }

            /// The HTTP status this code is answered with, where it is answered
            /// over HTTP.
            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status,)* }
            }
        }
    };
}

error_codes! {
    InvalidRoom => "invalid_room", BAD_REQUEST;
    InvalidUser => "invalid_user", BAD_REQUEST;
    OriginNotAllowed => "origin_not_allowed", FORBIDDEN;
    TokenRequired => "token_required", FORBIDDEN;
    UserNotFound => "user_not_found", NOT_FOUND;
    TooManySessions => "too_many_sessions", CONFLICT;
    TooManyRooms => "too_many_rooms", CONFLICT;
    NotSubscribed => "not_subscribed", CONFLICT;
    RequestTimeout => "request_timeout", REQUEST_TIMEOUT;
    MessageTooLarge => "message_too_large", PAYLOAD_TOO_LARGE;
    UnsupportedMediaType => "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE;
    UpgradeRequired => "upgrade_required", UPGRADE_REQUIRED;
    Unavailable => "unavailable", SERVICE_UNAVAILABLE;
    NotFound => "not_found", NOT_FOUND;
    MethodNotAllowed => "method_not_allowed", METHOD_NOT_ALLOWED;
    InvalidRequest => "invalid_request", BAD_REQUEST;
    UriTooLong => "uri_too_long", URI_TOO_LONG;
    HeadersTooLarge => "headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE;
    InvalidJson => "invalid_json", BAD_REQUEST;
    UnknownType => "unknown_type", BAD_REQUEST;
    InvalidMessage => "invalid_message", BAD_REQUEST;
    UnsupportedFrame => "unsupported_frame", BAD_REQUEST;
    Internal => "internal", INTERNAL_SERVER_ERROR;
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

    /// The broker cannot be reached or would not answer in time.
    pub fn unavailable() -> Self {
        Self::new(
            ErrorCode::Unavailable,
            "the message broker is unavailable; retry shortly",
        )
    }
}

/// The JSON body of every HTTP error: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl Reply for ClientError {
    /// The one shape of every HTTP error. The code rides along as a response
    /// extension so the route tree can count errors by code in one place.
    fn into_response(self) -> Response {
        let status = self.code.status();
        let code = self.code;
        let body = ErrorBody {
            code,
            message: self.message,
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), status).into_response();
        response.extensions_mut().insert(code);
        response
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
    fn wire_names_match_serde_both_ways() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert!(serde_json::from_str::<ErrorCode>("\"no_such_code\"").is_err());
    }

    #[test]
    fn every_code_is_documented_with_its_status() {
        let doc = include_str!("../docs/PROTOCOL.md");
        for &code in ErrorCode::ALL {
            let row = format!("| `{}` | ", code.as_str());
            let line = doc
                .lines()
                .find(|l| l.starts_with(&row))
                .unwrap_or_else(|| panic!("{code} is missing from PROTOCOL.md's error table"));
            let status = code.status().as_u16().to_string();
            assert!(
                line[row.len()..].starts_with(&status)
                    || line[row.len()..].starts_with(&format!("({status})")),
                "PROTOCOL.md gives {code} another status: {line}"
            );
        }
    }

    #[test]
    fn replies_carry_their_code_and_status() {
        let r = ClientError::new(ErrorCode::TooManySessions, "x").into_response();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(
            r.extensions().get::<ErrorCode>(),
            Some(&ErrorCode::TooManySessions)
        );
    }
}
