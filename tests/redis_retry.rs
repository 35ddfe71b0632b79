//! Lock scripts are safe to re-send: a TCP proxy between the Redis lock store and a private
//! `redis-server` forwards one script call to Redis, then cuts the client's connection before
//! the reply comes back. fred reconnects and sends the same call again; the script must answer
//! the re-send with the first run's reply and change nothing a second time
//! (`src/engine/redis/script.rs`).

mod common;

use std::time::{Duration, Instant};

use common::engine::{grant, holder, request, unique};
use common::proxy::RedisProxy;
use common::redis::RedisServer;
use lockstep::audit::{AuditQuery, AuditSink};
use lockstep::engine::redis::audit::RedisAuditSink;
use lockstep::engine::redis::keys;
use lockstep::engine::redis::locks::RedisLockStore;
use lockstep::engine::{
    AcquireOutcome, Holder, LockInfo, LockKey, LockStore, LockTransition, ReleaseReason,
    TokenOutcome, WaitSpec,
};
use lockstep::names::Entity;

struct Setup {
    redis: RedisServer,
    proxy: RedisProxy,
    store: RedisLockStore,
    /// Reads the audit outbox directly, not through the proxy.
    audit: RedisAuditSink,
}

async fn setup() -> Setup {
    let redis = RedisServer::start();
    let proxy = RedisProxy::start(redis.port).await;
    let pool = lockstep::engine::redis::connect(&proxy.url())
        .await
        .expect("connect through the proxy");
    let direct = lockstep::engine::redis::connect(&redis.url())
        .await
        .expect("connect to redis");
    Setup {
        redis,
        proxy,
        store: RedisLockStore::new(pool),
        audit: RedisAuditSink::new(direct),
    }
}

/// The kinds of the audit records of `resource`, oldest first.
async fn audit_kinds(audit: &RedisAuditSink, resource: &Entity) -> Vec<String> {
    let page = audit
        .query(&AuditQuery {
            resource: Some(resource.to_string()),
            limit: Some(1000),
            ..AuditQuery::default()
        })
        .await
        .expect("audit query");
    let mut kinds: Vec<String> = page
        .records
        .iter()
        .map(|r| r.kind.as_str().to_owned())
        .collect();
    kinds.reverse();
    kinds
}

/// A release whose reply is lost still succeeds, and its hand-off to the queued waiter is
/// returned (so announced) exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_resent_after_a_lost_reply_succeeds_once_with_its_hand_off() {
    let s = setup().await;
    let (room, res) = (unique("scene"), unique("segment"));
    let (a, b) = (holder("a"), holder("b"));
    // Loads the script cache, so the cut call is the first send of the release under test.
    let other = unique("segment");
    let warm = grant(&s.store, request(&room, &other, &a, 60_000)).await;
    s.store
        .release(&warm.key(), warm.token, ReleaseReason::Released, None)
        .await
        .unwrap();
    let held = grant(&s.store, request(&room, &res, &a, 60_000)).await;
    let mut wait = request(&room, &res, &b, 60_000);
    wait.wait = Some(WaitSpec {
        timeout_ms: 60_000,
        request_id: Some(7),
    });
    match s.store.acquire(wait).await.unwrap() {
        AcquireOutcome::Held {
            queue_position: Some(1),
            ..
        } => {}
        other => panic!("expected b queued first, got {other:?}"),
    }

    s.proxy.arm(&held.token.to_string());
    let out = s
        .store
        .release(&held.key(), held.token, ReleaseReason::Released, None)
        .await
        .expect("the release succeeds");
    assert_eq!(s.proxy.cuts(), 1, "the proxy cut the release's reply");
    let granted = match out {
        TokenOutcome::Done(LockTransition::Released {
            lock,
            reason: ReleaseReason::Released,
            granted: Some(g),
        }) => {
            assert_eq!(lock.token, held.token);
            g
        }
        other => panic!("expected the release with b's hand-off, got {other:?}"),
    };
    assert_eq!(&*granted.lock.holder.session_id, &*b.session_id);
    assert_eq!(granted.request_id, Some(7));
    assert!(granted.lock.token > held.token);

    let now = s.store.get(&held.key()).await.unwrap().expect("b holds it");
    assert_eq!(now.token, granted.lock.token, "handed off once, not twice");
    assert_eq!(
        audit_kinds(&s.audit, &res).await,
        [
            "lock_acquired",
            "lock_waiting",
            "lock_released",
            "lock_acquired"
        ]
    );
}

