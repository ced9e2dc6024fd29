//! What a session needs from the connection it runs on.
//!
//! Every transport (WebSocket, Server-Sent Events) implements [`Transport`] for
//! its outgoing half and hands the session a stream of [`Inbound`] events for
//! its incoming half; the session lifecycle and loop exist once, in
//! [`crate::session`], as centrifuge's one `Client` serves all its transports.

use std::future::Future;

use tungstenite::Utf8Bytes;

use super::SessionEnd;
use crate::metrics;

/// The outgoing half of a client connection.
pub trait Transport: Send {
    /// Which transport this is, for metrics.
    const KIND: metrics::Transport;
    /// Whether the session pings this client and drops it when it stays silent.
    /// A WebSocket answers pings; an event stream cannot, and its keep-alive
    /// comments are written by the HTTP layer.
    const PINGS: bool;
    /// Whether a client of this transport can come back for its session
    /// (`?resume=`), so its queue is kept when the connection drops. An event
    /// stream's URL names no session to resume.
    const RESUMABLE: bool;

    /// Write `frames` (serialised JSON, each one frame or event), in order, as
    /// one flush. The session bounds how long this may take.
    fn send(
        &mut self,
        frames: Vec<Utf8Bytes>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Ask the client for a sign of life. Only called when [`Self::PINGS`].
    fn ping(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// End the connection, telling the client why where the transport can (a
    /// WebSocket close frame with [`SessionEnd::close_frame`]). Bounded by the
    /// transport; never fails.
    fn close(&mut self, end: &SessionEnd) -> impl Future<Output = ()> + Send;
}

/// What the incoming half of a connection reports.
#[derive(Debug)]
pub enum Inbound {
    Text(String),
    Binary,
    /// Pings and pongs: proof of life, answered by the WebSocket layer itself.
    Control,
    Close,
    /// A message over the size limit; the connection cannot go on.
    TooLarge,
    /// A text message that is not UTF-8 (RFC 6455: close with 1007).
    InvalidUtf8,
    /// A frame that breaks the WebSocket protocol: reserved bits or opcodes,
    /// an unmasked client frame, a bad control frame (close with 1002).
    ProtocolError(String),
    /// The transport failed, or the client went away.
    Failed(String),
}

/// A write that did not reach the client.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The client is gone (the socket or the response body was closed).
    #[error("the client is gone")]
    Closed,
    #[error("{0}")]
    Failed(String),
}
