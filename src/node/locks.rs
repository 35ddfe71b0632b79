//! Locks: acquire (with optional queueing), token-checked release and extend, waits,
//! force-release and validation — one implementation for WebSocket sessions and HTTP.

use std::sync::Arc;
use std::time::Instant;

use super::{Node, OpError};
use crate::auth::{Principal, Role};
use crate::engine::{
    AcquireOutcome, AcquireRequest, Actor, Grant, Holder, LockInfo, ReleaseReason, RoomEventKind,
    TokenOutcome, WaitSpec, now_ms,
};
use crate::names::Entity;
use crate::session::handle::SessionHandle;

/// Who asks: a WebSocket session (locks leased to it) or an HTTP caller (locks live to their
/// hold limit; `holder_key` makes retries idempotent).
pub enum Caller<'a> {
    Session(&'a Arc<SessionHandle>),
    Http {
        principal: &'a Principal,
        holder_key: Option<&'a str>,
    },
}

impl Caller<'_> {
    fn principal(&self) -> &Principal {
        match self {
            Caller::Session(h) => &h.principal,
            Caller::Http { principal, .. } => principal,
        }
    }
}

pub struct AcquireParams {
    pub room: Entity,
    pub resource: Entity,
    pub action: Arc<str>,
    pub ttl_ms: Option<u64>,
    pub wait: bool,
    pub wait_timeout_ms: Option<u64>,
    pub request_id: Option<u32>,
}

/// A refused acquire: who holds it and how long it may take.
#[derive(Debug)]
pub struct Denied {
    pub current: LockInfo,
    pub queue_position: Option<u32>,
    pub estimated_wait_ms: u64,
}

impl Node {
    fn clamp_ttl(&self, ttl_ms: Option<u64>) -> u64 {
        let max = self.config.lock_max_ttl.as_millis() as u64;
        ttl_ms
            .unwrap_or(self.config.lock_default_ttl.as_millis() as u64)
            .clamp(1, max)
    }

