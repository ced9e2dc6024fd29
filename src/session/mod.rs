//! One chat session, whatever transport carries it.
//!
//! A transport (one of the WebSocket, SSE and HTTP adapters) admits a client ([`crate::handshake`]) and
//! then hands the session to [`serve`], which runs its whole life once for every
//! transport: count it, join the URL's room, write `welcome` (and, resuming,
//! the restored rooms and `resumed`), run the loop ([`events::Session`]),
//! leave every room, delete its queue or keep it for a resume, free its slot.
//!
//! - [`connection`]: the small interface a transport implements.
//! - [`events`]: the loop, one method per event.
//! - [`rooms`]: subscribing and unsubscribing, and each room's presence frames.
//! - [`history`]: a room's last messages, sent after `subscribed`.
//! - [`token`]: the session's token running out, and `refresh`.
//! - [`end`]: why a session ends, and the close code that tells the client.

pub mod connection;
pub mod end;
pub mod events;
pub mod history;
pub mod rooms;
pub mod token;

use std::future::Future;
use std::sync::Arc;

use futures_util::Stream;
use tracing::info;

pub use connection::{Inbound, Transport, TransportError};
pub use end::{SessionEnd, close_code};
pub use events::{ERROR_BUDGET, MAX_IN_FLIGHT, WRITE_TIMEOUT};

use std::collections::BTreeSet;

use crate::bus::acks::ACK_WINDOW;
use crate::bus::{AckMode, Release, Subscription};
use crate::handshake::{Admitted, Identity};
use crate::names::RoomName;
use crate::node::Node;
use crate::presence::Joined;
use crate::protocol::ServerFrame;

/// Run an admitted session to its end. `open` starts the transport with the
/// `welcome` frame as its first frame and returns its two halves; a transport
/// that cannot even send `welcome` ends the session there.
///
/// Not an `async fn`: an async fn keeps its arguments for its whole life, so
/// `admitted` would stay in every idle session's task beside the parts it is
/// taken apart into. Taken apart here, each part is held once.
pub fn serve<T, R, F>(
    node: Arc<Node>,
    admitted: Admitted,
    open: impl FnOnce(String) -> F,
) -> impl Future<Output = ()>
where
    T: Transport,
    R: Stream<Item = Inbound> + Unpin,
    F: Future<Output = Result<(T, R), TransportError>>,
{
    let Admitted {
        identity,
        grant,
        open: address_slot,
        room,
        claim,
        subscription,
        acks,
        resumed,
    } = admitted;
    async move {
        let open_sessions = node.metrics.connections(T::KIND);
        open_sessions.inc();
        info!("connected");
        // A room the URL named is joined before `welcome`, which lists its members.
        let mut joined = match &room {
            Some(room) => Some(
                node.presence
                    .join(room.as_str(), identity.user.as_str())
                    .await,
            ),
            None => None,
        };
        let welcome = welcome(&identity, room.as_ref(), joined.as_mut(), acks, &node);
        let Subscription { link, inbox, lease } = subscription;
        let (end, rooms) = match open(welcome).await {
            Ok((outbound, inbound)) => {
                let mut session =
                    events::Session::new(&node, &identity, grant, outbound, link, inbox);
                if let (Some(room), Some(joined)) = (room, joined) {
                    session.joined(room, joined);
                }
                let end = match resumed {
                    Some(resumed) => match session.resumed(resumed).await {
                        std::ops::ControlFlow::Continue(()) => session.run(inbound).await,
                        std::ops::ControlFlow::Break(end) => end,
                    },
                    None => session.run(inbound).await,
                };
                (end, session.into_rooms())
            }
            Err(e) => (
                SessionEnd::ClientGone(e.to_string()),
                room.into_iter().collect(),
            ),
        };
        let release = if T::RESUMABLE {
            end.release()
        } else {
            Release::Delete
        };
        leave_rooms(&node, &identity, rooms, release).await;
        lease.release(release).await;
        drop(claim);
        drop(address_slot);
        open_sessions.dec();
        info!(?end, "disconnected");
    }
}

/// Leave every room still subscribed. A session kept for a resume leaves
/// only when its grace is over, so a client that comes back in time never
/// appears to have left (its resumed session joins again first).
async fn leave_rooms(
    node: &Arc<Node>,
    identity: &Identity,
    rooms: BTreeSet<RoomName>,
    release: Release,
) {
    let grace = match release {
        Release::KeepForResume => node.config.resume_grace(),
        Release::Delete => None,
    };
    let node = node.clone();
    let user = identity.user.clone();
    let leave = async move {
        if let Some(grace) = grace {
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                () = node.lifecycle.shutdown.cancelled() => {}
            }
        }
        for room in rooms {
            node.presence.leave(room.as_str(), user.as_str()).await;
        }
    };
    match grace {
        Some(_) => drop(tokio::spawn(leave)),
        None => leave.await,
    }
}

/// The `welcome` frame a session starts with, as JSON. It takes the member list
/// out of `joined`: in a large room that list is the biggest thing a session
/// ever holds, and nothing needs it once it is sent.
fn welcome(
    identity: &Identity,
    room: Option<&RoomName>,
    joined: Option<&mut Joined>,
    acks: AckMode,
    node: &Node,
) -> String {
    let (members, members_total) = match joined {
        Some(joined) => (
            Some(std::mem::take(&mut joined.members)),
            Some(joined.total),
        ),
        None => (None, None),
    };
    ServerFrame::Welcome {
        user: identity.user.to_string(),
        session: identity.session.to_string(),
        node: node.id.clone(),
        rooms: room.iter().map(ToString::to_string).collect(),
        room: room.map(ToString::to_string),
        members,
        members_total,
        resume_grace_secs: node.config.resume_grace().map(|g| g.as_secs()),
        ack_window: (acks == AckMode::Client).then_some(ACK_WINDOW),
        // Anonymous: the session's own posting token. With tokens, clients
        // post with their own (`Authorization: Bearer`).
        token: node
            .auth
            .is_anonymous()
            .then(|| node.tokens.issue(&identity.user, &identity.session)),
    }
    .to_json()
}
