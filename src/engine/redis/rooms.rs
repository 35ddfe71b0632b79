//! The Redis side of the operator's room listing (`GET /v1/admin/rooms`): bounded `ZSCAN`
//! steps over the indexes the engines already keep, never `KEYS` and never a keyspace `SCAN`.
//!
//! - Rooms with members: `ps:rooms` (one zset holding every room with presence entries, see
//!   [`super::presence`]). One key, so one Cluster slot: no per-primary iteration is needed.
//!   It may still list a room whose last member left (until its next sweep), so each room's
//!   live members are read and empty rooms are skipped.
//! - Rooms with locks: the `SHARDS` expiry indexes `ls:{ls<N>}:due` (every held lock is filed
//!   there under its key `<room>/<resource>`), one after the other. A room with several locks
//!   is seen several times, in several shards and steps; it is listed only where its
//!   *canonical* lock is seen — its live lock with the smallest resource name — so a complete
//!   iteration lists it once.
//!
//! As with every `SCAN`, an entry present for the whole iteration is returned at least once
//! (Redis may repeat one while the set is resized, and `COUNT` is a hint: a small zset is
//! returned whole), and entries that come and go during it may or may not be.

use std::collections::{BTreeMap, HashSet};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use futures_util::future::join_all;

use super::{call, engine_err, keys};
use crate::engine::{EngineError, EngineResult, LockKey, LockStore, PresenceStore, RoomPage};
use crate::names::Entity;
use crate::telemetry::RedisMetrics;

/// One `ZSCAN key cursor COUNT count` step: the members (scores dropped) and the next cursor
/// (0 once the iteration is complete).
async fn zscan_step(
    client: &Client,
    metrics: &RedisMetrics,
    op: &'static str,
    key: String,
    cursor: u64,
    count: usize,
) -> EngineResult<(Vec<String>, u64)> {
    let cmd = CustomCommand::new_static("ZSCAN", ClusterHash::FirstKey, false);
    let args: Vec<Value> = vec![
        key.into(),
        cursor.to_string().into(),
        "COUNT".into(),
        (count.max(1) as i64).into(),
    ];
    let reply: Value = call(metrics, op, client.custom(cmd, args))
        .await
        .map_err(engine_err)?;
    let bad = || EngineError::Internal("redis: unexpected ZSCAN reply".into());
    let Value::Array(mut parts) = reply else {
        return Err(bad());
    };
    if parts.len() != 2 {
        return Err(bad());
    }
    let items = parts.pop().ok_or_else(bad)?;
    let next = parts
        .pop()
        .and_then(|c| c.as_string())
        .and_then(|c| c.parse::<u64>().ok())
        .ok_or_else(bad)?;
    let Value::Array(items) = items else {
        return Err(bad());
    };
    // Member, score, member, score, …
    let members = items
        .into_iter()
        .step_by(2)
        .filter_map(|v| v.as_string())
        .collect();
    Ok((members, next))
}

/// `""` (the start) or a decimal `ZSCAN` cursor.
fn parse_cursor(after: &str) -> Option<u64> {
    if after.is_empty() {
        Some(0)
    } else {
        after.parse().ok()
    }
}

/// [`PresenceStore::room_page`] for [`super::presence::RedisPresenceStore`].
pub(super) async fn presence_page(
    store: &super::presence::RedisPresenceStore,
    client: &Client,
    metrics: &RedisMetrics,
    after: &str,
    count: usize,
) -> EngineResult<Option<RoomPage>> {
    let Some(cursor) = parse_cursor(after) else {
        return Ok(None);
    };
    let (names, next) = zscan_step(
        client,
        metrics,
        "presence_rooms_scan",
        keys::presence_rooms(),
        cursor,
        count,
    )
    .await?;
    let mut seen = HashSet::new();
    let rooms: Vec<Entity> = names
        .iter()
        .filter(|n| seen.insert(n.as_str()))
        .filter_map(|n| Entity::parse(n).ok())
        .collect();
    let counted = join_all(rooms.iter().map(|r| store.members(r))).await;
    let mut out = Vec::new();
    for (room, members) in rooms.into_iter().zip(counted) {
        let n = members?.len();
        if n > 0 {
            out.push((room, n));
        }
    }
    Ok(Some(RoomPage {
        rooms: out,
        next: (next != 0).then(|| next.to_string()),
    }))
}

/// [`LockStore::room_page`] for [`super::locks::RedisLockStore`]; the cursor is
/// `<shard>.<zscan cursor>`.
pub(super) async fn lock_page(
    store: &super::locks::RedisLockStore,
    client: &Client,
    metrics: &RedisMetrics,
    after: &str,
    count: usize,
) -> EngineResult<Option<RoomPage>> {
    let (shard, cursor) = if after.is_empty() {
        (0, 0)
    } else {
        let Some((s, c)) = after.split_once('.') else {
            return Ok(None);
        };
        match (s.parse::<u32>(), c.parse::<u64>()) {
            (Ok(s), Ok(c)) if s < keys::SHARDS => (s, c),
            _ => return Ok(None),
        }
    };
    let (lock_keys, next) = zscan_step(
        client,
        metrics,
        "lock_rooms_scan",
        keys::due(shard),
        cursor,
        count,
    )
    .await?;
    // Room → the lock keys seen in this step.
    let mut seen: BTreeMap<Entity, HashSet<String>> = BTreeMap::new();
    for k in lock_keys {
        if let Some(key) = LockKey::parse(&k) {
            seen.entry(key.room).or_default().insert(k);
        }
    }
    let rooms: Vec<(Entity, HashSet<String>)> = seen.into_iter().collect();
    let listed = join_all(rooms.iter().map(|(r, _)| store.list_room(r))).await;
    let mut out = Vec::new();
    for ((room, keys_seen), locks) in rooms.into_iter().zip(listed) {
        let locks = locks?;
        let canonical = locks
            .iter()
            .min_by(|a, b| a.resource.as_str().cmp(b.resource.as_str()))
            .map(|l| l.key().to_string());
        if canonical.is_some_and(|c| keys_seen.contains(&c)) {
            out.push((room, locks.len()));
        }
    }
    let next = match next {
        0 if shard + 1 < keys::SHARDS => Some(format!("{}.0", shard + 1)),
        0 => None,
        c => Some(format!("{shard}.{c}")),
    };
    Ok(Some(RoomPage { rooms: out, next }))
}
