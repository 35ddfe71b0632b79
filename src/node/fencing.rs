//! Strict fencing: with a database configured, every grant's token is registered in Postgres
//! (`lockstep.fence_register`, strictly above the registered token) **before** it is returned to
//! the requester or announced — direct grants in [`Node::acquire`] and queue hand-offs in
//! [`Node::announce`] alike. `docs/fencing.md` explains why and how apps use the tokens.
//!
//! - **Registered**: the grant goes on as usual (reply, `lock.acquired`, `lock.granted`).
//! - **Refused** (the store's counter went backwards — Redis lost data or failed over, a clock
//!   stepped back): counted in `lockstep_fence_refusals_total`; the store's counter is raised to
//!   the registered token ([`LockStore::raise_fence`](crate::engine::LockStore::raise_fence)) and the same grant is given a fresh token
//!   in place ([`LockStore::reissue`](crate::engine::LockStore::reissue)), which is registered in turn. The requester — or the
//!   waiter the lock was handed to — keeps its place and simply receives the fresh token; the
//!   refused token was never told to anyone. After [`MAX_REISSUES`] refusals in a row (another
//!   writer keeps registering higher tokens: a misconfiguration) the grant is given up as below.
//! - **Registration failed** (Postgres down or slower than [`REGISTER_TIMEOUT`]): counted in
//!   `lockstep_fence_failures_total`; the grant is withdrawn
//!   ([`LockStore::withdraw`](crate::engine::LockStore::withdraw): compare-and-delete on its
//!   token, recorded as `lock_withdrawn {reason}`, not announced: nobody saw it) and the request fails with `unavailable` — a direct acquire
//!   answers it (HTTP 503), a waiter receives an `unavailable` error frame with its request id
//!   ([`RoomEventKind::WaitFailed`]). Releasing may hand the lock to the next waiter, who is
//!   served the same way. Strict mode never hands out an unregistered token.
//!
//! Without a database every grant passes through unchanged.
//!
//! # Replicated grants
//!
//! With `LOCKSTEP_LOCK_REPLICAS` > 0 the Redis store makes every grant wait for the replicas
//! (`src/engine/redis/replication.rs`) before it returns it. The same path as above serves the
//! outcome, *before* registration:
//!
//! - a direct grant not acknowledged comes back as
//!   [`EngineError::NotReplicated`] with the grant: [`Node::withdraw_unreplicated`] withdraws
//!   it (`lock_withdrawn {reason: "not_replicated"}`) and the requester gets `unavailable`;
//! - a hand-off (release, reap, session end, withdrawal) is confirmed with
//!   [`LockStore::confirm_handoff`](crate::engine::LockStore::confirm_handoff) in
//!   [`Node::serve_handoff`]; not confirmed, it is withdrawn the same way and the waiter
//!   receives the `unavailable` error frame ([`RoomEventKind::WaitFailed`]);
//! - a reissue not acknowledged fails the registration, which withdraws the fresh token.

use std::time::Duration;

use super::{Node, OpError};
use crate::engine::{EngineError, Grant, LockInfo, LockTransition, RoomEventKind, TokenOutcome};

/// The `reason` of `lock_withdrawn` for a grant the replicas did not acknowledge.
pub const NOT_REPLICATED: &str = "not_replicated";

/// How long one registration (pool checkout included) may take before the grant is withdrawn.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(2);

/// Refused registrations (each followed by a raise and a reissue) tolerated for one grant.
pub const MAX_REISSUES: usize = 3;

/// A grant that could not be registered and was withdrawn.
pub(crate) struct Unfenced {
    /// What the requester (or waiter) is told.
    pub error: OpError,
    /// The release of the withdrawn grant, when it happened: not announced (nobody saw the
    /// grant), but its hand-off to the next waiter must be served.
    pub released: Option<LockTransition>,
}

/// How registering one grant ended.
enum Registration {
    Registered(LockInfo),
    /// The grant ended while being reissued (reaped, forced): nothing left to withdraw.
    Gone,
    /// Give the grant up: `lock` is its latest version (token), `why` is logged.
    Failed {
        lock: LockInfo,
        why: String,
    },
}

impl Node {
    /// Registers `lock`'s token (see the module doc): the lock to hand out, possibly with a
    /// fresh token, or the withdrawn grant.
    pub(crate) async fn fence(&self, lock: LockInfo) -> Result<LockInfo, Unfenced> {
        let Some(pool) = &self.db else {
            return Ok(lock);
        };
        let (lock, why) = match self.register(pool, lock).await {
            Registration::Registered(lock) => return Ok(lock),
            Registration::Gone => {
                return Err(Unfenced {
                    error: OpError::Unavailable(
                        "the lock ended before its fencing token was registered; retry".into(),
                    ),
                    released: None,
                });
            }
            Registration::Failed { lock, why } => (lock, why),
        };
        tracing::warn!(
            resource = %lock.resource,
            token = lock.token,
            reason = %why,
            "fencing: grant withdrawn, its token could not be registered"
        );
        let error = OpError::Unavailable(
            "the grant could not be registered for fencing (database unavailable); no lock was \
             granted, retry later"
                .into(),
        );
        Err(self.withdraw_grant(&lock, &why, error).await)
    }

