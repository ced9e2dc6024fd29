//! HTTP and WebSocket hygiene, probed with raw bytes: what a careless or
//! hostile client gets (RFC 6455 close codes, header and idle timeouts).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A WebSocket opened by hand, past its `welcome`, so raw frames can be sent.
async fn raw_session(addr: SocketAddr, user: &str) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws?room=raw&user={user} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    // The 101 head, then the welcome frame.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(socket.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let (opcode, _) = read_frame(&mut socket).await.unwrap();
    assert_eq!(opcode, 0x1, "welcome is a text frame");
    socket
}

/// One server frame: its opcode and payload; `None` once the socket ends.
async fn read_frame(socket: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    socket.read_exact(&mut head).await.ok()?;
    let opcode = head[0] & 0x0f;
    let len = match head[1] & 0x7f {
        126 => u64::from(socket.read_u16().await.ok()?),
        127 => socket.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    socket.read_exact(&mut payload).await.ok()?;
    Some((opcode, payload))
}

/// A client frame: `first` is FIN/RSV/opcode, masked unless `masked` is false.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![first, (payload.len() as u8) | if masked { 0x80 } else { 0 }];
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// The status of the close frame the server ends with (`None`: no status).
async fn close_status(socket: &mut TcpStream) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, read_frame(socket))
            .await
            .expect("the server closes in time");
        match next {
            Some((0x8, payload)) if payload.len() >= 2 => {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            Some((0x8, _)) | None => return None,
            Some(_) => continue,
        }
    }
}

on_both_buses!(bad_frames_close_with_the_rfc_6455_codes);

async fn bad_frames_close_with_the_rfc_6455_codes(bus: BusKind) {
    let server = start(config(bus, &unique_prefix("hyg"))).await;
    let addr = server.local_addr();
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("invalid UTF-8 text", frame(0x81, &[0xc3, 0x28], true), 1007),
        ("RSV1 set", frame(0xc1, b"{}", true), 1002),
        ("reserved opcode", frame(0x83, b"x", true), 1002),
        ("unmasked client frame", frame(0x81, b"{}", false), 1002),
        ("fragmented ping", frame(0x09, b"", true), 1002),
    ];
    for (i, (what, bytes, expected)) in cases.into_iter().enumerate() {
        let mut socket = raw_session(addr, &format!("raw{i}")).await;
        socket.write_all(&bytes).await.unwrap();
        assert_eq!(close_status(&mut socket).await, Some(expected), "{what}");
    }
    server.shutdown().await;
}

/// A request head trickled a byte at a time is cut off by the header-read
/// timeout (10 s), not held open (slowloris).
#[tokio::test]
async fn a_trickled_request_head_is_cut_off() {
    let server = start(config(BusKind::Memory, &unique_prefix("hygslow"))).await;
    let mut socket = TcpStream::connect(server.local_addr()).await.unwrap();
    let started = Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut closed = false;
    for byte in head.iter().chain(std::iter::repeat(&b'a')) {
        if socket.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(500), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) | Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still open after 30 s"
        );
    }
    assert!(closed);
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    server.shutdown().await;
}

/// A connection that never sends a byte does not stay open for ever.
#[tokio::test]
async fn a_silent_connection_is_closed() {
    let server = start(config(BusKind::Memory, &unique_prefix("hygidle"))).await;
    let mut socket = TcpStream::connect(server.local_addr()).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut buf))
        .await
        .expect("closed within 30 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.shutdown().await;
}

/// RFC 6455 conformance: the Autobahn cases 1–7, 9 and 10 (kosoku, which
/// scripts/test installs) against `GET /echo`, Warren's own upgrade, buffers
/// and limits, with the message limit raised to the 16 MiB case 9 sends.
#[tokio::test]
async fn the_autobahn_cases_pass_against_the_echo_endpoint() {
    let mut cfg = config(BusKind::Memory, &unique_prefix("autobahn"));
    cfg.echo_endpoint = true;
    cfg.max_frame_bytes = 16 * 1024 * 1024 + 1024;
    let server = start(cfg).await;
    let url = format!("ws://{}/echo", server.local_addr());
    let reports = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/kosoku");
    let _ = std::fs::remove_dir_all(&reports);
    let out = {
        let reports = reports.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new("kosoku");
            command.arg(&url);
            for case in [
                "1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*",
            ] {
                command.args(["-i", case]);
            }
            command
                .args(["-p", "8", "-o"])
                .arg(&reports)
                .output()
                .expect("kosoku runs (scripts/test installs it: pip install kosoku)")
        })
        .await
        .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut verdicts = std::collections::BTreeMap::<String, Vec<String>>::new();
    for entry in std::fs::read_dir(&reports).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if let Some(behavior) = report["behavior"].as_str() {
                let id = report["id"].as_str().unwrap_or("?").to_owned();
                verdicts.entry(behavior.to_owned()).or_default().push(id);
            }
        }
    }
    println!("kosoku: {stdout}{stderr}");
    for (verdict, cases) in &verdicts {
        if verdict == "OK" {
            println!("OK: {} cases", cases.len());
        } else {
            println!("{verdict}: {} cases {cases:?}", cases.len());
        }
    }
    assert!(out.status.success(), "kosoku failed:\n{stdout}\n{stderr}");
    assert!(!verdicts.contains_key("FAILED"), "{verdicts:?}");
    let total: usize = verdicts.values().map(Vec::len).sum();
    assert!(total >= 300, "only {total} cases ran");
    server.shutdown().await;
}

/// Raw `GET path`: the status, or `None` when the connection closed first.
async fn raw_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut socket = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12)?.parse().ok()
}

/// Connections that never send a request hold at most `--max-pending-connections`
/// places; past that a connection is answered 503 at once (never left hanging),
/// and a place comes back when one of them goes.
#[tokio::test]
async fn silent_connections_cannot_crowd_out_the_rest() {
    let mut cfg = config(BusKind::Memory, &unique_prefix("hygpend"));
    cfg.max_pending_connections = 20;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Each silent connection takes its place once the node accepted it: a
    // request answered 503 shows they all have.
    let deadline = tokio::time::Instant::now() + WAIT;
    while raw_get(addr, "/healthz").await != Some(503) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cap never filled"
        );
    }
    let mut turned_away = TcpStream::connect(addr).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, turned_away.read_to_string(&mut answer))
        .await
        .expect("answered at once, not left hanging")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"unavailable""#), "{answer}");
    // One silent connection goes: its place serves the next request.
    drop(silent.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    while raw_get(addr, "/healthz").await != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

/// A node run with few open files, flooded with silent connections, keeps
/// answering `/readyz` (at worst 503, never a hang), and is ready again once
/// they time out.
#[tokio::test]
async fn near_its_file_limit_a_node_still_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut node = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 256 && exec {} --listen 127.0.0.1:{port} --max-pending-connections 64 \
             --max-connections-per-ip 100000 --connections-per-ip-per-sec 100000 \
             --history-per-room 0",
            env!("CARGO_BIN_EXE_warren")
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = node.stdout.take().unwrap();
    let mut line = [0u8; 64];
    let _ = tokio::time::timeout(WAIT, out.read(&mut line)).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // More silent connections than the node has files.
    let mut silent = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect(addr).await {
            silent.push(s);
        }
    }
    let started = Instant::now();
    let status = raw_get(addr, "/readyz").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "readyz took {:?}",
        started.elapsed()
    );
    assert!(matches!(status, Some(200 | 503)), "{status:?}");
    drop(silent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while raw_get(addr, "/readyz").await != Some(200) {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill().await.unwrap();
}
