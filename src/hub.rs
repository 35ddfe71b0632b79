//! This node's live sessions and the rooms they joined: local membership and fan-out.
//!
//! The hub is the [`EventSink`] of the broker: every room event (from this node or, with
//! Redis, from any node) arrives here and is queued to the local members of its room.
//! Each event is encoded at most once per codec, however many members receive it.
//!
//! One `std::sync::RwLock` guards the maps. Fan-out takes the read lock and only pushes into
//! outbound queues (each a short `std` mutex); nothing awaits under either lock.
//!
//! Every session is also found by the *digest* of its resume token ([`resume_digest`]): a
//! resume that reaches another node names the session to the cluster by that digest (see
//! [`Node::claim_parked`](crate::node::Node)), never by the token itself, and the hub answers
//! in O(1) whether it holds that session. The hub also keeps the resumes of this node that
//! wait for another node to say "I have it" ([`Hub::expect_takeover`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tungstenite::Message;

use crate::engine::{EventSink, LockKey, RoomEvent, RoomEventKind, SessionId};
use crate::error::ErrorCode;
use crate::names::Entity;
use crate::protocol::server::{ErrorFrame, From, HolderView};
use crate::protocol::snapshot::frame_len;
use crate::protocol::{Codec, ServerMessage};
use crate::session::handle::SessionHandle;
use crate::telemetry::Metrics;

pub struct Hub {
    state: RwLock<HubState>,
    metrics: Metrics,
    /// Told every lock event before the sessions: the Yjs lock gate (`crate::yjs::lockgate`).
    lock_watch: std::sync::OnceLock<Arc<dyn LockWatch>>,
    /// Resumes on this node waiting for the node that holds their session to answer a
    /// takeover request, by resume-token digest; cancelled when the answer comes. An entry
    /// lives only while its resume waits (a few seconds at most): bounded by connections.
    takeovers: Mutex<HashMap<Arc<str>, CancellationToken>>,
}

#[derive(Default)]
struct HubState {
    /// Every session of this node, attached or parked (waiting for a resume).
    sessions: HashMap<SessionId, Arc<SessionHandle>>,
    /// Attached sessions per joined room.
    rooms: HashMap<Entity, RoomLocal>,
    /// Parked sessions by resume token, with the instant their grace ends.
    parked: HashMap<Arc<str>, (Arc<SessionHandle>, Instant)>,
    /// Every session (attached or parked) by the digest of its resume token.
    by_digest: HashMap<Arc<str>, Arc<SessionHandle>>,
}

/// The digest a resume token is named by between nodes: HMAC-SHA256 under a fixed label,
/// URL-safe base64 (43 characters). A token is 192 random bits, so the digest cannot be turned
/// back into a token that resumes the session, and a channel that carries it leaks nothing a
/// resume could use. (The SHA-256 of the crate set: jsonwebtoken's, already linked.)
pub fn resume_digest(token: &str) -> Arc<str> {
    use jsonwebtoken::{Algorithm, EncodingKey, crypto};
    let key = EncodingKey::from_secret(b"lockstep resume-token digest v1");
    match crypto::sign(token.as_bytes(), &key, Algorithm::HS256) {
        Ok(d) => Arc::from(d),
        // HMAC over bytes cannot fail; should it, no takeover names this token.
        Err(_) => Arc::from(""),
    }
}

/// A resume of this node waiting for a takeover answer; leaves the hub when dropped.
pub struct TakeoverWait<'a> {
    hub: &'a Hub,
    digest: Arc<str>,
    found: CancellationToken,
}

impl TakeoverWait<'_> {
    /// Resolves once a node answered that it holds the session (and is giving it up).
    pub async fn found(&self) {
        self.found.cancelled().await
    }
}

impl Drop for TakeoverWait<'_> {
    fn drop(&mut self) {
        let mut t = self.hub.takeovers.lock().unwrap_or_else(|p| p.into_inner());
        // Two resumes of one token on this node share the entry; the first to finish ends it
        // (the other then waits for the record without the early answer, still bounded).
        t.remove(&self.digest);
    }
}