    /// A new grant the replicas did not acknowledge (`LOCKSTEP_LOCK_REPLICAS`; the store said
    /// [`EngineError::NotReplicated`](crate::engine::EngineError::NotReplicated)) is withdrawn
    /// like an unregistered one, recorded as `lock_withdrawn {reason: "not_replicated"}`, and
    /// the requester is told `unavailable`: a failover could otherwise hand the lock to a
    /// second holder while the first believes it holds it.
    pub(crate) async fn withdraw_unreplicated(&self, lock: &LockInfo, what: &str) -> Unfenced {
        tracing::warn!(
            resource = %lock.resource,
            token = lock.token,
            what,
            "replicated grants: grant withdrawn, the replicas did not acknowledge it in time"
        );
        let error = OpError::Unavailable(
            "the grant was not acknowledged by the Redis replicas in time; no lock was granted, \
             retry later"
                .into(),
        );
        self.withdraw_grant(lock, NOT_REPLICATED, error).await
    }

    /// Takes back `lock`, a grant nobody was told of: compare-and-delete on its token,
    /// recorded as `lock_withdrawn {reason: why}`. The grant's own `lock_acquired` record was
    /// written with the grant (atomically, before registration or replication could be
    /// checked), and this record says its token was never handed out — not a release by its
    /// holder.
    async fn withdraw_grant(&self, lock: &LockInfo, why: &str, error: OpError) -> Unfenced {
        let released = match self.locks.withdraw(&lock.key(), lock.token, why).await {
            Ok(TokenOutcome::Done(t)) => Some(t),
            Ok(TokenOutcome::NotHeld { .. }) => None,
            Err(e) => {
                // It ends with its lease or hold limit; its token was never handed out.
                tracing::error!(
                    resource = %lock.resource,
                    token = lock.token,
                    error = %e,
                    "withdrawing a grant nobody was told of failed"
                );
                None
            }
        };
        Unfenced { error, released }
    }

    /// A reentrant acquire returns an existing grant. It was registered when it was made —
    /// unless its node died between the grant and the registration (the requester then never
    /// got the token and retries, over HTTP with its `holder_key` or after a resume). So its
    /// registration is checked (one read): registered as is, it stays reentrant; otherwise it is
    /// fenced like a new grant (registered, or reissued above a higher registered token) and
    /// announced as one (`false`). Postgres unavailable: `unavailable`, the grant is kept (it
    /// may be a registered one its holder uses).
    pub(crate) async fn fence_reentrant(
        &self,
        lock: LockInfo,
    ) -> Result<(LockInfo, bool), Unfenced> {
        let Some(pool) = &self.db else {
            return Ok((lock, true));
        };
        let registered = tokio::time::timeout(
            REGISTER_TIMEOUT,
            crate::db::fence_registered(pool, &lock.key()),
        )
        .await;
        match registered {
            Ok(Ok(token)) if token == lock.token => Ok((lock, true)),
            Ok(Ok(_)) => self.fence(lock).await.map(|lock| (lock, false)),
            Ok(Err(_)) | Err(_) => {
                self.metrics.fence_failure();
                Err(Unfenced {
                    error: OpError::Unavailable(
                        "the fencing registry (Postgres) is unavailable".into(),
                    ),
                    released: None,
                })
            }
        }
    }

