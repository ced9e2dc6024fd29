//! The command line. Every run of the fan-out scenario is one target × one N;
//! `--compare` repeats several targets back to back.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};

/// Load benchmark for Warren: the fan-out test, measured against the broker's own
/// limit (raw AMQP) and against RabbitMQ Web-STOMP.
#[derive(Debug, Parser)]
#[command(name = "warren-bench", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// What to measure.
    #[arg(long, value_enum, default_value = "fanout")]
    pub scenario: Scenario,

    /// Which server the clients talk to (ignored with --compare).
    #[arg(long, value_enum, default_value = "warren")]
    pub target: TargetKind,

    /// Run these targets back to back, --repeat times each, and print medians and
    /// the Warren/amqp and Warren/stomp ratios. Example: warren,amqp,stomp.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub compare: Vec<TargetKind>,

    /// Runs per target with --compare; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,

    /// Warren node WebSocket endpoints; clients are spread over them round-robin.
    #[arg(
        long = "url",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub urls: Vec<String>,

    /// Warren's --jwt-secret, when it requires tokens: each client connects with
    /// an HS256 token for its own user id.
    #[arg(long, env = "WARREN_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// The broker, for the amqp target (and to declare the Web-STOMP exchange).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// AMQP connections the amqp target spreads its channels over (Warren's default).
    #[arg(long, default_value_t = 4)]
    pub amqp_connections: usize,

    /// RabbitMQ Web-STOMP endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:15674/ws")]
    pub stomp_url: String,

    /// Clients (N) in the room, or connections (C) in the connections scenario.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub clients: usize,

    /// Messages (M) each client sends.
    #[arg(long, short = 'm', default_value_t = 100)]
    pub messages: u32,

    /// Messages per second per client; unset: as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Bytes of each message's text (at least what sender, sequence and send time
    /// take; padded with 'x').
    #[arg(long, default_value_t = 64)]
    pub size: usize,

    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,

    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,

    /// Before each run, wait up to this many seconds for other processes to use
    /// less than a quarter of a core (0: don't wait).
    #[arg(long, default_value_t = 300.0)]
    pub quiet_wait: f64,

    /// PIDs of the Warren node(s), for their CPU seconds and peak RSS.
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub server_pids: Vec<u32>,

    /// PID of the broker (beam.smp); default: found by name in /proc.
    #[arg(long)]
    pub broker_pid: Option<u32>,

    /// Name of this configuration in reports (default: the target, and for Warren
    /// the node count, e.g. warren-2n).
    #[arg(long)]
    pub label: Option<String>,

    /// Print one JSON line per run on stdout instead of the human table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Turn saved --json lines into Markdown tables (stdout) and an SVG chart.
    Render(RenderArgs),
}

#[derive(Debug, ClapArgs)]
pub struct RenderArgs {
    /// Files of --json lines.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,

    /// Write the chart of deliveries/s by N per target here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// N clients in one room; each sends M and must receive all N×M.
    Fanout,
    /// C idle connections, then one broadcast to all of them.
    Connections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// Warren over WebSocket, at --url.
    Warren,
    /// The same topology straight on RabbitMQ with lapin: the ceiling.
    Amqp,
    /// RabbitMQ Web-STOMP (STOMP 1.2 over WebSocket).
    Stomp,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Warren => "warren",
            TargetKind::Amqp => "amqp",
            TargetKind::Stomp => "stomp",
        }
    }
}

impl Args {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.1))
    }

    /// The label a run of `target` is reported under.
    pub fn label_for(&self, target: TargetKind) -> String {
        match (&self.label, target) {
            (Some(label), TargetKind::Warren) => label.clone(),
            (None, TargetKind::Warren) => format!("warren-{}n", self.urls.len()),
            (_, other) => other.name().to_string(),
        }
    }
}
