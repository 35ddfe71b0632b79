//! [`RedisPresenceStore`]: room members in Redis, shared by every node.
//!
//! # Layout (see [`keys`])
//!
//! | key | type | content |
//! |---|---|---|
//! | `ps:{<room>}:members` | hash | session id → member JSON (serde) |
//! | `ps:{<room>}:expiry` | zset | session id → expiry instant (ms, Redis clock) |
//! | `ps:{<entity>}:focus` | hash | `"<room> <session>"` → expiry instant, members focused on entity |
//! | `ps:rooms` | zset | room → the instant the room next needs a sweep |
//!
//! The two keys of a room share the hash tag `{<room>}`, so every change of membership is one
//! Lua script over both (`scripts/presence_*.lua`) and works in Cluster too. The focus index and
//! `ps:rooms` live in other slots: they are updated by separate commands after the script,
//! best effort, and reads never trust them alone.
//!
//! # Expiry
//!
//! Every entry expires `member_ttl_ms` after it was last written (join, update) or renewed
//! ([`refresh`](PresenceStore::refresh), which the node calls every `ttl / 3` for the rooms of
//! its live sessions). Expiry is decided by the Redis server clock (`TIME` inside the scripts),
//! never by a node's clock, so nodes with skewed clocks agree. Reads hide expired entries at
//! once; [`sweep`](PresenceStore::sweep) removes them and returns each exactly once, even with
//! every node sweeping concurrently (the removal is one script that returns only what it
//! removed), so exactly one node announces the `presence.leave`. A `leave` racing a sweep is
//! settled the same way: whoever removes the entry gets it back.
//!
//! A write from a session (join, update, refresh) renews an entry that has expired but was not
//! swept yet: the session is evidently alive. Once swept, an entry is gone; refresh never
//! recreates it (it has no member data), the node has to join again.
//!
//! # `ps:rooms`: finding rooms to sweep
//!
//! The score of a room is a lower bound of its earliest member expiry: join/refresh lower it
//! (`ZADD LT`), a sweep of the room sets it to the earliest expiry left. A sweeper claims the
//! due rooms (score ≤ now) by moving them a few seconds ahead in one script, so concurrent
//! sweepers split the work instead of repeating it; a sweeper that dies mid-way leaves its
//! rooms to come due again when the claim runs out. A live room is thus visited about once per
//! ttl. An emptied room is removed from `ps:rooms`, then re-added if a member arrived meanwhile
//! (the check comes after the removal, so a concurrent join is never lost).
//!
//! # Focus index
//!
//! `presence_of(entity)` reads `ps:{entity}:focus` and then each listed member from its room,
//! keeping only members that are live and still focused on `entity`, so a stale entry (a lost
//! best-effort delete, an interleaving of two updates) is harmless. Entries hold the member's
//! expiry when written and are deleted by compare-and-delete ("at or below the expiry of the
//! membership being removed"), so a late delete never removes a newer entry; stale entries that
//! have expired are pruned by the reads that skip them, and refresh rewrites the entries of
//! live members, so a lost write heals within `ttl / 3`.
//!
//! # A focus change in one round trip
//!
//! [`update_known`](PresenceStore::update_known) (the node's path: it knows the member it last
//! wrote) skips the read: it sends the compare-and-set script with the known member as the
//! expected value and, concurrently (other slots in a Cluster), the index writes for the old
//! and new focus (`presence_focus_set.lua`, timed by the server clock: the entry's value is
//! `now + ttl`, and the old entry goes if its value is at or below that). One round trip of
//! latency instead of four. If the known member was out of date (the compare fails) the
//! update continues as [`update`](PresenceStore::update) does, from the current value; the
//! index writes already made are harmless (reads check every entry against its member). The
//! price of timing by the server clock instead of the membership's exact expiry: a `del`
//! re-sent by fred after a reconnect, seconds later, could remove a newer entry of the same
//! member, until the member's next refresh writes it again.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use fred::clients::Pool;
use fred::prelude::*;
use fred::types::sorted_sets::Ordering;
use futures_util::StreamExt;

