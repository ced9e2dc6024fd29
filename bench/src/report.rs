//! What a run reports: the human table, the JSON line (`--json`), and the medians
//! and ratios of `--compare`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::broker_counters::BrokerCounters;

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        }
    }
}

/// One fan-out run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    pub scenario: String,
    pub label: String,
    pub target: String,
    /// The target's variant: the amqp target's `--amqp-mode`, Warren's `--acks`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Warren or Socket.IO nodes the clients were spread over (0 for the broker's
    /// own protocols).
    pub nodes: usize,
    pub clients: usize,
    pub messages: u32,
    pub size: usize,
    pub rate: Option<f64>,
    /// From the first connect until every client was subscribed.
    pub connect_secs: f64,
    /// From the first send to the last receive.
    pub elapsed_secs: f64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Received ÷ elapsed.
    pub deliveries_per_sec: f64,
    pub latency_us: Latency,
    /// CPU seconds of the Warren or Socket.IO node(s) during the load.
    pub server_cpu_secs: Option<f64>,
    /// CPU seconds of the broker during the load: RabbitMQ (`beam.smp`), or Redis
    /// for the socketio target.
    pub broker_cpu_secs: Option<f64>,
    pub bench_cpu_secs: f64,
    /// CPU seconds of every other process on the machine during the load: near
    /// zero in a clean run; large means the figures were disturbed.
    #[serde(default)]
    pub other_cpu_secs: Option<f64>,
    /// Peak RSS of the Warren node(s) since they started, summed.
    pub server_peak_rss_kib: Option<u64>,
    /// What RabbitMQ counted over the load: messages in, deliveries out
    /// (`None` for Socket.IO, or when `rabbitmqctl` could not be run).
    #[serde(default)]
    pub broker_counters: Option<BrokerCounters>,
    pub timed_out: bool,
}

impl FanoutReport {
    /// CPU microseconds per delivery of the servers and of the broker.
    pub fn cpu_us_per_delivery(&self) -> (Option<f64>, Option<f64>) {
        (
            self.per_delivery(self.server_cpu_secs),
            self.per_delivery(self.broker_cpu_secs),
        )
    }

    /// CPU microseconds per delivery of the bench itself: the clients.
    pub fn bench_us_per_delivery(&self) -> Option<f64> {
        self.per_delivery(Some(self.bench_cpu_secs))
    }

    /// Broker deliveries per message it received: out of queues, and out of
    /// streams.
    pub fn broker_deliveries_per_message(&self) -> Option<(f64, f64)> {
        let c = self.broker_counters.filter(|c| c.received > 0)?;
        let received = c.received as f64;
        Some((
            c.delivered as f64 / received,
            c.delivered_from_streams as f64 / received,
        ))
    }

    fn per_delivery(&self, secs: Option<f64>) -> Option<f64> {
        secs.filter(|_| self.received > 0)
            .map(|s| s * 1e6 / self.received as f64)
    }
}

/// One connections-scenario run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionsReport {
    pub scenario: String,
    pub label: String,
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_connection_kib: Option<f64>,
    pub server_peak_rss_kib: Option<u64>,
    pub broadcast_received: usize,
    pub broadcast_secs: Option<f64>,
}

fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub fn print_fanout(r: &FanoutReport) {
    let (server_us, broker_us) = r.cpu_us_per_delivery();
    let rows = [
        ("target", r.label.clone()),
        (
            "clients × messages",
            format!("{} × {} ({} B text)", r.clients, r.messages, r.size),
        ),
        (
            "rate",
            r.rate.map_or("as fast as possible".into(), |x| {
                format!("{x}/s per client")
            }),
        ),
        ("connect + subscribe", format!("{:.3} s", r.connect_secs)),
        (
            "first send → last receive",
            format!("{:.3} s", r.elapsed_secs),
        ),
        ("deliveries/s", format!("{:.0}", r.deliveries_per_sec)),
        (
            "latency p50/p90/p99/max",
            format!(
                "{} / {} / {} / {}",
                ms(r.latency_us.p50),
                ms(r.latency_us.p90),
                ms(r.latency_us.p99),
                ms(r.latency_us.max)
            ),
        ),
        (
            "received / expected",
            format!("{} / {}", r.received, r.expected),
        ),
        (
            "lost / duplicated / reordered",
            format!("{} / {} / {}", r.lost, r.duplicated, r.reordered),
        ),
        (
            "server CPU",
            r.server_cpu_secs.map_or("-".into(), |s| {
                format!(
                    "{s:.2} s ({} µs/delivery)",
                    opt(server_us.map(|u| format!("{u:.2}")))
                )
            }),
        ),
        (
            "broker CPU",
            r.broker_cpu_secs.map_or("-".into(), |s| {
                format!(
                    "{s:.2} s ({} µs/delivery)",
                    opt(broker_us.map(|u| format!("{u:.2}")))
                )
            }),
        ),
        (
            "bench (clients) CPU",
            format!(
                "{:.2} s ({} µs/delivery)",
                r.bench_cpu_secs,
                opt(r.bench_us_per_delivery().map(|u| format!("{u:.2}")))
            ),
        ),
        (
            "other processes' CPU",
            opt(r.other_cpu_secs.map(|s| format!("{s:.2} s"))),
        ),
        (
            "server peak RSS",
            opt(r
                .server_peak_rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))),
        ),
        (
            "broker: messages in, deliveries out",
            opt(r.broker_counters.map(|c| {
                format!(
                    "{} in, {} out of queues + {} out of streams",
                    c.received, c.delivered, c.delivered_from_streams
                )
            })),
        ),
        ("timed out", r.timed_out.to_string()),
    ];
    for (name, value) in rows {
        println!("{name:<30} {value}");
    }
    println!();
}

