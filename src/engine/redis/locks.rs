//! [`RedisLockStore`]: the [`LockStore`] shared by every node, in Redis, one Lua script per
//! operation.
//!
//! It reproduces the observable behaviour of the reference
//! [`MemoryLockStore`](crate::engine::memory::MemoryLockStore) (read its module doc first) and
//! passes the same [`conformance`](crate::engine::conformance) suite. What follows is what is
//! particular to Redis.
//!
//! # Keys and scripts
//!
//! Keys follow [`keys`] exactly: every key of a resource, its shard's expiry index (`due`) and
//! its shard's audit stream carry the shard tag `{ls<N>}`, so each script touches one Cluster
//! slot. Scripts live in `scripts/*.lua`; `scripts/lib.lua` (the data model, the shared
//! helpers: grant, hand-off, audit, due index) is prepended to each, and each file's header
//! lists its `KEYS`, `ARGV` and result. They are built into [`LuaScript`]s once per process and run
//! with `evalsha_with_reload`, which reloads them after a `NOSCRIPT` (an empty script cache
//! after a Redis restart or a `SCRIPT FLUSH`). Keys a script finds only while it runs (the
//! resources in a session's index, the due resources of a shard, a waiter's session index) are
//! named inside the script from the shard prefix (`ARGV[1]`); they are in the same slot as the
//! declared keys, which Cluster allows.
//!
//! Every state change and its audit records happen in one script: lock state and audit can never
//! diverge (unlike the memory store, whose separate sink can fail after the change).
//!
//! # Clock
//!
//! Every decision — hold limits, leases, waiter deadlines, `since`/`expires_at`, the audit
//! record's `at` — uses the Redis server's clock (`TIME` inside the script), never the node's:
//! nodes' clocks may disagree, and a node with a fast clock would otherwise end other nodes'
//! locks early or grant a lock past its holder's end. Hence [`reap`](LockStore::reap) ignores
//! its `now_ms` argument: the script decides what is due by Redis' `TIME`.
//!
//! # Lifetime of a lock
//!
//! As in memory, **a lock stays held until reaped**: `get`/`list_room` show it past its end and
//! its holder may still release it; the reaper is the authority that announces expiries, in
//! order, each once (a script is atomic, so two nodes reaping at once split the work and never
//! both report a transition). The lock hash also gets a key expiry of *(its end − now) + 30 s*,
//! refreshed whenever the lock changes, and the queue, the waiter hash and the room/session
//! indexes get the same safety net from their deadlines. It only matters when no node runs a
//! reaper for 30 s past the end: the state then disappears instead of lingering forever (without
//! a `lock_expired` record — nobody was there to announce it). The next reap, `list_room` or
//! `release_session` drops index entries that point at a vanished key.
//!
//! # Fencing tokens
//!
//! `next = max(GET fence + 1, TIME in µs)`, then `SET fence next PX retention`. Seeding from
//! the server clock keeps tokens strictly increasing even when Redis restarts empty or fails
//! over to a replica that lost the counter, as long as its clock does not jump back: the memory
//! store's rule. The same argument lets an idle fence key expire
//! ([`with_fence_retention`](RedisLockStore::with_fence_retention), default 7 days): once it is
//! gone, the next grant starts from the clock, above the expired value as long as the counter
//! never ran ahead of the server clock by more than the retention (`docs/fencing.md`). Tokens (µs, ~1.8e15) stay below 2^53, exact in Lua's doubles; scripts keep
//! them as decimal strings (hash fields, results, token comparisons), and splice them into audit
//! JSON as exact numbers (cjson would print `1.7637e+15`).
//!
//! The clock seed fails when the server clock steps back, and a token registered in Postgres
//! may lie above it anyway (see `docs/fencing.md`): strict fencing then calls
//! [`raise_fence`](LockStore::raise_fence) (`raise_fence.lua`: `fence = max(fence, at_least)`)
//! and [`reissue`](LockStore::reissue) (`reissue.lua`: the live lock gets `next_token`, in
//! place). `raise_fence` refuses a value at or past 2^53, which Lua could not count exactly.
//!
//! # Expiry index and reaping
//!
//! `ls:{S}:due` scores each resource with the next instant something is due for it: the earlier
//! of its lock's end (`min(expires_at, lease_until)`) and its earliest waiter deadline; every
//! script recomputes the score of the resources it touched (or removes it).
//! [`reap`](LockStore::reap) runs one
//! script per shard, all [`keys::SHARDS`] concurrently; each call handles at most
//! [`REAP_BATCH`] due resources, earliest first, and a shard with more is called again, up to
//! [`REAP_ROUNDS`] times per `reap` (the rest waits for the next tick).
//!
//! # Audit outbox
//!
//! Every transition `XADD`s its record to the shard's `ls:{S}:audit` stream, in the same script,
//! with `MAXLEN ~ 100000`: a bounded ring until the Postgres writer (a later issue) drains it.
//! The field `rec` holds the record's JSON without `id`; the id is derived from the shard and the
//! stream entry id when reading (see [`super::audit`]). Kinds and details are the memory store's.
//!
//! # Multi-shard operations
//!
//! `reap`, `release_session` (which cannot know where a session's locks are),
//! `refresh_leases` (grouped by shard) and `list_room` touch several shards, concurrently. A
//! shard's script is atomic, but the operation as a whole is not. When some shards fail and
//! others succeed, the state-changing ones return what did happen (so it is announced) and log
//! the failures — a failed shard is unchanged, its locks end later by lease or reap; they fail
//! only when every shard failed. `list_room` and `refresh_leases` fail if any shard does
//! (a renewal that looks done but was not would hide a lapsing lease from the node's watchdog).
//!
//! # Replicated grants
//!
//! With [`with_replication`](RedisLockStore::with_replication) (`LOCKSTEP_LOCK_REPLICAS` > 0)
//! the scripts whose loss in a failover could give a lock to a second holder run through
//! [`super::replication`] (script, marker write, `WAIT` on one connection), and their outcome
//! only counts once the replicas acknowledged it: `acquire` (new and reentrant grants),
//! `extend`, `reissue` and `refresh_leases`; a grant or reissue not acknowledged comes back as
//! [`EngineError::NotReplicated`] carrying the grant, which the node withdraws. Hand-offs to
//! waiters come out of `release`, `withdraw`, `force_release`, `release_session` and `reap`;
//! rather than making every release wait, the node confirms each hand-off before telling the
//! waiter ([`confirm_handoff`](LockStore::confirm_handoff): a replicated read of the lock).
//! Losing a release *without* a hand-off cannot double-grant: the lock reappears for its old
//! holder, who no longer uses it, and ends by lease or hold limit. Denials and queued waits
//! wait for the replicas too (the script is the same) but are answered whatever the outcome.
//!
//! # Differences from the memory store
//!
//! - Records of different shards are ordered by their derived ids (stream time, then sequence,
//!   then shard), not by one global sequence: per resource the order is exact, across resources
//!   within a millisecond it is not.
//! - Durations (`ttl_ms`, `lease_ms`, wait timeouts) are capped at [`MAX_SPAN_MS`] (10 years)
//!   so every instant stays exact in Lua numbers and in cjson's 14 digits; the node caps hold
//!   limits far lower anyway.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use async_trait::async_trait;
use fred::prelude::*;
use futures_util::future::join_all;

