//! Lock-gated write access for `/v1/yjs` connections (`?lock=<resource>`): a connection is
//! writable only while its user holds the lockstep lock on `<resource>` in the document's room.
//!
//! It owns, per node, the set of lock-gated connections by lock key, and decides when each
//! loses its write access:
//!
//! - **at connect** ([`LockGate::open`]): the connection is registered first, the node is
//!   subscribed to the room's events, then the holder is read from the lock store. Held by the
//!   connection's user (any of their sessions, or their HTTP grant) → a [`Gate`] (writable while
//!   it stays open); not held → `None` (read-only for the connection's life). Lock events that
//!   arrive between the registration and the read are kept as per-key marks, so a release
//!   racing the read is not missed.
//! - **event-driven** ([`LockWatch::lock_event`], called by the hub for every lock event this
//!   node receives, from any node through the broker): `lock.released` of the gate's token (or
//!   a later one), or `lock.acquired` by another user with a newer token, closes the gate. A
//!   newer grant to the same user (a release this node missed, then a re-acquire) is adopted.
//! - **backstop** ([`LockGate::run`], one task per node): every [`BACKSTOP`] (and at once after
//!   a broker resync) each watched key's holder is read again, because pub/sub is at-most-once.
//!
//! Closing a gate cancels its token: the connection checks it before every message, so no
//! update that arrives after the loss is known is applied, and its loop closes the socket with
//! [`crate::error::close::LOCK_LOST`]. A connection costs one map entry and one
//! `CancellationToken`; no task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineError, LockInfo, LockKey, LockStore, RoomEvent, RoomEventKind, UserId};
use crate::hub::LockWatch;
use crate::names::Entity;
use crate::node::Node;

/// How often every watched lock's holder is read again, in case an event was lost.
pub const BACKSTOP: Duration = Duration::from_secs(5);

/// The lock-gated connections of this node.
#[derive(Default)]
pub struct LockGate {
    /// Room → resource → the connections gated on that lock. Nested so that "does this node
    /// watch room R" (every broker (un)subscription asks) is one lookup.
    rooms: Mutex<HashMap<Entity, HashMap<Entity, Watched>>>,
    next: AtomicU64,
    /// Wakes the backstop before its interval (a broker resync: events may have been lost).
    recheck: Notify,
}

/// One watched lock key.
#[derive(Default)]
struct Watched {
    /// The highest token seen released, and the highest seen acquired (with its user), since
    /// the key is watched: what a connection still being opened compares its holder with.
    released: u64,
    acquired: Option<(u64, UserId)>,
    conns: HashMap<u64, Watcher>,
}

struct Watcher {
    user: UserId,
    /// The token of the grant this connection writes under; 0 while it is being opened.
    token: u64,
    lost: CancellationToken,
}

/// One connection's write access: open while its user holds the lock. Leaves the gate when
/// dropped; [`Gate::close`] also lets the node unsubscribe from the room.
pub struct Gate {
    gate: Arc<LockGate>,
    key: LockKey,
    id: u64,
    lost: CancellationToken,
}

