//! Strict fencing against real Postgres, real Redis and real gateway processes: every grant is
//! registered in `lockstep.fences` before it is handed out; a counter that went backwards is
//! refused, raised and the grant reissued; Postgres down means no grant at all; and the
//! Jepsen-style trio showing why an app must check the token where it writes.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::cluster::{Gateway, token};
use common::postgres::PostgresServer;
use common::redis::RedisServer;
use common::{Client, Codec, metric_sum};
use lockstep::audit::AuditSink;
use lockstep::engine::conformance::{self, LockStoreUnderTest, RecordingAuditSink};
use lockstep::engine::memory::MemoryLockStore;
use lockstep::engine::redis::audit::RedisAuditSink;
use lockstep::engine::redis::locks::RedisLockStore;
use lockstep::engine::{AcquireOutcome, AcquireRequest, Holder, LockKey, LockStore};
use lockstep::names::Entity;
use serde_json::{Value, json};

/// Above any clock-seeded token (µs since 1970 ≈ 1.8e15) and still below 2^53.
const HUGE: u64 = 9_000_000_000_000_000;

async fn gateway(redis: &RedisServer, pg: &PostgresServer, id: &str) -> Gateway {
    Gateway::start(&redis.url(), id, &[("LOCKSTEP_DATABASE_URL", &pg.url())]).await
}

async fn ws(g: &Gateway, sub: &str, room: &str) -> Client {
    let mut c = Client::connect(g.addr(), &token(sub, None), Codec::Json, None).await;
    c.join(room).await;
    c
}

