//! The durable outbound queue and the one place that sends messages.
//!
//! Every send is first written to the [`Store`] with a client_msg_id derived from its cause,
//! then sent by [`Outbox::run`]: oldest first within a lane (one recipient or group), lanes in
//! parallel, every request paced by the daemon's one [`RateLimiter`]. Because the key is
//! deterministic, a resend after a crash is answered by the server's idempotent replay rather
//! than delivered twice.
//!
//! The platform's limits are kept before the server has to enforce them:
//! - pacing keeps every one-second window within the allowance (see [`pacing`]);
//! - the thread ledger in the store holds a second message into a thread the agent opened until
//!   the peer replies, and holds new threads once 100 (configurable) opened in the last 24 h
//!   still await a reply. Held sends keep their place and are released by the peer's reply or
//!   when a slot frees; the reason is logged and shown by `agentchatd status`.
//!
//! Should the server still refuse, the answer is recorded, never retried blindly:
//! `AWAITING_REPLY` and a cold-cap 429 go into the ledger and hold the send; a 429 with
//! Retry-After waits exactly that long (no clamp) without using an attempt;
//! `RECIPIENT_BACKLOGGED` backs off per recipient; server and network failures back off
//! exponentially, trip a circuit breaker after repeated failures (limit answers never count as
//! failures) and give up after [`MAX_ATTEMPTS`]; refusals that would repeat (400, 403, 404, 410,
//! 413) become dead letters with their reason; an invalid key stops the daemon.

mod pacing;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use pacing::{Backoff, InvalidBackoff, Priority, RateLimiter};

use crate::client::{ApiError, Client, Disposition, ErrorCode, SendRequest};
use crate::ops::health::{Heartbeat, Readiness};
use crate::ops::http::OpsState;
use crate::plugins::{
    FailureClass, Origin, OutboundMessage, PluginSet, SendFailure, SendVerdict, Sent, Trigger,
};
use crate::service::OUTBOX_LOOP;
use crate::store::{NewSend, PeerState, PendingSend, Store, StoreError};

/// Default attempts of a send that keeps failing for transient reasons before it is
/// dead-lettered.
pub const MAX_ATTEMPTS: u32 = 12;
/// Sends in flight at once (each in its own lane).
const MAX_IN_FLIGHT: usize = 16;
/// Length of the platform's cold-outreach window.
pub const COLD_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How far in the future "held until released" is scheduled.
const HELD_FOREVER_MS: i64 = i64::MAX / 4;
/// Longest pause of the queue loop, so sends queued by another process (the CLI) are seen.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Hold reasons, as stored and shown to the operator.
pub mod hold {
    /// A second message into a thread the agent opened; released by the peer's reply.
    pub const AWAITING_REPLY: &str = "awaiting_reply";
    /// A new thread while the cold-outreach allowance is used up; released when a slot frees.
    pub const COLD_CAP: &str = "cold_cap";
    /// The recipient has too many undelivered messages; retried after a per-recipient backoff.
    pub const BACKLOG: &str = "backlog";
}

/// Why the outbox stopped.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The state store failed; sends are kept and retried after a restart.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server refused the key; the operator must fix it.
    #[error("the server refused the API key while sending: {0}")]
    Fatal(ApiError),
}

/// Tunables of the outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxSettings {
    /// New threads the agent may have awaiting a reply within [`COLD_WINDOW`].
    pub cold_threads_per_day: u32,
    /// Consecutive server or network failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open the first time (doubling on repeated trips, up to 5 min).
    pub breaker_cooldown: Duration,
    /// Attempts of a send failing for transient reasons before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay after a transient failure (doubling, jittered, up to 60 s).
    pub retry_initial: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            cold_threads_per_day: 100,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            max_attempts: MAX_ATTEMPTS,
            retry_initial: Duration::from_millis(500),
        }
    }
}

/// Counters of what the outbox did since start, for status and metrics.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Sends accepted by the server (201).
    pub sent: AtomicU64,
    /// Sends answered as replays of an earlier attempt (200).
    pub replayed: AtomicU64,
    /// 429 answers of any kind.
    pub rate_limited: AtomicU64,
    /// `X-Backlog-Warning` headers seen.
    pub backlog_warnings: AtomicU64,
    /// Sends given up on.
    pub dead_lettered: AtomicU64,
    /// Times a send was held by the ledger or a limit answer.
    pub held: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_trips: AtomicU64,
}

impl OutboxStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The idempotency key of reply number `index` that `plugin` gave to message `message_id`.
pub fn reply_key(message_id: &str, plugin: &str, index: usize) -> String {
    derived_key("acd", &[message_id, plugin, &index.to_string()])
}

