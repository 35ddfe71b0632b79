//! Session lifecycle: open (or resume), park on an unclean disconnect, end for good.
//!
//! A session whose socket drops without a normal close is *parked*: out of the fan-out, but
//! its presence and locks stay (leases renewed) for `resume_grace`, recorded in the
//! [`ResumeStore`](crate::engine::ResumeStore) so a client reconnecting with `?resume=` to any
//! node gets it back and nobody sees a leave/join. Exactly one of "a resume" and "the end of the
//! grace" wins (the store's claim/expire are atomic). A normal close, a heartbeat timeout,
//! the token's `exp` or the end of the grace ends the session: presence leaves, its locks are
//! released with reason `disconnected` (`revoked` when an admin revoked it), its waits are
//! dropped, and it leaves its user's session count (parked sessions stay in it).
//!
//! # Takeover: a resume that reaches a node while the session is still attached somewhere
//!
//! A client whose old TCP path went silent (a laptop changed network), or that reconnects the
//! moment a draining node says `reconnect`, resumes before the node holding its session has
//! parked it. The resuming node then asks for the session ([`Node::claim_parked`]):
//!
//! 1. Attached on this node: its socket task is told to stop (`takeover`, close 4011), the
//!    session parks (record written) and the resume claims it.
//! 2. Otherwise, with Redis, a takeover request goes to every node on the session-control
//!    channel (the one admin revocations use, `sessions:revoke`; see
//!    [`lifetime`](super::lifetime)): `{user_id, digest}`, where `digest` names the resume
//!    token ([`resume_digest`]) so the token itself never crosses the channel. The node that
//!    holds an attached session of that user under that token stops its socket the same way
//!    (4011, parked, record written) and answers "found" on the channel. The resuming node
//!    waits for that answer ([`TAKEOVER_FOUND_WAIT`]), then polls the store's atomic `claim`
//!    with backoff until the record appears, within [`TAKEOVER_WAIT`] in all. A broadcast,
//!    not a per-node channel: the store does not record which node holds an attached
//!    session (that would cost a write per connection and its renewals), and the request is
//!    rare (only when no parked record exists), small, and answered by a map lookup.
//! 3. Nobody answers (a wrong user, an expired or made-up token): one last claim, then a new
//!    session. Nobody is kicked: the holder checks user and digest. A user with no session
//!    counted anywhere (the per-user count of the store) is not asked about at all, so the
//!    usual stale token (its grace passed) costs nothing.
//!
//! Exactly one winner still: the old node's park writes an ordinary record, and the store's
//! `claim`/`expire` are atomic, so of two racing resumes (or a resume and the end of the
//! grace) one gets the session and the other gets nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;

use super::Node;
use crate::audit::AuditKind;
use crate::auth::Principal;
use crate::engine::{LockKey, ParkedSession, ReleaseReason};
use crate::hub::{TooManySessions, resume_digest};
use crate::names::Entity;
use crate::protocol::server::UserView;
use crate::protocol::{Codec, ServerMessage};
use crate::session::handle::{HandleState, SessionHandle};

/// How long a resuming connection waits for the old socket of its session to be parked.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// How long a resume waits for some node to answer that it holds the session (a cross-node
/// round trip on the session-control channel) before it concludes nobody does. This is what
/// a resume with an unknown or expired token costs.
pub const TAKEOVER_FOUND_WAIT: Duration = Duration::from_secs(1);
/// The first pause between claims while the old node parks the session (doubling, capped).
const CLAIM_POLL_FIRST: Duration = Duration::from_millis(5);
const CLAIM_POLL_MAX: Duration = Duration::from_millis(100);
/// How long a session's entry in its user's session count lives unless its node renews it
/// (every third of this, for attached and parked sessions alike): the count forgets the
/// sessions of a crashed node within this.
pub const ADMISSION_TTL: Duration = Duration::from_secs(15);

