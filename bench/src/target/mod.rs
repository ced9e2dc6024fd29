//! What a benchmark client talks to.
//!
//! Every target gives the scenarios the same two halves per client: an
//! [`Outbox`] that sends bench messages and an [`Inbox`] that yields each received
//! message document (the JSON Warren puts on the broker). A [`Room`] holds what the
//! clients of one run share (the AMQP connections, the exchange) and removes it
//! afterwards.

pub mod amqp;
pub mod socketio;
pub mod stomp;
pub mod warren;
mod ws;

use anyhow::Result;
use bytes::Bytes;
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use crate::cli::{Args, Config, WarrenAcks};

/// One connected, subscribed client.
pub struct Client {
    pub outbox: Outbox,
    pub inbox: Inbox,
}

pub enum Outbox {
    Warren(warren::Outbox),
    Amqp(amqp::Outbox),
    Stomp(stomp::Outbox),
    Socketio(socketio::Outbox),
}

impl Outbox {
    /// Send message `seq` of client `sender` with `text`. With `flush` false the
    /// frame may wait in the client's buffer for the next flush.
    pub async fn send(
        &mut self,
        room: &str,
        sender: usize,
        seq: u32,
        text: &str,
        flush: bool,
    ) -> Result<()> {
        match self {
            Outbox::Warren(o) => o.send(text, flush).await,
            Outbox::Amqp(o) => o.send(room, sender, seq, text).await,
            Outbox::Stomp(o) => o.send(room, sender, seq, text, flush).await,
            Outbox::Socketio(o) => o.send(text, flush).await,
        }
    }

    /// Push out anything buffered; for AMQP, wait for the broker's confirms.
    pub async fn flush(&mut self) -> Result<()> {
        match self {
            Outbox::Warren(o) => o.flush().await,
            Outbox::Amqp(o) => o.flush().await,
            Outbox::Stomp(o) => o.flush().await,
            Outbox::Socketio(o) => o.flush().await,
        }
    }

    /// Say goodbye politely; errors are irrelevant by now.
    pub async fn close(self) {
        match self {
            Outbox::Warren(o) => o.close().await,
            Outbox::Amqp(o) => o.close().await,
            Outbox::Stomp(o) => o.close().await,
            Outbox::Socketio(o) => o.close().await,
        }
    }
}

pub enum Inbox {
    Warren(warren::Inbox),
    Amqp(amqp::Inbox),
    Stomp(stomp::Inbox),
    Socketio(socketio::Inbox),
}

impl Inbox {
    /// The next received document; `None` when the server closed the connection.
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        match self {
            Inbox::Warren(i) => i.next().await,
            Inbox::Amqp(i) => i.next().await,
            Inbox::Stomp(i) => i.next().await,
            Inbox::Socketio(i) => i.next().await,
        }
    }
}

/// What the clients of one run share.
pub enum Room {
    Warren {
        urls: Vec<String>,
        room: String,
        tag: String,
        /// Warren's --jwt-secret, when it requires tokens: each client gets one.
        jwt_secret: Option<String>,
        acks: WarrenAcks,
    },
    Amqp(amqp::Room),
    Stomp(stomp::Room),
    Socketio(socketio::Room),
}

impl Room {
    /// Set up a fresh, uniquely named room for `config`.
    pub async fn open(args: &Args, config: Config) -> Result<Self> {
        let tag = unique_tag();
        let room = format!("bench-{tag}");
        Ok(match config {
            Config::Warren(acks) => Room::Warren {
                urls: args.urls.clone(),
                room,
                tag,
                jwt_secret: args.jwt_secret.clone(),
                acks,
            },
            Config::Amqp(mode) => Room::Amqp(
                amqp::Room::open(
                    &args.amqp_url,
                    args.amqp_connections,
                    room,
                    mode,
                    args.amqp_client,
                    args.amqp_numbering,
                )
                .await?,
            ),
            Config::Stomp => {
                Room::Stomp(stomp::Room::open(&args.amqp_url, &args.stomp_url, room).await?)
            }
            Config::Socketio => Room::Socketio(socketio::Room::new(&args.socketio_urls, room)),
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Room::Warren { room, .. } => room,
            Room::Amqp(r) => r.name(),
            Room::Stomp(r) => r.name(),
            Room::Socketio(r) => r.name(),
        }
    }

    /// Connect client `index` and wait until it is subscribed.
    pub async fn connect(&self, index: usize) -> Result<Client> {
        match self {
            Room::Warren {
                urls,
                room,
                tag,
                jwt_secret,
                acks,
            } => {
                let url = &urls[index % urls.len()];
                let user = format!("u{index}-{tag}");
                let token = jwt_secret
                    .as_deref()
                    .map(|secret| warren::token(secret, &user));
                warren::connect(url, room, &user, token.as_deref(), *acks).await
            }
            Room::Amqp(r) => r.connect(index).await,
            Room::Stomp(r) => r.connect(index).await,
            Room::Socketio(r) => r.connect(index).await,
        }
    }

    /// Remove what the run declared that the broker does not remove by itself.
    pub async fn close(self) {
        match self {
            Room::Warren { .. } | Room::Socketio(_) => {}
            Room::Amqp(r) => r.close().await,
            Room::Stomp(r) => r.close().await,
        }
    }
}

/// A short tag unique to this run, so repeated runs never meet each other's
/// queues, exchanges or user ids.
fn unique_tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static RUN: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:x}{:x}",
        std::process::id(),
        nanos >> 12,
        RUN.fetch_add(1, Ordering::Relaxed)
    )
}

/// Declare a run's fanout exchange (auto-deleted with its last queue) on a
/// throwaway channel. The amqp and stomp targets both start a run this way.
async fn declare_room_exchange(connection: &Connection, exchange: &str) -> Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Delete a run's exchange, best effort: the run is over either way.
async fn delete_room_exchange(connection: &Connection, exchange: &str) {
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
}