use super::lock_results::{Item, Num, merge_shards, parse_items, single, unexpected};
use super::replication::{Acked, REPLICATED_OPS, Replication};
use super::script::LuaScript;
use super::{call, engine_err, keys};
use crate::engine::{
    AcquireOutcome, AcquireRequest, Actor, EngineError, EngineResult, HeldBy, LockInfo, LockKey,
    LockStore, LockTransition, ReleaseReason, RoomPage, SessionId, TokenOutcome,
};
use crate::names::Entity;
use crate::telemetry::RedisMetrics;

/// Due resources one reap script handles per call.
pub const REAP_BATCH: usize = 100;
/// Calls per shard and `reap` while a shard still has due resources.
pub const REAP_ROUNDS: usize = 10;
/// Cap of any duration handed to the scripts: 10 years.
pub const MAX_SPAN_MS: u64 = 10 * 366 * 24 * 3600 * 1000;

/// Default of [`RedisLockStore::with_fence_retention`]: 7 days.
pub const DEFAULT_FENCE_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// The Redis [`LockStore`].
pub struct RedisLockStore {
    pool: Pool,
    metrics: RedisMetrics,
    /// Expiry of a fence key after its last write (`LOCKSTEP_FENCE_RETENTION`).
    fence_retention_ms: u64,
    /// `LOCKSTEP_LOCK_REPLICAS` > 0: changes that could double-grant if lost wait for the
    /// replicas (see "Replicated grants" above).
    replication: Option<Replication>,
}

