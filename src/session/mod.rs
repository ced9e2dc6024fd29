//! One chat session, whatever transport carries it.
//!
//! A transport (one of the WebSocket, SSE and HTTP adapters) admits a client ([`crate::handshake`]) and
//! then hands the session to [`serve`], which runs its whole life once for every
//! transport: count it, join presence, write `welcome`, run the loop
//! ([`events::Session`]), leave presence, delete its queue, free its user id.
//!
//! - [`connection`]: the small interface a transport implements.
//! - [`events`]: the loop, one method per event.
//! - [`end`]: why a session ends, and the close code that tells the client.

pub mod connection;
pub mod end;
pub mod events;

use std::future::Future;
use std::sync::Arc;

use futures_util::Stream;
use tracing::info;

pub use connection::{Inbound, Transport, TransportError};
pub use end::{SessionEnd, close_code};
pub use events::{ERROR_BUDGET, MAX_IN_FLIGHT, WRITE_TIMEOUT};

use crate::bus::Subscription;
use crate::handshake::{Admitted, Member};
use crate::node::Node;
use crate::presence::Joined;
use crate::protocol::ServerFrame;

/// Run an admitted session to its end. `open` starts the transport with the
/// `welcome` frame as its first frame and returns its two halves; a transport
/// that cannot even send `welcome` ends the session there.
pub async fn serve<T, R, F>(node: Arc<Node>, admitted: Admitted, open: impl FnOnce(String) -> F)
where
    T: Transport,
    R: Stream<Item = Inbound> + Unpin,
    F: Future<Output = Result<(T, R), TransportError>>,
{
    let Admitted {
        member,
        claim,
        subscription,
    } = admitted;
    let open_sessions = node.metrics.connections(T::KIND);
    open_sessions.inc();
    info!("connected");
    let mut joined = node
        .presence
        .join(member.room.as_str(), member.user.as_str())
        .await;
    let welcome = welcome(&mut joined, &member, &node);
    let (end, lease) = match open(welcome).await {
        Ok((outbound, inbound)) => {
            let Subscription {
                publisher,
                inbox,
                lease,
            } = subscription;
            let session = events::Session::new(&node, &member, outbound, publisher, inbox, joined);
            (session.run(inbound).await, lease)
        }
        Err(e) => {
            drop(joined);
            (
                SessionEnd::ClientGone(e.to_string()),
                subscription.into_lease(),
            )
        }
    };
    node.presence
        .leave(member.room.as_str(), member.user.as_str())
        .await;
    lease.release().await;
    drop(claim);
    open_sessions.dec();
    info!(?end, "disconnected");
}

/// The `welcome` frame a session starts with, as JSON. It takes the member list
/// out of `joined`: in a large room that list is the biggest thing a session
/// ever holds, and nothing needs it once it is sent.
fn welcome(joined: &mut Joined, member: &Member, node: &Node) -> String {
    ServerFrame::Welcome {
        user: member.user.to_string(),
        room: member.room.to_string(),
        node: node.id.clone(),
        members: std::mem::take(&mut joined.members),
        members_total: joined.total,
        token: node.tokens.issue(&member.user),
    }
    .to_json()
}
