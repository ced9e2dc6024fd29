//! How many sessions one node opens on the broker per second (issue 15: a
//! reconnect storm of 2,000 clients is bounded by it). A measurement, not a
//! check: ignored by default, and run on its own against the real broker:
//!
//! ```text
//! cargo test --test opens -- --ignored --nocapture
//! ```
//!
//! Each open is what a storm's reconnect costs the bus: `Bus::open` (slot,
//! channel, the connection's queue, its direct binding, the consumer, and the
//! bind to the URL's room, as the storm's clients ask with `?room=storm`). The
//! node is configured as `tests/haproxy.rs` runs it (2 pooled connections,
//! the default resume grace, no history). Opens are timed in rounds of
//! `WARREN_OPENS` (1,000) sessions, `WARREN_OPENS_AT_ONCE` (64) at a time;
//! each round's sessions are released after its clock stops. A debug
//! build, as the storm test runs the node. With `WARREN_BROKER_PID` (the
//! broker's OS pid, `rabbitmq-diagnostics status`), the broker's CPU time
//! per open is printed too: it counts every client of the broker, so it is
//! honest only on a broker nobody else is busy with.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use warren::bus::{AckMode, Bus, Opening, Release, Subscription};
use warren::names::{RoomName, SessionId, UserId};

use common::fault::env_count;
use common::{BusKind, config, unique_prefix};

const ROUNDS: usize = 3;

/// CPU time the process `pid` has used (user and system), from
/// `/proc/<pid>/stat`.
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the broker's pid");
    // The fields after the command (which may hold spaces) and its `)`.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf runs");
    let per_second: u64 = String::from_utf8(per_second.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

async fn open_one(bus: &Bus, user: &UserId, room: &RoomName) -> Subscription {
    let session = SessionId::random();
    let opening = Opening {
        session: &session,
        user,
        slot: 0,
        acks: AckMode::Server,
        resume: None,
        room: Some(room),
    };
    bus.open(&opening).await.expect("the session opens")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement against the real broker; run with --ignored --nocapture"]
async fn opens_per_second() {
    let count = env_count("WARREN_OPENS", 1000);
    let at_once = env_count("WARREN_OPENS_AT_ONCE", 64);
    let prefix = unique_prefix("opens");
    let mut config = config(BusKind::Amqp, &prefix);
    config.resume_grace_secs = warren::Config::defaults().resume_grace_secs;
    let reconnects = Default::default();
    let bus = Bus::connect(&config, "opens-1", reconnects)
        .await
        .expect("the bus connects");
    let room = RoomName::parse("storm").unwrap();
    let broker = std::env::var("WARREN_BROKER_PID").ok();

    let mut rates = Vec::new();
    for round in 0..ROUNDS {
        let users: Vec<UserId> = (0..count)
            .map(|i| UserId::parse(&format!("r{round}u{i}")).unwrap())
            .collect();
        let broker_before = broker.as_deref().map(cpu_time);
        let started = Instant::now();
        let opened: Vec<Subscription> = futures_util::stream::iter(&users)
            .map(|user| open_one(&bus, user, &room))
            .buffer_unordered(at_once)
            .collect()
            .await;
        let took = started.elapsed();
        let rate = count as f64 / took.as_secs_f64();
        let broker_cpu = broker
            .as_deref()
            .map(cpu_time)
            .zip(broker_before)
            .map(|(after, before)| {
                let per_open = (after - before).as_secs_f64() * 1000.0 / count as f64;
                format!("; broker CPU {per_open:.2} ms per open")
            })
            .unwrap_or_default();
        println!(
            "round {round}: {count} opens, {at_once} at once, in {:.2} s: {rate:.0} opens/s{broker_cpu}",
            took.as_secs_f64()
        );
        rates.push(rate);
        futures_util::stream::iter(opened)
            .for_each_concurrent(at_once, |subscription| {
                subscription.into_lease().release(Release::Delete)
            })
            .await;
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median of {ROUNDS}: {:.0} opens/s (rounds: {rates:.0?})",
        rates[ROUNDS / 2]
    );
    bus.close().await;
}