impl RedisLockStore {
    /// A store using `pool` (see [`super::connect`]). The node id of each grant comes with its
    /// request's holder.
    pub fn new(pool: Pool) -> RedisLockStore {
        RedisLockStore {
            pool,
            metrics: RedisMetrics::default(),
            fence_retention_ms: DEFAULT_FENCE_RETENTION_MS,
            replication: None,
        }
    }

    /// Every grant, reentrant grant, extend, reissue, lease refresh and confirmed hand-off
    /// waits for `replication.replicas` replicas (none when 0): see "Replicated grants" above.
    pub fn with_replication(mut self, replication: Replication) -> RedisLockStore {
        self.metrics.replication_started(REPLICATED_OPS);
        self.replication = (replication.replicas > 0).then_some(replication);
        self
    }

    /// Fence keys expire this long after their last write (see "Fencing tokens" above).
    pub fn with_fence_retention(mut self, retention: std::time::Duration) -> RedisLockStore {
        self.fence_retention_ms = (retention.as_millis() as u64).clamp(1, MAX_SPAN_MS);
        self
    }

    /// Records every script call in `metrics` (see [`super::call`]).
    pub fn with_metrics(mut self, metrics: RedisMetrics) -> RedisLockStore {
        self.metrics = metrics;
        self
    }

    /// Like [`run`](Self::run), then waits for the replicas (when configured) on the same
    /// connection ([`super::replication`]). `Ok((items, false))`: the script ran on the primary
    /// but the replicas did not acknowledge it in time (counted); the caller decides what that
    /// means for its outcome.
    async fn run_replicated(
        &self,
        op: &'static str,
        script: &LuaScript,
        keys: Vec<String>,
        mut args: Vec<String>,
    ) -> EngineResult<(Vec<Item>, bool)> {
        let Some(replication) = self.replication else {
            return Ok((self.run(op, script, keys, args).await?, true));
        };
        args.insert(1.min(args.len()), self.fence_retention_ms.to_string());
        let eval = replication.eval(&self.pool, script, keys, args);
        let Acked { reply, acked } = call(&self.metrics, op, eval).await.map_err(engine_err)?;
        let raw: Vec<String> = reply;
        let ok = replication.satisfied(acked);
        if !ok {
            self.metrics.replication_failure(op);
            tracing::warn!(
                op,
                acked,
                wanted = replication.replicas,
                "lock change not acknowledged by enough replicas in time"
            );
        }
        Ok((parse_items(&raw)?, ok))
    }

    /// Runs `script` as operation `op` and parses its result.
    async fn run(
        &self,
        op: &'static str,
        script: &LuaScript,
        keys: Vec<String>,
        mut args: Vec<String>,
    ) -> EngineResult<Vec<Item>> {
        // Every script gets the fence retention as ARGV[2]; lib.lua takes it out again, so
        // each script's own arguments keep the numbers in its header.
        args.insert(1.min(args.len()), self.fence_retention_ms.to_string());
        let eval = script.eval(self.pool.next(), keys, args);
        let raw: Vec<String> = call(&self.metrics, op, eval).await.map_err(engine_err)?;
        parse_items(&raw)
    }

