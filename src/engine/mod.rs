//! The engines a [`Node`](crate::node::Node) coordinates through, as traits.
//!
//! Four engines, each with an in-process implementation in [`memory`] (the embedded default)
//! and, later, a Redis one beside it:
//!
//! - [`LockStore`]: exclusive locks with fencing tokens, FIFO waiters, leases and hold limits.
//! - [`PresenceStore`]: who is in which room and what they focus on.
//! - [`Broker`]: fan-out of [`RoomEvent`]s to every node with members in the room.
//! - [`AuditSink`](crate::audit::AuditSink): durable audit records.
//!
//! Engines know nothing of sockets or HTTP. Every implementation must pass
//! [`conformance`], which is written against these traits only.

pub mod conformance;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::names::Entity;

/// Session ids and user ids are cloned into every event, so they are shared strings.
pub type SessionId = Arc<str>;
pub type UserId = Arc<str>;

/// Milliseconds since the Unix epoch; every timestamp on the wire and in engines uses it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// An engine failure. Callers map it to the `unavailable` error code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    #[error("engine error: {0}")]
    Internal(String),
    /// `PresenceStore::join` of a new member into a room at the store's member cap.
    #[error("the room is full ({0} members)")]
    RoomFull(usize),
    /// A change to lock state was made on the Redis primary but not acknowledged by the
    /// required replicas in time (`LOCKSTEP_LOCK_REPLICAS`): a failover could lose it.
    /// `grant` is a new grant that nobody has been told of yet: the caller withdraws it
    /// (`LockStore::withdraw`) before answering `unavailable`. See `docs/fencing.md`.
    #[error("not acknowledged by enough replicas: {what}")]
    NotReplicated {
        what: String,
        grant: Option<Box<LockInfo>>,
    },
}

pub type EngineResult<T> = Result<T, EngineError>;

/// A member of a room as everyone sees it (`presence.*` events, snapshots, HTTP presence).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub user_id: UserId,
    pub session_id: SessionId,
    pub name: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<Arc<str>>,
    pub color: Arc<str>,
    pub role: crate::auth::Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub focus: Option<Entity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<serde_json::Value>,
    /// When this session joined the room (ms).
    pub since: u64,
}

impl Member {
    /// `principal`'s member of a room it joins now as `session_id`, with no focus yet.
    pub fn joining(
        principal: &crate::auth::Principal,
        session_id: SessionId,
        role: crate::auth::Role,
        state: Option<serde_json::Value>,
    ) -> Member {
        Member {
            user_id: principal.user_id.clone(),
            session_id,
            name: principal.name.clone(),
            avatar: principal.avatar.clone(),
            color: principal.color.clone(),
            role,
            focus: None,
            state,
            since: now_ms(),
        }
    }
}

/// Who holds (or asks for) a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub user_id: UserId,
    pub name: Arc<str>,
    pub session_id: SessionId,
    /// The node whose session holds it; sweeps of dead nodes use it.
    pub node_id: Arc<str>,
}

/// The identity of a lock: a resource *as locked in a room*.
///
/// `segment:42-7` locked in `scene:1` and in `scene:42` are two different locks, with
/// independent holders, queues and fencing counters: nothing done in one room can block, show
/// up in, or be released from the other. That is what binds a lock to its room — the role
/// check is made in the room of the key, and the key is all a store knows.
///
/// Written `room/resource` (`Display`, [`LockKey::parse`]): `/` cannot occur in entity names,
/// so the text form is unambiguous. It is the memory store's map key, the Redis key suffix and
/// shard hash input, and the fencing registry's primary key is the same pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockKey {
    pub room: Entity,
    pub resource: Entity,
}

impl LockKey {
    pub fn new(room: Entity, resource: Entity) -> LockKey {
        LockKey { room, resource }
    }

    /// Parses `room/resource`.
    pub fn parse(s: &str) -> Option<LockKey> {
        let (room, resource) = s.split_once('/')?;
        Some(LockKey {
            room: Entity::parse(room).ok()?,
            resource: Entity::parse(resource).ok()?,
        })
    }
}

impl std::fmt::Display for LockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.room, self.resource)
    }
}