/// The idempotency key of an operator's send identified by `operator_id`.
pub fn operator_key(operator_id: &str) -> String {
    derived_key("aco", &["operator", operator_id])
}

/// The idempotency key of a proactive send by `plugin` while handling the event `cause`;
/// `part` tells the sends of one event apart (the plugin's own key, or the send's index).
pub fn plugin_key(plugin: &str, cause: &str, part: &str) -> String {
    derived_key("acp", &[plugin, cause, part])
}

/// The queue origin of a proactive send: `plugin:<trigger>:<hops>:<plugin>:<cause>`.
pub fn plugin_origin(plugin: &str, trigger: Trigger, hops: u8, cause: &str) -> String {
    format!("plugin:{}:{hops}:{plugin}:{cause}", trigger.as_str())
}

/// What the hooks are told about where a queued send came from, read off its queue origin.
pub fn parse_origin(origin: &str) -> Origin {
    let mut parts = origin.splitn(5, ':');
    match parts.next() {
        Some("reply") => {
            // reply:<message>:<plugin>:<index>
            let plugin = parts.nth(1).map(str::to_owned);
            Origin { plugin_id: plugin, trigger: Trigger::Inbound, hops: 0 }
        }
        Some("plugin") => {
            let trigger = parts.next().and_then(Trigger::parse).unwrap_or(Trigger::PluginSend);
            let hops = parts.next().and_then(|h| h.parse().ok()).unwrap_or(u8::MAX);
            let plugin = parts.next().map(str::to_owned);
            Origin { plugin_id: plugin, trigger, hops }
        }
        _ => Origin { plugin_id: None, trigger: Trigger::Operator, hops: 0 },
    }
}

/// The platform's cap on JSON(content) + JSON(metadata) of one message.
pub const MAX_CONTENT_BYTES: usize = 32_768;

/// Why `content` is sure to be refused as too large, if it is. The platform measures the
/// JSON encoding, so escaping can push a text that fits in bytes over the cap.
pub fn content_too_large(content: &crate::client::Content) -> Option<String> {
    let wire_bytes = serde_json::to_string(content).map_or(usize::MAX, |json| json.len()) + 2;
    (wire_bytes > MAX_CONTENT_BYTES).then(|| {
        format!(
            "content is {wire_bytes} bytes as JSON; the platform accepts at most \
             {MAX_CONTENT_BYTES}"
        )
    })
}

fn derived_key(prefix: &str, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hex::encode(hash.finalize());
    format!("{prefix}-{}", &digest[..40])
}

/// Builds the queue entry for a send.
pub fn new_send(client_msg_id: String, request: &SendRequest, origin: String) -> NewSend {
    let recipient = request.to.as_ref().map(|to| to.trim_start_matches('@').to_lowercase());
    let lane = match (&recipient, &request.conversation_id) {
        (_, Some(conversation)) => conversation.clone(),
        (Some(handle), None) => format!("to:{handle}"),
        (None, None) => String::new(),
    };
    let request_json = serde_json::to_string(request).unwrap_or_else(|_| "{}".to_owned());
    NewSend { client_msg_id, lane, request_json, origin, recipient }
}

/// Queues a send by the operator (CLI) for the running daemon to deliver. `operator_id`
/// identifies the request: queuing the same id twice queues one message. Returns the queue's
/// client_msg_id and whether it was newly queued.
///
/// # Errors
/// On a store failure.
pub async fn queue_operator_send(
    store: &Store,
    to: &str,
    text: &str,
    operator_id: &str,
) -> Result<(String, bool), StoreError> {
    let key = operator_key(operator_id);
    let request = SendRequest {
        to: Some(to.trim_start_matches('@').to_lowercase()),
        conversation_id: None,
        client_msg_id: key.clone(),
        kind: "text".to_owned(),
        content: crate::client::Content { text: Some(text.to_owned()), ..Default::default() },
    };
    let send = new_send(key.clone(), &request, format!("operator:{operator_id}"));
    let fresh = store.enqueue(send, now_ms()).await?;
    Ok((key, fresh))
}

/// What one attempt came to.
enum Outcome {
    Sent {
        message_id: String,
        opened: Option<(String, String)>,
    },
    /// A `before-send` hook cancelled the send: `by` plugin, for `reason`.
    Cancelled {
        by: String,
        reason: String,
    },
    Retry {
        after: Duration,
        error: String,
        count_attempt: bool,
    },
    Hold {
        reason: &'static str,
        until_ms: i64,
        detail: String,
        awaiting: Option<(String, i64)>,
    },
    Dead(String),
    Fatal(ApiError),
    Store(StoreError),
}

/// What the outbound hooks are told after an attempt.
enum Told {
    Sent {
        message_id: String,
        at_ms: i64,
    },
    /// Class, detail, whether the daemon retries.
    Failed(FailureClass, String, bool),
}