    /// One reap of one shard: up to [`REAP_ROUNDS`] script calls while work remains.
    async fn reap_shard(&self, shard: u32) -> EngineResult<Vec<LockTransition>> {
        let mut out = Vec::new();
        for _ in 0..REAP_ROUNDS {
            let items = self
                .run(
                    "lock_reap",
                    &scripts().reap,
                    vec![keys::due(shard), keys::audit_stream(shard)],
                    vec![keys::shard_prefix(shard), REAP_BATCH.to_string()],
                )
                .await?;
            let mut more = false;
            for item in items {
                match item {
                    Item::More => more = true,
                    other => out.push(other.into_transition()?),
                }
            }
            if !more {
                break;
            }
        }
        Ok(out)
    }

    async fn release_session_shard(
        &self,
        shard: u32,
        session_id: &str,
        reason: ReleaseReason,
        rooms: &str,
    ) -> EngineResult<Vec<LockTransition>> {
        let items = self
            .run(
                "lock_release_session",
                &scripts().release_session,
                vec![
                    keys::session_locks(shard, session_id),
                    keys::due(shard),
                    keys::audit_stream(shard),
                ],
                vec![
                    keys::shard_prefix(shard),
                    session_id.to_owned(),
                    reason.as_str().to_owned(),
                    rooms.to_owned(),
                ],
            )
            .await?;
        items.into_iter().map(Item::into_transition).collect()
    }

    async fn refresh_shard(
        &self,
        shard: u32,
        held: &[(LockKey, u64)],
        lease_ms: u64,
    ) -> EngineResult<Vec<(LockKey, u64)>> {
        let mut args = vec![keys::shard_prefix(shard), span(lease_ms)];
        for (key, token) in held {
            args.push(key.to_string());
            args.push(token.to_string());
        }
        let (items, acked) = self
            .run_replicated(
                "lock_refresh_leases",
                &scripts().refresh_leases,
                vec![keys::due(shard)],
                args,
            )
            .await?;
        if !acked {
            // The renewed leases may be lost in a failover, and the locks then end earlier
            // than their holders believe: the holders' node must treat this as a failure.
            return Err(EngineError::NotReplicated {
                what: format!("lease refresh of {} locks", held.len()),
                grant: None,
            });
        }
        items
            .into_iter()
            .map(|item| match item {
                Item::Lost { key, token } => LockKey::parse(&key)
                    .map(|k| (k, token.0))
                    .ok_or_else(|| EngineError::Internal(format!("bad lock key {key:?}"))),
                other => Err(unexpected("refresh_leases", &other)),
            })
            .collect()
    }

