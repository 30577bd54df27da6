//! The durable outbound queue and the one place that sends messages.
//!
//! Every send is first written to the [`Store`] with a client_msg_id derived from its cause,
//! then sent by [`Outbox::run`]: oldest first within a lane (one conversation), lanes in
//! parallel, every request paced by one [`RateLimiter`]. Because the key is deterministic, a
//! resend after a crash is answered by the server's idempotent replay rather than delivered
//! twice.
//!
//! Retry rules: limit answers (429) wait for Retry-After in full, or a backoff when it is
//! absent, and do not use up attempts; server and network failures back off exponentially and
//! give up after [`MAX_ATTEMPTS`]; refusals that will repeat (4xx) are kept as dead letters
//! with their reason; an invalid key stops the daemon.

mod pacing;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use pacing::{Backoff, InvalidBackoff, Priority, RateLimiter};

use crate::client::{ApiError, Client, Disposition, SendRequest};
use crate::store::{NewSend, PendingSend, Store, StoreError};

/// Attempts of a send that keeps failing for transient reasons before it is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 12;
/// Sends in flight at once (each in its own lane).
const MAX_IN_FLIGHT: usize = 16;

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

/// The idempotency key of reply number `index` that `plugin` gave to message `message_id`.
pub fn reply_key(message_id: &str, plugin: &str, index: usize) -> String {
    let mut hash = Sha256::new();
    for part in [message_id, plugin, &index.to_string()] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hex::encode(hash.finalize());
    format!("acd-{}", &digest[..40])
}

/// Builds the queue entry for a send.
pub fn new_send(client_msg_id: String, request: &SendRequest, origin: String) -> NewSend {
    let lane = match (&request.to, &request.conversation_id) {
        (_, Some(conversation)) => conversation.clone(),
        (Some(handle), None) => format!("to:{handle}"),
        (None, None) => String::new(),
    };
    let request_json = serde_json::to_string(request).unwrap_or_else(|_| "{}".to_owned());
    NewSend {
        client_msg_id,
        lane,
        request_json,
        origin,
    }
}

/// The sender task's configuration and shared parts.
pub struct Outbox {
    store: Store,
    client: Client,
    limiter: Arc<RateLimiter>,
    wake: Arc<Notify>,
    backoff: Backoff,
}

enum Outcome {
    Sent(String),
    Retry {
        after: Duration,
        error: String,
        count_attempt: bool,
    },
    Dead(String),
    Fatal(ApiError),
}

