//! The node's handle on one session: identity, outbound queue, joined rooms and held locks.
//!
//! The handle outlives a single socket only through resume: a resumed session gets a fresh
//! handle (new socket, maybe another codec) carrying over the same id, rooms and locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tungstenite::Message;

use super::outbound::{END_KILL, END_REVOKED, END_TAKEOVER, Outbound, Pushed, Signal};
use crate::auth::Principal;
use crate::engine::{LockKey, SessionId};
use crate::names::Entity;
use crate::protocol::snapshot::frame_len;
use crate::protocol::{Codec, ServerMessage};
use crate::telemetry::Metrics;

pub struct SessionHandle {
    pub id: SessionId,
    pub principal: Arc<Principal>,
    pub codec: Codec,
    pub outbound: Outbound,
    /// Raised when the session must end now (outbound overflow).
    pub kill: Signal,
    /// Raised when a resuming connection takes this session over.
    pub takeover: Signal,
    /// Cancelled once the node has parked or ended the session.
    pub ended: CancellationToken,
    /// Raised when an admin revoked the session (who: [`HandleState::revoked_by`]).
    pub revoked: Signal,
    metrics: Metrics,
    state: Mutex<HandleState>,
}

#[derive(Debug, Clone, Default)]
pub struct HandleState {
    pub rooms: Vec<Entity>,
    /// Lock (room, resource) → token of every lock this session holds.
    pub held: HashMap<LockKey, u64>,
    /// Locks this session is queued for.
    pub waits: Vec<LockKey>,
    /// This session's presence entry per joined room, as last stored: what the node
    /// re-registers when the presence store lost it (Redis restarted empty).
    pub members: Vec<(Entity, crate::engine::Member)>,
    pub share_cursor: bool,
    pub resume_token: Arc<str>,
    /// Rooms whose snapshot is being built, with the room events that arrived meanwhile:
    /// they are sent right after the snapshot, so no event is overtaken by an older snapshot.
    pub snapshotting: Vec<(Entity, Vec<Message>)>,
    /// The admin who revoked this session, for its `session_closed` record.
    pub revoked_by: Option<Arc<str>>,
}

/// Room events held back while a snapshot is built; past this the session is too far behind.
const MAX_HELD_BACK: usize = 1024;

