//! The Redis presence store and broker against a private `redis-server` per test: the
//! conformance suites, then what only Redis has (expiry and sweeps, several nodes on one
//! Redis, reconnects, sequence gaps, a lagging reader).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::RedisServer;
use fred::prelude::*;
use lockstep::auth::Role;
use lockstep::engine::conformance::{self, CollectingSink};
use lockstep::engine::redis::broker::{Envelope, RedisBroker, Resync};
use lockstep::engine::redis::presence::RedisPresenceStore;
use lockstep::engine::redis::{self as redis_engine, keys};
use lockstep::engine::{
    Broker, EventSink, Member, PresencePatch, PresenceStore, RoomEvent, RoomEventKind, SessionId,
};
use lockstep::names::Entity;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

/// Generous bound for things that must happen (never asserted to be fast).
const WAIT: Duration = Duration::from_secs(15);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(400);

fn unique(ty: &str) -> Entity {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Entity::parse(&format!("{ty}:t-{}", &id[..12])).unwrap()
}

fn session(user: &str) -> SessionId {
    format!("{user}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]).into()
}

fn member(session: &SessionId, since: u64, focus: Option<&Entity>) -> Member {
    Member {
        user_id: format!("user-{session}").into(),
        session_id: session.clone(),
        name: "Somebody".into(),
        avatar: None,
        color: "#112233".into(),
        role: Role::Editor,
        focus: focus.cloned(),
        state: Some(serde_json::json!({"tool": "trim", "empty": [], "big": 12345678901234u64})),
        since,
    }
}

fn event(room: &Entity, n: u64) -> Arc<RoomEvent> {
    Arc::new(RoomEvent {
        room: room.clone(),
        origin: Some("sender".into()),
        kind: RoomEventKind::Broadcast {
            event: "tick".into(),
            data: serde_json::json!({ "n": n }),
            user_id: "u".into(),
            session_id: "sender".into(),
            name: "U".into(),
        },
    })
}

fn n_of(e: &RoomEvent) -> u64 {
    match &e.kind {
        RoomEventKind::Broadcast { data, .. } => data["n"].as_u64().unwrap(),
        other => panic!("unexpected event {other:?}"),
    }
}

async fn store(r: &RedisServer, ttl_ms: u64) -> RedisPresenceStore {
    RedisPresenceStore::connect(&r.url(), ttl_ms).await.unwrap()
}

struct Node {
    broker: Arc<RedisBroker>,
    sink: Arc<CollectingSink>,
    resync: mpsc::Receiver<Resync>,
}

async fn node(r: &RedisServer, id: &str) -> Node {
    let sink = Arc::new(CollectingSink::new());
    let (tx, resync) = mpsc::channel(16);
    let broker = RedisBroker::start(&r.url(), id, sink.clone(), tx)
        .await
        .unwrap();
    Node {
        broker,
        sink,
        resync,
    }
}

/// The next resync request within `WAIT`.
async fn next_resync(n: &mut Node) -> Resync {
    timeout(WAIT, n.resync.recv())
        .await
        .expect("a resync request in time")
        .expect("resync channel open")
}

/// Publishes until Redis accepts it (the publisher's pool may still be reconnecting).
async fn publish_eventually(b: &RedisBroker, e: Arc<RoomEvent>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match b.publish(e.clone()).await {
            Ok(()) => return,
            Err(err) if Instant::now() < deadline => {
                eprintln!("publish not accepted yet: {err}");
                sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("publish never accepted: {err}"),
        }
    }
}

/// A raw client, to write to Redis behind the engines' backs.
async fn raw(r: &RedisServer) -> Client {
    let c = redis_engine::builder(&redis_engine::RedisTarget::from_url(&r.url()).unwrap())
        .unwrap()
        .build()
        .unwrap();
    c.init().await.unwrap();
    c
}

async fn raw_publish(c: &Client, room: &Entity, payload: Vec<u8>) {
    let _: i64 = c
        .publish(keys::room_channel(room.as_str()), payload)
        .await
        .unwrap();
}

fn envelope(node: &str, seq: u64, e: &RoomEvent) -> Vec<u8> {
    rmp_serde::to_vec_named(&Envelope {
        node: node.into(),
        seq,
        event: e.clone(),
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Conformance
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_presence_store_conformance() {
    let r = RedisServer::start();
    let url = r.url();
    conformance::presence_store_suite(|| {
        let url = url.clone();
        async move {
            Arc::new(RedisPresenceStore::connect(&url, 30_000).await.unwrap())
                as Arc<dyn PresenceStore>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conformance() {
    let r = RedisServer::start();
    let url = r.url();
    conformance::broker_suite(|sink: Arc<dyn EventSink>| {
        let url = url.clone();
        async move {
            let (tx, _rx) = mpsc::channel(16);
            RedisBroker::start(&url, "node-conformance", sink, tx)
                .await
                .unwrap() as Arc<dyn Broker>
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Presence: expiry, refresh, sweep
// ---------------------------------------------------------------------------------------------

/// Expired members disappear from reads at once; concurrent sweeps by two nodes return each
/// of them exactly once and leave no keys behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_members_are_swept_exactly_once_across_nodes() {
    let r = RedisServer::start();
    let (a, b) = (
        Arc::new(store(&r, 300).await),
        Arc::new(store(&r, 300).await),
    );
    let focus = unique("segment");
    let rooms: Vec<Entity> = (0..6).map(|_| unique("scene")).collect();
    let mut joined: HashSet<(Entity, SessionId)> = HashSet::new();
    for (i, room) in rooms.iter().enumerate() {
        for j in 0..5 {
            let s = session(&format!("m{i}{j}"));
            let f = (j % 2 == 0).then_some(&focus);
            let writer = if j % 2 == 0 { &a } else { &b };
            writer
                .join(room, member(&s, 1000 + j as u64, f))
                .await
                .unwrap();
            joined.insert((room.clone(), s));
        }
    }
    assert_eq!(a.members(&rooms[0]).await.unwrap().len(), 5);
    assert_eq!(b.presence_of(&focus).await.unwrap().len(), 18);

    sleep(Duration::from_millis(700)).await;
    // Expired: hidden from reads before any sweep.
    for room in &rooms {
        assert!(
            a.members(room).await.unwrap().is_empty(),
            "expired members hidden"
        );
    }
    assert!(a.presence_of(&focus).await.unwrap().is_empty());

    // Both nodes sweep at once, in small budgets, until neither finds anything.
    let sweeper = |s: Arc<RedisPresenceStore>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut idle = 0;
            while idle < 3 {
                let batch = s.sweep(4).await.unwrap();
                assert!(batch.len() <= 4, "sweep respects its budget");
                if batch.is_empty() {
                    idle += 1;
                    sleep(Duration::from_millis(20)).await;
                } else {
                    idle = 0;
                    got.extend(batch);
                }
            }
            got
        })
    };
    let (ta, tb) = (sweeper(a.clone()), sweeper(b.clone()));
    let (got_a, got_b) = (ta.await.unwrap(), tb.await.unwrap());
    let late_a = a.sweep(1000).await.unwrap();
    let late_b = b.sweep(1000).await.unwrap();
    let all: Vec<(Entity, SessionId)> = got_a
        .iter()
        .chain(&got_b)
        .chain(&late_a)
        .chain(&late_b)
        .map(|(room, m)| (room.clone(), m.session_id.clone()))
        .collect();
    let unique_swept: HashSet<(Entity, SessionId)> = all.iter().cloned().collect();
    assert_eq!(
        all.len(),
        unique_swept.len(),
        "nobody returned twice: {all:?}"
    );
    assert_eq!(unique_swept, joined, "everybody returned");
    // The member data comes back whole (for the presence.leave announcement).
    let (_, m) = got_a
        .iter()
        .chain(&got_b)
        .chain(&late_a)
        .chain(&late_b)
        .next()
        .unwrap();
    assert_eq!(m.state.as_ref().unwrap()["big"], 12345678901234u64);

    // Nothing left: members, expiry, focus index, room schedule.
    assert_eq!(a.sweep(1000).await.unwrap(), vec![]);
    assert_eq!(r.cli(&["ZCARD", &keys::presence_rooms()]), "0");
    assert_eq!(r.cli(&["EXISTS", &keys::focus(focus.as_str())]), "0");
    for room in &rooms {
        assert_eq!(r.cli(&["EXISTS", &keys::members(room.as_str())]), "0");
        assert_eq!(r.cli(&["EXISTS", &keys::member_expiry(room.as_str())]), "0");
    }
}

/// `refresh` keeps a member past its ttl; once refreshes stop it expires and is swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_a_member_alive() {
    let r = RedisServer::start();
    let s = store(&r, 400).await;
    let (room, focus) = (unique("scene"), unique("segment"));
    let (kept, dropped) = (session("kept"), session("dropped"));
    s.join(&room, member(&kept, 1, Some(&focus))).await.unwrap();
    s.join(&room, member(&dropped, 2, None)).await.unwrap();

    let start = Instant::now();
    let mut swept = Vec::new();
    while start.elapsed() < Duration::from_millis(1_500) {
        s.refresh(&[(room.clone(), kept.clone())], 400)
            .await
            .unwrap();
        swept.extend(s.sweep(100).await.unwrap());
        sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<&SessionId> = swept.iter().map(|(_, m)| &m.session_id).collect();
    assert_eq!(ids, vec![&dropped], "only the unrefreshed member expired");
    let members = s.members(&room).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].session_id, kept);
    assert_eq!(
        s.presence_of(&focus).await.unwrap().len(),
        1,
        "focus survives too"
    );
    // The focus-index entry was renewed with the member's entry.
    let field = format!("{room} {kept}");
    let focus_expiry = r.cli(&["HGET", &keys::focus(focus.as_str()), &field]);
    let member_expiry = r.cli(&["ZSCORE", &keys::member_expiry(room.as_str()), &kept]);
    assert_eq!(focus_expiry, member_expiry);

    // Refreshing a session that is gone does not bring it back.
    s.refresh(&[(room.clone(), dropped.clone())], 400)
        .await
        .unwrap();
    assert_eq!(s.members(&room).await.unwrap().len(), 1);

    // Stop refreshing: it expires and is swept once.
    sleep(Duration::from_millis(900)).await;
    assert!(s.members(&room).await.unwrap().is_empty());
    assert!(s.presence_of(&focus).await.unwrap().is_empty());
    let mut swept = Vec::new();
    let deadline = Instant::now() + WAIT;
    while swept.is_empty() && Instant::now() < deadline {
        swept = s.sweep(100).await.unwrap();
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].0, room);
    assert_eq!(swept[0].1.session_id, kept);
    assert_eq!(s.sweep(100).await.unwrap(), vec![]);
}

/// A `leave` and a sweep of the same expired member: exactly one of them gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_and_sweep_never_both_return_a_member() {
    let r = RedisServer::start();
    let s = store(&r, 200).await;
    let room = unique("scene");
    let ids: Vec<SessionId> = (0..20).map(|i| session(&format!("x{i}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        s.join(&room, member(id, i as u64, None)).await.unwrap();
    }
    sleep(Duration::from_millis(500)).await;
    let s = Arc::new(s);
    let leaver = {
        let (s, room, ids) = (s.clone(), room.clone(), ids.clone());
        tokio::spawn(async move {
            let mut left = Vec::new();
            for id in ids {
                if let Some(m) = s.leave(&room, &id).await.unwrap() {
                    left.push(m.session_id);
                }
            }
            left
        })
    };
    let mut swept: Vec<SessionId> = Vec::new();
    for _ in 0..10 {
        swept.extend(
            s.sweep(2)
                .await
                .unwrap()
                .into_iter()
                .map(|(_, m)| m.session_id),
        );
    }
    let left = leaver.await.unwrap();
    let mut all: Vec<SessionId> = left.iter().chain(&swept).cloned().collect();
    all.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(all, want, "each member returned once, by leave or by sweep");
}

/// An update renews the entry (the session is alive) and keeps the JSON as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_renews_and_keeps_json_exact() {
    let r = RedisServer::start();
    let s = store(&r, 400).await;
    let (room, f1, f2) = (unique("scene"), unique("segment"), unique("segment"));
    let id = session("u");
    s.join(&room, member(&id, 7, Some(&f1))).await.unwrap();
    for i in 0..6 {
        sleep(Duration::from_millis(150)).await;
        let focus = if i % 2 == 0 { &f2 } else { &f1 };
        let patch = PresencePatch {
            focus: Some(Some(focus.clone())),
            state: Some(Some(serde_json::json!({"i": i, "list": [], "obj": {}}))),
        };
        let m = s.update(&room, &id, patch).await.unwrap().unwrap();
        assert_eq!(
            m.state,
            Some(serde_json::json!({"i": i, "list": [], "obj": {}}))
        );
    }
    // 900 ms after the join, with a 400 ms ttl: alive thanks to the updates.
    let members = s.members(&room).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].focus.as_ref(), Some(&f1));
    assert_eq!(s.presence_of(&f1).await.unwrap().len(), 1);
    assert!(s.presence_of(&f2).await.unwrap().is_empty());
    assert_eq!(s.sweep(100).await.unwrap(), vec![]);
}

/// Concurrent updates of one member all apply (compare-and-set retries), none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_of_one_member_all_apply() {
    let r = RedisServer::start();
    let s = Arc::new(store(&r, 30_000).await);
    let room = unique("scene");
    let id = session("u");
    s.join(&room, member(&id, 1, None)).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (s, room, id) = (s.clone(), room.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let focus = Entity::parse(&format!("segment:t{t}-{i}")).unwrap();
                let patch = PresencePatch {
                    focus: Some(Some(focus)),
                    state: None,
                };
                s.update(&room, &id, patch).await.unwrap().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = s.members(&room).await.unwrap().remove(0);
    let last = m.focus.unwrap();
    assert!(
        last.as_str().ends_with("-9"),
        "the last write of some task: {last}"
    );
    // Only the current focus lists the member.
    for t in 0..4 {
        for i in 0..10 {
            let f = Entity::parse(&format!("segment:t{t}-{i}")).unwrap();
            let n = s.presence_of(&f).await.unwrap().len();
            assert_eq!(n, usize::from(f == last), "{f}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Broker: several nodes on one Redis
// ---------------------------------------------------------------------------------------------

/// B receives A's events exactly while B subscribes to the room; A, not subscribed, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_follows_subscription() {
    let r = RedisServer::start();
    let (a, mut b) = (node(&r, "node-a").await, node(&r, "node-b").await);
    let room = unique("scene");
    b.broker.subscribe(&room).await.unwrap();
    assert_eq!(b.broker.subscribed(), vec![room.clone()]);

    a.broker.publish(event(&room, 1)).await.unwrap();
    let got = b.sink.wait_for(&room, 1, WAIT).await;
    assert_eq!(got, vec![event(&room, 1)]);

    b.broker.unsubscribe(&room).await.unwrap();
    a.broker.publish(event(&room, 2)).await.unwrap();
    sleep(QUIET).await;
    assert_eq!(b.sink.events().len(), 1, "nothing after unsubscribe");

    b.broker.subscribe(&room).await.unwrap();
    a.broker.publish(event(&room, 3)).await.unwrap();
    let got = b.sink.wait_for(&room, 2, WAIT).await;
    assert_eq!(got, vec![event(&room, 1), event(&room, 3)]);
    assert!(a.sink.events().is_empty(), "A never subscribed");
    // Resubscribing after a pause in A's sequence is not a gap.
    assert!(b.resync.try_recv().is_err(), "no resync requested");
    assert_eq!(b.broker.gaps(), 0);
}

/// A subscription is in effect when `subscribe` returns: an event published right after it
/// from another node is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_live_when_subscribe_returns() {
    let r = RedisServer::start();
    let (a, b) = (node(&r, "node-a").await, node(&r, "node-b").await);
    let rooms: Vec<Entity> = (0..300).map(|_| unique("scene")).collect();
    for (i, room) in rooms.iter().enumerate() {
        b.broker.subscribe(room).await.unwrap();
        a.broker.publish(event(room, i as u64)).await.unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while b.sink.events().len() < rooms.len() && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        b.sink.events().len(),
        rooms.len(),
        "every first event arrived"
    );
    for room in &rooms {
        b.broker.unsubscribe(room).await.unwrap();
    }
    assert!(b.broker.subscribed().is_empty());
    assert_eq!(
        r.cli(&["PUBSUB", "NUMSUB", &keys::room_channel(rooms[0].as_str())])
            .lines()
            .last(),
        Some("0")
    );
}

/// One publisher's events arrive in publish order, also when its tasks publish concurrently
/// (each task's own order), and the numbering never shows a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publishers_order_is_preserved() {
    let r = RedisServer::start();
    let (a, mut b) = (node(&r, "node-a").await, node(&r, "node-b").await);
    let room = unique("scene");
    b.broker.subscribe(&room).await.unwrap();
    for n in 0..300 {
        a.broker.publish(event(&room, n)).await.unwrap();
    }
    let got = b.sink.wait_for(&room, 300, WAIT).await;
    let ns: Vec<u64> = got.iter().map(|e| n_of(e)).collect();
    assert_eq!(ns, (0..300).collect::<Vec<u64>>());

    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let broker = a.broker.clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                broker
                    .publish(event(&room, 1_000 * (t + 1) + i))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = b.sink.wait_for(&room, 1_300, WAIT).await;
    assert_eq!(got.len(), 1_300);
    for t in 0..4u64 {
        let mine: Vec<u64> = got[300..]
            .iter()
            .map(|e| n_of(e))
            .filter(|n| n / 1_000 == t + 1)
            .collect();
        assert_eq!(
            mine,
            (0..250).map(|i| 1_000 * (t + 1) + i).collect::<Vec<_>>()
        );
    }
    assert_eq!(b.broker.gaps(), 0);
    assert!(b.resync.try_recv().is_err(), "no resync requested");
}

/// The subscriber connection is killed: it reconnects, resubscribes, asks for a full resync,
/// and delivery resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscriber_reconnects_and_resyncs() {
    let r = RedisServer::start();
    let (a, mut b) = (node(&r, "node-a").await, node(&r, "node-b").await);
    let (room, other) = (unique("scene"), unique("scene"));
    b.broker.subscribe(&room).await.unwrap();
    b.broker.subscribe(&other).await.unwrap();
    a.broker.publish(event(&room, 1)).await.unwrap();
    b.sink.wait_for(&room, 1, WAIT).await;

    let killed = r.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed, "1", "B's subscriber connection was killed");
    assert_eq!(next_resync(&mut b).await, Resync::All);
    assert!(b.broker.reconnects() >= 1);

    // Resubscribed before the resync was requested: the next event arrives.
    a.broker.publish(event(&room, 2)).await.unwrap();
    a.broker.publish(event(&other, 3)).await.unwrap();
    assert_eq!(b.sink.wait_for(&room, 2, WAIT).await.len(), 2);
    assert_eq!(b.sink.wait_for(&other, 1, WAIT).await.len(), 1);
    // The sequence restarted from the reset state: no gap reported on top of the resync.
    assert_eq!(b.broker.gaps(), 0);
}

/// Redis is killed and restarted empty: the subscriber reconnects, resubscribes, asks for a
/// full resync, and delivery resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_reconnects_and_resyncs() {
    let mut r = RedisServer::start();
    let (a, mut b) = (node(&r, "node-a").await, node(&r, "node-b").await);
    let room = unique("scene");
    b.broker.subscribe(&room).await.unwrap();
    a.broker.publish(event(&room, 1)).await.unwrap();
    b.sink.wait_for(&room, 1, WAIT).await;

    r.kill();
    sleep(Duration::from_millis(300)).await;
    r.restart();
    // A reconnect of the subscriber means a full resync (more than one if fred needed several
    // attempts; all of them All).
    assert_eq!(next_resync(&mut b).await, Resync::All);
    publish_eventually(&a.broker, event(&room, 2)).await;
    let got = b.sink.wait_for(&room, 2, WAIT).await;
    assert_eq!(got.last(), Some(&event(&room, 2)));
    while let Ok(x) = b.resync.try_recv() {
        assert_eq!(x, Resync::All);
    }
}

/// A jump in an origin's sequence asks for a resync of that room; `seq` 1 (a restarted origin)
/// does not; the events are delivered either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_gap_resyncs_the_room() {
    let r = RedisServer::start();
    let mut b = node(&r, "node-b").await;
    let c = raw(&r).await;
    let (room, other) = (unique("scene"), unique("scene"));
    b.broker.subscribe(&room).await.unwrap();
    b.broker.subscribe(&other).await.unwrap();

    raw_publish(&c, &room, envelope("forger", 41, &event(&room, 1))).await; // first: accepted
    raw_publish(&c, &room, envelope("forger", 42, &event(&room, 2))).await;
    raw_publish(&c, &other, envelope("forger", 7, &event(&other, 3))).await; // own sequence
    raw_publish(&c, &room, envelope("forger", 1, &event(&room, 4))).await; // restart
    raw_publish(&c, &room, envelope("forger", 2, &event(&room, 5))).await;
    raw_publish(&c, &room, envelope("other-node", 9, &event(&room, 6))).await;
    b.sink.wait_for(&room, 5, WAIT).await;
    assert!(b.resync.try_recv().is_err(), "no gap yet");

    raw_publish(&c, &room, envelope("forger", 5, &event(&room, 7))).await; // 3 and 4 lost
    assert_eq!(next_resync(&mut b).await, Resync::Room(room.clone()));
    let got = b.sink.wait_for(&room, 6, WAIT).await;
    let ns: Vec<u64> = got.iter().map(|e| n_of(e)).collect();
    assert_eq!(ns, vec![1, 2, 4, 5, 6, 7], "delivered despite the gap");
    assert_eq!(b.broker.gaps(), 1);
    assert_eq!(b.broker.undecodable(), 0);
}

