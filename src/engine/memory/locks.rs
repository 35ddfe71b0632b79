//! [`MemoryLockStore`]: exclusive locks with fencing tokens, FIFO waiters, leases and hold
//! limits, in process.
//!
//! These semantics are the reference the Redis store copies; the
//! [`conformance`](crate::engine::conformance) suite checks both.
//!
//! # Model
//!
//! Per lock key ([`LockKey`]: room and resource — the same resource locked in two rooms is two
//! independent entries): the current lock (a [`LockInfo`] plus a private `lease_until`,
//! `u64::MAX` for a lock without a lease) and a FIFO queue of waiters. Tokens come from one
//! store-wide counter.
//!
//! - **A lock stays held until [`reap`](LockStore::reap) ends it**, even after its hold limit
//!   (`expires_at`) or lease (`lease_until`) has passed: [`get`](LockStore::get) and
//!   [`list_room`](LockStore::list_room) still show it, and its holder may still `release` it.
//!   Every expiry goes through `reap`, so events are announced in order: an expiry is always
//!   announced before the grant that follows it. Past its end a lock is no longer *live* for its
//!   holder, though: a re-acquire is not reentrant, and `extend`/`refresh_leases` refuse it.
//! - **Waiters are served in the step that frees the lock** (`release`, `force_release`,
//!   `release_session`, `reap`): the first waiter whose deadline has not passed gets it. Waiters
//!   past their deadline are never granted; they stay queued until `reap` reports them with
//!   [`LockTransition::WaitExpired`]. Hence a free lock only ever has expired waiters queued,
//!   and `acquire` on a free lock grants the requester directly.
//! - **Reentrant acquire** (same session, lock live) returns the existing grant with
//!   `reentrant: true` and writes **no** audit record: nothing changed, and a retried request
//!   must not look like a second grant in the trail.
//! - A session already queued for the resource keeps its place when it asks again (with or
//!   without `wait`); it is answered with its current position and a `lock_waiting` record with
//!   `"already_queued": true`.
//! - A session granted a lock directly while it still had an (expired, unreaped) queue entry for
//!   the same resource loses that entry silently: its new request was answered.
//!
//! # Indexes
//!
//! - `held_by` / `waiting_in`: session → resources, so `release_session` is not a full scan.
//! - `by_room`: room → resources with a lock announced in it, for `list_room`.
//! - `due`: `(instant, resource)` ordered by instant, one exact entry per resource for the
//!   earliest of its lock's end and its waiters' deadlines, kept up to date on every change, so
//!   `reap` costs O(due · log n), not O(all locks).
//!
//! A resource with no lock and no waiters is removed from the maps: nothing stays behind per
//! resource name, however many names clients make up.
//!
//! # Audit
//!
//! Every transition's records are built under the mutex (so their UUIDv7 ids follow the order of
//! the state changes) and appended after it is dropped. Two concurrent operations may therefore
//! reach the sink in either order; the ids, not the arrival order, give the sequence. If the
//! append fails, the error is logged and the call still succeeds: the state change stands (the
//! memory store has no transactions to roll back) and must be announced.
//!
//! | kind | ids from | token | detail |
//! | --- | --- | --- | --- |
//! | `lock_acquired` | new holder | new | `{action, ttl_ms, via: "request"\|"queue"}` (+ `request_id` via queue) |
//! | `lock_acquired` (reissue) | holder | fresh | `{action, via: "reissue", replaces: "<old token>"}` |
//! | `lock_denied` | requester | holder's | `{action, holder: {user_id, session_id, action}}` |
//! | `lock_waiting` | requester | holder's | `{action, ttl_ms, position, timeout_ms, request_id}` (+ `already_queued`) |
//! | `lock_released` / `lock_expired` / `lock_disconnected` | holder | held | — |
//! | `lock_forced` | holder | held | `{by: actor user_id}`; the record's `actor` is the [`Actor`] |
//! | `lock_released` by an admin with the token | holder | held | `{by}` + `actor`, as above |
//! | `lock_withdrawn` | holder | held | `{reason}`: strict fencing could not register the grant |
//! | `lock_extended` | holder | held | `{ttl_ms, expires_at}` |
//! | `lock_wait_cancelled` / `lock_wait_expired` | waiter | — | `{request_id}` |

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::json;

