//! Warren: a WebSocket chat server whose nodes scale out through RabbitMQ.
//!
//! # Layout
//!
//! A message travels socket → session → bus → RabbitMQ → consumer → socket, and
//! the files follow it. Imports run one way, down this list:
//!
//! - [`server`]: binds the port, serves [`routes`], shuts down in order.
//! - [`listener`]: the accept loop (hyper, HTTP/1.1 with upgrades);
//!   [`listener::unparsable`] gives hyper's own parse-error answers their JSON body.
//! - [`routes`]: every HTTP route as a warp filter.
//! - [`transport`]: one file per way in — [`transport::websocket`],
//!   [`transport::sse`] (Server-Sent Events) and [`transport::publish`] (HTTP
//!   POST). Each only adapts its wire.
//! - [`handshake`]: admission shared by every transport: validate, claim a
//!   session slot of the user id, open the session's queue on the bus — before
//!   any byte of the stream is sent.
//! - [`session`]: one session's life, once for every transport: welcome, the
//!   loop ([`session::events`]), its rooms ([`session::rooms`]), cleanup;
//!   [`session::connection`] is what a transport implements.
//! - [`node`]: what a node's sessions and handlers share, its lifecycle and its
//!   readiness.
//! - [`bus`]: the one abstraction sessions publish to and receive from, with two
//!   homes: [`bus::amqp`] (an exclusive queue per session on a fanout exchange
//!   per room, over [`bus::pool`]) and [`bus::memory`] (embedded, one node).
//! - [`presence`]: who is in each room across nodes, and the live node list,
//!   gossiped between nodes over the bus ([`presence::view`] is the pure state).
//! - [`auth`]: verifying the application's tokens (JWT, JWKS) and what their
//!   claims allow (room patterns).
//! - [`limits`]: connections per client address.
//! - [`claims`]: which session slots of which user ids this node holds.
//! - [`tokens`]: posting tokens, so HTTP publishing cannot speak for a
//!   connected user.
//! - [`metrics`]: the node's Prometheus metrics.
//! - [`protocol`]: the JSON frames and bodies (the wire protocol, `docs/PROTOCOL.md`).
//! - [`names`]: validated room and user names.
//! - [`error`]: every client-visible error code, its HTTP status and reply.
//! - [`config`]: flags and environment variables.
//! - [`shutdown`]: the process signals that stop a node.

pub mod auth;
pub mod bus;
pub mod claims;
pub mod config;
pub mod error;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod names;
pub mod node;
pub mod presence;
pub mod protocol;
pub mod routes;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tokens;
pub mod transport;

pub use config::Config;
pub use server::RunningServer;
