//! Parked sessions in process memory (one node: resumes can only reach this node anyway).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::engine::{EngineResult, ParkedSession, ResumeStore};

/// Records expire on their own, so an abandoned record does not outlive its grace by long
/// even if the node's own timer never fires (it is pruned on the next park).
#[derive(Default)]
pub struct MemoryResumeStore {
    parked: Mutex<HashMap<String, (ParkedSession, Instant)>>,
}

impl MemoryResumeStore {
    pub fn new() -> MemoryResumeStore {
        MemoryResumeStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ParkedSession, Instant)>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl ResumeStore for MemoryResumeStore {
    async fn park(&self, token: &str, session: &ParkedSession, grace_ms: u64) -> EngineResult<()> {
        let now = Instant::now();
        let mut m = self.lock();
        m.retain(|_, (_, until)| *until > now);
        m.insert(
            token.to_owned(),
            (session.clone(), now + Duration::from_millis(grace_ms)),
        );
        Ok(())
    }

    async fn claim(&self, token: &str, user_id: &str) -> EngineResult<Option<ParkedSession>> {
        let mut m = self.lock();
        match m.get(token) {
            Some((s, until)) if &*s.user_id == user_id && *until > Instant::now() => {}
            _ => return Ok(None),
        }
        Ok(m.remove(token).map(|(s, _)| s))
    }

    async fn expire(&self, token: &str) -> EngineResult<bool> {
        Ok(self.lock().remove(token).is_some())
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
}