impl Gate {
    /// Whether the lock is still held (the connection may write).
    pub fn is_open(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// Resolves once the lock is lost.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Leaves the gate and drops the node's subscription to the room when nothing else
    /// needs it.
    pub async fn close(self, node: &Node) {
        let room = self.key.room.clone();
        drop(self);
        if let Err(e) = node.sync_subscription(&room).await {
            tracing::debug!(%room, error = %e, "yjs lock gate: unsubscribe failed");
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.gate.forget(&self.key, self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LockGate {
    pub fn new() -> Arc<LockGate> {
        Arc::new(LockGate::default())
    }

    /// Whether a connection of this node is gated on a lock in `room` (the node must then
    /// receive the room's events).
    pub fn watches(&self, room: &Entity) -> bool {
        lock(&self.rooms).contains_key(room)
    }

    /// How many connections are gated (tests, diagnostics).
    pub fn gated(&self) -> usize {
        lock(&self.rooms)
            .values()
            .flat_map(|r| r.values())
            .map(|w| w.conns.len())
            .sum()
    }

    /// Asks the backstop to re-read every watched holder now (after a broker resync).
    pub fn recheck_soon(&self) {
        self.recheck.notify_one();
    }

    /// Watches `key` for a connection of `user` following the grant `token` (0: none yet).
    fn register(self: &Arc<Self>, key: LockKey, user: UserId, token: u64) -> Gate {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let lost = CancellationToken::new();
        let watcher = Watcher {
            user,
            token,
            lost: lost.clone(),
        };
        lock(&self.rooms)
            .entry(key.room.clone())
            .or_default()
            .entry(key.resource.clone())
            .or_default()
            .conns
            .insert(id, watcher);
        Gate {
            gate: self.clone(),
            key,
            id,
            lost,
        }
    }

    /// Opens write access for `user` on `key`: `Some` when the lock is held by `user` now,
    /// `None` when it is not (the connection is read-only). `Err` when the node could not
    /// subscribe to the room or read the lock (the caller refuses the connection).
    pub async fn open(
        self: &Arc<Self>,
        node: &Node,
        key: LockKey,
        user: UserId,
    ) -> Result<Option<Gate>, EngineError> {
        let gate = self.register(key, user.clone(), 0);
        // Registered before subscribing: from here on the node receives the room's events,
        // and every lock event is recorded in the key's marks.
        let holder = async {
            node.sync_subscription(&gate.key.room).await?;
            node.locks.get(&gate.key).await
        };
        let holder = match holder.await {
            Ok(h) => h,
            Err(e) => {
                gate.close(node).await;
                return Err(e);
            }
        };
        let writable = {
            let mut rooms = lock(&self.rooms);
            let watched = rooms
                .get_mut(&gate.key.room)
                .and_then(|r| r.get_mut(&gate.key.resource));
            match (watched, holder) {
                (Some(w), Some(h)) if h.holder.user_id == user && w.current(&h) => {
                    // A newer grant to the same user seen meanwhile is the one to follow.
                    let token = match &w.acquired {
                        Some((t, u)) if *u == user => h.token.max(*t),
                        _ => h.token,
                    };
                    if let Some(me) = w.conns.get_mut(&gate.id) {
                        me.token = token;
                    }
                    true
                }
                _ => false,
            }
        };
        if writable {
            Ok(Some(gate))
        } else {
            gate.close(node).await;
            Ok(None)
        }
    }

    fn forget(&self, key: &LockKey, id: u64) {
        let mut rooms = lock(&self.rooms);
        let Some(resources) = rooms.get_mut(&key.room) else {
            return;
        };
        if let Some(w) = resources.get_mut(&key.resource) {
            w.conns.remove(&id);
            if w.conns.is_empty() {
                resources.remove(&key.resource);
            }
        }
        if resources.is_empty() {
            rooms.remove(&key.room);
        }
    }

    /// The backstop: re-reads every watched holder each [`BACKSTOP`] (or when a resync asks),
    /// until `stop`.
    pub async fn run(self: Arc<Self>, locks: Arc<dyn LockStore>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(BACKSTOP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.recheck.notified() => {}
            }
            self.recheck_all(&*locks).await;
        }
    }

    /// Reads the holder of every watched key once and closes the gates it no longer backs.
    pub async fn recheck_all(&self, locks: &dyn LockStore) {
        // Only gates already open are judged, by the token they had before the read: one
        // opened (or moved to a newer token) while the read was under way is left alone.
        let keys: Vec<(LockKey, Vec<(u64, u64)>)> = lock(&self.rooms)
            .iter()
            .flat_map(|(room, resources)| {
                resources.iter().map(move |(resource, w)| {
                    let open = w
                        .conns
                        .iter()
                        .filter(|(_, c)| c.token != 0 && !c.lost.is_cancelled())
                        .map(|(id, c)| (*id, c.token))
                        .collect();
                    (LockKey::new(room.clone(), resource.clone()), open)
                })
            })
            .collect();
        for (key, open) in keys {
            if open.is_empty() {
                continue;
            }
            let holder = match locks.get(&key).await {
                Ok(h) => h,
                Err(e) => {
                    // Unknown is not lost: the next round (or an event) decides.
                    tracing::debug!(%key, error = %e, "yjs lock gate: holder not read");
                    continue;
                }
            };
            let mut rooms = lock(&self.rooms);
            let Some(w) = rooms
                .get_mut(&key.room)
                .and_then(|r| r.get_mut(&key.resource))
            else {
                continue;
            };
            for (id, token) in open {
                let Some(c) = w.conns.get_mut(&id).filter(|c| c.token == token) else {
                    continue;
                };
                match &holder {
                    Some(h) if h.holder.user_id == c.user => c.token = c.token.max(h.token),
                    Some(h) if h.token < c.token => {}
                    _ => {
                        tracing::debug!(%key, conn = id, "yjs lock gate: lock lost (backstop)");
                        c.lost.cancel();
                    }
                }
            }
        }
    }
}

impl Watched {
    /// Whether `holder`, read from the store, is still current given the events seen.
    fn current(&self, holder: &LockInfo) -> bool {
        holder.token > self.released
            && self
                .acquired
                .as_ref()
                .is_none_or(|(t, u)| *t <= holder.token || *u == holder.holder.user_id)
    }
}

impl LockWatch for LockGate {
    fn lock_event(&self, event: &RoomEvent) {
        let (info, released) = match &event.kind {
            RoomEventKind::LockReleased { lock, .. } => (lock, true),
            RoomEventKind::LockAcquired { grant, .. } => (&grant.lock, false),
            _ => return,
        };
        let mut rooms = lock(&self.rooms);
        let Some(w) = rooms
            .get_mut(&info.room)
            .and_then(|r| r.get_mut(&info.resource))
        else {
            return;
        };
        if released {
            w.released = w.released.max(info.token);
        } else if w.acquired.as_ref().is_none_or(|(t, _)| *t < info.token) {
            w.acquired = Some((info.token, info.holder.user_id.clone()));
        }
        for (id, c) in &mut w.conns {
            if c.token == 0 || c.lost.is_cancelled() {
                continue;
            }
            let lost = if released {
                // The grant it writes under (or a later one) ended.
                info.token >= c.token
            } else if info.token > c.token && info.holder.user_id == c.user {
                // A newer grant to the same user: a release was missed here, and the user
                // holds the lock again.
                c.token = info.token;
                false
            } else {
                info.token > c.token
            };
            if lost {
                tracing::debug!(key = %info.key(), conn = id, "yjs lock gate: lock lost");
                c.lost.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Grant, Holder, ReleaseReason};

    fn entity(s: &str) -> Entity {
        Entity::parse(s).unwrap()
    }

    fn info(user: &str, token: u64) -> LockInfo {
        LockInfo {
            room: entity("scene:1"),
            resource: entity("segment:1"),
            token,
            holder: Holder {
                user_id: user.into(),
                name: user.into(),
                session_id: "s".into(),
                node_id: "n".into(),
            },
            action: "edit".into(),
            since: 0,
            expires_at: u64::MAX,
        }
    }

    fn released(user: &str, token: u64) -> RoomEvent {
        RoomEvent {
            room: entity("scene:1"),
            origin: None,
            kind: RoomEventKind::LockReleased {
                lock: info(user, token),
                reason: ReleaseReason::Forced,
            },
        }
    }

    fn acquired(user: &str, token: u64) -> RoomEvent {
        RoomEvent {
            room: entity("scene:1"),
            origin: None,
            kind: RoomEventKind::LockAcquired {
                grant: Grant {
                    lock: info(user, token),
                    request_id: None,
                },
                via_queue: false,
            },
        }
    }

    /// A gate open at `token` for `user`, without a node (the event logic only).
    fn gated(gate: &Arc<LockGate>, user: &str, token: u64) -> Gate {
        let key = LockKey::new(entity("scene:1"), entity("segment:1"));
        gate.register(key, user.into(), token)
    }

    #[test]
    fn a_release_of_its_grant_closes_the_gate_and_an_older_one_does_not() {
        let gate = LockGate::new();
        let g = gated(&gate, "ann", 5);
        gate.lock_event(&released("x", 4));
        assert!(g.is_open(), "an older grant's release is stale");
        gate.lock_event(&acquired("ann", 5));
        assert!(g.is_open(), "an extend re-announces the same token");
        gate.lock_event(&released("ann", 5));
        assert!(!g.is_open());
    }

    #[test]
    fn another_users_newer_grant_closes_the_gate_and_the_same_users_is_adopted() {
        let gate = LockGate::new();
        let mine = gated(&gate, "ann", 5);
        let other = gated(&gate, "ann", 5);
        gate.lock_event(&acquired("ann", 6));
        assert!(mine.is_open() && other.is_open());
        gate.lock_event(&released("ann", 5));
        assert!(
            mine.is_open(),
            "the old grant's release after the adopted newer one"
        );
        gate.lock_event(&acquired("bob", 7));
        assert!(!mine.is_open() && !other.is_open());
    }

    #[test]
    fn the_marks_catch_a_release_that_races_the_holder_read() {
        let mut w = Watched::default();
        assert!(w.current(&info("ann", 5)));
        w.released = 5;
        assert!(!w.current(&info("ann", 5)), "released while being read");
        w.released = 0;
        w.acquired = Some((6, "bob".into()));
        assert!(!w.current(&info("ann", 5)), "granted to bob meanwhile");
        assert!(w.current(&info("bob", 6)));
    }

    #[test]
    fn the_last_gate_of_a_room_leaves_it() {
        let gate = LockGate::new();
        let a = gated(&gate, "ann", 1);
        let b = gated(&gate, "bob", 1);
        assert!(gate.watches(&entity("scene:1")));
        assert_eq!(gate.gated(), 2);
        drop(a);
        assert!(gate.watches(&entity("scene:1")));
        drop(b);
        assert!(!gate.watches(&entity("scene:1")));
    }
}