/// A granted lock as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub room: Entity,
    pub resource: Entity,
    /// Fencing token: strictly increasing per lock key (room, resource), forever.
    pub token: u64,
    pub holder: Holder,
    pub action: Arc<str>,
    /// When it was granted (ms).
    pub since: u64,
    /// The hold limit (ms): the lock is released with reason `expired` at this instant.
    pub expires_at: u64,
}

impl LockInfo {
    /// The lock's identity.
    pub fn key(&self) -> LockKey {
        LockKey::new(self.room.clone(), self.resource.clone())
    }
}

/// Why a lock ended; sent as `lock.released {reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    Released,
    Expired,
    Disconnected,
    Forced,
    /// The holder's token no longer makes it an editor of the lock's room (refresh, resume)
    /// or its session was revoked by an admin.
    Revoked,
    /// The holder's node could not renew the lease in time (it lost Redis): the lock may be
    /// granted to somebody else as soon as the lease runs out. Told by that node only, to the
    /// holder and its local members of the room (`node::leases`). **Never given to a store**:
    /// nothing ends the lock in the store, whose lease just lapses (reaped as `disconnected`); the
    /// Redis scripts know no such reason.
    Lost,
}

impl ReleaseReason {
    /// The wire name (`lock.released {reason}`), also the metrics label and the Lua argument.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::Released => "released",
            ReleaseReason::Expired => "expired",
            ReleaseReason::Disconnected => "disconnected",
            ReleaseReason::Forced => "forced",
            ReleaseReason::Revoked => "revoked",
            ReleaseReason::Lost => "lost",
        }
    }
}

/// A queued acquire: how long to wait and the request id to answer when served or timed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitSpec {
    pub timeout_ms: u64,
    pub request_id: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub room: Entity,
    pub resource: Entity,
    pub action: Arc<str>,
    pub holder: Holder,
    /// Hold limit for this grant; already clamped to the configured maximum.
    pub ttl_ms: u64,
    /// Lease kept alive by the holder's node; `None` for HTTP locks, which live to their hold limit.
    pub lease_ms: Option<u64>,
    /// `Some` when the requester asked to queue if the lock is held.
    pub wait: Option<WaitSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AcquireOutcome {
    /// The lock is the requester's. `reentrant` is true when the same session already held it
    /// (a retried acquire): the grant is the existing one, with the same token.
    Granted { lock: LockInfo, reentrant: bool },
    /// Someone else holds it. `queue_position` (1 = next) is set when the requester is queued.
    Held {
        current: LockInfo,
        queue_position: Option<u32>,
        estimated_wait_ms: u64,
    },
}

/// A lock handed to the head waiter in the same step that freed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub lock: LockInfo,
    /// The waiter's original request id, echoed in `lock.granted`.
    pub request_id: Option<u32>,
}

/// A change of lock state that must be announced to the lock's room.
// Transitions are short-lived and moved, never stored in bulk: boxing the large variant
// would cost an allocation per release for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockTransition {
    /// `lock` ended for `reason`; `granted` is the head waiter that received it, if any.
    Released {
        lock: LockInfo,
        reason: ReleaseReason,
        granted: Option<Grant>,
    },
    /// A queued acquire was not served in time and left the queue.
    WaitExpired {
        room: Entity,
        resource: Entity,
        session_id: SessionId,
        request_id: Option<u32>,
    },
}

/// Outcome of a token-checked release or extend.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenOutcome<T> {
    Done(T),
    /// The token is not the live holder's; `current` is who holds the resource now, if anyone.
    NotHeld {
        current: Option<LockInfo>,
    },
}

/// Who acts on somebody else's lock (a forced release), for the audit trail's `actor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    pub node_id: Arc<str>,
    pub via: ActorVia,
}

/// How the actor reached the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorVia {
    /// A WebSocket session (`session_id` is set).
    Ws,
    /// The HTTP API with a user JWT.
    Http,
    /// The HTTP API with the admin/service token.
    AdminToken,
}

/// One page of a store's rooms, for the operator listing (`GET /v1/admin/rooms`).
///
/// Stores iterate with a cursor of their own (a Redis `ZSCAN` cursor, the last room name in
/// memory), so a listing of a million rooms costs a bounded amount of work per page and never
/// holds the whole set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoomPage {
    /// Rooms found in this step with how many members (presence) or live locks (locks) each
    /// has; a room with none is never listed. May be empty while `next` is set.
    pub rooms: Vec<(Entity, usize)>,
    /// The cursor of the next step; `None` once the iteration is complete.
    pub next: Option<String>,
}

