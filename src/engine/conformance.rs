//! The behaviour every engine implementation must show, as reusable async checks.
//!
//! Each suite takes a factory, so the same checks run against the memory engines (in
//! `tests/engine_memory.rs`) and the Redis engines (against a real server):
//!
//! - [`lock_store_suite`] with a `Fn() -> Future<Output = LockStoreUnderTest>`;
//! - [`presence_store_suite`] with a `Fn() -> Future<Output = Arc<dyn PresenceStore>>`;
//! - [`broker_suite`] with a `Fn(Arc<dyn EventSink>) -> Future<Output = Arc<dyn Broker>>`.
//!
//! Every check is also a `pub async fn` of its own, to run one at a time while debugging.
//! Checks panic on failure, like tests. They use fresh, random room, resource and session names,
//! so a shared server never leaks state from one check (or one run) into another, and they
//! filter what `reap` returns down to their own resources.
//!
//! Timing: the checks run in real time with short hold limits and leases (100 ms – 1 s) and wait well past
//! them before asserting; they never assert that something happened *quickly*, only that it
//! happened after a generous delay, or did not happen before a deadline far away. The machine
//! running them may be slow and shared.
//!
//! The lock checks also pin down the audit trail (see [`lock_audit_trail`]); a factory hands
//! over the sink its store appends to, and the checks read it back with `flush` + `query`.
//! [`RecordingAuditSink`] is an in-memory sink factories may use.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::sleep;

use crate::audit::jsonl::{PageCollector, RecordFilter};
use crate::audit::{AuditError, AuditKind, AuditPage, AuditQuery, AuditRecord, AuditSink};
use crate::auth::Role;
use crate::engine::{
    AcquireOutcome, AcquireRequest, Actor, ActorVia, Broker, EventSink, Grant, Holder, LockInfo,
    LockKey, LockStore, LockTransition, Member, PresencePatch, PresenceStore, ReleaseReason,
    RoomEvent, RoomEventKind, SessionId, TokenOutcome, WaitSpec, now_ms,
};
use crate::names::Entity;

/// A lock store and the audit sink it appends to.
pub struct LockStoreUnderTest {
    pub store: Arc<dyn LockStore>,
    pub audit: Arc<dyn AuditSink>,
}

/// An in-memory [`AuditSink`] for tests: keeps every record, unbounded; `query` applies the
/// filters of [`AuditQuery`] like the real sinks, newest first.
#[derive(Default)]
pub struct RecordingAuditSink {
    records: Mutex<Vec<AuditRecord>>,
}

impl RecordingAuditSink {
    pub fn new() -> RecordingAuditSink {
        RecordingAuditSink::default()
    }

    /// Every record appended so far, in arrival order.
    pub fn records(&self) -> Vec<AuditRecord> {
        match self.records.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[async_trait]
impl AuditSink for RecordingAuditSink {
    async fn append(&self, records: Vec<AuditRecord>) -> Result<(), AuditError> {
        self.records
            .lock()
            .map_err(|_| AuditError::Unavailable("recording sink poisoned".into()))?
            .extend(records);
        Ok(())
    }

    async fn query(&self, q: &AuditQuery) -> Result<AuditPage, AuditError> {
        let filter = RecordFilter::new(q)?;
        let mut page = PageCollector::new(filter.limit());
        let records = self
            .records
            .lock()
            .map_err(|_| AuditError::Unavailable("recording sink poisoned".into()))?;
        for r in records.iter().filter(|r| filter.matches(r)) {
            page.offer(r.clone());
        }
        Ok(page.finish())
    }

    async fn flush(&self) -> Result<(), AuditError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Effectively forever for a check (hold limits, wait timeouts).
const LONG: u64 = 60_000;
/// A hold limit or lease meant to run out during a check.
const SHORT: u64 = 100;
/// How long to wait for a `SHORT` limit to be surely over, even on a slow machine.
const PAST_SHORT: Duration = Duration::from_millis(400);

/// A fresh entity of type `ty`, unique across checks, runs and processes.
fn unique(ty: &str) -> Entity {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Entity::parse(&format!("{ty}:c-{}", &id[..16])).expect("valid generated entity")
}

/// The identity of `resource` locked in `room`.
fn key(room: &Entity, resource: &Entity) -> LockKey {
    LockKey::new(room.clone(), resource.clone())
}

/// A fresh session of user `user`.
fn holder(user: &str) -> Holder {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Holder {
        user_id: user.into(),
        name: format!("User {user}").into(),
        session_id: format!("{user}-{}", &id[..12]).into(),
        node_id: "node-conformance".into(),
    }
}

fn request(room: &Entity, resource: &Entity, who: &Holder, ttl_ms: u64) -> AcquireRequest {
    AcquireRequest {
        room: room.clone(),
        resource: resource.clone(),
        action: "approve".into(),
        holder: who.clone(),
        ttl_ms,
        lease_ms: None,
        wait: None,
    }
}

fn waiting(mut req: AcquireRequest, timeout_ms: u64, request_id: u32) -> AcquireRequest {
    req.wait = Some(WaitSpec {
        timeout_ms,
        request_id: Some(request_id),
    });
    req
}

fn leased(mut req: AcquireRequest, lease_ms: u64) -> AcquireRequest {
    req.lease_ms = Some(lease_ms);
    req
}

async fn acquire(store: &dyn LockStore, req: AcquireRequest) -> AcquireOutcome {
    store.acquire(req).await.expect("acquire")
}

/// Acquires and expects a fresh (non-reentrant) grant.
async fn must_grant(store: &dyn LockStore, req: AcquireRequest) -> LockInfo {
    let who = req.holder.clone();
    match acquire(store, req).await {
        AcquireOutcome::Granted {
            lock,
            reentrant: false,
        } => {
            assert_eq!(lock.holder, who, "granted to the requester");
            lock
        }
        other => panic!("expected a fresh grant, got {other:?}"),
    }
}

/// Acquires and expects `Held`: returns (current holder, queue position, estimated wait).
async fn must_hold(store: &dyn LockStore, req: AcquireRequest) -> (LockInfo, Option<u32>, u64) {
    match acquire(store, req).await {
        AcquireOutcome::Held {
            current,
            queue_position,
            estimated_wait_ms,
        } => (current, queue_position, estimated_wait_ms),
        other => panic!("expected Held, got {other:?}"),
    }
}

/// Releases with reason `Released` and expects success.
async fn must_release(store: &dyn LockStore, lock: &LockInfo) -> Option<Grant> {
    match store
        .release(&lock.key(), lock.token, ReleaseReason::Released, None)
        .await
        .expect("release")
    {
        TokenOutcome::Done(LockTransition::Released {
            lock: ended,
            reason,
            granted,
        }) => {
            assert_eq!(&ended, lock, "the released lock is the one held");
            assert_eq!(reason, ReleaseReason::Released);
            granted
        }
        other => panic!("expected a release, got {other:?}"),
    }
}

/// `reap(now)`, keeping only the transitions about `resource`.
async fn reap_for(store: &dyn LockStore, resource: &Entity) -> Vec<LockTransition> {
    store
        .reap(now_ms())
        .await
        .expect("reap")
        .into_iter()
        .filter(|t| match t {
            LockTransition::Released { lock, .. } => &lock.resource == resource,
            LockTransition::WaitExpired { resource: r, .. } => r == resource,
        })
        .collect()
}

/// Expects exactly one `Released` transition in `ts`; returns its parts.
fn one_release(ts: Vec<LockTransition>) -> (LockInfo, ReleaseReason, Option<Grant>) {
    match <[LockTransition; 1]>::try_from(ts) {
        Ok(
            [
                LockTransition::Released {
                    lock,
                    reason,
                    granted,
                },
            ],
        ) => (lock, reason, granted),
        Ok(other) => panic!("expected one Released transition, got {other:?}"),
        Err(ts) => panic!("expected one Released transition, got {ts:?}"),
    }
}

fn expect_grant(granted: Option<Grant>, who: &Holder, request_id: u32, after: u64) -> LockInfo {
    let grant = granted.unwrap_or_else(|| panic!("expected a grant to {}", who.session_id));
    assert_eq!(grant.lock.holder, *who, "granted to the head waiter");
    assert_eq!(
        grant.request_id,
        Some(request_id),
        "the waiter's request id"
    );
    assert!(
        grant.lock.token > after,
        "a hand-off issues a new, larger token"
    );
    grant.lock
}

async fn audit_of(t: &LockStoreUnderTest, resource: &Entity) -> Vec<AuditRecord> {
    t.audit.flush().await.expect("audit flush");
    let page = t
        .audit
        .query(&AuditQuery {
            resource: Some(resource.to_string()),
            limit: Some(1000),
            ..AuditQuery::default()
        })
        .await
        .expect("audit query");
    let mut records = page.records;
    records.reverse();
    records
}

// ---------------------------------------------------------------------------------------------
// Lock store
// ---------------------------------------------------------------------------------------------

/// Runs every lock-store check, each on a fresh store from `new_store`.
pub async fn lock_store_suite<F, Fut>(new_store: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = LockStoreUnderTest>,
{
    simultaneous_acquires(&new_store().await).await;
    tokens_strictly_increase(&new_store().await).await;
    tokens_survive_restart(&new_store().await, &new_store).await;
    reentrant_acquire(&new_store().await).await;
    stale_token_refused(&new_store().await).await;
    release_after_expiry_refused(&new_store().await).await;
    extend_moves_expiry(&new_store().await).await;
    expiry_via_reap(&new_store().await).await;
    refresh_leases_keeps_alive(&new_store().await).await;
    fifo_queue(&new_store().await).await;
    cancel_wait(&new_store().await).await;
    wait_timeout(&new_store().await).await;
    release_session(&new_store().await).await;
    force_release(&new_store().await).await;
    list_room(&new_store().await).await;
    lock_audit_trail(&new_store().await).await;
    raise_fence(&new_store().await).await;
    reissue(&new_store().await).await;
    rooms_lock_independently(&new_store().await).await;
    validate_is_the_stores_notion(&new_store().await).await;
    withdraw_is_recorded_as_withdrawn(&new_store().await).await;
}

/// 20 sessions acquire one resource at once: exactly one is granted, the 19 others are told
/// that very holder and token.
pub async fn simultaneous_acquires(t: &LockStoreUnderTest) {
    let room = unique("scene");
    let res = unique("segment");
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = t.store.clone();
        let barrier = barrier.clone();
        let req = request(&room, &res, &holder(&format!("u{i}")), LONG);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.acquire(req).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("acquire"));
    }
    let winners: Vec<&LockInfo> = outcomes
        .iter()
        .filter_map(|o| match o {
            AcquireOutcome::Granted { lock, reentrant } => {
                assert!(!reentrant);
                Some(lock)
            }
            AcquireOutcome::Held { .. } => None,
        })
        .collect();
    assert_eq!(winners.len(), 1, "exactly one grant: {outcomes:?}");
    let winner = winners[0].clone();
    for o in &outcomes {
        if let AcquireOutcome::Held {
            current,
            queue_position,
            ..
        } = o
        {
            assert_eq!(current.token, winner.token, "Held names the winner's token");
            assert_eq!(current.holder.session_id, winner.holder.session_id);
            assert_eq!(*queue_position, None, "nobody asked to wait");
        }
    }
    assert_eq!(
        t.store.get(&key(&room, &res)).await.expect("get"),
        Some(winner)
    );
}

/// Tokens grow strictly across release, expiry (via reap) and forced release, and stay exact
/// as JavaScript numbers (< 2^53).
pub async fn tokens_strictly_increase(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), LONG)).await;
    must_release(s, &a).await;
    let b = must_grant(s, request(&room, &res, &holder("b"), SHORT)).await;
    assert!(
        b.token > a.token,
        "after release: {} > {}",
        b.token,
        a.token
    );
    sleep(PAST_SHORT).await;
    let (_, reason, _) = one_release(reap_for(s, &res).await);
    assert_eq!(reason, ReleaseReason::Expired);
    let c = must_grant(s, request(&room, &res, &holder("c"), LONG)).await;
    assert!(c.token > b.token, "after expiry: {} > {}", c.token, b.token);
    let actor = Actor {
        user_id: "admin".into(),
        session_id: None,
        node_id: "node-conformance".into(),
        via: ActorVia::AdminToken,
    };
    s.force_release(&key(&room, &res), &actor)
        .await
        .expect("force");
    let d = must_grant(s, request(&room, &res, &holder("d"), LONG)).await;
    assert!(d.token > c.token, "after force: {} > {}", d.token, c.token);
    assert!(d.token < 1 << 53, "tokens stay exact in JavaScript");
    // Another resource has its own counter, which must also be usable.
    let other = must_grant(s, request(&room, &unique("segment"), &holder("e"), LONG)).await;
    assert!(other.token > 0);
}