use super::script::LuaScript;
use super::{call, engine_err, keys};
use crate::engine::{
    EngineError, EngineResult, Member, PresencePatch, PresenceStore, RoomPage, SessionId,
};
use crate::names::Entity;
use crate::telemetry::RedisMetrics;

/// Default lifetime of a presence entry without refresh (ms).
pub const DEFAULT_MEMBER_TTL_MS: u64 = 30_000;

/// How long a sweeper holds the rooms it claimed before another may take them (ms).
const SWEEP_CLAIM_MS: u64 = 5_000;

/// Rooms worked on at once by refresh, sweep and `presence_of`.
const CONCURRENCY: usize = 16;

/// Compare-and-set attempts of an update before giving up (each retry means another writer
/// changed the member in between; a handful is plenty).
const UPDATE_ATTEMPTS: usize = 16;

struct Scripts {
    join: LuaScript,
    update: LuaScript,
    leave: LuaScript,
    members: LuaScript,
    refresh: LuaScript,
    sweep: LuaScript,
    due: LuaScript,
    focus_del: LuaScript,
    focus_set: LuaScript,
}

impl Scripts {
    /// fred may re-send a script after a reconnect; those whose second run would change the
    /// outcome run `once` per call ([`super::script`]).
    fn load() -> Scripts {
        let once = |body: &str| LuaScript::once("", body);
        Scripts {
            // Re-run: the member just written comes back as "previous" (a rejoin, not a join).
            join: once(include_str!("scripts/presence_join.lua")),
            // Re-run: a conflict with itself; the retry then loses the old focus to clear.
            update: once(include_str!("scripts/presence_update.lua")),
            // Re-run: nothing removed, so the departure is never announced.
            leave: once(include_str!("scripts/presence_leave.lua")),
            members: LuaScript::plain(include_str!("scripts/presence_members.lua")),
            // Re-run renews the same expiries and reports the same missing sessions.
            refresh: LuaScript::plain(include_str!("scripts/presence_refresh.lua")),
            // Re-run: the removed members are never announced.
            sweep: once(include_str!("scripts/presence_sweep.lua")),
            // Re-run: the rooms claimed by the first run are not returned and wait a claim.
            due: once(include_str!("scripts/presence_due.lua")),
            // Compare-and-delete: the same on a re-run (the count is not used).
            focus_del: LuaScript::plain(include_str!("scripts/presence_focus_del.lua")),
            // Re-run: the same write; a late re-run of a `del` may remove a newer entry of the
            // same member, which its next refresh writes again (see "Focus index").
            focus_set: LuaScript::plain(include_str!("scripts/presence_focus_set.lua")),
        }
    }
}

/// The Redis [`PresenceStore`]. Cheap to share behind an `Arc`; all state is in Redis.
pub struct RedisPresenceStore {
    pool: Pool,
    member_ttl_ms: u64,
    /// Members one room may have, checked atomically in `presence_join`.
    max_members: usize,
    scripts: Scripts,
    metrics: RedisMetrics,
}

impl RedisPresenceStore {
    /// A store over a connected command pool (see [`super::connect`]). Entries expire
    /// `member_ttl_ms` after their last write or refresh ([`DEFAULT_MEMBER_TTL_MS`] is 30 s);
    /// the node must refresh its sessions' entries every [`refresh_interval`](Self::refresh_interval).
    pub fn new(pool: Pool, member_ttl_ms: u64) -> RedisPresenceStore {
        RedisPresenceStore {
            pool,
            member_ttl_ms: member_ttl_ms.max(1),
            max_members: usize::MAX,
            scripts: Scripts::load(),
            metrics: RedisMetrics::default(),
        }
    }

    /// Caps the live members of each room (`LOCKSTEP_MAX_MEMBERS_PER_ROOM`), cluster-wide.
    pub fn with_max_members(mut self, max: usize) -> RedisPresenceStore {
        self.max_members = max;
        self
    }

    /// Records every Redis call in `metrics` (see [`super::call`]).
    pub fn with_metrics(mut self, metrics: RedisMetrics) -> RedisPresenceStore {
        self.metrics = metrics;
        self
    }