/// Exclusive locks with fencing tokens.
///
/// Who releases a lock in [`LockStore::release_held`]: its holding session (WebSocket), or a
/// user whose HTTP grants are theirs.
#[derive(Debug, Clone, Copy)]
pub enum HeldBy<'a> {
    Session(&'a str),
    User(&'a str),
}

impl HeldBy<'_> {
    /// Whether `lock` is held by this holder.
    pub fn holds(&self, lock: &LockInfo) -> bool {
        match self {
            HeldBy::Session(s) => *lock.holder.session_id == **s,
            HeldBy::User(u) => *lock.holder.user_id == **u,
        }
    }
}

/// Every method that changes lock state also records its audit record(s) in the same step
/// (the Redis store `XADD`s inside its Lua script), so lock state and audit never diverge.
#[async_trait]
pub trait LockStore: Send + Sync + 'static {
    /// Grants the lock `(req.room, req.resource)` if free (new token), returns the existing
    /// grant for the same session, or reports the holder (and queues the requester when `wait`
    /// is set).
    async fn acquire(&self, req: AcquireRequest) -> EngineResult<AcquireOutcome>;

    /// Compare-and-delete on `token`. On success the head waiter, if any, is granted the lock.
    /// `actor` is who ends somebody else's lock (a forced release), recorded as the audit
    /// record's `actor`; `None` when the holder (or the store itself) ends it.
    async fn release(
        &self,
        key: &LockKey,
        token: u64,
        reason: ReleaseReason,
        actor: Option<&Actor>,
    ) -> EngineResult<TokenOutcome<LockTransition>>;

    /// A holder's own release: compare-and-delete on `token` *and* the holder (`by`), one step.
    /// When either does not match nothing changes and [`TokenOutcome::NotHeld`] carries the
    /// current lock, so the caller tells a stale token (`current` absent or another token) from
    /// someone else's lock (same token, other holder). The default reads, then releases; the
    /// Redis store does both in one script (one round trip).
    async fn release_held(
        &self,
        key: &LockKey,
        token: u64,
        by: HeldBy<'_>,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        match self.get(key).await? {
            Some(current) if current.token == token && by.holds(&current) => {
                self.release(key, token, ReleaseReason::Released, None)
                    .await
            }
            current => Ok(TokenOutcome::NotHeld { current }),
        }
    }

    /// Takes back a grant whose token could not be registered (strict fencing), before
    /// anyone was told its token: compare-and-delete on `token` like `release`, recorded as
    /// `lock_withdrawn {reason: why}` (never as a release); the head waiter, if any, is granted
    /// the lock in the same step.
    async fn withdraw(
        &self,
        key: &LockKey,
        token: u64,
        why: &str,
    ) -> EngineResult<TokenOutcome<LockTransition>>;

    /// Compare-and-extend on `token`: the hold limit becomes `now + ttl_ms`.
    async fn extend(
        &self,
        key: &LockKey,
        token: u64,
        ttl_ms: u64,
    ) -> EngineResult<TokenOutcome<LockInfo>>;

    /// Removes the session from the lock's queue; false if it was not waiting.
    async fn cancel_wait(&self, key: &LockKey, session_id: &SessionId) -> EngineResult<bool>;

    /// Releases whatever holds `key`, whoever it is (owner/admin action), recording `actor`.
    async fn force_release(
        &self,
        key: &LockKey,
        actor: &Actor,
    ) -> EngineResult<Option<LockTransition>>;

    /// Ends a session: releases its locks with `reason` and drops its waits.
    /// `rooms`, when given, limits this to locks and waits announced in those rooms (`leave`).
    async fn release_session(
        &self,
        session_id: &SessionId,
        reason: ReleaseReason,
        rooms: Option<&[Entity]>,
    ) -> EngineResult<Vec<LockTransition>>;

    /// Renews the leases of these `(key, token)` grants; returns those no longer held.
    async fn refresh_leases(
        &self,
        held: &[(LockKey, u64)],
        lease_ms: u64,
    ) -> EngineResult<Vec<(LockKey, u64)>>;

    /// Ends locks past their hold limit or lease and waiters past their timeout, serving
    /// the next waiters. Called periodically by every node; each transition is returned once.
    async fn reap(&self, now_ms: u64) -> EngineResult<Vec<LockTransition>>;

    /// The holder of `key`, if any (held until reaped, even past its end).
    async fn get(&self, key: &LockKey) -> EngineResult<Option<LockInfo>>;

    /// Whether `token` is the live holder of `key` right now, by the store's own clock (Redis
    /// server time in Redis mode) and its own notion of live: inside the hold limit **and** the
    /// lease. Also returns the current holder, if any. Any `token` value is harmless: it is
    /// only compared, never stored.
    async fn validate(&self, key: &LockKey, token: u64) -> EngineResult<(bool, Option<LockInfo>)>;

    /// All live locks announced in `room`.
    async fn list_room(&self, room: &Entity) -> EngineResult<Vec<LockInfo>>;

    /// Raises the fencing counter behind `key`'s tokens to at least `at_least` (never
    /// lowers it), so every later grant of `key` gets a token above `at_least`.
    ///
    /// Strict fencing (see `docs/fencing.md`) calls it when Postgres refused a token because a
    /// higher one was registered: the counter went backwards (Redis lost data or failed over, a
    /// clock stepped back). Changes no lock and writes no audit record.
    async fn raise_fence(&self, key: &LockKey, at_least: u64) -> EngineResult<()>;

    /// Gives the live lock held with `token` a fresh token from the counter (after
    /// [`raise_fence`](LockStore::raise_fence): one above the raised value), keeping its holder,
    /// room, action, `since`, hold limit and lease. Records `lock_acquired` for the new token
    /// with detail `{action, via: "reissue", replaces: "<old token>"}`.
    ///
    /// `NotHeld` when `token` no longer holds `key` or its lock is past its end. Strict
    /// fencing uses it to retry a refused grant in place: the requester (or the waiter the lock
    /// was handed to) keeps it, and nobody was ever told the refused token.
    async fn reissue(&self, key: &LockKey, token: u64) -> EngineResult<TokenOutcome<LockInfo>>;

    /// Makes sure the grant `(key, token)` a release, reap or session end handed to a waiter
    /// survives a failover before the waiter is told: `Ok(())` once the store holds it durably
    /// (Redis with `LOCKSTEP_LOCK_REPLICAS` > 0: the lock held by `token` was seen on the
    /// primary and acknowledged by the replicas), [`EngineError::NotReplicated`] when it is not
    /// (not acknowledged, or no longer held by `token`). Stores without replicas do nothing.
    async fn confirm_handoff(&self, key: &LockKey, token: u64) -> EngineResult<()> {
        let _ = (key, token);
        Ok(())
    }
    /// A step of the iteration over rooms with live locks, each listed once over a complete
    /// iteration (while it keeps a lock). `after` is `""` to start or a previous
    /// [`RoomPage::next`]; about `count` entries are examined per step. `Ok(None)` when `after`
    /// is not a cursor this store issued.
    async fn room_page(&self, after: &str, count: usize) -> EngineResult<Option<RoomPage>>;
}