/// A store built after `first` (for the memory store: a restarted process that lost all state)
/// never issues a token at or below one `first` issued.
pub async fn tokens_survive_restart<F, Fut>(first: &LockStoreUnderTest, new_store: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = LockStoreUnderTest>,
{
    let room = unique("scene");
    let res = unique("segment");
    let mut last = 0;
    for _ in 0..3 {
        let lock = must_grant(&*first.store, request(&room, &res, &holder("a"), LONG)).await;
        must_release(&*first.store, &lock).await;
        last = lock.token;
    }
    sleep(Duration::from_millis(5)).await;
    let restarted = new_store().await;
    let lock = must_grant(&*restarted.store, request(&room, &res, &holder("b"), LONG)).await;
    assert!(
        lock.token > last,
        "token after restart {} must exceed {last}",
        lock.token
    );
    must_release(&*restarted.store, &lock).await;
}

/// A retried acquire by the holding session returns the same grant, flagged reentrant.
pub async fn reentrant_acquire(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = holder("a");
    let first = must_grant(s, leased(request(&room, &res, &a, LONG), 10_000)).await;
    match acquire(s, leased(request(&room, &res, &a, LONG), 10_000)).await {
        AcquireOutcome::Granted {
            lock,
            reentrant: true,
        } => assert_eq!(lock, first, "the existing grant, same token"),
        other => panic!("expected a reentrant grant, got {other:?}"),
    }
    // The same user in another tab is another session: held.
    let (current, _, _) = must_hold(s, request(&room, &res, &holder("a"), LONG)).await;
    assert_eq!(current.token, first.token);
}

/// A holder whose lock ended (expired, or forced) can neither release nor extend the lock of
/// whoever holds the resource now.
pub async fn stale_token_refused(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), SHORT)).await;
    sleep(PAST_SHORT).await;
    one_release(reap_for(s, &res).await);
    let b = must_grant(s, request(&room, &res, &holder("b"), LONG)).await;
    let refused = s
        .release(&key(&room, &res), a.token, ReleaseReason::Released, None)
        .await
        .expect("release");
    assert_eq!(
        refused,
        TokenOutcome::NotHeld {
            current: Some(b.clone())
        }
    );
    let refused = s
        .extend(&key(&room, &res), a.token, LONG)
        .await
        .expect("extend");
    assert_eq!(
        refused,
        TokenOutcome::NotHeld {
            current: Some(b.clone())
        }
    );
    assert_eq!(
        s.get(&key(&room, &res)).await.expect("get"),
        Some(b.clone()),
        "b untouched"
    );

    // The same after a forced release.
    let actor = Actor {
        user_id: "owner".into(),
        session_id: None,
        node_id: "node-conformance".into(),
        via: ActorVia::AdminToken,
    };
    s.force_release(&key(&room, &res), &actor)
        .await
        .expect("force");
    let c = must_grant(s, request(&room, &res, &holder("c"), LONG)).await;
    let refused = s
        .release(&key(&room, &res), b.token, ReleaseReason::Released, None)
        .await
        .expect("release");
    assert_eq!(
        refused,
        TokenOutcome::NotHeld {
            current: Some(c.clone())
        }
    );
    // A token that was never issued is refused too.
    let refused = s
        .extend(&key(&room, &res), c.token + 1, LONG)
        .await
        .expect("extend");
    assert_eq!(refused, TokenOutcome::NotHeld { current: Some(c) });
}