#[derive(Default)]
struct RoomLocal {
    members: Vec<Arc<SessionHandle>>,
    /// Per resource, the highest token announced as acquired and as released here. Lock events
    /// can reach the hub out of order (two operations racing between the store and the
    /// publish, or two nodes publishing); an event older than what members already saw is
    /// dropped, so clients only ever see a resource's lock state move forward.
    lock_marks: Mutex<HashMap<Entity, LockMark>>,
}

#[derive(Default, Clone, Copy)]
struct LockMark {
    acquired: u64,
    released: u64,
}

impl RoomLocal {
    /// Whether an acquired event for `token` is current (and records it).
    fn admit_acquired(&self, resource: &Entity, token: u64) -> bool {
        let mut marks = self.lock_marks.lock().unwrap_or_else(|p| p.into_inner());
        let m = marks.entry(resource.clone()).or_default();
        if token < m.acquired || token <= m.released {
            return false;
        }
        m.acquired = token;
        true
    }

    /// Whether a released event for `token` is current (and records it).
    fn admit_released(&self, resource: &Entity, token: u64) -> bool {
        let mut marks = self.lock_marks.lock().unwrap_or_else(|p| p.into_inner());
        let m = marks.entry(resource.clone()).or_default();
        if token < m.acquired || token <= m.released {
            return false;
        }
        m.released = token;
        true
    }
}

/// Something besides the sessions that follows this node's lock events (as the hub receives
/// them: local ones, and with Redis those of every node for the rooms this node subscribed
/// to). Called synchronously from [`EventSink::deliver`]: must not block.
pub trait LockWatch: Send + Sync + 'static {
    fn lock_event(&self, event: &RoomEvent);
}

/// Refused session: the user is at the session limit (counted cluster-wide by the
/// [`ResumeStore`](crate::engine::ResumeStore), parked sessions included).
#[derive(Debug, thiserror::Error)]
#[error("user has {0} sessions already")]
pub struct TooManySessions(pub usize);

impl Hub {
    pub fn new(metrics: Metrics) -> Hub {
        Hub {
            state: RwLock::new(HubState::default()),
            metrics,
            takeovers: Mutex::new(HashMap::new()),
            lock_watch: std::sync::OnceLock::new(),
        }
    }

