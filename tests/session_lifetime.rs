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

// ---------------------------------------------------------------------------------------------
// Item 6: token expiry, refresh, roles on resume, revocation; item 10c: the reserved `sub`.

const SECRET: &str = common::cluster::SECRET;

/// A node verifying HS256 tokens signed with [`SECRET`] (so tests choose `exp`, roles, `jti`).
async fn jwt_server(grace: Duration) -> Server {
    Server::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.admin_token = Some(ADMIN.into());
        c.resume_grace = grace;
    })
    .await
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn jwt(sub: &str, rooms: Value, exp: u64, jti: &str) -> String {
    let claims = json!({"sub": sub, "name": sub, "rooms": rooms, "exp": exp, "jti": jti});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

fn editor() -> Value {
    json!({"*": "editor"})
}

async fn connect(server: &Server, token: &str) -> Client {
    Client::connect(server.addr, token, Codec::Json, None).await
}

/// A refresh whose token makes the user a viewer of the room and drops another room: its lock
/// there is released as `revoked` (the waiter served), the other room is left, the old lock
/// token no longer extends, and it is all audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_re_evaluates_roles() {
    let server = jwt_server(Duration::from_secs(5)).await;
    let exp = now_s() + 3600;
    let mut user = connect(&server, &jwt("ursula", editor(), exp, "u-1")).await;
    user.join(ROOM).await;
    user.join("story:9").await;
    let mut waiter = connect(&server, &jwt("walt", editor(), exp, "w-1")).await;
    waiter.join(ROOM).await;
    let mut reader = connect(&server, &jwt("rita", editor(), exp, "r-1")).await;
    reader.join("story:9").await;
    let g = user.request(acquire("segment:77-5", json!({}))).await;
    let w = waiter
        .request(acquire("segment:77-5", json!({"wait": true})))
        .await;
    assert_eq!(w["queue_position"], 1, "{w}");

    let viewer = jwt("ursula", json!({ROOM: "viewer"}), exp + 60, "u-2");
    let r = user
        .request(json!({"type":"auth.refresh","token":viewer}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(r["expires_at"], (exp + 60) * 1000);
    let rel = waiter.recv_type("lock.released").await;
    assert_eq!(rel["reason"], "revoked", "{rel}");
    waiter.recv_type("lock.granted").await;
    let left = reader.recv_type("presence.leave").await;
    assert_eq!(left["member"]["user_id"], "ursula");
    let ext = user
        .request(json!({"type":"lock.extend","room":ROOM,"resource":"segment:77-5","token":g["token"],"ttl_ms":60000}))
        .await;
    assert_eq!(ext["code"], "lock_not_held", "{ext}");
    let again = user.request(acquire("segment:77-6", json!({}))).await;
    assert_eq!(again["code"], "forbidden", "a viewer cannot lock: {again}");
    let revoked = audit_until(&server.url(""), ADMIN, "lock_revoked", "ursula", |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    let refreshed = audit_until(&server.url(""), ADMIN, "session_refreshed", "ursula", |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(refreshed[0]["detail"]["rooms_left"][0], "story:9");
}

/// Another user's token, a bad one and an expired one are refused with stable codes, and
/// the session keeps what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_refresh_changes_nothing() {
    let server = jwt_server(Duration::from_secs(5)).await;
    let exp = now_s() + 3600;
    let mut user = connect(&server, &jwt("ursula", editor(), exp, "u-1")).await;
    user.join(ROOM).await;
    let g = user.request(acquire("segment:77-7", json!({}))).await;
    for (token, code) in [
        (jwt("mallory", editor(), exp, "m-1"), "forbidden"),
        ("not-a-jwt".to_owned(), "unauthorized"),
        (
            jwt("ursula", editor(), now_s() - 60, "u-old"),
            "unauthorized",
        ),
    ] {
        let r = user
            .request(json!({"type":"auth.refresh","token":token}))
            .await;
        assert_eq!(r["code"], code, "{r}");
    }
    let ext = user
        .request(json!({"type":"lock.extend","resource":"segment:77-7","token":g["token"],"ttl_ms":60000}))
        .await;
    assert_eq!(ext["type"], "reply", "still the holder: {ext}");
}

/// `auth.expiring` comes ahead of `exp` (half the life of a short token), and at `exp`
/// without a refresh the session ends with 4012, its lock released as `disconnected`; a
/// refreshed session lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_at_its_token_exp_unless_refreshed() {
    let server = jwt_server(Duration::from_secs(30)).await;
    let mut observer = connect(&server, &jwt("otto", editor(), now_s() + 3600, "o-1")).await;
    observer.join(ROOM).await;
    let exp = now_s() + 4;
    let mut short = connect(&server, &jwt("sam", editor(), exp, "s-1")).await;
    short.join(ROOM).await;
    short.request(acquire("segment:77-8", json!({}))).await;
    let warn = short.recv_type("auth.expiring").await;
    assert_eq!(warn["expires_at"], exp * 1000, "{warn}");
    let in_ms = warn["in_ms"].as_u64().expect("in_ms");
    assert!(in_ms > 0 && in_ms <= 4000, "{warn}");
    let (how, _) = short.closed_within(Duration::from_secs(8)).await;
    assert_eq!(how, common::Closed::Code(4012));
    let rel = observer.recv_type("lock.released").await;
    assert_eq!(rel["reason"], "disconnected", "{rel}");
    let closed = audit_until(&server.url(""), ADMIN, "session_closed", "sam", |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(closed[0]["detail"]["reason"], "token_expired");

    let mut kept = connect(&server, &jwt("kim", editor(), now_s() + 3, "k-1")).await;
    kept.recv_type("auth.expiring").await;
    let r = kept
        .request(json!({"type":"auth.refresh","token":jwt("kim", editor(), now_s() + 3600, "k-2")}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let later = kept.drain_for(Duration::from_secs(4)).await;
    assert!(
        later.iter().all(|m| m["type"] != "auth.expiring"),
        "{later:?}"
    );
    kept.ping().await;
}

/// A resume with a token that now says `viewer` loses its locks (`revoked`) instead of
/// keeping and extending them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_applies_the_resuming_tokens_roles() {
    let server = jwt_server(Duration::from_secs(10)).await;
    let exp = now_s() + 3600;
    let mut observer = connect(&server, &jwt("otto", editor(), exp, "o-1")).await;
    observer.join(ROOM).await;
    let mut holder = connect(&server, &jwt("hal", editor(), exp, "h-1")).await;
    holder.join(ROOM).await;
    let g = holder.request(acquire("segment:77-9", json!({}))).await;
    let resume = holder.resume_token();
    holder.drop_connection();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let viewer = jwt("hal", json!({"*": "viewer"}), exp, "h-2");
    let mut back = Client::connect(server.addr, &viewer, Codec::Json, Some(&resume)).await;
    assert_eq!(back.welcome["resumed"], true);
    let rel = observer.recv_type("lock.released").await;
    assert_eq!(rel["reason"], "revoked", "{rel}");
    let ext = back
        .request(json!({"type":"lock.extend","room":ROOM,"resource":"segment:77-9","token":g["token"],"ttl_ms":60000}))
        .await;
    assert_eq!(ext["code"], "lock_not_held", "{ext}");
}

async fn revoke(url: &str, admin: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/admin/sessions/revoke"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .expect("revoke request")
}

/// Admin revocation by user (attached and parked sessions), by session, and by `jti` (then
/// refused at connect), each closing with 4013 and releasing locks as `revoked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_revocation_ends_sessions_and_refuses_the_token() {
    let server = jwt_server(Duration::from_secs(30)).await;
    let exp = now_s() + 3600;
    let mut observer = connect(&server, &jwt("otto", editor(), exp, "o-1")).await;
    observer.join(ROOM).await;
    let mut a1 = connect(&server, &jwt("eve", editor(), exp, "e-1")).await;
    a1.join(ROOM).await;
    a1.request(acquire("segment:77-10", json!({}))).await;
    let mut parked = connect(&server, &jwt("eve", editor(), exp, "e-2")).await;
    parked.join(ROOM).await;
    let parked_resume = parked.resume_token();
    parked.drop_connection();
    tokio::time::sleep(Duration::from_millis(300)).await;
    observer.drain_for(Duration::from_millis(100)).await;

    let user = revoke(
        &server.url(""),
        &server_token(&server).await,
        json!({"user_id":"eve"}),
    )
    .await;
    assert_eq!(user.status(), 403, "a user token may not revoke");
    let r = revoke(&server.url(""), ADMIN, json!({"user_id":"eve"})).await;
    assert_eq!(r.status(), 200);
    let (how, _) = a1.closed_within(Duration::from_secs(5)).await;
    assert_eq!(how, common::Closed::Code(4013));
    // Its lock goes as `revoked`; both sessions leave, the parked one too.
    let mut leaves = 0;
    let mut released = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while (leaves < 2 || released.is_empty()) && Instant::now() < deadline {
        for m in observer.drain_for(Duration::from_millis(200)).await {
            match m["type"].as_str() {
                Some("presence.leave") => leaves += 1,
                Some("lock.released") => released.push(m["reason"].clone()),
                _ => {}
            }
        }
    }
    assert_eq!(leaves, 2, "attached and parked sessions leave");
    assert_eq!(released, [json!("revoked")]);
    let t = jwt("eve", editor(), exp, "e-2");
    let back = Client::connect(server.addr, &t, Codec::Json, Some(&parked_resume)).await;
    assert_eq!(back.welcome["resumed"], false);
    let closed = audit_until(&server.url(""), ADMIN, "session_closed", "eve", |r| {
        r.len() >= 2
    })
    .await;
    assert!(
        closed
            .iter()
            .filter(|c| c["detail"]["reason"] == "revoked" && c["detail"]["actor"] == "admin")
            .count()
            == 2,
        "{closed:?}"
    );

    // By jti: that session ends, and the token is refused from then on.
    let mut j = connect(&server, &jwt("jo", editor(), exp, "jti-9")).await;
    let r = revoke(&server.url(""), ADMIN, json!({"jti":"jti-9"})).await;
    assert_eq!(r.status(), 200);
    let (how, _) = j.closed_within(Duration::from_secs(5)).await;
    assert_eq!(how, common::Closed::Code(4013));
    let (_ws, first) = Client::open(
        server.addr,
        &jwt("jo", editor(), exp, "jti-9"),
        Codec::Json,
        None,
    )
    .await;
    assert_eq!(first.expect_err("refused"), common::Closed::Code(4013));
    let mut other = connect(&server, &jwt("jo", editor(), exp, "jti-10")).await;
    let r = other
        .request(json!({"type":"auth.refresh","token":jwt("jo", editor(), exp, "jti-9")}))
        .await;
    assert_eq!(
        r["code"], "unauthorized",
        "a revoked token cannot refresh: {r}"
    );

    let bad = revoke(&server.url(""), ADMIN, json!({})).await;
    assert_eq!(bad.status(), 400);
}

async fn server_token(_server: &Server) -> String {
    jwt("someone", json!({"*": "owner"}), now_s() + 3600, "x-1")
}

/// Revocation reaches every node: revoked on node B, the session on node A ends with 4013.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_revocation_reaches_other_nodes() {
    let redis = RedisServer::start();
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    let mut victim = Client::connect(a.addr(), &token("victor", None), Codec::Json, None).await;
    victim.join(ROOM).await;
    let mut observer = Client::connect(b.addr(), &token("otto", None), Codec::Json, None).await;
    observer.join(ROOM).await;
    victim.request(acquire("segment:77-11", json!({}))).await;
    let r = revoke(&b.url(""), GW_ADMIN, json!({"user_id":"victor"})).await;
    assert_eq!(r.status(), 200);
    let (how, _) = victim.closed_within(Duration::from_secs(5)).await;
    assert_eq!(how, common::Closed::Code(4013));
    let rel = observer.recv_type("lock.released").await;
    assert_eq!(rel["reason"], "revoked", "{rel}");
}

/// Item 10c: a JWT whose `sub` is `admin` would share the admin principal's user id (in lock
/// holders and audit records): it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_cannot_take_the_admin_user_id() {
    let server = jwt_server(Duration::from_secs(5)).await;
    let t = jwt("admin", editor(), now_s() + 3600, "a-1");
    let (_ws, first) = Client::open(server.addr, &t, Codec::Json, None).await;
    assert_eq!(first.expect_err("refused"), common::Closed::Code(4001));
    let r = reqwest::Client::new()
        .get(server.url("/v1/locks?room=scene:77"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
}
