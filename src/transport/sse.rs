//! The Server-Sent Events transport: `GET /rooms/<room>/events?user=<user>`.
//!
//! For clients that cannot hold a WebSocket. Admission is the WebSocket's
//! ([`crate::handshake`]), and so is the session ([`crate::session::serve`]): the
//! stream gets its own exclusive queue bound to the room's exchange, exactly like
//! a socket. Each event is named by the frame's `type`, carries the very JSON a
//! WebSocket client would get as `data`, and the message id as `id`. Clients
//! send with HTTP POST ([`super::publish`]).
//!
//! The session writes events into a bounded channel that is the response body.
//! When the client goes away hyper drops the body, the session sees the channel
//! closed and ends, and its queue is deleted. Keep-alive comments are warp's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tracing::{Instrument, info_span};
use tungstenite::Utf8Bytes;
use warp::reply::{Reply, Response};
use warp::sse::Event;

use crate::error::ClientError;
use crate::handshake::{self, Handshake};
use crate::metrics;
use crate::node::Node;
use crate::protocol::bodies::StatusBody;
use crate::protocol::frame_head;
use crate::session::{self, Inbound, SessionEnd, Transport, TransportError};

/// Events buffered for one stream. A client that lets this fill for
/// [`session::WRITE_TIMEOUT`] is dropped, as a stuck WebSocket is.
const STREAM_BUFFER: usize = 256;

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
    client: Option<std::net::IpAddr>,
) -> Response {
    let probe_only = accept
        .as_deref()
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/event-stream"));
    let admitted = async {
        let mut request = Handshake::new(
            Some(&room),
            query.get("user").map(String::as_str),
            query.get("token").cloned(),
        )?;
        request.client = client;
        handshake::precheck(&node, origin.as_deref(), host.as_deref())?;
        if probe_only {
            handshake::probe(&node, &request).await?;
            return Ok(None);
        }
        handshake::admit(&node, request).await.map(Some)
    };
    let admitted = match admitted.await {
        Err(refusal) => return ClientError::into_response(refusal),
        Ok(None) => {
            return warp::reply::json(&StatusBody {
                status: "acceptable".into(),
                node: node.id.clone(),
                bus: node.bus.kind().into(),
            })
            .into_response();
        }
        Ok(Some(admitted)) => admitted,
    };
    let (events, rx) = mpsc::channel(STREAM_BUFFER);
    let span = info_span!(
        "session",
        transport = "sse",
        user = %admitted.identity.user,
        session = %admitted.identity.session
    );
    let keepalive = Duration::from_secs(node.config.sse_keepalive_secs.max(1));
    node.sessions.spawn(
        session::serve(node.clone(), admitted, |welcome| open(events, welcome)).instrument(span),
    );
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, std::convert::Infallible>(event), rx))
    });
    let keep_alive = warp::sse::keep_alive().interval(keepalive).stream(body);
    warp::sse::reply(keep_alive).into_response()
}

/// Send `welcome` as the first event. An event stream carries nothing from the
/// client, so its inbound half only reports the client going away.
async fn open(
    events: mpsc::Sender<Event>,
    welcome: String,
) -> Result<(EventStream, impl Stream<Item = Inbound> + Unpin), TransportError> {
    let mut stream = EventStream { events };
    stream.send(vec![Utf8Bytes::from(welcome)]).await?;
    let watcher = stream.events.clone();
    let gone = Box::pin(futures_util::stream::once(async move {
        watcher.closed().await;
        Inbound::Failed("the event stream was closed".into())
    }));
    Ok((stream, gone))
}

fn event(frame: &str) -> Event {
    let event = Event::default().data(frame);
    match frame_head(frame) {
        Some((kind, Some(id))) => event.event(kind).id(id),
        Some((kind, None)) => event.event(kind),
        None => event,
    }
}

/// The outgoing half of a session's event stream.
pub struct EventStream {
    events: mpsc::Sender<Event>,
}

impl Transport for EventStream {
    const KIND: metrics::Transport = metrics::Transport::Sse;
    const PINGS: bool = false;
    const RESUMABLE: bool = false;

    async fn send(&mut self, frames: Vec<Utf8Bytes>) -> Result<(), TransportError> {
        for frame in frames {
            self.events
                .send(event(frame.as_str()))
                .await
                .map_err(|_| TransportError::Closed)?;
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// The stream ends when the session drops it; an event stream has no close
    /// frame to say why (a lost broker was already told as an `error` event).
    async fn close(&mut self, _end: &SessionEnd) {}
}