    /// Connects a pool to `url` and builds a store over it.
    pub async fn connect(url: &str, member_ttl_ms: u64) -> Result<RedisPresenceStore, EngineError> {
        Ok(RedisPresenceStore::new(
            super::connect(url).await?,
            member_ttl_ms,
        ))
    }

    /// The lifetime of an entry without refresh (ms).
    pub fn member_ttl_ms(&self) -> u64 {
        self.member_ttl_ms
    }

    /// How often the node should refresh: a third of the ttl, so one lost refresh is survived.
    pub fn refresh_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis((self.member_ttl_ms / 3).max(1))
    }

    fn client(&self) -> &Client {
        self.pool.next()
    }

    fn room_keys(room: &Entity) -> Vec<String> {
        vec![
            keys::members(room.as_str()),
            keys::member_expiry(room.as_str()),
        ]
    }

    async fn eval(
        &self,
        op: &'static str,
        script: &LuaScript,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> EngineResult<Value> {
        let eval = script.eval(self.client(), keys, args);
        call(&self.metrics, op, eval).await.map_err(engine_err)
    }

    /// Live members of `room` (all, or those of `sessions`), unordered.
    async fn live_members(
        &self,
        room: &Entity,
        sessions: Vec<String>,
    ) -> EngineResult<Vec<Member>> {
        let reply = self
            .eval(
                "presence_members",
                &self.scripts.members,
                Self::room_keys(room),
                sessions,
            )
            .await?;
        let mut items = reply.into_array().into_iter();
        // The first item is the server clock.
        items
            .next()
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad_reply("members"))?;
        // One damaged entry must not hide the whole room: skip it, loudly.
        let members = items
            .filter_map(|v| match parse_member(&v) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, %room, "presence: skipping an unreadable member entry");
                    None
                }
            })
            .collect();
        Ok(members)
    }

    /// Focus-index maintenance after a member of `room` changed from `old` to `new`: removes
    /// the old entry (if its focus changed or the member left) and writes the new one.
    /// Best effort: failures are logged, reads filter stale entries and refresh heals lost ones.
    async fn refocus(
        &self,
        room: &Entity,
        session: &SessionId,
        old: Option<(&Member, Option<u64>)>,
        new: Option<(&Member, u64)>,
    ) {
        let field = focus_field(room, session);
        let new_focus = new.and_then(|(m, _)| m.focus.as_ref());
        if let Some((old, old_expiry)) = old
            && let Some(old_focus) = &old.focus
            && Some(old_focus) != new_focus
        {
            // Bound: the old membership's expiry (0 would mean "now"; use 1 if unknown, which
            // only removes entries written before 1970: none, so the entry expires instead).
            let bound = old_expiry.unwrap_or(1).max(1);
            if let Err(e) = self.focus_del(old_focus, bound, vec![field.clone()]).await {
                tracing::warn!(error = %e, %room, focus = %old_focus, "presence: focus index delete failed");
            }
        }
        if let Some((m, expiry)) = new
            && let Some(focus) = &m.focus
        {
            let set = self
                .client()
                .hset(keys::focus(focus.as_str()), (field, expiry as i64));
            let r: Result<(), _> = call(&self.metrics, "presence_focus_set", set).await;
            if let Err(e) = r {
                tracing::warn!(error = %e, %room, %focus, "presence: focus index write failed");
            }
        }
    }

    /// `presence_focus_set.lua`: `set` or `del` the index entry of `session` in `room` on
    /// `focus`, by the server clock. Best effort, like [`refocus`](Self::refocus).
    async fn focus_index(&self, mode: &str, focus: &Entity, room: &Entity, session: &SessionId) {
        let args = vec![
            mode.to_owned(),
            self.member_ttl_ms.to_string(),
            focus_field(room, session),
        ];
        let op = if mode == "set" {
            "presence_focus_set"
        } else {
            "presence_focus_del"
        };
        let keys = vec![keys::focus(focus.as_str())];
        if let Err(e) = self.eval(op, &self.scripts.focus_set, keys, args).await {
            tracing::warn!(error = %e, %room, %focus, mode, "presence: focus index write failed");
        }
    }

    /// One compare-and-set of `expected` → `new` (`presence_update.lua`).
    async fn compare_and_set(
        &self,
        room: &Entity,
        session_id: &SessionId,
        expected: String,
        new: &Member,
    ) -> EngineResult<Cas> {
        let args = vec![
            session_id.to_string(),
            expected,
            to_json(new)?,
            self.member_ttl_ms.to_string(),
        ];
        let reply = self
            .eval(
                "presence_update",
                &self.scripts.update,
                Self::room_keys(room),
                args,
            )
            .await?;
        let mut items = reply.into_array().into_iter();
        match items.next().and_then(|v| v.as_i64()) {
            Some(1) => {
                let old_expiry = items.next().and_then(|v| v.as_u64());
                let expiry = items
                    .next()
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| bad_reply("update"))?;
                Ok(Cas::Written { old_expiry, expiry })
            }
            Some(0) => items
                .next()
                .and_then(|v| v.into_string())
                .map(Cas::Changed)
                .ok_or_else(|| bad_reply("update")),
            Some(-1) => Ok(Cas::NotMember),
            _ => Err(bad_reply("update")),
        }
    }

    /// The compare-and-set loop of `update`, from `current` (the member's JSON as read).
    async fn update_from(
        &self,
        room: &Entity,
        session_id: &SessionId,
        patch: &PresencePatch,
        mut current: String,
    ) -> EngineResult<Option<Member>> {
        for _ in 0..UPDATE_ATTEMPTS {
            let old: Member = from_json(&current)?;
            let new = patched(&old, patch);
            match self
                .compare_and_set(room, session_id, current, &new)
                .await?
            {
                Cas::Written { old_expiry, expiry } => {
                    self.refocus(
                        room,
                        session_id,
                        Some((&old, old_expiry)),
                        Some((&new, expiry)),
                    )
                    .await;
                    return Ok(Some(new));
                }
                Cas::Changed(now) => current = now,
                Cas::NotMember => return Ok(None),
            }
        }
        Err(EngineError::Unavailable(format!(
            "presence update of {session_id} in {room}: too many concurrent writers"
        )))
    }

    async fn focus_del(&self, focus: &Entity, bound: u64, fields: Vec<String>) -> EngineResult<()> {
        let mut args = Vec::with_capacity(fields.len() + 1);
        args.push(bound.to_string());
        args.extend(fields);
        self.eval(
            "presence_focus_del",
            &self.scripts.focus_del,
            vec![keys::focus(focus.as_str())],
            args,
        )
        .await
        .map(|_| ())
    }

    /// Makes sure `room` is in `ps:rooms` no later than `at` (lowers, never raises).
    async fn schedule_room(&self, room: &Entity, at: u64) -> EngineResult<()> {
        let add = self.client().zadd(
            keys::presence_rooms(),
            None,
            Some(Ordering::LessThan),
            false,
            false,
            (at as f64, room.as_str()),
        );
        let _: Value = call(&self.metrics, "presence_schedule", add)
            .await
            .map_err(engine_err)?;
        Ok(())
    }

    /// After sweeping `room`: the next instant it needs a sweep, or removal when it is empty.
    async fn reschedule_room(
        &self,
        room: &Entity,
        next: Option<u64>,
        now: u64,
    ) -> EngineResult<()> {
        let rooms_key = keys::presence_rooms();
        match next {
            Some(next) => {
                // Capped at now + ttl: a member joining (score now + ttl) between the sweep
                // script and this write is then never scheduled later than its own expiry.
                let at = next.min(now + self.member_ttl_ms);
                let add = self.client().zadd(
                    rooms_key,
                    None,
                    None,
                    false,
                    false,
                    (at as f64, room.as_str()),
                );
                let _: Value = call(&self.metrics, "presence_schedule", add)
                    .await
                    .map_err(engine_err)?;
            }
            None => {
                let rem = self.client().zrem(rooms_key, room.as_str());
                let _: Value = call(&self.metrics, "presence_unschedule", rem)
                    .await
                    .map_err(engine_err)?;
                // A join between the sweep script and the ZREM would be lost from ps:rooms:
                // look again after the removal and put the room back if it has anybody.
                let check = self.client().exists(keys::member_expiry(room.as_str()));
                let exists: u64 = call(&self.metrics, "presence_exists", check)
                    .await
                    .map_err(engine_err)?;
                if exists > 0 {
                    self.schedule_room(room, now).await?;
                }
            }
        }
        Ok(())
    }

    /// Sweeps one claimed room: removes up to `max` expired members, cleans their focus
    /// entries, reschedules the room.
    async fn sweep_room(
        &self,
        room: Entity,
        max: usize,
        now: u64,
    ) -> EngineResult<Vec<(Entity, Member)>> {
        let reply = self
            .eval(
                "presence_sweep",
                &self.scripts.sweep,
                Self::room_keys(&room),
                vec![max.max(1).to_string()],
            )
            .await?;
        let mut items = reply.into_array().into_iter();
        let next = items
            .next()
            .and_then(|v| v.as_i64())
            .ok_or_else(|| bad_reply("sweep"))?;
        let mut removed = Vec::new();
        let mut focus_dels: HashMap<Entity, (u64, Vec<String>)> = HashMap::new();
        while let (Some(json), Some(expiry)) = (items.next(), items.next()) {
            let expiry = expiry.as_u64().unwrap_or(1);
            match parse_member(&json) {
                Ok(m) => {
                    if let Some(f) = &m.focus {
                        let e = focus_dels.entry(f.clone()).or_insert((0, Vec::new()));
                        e.0 = e.0.max(expiry);
                        e.1.push(focus_field(&room, &m.session_id));
                    }
                    removed.push((room.clone(), m));
                }
                // Removed but unreadable: nothing to announce; say so rather than fail the
                // whole sweep (the entry is gone either way).
                Err(e) => {
                    tracing::warn!(error = %e, %room, "presence: swept an unreadable member entry")
                }
            }
        }
        for (focus, (bound, fields)) in focus_dels {
            if let Err(e) = self.focus_del(&focus, bound.max(1), fields).await {
                tracing::warn!(error = %e, %room, %focus, "presence: focus index delete failed");
            }
        }
        let next = u64::try_from(next).ok();
        if let Err(e) = self.reschedule_room(&room, next, now).await {
            // The claim runs out and the room comes due again: nothing is lost.
            tracing::warn!(error = %e, %room, "presence: rescheduling a swept room failed");
        }
        Ok(removed)
    }
}

