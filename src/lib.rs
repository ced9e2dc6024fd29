//! Warren: a WebSocket chat server whose nodes scale out through RabbitMQ.
//!
//! # Layout
//!
//! A message travels socket → session → bus → RabbitMQ → consumer → socket, and
//! the files follow it:
//!
//! - [`server`]: a running node: binds the port, holds the shared [`server::Node`]
//!   state, and shuts everything down in order.
//! - [`http`]: every HTTP route as a warp filter; JSON error bodies.
//! - [`handshake`]: admission shared by every transport: validate, claim the
//!   user id, subscribe on the bus — before any byte of the stream is sent.
//! - [`upgrade`]: the WebSocket transport.
//! - [`sse`]: the Server-Sent Events transport; [`publish`]: HTTP publishing.
//! - [`metrics`]: the node's Prometheus metrics.
//! - [`session`]: one connection's loop: client frames in, publishes out,
//!   deliveries forwarded as they are, acks once the broker confirms.
//! - [`protocol`]: the JSON frames (the wire protocol, `docs/PROTOCOL.md`).
//! - [`bus`]: the one abstraction sessions publish to and receive from, with two
//!   homes: [`bus::amqp`] (an exclusive queue per session on a fanout exchange
//!   per room, over [`bus::pool`]) and [`bus::memory`] (embedded, one node).
//! - [`presence`]: who is in each room across nodes, and the live node list,
//!   gossiped between nodes over the bus ([`presence::view`] is the pure state).
//! - [`claims`]: which user ids have a session on this node.
//! - [`tokens`]: posting tokens, so HTTP publishing cannot speak for a
//!   connected user.
//! - [`names`]: validated room and user names.
//! - [`error`]: every client-visible error code, its HTTP status.
//! - [`config`]: flags and environment variables.
//! - [`shutdown`]: the process signals that stop a node.

pub mod bus;
pub mod claims;
pub mod config;
pub mod error;
pub mod handshake;
pub mod http;
pub mod metrics;
pub mod names;
pub mod presence;
pub mod protocol;
pub mod publish;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sse;
pub mod tokens;
pub mod upgrade;

pub use config::Config;
pub use server::RunningServer;
