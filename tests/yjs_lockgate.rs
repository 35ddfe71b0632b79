//! `/v1/yjs/{room}?lock=<resource>`: write access tied to a lockstep lock (docs/yjs.md "Locks
//! and documents"), and the message budget of `/v1/yjs` connections. Real sockets, a
//! y-websocket client built on yrs, locks taken and ended through the HTTP API; one embedded
//! node, or two gateway processes sharing a private Redis.
mod common;
mod yjs_support;

use std::time::{Duration, Instant};

use common::Server;
use common::cluster::{Gateway, token as signed};
use common::redis::RedisServer;
use serde_json::{Value, json};
use yjs_support::YClient;

const LOCK_LOST: u16 = 4016;

/// The query of a lock-gated connection: the token, then `&lock=` (the test client puts its
/// argument after `?token=`).
fn gated(token: &str, resource: &str) -> String {
    format!("{token}&lock={resource}")
}

async fn post(base: &str, path: &str, bearer: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .expect("http request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Takes the lock over HTTP with the user's token; returns its fencing token.
async fn acquire(base: &str, bearer: &str, room: &str, resource: &str, ttl_ms: u64) -> u64 {
    let body = json!({"room": room, "resource": resource, "action": "edit", "ttl_ms": ttl_ms});
    let (status, v) = post(base, "/v1/locks/acquire", bearer, body).await;
    assert_eq!(status, 200, "acquire: {v}");
    v["token"].as_u64().expect("token")
}

async fn force_release(base: &str, owner: &str, room: &str, resource: &str) {
    let body = json!({"room": room, "resource": resource});
    let (status, v) = post(base, "/v1/admin/locks/release", owner, body).await;
    assert_eq!(status, 200, "force release: {v}");
}

/// `edit` sends an update from `writer`, then an awareness frame: frames of one connection are
/// handled in order, so once `observer` (same node) sees the awareness, the update was handled.
/// Then `fence` (a writable client) edits, and once `observer` has the fence, anything of the
/// writer's that the server applied would have reached it.
async fn wrote(
    writer: &mut YClient,
    marker: &str,
    observer: &mut YClient,
    fence: &mut YClient,
) -> bool {
    writer.insert(marker).await;
    writer
        .set_awareness(1, &format!(r#"{{"after":"{marker}"}}"#))
        .await;
    let id = writer.doc.client_id().get();
    let tag = marker.to_owned();
    observer
        .until("the writer's awareness after its edit", move |c| {
            c.awareness.get(&id).is_some_and(|j| j.contains(&tag))
        })
        .await;
    // Markers are `<…>`; the fence names its marker without the brackets.
    let fence_mark = format!("[fence {}]", marker.replace(['<', '>'], "|"));
    fence.insert(&fence_mark).await;
    observer
        .until("the fence edit", |c| c.text().contains(&fence_mark))
        .await;
    observer.text().contains(marker)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_while_held_and_forced_release_closes_with_4016_then_read_only() {
    let server = Server::start().await;
    let base = format!("http://{}", server.addr);
    let (room, res) = ("scene:1", "segment:1");
    let ed = server.token("ed", None).await;
    let owner = server
        .token("olga", Some(json!({"scene:*": "owner"})))
        .await;
    let mut observer = YClient::connect(server.addr, room, &server.token("obs", None).await).await;
    let mut fence = YClient::connect(server.addr, room, &server.token("fen", None).await).await;
    observer.until("observer synced", |c| c.synced).await;
    fence.until("fence synced", |c| c.synced).await;

    let mut reactions = Vec::new();
    let mut last_state = None;
    for round in 0..5 {
        acquire(&base, &ed, room, res, 60_000).await;
        let mut w = YClient::connect(server.addr, room, &gated(&ed, res)).await;
        w.until("writer synced", |c| c.synced).await;
        // (1) Writable while held.
        let mark = format!("<held {round}>");
        assert!(
            wrote(&mut w, &mark, &mut observer, &mut fence).await,
            "the lock holder's edit reaches the others"
        );
        // (2) The owner forces the lock away: the writer is closed with 4016.
        let t0 = Instant::now();
        let (_, code) = tokio::join!(force_release(&base, &owner, room, res), async {
            let code = w.until_closed().await;
            (code, t0.elapsed())
        });
        let (code, took) = code;
        assert_eq!(code, LOCK_LOST, "round {round}");
        assert!(took < Duration::from_secs(1), "round {round}: {took:?}");
        reactions.push(took);
        last_state = Some(w.state());
    }
    let med = median(reactions.clone());
    eprintln!("force-release → 4016: {reactions:?}, median {med:?}");

    // The provider reconnects with the same parameters and its local state: synced, but
    // read-only (the lock is gone); its edit never reaches anyone, and it stays connected.
    let mut back = YClient::connect_with(server.addr, room, &gated(&ed, res), last_state).await;
    back.until("reconnected writer synced", |c| c.synced).await;
    assert!(
        !wrote(&mut back, "<after loss>", &mut observer, &mut fence).await,
        "an edit after the loss reached the observer: {}",
        observer.text()
    );
    back.drain_for(Duration::from_millis(200)).await;
    assert_eq!(back.closed, None, "read-only, not closed");
    let mut fresh = YClient::connect(server.addr, room, &server.token("new", None).await).await;
    fresh.until("fresh synced", |c| c.synced).await;
    assert!(!fresh.text().contains("<after loss>"), "{}", fresh.text());
    assert!(fresh.text().contains("<held 4>"), "{}", fresh.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lock_closes_with_4016() {
    let server = Server::start().await;
    let base = format!("http://{}", server.addr);
    let ed = server.token("ed", None).await;
    acquire(&base, &ed, "scene:2", "scene:2", 3_000).await;
    let mut w = YClient::connect(server.addr, "scene:2", &gated(&ed, "scene:2")).await;
    w.until("synced", |c| c.synced).await;
    w.insert("before expiry").await;
    assert_eq!(w.until_closed().await, LOCK_LOST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_another_user_or_by_nobody_gives_read_only() {
    let server = Server::start().await;
    let base = format!("http://{}", server.addr);
    let (room, res) = ("scene:3", "segment:3");
    let ed = server.token("ed", None).await;
    let bob = server.token("bob", None).await;
    let mut observer = YClient::connect(server.addr, room, &server.token("obs", None).await).await;
    let mut fence = YClient::connect(server.addr, room, &server.token("fen", None).await).await;
    observer.until("observer synced", |c| c.synced).await;
    fence.until("fence synced", |c| c.synced).await;

    // Nobody holds it.
    let mut w = YClient::connect(server.addr, room, &gated(&ed, res)).await;
    w.until("synced", |c| c.synced).await;
    assert!(!wrote(&mut w, "<unlocked>", &mut observer, &mut fence).await);
    // Bob holds it: ed is read-only, bob (gated on the same lock) writes.
    acquire(&base, &bob, room, res, 60_000).await;
    let mut w2 = YClient::connect(server.addr, room, &gated(&ed, res)).await;
    w2.until("synced", |c| c.synced).await;
    assert!(!wrote(&mut w2, "<bobs lock>", &mut observer, &mut fence).await);
    let mut b = YClient::connect(server.addr, room, &gated(&bob, res)).await;
    b.until("synced", |c| c.synced).await;
    assert!(wrote(&mut b, "<bob writes>", &mut observer, &mut fence).await);
    // A viewer with `lock=` stays a viewer.
    let vic = server
        .token("vic", Some(json!({"scene:*": "viewer"})))
        .await;
    acquire(&base, &ed, room, "segment:33", 60_000).await;
    let mut v = YClient::connect(server.addr, room, &gated(&vic, "segment:33")).await;
    v.until("synced", |c| c.synced).await;
    assert!(!wrote(&mut v, "<viewer>", &mut observer, &mut fence).await);
    for c in [&mut w, &mut w2, &mut v] {
        c.drain_for(Duration::from_millis(100)).await;
        assert_eq!(c.closed, None, "read-only connections stay open");
    }
    assert!(!observer.text().contains("<unlocked>") && !observer.text().contains("<bobs lock>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_lock_name_is_refused_before_the_upgrade() {
    let server = Server::start().await;
    let ed = server.token("ed", None).await;
    let url = format!(
        "ws://{}/v1/yjs/scene:4?token={ed}&lock=no%20such",
        server.addr
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("expected 400, got {:?}", other.map(|(_, r)| r.status())),
    }
}

async fn two_nodes(redis: &RedisServer) -> (Gateway, Gateway) {
    let a = Gateway::start(&redis.url(), "node-a", &[]).await;
    let b = Gateway::start(&redis.url(), "node-b", &[]).await;
    (a, b)
}

/// (4) The lock is released on node B (by its holder, over HTTP); the lock-gated connection on
/// node A hears it through the room's pub/sub channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_release_on_another_node_closes_with_4016() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let (room, res) = ("scene:5", "segment:5");
    let ed = signed("ed", None);
    let lock = acquire(&b.url(""), &ed, room, res, 60_000).await;
    let mut w = YClient::connect(a.addr(), room, &gated(&ed, res)).await;
    let mut far = YClient::connect(b.addr(), room, &signed("far", None)).await;
    w.until("synced", |c| c.synced).await;
    far.until("synced", |c| c.synced).await;
    w.insert("from node a").await;
    far.until("the holder's edit on node b", |c| c.text() == "from node a")
        .await;

    let t0 = Instant::now();
    let body = json!({"room": room, "resource": res, "token": lock});
    let base_b = b.url("");
    let (release, code) = tokio::join!(post(&base_b, "/v1/locks/release", &ed, body), async {
        let code = w.until_closed().await;
        (code, t0.elapsed())
    });
    assert_eq!(release.0, 200, "{release:?}");
    assert_eq!(code.0, LOCK_LOST);
    eprintln!("release on node b → 4016 on node a: {:?}", code.1);
    assert!(code.1 < Duration::from_secs(1), "{:?}", code.1);
}

/// The backstop: the lock disappears without any event (deleted in Redis behind lockstep's
/// back, as if the announcement had been lost); the periodic re-read closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_lost_event_is_caught_by_the_backstop() {
    let redis = RedisServer::start();
    let (a, _b) = two_nodes(&redis).await;
    let (room, res) = ("scene:6", "segment:6");
    let ed = signed("ed", None);
    acquire(&a.url(""), &ed, room, res, 60_000).await;
    let mut w = YClient::connect(a.addr(), room, &gated(&ed, res)).await;
    w.until("synced", |c| c.synced).await;
    let key = lockstep::engine::redis::keys::lock(&format!("{room}/{res}"));
    assert_eq!(redis.cli(&["DEL", &key]).trim(), "1", "lock key {key}");
    let t0 = Instant::now();
    assert_eq!(w.until_closed().await, LOCK_LOST);
    let took = t0.elapsed();
    eprintln!("silent loss → 4016 by the backstop: {took:?}");
    assert!(took < Duration::from_secs(12), "{took:?}");
}

/// A flooder is throttled (its messages wait; counted), the others are not: a quiet writer's
/// edit sent after the flood reaches the observer while most of the flood is still held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_connection_is_throttled_and_the_others_are_not() {
    let server = Server::start_with(|c| {
        c.messages_per_second = 20;
        c.message_burst = 5;
    })
    .await;
    let room = "scene:7";
    let mut observer = YClient::connect(server.addr, room, &server.token("obs", None).await).await;
    let mut flood = YClient::connect(server.addr, room, &server.token("flood", None).await).await;
    let mut calm = YClient::connect(server.addr, room, &server.token("calm", None).await).await;
    for c in [&mut observer, &mut flood, &mut calm] {
        c.until("synced", |c| c.synced).await;
    }
    const N: usize = 60;
    for i in 0..N {
        flood.insert(&format!("f{i};")).await;
    }
    calm.insert("CALM").await;
    observer
        .until("the calm writer's edit", |c| c.text().contains("CALM"))
        .await;
    let seen = |c: &YClient| {
        (0..N)
            .filter(|i| c.text().contains(&format!("f{i};")))
            .count()
    };
    let before = seen(&observer);
    assert!(
        before < N / 2,
        "the calm edit should overtake most of the flood; {before} of {N} flood edits came first"
    );
    // Delayed, not dropped: every flood edit arrives, in order.
    observer.until("the whole flood", |c| seen(c) == N).await;
    let metrics = server.metrics().await;
    let throttled: f64 = metrics
        .lines()
        .find(|l| l.starts_with("lockstep_yjs_throttled_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no lockstep_yjs_throttled_total in\n{metrics}"));
    assert!(throttled >= (N - 10) as f64, "throttled {throttled}");
    eprintln!("flood: {before} of {N} edits before the calm one; throttled {throttled}");
}