/// Focus/state change of a member; `None` = unchanged, `Some(None)` = cleared.
#[derive(Debug, Clone, Default)]
pub struct PresencePatch {
    pub focus: Option<Option<Entity>>,
    pub state: Option<Option<serde_json::Value>>,
}

/// Who is in which room, and what each member focuses on.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Adds or replaces the member (keyed by session id); returns the previous entry.
    /// A new member of a room that already has the store's member cap is refused with
    /// [`EngineError::RoomFull`], atomically with the check (replacing never is).
    async fn join(&self, room: &Entity, member: Member) -> EngineResult<Option<Member>>;
    /// Applies a patch to an existing member; `None` if the session is not in the room.
    async fn update(
        &self,
        room: &Entity,
        session_id: &SessionId,
        patch: PresencePatch,
    ) -> EngineResult<Option<Member>>;
    /// [`update`](PresenceStore::update) by a caller that knows the member as it last wrote
    /// it (`known`, from its join or last update). A store may save a read with it; the result
    /// is `update`'s, also when `known` is out of date (then it is only slower).
    async fn update_known(
        &self,
        room: &Entity,
        session_id: &SessionId,
        patch: PresencePatch,
        known: Option<&Member>,
    ) -> EngineResult<Option<Member>> {
        let _ = known;
        self.update(room, session_id, patch).await
    }
    /// Removes the member; returns it if it was there.
    async fn leave(&self, room: &Entity, session_id: &SessionId) -> EngineResult<Option<Member>>;
    /// Members of the room, oldest first.
    async fn members(&self, room: &Entity) -> EngineResult<Vec<Member>>;
    /// Presence of an entity: members of the room it names plus members (of any room) whose
    /// focus is that entity, each session once.
    async fn presence_of(&self, entity: &Entity) -> EngineResult<Vec<Member>>;

    /// Keeps these `(room, session)` entries alive for `ttl_ms` more. Stores whose entries
    /// expire (Redis) need it: the node calls it every few seconds (a third of the ttl) for the
    /// rooms of its live sessions, so the entries of a crashed node run out and are swept.
    /// Entries that are gone are not recreated but returned, so the node can re-register its
    /// live sessions that were swept (a stall, a Redis restart). Stores without expiry do nothing.
    async fn refresh(
        &self,
        entries: &[(Entity, SessionId)],
        ttl_ms: u64,
    ) -> EngineResult<Vec<(Entity, SessionId)>> {
        let _ = (entries, ttl_ms);
        Ok(Vec::new())
    }

    /// Removes up to `max` members whose entries expired without refresh and returns them with
    /// their rooms, so the node announces their `presence.leave`. Every node may sweep at the
    /// same time: each expired member is returned by exactly one call. Stores without expiry
    /// return nothing.
    async fn sweep(&self, max: usize) -> EngineResult<Vec<(Entity, Member)>> {
        let _ = max;
        Ok(Vec::new())
    }
    /// A step of the iteration over rooms with members, each listed once over a complete
    /// iteration (while it keeps members); see [`LockStore::room_page`] for the cursor.
    async fn room_page(&self, after: &str, count: usize) -> EngineResult<Option<RoomPage>>;
}