    async fn list_room_shard(&self, shard: u32, room: &Entity) -> EngineResult<Vec<LockInfo>> {
        let items = self
            .run(
                "lock_list_room",
                &scripts().list_room,
                vec![keys::room_locks(shard, room.as_str())],
                vec![keys::shard_prefix(shard), room.to_string()],
            )
            .await?;
        items
            .into_iter()
            .map(|item| match item {
                Item::Lock { lock } => Ok(lock.into()),
                other => Err(unexpected("list_room", &other)),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------------------------

/// The helpers every script starts with.
const LIB: &str = include_str!("scripts/lib.lua");

struct Scripts {
    acquire: LuaScript,
    release: LuaScript,
    extend: LuaScript,
    cancel_wait: LuaScript,
    force_release: LuaScript,
    release_session: LuaScript,
    refresh_leases: LuaScript,
    reap: LuaScript,
    get: LuaScript,
    list_room: LuaScript,
    raise_fence: LuaScript,
    reissue: LuaScript,
    validate: LuaScript,
}

/// The scripts, built (and hashed) once per process. fred may re-send a script after a
/// reconnect, so every one whose second run would change the outcome runs `once` per call
/// ([`super::script`]); the `plain` ones land the same when repeated.
fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let once = |body: &str| LuaScript::once(LIB, body);
        let plain = |body: &str| LuaScript::plain(format!("{LIB}\n{body}"));
        Scripts {
            // Re-run: a grant turns "reentrant" (not announced, not registered), a denial or
            // wait is audited twice.
            acquire: once(include_str!("scripts/acquire.lua")),
            // Re-run: `not_held` after a release that happened; its hand-off is lost.
            release: once(include_str!("scripts/release.lua")),
            // Re-run: a second `lock_extended` record, a later end.
            extend: once(include_str!("scripts/extend.lua")),
            // Re-run: "was not waiting" after it cancelled the wait.
            cancel_wait: once(include_str!("scripts/cancel_wait.lua")),
            // Re-run: frees the lock it just handed to the next waiter.
            force_release: once(include_str!("scripts/force_release.lua")),
            // Re-run: returns nothing, so the first run's releases and hand-offs go unannounced.
            release_session: once(include_str!("scripts/release_session.lua")),
            // Re-run renews the same leases again and reports the same lost grants.
            refresh_leases: plain(include_str!("scripts/refresh_leases.lua")),
            // Re-run: the expiries and hand-offs of the first run go unannounced.
            reap: once(include_str!("scripts/reap.lua")),
            get: plain(include_str!("scripts/get.lua")),
            // Writes only to drop index entries of vanished locks: the same on a re-run.
            list_room: plain(include_str!("scripts/list_room.lua")),
            // `fence = max(fence, at_least)`: the same on a re-run.
            raise_fence: plain(include_str!("scripts/raise_fence.lua")),
            // Re-run: `not_held` (the token changed) after it reissued, and a second token.
            reissue: once(include_str!("scripts/reissue.lua")),
            // Read-only.
            validate: plain(include_str!("scripts/validate.lua")),
        }
    })
}

/// `KEYS` of the single-lock scripts: lock, fence, queue, waiters, due, audit.
fn resource_keys(key: &LockKey) -> Vec<String> {
    let k = key.to_string();
    let shard = keys::shard_of(&k);
    vec![
        keys::lock(&k),
        keys::fence(&k),
        keys::queue(&k),
        keys::waiters(&k),
        keys::due(shard),
        keys::audit_stream(shard),
    ]
}

fn prefix_of(key: &LockKey) -> String {
    keys::shard_prefix(keys::shard_of(&key.to_string()))
}

fn actor_json(actor: Option<&Actor>) -> EngineResult<String> {
    match actor {
        Some(a) => serde_json::to_string(a)
            .map_err(|e| EngineError::Internal(format!("encoding the actor: {e}"))),
        None => Ok(String::new()),
    }
}

fn span(ms: u64) -> String {
    ms.min(MAX_SPAN_MS).to_string()
}

// ---------------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------------

#[async_trait]
impl LockStore for RedisLockStore {
    async fn acquire(&self, req: AcquireRequest) -> EngineResult<AcquireOutcome> {
        let key = LockKey::new(req.room.clone(), req.resource.clone());
        let shard = keys::shard_of(&key.to_string());
        let mut k = resource_keys(&key);
        k.push(keys::room_locks(shard, req.room.as_str()));
        k.push(keys::session_locks(shard, &req.holder.session_id));
        let args = vec![
            prefix_of(&key),
            key.to_string(),
            req.room.to_string(),
            req.action.to_string(),
            req.holder.user_id.to_string(),
            req.holder.name.to_string(),
            req.holder.session_id.to_string(),
            req.holder.node_id.to_string(),
            span(req.ttl_ms),
            req.lease_ms.map(span).unwrap_or_default(),
            req.wait
                .as_ref()
                .map(|w| span(w.timeout_ms))
                .unwrap_or_default(),
            req.wait
                .as_ref()
                .and_then(|w| w.request_id)
                .map(|id| id.to_string())
                .unwrap_or_default(),
        ];
        let (items, acked) = self
            .run_replicated("lock_acquire", &scripts().acquire, k, args)
            .await?;
        match single("acquire", items)? {
            Item::Granted { lock, reentrant } if !acked => {
                // A new grant is withdrawn by the caller; a reentrant one is left alone (its
                // holder may be using it), the retry just fails.
                let lock: LockInfo = lock.into();
                Err(EngineError::NotReplicated {
                    what: format!("grant of {} (token {})", lock.key(), lock.token),
                    grant: (!reentrant).then(|| Box::new(lock)),
                })
            }
            Item::Granted { lock, reentrant } => Ok(AcquireOutcome::Granted {
                lock: lock.into(),
                reentrant,
            }),
            Item::Held {
                lock,
                position,
                wait,
            } => Ok(AcquireOutcome::Held {
                current: lock.into(),
                queue_position: position.map(Num::u32),
                estimated_wait_ms: wait.0,
            }),
            other => Err(unexpected("acquire", &other)),
        }
    }

