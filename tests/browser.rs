//! A real browser: headless Chromium opens the chat page as two users, one sends a
//! message the other sees, and an HTML-looking message shows as text. The browser
//! is driven by `tests/browser/chat.mjs` (playwright-core); screenshots land in
//! `artifacts/browser/`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Run `tests/browser/<script>` with node and `args`; its stdout, after
/// asserting it exited 0.
async fn run_script(script: &str, args: Vec<String>) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run scripts/test, which installs it"
    );
    let script = root.join("tests/browser").join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args(args)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    stdout
}

fn artifacts() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/artifacts/browser").to_owned()
}

#[tokio::test]
async fn two_users_chat_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let server = start(config(BusKind::Amqp, &unique_prefix("browser"))).await;
    let url = format!("http://{}", server.local_addr());
    run_script("chat.mjs", vec![url, artifacts()]).await;
    assert!(root.join("artifacts/browser/chat-a.png").exists());
    assert!(root.join("artifacts/browser/chat-b.png").exists());
    server.shutdown().await;
}

/// The page on a Warren that requires tokens (`--jwt-secret`).
#[tokio::test]
async fn the_page_signs_in_with_a_token() {
    let secret = "browser-test-secret";
    let mut cfg = config(BusKind::Memory, &unique_prefix("browsertok"));
    cfg.jwt_secret = Some(secret.into());
    let server = start(cfg).await;
    let url = format!("http://{}", server.local_addr());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = warren::auth::mint(
        secret,
        &warren::auth::Claims {
            sub: "alice".into(),
            exp,
            rooms: None,
            rooms_read: None,
        },
    );
    run_script("token.mjs", vec![url, token, artifacts()]).await;
    server.shutdown().await;
}
