//! A real browser: headless Chromium opens the chat page as two users, one sends a
//! message the other sees, and an HTML-looking message shows as text. The browser
//! is driven by `tests/browser/chat.mjs` (playwright-core); screenshots land in
//! `artifacts/browser/`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[tokio::test]
async fn two_users_chat_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/chat.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run scripts/test, which installs it"
    );
    let server = start(config(BusKind::Amqp, &unique_prefix("browser"))).await;
    let url = format!("http://{}", server.local_addr());
    let artifacts = root.join("artifacts/browser");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(url)
            .arg(&artifacts)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(root.join("artifacts/browser/chat-a.png").exists());
    assert!(root.join("artifacts/browser/chat-b.png").exists());
    server.shutdown().await;
}

/// The page on a Warren that requires tokens (`--jwt-secret`).
#[tokio::test]
async fn the_page_signs_in_with_a_token() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
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
    let script = root.join("tests/browser/token.mjs");
    let artifacts = root.join("artifacts/browser");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(url)
            .arg(token)
            .arg(&artifacts)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "token page test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.shutdown().await;
}
