//! The bus: how a session reaches every other session in its room.
//!
//! One abstraction, two homes:
//! - [`amqp`]: RabbitMQ. Every session gets its own exclusive queue
//!   (`<prefix>.user.<user>`) bound to its room's fanout exchange
//!   (`<prefix>.room.<room>`), on a channel of its own multiplexed over a small
//!   pool of AMQP connections ([`pool`]).
//! - [`memory`]: the embedded in-process bus, one node, the same semantics.
//!
//! A session only sees [`Subscription`]: a [`Publisher`] to send into the room, an
//! [`Inbox`] of delivered frames (already-serialised JSON, forwarded as is), and a
//! [`Lease`] whose release deletes the session's queue. The session code does not
//! know which bus it talks to.

pub mod amqp;
pub mod memory;
pub mod pool;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use thiserror::Error;

use crate::names::{RoomName, UserId};

/// What can go wrong on the bus, as the session needs to tell it apart.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BusError {
    /// Another session (on this node or any other) holds this user id.
    #[error("user id is already connected")]
    UserTaken,
    /// A direct message found no queue: its recipient is not connected anywhere.
    #[error("no such user is connected")]
    NoRecipient,
    /// The broker is unreachable or refused the operation; retry later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// The bus a node runs on. Cheap to clone.
#[derive(Clone)]
pub enum Bus {
    Memory(memory::MemoryBus),
    Amqp(amqp::AmqpBus),
}

impl Bus {
    /// Subscribe `user` to `room`. When this returns, anything published to the
    /// room afterwards reaches the returned inbox.
    pub async fn subscribe(
        &self,
        room: &RoomName,
        user: &UserId,
    ) -> Result<Subscription, BusError> {
        match self {
            Bus::Memory(bus) => bus.subscribe(room, user),
            Bus::Amqp(bus) => bus.subscribe(room, user).await,
        }
    }

    /// Whether `user` holds a subscription anywhere the bus reaches (a passive
    /// declare of its queue on RabbitMQ). Lets a plain GET tell why an upgrade
    /// would be refused, for browsers that cannot read a refused upgrade's status.
    pub async fn is_connected(&self, user: &UserId) -> Result<bool, BusError> {
        match self {
            Bus::Memory(bus) => Ok(bus.is_connected(user)),
            Bus::Amqp(bus) => bus.is_connected(user).await,
        }
    }

    /// The node's link for presence gossip between nodes (one queue per node on a
    /// presence fanout exchange). The embedded bus has no other nodes: its link
    /// carries nothing.
    pub async fn presence_link(&self, node_id: &str) -> Result<PresenceLink, BusError> {
        match self {
            Bus::Memory(_) => Ok(PresenceLink::Alone),
            Bus::Amqp(bus) => bus
                .presence_link(node_id)
                .await
                .map(|link| PresenceLink::Amqp(Box::new(link))),
        }
    }

    /// Publish to a room without a session (HTTP publishing), waiting for the
    /// broker's confirm. A room nobody is in takes the message and drops it.
    pub async fn publish_room(&self, room: &RoomName, payload: Bytes) -> Result<(), BusError> {
        match self {
            Bus::Memory(bus) => {
                bus.publish_room(room, payload);
                Ok(())
            }
            Bus::Amqp(bus) => bus.publish_room(room, payload).await,
        }
    }

    /// Send a direct message without a session, waiting for the broker's confirm;
    /// [`BusError::NoRecipient`] when `to` is not connected anywhere.
    pub async fn publish_direct(&self, to: &UserId, payload: Bytes) -> Result<(), BusError> {
        match self {
            Bus::Memory(bus) => bus.publish_direct(to, payload),
            Bus::Amqp(bus) => bus.publish_direct(to, payload).await,
        }
    }

    /// `Ok` when new sessions can subscribe and publish, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        match self {
            Bus::Memory(_) => Ok(()),
            Bus::Amqp(bus) => bus.readiness(),
        }
    }

    /// Broker connections up (0 on the embedded bus).
    pub fn broker_connections(&self) -> usize {
        match self {
            Bus::Memory(_) => 0,
            Bus::Amqp(bus) => bus.connected(),
        }
    }

    /// Which bus this is, for logs and `/readyz`.
    pub fn kind(&self) -> &'static str {
        match self {
            Bus::Memory(_) => "memory",
            Bus::Amqp(_) => "amqp",
        }
    }

    /// Close broker connections. Call after every session has released its lease.
    pub async fn close(&self) {
        match self {
            Bus::Memory(_) => {}
            Bus::Amqp(bus) => bus.close().await,
        }
    }
}

