//! The lock conformance suite and Redis-specific lock and audit checks, each test against its
//! own private `redis-server`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::engine::{grant, holder, request, unique};
use common::redis::RedisServer;
use fred::prelude::Pool;
use lockstep::audit::{AuditKind, AuditQuery, AuditRecord, AuditSink};
use lockstep::engine::conformance::{self, LockStoreUnderTest};
use lockstep::engine::redis::audit::RedisAuditSink;
use lockstep::engine::redis::keys;
use lockstep::engine::redis::locks::RedisLockStore;
use lockstep::engine::{
    AcquireOutcome, AcquireRequest, EngineError, LockKey, LockStore, LockTransition, ReleaseReason,
    TokenOutcome, WaitSpec,
};
use lockstep::names::Entity;
use tokio::time::sleep;

const LONG: u64 = 60_000;

async fn pool(redis: &RedisServer) -> Pool {
    lockstep::engine::redis::connect(&redis.url())
        .await
        .expect("connect to the test redis")
}

fn under_test(pool: &Pool) -> LockStoreUnderTest {
    LockStoreUnderTest {
        store: Arc::new(RedisLockStore::new(pool.clone())),
        audit: Arc::new(RedisAuditSink::new(pool.clone())),
    }
}

fn waiting(mut req: AcquireRequest, timeout_ms: u64, request_id: u32) -> AcquireRequest {
    req.wait = Some(WaitSpec {
        timeout_ms,
        request_id: Some(request_id),
    });
    req
}

fn resource_of(t: &LockTransition) -> &Entity {
    match t {
        LockTransition::Released { lock, .. } => &lock.resource,
        LockTransition::WaitExpired { resource, .. } => resource,
    }
}