/// An acquire whose reply is lost is one fresh grant (not "reentrant", which a node would not
/// announce or register), with one token and one audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_resent_after_a_lost_reply_is_one_fresh_grant() {
    let s = setup().await;
    let (room, res) = (unique("scene"), unique("segment"));
    let a = holder("a");
    // Loads the script cache, so the cut call is the first send of the acquire under test.
    grant(&s.store, request(&room, &unique("segment"), &a, 60_000)).await;

    s.proxy.arm(res.as_str());
    let lock = grant(&s.store, request(&room, &res, &a, 60_000)).await;
    assert_eq!(s.proxy.cuts(), 1, "the proxy cut the acquire's reply");
    let now = s.store.get(&lock.key()).await.unwrap().expect("held");
    assert_eq!(now.token, lock.token);
    assert_eq!(audit_kinds(&s.audit, &res).await, ["lock_acquired"]);
}

/// A reap whose reply is lost still reports the expiry (and the hand-off) it performed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reap_resent_after_a_lost_reply_reports_its_expiries() {
    let s = setup().await;
    let (room, res) = (unique("scene"), unique("segment"));
    let (a, b) = (holder("a"), holder("b"));
    // Loads the script cache, so the cut call is the first send of the reap under test.
    s.store.reap(0).await.unwrap();
    let held = grant(&s.store, request(&room, &res, &a, 300)).await;
    let mut wait = request(&room, &res, &b, 60_000);
    wait.wait = Some(WaitSpec {
        timeout_ms: 60_000,
        request_id: Some(9),
    });
    assert!(matches!(
        s.store.acquire(wait).await.unwrap(),
        AcquireOutcome::Held { .. }
    ));
    // Past the hold limit (Redis' clock decides; poll rather than guess).
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.store.get(&held.key()).await.unwrap().unwrap().expires_at > lockstep::engine::now_ms() {
        assert!(Instant::now() < deadline, "the lock never reached its end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The reap call of the resource's shard names that shard's due index first.
    s.proxy.arm(&keys::due(keys::shard_of(res.as_str())));
    let out = s
        .store
        .reap(lockstep::engine::now_ms())
        .await
        .expect("reap");
    assert_eq!(s.proxy.cuts(), 1, "the proxy cut the reap's reply");
    let mine: Vec<&LockTransition> = out
        .iter()
        .filter(|t| matches!(t, LockTransition::Released { lock, .. } if lock.resource == res))
        .collect();
    match mine.as_slice() {
        [
            LockTransition::Released {
                lock,
                reason: ReleaseReason::Expired,
                granted: Some(g),
            },
        ] => {
            assert_eq!(lock.token, held.token);
            assert_eq!(&*g.lock.holder.session_id, &*b.session_id);
        }
        other => panic!("expected the expiry with b's hand-off once, got {other:?}"),
    }
    assert_eq!(
        audit_kinds(&s.audit, &res).await,
        [
            "lock_acquired",
            "lock_waiting",
            "lock_expired",
            "lock_acquired"
        ]
    );
}

/// Presence join and leave whose replies are lost: the join is still a fresh join (not a
/// rejoin of itself) and the leave still returns the member, so its departure is announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_join_and_leave_resent_after_a_lost_reply_are_announced_once() {
    use lockstep::auth::Role;
    use lockstep::engine::redis::presence::RedisPresenceStore;
    use lockstep::engine::{Member, PresenceStore};

    let s = setup().await;
    let pool = lockstep::engine::redis::connect(&s.proxy.url())
        .await
        .unwrap();
    let presence = RedisPresenceStore::new(pool, 60_000);
    let room = unique("scene");
    let member = |session: &str| Member {
        user_id: "u-1".into(),
        session_id: session.into(),
        name: "Somebody".into(),
        avatar: None,
        color: "#112233".into(),
        role: Role::Editor,
        focus: None,
        state: None,
        since: 1,
    };
    // Loads the script cache, so the cut calls are the first sends of the calls under test.
    presence.join(&room, member("warm-up")).await.unwrap();
    presence.leave(&room, &"warm-up".into()).await.unwrap();

    let sid = format!("sess-{}", uuid::Uuid::new_v4().simple());
    s.proxy.arm(&sid);
    let previous = presence.join(&room, member(&sid)).await.expect("join");
    assert_eq!(s.proxy.cuts(), 1, "the proxy cut the join's reply");
    assert_eq!(previous, None, "a fresh join, not a rejoin of itself");

    s.proxy.arm(&sid);
    let left = presence
        .leave(&room, &sid.clone().into())
        .await
        .expect("leave");
    assert_eq!(s.proxy.cuts(), 2, "the proxy cut the leave's reply");
    assert_eq!(
        left.map(|m| m.session_id),
        Some(sid.into()),
        "the departure"
    );
}