/// A queued request as the outbound hooks see it.
fn outbound_message(request: &SendRequest) -> OutboundMessage {
    OutboundMessage {
        key: request.client_msg_id.clone(),
        to: request.to.clone(),
        conversation_id: request.conversation_id.clone(),
        text: request.content.text.clone(),
        data_json: request.content.data.as_ref().map(ToString::to_string),
    }
}

/// Whether a send may go now.
enum Gate {
    Go { opens_thread: bool },
    Hold { reason: &'static str, until_ms: i64, detail: String },
}

/// The circuit breaker: consecutive transient failures stop all sends for a cooldown.
#[derive(Debug, Default)]
struct Breaker {
    consecutive: u32,
    trips: u32,
    open_until: Option<Instant>,
}

/// The sender task and its shared parts.
pub struct Outbox {
    store: Store,
    client: Client,
    limiter: Arc<RateLimiter>,
    wake: Arc<Notify>,
    backoff: Backoff,
    settings: OutboxSettings,
    stats: Arc<OutboxStats>,
    breaker: Mutex<Breaker>,
    /// Threads being opened right now, counted against the cold allowance until the ledger
    /// records them.
    opening: AtomicUsize,
    /// Serialises the cold-allowance check with the claim of a slot.
    gate_lock: tokio::sync::Mutex<()>,
    /// Consecutive backlog refusals per recipient.
    backlogged: Mutex<HashMap<String, u32>>,
    /// Heartbeat and metrics of the running daemon.
    telemetry: OpsState,
    /// Plugins whose outbound hooks see every send; none in tests that need no plugins.
    plugins: Option<PluginSet>,
}

impl Outbox {
    /// Creates the outbox. `wake` is notified by whoever queues a send.
    pub fn new(
        store: Store,
        client: Client,
        limiter: Arc<RateLimiter>,
        wake: Arc<Notify>,
        settings: OutboxSettings,
    ) -> Self {
        let retry_initial =
            settings.retry_initial.clamp(Duration::from_millis(1), Duration::from_secs(60));
        let backoff =
            Backoff::new(retry_initial, Duration::from_secs(60)).expect("bounds are clamped valid");
        Self {
            store,
            client,
            limiter,
            wake,
            backoff,
            settings,
            stats: Arc::default(),
            breaker: Mutex::default(),
            opening: AtomicUsize::new(0),
            gate_lock: tokio::sync::Mutex::new(()),
            backlogged: Mutex::default(),
            telemetry: OpsState {
                metrics: Arc::default(),
                heartbeat: Heartbeat::new(Duration::from_secs(60)),
                readiness: Readiness::new([]),
            },
            plugins: None,
        }
    }

    /// Runs every send through the outbound hooks of `plugins`: `before-send` once per send
    /// before its first attempt, `after-send` and `send-failed` after each outcome.
    #[must_use]
    pub fn with_plugins(mut self, plugins: PluginSet) -> Self {
        self.plugins = Some(plugins);
        self
    }

    /// Reports to the daemon's heartbeat and metrics instead of private ones.
    #[must_use]
    pub fn with_telemetry(mut self, telemetry: OpsState) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// The outbox's counters.
    pub fn stats(&self) -> Arc<OutboxStats> {
        Arc::clone(&self.stats)
    }

