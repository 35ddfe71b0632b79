//! Parked sessions in process memory (one node: resumes can only reach this node anyway).
//!
//! The same rules as the Redis store: a record can be claimed only within its grace, a claim
//! leaves a tombstone, and records (and tombstones) are pruned only [`RECORD_MARGIN`] after
//! their grace. Pruning at the grace itself let one session's park erase another's record
//! just before its end-of-grace sweep, which then took the session for resumed and left its
//! presence behind for good.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::engine::{
    EngineError, EngineResult, ParkedSession, ResumeStore, SessionId, UserId, now_ms,
};

/// How long a record or tombstone outlives its grace.
const RECORD_MARGIN: Duration = Duration::from_secs(60);

enum Slot {
    Parked(ParkedSession),
    Claimed,
}

#[derive(Default)]
pub struct MemoryResumeStore {
    parked: Mutex<HashMap<String, (Slot, Instant)>>,
    /// Per user, its live sessions and when each entry lapses (the per-user limit). Bounded:
    /// at most `limit` entries per user, and a user's map goes with its last entry.
    admitted: Mutex<HashMap<UserId, HashMap<SessionId, Instant>>>,
    /// Revoked token ids → until when (ms since the epoch); pruned as they pass, at most
    /// [`MAX_REVOKED`] live ones.
    revoked: Mutex<HashMap<String, u64>>,
}

/// Most revoked token ids remembered at once (a revoke past this fails with `Unavailable`).
pub const MAX_REVOKED: usize = 100_000;

impl MemoryResumeStore {
    pub fn new() -> MemoryResumeStore {
        MemoryResumeStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Slot, Instant)>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl ResumeStore for MemoryResumeStore {
    async fn park(&self, token: &str, session: &ParkedSession, grace_ms: u64) -> EngineResult<()> {
        let now = Instant::now();
        let mut m = self.lock();
        m.retain(|_, (_, until)| *until + RECORD_MARGIN > now);
        m.insert(
            token.to_owned(),
            (
                Slot::Parked(session.clone()),
                now + Duration::from_millis(grace_ms),
            ),
        );
        Ok(())
    }

    async fn claim(&self, token: &str, user_id: &str) -> EngineResult<Option<ParkedSession>> {
        let mut m = self.lock();
        let Some((slot, until)) = m.get_mut(token) else {
            return Ok(None);
        };
        match slot {
            Slot::Parked(s) if &*s.user_id == user_id && *until > Instant::now() => {}
            _ => return Ok(None),
        }
        match std::mem::replace(slot, Slot::Claimed) {
            Slot::Parked(s) => Ok(Some(s)),
            Slot::Claimed => Ok(None),
        }
    }

    async fn expire(&self, token: &str) -> EngineResult<bool> {
        let mut m = self.lock();
        if matches!(m.get(token), Some((Slot::Claimed, _))) {
            return Ok(false);
        }
        // The record, or nothing at all (pruned: the sweep came a margin late): not resumed.
        m.remove(token);
        Ok(true)
    }

    async fn admit(
        &self,
        user_id: &str,
        session_id: &str,
        limit: usize,
        ttl_ms: u64,
    ) -> EngineResult<bool> {
        let now = Instant::now();
        let mut a = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        let user = a.entry(UserId::from(user_id)).or_default();
        user.retain(|_, until| *until > now);
        let until = now + Duration::from_millis(ttl_ms);
        if let Some(e) = user.get_mut(session_id) {
            *e = until;
            return Ok(true);
        }
        if user.len() >= limit {
            if user.is_empty() {
                a.remove(user_id);
            }
            return Ok(false);
        }
        user.insert(SessionId::from(session_id), until);
        Ok(true)
    }

    async fn keep_admitted(
        &self,
        sessions: &[(UserId, SessionId)],
        ttl_ms: u64,
    ) -> EngineResult<()> {
        let until = Instant::now() + Duration::from_millis(ttl_ms);
        let mut a = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        for (user, session) in sessions {
            if let Some(e) = a.get_mut(user).and_then(|u| u.get_mut(session)) {
                *e = until;
            }
        }
        Ok(())
    }

    async fn dismiss(&self, user_id: &str, session_id: &str) -> EngineResult<()> {
        let mut a = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = a.get_mut(user_id) {
            u.remove(session_id);
            if u.is_empty() {
                a.remove(user_id);
            }
        }
        Ok(())
    }

    async fn counted_sessions(&self, user_id: &str) -> EngineResult<usize> {
        let now = Instant::now();
        let a = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        Ok(a.get(user_id)
            .map_or(0, |u| u.values().filter(|until| **until > now).count()))
    }

    async fn revoke_jti(&self, jti: &str, until_ms: u64) -> EngineResult<()> {
        let now = now_ms();
        let mut r = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|_, until| *until > now);
        if r.len() >= MAX_REVOKED && !r.contains_key(jti) {
            return Err(EngineError::Unavailable(format!(
                "{MAX_REVOKED} revoked tokens are live already"
            )));
        }
        let e = r.entry(jti.to_owned()).or_insert(until_ms);
        *e = (*e).max(until_ms);
        Ok(())
    }

