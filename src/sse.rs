//! The Server-Sent Events transport: `GET /rooms/<room>/events?user=<user>`.
//!
//! For clients that cannot hold a WebSocket. Admission is the WebSocket's
//! ([`crate::handshake`]): the stream gets its own exclusive queue bound to the
//! room's exchange, exactly like a socket. Each event is named by the frame's
//! `type`, carries the very JSON a WebSocket client would get as `data`, and the
//! message id as `id`. Clients send with HTTP POST ([`crate::publish`]).
//!
//! A task per stream moves deliveries into a bounded channel that is the
//! response body. When the client goes away hyper drops the body, the task sees
//! the channel closed, and the queue is deleted. On shutdown or drain the task
//! ends and the stream ends cleanly.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span};
use warp::reply::{Reply, Response};
use warp::sse::Event;

use crate::error::{ClientError, ErrorCode};
use crate::handshake::{self, Admitted, Handshake};
use crate::http::error_response;
use crate::metrics::Transport;
use crate::protocol::{ServerFrame, StatusBody, frame_head};
use crate::server::Node;
use crate::session::{self, Member, WRITE_TIMEOUT};

/// Events buffered for one stream. A client that lets this fill for
/// [`WRITE_TIMEOUT`] is dropped, as a stuck WebSocket is.
const STREAM_BUFFER: usize = 256;

/// Why a stream ended; logged once.
#[derive(Debug)]
enum StreamEnd {
    ClientGone,
    Shutdown,
    Restart,
    BrokerLost,
    TooSlow,
}

/// `GET /rooms/<room>/events`. With `Accept: application/json` (and not
/// `text/event-stream`) it only answers what opening the stream would: the
/// refusal, or 200 — for pages whose EventSource cannot read a refusal.
pub async fn handle(
    room: String,
    node: Arc<Node>,
    query: HashMap<String, String>,
    origin: Option<String>,
    host: Option<String>,
    accept: Option<String>,
) -> Result<Response, Infallible> {
    let request = match Handshake::new(Some(&room), query.get("user").map(String::as_str)) {
        Ok(h) => h,
        Err(e) => return Ok(error_response(&e)),
    };
    if let Err(refusal) = handshake::precheck(&node, origin.as_deref(), host.as_deref()) {
        return Ok(error_response(&refusal));
    }
    let probe_only = accept
        .as_deref()
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/event-stream"));
    if probe_only {
        return Ok(match handshake::probe(&node, &request).await {
            Err(refusal) => error_response(&refusal),
            Ok(()) => warp::reply::json(&StatusBody {
                status: "acceptable".into(),
                node: node.settings.node_id.clone(),
                bus: node.bus.kind().into(),
            })
            .into_response(),
        });
    }
    let admitted = match handshake::admit(&node, request).await {
        Ok(a) => a,
        Err(refusal) => return Ok(error_response(&refusal)),
    };
    let (events, rx) = mpsc::channel(STREAM_BUFFER);
    let span =
        info_span!("session", transport = "sse", user = %admitted.user, room = %admitted.room);
    node.sessions
        .spawn(run(node.clone(), admitted, events).instrument(span));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    let keep_alive = warp::sse::keep_alive()
        .interval(Duration::from_secs(node.config.sse_keepalive_secs.max(1)))
        .stream(body);
    Ok(warp::sse::reply(keep_alive).into_response())
}

fn event(frame: &str) -> Event {
    let event = Event::default().data(frame);
    match frame_head(frame) {
        Some((kind, Some(id))) => event.event(kind).id(id),
        Some((kind, None)) => event.event(kind),
        None => event,
    }
}

async fn send(events: &mpsc::Sender<Event>, frame: &str) -> Result<(), StreamEnd> {
    match tokio::time::timeout(WRITE_TIMEOUT, events.send(event(frame))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(StreamEnd::ClientGone),
        Err(_) => Err(StreamEnd::TooSlow),
    }
}

async fn run(node: Arc<Node>, admitted: Admitted, events: mpsc::Sender<Event>) {
    let Admitted {
        room,
        user,
        claim,
        subscription,
    } = admitted;
    let metrics = node.settings.metrics.clone();
    let open = metrics.connections(Transport::Sse);
    open.inc();
    info!("connected");
    let mut inbox = subscription.inbox;
    let mut joined = node.presence.join(room.as_str(), user.as_str()).await;
    let member = Member { room, user };
    let welcome = session::welcome(&mut joined, &member, &node.settings);
    let end = async {
        send(&events, &welcome).await?;
        // The member list can be large, and nothing needs it once it is sent.
        drop(welcome);
        let restart_due = node.stop.restart_due();
        tokio::pin!(restart_due);
        loop {
            tokio::select! {
                _ = node.stop.shutdown.cancelled() => return Err(StreamEnd::Shutdown),
                _ = &mut restart_due => return Err(StreamEnd::Restart),
                _ = events.closed() => return Err(StreamEnd::ClientGone),
                delivery = inbox.recv() => match delivery {
                    Ok(frame) => {
                        send(&events, frame.as_str()).await?;
                        metrics.delivered(Transport::Sse, 1);
                        inbox.settle(1).await;
                    }
                    Err(_) => {
                        let error = ServerFrame::error(
                            &ClientError::new(ErrorCode::Unavailable, "lost the message broker; reconnect shortly"),
                            None,
                        );
                        metrics.error(ErrorCode::Unavailable);
                        let _ = send(&events, &error.to_json()).await;
                        return Err(StreamEnd::BrokerLost);
                    }
                },
                update = joined.updates.recv() => match update {
                    Ok(frame) => send(&events, frame.as_str()).await?,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        send(&events, &joined.resync(member.room.as_str()).await.to_json()).await?;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        joined.updates = tokio::sync::broadcast::channel(1).1;
                    }
                },
            }
        }
    }
    .await;
    let end = match end {
        Ok(()) => unreachable!("the loop only ends with a reason"),
        Err(end) => end,
    };
    drop(events);
    drop(joined);
    drop(inbox);
    node.presence
        .leave(member.room.as_str(), member.user.as_str())
        .await;
    subscription.lease.release().await;
    drop(claim);
    open.dec();
    info!(?end, "disconnected");
}
