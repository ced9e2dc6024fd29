//! Prometheus metrics of one node, served at `GET /metrics`.
//!
//! One registry per node (not a process-global recorder), so several nodes in
//! one test process each count their own traffic. Every metric is documented in
//! README.md ("Metrics").

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorCode;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    connections: Family<Labels, Gauge>,
    received: Family<Labels, Counter>,
    delivered: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    limited: Family<Labels, Counter>,
    resumes: Family<Labels, Counter>,
    /// Messages sessions' queues dropped (their clients fell behind), as told
    /// to them in `gap` frames.
    pub dropped: Counter,
    /// Seconds from publish to the broker's confirm.
    pub confirm_seconds: Histogram,
    /// Publishes awaiting their confirm: the bus backlog this node is waiting on.
    pub publish_in_flight: Gauge,
    /// Times a broker connection was lost (each is followed by reconnecting).
    pub broker_reconnects: Counter,
    broker_connections: Gauge,
    ready: Gauge,
    history_reading: Gauge,
}

/// What `/metrics` reads off the node's state when it is asked, not counts.
pub struct Readings {
    /// Broker connections up (0 on the embedded bus).
    pub broker_connections: usize,
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Whether the node reads the history stream (RabbitMQ with history kept).
    pub history_reading: bool,
}

/// Which transport a session or a message used.
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    WebSocket,
    Sse,
    Http,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
            Transport::Http => "http",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("warren");
        let connections = Family::<Labels, Gauge>::default();
        registry.register(
            "connections",
            "Open client sessions, by transport",
            connections.clone(),
        );
        let received = Family::<Labels, Counter>::default();
        registry.register(
            "messages_received",
            "Chat messages accepted from clients, by kind (message, direct) and transport",
            received.clone(),
        );
        let delivered = Family::<Labels, Counter>::default();
        registry.register(
            "messages_delivered",
            "Frames from the bus written to clients, by transport",
            delivered.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register("errors", "Errors sent to clients, by code", errors.clone());
        let limited = Family::<Labels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by a limit, by limit (publish, connect_rate, open_per_ip)",
            limited.clone(),
        );
        let resumes = Family::<Labels, Counter>::default();
        registry.register(
            "resumes",
            "Sessions resumed after a dropped socket, by whether the old queue was recovered",
            resumes.clone(),
        );
        let dropped = Counter::default();
        registry.register(
            "dropped_messages",
            "Messages a session's full queue dropped, told to its client in gap frames",
            dropped.clone(),
        );
        let confirm_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "publish_confirm_seconds",
            "Time from publishing a message to the broker's confirm",
            confirm_seconds.clone(),
        );
        let publish_in_flight = Gauge::default();
        registry.register(
            "publish_in_flight",
            "Publishes awaiting the broker's confirm (bus backlog)",
            publish_in_flight.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Broker connections lost and re-established",
            broker_reconnects.clone(),
        );
        let broker_connections = Gauge::default();
        registry.register(
            "broker_connections",
            "Broker connections currently up (the embedded bus reports 0)",
            broker_connections.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when /readyz answers 200, else 0", ready.clone());
        let history_reading = Gauge::default();
        registry.register(
            "history_reading",
            "1 while this node reads the room history stream on RabbitMQ, else 0",
            history_reading.clone(),
        );
        Self {
            registry,
            connections,
            received,
            delivered,
            errors,
            limited,
            resumes,
            dropped,
            confirm_seconds,
            publish_in_flight,
            broker_reconnects,
            broker_connections,
            ready,
            history_reading,
        }
    }

    pub fn connections(&self, transport: Transport) -> Gauge {
        self.connections
            .get_or_create(&vec![("transport", transport.label())])
            .clone()
    }

    pub fn received(&self, kind: &'static str, transport: Transport) {
        self.received
            .get_or_create(&vec![("kind", kind), ("transport", transport.label())])
            .inc();
    }

    pub fn delivered(&self, transport: Transport, frames: u64) {
        self.delivered
            .get_or_create(&vec![("transport", transport.label())])
            .inc_by(frames);
    }

    /// A request refused by the limit named `limit`.
    pub fn rate_limited(&self, limit: &'static str) {
        self.limited.get_or_create(&vec![("limit", limit)]).inc();
    }

    /// A `?resume=`: `Some(recovered)`; `None` for a session that did not ask.
    pub fn resumed(&self, recovered: Option<bool>) {
        if let Some(recovered) = recovered {
            let label = if recovered { "true" } else { "false" };
            self.resumes
                .get_or_create(&vec![("recovered", label)])
                .inc();
        }
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&vec![("code", code.as_str())])
            .inc();
    }

    /// The text exposition, with the state-derived gauges refreshed first.
    pub fn render(&self, readings: &Readings) -> String {
        self.broker_connections
            .set(readings.broker_connections as i64);
        self.ready.set(i64::from(readings.ready));
        self.history_reading
            .set(i64::from(readings.history_reading));
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new();
        m.received("message", Transport::WebSocket);
        m.error(ErrorCode::InvalidJson);
        m.connections(Transport::Sse).inc();
        m.dropped.inc_by(3);
        let text = m.render(&Readings {
            broker_connections: 2,
            ready: true,
            history_reading: true,
        });
        assert!(
            text.contains(r#"warren_messages_received_total{kind="message",transport="ws"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"warren_errors_total{code="invalid_json"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"warren_connections{transport="sse"} 1"#),
            "{text}"
        );
        assert!(text.contains("warren_broker_connections 2"), "{text}");
        assert!(text.contains("warren_dropped_messages_total 3"), "{text}");
        assert!(text.contains("warren_ready 1"), "{text}");
        assert!(text.contains("warren_history_reading 1"), "{text}");
    }
}
