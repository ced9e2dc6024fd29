//! The fan-out scenario: N clients in one room; once all are subscribed, each
//! sends M messages and must receive all N×M, its own included.
//!
//! Each client runs two tasks: a sender, held at a start signal until every
//! client is subscribed, and a receiver that keeps an exact [`Tally`]. The run
//! ends when every receiver has everything or at `--timeout`, whichever is first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{FutureExt, StreamExt, TryStreamExt, stream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker_counters::{self, BrokerCounters};
use crate::cli::{Args, Config, TargetKind};
use crate::payload::{self, Received};
use crate::proc_stats::{CpuWatch, find_broker, find_redis, wait_for_quiet};
use crate::report::{self, FanoutReport, Latency};
use crate::tally::{Tally, new_histogram};
use crate::target::{Inbox, Outbox, Room};

/// Pause between runs, so one run's teardown (queue deletions on the broker)
/// does not eat into the next run's measurement.
const SETTLE: Duration = Duration::from_secs(2);

/// Run the fan-out for `--target`, or every `--compare` target `--repeat` times,
/// each in every variant asked for (`--amqp-mode`, `--acks`), interleaved.
/// `Ok(false)` when any run lost messages.
pub async fn run_all(args: &Args) -> Result<bool> {
    let configs = args.configs();
    let repeat = if args.compare.is_empty() {
        1
    } else {
        args.repeat.max(1)
    };
    let watch = CpuWatch {
        servers: args.server_pids.clone(),
        broker: args.broker_pid.or_else(find_broker),
    };
    let mut reports = Vec::new();
    let mut all_delivered = true;
    for round in 0..repeat {
        for &config in &configs {
            if round > 0 || !reports.is_empty() {
                tokio::time::sleep(SETTLE).await;
            }
            let report = run_one(args, config, &watch)
                .await
                .with_context(|| format!("{} run {}", args.label_for(config), round + 1))?;
            all_delivered &= report.lost == 0;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report::print_fanout(&report);
            }
            reports.push(report);
        }
    }
    if !args.compare.is_empty() && !args.json {
        report::print_comparison(&reports);
    }
    Ok(all_delivered)
}

async fn run_one(args: &Args, config: Config, watch: &CpuWatch) -> Result<FanoutReport> {
    let target = config.target();
    // Socket.IO's broker is Redis, not RabbitMQ: its CPU is what the nodes'
    // broadcasts cost there.
    let redis_watch;
    let watch = if target == TargetKind::Socketio {
        redis_watch = CpuWatch {
            servers: watch.servers.clone(),
            broker: find_redis(),
        };
        &redis_watch
    } else {
        watch
    };
    let n = args.clients.max(1);
    let m = args.messages;
    if args.quiet_wait > 0.0 {
        wait_for_quiet(watch, 0.25, Duration::from_secs_f64(args.quiet_wait)).await;
    }
    let room = Arc::new(Room::open(args, config).await?);
    let room_name: Arc<str> = room.name().into();

    let connecting = Instant::now();
    let clients: Vec<_> = stream::iter(0..n)
        .map(|i| {
            let room = room.clone();
            async move { room.connect(i).await.with_context(|| format!("client {i}")) }
        })
        .buffered(args.connect_concurrency.max(1))
        .try_collect()
        .await?;
    let connect_secs = connecting.elapsed().as_secs_f64();

    let (start_tx, start_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let first_send_us = Arc::new(AtomicU64::new(u64::MAX));
    let mut receivers = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    for (i, client) in clients.into_iter().enumerate() {
        receivers.push(tokio::spawn(receive(
            client.inbox,
            Tally::new(n, m),
            stop_rx.clone(),
            received.clone(),
        )));
        let plan = SendPlan {
            index: i,
            clients: n,
            messages: m,
            rate: args.rate,
            size: args.size,
            room: room_name.clone(),
        };
        senders.push(tokio::spawn(send(
            client.outbox,
            plan,
            start_rx.clone(),
            first_send_us.clone(),
        )));
    }

    // RabbitMQ's counters, read while every client is connected and idle (the
    // Socket.IO peer's broker is Redis, which has none of them).
    let counted = target != TargetKind::Socketio;
    let counters_before = if counted { read_counters().await } else { None };
    let before = watch.snapshot();
    let _ = start_tx.send(true);
    let expected = (n * n) as u64 * u64::from(m);
    let label = args.label_for(config);
    let bar = super::progress_bar(expected, &label);
    let (tallies, timed_out) = wait(receivers, &stop_tx, &received, &bar, args.timeout()).await;
    let after = watch.snapshot();
    bar.finish_and_clear();
    let counters = match counters_before {
        Some(before) => read_counters().await.map(|after| after - before),
        None => None,
    };

    let mut outboxes = Vec::with_capacity(n);
    for sender in senders {
        match tokio::time::timeout(Duration::from_secs(5), sender).await {
            Ok(Ok((outbox, Ok(())))) => outboxes.push(outbox),
            Ok(Ok((outbox, Err(e)))) => {
                eprintln!("warren-bench: a sender failed: {e:#}");
                outboxes.push(outbox);
            }
            _ => eprintln!("warren-bench: a sender did not finish"),
        }
    }
    futures_util::future::join_all(outboxes.into_iter().map(Outbox::close)).await;
    if let Ok(room) = Arc::try_unwrap(room) {
        room.close().await;
    }

    let mut latency = new_histogram();
    let (mut unique, mut duplicated, mut reordered, mut last_us) = (0, 0, 0, 0);
    for (tally, error) in &tallies {
        if let Some(e) = error {
            eprintln!("warren-bench: a receiver stopped early: {e:#}");
        }
        unique += tally.unique;
        duplicated += tally.duplicated;
        reordered += tally.reordered;
        last_us = last_us.max(tally.last_us);
        latency.add(&tally.latency_us).ok();
    }
    let first_us = first_send_us.load(Ordering::Relaxed);
    let elapsed_secs = last_us.saturating_sub(first_us) as f64 / 1e6;
    let cpu = after - before;
    // --server-pid names Warren's nodes or the Socket.IO peer's.
    let has_servers = matches!(target, TargetKind::Warren | TargetKind::Socketio);
    Ok(FanoutReport {
        scenario: "fanout".into(),
        label,
        target: target.name().into(),
        mode: config.mode().map(Into::into),
        nodes: match target {
            TargetKind::Warren => args.urls.len(),
            TargetKind::Socketio => args.socketio_urls.len(),
            TargetKind::Amqp | TargetKind::Stomp => 0,
        },
        clients: n,
        messages: m,
        size: args.size,
        rate: args.rate,
        connect_secs,
        elapsed_secs,
        expected,
        received: unique,
        lost: expected - unique.min(expected),
        duplicated,
        reordered,
        deliveries_per_sec: if elapsed_secs > 0.0 {
            unique as f64 / elapsed_secs
        } else {
            0.0
        },
        latency_us: Latency::of(&latency),
        server_cpu_secs: (has_servers && !watch.servers.is_empty()).then_some(cpu.servers),
        broker_cpu_secs: watch.broker.map(|_| cpu.broker),
        bench_cpu_secs: cpu.bench,
        other_cpu_secs: Some(cpu.others()),
        server_peak_rss_kib: if has_servers {
            watch.servers_peak_rss_kib()
        } else {
            None
        },
        broker_counters: counters,
        timed_out,
    })
}

async fn read_counters() -> Option<BrokerCounters> {
    tokio::task::spawn_blocking(broker_counters::read)
        .await
        .ok()
        .flatten()
}

/// Wait for every receiver, or stop them at `timeout`; advances the bar meanwhile.
async fn wait(
    receivers: Vec<JoinHandle<(Tally, Option<anyhow::Error>)>>,
    stop: &watch::Sender<bool>,
    received: &AtomicU64,
    bar: &indicatif::ProgressBar,
    timeout: Duration,
) -> (Vec<(Tally, Option<anyhow::Error>)>, bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut all = std::pin::pin!(futures_util::future::join_all(receivers));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut timed_out = false;
    loop {
        tokio::select! {
            results = &mut all => {
                bar.set_position(received.load(Ordering::Relaxed));
                let tallies = results.into_iter().filter_map(|r| r.ok()).collect();
                return (tallies, timed_out);
            }
            _ = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                let _ = stop.send(true);
            }
            _ = tick.tick() => bar.set_position(received.load(Ordering::Relaxed)),
        }
    }
}

