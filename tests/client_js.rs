//! The JavaScript client library, `clients/js`, against the real server: runs
//! its `node --test` files with the `warren` binary cargo built for this test.
//! They start their own servers (on both buses, at `AMQP_URL`), kill and
//! restart them; see `clients/js/test/warren.mjs`.

mod common;

use std::path::Path;
use std::process::Command;

/// The installed Node's major version.
fn node_major() -> u32 {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .expect("node runs (scripts/test installs it)");
    let version = String::from_utf8_lossy(&out.stdout);
    version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `node --version`: {version}"))
}

/// Node 20 has a global `WebSocket` only behind a flag; Node 22 by default.
fn node_needs_websocket_flag() -> bool {
    let probe = Command::new("node")
        .args([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .status()
        .expect("node runs (scripts/test installs it)");
    !probe.success()
}

#[test]
fn client_library_tests_pass_against_real_servers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("clients/js/test");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no test files in {}", dir.display());

    let major = node_major();
    assert!(major >= 20, "clients/js needs Node >= 20, found {major}");
    let mut node = Command::new("node");
    if node_needs_websocket_flag() {
        node.arg("--experimental-websocket");
    }
    let output = node
        .args(["--test", "--test-concurrency=4", "--test-timeout=60000"])
        .args(&files)
        .env("WARREN_BIN", env!("CARGO_BIN_EXE_warren"))
        .env("AMQP_URL", common::amqp_url())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "node --test failed:\n{stdout}\n{stderr}"
    );
}
