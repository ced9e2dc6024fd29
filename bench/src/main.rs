//! `warren-bench`: the load benchmark for Warren and the broker under it.
//!
//! # Layout
//!
//! - [`cli`]: the flags (`warren-bench --help` is the reference).
//! - [`target`]: what a benchmark client talks to: Warren over WebSocket, the raw
//!   broker over AMQP (the ceiling), or RabbitMQ's Web-STOMP (the peer).
//! - [`payload`]: the message body every target carries, and how a receiver
//!   reads sender, sequence number and send time back out of it.
//! - [`tally`]: one receiver's exact accounting: lost, duplicated, reordered,
//!   latency.
//! - [`scenario`]: the fan-out and the connections scenarios.
//! - [`proc_stats`]: CPU seconds and RSS of the server, the broker and the bench
//!   itself, from `/proc`.
//! - [`broker_counters`]: RabbitMQ's own count of messages in and deliveries
//!   out over a run.
//! - [`report`]: the human table, the JSON line, medians and ratios.
//! - [`render`]: turns saved JSON lines into the Markdown tables and the SVG chart
//!   of `docs/BENCHMARKS.md`.

mod broker_counters;
mod cli;
mod payload;
mod proc_stats;
mod render;
mod report;
mod scenario;
mod tally;
mod target;

use std::process::ExitCode;

use clap::Parser;

use cli::{Args, Command, RuntimeKind, Scenario};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Render(render_args)) = &args.command {
        return match render::run(render_args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("warren-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    proc_stats::raise_fd_limit();
    let runtime = match runtime(&args) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("warren-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match args.scenario {
            Scenario::Fanout => scenario::fanout::run_all(&args).await,
            Scenario::Connections => scenario::connections::run(&args).await,
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        // The run finished but lost messages or connections: a failed benchmark.
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("warren-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The bench's runtime. The nap is the batching: a thread that is about to block
/// in the reactor first sleeps `--nap-us`, so the frames that arrive meanwhile
/// (on every socket, and from lapin's I/O threads) are handled in one pass, and
/// wake-ups from other threads find the thread busy instead of paying a syscall
/// each. A client that receives tens of thousands of deliveries a second spends
/// less CPU per delivery this way; latency grows by at most the nap.
fn runtime(args: &Args) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match args.runtime {
        RuntimeKind::Current => tokio::runtime::Builder::new_current_thread(),
        RuntimeKind::Multi => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    if args.nap_us > 0 {
        let nap = std::time::Duration::from_micros(args.nap_us);
        builder.on_thread_park(move || std::thread::sleep(nap));
    }
    builder.build()
}