#[async_trait]
impl PresenceStore for RedisPresenceStore {
    async fn join(&self, room: &Entity, member: Member) -> EngineResult<Option<Member>> {
        let json = to_json(&member)?;
        let args = vec![
            member.session_id.to_string(),
            json,
            self.member_ttl_ms.to_string(),
            self.max_members.to_string(),
        ];
        let reply = self
            .eval(
                "presence_join",
                &self.scripts.join,
                Self::room_keys(room),
                args,
            )
            .await?;
        let mut items = reply.into_array().into_iter();
        let (old, old_expiry, expiry) = (items.next(), items.next(), items.next());
        let expiry = match expiry.and_then(|v| v.as_i64()) {
            Some(-1) => return Err(EngineError::RoomFull(self.max_members)),
            Some(e) if e >= 0 => e as u64,
            _ => return Err(bad_reply("join")),
        };
        let old = match old {
            Some(v) if !v.is_null() => Some(parse_member(&v)?),
            _ => None,
        };
        let old_expiry = old_expiry.and_then(|v| v.as_u64());
        self.refocus(
            room,
            &member.session_id,
            old.as_ref().map(|m| (m, old_expiry)),
            Some((&member, expiry)),
        )
        .await;
        if let Err(e) = self.schedule_room(room, expiry).await {
            // Without it the entry is never swept if this node dies; the next refresh
            // (every ttl / 3) schedules the room again.
            tracing::warn!(error = %e, %room, "presence: scheduling the room for sweeps failed");
        }
        Ok(old)
    }