/// Garbage and misrouted messages are counted and dropped; delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_counted_not_fatal() {
    let r = RedisServer::start();
    let b = node(&r, "node-b").await;
    let c = raw(&r).await;
    let (room, other) = (unique("scene"), unique("scene"));
    b.broker.subscribe(&room).await.unwrap();
    raw_publish(&c, &room, vec![0xc1, 0xff, 0x00]).await;
    raw_publish(&c, &room, b"{\"json\": true}".to_vec()).await;
    // A well-formed envelope of another room on this room's channel.
    raw_publish(&c, &room, envelope("forger", 1, &event(&other, 1))).await;
    raw_publish(&c, &room, envelope("forger", 1, &event(&room, 2))).await;
    let got = b.sink.wait_for(&room, 1, WAIT).await;
    assert_eq!(got, vec![event(&room, 2)]);
    assert_eq!(b.broker.undecodable(), 3);
    assert!(b.sink.events().iter().all(|e| e.room == room));
}

/// A sink that blocks its first delivery until released (to make the reader lag).
struct GatedSink {
    inner: CollectingSink,
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl EventSink for GatedSink {
    fn deliver(&self, event: Arc<RoomEvent>) {
        let gate = self.gate.lock().unwrap().take();
        if let Some(gate) = gate {
            // A sink must not block; this one does on purpose, handing its worker's other
            // tasks to another thread first so only the reader is stuck.
            tokio::task::block_in_place(|| {
                let _ = gate.recv_timeout(Duration::from_secs(60));
            });
        }
        self.inner.deliver(event);
    }
}

/// A reader that falls behind fred's broadcast channel counts what it lost and asks for a
/// full resync; delivery continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_reader_counts_drops_and_resyncs_all() {
    let r = RedisServer::start();
    let a = node(&r, "node-a").await;
    let (open, gate) = std::sync::mpsc::channel();
    let sink = Arc::new(GatedSink {
        inner: CollectingSink::new(),
        gate: Mutex::new(Some(gate)),
    });
    let (tx, mut resync) = mpsc::channel(4);
    let b = RedisBroker::start(&r.url(), "node-b", sink.clone(), tx)
        .await
        .unwrap();
    let room = unique("scene");
    b.subscribe(&room).await.unwrap();