impl Outbox {
    /// Creates the outbox. `wake` is notified by whoever queues a send.
    pub fn new(store: Store, client: Client, limiter: Arc<RateLimiter>, wake: Arc<Notify>) -> Self {
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60))
            .expect("constant bounds are valid");
        Self {
            store,
            client,
            limiter,
            wake,
            backoff,
        }
    }

    /// Sends due messages until `shutdown` fires. Sends already in flight are finished first,
    /// so a stop never leaves a send whose fate is unrecorded.
    ///
    /// # Errors
    /// When the store fails or the server refuses the key.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), OutboxError> {
        let this = Arc::new(self);
        let mut in_flight: JoinSet<(PendingSend, Outcome)> = JoinSet::new();
        let mut busy_lanes: HashSet<String> = HashSet::new();
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            if let Err(err) = this.start_due(&mut in_flight, &mut busy_lanes).await {
                break Err(err);
            }
            let wait = match this.store.next_due_ms().await {
                Ok(Some(due)) => Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0)),
                Ok(None) => Duration::from_secs(3600),
                Err(err) => break Err(err.into()),
            };
            // A lane that is busy makes its head look due; the finished send wakes us instead.
            let wait = if busy_lanes.is_empty() {
                wait
            } else {
                wait.max(Duration::from_millis(5))
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

    async fn start_due(
        self: &Arc<Self>,
        in_flight: &mut JoinSet<(PendingSend, Outcome)>,
        busy_lanes: &mut HashSet<String>,
    ) -> Result<(), OutboxError> {
        let room = MAX_IN_FLIGHT.saturating_sub(in_flight.len());
        if room == 0 {
            return Ok(());
        }
        let limit = u32::try_from(room + busy_lanes.len()).unwrap_or(u32::MAX);
        for send in self.store.due_sends(now_ms(), limit).await? {
            if in_flight.len() >= MAX_IN_FLIGHT || !busy_lanes.insert(send.lane.clone()) {
                continue;
            }
            let this = Arc::clone(self);
            in_flight.spawn(async move {
                let outcome = this.attempt(&send).await;
                (send, outcome)
            });
        }
        Ok(())
    }

    async fn finish(
        &self,
        done: Result<(PendingSend, Outcome), tokio::task::JoinError>,
        busy_lanes: &mut HashSet<String>,
    ) -> Result<(), OutboxError> {
        let (send, outcome) = match done {
            Ok(done) => done,
            // A panicked send task recorded nothing; the row stays pending and is retried.
            Err(err) => {
                tracing::error!(error = %err, "send task failed");
                return Ok(());
            }
        };
        busy_lanes.remove(&send.lane);
        let now = now_ms();
        match outcome {
            Outcome::Sent(message_id) => {
                tracing::debug!(client_msg_id = %send.client_msg_id, %message_id, "sent");
                self.store.mark_sent(send.id, message_id, now).await?;
            }
            Outcome::Retry {
                after,
                error,
                count_attempt,
            } => {
                let attempts = send.attempts + u32::from(count_attempt);
                if attempts >= MAX_ATTEMPTS {
                    tracing::error!(
                        client_msg_id = %send.client_msg_id, attempts, error = %error,
                        "send dead-lettered after repeated failures"
                    );
                    self.store.mark_dead(send.id, error, now).await?;
                } else {
                    tracing::warn!(
                        client_msg_id = %send.client_msg_id, retry_in_ms = after.as_millis(),
                        error = %error, "send will be retried"
                    );
                    let next =
                        now.saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
                    self.store
                        .mark_retry(send.id, next, error, count_attempt, now)
                        .await?;
                }
            }
            Outcome::Dead(error) => {
                let client_msg_id = &send.client_msg_id;
                tracing::error!(%client_msg_id, error = %error, "send refused; dead-lettered");
                self.store.mark_dead(send.id, error, now).await?;
            }
            Outcome::Fatal(err) => return Err(OutboxError::Fatal(err)),
        }
        self.wake.notify_one();
        Ok(())
    }

    async fn attempt(&self, send: &PendingSend) -> Outcome {
        let request: SendRequest = match serde_json::from_str(&send.request_json) {
            Ok(request) => request,
            Err(err) => return Outcome::Dead(format!("queued request is not valid: {err}")),
        };
        let priority = if send.origin.starts_with("reply:") {
            Priority::High
        } else {
            Priority::Normal
        };
        self.limiter.acquire(priority).await;
        match self.client.send_message(&request).await {
            Ok(outcome) => {
                if let Some((handle, count)) = &outcome.backlog_warning {
                    let undelivered = count;
                    tracing::warn!(recipient = %handle, undelivered, "recipient backlog is high");
                }
                Outcome::Sent(outcome.message.id)
            }
            Err(err) => self.classify(send, err),
        }
    }

    fn classify(&self, send: &PendingSend, err: ApiError) -> Outcome {
        match err.disposition() {
            Disposition::Fatal => Outcome::Fatal(err),
            Disposition::Throttled => {
                let after = err
                    .retry_after()
                    .unwrap_or_else(|| self.backoff.delay(send.attempts + 1));
                Outcome::Retry {
                    after,
                    error: err.to_string(),
                    count_attempt: false,
                }
            }
            Disposition::Transient => Outcome::Retry {
                after: self.backoff.delay(send.attempts + 1),
                error: err.to_string(),
                count_attempt: true,
            },
            Disposition::Permanent => Outcome::Dead(err.to_string()),
        }
    }
}

/// Milliseconds since the Unix epoch; the queue's clock.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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
        assert_ne!(
            reply_key("msg_1", "echo1", 0),
            reply_key("msg_1e", "cho1", 0)
        );
        assert!(a.len() <= 128 && a.starts_with("acd-"));
    }
}
