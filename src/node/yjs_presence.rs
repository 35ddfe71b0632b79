//! The presence bridge: a Yjs connection (`/v1/yjs/{room}`, and per document on Hocuspocus)
//! is listed as a member of the room its document is named after, so `GET /v1/presence`,
//! `room.snapshot` and `presence.join`/`presence.leave` on `/v1/ws` show Yjs editors too.
//!
//! This module owns the bridged members of this node ([`Bridged`]) and their lifecycle:
//!
//! - [`enter`] registers the member and returns at once; a task of its own lists it in the
//!   presence store and announces `presence.join`. The Yjs connection never waits for
//!   presence: with Redis down it syncs all the same (the failure is logged and counted, and
//!   the join is retried by the refresh below).
//! - Dropping the [`BridgedMember`] (or [`BridgedMember::leave`]) makes that task remove the
//!   member and announce `presence.leave`: every end of the connection (close, error, node
//!   drain, a panic unwinding the connection task) goes through it.
//! - With Redis, presence entries expire unless their node refreshes them (`node::cluster`):
//!   [`refresh`] renews the bridged entries beside the sessions' and puts back the ones the
//!   store lost, and the sweep asks [`relist_swept`] before announcing a leave. A node that
//!   dies (`kill -9`) stops refreshing, so its bridged members expire and are swept by the
//!   surviving nodes exactly like its sessions' entries — the sweep goes by the store's
//!   expiry, not by node id, so registering here for refresh is all a bridged member needs.
//!
//! A bridged member obeys the room's member cap (past it the connection works but is not
//! listed, counted in `lockstep_yjs_presence_unlisted_total`) and the presence-state cap
//! (past it the member is listed without `state`). It is not a lockstep session: it holds no
//! locks, cannot be resumed, and does not count against `max_sessions_per_user` (Yjs
//! connections are bounded by the document limits instead).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Node;
use crate::auth::{Principal, Role};
use crate::engine::{EngineError, Member, RoomEventKind, SessionId};
use crate::names::Entity;
use crate::protocol::codec::json_len_within;
use crate::telemetry::Metrics;

/// How long a connection must stay open before it is listed: a connection refused right
/// after the upgrade (node or document full, log unavailable — y-websocket retries those in
/// a loop) never flashes a `presence.join`/`presence.leave` pair at the room.
pub const SETTLE: Duration = Duration::from_millis(200);

/// The prefix of a bridged member's `session_id` (`yjs-<uuid>`): tells it from a `/v1/ws`
/// session (a bare uuid) at a glance.
pub const SESSION_PREFIX: &str = "yjs-";

/// The `state` of a bridged member.
fn bridged_state() -> serde_json::Value {
    serde_json::json!({ "via": "yjs" })
}

/// Where a bridged member stands in the presence store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Registered, not tried yet (within [`SETTLE`]).
    Settling,
    /// In the store, renewed by [`refresh`].
    Listed,
    /// The store failed (Redis down): [`refresh`] tries again.
    Failed,
    /// The room was at its member cap: not listed for the connection's lifetime.
    Full,
    /// The connection ended; nothing may list it again.
    Gone,
}

struct Record {
    room: Entity,
    member: Member,
    /// Held across each store call and its announcement, so that a join (first, or a
    /// refresh's re-listing) and the leave of one member never interleave: a leave can never
    /// be followed by a stray re-join that nobody would remove.
    standing: tokio::sync::Mutex<Standing>,
}

/// The bridged members of this node and the bridge's counters.
#[derive(Default)]
pub struct Bridged {
    /// Session id → record. A std mutex: held for map lookups only, never across an await.
    records: std::sync::Mutex<HashMap<SessionId, Arc<Record>>>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    /// Bridged members listed right now (a gauge).
    listed: AtomicU64,
    /// Connections not listed because their room was at the member cap.
    unlisted: AtomicU64,
    /// Presence store calls of the bridge that failed (join, leave, refresh).
    failures: AtomicU64,
}

impl Bridged {
    pub fn new() -> Arc<Bridged> {
        Arc::new(Bridged::default())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Record>>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, session_id: &str) -> Option<Arc<Record>> {
        self.map().get(session_id).cloned()
    }

    fn all(&self) -> Vec<Arc<Record>> {
        self.map().values().cloned().collect()
    }