    async fn update(
        &self,
        room: &Entity,
        session_id: &SessionId,
        patch: PresencePatch,
    ) -> EngineResult<Option<Member>> {
        let members_key = keys::members(room.as_str());
        let get = self.client().hget(&members_key, session_id.as_ref());
        let current: Option<String> = call(&self.metrics, "presence_get", get)
            .await
            .map_err(engine_err)?;
        let Some(current) = current else {
            return Ok(None);
        };
        self.update_from(room, session_id, &patch, current).await
    }

    /// One round trip when `known` is current (module doc, "A focus change in one round
    /// trip").
    async fn update_known(
        &self,
        room: &Entity,
        session_id: &SessionId,
        patch: PresencePatch,
        known: Option<&Member>,
    ) -> EngineResult<Option<Member>> {
        let Some(known) = known.filter(|m| m.session_id == *session_id) else {
            return self.update(room, session_id, patch).await;
        };
        let new = patched(known, &patch);
        let old_focus = known
            .focus
            .as_ref()
            .filter(|f| new.focus.as_ref() != Some(*f));
        let cas = self.compare_and_set(room, session_id, to_json(known)?, &new);
        let del = async {
            if let Some(f) = old_focus {
                self.focus_index("del", f, room, session_id).await;
            }
        };
        let set = async {
            if let Some(f) = &new.focus {
                self.focus_index("set", f, room, session_id).await;
            }
        };
        let (cas, (), ()) = tokio::join!(cas, del, set);
        match cas? {
            Cas::Written { .. } => Ok(Some(new)),
            Cas::NotMember => Ok(None),
            Cas::Changed(current) => self.update_from(room, session_id, &patch, current).await,
        }
    }

