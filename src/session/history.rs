//! A `subscribe` that asks for history: after `subscribed`, one `history` frame
//! with the room's last messages (or those after a given id), then live
//! traffic, with nothing missing between the two and nothing twice.
//!
//! The queue is bound before the page is taken, and the page waits until the
//! node's history has caught up with the broker and ends there; a page of the
//! last messages starts from a marker put before the bind
//! ([`crate::bus::history`]). So nothing falls between page and live traffic. A message published in between is in both:
//! its id is remembered, and its live copy dropped when it comes.

use std::ops::ControlFlow;

use tracing::warn;
use tungstenite::Utf8Bytes;

use super::events::{Session, on_broker};
use super::rooms::STUCK;
use super::{SessionEnd, Transport};
use crate::bus::history::{Cut, Marker, Page};
use crate::bus::{BusError, SessionLink};
use crate::names::RoomName;
use crate::protocol::client::HistoryRequest;
use crate::protocol::frame_head;

/// Ids remembered at most, so a client that keeps asking for history cannot
/// grow its session without bound; the oldest page's matter least.
const MAX_REPLAYED: usize = 10_000;

impl<T: Transport, P: SessionLink> Session<'_, T, P> {
    pub(super) async fn send_history(
        &mut self,
        room: &RoomName,
        request: HistoryRequest,
        reference: Option<String>,
        marked: Option<Marker>,
    ) -> ControlFlow<SessionEnd> {
        let cut = match on_broker(self.node, self.node.bus.history_caught_up()).await? {
            Ok(cut) => cut,
            Err(BusError::TimedOut) => return self.broker_lost(STUCK, reference).await,
            Err(e) => {
                warn!(error = %e, %room, "history could not catch up");
                // Whatever the node has is still history; say it may be short.
                Cut::NOW
            }
        };
        let per_room = self.node.config.history_per_room;
        let history = self.node.bus.history();
        // The marker put before the bind was read before the one just waited
        // for, so its cut is known by now.
        let bound_from = match marked {
            Some(marker) => marker.cut().await.unwrap_or(cut),
            None => cut,
        };
        let mut page = match request {
            HistoryRequest::Last(n) => history.last_then(room, n.min(per_room), bound_from, cut),
            HistoryRequest::Since(id) => history.since(room, &id, per_room, cut),
        };
        if per_room == 0 {
            page.complete = false;
        }
        if self.replayed.len() > MAX_REPLAYED {
            self.replayed.clear();
        }
        self.replayed.extend(page.ids().map(Box::from));
        self.write(vec![history_frame(room, &page, reference.as_deref())])
            .await
    }

    /// Drop the live copies of messages a history page already gave.
    pub(super) fn drop_replayed(&mut self, batch: &mut Vec<Utf8Bytes>) {
        batch.retain(|frame| match frame_head(frame) {
            Some((_, Some(id))) => !self.replayed.remove(id),
            _ => true,
        });
    }
}

/// `{"type":"history","room":…,"complete":…,"messages":[…],"ref":…}`, the
/// messages as they were first sent.
fn history_frame(room: &RoomName, page: &Page, reference: Option<&str>) -> Utf8Bytes {
    let text = |s: &str| serde_json::Value::from(s).to_string();
    let mut frame = format!(
        r#"{{"type":"history","room":{},"complete":{},"messages":{}"#,
        text(room.as_str()),
        page.complete,
        page.to_json_array()
    );
    if let Some(reference) = reference {
        frame.push_str(&format!(r#","ref":{}"#, text(reference)));
    }
    frame.push('}');
    Utf8Bytes::from(frame)
}
