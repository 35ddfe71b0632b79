//! Model-based property tests of the lock engines: random sequences of acquire (with and
//! without waiting), release, extend, cancel-wait, force-release, session loss and reaps of short
//! hold limits drive the memory and the Redis [`LockStore`] and a small reference model side by
//! side. After every step:
//! - the store's holder of each resource (`get`) is the model's: never two holders, never a
//!   grant of a held lock, a release only by the live token;
//! - tokens only rise per resource;
//! - each kind of audit record of each resource counts exactly the state changes seen.
//!
//! And at the end, once every hold limit and wait deadline has passed and reaps ran, every
//! waiter was served or told (granted, timed out, cancelled, or its session ended).
//!
//! The model is fed only by what the store answers, never by guessed timing, so the test holds on
//! a slow machine. Cases: `LOCKSTEP_MODEL_CASES` (default 16 memory, 6 Redis).
//!
//! Lock identity: every trait call names its `(room, resource)` lock through [`Case::key`].

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use lockstep::audit::{AuditQuery, AuditSink};
use lockstep::engine::conformance::RecordingAuditSink;
use lockstep::engine::memory::MemoryLockStore;
use lockstep::engine::redis::audit::RedisAuditSink;
use lockstep::engine::redis::locks::RedisLockStore;
use lockstep::engine::{
    AcquireOutcome, AcquireRequest, Actor, ActorVia, Holder, LockInfo, LockKey, LockStore,
    LockTransition, ReleaseReason, TokenOutcome, WaitSpec, now_ms,
};
use lockstep::names::Entity;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

const SESSIONS: usize = 4;
const RESOURCES: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        s: usize,
        r: usize,
        ttl_ms: u64,
        wait_ms: Option<u64>,
    },
    Release {
        r: usize,
        stale: bool,
    },
    Extend {
        r: usize,
        stale: bool,
        ttl_ms: u64,
    },
    CancelWait {
        s: usize,
        r: usize,
    },
    Force {
        r: usize,
    },
    SessionLost {
        s: usize,
    },
    Reap,
    Sleep(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..SESSIONS;
    let r = 0..RESOURCES;
    prop_oneof![
        4 => (s.clone(), r.clone(), 40u64..250, proptest::option::of(30u64..400))
            .prop_map(|(s, r, ttl_ms, wait_ms)| Op::Acquire { s, r, ttl_ms, wait_ms }),
        2 => (r.clone(), any::<bool>()).prop_map(|(r, stale)| Op::Release { r, stale }),
        1 => (r.clone(), any::<bool>(), 40u64..250)
            .prop_map(|(r, stale, ttl_ms)| Op::Extend { r, stale, ttl_ms }),
        1 => (s.clone(), r.clone()).prop_map(|(s, r)| Op::CancelWait { s, r }),
        1 => r.clone().prop_map(|r| Op::Force { r }),
        1 => s.prop_map(|s| Op::SessionLost { s }),
        2 => Just(Op::Reap),
        2 => (0u64..150).prop_map(Op::Sleep),
    ]
}

/// One resource as the model sees it.
#[derive(Debug, Default)]
struct Res {
    /// `(session index, token)` of the holder.
    holder: Option<(usize, u64)>,
    /// Queued sessions, head first (expired ones stay until a reap reports them).
    waiters: Vec<usize>,
    last_token: u64,
    /// Audit records expected, by kind.
    audit: HashMap<&'static str, usize>,
}

struct Case {
    store: Arc<dyn LockStore>,
    audit: Arc<dyn AuditSink>,
    room: Entity,
    resources: Vec<Entity>,
    /// `(room, resource)` of each resource: the lock identity in every trait call.
    keys: Vec<LockKey>,
    sessions: Vec<Holder>,
    model: Vec<Res>,
}

fn unique(ty: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{ty}:m-{}", &id[..12])
}

impl Case {
    fn new(store: Arc<dyn LockStore>, audit: Arc<dyn AuditSink>) -> Case {
        let room = Entity::parse(&unique("scene")).unwrap();
        let resources: Vec<Entity> = (0..RESOURCES)
            .map(|_| Entity::parse(&unique("segment")).unwrap())
            .collect();
        let keys = resources
            .iter()
            .map(|r| LockKey::new(room.clone(), r.clone()))
            .collect();
        Case {
            store,
            audit,
            room,
            resources,
            keys,
            sessions: (0..SESSIONS)
                .map(|i| Holder {
                    user_id: format!("u{i}").into(),
                    name: format!("User {i}").into(),
                    session_id: unique("s").replace(':', "-").into(),
                    node_id: "node-model".into(),
                })
                .collect(),
            model: (0..RESOURCES).map(|_| Res::default()).collect(),
        }
    }

