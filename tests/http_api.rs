//! The REST API over real HTTP: health, metrics, presence, locks, admin, and error bodies.
mod common;

use std::collections::HashSet;

use common::{Server, metric_sum};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-http-tests-0123456789";

async fn server() -> Server {
    Server::start_with(|c| c.admin_token = Some(ADMIN.into())).await
}

/// A response's status and JSON body (panics if the body is not JSON).
async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text:?}"));
    (status, body)
}

async fn get(server: &Server, path: &str, bearer: Option<&str>) -> (StatusCode, Value) {
    let mut req = server.http.get(server.url(path));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    json_of(req.send().await.expect("request")).await
}

async fn post(
    server: &Server,
    path: &str,
    bearer: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = server.http.post(server.url(path)).json(&body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    json_of(req.send().await.expect("request")).await
}

/// Asserts an error answer: `status`, `{"code": code, "message": <non-empty>}`.
fn assert_error(got: &(StatusCode, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
}

fn user_ids(members: &Value) -> HashSet<String> {
    members
        .as_array()
        .expect("members array")
        .iter()
        .map(|m| m["user_id"].as_str().expect("user_id").to_owned())
        .collect()
}

fn set(ids: &[&str]) -> HashSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let server = server().await;
    let (s, body) = get(&server, "/healthz", None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["status"], "ok");
    let (s, body) = get(&server, "/readyz", None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["node_id"], "test-node", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_session() {
    let server = server().await;
    let mut alice = server.client("alice").await;
    alice.join("scene:1").await;
    let r = alice
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "approve"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let token = r["token"].as_u64().unwrap();
    let r = alice
        .request(json!({"type": "lock.release", "resource": "segment:1-1", "token": token}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");

    let resp = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let text = resp.text().await.unwrap();
    for name in [
        "lockstep_sessions",
        "lockstep_messages_received_total",
        "lockstep_lock_outcomes_total",
        "lockstep_lock_acquire_duration_seconds_bucket",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{text}"
        );
    }
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric_sum(&text, name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))
    };
    assert_eq!(m("lockstep_sessions", &[]), 1.0);
    assert_eq!(
        m("lockstep_messages_received_total", &[("type", "join")]),
        1.0
    );
    assert_eq!(
        m(
            "lockstep_messages_received_total",
            &[("type", "lock.acquire")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "lockstep_messages_received_total",
            &[("type", "lock.release")]
        ),
        1.0
    );
    assert_eq!(m("lockstep_messages_received_total", &[]), 3.0);
    assert_eq!(
        m("lockstep_lock_outcomes_total", &[("outcome", "granted")]),
        1.0
    );
    assert_eq!(
        m("lockstep_lock_outcomes_total", &[("outcome", "released")]),
        1.0
    );
    assert_eq!(m("lockstep_lock_outcomes_total", &[]), 2.0);
    assert_eq!(m("lockstep_lock_acquire_duration_seconds_count", &[]), 1.0);
    assert_eq!(
        m(
            "lockstep_lock_acquire_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        1.0
    );

    // A second session and a refused acquire move the right counters.
    let mut bob = server.client("bob").await;
    bob.join("scene:1").await;
    let r = alice
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "approve"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let r = bob
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "trim"}))
        .await;
    assert_eq!(r["code"], "lock_held", "{r}");
    let text = server.metrics().await;
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric_sum(&text, name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))
    };
    assert_eq!(m("lockstep_sessions", &[]), 2.0);
    assert_eq!(
        m("lockstep_messages_received_total", &[("type", "join")]),
        2.0
    );
    assert_eq!(
        m(
            "lockstep_messages_received_total",
            &[("type", "lock.acquire")]
        ),
        3.0
    );
    assert_eq!(
        m("lockstep_lock_outcomes_total", &[("outcome", "granted")]),
        2.0
    );
    assert_eq!(
        m("lockstep_lock_outcomes_total", &[("outcome", "denied")]),
        1.0
    );
    assert_eq!(m("lockstep_lock_acquire_duration_seconds_count", &[]), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_rooms_and_focused_entities() {
    let server = server().await;
    let reader = server.token("reader", None).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let mut carol = server.client("carol").await;
    alice.join("scene:42").await;
    bob.join("scene:42").await;
    carol.join("scene:7").await;
    let r = carol
        .request(json!({"type": "presence", "room": "scene:7", "focus": "segment:42-1"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");

    let (s, body) = get(&server, "/v1/presence/scene/42", Some(&reader)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(user_ids(&body["members"]), set(&["alice", "bob"]), "{body}");
    let a = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == "alice")
        .unwrap();
    assert_eq!(a["session_id"], json!(alice.session_id()), "{a}");
    assert_eq!(a["name"], "alice-name", "{a}");
    assert_eq!(a["role"], "editor", "{a}");
    assert!(a["color"].is_string() && a["since"].is_u64(), "{a}");

    let (s, body) = get(
        &server,
        "/v1/presence/segment/42-1?room=scene:7",
        Some(&reader),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(user_ids(&body["members"]), set(&["carol"]), "{body}");
    assert_eq!(body["members"][0]["focus"], "segment:42-1", "{body}");
    assert_eq!(body["room"], "scene:7", "{body}");
    // Without `room` the entity is the room: carol, focused on it from scene:7, is not shown.
    let (s, body) = get(&server, "/v1/presence/segment/42-1", Some(&reader)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(user_ids(&body["members"]), set(&[]), "{body}");
    // A viewer of scene:42 only cannot learn who focuses on it from scene:7.
    let viewer42 = server
        .token("viewer42", Some(json!({"scene:42": "viewer"})))
        .await;
    assert_error(
        &get(
            &server,
            "/v1/presence/segment/42-1?room=scene:7",
            Some(&viewer42),
        )
        .await,
        403,
        "forbidden",
    );
    assert_error(
        &get(&server, "/v1/presence/segment/42-1", Some(&viewer42)).await,
        403,
        "forbidden",
    );
    let (s, body) = get(&server, "/v1/presence/scene/42", Some(&viewer42)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(user_ids(&body["members"]), set(&["alice", "bob"]), "{body}");

    // Presence follows leaves and focus changes.
    let r = bob
        .request(json!({"type": "leave", "room": "scene:42"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let r = carol
        .request(json!({"type": "presence", "room": "scene:7", "focus": null}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let (_, body) = get(&server, "/v1/presence/scene/42", Some(&reader)).await;
    assert_eq!(user_ids(&body["members"]), set(&["alice"]), "{body}");
    let (s, body) = get(
        &server,
        "/v1/presence/segment/42-1?room=scene:7",
        Some(&reader),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(user_ids(&body["members"]), set(&[]), "{body}");

    // Bad entities in the path.
    for path in [
        "/v1/presence/Scene/42",
        "/v1/presence/scene/a%20b",
        &format!("/v1/presence/scene/{}", "x".repeat(129)),
    ] {
        assert_error(&get(&server, path, Some(&reader)).await, 400, "bad_request");
    }
    // A user without a role in the room may not look.
    let outsider = server
        .token("outsider", Some(json!({"story:*": "owner"})))
        .await;
    assert_error(
        &get(&server, "/v1/presence/scene/42", Some(&outsider)).await,
        403,
        "forbidden",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_lock_lifecycle() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let bob = server.token("bob", None).await;
    let mut watcher = server.client("watcher").await;
    watcher.join("scene:1").await;

    let acquire = json!({"room": "scene:1", "resource": "segment:1-1", "action": "approve", "ttl_ms": 60_000});
    let (s, granted) = post(&server, "/v1/locks/acquire", Some(&alice), acquire.clone()).await;
    assert_eq!(s, 200, "{granted}");
    let token = granted["token"].as_u64().expect("token");
    let expires_at = granted["expires_at"].as_u64().expect("expires_at");
    let now = lockstep::engine::now_ms();
    assert!(
        expires_at > now + 30_000 && expires_at <= now + 61_000,
        "expires_at {expires_at} vs now {now}"
    );

    // The room sees the HTTP lock like any other.
    let seen = watcher.recv_type("lock.acquired").await;
    assert_eq!(seen["resource"], "segment:1-1", "{seen}");
    assert_eq!(seen["holder"]["user_id"], "alice", "{seen}");
    assert_eq!(seen["action"], "approve", "{seen}");
    assert!(seen.get("token").is_none(), "{seen}");

    // Somebody else is told who holds it.
    let got = post(&server, "/v1/locks/acquire", Some(&bob), acquire.clone()).await;
    assert_error(&got, 409, "lock_held");
    let body = &got.1;
    assert_eq!(body["holder"]["user_id"], "alice", "{body}");
    assert_eq!(body["holder"]["name"], "alice-name", "{body}");
    assert_eq!(body["holder"]["action"], "approve", "{body}");
    assert!(body["estimated_wait_ms"].is_u64(), "{body}");
    assert!(
        body.get("token").is_none(),
        "a denial must not leak the token: {body}"
    );

    // A websocket member is denied too.
    let mut ws_bob = server.client("bob").await;
    ws_bob.join("scene:1").await;
    let r = ws_bob
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "trim"}))
        .await;
    assert_eq!(r["code"], "lock_held", "{r}");
    assert_eq!(r["holder"]["user_id"], "alice", "{r}");

    // Listing shows the lock without its token.
    let (s, list) = get(&server, "/v1/locks?room=scene:1", Some(&bob)).await;
    assert_eq!(s, 200, "{list}");
    let locks = list["locks"].as_array().expect("locks");
    assert_eq!(locks.len(), 1, "{list}");
    assert_eq!(locks[0]["resource"], "segment:1-1", "{list}");
    assert_eq!(locks[0]["holder"]["user_id"], "alice", "{list}");
    assert!(
        !list.to_string().contains("\"token\""),
        "tokens leaked: {list}"
    );
    let (s, list) = get(&server, "/v1/locks?room=scene:2", Some(&bob)).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["locks"], json!([]), "{list}");

    // Validate: the live token is valid, with its holder.
    let (s, v) = post(
        &server,
        "/v1/locks/validate",
        Some(&bob),
        json!({"room": "scene:1", "resource": "segment:1-1", "token": token}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["holder"]["user_id"], "alice", "{v}");
    let (_, v) = post(
        &server,
        "/v1/locks/validate",
        Some(&bob),
        json!({"room": "scene:1", "resource": "segment:1-1", "token": token - 1}),
    )
    .await;
    assert_eq!(v["valid"], false, "{v}");

    // Extend moves expires_at.
    let (s, ext) = post(
        &server,
        "/v1/locks/extend",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-1", "token": token, "ttl_ms": 600_000}),
    )
    .await;
    assert_eq!(s, 200, "{ext}");
    assert_eq!(ext["token"].as_u64(), Some(token), "{ext}");
    let extended = ext["expires_at"].as_u64().expect("expires_at");
    assert!(
        extended > expires_at + 500_000,
        "{extended} vs {expires_at}"
    );
    let seen = watcher.recv_type("lock.acquired").await;
    assert_eq!(seen["expires_at"].as_u64(), Some(extended), "{seen}");
    // Extending with a stale token fails; so does another user's extend.
    assert_error(
        &post(
            &server,
            "/v1/locks/extend",
            Some(&alice),
            json!({"room": "scene:1", "resource": "segment:1-1", "token": token + 1, "ttl_ms": 1000}),
        )
        .await,
        409,
        "lock_not_held",
    );
    assert_error(
        &post(
            &server,
            "/v1/locks/extend",
            Some(&bob),
            json!({"room": "scene:1", "resource": "segment:1-1", "token": token, "ttl_ms": 1000}),
        )
        .await,
        403,
        "forbidden",
    );

    // Release: a stale token is refused, another user with the right token is forbidden.
    assert_error(
        &post(
            &server,
            "/v1/locks/release",
            Some(&alice),
            json!({"room": "scene:1", "resource": "segment:1-1", "token": token + 1}),
        )
        .await,
        409,
        "lock_not_held",
    );
    assert_error(
        &post(
            &server,
            "/v1/locks/release",
            Some(&bob),
            json!({"room": "scene:1", "resource": "segment:1-1", "token": token}),
        )
        .await,
        403,
        "forbidden",
    );
    let (s, body) = post(
        &server,
        "/v1/locks/release",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-1", "token": token}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let rel = watcher.recv_type("lock.released").await;
    assert_eq!(rel["resource"], "segment:1-1", "{rel}");
    assert_eq!(rel["reason"], "released", "{rel}");

    // After release: not valid, releasing again is refused, the list is empty.
    let (_, v) = post(
        &server,
        "/v1/locks/validate",
        Some(&bob),
        json!({"room": "scene:1", "resource": "segment:1-1", "token": token}),
    )
    .await;
    assert_eq!(v["valid"], false, "{v}");
    assert!(v.get("holder").is_none() || v["holder"].is_null(), "{v}");
    assert_error(
        &post(
            &server,
            "/v1/locks/release",
            Some(&alice),
            json!({"room": "scene:1", "resource": "segment:1-1", "token": token}),
        )
        .await,
        409,
        "lock_not_held",
    );
    let (_, list) = get(&server, "/v1/locks?room=scene:1", Some(&bob)).await;
    assert_eq!(list["locks"], json!([]), "{list}");

    // Bob can have it now, with a higher token.
    let (s, g) = post(&server, "/v1/locks/acquire", Some(&bob), acquire).await;
    assert_eq!(s, 200, "{g}");
    assert!(g["token"].as_u64().unwrap() > token, "{g}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_key_makes_acquire_idempotent() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let body = json!({"room": "scene:1", "resource": "segment:1-1", "action": "approve", "holder_key": "job-17"});
    let (s, first) = post(&server, "/v1/locks/acquire", Some(&alice), body.clone()).await;
    assert_eq!(s, 200, "{first}");
    let (s, again) = post(&server, "/v1/locks/acquire", Some(&alice), body.clone()).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(
        again["token"], first["token"],
        "a retried acquire must not be a second grant"
    );

    // Without the key, a repeat by the same user is a conflict (a different holder).
    let mut no_key = body.clone();
    no_key.as_object_mut().unwrap().remove("holder_key");
    assert_error(
        &post(&server, "/v1/locks/acquire", Some(&alice), no_key).await,
        409,
        "lock_held",
    );
    // A bad key is refused.
    let mut bad = body;
    bad["holder_key"] = json!("no spaces allowed");
    assert_error(
        &post(&server, "/v1/locks/acquire", Some(&alice), bad).await,
        400,
        "bad_request",
    );
}

/// `holder_key` identifies one caller's retries; another user sending the same key (keys like
/// `job-17` are easy to guess or collide) must not be handed the holder's grant and token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_key_is_scoped_to_the_user() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let bob = server.token("bob", None).await;
    let body = json!({"room": "scene:1", "resource": "segment:1-1", "action": "approve", "holder_key": "job-17"});
    let (s, first) = post(&server, "/v1/locks/acquire", Some(&alice), body.clone()).await;
    assert_eq!(s, 200, "{first}");
    let got = post(&server, "/v1/locks/acquire", Some(&bob), body.clone()).await;
    assert!(
        got.1.get("token").is_none(),
        "bob was handed alice's lock and token: {}",
        got.1
    );
    assert_error(&got, 409, "lock_held");
    assert_eq!(got.1["holder"]["user_id"], "alice", "{}", got.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_across_cycles() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let mut ws = server.client("bob").await;
    ws.join("scene:1").await;
    let mut last = 0u64;
    for i in 0..6 {
        let token = if i % 2 == 0 {
            let (s, g) = post(
                &server,
                "/v1/locks/acquire",
                Some(&alice),
                json!({"room": "scene:1", "resource": "segment:1-1", "action": "approve"}),
            )
            .await;
            assert_eq!(s, 200, "{g}");
            let t = g["token"].as_u64().unwrap();
            let (s, r) = post(
                &server,
                "/v1/locks/release",
                Some(&alice),
                json!({"room": "scene:1", "resource": "segment:1-1", "token": t}),
            )
            .await;
            assert_eq!(s, 200, "{r}");
            t
        } else {
            let r = ws
                .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "trim"}))
                .await;
            assert_eq!(r["type"], "reply", "{r}");
            let t = r["token"].as_u64().unwrap();
            let r = ws
                .request(json!({"type": "lock.release", "resource": "segment:1-1", "token": t}))
                .await;
            assert_eq!(r["type"], "reply", "{r}");
            t
        };
        assert!(token > last, "token {token} after {last}");
        last = token;
    }
    // Another resource has its own sequence, unaffected by releases elsewhere, still increasing.
    let (_, g1) = post(
        &server,
        "/v1/locks/acquire",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-2", "action": "approve"}),
    )
    .await;
    let t1 = g1["token"].as_u64().unwrap();
    let (_, _) = post(
        &server,
        "/v1/admin/locks/release",
        Some(ADMIN),
        json!({"room": "scene:1", "resource": "segment:1-2"}),
    )
    .await;
    let (_, g2) = post(
        &server,
        "/v1/locks/acquire",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-2", "action": "approve"}),
    )
    .await;
    assert!(g2["token"].as_u64().unwrap() > t1, "{g1} then {g2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_force_release() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let editor = server.token("bob", None).await;
    let mut watcher = server.client("watcher").await;
    watcher.join("scene:1").await;
    let (s, g) = post(
        &server,
        "/v1/locks/acquire",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-1", "action": "approve"}),
    )
    .await;
    assert_eq!(s, 200, "{g}");
    let token = g["token"].as_u64().unwrap();
    watcher.recv_type("lock.acquired").await;

    let force = json!({"room": "scene:1", "resource": "segment:1-1"});
    assert_error(
        &post(&server, "/v1/admin/locks/release", None, force.clone()).await,
        401,
        "unauthorized",
    );
    assert_error(
        &post(
            &server,
            "/v1/admin/locks/release",
            Some("not-the-admin-token"),
            force.clone(),
        )
        .await,
        401,
        "unauthorized",
    );
    assert_error(
        &post(
            &server,
            "/v1/admin/locks/release",
            Some(&editor),
            force.clone(),
        )
        .await,
        403,
        "forbidden",
    );
    // Still held after the refused attempts.
    let (_, v) = post(
        &server,
        "/v1/locks/validate",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-1", "token": token}),
    )
    .await;
    assert_eq!(v["valid"], true, "{v}");

    let (s, body) = post(
        &server,
        "/v1/admin/locks/release",
        Some(ADMIN),
        force.clone(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["released"], true, "{body}");
    let rel = watcher.recv_type("lock.released").await;
    assert_eq!(rel["resource"], "segment:1-1", "{rel}");
    assert_eq!(rel["reason"], "forced", "{rel}");
    let (_, v) = post(
        &server,
        "/v1/locks/validate",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-1", "token": token}),
    )
    .await;
    assert_eq!(v["valid"], false, "{v}");

    // A websocket holder is told too.
    let mut holder = server.client("holder").await;
    holder.join("scene:1").await;
    let r = holder
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-2", "action": "trim"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let (s, body) = post(
        &server,
        "/v1/admin/locks/release",
        Some(ADMIN),
        json!({"room": "scene:1", "resource": "segment:1-2"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let rel = holder
        .recv_where(|v| v["type"] == "lock.released" && v["resource"] == "segment:1-2")
        .await;
    assert_eq!(rel["reason"], "forced", "{rel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_have_codes_and_statuses() {
    let server = Server::start_with(|c| {
        c.admin_token = Some(ADMIN.into());
        c.max_frame_bytes = 1024;
    })
    .await;
    let alice = server.token("alice", None).await;

    // No bearer.
    for path in [
        "/v1/locks/acquire",
        "/v1/locks/release",
        "/v1/locks/extend",
        "/v1/locks/validate",
    ] {
        assert_error(
            &post(&server, path, None, json!({})).await,
            401,
            "unauthorized",
        );
    }
    assert_error(
        &get(&server, "/v1/presence/scene/1", None).await,
        401,
        "unauthorized",
    );
    assert_error(
        &get(&server, "/v1/locks?room=scene:1", None).await,
        401,
        "unauthorized",
    );
    assert_error(&get(&server, "/v1/audit", None).await, 401, "unauthorized");
    // A bearer that is not a token, or another scheme.
    assert_error(
        &get(&server, "/v1/presence/scene/1", Some("garbage")).await,
        401,
        "unauthorized",
    );
    let r = server
        .http
        .get(server.url("/v1/presence/scene/1"))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_error(&json_of(r).await, 401, "unauthorized");

    // Bad JSON bodies.
    let raw = |body: &'static str| {
        server
            .http
            .post(server.url("/v1/locks/acquire"))
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_error(
        &json_of(raw("{not json").await.unwrap()).await,
        400,
        "bad_request",
    );
    assert_error(&json_of(raw("[]").await.unwrap()).await, 400, "bad_request");
    assert_error(
        &json_of(raw(r#"{"room": "scene:1"}"#).await.unwrap()).await,
        400,
        "bad_request",
    );
    assert_error(
        &json_of(raw(r#"{"room": "scene:1", "resource": "segment:1", "action": "approve", "ttl_ms": "long"}"#).await.unwrap()).await,
        400,
        "bad_request",
    );
    // Bad names and values.
    for body in [
        json!({"room": "Scene:1", "resource": "segment:1", "action": "approve"}),
        json!({"room": "scene:1", "resource": "segment 1", "action": "approve"}),
        json!({"room": "scene:1", "resource": "segment:1", "action": "Approve!"}),
        json!({"room": "scene:1", "resource": "segment:1", "action": "approve", "ttl_ms": 0}),
    ] {
        assert_error(
            &post(&server, "/v1/locks/acquire", Some(&alice), body).await,
            400,
            "bad_request",
        );
    }
    assert_error(
        &get(&server, "/v1/locks?room=nope", Some(&alice)).await,
        400,
        "bad_request",
    );
    assert_error(
        &post(
            &server,
            "/v1/locks/extend",
            Some(&alice),
            json!({"room": "scene:1", "resource": "segment:1", "token": 1}),
        )
        .await,
        400,
        "bad_request",
    );

    // A body over max_frame_bytes.
    let big = json!({"room": "scene:1", "resource": "segment:1", "action": "approve", "pad": "x".repeat(4096)});
    assert_error(
        &post(&server, "/v1/locks/acquire", Some(&alice), big).await,
        413,
        "too_large",
    );

    // Unknown paths and methods.
    assert_error(
        &get(&server, "/v1/nope", Some(&alice)).await,
        404,
        "not_found",
    );
    assert_error(&get(&server, "/nope", None).await, 404, "not_found");

    // The node still works after all of that.
    let (s, g) = post(
        &server,
        "/v1/locks/acquire",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1", "action": "approve"}),
    )
    .await;
    assert_eq!(s, 200, "{g}");
}

/// Force-releasing a resource nobody holds is `404 not_found` ("not locked"), which is what
/// `Node::force_release` answers; not `409 lock_not_held`, whose message talks about a token the
/// admin never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_release_of_an_unlocked_resource_is_not_found() {
    let server = server().await;
    assert_error(
        &post(
            &server,
            "/v1/admin/locks/release",
            Some(ADMIN),
            json!({"room": "scene:9", "resource": "segment:9-9"}),
        )
        .await,
        404,
        "not_found",
    );
    // The same over the WebSocket for an owner.
    let owner = server.token("boss", Some(json!({"*": "owner"}))).await;
    let mut boss = common::Client::connect(server.addr, &owner, common::Codec::Json, None).await;
    boss.join("scene:9").await;
    boss.expect_error(
        json!({"type": "lock.release", "room": "scene:9", "resource": "segment:9-9", "force": true}),
        "not_found",
    )
    .await;
}

/// A known path with the wrong method answers 405 with the usual `{"code", "message"}` body
/// (axum's default 405 has an empty body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_gets_a_json_error() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    // A known path with the wrong method: still a JSON error body.
    let r = server
        .http
        .get(server.url("/v1/locks/acquire"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 405, "{text}");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("405 body is not a JSON error ({e}): {text:?}"));
    assert!(
        body["code"].is_string() && body["message"].is_string(),
        "{body}"
    );
}

/// Query-string problems are answered like body problems: 400 with a JSON error body
/// (axum's own `Query` rejection is plain text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_strings_get_json_errors() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    for (path, bearer) in [
        ("/v1/locks", alice.as_str()),
        ("/v1/locks?room=", alice.as_str()),
        ("/v1/audit?limit=lots", ADMIN),
        ("/v1/audit?before=not-a-uuid", ADMIN),
    ] {
        let r = server
            .http
            .get(server.url(path))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: {status} body is not JSON ({e}): {text:?}"));
        assert_error(
            &(StatusCode::from_u16(status).unwrap(), body),
            400,
            "bad_request",
        );
    }
}

/// Every HTTP endpoint that names a lock needs its room: 400 `bad_request` with a message
/// that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_endpoints_require_the_room() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    for (path, bearer) in [
        ("/v1/locks/release", alice.as_str()),
        ("/v1/locks/extend", alice.as_str()),
        ("/v1/locks/validate", alice.as_str()),
        ("/v1/admin/locks/release", ADMIN),
    ] {
        let got = post(
            &server,
            path,
            Some(bearer),
            json!({"resource": "segment:1-1", "token": 1, "ttl_ms": 1000}),
        )
        .await;
        assert_error(&got, 400, "bad_request");
        assert!(
            got.1["message"]
                .as_str()
                .unwrap_or("")
                .contains("room is required"),
            "{path}: {}",
            got.1
        );
    }
}

/// `validate` needs a role in the lock's room (viewer or above; the admin token too), and
/// answers with the holder. Outsiders cannot probe tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_needs_a_role_in_the_room() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let (s, g) = post(
        &server,
        "/v1/locks/acquire",
        Some(&alice),
        json!({"room": "scene:42", "resource": "segment:42-7", "action": "approve"}),
    )
    .await;
    assert_eq!(s, 200, "{g}");
    let token = g["token"].as_u64().unwrap();
    let probe = json!({"room": "scene:42", "resource": "segment:42-7", "token": token});
    let outsider = server
        .token("outsider", Some(json!({"scene:1": "owner"})))
        .await;
    assert_error(
        &post(
            &server,
            "/v1/locks/validate",
            Some(&outsider),
            probe.clone(),
        )
        .await,
        403,
        "forbidden",
    );
    let viewer = server
        .token("viewer", Some(json!({"scene:42": "viewer"})))
        .await;
    for bearer in [viewer.as_str(), ADMIN] {
        let (s, v) = post(&server, "/v1/locks/validate", Some(bearer), probe.clone()).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["valid"], true, "{v}");
        assert_eq!(v["holder"]["user_id"], "alice", "{v}");
    }
    // The same resource in another room is another lock: not valid there.
    let (s, v) = post(
        &server,
        "/v1/locks/validate",
        Some(ADMIN),
        json!({"room": "scene:1", "resource": "segment:42-7", "token": token}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["valid"], false, "{v}");
}

/// No token value a caller passes in — 2^53, 2^63 − 1, u64::MAX — to validate, release or
/// extend changes anything: the lock stays, and later grants get normal tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_tokens_break_nothing() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let acquire = json!({"room": "scene:1", "resource": "segment:1-9", "action": "approve"});
    let (_, g) = post(&server, "/v1/locks/acquire", Some(&alice), acquire.clone()).await;
    let token = g["token"].as_u64().expect("token");
    for huge in [1u64 << 53, (1u64 << 63) - 1, u64::MAX] {
        let body =
            json!({"room": "scene:1", "resource": "segment:1-9", "token": huge, "ttl_ms": 1000});
        let (s, v) = post(&server, "/v1/locks/validate", Some(&alice), body.clone()).await;
        assert_eq!((s.as_u16(), &v["valid"]), (200, &json!(false)), "{v}");
        assert_error(
            &post(&server, "/v1/locks/extend", Some(&alice), body.clone()).await,
            409,
            "lock_not_held",
        );
        assert_error(
            &post(&server, "/v1/locks/release", Some(&alice), body).await,
            409,
            "lock_not_held",
        );
    }
    let (s, _) = post(
        &server,
        "/v1/locks/release",
        Some(&alice),
        json!({"room": "scene:1", "resource": "segment:1-9", "token": token}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, g) = post(&server, "/v1/locks/acquire", Some(&alice), acquire).await;
    assert_eq!(s, 200, "{g}");
    let next = g["token"].as_u64().expect("token");
    assert!(next > token && next < 1 << 53, "{token} then {next}");
}

/// A forced release names who forced it: the victim stays in `user_id`, the forcer is the
/// record's `actor` (`via` admin_token, http or ws), and `GET /v1/audit?actor=` finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_releases_are_audited_with_their_actor() {
    let server = server().await;
    let alice = server.token("alice", None).await;
    let owner = server
        .token("olga", Some(json!({"scene:5": "owner"})))
        .await;
    let mut ws_owner =
        common::Client::connect(server.addr, &owner, common::Codec::Json, None).await;
    ws_owner.join("scene:5").await;
    for res in ["segment:5-1", "segment:5-2", "segment:5-3"] {
        let (s, g) = post(
            &server,
            "/v1/locks/acquire",
            Some(&alice),
            json!({"room": "scene:5", "resource": res, "action": "approve"}),
        )
        .await;
        assert_eq!(s, 200, "{g}");
    }
    let force = |res: &str| json!({"room": "scene:5", "resource": res});
    let (s, b) = post(
        &server,
        "/v1/admin/locks/release",
        Some(ADMIN),
        force("segment:5-1"),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = post(
        &server,
        "/v1/admin/locks/release",
        Some(&owner),
        force("segment:5-2"),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let r = ws_owner
        .request(json!({"type": "lock.release", "room": "scene:5", "resource": "segment:5-3", "force": true}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");

    let (s, page) = get(&server, "/v1/audit?kind=lock_forced", Some(ADMIN)).await;
    assert_eq!(s, 200, "{page}");
    let records = page["records"].as_array().expect("records");
    assert_eq!(records.len(), 3, "{page}");
    let by_res = |res: &str| {
        records
            .iter()
            .find(|r| r["resource"] == res)
            .unwrap_or_else(|| panic!("no record for {res}: {page}"))
            .clone()
    };
    for r in records {
        assert_eq!(r["user_id"], "alice", "the victim stays in user_id: {r}");
        assert_eq!(r["room"], "scene:5", "{r}");
    }
    let admin = by_res("segment:5-1");
    assert_eq!(admin["actor"]["user_id"], "admin", "{admin}");
    assert_eq!(admin["actor"]["via"], "admin_token", "{admin}");
    let http = by_res("segment:5-2");
    assert_eq!(http["actor"]["user_id"], "olga", "{http}");
    assert_eq!(http["actor"]["via"], "http", "{http}");
    let ws = by_res("segment:5-3");
    assert_eq!(ws["actor"]["user_id"], "olga", "{ws}");
    assert_eq!(ws["actor"]["via"], "ws", "{ws}");
    assert_eq!(
        ws["actor"]["session_id"],
        json!(ws_owner.session_id()),
        "{ws}"
    );
    assert!(ws["actor"]["node_id"].is_string(), "{ws}");

    let (s, page) = get(&server, "/v1/audit?actor=olga", Some(ADMIN)).await;
    assert_eq!(s, 200, "{page}");
    let found: Vec<&str> = page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["resource"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(found.len(), 2, "{page}");
    assert!(
        found.contains(&"segment:5-2") && found.contains(&"segment:5-3"),
        "{page}"
    );
}