    /// Sets the one [`LockWatch`] (at node start); a second call is ignored.
    pub fn watch_locks(&self, watch: Arc<dyn LockWatch>) {
        let _ = self.lock_watch.set(watch);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HubState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HubState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an attached session (the per-user limit was checked by the resume store).
    /// For a resume, `replaces` names the resume token of the parked copy this node may hold:
    /// it is swapped out in the same step, so no window shows both or neither.
    pub fn register(
        &self,
        handle: Arc<SessionHandle>,
        replaces: Option<&str>,
    ) -> Option<Arc<SessionHandle>> {
        let digest = resume_digest(&handle.resume_token());
        let mut s = self.write();
        let old = replaces
            .and_then(|token| s.parked.remove(token))
            .map(|(h, _)| h);
        if let Some(old) = &old {
            forget_digest(&mut s, old);
        }
        s.by_digest.insert(digest, handle.clone());
        s.sessions.insert(handle.id.clone(), handle);
        old
    }

    /// Adds the session to a room's local members.
    pub fn join_room(&self, room: &Entity, handle: &Arc<SessionHandle>) {
        let mut s = self.write();
        let local = s.rooms.entry(room.clone()).or_default();
        if !local.members.iter().any(|h| h.id == handle.id) {
            local.members.push(handle.clone());
        }
    }

    /// Removes the session from a room's local members.
    pub fn leave_room(&self, room: &Entity, session_id: &SessionId) {
        remove_member(&mut self.write().rooms, room, session_id);
    }

    /// Whether this node has attached members in `room` (it must then be subscribed).
    pub fn has_members(&self, room: &Entity) -> bool {
        self.read().rooms.contains_key(room)
    }

    /// Detaches a session from its socket: out of the rooms' fan-out, findable by resume token
    /// until `deadline`. False (nothing done) if `handle` is not this node's current handle
    /// for its session.
    pub fn park(&self, handle: &Arc<SessionHandle>, deadline: Instant) -> bool {
        let mut s = self.write();
        if !is_current(&s, handle) {
            return false;
        }
        detach(&mut s, handle);
        s.parked
            .insert(handle.resume_token(), (handle.clone(), deadline));
        true
    }

    /// Removes a session for good (attached or parked); `Some(true)` if it was parked. `None`
    /// if `handle` is no longer this node's current handle for its session (it was resumed):
    /// the caller must then leave the session alone.
    pub fn remove(&self, handle: &Arc<SessionHandle>) -> Option<bool> {
        let mut s = self.write();
        let token = handle.resume_token();
        let parked = s
            .parked
            .get(&token)
            .is_some_and(|(h, _)| Arc::ptr_eq(h, handle));
        if parked {
            s.parked.remove(&token);
        } else if is_current(&s, handle) {
            detach(&mut s, handle);
        } else {
            return None;
        }
        forget_digest(&mut s, handle);
        s.sessions.remove(&handle.id);
        Some(parked)
    }

    /// Parked sessions whose grace has ended (they stay until `remove`d).
    pub fn expired_parked(&self, now: Instant) -> Vec<Arc<SessionHandle>> {
        self.read()
            .parked
            .values()
            .filter(|(_, deadline)| *deadline <= now)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// The session with this resume-token digest and user, if this node holds it, and
    /// whether it is attached (a parked one is not): what a takeover request asks.
    pub fn by_resume_digest(
        &self,
        digest: &str,
        user_id: &str,
    ) -> Option<(Arc<SessionHandle>, bool)> {
        let s = self.read();
        let h = s
            .by_digest
            .get(digest)
            .filter(|h| &*h.principal.user_id == user_id)?;
        let attached = is_current(&s, h) && !s.parked.contains_key(&h.resume_token());
        Some((h.clone(), attached))
    }

    /// Registers a resume of this node waiting for a takeover answer for `digest`.
    pub fn expect_takeover(&self, digest: &Arc<str>) -> TakeoverWait<'_> {
        let mut t = self.takeovers.lock().unwrap_or_else(|p| p.into_inner());
        let found = t.entry(digest.clone()).or_default().clone();
        TakeoverWait {
            hub: self,
            digest: digest.clone(),
            found,
        }
    }

    /// A node answered that it holds the session named by `digest`: wakes its resume here.
    pub fn takeover_found(&self, digest: &str) {
        let t = self.takeovers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = t.get(digest) {
            found.cancel();
        }
    }

    /// The attached members of `room` on this node.
    pub fn members_of(&self, room: &Entity) -> Vec<Arc<SessionHandle>> {
        self.read()
            .rooms
            .get(room)
            .map(|l| l.members.clone())
            .unwrap_or_default()
    }

    /// Every attached (not parked) session.
    pub fn attached(&self) -> Vec<Arc<SessionHandle>> {
        let s = self.read();
        s.sessions
            .values()
            .filter(|h| !s.parked.contains_key(&h.resume_token()))
            .cloned()
            .collect()
    }

    /// Rooms with at least one attached member on this node.
    pub fn room_count(&self) -> usize {
        self.read().rooms.len()
    }

    /// Outbound bytes queued over all sessions (for the metrics scrape: locks each queue).
    pub fn queued_bytes(&self) -> usize {
        let s = self.read();
        s.sessions.values().map(|h| h.outbound.queued_bytes()).sum()
    }

    /// Lock waits queued by this node's sessions (for the metrics scrape).
    pub fn waiters(&self) -> usize {
        let s = self.read();
        s.sessions.values().map(|h| h.wait_count()).sum()
    }

    /// Every session, attached or parked (lease renewal covers both).
    pub fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.read().sessions.values().cloned().collect()
    }
}

fn is_current(s: &HubState, handle: &Arc<SessionHandle>) -> bool {
    s.sessions
        .get(&handle.id)
        .is_some_and(|h| Arc::ptr_eq(h, handle))
}