    /// Grants the lock or explains who holds it. `Ok((lock, reentrant))`.
    pub async fn acquire(
        &self,
        caller: Caller<'_>,
        p: AcquireParams,
    ) -> Result<(LockInfo, bool), OpError> {
        let principal = caller.principal();
        if principal.role_in(&p.room) < Some(Role::Editor) {
            return Err(self.forbidden(principal, &p.room, "locking").await);
        }
        let (session_id, lease_ms, wait) = match &caller {
            Caller::Session(h) => {
                if !h.is_joined(&p.room) {
                    return Err(OpError::NotInRoom(p.room.clone()));
                }
                // Every lock and wait costs the engine state until it ends: one session must
                // not be able to grow that without bound.
                let max = self.config.max_locks_per_session;
                if !h.has_lock_budget(&p.resource, max) {
                    return Err(OpError::TooManyLocks(max));
                }
                let wait = p.wait.then(|| WaitSpec {
                    timeout_ms: self.clamp_ttl(p.wait_timeout_ms),
                    request_id: p.request_id,
                });
                (
                    h.id.clone(),
                    Some(self.config.lock_lease.as_millis() as u64),
                    wait,
                )
            }
            Caller::Http { holder_key, .. } => {
                self.check_http_lock_budget(principal)?;
                if p.wait {
                    return Err(OpError::BadRequest(
                        "wait is only available over the WebSocket".into(),
                    ));
                }
                // Scoped to the user: another user's identical key names another holder.
                let user = &principal.user_id;
                let key = match holder_key {
                    Some(k) => format!("http:{user}:{k}"),
                    None => format!("http:{user}:{}", uuid::Uuid::new_v4().simple()),
                };
                (Arc::from(key), None, None)
            }
        };
        let req = AcquireRequest {
            room: p.room,
            resource: p.resource,
            action: p.action,
            holder: Holder {
                user_id: principal.user_id.clone(),
                name: principal.name.clone(),
                session_id,
                node_id: self.id.clone(),
            },
            ttl_ms: self.clamp_ttl(p.ttl_ms),
            lease_ms,
            wait,
        };
        let started = Instant::now();
        let outcome = self.locks.acquire(req).await;
        let outcome = match outcome {
            // Strict fencing: a grant is registered before anyone learns its token.
            Ok(AcquireOutcome::Granted { lock, reentrant }) => {
                let fenced = if reentrant {
                    self.fence_reentrant(lock).await
                } else {
                    self.fence(lock).await.map(|lock| (lock, false))
                };
                match fenced {
                    Ok((lock, reentrant)) => Ok(AcquireOutcome::Granted { lock, reentrant }),
                    Err(unfenced) => {
                        self.metrics
                            .lock_acquire_time(started.elapsed().as_secs_f64());
                        self.serve_withdrawal(unfenced.released).await;
                        return Err(unfenced.error);
                    }
                }
            }
            other => other,
        };
        self.metrics
            .lock_acquire_time(started.elapsed().as_secs_f64());
        match outcome? {
            AcquireOutcome::Granted { lock, reentrant } => {
                if let Caller::Session(h) = &caller {
                    h.hold(&lock.room, &lock.resource, lock.token);
                }
                if !reentrant {
                    self.metrics.lock_outcome("granted");
                    self.announce_holder(&lock).await;
                }
                Ok((lock, reentrant))
            }
            AcquireOutcome::Held {
                current,
                queue_position,
                estimated_wait_ms,
            } => {
                self.metrics.lock_outcome(if queue_position.is_some() {
                    "queued"
                } else {
                    "denied"
                });
                if let (Caller::Session(h), Some(_)) = (&caller, queue_position) {
                    h.add_wait(&current.resource);
                }
                Err(OpError::LockHeld(Box::new(Denied {
                    current,
                    queue_position,
                    estimated_wait_ms,
                })))
            }
        }
    }

    /// Tells the room who holds `lock` now (a direct grant, or an extend's new expiry).
    async fn announce_holder(&self, lock: &LockInfo) {
        let grant = Grant {
            lock: lock.clone(),
            request_id: None,
        };
        let kind = RoomEventKind::LockAcquired {
            grant,
            via_queue: false,
        };
        self.publish(&lock.room, None, kind).await;
    }

    /// Checks that `caller` may act on `lock` as its holder (or, with `force`, as an owner).
    fn may_act_on(&self, caller: &Caller<'_>, lock: &LockInfo, force: bool) -> bool {
        let principal = caller.principal();
        let is_holder = match caller {
            Caller::Session(h) => lock.holder.session_id == h.id,
            Caller::Http { .. } => lock.holder.user_id == principal.user_id,
        };
        is_holder
            || principal.admin
            || (force && principal.role_in(&lock.room) == Some(Role::Owner))
    }

