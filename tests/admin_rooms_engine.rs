//! `room_page` of the presence and lock stores (memory, Redis, Redis Cluster), driven
//! directly: with hundreds of rooms and small steps (so Redis' `ZSCAN` runs over
//! hashtable-encoded sets, many steps, and lock rooms span shards), a complete iteration lists
//! every room once with its count and ends; a cursor the store did not issue is refused.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::engine::{grant, holder, request};
use common::redis::RedisServer;
use lockstep::audit::jsonl::JsonlSink;
use lockstep::engine::memory::{MemoryLockStore, MemoryPresenceStore};
use lockstep::engine::redis::locks::RedisLockStore;
use lockstep::engine::redis::presence::RedisPresenceStore;
use lockstep::engine::{LockStore, Member, PresenceStore, RoomPage};
use lockstep::names::Entity;

const ROOMS: usize = 300;

fn room(i: usize) -> Entity {
    Entity::parse(&format!("scene:r{i:04}")).unwrap()
}

fn member(user: &str, session: &str) -> Member {
    Member {
        user_id: user.into(),
        session_id: session.into(),
        name: user.into(),
        avatar: None,
        color: "#123456".into(),
        role: lockstep::auth::Role::Editor,
        focus: None,
        state: None,
        since: 1,
    }
}

/// Walks a store's pages to the end: room → (times listed, count).
async fn walk<F, Fut>(step: F, count: usize) -> BTreeMap<String, (usize, usize)>
where
    F: Fn(String, usize) -> Fut,
    Fut: std::future::Future<Output = Option<RoomPage>>,
{
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut cursor = String::new();
    for steps in 0.. {
        assert!(steps < 10_000, "the iteration does not end");
        let page = step(cursor.clone(), count)
            .await
            .expect("a cursor the store issued");
        for (r, n) in page.rooms {
            let e = seen.entry(r.to_string()).or_default();
            e.0 += 1;
            e.1 = n;
        }
        match page.next {
            Some(n) => cursor = n,
            None => break,
        }
    }
    seen
}

/// Room i has (i % 3) members and (i % 5) locks: some rooms have neither, many have both.
async fn fill(presence: &dyn PresenceStore, locks: &dyn LockStore) {
    for i in 0..ROOMS {
        for m in 0..i % 3 {
            presence
                .join(&room(i), member(&format!("u{m}"), &format!("s{i}-{m}")))
                .await
                .unwrap();
        }
        for l in 0..i % 5 {
            let res = Entity::parse(&format!("segment:{i}-{l}")).unwrap();
            grant(locks, request(&room(i), &res, &holder("h"), 600_000)).await;
        }
    }
}

fn expected(div: usize) -> BTreeMap<String, (usize, usize)> {
    (0..ROOMS)
        .filter(|i| i % div > 0)
        .map(|i| (room(i).to_string(), (1, i % div)))
        .collect()
}

async fn check(presence: Arc<dyn PresenceStore>, locks: Arc<dyn LockStore>) {
    fill(&*presence, &*locks).await;
    for count in [1, 10, 1000] {
        let p = presence.clone();
        let got = walk(
            |c, n| {
                let p = p.clone();
                async move { p.room_page(&c, n).await.unwrap() }
            },
            count,
        )
        .await;
        assert_eq!(got, expected(3), "presence, count {count}");
        let l = locks.clone();
        let got = walk(
            |c, n| {
                let l = l.clone();
                async move { l.room_page(&c, n).await.unwrap() }
            },
            count,
        )
        .await;
        assert_eq!(got, expected(5), "locks, count {count}");
    }
    assert!(
        presence
            .room_page("not a cursor", 10)
            .await
            .unwrap()
            .is_none()
    );
    assert!(locks.room_page("99.0", 10).await.unwrap().is_none());
    assert!(locks.room_page("not a cursor", 10).await.unwrap().is_none());
}

#[tokio::test]
async fn memory_stores_page_every_room_once() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(JsonlSink::open(dir.path()).unwrap());
    check(
        Arc::new(MemoryPresenceStore::new()),
        Arc::new(MemoryLockStore::new(audit)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stores_page_every_room_once() {
    let redis = RedisServer::start();
    let pool = lockstep::engine::redis::connect(&redis.url())
        .await
        .unwrap();
    check(
        Arc::new(RedisPresenceStore::new(pool.clone(), 600_000)),
        Arc::new(RedisLockStore::new(pool)),
    )
    .await;
}

/// Redis Cluster: each index is one key (one slot), so the `ZSCAN` steps are routed to the
/// primary that owns it; no per-primary iteration is needed, and every room is still listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_stores_page_every_room_once() {
    let cluster = common::redis::RedisCluster::start();
    let pool = lockstep::engine::redis::connect(&cluster.url())
        .await
        .unwrap();
    check(
        Arc::new(RedisPresenceStore::new(pool.clone(), 600_000)),
        Arc::new(RedisLockStore::new(pool)),
    )
    .await;
}