/// Op keys cost memory only for calls that report something: idle reaps store nothing, a
/// release stores its reply for 60 s, beside its data (same shard tag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_calls_that_report_a_change_keep_an_op_key() {
    let s = setup().await;
    let op_keys = || {
        let out = s.redis.cli(&["--scan", "--pattern", "lockstep:*op:*"]);
        out.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    for _ in 0..3 {
        assert!(
            s.store
                .reap(lockstep::engine::now_ms())
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(op_keys(), Vec::<String>::new(), "idle reaps");

    let (room, res) = (unique("scene"), unique("segment"));
    let held = grant(&s.store, request(&room, &res, &holder("a"), 60_000)).await;
    s.store
        .release(&held.key(), held.token, ReleaseReason::Released, None)
        .await
        .unwrap();
    let keys = op_keys();
    assert_eq!(keys.len(), 2, "acquire and release: {keys:?}");
    let tag = format!(
        "lockstep:ls:{{ls{}}}:op:",
        keys::shard_of(&held.key().to_string())
    );
    for k in &keys {
        assert!(k.starts_with(&tag), "{k}");
        let ttl: u64 = s.redis.cli(&["PTTL", k]).parse().unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{k}: {ttl}");
    }
}

/// A holder and a queued waiter on a fresh resource; returns (lock key, holder's lock, waiter).
async fn held_with_waiter(s: &Setup) -> (LockKey, LockInfo, Holder) {
    let (room, res) = (unique("scene"), unique("segment"));
    let (a, b) = (holder("a"), holder("b"));
    let held = grant(&s.store, request(&room, &res, &a, 60_000)).await;
    let mut wait = request(&room, &res, &b, 60_000);
    wait.wait = Some(WaitSpec {
        timeout_ms: 60_000,
        request_id: Some(3),
    });
    assert!(matches!(
        s.store.acquire(wait).await.unwrap(),
        AcquireOutcome::Held { .. }
    ));
    (held.key(), held, b)
}

/// A forced release whose reply is lost does not, on its re-send, free the lock it had just
/// handed to the waiter; a session release re-sent still reports its release and hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_and_session_releases_resent_after_a_lost_reply_act_once() {
    use lockstep::engine::Actor;

    let s = setup().await;
    // Loads the script cache.
    let (warm, _, _) = held_with_waiter(&s).await;
    let admin = Actor {
        user_id: "admin".into(),
        session_id: None,
        node_id: "node-test".into(),
        via: lockstep::engine::ActorVia::AdminToken,
    };
    s.store.force_release(&warm, &admin).await.unwrap();

    let (res, held, b) = held_with_waiter(&s).await;
    let actor = Actor {
        user_id: format!("owner-{}", uuid::Uuid::new_v4().simple()).into(),
        session_id: None,
        node_id: "node-test".into(),
        via: lockstep::engine::ActorVia::AdminToken,
    };
    s.proxy.arm(&actor.user_id);
    let out = s.store.force_release(&res, &actor).await.unwrap();
    assert_eq!(
        s.proxy.cuts(),
        1,
        "the proxy cut the forced release's reply"
    );
    match out {
        Some(LockTransition::Released {
            lock,
            reason: ReleaseReason::Forced,
            granted: Some(g),
        }) => {
            assert_eq!(lock.token, held.token, "the holder's lock was forced");
            assert_eq!(&*g.lock.holder.session_id, &*b.session_id);
        }
        other => panic!("expected the forced release with b's hand-off, got {other:?}"),
    }
    let now = s.store.get(&res).await.unwrap().expect("b holds it");
    assert_eq!(&*now.holder.session_id, &*b.session_id);

    // Session loss of b (now the holder) hands nothing on, so add a waiter c first.
    let c = holder("c");
    let mut wait = request(&now.room, &res.resource, &c, 60_000);
    wait.wait = Some(WaitSpec {
        timeout_ms: 60_000,
        request_id: Some(4),
    });
    assert!(matches!(
        s.store.acquire(wait).await.unwrap(),
        AcquireOutcome::Held { .. }
    ));
    let shard = keys::shard_of(&res.to_string());
    s.proxy.arm(&keys::session_locks(shard, &b.session_id));
    let out = s
        .store
        .release_session(&b.session_id, ReleaseReason::Disconnected, None)
        .await
        .unwrap();
    assert_eq!(
        s.proxy.cuts(),
        2,
        "the proxy cut the session release's reply"
    );
    match out.as_slice() {
        [
            LockTransition::Released {
                lock,
                reason: ReleaseReason::Disconnected,
                granted: Some(g),
            },
        ] => {
            assert_eq!(lock.token, now.token);
            assert_eq!(&*g.lock.holder.session_id, &*c.session_id);
        }
        other => panic!("expected b's release with c's hand-off, got {other:?}"),
    }
    assert_eq!(
        audit_kinds(&s.audit, &res.resource).await,
        [
            "lock_acquired",
            "lock_waiting",
            "lock_forced",
            "lock_acquired",
            "lock_waiting",
            "lock_disconnected",
            "lock_acquired"
        ]
    );
}