/// A lock past its hold limit stays visible until reaped; after the reap its holder's release
/// and extend are refused.
pub async fn release_after_expiry_refused(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), SHORT)).await;
    sleep(PAST_SHORT).await;
    assert_eq!(
        s.get(&key(&room, &res)).await.expect("get"),
        Some(a.clone()),
        "a lock stays until reap ends it"
    );
    let (lock, reason, granted) = one_release(reap_for(s, &res).await);
    assert_eq!(
        (lock, reason, granted),
        (a.clone(), ReleaseReason::Expired, None)
    );
    assert_eq!(s.get(&key(&room, &res)).await.expect("get"), None);
    let refused = s
        .release(&key(&room, &res), a.token, ReleaseReason::Released, None)
        .await
        .expect("release");
    assert_eq!(refused, TokenOutcome::NotHeld { current: None });
    let refused = s
        .extend(&key(&room, &res), a.token, LONG)
        .await
        .expect("extend");
    assert_eq!(refused, TokenOutcome::NotHeld { current: None });
}

/// `extend` moves the hold limit (and renews the lease); a lock past its end cannot be extended.
pub async fn extend_moves_expiry(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");

    // Hold limit.
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), 1_000)).await;
    let extended = match s
        .extend(&key(&room, &res), a.token, LONG)
        .await
        .expect("extend")
    {
        TokenOutcome::Done(lock) => lock,
        other => panic!("expected an extension, got {other:?}"),
    };
    assert_eq!(extended.token, a.token, "extend keeps the token");
    assert_eq!(extended.since, a.since);
    assert!(extended.expires_at >= a.expires_at + LONG - 10_000);
    sleep(Duration::from_millis(1_300)).await;
    assert!(reap_for(s, &res).await.is_empty(), "extended past 1 s");
    assert_eq!(s.get(&key(&room, &res)).await.expect("get"), Some(extended));

    // Lease: renewed with its original duration.
    let res = unique("segment");
    let b = must_grant(s, leased(request(&room, &res, &holder("b"), LONG), 1_000)).await;
    sleep(Duration::from_millis(600)).await;
    assert!(matches!(
        s.extend(&key(&room, &res), b.token, LONG)
            .await
            .expect("extend"),
        TokenOutcome::Done(_)
    ));
    sleep(Duration::from_millis(600)).await;
    assert!(
        reap_for(s, &res).await.is_empty(),
        "extend renewed the 1 s lease"
    );
    assert!(s.get(&key(&room, &res)).await.expect("get").is_some());

    // Past its end (not reaped yet): refused, the lock still shown as current.
    let res = unique("segment");
    let c = must_grant(s, request(&room, &res, &holder("c"), SHORT)).await;
    sleep(PAST_SHORT).await;
    let refused = s
        .extend(&key(&room, &res), c.token, LONG)
        .await
        .expect("extend");
    assert_eq!(refused, TokenOutcome::NotHeld { current: Some(c) });
    let (_, reason, _) = one_release(reap_for(s, &res).await);
    assert_eq!(reason, ReleaseReason::Expired);
}

/// `reap` ends a lock past its hold limit with `Expired`, past its lease with `Disconnected`,
/// nothing early, and each transition once.
pub async fn expiry_via_reap(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");

    let res = unique("segment");
    let long = unique("segment");
    let l = must_grant(s, request(&room, &long, &holder("l"), LONG)).await;
    assert!(reap_for(s, &long).await.is_empty(), "not due yet");
    let a = must_grant(s, request(&room, &res, &holder("a"), SHORT)).await;
    sleep(PAST_SHORT).await;
    let (lock, reason, granted) = one_release(reap_for(s, &res).await);
    assert_eq!((lock, reason, granted), (a, ReleaseReason::Expired, None));
    assert!(reap_for(s, &res).await.is_empty(), "announced once");
    assert_eq!(s.get(&key(&room, &res)).await.expect("get"), None);
    assert!(reap_for(s, &long).await.is_empty(), "still not due");
    assert_eq!(s.get(&key(&room, &long)).await.expect("get"), Some(l));

    let res = unique("segment");
    let b = must_grant(s, leased(request(&room, &res, &holder("b"), LONG), SHORT)).await;
    sleep(PAST_SHORT).await;
    let (lock, reason, granted) = one_release(reap_for(s, &res).await);
    assert_eq!(
        (lock, reason, granted),
        (b, ReleaseReason::Disconnected, None)
    );
    assert!(reap_for(s, &res).await.is_empty(), "announced once");
}

/// `refresh_leases` keeps a lease alive well past its original length and reports grants that
/// are no longer held.
pub async fn refresh_leases_keeps_alive(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = must_grant(s, leased(request(&room, &res, &holder("a"), LONG), 600)).await;
    let bogus = (key(&room, &res), a.token + 1);
    for _ in 0..6 {
        sleep(Duration::from_millis(150)).await;
        let lost = s
            .refresh_leases(&[(key(&room, &res), a.token), bogus.clone()], 600)
            .await
            .expect("refresh");
        assert_eq!(lost, vec![bogus.clone()], "only the bogus grant is lost");
        assert!(reap_for(s, &res).await.is_empty(), "lease kept alive");
    }
    // 900 ms > 600 ms: alive only thanks to the refreshes. Now stop refreshing.
    assert_eq!(
        s.get(&key(&room, &res)).await.expect("get"),
        Some(a.clone())
    );
    sleep(Duration::from_millis(1_000)).await;
    let (lock, reason, _) = one_release(reap_for(s, &res).await);
    assert_eq!((lock, reason), (a.clone(), ReleaseReason::Disconnected));
    let lost = s
        .refresh_leases(&[(key(&room, &res), a.token)], 600)
        .await
        .expect("refresh");
    assert_eq!(
        lost,
        vec![(key(&room, &res), a.token)],
        "an ended lease is reported lost"
    );
}

/// Three waiters are queued at positions 1, 2, 3 and served in that order, each with its own
/// request id; a waiter asking again keeps its place; the wait estimate is an upper bound that
/// grows with the queue.
pub async fn fifo_queue(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), LONG)).await;
    let waiters: Vec<Holder> = (1..=3).map(|i| holder(&format!("w{i}"))).collect();
    let mut estimates = Vec::new();
    for (i, w) in waiters.iter().enumerate() {
        let req = waiting(request(&room, &res, w, LONG), LONG, i as u32 + 1);
        let (current, position, estimate) = must_hold(s, req).await;
        assert_eq!(current, a);
        assert_eq!(position, Some(i as u32 + 1), "queue position of w{}", i + 1);
        estimates.push(estimate);
    }
    assert!(estimates[0] <= LONG, "holder's remaining time");
    assert!(estimates[1] >= LONG, "plus w1's hold limit");
    assert!(estimates[2] >= 2 * LONG, "plus w1's and w2's hold limits");

    // Asking again keeps the place.
    let again = waiting(request(&room, &res, &waiters[1], LONG), LONG, 2);
    assert_eq!(must_hold(s, again).await.1, Some(2), "w2 keeps its place");
    // Someone not waiting is denied with the whole queue in the estimate.
    let (_, position, estimate) = must_hold(s, request(&room, &res, &holder("x"), LONG)).await;
    assert_eq!(position, None);
    assert!(estimate >= 3 * LONG);

    let mut current = a;
    for (i, w) in waiters.iter().enumerate() {
        let granted = must_release(s, &current).await;
        let next = expect_grant(granted, w, i as u32 + 1, current.token);
        assert_eq!(next.room, room);
        assert_eq!(
            s.get(&key(&room, &res)).await.expect("get"),
            Some(next.clone())
        );
        current = next;
    }
    assert_eq!(must_release(s, &current).await, None, "queue empty");
    assert_eq!(s.get(&key(&room, &res)).await.expect("get"), None);
}