    async fn release(
        &self,
        key: &LockKey,
        token: u64,
        reason: ReleaseReason,
        actor: Option<&Actor>,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        self.end_with_token(key, token, reason, actor, "").await
    }

    /// `release.lua` with its holder check: one script, one round trip.
    async fn release_held(
        &self,
        key: &LockKey,
        token: u64,
        by: HeldBy<'_>,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        let check = match by {
            HeldBy::Session(s) => format!("s:{s}"),
            HeldBy::User(u) => format!("u:{u}"),
        };
        let args = vec![
            prefix_of(key),
            key.to_string(),
            token.to_string(),
            ReleaseReason::Released.as_str().to_owned(),
            actor_json(None)?,
            String::new(),
            check,
        ];
        self.release_args(key, args).await
    }

    async fn withdraw(
        &self,
        key: &LockKey,
        token: u64,
        why: &str,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        // An empty reason would read as "not a withdrawal" in the script.
        let why = if why.is_empty() { "unregistered" } else { why };
        self.end_with_token(key, token, ReleaseReason::Released, None, why)
            .await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: u64,
        ttl_ms: u64,
    ) -> EngineResult<TokenOutcome<LockInfo>> {
        let args = vec![
            prefix_of(key),
            key.to_string(),
            token.to_string(),
            span(ttl_ms),
        ];
        let (items, acked) = self
            .run_replicated("lock_extend", &scripts().extend, resource_keys(key), args)
            .await?;
        match single("extend", items)? {
            // The holder keeps the old end: on the primary the new one stands, which only
            // makes the lock outlive what its holder was told.
            Item::Extended { .. } if !acked => Err(EngineError::NotReplicated {
                what: format!("extend of {key}"),
                grant: None,
            }),
            Item::Extended { lock } => Ok(TokenOutcome::Done(lock.into())),
            Item::NotHeld { current } => Ok(TokenOutcome::NotHeld {
                current: current.map(Into::into),
            }),
            other => Err(unexpected("extend", &other)),
        }
    }

    async fn cancel_wait(&self, key: &LockKey, session_id: &SessionId) -> EngineResult<bool> {
        let r = key.to_string();
        let shard = keys::shard_of(&r);
        let k = vec![
            keys::queue(&r),
            keys::waiters(&r),
            keys::due(shard),
            keys::audit_stream(shard),
        ];
        let args = vec![prefix_of(key), r, session_id.to_string()];
        match single(
            "cancel_wait",
            self.run("lock_cancel_wait", &scripts().cancel_wait, k, args)
                .await?,
        )? {
            Item::Cancelled { ok } => Ok(ok),
            other => Err(unexpected("cancel_wait", &other)),
        }
    }

    async fn force_release(
        &self,
        key: &LockKey,
        actor: &Actor,
    ) -> EngineResult<Option<LockTransition>> {
        let args = vec![prefix_of(key), key.to_string(), actor_json(Some(actor))?];
        let items = self
            .run(
                "lock_force_release",
                &scripts().force_release,
                resource_keys(key),
                args,
            )
            .await?;
        if items.is_empty() {
            return Ok(None);
        }
        single("force_release", items)?.into_transition().map(Some)
    }

    async fn release_session(
        &self,
        session_id: &SessionId,
        reason: ReleaseReason,
        rooms: Option<&[Entity]>,
    ) -> EngineResult<Vec<LockTransition>> {
        let rooms = match rooms {
            Some(rs) => serde_json::to_string(rs)
                .map_err(|e| EngineError::Internal(format!("encoding rooms: {e}")))?,
            None => String::new(),
        };
        let results = join_all(
            (0..keys::SHARDS)
                .map(|shard| self.release_session_shard(shard, session_id, reason, &rooms)),
        )
        .await;
        let mut out = merge_shards("release_session", results)?;
        // The memory store releases a session's locks in lock key order (room, resource).
        out.sort_by_key(transition_key);
        Ok(out)
    }

