//! The token lifetime of Yjs connections (`/v1/yjs`, and each document of a `/v1/hocuspocus`
//! socket): a connection is authorized by a token once, at its upgrade (or auth message), so
//! this module ends it when that token stops being good — at the token's `exp`, and at once
//! when an admin revokes its user or its `jti` (`POST /v1/admin/sessions/revoke`, on any node:
//! the revocation reaches every node's [`crate::node::Node::revoke_local`]).
//!
//! Yjs has no token refresh on an open connection (y-websocket has none; Hocuspocus's
//! `onTokenSync` is not served), so the end is a close the providers reconnect after: 4012
//! at `exp` (the app gives the provider a fresh token: y-websocket `params.token`, Hocuspocus
//! a `token` function), 4013 on revocation (the revoked token is refused again until its
//! `exp`). A revocation by `session_id` names a `/v1/ws` session and never matches here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::auth::Principal;
use crate::error::close;
use crate::node::lifetime::Revocation;

/// Every open Yjs connection's token on this node (bounded by the connections: an entry
/// lives as long as its [`TokenWatch`]).
#[derive(Default)]
pub struct YjsTokens {
    conns: Mutex<HashMap<u64, Holder>>,
    next: AtomicU64,
}

struct Holder {
    user_id: Arc<str>,
    jti: Option<Arc<str>>,
    revoked: CancellationToken,
}

/// One connection's token: [`ended`](Self::ended) resolves when it expires or is revoked.
pub struct TokenWatch {
    id: u64,
    tokens: Arc<YjsTokens>,
    revoked: CancellationToken,
    expires: Option<tokio::time::Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl YjsTokens {
    pub fn new() -> Arc<YjsTokens> {
        Arc::new(YjsTokens::default())
    }

    /// Starts watching the token `principal` was authenticated with.
    pub fn watch(self: &Arc<Self>, principal: &Principal) -> TokenWatch {
        let grants = principal.grants();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        lock(&self.conns).insert(
            id,
            Holder {
                user_id: principal.user_id.as_ref().into(),
                jti: grants.jti.clone(),
                revoked: revoked.clone(),
            },
        );
        TokenWatch {
            id,
            tokens: self.clone(),
            revoked,
            expires: grants.exp.map(expiry_instant),
        }
    }

    /// Ends the connections whose token `rev` names (by user and/or `jti`; every field given
    /// must match). Returns how many.
    pub fn revoke(&self, rev: &Revocation) -> usize {
        if rev.session_id.is_some() || (rev.user_id.is_none() && rev.jti.is_none()) {
            return 0;
        }
        let conns = lock(&self.conns);
        let mut ended = 0;
        for h in conns.values() {
            let user = rev.user_id.as_deref().is_none_or(|u| *h.user_id == *u);
            let jti = rev
                .jti
                .as_deref()
                .is_none_or(|j| h.jti.as_deref() == Some(j));
            if user && jti && !h.revoked.is_cancelled() {
                h.revoked.cancel();
                ended += 1;
            }
        }
        ended
    }

    /// Open Yjs connections watched here (tests).
    pub fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `exp` (seconds since the epoch) as a tokio instant; one already past is now.
fn expiry_instant(exp: u64) -> tokio::time::Instant {
    let now_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(exp).saturating_sub(now_wall);
    tokio::time::Instant::now() + left
}

impl TokenWatch {
    /// Resolves with the close code and reason when the token expires or is revoked; never
    /// for a token without `exp` (the admin token) that is not revoked.
    pub async fn ended(&self) -> (u16, &'static str) {
        let expiry = async {
            match self.expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.revoked.cancelled() => (close::REVOKED, "token revoked"),
            _ = expiry => (close::TOKEN_EXPIRED, "token expired"),
        }
    }
}

impl TokenWatch {
    /// [`ended`](Self::ended) without waiting: whether the token has expired or been revoked.
    pub fn has_ended(&self) -> Option<(u16, &'static str)> {
        if self.revoked.is_cancelled() {
            Some((close::REVOKED, "token revoked"))
        } else if self
            .expires
            .is_some_and(|at| at <= tokio::time::Instant::now())
        {
            Some((close::TOKEN_EXPIRED, "token expired"))
        } else {
            None
        }
    }
}

impl Drop for TokenWatch {
    fn drop(&mut self) {
        lock(&self.tokens.conns).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Grants;

    fn principal(user: &str, jti: Option<&str>, exp: u64) -> Principal {
        Principal::new(
            user.into(),
            user.into(),
            None,
            "#000".into(),
            Grants {
                rooms: Vec::new(),
                exp: Some(exp),
                jti: jti.map(Into::into),
            },
        )
    }

    fn far() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    #[tokio::test]
    async fn a_revocation_ends_the_matching_connections_only() {
        let tokens = YjsTokens::new();
        let ann1 = tokens.watch(&principal("ann", Some("t1"), far()));
        let ann2 = tokens.watch(&principal("ann", Some("t2"), far()));
        let bob = tokens.watch(&principal("bob", Some("t3"), far()));
        let by_session = Revocation {
            session_id: Some("yjs-1".into()),
            user_id: Some("ann".into()),
            ..Default::default()
        };
        assert_eq!(
            tokens.revoke(&by_session),
            0,
            "session ids name /v1/ws sessions"
        );
        let by_jti = Revocation {
            jti: Some("t1".into()),
            ..Default::default()
        };
        assert_eq!(tokens.revoke(&by_jti), 1);
        assert_eq!(ann1.ended().await, (close::REVOKED, "token revoked"));
        assert_eq!(ann1.has_ended(), Some((close::REVOKED, "token revoked")));
        assert_eq!(bob.has_ended(), None);
        let by_user = Revocation {
            user_id: Some("ann".into()),
            ..Default::default()
        };
        assert_eq!(tokens.revoke(&by_user), 1, "ann1 was already ended");
        assert_eq!(ann2.ended().await.0, close::REVOKED);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), bob.ended())
                .await
                .is_err()
        );
        drop((ann1, ann2));
        assert_eq!(tokens.len(), 1, "a dropped watch leaves the map");
    }

    #[tokio::test]
    async fn an_expired_token_ends_its_connection() {
        let tokens = YjsTokens::new();
        let past = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 1;
        let w = tokens.watch(&principal("ann", None, past));
        assert_eq!(w.ended().await, (close::TOKEN_EXPIRED, "token expired"));
        assert_eq!(w.has_ended(), Some((close::TOKEN_EXPIRED, "token expired")));
    }
}