/// `cancel_wait` takes a waiter out of the queue; the next one is served.
pub async fn cancel_wait(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), LONG)).await;
    let w1 = holder("w1");
    let w2 = holder("w2");
    must_hold(s, waiting(request(&room, &res, &w1, LONG), LONG, 1)).await;
    must_hold(s, waiting(request(&room, &res, &w2, LONG), LONG, 2)).await;
    assert!(
        s.cancel_wait(&key(&room, &res), &w1.session_id)
            .await
            .expect("cancel")
    );
    assert!(
        !s.cancel_wait(&key(&room, &res), &w1.session_id)
            .await
            .expect("cancel")
    );
    assert!(
        !s.cancel_wait(&key(&room, &res), &holder("x").session_id)
            .await
            .expect("cancel")
    );
    let again = waiting(request(&room, &res, &w2, LONG), LONG, 2);
    assert_eq!(must_hold(s, again).await.1, Some(1), "w2 moved up");
    let granted = must_release(s, &a).await;
    expect_grant(granted, &w2, 2, a.token);
}

/// A waiter whose timeout passed is never granted; `reap` reports it once as `WaitExpired`.
pub async fn wait_timeout(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");

    // Released after the timeout but before the reap: the expired waiter is skipped.
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), LONG)).await;
    let w1 = holder("w1");
    let w2 = holder("w2");
    must_hold(s, waiting(request(&room, &res, &w1, LONG), SHORT, 11)).await;
    must_hold(s, waiting(request(&room, &res, &w2, LONG), LONG, 12)).await;
    sleep(PAST_SHORT).await;
    let granted = must_release(s, &a).await;
    expect_grant(granted, &w2, 12, a.token);
    let expired = reap_for(s, &res).await;
    assert_eq!(
        expired,
        vec![LockTransition::WaitExpired {
            room: room.clone(),
            resource: res.clone(),
            session_id: w1.session_id.clone(),
            request_id: Some(11),
        }]
    );
    assert!(reap_for(s, &res).await.is_empty(), "reported once");

    // Reaped first: the lock is then released to nobody.
    let res = unique("segment");
    let b = must_grant(s, request(&room, &res, &holder("b"), LONG)).await;
    let w3 = holder("w3");
    must_hold(s, waiting(request(&room, &res, &w3, LONG), SHORT, 13)).await;
    sleep(PAST_SHORT).await;
    let expired = reap_for(s, &res).await;
    assert!(
        matches!(&expired[..], [LockTransition::WaitExpired { session_id, request_id: Some(13), .. }] if *session_id == w3.session_id),
        "{expired:?}"
    );
    assert_eq!(must_release(s, &b).await, None, "w3 is never granted");
}

/// `release_session` releases the session's locks with the given reason, serves their waiters,
/// drops the session's own waits, and honours the room filter.
pub async fn release_session(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let x = unique("scene");
    let y = unique("scene");
    let (r1, r2, r3, r4) = (
        unique("segment"),
        unique("segment"),
        unique("segment"),
        unique("segment"),
    );
    let leaving = holder("s");
    let other = holder("t");
    let w = holder("w");
    let l1 = must_grant(s, leased(request(&x, &r1, &leaving, LONG), LONG)).await;
    let l2 = must_grant(s, leased(request(&y, &r2, &leaving, LONG), LONG)).await;
    let l3 = must_grant(s, request(&x, &r3, &other, LONG)).await;
    let l4 = must_grant(s, request(&y, &r4, &other, LONG)).await;
    must_hold(s, waiting(request(&x, &r1, &w, LONG), LONG, 1)).await;
    must_hold(s, waiting(request(&x, &r3, &leaving, LONG), LONG, 3)).await;
    must_hold(s, waiting(request(&y, &r4, &leaving, LONG), LONG, 4)).await;

    // Leaving room y only: r2 released, the wait on r4 dropped; r1 and the wait on r3 stay.
    let ts = s
        .release_session(
            &leaving.session_id,
            ReleaseReason::Disconnected,
            Some(std::slice::from_ref(&y)),
        )
        .await
        .expect("release_session");
    assert_eq!(
        one_release(ts),
        (l2, ReleaseReason::Disconnected, None),
        "only the lock in room y"
    );
    assert_eq!(s.get(&key(&x, &r1)).await.expect("get"), Some(l1.clone()));
    assert_eq!(
        must_release(s, &l4).await,
        None,
        "the wait on r4 was dropped"
    );

    // Ending the session: r1 goes to its waiter, the wait on r3 is dropped.
    let ts = s
        .release_session(&leaving.session_id, ReleaseReason::Disconnected, None)
        .await
        .expect("release_session");
    let (lock, reason, granted) = one_release(ts);
    assert_eq!((lock, reason), (l1.clone(), ReleaseReason::Disconnected));
    expect_grant(granted, &w, 1, l1.token);
    assert_eq!(
        must_release(s, &l3).await,
        None,
        "the wait on r3 was dropped"
    );

    let ts = s
        .release_session(&leaving.session_id, ReleaseReason::Disconnected, None)
        .await
        .expect("release_session");
    assert!(ts.is_empty(), "nothing left: {ts:?}");
}

/// `force_release` ends whoever holds the resource with reason `Forced` and serves the queue.
pub async fn force_release(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let actor = Actor {
        user_id: "owner".into(),
        session_id: Some("owner-session".into()),
        node_id: "node-conformance".into(),
        via: ActorVia::Ws,
    };
    let a = must_grant(s, request(&room, &res, &holder("a"), LONG)).await;
    let w = holder("w");
    must_hold(s, waiting(request(&room, &res, &w, LONG), LONG, 5)).await;
    let t1 = s
        .force_release(&key(&room, &res), &actor)
        .await
        .expect("force");
    let (lock, reason, granted) = one_release(t1.into_iter().collect());
    assert_eq!((lock, reason), (a.clone(), ReleaseReason::Forced));
    let b = expect_grant(granted, &w, 5, a.token);
    let t2 = s
        .force_release(&key(&room, &res), &actor)
        .await
        .expect("force");
    assert_eq!(
        one_release(t2.into_iter().collect()),
        (b, ReleaseReason::Forced, None)
    );
    assert_eq!(
        s.force_release(&key(&room, &res), &actor)
            .await
            .expect("force"),
        None
    );
    assert_eq!(s.get(&key(&room, &res)).await.expect("get"), None);
}

/// `list_room` shows the live locks announced in a room, and only those.
pub async fn list_room(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let x = unique("scene");
    let y = unique("scene");
    let l1 = must_grant(s, request(&x, &unique("segment"), &holder("a"), LONG)).await;
    let l2 = must_grant(s, request(&x, &unique("segment"), &holder("b"), LONG)).await;
    let l3 = must_grant(s, request(&y, &unique("segment"), &holder("a"), LONG)).await;
    let sorted = |mut v: Vec<LockInfo>| {
        v.sort_by(|a, b| a.resource.cmp(&b.resource));
        v
    };
    assert_eq!(
        sorted(s.list_room(&x).await.expect("list")),
        sorted(vec![l1.clone(), l2.clone()])
    );
    assert_eq!(s.list_room(&y).await.expect("list"), vec![l3]);
    must_release(s, &l1).await;
    assert_eq!(s.list_room(&x).await.expect("list"), vec![l2]);
    assert!(
        s.list_room(&unique("scene"))
            .await
            .expect("list")
            .is_empty()
    );
}

