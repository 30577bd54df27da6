//! Shared health state: the [`Heartbeat`] that the daemon's loops beat, and the [`Readiness`]
//! conditions that must all hold before the daemon counts as ready.
//!
//! Both are plain in-memory state behind a std mutex (no `.await` ever happens under it). They
//! only record and answer; the watchdog pinger and the HTTP endpoints act on the answers. Time
//! is tokio's, so tests can pause it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// One loop that has not beaten within its stall limit.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Stall {
    /// The loop's name, as passed to [`Heartbeat::beat`].
    #[serde(rename = "loop")]
    pub loop_name: String,
    /// How long since its last beat (or its registration).
    #[serde(serialize_with = "as_secs_f64", rename = "silent_for_secs")]
    pub silent_for: Duration,
    /// The limit it exceeded.
    #[serde(serialize_with = "as_secs_f64", rename = "stall_limit_secs")]
    pub stall_limit: Duration,
}

fn as_secs_f64<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

/// Last-seen times of the daemon's long-running loops. Cheap to clone; clones share state.
///
/// Each loop calls [`Heartbeat::beat`] with its name every turn, and also on a timer while it
/// idles (waiting for messages is not a stall), at least a few times per stall limit. A loop
/// counts as stalled once it has been silent for longer than its limit. With no loop
/// registered the daemon counts as healthy.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    inner: Arc<Mutex<HeartbeatState>>,
}

#[derive(Debug)]
struct HeartbeatState {
    /// Used for loops that first appear through [`Heartbeat::beat`].
    default_limit: Duration,
    /// Name → (last beat, stall limit). A `BTreeMap` so reports list loops in a stable order.
    loops: BTreeMap<String, (Instant, Duration)>,
}

// === impl Heartbeat ===

impl Heartbeat {
    /// A heartbeat where loops stall after `default_stall_limit` of silence unless registered
    /// with their own limit.
    pub fn new(default_stall_limit: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(HeartbeatState {
                default_limit: default_stall_limit,
                loops: BTreeMap::new(),
            })),
        }
    }

    /// Starts watching `name` with the default limit, counting from now. Register loops before
    /// they start, so one that never beats is still caught.
    pub fn register(&self, name: &str) {
        let limit = self.lock().default_limit;
        self.register_with_limit(name, limit);
    }

    /// Starts watching `name` with its own stall limit, counting from now; for loops whose turns
    /// legitimately take longer, such as one waiting out a long retry.
    pub fn register_with_limit(&self, name: &str, stall_limit: Duration) {
        self.lock().loops.insert(name.to_owned(), (Instant::now(), stall_limit));
    }

    /// Stops watching `name`, for a loop that ends on purpose (for example during shutdown).
    pub fn unregister(&self, name: &str) {
        self.lock().loops.remove(name);
    }

    /// Records that `name` is alive now; registers it with the default limit if unknown.
    pub fn beat(&self, name: &str) {
        self.beat_at(name, Instant::now());
    }

    /// Records a beat of `name` at `at`. [`Heartbeat::beat`] is this with the current time;
    /// tests use it to date a beat in the past without waiting.
    pub fn beat_at(&self, name: &str, at: Instant) {
        let mut state = self.lock();
        let default_limit = state.default_limit;
        match state.loops.get_mut(name) {
            // Allocate only for a loop's first beat.
            Some((last, _)) => *last = at,
            None => {
                state.loops.insert(name.to_owned(), (at, default_limit));
            }
        }
    }

    /// The loops that are stalled now, in name order; empty when healthy.
    pub fn stalled(&self) -> Vec<Stall> {
        let now = Instant::now();
        self.lock()
            .loops
            .iter()
            .filter_map(|(name, &(last, limit))| {
                let silent_for = now.saturating_duration_since(last);
                (silent_for > limit).then(|| Stall {
                    loop_name: name.clone(),
                    silent_for,
                    stall_limit: limit,
                })
            })
            .collect()
    }

    /// Whether no loop is stalled.
    pub fn is_healthy(&self) -> bool {
        self.stalled().is_empty()
    }

    /// The names of the loops being watched, in name order.
    pub fn loops(&self) -> Vec<String> {
        self.lock().loops.keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, HeartbeatState> {
        // The state stays consistent even if a holder panicked: every update is one insert.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A readiness condition that does not hold yet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pending {
    /// The condition's name, e.g. `inbox`.
    pub condition: String,
    /// Why it does not hold, e.g. `connecting`.
    pub reason: String,
}

/// Named conditions that must all hold for the daemon to be ready, such as `plugins` (loaded)
/// and `inbox` (connected). Cheap to clone; clones share state.
///
/// A condition can go back to not ready (the inbox lost its connection, shutdown began), so
/// readiness is a current state, not a one-way latch.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// Condition → `None` when it holds, `Some(reason)` when it does not. A watch channel so
    /// [`Readiness::wait_ready`] can sleep until a change instead of polling.
    state: Arc<watch::Sender<BTreeMap<String, Option<String>>>>,
}

/// The reason a condition has until it is first marked.
const NOT_STARTED: &str = "starting";

// === impl Readiness ===