    let total = redis_engine::EVENT_CAPACITY as u64 + 4_000;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (broker, room) = (a.broker.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..total).step_by(8) {
                broker.publish(event(&room, i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Let B's connection take in everything while its reader is stuck, then release it.
    sleep(Duration::from_secs(2)).await;
    open.send(()).unwrap();

    let got = timeout(WAIT, resync.recv()).await.expect("resync").unwrap();
    assert_eq!(got, Resync::All);
    assert!(b.dropped() > 0, "lost messages are counted");
    let after = Instant::now() + WAIT;
    while (sink.inner.events().len() as u64) + b.dropped() < total && Instant::now() < after {
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sink.inner.events().len() as u64 + b.dropped(),
        total,
        "every message was either delivered or counted as dropped"
    );
    // And the stream goes on.
    a.broker.publish(event(&room, 999_999)).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !sink.inner.events().iter().any(|e| n_of(e) == 999_999) {
        assert!(Instant::now() < deadline, "delivery resumed");
        sleep(Duration::from_millis(20)).await;
    }
}

/// A full resync channel never blocks the reader, and a pending `Room` resync does not
/// swallow a later `All`: it is handed over once the node drains the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_resync_channel_defers_instead_of_dropping() {
    let r = RedisServer::start();
    let sink = Arc::new(CollectingSink::new());
    let (tx, mut resync) = mpsc::channel(1);
    let b = RedisBroker::start(&r.url(), "node-b", sink.clone(), tx)
        .await
        .unwrap();
    let c = raw(&r).await;
    let (x, y) = (unique("scene"), unique("scene"));
    b.subscribe(&x).await.unwrap();
    b.subscribe(&y).await.unwrap();
    // Two gaps: the first fills the channel, the second is owed.
    for room in [&x, &y] {
        raw_publish(&c, room, envelope("f", 10, &event(room, 1))).await;
        raw_publish(&c, room, envelope("f", 20, &event(room, 2))).await;
    }
    sink.wait_for(&y, 2, WAIT).await;
    // Then a reconnect: All is owed too and covers y.
    assert_eq!(r.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]), "1");
    let deadline = Instant::now() + WAIT;
    while b.reconnects() == 0 {
        assert!(Instant::now() < deadline, "reconnect seen");
        sleep(Duration::from_millis(20)).await;
    }
    sleep(Duration::from_millis(300)).await;
    // Delivery went on meanwhile.
    raw_publish(&c, &x, envelope("f", 1, &event(&x, 3))).await;
    sink.wait_for(&x, 3, WAIT).await;