/// Every transition writes its audit records, with the right kinds, ids and tokens. A
/// reentrant acquire writes none; a hand-off writes the release and the waiter's grant.
pub async fn lock_audit_trail(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let (a, b, c, d) = (holder("a"), holder("b"), holder("c"), holder("d"));
    let actor = Actor {
        user_id: "owner".into(),
        session_id: None,
        node_id: "node-conformance".into(),
        via: ActorVia::AdminToken,
    };

    let la = must_grant(s, leased(request(&room, &res, &a, LONG), LONG)).await;
    acquire(s, leased(request(&room, &res, &a, LONG), LONG)).await; // reentrant: no record
    must_hold(s, request(&room, &res, &b, LONG)).await;
    must_hold(s, waiting(request(&room, &res, &c, LONG), LONG, 9)).await;
    let la = match s
        .extend(&key(&room, &res), la.token, LONG)
        .await
        .expect("extend")
    {
        TokenOutcome::Done(lock) => lock,
        other => panic!("expected an extension, got {other:?}"),
    };
    let lc = expect_grant(must_release(s, &la).await, &c, 9, la.token);
    must_hold(s, waiting(request(&room, &res, &d, LONG), LONG, 10)).await;
    s.cancel_wait(&key(&room, &res), &d.session_id)
        .await
        .expect("cancel");
    s.force_release(&key(&room, &res), &actor)
        .await
        .expect("force");
    let le = must_grant(s, request(&room, &res, &holder("e"), SHORT)).await;
    sleep(PAST_SHORT).await;
    one_release(reap_for(s, &res).await);
    let lf = must_grant(s, leased(request(&room, &res, &holder("f"), LONG), SHORT)).await;
    must_hold(
        s,
        waiting(request(&room, &res, &holder("g"), LONG), SHORT, 11),
    )
    .await;
    sleep(PAST_SHORT).await;
    // g's wait expires first, then f's lease; nobody left to serve.
    let reaped = reap_for(s, &res).await;
    assert_eq!(reaped.len(), 2, "{reaped:?}");

    let records = audit_of(t, &res).await;
    let kinds: Vec<AuditKind> = records.iter().map(|r| r.kind).collect();
    use AuditKind::*;
    assert_eq!(
        kinds,
        vec![
            LockAcquired,
            LockDenied,
            LockWaiting,
            LockExtended,
            LockReleased,
            LockAcquired,
            LockWaiting,
            LockWaitCancelled,
            LockForced,
            LockAcquired,
            LockExpired,
            LockAcquired,
            LockWaiting,
            LockWaitExpired,
            LockDisconnected,
        ]
    );
    for r in &records {
        assert_eq!(r.resource.as_deref(), Some(res.as_str()));
        assert_eq!(r.room.as_deref(), Some(room.as_str()));
        assert!(r.user_id.is_some() && r.session_id.is_some(), "{r:?}");
    }
    let session = |i: usize| records[i].session_id.clone();
    let token = |i: usize| records[i].token;
    // Grants and ends of a's lock: a's ids and token.
    assert_eq!(
        (session(0), token(0)),
        (Some(a.session_id.clone()), Some(la.token))
    );
    assert_eq!(records[0].detail["via"], "request");
    assert_eq!(records[0].detail["action"], "approve");
    assert_eq!(records[0].detail["ttl_ms"], LONG);
    assert_eq!(
        session(1),
        Some(b.session_id.clone()),
        "denied: the requester"
    );
    assert_eq!(
        records[1].detail["holder"]["session_id"],
        a.session_id.as_ref()
    );
    assert_eq!(
        session(2),
        Some(c.session_id.clone()),
        "waiting: the requester"
    );
    assert_eq!(
        (session(3), token(3)),
        (Some(a.session_id.clone()), Some(la.token))
    );
    assert_eq!(
        (session(4), token(4)),
        (Some(a.session_id.clone()), Some(la.token))
    );
    // Hand-off: c's grant via the queue.
    assert_eq!(
        (session(5), token(5)),
        (Some(c.session_id.clone()), Some(lc.token))
    );
    assert_eq!(records[5].detail["via"], "queue");
    assert_eq!(session(7), Some(d.session_id.clone()));
    assert_eq!(
        (session(8), token(8)),
        (Some(c.session_id.clone()), Some(lc.token))
    );
    assert_eq!(records[8].detail["by"], "owner");
    assert_eq!(
        records[8].actor.as_ref(),
        Some(&actor),
        "a forced release names who forced it; user_id stays the holder's"
    );
    assert!(
        records
            .iter()
            .filter(|r| r.kind != LockForced)
            .all(|r| r.actor.is_none())
    );
    assert_eq!(token(9), Some(le.token));
    assert_eq!(token(10), Some(le.token));
    assert_eq!(token(11), Some(lf.token));
    assert_eq!(token(14), Some(lf.token));
    // Ids follow the order of the transitions.
    assert!(records.windows(2).all(|w| w[0].id < w[1].id));

    // The sink's filters see them too.
    let page = t
        .audit
        .query(&AuditQuery {
            resource: Some(res.to_string()),
            kind: Some("lock_acquired".into()),
            ..AuditQuery::default()
        })
        .await
        .expect("query");
    let tokens: Vec<Option<u64>> = page.records.iter().map(|r| r.token).collect();
    assert_eq!(
        tokens,
        vec![
            Some(lf.token),
            Some(le.token),
            Some(lc.token),
            Some(la.token)
        ],
        "newest first"
    );
}

/// The same resource locked in two rooms is two locks: independent holders, queues, tokens,
/// listings, releases and waits. Nothing done in one room reaches the other.
pub async fn rooms_lock_independently(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let (x, y) = (unique("scene"), unique("scene"));
    let res = unique("segment");
    let (a, b, c) = (holder("a"), holder("b"), holder("c"));
    let la = must_grant(s, leased(request(&x, &res, &a, LONG), LONG)).await;
    // Not blocked by the lock in x.
    let lb = must_grant(s, leased(request(&y, &res, &b, LONG), LONG)).await;
    assert_eq!(s.get(&key(&x, &res)).await.expect("get"), Some(la.clone()));
    assert_eq!(s.get(&key(&y, &res)).await.expect("get"), Some(lb.clone()));
    assert_eq!(s.list_room(&x).await.expect("list"), vec![la.clone()]);
    assert_eq!(s.list_room(&y).await.expect("list"), vec![lb.clone()]);
    // The same session may hold the resource in both rooms.
    let la_y = must_hold(s, waiting(request(&y, &res, &a, LONG), LONG, 2)).await;
    assert_eq!(la_y.0, lb, "a waits for b's lock in y");

    // A token from room x means nothing in room y.
    assert!(matches!(
        s.release(&key(&y, &res), la.token, ReleaseReason::Released, None)
            .await
            .expect("release"),
        TokenOutcome::NotHeld { current: Some(ref cur) } if *cur == lb
    ));
    assert!(matches!(
        s.extend(&key(&y, &res), la.token, LONG)
            .await
            .expect("extend"),
        TokenOutcome::NotHeld { .. }
    ));
    assert!(
        !s.validate(&key(&y, &res), la.token)
            .await
            .expect("validate")
            .0
    );
    assert!(
        s.validate(&key(&x, &res), la.token)
            .await
            .expect("validate")
            .0
    );
    let lost = s
        .refresh_leases(
            &[(key(&y, &res), la.token), (key(&x, &res), la.token)],
            LONG,
        )
        .await
        .expect("refresh");
    assert_eq!(lost, vec![(key(&y, &res), la.token)]);
    // A wait in x is not a wait in y.
    assert!(
        !s.cancel_wait(&key(&x, &res), &a.session_id)
            .await
            .expect("cancel")
    );

    // Leaving room y ends a's wait there and nothing in x.
    let ts = s
        .release_session(
            &a.session_id,
            ReleaseReason::Disconnected,
            Some(std::slice::from_ref(&y)),
        )
        .await
        .expect("release_session");
    assert!(ts.is_empty(), "a held nothing in y: {ts:?}");
    assert_eq!(s.get(&key(&x, &res)).await.expect("get"), Some(la.clone()));

    // Forcing x's lock leaves y's alone; c then gets x's lock, y's stays b's.
    let actor = Actor {
        user_id: "owner-x".into(),
        session_id: None,
        node_id: "node-conformance".into(),
        via: ActorVia::Http,
    };
    let t1 = s
        .force_release(&key(&x, &res), &actor)
        .await
        .expect("force");
    assert_eq!(one_release(t1.into_iter().collect()).0, la);
    assert_eq!(s.get(&key(&y, &res)).await.expect("get"), Some(lb.clone()));
    must_hold(s, request(&y, &res, &c, LONG)).await;
    let lc = must_grant(s, request(&x, &res, &c, LONG)).await;
    assert!(lc.token > la.token, "x's tokens keep increasing");
    assert_eq!(lc.room, x);
    let records = audit_of(t, &res).await;
    assert!(
        records.iter().all(|r| r.room.as_deref() == Some(x.as_str())
            || r.room.as_deref() == Some(y.as_str())),
        "records carry the lock's room"
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r.kind == AuditKind::LockForced)
            .map(|r| (r.room.clone(), r.token))
            .collect::<Vec<_>>(),
        vec![(Some(x.as_str().into()), Some(la.token))]
    );
    must_release(s, &lc).await;
    must_release(s, &lb).await;
}

