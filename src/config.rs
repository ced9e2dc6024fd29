//! Command-line and environment configuration.
//!
//! Every flag has an environment variable so containers can be configured without
//! a wrapper script; `warren --help` is the reference.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// What reads a session's queue on RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AmqpConsumer {
    /// lapin, which also declares, binds and publishes.
    Lapin,
    /// A consuming connection of Warren's own beside each pooled lapin
    /// connection: about half of Warren's CPU per delivery, one more channel
    /// per session on the broker. Plain `amqp://` only: a TLS broker keeps
    /// lapin's consumers.
    #[default]
    Own,
}

/// How a room's messages reach the sessions in it on RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum RoomFanout {
    /// Every connection's own queue is bound to the room's exchange: the
    /// broker delivers each message once per member, and a resumed session
    /// gets what it missed from its queue.
    #[default]
    PerConnection,
    /// Each node binds one queue of its own to the rooms its sessions are
    /// in and fans each message out in process: the broker delivers it once
    /// per node. Connections keep their queue for direct messages; a resumed
    /// session gets a room's missed messages from history.
    PerNode,
}

/// Warren: a WebSocket chat server whose nodes scale out through RabbitMQ.
#[derive(Debug, Clone, Parser)]
#[command(name = "warren", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket connections.
    #[arg(long, env = "WARREN_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f. Unset: the embedded
    /// in-process bus (one node, no broker). Warren proposes `frame_max=16384` unless
    /// the URL sets `?frame_max=` (each connection buffers 64 frames).
    #[arg(long, env = "AMQP_URL")]
    pub amqp_url: Option<String>,

    /// Prefix of every exchange and queue name, so tenants and tests can share a broker.
    #[arg(long, env = "WARREN_PREFIX", default_value = "warren")]
    pub prefix: String,

    /// This node's id, shown to clients in `welcome`. Default: random.
    #[arg(long, env = "WARREN_NODE_ID")]
    pub node_id: Option<String>,

    /// Directory the chat page and its assets are served from.
    #[arg(long, env = "WARREN_STATIC_DIR", default_value = "static")]
    pub static_dir: PathBuf,

    /// Largest `text` of a chat message, in UTF-8 bytes.
    #[arg(long, env = "WARREN_MAX_TEXT_BYTES", default_value_t = 4096)]
    pub max_text_bytes: usize,

    /// Largest WebSocket message a client may send; larger ones close the socket with 1009.
    #[arg(long, env = "WARREN_MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,

    /// Origins allowed to open a WebSocket, comma-separated (e.g.
    /// https://chat.example.com), or `*` for any. Default: same origin only, plus
    /// clients that send no Origin header.
    #[arg(long, env = "WARREN_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// AMQP connections in the pool; each carries up to 2,000 session channels.
    #[arg(long, env = "WARREN_AMQP_CONNECTIONS", default_value_t = 4)]
    pub amqp_connections: usize,

    /// Messages kept per session queue for a slow client before the oldest are dropped.
    #[arg(long, env = "WARREN_QUEUE_MAX_LENGTH", default_value_t = 10_000)]
    pub queue_max_length: u32,

    /// How room messages reach sessions on RabbitMQ: `per-connection` (one
    /// broker delivery per member) or `per-node` (one per node, fanned out in
    /// process). The embedded bus always fans out in process.
    #[arg(long, env = "WARREN_ROOM_FANOUT", value_enum, default_value_t = RoomFanout::PerConnection)]
    pub room_fanout: RoomFanout,

    /// What reads sessions' queues on RabbitMQ: `own` (a consuming
    /// connection of Warren's own per pooled connection: about half the CPU
    /// per delivery, one more channel per session on the broker; plain
    /// `amqp://` only) or `lapin`.
    #[arg(long, env = "WARREN_AMQP_CONSUMER", value_enum, default_value_t = AmqpConsumer::Own)]
    pub amqp_consumer: AmqpConsumer,

    /// Seconds a connection's queue outlives its socket, so the client can
    /// reconnect (to any node) with `?resume=<session>` and get what it missed.
    /// 0: the queue is exclusive and goes with the socket, and nothing resumes.
    #[arg(long, env = "WARREN_RESUME_GRACE_SECS", default_value_t = 30)]
    pub resume_grace_secs: u64,

    /// Messages of each room kept for history (`subscribe` with `history`,
    /// `GET /rooms/<room>/messages`); 0 keeps none.
    #[arg(long, env = "WARREN_HISTORY_PER_ROOM", default_value_t = 100)]
    pub history_per_room: usize,

    /// How long the broker keeps history (the stream's `x-max-age`): `90s`,
    /// `15m`, `1h`, `7d`.
    #[arg(long, env = "WARREN_HISTORY_MAX_AGE", default_value = "7d", value_parser = parse_ttl)]
    pub history_max_age: Duration,

    /// How many bytes of history the broker keeps at most (the stream's
    /// `x-max-length-bytes`).
    #[arg(long, env = "WARREN_HISTORY_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub history_max_bytes: u64,

    /// Seconds between WebSocket pings; a client silent for two intervals is dropped.
    #[arg(long, env = "WARREN_PING_INTERVAL_SECS", default_value_t = 30)]
    pub ping_interval_secs: u64,

    /// On SIGTERM, seconds to keep serving (not ready, no new sessions) before
    /// closing sessions with 1012 so clients reconnect elsewhere.
    #[arg(long, env = "WARREN_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,

    /// Seconds over which the drain's 1012 closes are spread at random.
    #[arg(long, env = "WARREN_DRAIN_JITTER_SECS", default_value_t = 5)]
    pub drain_jitter_secs: u64,

    /// Seconds a node may stay silent before other nodes drop its users from
    /// member lists and it leaves `/cluster`.
    #[arg(long, env = "WARREN_PRESENCE_TTL_SECS", default_value_t = 30)]
    pub presence_ttl_secs: u64,

    /// Milliseconds over which joins and leaves are batched into one presence frame.
    #[arg(long, env = "WARREN_PRESENCE_BATCH_MS", default_value_t = 100)]
    pub presence_batch_ms: u64,

    /// Seconds between keep-alive comments on idle Server-Sent Events streams, so
    /// proxies don't cut them.
    #[arg(long, env = "WARREN_SSE_KEEPALIVE_SECS", default_value_t = 15)]
    pub sse_keepalive_secs: u64,

    /// Secret for the posting tokens in `welcome` frames. Every node of a cluster
    /// must share it; unset, each node picks a random one (fine for one node).
    #[arg(long, env = "WARREN_SESSION_SECRET", hide_env_values = true)]
    pub session_secret: Option<String>,

    /// Rooms with more members than this get no live presence diffs, and their
    /// `welcome` lists only this many (with `members_total`): per-join frames to
    /// every member would cost O(members²).
    #[arg(long, env = "WARREN_PRESENCE_MAX_MEMBERS", default_value_t = 1000)]
    pub presence_max_members: usize,

    /// Connections one user id may hold at once, across the cluster (tabs,
    /// devices). One more is refused with `409 too_many_sessions`; 1 gives
    /// protocol v1's one-session-per-user rule.
    #[arg(long, env = "WARREN_SESSIONS_PER_USER", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sessions_per_user: u16,

    /// Rooms one connection may subscribe to at once; one more is refused with
    /// `too_many_rooms`.
    #[arg(long, env = "WARREN_MAX_ROOMS_PER_CONNECTION", default_value_t = 100)]
    pub max_rooms_per_connection: usize,

    /// HS256 secret that signs the application's tokens (JWT). Set one of
    /// --jwt-secret, --jwt-public-key, --jwks-url to require tokens; with none,
    /// Warren is anonymous (self-asserted ids).
    #[arg(long, env = "WARREN_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with the RS256 or ES256 public key that verifies tokens.
    #[arg(long, env = "WARREN_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// The identity provider's JWKS URL; keys are cached, and fetched again on an
    /// unknown key id and every 5 minutes.
    #[arg(long, env = "WARREN_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Required `iss` of tokens, when set.
    #[arg(long, env = "WARREN_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` of tokens, when set.
    #[arg(long, env = "WARREN_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// With a key set: let connections without a token in, as read-only
    /// `guest-…` users.
    #[arg(long, env = "WARREN_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Rooms a user may read and write when its token has no `rooms` claim (and
    /// every user's, anonymous): comma-separated patterns, `*` for any run.
    #[arg(
        long,
        env = "WARREN_DEFAULT_ROOMS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub default_rooms: Vec<String>,

    /// Keys of the server-side publish API (`POST /api/rooms/<room>/messages`
    /// with `Authorization: Bearer <key>`); several, comma-separated, for
    /// rotation. Unset: the API answers 401.
    #[arg(
        long = "api-key",
        env = "WARREN_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Chat frames one connection may publish per second, on average.
    #[arg(long, env = "WARREN_PUBLISH_RATE", default_value_t = 20)]
    pub publish_rate: u32,

    /// Chat frames one connection may publish at once above the rate.
    #[arg(long, env = "WARREN_PUBLISH_BURST", default_value_t = 40)]
    pub publish_burst: u32,

    /// Open connections (WebSocket and event streams) per client IP.
    #[arg(long, env = "WARREN_MAX_CONNECTIONS_PER_IP", default_value_t = 200)]
    pub max_connections_per_ip: usize,

    /// New connections per client IP per second (a burst of as many is allowed).
    #[arg(long, env = "WARREN_CONNECTIONS_PER_IP_PER_SEC", default_value_t = 50)]
    pub connections_per_ip_per_sec: u32,

    /// Proxies whose `X-Forwarded-For` is trusted (comma-separated addresses
    /// or networks, e.g. `10.0.0.5,172.16.0.0/12`); a request from any other
    /// address is the client itself.
    #[arg(long, env = "WARREN_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Connections that may wait at once for their first request head (idle or
    /// trickling ones); more are answered `503` at once, so a flood of them
    /// cannot use up the node's open files. Each waits 10 s at most.
    #[arg(long, env = "WARREN_MAX_PENDING_CONNECTIONS", default_value_t = 512)]
    pub max_pending_connections: usize,

    /// Serve `GET /echo`: a WebSocket echo on Warren's own upgrade and limits,
    /// for RFC 6455 conformance runs. Off by default: anyone could use it.
    #[arg(long, env = "WARREN_ECHO_ENDPOINT")]
    pub echo_endpoint: bool,

    /// Microseconds a runtime thread naps before it blocks waiting for work
    /// (0: never). Deliveries that arrive meanwhile, from every socket and from
    /// the broker connections' I/O threads, are then handled in one pass and
    /// written to each socket at once; a message waits at most this long more
    /// per hop. In the card's mode the nap took a third off the node's CPU per
    /// delivery (docs/BENCHMARKS.md, "The runtime's nap").
    #[arg(long, env = "WARREN_NAP_US", default_value_t = 1000)]
    pub nap_us: u64,

    /// Log format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub tool: Option<Tool>,
}