/// One session's place on the bus.
pub struct Subscription {
    pub publisher: Publisher,
    pub inbox: Inbox,
    pub lease: Lease,
}

/// Sends already-serialised frames into the session's room.
pub enum Publisher {
    Memory(memory::MemoryPublisher),
    Amqp(amqp::AmqpPublisher),
}

impl Publisher {
    /// Publish `payload` to the room. Frames published through one publisher reach
    /// every receiver in the order they were published. The returned [`Confirm`]
    /// resolves when the bus has taken responsibility for the frame.
    pub async fn publish(&self, payload: Bytes) -> Result<Confirm, BusError> {
        match self {
            Publisher::Memory(p) => Ok(Confirm::Done(Some(p.publish(payload)))),
            Publisher::Amqp(p) => p.publish(payload).await.map(Confirm::Amqp),
        }
    }
}

impl Publisher {
    /// Send `payload` to `to`'s queue, wherever it is connected. The confirm fails
    /// with [`BusError::NoRecipient`] when nobody by that id is connected.
    pub async fn publish_direct(&self, to: &UserId, payload: Bytes) -> Result<Confirm, BusError> {
        match self {
            Publisher::Memory(p) => Ok(Confirm::Done(Some(p.publish_direct(to, payload)))),
            Publisher::Amqp(p) => p.publish_direct(to, payload).await.map(Confirm::Amqp),
        }
    }
}

/// Gossip between nodes about who is connected where.
pub enum PresenceLink {
    /// A single node: nothing to tell, nothing to hear.
    Alone,
    Amqp(Box<amqp::AmqpPresenceLink>),
}

impl PresenceLink {
    pub async fn publish(&self, payload: Bytes) -> Result<(), BusError> {
        match self {
            PresenceLink::Alone => Ok(()),
            PresenceLink::Amqp(link) => link.publish(payload).await,
        }
    }

    /// The next gossip message from any node (this one included).
    pub async fn recv(&mut self) -> Result<Bytes, BusError> {
        match self {
            PresenceLink::Alone => std::future::pending().await,
            PresenceLink::Amqp(link) => link.recv().await,
        }
    }
}

/// The bus's answer to one publish.
pub enum Confirm {
    Done(Option<Result<(), BusError>>),
    Amqp(amqp::AmqpConfirm),
}

impl Future for Confirm {
    type Output = Result<(), BusError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Confirm::Done(result) => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(BusError::Unavailable("confirm polled twice".into()))),
            ),
            Confirm::Amqp(confirm) => Pin::new(confirm).poll(cx),
        }
    }
}

/// Frames delivered to this session, in order, as JSON text that the socket
/// takes as it is (`Utf8Bytes` is what tungstenite sends without copying).
pub enum Inbox {
    Memory(memory::MemoryInbox),
    // Boxed: the AMQP side holds a consumer, an acker and its ack timing.
    Amqp(Box<amqp::AmqpInbox>),
}

impl Inbox {
    /// The next delivered frame. An error means the session can no longer receive
    /// (the broker went away) and should end.
    pub async fn recv(&mut self) -> Result<tungstenite::Utf8Bytes, BusError> {
        match self {
            Inbox::Memory(i) => i.recv().await,
            Inbox::Amqp(i) => i.recv().await,
        }
    }

    /// A frame that is ready now, without waiting; lets the session batch writes.
    pub fn try_recv(&mut self) -> Option<Result<tungstenite::Utf8Bytes, BusError>> {
        match self {
            Inbox::Memory(i) => i.try_recv(),
            Inbox::Amqp(i) => i.try_recv(),
        }
    }

    /// Tell the bus every frame received so far (`handed_over` since the last
    /// call) has been handed to the socket, so it may send more (the AMQP
    /// prefetch window).
    pub async fn settle(&mut self, handed_over: usize) {
        match self {
            Inbox::Memory(_) => {}
            Inbox::Amqp(i) => i.settle(handed_over).await,
        }
    }
}

/// The session's hold on its queue and its user id on the bus.
pub enum Lease {
    Memory(memory::MemoryLease),
    Amqp(amqp::AmqpLease),
}

impl Lease {
    /// Delete the session's queue and free its user id. Every session calls this
    /// when it ends; dropping a lease unreleased spawns the same cleanup.
    pub async fn release(self) {
        match self {
            Lease::Memory(l) => l.release(),
            Lease::Amqp(l) => l.release().await,
        }
    }
}
