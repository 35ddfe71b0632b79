//! Authentication and roles on a node with a real HS256 key (not dev mode): who may connect,
//! what each role may do, and the audit trail of refusals.
mod common;

use std::time::Duration;

use common::{Client, Closed, Codec, Server};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "ws-auth-test-secret-0123456789-abcdefghij";
const ISSUER: &str = "https://id.example.test";
const AUDIENCE: &str = "lockstep-test";
const ADMIN: &str = "admin-token-for-ws-auth-tests-0123";

async fn server() -> Server {
    Server::start_with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_issuer = Some(ISSUER.into());
        c.jwt_audience = Some(AUDIENCE.into());
        c.admin_token = Some(ADMIN.into());
    })
    .await
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Valid claims for `sub` with `rooms`; `edit` may change anything.
fn claims(sub: &str, rooms: Value) -> Value {
    json!({
        "sub": sub,
        "name": format!("{sub} Example"),
        "rooms": rooms,
        "iat": now(),
        "exp": now() + 3600,
        "iss": ISSUER,
        "aud": AUDIENCE,
    })
}

fn sign_with(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn sign(claims: &Value) -> String {
    sign_with(SECRET, claims)
}

fn token(sub: &str, rooms: Value) -> String {
    sign(&claims(sub, rooms))
}

async fn connect(server: &Server, sub: &str, rooms: Value) -> Client {
    Client::connect(server.addr, &token(sub, rooms), Codec::Json, None).await
}

/// Connects with `token` and expects the server to refuse it with close 4001 before any message.
async fn expect_4001(server: &Server, token: &str, what: &str) {
    let (_ws, first) = Client::open(server.addr, token, Codec::Json, None).await;
    assert_eq!(
        first,
        Err(Closed::Code(4001)),
        "{what}: expected close 4001, got {first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_gets_welcome_with_claims() {
    let server = server().await;
    let mut c = claims("alice", json!({"scene:*": "editor"}));
    c["name"] = json!("Alice Liddell");
    c["color"] = json!("#ff8800");
    c["avatar"] = json!("https://example.test/a.png");
    let mut alice = Client::connect(server.addr, &sign(&c), Codec::Json, None).await;
    let w = &alice.welcome;
    assert_eq!(w["user"]["id"], "alice", "{w}");
    assert_eq!(w["user"]["name"], "Alice Liddell", "{w}");
    assert_eq!(w["user"]["color"], "#ff8800", "{w}");
    assert_eq!(w["user"]["avatar"], "https://example.test/a.png", "{w}");
    assert_eq!(w["node_id"], "test-node", "{w}");
    assert!(
        w["session_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{w}"
    );
    assert!(
        w["resume_token"].as_str().is_some_and(|s| !s.is_empty()),
        "{w}"
    );
    assert!(w["heartbeat_ms"].as_u64().is_some(), "{w}");
    alice.join("scene:1").await;
    alice.ping().await;

    // The same over MessagePack.
    let mut mp = Client::connect(
        server.addr,
        &token("bob", json!({"*": "viewer"})),
        Codec::MsgPack,
        None,
    )
    .await;
    assert_eq!(mp.welcome["user"]["name"], "bob Example");
    mp.join("scene:1").await;
    let j = alice.recv_type("presence.join").await;
    assert_eq!(j["member"]["name"], "bob Example");
    assert_eq!(j["member"]["role"], "viewer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_closed_with_4001() {
    let server = server().await;
    let rooms = json!({"*": "editor"});

    let mut expired = claims("alice", rooms.clone());
    expired["iat"] = json!(now() - 7200);
    expired["exp"] = json!(now() - 3600);
    expect_4001(&server, &sign(&expired), "expired").await;

    expect_4001(
        &server,
        &sign_with(
            "some-other-secret-0123456789-abcdefghij",
            &claims("alice", rooms.clone()),
        ),
        "badly signed",
    )
    .await;

    let mut wrong_aud = claims("alice", rooms.clone());
    wrong_aud["aud"] = json!("someone-else");
    expect_4001(&server, &sign(&wrong_aud), "wrong audience").await;

    let mut no_aud = claims("alice", rooms.clone());
    no_aud.as_object_mut().unwrap().remove("aud");
    expect_4001(&server, &sign(&no_aud), "no audience").await;

    let mut wrong_iss = claims("alice", rooms.clone());
    wrong_iss["iss"] = json!("https://evil.example.test");
    expect_4001(&server, &sign(&wrong_iss), "wrong issuer").await;

    let mut no_exp = claims("alice", rooms.clone());
    no_exp.as_object_mut().unwrap().remove("exp");
    expect_4001(&server, &sign(&no_exp), "no exp").await;

    let mut no_sub = claims("alice", rooms.clone());
    no_sub.as_object_mut().unwrap().remove("sub");
    expect_4001(&server, &sign(&no_sub), "no sub").await;

    let mut bad_rooms = claims("alice", rooms.clone());
    bad_rooms["rooms"] = json!({"Scene:1": "editor"});
    expect_4001(&server, &sign(&bad_rooms), "bad room pattern").await;

    expect_4001(&server, "not-a-jwt", "garbage").await;
    expect_4001(&server, "", "empty").await;

    // No token at all.
    let url = format!("ws://{}/v1/ws", server.addr);
    let (_ws, first) = Client::open_request(url.into_client_request().unwrap(), Codec::Json).await;
    assert_eq!(first, Err(Closed::Code(4001)), "no token");

    // A refused connection leaves the node healthy.
    let mut ok = connect(&server, "alice", rooms).await;
    ok.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_authorization_header() {
    let server = server().await;
    let url = format!("ws://{}/v1/ws", server.addr);

    let mut req = url.as_str().into_client_request().unwrap();
    let bearer = format!("Bearer {}", token("alice", json!({"*": "editor"})));
    req.headers_mut()
        .insert("Authorization", bearer.parse().unwrap());
    let (ws, first) = Client::open_request(req, Codec::Json).await;
    let welcome = first.expect("welcome");
    let mut alice = Client::from_parts(ws, Codec::Json, welcome);
    assert_eq!(alice.user_id(), "alice");
    assert_eq!(alice.welcome["user"]["name"], "alice Example");
    alice.join("scene:1").await;

    let mut req = url.as_str().into_client_request().unwrap();
    let bearer = format!(
        "Bearer {}",
        sign_with(
            "some-other-secret-0123456789-abcdefghij",
            &claims("alice", json!({"*": "editor"}))
        )
    );
    req.headers_mut()
        .insert("Authorization", bearer.parse().unwrap());
    let (_ws, first) = Client::open_request(req, Codec::Json).await;
    assert_eq!(first, Err(Closed::Code(4001)), "bad bearer header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_and_commenters_see_but_cannot_lock() {
    let server = server().await;
    let mut editor = connect(&server, "ed", json!({"scene:*": "editor"})).await;
    let mut viewer = connect(&server, "vi", json!({"scene:*": "viewer"})).await;
    let mut commenter = connect(&server, "co", json!({"scene:*": "commenter"})).await;
    editor.join("scene:1").await;
    viewer.join("scene:1").await;
    let j = editor.recv_type("presence.join").await;
    assert_eq!(j["member"]["user_id"], "vi");
    assert_eq!(j["member"]["role"], "viewer");
    commenter.join("scene:1").await;
    let j = editor.recv_type("presence.join").await;
    assert_eq!(j["member"]["user_id"], "co");
    assert_eq!(j["member"]["role"], "commenter");

    // Viewers see and are seen: presence, cursors.
    let r = viewer
        .request(json!({"type": "presence", "room": "scene:1", "focus": "segment:1-1"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let u = editor.recv_type("presence.update").await;
    assert_eq!(u["member"]["focus"], "segment:1-1");
    viewer
        .send(json!({"type": "cursor", "room": "scene:1", "x": 0.5, "y": 0.5}))
        .await;
    let c = editor.recv_type("cursor").await;
    assert_eq!(c["user_id"], "vi");

    // But may not lock or broadcast.
    let lock = json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "approve"});
    viewer.expect_error(lock.clone(), "forbidden").await;
    viewer
        .expect_error(
            json!({"type": "broadcast", "room": "scene:1", "event": "typing", "data": null}),
            "forbidden",
        )
        .await;
    viewer.ping().await;

    // Commenters may broadcast, not lock.
    let r = commenter
        .request(json!({"type": "broadcast", "room": "scene:1", "event": "comment", "data": {"text": "nice"}}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let b = viewer.recv_type("broadcast").await;
    assert_eq!(b["event"], "comment");
    assert_eq!(b["from"]["user_id"], "co");
    commenter.expect_error(lock.clone(), "forbidden").await;

    // Editors may lock; nobody saw a lock from the refused attempts.
    let r = editor.request(lock).await;
    assert_eq!(r["type"], "reply", "{r}");
    let a = viewer.recv_type("lock.acquired").await;
    assert_eq!(a["holder"]["user_id"], "ed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_patterns_limit_joins() {
    let server = server().await;
    let mut alice = connect(&server, "alice", json!({"scene:1": "editor"})).await;
    alice.join("scene:1").await;
    for room in ["scene:2", "story:1", "scene:10"] {
        alice
            .expect_error(json!({"type": "join", "room": room}), "forbidden")
            .await;
    }
    // A user with no rooms at all may connect but join nothing.
    let mut nobody = connect(&server, "nobody", json!({})).await;
    nobody
        .expect_error(json!({"type": "join", "room": "scene:1"}), "forbidden")
        .await;
    // The most specific pattern wins.
    let mut mixed = connect(&server, "mixed", json!({"*": "owner", "scene:1": "viewer"})).await;
    mixed.join("scene:1").await;
    mixed
        .expect_error(
            json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "approve"}),
            "forbidden",
        )
        .await;
    mixed.join("scene:2").await;
    let r = mixed
        .request(json!({"type": "lock.acquire", "room": "scene:2", "resource": "segment:2-1", "action": "approve"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    alice.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_force_release_editors_may_not() {
    let server = server().await;
    let mut holder = connect(&server, "holder", json!({"scene:*": "editor"})).await;
    let mut editor = connect(&server, "editor2", json!({"scene:*": "editor"})).await;
    let mut owner = connect(&server, "boss", json!({"scene:*": "owner"})).await;
    for c in [&mut holder, &mut editor, &mut owner] {
        c.join("scene:1").await;
    }
    let r = holder
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "approve"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    let token = r["token"].as_u64().unwrap();

    let force = json!({"type": "lock.release", "room": "scene:1", "resource": "segment:1-1", "force": true});
    editor.expect_error(force.clone(), "forbidden").await;
    // Knowing the holder's token does not help either: it is still another's lock.
    editor
        .expect_error(
            json!({"type": "lock.release", "room": "scene:1", "resource": "segment:1-1", "token": token}),
            "forbidden",
        )
        .await;

    let r = owner.request(force).await;
    assert_eq!(r["type"], "reply", "{r}");
    let rel = holder
        .recv_where(|v| v["type"] == "lock.released" && v["resource"] == "segment:1-1")
        .await;
    assert_eq!(rel["reason"], "forced", "{rel}");
    let rel = editor.recv_type("lock.released").await;
    assert_eq!(rel["reason"], "forced", "{rel}");

    // The old holder's token is dead.
    holder
        .expect_error(
            json!({"type": "lock.release", "room": "scene:1", "resource": "segment:1-1", "token": token}),
            "lock_not_held",
        )
        .await;
    // And the editor can take the lock now, with a higher token.
    let r = editor
        .request(json!({"type": "lock.acquire", "room": "scene:1", "resource": "segment:1-1", "action": "trim"}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
    assert!(r["token"].as_u64().unwrap() > token, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_endpoint_is_off_outside_dev_mode() {
    let server = server().await;
    let r = server
        .http
        .post(server.url("/v1/dev/token"))
        .json(&json!({"sub": "mallory", "rooms": {"*": "owner"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "not_found", "{body}");
    assert!(body["message"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bearer_is_checked_like_the_websocket() {
    let server = server().await;
    let get = |bearer: Option<String>| {
        let mut req = server.http.get(server.url("/v1/presence/scene/1"));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        req.send()
    };
    let mut expired = claims("alice", json!({"*": "editor"}));
    expired["exp"] = json!(now() - 3600);
    for (bearer, what) in [
        (None, "none"),
        (Some(sign(&expired)), "expired"),
        (Some("garbage".to_owned()), "garbage"),
    ] {
        let r = get(bearer).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{what}: {body}");
    }
    let r = get(Some(token("alice", json!({"*": "viewer"}))))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get(Some(token("alice", json!({"story:*": "owner"}))))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = get(Some(ADMIN.to_owned())).await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn audit(server: &Server, query: &str) -> reqwest::Response {
    server
        .http
        .get(server.url(&format!("/v1/audit?{query}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

/// Polls the audit log (admin) until a record of `kind` matches `pred`.
async fn find_audit(server: &Server, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = audit(server, &format!("kind={kind}")).await;
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "GET /v1/audit?kind={kind}: {body}");
        let records = body["records"].as_array().expect("records array");
        assert!(
            records.iter().all(|r| r["kind"] == kind),
            "kind filter ignored: {body}"
        );
        if let Some(r) = records.iter().find(|r| pred(r)) {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no matching {kind} record: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_auth_failures_and_forbidden() {
    let server = server().await;
    let mut expired = claims("late", json!({"*": "editor"}));
    expired["exp"] = json!(now() - 3600);
    expect_4001(&server, &sign(&expired), "expired").await;

    let mut viewer = connect(&server, "peeker", json!({"scene:*": "viewer"})).await;
    viewer.join("scene:9").await;
    viewer
        .expect_error(
            json!({"type": "lock.acquire", "room": "scene:9", "resource": "segment:9-1", "action": "approve"}),
            "forbidden",
        )
        .await;

    // Only admins read the audit log.
    let r = server
        .http
        .get(server.url("/v1/audit?kind=forbidden"))
        .bearer_auth(token("peeker", json!({"*": "owner"})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = server
        .http
        .get(server.url("/v1/audit?kind=forbidden"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let failed = find_audit(&server, "auth_failed", |r| {
        r["detail"]["reason"]
            .as_str()
            .is_some_and(|s| s.contains("expired"))
    })
    .await;
    assert_eq!(failed["node_id"], "test-node", "{failed}");
    assert!(failed["at"].is_string(), "{failed}");
    assert!(failed["id"].is_string(), "{failed}");

    let denied = find_audit(&server, "forbidden", |r| r["user_id"] == "peeker").await;
    assert_eq!(denied["room"], "scene:9", "{denied}");

    // Filters combine: user_id narrows to peeker's records only.
    let r = audit(&server, "user_id=peeker").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let records = body["records"].as_array().expect("records");
    assert!(!records.is_empty(), "{body}");
    assert!(records.iter().all(|r| r["user_id"] == "peeker"), "{body}");
}
