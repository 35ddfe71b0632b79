//! Parked sessions in Redis, so a client may resume on any node.
//!
//! `resume:<token>` holds the session as JSON. It lives [`RECORD_MARGIN_MS`] past the grace, so
//! the owning node's end-of-grace sweep always finds either the record or a resume's tombstone
//! (a key expiring exactly with the grace made the sweep mistake an abandoned session for a
//! resumed one and skip its cleanup). `claim` (only the same user, only while the key's PTTL
//! is above the margin) swaps the record for the tombstone `claimed`; `expire` deletes the
//! record unless it finds the tombstone. Both are scripts, so exactly one of them wins.

use std::collections::HashMap;

use async_trait::async_trait;
use fred::prelude::*;
use futures_util::StreamExt;

use super::script::LuaScript;
use super::{call, engine_err, keys};

use crate::engine::{EngineError, EngineResult, ParkedSession, ResumeStore, SessionId, UserId};
use crate::telemetry::RedisMetrics;

const CLAIM: &str = include_str!("scripts/resume_claim.lua");
const EXPIRE: &str = include_str!("scripts/resume_expire.lua");
const ADMIT: &str = include_str!("scripts/resume_admit.lua");
const KEEP: &str = include_str!("scripts/resume_keep.lua");

/// How many users' admission renewals are in flight at once (see `keep_admitted`).
const KEEP_WINDOW: usize = 64;

/// How long a parked session's key outlives its grace: the end-of-grace sweep of the owning
/// node must run within this, or it treats the session as ended anyway (never as resumed).
pub const RECORD_MARGIN_MS: u64 = 60_000;

pub struct RedisResumeStore {
    pool: Pool,
    claim: LuaScript,
    expire: LuaScript,
    admit: LuaScript,
    keep: LuaScript,
    metrics: RedisMetrics,
}

impl RedisResumeStore {
    pub fn new(pool: Pool) -> RedisResumeStore {
        RedisResumeStore {
            pool,
            // Re-run after a lost reply: the record is gone and the resume would fail.
            claim: LuaScript::once("", CLAIM),
            // A re-run lands the same: the record is already gone (1 again), the session is
            // already counted (admitted again), expiries are renewed again.
            expire: LuaScript::plain(EXPIRE),
            admit: LuaScript::plain(ADMIT),
            keep: LuaScript::plain(KEEP),
            metrics: RedisMetrics::default(),
        }
    }

    /// Records every Redis call in `metrics` (see [`super::call`]).
    pub fn with_metrics(mut self, metrics: RedisMetrics) -> RedisResumeStore {
        self.metrics = metrics;
        self
    }
}

#[async_trait]
impl ResumeStore for RedisResumeStore {
    async fn park(&self, token: &str, session: &ParkedSession, grace_ms: u64) -> EngineResult<()> {
        let json =
            serde_json::to_string(session).map_err(|e| EngineError::Internal(e.to_string()))?;
        let expire = Some(Expiration::PX((grace_ms.max(1) + RECORD_MARGIN_MS) as i64));
        let set = self
            .pool
            .set(keys::resume(token), json, expire, None, false);
        let _: () = call(&self.metrics, "resume_park", set)
            .await
            .map_err(engine_err)?;
        Ok(())
    }

    async fn claim(&self, token: &str, user_id: &str) -> EngineResult<Option<ParkedSession>> {
        let eval = self.claim.eval(
            self.pool.next(),
            vec![keys::resume(token)],
            vec![user_id.to_owned(), RECORD_MARGIN_MS.to_string()],
        );
        let json: Option<String> = call(&self.metrics, "resume_claim", eval)
            .await
            .map_err(engine_err)?;
        json.map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| EngineError::Internal(format!("parked session: {e}")))
        })
        .transpose()
    }

    async fn expire(&self, token: &str) -> EngineResult<bool> {
        let eval = self.expire.eval(
            self.pool.next(),
            vec![keys::resume(token)],
            Vec::<String>::new(),
        );
        let ended: i64 = call(&self.metrics, "resume_expire", eval)
            .await
            .map_err(engine_err)?;
        Ok(ended == 1)
    }

    async fn admit(
        &self,
        user_id: &str,
        session_id: &str,
        limit: usize,
        ttl_ms: u64,
    ) -> EngineResult<bool> {
        let eval = self.admit.eval(
            self.pool.next(),
            vec![keys::user_sessions(user_id)],
            vec![
                session_id.to_owned(),
                limit.to_string(),
                ttl_ms.max(1).to_string(),
            ],
        );
        let (admitted, _count): (i64, i64) = call(&self.metrics, "resume_admit", eval)
            .await
            .map_err(engine_err)?;
        Ok(admitted == 1)
    }

    async fn keep_admitted(
        &self,
        sessions: &[(UserId, SessionId)],
        ttl_ms: u64,
    ) -> EngineResult<()> {
        let mut by_user: HashMap<&str, Vec<String>> = HashMap::new();
        for (user, session) in sessions {
            by_user.entry(user).or_default().push(session.to_string());
        }
        // Concurrently, a window at a time: fred pipelines them, so 10,000 users cost a few
        // hundred round trips, not 10,000 in a row (at 1 ms each that was 10 s of a 5 s tick,
        // against a 15 s admission ttl). Every user is tried; the first failure is returned.
        let mut calls = Vec::with_capacity(by_user.len());
        for (user, ids) in by_user {
            let mut args = Vec::with_capacity(ids.len() + 1);
            args.push(ttl_ms.max(1).to_string());
            args.extend(ids);
            let eval = self
                .keep
                .eval(self.pool.next(), vec![keys::user_sessions(user)], args);
            let metrics = &self.metrics;
            calls.push(async move {
                let r: Result<i64, _> = call(metrics, "resume_keep", eval).await;
                r.map(|_| ()).map_err(engine_err)
            });
        }
        let mut results = futures_util::stream::iter(calls).buffer_unordered(KEEP_WINDOW);
        let mut first_error = None;
        while let Some(r) = results.next().await {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn dismiss(&self, user_id: &str, session_id: &str) -> EngineResult<()> {
        let zrem = self.pool.zrem(keys::user_sessions(user_id), session_id);
        let _: i64 = call(&self.metrics, "resume_dismiss", zrem)
            .await
            .map_err(engine_err)?;
        Ok(())
    }

    async fn counted_sessions(&self, user_id: &str) -> EngineResult<usize> {
        // ZCARD, not a count by score: the scores are Redis-clock instants, and counting a
        // lapsed entry only costs a takeover request nobody answers.
        let zcard = self.pool.zcard(keys::user_sessions(user_id));
        let n: i64 = call(&self.metrics, "resume_counted", zcard)
            .await
            .map_err(engine_err)?;
        Ok(n.max(0) as usize)
    }

    async fn revoke_jti(&self, jti: &str, until_ms: u64) -> EngineResult<()> {
        let ttl = until_ms.saturating_sub(crate::engine::now_ms()).max(1);
        let set = self.pool.set(
            keys::revoked(jti),
            "1",
            Some(Expiration::PX(ttl as i64)),
            None,
            false,
        );
        let _: () = call(&self.metrics, "revoke_jti", set)
            .await
            .map_err(engine_err)?;
        Ok(())
    }

    async fn is_revoked(&self, jti: &str) -> EngineResult<bool> {
        let exists = self.pool.exists(keys::revoked(jti));
        let n: i64 = call(&self.metrics, "is_revoked", exists)
            .await
            .map_err(engine_err)?;
        Ok(n > 0)
    }
}