/// Drops the digest entry of `handle` (only if it is still that handle's).
fn forget_digest(s: &mut HubState, handle: &Arc<SessionHandle>) {
    let digest = resume_digest(&handle.resume_token());
    if s.by_digest
        .get(&digest)
        .is_some_and(|h| Arc::ptr_eq(h, handle))
    {
        s.by_digest.remove(&digest);
    }
}

fn remove_member(rooms: &mut HashMap<Entity, RoomLocal>, room: &Entity, id: &SessionId) {
    if let Some(local) = rooms.get_mut(room) {
        local.members.retain(|h| &h.id != id);
        if local.members.is_empty() {
            rooms.remove(room);
        }
    }
}

/// Takes an attached session out of fan-out.
fn detach(s: &mut HubState, handle: &Arc<SessionHandle>) {
    for room in handle.rooms() {
        remove_member(&mut s.rooms, &room, &handle.id);
    }
}

/// One server message, encoded lazily at most once per codec.
struct Encoded<'a> {
    msg: ServerMessage<'a>,
    json: Option<Message>,
    msgpack: Option<Message>,
    count: u64,
    bytes: u64,
}

impl<'a> Encoded<'a> {
    fn new(msg: ServerMessage<'a>) -> Self {
        Encoded {
            msg,
            json: None,
            msgpack: None,
            count: 0,
            bytes: 0,
        }
    }

    fn frame(&mut self, codec: Codec) -> Message {
        let slot = match codec {
            Codec::Json => &mut self.json,
            Codec::MsgPack => &mut self.msgpack,
        };
        let frame = slot.get_or_insert_with(|| codec.encode(&self.msg)).clone();
        self.count += 1;
        self.bytes += frame_len(&frame) as u64;
        frame
    }

    fn record(&self, metrics: &Metrics) {
        if self.count > 0 {
            metrics.messages_out(self.msg.type_name(), self.count, self.bytes);
        }
    }
}

