//! The audit trail in Postgres: every record exactly once through Postgres outages, killed
//! writers and restarts; `GET /v1/audit` from Postgres; dead letters. Real Postgres, real Redis,
//! real gateway processes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use common::cluster::{Gateway, token};
use common::postgres::PostgresServer;
use common::redis::RedisServer;
use lockstep::engine::redis::keys;
use serde_json::{Value, json};

const ADMIN: &str = "test-admin-token-0123456789";

/// Where requests go: a gateway's base URL (kept when the process is killed).
#[derive(Clone)]
struct Target {
    base: String,
    name: String,
}

impl Target {
    fn of(g: &Gateway) -> Target {
        Target {
            base: g.url(""),
            name: g.node_id.clone(),
        }
    }
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// How an HTTP acquire ended.
#[derive(Debug, PartialEq)]
enum Acquire {
    Granted(u64),
    /// 409 `lock_held`.
    Held,
    /// 503: with Postgres down, strict fencing withdraws the grant it could not register (the
    /// audit trail shows that grant's `lock_acquired` and its `lock_released`).
    Unavailable,
}

impl Acquire {
    fn token(self) -> u64 {
        match self {
            Acquire::Granted(t) => t,
            other => panic!("expected a grant, got {other:?}"),
        }
    }
}

/// `POST /v1/locks/acquire`.
async fn acquire(
    http: &reqwest::Client,
    node: &Target,
    bearer: &str,
    room: &str,
    resource: &str,
    key: &str,
) -> Acquire {
    let r = http
        .post(node.url("/v1/locks/acquire"))
        .bearer_auth(bearer)
        .json(&json!({"room": room, "resource": resource, "action": "trim", "ttl_ms": 60_000, "holder_key": key}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("acquire on {}: {e}", node.name));
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("acquire json");
    match status {
        200 => Acquire::Granted(body["token"].as_u64().expect("token")),
        409 => Acquire::Held,
        503 => Acquire::Unavailable,
        s => panic!("acquire on {}: {s} {body}", node.name),
    }
}

async fn release(
    http: &reqwest::Client,
    node: &Target,
    bearer: &str,
    room: &str,
    resource: &str,
    token: u64,
) {
    let r = http
        .post(node.url("/v1/locks/release"))
        .bearer_auth(bearer)
        .json(&json!({"room": room, "resource": resource, "token": token}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("release on {}: {e}", node.name));
    let status = r.status().as_u16();
    assert_eq!(
        status,
        200,
        "release on {}: {}",
        node.name,
        r.text().await.unwrap_or_default()
    );
}

fn count(pg: &PostgresServer, sql: &str) -> u64 {
    pg.psql(sql).parse().unwrap_or_else(|_| panic!("{sql}"))
}

/// Polls `f` until it holds, panicking with `what` after `within`.
async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("not within {within:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rows of this run's resources, by kind.
fn rows(pg: &PostgresServer, run: &str, kind: &str) -> u64 {
    count(
        pg,
        &format!(
            "SELECT count(*) FROM lockstep.audit_events WHERE kind = '{kind}' AND resource LIKE 'segment:{run}%'"
        ),
    )
}

/// No id twice (the primary key), and no grant or release recorded twice.
fn assert_no_duplicates(pg: &PostgresServer, run: &str) {
    assert_eq!(
        pg.psql("SELECT count(*) = count(DISTINCT id) FROM lockstep.audit_events"),
        "t"
    );
    let doubled = count(
        pg,
        &format!(
            "SELECT count(*) FROM (SELECT kind, resource, token FROM lockstep.audit_events \
             WHERE resource LIKE 'segment:{run}%' AND kind IN ('lock_acquired', 'lock_released') \
             GROUP BY kind, resource, token HAVING count(*) > 1) d"
        ),
    );
    assert_eq!(doubled, 0, "a grant or release recorded twice");
}

/// Pending entries of the writer group over all shard streams.
fn pending(redis: &RedisServer) -> u64 {
    (0..keys::SHARDS)
        .map(|s| {
            let out = redis.cli(&["XPENDING", &keys::audit_stream(s), "lockstep-audit"]);
            out.lines()
                .next()
                .and_then(|l| l.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Pending entries of one consumer over all shard streams.
fn pending_of(redis: &RedisServer, consumer: &str) -> u64 {
    (0..keys::SHARDS)
        .map(|s| {
            let out = redis.cli(&[
                "XPENDING",
                &keys::audit_stream(s),
                "lockstep-audit",
                "-",
                "+",
                "100000",
                consumer,
            ]);
            // Four lines per entry: id, consumer, idle ms, deliveries.
            out.lines().filter(|l| !l.trim().is_empty()).count() as u64 / 4
        })
        .sum()
}

fn stream_lengths(redis: &RedisServer) -> u64 {
    (0..keys::SHARDS)
        .map(|s| {
            redis
                .cli(&["XLEN", &keys::audit_stream(s)])
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

async fn metrics(http: &reqwest::Client, node: &Target) -> String {
    http.get(node.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Postgres stopped for several seconds during lock churn on two nodes, one node killed with
/// -9 meanwhile: once Postgres is back, every acquire and release the clients saw succeed is
/// exactly one row, and the streams are trimmed down to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_and_a_killed_node_lose_and_double_nothing() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let url = pg.url();
    let env = [
        ("LOCKSTEP_DATABASE_URL", url.as_str()),
        ("LOCKSTEP_AUDIT_CLAIM_IDLE", "2s"),
    ];
    let mut a = Gateway::start(&redis.url(), "node-a", &env).await;
    let b = Gateway::start(&redis.url(), "node-b", &env).await;
    let (ta, tb) = (Target::of(&a), Target::of(&b));
    let run = run_id();
    let http = reqwest::Client::new();
    let acquired = Arc::new(AtomicU64::new(0));
    let released = Arc::new(AtomicU64::new(0));
    let withdrawn = Arc::new(AtomicU64::new(0));
    // 0: workers use both nodes; 1: only node b (a is about to be killed).
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (http, ta, tb, acquired, released, withdrawn, phase, stop) = (
            http.clone(),
            ta.clone(),
            tb.clone(),
            acquired.clone(),
            released.clone(),
            withdrawn.clone(),
            phase.clone(),
            stop.clone(),
        );
        let run = run.clone();
        workers.push(tokio::spawn(async move {
            let user = format!("user-{w}");
            let bearer = token(&user, None);
            let resource = format!("segment:{run}-w{w}");
            let room = format!("scene:{run}");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let node = if phase.load(Ordering::SeqCst) == 0 && (i + w).is_multiple_of(2) {
                    &ta
                } else {
                    &tb
                };
                i += 1;
                let t =
                    match acquire(&http, node, &bearer, &room, &resource, &format!("k{i}")).await {
                        Acquire::Granted(t) => t,
                        Acquire::Unavailable => {
                            withdrawn.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        Acquire::Held => panic!("each worker's resource is its own"),
                    };
                acquired.fetch_add(1, Ordering::SeqCst);
                let node = if phase.load(Ordering::SeqCst) == 0 && (i + w).is_multiple_of(3) {
                    &ta
                } else {
                    &tb
                };
                release(&http, node, &bearer, &room, &resource, t).await;
                released.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let operations = || acquired.load(Ordering::SeqCst) + withdrawn.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.stop();
    let at_stop = operations();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    phase.store(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Node a's writer holds a batch it cannot write: pending entries that node b must claim.
    let stranded = pending_of(&redis, "node-a");
    a.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = operations() - at_stop;
    pg.start_again();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let (granted, released, withdrawn) = (
        acquired.load(Ordering::SeqCst),
        released.load(Ordering::SeqCst),
        withdrawn.load(Ordering::SeqCst),
    );
    assert!(
        during > 20,
        "lock operations went on while Postgres was down ({during})"
    );
    assert!(stranded > 0, "node a died with unacknowledged entries");
    assert_eq!(granted, released);
    // Every grant is one `lock_acquired`; a grant withdrawn because Postgres was down (503)
    // is followed by one `lock_withdrawn` — never by a `lock_released`, as if it had been held.
    let acquired = granted + withdrawn;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (ra, rr, rw) = (
            rows(&pg, &run, "lock_acquired"),
            rows(&pg, &run, "lock_released"),
            rows(&pg, &run, "lock_withdrawn"),
        );
        if ra >= acquired && rr >= released && rw >= withdrawn {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not converged: acquired {acquired} (rows {ra}), released {released} (rows {rr}), \
             withdrawn {withdrawn} (rows {rw}), pending {}, stream entries {}",
            pending(&redis),
            stream_lengths(&redis)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Settled: nothing more arrives later (no duplicates trickling in).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rows(&pg, &run, "lock_acquired"), acquired);
    assert_eq!(rows(&pg, &run, "lock_released"), released);
    assert_eq!(rows(&pg, &run, "lock_withdrawn"), withdrawn);
    assert!(withdrawn > 0, "grants were withdrawn during the outage");
    let reasons = pg.psql(&format!(
        "SELECT count(*) FROM lockstep.audit_events WHERE kind = 'lock_withdrawn' \
         AND resource LIKE 'segment:{run}%' AND detail->>'reason' <> ''"
    ));
    assert_eq!(reasons, withdrawn.to_string(), "each says why");
    assert_no_duplicates(&pg, &run);

    eventually(
        Duration::from_secs(30),
        "nothing pending, streams trimmed",
        || pending(&redis) == 0 && stream_lengths(&redis) == 0,
    )
    .await;
    let m = metrics(&http, &tb).await;
    let failures =
        common::metric_sum(&m, "lockstep_audit_write_failures_total", &[]).unwrap_or(0.0);
    assert!(failures >= 1.0, "the outage was seen: {failures}");
    assert_eq!(
        common::metric_sum(&m, "lockstep_audit_backlog", &[]),
        Some(0.0)
    );
    assert!(
        common::metric_sum(&m, "lockstep_audit_batch_duration_seconds_count", &[])
            .is_some_and(|n| n > 0.0)
    );
}

/// A writer killed between its commit and its acknowledgement: another node claims the entries
/// (short claim idle), writes them again (nothing happens) and acknowledges them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_between_commit_and_ack_doubles_nothing() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let url = pg.url();
    let mut a = Gateway::start(
        &redis.url(),
        "node-a",
        &[
            ("LOCKSTEP_DATABASE_URL", url.as_str()),
            ("LOCKSTEP_AUDIT_ACK_DELAY_MS", "5000"),
        ],
    )
    .await;
    let run = run_id();
    let http = reqwest::Client::new();
    let bearer = token("alice", None);
    let room = format!("scene:{run}");
    let ta = Target::of(&a);
    for i in 0..20 {
        let resource = format!("segment:{run}-{}", i % 4);
        let t = acquire(&http, &ta, &bearer, &room, &resource, &format!("k{i}"))
            .await
            .token();
        release(&http, &ta, &bearer, &room, &resource, t).await;
    }
    eventually(
        Duration::from_secs(40),
        "node a committed every record",
        || rows(&pg, &run, "lock_acquired") == 20 && rows(&pg, &run, "lock_released") == 20,
    )
    .await;
    // Node a now sleeps between that commit and its XACK.
    let unacked = pending(&redis);
    assert!(
        unacked > 0,
        "the last batch is committed but not acknowledged"
    );
    a.kill9();

    let b = Gateway::start(
        &redis.url(),
        "node-b",
        &[
            ("LOCKSTEP_DATABASE_URL", url.as_str()),
            ("LOCKSTEP_AUDIT_CLAIM_IDLE", "1s"),
        ],
    )
    .await;
    let tb = Target::of(&b);
    eventually(
        Duration::from_secs(30),
        "node b claimed and acknowledged",
        || pending(&redis) == 0,
    )
    .await;
    assert_eq!(rows(&pg, &run, "lock_acquired"), 20);
    assert_eq!(rows(&pg, &run, "lock_released"), 20);
    assert_no_duplicates(&pg, &run);

    // And node b goes on writing new records.
    for i in 20..25 {
        let resource = format!("segment:{run}-{}", i % 4);
        let t = acquire(&http, &tb, &bearer, &room, &resource, &format!("k{i}"))
            .await
            .token();
        release(&http, &tb, &bearer, &room, &resource, t).await;
    }
    eventually(Duration::from_secs(20), "the new records", || {
        rows(&pg, &run, "lock_acquired") == 25 && rows(&pg, &run, "lock_released") == 25
    })
    .await;
    assert_no_duplicates(&pg, &run);
}

/// Embedded engines (no Redis) with a database: the JSON-lines file is the outbox, tailed into
/// Postgres; a node killed between a commit and its checkpoint re-sends that batch, which
/// inserts nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_drains_the_file_once_across_restarts() {
    let pg = PostgresServer::start();
    let url = pg.url();
    let mut node = Gateway::start(
        "",
        "solo",
        &[
            ("LOCKSTEP_REDIS_URL", ""),
            ("LOCKSTEP_DATABASE_URL", url.as_str()),
            ("LOCKSTEP_AUDIT_ACK_DELAY_MS", "3000"),
        ],
    )
    .await;
    let run = run_id();
    let http = reqwest::Client::new();
    let bearer = token("alice", None);
    let room = format!("scene:{run}");
    let target = Target::of(&node);
    let churn = |from: u32, to: u32| {
        let (http, bearer, room, run) = (http.clone(), bearer.clone(), room.clone(), run.clone());
        let node = target.clone();
        async move {
            for i in from..to {
                let resource = format!("segment:{run}-{}", i % 3);
                let t = acquire(&http, &node, &bearer, &room, &resource, &format!("k{i}"))
                    .await
                    .token();
                release(&http, &node, &bearer, &room, &resource, t).await;
            }
        }
    };
    churn(0, 15).await;
    eventually(Duration::from_secs(30), "the records in Postgres", || {
        rows(&pg, &run, "lock_acquired") == 15 && rows(&pg, &run, "lock_released") == 15
    })
    .await;
    // The drainer now waits before writing its checkpoint: kill it there.
    node.restart().await;
    churn(15, 20).await;
    eventually(
        Duration::from_secs(30),
        "the records after the restart",
        || rows(&pg, &run, "lock_acquired") == 20 && rows(&pg, &run, "lock_released") == 20,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(rows(&pg, &run, "lock_acquired"), 20);
    assert_eq!(rows(&pg, &run, "lock_released"), 20);
    assert_no_duplicates(&pg, &run);

    // Queries read Postgres: the file's UUIDv7 ids.
    let page: Value = http
        .get(node.url(&format!("/v1/audit?room=scene:{run}&limit=1000")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("audit json");
    let records = page["records"].as_array().expect("records");
    assert_eq!(records.len(), 40);
    assert!(
        records
            .iter()
            .all(|r| r["id"].as_str().unwrap().as_bytes()[14] == b'7')
    );
}

/// `GET /v1/audit` answered from Postgres: filters, newest first, keyset pagination; records
/// past `LOCKSTEP_AUDIT_RETENTION` are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_queries_are_served_from_postgres() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let url = pg.url();
    lockstep::db::migrate(&url).await.expect("migrate");
    let old = uuid::Uuid::now_v7();
    pg.psql(&format!(
        "INSERT INTO lockstep.audit_events (id, at, kind, node_id) \
         VALUES ('{old}', now() - interval '3 days', 'session_opened', 'old-node')"
    ));
    let node = Gateway::start(
        &redis.url(),
        "node-q",
        &[
            ("LOCKSTEP_DATABASE_URL", url.as_str()),
            ("LOCKSTEP_AUDIT_RETENTION", "2d"),
        ],
    )
    .await;
    eventually(Duration::from_secs(10), "the old record pruned", || {
        count(
            &pg,
            "SELECT count(*) FROM lockstep.audit_events WHERE node_id = 'old-node'",
        ) == 0
    })
    .await;
    let run = run_id();
    let http = reqwest::Client::new();
    let (alice, bob) = (token("alice", None), token("bob", None));
    let gw = node;
    let node = Target::of(&gw);
    let room = format!("scene:{run}");
    let x = format!("segment:{run}-x");
    let y = format!("segment:{run}-y");
    acquire(&http, &node, &alice, &room, &x, "a1").await.token();
    assert_eq!(
        acquire(&http, &node, &bob, &room, &x, "b1").await,
        Acquire::Held
    );
    assert_eq!(
        acquire(&http, &node, &bob, &room, &x, "b2").await,
        Acquire::Held
    );
    let r = http
        .post(node.url("/v1/admin/locks/release"))
        .bearer_auth(ADMIN)
        .json(&json!({"room": room, "resource": x}))
        .send()
        .await
        .expect("force");
    assert_eq!(r.status().as_u16(), 200);
    for i in 0..5 {
        let t = acquire(&http, &node, &alice, &room, &y, &format!("y{i}"))
            .await
            .token();
        release(&http, &node, &alice, &room, &y, t).await;
    }
    eventually(Duration::from_secs(20), "all records in Postgres", || {
        count(
            &pg,
            &format!("SELECT count(*) FROM lockstep.audit_events WHERE room = '{room}'"),
        ) == 14
    })
    .await;
    let get = |query: String| {
        let http = http.clone();
        let url = node.url(&format!("/v1/audit?{query}"));
        async move {
            let r = http
                .get(url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("audit");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("audit json"))
        }
    };
    let recs = |v: &Value| v["records"].as_array().cloned().unwrap_or_default();

    let (s, denied) = get(format!("kind=lock_denied&resource={x}")).await;
    assert_eq!(s, 200, "{denied}");
    let denied = recs(&denied);
    assert_eq!(denied.len(), 2);
    for d in &denied {
        assert_eq!(d["user_id"], "bob");
        assert_eq!(d["detail"]["holder"]["user_id"], "alice");
        assert_eq!(d["room"], room.as_str());
        assert!(d["at"].as_str().unwrap().ends_with('Z'));
    }
    let (_, forced) = get(format!("kind=lock_forced&room={room}")).await;
    let forced = recs(&forced);
    assert_eq!(forced.len(), 1);
    assert_eq!(
        forced[0]["user_id"], "alice",
        "the holder whose lock was forced"
    );
    assert_eq!(forced[0]["resource"], x.as_str());
    assert_eq!(forced[0]["actor"]["user_id"], "admin", "who forced it");
    assert_eq!(forced[0]["actor"]["via"], "admin_token");
    assert_eq!(forced[0]["actor"]["node_id"], "node-q");
    // Found by its actor (the `actor` column, V3).
    let (s, by_admin) = get(format!("actor=admin&room={room}")).await;
    assert_eq!(s, 200, "{by_admin}");
    assert_eq!(
        recs(&by_admin),
        forced,
        "only the forced release names an actor"
    );
    assert_eq!(
        count(
            &pg,
            &format!(
                "SELECT count(*) FROM lockstep.audit_events WHERE room = '{room}' \
                 AND actor->>'user_id' = 'admin' AND actor->>'via' = 'admin_token'"
            )
        ),
        1
    );

    let (_, all_alice) = get(format!("user_id=alice&room={room}")).await;
    let all_alice = recs(&all_alice);
    assert_eq!(all_alice.len(), 12, "x acquired and forced, y 5 × 2");
    let ats: Vec<&str> = all_alice
        .iter()
        .map(|r| r["at"].as_str().unwrap())
        .collect();
    assert!(
        ats.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {ats:?}"
    );

    // Keyset pagination over y's 10 records: pages of 3, each record once, in order.
    let (_, whole) = get(format!("resource={y}")).await;
    let whole: Vec<Value> = recs(&whole).iter().map(|r| r["id"].clone()).collect();
    assert_eq!(whole.len(), 10);
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut q = format!("resource={y}&limit=3");
        if let Some(b) = &before {
            q.push_str(&format!("&before={b}"));
        }
        let (s, page) = get(q).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        seen.extend(recs(&page).iter().map(|r| r["id"].clone()));
        match page["next"].as_str() {
            Some(n) => before = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(seen, whole);

    // Time filters.
    let first_at = all_alice.last().unwrap()["at"].as_str().unwrap().to_owned();
    let (_, since) = get(format!("room={room}&since={first_at}")).await;
    assert_eq!(recs(&since).len(), 14);
    let (_, until) = get(format!("room={room}&until={first_at}")).await;
    assert_eq!(recs(&until).len(), 0);
    let (_, future) = get(format!("room={room}&since=2999-01-01T00:00:00Z")).await;
    assert_eq!(recs(&future).len(), 0);
    // A cursor whose record is not there (pruned): its id's time stands in.
    let (_, far) = get(format!(
        "room={room}&before={}",
        uuid::Builder::from_unix_timestamp_millis(32_503_680_000_000, &[7; 10]).into_uuid()
    ))
    .await;
    assert_eq!(recs(&far).len(), 14);

    let (s, _) = get("kind=nonsense".into()).await;
    assert_eq!(s, 400);
    let r = http
        .get(node.url("/v1/audit"))
        .bearer_auth(&alice)
        .send()
        .await
        .expect("audit");
    assert_eq!(r.status().as_u16(), 403);
}

/// Entries the writer cannot use end in `lockstep.audit_dead_letters` and are acknowledged:
/// malformed JSON and a missing `rec` field at once, a row Postgres refuses after
/// `MAX_DELIVERIES` deliveries; records after them still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_become_dead_letters_and_block_nothing() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let url = pg.url();
    let gw = Gateway::start(
        &redis.url(),
        "node-d",
        &[("LOCKSTEP_DATABASE_URL", url.as_str())],
    )
    .await;
    let node = Target::of(&gw);
    let stream = keys::audit_stream(3);
    let malformed = redis.cli(&["XADD", &stream, "*", "rec", "{not json"]);
    let foreign = redis.cli(&["XADD", &stream, "*", "other", "field"]);
    // Valid JSON, but a NUL character Postgres' text cannot hold: refused at insert.
    let refused = redis.cli(&[
        "XADD",
        &stream,
        "*",
        "rec",
        r#"{"at":1700000000000,"kind":"lock_acquired","node_id":"x","resource":"segment:bad\u0000"}"#,
    ]);
    assert!(malformed.contains('-') && foreign.contains('-') && refused.contains('-'));

    let run = run_id();
    let http = reqwest::Client::new();
    let bearer = token("alice", None);
    let room = format!("scene:{run}");
    for i in 0..5 {
        let resource = format!("segment:{run}-{i}");
        let t = acquire(&http, &node, &bearer, &room, &resource, "k")
            .await
            .token();
        release(&http, &node, &bearer, &room, &resource, t).await;
    }
    eventually(Duration::from_secs(20), "later records arrive", || {
        rows(&pg, &run, "lock_acquired") == 5 && rows(&pg, &run, "lock_released") == 5
    })
    .await;
    eventually(Duration::from_secs(30), "three dead letters", || {
        count(&pg, "SELECT count(*) FROM lockstep.audit_dead_letters") == 3
    })
    .await;
    let dead = |id: &str, col: &str| {
        pg.psql(&format!(
            "SELECT {col} FROM lockstep.audit_dead_letters WHERE stream = '{stream}' AND entry_id = '{id}'"
        ))
    };
    assert_eq!(dead(&malformed, "payload"), "{not json");
    assert!(dead(&malformed, "error").contains("JSON"));
    assert_eq!(dead(&foreign, "payload"), "other=field");
    assert!(
        dead(&refused, "attempts").parse::<u64>().unwrap() >= 5,
        "refused rows are retried before they are given up"
    );
    assert!(dead(&refused, "payload").contains("segment:bad"));
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM lockstep.audit_events WHERE resource LIKE 'segment:bad%'"
        ),
        0
    );
    eventually(Duration::from_secs(10), "nothing pending", || {
        pending(&redis) == 0
    })
    .await;
    let m = metrics(&http, &node).await;
    assert_eq!(
        common::metric_sum(&m, "lockstep_audit_dead_letters_total", &[]),
        Some(3.0)
    );
}
