//! Pacing and retry arithmetic: a sliding-window rate limiter with two priorities, on tokio's
//! clock (so paused-time tests drive it), and a jittered exponential backoff whose bounds are
//! checked when it is built.

use std::time::Duration;

use std::collections::VecDeque;

use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

/// Which requests go first when the allowance is short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Acks and replies: they finish work already under way.
    High,
    /// Everything else: polls, history reads, proactive sends.
    Normal,
}

/// A sliding-window limiter: at most `limit` grants in any window of `window` length.
///
/// The platform counts requests in fixed one-second buckets on its own clock. A sliding window
/// of one second plus a small margin keeps every such bucket at or under the limit whatever the
/// clocks' phase, as long as the requests' travel times differ by less than the margin, while
/// still allowing a full burst after a quiet spell. High-priority callers are served before
/// normal ones whenever both wait.
#[derive(Debug)]
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    state: Mutex<Window>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Window {
    grants: VecDeque<Instant>,
    high_waiting: usize,
}

impl RateLimiter {
    /// A limiter allowing `limit` requests in any `window`. A zero limit is raised to one,
    /// since a limiter that allows nothing would hang its callers.
    pub fn new(limit: u32, window: Duration) -> Self {
        let limit = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
        Self { limit, window, state: Mutex::new(Window::default()), changed: Notify::new() }
    }

    /// The platform's allowance (`per_second` per second) with `margin` of slack per window.
    pub fn per_second(per_second: u32, margin: Duration) -> Self {
        Self::new(per_second, Duration::from_secs(1) + margin)
    }

    /// Waits until one request may be made, and takes its grant.
    pub async fn acquire(&self, priority: Priority) {
        if priority == Priority::High {
            self.state.lock().await.high_waiting += 1;
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a release in between is not missed.
            changed.as_mut().enable();
            let wake_at = {
                let mut state = self.state.lock().await;
                let now = Instant::now();
                while state.grants.front().is_some_and(|t| now.duration_since(*t) >= self.window) {
                    state.grants.pop_front();
                }
                let yielding = priority == Priority::Normal && state.high_waiting > 0;
                if state.grants.len() < self.limit && !yielding {
                    state.grants.push_back(now);
                    if priority == Priority::High {
                        state.high_waiting -= 1;
                        self.changed.notify_waiters();
                    }
                    return;
                }
                state.grants.front().map(|oldest| *oldest + self.window)
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = &mut changed => {}
                    }
                }
                None => changed.await,
            }
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
    async fn no_window_ever_holds_more_than_the_limit() {
        let limiter = RateLimiter::per_second(60, Duration::from_millis(40));
        let start = Instant::now();
        let mut grants = Vec::new();
        for _ in 0..300 {
            limiter.acquire(Priority::Normal).await;
            grants.push(Instant::now() - start);
        }
        // The first 60 go at once (a full bucket), then the pace is one window per 60.
        assert_eq!(grants[59], Duration::ZERO);
        assert_eq!(grants[60], Duration::from_millis(1040));
        for (i, at) in grants.iter().enumerate() {
            let in_window =
                grants[i..].iter().take_while(|t| **t < *at + Duration::from_millis(1040));
            assert!(in_window.count() <= 60, "more than 60 grants in the window from {at:?}");
        }
        let rate = 300.0 / grants[299].as_secs_f64();
        assert!(rate > 57.0, "sustained rate {rate}");
    }

    #[tokio::test(start_paused = true)]
    async fn high_priority_waiters_go_before_normal_ones() {
        let limiter = std::sync::Arc::new(RateLimiter::new(1, Duration::from_secs(1)));
        limiter.acquire(Priority::Normal).await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [("normal", Priority::Normal), ("high", Priority::High)] {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                limiter.acquire(priority).await;
                order.lock().expect("lock").push(name);
            }));
            tokio::task::yield_now().await;
        }
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(*order.lock().expect("lock"), ["high", "normal"]);
    }
}
