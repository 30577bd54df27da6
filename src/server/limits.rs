//! Send-rate limiting: fixed one-second buckets per sender, in memory. Only
//! `POST /v1/messages` consults it. The cold-thread and backlog caps live with the send
//! transaction in `messages`, because they are answered from stored rows.

use std::collections::HashMap;
use std::sync::Mutex;

/// Fixed-window counter per sender.
#[derive(Debug, Default)]
pub struct SendRateLimiter {
    /// sender id → (bucket second, sends counted in it). A std mutex: never held across
    /// `.await`, and each critical section is a hash lookup.
    buckets: Mutex<HashMap<String, (i64, u32)>>,
}

impl SendRateLimiter {
    /// Counts one send of `sender_id` at `now_ms`. `Err(secs)` when the bucket is full, with
    /// the whole seconds until the next bucket opens (at least 1).
    pub fn check(&self, sender_id: &str, now_ms: i64, per_second: u32) -> Result<(), u64> {
        let second = now_ms.div_euclid(1000);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let entry = buckets.entry(sender_id.to_owned()).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        if entry.1 >= per_second {
            let until_next_ms = (second + 1) * 1000 - now_ms;
            let secs = u64::try_from((until_next_ms + 999) / 1000).unwrap_or(1).max(1);
            return Err(secs);
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_a_bucket_then_refuses_until_the_next_second() {
        let limiter = SendRateLimiter::default();
        assert!(limiter.check("a", 5_000, 2).is_ok());
        assert!(limiter.check("a", 5_100, 2).is_ok());
        assert_eq!(limiter.check("a", 5_900, 2), Err(1));
        assert!(limiter.check("b", 5_900, 2).is_ok());
        assert!(limiter.check("a", 6_000, 2).is_ok());
    }
}
