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
    InvalidSession => "invalid_session", BAD_REQUEST;
    OriginNotAllowed => "origin_not_allowed", FORBIDDEN;
    TokenRequired => "token_required", UNAUTHORIZED;
    InvalidToken => "invalid_token", UNAUTHORIZED;
    TokenExpired => "token_expired", UNAUTHORIZED;
    Forbidden => "forbidden", FORBIDDEN;
    RateLimited => "rate_limited", TOO_MANY_REQUESTS;
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
    /// For `rate_limited`: how long to wait before trying again.
    pub retry_after_ms: Option<u64>,
}

impl ClientError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A `rate_limited` refusal: try again after `wait`.
    pub fn rate_limited(message: impl Into<String>, wait: std::time::Duration) -> Self {
        Self {
            retry_after_ms: Some(wait.as_millis().max(1) as u64),
            ..Self::new(ErrorCode::RateLimited, message)
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

/// The JSON body of every HTTP error: `{"code": "...", "message": "..."}`,
/// plus `retry_after_ms` on `rate_limited`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry_after_ms: Option<u64>,
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
            retry_after_ms: self.retry_after_ms,
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), status).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert("retry-after", warp::http::HeaderValue::from(secs));
        }
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
