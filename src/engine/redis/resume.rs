//! Parked sessions in Redis, so a client may resume on any node.
//!
//! `resume:<token>` holds the session as JSON and expires with the grace. `claim` is a script
//! (take-and-delete only when the user matches), `expire` is `DEL`: whichever runs first wins.

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;

use super::{engine_err, keys};
use crate::engine::{EngineError, EngineResult, ParkedSession, ResumeStore};

const CLAIM: &str = include_str!("scripts/resume_claim.lua");

pub struct RedisResumeStore {
    pool: Pool,
    claim: Script,
}

impl RedisResumeStore {
    pub fn new(pool: Pool) -> RedisResumeStore {
        RedisResumeStore {
            pool,
            claim: Script::from_lua(CLAIM),
        }
    }
}

#[async_trait]
impl ResumeStore for RedisResumeStore {
    async fn park(&self, token: &str, session: &ParkedSession, grace_ms: u64) -> EngineResult<()> {
        let json =
            serde_json::to_string(session).map_err(|e| EngineError::Internal(e.to_string()))?;
        let expire = Some(Expiration::PX(grace_ms.max(1) as i64));
        let _: () = self
            .pool
            .set(keys::resume(token), json, expire, None, false)
            .await
            .map_err(engine_err)?;
        Ok(())
    }

    async fn claim(&self, token: &str, user_id: &str) -> EngineResult<Option<ParkedSession>> {
        let json: Option<String> = self
            .claim
            .evalsha_with_reload(
                self.pool.next(),
                vec![keys::resume(token)],
                vec![user_id.to_owned()],
            )
            .await
            .map_err(engine_err)?;
        json.map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| EngineError::Internal(format!("parked session: {e}")))
        })
        .transpose()
    }

    async fn expire(&self, token: &str) -> EngineResult<bool> {
        let removed: i64 = self
            .pool
            .del(keys::resume(token))
            .await
            .map_err(engine_err)?;
        Ok(removed > 0)
    }
}