    async fn leave(&self, room: &Entity, session_id: &SessionId) -> EngineResult<Option<Member>> {
        let reply = self
            .eval(
                "presence_leave",
                &self.scripts.leave,
                Self::room_keys(room),
                vec![session_id.to_string()],
            )
            .await?;
        let mut items = reply.into_array().into_iter();
        let old = match items.next() {
            Some(v) if !v.is_null() => parse_member(&v)?,
            _ => return Ok(None),
        };
        let old_expiry = items.next().and_then(|v| v.as_u64());
        self.refocus(room, session_id, Some((&old, old_expiry)), None)
            .await;
        Ok(Some(old))
    }

    async fn members(&self, room: &Entity) -> EngineResult<Vec<Member>> {
        let mut members = self.live_members(room, Vec::new()).await?;
        sort_members(&mut members);
        Ok(members)
    }

    /// Members of the room `entity` first (oldest first), then live members of any room
    /// focused on it (oldest first), each session once.
    async fn presence_of(&self, entity: &Entity) -> EngineResult<Vec<Member>> {
        let mut out = self.members(entity).await?;
        let mut seen: HashSet<SessionId> = out.iter().map(|m| m.session_id.clone()).collect();

        let get = self.client().hgetall(keys::focus(entity.as_str()));
        let entries: HashMap<String, String> = call(&self.metrics, "presence_focus_get", get)
            .await
            .map_err(engine_err)?;
        // Room → sessions listed as focused on `entity`.
        let mut by_room: BTreeMap<Entity, Vec<String>> = BTreeMap::new();
        let mut unparsable = Vec::new();
        for field in entries.into_keys() {
            match parse_focus_field(&field) {
                Some((room, session)) => by_room.entry(room).or_default().push(session),
                None => unparsable.push(field),
            }
        }
        let work: Vec<_> = by_room
            .into_iter()
            .map(|(room, sessions)| async move {
                let r = self.live_members(&room, sessions.clone()).await;
                (room, sessions, r)
            })
            .collect();
        let lookups = futures_util::stream::iter(work)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await;

        let mut focused: Vec<Member> = Vec::new();
        let mut stale: Vec<String> = unparsable;
        for (room, sessions, result) in lookups {
            let members = result?;
            let mut live: HashSet<SessionId> = HashSet::new();
            for m in members {
                if m.focus.as_ref() == Some(entity) {
                    live.insert(m.session_id.clone());
                    focused.push(m);
                }
            }
            stale.extend(
                sessions
                    .into_iter()
                    .filter(|s| !live.contains(s.as_str()))
                    .map(|s| focus_field(&room, &SessionId::from(s))),
            );
        }
        if !stale.is_empty() {
            // Prune stale entries once they have expired (bound 0 = the server clock now);
            // younger ones may belong to a write in flight and are left alone.
            if let Err(e) = self.focus_del(entity, 0, stale).await {
                tracing::debug!(error = %e, %entity, "presence: pruning the focus index failed");
            }
        }
        sort_members(&mut focused);
        for m in focused {
            if seen.insert(m.session_id.clone()) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Renews the entries of these sessions for `ttl_ms`, with their focus-index entries, and
    /// makes sure their rooms are scheduled for sweeps. Sessions no longer in a room are
    /// skipped. Every room is attempted; the first error is returned after all were tried.
    async fn refresh(
        &self,
        entries: &[(Entity, SessionId)],
        ttl_ms: u64,
    ) -> EngineResult<Vec<(Entity, SessionId)>> {
        let ttl = ttl_ms.max(1).to_string();
        let mut by_room: BTreeMap<Entity, Vec<String>> = BTreeMap::new();
        for (room, session) in entries {
            by_room
                .entry(room.clone())
                .or_insert_with(|| vec![ttl.clone()])
                .push(session.to_string());
        }
        let work: Vec<_> = by_room
            .into_iter()
            .map(|(room, args)| self.refresh_room(room, args))
            .collect();
        let results = futures_util::stream::iter(work)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<EngineResult<Vec<(Entity, SessionId)>>>>()
            .await;
        let mut missing = Vec::new();
        for r in results {
            missing.extend(r?);
        }
        Ok(missing)
    }

    async fn room_page(&self, after: &str, count: usize) -> EngineResult<Option<RoomPage>> {
        super::rooms::presence_page(self, self.client(), &self.metrics, after, count).await
    }

    /// Removes up to `max` members whose expiry has passed, from the rooms due in `ps:rooms`,
    /// and returns them with their rooms; each removed member is returned by exactly one call,
    /// whichever node makes it.
    async fn sweep(&self, max: usize) -> EngineResult<Vec<(Entity, Member)>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let reply = self
            .eval(
                "presence_due",
                &self.scripts.due,
                vec![keys::presence_rooms()],
                vec![max.to_string(), SWEEP_CLAIM_MS.to_string()],
            )
            .await?;
        let mut items = reply.into_array().into_iter();
        let now = items
            .next()
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad_reply("due"))?;
        let mut rooms = Vec::new();
        for v in items {
            let name = v.into_string().ok_or_else(|| bad_reply("due"))?;
            match Entity::parse(&name) {
                Ok(room) => rooms.push(room),
                Err(_) => {
                    // Not ours (one Redis may host other data under the prefix): drop it.
                    tracing::warn!(room = %name, "presence: dropping a bad room name from ps:rooms");
                    let rem = self.client().zrem(keys::presence_rooms(), name);
                    let _: Result<Value, _> = call(&self.metrics, "presence_unschedule", rem).await;
                }
            }
        }
        // Rooms are swept one after another so the budget `max` holds exactly; rooms left over
        // when it is spent are released (due now again) for the next sweep, by any node.
        let mut out = Vec::new();
        let mut first_err = None;
        let mut rooms = rooms.into_iter();
        for room in rooms.by_ref() {
            match self.sweep_room(room, max - out.len(), now).await {
                Ok(removed) => out.extend(removed),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            if out.len() >= max {
                break;
            }
        }
        let left: Vec<(f64, String)> = rooms.map(|r| (now as f64, r.to_string())).collect();
        if !left.is_empty() {
            let add = self.client().zadd(
                keys::presence_rooms(),
                Some(fred::types::SetOptions::XX),
                None,
                false,
                false,
                left,
            );
            let r: Result<Value, _> = call(&self.metrics, "presence_schedule", add).await;
            if let Err(e) = r {
                // Their claims run out instead.
                tracing::debug!(error = %e, "presence: releasing unswept rooms failed");
            }
        }
        match first_err {
            // What was removed must be announced: report the error only if nothing was.
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, "presence: sweeping a room failed (it comes due again)");
                Ok(out)
            }
            None => Ok(out),
        }
    }
}

