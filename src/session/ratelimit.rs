//! A token bucket refilled at `rate` per second up to `burst`: the per-session message budget, and
//! (keyed by IP and user) the HTTP budgets in [`crate::node::throttle`].

use std::time::{Duration, Instant};

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket::full(rate as f64, burst as f64, Instant::now())
    }

    /// A bucket holding `burst` tokens at `now`, refilled at `rate` per second.
    pub fn full(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token; false when the budget is spent.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_or_wait(now).is_ok()
    }

    /// Takes one token, or says how long until the next one is there.
    pub fn take_or_wait(&mut self, now: Instant) -> Result<(), Duration> {
        self.tokens = self.tokens_at(now);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Whether the bucket has refilled completely by `now`: then it is the same as a new one,
    /// and a map of buckets may forget it.
    pub fn is_full_at(&self, now: Instant) -> bool {
        self.tokens_at(now) >= self.burst
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        assert!((0..3).all(|_| b.take(t0 + Duration::from_secs(10))));
        assert!(!b.take(t0 + Duration::from_secs(10)));
    }
}
