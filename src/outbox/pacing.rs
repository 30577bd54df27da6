//! Pacing and retry arithmetic for the outbox: a token bucket that takes its clock from tokio
//! (so paused-time tests drive it) and a jittered exponential backoff whose bounds are checked
//! when it is built.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A token bucket: at most `per_second` requests in any one-second span on average, with bursts
/// no larger than `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    /// A limiter allowing `per_second` requests per second in bursts of at most `burst`.
    ///
    /// # Panics
    /// Never: zero values are raised to one, since a limiter that allows nothing would hang.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        let burst = f64::from(burst.max(1));
        Self {
            per_second,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                refilled_at: Instant::now(),
            }),
        }
    }

    /// Waits until one request may be made, and takes its token.
    pub async fn acquire(&self) {
        let mut bucket = self.state.lock().await;
        loop {
            let now = Instant::now();
            let elapsed = now
                .saturating_duration_since(bucket.refilled_at)
                .as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
            bucket.refilled_at = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                return;
            }
            let missing = 1.0 - bucket.tokens;
            // Holding the lock while sleeping keeps waiters in arrival order.
            tokio::time::sleep(Duration::from_secs_f64(missing / self.per_second)).await;
        }
    }
}

/// Jittered exponential backoff: `initial × 2^(attempt-1)`, capped at `max`, times a random
/// factor in [0.75, 1.25).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

/// A backoff that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid backoff: initial {initial:?} must be above zero and at most max {max:?}")]
pub struct InvalidBackoff {
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Builds a backoff.
    ///
    /// # Errors
    /// When `initial` is zero or above `max`.
    pub fn new(initial: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if initial.is_zero() || initial > max {
            return Err(InvalidBackoff { initial, max });
        }
        Ok(Self { initial, max })
    }

    /// The delay before retry number `attempt` (1-based), with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// The delay for `attempt` with a given jitter sample in [0, 1).
    pub fn delay_with(&self, attempt: u32, sample: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let base = self.initial.saturating_mul(1u32 << exponent).min(self.max);
        base.mul_f64(0.75 + 0.5 * sample.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let backoff =
            Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).expect("valid");
        assert_eq!(backoff.delay_with(1, 0.5), Duration::from_millis(500));
        assert_eq!(backoff.delay_with(2, 0.5), Duration::from_millis(1000));
        assert_eq!(backoff.delay_with(3, 0.5), Duration::from_millis(2000));
        assert_eq!(backoff.delay_with(40, 0.5), Duration::from_secs(30));
        assert_eq!(backoff.delay_with(1, 0.0), Duration::from_millis(375));
        assert!(backoff.delay_with(1, 0.999_999) < Duration::from_millis(625));
    }

    #[test]
    fn backoff_refuses_nonsense_bounds() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spreads_requests_beyond_the_burst() {
        let limiter = RateLimiter::new(10, 5);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        assert_eq!(Instant::now(), start, "the burst goes out at once");
        for _ in 0..10 {
            limiter.acquire().await;
        }
        let waited = Instant::now() - start;
        // Ten more requests at 10/s need one more second (paused clock, so exact arithmetic).
        assert!(waited >= Duration::from_millis(999), "waited {waited:?}");
        assert!(waited <= Duration::from_millis(1001), "waited {waited:?}");
    }
}