    /// Sends due messages until `shutdown` fires. Sends already in flight are finished first,
    /// so a stop never leaves a send whose fate is unrecorded.
    ///
    /// # Errors
    /// When the store fails or the server refuses the key.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), OutboxError> {
        let this = Arc::new(self);
        let mut in_flight: JoinSet<(PendingSend, Outcome, bool)> = JoinSet::new();
        let mut busy_lanes: HashSet<String> = HashSet::new();
        let result = loop {
            this.telemetry.heartbeat.beat(OUTBOX_LOOP);
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let wait = match this.start_due(&mut in_flight, &mut busy_lanes).await {
                Ok(wait) => wait,
                Err(err) => break Err(err),
            };
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                () = this.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(err) = this.finish(done, &mut busy_lanes).await {
                        break Err(err);
                    }
                }
            }
        };
        while let Some(done) = in_flight.join_next().await {
            this.finish(done, &mut busy_lanes).await?;
        }
        result
    }

    /// Starts every due send whose lane is free; returns how long the loop may sleep.
    async fn start_due(
        self: &Arc<Self>,
        in_flight: &mut JoinSet<(PendingSend, Outcome, bool)>,
        busy_lanes: &mut HashSet<String>,
    ) -> Result<Duration, OutboxError> {
        if let Some(until) = self.breaker_open_until() {
            return Ok(until.saturating_duration_since(Instant::now()).min(IDLE_RECHECK));
        }
        let room = MAX_IN_FLIGHT.saturating_sub(in_flight.len());
        if room > 0 {
            let limit = u32::try_from(room + busy_lanes.len()).unwrap_or(u32::MAX);
            for send in self.store.due_sends(now_ms(), limit).await? {
                if in_flight.len() >= MAX_IN_FLIGHT || !busy_lanes.insert(send.lane.clone()) {
                    continue;
                }
                let this = Arc::clone(self);
                in_flight.spawn(async move {
                    let mut send = send;
                    let (outcome, opening) = this.attempt(&mut send).await;
                    (send, outcome, opening)
                });
            }
        }
        // Sends that are due but could not start (their lane is busy, or the in-flight limit
        // is reached) start when a running send finishes, which wakes the loop.
        let wait = match self.store.next_due_ms().await? {
            Some(due) if due > now_ms() => {
                Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0))
            }
            _ => IDLE_RECHECK,
        };
        Ok(wait.min(IDLE_RECHECK))
    }

    fn breaker_open_until(&self) -> Option<Instant> {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match breaker.open_until {
            Some(until) if until > Instant::now() => Some(until),
            Some(_) => {
                // Half-open: let sends try again; one more failure reopens it at once because
                // the consecutive count is kept until a success.
                breaker.open_until = None;
                None
            }
            None => None,
        }
    }

    fn breaker_record(&self, failed: bool) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if !failed {
            *breaker = Breaker::default();
            return;
        }
        breaker.consecutive += 1;
        if breaker.consecutive >= self.settings.breaker_threshold && breaker.open_until.is_none() {
            let factor = 1u32 << breaker.trips.min(4);
            let cooldown = (self.settings.breaker_cooldown * factor).min(Duration::from_secs(300));
            breaker.open_until = Some(Instant::now() + cooldown);
            breaker.trips += 1;
            OutboxStats::bump(&self.stats.breaker_trips);
            tracing::warn!(
                failures = breaker.consecutive,
                cooldown_ms = cooldown.as_millis(),
                "sends paused: the server keeps failing"
            );
        }
    }

    async fn finish(
        &self,
        done: Result<(PendingSend, Outcome, bool), tokio::task::JoinError>,
        busy_lanes: &mut HashSet<String>,
    ) -> Result<(), OutboxError> {
        let (send, outcome, opening) = match done {
            Ok(done) => done,
            // A panicked send task recorded nothing; the row stays pending and is retried. Its
            // lane stays marked busy, which holds that one lane until the daemon restarts.
            Err(err) => {
                tracing::error!(error = %err, "send task failed");
                return Ok(());
            }
        };
        busy_lanes.remove(&send.lane);
        if !opening {
            return self.record(send, outcome).await;
        }
        // The thread enters the ledger and leaves `opening` in one step under the gate's lock,
        // so no check counts it twice (or not at all) in between.
        let _guard = self.gate_lock.lock().await;
        let result = self.record(send, outcome).await;
        self.opening.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn record(&self, send: PendingSend, outcome: Outcome) -> Result<(), OutboxError> {
        let now = now_ms();
        let client_msg_id = &send.client_msg_id;
        match outcome {
            Outcome::Sent { message_id, opened } => {
                tracing::debug!(%client_msg_id, %message_id, "sent");
                if let Some((handle, conversation)) = opened {
                    tracing::info!(peer = %handle, "opened a thread; one message until answered");
                    self.store.note_thread_opened(&handle, Some(conversation), now).await?;
                }
                self.store.mark_sent(send.id, message_id.clone(), now).await?;
                self.tell_plugins(&send, Told::Sent { message_id, at_ms: now });
            }
            Outcome::Cancelled { by, reason } => {
                tracing::info!(%client_msg_id, plugin = %by, "send cancelled by a plugin");
                let error = format!("cancelled by plugin `{by}`: {reason}");
                self.store.mark_dead(send.id, error.clone(), now).await?;
                self.tell_plugins(&send, Told::Failed(FailureClass::Cancelled, error, false));
            }
            Outcome::Retry { after, error, count_attempt } => {
                let attempts = send.attempts + u32::from(count_attempt);
                let class =
                    if count_attempt { FailureClass::Transient } else { FailureClass::RateLimited };
                if attempts >= self.settings.max_attempts {
                    tracing::error!(%client_msg_id, attempts, %error, "send dead-lettered");
                    OutboxStats::bump(&self.stats.dead_lettered);
                    self.store.mark_dead(send.id, error.clone(), now).await?;
                    self.tell_plugins(&send, Told::Failed(class, error, false));
                } else {
                    let retry_in_ms = after.as_millis();
                    tracing::warn!(%client_msg_id, retry_in_ms, %error, "send will be retried");
                    let next = now.saturating_add(i64::try_from(retry_in_ms).unwrap_or(i64::MAX));
                    self.store.mark_retry(send.id, next, error.clone(), count_attempt, now).await?;
                    self.tell_plugins(&send, Told::Failed(class, error, true));
                }
            }
            Outcome::Hold { reason, until_ms, detail, awaiting } => {
                OutboxStats::bump(&self.stats.held);
                tracing::info!(%client_msg_id, hold = reason, %detail, "send held");
                if let Some((handle, opened_ms)) = awaiting {
                    self.store.note_thread_opened(&handle, None, opened_ms).await?;
                }
                self.store.hold_send(send.id, reason, until_ms, detail, now).await?;
            }
            Outcome::Dead(error) => {
                tracing::error!(%client_msg_id, %error, "send refused; dead-lettered");
                OutboxStats::bump(&self.stats.dead_lettered);
                self.store.mark_dead(send.id, error.clone(), now).await?;
                self.tell_plugins(&send, Told::Failed(FailureClass::Rejected, error, false));
            }
            Outcome::Fatal(err) => return Err(OutboxError::Fatal(err)),
            Outcome::Store(err) => return Err(err.into()),
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Tells the plugins' outbound hooks how a send went, on a task of its own: the hooks
    /// only observe, so the queue does not wait for them. A crash before the task runs loses
    /// the notice (at most once), never the send's recorded fate.
    fn tell_plugins(&self, send: &PendingSend, told: Told) {
        let Some(plugins) = &self.plugins else {
            return;
        };
        let host = plugins.current();
        if !host.guards_sends() {
            return;
        }
        let Ok(request) = serde_json::from_str::<SendRequest>(&send.request_json) else {
            return;
        };
        let message = outbound_message(&request);
        let origin = parse_origin(&send.origin);
        let attempt = send.attempts + 1;
        tokio::spawn(async move {
            match told {
                Told::Sent { message_id, at_ms } => {
                    let sent_at_ms = u64::try_from(at_ms).unwrap_or(0);
                    host.after_send(&Sent { message, message_id, sent_at_ms }, &origin).await;
                }
                Told::Failed(class, detail, will_retry) => {
                    let failure = SendFailure { message, class, detail, attempt, will_retry };
                    host.send_failed(&failure, &origin).await;
                }
            }
        });
    }

    /// Runs the `before-send` chain once per send and records what it left, so a retry or a
    /// restart sends exactly the vetted body. `Err` carries the outcome when the send must not
    /// go (cancelled, or the store failed).
    async fn vet(&self, send: &mut PendingSend, request: &mut SendRequest) -> Result<(), Outcome> {
        let Some(plugins) = &self.plugins else {
            return Ok(());
        };
        let host = plugins.current();
        if send.vetted || !host.guards_sends() {
            return Ok(());
        }
        let origin = parse_origin(&send.origin);
        match host.before_send(&outbound_message(request), &origin).await {
            SendVerdict::Keep => {}
            SendVerdict::Rewrite { content, by } => {
                let data = match content.data_json.as_deref().map(serde_json::from_str) {
                    None => None,
                    Some(Ok(value)) => Some(value),
                    Some(Err(err)) => {
                        return Err(Outcome::Dead(format!("rewrite by {by:?}: data-json: {err}")));
                    }
                };
                request.kind =
                    if content.text.is_none() { "structured" } else { "text" }.to_owned();
                request.content.text = content.text;
                request.content.data = data;
                if let Some(why) = content_too_large(&request.content) {
                    return Err(Outcome::Dead(format!("rewrite by {by:?}: {why}")));
                }
                tracing::debug!(client_msg_id = %send.client_msg_id, ?by, "send rewritten");
            }
            SendVerdict::Cancel { plugin_id, reason } => {
                return Err(Outcome::Cancelled { by: plugin_id, reason });
            }
        }
        let body = serde_json::to_string(&*request).unwrap_or_else(|_| send.request_json.clone());
        if let Err(err) = self.store.mark_vetted(send.id, body.clone(), now_ms()).await {
            return Err(Outcome::Store(err));
        }
        send.request_json = body;
        send.vetted = true;
        Ok(())
    }

    /// One attempt; the flag says whether it counted itself in `opening`.
    async fn attempt(&self, send: &mut PendingSend) -> (Outcome, bool) {
        let mut request: SendRequest = match serde_json::from_str(&send.request_json) {
            Ok(request) => request,
            Err(err) => {
                return (Outcome::Dead(format!("queued request is not valid: {err}")), false);
            }
        };
        // Guards run before the thread ledger, so a cancelled send never takes a cold slot.
        if let Err(outcome) = self.vet(send, &mut request).await {
            return (outcome, false);
        }
        let opens_thread = {
            // Checking the allowance and claiming a slot must be one step, or two sends could
            // both take the last free slot.
            let _guard = self.gate_lock.lock().await;
            match self.gate(send).await {
                Ok(Gate::Go { opens_thread }) => {
                    if opens_thread {
                        self.opening.fetch_add(1, Ordering::SeqCst);
                    }
                    opens_thread
                }
                Ok(Gate::Hold { reason, until_ms, detail }) => {
                    return (Outcome::Hold { reason, until_ms, detail, awaiting: None }, false);
                }
                Err(err) => return (Outcome::Store(err), false),
            }
        };
        (self.send(send, &request, opens_thread).await, opens_thread)
    }

    async fn send(&self, send: &PendingSend, request: &SendRequest, opens_thread: bool) -> Outcome {
        let priority =
            if send.origin.starts_with("reply:") { Priority::High } else { Priority::Normal };
        self.limiter.acquire(priority).await;
        match self.client.send_message(request).await {
            Ok(outcome) => {
                self.breaker_record(false);
                if let Some(handle) = &send.recipient {
                    self.backlogged.lock().unwrap_or_else(|p| p.into_inner()).remove(handle);
                }
                if let Some((handle, count)) = &outcome.backlog_warning {
                    OutboxStats::bump(&self.stats.backlog_warnings);
                    let undelivered = *count;
                    tracing::warn!(recipient = %handle, undelivered, "recipient backlog is high");
                }
                let counter =
                    if outcome.replayed { &self.stats.replayed } else { &self.stats.sent };
                OutboxStats::bump(counter);
                let result = if outcome.replayed { "replayed" } else { "sent" };
                self.telemetry.metrics.record_send(result, false);
                let opened = match (&send.recipient, opens_thread) {
                    (Some(handle), true) => {
                        Some((handle.clone(), outcome.message.conversation_id.clone()))
                    }
                    _ => None,
                };
                Outcome::Sent { message_id: outcome.message.id, opened }
            }
            Err(err) => {
                let throttled = err.disposition() == Disposition::Throttled;
                let outcome = self.classify(send, err, opens_thread);
                let result = match &outcome {
                    Outcome::Retry { .. } => "retry",
                    Outcome::Cancelled { .. } => "cancelled",
                    Outcome::Hold { .. } => "held",
                    Outcome::Dead(_) => "dead",
                    _ => "refused",
                };
                self.telemetry.metrics.record_send(result, throttled);
                outcome
            }
        }
    }

    /// Checks the thread ledger: whether this send may go now, and whether it opens a thread.
    async fn gate(&self, send: &PendingSend) -> Result<Gate, StoreError> {
        let Some(handle) = &send.recipient else {
            return Ok(Gate::Go { opens_thread: false });
        };
        match self.store.peer_state(handle).await? {
            Some(PeerState::Established) => Ok(Gate::Go { opens_thread: false }),
            Some(PeerState::Awaiting { .. }) => Ok(Gate::Hold {
                reason: hold::AWAITING_REPLY,
                until_ms: HELD_FOREVER_MS,
                detail: format!("thread with {handle} awaits their reply before another message"),
            }),
            None => {
                let now = now_ms();
                let window_ms = i64::try_from(COLD_WINDOW.as_millis()).unwrap_or(i64::MAX);
                let open = self.store.awaiting_threads(now - window_ms).await?;
                let in_flight = self.opening.load(Ordering::SeqCst);
                let used = open.len() + in_flight;
                let cap = usize::try_from(self.settings.cold_threads_per_day).unwrap_or(usize::MAX);
                if used < cap {
                    return Ok(Gate::Go { opens_thread: true });
                }
                // A slot frees when the oldest thread leaves the window, or sooner if a thread
                // being opened right now is refused after all.
                let frees_ms = open.first().map_or(now + 60_000, |t| t.opened_ms + window_ms);
                let until_ms = if in_flight > 0 { frees_ms.min(now + 5_000) } else { frees_ms };
                Ok(Gate::Hold {
                    reason: hold::COLD_CAP,
                    until_ms,
                    detail: format!(
                        "{used} new threads of {cap} allowed per 24 h await replies; \
                         the next slot frees at the latest at {}",
                        format_ms(until_ms)
                    ),
                })
            }
        }
    }

    fn classify(&self, send: &PendingSend, err: ApiError, opens_thread: bool) -> Outcome {
        let now = now_ms();
        let code = err.code().cloned();
        let disposition = err.disposition();
        if disposition == Disposition::Throttled {
            OutboxStats::bump(&self.stats.rate_limited);
        }
        match (code, disposition) {
            (_, Disposition::Fatal) => Outcome::Fatal(err),
            (Some(ErrorCode::AwaitingReply), _) => {
                let handle = send.recipient.clone().unwrap_or_default();
                let since = awaiting_since(&err).unwrap_or(now);
                Outcome::Hold {
                    reason: hold::AWAITING_REPLY,
                    until_ms: HELD_FOREVER_MS,
                    detail: format!("server: thread with {handle} awaits their reply ({err})"),
                    awaiting: Some((handle, since)),
                }
            }
            (Some(ErrorCode::RecipientBacklogged), _) => {
                let handle = send.recipient.clone().unwrap_or_default();
                let round = {
                    let mut map = self.backlogged.lock().unwrap_or_else(|p| p.into_inner());
                    let round = map.entry(handle.clone()).or_insert(0);
                    *round += 1;
                    *round
                };
                // Backlogs drain at the recipient's pace: start at 30 s and back off to 30 min.
                let pause =
                    Duration::from_secs(30).saturating_mul(1 << round.min(6).saturating_sub(1));
                let pause = pause.min(Duration::from_secs(1800));
                Outcome::Hold {
                    reason: hold::BACKLOG,
                    until_ms: now + i64::try_from(pause.as_millis()).unwrap_or(i64::MAX / 4),
                    detail: format!("{handle} has too many undelivered messages ({err})"),
                    awaiting: None,
                }
            }
            (Some(ErrorCode::RateLimited), _) if err.retry_after().is_none() && opens_thread => {
                // The cold-outreach cap: the server knows of threads our ledger does not.
                Outcome::Hold {
                    reason: hold::COLD_CAP,
                    until_ms: now + 3_600_000,
                    detail: format!("server refused a new thread (cold-outreach cap): {err}"),
                    awaiting: None,
                }
            }
            (_, Disposition::Throttled) => {
                let after =
                    err.retry_after().unwrap_or_else(|| self.backoff.delay(send.attempts + 1));
                Outcome::Retry { after, error: err.to_string(), count_attempt: false }
            }
            (_, Disposition::Transient) => {
                self.breaker_record(true);
                Outcome::Retry {
                    after: self.backoff.delay(send.attempts + 1),
                    error: err.to_string(),
                    count_attempt: true,
                }
            }
            (_, Disposition::Permanent) => Outcome::Dead(err.to_string()),
        }
    }
}

/// `details.waiting_since` of an AWAITING_REPLY answer, in ms since the epoch.
fn awaiting_since(err: &ApiError) -> Option<i64> {
    let ApiError::Status { reply, .. } = err else {
        return None;
    };
    let since = reply.details.as_ref()?.get("waiting_since")?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(since).ok().map(|t| t.timestamp_millis())
}

/// Milliseconds since the Unix epoch; the queue's clock.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Renders a queue time for people.
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_keys_are_stable_and_distinct() {
        let a = reply_key("msg_1", "echo", 0);
        assert_eq!(a, reply_key("msg_1", "echo", 0));
        assert_ne!(a, reply_key("msg_1", "echo", 1));
        assert_ne!(a, reply_key("msg_1", "rules", 0));
        assert_ne!(reply_key("msg_1", "echo1", 0), reply_key("msg_1e", "cho1", 0));
        assert!(a.len() <= 128 && a.starts_with("acd-"));
        assert_ne!(operator_key("x"), reply_key("x", "operator", 0));
    }

    fn outbox(dir: &std::path::Path, threshold: u32) -> Outbox {
        let store = Store::open(dir).expect("store");
        // Never contacted: these tests drive the decision logic only.
        let client =
            Client::new("http://127.0.0.1:9", crate::config::ApiKey::new("ac_x")).expect("client");
        let limiter = Arc::new(RateLimiter::new(60, Duration::from_secs(1)));
        let settings = OutboxSettings { breaker_threshold: threshold, ..OutboxSettings::default() };
        Outbox::new(store, client, limiter, Arc::new(Notify::new()), settings)
    }

    fn api_error(status: u16, code: ErrorCode, retry_after: Option<Duration>) -> ApiError {
        let reply = crate::client::ErrorReply {
            status,
            code,
            message: "m".into(),
            details: None,
            retry_after,
        };
        ApiError::Status { method: "POST", path: "/v1/messages".into(), reply: Box::new(reply) }
    }

    fn pending(attempts: u32) -> PendingSend {
        PendingSend {
            id: 1,
            client_msg_id: "k".into(),
            lane: "to:bob".into(),
            request_json: "{}".into(),
            origin: "operator:x".into(),
            recipient: Some("bob".into()),
            attempts,
            vetted: false,
        }
    }

    #[tokio::test]
    async fn the_breaker_opens_after_consecutive_outages_and_closes_on_success() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = outbox(dir.path(), 3);
        let outage = || api_error(503, ErrorCode::InternalError, None);
        for _ in 0..2 {
            let _ = outbox.classify(&pending(0), outage(), false);
        }
        assert!(outbox.breaker_open_until().is_none(), "two failures keep it closed");
        let _ = outbox.classify(&pending(0), outage(), false);
        assert!(outbox.breaker_open_until().is_some(), "the third opens it");
        assert_eq!(outbox.stats.breaker_trips.load(Ordering::Relaxed), 1);
        outbox.breaker_record(false);
        assert!(outbox.breaker_open_until().is_none(), "a success closes it");
    }

    #[tokio::test]
    async fn limit_answers_never_count_as_outages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = outbox(dir.path(), 1);
        let limited = api_error(429, ErrorCode::RateLimited, Some(Duration::from_secs(3600)));
        match outbox.classify(&pending(4), limited, false) {
            Outcome::Retry { after, count_attempt: false, .. } => {
                assert_eq!(after, Duration::from_secs(3600), "Retry-After is not clamped");
            }
            _ => panic!("a 429 with Retry-After is retried after it"),
        }
        let backlog = api_error(429, ErrorCode::RecipientBacklogged, None);
        assert!(matches!(
            outbox.classify(&pending(0), backlog, false),
            Outcome::Hold { reason: hold::BACKLOG, .. }
        ));
        assert!(outbox.breaker_open_until().is_none(), "limits did not open the breaker");
        assert_eq!(outbox.stats.rate_limited.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn refusals_are_classified_as_holds_or_dead_letters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = outbox(dir.path(), 5);
        let cold_cap = api_error(429, ErrorCode::RateLimited, None);
        assert!(matches!(
            outbox.classify(&pending(0), cold_cap, true),
            Outcome::Hold { reason: hold::COLD_CAP, .. }
        ));
        let awaiting = api_error(403, ErrorCode::AwaitingReply, None);
        match outbox.classify(&pending(0), awaiting, false) {
            Outcome::Hold { reason: hold::AWAITING_REPLY, awaiting: Some((handle, _)), .. } => {
                assert_eq!(handle, "bob");
            }
            _ => panic!("AWAITING_REPLY holds the send and records the thread"),
        }
        for (status, code) in [
            (400, ErrorCode::ValidationError),
            (403, ErrorCode::Blocked),
            (404, ErrorCode::AgentNotFound),
            (410, ErrorCode::GroupDeleted),
            (413, ErrorCode::ContentTooLarge),
        ] {
            let err = api_error(status, code, None);
            assert!(matches!(outbox.classify(&pending(0), err, false), Outcome::Dead(_)));
        }
        let unauthorized = api_error(401, ErrorCode::Unauthorized, None);
        assert!(matches!(outbox.classify(&pending(0), unauthorized, false), Outcome::Fatal(_)));
    }

    #[test]
    fn origins_tell_hooks_who_produced_a_send() {
        let reply = parse_origin("reply:msg_1:echo:0");
        assert_eq!(
            reply,
            Origin { plugin_id: Some("echo".into()), trigger: Trigger::Inbound, hops: 0 }
        );
        let operator = parse_origin("operator:abc");
        assert_eq!(
            (operator.plugin_id, operator.trigger, operator.hops),
            (None, Trigger::Operator, 0)
        );
        // Causes may hold colons; only the first four separators split.
        let origin = plugin_origin("digest", Trigger::Timer, 1, "tick:hourly:3600000");
        let parsed = parse_origin(&origin);
        assert_eq!(
            parsed,
            Origin { plugin_id: Some("digest".into()), trigger: Trigger::Timer, hops: 1 }
        );
        let chained = parse_origin(&plugin_origin("a", Trigger::PluginSend, 2, "sent:k"));
        assert_eq!((chained.trigger, chained.hops), (Trigger::PluginSend, 2));
        // A mangled hop count reads as too deep, so it can never unlock more sends.
        assert_eq!(parse_origin("plugin:timer:x:a:c").hops, u8::MAX);
        assert_ne!(plugin_key("a", "c", "n:0"), plugin_key("a", "c", "n:1"));
        assert_ne!(plugin_key("a", "c", "n:0"), plugin_key("b", "c", "n:0"));
    }

    #[test]
    fn direct_sends_are_laned_by_normalised_recipient() {
        let request = SendRequest {
            to: Some("@Alice".into()),
            conversation_id: None,
            client_msg_id: "k".into(),
            kind: "text".into(),
            content: crate::client::Content::default(),
        };
        let send = new_send("k".into(), &request, "test".into());
        assert_eq!(send.lane, "to:alice");
        assert_eq!(send.recipient.as_deref(), Some("alice"));
    }
}
