//! The ways a client reaches a session, one file each. Each only adapts its wire:
//! admission is [`crate::handshake`]'s and the session's life is
//! [`crate::session::serve`]'s, the same for all of them.
//!
//! - [`websocket`]: `GET /ws`, our own upgrade and a small read buffer.
//! - [`sse`]: `GET /rooms/<room>/events`, Server-Sent Events.
//! - [`publish`]: `POST /rooms/<room>/messages` and `POST /users/<user>/messages`,
//!   for clients without a socket; and the server API.
//! - [`history`]: `GET /rooms/<room>/messages`, a room's history.
//! - [`echo`]: `GET /echo`, only with `--echo-endpoint`: a WebSocket echo on the
//!   same upgrade and limits, for conformance runs.

pub mod echo;
pub mod history;
pub mod publish;
pub mod sse;
pub mod websocket;