    /// The lock identity of resource `r` in every trait call.
    fn key(&self, r: usize) -> &LockKey {
        &self.keys[r]
    }

    fn r_of(&self, resource: &Entity) -> usize {
        self.resources
            .iter()
            .position(|e| e == resource)
            .unwrap_or_else(|| panic!("a transition for a foreign resource {resource}"))
    }

    fn s_of(&self, session_id: &str) -> usize {
        self.sessions
            .iter()
            .position(|h| &*h.session_id == session_id)
            .unwrap_or_else(|| panic!("a foreign session {session_id}"))
    }

    fn count(&mut self, r: usize, kind: &'static str) {
        *self.model[r].audit.entry(kind).or_default() += 1;
    }

    /// A new grant of `r` to the session of `lock`.
    fn granted(&mut self, r: usize, lock: &LockInfo) {
        let s = self.s_of(&lock.holder.session_id);
        let m = &mut self.model[r];
        assert!(m.holder.is_none(), "granted {lock:?} while held: {m:?}");
        assert!(
            lock.token > m.last_token,
            "token {} after {}",
            lock.token,
            m.last_token
        );
        m.last_token = lock.token;
        m.holder = Some((s, lock.token));
        // Its own (expired) queue entry, if any, is answered by the grant.
        m.waiters.retain(|w| *w != s);
        self.count(r, "lock_acquired");
    }

    fn apply(&mut self, t: &LockTransition) {
        match t {
            LockTransition::Released {
                lock,
                reason,
                granted,
            } => {
                let r = self.r_of(&lock.resource);
                let m = &mut self.model[r];
                assert_eq!(
                    m.holder.map(|h| h.1),
                    Some(lock.token),
                    "released {lock:?}, model {m:?}"
                );
                m.holder = None;
                self.count(
                    r,
                    match reason {
                        ReleaseReason::Released => "lock_released",
                        ReleaseReason::Expired => "lock_expired",
                        ReleaseReason::Disconnected => "lock_disconnected",
                        ReleaseReason::Forced => "lock_forced",
                        ReleaseReason::Revoked => "lock_revoked",
                        // Node-local, never a store's transition (`ReleaseReason::Lost`).
                        ReleaseReason::Lost => panic!("a store ended {lock:?} as lost"),
                    },
                );
                if let Some(g) = granted {
                    let s = self.s_of(&g.lock.holder.session_id);
                    assert!(
                        self.model[r].waiters.contains(&s),
                        "handed to {s}, not a waiter: {:?}",
                        self.model[r]
                    );
                    self.granted(r, &g.lock);
                }
            }
            LockTransition::WaitExpired {
                resource,
                session_id,
                ..
            } => {
                let (r, s) = (self.r_of(resource), self.s_of(session_id));
                let m = &mut self.model[r];
                let i = m.waiters.iter().position(|w| *w == s);
                assert!(i.is_some(), "wait of {s} expired, not waiting: {m:?}");
                m.waiters.remove(i.unwrap());
                self.count(r, "lock_wait_expired");
            }
        }
    }

    fn token_for(&self, r: usize, stale: bool) -> u64 {
        let m = &self.model[r];
        match (m.holder, stale) {
            (Some((_, t)), false) => t,
            (Some((_, t)), true) => t - 1,
            (None, _) => m.last_token.max(1),
        }
    }