/// `validate` is the store's own notion of "live holder": the token must match and the lock
/// be inside its hold limit and its lease, by the store's clock — even before a reap ends it.
/// No token value passed in (2^53, 2^63 − 1, u64::MAX) changes anything for later grants.
pub async fn validate_is_the_stores_notion(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let k = key(&room, &res);
    assert_eq!(s.validate(&k, 1).await.expect("validate"), (false, None));
    let la = must_grant(s, leased(request(&room, &res, &holder("a"), LONG), SHORT)).await;
    assert_eq!(
        s.validate(&k, la.token).await.expect("validate"),
        (true, Some(la.clone()))
    );
    for probe in [la.token + 1, la.token - 1, 1 << 53, (1 << 63) - 1, u64::MAX] {
        assert_eq!(
            s.validate(&k, probe).await.expect("validate"),
            (false, Some(la.clone())),
            "probe {probe}"
        );
        assert!(matches!(
            s.release(&k, probe, ReleaseReason::Released, None)
                .await
                .expect("release"),
            TokenOutcome::NotHeld { .. }
        ));
        assert!(matches!(
            s.extend(&k, probe, LONG).await.expect("extend"),
            TokenOutcome::NotHeld { .. }
        ));
    }
    // The lease ran out: no longer valid, though not reaped yet (still listed).
    sleep(PAST_SHORT).await;
    let (valid, current) = s.validate(&k, la.token).await.expect("validate");
    assert!(!valid, "past its lease");
    assert_eq!(current, Some(la.clone()));
    one_release(reap_for(s, &res).await);
    let lb = must_grant(s, request(&room, &res, &holder("b"), LONG)).await;
    assert!(
        lb.token > la.token && lb.token < 1 << 53,
        "{} then {}",
        la.token,
        lb.token
    );
    must_release(s, &lb).await;
}

/// A withdrawn grant (strict fencing could not register it) is recorded as `lock_withdrawn`
/// with its reason — never as a release — and the queue is served as by a release.
pub async fn withdraw_is_recorded_as_withdrawn(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let k = key(&room, &res);
    let w = holder("w");
    let la = must_grant(s, request(&room, &res, &holder("a"), LONG)).await;
    must_hold(s, waiting(request(&room, &res, &w, LONG), LONG, 3)).await;
    assert!(matches!(
        s.withdraw(&k, la.token + 1, "x").await.expect("withdraw"),
        TokenOutcome::NotHeld { .. }
    ));
    let granted = match s
        .withdraw(&k, la.token, "fence registration failed")
        .await
        .expect("withdraw")
    {
        TokenOutcome::Done(LockTransition::Released { lock, granted, .. }) => {
            assert_eq!(lock, la);
            granted
        }
        other => panic!("expected a withdrawal, got {other:?}"),
    };
    let lw = expect_grant(granted, &w, 3, la.token);
    let records = audit_of(t, &res).await;
    let about_a: Vec<(AuditKind, serde_json::Value)> = records
        .iter()
        .filter(|r| r.token == Some(la.token) && r.session_id == Some(la.holder.session_id.clone()))
        .map(|r| (r.kind, r.detail.clone()))
        .collect();
    assert_eq!(about_a.len(), 2, "{about_a:?}");
    assert_eq!(about_a[0].0, AuditKind::LockAcquired);
    assert_eq!(about_a[1].0, AuditKind::LockWithdrawn);
    assert_eq!(about_a[1].1["reason"], "fence registration failed");
    assert!(!records.iter().any(|r| r.kind == AuditKind::LockReleased));
    must_release(s, &lw).await;
}

/// Microseconds since the Unix epoch (the scale of clock-seeded tokens).
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// `raise_fence`: the next grant of the resource gets a token above `at_least` — for a resource
/// locked before and for one never locked — and raising never lowers the counter nor touches a
/// held lock.
pub async fn raise_fence(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = must_grant(s, request(&room, &res, &holder("a"), LONG)).await;
    // Far above the clock (≈ 1.5 h of µs), as a registered token left by a lost counter is.
    let at_least = a.token.max(unix_micros()) + 5_000_000_000;
    s.raise_fence(&key(&room, &res), at_least)
        .await
        .expect("raise_fence");
    assert_eq!(
        s.get(&key(&room, &res)).await.expect("get"),
        Some(a.clone()),
        "a held lock keeps its token"
    );
    must_release(s, &a).await;
    let b = must_grant(s, request(&room, &res, &holder("b"), LONG)).await;
    assert!(
        b.token > at_least,
        "after raise_fence({at_least}): {}",
        b.token
    );
    must_release(s, &b).await;
    s.raise_fence(&key(&room, &res), at_least - 1_000)
        .await
        .expect("raise_fence lower");
    let c = must_grant(s, request(&room, &res, &holder("c"), LONG)).await;
    assert!(
        c.token > b.token,
        "never lowered: {} > {}",
        c.token,
        b.token
    );

    let fresh = unique("segment");
    let above = c.token + 1_000_000;
    s.raise_fence(&key(&room, &fresh), above)
        .await
        .expect("raise_fence new");
    let d = must_grant(s, request(&room, &fresh, &holder("d"), LONG)).await;
    assert!(
        d.token > above,
        "a never-locked resource: {} > {above}",
        d.token
    );
    assert!(d.token < 1 << 53);
}

