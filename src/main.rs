//! The `warren` binary: parse configuration, build the runtime, set up
//! logging, run a node until SIGINT or SIGTERM, then shut it down gracefully.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use warren::config::{Config, LogFormat, Tool};
use warren::shutdown::Signal;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(tool) = &config.tool {
        return run_tool(tool, &config);
    }
    runtime(config.nap_us)?.block_on(serve(config))
}

/// The node's runtime. With a nap, a worker about to block first sleeps, so
/// one wake-up finds many deliveries: fewer wake-ups and socket writes per
/// delivery, at the cost of at most the nap in latency.
fn runtime(nap_us: u64) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if nap_us > 0 {
        let nap = std::time::Duration::from_micros(nap_us);
        builder.on_thread_park(move || std::thread::sleep(nap));
    }
    builder.build()
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // lapin logs every returned (unroutable) message at WARN with its body; a
    // direct message to an offline user is routine here, and private.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin::returned_messages=error"));
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
    }
    let config_drain_secs = config.drain_secs;
    let server = warren::RunningServer::start(config).await?;
    println!("warren listening on http://{}", server.local_addr());
    let drain = std::time::Duration::from_secs(config_drain_secs);
    match warren::shutdown::signal().await {
        Signal::Interrupt => {
            tracing::info!("SIGINT: shutting down");
            server.shutdown().await;
        }
        Signal::Terminate => {
            tracing::info!("SIGTERM: draining, then shutting down");
            server
                .drain(drain, async {
                    warren::shutdown::signal().await;
                })
                .await;
        }
    }
    Ok(())
}

/// `warren token …`: print a development token.
fn run_tool(tool: &Tool, config: &Config) -> anyhow::Result<()> {
    match tool {
        Tool::Token {
            sub,
            rooms,
            rooms_read,
            ttl,
        } => {
            let secret = config.jwt_secret.as_deref().ok_or_else(|| {
                anyhow::anyhow!("warren token needs --jwt-secret (or WARREN_JWT_SECRET)")
            })?;
            warren::names::UserId::parse(sub)?;
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + ttl.as_secs();
            let claims = warren::auth::Claims {
                sub: sub.clone(),
                exp,
                rooms: rooms.clone(),
                rooms_read: rooms_read.clone(),
            };
            println!("{}", warren::auth::mint(secret, &claims));
            Ok(())
        }
    }
}