impl Readiness {
    /// Readiness that waits for each of `conditions`, all pending as "starting".
    pub fn new<'a>(conditions: impl IntoIterator<Item = &'a str>) -> Self {
        let state = conditions
            .into_iter()
            .map(|name| (name.to_owned(), Some(NOT_STARTED.to_owned())))
            .collect();
        Self { state: Arc::new(watch::Sender::new(state)) }
    }

    /// Marks `condition` as holding; adds it if unknown.
    pub fn mark_ready(&self, condition: &str) {
        self.set(condition, None);
    }

    /// Marks `condition` as not holding, for `reason`; adds it if unknown.
    pub fn mark_not_ready(&self, condition: &str, reason: impl Into<String>) {
        self.set(condition, Some(reason.into()));
    }

    /// The conditions that do not hold, in name order; empty when ready.
    pub fn pending(&self) -> Vec<Pending> {
        pending_in(&self.state.borrow())
    }

    /// Whether every condition holds.
    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }

    /// Waits until every condition holds; returns at once if they already do. Cancel-safe.
    pub async fn wait_ready(&self) {
        let mut changes = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait; an error
        // could only mean it did, and then there is nothing left to wait for.
        let _ = changes.wait_for(|state| state.values().all(Option::is_none)).await;
    }

    fn set(&self, condition: &str, reason: Option<String>) {
        self.state.send_if_modified(|state| {
            let slot = state.entry(condition.to_owned()).or_insert(None);
            let changed = *slot != reason;
            *slot = reason;
            changed
        });
    }
}

fn pending_in(state: &BTreeMap<String, Option<String>>) -> Vec<Pending> {
    state
        .iter()
        .filter_map(|(name, reason)| {
            reason
                .as_ref()
                .map(|reason| Pending { condition: name.clone(), reason: reason.clone() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_registered_loop_that_never_beats_stalls_after_its_limit() {
        let heartbeat = Heartbeat::new(LIMIT);
        heartbeat.register("inbox");
        assert!(heartbeat.is_healthy());

        tokio::time::advance(LIMIT + Duration::from_secs(1)).await;
        let stalled = heartbeat.stalled();
        assert_eq!(stalled.len(), 1);
        assert_eq!(stalled[0].loop_name, "inbox");
        assert_eq!(stalled[0].silent_for, LIMIT + Duration::from_secs(1));
        assert_eq!(stalled[0].stall_limit, LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_of_exactly_the_limit_is_not_a_stall() {
        let heartbeat = Heartbeat::new(LIMIT);
        heartbeat.beat("outbox");
        tokio::time::advance(LIMIT).await;
        assert!(heartbeat.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn each_loop_is_judged_by_its_own_limit() {
        let heartbeat = Heartbeat::new(LIMIT);
        heartbeat.register("inbox");
        heartbeat.register_with_limit("outbox", Duration::from_secs(300));

        tokio::time::advance(Duration::from_secs(60)).await;
        let names: Vec<_> = heartbeat.stalled().into_iter().map(|s| s.loop_name).collect();
        assert_eq!(names, ["inbox"]);

        heartbeat.beat("inbox");
        assert!(heartbeat.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unregistered_loop_is_no_longer_watched() {
        let heartbeat = Heartbeat::new(LIMIT);
        heartbeat.beat("inbox");
        heartbeat.beat("outbox");
        heartbeat.unregister("inbox");
        tokio::time::advance(LIMIT * 2).await;
        assert_eq!(heartbeat.loops(), ["outbox"]);
        assert_eq!(heartbeat.stalled().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_beat_dated_in_the_past_counts_from_that_time() {
        let heartbeat = Heartbeat::new(LIMIT);
        let long_ago = Instant::now();
        tokio::time::advance(LIMIT * 3).await;
        heartbeat.beat_at("inbox", long_ago);
        assert_eq!(heartbeat.stalled()[0].silent_for, LIMIT * 3);
    }

    #[test]
    fn readiness_needs_every_condition_and_can_be_lost_again() {
        let readiness = Readiness::new(["plugins", "inbox"]);
        assert_eq!(readiness.pending().len(), 2);
        assert_eq!(readiness.pending()[0].reason, "starting");

        readiness.mark_ready("plugins");
        readiness.mark_not_ready("inbox", "connecting");
        let pending = readiness.pending();
        assert_eq!(pending, [Pending { condition: "inbox".into(), reason: "connecting".into() }]);

        readiness.mark_ready("inbox");
        assert!(readiness.is_ready());

        readiness.mark_not_ready("shutdown", "stopping");
        assert!(!readiness.is_ready());
    }

    #[tokio::test]
    async fn wait_ready_returns_once_the_last_condition_holds() {
        let readiness = Readiness::new(["plugins", "inbox"]);
        let waiter = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.wait_ready().await }
        });
        readiness.mark_ready("plugins");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());

        readiness.mark_ready("inbox");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("wait_ready returns once ready")
            .expect("the waiter does not panic");
    }

    #[tokio::test]
    async fn wait_ready_returns_at_once_when_already_ready() {
        let readiness = Readiness::new([]);
        readiness.wait_ready().await;
    }
}
