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
    /// Warren's ratios to the baselines. Example: warren,amqp,socketio.
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

    /// AMQP connections the amqp target spreads its channels over. One is the
    /// leanest: each lapin connection runs an I/O thread of its own.
    #[arg(long, default_value_t = 1)]
    pub amqp_connections: usize,

    /// How the amqp target's clients consume; several (e.g. noack,ack) run as
    /// separate configurations, one after the other in each round.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "noack")]
    pub amqp_mode: Vec<AmqpMode>,

    /// The AMQP client of the amqp target's `noack` and `ack` modes (`warren`
    /// always uses lapin, for its confirms).
    #[arg(long, value_enum, default_value = "raw")]
    pub amqp_client: AmqpClient,

    /// How the raw amqp client numbers its messages as Warren does (a link id
    /// and a number per message, which the broker copies into every delivery):
    /// not at all, in Warren's two headers, or in the `message-id` property.
    /// What the numbering costs, apart from everything else Warren does. The
    /// label gains `-headers` or `-msgid`.
    #[arg(long, value_enum, default_value = "none")]
    pub amqp_numbering: AmqpNumbering,

    /// Whether Warren clients ask for client acks (`?acks=client`, then
    /// `ack_upto` every 64 deliveries or 100 ms); several run as separate
    /// configurations.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    pub acks: Vec<WarrenAcks>,

    /// Socket.IO peer nodes (bench/peers/socketio); clients are spread over them
    /// round-robin.
    #[arg(
        long = "socketio-url",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:3000"
    )]
    pub socketio_urls: Vec<String>,

    /// The bench's own runtime: one thread (`current`) or a worker per core
    /// (`multi`).
    #[arg(long, value_enum, default_value = "current")]
    pub runtime: RuntimeKind,

    /// Microseconds a runtime thread naps before it blocks for I/O, so that one
    /// wake-up finds many frames waiting instead of one (0: no nap).
    #[arg(long, default_value_t = 200)]
    pub nap_us: u64,

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
    /// Socket.IO 4 with the Redis adapter (bench/peers/socketio), at --socketio-url.
    Socketio,
}

/// How the amqp target consumes and publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AmqpMode {
    /// No-ack consumers, no publisher confirms, plain queues: the broker's ceiling.
    Noack,
    /// Manual acks (prefetch 256, one `multiple` ack per 64), no confirms.
    Ack,
    /// Warren's choices: confirms, prefetch 256, acks per 64 or 250 ms, bounded
    /// drop-head queues.
    Warren,
}

impl AmqpMode {
    pub fn name(self) -> &'static str {
        match self {
            AmqpMode::Noack => "noack",
            AmqpMode::Ack => "ack",
            AmqpMode::Warren => "warren",
        }
    }
}

/// Which AMQP client the amqp target's consumers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AmqpClient {
    /// The bench's own minimal client: one task per connection, reads in batches.
    Raw,
    /// lapin, as Warren uses it.
    Lapin,
    /// amqprs: what another well-kept client costs per delivery.
    Amqprs,
}

/// How the raw amqp client carries Warren's numbering of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AmqpNumbering {
    /// No properties at all.
    None,
    /// Warren's headers: `x-warren-pub` and `x-warren-seq`, 64-bit integers.
    Headers,
    /// The `message-id` property: `<link id in hex>.<number>`.
    MessageId,
}

impl AmqpNumbering {
    fn suffix(self) -> &'static str {
        match self {
            AmqpNumbering::None => "",
            AmqpNumbering::Headers => "headers",
            AmqpNumbering::MessageId => "msgid",
        }
    }
}

/// Whether a Warren client acknowledges what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WarrenAcks {
    /// No client acks (Warren's default).
    None,
    /// `?acks=client` and `ack_upto` every 64 deliveries or 100 ms, as clients/js.
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    Current,
    Multi,
}

/// One configuration a fan-out run measures: a target and its variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Warren(WarrenAcks),
    Amqp(AmqpMode),
    Stomp,
    Socketio,
}

impl Config {
    pub fn target(self) -> TargetKind {
        match self {
            Config::Warren(_) => TargetKind::Warren,
            Config::Amqp(_) => TargetKind::Amqp,
            Config::Stomp => TargetKind::Stomp,
            Config::Socketio => TargetKind::Socketio,
        }
    }

    /// The variant's name, if the target has variants.
    pub fn mode(self) -> Option<&'static str> {
        match self {
            Config::Warren(WarrenAcks::None) => Some("acks-none"),
            Config::Warren(WarrenAcks::Client) => Some("acks-client"),
            Config::Amqp(mode) => Some(mode.name()),
            Config::Stomp | Config::Socketio => None,
        }
    }
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Warren => "warren",
            TargetKind::Amqp => "amqp",
            TargetKind::Stomp => "stomp",
            TargetKind::Socketio => "socketio",
        }
    }
}

impl Args {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.1))
    }

    /// The configurations to run: every variant of every target asked for.
    pub fn configs(&self) -> Vec<Config> {
        let targets = if self.compare.is_empty() {
            vec![self.target]
        } else {
            self.compare.clone()
        };
        let mut configs = Vec::new();
        for target in targets {
            match target {
                TargetKind::Warren => configs.extend(self.acks.iter().map(|&a| Config::Warren(a))),
                TargetKind::Amqp => configs.extend(self.amqp_mode.iter().map(|&m| Config::Amqp(m))),
                TargetKind::Stomp => configs.push(Config::Stomp),
                TargetKind::Socketio => configs.push(Config::Socketio),
            }
        }
        configs
    }

    /// The label a run of `config` is reported under, e.g. warren-2n,
    /// warren-1n-acks, amqp-noack, socketio-2n.
    pub fn label_for(&self, config: Config) -> String {
        match (&self.label, config) {
            (Some(label), Config::Warren(_)) => label.clone(),
            (None, Config::Warren(WarrenAcks::None)) => format!("warren-{}n", self.urls.len()),
            (None, Config::Warren(WarrenAcks::Client)) => {
                format!("warren-{}n-acks", self.urls.len())
            }
            (_, Config::Amqp(mode))
                if mode != AmqpMode::Warren && self.amqp_client == AmqpClient::Lapin =>
            {
                format!("amqp-{}-lapin", mode.name())
            }
            (_, Config::Amqp(mode))
                if mode != AmqpMode::Warren && self.amqp_client == AmqpClient::Amqprs =>
            {
                format!("amqp-{}-amqprs", mode.name())
            }
            (_, Config::Amqp(mode)) if self.amqp_numbering != AmqpNumbering::None => {
                format!("amqp-{}-{}", mode.name(), self.amqp_numbering.suffix())
            }
            (_, Config::Amqp(mode)) => format!("amqp-{}", mode.name()),
            (_, Config::Stomp) => "stomp".into(),
            (_, Config::Socketio) => format!("socketio-{}n", self.socketio_urls.len()),
        }
    }
}
