//! `GET /echo` (only with `--echo-endpoint`): a WebSocket echo on Warren's own
//! upgrade, buffers and size limits, for RFC 6455 conformance runs (the
//! Autobahn cases, with `kosoku`). It joins no room and touches no bus; it is
//! off by default, since anyone could use it to bounce traffic.

use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tracing::debug;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use warp::reply::{Reply, Response};

use super::websocket::{UpgradeRequest, server_socket, switching_protocols};
use crate::error::{ClientError, ErrorCode};
use crate::session::close_code;

/// Answer the upgrade and echo every data message until the client closes.
pub fn handle(max_frame_bytes: usize, upgrade: Option<UpgradeRequest>) -> Response {
    let Some(UpgradeRequest { key, on_upgrade }) = upgrade else {
        return ClientError::new(ErrorCode::UpgradeRequired, "this endpoint speaks WebSocket")
            .into_response();
    };
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut socket = server_socket(TokioIo::new(upgraded), max_frame_bytes).await;
        while let Some(message) = socket.next().await {
            let reply = match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => message,
                // tungstenite answers pings and close frames itself.
                Ok(_) => continue,
                Err(e) => {
                    let code = match &e {
                        tungstenite::Error::Utf8(_) => Some(close_code::INVALID_PAYLOAD),
                        tungstenite::Error::Protocol(_) => Some(close_code::PROTOCOL_ERROR),
                        tungstenite::Error::Capacity(_) => Some(close_code::MESSAGE_TOO_BIG),
                        _ => None,
                    };
                    debug!(error = %e, "echo connection failed");
                    if let Some(code) = code {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: "".into(),
                        };
                        let _ = socket.close(Some(frame)).await;
                    }
                    return;
                }
            };
            if socket.send(reply).await.is_err() {
                return;
            }
        }
    });
    switching_protocols(&key)
}
