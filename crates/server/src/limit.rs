//! Failed-login throttling: one token bucket per key (a client address, or a login of a
//! project space). A failure takes a token; a request whose bucket is empty is refused with
//! 429 and `Retry-After` before its credentials are even checked, so guessing costs time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many failures a key may have in a burst, and how fast it earns them back.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimit {
    /// Failures allowed in a row before refusals start.
    pub burst: u32,
    /// One failure is forgiven every `refill`.
    pub refill: Duration,
}

impl Default for LoginLimit {
    fn default() -> Self {
        LoginLimit {
            burst: 10,
            refill: Duration::from_secs(6),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets are dropped once full again when the table grows past this, so a spray of
/// addresses or logins cannot grow it without bound.
const PRUNE_ABOVE: usize = 10_000;

/// The buckets of one kind of key.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: LoginLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limit: LoginLimit) -> Self {
        Limiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> Bucket {
        let earned = now.duration_since(b.at).as_secs_f64() / self.limit.refill.as_secs_f64();
        Bucket {
            tokens: (b.tokens + earned).min(f64::from(self.limit.burst)),
            at: now,
        }
    }

    /// `Err(wait)` when `key` has no failure left: how long until it has one.
    pub(crate) fn check(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(b) = buckets.get(key) else {
            return Ok(());
        };
        let b = self.refilled(*b, now);
        if b.tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.limit.refill.mul_f64(1.0 - b.tokens))
        }
    }

    /// Takes one token from `key`'s bucket.
    pub(crate) fn fail(&self, key: &str) {
        let now = Instant::now();
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() > PRUNE_ABOVE {
            let full = f64::from(self.limit.burst);
            buckets.retain(|_, b| self.refilled(*b, now).tokens < full);
        }
        let full = Bucket {
            tokens: f64::from(self.limit.burst),
            at: now,
        };
        let b = buckets.get(key).map_or(full, |b| self.refilled(*b, now));
        buckets.insert(
            key.to_owned(),
            Bucket {
                tokens: (b.tokens - 1.0).max(0.0),
                at: now,
            },
        );
    }
}