fn acquire(room: &str, resource: &str, extra: Value) -> Value {
    let mut m =
        json!({"type": "lock.acquire", "room": room, "resource": resource, "action": "edit"});
    if let (Some(m), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    m
}

fn release(room: &str, resource: &str, token: u64) -> Value {
    json!({"type": "lock.release", "room": room, "resource": resource, "token": token})
}

async fn post(g: &Gateway, path: &str, sub: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(g.url(path))
        .bearer_auth(token(sub, None))
        .json(&body)
        .send()
        .await
        .expect("http request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn http_acquire(g: &Gateway, sub: &str, room: &str, resource: &str) -> (u16, Value) {
    let body = json!({"room": room, "resource": resource, "action": "edit", "ttl_ms": 60_000});
    post(g, "/v1/locks/acquire", sub, body).await
}

async fn http_release(g: &Gateway, sub: &str, room: &str, resource: &str, token: u64) {
    let body = json!({"room": room, "resource": resource, "token": token});
    let (s, b) = post(g, "/v1/locks/release", sub, body).await;
    assert_eq!(s, 200, "release {resource}: {b}");
}

/// An HTTP acquire retried while the node answers 503 (a restarted engine coming back).
async fn http_acquire_eventually(g: &Gateway, sub: &str, room: &str, resource: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (s, b) = http_acquire(g, sub, room, resource).await;
        if s == 200 {
            return b["token"].as_u64().expect("token");
        }
        assert_eq!(s, 503, "only `unavailable` while coming back: {b}");
        assert!(b.get("token").is_none(), "no token with a refusal: {b}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "still unavailable: {b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metric(g: &Gateway, name: &str) -> f64 {
    let text = g.metrics().await;
    metric_sum(&text, name, &[]).unwrap_or(0.0)
}

/// The token registered for the lock (`room`, `resource`) in `lockstep.fences`.
fn registered(pg: &PostgresServer, room: &str, resource: &str) -> u64 {
    pg.psql(&format!(
        "SELECT token FROM lockstep.fences WHERE room = '{room}' AND resource = '{resource}'"
    ))
    .parse()
    .expect("a registered token")
}

async fn locks_in(g: &Gateway, room: &str) -> Vec<Value> {
    let v: Value = reqwest::Client::new()
        .get(g.url(&format!("/v1/locks?room={room}")))
        .bearer_auth(token("observer", None))
        .send()
        .await
        .expect("list locks")
        .json()
        .await
        .expect("locks json");
    v["locks"].as_array().cloned().unwrap_or_default()
}

fn assert_increasing(tokens: &[u64]) {
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens must strictly increase: {tokens:?}"
    );
    assert!(tokens.iter().all(|t| *t < 1 << 53), "{tokens:?}");
}

// ---------------------------------------------------------------------------------------------
// (a) A Redis counter that went backwards
// ---------------------------------------------------------------------------------------------

/// A registered token above the Redis counter (what Redis data loss, a failover or a clock step
/// leaves behind): the grant is refused, the counter raised, the grant reissued above the
/// registered token — for direct grants, queue hand-offs and after an empty Redis restart — and
/// the room only ever sees the reissued grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_that_went_backwards_is_refused_raised_and_reissued() {
    let pg = PostgresServer::start();
    let mut redis = RedisServer::start();
    let g = gateway(&redis, &pg, "node-f1").await;
    let (room, res) = ("scene:9", "segment:9-1");
    let mut tokens = Vec::new();

    // A normal resource first: registered as granted.
    let t = http_acquire_eventually(&g, "carol", room, "segment:9-2").await;
    assert_eq!(registered(&pg, room, "segment:9-2"), t);
    http_release(&g, "carol", room, "segment:9-2", t).await;
    let mut other = vec![t];

    pg.psql(&format!(
        "INSERT INTO lockstep.fences (room, resource, token) VALUES ('{room}', '{res}', {HUGE})"
    ));
    let mut watcher = ws(&g, "watcher", room).await;
    let mut alice = ws(&g, "alice", room).await;
    let mut bob = ws(&g, "bob", room).await;

    // Direct grant.
    let r = alice.request(acquire(room, res, json!({}))).await;
    assert_eq!(r["type"], "reply", "{r}");
    let t1 = r["token"].as_u64().expect("token");
    assert!(t1 > HUGE, "above the registered token: {t1}");
    assert_eq!(registered(&pg, room, res), t1);
    tokens.push(t1);
    assert!(metric(&g, "lockstep_fence_refusals_total").await >= 1.0);

    // Hand-off: the registered token moves above the counter while bob waits.
    let q = bob.request(acquire(room, res, json!({"wait": true}))).await;
    assert_eq!(q["queue_position"], 1, "{q}");
    let raised = HUGE + 1_000_000;
    pg.psql(&format!(
        "UPDATE lockstep.fences SET token = {raised} WHERE room = '{room}' AND resource = '{res}'"
    ));
    let r = alice.request(release(room, res, t1)).await;
    assert_eq!(r["type"], "reply", "{r}");
    let granted = bob
        .recv_where(|v| v["type"] == "lock.granted" && v["id"] == q["id"])
        .await;
    let t2 = granted["token"].as_u64().expect("token");
    assert!(t2 > raised, "hand-off reissued above {raised}: {t2}");
    assert_eq!(registered(&pg, room, res), t2);
    tokens.push(t2);
    assert!(metric(&g, "lockstep_fence_refusals_total").await >= 2.0);

    // The room saw alice's grant, its release and bob's grant: the refused tokens never.
    let seen: Vec<Value> = watcher
        .drain_for(Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|v| {
            v["resource"] == res && v["type"].as_str().is_some_and(|t| t.starts_with("lock."))
        })
        .collect();
    let kinds: Vec<(&str, &str)> = seen
        .iter()
        .map(|v| {
            (
                v["type"].as_str().unwrap_or(""),
                v["holder"]["user_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("lock.acquired", "alice"),
            ("lock.released", ""),
            ("lock.acquired", "bob")
        ],
        "{seen:?}"
    );
    let r = bob.request(release(room, res, t2)).await;
    assert_eq!(r["type"], "reply", "{r}");

    // Redis restarts empty: its counters are gone, the registered tokens are not.
    redis.restart();
    let t3 = http_acquire_eventually(&g, "carol", room, res).await;
    assert!(t3 > t2, "after an empty restart: {t3} > {t2}");
    assert_eq!(registered(&pg, room, res), t3);
    tokens.push(t3);
    http_release(&g, "carol", room, res, t3).await;
    let t4 = http_acquire_eventually(&g, "carol", room, res).await;
    tokens.push(t4);
    http_release(&g, "carol", room, res, t4).await;
    let t = http_acquire_eventually(&g, "carol", room, "segment:9-2").await;
    other.push(t);
    assert_eq!(registered(&pg, room, "segment:9-2"), t);

    assert_increasing(&tokens);
    assert_increasing(&other);

    // A retried acquire (same holder_key) returns the existing grant, checked against the
    // registry: kept while registered, reissued when a higher token was registered meanwhile.
    let res = "segment:9-3";
    let body = json!({"room": room, "resource": res, "action": "edit", "holder_key": "job-1"});
    let (s, first) = post(&g, "/v1/locks/acquire", "carol", body.clone()).await;
    assert_eq!(s, 200, "{first}");
    let (s, again) = post(&g, "/v1/locks/acquire", "carol", body.clone()).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(
        again["token"], first["token"],
        "a retry is not a second grant"
    );
    let raised = HUGE + 5_000_000;
    pg.psql(&format!(
        "UPDATE lockstep.fences SET token = {raised} WHERE room = '{room}' AND resource = '{res}'"
    ));
    let (s, third) = post(&g, "/v1/locks/acquire", "carol", body).await;
    assert_eq!(s, 200, "{third}");
    let t = third["token"].as_u64().expect("token");
    assert!(t > raised, "a stale existing grant is reissued: {third}");
    assert_eq!(registered(&pg, room, res), t);

    assert!(metric(&g, "lockstep_fence_refusals_total").await >= 4.0);
    assert_eq!(metric(&g, "lockstep_fence_failures_total").await, 0.0);
}

/// The embedded node (memory locks) with a database: a fresh process whose counter restarted
/// below a registered token is refused, raised and reissued the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_node_with_a_database_fences_too() {
    let pg = PostgresServer::start();
    let url = pg.url();
    let mut server = common::Server::start_with(|c| c.database_url = Some(url)).await;
    pg.psql(&format!(
        "INSERT INTO lockstep.fences (room, resource, token) \
         VALUES ('scene:3', 'segment:3-1', {HUGE})"
    ));
    let mut alice = server.client("alice").await;
    alice.join("scene:3").await;
    let r = alice
        .request(acquire("scene:3", "segment:3-1", json!({})))
        .await;
    let t1 = r["token"].as_u64().expect("token");
    assert!(t1 > HUGE, "{r}");
    assert_eq!(registered(&pg, "scene:3", "segment:3-1"), t1);
    let r = alice.request(release("scene:3", "segment:3-1", t1)).await;
    assert_eq!(r["type"], "reply", "{r}");
    let r = alice
        .request(acquire("scene:3", "segment:3-1", json!({})))
        .await;
    let t2 = r["token"].as_u64().expect("token");
    assert!(t2 > t1);
    assert_eq!(registered(&pg, "scene:3", "segment:3-1"), t2);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// (c) Postgres down
// ---------------------------------------------------------------------------------------------

/// Postgres down: no token is handed out — direct acquires answer `unavailable` (503 over HTTP),
/// a waiter whose turn came is told `unavailable` — and nothing stays locked. Postgres back:
/// grants work again and tokens keep increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_means_no_grant_and_recovery_keeps_tokens_increasing() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let g = gateway(&redis, &pg, "node-f2").await;
    let (room, res) = ("scene:7", "segment:7-1");
    let t0 = http_acquire_eventually(&g, "carol", room, res).await;
    http_release(&g, "carol", room, res, t0).await;

    let mut alice = ws(&g, "alice", room).await;
    let mut bob = ws(&g, "bob", room).await;
    let r = alice.request(acquire(room, res, json!({}))).await;
    let t1 = r["token"].as_u64().expect("token");
    let q = bob.request(acquire(room, res, json!({"wait": true}))).await;
    assert_eq!(q["queue_position"], 1, "{q}");

    pg.stop();

    // The hand-off to bob cannot be registered: bob is told, nobody holds the lock.
    let r = alice.request(release(room, res, t1)).await;
    assert_eq!(r["type"], "reply", "{r}");
    let failed = bob
        .recv_where(|v| v["id"] == q["id"] && v["type"] != "reply")
        .await;
    assert_eq!(failed["type"], "error", "{failed}");
    assert_eq!(failed["code"], "unavailable", "{failed}");
    assert_eq!(failed["resource"], res, "{failed}");
    assert!(locks_in(&g, room).await.is_empty());

    // Direct acquires: refused, and the unregistered grant withdrawn.
    let (s, b) = http_acquire(&g, "carol", room, res).await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["code"], "unavailable", "{b}");
    assert!(b.get("token").is_none(), "{b}");
    let r = alice.request(acquire(room, res, json!({}))).await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "unavailable", "{r}");
    assert!(r.get("token").is_none(), "{r}");
    assert!(locks_in(&g, room).await.is_empty(), "withdrawn");
    assert!(metric(&g, "lockstep_fence_failures_total").await >= 3.0);
    let drained = bob.drain_for(Duration::from_millis(300)).await;
    assert!(
        !drained.iter().any(|v| v["type"] == "lock.granted"),
        "{drained:?}"
    );

    pg.start_again();
    let t2 = http_acquire_eventually(&g, "carol", room, res).await;
    assert!(t2 > t1, "{t2} > {t1}");
    assert_eq!(registered(&pg, room, res), t2);
    http_release(&g, "carol", room, res, t2).await;
    let r = alice.request(acquire(room, res, json!({}))).await;
    let t3 = r["token"].as_u64().expect("token after recovery");
    assert_increasing(&[t0, t1, t2, t3]);
    assert_eq!(registered(&pg, room, res), t3);
}

/// An app passing made-up tokens cannot poison a lock: `fence_check` raises LS001 for a token
/// that was never issued (2^53, 2^63 − 1) and writes nothing, `validate` answers false, and the
/// next grant is registered with an ordinary token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_neither_pass_nor_poison() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let g = gateway(&redis, &pg, "node-f3").await;
    let (room, res) = ("scene:8", "segment:8-1");
    let t1 = http_acquire_eventually(&g, "carol", room, res).await;
    let db = pg_client(&pg).await;
    for forged in [t1 as i64 + 1, 1i64 << 53, i64::MAX] {
        let err = db
            .query_one(
                "SELECT lockstep.fence_check($1, $2, $3)",
                &[&room, &res, &forged],
            )
            .await
            .expect_err("a token above the registered one was never issued");
        assert_eq!(err.code().map(|c| c.code()), Some("LS001"), "{err}");
        let (s, v) = post(
            &g,
            "/v1/locks/validate",
            "carol",
            json!({"room": room, "resource": res, "token": forged}),
        )
        .await;
        assert_eq!((s, &v["valid"]), (200, &json!(false)), "{v}");
    }
    let ok: bool = db
        .query_one(
            "SELECT lockstep.fence_check($1, $2, $3)",
            &[&room, &res, &(t1 as i64)],
        )
        .await
        .expect("the issued token")
        .get(0);
    assert!(ok);
    assert_eq!(registered(&pg, room, res), t1, "nothing was written");
    http_release(&g, "carol", room, res, t1).await;
    let t2 = http_acquire_eventually(&g, "carol", room, res).await;
    assert!(t2 > t1 && t2 < 1 << 53, "{t1} then {t2}");
    assert_eq!(registered(&pg, room, res), t2);
    assert_eq!(metric(&g, "lockstep_fence_refusals_total").await, 0.0);
}

/// `lockstep.fences` rows of locks idle longer than `LOCKSTEP_FENCE_RETENTION` are pruned by
/// the nodes, and a later grant of the same lock still registers a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_fence_rows_are_pruned_and_tokens_keep_increasing() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let g = Gateway::start(
        &redis.url(),
        "node-f4",
        &[
            ("LOCKSTEP_DATABASE_URL", &pg.url()),
            ("LOCKSTEP_FENCE_RETENTION", "2s"),
            ("LOCKSTEP_LOCK_MAX_TTL", "1s"),
            ("LOCKSTEP_LOCK_DEFAULT_TTL", "1s"),
        ],
    )
    .await;
    let (room, res) = ("scene:6", "segment:6-1");
    let t1 = http_acquire_eventually(&g, "carol", room, res).await;
    assert_eq!(registered(&pg, room, res), t1);
    http_release(&g, "carol", room, res, t1).await;
    let count = || {
        pg.psql(&format!(
            "SELECT count(*) FROM lockstep.fences WHERE room = '{room}' AND resource = '{res}'"
        ))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count() != "0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle row was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t2 = http_acquire_eventually(&g, "carol", room, res).await;
    assert!(t2 > t1, "after pruning: {t2} > {t1}");
    assert_eq!(registered(&pg, room, res), t2);
    assert_eq!(metric(&g, "lockstep_fence_refusals_total").await, 0.0);
}