impl RedisPresenceStore {
    async fn refresh_room(
        &self,
        room: Entity,
        args: Vec<String>,
    ) -> EngineResult<Vec<(Entity, SessionId)>> {
        let reply = self
            .eval(
                "presence_refresh",
                &self.scripts.refresh,
                Self::room_keys(&room),
                args,
            )
            .await?;
        let mut items = reply.into_array().into_iter();
        let expiry = items
            .next()
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad_reply("refresh"))?;
        let n_missing = items
            .next()
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad_reply("refresh"))?;
        let missing: Vec<(Entity, SessionId)> = items
            .by_ref()
            .take(n_missing as usize)
            .filter_map(|v| v.into_string())
            .map(|s| (room.clone(), SessionId::from(s)))
            .collect();
        let mut by_focus: HashMap<String, Vec<(String, i64)>> = HashMap::new();
        while let (Some(session), Some(focus)) = (items.next(), items.next()) {
            let (Some(session), Some(focus)) = (session.into_string(), focus.into_string()) else {
                continue;
            };
            if let Ok(focus) = Entity::parse(&focus) {
                by_focus
                    .entry(keys::focus(focus.as_str()))
                    .or_default()
                    .push((format!("{room} {session}"), expiry as i64));
            }
        }
        for (key, fields) in by_focus {
            let set = self.client().hset(key, fields);
            let r: Result<(), _> = call(&self.metrics, "presence_focus_set", set).await;
            if let Err(e) = r {
                tracing::warn!(error = %e, %room, "presence: focus index refresh failed");
            }
        }
        self.schedule_room(&room, expiry).await?;
        Ok(missing)
    }
}