use super::lock_state;
use crate::audit::{AuditKind, AuditRecord, AuditSink};
use crate::engine::{
    AcquireOutcome, AcquireRequest, Actor, EngineResult, Grant, Holder, LockInfo, LockKey,
    LockStore, LockTransition, ReleaseReason, RoomPage, SessionId, TokenOutcome, now_ms,
};
use crate::names::Entity;

/// The in-process [`LockStore`].
pub struct MemoryLockStore {
    state: Mutex<State>,
    audit: Arc<dyn AuditSink>,
}

impl MemoryLockStore {
    /// A store appending the records of its transitions to `audit`.
    pub fn new(audit: Arc<dyn AuditSink>) -> MemoryLockStore {
        MemoryLockStore {
            state: Mutex::new(State::default()),
            audit,
        }
    }

    fn state(&self) -> EngineResult<std::sync::MutexGuard<'_, State>> {
        lock_state(&self.state, "lock store")
    }

    /// Appends the records of a transition that has already happened (see the module doc).
    async fn record(&self, records: Vec<AuditRecord>) -> EngineResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        // The transition has happened and must still be announced (a lost announcement
        // leaves clients and leases out of step with the store), so a failed append is
        // logged loudly rather than turned into an error for the caller.
        if let Err(e) = self.audit.append(records).await {
            tracing::error!(error = %e, "audit append failed; lock transition kept");
        }
        Ok(())
    }
}

#[derive(Default)]
struct State {
    /// Keyed by lock identity (room, resource): the same resource locked in two rooms is two
    /// independent entries.
    resources: HashMap<LockKey, Resource>,
    /// Last token issued, for every resource: one counter seeded from the clock is strictly
    /// increasing per resource too, and needs no per-resource entry that would grow forever
    /// with every resource name ever locked (see [`State::next_token`]).
    last_token: u64,
    held_by: HashMap<SessionId, HashSet<LockKey>>,
    waiting_in: HashMap<SessionId, HashSet<LockKey>>,
    by_room: HashMap<Entity, HashSet<LockKey>>,
    /// `(instant, key)`: when `reap` must next look at the lock.
    due: BTreeSet<(u64, LockKey)>,
}

#[derive(Default)]
struct Resource {
    lock: Option<Held>,
    waiters: VecDeque<Waiter>,
    /// The instant this resource is filed under in `State::due`, if any.
    scheduled: Option<u64>,
}

struct Held {
    info: LockInfo,
    /// The lease duration asked at grant time, reused by `extend`; `None` = no lease.
    lease_ms: Option<u64>,
    /// `u64::MAX` without a lease.
    lease_until: u64,
}

impl Held {
    /// When the lock stops being live: the earlier of its hold limit and its lease.
    fn ends_at(&self) -> u64 {
        self.info.expires_at.min(self.lease_until)
    }
}

struct Waiter {
    holder: Holder,
    room: Entity,
    action: Arc<str>,
    ttl_ms: u64,
    lease_ms: Option<u64>,
    deadline: u64,
    request_id: Option<u32>,
}

/// Microseconds since the Unix epoch.
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

fn index_add<K: Hash + Eq + Clone>(
    index: &mut HashMap<K, HashSet<LockKey>>,
    key: &K,
    resource: &LockKey,
) {
    index
        .entry(key.clone())
        .or_default()
        .insert(resource.clone());
}