/// A resource name whose lock in `room` is in `shard`, unique.
fn in_shard(room: &Entity, shard: u32) -> Entity {
    loop {
        let e = unique("segment");
        if keys::shard_of(&LockKey::new(room.clone(), e.clone()).to_string()) == shard {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lock_store_conformance() {
    let redis = RedisServer::start();
    let pool = pool(&redis).await;
    conformance::lock_store_suite(|| {
        let pool = pool.clone();
        async move { under_test(&pool) }
    })
    .await;
}

/// Tokens keep growing after Redis restarts empty: they are seeded from its clock in µs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_an_empty_restart() {
    let mut redis = RedisServer::start();
    let store = RedisLockStore::new(pool(&redis).await);
    let room = unique("scene");
    let res = unique("segment");
    let first = grant(&store, request(&room, &res, &holder("a"), LONG)).await;
    assert_eq!(
        redis.cli(&["GET", &keys::fence(&first.key().to_string())]),
        first.token.to_string()
    );

    redis.kill();
    redis.restart();
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "restarted empty");

    // The pool reconnects (and the empty script cache is reloaded) on its own.
    let req = request(&room, &res, &holder("b"), LONG);
    let mut attempts = 0;
    let second = loop {
        match store.acquire(req.clone()).await {
            Ok(AcquireOutcome::Granted { lock, .. }) => break lock,
            Ok(other) => panic!("expected a grant on an empty redis, got {other:?}"),
            Err(e) => {
                attempts += 1;
                assert!(attempts < 50, "redis not back: {e}");
                sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(
        second.token > first.token,
        "token after an empty restart {} must exceed {}",
        second.token,
        first.token
    );
    assert!(second.token < 1 << 53);
}

/// After `SCRIPT FLUSH` the scripts are reloaded transparently; the lock and the hand-off to
/// its waiter go through; keys follow the documented layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noscript_is_survived_and_keys_follow_the_layout() {
    let redis = RedisServer::start();
    let store = RedisLockStore::new(pool(&redis).await);
    let room = unique("scene");
    let res = unique("segment");
    let (a, w) = (holder("a"), holder("w"));
    let la = grant(&store, request(&room, &res, &a, LONG)).await;
    // Keys are named by the lock key `room/resource`, and sharded by it.
    let key = LockKey::new(room.clone(), res.clone());
    let kstr = key.to_string();
    assert_eq!(kstr, format!("{room}/{res}"));
    let shard = keys::shard_of(&kstr);
    let r = kstr.as_str();

    // The layout of keys.rs, and the safety-net expiry of the lock hash (end + 30 s).
    assert_eq!(redis.cli(&["EXISTS", &keys::lock(r)]), "1");
    assert_eq!(
        redis.cli(&["HGET", &keys::lock(r), "session_id"]),
        a.session_id.as_ref()
    );
    assert_eq!(redis.cli(&["HGET", &keys::lock(r), "room"]), room.as_str());
    assert_eq!(
        redis.cli(&["HGET", &keys::lock(r), "resource"]),
        res.as_str()
    );
    assert_eq!(
        redis.cli(&["SISMEMBER", &keys::room_locks(shard, room.as_str()), r]),
        "1"
    );
    assert_eq!(
        redis.cli(&["SISMEMBER", &keys::session_locks(shard, &a.session_id), r]),
        "1"
    );
    assert_eq!(
        redis.cli(&["ZSCORE", &keys::due(shard), r]),
        la.expires_at.to_string()
    );
    let pttl: u64 = redis.cli(&["PTTL", &keys::lock(r)]).parse().unwrap();
    assert!(pttl > LONG && pttl <= LONG + 30_000, "pttl {pttl}");
    let fence_ttl: u64 = redis.cli(&["PTTL", &keys::fence(r)]).parse().unwrap();
    assert!(
        fence_ttl > 6 * 24 * 3600 * 1000 && fence_ttl <= 7 * 24 * 3600 * 1000,
        "the fence key expires after the default retention (7 days): {fence_ttl}"
    );

    match store
        .acquire(waiting(request(&room, &res, &w, LONG), LONG, 4))
        .await
        .unwrap()
    {
        AcquireOutcome::Held {
            queue_position: Some(1),
            ..
        } => {}
        other => panic!("expected to be queued, got {other:?}"),
    }
    assert_eq!(redis.cli(&["LLEN", &keys::queue(r)]), "1");
    assert_eq!(redis.cli(&["HLEN", &keys::waiters(r)]), "1");

    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");

    let t = store
        .release(&key, la.token, ReleaseReason::Released, None)
        .await
        .expect("release after SCRIPT FLUSH");
    let granted = match t {
        TokenOutcome::Done(LockTransition::Released {
            granted: Some(g), ..
        }) => g,
        other => panic!("expected a hand-off, got {other:?}"),
    };
    assert_eq!(granted.lock.holder, w);
    assert_eq!(granted.request_id, Some(4));
    assert!(granted.lock.token > la.token);
    assert_eq!(
        redis.cli(&["HGET", &keys::lock(r), "token"]),
        granted.lock.token.to_string()
    );
    assert_eq!(redis.cli(&["EXISTS", &keys::queue(r)]), "0");
    assert_eq!(
        redis.cli(&["SISMEMBER", &keys::session_locks(shard, &a.session_id), r]),
        "0"
    );
    assert_eq!(store.get(&key).await.unwrap(), Some(granted.lock));
}

/// Two nodes (two stores, two connection pools) on one Redis: 20 simultaneous acquires, one
/// grant, everybody else told that very holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_grant_once() {
    let redis = RedisServer::start();
    let nodes: [Arc<dyn LockStore>; 2] = [
        Arc::new(RedisLockStore::new(pool(&redis).await)),
        Arc::new(RedisLockStore::new(pool(&redis).await)),
    ];
    let room = unique("scene");
    let res = unique("segment");
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = nodes[i % 2].clone();
        let barrier = barrier.clone();
        let mut who = holder(&format!("u{i}"));
        who.node_id = format!("node-{}", i % 2).into();
        let req = request(&room, &res, &who, LONG);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.acquire(req).await
        }));
    }
    let mut winners = Vec::new();
    let mut held = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            AcquireOutcome::Granted { lock, reentrant } => {
                assert!(!reentrant);
                winners.push(lock);
            }
            AcquireOutcome::Held { current, .. } => held.push(current),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one grant");
    assert_eq!(held.len(), 19);
    assert!(
        held.iter().all(|c| *c == winners[0]),
        "Held names the winner"
    );
    for node in &nodes {
        assert_eq!(
            node.get(&winners[0].key()).await.unwrap(),
            Some(winners[0].clone())
        );
    }
}

