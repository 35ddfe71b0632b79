//! Throttles of the HTTP side: request budgets per client IP and per user, a budget of HTTP
//! lock acquisitions per user, and the aggregation of `auth_failed` audit records.
//!
//! Every map here is bounded: an entry whose bucket has refilled is the same as no entry, so
//! idle entries are evicted when a map is full; if it is still full (that many distinct keys
//! active within one refill time) a new key is refused until some refill — the memory bound
//! wins over serving a flood of new addresses. IPv6 clients are keyed by their /64, which one
//! host usually owns whole.
//!
//! A `std::sync::Mutex` per map: held for one hash lookup, never across an `.await`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine::UserId;
use crate::session::ratelimit::TokenBucket;

/// Keys one map may track; past it idle keys are evicted, then new keys refused.
const MAX_KEYS: usize = 100_000;
/// Source IPs whose auth failures are tracked one by one; past it they share one record.
const MAX_FAILURE_SOURCES: usize = 10_000;
/// One `auth_failed` record per source and window at most, plus one with the count.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Token buckets by key: `rate` per second up to `burst`.
struct Buckets<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    map: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        Buckets {
            rate,
            burst,
            max_keys,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; `Err(retry_after)` when its budget is spent.
    fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= self.max_keys {
            map.retain(|_, b| !b.is_full_at(now));
            if map.len() >= self.max_keys {
                return Err(Duration::from_secs_f64((1.0 / self.rate).max(1.0)));
            }
        }
        map.entry(key.clone())
            .or_insert_with(|| TokenBucket::full(self.rate, self.burst, now))
            .take_or_wait(now)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

/// A refused request: how long until it would pass (the `retry-after` header, in seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u64);

impl RetryAfter {
    fn from(d: Duration) -> RetryAfter {
        RetryAfter(d.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// An aggregated `auth_failed` record due: `count` failures from `source` in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureSummary {
    /// The source IP, or `None` for sources past [`MAX_FAILURE_SOURCES`].
    pub source: Option<IpAddr>,
    pub count: u64,
    pub last_reason: String,
}

struct FailureWindow {
    started: Instant,
    /// Failures after the first (which was recorded at once).
    more: u64,
    last_reason: String,
}

pub struct Throttle {
    per_ip: Buckets<IpAddr>,
    per_user: Buckets<UserId>,
    http_locks: Buckets<UserId>,
    http_locks_per_minute: u32,
    failures: Mutex<HashMap<Option<IpAddr>, FailureWindow>>,
}

impl Throttle {
    pub fn new(config: &Config) -> Throttle {
        let burst = config.http_burst as f64;
        let locks = config.max_http_locks_per_user as f64;
        Throttle {
            per_ip: Buckets::new(
                config.http_requests_per_second_per_ip as f64,
                burst,
                MAX_KEYS,
            ),
            per_user: Buckets::new(
                config.http_requests_per_second_per_user as f64,
                burst,
                MAX_KEYS,
            ),
            http_locks: Buckets::new(locks / 60.0, locks, MAX_KEYS),
            http_locks_per_minute: config.max_http_locks_per_user,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// One HTTP request from `ip`.
    pub fn request_from_ip(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        self.per_ip
            .take(&rate_key(ip), Instant::now())
            .map_err(RetryAfter::from)
    }

    /// One authenticated HTTP request of `user`.
    pub fn request_from_user(&self, user: &UserId) -> Result<(), RetryAfter> {
        self.per_user
            .take(user, Instant::now())
            .map_err(RetryAfter::from)
    }

    /// One HTTP lock acquisition attempt of `user` (`LOCKSTEP_MAX_HTTP_LOCKS_PER_USER` per
    /// minute, as a token bucket: that many at once, then one every 60 / N seconds).
    pub fn http_lock(&self, user: &UserId) -> Result<(), (u32, RetryAfter)> {
        self.http_locks
            .take(user, Instant::now())
            .map_err(|d| (self.http_locks_per_minute, RetryAfter::from(d)))
    }

    /// Counts an authentication failure from `ip`; true when it opens a new window and must
    /// be recorded now. The rest of the window's failures from that source are summed into one
    /// record by [`due_failures`](Self::due_failures).
    pub fn auth_failure(&self, ip: IpAddr, reason: &str) -> bool {
        self.auth_failure_at(ip, reason, Instant::now())
    }

    fn auth_failure_at(&self, ip: IpAddr, reason: &str, now: Instant) -> bool {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let key = if map.contains_key(&Some(ip)) || map.len() < MAX_FAILURE_SOURCES {
            Some(ip)
        } else {
            None
        };
        match map.get_mut(&key) {
            Some(w) if now.duration_since(w.started) < AUTH_FAILURE_WINDOW => {
                w.more += 1;
                w.last_reason.clear();
                w.last_reason.push_str(reason);
                false
            }
            // A window that ended but was not flushed yet keeps its count for the flush;
            // this failure then waits there too (at most one window late).
            Some(w) => {
                w.more += 1;
                false
            }
            None => {
                map.insert(
                    key,
                    FailureWindow {
                        started: now,
                        more: 0,
                        last_reason: reason.to_owned(),
                    },
                );
                true
            }
        }
    }

    /// Ends the windows older than [`AUTH_FAILURE_WINDOW`] (all of them with `all`, at
    /// shutdown) and returns one summary for each that saw more than its first failure.
    pub fn due_failures(&self, all: bool) -> Vec<FailureSummary> {
        self.due_failures_at(Instant::now(), all)
    }

    fn due_failures_at(&self, now: Instant, all: bool) -> Vec<FailureSummary> {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        map.retain(|source, w| {
            if !all && now.duration_since(w.started) < AUTH_FAILURE_WINDOW {
                return true;
            }
            if w.more > 0 {
                due.push(FailureSummary {
                    source: *source,
                    count: w.more,
                    last_reason: std::mem::take(&mut w.last_reason),
                });
            }
            false
        });
        due
    }
}

impl super::Node {
    /// The HTTP lock budget, called by `acquire` for HTTP callers: every attempt counts
    /// (granted or denied: a denial writes an audit record too). The admin/service token is
    /// exempt: it is the operator's own backend.
    pub(super) fn check_http_lock_budget(
        &self,
        principal: &crate::auth::Principal,
    ) -> Result<(), super::OpError> {
        if principal.admin {
            return Ok(());
        }
        self.throttle
            .http_lock(&principal.user_id)
            .map_err(|(per_minute, r)| super::OpError::HttpLockBudget {
                per_minute,
                retry_after_s: r.0,
            })
    }
}

/// The rate-limit key of an address: IPv6 clients by their /64.
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_and_say_when() {
        let b = Buckets::new(2.0, 3.0, 10);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.take(&1, t0).is_ok()));
        let wait = b.take(&1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(&1, t0 + wait).is_ok());
        assert!(b.take(&2, t0).is_ok(), "keys are independent");
    }

    #[test]
    fn full_maps_evict_idle_keys_then_refuse_new_ones() {
        let b = Buckets::new(1.0, 2.0, 3);
        let t0 = Instant::now();
        for k in 0..3 {
            b.take(&k, t0).unwrap();
        }
        assert!(b.take(&99, t0).is_err(), "full of active keys");
        assert_eq!(b.len(), 3);
        // After a refill time every key is idle (full again): evicted for the newcomer.
        assert!(b.take(&99, t0 + Duration::from_secs(2)).is_ok());
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn auth_failures_are_one_record_then_one_count_per_window() {
        let t = Throttle::new(&Config::for_tests(std::env::temp_dir()));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert!(
            t.auth_failure_at(ip, "bad", t0),
            "the first is recorded at once"
        );
        for _ in 0..999 {
            assert!(!t.auth_failure_at(ip, "bad", t0));
        }
        assert!(t.due_failures_at(t0, false).is_empty(), "window still open");
        let due = t.due_failures_at(t0 + AUTH_FAILURE_WINDOW, false);
        assert_eq!(
            due,
            vec![FailureSummary {
                source: Some(ip),
                count: 999,
                last_reason: "bad".into()
            }]
        );
        assert!(
            t.auth_failure_at(ip, "bad", t0 + AUTH_FAILURE_WINDOW),
            "a new window"
        );
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        assert_eq!(rate_key(a), rate_key(b));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(rate_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }
}