/// The focus-index field of a member: `"<room> <session>"` (rooms have no spaces).
fn focus_field(room: &Entity, session: &SessionId) -> String {
    format!("{room} {session}")
}

fn parse_focus_field(field: &str) -> Option<(Entity, String)> {
    let (room, session) = field.split_once(' ')?;
    Some((Entity::parse(room).ok()?, session.to_owned()))
}

/// Oldest first; ties broken by session id (as the memory store does).
fn sort_members(members: &mut [Member]) {
    members.sort_by(|a, b| (a.since, &a.session_id).cmp(&(b.since, &b.session_id)));
}

/// What one compare-and-set of a member found.
enum Cas {
    Written {
        old_expiry: Option<u64>,
        expiry: u64,
    },
    /// The member's JSON is no longer the expected one: here is the current one.
    Changed(String),
    NotMember,
}

/// `old` with `patch` applied.
fn patched(old: &Member, patch: &PresencePatch) -> Member {
    let mut new = old.clone();
    if let Some(focus) = &patch.focus {
        new.focus = focus.clone();
    }
    if let Some(state) = &patch.state {
        new.state = state.clone();
    }
    new
}

fn to_json(m: &Member) -> EngineResult<String> {
    serde_json::to_string(m).map_err(|e| EngineError::Internal(format!("member JSON: {e}")))
}

fn from_json(s: &str) -> EngineResult<Member> {
    serde_json::from_str(s)
        .map_err(|e| EngineError::Internal(format!("bad member JSON in Redis: {e}")))
}

fn parse_member(v: &Value) -> EngineResult<Member> {
    let bytes = v.as_bytes().ok_or_else(|| bad_reply("member"))?;
    serde_json::from_slice(bytes)
        .map_err(|e| EngineError::Internal(format!("bad member JSON in Redis: {e}")))
}

fn bad_reply(what: &str) -> EngineError {
    EngineError::Internal(format!("unexpected reply from presence script {what}"))
}