/// Two nodes reaping at once: every transition is reported exactly once, by one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reapers_report_each_transition_once() {
    let redis = RedisServer::start();
    let (p1, p2) = (pool(&redis).await, pool(&redis).await);
    let n1 = RedisLockStore::new(p1);
    let n2 = RedisLockStore::new(p2);
    let room = unique("scene");
    let mut ours = HashSet::new();
    let mut handed_to = HashMap::new();
    for i in 0..40 {
        let res = unique("segment");
        ours.insert(res.clone());
        grant(&n1, request(&room, &res, &holder(&format!("h{i}")), 150)).await;
        if i % 4 == 0 {
            // Times out before the lock ends: reported as WaitExpired, never granted.
            n2.acquire(waiting(
                request(&room, &res, &holder("x"), LONG),
                50,
                i as u32,
            ))
            .await
            .unwrap();
        } else if i % 4 == 1 {
            // Still waiting when the lock expires: handed the lock by the reap.
            let w = holder("y");
            n2.acquire(waiting(request(&room, &res, &w, LONG), LONG, i as u32))
                .await
                .unwrap();
            handed_to.insert(res.clone(), w);
        }
    }
    sleep(Duration::from_millis(600)).await;

    let (a, b) = tokio::join!(n1.reap(0), n2.reap(0));
    let all: Vec<LockTransition> = a
        .unwrap()
        .into_iter()
        .chain(b.unwrap())
        .filter(|t| ours.contains(resource_of(t)))
        .collect();
    let mut released = HashMap::new();
    let mut expired_waits = HashSet::new();
    for t in all {
        match t {
            LockTransition::Released {
                lock,
                reason,
                granted,
            } => {
                assert_eq!(reason, ReleaseReason::Expired);
                assert!(
                    released.insert(lock.resource.clone(), granted).is_none(),
                    "{} reported twice",
                    lock.resource
                );
            }
            LockTransition::WaitExpired { resource, .. } => {
                assert!(
                    expired_waits.insert(resource.clone()),
                    "wait on {resource} reported twice"
                );
            }
        }
    }
    assert_eq!(released.len(), 40, "every lock expired once");
    assert_eq!(expired_waits.len(), 10, "every short wait expired once");
    for (res, granted) in &released {
        match handed_to.get(res) {
            Some(w) => {
                let g = granted.as_ref().expect("handed to the live waiter");
                assert_eq!(&g.lock.holder, w);
            }
            None => assert!(granted.is_none(), "{res}: nobody to hand to"),
        }
    }
    let (a, b) = tokio::join!(n1.reap(0), n2.reap(0));
    let again: Vec<_> = a
        .unwrap()
        .into_iter()
        .chain(b.unwrap())
        .filter(|t| ours.contains(resource_of(t)))
        .collect();
    assert!(again.is_empty(), "nothing reported twice: {again:?}");
}

/// `reap` decides by the Redis clock: its argument (a node's clock) changes nothing; and a
/// shard with more due resources than one script call handles is drained in one `reap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reap_uses_the_redis_clock_and_drains_a_backlog() {
    let redis = RedisServer::start();
    let store = RedisLockStore::new(pool(&redis).await);
    let room = unique("scene");
    // The live lock sits outside the backlog's shard, so that shard's index empties.
    let live = in_shard(&room, 6);
    let l = grant(&store, request(&room, &live, &holder("l"), LONG)).await;
    // A node whose clock is far ahead must not end a live lock.
    let ts = store.reap(u64::MAX).await.unwrap();
    assert!(ts.iter().all(|t| resource_of(t) != &live));
    assert_eq!(store.get(&l.key()).await.unwrap(), Some(l));

    let mut ours = HashSet::new();
    for i in 0..250 {
        let res = in_shard(&room, 5);
        grant(&store, request(&room, &res, &holder(&format!("b{i}")), 100)).await;
        ours.insert(res);
    }
    sleep(Duration::from_millis(400)).await;
    // A node whose clock is far behind still reaps.
    let ts = store.reap(0).await.unwrap();
    let reaped: HashSet<Entity> = ts
        .iter()
        .map(resource_of)
        .filter(|r| ours.contains(*r))
        .cloned()
        .collect();
    assert_eq!(reaped.len(), 250, "three batches of one shard in one reap");
    assert_eq!(redis.cli(&["ZCARD", &keys::due(5)]), "0");
}