    async fn register(&self, pool: &deadpool_postgres::Pool, mut lock: LockInfo) -> Registration {
        let key = lock.key();
        let resource = &key.resource;
        let mut refusals = 0;
        loop {
            let registered = tokio::time::timeout(
                REGISTER_TIMEOUT,
                crate::db::fence_register(pool, &key, lock.token),
            )
            .await;
            match registered {
                Ok(Ok(true)) => return Registration::Registered(lock),
                Ok(Ok(false)) => self.metrics.fence_refusal(),
                Ok(Err(e)) => {
                    self.metrics.fence_failure();
                    let why = e.to_string();
                    return Registration::Failed { lock, why };
                }
                Err(_) => {
                    self.metrics.fence_failure();
                    let why = format!("registration took over {REGISTER_TIMEOUT:?}");
                    return Registration::Failed { lock, why };
                }
            }
            refusals += 1;
            if refusals > MAX_REISSUES {
                let why = format!("refused {refusals} times in a row");
                return Registration::Failed { lock, why };
            }
            // Refused: the store's counter is at or below the registered token.
            let above =
                tokio::time::timeout(REGISTER_TIMEOUT, crate::db::fence_registered(pool, &key))
                    .await;
            let registered = match above {
                Ok(Ok(t)) => t.max(lock.token),
                Ok(Err(e)) => {
                    self.metrics.fence_failure();
                    let why = e.to_string();
                    return Registration::Failed { lock, why };
                }
                Err(_) => {
                    self.metrics.fence_failure();
                    let why =
                        format!("reading the registered token took over {REGISTER_TIMEOUT:?}");
                    return Registration::Failed { lock, why };
                }
            };
            tracing::warn!(
                %resource,
                room = %key.room,
                token = lock.token,
                registered,
                "fencing: the lock store issued a token not above the registered one (lost data, \
                 failover or clock step); raising its counter and reissuing the grant"
            );
            if let Err(e) = self.locks.raise_fence(&key, registered).await {
                let why = format!("raising the fence counter: {e}");
                return Registration::Failed { lock, why };
            }
            match self.locks.reissue(&key, lock.token).await {
                Ok(TokenOutcome::Done(fresh)) => lock = fresh,
                Ok(TokenOutcome::NotHeld { .. }) => return Registration::Gone,
                // Reissued on the primary but not acknowledged: withdraw the fresh token.
                Err(EngineError::NotReplicated {
                    what,
                    grant: Some(fresh),
                }) => {
                    let why = format!("{NOT_REPLICATED}: {what}");
                    return Registration::Failed { lock: *fresh, why };
                }
                Err(e) => {
                    let why = format!("reissuing the grant: {e}");
                    return Registration::Failed { lock, why };
                }
            }
        }
    }

    /// Serves a queue hand-off: registers the grant, then announces it (`lock.acquired` to the
    /// room, `lock.granted` to the waiter); a grant that cannot be registered is withdrawn, the
    /// waiter told `unavailable`, and whatever the withdrawal handed on is served the same way.
    pub(crate) async fn serve_handoff(&self, grant: Grant) {
        let mut next = Some(grant);
        while let Some(g) = next.take() {
            // Replicated first (a hand-off lost in a failover could go to someone else too),
            // then registered.
            let durable = match self
                .locks
                .confirm_handoff(&g.lock.key(), g.lock.token)
                .await
            {
                Ok(()) => self.fence(g.lock.clone()).await,
                Err(e) => Err(self.withdraw_unreplicated(&g.lock, &e.to_string()).await),
            };
            match durable {
                Ok(lock) => {
                    self.metrics.lock_outcome("granted");
                    let room = lock.room.clone();
                    let grant = Grant {
                        lock,
                        request_id: g.request_id,
                    };
                    let kind = RoomEventKind::LockAcquired {
                        grant,
                        via_queue: true,
                    };
                    self.publish(&room, None, kind).await;
                }
                Err(unfenced) => {
                    self.metrics.lock_outcome("wait_failed");
                    let kind = RoomEventKind::WaitFailed {
                        resource: g.lock.resource.clone(),
                        session_id: g.lock.holder.session_id.clone(),
                        request_id: g.request_id,
                    };
                    self.publish(&g.lock.room, None, kind).await;
                    next = unfenced.released.and_then(handed_on);
                }
            }
        }
    }

    /// Serves what the withdrawal of a direct grant handed on, if anything.
    pub(crate) async fn serve_withdrawal(&self, released: Option<LockTransition>) {
        if let Some(grant) = released.and_then(handed_on) {
            self.serve_handoff(grant).await;
        }
    }
}

/// Deletes `lockstep.fences` rows idle for longer than `LOCKSTEP_FENCE_RETENTION`: those whose
/// token (µs since the epoch at its grant, by the Redis or process clock) is below
/// now − retention. Every node with a database runs it, every quarter of the retention (at least
/// every 10 minutes, at most every second); `fence_prune` is safe concurrently.
pub(crate) fn spawn_pruning(node: &std::sync::Arc<Node>) {
    let Some(db) = node.db.clone() else {
        return;
    };
    let retention = node.config.fence_retention;
    let period = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    super::every(node, period, move |_| {
        let db = db.clone();
        async move {
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or_default();
            let below = now_us.saturating_sub(retention.as_micros() as u64);
            match tokio::time::timeout(Duration::from_secs(300), crate::db::fence_prune(&db, below))
                .await
            {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(removed = n, "pruned idle fence rows"),
                Ok(Err(e)) => tracing::warn!(error = %e, "fence pruning failed"),
                Err(_) => tracing::warn!("fence pruning timed out"),
            }
        }
    });
}

/// The hand-off a release made, if any.
fn handed_on(t: LockTransition) -> Option<Grant> {
    match t {
        LockTransition::Released { granted, .. } => granted,
        LockTransition::WaitExpired { .. } => None,
    }
}