pub fn print_connections(r: &ConnectionsReport) {
    let rows = [
        ("target", r.label.clone()),
        (
            "connected / requested",
            format!("{} / {}", r.connected, r.requested),
        ),
        ("failed", r.failed.to_string()),
        (
            "connect time",
            format!(
                "{:.2} s ({:.0} connections/s)",
                r.connect_secs, r.connects_per_sec
            ),
        ),
        (
            "server RSS before → after",
            format!("{} → {} KiB", opt(r.rss_before_kib), opt(r.rss_after_kib)),
        ),
        (
            "server RSS per connection",
            opt(r.rss_per_connection_kib.map(|k| format!("{k:.1} KiB"))),
        ),
        (
            "server peak RSS",
            format!("{} KiB", opt(r.server_peak_rss_kib)),
        ),
        (
            "broadcast received",
            format!("{} / {}", r.broadcast_received, r.connected),
        ),
        (
            "broadcast reached all in",
            opt(r.broadcast_secs.map(|s| format!("{:.1} ms", s * 1000.0))),
        ),
    ];
    for (name, value) in rows {
        println!("{name:<30} {value}");
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Medians of the runs of one configuration.
#[derive(Debug, Clone)]
pub struct Summary {
    pub label: String,
    pub clients: usize,
    pub messages: u32,
    pub rate: Option<f64>,
    pub runs: usize,
    pub deliveries_per_sec: f64,
    pub connect_secs: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub server_us_per_delivery: Option<f64>,
    pub broker_us_per_delivery: Option<f64>,
    pub bench_us_per_delivery: Option<f64>,
    pub server_peak_rss_kib: Option<u64>,
    /// The largest CPU time other processes took during any of the runs.
    pub other_cpu_secs: Option<f64>,
    /// Broker deliveries per message it received, out of queues and out of
    /// streams.
    pub broker_deliveries_per_message: Option<(f64, f64)>,
}

/// Group runs by (label, N, M, rate), in first-seen order of labels.
pub fn summarize(reports: &[FanoutReport]) -> Vec<Summary> {
    let mut groups: BTreeMap<(usize, u32, String, String), Vec<&FanoutReport>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in reports {
        if !order.contains(&r.label) {
            order.push(r.label.clone());
        }
        let rank = order.iter().position(|l| l == &r.label).unwrap_or(0);
        groups
            .entry((
                r.clients,
                r.messages,
                format!("{rank:03}"),
                format!("{:?}", r.rate),
            ))
            .or_default()
            .push(r);
    }
    groups
        .into_values()
        .map(|runs| {
            let pick =
                |f: &dyn Fn(&FanoutReport) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let pick_opt = |f: &dyn Fn(&FanoutReport) -> Option<f64>| {
                let values: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
                (!values.is_empty()).then(|| median(values))
            };
            let first = runs[0];
            Summary {
                label: first.label.clone(),
                clients: first.clients,
                messages: first.messages,
                rate: first.rate,
                runs: runs.len(),
                deliveries_per_sec: pick(&|r| r.deliveries_per_sec),
                connect_secs: pick(&|r| r.connect_secs),
                p50_us: pick(&|r| r.latency_us.p50 as f64),
                p99_us: pick(&|r| r.latency_us.p99 as f64),
                max_us: pick(&|r| r.latency_us.max as f64),
                lost: runs.iter().map(|r| r.lost).sum(),
                duplicated: runs.iter().map(|r| r.duplicated).sum(),
                reordered: runs.iter().map(|r| r.reordered).sum(),
                server_us_per_delivery: pick_opt(&|r| r.cpu_us_per_delivery().0),
                broker_us_per_delivery: pick_opt(&|r| r.cpu_us_per_delivery().1),
                bench_us_per_delivery: pick_opt(&|r| r.bench_us_per_delivery()),
                server_peak_rss_kib: runs.iter().filter_map(|r| r.server_peak_rss_kib).max(),
                other_cpu_secs: runs
                    .iter()
                    .filter_map(|r| r.other_cpu_secs)
                    .reduce(f64::max),
                broker_deliveries_per_message: pick_opt(&|r| {
                    r.broker_deliveries_per_message().map(|d| d.0)
                })
                .zip(pick_opt(&|r| {
                    r.broker_deliveries_per_message().map(|d| d.1)
                })),
            }
        })
        .collect()
}

/// A Warren row against a baseline at the same N, M and rate, as a table
/// cell ("-" for another target's row, or no such baseline run).
/// Unpaced: median deliveries/s over the baseline's (higher is better).
/// Paced (`--rate`), where both deliver the same rate by construction: p50 and
/// p99 latency over the baseline's (lower is better).
pub fn ratio_cell(summaries: &[Summary], of: &Summary, baseline: &str) -> String {
    let baseline = summaries.iter().find(|s| {
        s.label == baseline
            && s.clients == of.clients
            && s.messages == of.messages
            && s.rate == of.rate
    });
    let Some(b) = baseline.filter(|_| of.label.starts_with("warren")) else {
        return "-".into();
    };
    match of.rate {
        None => format!("{:.2}", of.deliveries_per_sec / b.deliveries_per_sec),
        Some(_) => format!(
            "p50 {:.2}, p99 {:.2}",
            of.p50_us / b.p50_us,
            of.p99_us / b.p99_us
        ),
    }
}

/// The baselines Warren's figures are divided by, where the runs include them.
pub const BASELINES: [&str; 3] = ["amqp-noack", "amqp-ack", "socketio-2n"];

/// The baselines present in `summaries`, in [`BASELINES`] order.
pub fn baselines_in(summaries: &[Summary]) -> Vec<&'static str> {
    BASELINES
        .into_iter()
        .filter(|b| summaries.iter().any(|s| s.label == *b))
        .collect()
}

pub fn print_comparison(reports: &[FanoutReport]) {
    let summaries = summarize(reports);
    let baselines = baselines_in(&summaries);
    print!(
        "{:<16} {:>5} {:>5} {:>12} {:>9} {:>9} {:>6} {:>11} {:>11} {:>11}",
        "target",
        "N",
        "runs",
        "median del/s",
        "p50 ms",
        "p99 ms",
        "lost",
        "server µs/d",
        "broker µs/d",
        "bench µs/d",
    );
    for b in &baselines {
        print!(" {:>20}", format!("÷ {b}"));
    }
    println!();
    for s in &summaries {
        let us = |v: Option<f64>| opt(v.map(|u| format!("{u:.2}")));
        print!(
            "{:<16} {:>5} {:>5} {:>12.0} {:>9.2} {:>9.2} {:>6} {:>11} {:>11} {:>11}",
            s.label,
            s.clients,
            s.runs,
            s.deliveries_per_sec,
            s.p50_us / 1000.0,
            s.p99_us / 1000.0,
            s.lost,
            us(s.server_us_per_delivery),
            us(s.broker_us_per_delivery),
            us(s.bench_us_per_delivery),
        );
        for b in &baselines {
            print!(" {:>20}", ratio_cell(&summaries, s, b));
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(label: &str, rate: Option<f64>, per_sec: f64, p50_ms: f64, p99_ms: f64) -> Summary {
        Summary {
            label: label.into(),
            clients: 100,
            messages: 30,
            rate,
            runs: 3,
            deliveries_per_sec: per_sec,
            connect_secs: 0.1,
            p50_us: p50_ms * 1000.0,
            p99_us: p99_ms * 1000.0,
            max_us: p99_ms * 1000.0,
            lost: 0,
            duplicated: 0,
            reordered: 0,
            server_us_per_delivery: None,
            broker_us_per_delivery: None,
            bench_us_per_delivery: None,
            server_peak_rss_kib: None,
            other_cpu_secs: None,
            broker_deliveries_per_message: None,
        }
    }

    #[test]
    fn an_unpaced_run_compares_throughput() {
        let runs = [
            summary("warren-1n", None, 30_000.0, 900.0, 1500.0),
            summary("amqp-ack", None, 40_000.0, 700.0, 1000.0),
        ];
        assert_eq!(ratio_cell(&runs, &runs[0], "amqp-ack"), "0.75");
        // A baseline's own row is not compared.
        assert_eq!(ratio_cell(&runs, &runs[1], "amqp-ack"), "-");
    }

    #[test]
    fn a_paced_run_compares_latency_since_the_rates_are_equal() {
        let runs = [
            summary("warren-1n", Some(1.0), 10_000.0, 7.0, 19.0),
            summary("amqp-noack", Some(1.0), 10_000.0, 3.5, 5.0),
        ];
        assert_eq!(
            ratio_cell(&runs, &runs[0], "amqp-noack"),
            "p50 2.00, p99 3.80"
        );
    }

    #[test]
    fn no_baseline_at_that_size_or_rate_gives_no_cell() {
        let runs = [
            summary("warren-1n", Some(1.0), 10_000.0, 7.0, 19.0),
            summary("amqp-noack", None, 60_000.0, 3.5, 5.0),
        ];
        assert_eq!(ratio_cell(&runs, &runs[0], "amqp-noack"), "-");
    }
}
