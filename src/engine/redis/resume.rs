//! Parked sessions in Redis, so a client may resume on any node.
//!
//! `resume:<token>` holds the session as JSON and expires with the grace. `claim` is a script
//! (take-and-delete only when the user matches), `expire` is `DEL`: whichever runs first wins.

use async_trait::async_trait;
use fred::prelude::*;

use super::script::LuaScript;
use super::{call, engine_err, keys};
use crate::engine::{EngineError, EngineResult, ParkedSession, ResumeStore};
use crate::telemetry::RedisMetrics;

const CLAIM: &str = include_str!("scripts/resume_claim.lua");

pub struct RedisResumeStore {
    pool: Pool,
    claim: LuaScript,
    metrics: RedisMetrics,
}

impl RedisResumeStore {
    pub fn new(pool: Pool) -> RedisResumeStore {
        RedisResumeStore {
            pool,
            // Re-run after a lost reply: the record is gone and the resume would fail.
            claim: LuaScript::once("", CLAIM),
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
        let expire = Some(Expiration::PX(grace_ms.max(1) as i64));
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
            vec![user_id.to_owned()],
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
        let del = self.pool.del(keys::resume(token));
        let removed: i64 = call(&self.metrics, "resume_expire", del)
            .await
            .map_err(engine_err)?;
        Ok(removed > 0)
    }
}
