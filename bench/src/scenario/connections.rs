//! The connections scenario: open C idle Warren connections (each with its own
//! queue on the broker) as fast as the node accepts them, measure the node's RSS
//! per connection, then send one broadcast and time its arrival at all C.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::{StreamExt, stream};
use tokio::sync::watch;

use crate::cli::{Args, Config, TargetKind, WarrenAcks};
use crate::payload::{self, Received};
use crate::proc_stats::{CpuWatch, find_broker};
use crate::report::{self, ConnectionsReport};
use crate::target::{Inbox, Room};

/// Time for the node to finish per-connection setup before its RSS is read.
const SETTLE: Duration = Duration::from_secs(3);

pub async fn run(args: &Args) -> Result<bool> {
    if args.target != TargetKind::Warren {
        bail!("the connections scenario measures Warren only (--target warren)");
    }
    let watch = CpuWatch {
        servers: args.server_pids.clone(),
        broker: args.broker_pid.or_else(find_broker),
    };
    let wanted = args.clients.max(1);
    let room = Arc::new(Room::open(args, Config::Warren(WarrenAcks::None)).await?);
    let rss_before = watch.servers_rss_kib();

    // Each connection starts reading the moment it is up: tungstenite answers the
    // node's pings only while the socket is read, and Warren drops a connection
    // that stays silent for two ping intervals.
    let (stop_tx, stop_rx) = watch::channel(false);
    let arrived = Arc::new(AtomicUsize::new(0));
    let last_us = Arc::new(AtomicU64::new(0));
    let bar = super::progress_bar(wanted as u64, "connect");
    let connecting = Instant::now();
    let results: Vec<_> = stream::iter(0..wanted)
        .map(|i| {
            let room = room.clone();
            let bar = bar.clone();
            let stop = stop_rx.clone();
            let (arrived, last_us) = (arrived.clone(), last_us.clone());
            async move {
                let client = room.connect(i).await;
                bar.inc(1);
                client.map(|client| {
                    let reader =
                        tokio::spawn(await_broadcast(client.inbox, stop, arrived, last_us));
                    (client.outbox, reader)
                })
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect()
        .await;
    let connect_secs = connecting.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut outboxes = Vec::with_capacity(wanted);
    let mut readers = Vec::with_capacity(wanted);
    let mut failed = 0;
    let mut first_error = None;
    for result in results {
        match result {
            Ok((outbox, reader)) => {
                outboxes.push(outbox);
                readers.push(reader);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = &first_error {
        eprintln!("warren-bench: {failed} connections failed; the first: {e:#}");
    }
    let connected = outboxes.len();

    tokio::time::sleep(SETTLE).await;
    let rss_after = watch.servers_rss_kib();

    let mut broadcast_secs = None;
    if let Some(sender) = outboxes.first_mut() {
        let sent_us = payload::now_us();
        let text = payload::text(0, 0, sent_us, args.size);
        sender.send(room.name(), 0, 0, &text, true).await?;
        let give_up = Instant::now() + args.timeout();
        while arrived.load(Ordering::Relaxed) < connected && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if arrived.load(Ordering::Relaxed) >= connected {
            broadcast_secs =
                Some(last_us.load(Ordering::Relaxed).saturating_sub(sent_us) as f64 / 1e6);
        }
    }
    let received = arrived.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for reader in readers {
        let _ = reader.await;
    }
    let peak = watch.servers_peak_rss_kib();
    stream::iter(outboxes)
        .for_each_concurrent(256, |outbox| outbox.close())
        .await;

    let report = ConnectionsReport {
        scenario: "connections".into(),
        label: args.label_for(Config::Warren(WarrenAcks::None)),
        requested: wanted,
        connected,
        failed,
        connect_secs,
        connects_per_sec: connected as f64 / connect_secs.max(1e-9),
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_kib: match (rss_before, rss_after) {
            (Some(b), Some(a)) if connected > 0 => {
                Some(a.saturating_sub(b) as f64 / connected as f64)
            }
            _ => None,
        },
        server_peak_rss_kib: peak,
        broadcast_received: received,
        broadcast_secs,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report::print_connections(&report);
    }
    Ok(failed == 0 && received == connected)
}

async fn await_broadcast(
    mut inbox: Inbox,
    mut stop: watch::Receiver<bool>,
    arrived: Arc<AtomicUsize>,
    last_us: Arc<AtomicU64>,
) {
    let mut got_it = false;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            next = inbox.next() => match next {
                Some(Ok(document)) => {
                    if !got_it && matches!(payload::parse(&document), Received::Message(_)) {
                        got_it = true;
                        last_us.fetch_max(payload::now_us(), Ordering::Relaxed);
                        arrived.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => return,
            }
        }
    }
}
