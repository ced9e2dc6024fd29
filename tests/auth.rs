//! Authentication, permissions and limits: tokens minted here with the same
//! crate Warren verifies them with, against real servers on both buses.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use warren::auth::{Claims, mint};

const SECRET: &str = "test-jwt-secret";

on_both_buses!(
    a_token_is_needed_and_names_the_user,
    a_token_for_alice_cannot_post_as_bob,
    a_rooms_claim_keeps_a_user_out_of_other_rooms,
    guests_may_read_but_not_write,
    a_refreshed_token_keeps_the_connection_and_an_expired_one_ends_it,
    the_server_api_needs_its_key,
    a_flooder_is_limited_and_a_quiet_client_is_not,
    connections_per_address_are_limited,
    a_direct_message_before_any_session_is_user_not_found,
);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, ttl_secs: i64) -> Claims {
    Claims {
        sub: sub.into(),
        exp: (now() as i64 + ttl_secs) as u64,
        rooms: None,
        rooms_read: None,
    }
}

fn token(sub: &str, ttl_secs: i64) -> String {
    mint(SECRET, &claims(sub, ttl_secs))
}

fn secured(bus: BusKind, test: &str) -> warren::Config {
    let mut c = config(bus, &unique_prefix(test));
    c.jwt_secret = Some(SECRET.into());
    c
}

async fn post(addr: SocketAddr, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(&body);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// POST and expect a refusal with `status` and `code`.
async fn post_refused(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: Value,
    expected: (u16, &str),
) {
    let (status, answer) = post(addr, path, bearer, body).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (expected.0, Some(expected.1)),
        "{path}"
    );
}