impl SessionHandle {
    pub fn new(
        id: SessionId,
        principal: Arc<Principal>,
        codec: Codec,
        max_queue_bytes: usize,
        metrics: Metrics,
        state: HandleState,
    ) -> SessionHandle {
        let outbound = Outbound::new(max_queue_bytes);
        SessionHandle {
            id,
            principal,
            codec,
            kill: outbound.signal(END_KILL),
            takeover: outbound.signal(END_TAKEOVER),
            revoked: outbound.signal(END_REVOKED),
            outbound,
            ended: CancellationToken::new(),
            metrics,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HandleState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encodes and queues a message for this session only.
    pub fn send(&self, msg: &ServerMessage<'_>) {
        let frame = self.codec.encode(msg);
        let len = frame_len(&frame);
        if self.queue(frame) {
            self.metrics.messages_out(msg.type_name(), 1, len as u64);
        }
    }

    /// Queues an already encoded frame; false when it was not queued.
    pub fn queue(&self, frame: Message) -> bool {
        match self.outbound.push(frame) {
            Pushed::Queued | Pushed::Replaced => true,
            Pushed::Overflow => {
                self.overflowed();
                false
            }
            Pushed::Closed => false,
        }
    }

    /// Queues a page of a paged `room.snapshot` (all but its last, which goes through
    /// [`finish_snapshot_encoded`](Self::finish_snapshot_encoded)).
    pub fn queue_snapshot_page(&self, frame: Message) {
        let len = frame_len(&frame);
        if self.outbound.push_snapshot_page(frame) == Pushed::Queued {
            self.metrics.messages_out("room.snapshot", 1, len as u64);
        }
    }

    fn overflowed(&self) {
        self.metrics.slow_consumer();
        self.kill.cancel();
    }

    /// Queues a room event, or holds it back while that room's snapshot is being built.
    pub fn queue_room_event(&self, room: &Entity, frame: Message) {
        {
            let mut s = self.lock();
            if let Some((_, held)) = s.snapshotting.iter_mut().find(|(r, _)| r == room) {
                if held.len() < MAX_HELD_BACK {
                    held.push(frame);
                    return;
                }
                drop(s);
                self.overflowed();
                return;
            }
        }
        self.queue(frame);
    }

    /// Queues a cursor update (latest wins per sender); false when it replaced or was
    /// dropped. Cursors arriving during a snapshot are dropped: the next one will do.
    pub fn queue_cursor(&self, room: &Entity, source: &SessionId, frame: Message) -> bool {
        if self.lock().snapshotting.iter().any(|(r, _)| r == room) {
            return false;
        }
        self.outbound.push_cursor(room, source, frame) == Pushed::Queued
    }

    /// From now until [`finish_snapshot`](Self::finish_snapshot), room events are held back.
    pub fn begin_snapshot(&self, room: &Entity) {
        let mut s = self.lock();
        if !s.snapshotting.iter().any(|(r, _)| r == room) {
            s.snapshotting.push((room.clone(), Vec::new()));
        }
    }

    /// Queues the snapshot, then the events held back while it was built.
    pub fn finish_snapshot(&self, room: &Entity, snapshot: &ServerMessage<'_>) {
        self.finish_snapshot_encoded(room, self.codec.encode(snapshot));
    }

    /// [`finish_snapshot`](Self::finish_snapshot) with the (last) snapshot frame already
    /// encoded; earlier pages of a paged snapshot were queued with [`queue`](Self::queue).
    pub fn finish_snapshot_encoded(&self, room: &Entity, frame: Message) {
        let len = frame_len(&frame);
        // The state lock is held while queueing so no new room event slips in between.
        let mut s = self.lock();
        let held = match s.snapshotting.iter().position(|(r, _)| r == room) {
            Some(i) => s.snapshotting.swap_remove(i).1,
            None => Vec::new(),
        };
        let mut ok = self.outbound.push(frame) == Pushed::Queued;
        for f in held {
            ok &= self.outbound.push(f) == Pushed::Queued;
        }
        drop(s);
        if ok {
            self.metrics.messages_out("room.snapshot", 1, len as u64);
        } else if !self.outbound.is_closed() {
            self.overflowed();
        }
    }

    /// Abandons a snapshot (its queries failed); held-back events are sent as they are.
    pub fn cancel_snapshot(&self, room: &Entity) {
        let held = {
            let mut s = self.lock();
            match s.snapshotting.iter().position(|(r, _)| r == room) {
                Some(i) => s.snapshotting.swap_remove(i).1,
                None => return,
            }
        };
        for f in held {
            self.queue(f);
        }
    }

    pub fn add_wait(&self, key: &LockKey) {
        let mut s = self.lock();
        if !s.waits.contains(key) {
            s.waits.push(key.clone());
        }
    }

    pub fn remove_wait(&self, key: &LockKey) {
        self.lock().waits.retain(|k| k != key);
    }

    /// Whether this session may take on one more lock or wait on `key` within `max`:
    /// a lock it already holds or waits for is not a new one (a retried acquire).
    pub fn has_lock_budget(&self, key: &LockKey, max: usize) -> bool {
        let s = self.lock();
        s.held.contains_key(key) || s.waits.contains(key) || s.held.len() + s.waits.len() < max
    }

    /// Locks this session is queued for.
    pub fn wait_count(&self) -> usize {
        self.lock().waits.len()
    }

    pub fn take_waits(&self) -> Vec<LockKey> {
        std::mem::take(&mut self.lock().waits)
    }

    /// The rooms in which this session holds or waits for a lock on `resource`, each once:
    /// how a `lock.release`/`extend`/`cancel_wait` without `room` is resolved.
    pub fn lock_rooms_of(&self, resource: &Entity) -> Vec<Entity> {
        let s = self.lock();
        let mut rooms: Vec<Entity> = s
            .held
            .keys()
            .chain(s.waits.iter())
            .filter(|k| &k.resource == resource)
            .map(|k| k.room.clone())
            .collect();
        rooms.sort();
        rooms.dedup();
        rooms
    }

    pub fn snapshot_state(&self) -> HandleState {
        self.lock().clone()
    }

    pub fn resume_token(&self) -> Arc<str> {
        self.lock().resume_token.clone()
    }

    pub fn rooms(&self) -> Vec<Entity> {
        self.lock().rooms.clone()
    }

    pub fn room_count(&self) -> usize {
        self.lock().rooms.len()
    }

    pub fn is_joined(&self, room: &Entity) -> bool {
        self.lock().rooms.iter().any(|r| r == room)
    }

    /// Records the room; false if it was already joined.
    pub fn add_room(&self, room: &Entity) -> bool {
        let mut s = self.lock();
        if s.rooms.iter().any(|r| r == room) {
            return false;
        }
        s.rooms.push(room.clone());
        true
    }

    pub fn remove_room(&self, room: &Entity) -> bool {
        let mut s = self.lock();
        let before = s.rooms.len();
        s.rooms.retain(|r| r != room);
        s.members.retain(|(r, _)| r != room);
        s.rooms.len() != before
    }

    /// Remembers this session's presence entry in `room`.
    pub fn set_member(&self, room: &Entity, member: crate::engine::Member) {
        let mut s = self.lock();
        match s.members.iter_mut().find(|(r, _)| r == room) {
            Some(slot) => slot.1 = member,
            None => s.members.push((room.clone(), member)),
        }
    }

    pub fn members(&self) -> Vec<(Entity, crate::engine::Member)> {
        self.lock().members.clone()
    }

    pub fn hold(&self, room: &Entity, resource: &Entity, token: u64) {
        self.lock()
            .held
            .insert(LockKey::new(room.clone(), resource.clone()), token);
    }

    /// Forgets a held lock if it is still the one with `token`.
    pub fn unhold(&self, key: &LockKey, token: u64) {
        let mut s = self.lock();
        if s.held.get(key) == Some(&token) {
            s.held.remove(key);
        }
    }

    pub fn held(&self) -> Vec<(LockKey, u64)> {
        self.lock()
            .held
            .iter()
            .map(|(k, t)| (k.clone(), *t))
            .collect()
    }

    pub fn holds(&self, key: &LockKey, token: u64) -> bool {
        self.lock().held.get(key) == Some(&token)
    }

    /// Ends the session as revoked by `actor` (the socket task sees `revoked`).
    pub fn revoke(&self, actor: &str) {
        self.lock().revoked_by = Some(Arc::from(actor));
        self.revoked.cancel();
    }

    pub fn revoked_by(&self) -> Option<Arc<str>> {
        self.lock().revoked_by.clone()
    }

    pub fn share_cursor(&self) -> bool {
        self.lock().share_cursor
    }

    pub fn set_share_cursor(&self, on: bool) {
        self.lock().share_cursor = on;
    }
}