    async fn step(&mut self, op: &Op) {
        match *op {
            Op::Acquire {
                s,
                r,
                ttl_ms,
                wait_ms,
            } => {
                let req = AcquireRequest {
                    room: self.room.clone(),
                    resource: self.resources[r].clone(),
                    action: "trim".into(),
                    holder: self.sessions[s].clone(),
                    ttl_ms,
                    lease_ms: None,
                    wait: wait_ms.map(|timeout_ms| WaitSpec {
                        timeout_ms,
                        request_id: Some(s as u32),
                    }),
                };
                match self.store.acquire(req).await.expect("acquire") {
                    AcquireOutcome::Granted {
                        lock,
                        reentrant: false,
                    } => self.granted(r, &lock),
                    AcquireOutcome::Granted {
                        lock,
                        reentrant: true,
                    } => assert_eq!(self.model[r].holder, Some((s, lock.token))),
                    AcquireOutcome::Held {
                        current,
                        queue_position,
                        ..
                    } => {
                        let m = &mut self.model[r];
                        assert_eq!(m.holder.map(|h| h.1), Some(current.token), "{m:?}");
                        let queued = m.waiters.iter().position(|w| *w == s);
                        match (queued, queue_position) {
                            (Some(i), Some(p)) => assert_eq!(p as usize, i + 1),
                            (None, Some(p)) => {
                                assert!(wait_ms.is_some(), "queued without asking");
                                m.waiters.push(s);
                                assert_eq!(p as usize, m.waiters.len());
                            }
                            (None, None) => assert!(wait_ms.is_none()),
                            (Some(_), None) => panic!("queued {s} not told its position"),
                        }
                    }
                }
            }
            Op::Release { r, stale } => {
                let token = self.token_for(r, stale);
                let out = self
                    .store
                    .release(self.key(r), token, ReleaseReason::Released, None)
                    .await
                    .expect("release");
                self.token_outcome(r, token, out);
            }
            Op::Extend { r, stale, ttl_ms } => {
                let token = self.token_for(r, stale);
                match self
                    .store
                    .extend(self.key(r), token, ttl_ms)
                    .await
                    .expect("extend")
                {
                    TokenOutcome::Done(lock) => {
                        assert_eq!(self.model[r].holder.map(|h| h.1), Some(token));
                        assert_eq!(lock.token, token);
                        self.count(r, "lock_extended");
                    }
                    // Refused also to the live token once the hold limit passed (not reaped yet).
                    TokenOutcome::NotHeld { current } => self.not_held(r, current),
                }
            }
            Op::CancelWait { s, r } => {
                let sid = self.sessions[s].session_id.clone();
                let ok = self
                    .store
                    .cancel_wait(self.key(r), &sid)
                    .await
                    .expect("cancel_wait");
                let m = &mut self.model[r];
                assert_eq!(ok, m.waiters.contains(&s), "cancel_wait of {s}: {m:?}");
                if ok {
                    m.waiters.retain(|w| *w != s);
                    self.count(r, "lock_wait_cancelled");
                }
            }
            Op::Force { r } => {
                let actor = Actor {
                    user_id: "owner".into(),
                    session_id: None,
                    node_id: "node-model".into(),
                    via: ActorVia::AdminToken,
                };
                let out = self
                    .store
                    .force_release(self.key(r), &actor)
                    .await
                    .expect("force_release");
                assert_eq!(out.is_some(), self.model[r].holder.is_some());
                if let Some(t) = out {
                    self.apply(&t);
                }
            }
            Op::SessionLost { s } => {
                let sid = self.sessions[s].session_id.clone();
                let out = self
                    .store
                    .release_session(&sid, ReleaseReason::Disconnected, None)
                    .await
                    .expect("release_session");
                // Its waits go first (so none of its locks is handed to it), each audited.
                for r in 0..RESOURCES {
                    let m = &mut self.model[r];
                    if m.waiters.contains(&s) {
                        m.waiters.retain(|w| *w != s);
                        self.count(r, "lock_wait_cancelled");
                    }
                }
                let mut released: Vec<usize> = Vec::new();
                for t in &out {
                    let LockTransition::Released { lock, .. } = t else {
                        panic!("release_session reported {t:?}");
                    };
                    released.push(self.r_of(&lock.resource));
                    self.apply(t);
                }
                released.sort();
                let held: Vec<usize> = (0..RESOURCES)
                    .filter(|r| !released.contains(r))
                    .filter(|r| self.model[*r].holder.is_some_and(|h| h.0 == s))
                    .collect();
                assert!(held.is_empty(), "session {s} still holds {held:?}");
            }
            Op::Reap => self.reap().await,
            Op::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }

    async fn reap(&mut self) {
        let out = self.store.reap(now_ms()).await.expect("reap");
        for t in &out {
            // Reaps of other tests' resources (one Redis per test binary function) are not ours.
            let ours = match t {
                LockTransition::Released { lock, .. } => self.resources.contains(&lock.resource),
                LockTransition::WaitExpired { resource, .. } => self.resources.contains(resource),
            };
            if ours {
                self.apply(t);
            }
        }
    }

    fn token_outcome(&mut self, r: usize, token: u64, out: TokenOutcome<LockTransition>) {
        match out {
            TokenOutcome::Done(t) => {
                assert_eq!(self.model[r].holder.map(|h| h.1), Some(token));
                self.apply(&t);
            }
            TokenOutcome::NotHeld { current } => {
                assert_ne!(self.model[r].holder.map(|h| h.1), Some(token));
                self.not_held(r, current);
            }
        }
    }

    fn not_held(&self, r: usize, current: Option<LockInfo>) {
        assert_eq!(
            current.map(|l| l.token),
            self.model[r].holder.map(|h| h.1),
            "current holder of {r}"
        );
    }

    /// The store agrees with the model: holders, and audit records by kind.
    async fn check(&self) {
        for r in 0..RESOURCES {
            let got = self.store.get(self.key(r)).await.expect("get");
            let got = got.map(|l| (self.s_of(&l.holder.session_id), l.token));
            assert_eq!(got, self.model[r].holder, "holder of {r}");
            let page = self
                .audit
                .query(&AuditQuery {
                    resource: Some(self.resources[r].to_string()),
                    limit: Some(1000),
                    ..AuditQuery::default()
                })
                .await
                .expect("audit");
            let mut seen: HashMap<&'static str, usize> = HashMap::new();
            for rec in &page.records {
                if let Some(kind) = COUNTED.iter().find(|k| **k == rec.kind.as_str()) {
                    *seen.entry(kind).or_default() += 1;
                }
            }
            assert_eq!(seen, self.model[r].audit, "audit of {r}");
        }
    }

    /// Waits out every hold limit and wait deadline, reaping: then nobody holds or waits.
    async fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.reap().await;
            if self
                .model
                .iter()
                .all(|m| m.holder.is_none() && m.waiters.is_empty())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still held or waiting: {:?}",
                self.model
            );
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
}

