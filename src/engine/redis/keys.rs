//! The Redis key layout. Every key the engines touch is named here.
//!
//! # Shards
//!
//! A lock script must touch the lock, its fence counter, its queue, the expiry index and the
//! audit outbox in **one step**, and in Redis Cluster a script may only touch keys of one hash
//! slot. A per-resource hash tag (`{resource}`) would put every resource's outbox and expiry
//! index in its own slot, and nothing could drain or scan them. So lock keys carry a *shard*
//! tag instead: `{ls<N>}` with `N = fnv1a(key) % SHARDS`, where `key` is the lock's identity
//! `<room>/<resource>` ([`LockKey`](crate::engine::LockKey)'s text): the same resource locked
//! in two rooms is two locks, with keys of their own. Each shard has one expiry index
//! and one audit stream; reapers and the audit writer visit the `SHARDS` shards.
//! `SHARDS` is part of the data layout: changing it re-homes every key, so it never changes.
//!
//! # Lock keys (`<key>` = `<room>/<resource>`, shard `S` = [`shard_of`]`(<key>)`)
//!
//! | key | type | content |
//! |---|---|---|
//! | `ls:{S}:lock:<key>` | hash | `token room resource user_id name session_id node_id action since expires_at lease_until lease_ms` (ms; `lease_until` = 0 for "no lease") |
//! | `ls:{S}:fence:<key>` | string | last token issued; never decreases; expires `LOCKSTEP_FENCE_RETENTION` after its last write |
//! | `ls:{S}:queue:<key>` | list | waiting session ids, head first |
//! | `ls:{S}:waiters:<key>` | hash | session id → waiter JSON |
//! | `ls:{S}:due` | zset | lock key → the next instant (ms) something is due for it |
//! | `ls:{S}:room:<room>` | set | lock keys locked in `room` (this shard) |
//! | `ls:{S}:sess:<session>` | set | lock keys `session` holds or waits for (this shard) |
//! | `ls:{S}:audit` | stream | audit records of this shard's lock transitions (outbox) |
//!
//! # Presence keys (tag = the room)
//!
//! | key | type | content |
//! |---|---|---|
//! | `ps:{<room>}:members` | hash | session id → member JSON |
//! | `ps:{<room>}:expiry` | zset | session id → expiry instant (ms), refreshed by its node |
//! | `ps:{<entity>}:focus` | hash | `<room> <session>` → expiry instant, members focused on entity |
//! | `ps:rooms` | zset | room → when it next needs a sweep (a lower bound on its earliest expiry) |
//!
//! # Nodes, sessions, pub/sub
//!
//! | key | type | content |
//! |---|---|---|
//! | `node:<id>` | string | liveness key with a short expiry, refreshed by the node |
//! | `nodes` | set | node ids ever seen alive (sweeps look for dead ones here) |
//! | `resume:<token>` | string | a parked session (JSON), or the tombstone `claimed`, expiring a margin after the resume grace |
//! | `us:{<user>}:sessions` | zset | the user's live sessions (attached or parked) → expiry (ms), for the per-user limit |
//! | `revoked:<jti>` | string | a revoked token id, expiring with the token |
//! | channel `sessions:revoke` | pub/sub | admin revocations, to every node |
//! | channel `room:{<room>}` | pub/sub | msgpack room events (sharded pub/sub in Cluster) |

/// Number of lock shards. Part of the data layout: never change it.
pub const SHARDS: u32 = 16;

/// Prefix of every key, so one Redis can host other data (and tests can tell ours apart).
pub const PREFIX: &str = "lockstep:";

/// The shard of a lock key (`<room>/<resource>`; any string for node-level records):
/// FNV-1a 32-bit of it, modulo [`SHARDS`].
pub fn shard_of(key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SHARDS
}

/// The `{ls<N>}` tag part of shard `n`'s keys, prefixed: `lockstep:ls:{ls3}:`.
pub fn shard_prefix(n: u32) -> String {
    format!("{PREFIX}ls:{{ls{n}}}:")
}

pub fn lock(resource: &str) -> String {
    format!("{}lock:{resource}", shard_prefix(shard_of(resource)))
}
pub fn fence(resource: &str) -> String {
    format!("{}fence:{resource}", shard_prefix(shard_of(resource)))
}
pub fn queue(resource: &str) -> String {
    format!("{}queue:{resource}", shard_prefix(shard_of(resource)))
}
pub fn waiters(resource: &str) -> String {
    format!("{}waiters:{resource}", shard_prefix(shard_of(resource)))
}
pub fn due(shard: u32) -> String {
    format!("{}due", shard_prefix(shard))
}
pub fn room_locks(shard: u32, room: &str) -> String {
    format!("{}room:{room}", shard_prefix(shard))
}
pub fn session_locks(shard: u32, session: &str) -> String {
    format!("{}sess:{session}", shard_prefix(shard))
}
pub fn audit_stream(shard: u32) -> String {
    format!("{}audit", shard_prefix(shard))
}

pub fn members(room: &str) -> String {
    format!("{PREFIX}ps:{{{room}}}:members")
}
pub fn member_expiry(room: &str) -> String {
    format!("{PREFIX}ps:{{{room}}}:expiry")
}
pub fn focus(entity: &str) -> String {
    format!("{PREFIX}ps:{{{entity}}}:focus")
}
pub fn presence_rooms() -> String {
    format!("{PREFIX}ps:rooms")
}

pub fn node(id: &str) -> String {
    format!("{PREFIX}node:{id}")
}
pub fn nodes() -> String {
    format!("{PREFIX}nodes")
}
pub fn resume(token: &str) -> String {
    format!("{PREFIX}resume:{token}")
}
pub fn user_sessions(user: &str) -> String {
    format!("{PREFIX}us:{{{user}}}:sessions")
}
pub fn revoked(jti: &str) -> String {
    format!("{PREFIX}revoked:{jti}")
}
pub fn revoke_channel() -> String {
    format!("{PREFIX}sessions:revoke")
}
pub fn room_channel(room: &str) -> String {
    format!("{PREFIX}room:{{{room}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_keeps_all_its_keys_in_one_shard() {
        let r = "scene:42/segment:42-7";
        let tag = format!("{{ls{}}}", shard_of(r));
        for k in [
            lock(r),
            fence(r),
            queue(r),
            waiters(r),
            due(shard_of(r)),
            audit_stream(shard_of(r)),
        ] {
            assert!(k.contains(&tag), "{k}");
        }
    }

    #[test]
    fn shards_spread_and_are_stable() {
        // Stable across releases: this value is part of the data layout.
        assert_eq!(shard_of("segment:42-7"), shard_of("segment:42-7"));
        let used: std::collections::HashSet<u32> = (0..200)
            .map(|i| shard_of(&format!("segment:{i}")))
            .collect();
        assert_eq!(used.len() as u32, SHARDS);
    }
}