/// What one sender sends, and when.
struct SendPlan {
    index: usize,
    clients: usize,
    messages: u32,
    rate: Option<f64>,
    size: usize,
    room: Arc<str>,
}

async fn send(
    mut outbox: Outbox,
    plan: SendPlan,
    mut start: watch::Receiver<bool>,
    first_send_us: Arc<AtomicU64>,
) -> (Outbox, Result<()>) {
    let result = async {
        start.wait_for(|started| *started).await?;
        // With a rate, clients are spread evenly over one period instead of all
        // sending in the same instant, like independent users would be.
        let mut ticker = match plan.rate {
            Some(rate) if rate > 0.0 => {
                let period = Duration::from_secs_f64(1.0 / rate);
                let offset = period.mul_f64(plan.index as f64 / plan.clients as f64);
                let mut ticker =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                Some(ticker)
            }
            _ => None,
        };
        for seq in 0..plan.messages {
            if let Some(ticker) = ticker.as_mut() {
                ticker.tick().await;
            }
            let sent_us = payload::now_us();
            first_send_us.fetch_min(sent_us, Ordering::Relaxed);
            let text = payload::text(plan.index, seq, sent_us, plan.size);
            // Paced messages go out one by one; unpaced ones as fast as the
            // socket takes them.
            outbox
                .send(&plan.room, plan.index, seq, &text, ticker.is_some())
                .await?;
        }
        outbox.flush().await
    }
    .await;
    (outbox, result)
}

async fn receive(
    mut inbox: Inbox,
    mut tally: Tally,
    mut stop: watch::Receiver<bool>,
    received: Arc<AtomicU64>,
) -> (Tally, Option<anyhow::Error>) {
    let mut error = None;
    while !tally.complete() {
        // A delivery already waiting is taken without arming the stop signal,
        // so it costs the bench no more than reading it.
        let next = match inbox.next().now_or_never() {
            Some(next) => next,
            None => tokio::select! {
                biased;
                _ = stop.changed() => break,
                next = inbox.next() => next,
            },
        };
        match next {
            Some(Ok(document)) => match payload::parse(&document) {
                Received::Message(stamp) => {
                    let before = tally.unique;
                    tally.record(stamp, payload::now_us());
                    received.fetch_add(tally.unique - before, Ordering::Relaxed);
                }
                Received::Other => {}
                Received::Malformed => tally.foreign += 1,
            },
            Some(Err(e)) => {
                error = Some(e);
                break;
            }
            None => {
                error = Some(anyhow::anyhow!("the server closed the connection"));
                break;
            }
        }
    }
    drop(inbox);
    (tally, error)
}