    async fn refresh_leases(
        &self,
        held: &[(LockKey, u64)],
        lease_ms: u64,
    ) -> EngineResult<Vec<(LockKey, u64)>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_shard: HashMap<u32, Vec<(LockKey, u64)>> = HashMap::new();
        for grant in held {
            by_shard
                .entry(keys::shard_of(&grant.0.to_string()))
                .or_default()
                .push(grant.clone());
        }
        let mut results = join_all(
            by_shard
                .iter()
                .map(|(shard, grants)| self.refresh_shard(*shard, grants, lease_ms)),
        )
        .await;
        // Any shard that failed — outright or unacknowledged by the replicas — fails the whole
        // call: the caller cannot tell which grants were renewed, and its lease watchdog
        // (`node::leases`) must not take an unrenewed lease for a renewed one. The other
        // shards' renewals stand; the next refresh repeats them all. The price: a shard down
        // for most of a lease makes the node declare all its locks lost, not only that
        // shard's (the safe side).
        if let Some(i) = results.iter().position(Result::is_err) {
            let failed = results.iter().filter(|r| r.is_err()).count();
            let err = results.swap_remove(i).expect_err("found an error");
            tracing::warn!(error = %err, failed, total = by_shard.len(), "lock refresh_leases: shards failed");
            return Err(err);
        }
        let lost: HashSet<(LockKey, u64)> = merge_shards("refresh_leases", results)?
            .into_iter()
            .collect();
        // In the order asked, like the memory store.
        Ok(held.iter().filter(|g| lost.contains(*g)).cloned().collect())
    }

    /// `now_ms` is ignored: what is due is decided by the Redis server's clock (module doc).
    async fn reap(&self, _now_ms: u64) -> EngineResult<Vec<LockTransition>> {
        let results = join_all((0..keys::SHARDS).map(|shard| self.reap_shard(shard))).await;
        merge_shards("reap", results)
    }

    async fn get(&self, key: &LockKey) -> EngineResult<Option<LockInfo>> {
        let items = self
            .run(
                "lock_get",
                &scripts().get,
                vec![keys::lock(&key.to_string())],
                vec![prefix_of(key), key.to_string()],
            )
            .await?;
        if items.is_empty() {
            return Ok(None);
        }
        match single("get", items)? {
            Item::Lock { lock } => Ok(Some(lock.into())),
            other => Err(unexpected("get", &other)),
        }
    }

    /// By the Redis server's clock, lease included (`validate.lua`).
    async fn validate(&self, key: &LockKey, token: u64) -> EngineResult<(bool, Option<LockInfo>)> {
        let items = self
            .run(
                "lock_validate",
                &scripts().validate,
                vec![keys::lock(&key.to_string())],
                vec![prefix_of(key), key.to_string(), token.to_string()],
            )
            .await?;
        if items.is_empty() {
            return Ok((false, None));
        }
        match single("validate", items)? {
            Item::Validated { valid, lock } => Ok((valid, Some(lock.into()))),
            other => Err(unexpected("validate", &other)),
        }
    }

    /// Reads the room's index in every shard (concurrently); sorted by resource name.
    async fn list_room(&self, room: &Entity) -> EngineResult<Vec<LockInfo>> {
        let results =
            join_all((0..keys::SHARDS).map(|shard| self.list_room_shard(shard, room))).await;
        let mut locks = Vec::new();
        for r in results {
            locks.extend(r?);
        }
        locks.sort_by(|a, b| a.resource.cmp(&b.resource));
        Ok(locks)
    }

    async fn room_page(&self, after: &str, count: usize) -> EngineResult<Option<RoomPage>> {
        super::rooms::lock_page(self, self.pool.next(), &self.metrics, after, count).await
    }

    async fn raise_fence(&self, key: &LockKey, at_least: u64) -> EngineResult<()> {
        // Lua numbers are doubles: beyond 2^53 the counter could not be kept exactly.
        if at_least >= 1 << 53 {
            return Err(EngineError::Internal(format!(
                "fence {at_least} for {key} is beyond 2^53"
            )));
        }
        let args = vec![prefix_of(key), key.to_string(), at_least.to_string()];
        self.run(
            "lock_raise_fence",
            &scripts().raise_fence,
            vec![keys::fence(&key.to_string())],
            args,
        )
        .await?;
        Ok(())
    }

    async fn reissue(&self, key: &LockKey, token: u64) -> EngineResult<TokenOutcome<LockInfo>> {
        let args = vec![prefix_of(key), key.to_string(), token.to_string()];
        let (items, acked) = self
            .run_replicated("lock_reissue", &scripts().reissue, resource_keys(key), args)
            .await?;
        match single("reissue", items)? {
            // The lock now carries the fresh token: that is what the caller must withdraw.
            Item::Reissued { lock } if !acked => {
                let lock: LockInfo = lock.into();
                Err(EngineError::NotReplicated {
                    what: format!("reissue of {key} (token {})", lock.token),
                    grant: Some(Box::new(lock)),
                })
            }
            Item::Reissued { lock } => Ok(TokenOutcome::Done(lock.into())),
            Item::NotHeld { current } => Ok(TokenOutcome::NotHeld {
                current: current.map(Into::into),
            }),
            other => Err(unexpected("reissue", &other)),
        }
    }

    /// A replicated read of the lock (`get.lua`, then the marker and `WAIT`): the hand-off is
    /// confirmed when the lock is held by `token` on the primary *and* that state is
    /// acknowledged. Read, not re-written: whichever primary answers (the hand-off may have
    /// been made before a failover), what it shows is what the replicas acknowledged.
    async fn confirm_handoff(&self, key: &LockKey, token: u64) -> EngineResult<()> {
        if self.replication.is_none() {
            return Ok(());
        }
        let (items, acked) = self
            .run_replicated(
                "lock_confirm_handoff",
                &scripts().get,
                vec![keys::lock(&key.to_string())],
                vec![prefix_of(key), key.to_string()],
            )
            .await?;
        let held = match items.as_slice() {
            [Item::Lock { lock }] => lock.token.0 == token,
            [] => false,
            [other, ..] => return Err(unexpected("get", other)),
        };
        if held && acked {
            return Ok(());
        }
        if !held {
            // Not a replication timeout, but the same answer: the waiter must not be told.
            self.metrics.replication_failure("lock_confirm_handoff");
        }
        Err(EngineError::NotReplicated {
            what: if held {
                format!("hand-off of {key} (token {token})")
            } else {
                format!("hand-off of {key} (token {token}): no longer held after a failover")
            },
            grant: None,
        })
    }
}

