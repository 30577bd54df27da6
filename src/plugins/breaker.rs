//! The failure breaker of one plugin: after too many failed calls within a window the plugin is
//! suspended for a cooldown, and calls during the cooldown return
//! [`CallError::Suspended`](super::CallError::Suspended) without running the guest.
//!
//! A plugin that traps on every message costs a fresh instance and a warn line per message;
//! suspending it keeps the log readable and the CPU for plugins that work. The breaker takes
//! the current time as an argument, so its rules are tested without a clock, and the host
//! passes tokio's clock, so paused-time tests drive it.
//!
//! It does not persist anything: a restart clears every suspension.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

/// Longest window and cooldown honoured; longer settings are cut to it, which keeps the
/// deadline arithmetic far from overflow.
pub const MAX_BREAKER_SPAN: Duration = Duration::from_secs(30 * 24 * 3600);

/// When a plugin is suspended and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures within `window` that suspend the plugin. Default 5.
    pub max_failures: NonZeroU32,
    /// How far back failures count. Default 60 s, at most [`MAX_BREAKER_SPAN`].
    pub window: Duration,
    /// How long a suspension lasts. Default 5 min, at most [`MAX_BREAKER_SPAN`].
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> BreakerSettings {
        BreakerSettings {
            max_failures: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
        }
    }
}

/// A change of state the caller should log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// The plugin was just suspended after this many failures in the window.
    Suspended { failures: u32 },
    /// A cooldown ended; the plugin runs again.
    Resumed,
}

/// Breaker state of one plugin.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    /// Times of the failures still inside the window, oldest first; never longer than
    /// `max_failures`.
    recent: VecDeque<Instant>,
    suspended_until: Option<Instant>,
    total_failures: u64,
}

impl Breaker {
    pub(crate) fn new(mut settings: BreakerSettings) -> Breaker {
        settings.window = settings.window.min(MAX_BREAKER_SPAN);
        settings.cooldown = settings.cooldown.min(MAX_BREAKER_SPAN);
        Breaker { settings, recent: VecDeque::new(), suspended_until: None, total_failures: 0 }
    }

    /// Whether a call may run at `now`: `Err(remaining)` while suspended. Ending a cooldown
    /// clears the failure history, so a resumed plugin gets the full allowance again.
    pub(crate) fn admit(&mut self, now: Instant) -> Result<Option<Transition>, Duration> {
        match self.suspended_until {
            Some(until) if now < until => Err(until - now),
            Some(_) => {
                self.suspended_until = None;
                self.recent.clear();
                Ok(Some(Transition::Resumed))
            }
            None => Ok(None),
        }
    }

    /// Records a failed call at `now`; returns `Suspended` when this failure trips the breaker.
    pub(crate) fn record_failure(&mut self, now: Instant) -> Option<Transition> {
        self.total_failures = self.total_failures.saturating_add(1);
        if self.suspended_until.is_some() {
            // A call admitted before the suspension finished late; it changes nothing.
            return None;
        }
        self.forget_old(now);
        self.recent.push_back(now);
        let failures = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if failures < self.settings.max_failures.get() {
            return None;
        }
        self.suspended_until = Some(now + self.settings.cooldown);
        self.recent.clear();
        Some(Transition::Suspended { failures })
    }

    /// Failures inside the window at `now`, and the remaining cooldown if suspended.
    pub(crate) fn snapshot(&mut self, now: Instant) -> (u32, Option<Duration>, u64) {
        self.forget_old(now);
        let remaining = self.suspended_until.filter(|until| now < *until).map(|until| until - now);
        let recent = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        (recent, remaining, self.total_failures)
    }

    pub(crate) fn cooldown(&self) -> Duration {
        self.settings.cooldown
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(first) = self.recent.front() {
            if now.duration_since(*first) < self.settings.window {
                break;
            }
            self.recent.pop_front();
        }
    }
}