/// The audit kinds that are state changes, counted by the model.
const COUNTED: [&str; 8] = [
    "lock_acquired",
    "lock_released",
    "lock_expired",
    "lock_disconnected",
    "lock_forced",
    "lock_extended",
    "lock_wait_expired",
    "lock_wait_cancelled",
];

fn cases(default: u32) -> u32 {
    std::env::var("LOCKSTEP_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs random op sequences against stores made by `make` (a fresh one, or fresh names, per case).
fn run_model<F>(rt: &tokio::runtime::Runtime, cases: u32, make: F)
where
    F: Fn() -> (Arc<dyn LockStore>, Arc<dyn AuditSink>),
{
    let totals: std::sync::Mutex<HashMap<&'static str, usize>> = Default::default();
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..RunnerConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 5..40), |ops| {
            rt.block_on(async {
                let (store, audit) = make();
                let mut case = Case::new(store, audit);
                for op in &ops {
                    case.step(op).await;
                    case.check().await;
                }
                case.drain().await;
                case.check().await;
                let mut totals = totals.lock().unwrap();
                for m in &case.model {
                    for (kind, n) in &m.audit {
                        *totals.entry(kind).or_default() += n;
                    }
                }
            });
            Ok(())
        })
        .unwrap();
    // How much each transition was exercised (the test's own coverage), for the log.
    let mut totals: Vec<_> = totals.into_inner().unwrap().into_iter().collect();
    totals.sort();
    eprintln!("{cases} cases: {totals:?}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn memory_lock_store_follows_the_model() {
    run_model(&runtime(), cases(16), || {
        let audit = Arc::new(RecordingAuditSink::new());
        let store = Arc::new(MemoryLockStore::new(audit.clone()));
        (store as Arc<dyn LockStore>, audit as Arc<dyn AuditSink>)
    });
}

#[test]
fn redis_lock_store_follows_the_model() {
    let redis = RedisServer::start();
    let rt = runtime();
    let pool = rt
        .block_on(lockstep::engine::redis::connect(&redis.url()))
        .unwrap();
    run_model(&rt, cases(6), || {
        (
            Arc::new(RedisLockStore::new(pool.clone())) as Arc<dyn LockStore>,
            Arc::new(RedisAuditSink::new(pool.clone())) as Arc<dyn AuditSink>,
        )
    });
    drop(rt);
}