    /// Releases the lock held with `token`. With `force` (owners, admins) the token is not
    /// needed and the release is recorded as forced.
    pub async fn release(
        &self,
        caller: Caller<'_>,
        resource: &Entity,
        token: Option<u64>,
        force: bool,
    ) -> Result<(), OpError> {
        let current = self.locks.get(resource).await?;
        let Some(current) = current else {
            if force {
                return Err(OpError::NotFound(format!("{resource} is not locked")));
            }
            self.metrics.lock_outcome("stale");
            return Err(OpError::LockNotHeld);
        };
        if force {
            if !self.may_act_on(&caller, &current, true) {
                return Err(self
                    .forbidden(caller.principal(), &current.room, "force-releasing")
                    .await);
            }
            // Compare-and-release on the lock that was checked, so a newer lock (perhaps in a
            // room where the caller is no owner) is never ended by mistake.
            return match self
                .locks
                .release(resource, current.token, ReleaseReason::Forced)
                .await?
            {
                TokenOutcome::Done(t) => {
                    self.announce(t).await;
                    Ok(())
                }
                TokenOutcome::NotHeld { .. } => Err(OpError::LockNotHeld),
            };
        }
        let token = token.ok_or_else(|| OpError::BadRequest("token is required".into()))?;
        if current.token != token {
            self.metrics.lock_outcome("stale");
            return Err(OpError::LockNotHeld);
        }
        if !self.may_act_on(&caller, &current, false) {
            return Err(self
                .forbidden(
                    caller.principal(),
                    &current.room,
                    "releasing another's lock",
                )
                .await);
        }
        match self
            .locks
            .release(resource, token, ReleaseReason::Released)
            .await?
        {
            TokenOutcome::Done(t) => {
                if let Caller::Session(h) = &caller {
                    h.unhold(resource, token);
                }
                self.announce(t).await;
                Ok(())
            }
            TokenOutcome::NotHeld { .. } => {
                self.metrics.lock_outcome("stale");
                Err(OpError::LockNotHeld)
            }
        }
    }

    /// Moves the hold limit to now + `ttl_ms` (clamped); the room sees `lock.acquired` again
    /// with the new `expires_at`.
    pub async fn extend(
        &self,
        caller: Caller<'_>,
        resource: &Entity,
        token: u64,
        ttl_ms: u64,
    ) -> Result<LockInfo, OpError> {
        match self.locks.get(resource).await? {
            Some(current) if current.token == token => {
                if !self.may_act_on(&caller, &current, false) {
                    return Err(self
                        .forbidden(
                            caller.principal(),
                            &current.room,
                            "extending another's lock",
                        )
                        .await);
                }
            }
            _ => {
                self.metrics.lock_outcome("stale");
                return Err(OpError::LockNotHeld);
            }
        }
        match self
            .locks
            .extend(resource, token, self.clamp_ttl(Some(ttl_ms)))
            .await?
        {
            TokenOutcome::Done(lock) => {
                self.metrics.lock_outcome("extended");
                self.announce_holder(&lock).await;
                Ok(lock)
            }
            TokenOutcome::NotHeld { .. } => {
                self.metrics.lock_outcome("stale");
                Err(OpError::LockNotHeld)
            }
        }
    }

    pub async fn cancel_wait(
        &self,
        handle: &SessionHandle,
        resource: &Entity,
    ) -> Result<(), OpError> {
        handle.remove_wait(resource);
        if self.locks.cancel_wait(resource, &handle.id).await? {
            Ok(())
        } else {
            Err(OpError::NotFound(format!("not waiting for {resource}")))
        }
    }

    /// Releases whatever holds `resource` (admin endpoint, owners' `force`).
    pub async fn force_release(
        &self,
        by: &Principal,
        resource: &Entity,
    ) -> Result<LockInfo, OpError> {
        let actor = Actor {
            user_id: by.user_id.clone(),
            session_id: None,
            node_id: self.id.clone(),
        };
        match self.locks.force_release(resource, &actor).await? {
            Some(t) => {
                let lock = match &t {
                    crate::engine::LockTransition::Released { lock, .. } => lock.clone(),
                    crate::engine::LockTransition::WaitExpired { .. } => {
                        return Err(OpError::NotFound(format!("{resource} is not locked")));
                    }
                };
                self.announce(t).await;
                Ok(lock)
            }
            None => Err(OpError::NotFound(format!("{resource} is not locked"))),
        }
    }

    /// Whether `token` is the live holder of `resource` right now, and who holds it.
    pub async fn validate(
        &self,
        resource: &Entity,
        token: u64,
    ) -> Result<(bool, Option<LockInfo>), OpError> {
        let current = self.locks.get(resource).await?;
        let valid = current
            .as_ref()
            .is_some_and(|l| l.token == token && now_ms() < l.expires_at);
        Ok((valid, current))
    }
}
