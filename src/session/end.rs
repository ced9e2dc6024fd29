//! Why a session ends, and what the client is told: the close code whose
//! number tells a client whether to reconnect (as centrifuge's `Disconnect`).

/// Close codes this server sends (RFC 6455 §7.4.1 and the IANA registry).
pub mod close_code {
    /// The server is shutting down, or the client stopped answering pings.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol: do not retry as is.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not UTF-8: do not retry as is.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client keeps sending invalid frames: do not retry as is.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A WebSocket message over `--max-frame-bytes`: do not retry as is.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The node is draining for a restart: reconnect (to another node).
    pub const SERVICE_RESTART: u16 = 1012;
    /// The broker is unreachable: reconnect later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The session's token expired without a valid `refresh`: reconnect with
    /// a fresh token (a private-use code, RFC 6455 §7.4.2).
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// Why a session ended; logged once by the task that ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent a close frame.
    ClientClosed,
    /// The client went away, or a write to it failed or timed out.
    ClientGone(String),
    Shutdown,
    Restart,
    /// The broker went away or stopped taking messages.
    BrokerLost,
    TooLarge,
    Abusive,
    /// No answer to pings for two intervals.
    Silent,
    /// Its token expired and no valid `refresh` came.
    TokenExpired,
    /// A text message that was not UTF-8.
    InvalidUtf8,
    /// A frame that broke the WebSocket protocol.
    ProtocolError(String),
}

impl SessionEnd {
    /// Whether the session's queue waits for a resume: when the client may
    /// come back for it (its socket dropped, the node or the broker went, its
    /// token ran out), not when it left or was sent away.
    pub fn release(&self) -> crate::bus::Release {
        use crate::bus::Release::{Delete, KeepForResume};
        match self {
            SessionEnd::ClientGone(_)
            | SessionEnd::Shutdown
            | SessionEnd::Restart
            | SessionEnd::BrokerLost
            | SessionEnd::Silent
            | SessionEnd::TokenExpired => KeepForResume,
            SessionEnd::ClientClosed
            | SessionEnd::TooLarge
            | SessionEnd::Abusive
            | SessionEnd::InvalidUtf8
            | SessionEnd::ProtocolError(_) => Delete,
        }
    }

    /// The close frame that tells the client why, where the session ends it.
    pub fn close_frame(&self) -> Option<(u16, &'static str)> {
        match self {
            SessionEnd::ClientClosed | SessionEnd::ClientGone(_) => None,
            SessionEnd::Shutdown => Some((close_code::GOING_AWAY, "server shutting down")),
            SessionEnd::Restart => {
                Some((close_code::SERVICE_RESTART, "node restarting; reconnect"))
            }
            SessionEnd::BrokerLost => Some((close_code::TRY_AGAIN_LATER, "broker unavailable")),
            SessionEnd::TooLarge => Some((close_code::MESSAGE_TOO_BIG, "message too big")),
            SessionEnd::Abusive => Some((close_code::POLICY_VIOLATION, "too many invalid frames")),
            SessionEnd::Silent => Some((close_code::GOING_AWAY, "no answer to pings")),
            SessionEnd::TokenExpired => Some((close_code::TOKEN_EXPIRED, "token expired")),
            SessionEnd::InvalidUtf8 => Some((close_code::INVALID_PAYLOAD, "text is not UTF-8")),
            SessionEnd::ProtocolError(_) => Some((close_code::PROTOCOL_ERROR, "protocol error")),
        }
    }
}