impl EventSink for Hub {
    fn deliver(&self, event: Arc<RoomEvent>) {
        if let Some(w) = self.lock_watch.get()
            && matches!(
                event.kind,
                RoomEventKind::LockAcquired { .. } | RoomEventKind::LockReleased { .. }
            )
        {
            w.lock_event(&event);
        }
        let s = self.read();
        let room = &event.room;
        let local = s.rooms.get(room);
        let members: &[Arc<SessionHandle>] = local.map(|l| l.members.as_slice()).unwrap_or(&[]);
        let not_origin = |h: &&Arc<SessionHandle>| event.origin.as_ref() != Some(&h.id);
        match &event.kind {
            RoomEventKind::PresenceJoin(member) => fan_out(
                room,
                members.iter(),
                ServerMessage::PresenceJoin { room, member },
                &self.metrics,
            ),
            RoomEventKind::PresenceUpdate(member) => fan_out(
                room,
                members.iter(),
                ServerMessage::PresenceUpdate { room, member },
                &self.metrics,
            ),
            RoomEventKind::PresenceLeave(member) => {
                for h in members {
                    h.outbound.forget_cursor(room, &member.session_id);
                }
                fan_out(
                    room,
                    members.iter(),
                    ServerMessage::PresenceLeave { room, member },
                    &self.metrics,
                )
            }
            RoomEventKind::Cursor {
                user_id,
                session_id,
                x,
                y,
                selection,
            } => {
                let mut enc = Encoded::new(ServerMessage::Cursor {
                    room,
                    user_id,
                    session_id,
                    x: *x,
                    y: *y,
                    selection: selection.as_ref(),
                });
                let mut dropped = 0;
                for h in members.iter().filter(not_origin) {
                    let frame = enc.frame(h.codec);
                    if h.outbound.push_cursor(room, session_id, frame)
                        == super::session::outbound::Pushed::Replaced
                    {
                        dropped += 1;
                    }
                }
                enc.record(&self.metrics);
                if dropped > 0 {
                    self.metrics.cursor_dropped(dropped);
                }
            }
            RoomEventKind::Broadcast {
                event: name,
                data,
                user_id,
                session_id,
                name: from_name,
            } => fan_out(
                room,
                members.iter().filter(not_origin),
                ServerMessage::Broadcast {
                    room,
                    event: name,
                    data,
                    from: From {
                        user_id,
                        session_id,
                        name: from_name,
                    },
                },
                &self.metrics,
            ),
            RoomEventKind::LockAcquired { grant, via_queue } => {
                let lock = &grant.lock;
                if local.is_some_and(|l| !l.admit_acquired(&lock.resource, lock.token)) {
                    return;
                }
                if let Some(holder) = s.sessions.get(&lock.holder.session_id) {
                    holder.hold(&lock.room, &lock.resource, lock.token);
                    if *via_queue {
                        holder.remove_wait(&lock.key());
                        holder.send(&ServerMessage::LockGranted {
                            id: grant.request_id,
                            room: &lock.room,
                            resource: &lock.resource,
                            token: lock.token,
                            expires_at: lock.expires_at,
                        });
                    }
                }
                fan_out(
                    room,
                    members.iter(),
                    ServerMessage::LockAcquired {
                        room,
                        resource: &lock.resource,
                        holder: HolderView::of(lock),
                        action: &lock.action,
                        expires_at: lock.expires_at,
                    },
                    &self.metrics,
                )
            }
            RoomEventKind::LockReleased { lock, reason } => {
                if let Some(holder) = s.sessions.get(&lock.holder.session_id) {
                    holder.unhold(&lock.key(), lock.token);
                }
                if local.is_some_and(|l| !l.admit_released(&lock.resource, lock.token)) {
                    return;
                }
                fan_out(
                    room,
                    members.iter(),
                    ServerMessage::LockReleased {
                        room,
                        resource: &lock.resource,
                        reason: *reason,
                    },
                    &self.metrics,
                )
            }
            RoomEventKind::WaitExpired {
                resource,
                session_id,
                request_id,
            } => {
                if let Some(h) = s.sessions.get(session_id) {
                    h.remove_wait(&LockKey::new(room.clone(), resource.clone()));
                    let mut frame = ErrorFrame::new(
                        *request_id,
                        ErrorCode::WaitTimeout,
                        "the lock was not free before wait_timeout_ms",
                    );
                    frame.resource = Some(resource);
                    h.send(&ServerMessage::Error(frame));
                    self.metrics.client_error(ErrorCode::WaitTimeout.as_str());
                }
            }
            RoomEventKind::WaitFailed {
                resource,
                session_id,
                request_id,
            } => {
                if let Some(h) = s.sessions.get(session_id) {
                    h.remove_wait(&LockKey::new(room.clone(), resource.clone()));
                    let mut frame = ErrorFrame::new(
                        *request_id,
                        ErrorCode::Unavailable,
                        "the lock came free for you but the grant could not be made safe \
                         (fencing token not registered, or not acknowledged by the Redis \
                         replicas); your wait ended, retry later",
                    );
                    frame.resource = Some(resource);
                    h.send(&ServerMessage::Error(frame));
                    self.metrics.client_error(ErrorCode::Unavailable.as_str());
                }
            }
        }
    }
}