fn index_remove<K: Hash + Eq>(
    index: &mut HashMap<K, HashSet<LockKey>>,
    key: &K,
    resource: &LockKey,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(resource);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// A record about a granted lock: ids from its holder, its token.
fn lock_record(kind: AuditKind, now: u64, lock: &LockInfo) -> AuditRecord {
    AuditRecord {
        at: now,
        room: Some(lock.room.as_str().into()),
        resource: Some(lock.resource.as_str().into()),
        user_id: Some(lock.holder.user_id.clone()),
        session_id: Some(lock.holder.session_id.clone()),
        token: Some(lock.token),
        ..AuditRecord::new(kind, lock.holder.node_id.clone())
    }
}

/// A record about a requester or waiter (who holds no token).
fn requester_record(
    kind: AuditKind,
    now: u64,
    room: &Entity,
    resource: &Entity,
    who: &Holder,
) -> AuditRecord {
    AuditRecord {
        at: now,
        room: Some(room.as_str().into()),
        resource: Some(resource.as_str().into()),
        user_id: Some(who.user_id.clone()),
        session_id: Some(who.session_id.clone()),
        ..AuditRecord::new(kind, who.node_id.clone())
    }
}

fn release_kind(reason: ReleaseReason) -> AuditKind {
    match reason {
        ReleaseReason::Released => AuditKind::LockReleased,
        ReleaseReason::Expired => AuditKind::LockExpired,
        ReleaseReason::Disconnected => AuditKind::LockDisconnected,
        ReleaseReason::Forced => AuditKind::LockForced,
        ReleaseReason::Revoked => AuditKind::LockRevoked,
        // Never passed to a store (see `ReleaseReason::Lost`); were it, the lease lapsed.
        ReleaseReason::Lost => AuditKind::LockExpired,
    }
}

/// How a lock ends, for its audit record.
enum End<'a> {
    /// For `reason`; `actor` when somebody else ends it (forced).
    Reason(ReleaseReason, Option<&'a Actor>),
    /// Taken back before its token was told (strict fencing could not register it).
    Withdrawn(&'a str),
}

/// What a new grant is made of, from a direct request or a queued one.
struct GrantSpec {
    holder: Holder,
    room: Entity,
    action: Arc<str>,
    ttl_ms: u64,
    lease_ms: Option<u64>,
    /// `None` for a direct request; `Some(request_id)` when served from the queue.
    via_queue: Option<Option<u32>>,
}

impl State {
    /// Takes a resource's state out of the map for the duration of an operation, so the other
    /// maps can be borrowed freely; [`State::put_back`] files it again.
    fn take(&mut self, resource: &LockKey) -> Resource {
        self.resources.remove(resource).unwrap_or_default()
    }

    /// Files a resource again: updates its `due` entry, drops it when it is empty.
    fn put_back(&mut self, resource: &LockKey, mut r: Resource) {
        let next = r
            .waiters
            .iter()
            .map(|w| w.deadline)
            .chain(r.lock.as_ref().map(Held::ends_at))
            .min();
        if next != r.scheduled {
            if let Some(old) = r.scheduled.take() {
                self.due.remove(&(old, resource.clone()));
            }
            if let Some(at) = next {
                self.due.insert((at, resource.clone()));
            }
            r.scheduled = next;
        }
        if r.lock.is_some() || !r.waiters.is_empty() {
            self.resources.insert(resource.clone(), r);
        }
    }

    /// The next fencing token: `max(last + 1, unix_time_micros())`, shared by all resources
    /// (strictly increasing overall, so strictly increasing per resource).
    ///
    /// Memory is lost when the process restarts, and a restarted embedded node must never issue
    /// a token smaller than one it issued before (a stale holder would then pass the protected
    /// store's fencing check). Seeding every token from the wall clock in microseconds makes a
    /// fresh process start above anything issued earlier (unless the clock is stepped back),
    /// and `last + 1` keeps tokens strictly increasing within a process even for several grants
    /// in one microsecond or a clock stepped back. Microseconds keep tokens below 2^53 (exact in
    /// a JavaScript number) until about the year 2255.
    fn next_token(&mut self) -> u64 {
        let next = self.last_token.saturating_add(1).max(unix_micros());
        self.last_token = next;
        next
    }

    /// Grants `resource` (which must be free) and records `lock_acquired`.
    fn grant(
        &mut self,
        resource: &LockKey,
        r: &mut Resource,
        now: u64,
        spec: GrantSpec,
        audit: &mut Vec<AuditRecord>,
    ) -> LockInfo {
        let token = self.next_token();
        let info = LockInfo {
            room: spec.room,
            resource: resource.resource.clone(),
            token,
            holder: spec.holder,
            action: spec.action,
            since: now,
            expires_at: now.saturating_add(spec.ttl_ms),
        };
        // The new holder's own queue entry (if any, necessarily expired) is answered by this grant.
        if let Some(i) = r
            .waiters
            .iter()
            .position(|w| w.holder.session_id == info.holder.session_id)
        {
            r.waiters.remove(i);
            index_remove(&mut self.waiting_in, &info.holder.session_id, resource);
        }
        index_add(&mut self.held_by, &info.holder.session_id, resource);
        index_add(&mut self.by_room, &info.room, resource);
        let mut detail = json!({
            "action": info.action,
            "ttl_ms": spec.ttl_ms,
            "via": if spec.via_queue.is_some() { "queue" } else { "request" },
        });
        if let Some(request_id) = spec.via_queue {
            detail["request_id"] = json!(request_id);
        }
        audit.push(AuditRecord {
            detail,
            ..lock_record(AuditKind::LockAcquired, now, &info)
        });
        r.lock = Some(Held {
            info: info.clone(),
            lease_ms: spec.lease_ms,
            lease_until: spec.lease_ms.map_or(u64::MAX, |l| now.saturating_add(l)),
        });
        info
    }

    /// Ends the current lock for `reason` and hands it to the first waiter whose deadline has
    /// not passed, in the same step. Expired waiters stay queued for `reap` to report.
    fn end_lock(
        &mut self,
        resource: &LockKey,
        r: &mut Resource,
        now: u64,
        end: End<'_>,
        audit: &mut Vec<AuditRecord>,
    ) -> Option<LockTransition> {
        let held = r.lock.take()?;
        let lock = held.info;
        index_remove(&mut self.held_by, &lock.holder.session_id, resource);
        index_remove(&mut self.by_room, &lock.room, resource);
        let (reason, record) = match end {
            End::Reason(reason, actor) => {
                let mut record = lock_record(release_kind(reason), now, &lock);
                if let Some(actor) = actor {
                    record.detail = json!({ "by": actor.user_id });
                    record.actor = Some(actor.clone());
                }
                (reason, record)
            }
            End::Withdrawn(why) => {
                let mut record = lock_record(AuditKind::LockWithdrawn, now, &lock);
                record.detail = json!({ "reason": why });
                (ReleaseReason::Released, record)
            }
        };
        audit.push(record);

        let granted = match r.waiters.iter().position(|w| w.deadline > now) {
            Some(i) => r.waiters.remove(i).map(|w| {
                index_remove(&mut self.waiting_in, &w.holder.session_id, resource);
                let request_id = w.request_id;
                let spec = GrantSpec {
                    holder: w.holder,
                    room: w.room,
                    action: w.action,
                    ttl_ms: w.ttl_ms,
                    lease_ms: w.lease_ms,
                    via_queue: Some(request_id),
                };
                let lock = self.grant(resource, r, now, spec, audit);
                Grant { lock, request_id }
            }),
            None => None,
        };
        Some(LockTransition::Released {
            lock,
            reason,
            granted,
        })
    }

    /// Removes `session_id`'s queue entry (if any) and records `kind` for it.
    fn drop_wait(
        &mut self,
        resource: &LockKey,
        r: &mut Resource,
        now: u64,
        session_id: &SessionId,
        rooms: Option<&[Entity]>,
        audit: &mut Vec<AuditRecord>,
    ) -> bool {
        let Some(i) = r.waiters.iter().position(|w| {
            &w.holder.session_id == session_id && rooms.is_none_or(|rs| rs.contains(&w.room))
        }) else {
            return false;
        };
        let Some(w) = r.waiters.remove(i) else {
            return false;
        };
        index_remove(&mut self.waiting_in, session_id, resource);
        audit.push(AuditRecord {
            detail: json!({ "request_id": w.request_id }),
            ..requester_record(
                AuditKind::LockWaitCancelled,
                now,
                &w.room,
                &resource.resource,
                &w.holder,
            )
        });
        true
    }

    fn acquire(
        &mut self,
        req: AcquireRequest,
        now: u64,
        audit: &mut Vec<AuditRecord>,
    ) -> AcquireOutcome {
        let resource = LockKey::new(req.room.clone(), req.resource.clone());
        let mut r = self.take(&resource);
        let outcome = self.acquire_in(&resource, &mut r, req, now, audit);
        self.put_back(&resource, r);
        outcome
    }

    fn acquire_in(
        &mut self,
        resource: &LockKey,
        r: &mut Resource,
        req: AcquireRequest,
        now: u64,
        audit: &mut Vec<AuditRecord>,
    ) -> AcquireOutcome {
        let Some(held) = &r.lock else {
            // Free: only expired waiters can be queued (see the module doc), so grant directly.
            let spec = GrantSpec {
                holder: req.holder,
                room: req.room,
                action: req.action,
                ttl_ms: req.ttl_ms,
                lease_ms: req.lease_ms,
                via_queue: None,
            };
            let lock = self.grant(resource, r, now, spec, audit);
            return AcquireOutcome::Granted {
                lock,
                reentrant: false,
            };
        };
        if held.info.holder.session_id == req.holder.session_id && now < held.ends_at() {
            return AcquireOutcome::Granted {
                lock: held.info.clone(),
                reentrant: true,
            };
        }

        let current = held.info.clone();
        let holder_left = current.expires_at.saturating_sub(now);
        let queued_at = r
            .waiters
            .iter()
            .position(|w| w.holder.session_id == req.holder.session_id);
        let (ahead, position, kind, mut detail) = match (queued_at, &req.wait) {
            (Some(i), _) => (
                i,
                Some(i + 1),
                AuditKind::LockWaiting,
                json!({ "position": i + 1, "already_queued": true }),
            ),
            (None, Some(wait)) => {
                r.waiters.push_back(Waiter {
                    holder: req.holder.clone(),
                    room: req.room.clone(),
                    action: req.action.clone(),
                    ttl_ms: req.ttl_ms,
                    lease_ms: req.lease_ms,
                    deadline: now.saturating_add(wait.timeout_ms),
                    request_id: wait.request_id,
                });
                index_add(&mut self.waiting_in, &req.holder.session_id, resource);
                let n = r.waiters.len();
                (
                    n - 1,
                    Some(n),
                    AuditKind::LockWaiting,
                    json!({
                        "position": n,
                        "timeout_ms": wait.timeout_ms,
                        "request_id": wait.request_id,
                    }),
                )
            }
            (None, None) => (
                r.waiters.len(),
                None,
                AuditKind::LockDenied,
                json!({
                    "holder": {
                        "user_id": current.holder.user_id,
                        "session_id": current.holder.session_id,
                        "action": current.action,
                    }
                }),
            ),
        };
        detail["action"] = json!(req.action);
        detail["ttl_ms"] = json!(req.ttl_ms);
        // An upper bound: the holder keeps the lock at most to its hold limit, and each waiter
        // ahead at most for its own hold limit (extensions aside).
        let estimated_wait_ms = r
            .waiters
            .iter()
            .take(ahead)
            .fold(holder_left, |acc, w| acc.saturating_add(w.ttl_ms));
        audit.push(AuditRecord {
            token: Some(current.token),
            detail,
            ..requester_record(kind, now, &req.room, &req.resource, &req.holder)
        });
        AcquireOutcome::Held {
            current,
            queue_position: position.map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
            estimated_wait_ms,
        }
    }

    fn reap(&mut self, now: u64, audit: &mut Vec<AuditRecord>) -> Vec<LockTransition> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.due.first() {
            if *at > now {
                break;
            }
            let Some((_, resource)) = self.due.pop_first() else {
                break;
            };
            let mut r = self.take(&resource);
            r.scheduled = None;
            // Waiters first: one past its deadline must not be granted the lock freed below.
            let mut i = 0;
            while i < r.waiters.len() {
                if r.waiters[i].deadline > now {
                    i += 1;
                    continue;
                }
                let Some(w) = r.waiters.remove(i) else {
                    break;
                };
                index_remove(&mut self.waiting_in, &w.holder.session_id, &resource);
                audit.push(AuditRecord {
                    detail: json!({ "request_id": w.request_id }),
                    ..requester_record(
                        AuditKind::LockWaitExpired,
                        now,
                        &w.room,
                        &resource.resource,
                        &w.holder,
                    )
                });
                out.push(LockTransition::WaitExpired {
                    room: w.room,
                    resource: resource.resource.clone(),
                    session_id: w.holder.session_id,
                    request_id: w.request_id,
                });
            }
            let reason = match &r.lock {
                Some(h) if now >= h.info.expires_at => Some(ReleaseReason::Expired),
                Some(h) if now >= h.lease_until => Some(ReleaseReason::Disconnected),
                _ => None,
            };
            if let Some(reason) = reason {
                out.extend(self.end_lock(&resource, &mut r, now, End::Reason(reason, None), audit));
            }
            self.put_back(&resource, r);
        }
        out
    }
}

#[async_trait]
impl LockStore for MemoryLockStore {
    async fn acquire(&self, req: AcquireRequest) -> EngineResult<AcquireOutcome> {
        let mut audit = Vec::new();
        let outcome = self.state()?.acquire(req, now_ms(), &mut audit);
        self.record(audit).await?;
        Ok(outcome)
    }

    async fn release(
        &self,
        key: &LockKey,
        token: u64,
        reason: ReleaseReason,
        actor: Option<&Actor>,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        self.end_with_token(key, token, End::Reason(reason, actor))
            .await
    }

    async fn withdraw(
        &self,
        key: &LockKey,
        token: u64,
        why: &str,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        self.end_with_token(key, token, End::Withdrawn(why)).await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: u64,
        ttl_ms: u64,
    ) -> EngineResult<TokenOutcome<LockInfo>> {
        let now = now_ms();
        let mut audit = Vec::new();
        let outcome = {
            let mut st = self.state()?;
            let mut r = st.take(key);
            let outcome = match &mut r.lock {
                Some(h) if h.info.token == token && now < h.ends_at() => {
                    h.info.expires_at = now.saturating_add(ttl_ms);
                    if let Some(lease_ms) = h.lease_ms {
                        h.lease_until = now.saturating_add(lease_ms);
                    }
                    audit.push(AuditRecord {
                        detail: json!({ "ttl_ms": ttl_ms, "expires_at": h.info.expires_at }),
                        ..lock_record(AuditKind::LockExtended, now, &h.info)
                    });
                    TokenOutcome::Done(h.info.clone())
                }
                other => TokenOutcome::NotHeld {
                    current: other.as_ref().map(|h| h.info.clone()),
                },
            };
            st.put_back(key, r);
            outcome
        };
        self.record(audit).await?;
        Ok(outcome)
    }

    async fn cancel_wait(&self, key: &LockKey, session_id: &SessionId) -> EngineResult<bool> {
        let now = now_ms();
        let mut audit = Vec::new();
        let removed = {
            let mut st = self.state()?;
            let mut r = st.take(key);
            let removed = st.drop_wait(key, &mut r, now, session_id, None, &mut audit);
            st.put_back(key, r);
            removed
        };
        self.record(audit).await?;
        Ok(removed)
    }

    async fn force_release(
        &self,
        key: &LockKey,
        actor: &Actor,
    ) -> EngineResult<Option<LockTransition>> {
        let now = now_ms();
        let mut audit = Vec::new();
        let transition = {
            let mut st = self.state()?;
            let mut r = st.take(key);
            let end = End::Reason(ReleaseReason::Forced, Some(actor));
            let t = st.end_lock(key, &mut r, now, end, &mut audit);
            st.put_back(key, r);
            t
        };
        self.record(audit).await?;
        Ok(transition)
    }

    async fn release_session(
        &self,
        session_id: &SessionId,
        reason: ReleaseReason,
        rooms: Option<&[Entity]>,
    ) -> EngineResult<Vec<LockTransition>> {
        let now = now_ms();
        let mut audit = Vec::new();
        let mut out = Vec::new();
        {
            let mut st = self.state()?;
            // Waits first, so a released lock is never handed to the session that is leaving.
            let mut waits: Vec<LockKey> = st
                .waiting_in
                .get(session_id)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            waits.sort();
            for key in waits {
                let mut r = st.take(&key);
                st.drop_wait(&key, &mut r, now, session_id, rooms, &mut audit);
                st.put_back(&key, r);
            }
            let mut held: Vec<LockKey> = st
                .held_by
                .get(session_id)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            held.sort();
            for key in held {
                let mut r = st.take(&key);
                let matches = r.lock.as_ref().is_some_and(|h| {
                    &h.info.holder.session_id == session_id
                        && rooms.is_none_or(|rs| rs.contains(&h.info.room))
                });
                if matches {
                    let end = End::Reason(reason, None);
                    out.extend(st.end_lock(&key, &mut r, now, end, &mut audit));
                }
                st.put_back(&key, r);
            }
        }
        self.record(audit).await?;
        Ok(out)
    }

    async fn refresh_leases(
        &self,
        held: &[(LockKey, u64)],
        lease_ms: u64,
    ) -> EngineResult<Vec<(LockKey, u64)>> {
        let now = now_ms();
        let mut lost = Vec::new();
        let mut st = self.state()?;
        for (key, token) in held {
            let Some(mut r) = st.resources.remove(key) else {
                lost.push((key.clone(), *token));
                continue;
            };
            match &mut r.lock {
                Some(h) if h.info.token == *token && now < h.ends_at() => {
                    // A lock granted without a lease (HTTP) lives to its hold limit; it stays so.
                    if h.lease_ms.is_some() {
                        h.lease_until = now.saturating_add(lease_ms);
                    }
                }
                _ => lost.push((key.clone(), *token)),
            }
            st.put_back(key, r);
        }
        Ok(lost)
    }

    async fn reap(&self, now_ms: u64) -> EngineResult<Vec<LockTransition>> {
        let mut audit = Vec::new();
        let out = self.state()?.reap(now_ms, &mut audit);
        self.record(audit).await?;
        Ok(out)
    }

    async fn get(&self, key: &LockKey) -> EngineResult<Option<LockInfo>> {
        Ok(self
            .state()?
            .resources
            .get(key)
            .and_then(|r| r.lock.as_ref())
            .map(|h| h.info.clone()))
    }

    /// Live = inside the hold limit and the lease (`Held::ends_at`), by this process' clock.
    async fn validate(&self, key: &LockKey, token: u64) -> EngineResult<(bool, Option<LockInfo>)> {
        let now = now_ms();
        let st = self.state()?;
        let held = st.resources.get(key).and_then(|r| r.lock.as_ref());
        let valid = held.is_some_and(|h| h.info.token == token && now < h.ends_at());
        Ok((valid, held.map(|h| h.info.clone())))
    }

    /// Uses the room index (room → locks), not a scan; sorted by resource name.
    async fn list_room(&self, room: &Entity) -> EngineResult<Vec<LockInfo>> {
        let st = self.state()?;
        let mut locks: Vec<LockInfo> = st
            .by_room
            .get(room)
            .into_iter()
            .flatten()
            .filter_map(|key| st.resources.get(key)?.lock.as_ref())
            .map(|h| h.info.clone())
            .collect();
        locks.sort_by(|a, b| a.resource.cmp(&b.resource));
        Ok(locks)
    }

    /// Rooms by name from the room index, counting held locks only (not waits).
    async fn room_page(&self, after: &str, count: usize) -> EngineResult<Option<RoomPage>> {
        let st = self.state()?;
        let rooms = st.by_room.iter().map(|(room, keys)| {
            let held = keys
                .iter()
                .filter(|k| st.resources.get(*k).is_some_and(|r| r.lock.is_some()))
                .count();
            (room, held)
        });
        Ok(super::page_by_name(rooms, after, count))
    }

    /// One counter serves every lock here, so raising it raises every lock's next token.
    async fn raise_fence(&self, _key: &LockKey, at_least: u64) -> EngineResult<()> {
        let mut st = self.state()?;
        st.last_token = st.last_token.max(at_least);
        Ok(())
    }

    async fn reissue(&self, key: &LockKey, token: u64) -> EngineResult<TokenOutcome<LockInfo>> {
        let now = now_ms();
        let mut audit = Vec::new();
        let outcome = {
            let mut st = self.state()?;
            let mut r = st.take(key);
            let outcome = match &mut r.lock {
                Some(h) if h.info.token == token && now < h.ends_at() => {
                    h.info.token = st.next_token();
                    audit.push(AuditRecord {
                        detail: reissue_detail(&h.info.action, token),
                        ..lock_record(AuditKind::LockAcquired, now, &h.info)
                    });
                    TokenOutcome::Done(h.info.clone())
                }
                other => TokenOutcome::NotHeld {
                    current: other.as_ref().map(|h| h.info.clone()),
                },
            };
            st.put_back(key, r);
            outcome
        };
        self.record(audit).await?;
        Ok(outcome)
    }
}

impl MemoryLockStore {
    /// Compare-and-delete on `token`, ending the lock as `end` says (release or withdrawal).
    async fn end_with_token(
        &self,
        key: &LockKey,
        token: u64,
        end: End<'_>,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        let now = now_ms();
        let mut audit = Vec::new();
        let outcome = {
            let mut st = self.state()?;
            let mut r = st.take(key);
            let outcome = match &r.lock {
                Some(h) if h.info.token == token => st
                    .end_lock(key, &mut r, now, end, &mut audit)
                    .map_or(TokenOutcome::NotHeld { current: None }, TokenOutcome::Done),
                other => TokenOutcome::NotHeld {
                    current: other.as_ref().map(|h| h.info.clone()),
                },
            };
            st.put_back(key, r);
            outcome
        };
        self.record(audit).await?;
        Ok(outcome)
    }
}

/// Detail of the `lock_acquired` record of a reissued grant. The replaced token is a decimal
/// string, as the Redis store writes it (exact beyond cjson's 14 digits).
fn reissue_detail(action: &str, replaced: u64) -> serde_json::Value {
    json!({ "action": action, "via": "reissue", "replaces": replaced.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WaitSpec;
    use crate::engine::conformance::RecordingAuditSink;

    fn holder(s: &str) -> Holder {
        Holder {
            user_id: s.into(),
            name: s.into(),
            session_id: s.into(),
            node_id: "n1".into(),
        }
    }

    fn req(resource: &str, who: &str, ttl_ms: u64, wait: Option<u64>) -> AcquireRequest {
        AcquireRequest {
            room: Entity::parse("scene:1").unwrap(),
            resource: Entity::parse(resource).unwrap(),
            action: "edit".into(),
            holder: holder(who),
            ttl_ms,
            lease_ms: Some(1_000),
            wait: wait.map(|timeout_ms| WaitSpec {
                timeout_ms,
                request_id: Some(7),
            }),
        }
    }

    /// Internal indexes are emptied by churn: nothing stays behind.
    #[tokio::test]
    async fn indexes_do_not_grow_with_churn() {
        let store = MemoryLockStore::new(Arc::new(RecordingAuditSink::new()));
        for i in 0..50 {
            let res = format!("segment:{i}");
            let AcquireOutcome::Granted { lock, .. } =
                store.acquire(req(&res, "a", 60_000, None)).await.unwrap()
            else {
                panic!("not granted");
            };
            store
                .acquire(req(&res, "b", 60_000, Some(60_000)))
                .await
                .unwrap();
            store
                .acquire(req(&res, "c", 60_000, Some(1)))
                .await
                .unwrap();
            store
                .release(&lock.key(), lock.token, ReleaseReason::Released, None)
                .await
                .unwrap();
            store
                .release_session(&"b".into(), ReleaseReason::Disconnected, None)
                .await
                .unwrap();
        }
        // c (1 ms timeout) was either granted b's lock or expired: both end here.
        store
            .release_session(&"c".into(), ReleaseReason::Disconnected, None)
            .await
            .unwrap();
        store.reap(now_ms() + 10).await.unwrap();
        let st = store.state.lock().unwrap();
        assert!(st.resources.is_empty());
        assert!(st.held_by.is_empty());
        assert!(st.waiting_in.is_empty());
        assert!(st.by_room.is_empty());
        assert!(st.due.is_empty());
    }

    /// The `due` index has exactly one entry per resource with something to reap.
    #[tokio::test]
    async fn due_index_is_exact() {
        let store = MemoryLockStore::new(Arc::new(RecordingAuditSink::new()));
        store
            .acquire(req("segment:1", "a", 60_000, None))
            .await
            .unwrap();
        store
            .acquire(req("segment:1", "b", 60_000, Some(5_000)))
            .await
            .unwrap();
        store
            .acquire(req("segment:2", "a", 60_000, None))
            .await
            .unwrap();
        let st = store.state.lock().unwrap();
        assert_eq!(st.due.len(), 2);
        for (at, res) in &st.due {
            assert_eq!(st.resources[res].scheduled, Some(*at));
        }
    }

    #[test]
    fn tokens_are_strictly_increasing_and_clock_seeded() {
        let mut st = State::default();
        let before = unix_micros();
        let t1 = st.next_token();
        let t2 = st.next_token();
        assert!(t1 >= before);
        assert!(t2 > t1);
        st.last_token = u64::MAX - 1;
        assert_eq!(st.next_token(), u64::MAX);
        assert!(t2 < (1u64 << 53));
    }
}