/// Why a session's socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Close frame 1000 (or no status): the client is done.
    ClientClosed,
    /// Socket error, EOF or a close other than 1000 (tab closed, network lost).
    ConnectionLost,
    HeartbeatTimeout,
    SlowConsumer,
    TooBig,
    Draining,
    /// A resuming connection took the session over before this node saw the old socket die.
    TakenOver,
    /// A parked session was not resumed in time.
    GraceExpired,
    /// The token's `exp` passed without a refresh (close 4012).
    TokenExpired,
    /// An admin revoked the session (close 4013).
    Revoked,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::ConnectionLost => "connection_lost",
            EndReason::HeartbeatTimeout => "heartbeat_timeout",
            EndReason::SlowConsumer => "slow_consumer",
            EndReason::TooBig => "too_big",
            EndReason::Draining => "draining",
            EndReason::TakenOver => "taken_over",
            EndReason::GraceExpired => "grace_expired",
            EndReason::TokenExpired => "token_expired",
            EndReason::Revoked => "revoked",
        }
    }

    /// The `reason` label of `lockstep_sessions_closed_total` (one of
    /// [`CLOSE_REASONS`](crate::telemetry::CLOSE_REASONS)). `GraceExpired` is never recorded:
    /// its socket closed (and was counted) when the session was parked.
    pub fn metric_label(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client",
            EndReason::ConnectionLost | EndReason::GraceExpired => "connection_lost",
            EndReason::HeartbeatTimeout => "heartbeat",
            EndReason::SlowConsumer => "slow_consumer",
            EndReason::TooBig => "protocol",
            EndReason::Draining => "drain",
            EndReason::TakenOver => "superseded",
            EndReason::TokenExpired => "token_expired",
            EndReason::Revoked => "revoked",
        }
    }

    /// Whether the session waits for a resume instead of ending now.
    fn parks(self) -> bool {
        matches!(
            self,
            EndReason::ConnectionLost
                | EndReason::SlowConsumer
                | EndReason::TooBig
                | EndReason::Draining
                | EndReason::TakenOver
        )
    }
}