/// What happened in a room, fanned out to every node with local members there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEvent {
    pub room: Entity,
    /// The session that caused it, for events not echoed to their sender (cursor, broadcast).
    pub origin: Option<SessionId>,
    pub kind: RoomEventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RoomEventKind {
    PresenceJoin(Member),
    PresenceUpdate(Member),
    PresenceLeave(Member),
    Cursor {
        user_id: UserId,
        session_id: SessionId,
        x: f64,
        y: f64,
        selection: Option<serde_json::Value>,
    },
    Broadcast {
        event: Arc<str>,
        data: serde_json::Value,
        user_id: UserId,
        session_id: SessionId,
        name: Arc<str>,
    },
    /// A lock was granted. `via_queue` grants are also told to the waiter with `lock.granted`,
    /// which is why the token travels (between nodes only; clients never see others' tokens).
    LockAcquired {
        grant: Grant,
        via_queue: bool,
    },
    LockReleased {
        lock: LockInfo,
        reason: ReleaseReason,
    },
    /// A queued acquire timed out; told to the waiting session only.
    WaitExpired {
        resource: Entity,
        session_id: SessionId,
        request_id: Option<u32>,
    },
    /// The lock was handed to this waiter but its token could not be registered in Postgres
    /// (strict fencing), so the grant was withdrawn before anyone saw it; told to the waiting
    /// session only, as an `unavailable` error with its request id.
    WaitFailed {
        resource: Entity,
        session_id: SessionId,
        request_id: Option<u32>,
    },
}

/// Receives events from a [`Broker`]; implemented by the node's local hub. Must not block.
pub trait EventSink: Send + Sync + 'static {
    fn deliver(&self, event: Arc<RoomEvent>);
}