/// `list_room` gathers a room's locks from every shard, sorted by resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_room_spans_shards() {
    let redis = RedisServer::start();
    let store = RedisLockStore::new(pool(&redis).await);
    let room = unique("scene");
    let other = unique("scene");
    let mut locks = Vec::new();
    for i in 0..keys::SHARDS {
        let res = in_shard(&room, i);
        locks.push(
            grant(
                &store,
                request(&room, &res, &holder(&format!("u{i}")), LONG),
            )
            .await,
        );
    }
    grant(
        &store,
        request(&other, &unique("segment"), &holder("o"), LONG),
    )
    .await;
    let shards: HashSet<u32> = locks
        .iter()
        .map(|l| keys::shard_of(&l.key().to_string()))
        .collect();
    assert_eq!(shards.len() as u32, keys::SHARDS);
    locks.sort_by(|a, b| a.resource.cmp(&b.resource));
    assert_eq!(store.list_room(&room).await.unwrap(), locks);

    let gone = locks.remove(3);
    store
        .release(&gone.key(), gone.token, ReleaseReason::Released, None)
        .await
        .unwrap();
    assert_eq!(store.list_room(&room).await.unwrap(), locks);
    assert_eq!(store.list_room(&other).await.unwrap().len(), 1);
}

/// Lock records in the streams carry exact tokens and instants; ids are stable across reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_are_exact_and_ids_stable() {
    let redis = RedisServer::start();
    let pool = pool(&redis).await;
    let store = RedisLockStore::new(pool.clone());
    let sink = RedisAuditSink::new(pool);
    let room = unique("scene");
    let res = unique("segment");
    let a = holder("a");
    let la = grant(&store, request(&room, &res, &a, LONG)).await;
    let extended = match store.extend(&la.key(), la.token, 2 * LONG).await.unwrap() {
        TokenOutcome::Done(l) => l,
        other => panic!("{other:?}"),
    };
    let q = AuditQuery {
        resource: Some(res.to_string()),
        ..AuditQuery::default()
    };
    let page = sink.query(&q).await.unwrap();
    let kinds: Vec<AuditKind> = page.records.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![AuditKind::LockExtended, AuditKind::LockAcquired]
    );
    let ext = &page.records[0];
    assert_eq!(ext.token, Some(la.token));
    assert_eq!(ext.detail["expires_at"], extended.expires_at);
    assert_eq!(ext.detail["ttl_ms"], 2 * LONG);
    assert_eq!(ext.node_id.as_ref(), "node-test");
    assert_eq!(page.records[1].at, la.since, "at is the grant's Redis time");
    assert!(page.records.iter().all(|r| r.id.get_version_num() == 8));

    // Raw stream entry: the token is an exact JSON number, `at` a number of ms, no id.
    let shard = keys::shard_of(&la.key().to_string());
    let raw = redis.cli(&["XRANGE", &keys::audit_stream(shard), "-", "+"]);
    assert!(
        raw.contains(&format!("\"token\":{}", la.token)),
        "exact token in {raw}"
    );
    assert!(raw.contains(&format!("\"at\":{}", la.since)), "{raw}");
    assert!(!raw.contains("e+") && !raw.contains("\"id\""), "{raw}");

    let again = sink.query(&q).await.unwrap();
    let ids = |p: &lockstep::audit::AuditPage| p.records.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(&page), ids(&again), "the same entry, the same id");
}

