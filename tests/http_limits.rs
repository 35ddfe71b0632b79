//! HTTP throttles over real sockets: slow clients are disconnected, bodies are bounded in size
//! and time, request budgets per IP and per user answer 429 with `retry-after`, HTTP lock
//! acquisitions have a per-user budget, and a loop of bad tokens writes a bounded number of
//! `auth_failed` audit records.
mod common;

use std::time::{Duration, Instant};

use common::{Client, Closed, Codec, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound for what must happen "soon" on a shared, noisy machine.
const LONG: Duration = Duration::from_secs(20);

/// Reads until the server closes the connection; returns what it sent and when it closed.
async fn read_until_eof(tcp: &mut TcpStream, within: Duration) -> (String, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection still open after {within:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

async fn error_of(r: reqwest::Response) -> (StatusCode, Option<String>, Value) {
    let status = r.status();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

/// A client that sends half a request line and stalls, one that never sends a byte, and one
/// that sends headers but trickles its body are all disconnected within the read timeout;
/// the server keeps serving everyone else meanwhile.
#[tokio::test]
async fn slow_clients_are_disconnected() {
    let server = Server::start_with(|c| c.http_read_timeout = Duration::from_secs(1)).await;

    let mut half_line = TcpStream::connect(server.addr).await.unwrap();
    half_line.write_all(b"GET /healthz HT").await.unwrap();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    trickle
        .write_all(
            b"POST /v1/dev/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"sub\":",
        )
        .await
        .unwrap();

    // Others are served while those hang.
    let ok = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    let (_, t) = read_until_eof(&mut half_line, LONG).await;
    assert!(t < LONG, "half request line held {t:?}");
    let (_, t) = read_until_eof(&mut silent, LONG).await;
    assert!(t < LONG, "silent connection held {t:?}");
    let (answer, _) = read_until_eof(&mut trickle, LONG).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("bad_request"), "{answer}");
}

/// A body over the limit gets 413 `too_large`, with a length or chunked.
#[tokio::test]
async fn oversize_bodies_get_413() {
    let server = Server::start_with(|c| c.max_frame_bytes = 1024).await;
    let big = json!({"sub": "x".repeat(4096)});
    let r = server
        .http
        .post(server.url("/v1/dev/token"))
        .json(&big)
        .send()
        .await
        .unwrap();
    let (status, _, body) = error_of(r).await;
    assert_eq!(status, 413);
    assert_eq!(body["code"], "too_large", "{body}");
    // Chunked, no length: the limit holds while reading.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut req = b"POST /v1/locks/acquire HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..2 {
        req.extend_from_slice(b"320\r\n");
        req.extend_from_slice(&[b' '; 800]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    tcp.write_all(&req).await.unwrap();
    let (answer, _) = read_until_eof(&mut tcp, LONG).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too_large"), "{answer}");
}

/// Past its burst an address gets 429 `rate_limited` with `retry-after`, authenticated or
/// not; probes are never limited, and requests with the admin token are exempt.
#[tokio::test]
async fn requests_per_ip_are_limited() {
    let server = Server::start_with(|c| {
        c.http_requests_per_second_per_ip = 1;
        c.http_burst = 3;
        c.admin_token = Some("admin-secret".into());
    })
    .await;
    let url = server.url("/v1/presence/scene/1");
    for _ in 0..3 {
        let r = server.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "within the burst: reaches auth");
    }
    let (status, retry, body) = error_of(server.http.get(&url).send().await.unwrap()).await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], "rate_limited", "{body}");
    let retry: u64 = retry.expect("retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    for _ in 0..5 {
        let r = server
            .http
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "probes are not budgeted");
    }
    // Nor are WebSocket upgrades (reconnect storms come through a balancer's few addresses)
    // and dev tokens.
    for i in 0..5 {
        let token = server.token(&format!("ws{i}"), None).await;
        Client::connect(server.addr, &token, Codec::Json, None).await;
    }
    let r = server
        .http
        .get(&url)
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the admin token is exempt");
}

/// One user's budget is spent independently of another's.
#[tokio::test]
async fn requests_per_user_are_limited() {
    let server = Server::start_with(|c| {
        c.http_requests_per_second_per_user = 1;
        c.http_burst = 2;
    })
    .await;
    let alice = server.token("alice", None).await;
    let bob = server.token("bob", None).await;
    let url = server.url("/v1/presence/scene/1");
    let get = |t: &str| server.http.get(&url).bearer_auth(t.to_owned()).send();
    for _ in 0..2 {
        assert_eq!(get(&alice).await.unwrap().status(), 200);
    }
    let (status, retry, body) = error_of(get(&alice).await.unwrap()).await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(retry.is_some());
    assert_eq!(get(&bob).await.unwrap().status(), 200, "bob has his own");
}

/// HTTP lock acquisitions are budgeted per user per minute: past it 429 `too_many_locks`
/// with `retry-after`, nothing granted; another user and the admin token are not affected.
#[tokio::test]
async fn http_lock_acquisitions_per_user_are_budgeted() {
    let server = Server::start_with(|c| {
        c.max_http_locks_per_user = 3;
        c.admin_token = Some("admin-secret".into());
    })
    .await;
    let alice = server.token("alice", None).await;
    let acquire = |token: String, n: u32| {
        let body =
            json!({"room": "scene:1", "resource": format!("segment:1-{n}"), "action": "approve"});
        server
            .http
            .post(server.url("/v1/locks/acquire"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    for n in 0..3 {
        let r = acquire(alice.clone(), n).await.unwrap();
        assert_eq!(r.status(), 200, "acquisition {n}");
    }
    let (status, retry, body) = error_of(acquire(alice.clone(), 3).await.unwrap()).await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], "too_many_locks", "{body}");
    let retry: u64 = retry.expect("retry-after").parse().unwrap();
    assert!((1..=20).contains(&retry), "one token per 20 s: {retry}");
    let list: Value = server
        .http
        .get(server.url("/v1/locks?room=scene:1"))
        .bearer_auth(alice.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["locks"].as_array().unwrap().len(), 3, "{list}");
    let bob = server.token("bob", None).await;
    assert_eq!(acquire(bob, 10).await.unwrap().status(), 200);
    assert_eq!(
        acquire("admin-secret".into(), 11).await.unwrap().status(),
        200
    );
}

fn auth_failed_records(server: &Server) -> Vec<Value> {
    let path = server.dir.path().join(lockstep::audit::jsonl::FILE_NAME);
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "auth_failed")
        .collect()
}

/// 50 HTTP requests and 10 WebSocket connections with a bad token from one address write two
/// `auth_failed` records: the first at once, then one with the count of the others.
#[tokio::test]
async fn auth_failures_are_aggregated_per_source() {
    let mut server = Server::start().await;
    for _ in 0..50 {
        let r = server
            .http
            .get(server.url("/v1/presence/scene/1"))
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    for _ in 0..10 {
        let (mut ws, first) = Client::open(server.addr, "not-a-token", Codec::Json, None).await;
        assert_eq!(first, Err(Closed::Code(4001)));
        drop(ws.close(None).await);
    }
    server.shutdown().await;
    let records = auth_failed_records(&server);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0]["detail"]["count"], 1, "{}", records[0]);
    assert_eq!(records[0]["detail"]["ip"], "127.0.0.1", "{}", records[0]);
    assert_eq!(records[1]["detail"]["count"], 59, "{}", records[1]);
    assert_eq!(records[1]["detail"]["aggregated"], true, "{}", records[1]);
    assert_eq!(records[1]["detail"]["window_s"], 60, "{}", records[1]);
}
