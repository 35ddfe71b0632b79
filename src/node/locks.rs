//! Locks: acquire (with optional queueing), token-checked release and extend, waits,
//! force-release and validation — one implementation for WebSocket sessions and HTTP.

use std::sync::Arc;
use std::time::Instant;

use super::{Node, OpError};
use crate::auth::{Principal, Role};
use crate::engine::{
    AcquireOutcome, AcquireRequest, Actor, ActorVia, EngineError, Grant, HeldBy, Holder, LockInfo,
    LockKey, ReleaseReason, RoomEventKind, TokenOutcome, WaitSpec,
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

    /// The caller as the audit trail names someone acting on another's lock.
    fn actor(&self, node_id: &Arc<str>) -> Actor {
        let principal = self.principal();
        let (session_id, via) = match self {
            Caller::Session(h) => (Some(h.id.clone()), ActorVia::Ws),
            Caller::Http { .. } if principal.admin => (None, ActorVia::AdminToken),
            Caller::Http { .. } => (None, ActorVia::Http),
        };
        Actor {
            user_id: principal.user_id.clone(),
            session_id,
            node_id: node_id.clone(),
            via,
        }
    }
}

/// The lock a WebSocket `lock.release`/`extend`/`cancel_wait` names: its `room` and `resource`,
/// or — `room` omitted — the one lock this session holds or waits for on `resource`.
pub fn resolve_key(
    handle: &SessionHandle,
    room: Option<&Entity>,
    resource: &Entity,
) -> Result<LockKey, OpError> {
    if let Some(room) = room {
        return Ok(LockKey::new(room.clone(), resource.clone()));
    }
    match handle.lock_rooms_of(resource).as_slice() {
        [room] => Ok(LockKey::new(room.clone(), resource.clone())),
        [] => Err(OpError::BadRequest(format!(
            "room is required: this session holds no lock on {resource}"
        ))),
        _ => Err(OpError::BadRequest(format!(
            "room is required: this session holds locks on {resource} in several rooms"
        ))),
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
                let key = LockKey::new(p.room.clone(), p.resource.clone());
                if !h.has_lock_budget(&key, max) {
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
            // Replicated grants: granted on the primary, not acknowledged by the replicas.
            Err(EngineError::NotReplicated {
                what,
                grant: Some(lock),
            }) => {
                let unreplicated = self.withdraw_unreplicated(&lock, &what).await;
                self.metrics
                    .lock_acquire_time(started.elapsed().as_secs_f64());
                self.serve_withdrawal(unreplicated.released).await;
                return Err(unreplicated.error);
            }
            other => other,
        };
        self.metrics
            .lock_acquire_time(started.elapsed().as_secs_f64());
        match outcome? {
            AcquireOutcome::Granted { lock, reentrant } => {
                if let Caller::Session(h) = &caller {
                    h.hold(&lock.room, &lock.resource, lock.token);
                    if !reentrant {
                        // Its lease started after this send: the lease watchdog's base.
                        self.leases.granted(&h.id, lock.key(), lock.token, started);
                    }
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
                    h.add_wait(&current.key());
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

    /// Whether `caller` holds `lock` (its session, or over HTTP its user).
    fn is_holder(caller: &Caller<'_>, lock: &LockInfo) -> bool {
        match caller {
            Caller::Session(h) => lock.holder.session_id == h.id,
            Caller::Http { principal, .. } => lock.holder.user_id == principal.user_id,
        }
    }

    /// Checks that `caller` may act on `lock` as its holder (or, with `force`, as an owner of
    /// the lock's room).
    fn may_act_on(&self, caller: &Caller<'_>, lock: &LockInfo, force: bool) -> bool {
        let principal = caller.principal();
        Self::is_holder(caller, lock)
            || principal.admin
            || (force && principal.role_in(&lock.room) == Some(Role::Owner))
    }

    /// Releases the lock `key` held with `token`. With `force` (owners of the key's room,
    /// admins) the token is not needed and the release is recorded as forced, with the caller
    /// as its `actor`.
    pub async fn release(
        &self,
        caller: Caller<'_>,
        key: &LockKey,
        token: Option<u64>,
        force: bool,
    ) -> Result<(), OpError> {
        if !force && !caller.principal().admin {
            return self.release_own(caller, key, token).await;
        }
        let current = self.locks.get(key).await?;
        let Some(current) = current else {
            if force {
                return Err(OpError::NotFound(format!(
                    "{} is not locked in {}",
                    key.resource, key.room
                )));
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
            // Compare-and-release on the lock that was checked, so a newer grant is never
            // ended by mistake.
            let actor = caller.actor(&self.id);
            return match self
                .locks
                .release(key, current.token, ReleaseReason::Forced, Some(&actor))
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
        // An admin releasing somebody else's lock with its token is named as the actor.
        let actor = (!Self::is_holder(&caller, &current)).then(|| caller.actor(&self.id));
        match self
            .locks
            .release(key, token, ReleaseReason::Released, actor.as_ref())
            .await?
        {
            TokenOutcome::Done(t) => {
                if let Caller::Session(h) = &caller {
                    h.unhold(key, token);
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

    /// A holder's own release (not forced, not an admin): the store compares token and holder
    /// in the same step as the release, so this costs one Redis round trip, not a read first.
    /// The answers are [`release`](Self::release)'s: `lock_not_held` for a stale token,
    /// `forbidden` for a live token of someone else's lock.
    async fn release_own(
        &self,
        caller: Caller<'_>,
        key: &LockKey,
        token: Option<u64>,
    ) -> Result<(), OpError> {
        let token = token.ok_or_else(|| OpError::BadRequest("token is required".into()))?;
        let by = match &caller {
            Caller::Session(h) => HeldBy::Session(&h.id),
            Caller::Http { principal, .. } => HeldBy::User(&principal.user_id),
        };
        match self.locks.release_held(key, token, by).await? {
            TokenOutcome::Done(t) => {
                if let Caller::Session(h) = &caller {
                    h.unhold(key, token);
                }
                self.announce(t).await;
                Ok(())
            }
            TokenOutcome::NotHeld {
                current: Some(current),
            } if current.token == token => Err(self
                .forbidden(
                    caller.principal(),
                    &current.room,
                    "releasing another's lock",
                )
                .await),
            TokenOutcome::NotHeld { .. } => {
                self.metrics.lock_outcome("stale");
                Err(OpError::LockNotHeld)
            }
        }
    }

    /// Moves the hold limit to now + `ttl_ms` (clamped); the room sees `lock.acquired` again
    /// with the new `expires_at`. The holder must still be an editor of the lock's room (its
    /// role may have been lowered since the grant); releasing stays allowed.
    pub async fn extend(
        &self,
        caller: Caller<'_>,
        key: &LockKey,
        token: u64,
        ttl_ms: u64,
    ) -> Result<LockInfo, OpError> {
        match self.locks.get(key).await? {
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
                if caller.principal().role_in(&current.room) < Some(Role::Editor) {
                    return Err(self
                        .forbidden(caller.principal(), &current.room, "extending a lock")
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
            .extend(key, token, self.clamp_ttl(Some(ttl_ms)))
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

    pub async fn cancel_wait(&self, handle: &SessionHandle, key: &LockKey) -> Result<(), OpError> {
        handle.remove_wait(key);
        if self.locks.cancel_wait(key, &handle.id).await? {
            Ok(())
        } else {
            Err(OpError::NotFound(format!(
                "not waiting for {} in {}",
                key.resource, key.room
            )))
        }
    }

    /// Whether `token` is the live holder of `key` right now (the store's notion: hold limit
    /// and lease, by its clock), and who holds it. The caller needs a role (viewer or above)
    /// in the lock's room: nobody probes tokens of rooms they cannot see.
    pub async fn validate(
        &self,
        by: &Principal,
        key: &LockKey,
        token: u64,
    ) -> Result<(bool, Option<LockInfo>), OpError> {
        if by.role_in(&key.room).is_none() {
            return Err(self
                .forbidden(by, &key.room, "validating lock tokens")
                .await);
        }
        Ok(self.locks.validate(key, token).await?)
    }
}