// ---------------------------------------------------------------------------------------------
// (d) raise_fence and reissue, per store
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raise_fence_and_reissue_on_both_stores() {
    let audit: Arc<dyn AuditSink> = Arc::new(RecordingAuditSink::new());
    let memory = LockStoreUnderTest {
        store: Arc::new(MemoryLockStore::new(audit.clone())),
        audit,
    };
    conformance::raise_fence(&memory).await;
    conformance::reissue(&memory).await;

    let mut redis = RedisServer::start();
    let pool = lockstep::engine::redis::connect(&redis.url())
        .await
        .expect("redis");
    let under_test = || LockStoreUnderTest {
        store: Arc::new(RedisLockStore::new(pool.clone())),
        audit: Arc::new(RedisAuditSink::new(pool.clone())),
    };
    conformance::raise_fence(&under_test()).await;
    conformance::reissue(&under_test()).await;

    // Redis specifics: a raise survives as the fence key of an emptied server; 2^53 is refused.
    let store = RedisLockStore::new(pool.clone());
    let res = Entity::parse("segment:4-1").expect("entity");
    let key = LockKey::new(Entity::parse("scene:4").expect("entity"), res.clone());
    store.raise_fence(&key, 1 << 53).await.expect_err("2^53");
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.raise_fence(&key, HUGE).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "redis back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let req = AcquireRequest {
        room: Entity::parse("scene:4").expect("entity"),
        resource: res.clone(),
        action: "edit".into(),
        holder: Holder {
            user_id: "a".into(),
            name: "A".into(),
            session_id: "a-1".into(),
            node_id: "n".into(),
        },
        ttl_ms: 60_000,
        lease_ms: None,
        wait: None,
    };
    match store.acquire(req).await.expect("acquire") {
        AcquireOutcome::Granted { lock, .. } => assert_eq!(lock.token, HUGE + 1),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// (b) The Jepsen-style trio
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Guard {
    /// Plain read-modify-write.
    NoLock,
    /// Acquire, read, write, release.
    LockOnly,
    /// Acquire, read, then write in a transaction that starts with `lockstep.fence_check`.
    LockAndFenceCheck,
}

const ROOM: &str = "board:1";
const COUNTER: &str = "counter:1";
/// Iterations every client does at least.
const ROUNDS: u64 = 4;

struct Tally {
    committed: AtomicU64,
    rejected: AtomicU64,
}

async fn pg_client(pg: &PostgresServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(conn);
    client
}

async fn read_counter(db: &tokio_postgres::Client) -> i32 {
    db.query_one("SELECT value FROM counters WHERE id = 1", &[])
        .await
        .expect("read")
        .get(0)
}

/// Acquires `counter:1`, queueing if held; the token.
async fn lock(c: &mut Client) -> u64 {
    loop {
        let r = c
            .request(acquire(
                ROOM,
                COUNTER,
                json!({"wait": true, "wait_timeout_ms": 30_000}),
            ))
            .await;
        if r["type"] == "reply" {
            return r["token"].as_u64().expect("token");
        }
        assert_eq!(r["code"], "lock_held", "{r}");
        let id = r["id"].clone();
        let answer = loop {
            match c.next_within(Duration::from_secs(30)).await {
                Ok(v) if v["id"] == id && (v["type"] == "lock.granted" || v["type"] == "error") => {
                    break v;
                }
                Ok(_) => continue,
                Err(closed) => panic!("connection closed while waiting: {closed:?}"),
            }
        };
        if answer["type"] == "lock.granted" {
            return answer["token"].as_u64().expect("token");
        }
    }
}

/// Writes `value`, as the guard says; whether it committed.
async fn write(db: &mut tokio_postgres::Client, guard: Guard, token: u64, value: i32) -> bool {
    let tx = db.transaction().await.expect("begin");
    if guard == Guard::LockAndFenceCheck {
        let fresh: bool = tx
            .query_one(
                "SELECT lockstep.fence_check($1, $2, $3)",
                &[&ROOM, &COUNTER, &(token as i64)],
            )
            .await
            .expect("fence_check")
            .get(0);
        if !fresh {
            tx.rollback().await.expect("rollback");
            return false;
        }
    }
    tx.execute("UPDATE counters SET value = $1 WHERE id = 1", &[&value])
        .await
        .expect("update");
    tx.commit().await.expect("commit");
    true
}

/// One increment: (acquire), read, (the scripted pause), write value + 1, (release).
async fn increment(
    c: &mut Client,
    db: &mut tokio_postgres::Client,
    guard: Guard,
    tally: &Tally,
    pause: Option<tokio::sync::oneshot::Sender<(i32, tokio::sync::oneshot::Sender<()>)>>,
) {
    let token = if guard == Guard::NoLock {
        0
    } else {
        lock(c).await
    };
    let value = read_counter(db).await;
    if let Some(pause) = pause {
        // "Paused" here (a GC pause, a stalled VM): the orchestrator freezes our node and
        // wakes us once somebody else wrote.
        let (wake_tx, wake) = tokio::sync::oneshot::channel();
        pause.send((value, wake_tx)).expect("orchestrator");
        wake.await.expect("woken");
    }
    if write(db, guard, token, value + 1).await {
        tally.committed.fetch_add(1, Ordering::SeqCst);
    } else {
        tally.rejected.fetch_add(1, Ordering::SeqCst);
    }
    if guard != Guard::NoLock {
        // A paused holder's lock is gone by now: `lock_not_held` is expected then.
        c.request(release(ROOM, COUNTER, token)).await;
    }
}

/// Runs one variant: four clients (two per node) increment the counter concurrently, each at
/// least [`ROUNDS`] times and until the scripted pause is over. The victim (on node 1) reads,
/// then its node is SIGSTOPped past the lease (1 s) while the victim "sleeps"; it is woken only
/// once the counter changed — another client wrote after the victim's read — and then writes.
/// Returns (committed increments, rejected writes, final value).
async fn run_variant(pg: &PostgresServer, nodes: &[Gateway; 2], guard: Guard) -> (u64, u64, i32) {
    pg.psql("UPDATE counters SET value = 0 WHERE id = 1");
    let tally = Arc::new(Tally {
        committed: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
    });
    let episode_over = Arc::new(AtomicBool::new(false));
    let (pause_tx, pause_rx) = tokio::sync::oneshot::channel();
    let mut pause_tx = Some(pause_tx);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let node = &nodes[i % 2];
        let mut c = ws(node, &format!("worker{i}"), ROOM).await;
        let mut db = pg_client(pg).await;
        let tally = tally.clone();
        let over = episode_over.clone();
        // Worker 0 (node 1) is the victim: paused in its second round.
        let mut pause = if i == 0 { pause_tx.take() } else { None };
        tasks.push(tokio::spawn(async move {
            let mut round = 0;
            while round < ROUNDS || !over.load(Ordering::SeqCst) {
                let p = if round == 1 { pause.take() } else { None };
                increment(&mut c, &mut db, guard, &tally, p).await;
                round += 1;
            }
        }));
    }

    // The scripted interleaving.
    let (read, wake) = pause_rx.await.expect("the victim read");
    if guard != Guard::NoLock {
        nodes[0].pause();
    }
    let db = pg_client(pg).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while read_counter(&db).await == read {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{guard:?}: nobody wrote while the victim slept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if guard != Guard::NoLock {
        nodes[0].resume();
    }
    wake.send(()).expect("victim waiting");
    episode_over.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("workers finish")
            .expect("worker");
    }
    (
        tally.committed.load(Ordering::SeqCst),
        tally.rejected.load(Ordering::SeqCst),
        read_counter(&db).await,
    )
}