/// Node-level records go through `append` to a shard's stream and come back through `query`,
/// filtered, newest first, paginated with `before`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_sink_appends_and_queries_node_records() {
    let redis = RedisServer::start();
    let sink = RedisAuditSink::new(pool(&redis).await);
    let user = format!("user-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut sent = Vec::new();
    for i in 0..7u64 {
        let mut r = AuditRecord::new(
            if i % 2 == 0 {
                AuditKind::SessionOpened
            } else {
                AuditKind::SessionClosed
            },
            "node-a".into(),
        );
        r.at = 1_700_000_000_000 + i;
        r.user_id = Some(user.as_str().into());
        r.session_id = Some(format!("{user}-s{i}").into());
        r.detail = serde_json::json!({ "i": i });
        sent.push(r);
    }
    // Records without ids go to shard shard_of("").
    let anonymous = AuditRecord::new(AuditKind::AuthFailed, "node-a".into());
    sink.append(vec![anonymous]).await.unwrap();
    for r in &sent {
        sink.append(vec![r.clone()]).await.unwrap();
        // Records of different shards are ordered by stream time (ms), then sequence, then
        // shard: a millisecond apart, their order is the order they were appended.
        sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        redis.cli(&["XLEN", &keys::audit_stream(keys::shard_of(""))]),
        (1 + sent
            .iter()
            .filter(|r| keys::shard_of(r.session_id.as_deref().unwrap()) == keys::shard_of(""))
            .count())
        .to_string()
    );

    let all = sink
        .query(&AuditQuery {
            user_id: Some(user.clone()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(all.records.len(), 7);
    let details: Vec<u64> = all
        .records
        .iter()
        .map(|r| r.detail["i"].as_u64().unwrap())
        .collect();
    assert_eq!(details, vec![6, 5, 4, 3, 2, 1, 0], "newest first");
    assert!(all.records.windows(2).all(|w| w[0].id > w[1].id));
    for r in &all.records {
        let i = r.detail["i"].as_u64().unwrap() as usize;
        assert_eq!(
            AuditRecord {
                id: sent[i].id,
                ..r.clone()
            },
            sent[i]
        );
    }

    let closed = sink
        .query(&AuditQuery {
            user_id: Some(user.clone()),
            kind: Some("session_closed".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(closed.records.len(), 3);

    // Pages of 3 with the `before` cursor: every record once, in order.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = sink
            .query(&AuditQuery {
                user_id: Some(user.clone()),
                before,
                limit: Some(3),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        seen.extend(page.records.iter().map(|r| r.id));
        match page.next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, all.records.iter().map(|r| r.id).collect::<Vec<_>>());
}

/// With Redis gone, calls fail with `Unavailable` (no panic, no hang past the command timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable() {
    let mut redis = RedisServer::start();
    let store = RedisLockStore::new(pool(&redis).await);
    let key = LockKey::new(unique("scene"), unique("segment"));
    assert_eq!(store.get(&key).await.unwrap(), None);
    redis.kill();
    let started = std::time::Instant::now();
    let err = store.get(&key).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A query reads a stream past its first `XREVRANGE` batch to find older matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_query_reads_past_one_batch() {
    let redis = RedisServer::start();
    let sink = RedisAuditSink::new(pool(&redis).await);
    let session: Arc<str> = "one-session".into();
    let record = |kind| AuditRecord {
        session_id: Some(session.clone()),
        user_id: Some("u".into()),
        ..AuditRecord::new(kind, "node-a".into())
    };
    let mut batch = vec![record(AuditKind::Forbidden)];
    batch.extend((0..2_500).map(|_| record(AuditKind::SessionOpened)));
    sink.append(batch).await.unwrap();
    let stream = keys::audit_stream(keys::shard_of(&session));
    assert_eq!(redis.cli(&["XLEN", &stream]), "2501");
    let page = sink
        .query(&AuditQuery {
            kind: Some("forbidden".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1, "the oldest entry, 2500 entries back");
    let page = sink
        .query(&AuditQuery {
            user_id: Some("u".into()),
            limit: Some(1000),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1000);
    assert!(page.next.is_some());
}

/// Fence keys expire `fence_retention` after their last write, so counters of resources never
/// used again do not pile up; the next grant after the expiry still gets a larger token (tokens
/// are seeded from the Redis clock in µs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_keys_expire_after_the_retention_and_tokens_keep_increasing() {
    let redis = RedisServer::start();
    let store =
        RedisLockStore::new(pool(&redis).await).with_fence_retention(Duration::from_millis(1500));
    let room = unique("scene");
    let res = unique("segment");
    let first = grant(&store, request(&room, &res, &holder("a"), LONG)).await;
    let fence = keys::fence(&first.key().to_string());
    let pttl: i64 = redis.cli(&["PTTL", &fence]).parse().unwrap();
    assert!(pttl > 0 && pttl <= 1500, "{pttl}");
    store
        .release(&first.key(), first.token, ReleaseReason::Released, None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while redis.cli(&["EXISTS", &fence]) != "0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fence key never expired"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let second = grant(&store, request(&room, &res, &holder("b"), LONG)).await;
    assert!(
        second.token > first.token,
        "after the counter expired: {} > {}",
        second.token,
        first.token
    );
    // raise_fence writes the key with the same expiry.
    store
        .raise_fence(&second.key(), second.token + 10)
        .await
        .unwrap();
    let pttl: i64 = redis.cli(&["PTTL", &fence]).parse().unwrap();
    assert!(pttl > 0 && pttl <= 1500, "{pttl}");
}