    let first = timeout(WAIT, resync.recv()).await.unwrap().unwrap();
    assert_eq!(first, Resync::Room(x.clone()));
    let second = timeout(WAIT, resync.recv()).await.unwrap().unwrap();
    assert_eq!(second, Resync::All, "the owed All is delivered, covering y");
    sleep(QUIET).await;
    assert!(resync.try_recv().is_err(), "nothing else owed");
}

/// The Redis store and the default methods of the trait: the memory store keeps no expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_defaults_are_no_ops() {
    let s = lockstep::engine::memory::MemoryPresenceStore::new();
    let room = unique("scene");
    let id = session("m");
    s.join(&room, member(&id, 1, None)).await.unwrap();
    s.refresh(&[(room.clone(), id.clone())], 1).await.unwrap();
    assert_eq!(s.sweep(10).await.unwrap(), vec![]);
    assert_eq!(s.members(&room).await.unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster: sharded pub/sub, scripts confined to one slot, keys of other slots separate
// ---------------------------------------------------------------------------------------------

/// A three-primary Redis Cluster of private `redis-server`s (no replicas, no persistence).
struct ClusterServer {
    nodes: Vec<std::process::Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl ClusterServer {
    fn start() -> ClusterServer {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let mut nodes = Vec::new();
        for port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir).unwrap();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            nodes.push(child);
        }
        let cluster = ClusterServer {
            nodes,
            ports,
            _dir: dir,
        };
        for port in &cluster.ports {
            cluster.wait(*port, |out| out == "PONG", &["PING"]);
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let status = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create");
        for port in &cluster.ports {
            cluster.wait(
                *port,
                |out| out.contains("cluster_state:ok"),
                &["CLUSTER", "INFO"],
            );
        }
        cluster
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn wait(&self, port: u16, ok: impl Fn(&str) -> bool, args: &[&str]) {
        for _ in 0..400 {
            if ok(&self.cli(port, args)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("cluster node {port} not ready for {args:?}");
    }

    fn url(&self) -> String {
        let others: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            self.ports[0],
            others.join("&")
        )
    }
}

impl Drop for ClusterServer {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn cluster_node(url: &str, id: &str) -> Node {
    let sink = Arc::new(CollectingSink::new());
    let (tx, resync) = mpsc::channel(16);
    let broker = RedisBroker::start(url, id, sink.clone(), tx).await.unwrap();
    Node {
        broker,
        sink,
        resync,
    }
}

/// Both suites, sweeps across nodes, and sharded pub/sub with reconnects, on a Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_presence_and_broker() {
    let cluster = ClusterServer::start();
    let url = cluster.url();

    conformance::presence_store_suite(|| {
        let url = url.clone();
        async move {
            Arc::new(RedisPresenceStore::connect(&url, 30_000).await.unwrap())
                as Arc<dyn PresenceStore>
        }
    })
    .await;
    conformance::broker_suite(|sink: Arc<dyn EventSink>| {
        let url = url.clone();
        async move {
            let (tx, _rx) = mpsc::channel(16);
            RedisBroker::start(&url, "node-conformance", sink, tx)
                .await
                .unwrap() as Arc<dyn Broker>
        }
    })
    .await;

    // Expiry and a sweep over rooms spread across the shards.
    let s = RedisPresenceStore::connect(&url, 300).await.unwrap();
    let focus = unique("segment");
    let rooms: Vec<Entity> = (0..8).map(|_| unique("scene")).collect();
    for room in &rooms {
        s.join(room, member(&session("c"), 1, Some(&focus)))
            .await
            .unwrap();
    }
    assert_eq!(s.presence_of(&focus).await.unwrap().len(), rooms.len());
    sleep(Duration::from_millis(600)).await;
    let swept = s.sweep(100).await.unwrap();
    let swept_rooms: HashSet<Entity> = swept.into_iter().map(|(r, _)| r).collect();
    assert_eq!(swept_rooms, rooms.iter().cloned().collect());
    assert!(s.presence_of(&focus).await.unwrap().is_empty());

    // Sharded pub/sub between two nodes, through a kill of every subscriber connection.
    let (a, mut b) = (
        cluster_node(&url, "node-a").await,
        cluster_node(&url, "node-b").await,
    );
    let rooms: Vec<Entity> = (0..8).map(|_| unique("scene")).collect();
    for room in &rooms {
        b.broker.subscribe(room).await.unwrap();
    }
    for (i, room) in rooms.iter().enumerate() {
        a.broker.publish(event(room, i as u64)).await.unwrap();
    }
    for room in &rooms {
        assert_eq!(b.sink.wait_for(room, 1, WAIT).await.len(), 1);
    }
    // Sharded channels only, spread over the shards.
    let mut shard_channels = 0;
    for p in &cluster.ports {
        assert_eq!(
            cluster.cli(*p, &["PUBSUB", "CHANNELS"]),
            "",
            "no classic pub/sub"
        );
        shard_channels += cluster
            .cli(*p, &["PUBSUB", "SHARDCHANNELS"])
            .lines()
            .filter(|l| !l.is_empty())
            .count();
    }
    assert!(
        shard_channels >= rooms.len(),
        "{shard_channels} shard channels"
    );
    let killed: u32 = cluster
        .ports
        .iter()
        .map(|p| {
            cluster
                .cli(*p, &["CLIENT", "KILL", "TYPE", "pubsub"])
                .parse::<u32>()
                .unwrap_or(0)
        })
        .sum();
    assert!(
        killed >= 1,
        "B's sharded subscriber connections were killed"
    );
    assert_eq!(next_resync(&mut b).await, Resync::All);
    // Further reconnect events (one per shard connection) may follow; all of them All.
    sleep(Duration::from_millis(500)).await;
    while let Ok(x) = b.resync.try_recv() {
        assert_eq!(x, Resync::All);
    }
    for (i, room) in rooms.iter().enumerate() {
        publish_eventually(&a.broker, event(room, 100 + i as u64)).await;
    }
    for room in &rooms {
        assert_eq!(b.sink.wait_for(room, 2, WAIT).await.len(), 2, "{room}");
    }
    assert_eq!(b.broker.gaps(), 0);
}

/// The members cap holds across nodes: stores of two nodes on one Redis join 12 sessions at
/// once into a room capped at 5; exactly 5 get in, the rest get `RoomFull` and leave no trace.
/// A member rejoining a full room is not refused, members whose entries expired do not count,
/// and a leave makes room.
#[tokio::test]
async fn members_cap_is_atomic_across_nodes() {
    let r = RedisServer::start();
    let a = Arc::new(store(&r, 30_000).await.with_max_members(5));
    let b = Arc::new(store(&r, 30_000).await.with_max_members(5));
    let room = unique("scene");
    let joins = (0..12).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let room = room.clone();
        tokio::spawn(async move {
            let sess = session(&format!("u{i}"));
            let r = s.join(&room, member(&sess, i, None)).await;
            (sess, r)
        })
    });
    let mut admitted = Vec::new();
    for j in joins {
        let (sess, r) = j.await.unwrap();
        match r {
            Ok(_) => admitted.push(sess),
            Err(lockstep::engine::EngineError::RoomFull(5)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(admitted.len(), 5);
    assert_eq!(a.members(&room).await.unwrap().len(), 5);
    a.join(&room, member(&admitted[0], 0, None))
        .await
        .expect("a member may rejoin a full room");
    let late = session("late");
    assert!(b.join(&room, member(&late, 99, None)).await.is_err());
    b.leave(&room, &admitted[1]).await.unwrap();
    b.join(&room, member(&late, 99, None))
        .await
        .expect("a leave makes room");

    // Expired (not yet swept) entries do not hold seats.
    let short = Arc::new(store(&r, 300).await.with_max_members(1));
    let room2 = unique("scene");
    short
        .join(&room2, member(&session("x"), 1, None))
        .await
        .unwrap();
    sleep(Duration::from_millis(600)).await;
    short
        .join(&room2, member(&session("y"), 2, None))
        .await
        .expect("an expired member frees its seat");
}
