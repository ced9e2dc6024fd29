//! What the fault scenarios of issue 15 share: reconnecting as the chat page
//! does, percentiles, and the `FAULT-FIGURES` line `scripts/faults` collects
//! into docs/RELIABILITY.md.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use super::{Client, next_json};

/// The chat page's delay before reconnect attempt `attempt` (0-based), as
/// `backoffDelay` in clients/js/warren-client.js with the page's settings:
/// full jitter under 500 ms × 2^attempt, capped at 15 s.
pub fn page_backoff(attempt: u32) -> Duration {
    let ceiling = 500u64.saturating_mul(1 << attempt.min(10)).min(15_000);
    Duration::from_millis(rand::random_range(0..ceiling))
}

/// Reconnect to `url` as the page does after losing its socket: wait its
/// backoff, try, and after each refusal (503, 409) or failed connection wait
/// the next, longer one. The client, once welcomed, and the attempts it took.
/// Panics at `deadline`.
pub async fn reconnect_like_the_page(url: &str, deadline: Instant) -> (Client, u32) {
    let mut attempt = 0;
    loop {
        // The backoff is the behaviour under test, not a wait for an event.
        tokio::time::sleep(page_backoff(attempt)).await;
        attempt += 1;
        let connected = tokio::time::timeout_at(deadline, tokio_tungstenite::connect_async(url))
            .await
            .unwrap_or_else(|_| panic!("{url}: not back by the deadline ({attempt} attempts)"));
        match connected {
            Ok((mut socket, _)) => {
                let welcome = next_json(&mut socket).await;
                assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
                return (Client { socket, welcome }, attempt);
            }
            Err(tungstenite::Error::Http(response))
                if matches!(response.status().as_u16(), 409 | 503) => {}
            Err(tungstenite::Error::Io(_)) => {}
            Err(e) => panic!("{url}: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "{url}: refused until the deadline ({attempt} attempts)"
        );
    }
}

/// The `p`th percentile (0–100) of `samples`, nearest rank; zero for none.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Seconds with two decimals, for figures.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Milliseconds with one decimal, for figures.
pub fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Print one scenario's figures as a `FAULT-FIGURES {json}` line for
/// `scripts/faults`. `figures` carries `scenario` (its number in issue 15),
/// `title`, `load`, `pass` (the issue's own criterion, which may be stricter
/// than what the test asserts) and any of `recovery`, `lost`, `duplicated`,
/// `rss`, `notes`.
pub fn report(figures: Value) {
    println!("FAULT-FIGURES {figures}");
}

/// A count from the environment (`scripts/faults` runs the long versions),
/// or `default`.
pub fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