fn fan_out<'a>(
    room: &Entity,
    recipients: impl Iterator<Item = &'a Arc<SessionHandle>>,
    msg: ServerMessage<'_>,
    metrics: &Metrics,
) {
    let mut enc = Encoded::new(msg);
    for h in recipients {
        let frame = enc.frame(h.codec);
        h.queue_room_event(room, frame);
    }
    enc.record(metrics);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Principal;
    use crate::engine::{Grant, Holder, LockInfo, ReleaseReason};
    use crate::session::handle::HandleState;

    fn entity(s: &str) -> Entity {
        Entity::parse(s).unwrap()
    }

    fn setup() -> (Hub, Arc<SessionHandle>) {
        let metrics = Metrics::new("t").unwrap();
        let hub = Hub::new(metrics.clone());
        let handle = Arc::new(SessionHandle::new(
            "s1".into(),
            Arc::new(Principal::admin()),
            Codec::Json,
            1 << 20,
            metrics,
            HandleState::default(),
        ));
        hub.register(handle.clone(), None);
        hub.join_room(&entity("scene:1"), &handle);
        (hub, handle)
    }

    fn lock(token: u64) -> LockInfo {
        LockInfo {
            room: entity("scene:1"),
            resource: entity("segment:1"),
            token,
            holder: Holder {
                user_id: "u".into(),
                name: "U".into(),
                session_id: "other".into(),
                node_id: "n".into(),
            },
            action: "trim".into(),
            since: 0,
            expires_at: 1,
        }
    }

    fn event(kind: RoomEventKind) -> Arc<RoomEvent> {
        Arc::new(RoomEvent {
            room: entity("scene:1"),
            origin: None,
            kind,
        })
    }

    fn acquired(token: u64) -> Arc<RoomEvent> {
        event(RoomEventKind::LockAcquired {
            grant: Grant {
                lock: lock(token),
                request_id: None,
            },
            via_queue: false,
        })
    }

    fn released(token: u64) -> Arc<RoomEvent> {
        event(RoomEventKind::LockReleased {
            lock: lock(token),
            reason: ReleaseReason::Released,
        })
    }

    fn sent(handle: &SessionHandle) -> Vec<String> {
        handle
            .outbound
            .take(crate::session::outbound::Batch::default())
            .messages
            .iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
                v["type"].as_str().unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn a_session_is_found_by_its_resume_digest_and_user_only() {
        let metrics = Metrics::new("t").unwrap();
        let hub = Hub::new(metrics.clone());
        let state = HandleState {
            resume_token: "tok-1".into(),
            ..HandleState::default()
        };
        let p = Arc::new(Principal::admin());
        let user = p.user_id.clone();
        let h = Arc::new(SessionHandle::new(
            "s".into(),
            p,
            Codec::Json,
            1 << 20,
            metrics,
            state,
        ));
        hub.register(h.clone(), None);
        let d = resume_digest("tok-1");
        assert_ne!(&*d, "tok-1");
        assert_eq!(d, resume_digest("tok-1"), "stable across nodes");
        assert!(matches!(hub.by_resume_digest(&d, &user), Some((_, true))));
        assert!(
            hub.by_resume_digest(&d, "mallory").is_none(),
            "same user only"
        );
        assert!(
            hub.by_resume_digest(&resume_digest("tok-2"), &user)
                .is_none()
        );
        hub.park(&h, Instant::now());
        assert!(matches!(hub.by_resume_digest(&d, &user), Some((_, false))));
        hub.remove(&h);
        assert!(hub.by_resume_digest(&d, &user).is_none());
    }

    #[test]
    fn a_release_overtaken_by_the_next_grant_is_dropped() {
        let (hub, handle) = setup();
        hub.deliver(acquired(1));
        hub.deliver(acquired(2)); // the next holder's grant arrives first…
        hub.deliver(released(1)); // …then the previous holder's release: stale
        assert_eq!(sent(&handle), ["lock.acquired", "lock.acquired"]);
    }

    #[test]
    fn a_grant_overtaken_by_its_own_release_is_dropped() {
        let (hub, handle) = setup();
        hub.deliver(released(5));
        hub.deliver(acquired(5));
        assert_eq!(sent(&handle), ["lock.released"]);
        hub.deliver(acquired(6));
        hub.deliver(acquired(6)); // an extend re-announces the same token
        assert_eq!(sent(&handle), ["lock.acquired", "lock.acquired"]);
    }

    #[test]
    fn events_during_a_snapshot_follow_it() {
        let (hub, handle) = setup();
        let room = entity("scene:1");
        handle.begin_snapshot(&room);
        hub.deliver(acquired(7));
        assert!(
            sent(&handle).is_empty(),
            "held back while the snapshot is built"
        );
        handle.finish_snapshot(
            &room,
            &ServerMessage::RoomSnapshot {
                room: &room,
                members: &[],
                locks: Vec::new(),
            },
        );
        assert_eq!(sent(&handle), ["room.snapshot", "lock.acquired"]);
    }
}