/// `reissue`: the live lock gets a fresh token above a raised counter, in place (same holder,
/// room, action, limits); the old token is stale from then on; a lock that ended is not reissued.
pub async fn reissue(t: &LockStoreUnderTest) {
    let s = &*t.store;
    let room = unique("scene");
    let res = unique("segment");
    let a = holder("a");
    let old = must_grant(s, leased(request(&room, &res, &a, LONG), LONG)).await;
    let at_least = old.token.max(unix_micros()) + 5_000_000_000;
    s.raise_fence(&key(&room, &res), at_least)
        .await
        .expect("raise_fence");
    let fresh = match s
        .reissue(&key(&room, &res), old.token)
        .await
        .expect("reissue")
    {
        TokenOutcome::Done(lock) => lock,
        other => panic!("expected a reissue, got {other:?}"),
    };
    assert!(fresh.token > at_least, "{} > {at_least}", fresh.token);
    assert_eq!(
        LockInfo {
            token: old.token,
            ..fresh.clone()
        },
        old,
        "only the token changes"
    );
    assert_eq!(
        s.get(&key(&room, &res)).await.expect("get"),
        Some(fresh.clone())
    );
    // The session's retry is reentrant on the fresh grant.
    match acquire(s, leased(request(&room, &res, &a, LONG), LONG)).await {
        AcquireOutcome::Granted {
            lock,
            reentrant: true,
        } => assert_eq!(lock, fresh),
        other => panic!("expected a reentrant grant, got {other:?}"),
    }
    assert!(matches!(
        s.reissue(&key(&room, &res), old.token).await.expect("reissue stale"),
        TokenOutcome::NotHeld { current: Some(ref c) } if *c == fresh
    ));
    assert!(matches!(
        s.release(&key(&room, &res), old.token, ReleaseReason::Released, None)
            .await
            .expect("release stale"),
        TokenOutcome::NotHeld { .. }
    ));
    assert!(matches!(
        s.extend(&key(&room, &res), fresh.token, LONG)
            .await
            .expect("extend"),
        TokenOutcome::Done(_)
    ));
    let refreshed = s
        .refresh_leases(&[(key(&room, &res), fresh.token)], LONG)
        .await
        .expect("refresh");
    assert!(refreshed.is_empty(), "the lease follows the fresh token");
    let fresh = match s.get(&key(&room, &res)).await.expect("get") {
        Some(l) => l,
        None => panic!("lock gone"),
    };
    must_release(s, &fresh).await;

    // Ended (past its hold limit, not reaped yet): not reissued.
    let short = must_grant(s, request(&room, &res, &holder("b"), SHORT)).await;
    sleep(PAST_SHORT).await;
    assert!(matches!(
        s.reissue(&key(&room, &res), short.token)
            .await
            .expect("reissue ended"),
        TokenOutcome::NotHeld { .. }
    ));
    reap_for(s, &res).await;

    let records = audit_of(t, &res).await;
    let reissued: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.kind == AuditKind::LockAcquired && r.detail["via"] == "reissue")
        .collect();
    assert_eq!(reissued.len(), 1, "{records:?}");
    let r = reissued[0];
    assert_eq!(r.token, Some(fresh.token));
    assert_eq!(r.session_id, Some(a.session_id.clone()));
    assert_eq!(r.detail["replaces"], old.token.to_string());
    assert_eq!(r.detail["action"], "approve");
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

fn member(user: &str, session: &SessionId, since: u64, focus: Option<&Entity>) -> Member {
    Member {
        user_id: user.into(),
        session_id: session.clone(),
        name: format!("User {user}").into(),
        avatar: None,
        color: "#3366ff".into(),
        role: Role::Editor,
        focus: focus.cloned(),
        state: None,
        since,
    }
}

fn sessions(members: &[Member]) -> Vec<SessionId> {
    members.iter().map(|m| m.session_id.clone()).collect()
}