/// Without a lock, and with a lock alone, a holder paused past its lease writes over a newer
/// holder's work: an increment is lost (deterministically: someone wrote between the victim's
/// read and its write). With `fence_check` in the writing transaction, the stale write is
/// refused and no increment is ever lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jepsen_trio_only_the_fenced_write_loses_nothing() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let nodes = [
        gateway(&redis, &pg, "node-j1").await,
        gateway(&redis, &pg, "node-j2").await,
    ];
    pg.psql("CREATE TABLE counters (id int PRIMARY KEY, value int NOT NULL)");
    pg.psql("INSERT INTO counters VALUES (1, 0)");

    let (committed, rejected, value) = run_variant(&pg, &nodes, Guard::NoLock).await;
    eprintln!("no lock: {committed} committed, final value {value}");
    assert_eq!(rejected, 0);
    assert!(
        committed > value as u64,
        "no lock loses an update: {committed} committed, value {value}"
    );

    let (committed, rejected, value) = run_variant(&pg, &nodes, Guard::LockOnly).await;
    eprintln!("lock only: {committed} committed, final value {value}");
    assert_eq!(rejected, 0);
    assert!(
        committed > value as u64,
        "a lock alone loses an update to the paused holder: {committed} committed, value {value}"
    );

    let (committed, rejected, value) = run_variant(&pg, &nodes, Guard::LockAndFenceCheck).await;
    eprintln!("lock + fence_check: {committed} committed, {rejected} refused, final value {value}");
    assert_eq!(
        committed, value as u64,
        "fenced writes never lose an update"
    );
    assert!(rejected >= 1, "the paused holder's write was refused");
    assert!(committed >= 4 * ROUNDS - rejected);
}
