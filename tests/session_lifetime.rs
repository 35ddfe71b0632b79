//! Session lifetime under hostile or careless clients: the end of the resume grace, the
//! per-user session limit (parked sessions included, cluster-wide), token expiry, refresh and
//! revocation. Memory nodes in-process; Redis with two real gateway processes.
mod common;

use std::time::{Duration, Instant};

use common::cluster::{Gateway, token};
use common::redis::RedisServer;
use common::{Client, Codec, Server};
use serde_json::{Value, json};

const ROOM: &str = "scene:77";
const ADMIN: &str = "admin-token-for-lifetime-tests-0123";
/// The admin token of [`Gateway`] nodes.
const GW_ADMIN: &str = "test-admin-token-0123456789";

fn acquire(resource: &str, extra: Value) -> Value {
    let mut m = json!({"type":"lock.acquire","room":ROOM,"resource":resource,"action":"trim"});
    if let (Some(m), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    m
}

/// The audit records of `kind` for `user`, polled until `pred` holds (or a generous deadline).
async fn audit_until(
    url: &str,
    admin: &str,
    kind: &str,
    user: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page: Value = http
            .get(format!(
                "{url}/v1/audit?kind={kind}&user_id={user}&limit=1000"
            ))
            .bearer_auth(admin)
            .send()
            .await
            .expect("audit request")
            .json()
            .await
            .expect("audit json");
        let records = page["records"].as_array().cloned().unwrap_or_default();
        if pred(&records) || Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a session and reports whether it was admitted (`welcome`) or refused for the limit.
async fn try_open(addr: std::net::SocketAddr, token: &str) -> Option<Client> {
    let (ws, first) = Client::open(addr, token, Codec::Json, None).await;
    let first = first.expect("a first message");
    if first["type"] == "welcome" {
        return Some(Client::from_parts(ws, Codec::Json, first));
    }
    assert_eq!(first["code"], "too_many_sessions", "{first}");
    None
}

/// Item 4 (memory): sessions parking one after another, each while the previous one's grace
/// is ending, all end — presence leaves, locks go as `disconnected`, `session_closed` is
/// audited. The memory store used to prune a record whose grace had just ended whenever
/// another session parked, and the sweep then took that session for resumed elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_parking_at_the_same_moment_all_end_at_their_grace() {
    let grace = Duration::from_millis(500);
    let server = Server::start_with(|c| {
        c.resume_grace = grace;
        c.admin_token = Some(ADMIN.into());
    })
    .await;
    let mut observer = server.client("observer").await;
    observer.join(ROOM).await;
    const N: usize = 8;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = server.client(&format!("gone-{i}")).await;
        c.join(ROOM).await;
        let g = c
            .request(acquire(&format!("segment:77-{i}"), json!({})))
            .await;
        assert_eq!(g["type"], "reply", "{g}");
        clients.push(c);
    }
    observer.drain_for(Duration::from_millis(300)).await;
    // A drop every 70 ms: each park lands in the 250 ms window between an earlier session's
    // end of grace and its sweep.
    for c in clients {
        c.drop_connection();
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    let mut left = std::collections::HashSet::new();
    let mut released = 0;
    let deadline = Instant::now() + grace + Duration::from_secs(5);
    while (left.len() < N || released < N) && Instant::now() < deadline {
        for m in observer.drain_for(Duration::from_millis(200)).await {
            match m["type"].as_str() {
                Some("presence.leave") => {
                    left.insert(m["member"]["user_id"].as_str().unwrap_or("").to_owned());
                }
                Some("lock.released") => {
                    assert_eq!(m["reason"], "disconnected", "{m}");
                    released += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!(left.len(), N, "every abandoned member leaves: {left:?}");
    assert_eq!(released, N, "every abandoned lock is released");
    for i in 0..N {
        let user = format!("gone-{i}");
        let closed = audit_until(&server.url(""), ADMIN, "session_closed", &user, |r| {
            !r.is_empty()
        })
        .await;
        assert_eq!(closed.len(), 1, "{user}: {closed:?}");
        assert_eq!(closed[0]["detail"]["reason"], "grace_expired");
    }
}

/// Item 5 (single node): connect, join, drop the TCP connection, again and again: parked
/// sessions count, so the loop stops at `LOCKSTEP_MAX_SESSIONS_PER_USER`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_loop_is_held_to_the_session_limit_on_one_node() {
    let server = Server::start_with(|c| {
        c.max_sessions_per_user = 3;
        c.resume_grace = Duration::from_secs(30);
    })
    .await;
    let tok = server.token("looper", None).await;
    let mut admitted = 0;
    for i in 0..10 {
        if let Some(mut c) = try_open(server.addr, &tok).await {
            admitted += 1;
            c.join(ROOM).await;
            c.request(acquire(&format!("segment:77-{i}"), json!({})))
                .await;
            c.drop_connection();
            // Let the server notice the drop and park the session.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(admitted, 3, "parked sessions count against the limit");
    let presence: Value = server
        .http
        .get(server.url("/v1/presence/scene/77"))
        .bearer_auth(server.token("viewer", None).await)
        .send()
        .await
        .expect("presence")
        .json()
        .await
        .expect("json");
    let members = presence["members"].as_array().map_or(0, Vec::len);
    assert_eq!(members, 3, "{presence}");
}

/// Item 4 (Redis, two nodes): the holder's node parks it; when the grace ends the session is
/// ended everywhere within a second — `disconnected`, the waiter on the other node served,
/// presence gone, `session_closed` audited. Before, the sweep's `DEL` found the record
/// already expired, took the session for resumed elsewhere and cleaned nothing up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_session_ends_at_its_grace_with_redis() {
    let redis = RedisServer::start();
    let extra = [
        ("LOCKSTEP_RESUME_GRACE", "2s"),
        ("LOCKSTEP_LOCK_LEASE", "3s"),
    ];
    let a = Gateway::start(&redis.url(), "node-a", &extra).await;
    let b = Gateway::start(&redis.url(), "node-b", &extra).await;
    let mut holder = Client::connect(a.addr(), &token("holder", None), Codec::Json, None).await;
    holder.join(ROOM).await;
    let mut waiter = Client::connect(b.addr(), &token("waiter", None), Codec::Json, None).await;
    waiter.join(ROOM).await;
    let g = holder.request(acquire("segment:77-1", json!({}))).await;
    assert_eq!(g["type"], "reply", "{g}");
    let w = waiter
        .request(acquire("segment:77-1", json!({"wait": true})))
        .await;
    assert_eq!(w["queue_position"], 1, "{w}");
    let dropped = Instant::now();
    holder.drop_connection();
    let rel = waiter.recv_type("lock.released").await;
    let released_after = dropped.elapsed();
    assert_eq!(rel["reason"], "disconnected", "{rel}");
    let granted = waiter.recv_type("lock.granted").await;
    assert_eq!(granted["resource"], "segment:77-1");
    let left = waiter.recv_type("presence.leave").await;
    assert_eq!(left["member"]["user_id"], "holder");
    eprintln!("released {released_after:?} after the drop (grace 2 s)");
    assert!(
        released_after >= Duration::from_secs(2),
        "not before the grace"
    );
    assert!(
        released_after < Duration::from_secs(4),
        "within the grace and a little: {released_after:?}"
    );
    let closed = audit_until(&b.url(""), GW_ADMIN, "session_closed", "holder", |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["detail"]["reason"], "grace_expired");
}

/// Item 5 (Redis, two nodes): the drop loop alternating between nodes is held to the limit
/// too: the count is per user across the cluster, not per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_loop_is_held_to_the_session_limit_across_nodes() {
    let redis = RedisServer::start();
    let extra = [
        ("LOCKSTEP_RESUME_GRACE", "30s"),
        ("LOCKSTEP_MAX_SESSIONS_PER_USER", "3"),
    ];
    let a = Gateway::start(&redis.url(), "node-a", &extra).await;
    let b = Gateway::start(&redis.url(), "node-b", &extra).await;
    let tok = token("looper", None);
    let mut admitted = 0;
    for i in 0..10 {
        let node = if i % 2 == 0 { &a } else { &b };
        if let Some(mut c) = try_open(node.addr(), &tok).await {
            admitted += 1;
            c.join(ROOM).await;
            c.drop_connection();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(admitted, 3, "parked sessions on both nodes count");
}

/// Item 10a (Redis, two nodes): after a resume on another node, the old node still keeps
/// its parked copy until the grace ends; its presence refresh must not put the session back
/// into a room it left on the new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_nodes_parked_copy_does_not_bring_back_a_room_left_after_resume() {
    let redis = RedisServer::start();
    let extra = [
        ("LOCKSTEP_RESUME_GRACE", "10s"),
        ("LOCKSTEP_PRESENCE_TTL", "1500ms"),
    ];
    let a = Gateway::start(&redis.url(), "node-a", &extra).await;
    let b = Gateway::start(&redis.url(), "node-b", &extra).await;
    let tok = token("mover", None);
    let mut mover = Client::connect(a.addr(), &tok, Codec::Json, None).await;
    mover.join(ROOM).await;
    let session = mover.session_id();
    let resume = mover.resume_token();
    let mut observer = Client::connect(b.addr(), &token("observer", None), Codec::Json, None).await;
    observer.join(ROOM).await;
    mover.drop_connection();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut moved = Client::connect(b.addr(), &tok, Codec::Json, Some(&resume)).await;
    assert_eq!(moved.welcome["resumed"], true);
    let r = moved.request(json!({"type":"leave","room":ROOM})).await;
    assert_eq!(r["type"], "reply", "{r}");
    let left = observer.recv_type("presence.leave").await;
    assert_eq!(left["member"]["session_id"], session.as_str());
    // Several presence refreshes of node A (every 500 ms) while it still holds the copy.
    let later = observer.drain_for(Duration::from_secs(3)).await;
    let back: Vec<_> = later
        .iter()
        .filter(|m| m["type"] == "presence.join" && m["member"]["session_id"] == session.as_str())
        .collect();
    assert!(back.is_empty(), "re-announced by the old node: {back:?}");
}
