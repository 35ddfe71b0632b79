//! A session's token over its life: roles re-evaluated on refresh and resume, the expiry
//! warning, and admin revocation (cluster-wide).
//!
//! - **Roles.** [`apply_roles`](Node::apply_roles) runs whenever a session's grants change
//!   (an `auth.refresh`, a resume with a newer token): rooms the token no longer grants are
//!   left (presence leaves), and in rooms where the user is no longer an editor its locks are
//!   released and its waits dropped with reason `revoked` (audited `lock_revoked`).
//! - **Expiry.** The socket task sends `auth.expiring` [`expiry_lead`] before `exp` and ends
//!   the session at `exp` (close 4012, locks released as `disconnected`).
//! - **Revocation.** `POST /v1/admin/sessions/revoke` ends the matching sessions of every
//!   node (Redis pub/sub), parked ones too (close 4013, locks released as `revoked`); a
//!   revoked `jti` is refused at connect, resume and refresh until its `exp`.
//! - **Session control between nodes.** Revocations travel on the `sessions:revoke` channel
//!   as a [`Broadcast`]. The same channel carries cross-node *takeovers*
//!   ([`Takeover`]; the protocol is in [`sessions`](super::sessions)): a takeover message
//!   keeps an empty `revocation`, so a node of an older release that does not know the
//!   `takeover` field applies nothing.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sessions::EndReason;
use super::{Node, OpError};
use crate::audit::AuditKind;
use crate::auth::{AuthError, Role};
use crate::engine::{LockTransition, ReleaseReason};
use crate::names::Entity;
use crate::session::handle::SessionHandle;

/// How long before `exp` a session is warned: a minute, or half the token's remaining life
/// when that is shorter (a 60 s token is warned at 30 s).
pub fn expiry_lead(remaining: Duration) -> Duration {
    (remaining / 2).min(Duration::from_secs(60))
}

/// How long a revoked `jti` is refused when no session with it was seen (so its `exp` is
/// unknown here): the lifetime of a dev token, and longer than any sane access token.
pub const REVOKED_JTI_DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Which sessions an admin revokes: every field given must match (at least one is).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Revocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Who asked (the admin principal's user id), for the audit records.
    #[serde(default)]
    pub actor: String,
}

impl Revocation {
    pub fn is_empty(&self) -> bool {
        self.user_id.is_none() && self.session_id.is_none() && self.jti.is_none()
    }

    fn matches(&self, h: &SessionHandle) -> bool {
        let jti = h.principal.grants().jti.clone();
        self.user_id
            .as_deref()
            .is_none_or(|u| *h.principal.user_id == *u)
            && self.session_id.as_deref().is_none_or(|s| *h.id == *s)
            && self
                .jti
                .as_deref()
                .is_none_or(|j| jti.as_deref() == Some(j))
    }
}

/// A message on the session-control channel: a revocation, or a takeover step.
#[derive(Debug, Serialize, Deserialize)]
pub struct Broadcast {
    pub origin: String,
    /// Empty (matches nothing) on takeover messages.
    #[serde(default)]
    pub revocation: Revocation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<Takeover>,
}

/// A step of a cross-node takeover. Resume tokens are named by their
/// [`resume_digest`](crate::hub::resume_digest), never sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Takeover {
    /// A resume on node `origin` asks whoever holds this user's session under this token to
    /// give it up (close the socket with 4011 and park it).
    Request { user_id: String, digest: String },
    /// Node `origin` holds that session and is parking it: the resume on node `to` should
    /// wait for the record.
    Found { to: String, digest: String },
}

impl Broadcast {
    fn takeover(origin: &str, step: Takeover) -> String {
        let b = Broadcast {
            origin: origin.to_owned(),
            revocation: Revocation::default(),
            takeover: Some(step),
        };
        serde_json::to_string(&b).unwrap_or_default()
    }

    pub fn takeover_request(origin: &str, user_id: &str, digest: &str) -> String {
        let step = Takeover::Request {
            user_id: user_id.to_owned(),
            digest: digest.to_owned(),
        };
        Broadcast::takeover(origin, step)
    }
}