    /// Bridged members registered on this node (listed or not).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bridged members listed in presence by this node right now.
    pub fn listed(&self) -> u64 {
        self.counters.listed.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, room: &Entity, e: &EngineError) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, %room, "yjs presence bridge: {what} failed");
    }
}

/// Exports the bridge's metrics: `lockstep_yjs_presence_members`,
/// `lockstep_yjs_presence_unlisted_total`, `lockstep_yjs_presence_failures_total`.
pub fn observe(metrics: &Metrics, bridged: &Arc<Bridged>) {
    let b = bridged.clone();
    metrics.observe_gauge(
        "lockstep.yjs.presence.members",
        "",
        "Yjs connections of this node listed as room members",
        move || b.listed(),
    );
    let b = bridged.clone();
    metrics.observe_counter(
        "lockstep.yjs.presence.unlisted",
        "Yjs connections not listed as room members because the room was at its member cap",
        move || b.counters.unlisted.load(Ordering::Relaxed),
    );
    let b = bridged.clone();
    metrics.observe_counter(
        "lockstep.yjs.presence.failures",
        "Presence store calls of the Yjs presence bridge that failed (the document kept syncing)",
        move || b.counters.failures.load(Ordering::Relaxed),
    );
}

/// A Yjs connection's (or one Hocuspocus document's) membership of a room. Dropping it
/// removes the member (in a task); [`leave`](Self::leave) does the same and waits for it.
pub struct BridgedMember {
    session_id: SessionId,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl BridgedMember {
    /// The member's `session_id` (`yjs-<uuid>`).
    pub fn session_id(&self) -> &SessionId {
        &self.session_id
    }

    /// Removes the member from the room and announces `presence.leave`; returns once done
    /// (bounded by the store's command timeout when Redis is unreachable).
    pub async fn leave(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for BridgedMember {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Lists `principal` as a member of `room` with `role` while the returned guard lives.
/// Returns at once: listing and announcing run in a task tracked by the node (the drain
/// waits for the leave). Call it once per connection and document; each call is a member of
/// its own (two tabs are two members), with a fresh `session_id`.
pub fn enter(node: &Arc<Node>, principal: &Principal, room: &Entity, role: Role) -> BridgedMember {
    let session_id: SessionId = Arc::from(format!("{SESSION_PREFIX}{}", uuid::Uuid::new_v4()));
    let state = bridged_state();
    // The same cap a `/v1/ws` join's state obeys; past it the member is listed stateless.
    let state = json_len_within(&state, node.config.max_presence_state_bytes).map(|_| state);
    let member = Member::joining(principal, session_id.clone(), role, state);
    let record = Arc::new(Record {
        room: room.clone(),
        member,
        standing: tokio::sync::Mutex::new(Standing::Settling),
    });
    node.bridged
        .map()
        .insert(session_id.clone(), record.clone());
    let stop = CancellationToken::new();
    let task = node
        .tasks
        .spawn(run(node.clone(), record, stop.clone()).instrument(node.span()));
    BridgedMember {
        session_id,
        stop,
        task: Some(task),
    }
}

/// One bridged member from its registration to its removal.
async fn run(node: Arc<Node>, record: Arc<Record>, stop: CancellationToken) {
    let settled = tokio::select! {
        _ = tokio::time::sleep(SETTLE) => true,
        _ = stop.cancelled() => false,
    };
    if settled {
        list(&node, &record, true).await;
        stop.cancelled().await;
    }
    remove(&node, &record).await;
}

/// Puts the member in the store (again); announces `presence.join` when it was not there
/// and `announce` is set. Does nothing for a member that is gone or found the room full.
async fn list(node: &Node, record: &Record, announce: bool) -> bool {
    let mut standing = record.standing.lock().await;
    if matches!(*standing, Standing::Gone | Standing::Full) {
        return false;
    }
    list_locked(node, record, announce, &mut standing).await
}

async fn list_locked(
    node: &Node,
    record: &Record,
    announce: bool,
    standing: &mut Standing,
) -> bool {
    let was_listed = *standing == Standing::Listed;
    let next = match node
        .presence
        .join(&record.room, record.member.clone())
        .await
    {
        Ok(previous) => {
            // A join that failed (timed out) may have been stored all the same, unannounced.
            if announce && (previous.is_none() || !was_listed) {
                let kind = RoomEventKind::PresenceJoin(record.member.clone());
                node.publish(&record.room, Some(&record.member.session_id), kind)
                    .await;
            }
            Standing::Listed
        }
        Err(EngineError::RoomFull(max)) => {
            node.bridged
                .counters
                .unlisted
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(room = %record.room, max, "yjs connection not listed: the room is full");
            Standing::Full
        }
        Err(e) => {
            node.bridged.failed("listing a member", &record.room, &e);
            Standing::Failed
        }
    };
    set(node, standing, was_listed, next);
    next == Standing::Listed
}

/// Takes the member out of the store and the registry, announcing `presence.leave`.
async fn remove(node: &Node, record: &Record) {
    let mut standing = record.standing.lock().await;
    let was = *standing;
    set(node, &mut standing, was == Standing::Listed, Standing::Gone);
    node.bridged.map().remove(&record.member.session_id);
    // A failed join may still have reached the store (a timeout after the write).
    if matches!(was, Standing::Listed | Standing::Failed) {
        let session_id = &record.member.session_id;
        match node.presence.leave(&record.room, session_id).await {
            Ok(Some(member)) => {
                let kind = RoomEventKind::PresenceLeave(member);
                node.publish(&record.room, Some(session_id), kind).await;
            }
            Ok(None) => {}
            // With Redis the entry expires unrefreshed and a sweep announces the leave.
            Err(e) => node.bridged.failed("removing a member", &record.room, &e),
        }
    }
}

fn set(node: &Node, standing: &mut Standing, was_listed: bool, next: Standing) {
    let listed = &node.bridged.counters.listed;
    match (was_listed, next == Standing::Listed) {
        (false, true) => {
            listed.fetch_add(1, Ordering::Relaxed);
        }
        (true, false) => {
            listed.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
    *standing = next;
}

/// Renews the presence entries of this node's bridged members (every third of the presence
/// ttl, with the sessions'), lists again those the store lost (swept after a stall, an
/// emptied Redis) and retries those whose listing failed, announcing each as a join.
pub(crate) async fn refresh(node: &Node, ttl_ms: u64) {
    let mut listed = Vec::new();
    let mut retry = Vec::new();
    for record in node.bridged.all() {
        // A record being listed or removed right now is left to that operation.
        let Ok(standing) = record.standing.try_lock() else {
            continue;
        };
        match *standing {
            Standing::Listed => listed.push(record.clone()),
            Standing::Failed => retry.push(record.clone()),
            Standing::Settling | Standing::Full | Standing::Gone => {}
        }
    }
    if !listed.is_empty() {
        let entries: Vec<(Entity, SessionId)> = listed
            .iter()
            .map(|r| (r.room.clone(), r.member.session_id.clone()))
            .collect();
        match node.presence.refresh(&entries, ttl_ms).await {
            Ok(missing) => {
                for (_, session_id) in missing {
                    if let Some(record) = node.bridged.get(&session_id) {
                        retry.push(record);
                    }
                }
            }
            Err(e) => {
                node.bridged
                    .counters
                    .failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "yjs presence bridge: refresh failed");
            }
        }
    }
    for record in retry {
        list(node, &record, true).await;
    }
}

/// The sweep removed `session_id`'s expired entry from `room`: if it is a live bridged
/// member of this node (its refresh came too late), it is listed again without a join
/// announcement (nobody was told it left) and true is returned; false means announce the leave.
pub(crate) async fn relist_swept(node: &Node, room: &Entity, session_id: &str) -> bool {
    if !session_id.starts_with(SESSION_PREFIX) {
        return false;
    }
    match node.bridged.get(session_id) {
        Some(record) if record.room == *room => list(node, &record, false).await,
        _ => false,
    }
}

/// After Redis lost events (or its data): lists every listed bridged member again,
/// announcing those the store had lost.
pub(crate) async fn relist_all(node: &Node) {
    for record in node.bridged.all() {
        let mut standing = record.standing.lock().await;
        if matches!(*standing, Standing::Listed | Standing::Failed) {
            list_locked(node, &record, true, &mut standing).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bridged_state_is_small_enough_for_any_sensible_state_cap() {
        assert_eq!(json_len_within(&bridged_state(), 64), Some(13));
        assert_eq!(json_len_within(&bridged_state(), 12), None);
    }
}