    async fn is_revoked(&self, jti: &str) -> EngineResult<bool> {
        let r = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        Ok(r.get(jti).is_some_and(|until| *until > now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(user: &str) -> ParkedSession {
        ParkedSession {
            session_id: "s".into(),
            user_id: user.into(),
            rooms: Vec::new(),
            held: Vec::new(),
            share_cursor: true,
            node_id: "n".into(),
        }
    }

    #[tokio::test]
    async fn exactly_one_of_claim_and_expire_wins() {
        let store = MemoryResumeStore::new();
        store.park("t", &parked("a"), 60_000).await.unwrap();
        assert!(
            store.claim("t", "mallory").await.unwrap().is_none(),
            "other users cannot claim"
        );
        assert!(store.claim("t", "a").await.unwrap().is_some());
        assert!(
            !store.expire("t").await.unwrap(),
            "claimed: the grace end must not end it"
        );
        assert!(store.claim("t", "a").await.unwrap().is_none(), "single use");

        store.park("u", &parked("a"), 60_000).await.unwrap();
        assert!(store.expire("u").await.unwrap());
        assert!(
            store.claim("u", "a").await.unwrap().is_none(),
            "expired: too late to resume"
        );
    }

    #[tokio::test]
    async fn a_record_past_its_grace_cannot_be_claimed() {
        let store = MemoryResumeStore::new();
        store.park("t", &parked("a"), 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(store.claim("t", "a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn admission_counts_each_session_once_up_to_the_limit() {
        let store = MemoryResumeStore::new();
        assert!(store.admit("u", "s1", 2, 60_000).await.unwrap());
        assert!(store.admit("u", "s2", 2, 60_000).await.unwrap());
        assert!(!store.admit("u", "s3", 2, 60_000).await.unwrap());
        assert!(
            store.admit("u", "s1", 2, 60_000).await.unwrap(),
            "a resume is admitted"
        );
        assert!(store.admit("v", "s4", 2, 60_000).await.unwrap(), "per user");
        store.dismiss("u", "s2").await.unwrap();
        assert!(store.admit("u", "s3", 2, 60_000).await.unwrap());
        store.admit("w", "x", 1, 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            store.admit("w", "y", 1, 60_000).await.unwrap(),
            "lapsed entries free slots"
        );
    }

    #[tokio::test]
    async fn counted_sessions_follow_admissions_and_dismissals() {
        let store = MemoryResumeStore::new();
        assert_eq!(store.counted_sessions("u").await.unwrap(), 0);
        store.admit("u", "s1", 4, 60_000).await.unwrap();
        store.admit("u", "s2", 4, 60_000).await.unwrap();
        store.admit("v", "s3", 4, 1).await.unwrap();
        assert_eq!(store.counted_sessions("u").await.unwrap(), 2);
        store.dismiss("u", "s1").await.unwrap();
        assert_eq!(store.counted_sessions("u").await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.counted_sessions("v").await.unwrap(), 0, "lapsed");
    }

    #[tokio::test]
    async fn another_park_does_not_erase_a_record_whose_grace_just_ended() {
        let store = MemoryResumeStore::new();
        store.park("t", &parked("a"), 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Another session parks between the end of t's grace and t's sweep…
        store.park("u", &parked("b"), 60_000).await.unwrap();
        // …and t's sweep must still learn that nobody resumed t.
        assert!(store.expire("t").await.unwrap());
    }
}