impl RedisLockStore {
    /// `release.lua`: compare-and-delete on `token`; `withdrawn` non-empty records the end as
    /// `lock_withdrawn {reason}`.
    async fn end_with_token(
        &self,
        key: &LockKey,
        token: u64,
        reason: ReleaseReason,
        actor: Option<&Actor>,
        withdrawn: &str,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        let args = vec![
            prefix_of(key),
            key.to_string(),
            token.to_string(),
            reason.as_str().to_owned(),
            actor_json(actor)?,
            withdrawn.to_owned(),
        ];
        self.release_args(key, args).await
    }

    /// Runs `release.lua` with `args` (see its header).
    async fn release_args(
        &self,
        key: &LockKey,
        args: Vec<String>,
    ) -> EngineResult<TokenOutcome<LockTransition>> {
        let items = self
            .run("lock_release", &scripts().release, resource_keys(key), args)
            .await?;
        match single("release", items)? {
            Item::NotHeld { current } => Ok(TokenOutcome::NotHeld {
                current: current.map(Into::into),
            }),
            other => Ok(TokenOutcome::Done(other.into_transition()?)),
        }
    }
}

/// The lock key a transition is about.
fn transition_key(t: &LockTransition) -> LockKey {
    match t {
        LockTransition::Released { lock, .. } => lock.key(),
        LockTransition::WaitExpired { room, resource, .. } => {
            LockKey::new(room.clone(), resource.clone())
        }
    }
}