impl Node {
    /// Applies the session's current grants: leaves rooms no longer granted, releases locks
    /// and drops waits (reason `revoked`) in rooms where it is no longer an editor. Returns
    /// the rooms left and the rooms where it lost its locks, for the audit.
    pub async fn apply_roles(&self, handle: &Arc<SessionHandle>) -> (Vec<Entity>, Vec<Entity>) {
        let p = &handle.principal;
        let mut gone = Vec::new();
        let mut demoted = Vec::new();
        let mut rooms = handle.rooms();
        // Locks announced in a room the session is not in (it left while a grant raced).
        let state = handle.snapshot_state();
        for key in state.held.into_keys().chain(state.waits) {
            if !rooms.contains(&key.room) {
                rooms.push(key.room);
            }
        }
        for room in rooms {
            match p.role_in(&room) {
                None => gone.push(room),
                Some(r) if r < Role::Editor => demoted.push(room),
                Some(_) => {}
            }
        }
        let mut lost = gone.clone();
        lost.extend(demoted.iter().cloned());
        if !lost.is_empty() {
            match self
                .locks
                .release_session(&handle.id, ReleaseReason::Revoked, Some(&lost))
                .await
            {
                Ok(ts) => {
                    for t in ts {
                        if let LockTransition::Released { lock, .. } = &t
                            && lock.holder.session_id == handle.id
                        {
                            handle.unhold(&lock.key(), lock.token);
                        }
                        self.announce(t).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "releasing revoked locks failed"),
            }
            // The engine dropped the waits there too: stop counting them against the budget.
            for key in handle.snapshot_state().waits {
                if lost.contains(&key.room) {
                    handle.remove_wait(&key);
                }
            }
        }
        let mut left = Vec::new();
        for room in gone {
            if handle.remove_room(&room) {
                self.leave_presence(handle, std::slice::from_ref(&room))
                    .await;
                self.hub.leave_room(&room, &handle.id);
                if let Err(e) = self.sync_subscription(&room).await {
                    tracing::warn!(error = %e, %room, "unsubscribe failed");
                }
                left.push(room);
            }
        }
        (left, demoted)
    }

    /// `auth.refresh`: takes over a newer token of the same user, then re-applies its roles.
    /// A bad, expired or revoked token, or another user's, changes nothing. Returns the new
    /// `exp` (ms).
    pub async fn refresh_auth(
        &self,
        handle: &Arc<SessionHandle>,
        token: &str,
    ) -> Result<u64, OpError> {
        let unauthorized = |e: AuthError| OpError::Unauthorized(e.to_string());
        let newer = self.auth.verify(token).map_err(unauthorized)?;
        if newer.user_id != handle.principal.user_id {
            return Err(OpError::Forbidden(
                "auth.refresh needs a token of the same user (sub)".into(),
            ));
        }
        let grants = newer.grants();
        if let Some(jti) = &grants.jti
            && self.is_revoked(jti).await
        {
            return Err(OpError::Unauthorized("token revoked".into()));
        }
        let exp_ms = grants.exp.unwrap_or(0).saturating_mul(1000);
        handle.principal.set_grants(grants);
        let (left, demoted) = self.apply_roles(handle).await;
        self.audit_roles(handle, "refresh", &left, &demoted).await;
        Ok(exp_ms)
    }

    /// Records a change of a session's token (refresh or resume) and what it cost it.
    pub async fn audit_roles(
        &self,
        handle: &SessionHandle,
        via: &str,
        left: &[Entity],
        demoted: &[Entity],
    ) {
        let mut r = self.audit_record(AuditKind::SessionRefreshed);
        r.user_id = Some(handle.principal.user_id.clone());
        r.session_id = Some(handle.id.clone());
        r.detail = serde_json::json!({
            "via": via,
            "exp": handle.principal.grants().exp,
            "rooms_left": left.iter().map(Entity::as_str).collect::<Vec<_>>(),
            "locks_revoked_in": demoted.iter().map(Entity::as_str).collect::<Vec<_>>(),
        });
        self.record(vec![r]).await;
    }

    /// Whether a token id was revoked (a store failure counts as not revoked: the token was
    /// verified, and refusing every connection while Redis blips would be worse).
    pub async fn is_revoked(&self, jti: &str) -> bool {
        match self.resume.is_revoked(jti).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "revocation list unavailable");
                false
            }
        }
    }

    /// An admin revocation: remembers a revoked `jti`, ends the matching sessions here and
    /// tells every other node. Returns how many sessions this node ended.
    pub async fn revoke(&self, rev: &Revocation) -> Result<usize, OpError> {
        if let Some(jti) = &rev.jti {
            // Refused until the token's own expiry when a session here shows it.
            let exp = self
                .hub
                .sessions()
                .iter()
                .map(|h| h.principal.grants())
                .find(|g| g.jti.as_deref() == Some(jti.as_str()))
                .and_then(|g| g.exp);
            let until_ms = match exp {
                Some(s) => s.saturating_mul(1000) + crate::auth::LEEWAY_SECS * 1000,
                None => crate::engine::now_ms() + REVOKED_JTI_DEFAULT_TTL.as_millis() as u64,
            };
            self.resume.revoke_jti(jti, until_ms).await?;
        }
        let ended = self.revoke_local(rev).await;
        let note = Broadcast {
            origin: self.id.to_string(),
            revocation: rev.clone(),
            takeover: None,
        };
        let payload = serde_json::to_string(&note).unwrap_or_default();
        if let Some(bus) = self.revocations.get()
            && let Err(e) = bus.publish_revocation(payload).await
        {
            tracing::warn!(error = %e, "revocation not published to the other nodes");
            return Err(OpError::Unavailable(
                "revocation reached this node only".into(),
            ));
        }
        Ok(ended)
    }

    /// Applies a message another node sent on the session-control channel.
    pub async fn on_broadcast(&self, b: Broadcast) {
        match b.takeover {
            None => {
                let n = self.revoke_local(&b.revocation).await;
                tracing::info!(ended = n, "applied a revocation from {}", b.origin);
            }
            Some(Takeover::Request { user_id, digest }) => {
                if !self.give_up_for_takeover(&user_id, &digest) {
                    return;
                }
                let found = Takeover::Found {
                    to: b.origin,
                    digest,
                };
                let payload = Broadcast::takeover(&self.id, found);
                if let Some(bus) = self.revocations.get()
                    && let Err(e) = bus.publish_revocation(payload).await
                {
                    // The resume still finds the record with its last claim.
                    tracing::warn!(error = %e, "takeover answer not published");
                }
            }
            Some(Takeover::Found { to, digest }) => {
                if *to == *self.id {
                    self.hub.takeover_found(&digest);
                }
            }
        }
    }

    /// Ends this node's sessions matching `rev`: attached ones through their socket task,
    /// parked ones here (unless a resume claimed them first).
    pub async fn revoke_local(&self, rev: &Revocation) -> usize {
        if rev.is_empty() {
            return 0;
        }
        // Yjs connections hold no session: their tokens are watched on their own.
        let mut ended = self.yjs_tokens.revoke(rev);
        let attached = self.hub.attached();
        for h in self.hub.sessions() {
            if !rev.matches(&h) {
                continue;
            }
            if attached.iter().any(|a| Arc::ptr_eq(a, &h)) {
                h.revoke(&rev.actor);
                ended += 1;
                continue;
            }
            // Parked: take the record so nobody resumes it, then end it here.
            match self.resume.expire(&h.resume_token()).await {
                Ok(true) => {
                    h.revoke(&rev.actor);
                    self.end_session(&h, EndReason::Revoked).await;
                    ended += 1;
                }
                Ok(false) => {} // resumed elsewhere: that node's copy is revoked there
                Err(e) => tracing::warn!(error = %e, "revoking a parked session failed"),
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_takeover_reads_as_an_empty_revocation_to_an_older_node() {
        /// The message as a node without takeovers parses it.
        #[derive(Deserialize)]
        struct OldBroadcast {
            #[allow(dead_code)]
            origin: String,
            revocation: Revocation,
        }
        let wire = Broadcast::takeover_request("n1", "alice", "ZGlnZXN0");
        let old: OldBroadcast = serde_json::from_str(&wire).unwrap();
        assert!(old.revocation.is_empty(), "{wire}");
        assert!(!wire.contains("resume_token"), "{wire}");
        let new: Broadcast = serde_json::from_str(&wire).unwrap();
        assert_eq!(
            new.takeover,
            Some(Takeover::Request {
                user_id: "alice".into(),
                digest: "ZGlnZXN0".into()
            })
        );
        // And a revocation from an older node still parses.
        let old_rev = r#"{"origin":"n0","revocation":{"user_id":"bob","actor":"admin"}}"#;
        let b: Broadcast = serde_json::from_str(old_rev).unwrap();
        assert!(b.takeover.is_none());
        assert_eq!(b.revocation.user_id.as_deref(), Some("bob"));
    }

    #[test]
    fn the_warning_comes_a_minute_ahead_or_at_half_the_remaining_life() {
        assert_eq!(
            expiry_lead(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            expiry_lead(Duration::from_secs(40)),
            Duration::from_secs(20)
        );
        assert_eq!(expiry_lead(Duration::ZERO), Duration::ZERO);
    }
}