async fn a_token_is_needed_and_names_the_user(bus: BusKind) {
    let server = start(secured(bus, "authneed")).await;
    let addr = server.local_addr();
    for (query, code) in [
        ("user=alice".to_owned(), "token_required"),
        ("token=not.a.token".to_owned(), "invalid_token"),
        (
            format!("token={}", mint("wrong-secret", &claims("alice", 600))),
            "invalid_token",
        ),
        (format!("token={}", token("alice", -10)), "token_expired"),
        (
            format!("user=bob&token={}", token("alice", 600)),
            "invalid_token",
        ),
    ] {
        let (status, body) = refused(addr, &query, None).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some(code)),
            "{query}"
        );
    }
    // The event stream takes the same token, the same way.
    let events = reqwest::Client::new()
        .get(format!("http://{addr}/rooms/r/events?user=alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 401);
    let alice = connect_with(addr, &format!("token={}", token("alice", 600))).await;
    assert_eq!(alice.welcome["user"], "alice");
    assert!(
        alice.welcome.get("token").is_none(),
        "no posting token with JWTs"
    );
    let events = reqwest::Client::new()
        .get(format!(
            "http://{addr}/rooms/r/events?token={}",
            token("carol", 600)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    server.shutdown().await;
}

async fn a_token_for_alice_cannot_post_as_bob(bus: BusKind) {
    let server = start(secured(bus, "authpost")).await;
    let addr = server.local_addr();
    let mut bob = connect_with(addr, &format!("room=r&token={}", token("bob", 600))).await;
    let alice = token("alice", 600);
    // Over HTTP: the sender is the token's; naming another is refused.
    post_refused(
        addr,
        "/rooms/r/messages",
        Some(&alice),
        json!({"user":"bob","text":"forged"}),
        (401, "invalid_token"),
    )
    .await;
    post_refused(
        addr,
        "/users/bob/messages",
        Some(&alice),
        json!({"from":"bob","text":"forged"}),
        (401, "invalid_token"),
    )
    .await;
    post_refused(
        addr,
        "/rooms/r/messages",
        None,
        json!({"user":"bob","text":"no token"}),
        (401, "token_required"),
    )
    .await;
    let (status, body) = post(
        addr,
        "/rooms/r/messages",
        Some(&alice),
        json!({"text":"as alice"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let got = next_matching(&mut bob.socket, |f| f["type"] == "message").await;
    assert_eq!(
        (got["from"].as_str(), got["text"].as_str()),
        (Some("alice"), Some("as alice"))
    );
    // Over a WebSocket the sender is the connection's user: `from` cannot be set.
    let mut ws = connect_with(addr, &format!("room=r&token={alice}")).await;
    send_json(
        &mut ws.socket,
        json!({"type":"message","text":"mine","from":"bob"}),
    )
    .await;
    let got = next_matching(&mut bob.socket, |f| f["text"] == "mine").await;
    assert_eq!(got["from"], "alice");
    server.shutdown().await;
}

async fn a_rooms_claim_keeps_a_user_out_of_other_rooms(bus: BusKind) {
    let server = start(secured(bus, "authrooms")).await;
    let addr = server.local_addr();
    let mut c = claims("alice", 600);
    c.rooms = Some(vec!["team-a*".into()]);
    c.rooms_read = Some(vec!["news".into()]);
    let alice = mint(SECRET, &c);
    let (status, body) = refused(addr, &format!("room=team-b&token={alice}"), None).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let mut ws = connect_with(addr, &format!("token={alice}")).await;
    send_json(
        &mut ws.socket,
        json!({"type":"subscribe","room":"team-b","ref":"s1"}),
    )
    .await;
    let answer = next_matching(&mut ws.socket, |f| f["ref"] == "s1").await;
    assert_eq!(answer["code"], "forbidden", "{answer}");
    // The refusal did not end the connection: its own rooms still work.
    subscribe(&mut ws, "team-a1").await;
    subscribe(&mut ws, "news").await;
    send_json(
        &mut ws.socket,
        json!({"type":"message","room":"news","text":"x","ref":"m1"}),
    )
    .await;
    let answer = next_matching(&mut ws.socket, |f| f["ref"] == "m1").await;
    assert_eq!(answer["code"], "forbidden", "news is read-only: {answer}");
    send_json(
        &mut ws.socket,
        json!({"type":"message","room":"team-a1","text":"ok","ref":"m2"}),
    )
    .await;
    let answer = next_matching(&mut ws.socket, |f| f["ref"] == "m2").await;
    assert_eq!(answer["type"], "ack", "{answer}");
    let (status, body) = post(
        addr,
        "/rooms/team-b/messages",
        Some(&alice),
        json!({"text":"x"}),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    server.shutdown().await;
}

async fn guests_may_read_but_not_write(bus: BusKind) {
    let mut cfg = secured(bus, "authguest");
    cfg.allow_anonymous = true;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut guest = connect_with(addr, "room=hall").await;
    assert!(
        guest.welcome["user"]
            .as_str()
            .unwrap()
            .starts_with("guest-")
    );
    let mut alice = connect_with(addr, &format!("room=hall&token={}", token("alice", 600))).await;
    send_json(
        &mut alice.socket,
        json!({"type":"message","text":"hello guests"}),
    )
    .await;
    let got = next_matching(&mut guest.socket, |f| f["type"] == "message").await;
    assert_eq!(got["text"], "hello guests");
    send_json(
        &mut guest.socket,
        json!({"type":"message","text":"me too","ref":"g"}),
    )
    .await;
    let answer = next_matching(&mut guest.socket, |f| f["ref"] == "g").await;
    assert_eq!(answer["code"], "forbidden", "{answer}");
    send_json(
        &mut guest.socket,
        json!({"type":"direct","to":"alice","text":"hi","ref":"d"}),
    )
    .await;
    let answer = next_matching(&mut guest.socket, |f| f["ref"] == "d").await;
    assert_eq!(answer["code"], "forbidden", "{answer}");
    server.shutdown().await;
}

async fn a_refreshed_token_keeps_the_connection_and_an_expired_one_ends_it(bus: BusKind) {
    let server = start(secured(bus, "authexp")).await;
    let addr = server.local_addr();
    let mut kept = connect_with(addr, &format!("room=t&token={}", token("alice", 3))).await;
    let mut dropped = connect_with(addr, &format!("room=t&token={}", token("bob", 3))).await;
    // Told ahead of time...
    let warning = next_matching(&mut kept.socket, |f| f["type"] == "token_expiring").await;
    assert!(warning["expires_at"].as_u64().unwrap() >= now());
    // ...a refresh for another user is refused, one for the same user taken.
    send_json(
        &mut kept.socket,
        json!({"type":"refresh","token":token("mallory", 600),"ref":"x"}),
    )
    .await;
    let answer = next_matching(&mut kept.socket, |f| f["ref"] == "x").await;
    assert_eq!(answer["code"], "invalid_token", "{answer}");
    send_json(
        &mut kept.socket,
        json!({"type":"refresh","token":token("alice", 600),"ref":"r"}),
    )
    .await;
    let answer = next_matching(&mut kept.socket, |f| f["ref"] == "r").await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    // Without one, the session ends at `exp` with 4001.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let code = loop {
        match tokio::time::timeout_at(deadline, dropped.socket.next())
            .await
            .expect("closed by exp")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, Some(4001));
    // The refreshed session outlived its first token's `exp` (bob's, the same).
    send_json(
        &mut kept.socket,
        json!({"type":"message","text":"still here","ref":"s"}),
    )
    .await;
    let answer = next_matching(&mut kept.socket, |f| f["ref"] == "s").await;
    assert_eq!(answer["type"], "ack", "{answer}");
    server.shutdown().await;
}

async fn the_server_api_needs_its_key(bus: BusKind) {
    let server = start(secured(bus, "authapi")).await;
    let addr = server.local_addr();
    let mut reader = connect_with(addr, &format!("room=ann&token={}", token("reader", 600))).await;
    for bearer in [None, Some("wrong-key"), Some(token("reader", 600).as_str())] {
        let (status, body) =
            post(addr, "/api/rooms/ann/messages", bearer, json!({"text":"x"})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("invalid_token")),
            "{bearer:?}"
        );
    }
    assert_eq!(api_post(addr, "ann", None, "from the backend").await, 202);
    let got = next_matching(&mut reader.socket, |f| f["type"] == "message").await;
    assert_eq!(
        (got["from"].as_str(), got["text"].as_str()),
        (Some("system"), Some("from the backend"))
    );
    server.shutdown().await;
}

async fn a_flooder_is_limited_and_a_quiet_client_is_not(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("authflood"));
    cfg.publish_rate = 5;
    cfg.publish_burst = 5;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut flooder = connect(addr, "flood", "flooder").await;
    let mut quiet = connect(addr, "flood", "quiet").await;
    for i in 0..30 {
        send_json(
            &mut flooder.socket,
            json!({"type":"message","text":format!("f{i}"),"ref":format!("f{i}")}),
        )
        .await;
    }
    let mut acked = 0;
    let mut limited = 0;
    while acked + limited < 30 {
        let f = next_matching(&mut flooder.socket, |f| {
            f["type"] == "ack" || f["type"] == "error"
        })
        .await;
        match f["code"].as_str() {
            None => acked += 1,
            Some("rate_limited") => {
                assert!(f["retry_after_ms"].as_u64().unwrap() > 0, "{f}");
                limited += 1;
            }
            Some(other) => panic!("unexpected {other}: {f}"),
        }
    }
    assert!(
        (5..=7).contains(&acked),
        "{acked} acked of 30 with a burst of 5"
    );
    // The quiet client is not limited by the flooder.
    send_json(
        &mut quiet.socket,
        json!({"type":"message","text":"calm","ref":"q"}),
    )
    .await;
    let answer = next_matching(&mut quiet.socket, |f| f["ref"] == "q").await;
    assert_eq!(answer["type"], "ack", "{answer}");
    let (_, _, metrics) = get(addr, "/metrics").await;
    assert!(
        metrics.contains(r#"warren_rate_limited_total{limit="publish"}"#),
        "{metrics}"
    );
    server.shutdown().await;
}

async fn connections_per_address_are_limited(bus: BusKind) {
    let mut cfg = config(bus, &unique_prefix("authip"));
    cfg.max_connections_per_ip = 2;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let first = connect(addr, "ip", "a").await;
    let _second = connect(addr, "ip", "b").await;
    let refusal = tokio_tungstenite::connect_async(ws_url(addr, "room=ip&user=c"))
        .await
        .expect_err("a third connection from one address");
    let tokio_tungstenite::tungstenite::Error::Http(response) = refusal else {
        panic!("{refusal:?}");
    };
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert!(body["retry_after_ms"].as_u64().is_some());
    // A connection that ends frees its place.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio_tungstenite::connect_async(ws_url(addr, "room=ip&user=c"))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;

    let mut cfg = config(bus, &unique_prefix("authiprate"));
    cfg.connections_per_ip_per_sec = 3;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(connect(addr, "ip", &format!("r{i}")).await);
    }
    let (status, body) = refused(addr, "room=ip&user=r3", None).await;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
    let (_, _, metrics) = get(addr, "/metrics").await;
    assert!(
        metrics.contains(r#"warren_rate_limited_total{limit="connect_rate"}"#),
        "{metrics}"
    );
    server.shutdown().await;
}

/// RS/ES keys from a PEM file and from a JWKS endpoint, with key rotation.
#[tokio::test]
async fn public_keys_from_a_file_and_from_a_jwks_endpoint() {
    let dir = std::env::temp_dir().join(format!("warren-keys-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = |name: &str| {
        let sec1 = dir.join(format!("{name}.sec1.pem"));
        let pkcs8 = dir.join(format!("{name}.pem"));
        let public = dir.join(format!("{name}.pub.pem"));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            sec1.to_str().unwrap(),
        ]);
        run(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            sec1.to_str().unwrap(),
            "-out",
            pkcs8.to_str().unwrap(),
        ]);
        run(&[
            "ec",
            "-in",
            sec1.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        let encoding =
            jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&pkcs8).unwrap()).unwrap();
        (encoding, public)
    };
    let sign = |key: &jsonwebtoken::EncodingKey, kid: Option<&str>, sub: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims(sub, 600), key).unwrap()
    };
    let (k1, k1_public) = key("k1");
    let (k2, _) = key("k2");

    // A PEM public key.
    let mut cfg = config(BusKind::Memory, &unique_prefix("authpem"));
    cfg.jwt_public_key = Some(k1_public);
    let server = start(cfg).await;
    let alice = connect_with(
        server.local_addr(),
        &format!("token={}", sign(&k1, None, "alice")),
    )
    .await;
    assert_eq!(alice.welcome["user"], "alice");
    let (status, _) = refused(
        server.local_addr(),
        &format!("token={}", sign(&k2, None, "alice")),
        None,
    )
    .await;
    assert_eq!(status, 401);
    server.shutdown().await;

    // A JWKS endpoint that starts with k1 and later adds k2 (a rotation).
    let jwk = |key: &jsonwebtoken::EncodingKey, kid: &str| {
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(key, jsonwebtoken::Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.into());
        jwk
    };
    let served = Arc::new(std::sync::Mutex::new(
        json!({"keys": [jwk(&k1, "k1")]}).to_string(),
    ));
    let fetches = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = listener.local_addr().unwrap();
    {
        let served = served.clone();
        let fetches = fetches.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let body = served.lock().unwrap().clone();
                fetches.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = socket.read(&mut buf).await;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
    }
    let mut cfg = config(BusKind::Memory, &unique_prefix("authjwks"));
    cfg.jwks_url = Some(format!("http://{jwks_addr}/jwks"));
    let server = start(cfg).await;
    let addr = server.local_addr();
    let bob = connect_with(addr, &format!("token={}", sign(&k1, Some("k1"), "bob"))).await;
    assert_eq!(bob.welcome["user"], "bob");
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "fetched once, then cached"
    );
    let _again = connect_with(addr, &format!("token={}", sign(&k1, Some("k1"), "bob"))).await;
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    // The provider rotates: a token with the new kid is accepted once Warren
    // fetches again (an unknown kid triggers it, at most every 10 s).
    *served.lock().unwrap() = json!({"keys": [jwk(&k1, "k1"), jwk(&k2, "k2")]}).to_string();
    let rotated = format!("token={}", sign(&k2, Some("k2"), "carol"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = tokio_tungstenite::connect_async(ws_url(addr, &rotated)).await;
        if attempt.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated key was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "one more fetch for the new kid"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A direct message posted to a node no session has ever opened on (a fresh
/// prefix: on RabbitMQ its direct exchange was never declared, or the last node
/// to close deleted it) gets the answer it would get at any other time.
async fn a_direct_message_before_any_session_is_user_not_found(bus: BusKind) {
    let server = start(secured(bus, "authidle")).await;
    let addr = server.local_addr();
    let alice = token("alice", 600);
    post_refused(
        addr,
        "/users/nobody/messages",
        Some(&alice),
        json!({"text":"anyone?"}),
        (404, "user_not_found"),
    )
    .await;
    // And the channel it went out on still carries the next one.
    let mut bob = connect_with(addr, &format!("token={}", token("bob", 600))).await;
    let (status, _) = post(
        addr,
        "/users/bob/messages",
        Some(&alice),
        json!({"text":"hi"}),
    )
    .await;
    assert_eq!(status, 202);
    let got = next_matching(&mut bob.socket, |f| f["type"] == "direct").await;
    assert_eq!(got["text"], "hi");
    server.shutdown().await;
}