/// Tools the binary offers besides running a node.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Tool {
    /// Print a development token signed with --jwt-secret (HS256).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// Rooms the user may read and write, comma-separated patterns.
        #[arg(long, value_delimiter = ',')]
        rooms: Option<Vec<String>>,
        /// Rooms the user may only read, comma-separated patterns.
        #[arg(long, value_delimiter = ',')]
        rooms_read: Option<Vec<String>>,
        /// Lifetime: a number with s, m, h or d (e.g. 90s, 1h).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

/// `10.0.0.5` (one address) or `10.0.0.0/8`.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not an address or a network"))
}

/// `90s`, `15m`, `1h`, `7d`.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a number with s, m, h or d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: a number with s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

impl Config {
    /// A configuration with every default, as if `warren` ran with no flags and no
    /// environment. Tests start from here.
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        // Parsing reads each flag's environment variable; a test run under
        // `AMQP_URL=…` (as scripts/test exports) must still get the defaults.
        let command = Self::command().mut_args(|arg| arg.env(None));
        Self::from_arg_matches(&command.get_matches_from(["warren"])).expect("the defaults parse")
    }

    /// How long a dropped session stays resumable; `None` when resume is off.
    pub fn resume_grace(&self) -> Option<Duration> {
        (self.resume_grace_secs > 0).then(|| Duration::from_secs(self.resume_grace_secs))
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults_ignore_the_environment() {
        // scripts/test exports AMQP_URL; the defaults still run on the
        // embedded bus.
        assert_eq!(Config::defaults().amqp_url, None);
        assert_eq!(Config::defaults().listen.port(), 8080);
    }

    #[test]
    fn origins_are_comma_separated() {
        let c = Config::parse_from([
            "warren",
            "--allowed-origins",
            "https://a.example,https://b.example",
        ]);
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }
}