/// Fan-out of room events between nodes.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Delivers `event` to every node subscribed to its room (including this one); returns
    /// once the transport accepted it.
    async fn publish(&self, event: Arc<RoomEvent>) -> EngineResult<()>;
    /// Like [`publish`](Broker::publish), but returns once `event` is queued behind this
    /// node's earlier events (in order, so no later event of this node overtakes it), without
    /// waiting for the transport to accept it. This node's own subscribers have it when this
    /// returns. A failure after that is the broker's to report (remote receivers see a gap and
    /// resync). This is what the node uses: nothing on a request's path waits for pub/sub.
    async fn post(&self, event: Arc<RoomEvent>) -> EngineResult<()> {
        self.publish(event).await
    }
    /// Returns once every event posted before was sent (or failed): a draining node calls
    /// it so that nothing it posted is lost with the process.
    async fn flush(&self) -> EngineResult<()> {
        Ok(())
    }
    /// This node has local members in `room` from now on.
    async fn subscribe(&self, room: &Entity) -> EngineResult<()>;
    /// This node's last local member left `room`.
    async fn unsubscribe(&self, room: &Entity) -> EngineResult<()>;
}

/// A session parked after an unclean disconnect, as any node needs it to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedSession {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub rooms: Vec<Entity>,
    /// `(resource, room, token)` of every lock the session held when it was parked.
    pub held: Vec<(Entity, Entity, u64)>,
    pub share_cursor: bool,
    /// The node that parked it (it renews the session's leases until the grace ends).
    pub node_id: Arc<str>,
}

/// Where parked sessions wait for a resume, so a client may resume on any node.
///
/// Exactly one party wins each parked session: a resume (`claim`) or the end of the grace
/// (`expire`), both atomic. A claim leaves a tombstone and records are kept a margin past
/// their grace, so `expire` run a little after the grace still tells the two apart.
#[async_trait]
pub trait ResumeStore: Send + Sync + 'static {
    async fn park(
        &self,
        resume_token: &str,
        session: &ParkedSession,
        grace_ms: u64,
    ) -> EngineResult<()>;
    /// Takes the parked session if it exists, belongs to `user_id` and its grace runs.
    async fn claim(&self, resume_token: &str, user_id: &str)
    -> EngineResult<Option<ParkedSession>>;
    /// The grace is over: removes the record; true unless a resume claimed it, in which case
    /// (false) the session lives on elsewhere; on true the caller ends the session.
    async fn expire(&self, resume_token: &str) -> EngineResult<bool>;

    /// Counts `session_id` among `user_id`'s live sessions (attached or parked, on any node)
    /// unless the user has `limit` already; a session already counted (a resume) is always
    /// admitted. Entries lapse after `ttl_ms` unless [`keep_admitted`](Self::keep_admitted).
    /// Atomic: racing admissions never exceed the limit. Returns whether it was admitted.
    async fn admit(
        &self,
        user_id: &str,
        session_id: &str,
        limit: usize,
        ttl_ms: u64,
    ) -> EngineResult<bool>;
    /// Renews the entries of sessions this node still holds (never re-adds a removed one).
    async fn keep_admitted(
        &self,
        sessions: &[(UserId, SessionId)],
        ttl_ms: u64,
    ) -> EngineResult<()>;
    /// The session ended for good: it no longer counts.
    async fn dismiss(&self, user_id: &str, session_id: &str) -> EngineResult<()>;
    /// How many sessions `user_id` may have in the count (attached or parked, any node; an
    /// entry that lapsed but was not pruned yet may still count). Zero means no node holds a
    /// session of this user, so a resume need not ask the cluster for one.
    async fn counted_sessions(&self, user_id: &str) -> EngineResult<usize>;

    /// Refuses the token id `jti` until `until_ms` (ms since the epoch). Bounded: the
    /// memory store refuses more than a fixed number of live entries (`Unavailable`).
    async fn revoke_jti(&self, jti: &str, until_ms: u64) -> EngineResult<()>;
    /// Whether `jti` is revoked now.
    async fn is_revoked(&self, jti: &str) -> EngineResult<bool>;
}

#[cfg(test)]
mod tests {
    use super::ReleaseReason;

    #[test]
    fn release_reasons_have_one_name_on_the_wire_in_lua_and_in_metrics() {
        for r in [
            ReleaseReason::Released,
            ReleaseReason::Expired,
            ReleaseReason::Disconnected,
            ReleaseReason::Forced,
            ReleaseReason::Revoked,
            ReleaseReason::Lost,
        ] {
            let wire = serde_json::to_string(&r).unwrap();
            assert_eq!(wire, format!("\"{}\"", r.as_str()));
        }
    }
}