fn new_resume_token() -> Arc<str> {
    let bytes: [u8; 24] = rand::random();
    Arc::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

impl Node {
    /// Opens a session, resuming a parked one when `resume` names it (same user, within the
    /// grace). Queues `welcome` (and, on resume, a snapshot of every room). Returns the handle
    /// and whether it was resumed.
    pub async fn open_session(
        &self,
        principal: Principal,
        codec: Codec,
        resume: Option<&str>,
    ) -> Result<(Arc<SessionHandle>, bool), TooManySessions> {
        let principal = Arc::new(principal);
        let claimed = match resume {
            Some(token) => self.claim_parked(token, &principal.user_id).await,
            None => None,
        };
        let state = match &claimed {
            Some((_, rec)) => HandleState {
                rooms: rec.rooms.clone(),
                held: rec
                    .held
                    .iter()
                    .map(|(resource, room, token)| {
                        (LockKey::new(room.clone(), resource.clone()), *token)
                    })
                    .collect(),
                share_cursor: rec.share_cursor,
                resume_token: new_resume_token(),
                ..HandleState::default()
            },
            None => HandleState {
                share_cursor: true,
                resume_token: new_resume_token(),
                ..HandleState::default()
            },
        };
        let id = match &claimed {
            Some((_, rec)) => rec.session_id.clone(),
            None => Arc::from(uuid::Uuid::new_v4().to_string()),
        };
        // Parked sessions count too, on every node: dropping the socket in a loop must not
        // pile up sessions that each keep presence and locks for the grace.
        let limit = self.config.max_sessions_per_user;
        let ttl = ADMISSION_TTL.as_millis() as u64;
        let admitted = match self.resume.admit(&principal.user_id, &id, limit, ttl).await {
            Ok(a) => a,
            Err(e) => {
                // The store is down: every other operation fails too; refusing all
                // connections would only add a reconnect storm.
                tracing::warn!(error = %e, "session count unavailable; admitting");
                true
            }
        };
        if !admitted {
            if let Some((token, rec)) = &claimed {
                // Give the parked session back (the local copy never left the hub).
                let grace = self.config.resume_grace.as_millis() as u64;
                if let Err(e) = self.resume.park(token, rec, grace).await {
                    tracing::warn!(error = %e, "re-parking a session failed");
                }
            }
            return Err(TooManySessions(limit));
        }
        let handle = Arc::new(SessionHandle::new(
            id,
            principal,
            codec,
            self.config.max_queue_bytes,
            self.metrics.clone(),
            state,
        ));
        let replaces = claimed.as_ref().map(|(token, _)| token.as_str());
        if let Some(old) = self.hub.register(handle.clone(), replaces) {
            old.outbound.close();
        }
        let resumed = claimed.is_some();
        self.metrics.session_opened(resumed);
        self.send_welcome(&handle, resumed);
        if resumed {
            self.restore_rooms(&handle).await;
        } else {
            let mut r = self.audit_record(AuditKind::SessionOpened);
            r.user_id = Some(handle.principal.user_id.clone());
            r.session_id = Some(handle.id.clone());
            self.record(vec![r]).await;
        }
        Ok((handle, resumed))
    }

    /// Takes a parked session from the resume store, taking it over first if it is still
    /// attached here or on another node (see the module doc).
    async fn claim_parked(&self, token: &str, user_id: &str) -> Option<(String, ParkedSession)> {
        let digest = resume_digest(token);
        if let Some((old, true)) = self.hub.by_resume_digest(&digest, user_id) {
            self.metrics.session_takeover("local");
            old.takeover.cancel();
            if tokio::time::timeout(TAKEOVER_WAIT, old.ended.cancelled())
                .await
                .is_err()
            {
                tracing::warn!(session = %old.id, "takeover: old socket did not park in time");
            }
        }
        match self.claim(token, user_id).await {
            Ok(Some(rec)) => return Some((token.to_owned(), rec)),
            Ok(None) => {}
            Err(()) => return None,
        }
        // Not parked anywhere: maybe attached on another node (embedded: there is none).
        let bus = self.revocations.get()?;
        // No session of this user is counted anywhere (the usual case for a token whose
        // grace passed): nobody can hold it, so nobody is asked and nobody waits.
        if let Ok(0) = self.resume.counted_sessions(user_id).await {
            return None;
        }
        let started = tokio::time::Instant::now();
        let wait = self.hub.expect_takeover(&digest);
        let request = super::lifetime::Broadcast::takeover_request(&self.id, user_id, &digest);
        if let Err(e) = bus.publish_revocation(request).await {
            tracing::warn!(error = %e, "takeover request not published; opening a new session");
            return None;
        }
        let found = tokio::time::timeout(TAKEOVER_FOUND_WAIT, wait.found())
            .await
            .is_ok();
        drop(wait);
        if !found {
            // Nobody holds it attached; it may have parked on its own meanwhile.
            let claimed = self.claim(token, user_id).await.ok().flatten();
            let outcome = if claimed.is_some() {
                "remote"
            } else {
                "not_found"
            };
            self.metrics.session_takeover(outcome);
            return claimed.map(|rec| (token.to_owned(), rec));
        }
        let deadline = started + TAKEOVER_WAIT;
        let mut pause = CLAIM_POLL_FIRST;
        loop {
            match self.claim(token, user_id).await {
                Ok(Some(rec)) => {
                    self.metrics.session_takeover("remote");
                    tracing::debug!(session = %rec.session_id, from = %rec.node_id, "taken over from another node");
                    return Some((token.to_owned(), rec));
                }
                Ok(None) => {}
                Err(()) => return None,
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.metrics.session_takeover("timeout");
                tracing::warn!("takeover: the old node did not park the session in time");
                return None;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(CLAIM_POLL_MAX);
        }
    }

    /// One atomic claim; a store failure is logged (`Err`: open a new session).
    async fn claim(&self, token: &str, user_id: &str) -> Result<Option<ParkedSession>, ()> {
        self.resume.claim(token, user_id).await.map_err(|e| {
            tracing::warn!(error = %e, "resume lookup failed; opening a new session");
        })
    }

    /// Another node's resume asks for the session named by `digest`: if it is attached here
    /// (same user), its socket stops (close 4011) and it parks; returns whether this node
    /// holds the session and will park it (or is parking it), so the asker should wait for
    /// the record.
    pub(crate) fn give_up_for_takeover(&self, user_id: &str, digest: &str) -> bool {
        match self.hub.by_resume_digest(digest, user_id) {
            Some((old, true)) => {
                tracing::debug!(session = %old.id, "taken over by a resume on another node");
                old.takeover.cancel();
                true
            }
            // Parking already (the socket dropped, or the node drains): the record is coming.
            Some((old, false)) => !old.ended.is_cancelled(),
            None => false,
        }
    }

    fn send_welcome(&self, handle: &SessionHandle, resumed: bool) {
        let p = &handle.principal;
        handle.send(&ServerMessage::Welcome {
            session_id: &handle.id,
            node_id: &self.id,
            user: UserView {
                id: &p.user_id,
                name: &p.name,
                avatar: p.avatar.as_deref(),
                color: &p.color,
            },
            heartbeat_ms: self.config.heartbeat_interval.as_millis() as u64,
            server_time: crate::engine::now_ms(),
            resume_token: &handle.resume_token(),
            resumed,
        });
    }

    /// After a resume: the resuming token's roles apply (rooms it no longer grants are left,
    /// locks where it is no longer an editor released as `revoked`), then the session goes
    /// back into each room's fan-out with a fresh snapshot.
    async fn restore_rooms(&self, handle: &Arc<SessionHandle>) {
        let (left, demoted) = self.apply_roles(handle).await;
        if !left.is_empty() || !demoted.is_empty() {
            self.audit_roles(handle, "resume", &left, &demoted).await;
        }
        for room in handle.rooms() {
            self.hub.join_room(&room, handle);
            if let Err(e) = self.sync_subscription(&room).await {
                tracing::warn!(error = %e, %room, "resubscribe failed");
            }
            if let Err(e) = self.send_snapshot(handle, &room).await {
                tracing::warn!(error = %e, %room, "snapshot after resume failed");
            }
        }
    }

    /// Called when a session's socket task ends (or its grace expired): parks or ends it.
    pub async fn end_session(&self, handle: &Arc<SessionHandle>, reason: EndReason) {
        handle.outbound.close();
        let grace = self.config.resume_grace;
        if reason.parks() && !grace.is_zero() && self.hub.park(handle, Instant::now() + grace) {
            self.metrics.session_closed(reason.metric_label());
            self.park(handle, grace).await;
            handle.ended.cancel();
            tracing::debug!(session = %handle.id, reason = reason.as_str(), "session parked");
            return;
        }
        let Some(was_parked) = self.hub.remove(handle) else {
            // Resumed meanwhile: the session lives on in its new handle.
            handle.ended.cancel();
            return;
        };
        // A parked session's socket was counted as closed when it was parked.
        if !was_parked {
            self.metrics.session_closed(reason.metric_label());
        }
        // A revoked session's locks say so; any other end is a holder gone away.
        let release = match reason {
            EndReason::Revoked => ReleaseReason::Revoked,
            _ => ReleaseReason::Disconnected,
        };
        let rooms = handle.rooms();
        self.sync_subscriptions(&rooms).await;
        // All its locks and waits, also those announced in rooms it already left.
        match self.locks.release_session(&handle.id, release, None).await {
            Ok(ts) => {
                for t in ts {
                    self.announce(t).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "releasing locks of ended session failed"),
        }
        self.leave_presence(handle, &rooms).await;
        if let Err(e) = self
            .resume
            .dismiss(&handle.principal.user_id, &handle.id)
            .await
        {
            tracing::warn!(error = %e, "removing an ended session from its user's count failed");
        }
        let mut r = self.audit_record(AuditKind::SessionClosed);
        r.user_id = Some(handle.principal.user_id.clone());
        r.session_id = Some(handle.id.clone());
        r.detail = match handle.revoked_by() {
            Some(actor) => serde_json::json!({ "reason": reason.as_str(), "actor": &*actor }),
            None => serde_json::json!({ "reason": reason.as_str() }),
        };
        self.record(vec![r]).await;
        handle.ended.cancel();
        tracing::debug!(session = %handle.id, reason = reason.as_str(), "session ended");
    }

    /// Records a parked session in the resume store. Its waits are dropped: a grant or a
    /// timeout could not be delivered while it has no socket (the resumed client re-asks).
    async fn park(&self, handle: &Arc<SessionHandle>, grace: Duration) {
        for resource in handle.take_waits() {
            if let Err(e) = self.locks.cancel_wait(&resource, &handle.id).await {
                tracing::warn!(error = %e, %resource, "dropping a parked session's wait failed");
            }
        }
        let rooms = handle.rooms();
        self.sync_subscriptions(&rooms).await;
        let state = handle.snapshot_state();
        let record = ParkedSession {
            session_id: handle.id.clone(),
            user_id: handle.principal.user_id.clone(),
            rooms: state.rooms,
            held: state
                .held
                .into_iter()
                .map(|(key, token)| (key.resource, key.room, token))
                .collect(),
            share_cursor: state.share_cursor,
            node_id: self.id.clone(),
        };
        let grace_ms = grace.as_millis() as u64;
        if let Err(e) = self
            .resume
            .park(&state.resume_token, &record, grace_ms)
            .await
        {
            tracing::warn!(error = %e, session = %handle.id, "parking failed: no resume on other nodes");
        }
    }

    /// Called by a draining node once its sockets are closed and its lease renewals stopped.
    /// Its parked sessions may still be resumed on another node until their grace ends, but
    /// nobody renews their leases once this process exits: with a lease shorter than the
    /// grace (or a client slower to come back than the lease), the locks would lapse as
    /// `disconnected` before the resume. So their leases are stretched over the grace here;
    /// the hold limit still caps each lock, the resuming node goes back to normal renewals, and
    /// a session never resumed ends at its grace as usual (wherever its record is expired).
    pub(crate) async fn hand_over_parked(&self) {
        let held: Vec<(LockKey, u64)> = self.hub.sessions().iter().flat_map(|h| h.held()).collect();
        if held.is_empty() {
            return;
        }
        let lease = self.config.lock_lease.max(self.config.resume_grace);
        if let Err(e) = self
            .locks
            .refresh_leases(&held, lease.as_millis() as u64)
            .await
        {
            tracing::warn!(error = %e, "stretching parked sessions' leases over the resume grace failed");
        }
    }

    /// The grace of a parked session is over: end it, unless it was resumed (here or on
    /// another node) in the meantime, in which case this node just forgets its copy.
    pub async fn expire_parked(&self, handle: &Arc<SessionHandle>) {
        match self.resume.expire(&handle.resume_token()).await {
            Ok(true) => self.end_session(handle, EndReason::GraceExpired).await,
            Ok(false) => {
                self.hub.remove(handle);
            }
            Err(e) => {
                tracing::warn!(error = %e, session = %handle.id, "resume store unavailable; retrying")
            }
        }
    }

    /// Renews the per-user count entries of every session this node holds.
    pub(crate) async fn keep_admitted(&self) {
        let sessions: Vec<_> = self
            .hub
            .sessions()
            .iter()
            .map(|h| (h.principal.user_id.clone(), h.id.clone()))
            .collect();
        if sessions.is_empty() {
            return;
        }
        let ttl = ADMISSION_TTL.as_millis() as u64;
        if let Err(e) = self.resume.keep_admitted(&sessions, ttl).await {
            tracing::warn!(error = %e, "renewing the per-user session count failed");
        }
    }

    async fn sync_subscriptions(&self, rooms: &[Entity]) {
        for room in rooms {
            if let Err(e) = self.sync_subscription(room).await {
                tracing::warn!(error = %e, %room, "subscription update failed");
            }
        }
    }
}
