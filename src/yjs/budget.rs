//! Message budgets of `/v1/yjs` connections: a token bucket per connection and one per user
//! across that user's Yjs connections on this node. A connection whose budget is spent stops
//! reading its socket until a token is there (see [`crate::yjs::conn`]): TCP backpressure
//! slows the flooder down, and nobody else on the document notices.
//!
//! Rates: `LOCKSTEP_MESSAGES_PER_SECOND` and `LOCKSTEP_MESSAGE_BURST`, the `/v1/ws` session
//! budget, per connection; [`USER_CONNECTIONS_AT_FULL_RATE`] times that per user. A
//! y-websocket provider sends one message per local transaction and per awareness change, so a
//! person typing and moving a cursor stays far below 100 a second, and a reconnect's sync is a
//! handful of messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::engine::UserId;
use crate::session::ratelimit::TokenBucket;

/// How many of one user's connections on a node may send at the full per-connection rate at
/// once: four busy tabs are served in full, forty share what four would get.
pub const USER_CONNECTIONS_AT_FULL_RATE: u32 = 4;

/// The per-user buckets of this node's Yjs connections. An entry lives while the user has a
/// connection here (the last [`Budget`] of a user removes it), so the map is bounded by the
/// connections.
pub struct UserBudgets {
    rate: u32,
    burst: u32,
    users: Mutex<HashMap<UserId, Arc<Mutex<TokenBucket>>>>,
}

/// One connection's budget: its own bucket, then its user's.
pub struct Budget {
    own: TokenBucket,
    user: Arc<Mutex<TokenBucket>>,
    user_id: UserId,
    budgets: Arc<UserBudgets>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UserBudgets {
    /// Budgets of `rate` messages a second with bursts of `burst`, per connection.
    pub fn new(rate: u32, burst: u32) -> Arc<UserBudgets> {
        Arc::new(UserBudgets {
            rate,
            burst,
            users: Mutex::new(HashMap::new()),
        })
    }

    /// The budget of a new connection of `user`.
    pub fn budget(self: &Arc<Self>, user: &UserId) -> Budget {
        let shared = lock(&self.users)
            .entry(user.clone())
            .or_insert_with(|| {
                let n = USER_CONNECTIONS_AT_FULL_RATE;
                Arc::new(Mutex::new(TokenBucket::new(
                    self.rate.saturating_mul(n),
                    self.burst.saturating_mul(n),
                )))
            })
            .clone();
        Budget {
            own: TokenBucket::new(self.rate, self.burst),
            user: shared,
            user_id: user.clone(),
            budgets: self.clone(),
        }
    }

    /// Users with a Yjs connection here (tests).
    pub fn users(&self) -> usize {
        lock(&self.users).len()
    }
}

impl Budget {
    /// Takes one message's token, or says how long until there is one.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.own.take_or_wait(now)?;
        lock(&self.user).take_or_wait(now)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        // Under the map's lock nobody can clone the shared bucket meanwhile: when only this
        // budget and the map hold it, this was the user's last connection here.
        let mut users = lock(&self.budgets.users);
        if Arc::strong_count(&self.user) == 2 {
            users.remove(&self.user_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_spends_its_own_burst_then_waits() {
        let budgets = UserBudgets::new(10, 3);
        let mut b = budgets.budget(&"ann".into());
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.take(t0).is_ok()));
        let wait = b.take(t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert!(b.take(t0 + wait).is_ok());
    }

    #[test]
    fn a_users_connections_share_the_user_budget() {
        let budgets = UserBudgets::new(10, 2);
        let user: UserId = "ann".into();
        let mut conns: Vec<Budget> = (0..6).map(|_| budgets.budget(&user)).collect();
        let t0 = Instant::now();
        let passed: usize = conns
            .iter_mut()
            .map(|b| (0..2).filter(|_| b.take(t0).is_ok()).count())
            .sum();
        assert_eq!(passed, 2 * USER_CONNECTIONS_AT_FULL_RATE as usize);
        let mut other = budgets.budget(&"bob".into());
        assert!(
            other.take(t0).is_ok(),
            "another user has a budget of their own"
        );
        assert_eq!(budgets.users(), 2);
        conns.clear();
        assert_eq!(
            budgets.users(),
            1,
            "the last connection of ann took her entry along"
        );
        drop(other);
        assert_eq!(budgets.users(), 0);
    }
}