/// Runs every presence check, each on a fresh store from `new_store`.
pub async fn presence_store_suite<F, Fut>(new_store: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn PresenceStore>>,
{
    presence_join_and_order(&*new_store().await).await;
    presence_update(&*new_store().await).await;
    presence_leave(&*new_store().await).await;
    presence_of_entity(&*new_store().await).await;
}

/// Members come oldest first; joining again replaces the entry and returns the previous one.
pub async fn presence_join_and_order(s: &dyn PresenceStore) {
    let room = unique("scene");
    let base = now_ms();
    let ids: Vec<SessionId> = (0..3)
        .map(|i| holder(&format!("p{i}")).session_id)
        .collect();
    for (i, since) in [(2, base + 3), (0, base + 1), (1, base + 2)] {
        let previous = s
            .join(&room, member(&format!("p{i}"), &ids[i], since, None))
            .await
            .expect("join");
        assert_eq!(previous, None);
    }
    assert_eq!(sessions(&s.members(&room).await.expect("members")), ids);

    // Same session again (a resync): replaced, not duplicated, previous entry returned.
    let mut renamed = member("p1", &ids[1], base + 2, None);
    renamed.name = "Renamed".into();
    let previous = s.join(&room, renamed.clone()).await.expect("join");
    assert_eq!(previous, Some(member("p1", &ids[1], base + 2, None)));
    let members = s.members(&room).await.expect("members");
    assert_eq!(sessions(&members), ids);
    assert_eq!(members[1], renamed);

    // A replacement with a later `since` moves to its place in the order.
    s.join(&room, member("p0", &ids[0], base + 10, None))
        .await
        .expect("join");
    let order = sessions(&s.members(&room).await.expect("members"));
    assert_eq!(order, vec![ids[1].clone(), ids[2].clone(), ids[0].clone()]);
    assert!(
        s.members(&unique("scene"))
            .await
            .expect("members")
            .is_empty()
    );
}

/// A patch changes what it names: `None` keeps, `Some(None)` clears, `Some(Some(v))` sets.
pub async fn presence_update(s: &dyn PresenceStore) {
    let room = unique("scene");
    let focus = unique("segment");
    let id = holder("p").session_id;
    s.join(&room, member("p", &id, now_ms(), None))
        .await
        .expect("join");
    let set = PresencePatch {
        focus: Some(Some(focus.clone())),
        state: Some(Some(serde_json::json!({"typing": true}))),
    };
    let updated = s.update(&room, &id, set).await.expect("update");
    let updated = updated.expect("member exists");
    assert_eq!(updated.focus, Some(focus.clone()));
    assert_eq!(updated.state, Some(serde_json::json!({"typing": true})));
    assert_eq!(
        s.members(&room).await.expect("members"),
        vec![updated.clone()]
    );

    let unchanged = s
        .update(&room, &id, PresencePatch::default())
        .await
        .expect("update");
    assert_eq!(unchanged, Some(updated.clone()));

    let clear_focus = PresencePatch {
        focus: Some(None),
        state: None,
    };
    let cleared = s.update(&room, &id, clear_focus).await.expect("update");
    let cleared = cleared.expect("member exists");
    assert_eq!(cleared.focus, None);
    assert_eq!(cleared.state, updated.state, "state kept");
    assert!(
        s.presence_of(&focus).await.expect("presence").is_empty(),
        "focus index follows the update"
    );

    // With the member as last written, and with an out-of-date one: the same result.
    let refocus = PresencePatch {
        focus: Some(Some(focus.clone())),
        state: None,
    };
    let known = s
        .update_known(&room, &id, refocus.clone(), Some(&cleared))
        .await
        .expect("update_known")
        .expect("member exists");
    assert_eq!(known.focus, Some(focus.clone()));
    assert_eq!(known.state, updated.state);
    let stale = s
        .update_known(&room, &id, PresencePatch::default(), Some(&cleared))
        .await
        .expect("update_known")
        .expect("member exists");
    assert_eq!(stale, known, "an out-of-date member changes nothing");
    assert_eq!(
        s.presence_of(&focus).await.expect("presence"),
        vec![known.clone()],
        "focus index follows update_known"
    );
    let other = unique("segment");
    let moved = PresencePatch {
        focus: Some(Some(other.clone())),
        state: None,
    };
    s.update_known(&room, &id, moved, Some(&known))
        .await
        .expect("update_known");
    assert!(
        s.presence_of(&focus).await.expect("presence").is_empty(),
        "the old focus entry is gone"
    );
    assert_eq!(s.presence_of(&other).await.expect("presence").len(), 1);

    let nobody = s
        .update(&room, &holder("q").session_id, PresencePatch::default())
        .await
        .expect("update");
    assert_eq!(nobody, None);
    let elsewhere = s
        .update(&unique("scene"), &id, PresencePatch::default())
        .await
        .expect("update");
    assert_eq!(elsewhere, None, "not a member of that room");
}

/// `leave` returns the member once; the last one out leaves an empty room behind.
pub async fn presence_leave(s: &dyn PresenceStore) {
    let room = unique("scene");
    let focus = unique("segment");
    let (p, q) = (holder("p").session_id, holder("q").session_id);
    let mp = member("p", &p, now_ms(), Some(&focus));
    s.join(&room, mp.clone()).await.expect("join");
    s.join(&room, member("q", &q, now_ms() + 1, None))
        .await
        .expect("join");
    assert_eq!(s.leave(&room, &p).await.expect("leave"), Some(mp));
    assert_eq!(s.leave(&room, &p).await.expect("leave"), None);
    assert_eq!(s.leave(&unique("scene"), &q).await.expect("leave"), None);
    assert_eq!(
        sessions(&s.members(&room).await.expect("members")),
        vec![q.clone()]
    );
    assert!(s.presence_of(&focus).await.expect("presence").is_empty());
    assert!(s.leave(&room, &q).await.expect("leave").is_some());
    assert_eq!(s.members(&room).await.expect("members"), vec![]);
    assert_eq!(s.presence_of(&room).await.expect("presence"), vec![]);
}

/// Presence of an entity: the members of the room it names plus the members of any room
/// focused on it, each session once.
pub async fn presence_of_entity(s: &dyn PresenceStore) {
    let (r1, r2, r3) = (unique("scene"), unique("scene"), unique("scene"));
    let seg = unique("segment");
    let base = now_ms();
    let (a, b, c, d, e) = (
        holder("a").session_id,
        holder("b").session_id,
        holder("c").session_id,
        holder("d").session_id,
        holder("e").session_id,
    );
    s.join(&r1, member("a", &a, base + 1, Some(&seg)))
        .await
        .expect("join");
    s.join(&r2, member("b", &b, base + 2, Some(&seg)))
        .await
        .expect("join");
    s.join(&r2, member("c", &c, base + 3, None))
        .await
        .expect("join");
    // d is in two rooms, focused on seg in both: counted once.
    s.join(&r1, member("d", &d, base + 4, Some(&seg)))
        .await
        .expect("join");
    s.join(&r3, member("d", &d, base + 5, Some(&seg)))
        .await
        .expect("join");
    // e, in r2, focuses on the room r1 itself.
    s.join(&r2, member("e", &e, base + 6, Some(&r1)))
        .await
        .expect("join");

    let mut of_seg = sessions(&s.presence_of(&seg).await.expect("presence"));
    of_seg.sort();
    let mut want = vec![a.clone(), b.clone(), d.clone()];
    want.sort();
    assert_eq!(of_seg, want, "focused members of any room, each once");

    let of_r1 = s.presence_of(&r1).await.expect("presence");
    let mut got = sessions(&of_r1);
    got.sort();
    let mut want = vec![a.clone(), d.clone(), e.clone()];
    want.sort();
    assert_eq!(got, want, "room members plus members focused on the room");
    assert_eq!(
        &sessions(&of_r1)[..2],
        &[a.clone(), d.clone()],
        "room members first"
    );

    s.update(
        &r2,
        &b,
        PresencePatch {
            focus: Some(None),
            state: None,
        },
    )
    .await
    .expect("update");
    s.leave(&r1, &a).await.expect("leave");
    let mut of_seg = sessions(&s.presence_of(&seg).await.expect("presence"));
    of_seg.sort();
    assert_eq!(of_seg, vec![d.clone()]);
    s.leave(&r1, &d).await.expect("leave");
    s.leave(&r3, &d).await.expect("leave");
    assert!(s.presence_of(&seg).await.expect("presence").is_empty());
    assert!(s.members(&r1).await.expect("members").is_empty());
    assert!(s.members(&r3).await.expect("members").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------------------------

/// An [`EventSink`] that keeps every delivered event, for tests.
#[derive(Default)]
pub struct CollectingSink {
    events: Mutex<Vec<Arc<RoomEvent>>>,
}

impl CollectingSink {
    pub fn new() -> CollectingSink {
        CollectingSink::default()
    }

    /// Every event delivered so far, in delivery order.
    pub fn events(&self) -> Vec<Arc<RoomEvent>> {
        match self.events.lock() {
            Ok(e) => e.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The events of `room`, once there are at least `n` of them (polling, up to `timeout`).
    pub async fn wait_for(
        &self,
        room: &Entity,
        n: usize,
        timeout: Duration,
    ) -> Vec<Arc<RoomEvent>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events: Vec<Arc<RoomEvent>> = self
                .events()
                .into_iter()
                .filter(|e| &e.room == room)
                .collect();
            if events.len() >= n || tokio::time::Instant::now() >= deadline {
                return events;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }
}

impl EventSink for CollectingSink {
    fn deliver(&self, event: Arc<RoomEvent>) {
        match self.events.lock() {
            Ok(mut e) => e.push(event),
            Err(poisoned) => poisoned.into_inner().push(event),
        }
    }
}

fn broadcast(room: &Entity, seq: u64) -> Arc<RoomEvent> {
    Arc::new(RoomEvent {
        room: room.clone(),
        origin: Some("sender".into()),
        kind: RoomEventKind::Broadcast {
            event: "tick".into(),
            data: serde_json::json!({ "seq": seq }),
            user_id: "u".into(),
            session_id: "sender".into(),
            name: "U".into(),
        },
    })
}

/// Runs every broker check, each on a fresh broker from `new_broker`.
pub async fn broker_suite<F, Fut>(new_broker: F)
where
    F: Fn(Arc<dyn EventSink>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    broker_delivers_in_order(&new_broker).await;
    broker_resubscribe(&new_broker).await;
}

/// Published events of subscribed rooms arrive complete, unchanged, and in publish order per room.
pub async fn broker_delivers_in_order<F, Fut>(new_broker: &F)
where
    F: Fn(Arc<dyn EventSink>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let sink = Arc::new(CollectingSink::new());
    let broker = new_broker(sink.clone()).await;
    let (x, y) = (unique("scene"), unique("scene"));
    broker.subscribe(&x).await.expect("subscribe");
    broker.subscribe(&y).await.expect("subscribe");
    let mut sent_x = Vec::new();
    let mut sent_y = Vec::new();
    for seq in 0..200 {
        let room = if seq % 3 == 0 { &y } else { &x };
        let event = broadcast(room, seq);
        broker.publish(event.clone()).await.expect("publish");
        if seq % 3 == 0 {
            sent_y.push(event);
        } else {
            sent_x.push(event);
        }
    }
    let member_event = Arc::new(RoomEvent {
        room: x.clone(),
        origin: None,
        kind: RoomEventKind::PresenceJoin(member("m", &"m-1".into(), now_ms(), Some(&y))),
    });
    broker.publish(member_event.clone()).await.expect("publish");
    sent_x.push(member_event);

    let got_x = sink
        .wait_for(&x, sent_x.len(), Duration::from_secs(10))
        .await;
    let got_y = sink
        .wait_for(&y, sent_y.len(), Duration::from_secs(10))
        .await;
    assert_eq!(got_x, sent_x, "room x in publish order");
    assert_eq!(got_y, sent_y, "room y in publish order");
}

/// A room can be unsubscribed and subscribed again, and delivery resumes.
pub async fn broker_resubscribe<F, Fut>(new_broker: &F)
where
    F: Fn(Arc<dyn EventSink>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let sink = Arc::new(CollectingSink::new());
    let broker = new_broker(sink.clone()).await;
    let room = unique("scene");
    broker.subscribe(&room).await.expect("subscribe");
    broker.unsubscribe(&room).await.expect("unsubscribe");
    broker.subscribe(&room).await.expect("subscribe");
    let event = broadcast(&room, 1);
    broker.publish(event.clone()).await.expect("publish");
    let got = sink.wait_for(&room, 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![event]);
}
