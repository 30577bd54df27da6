//! Inbox by polling `GET /v1/messages/sync`, acknowledging each processed page with
//! `POST /v1/messages/sync/ack`.
//!
//! The page is handled in order and acknowledged up to its last row; the acked cursor is kept
//! in the store for the operator. Rows that cannot be decoded are quarantined in the store and
//! acknowledged with the page, so one bad row neither blocks the inbox nor is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{InboxError, Processor, pause as pause_beating};
use crate::client::{ApiError, Client, Disposition, SyncRow};
use crate::ops::http::OpsState;
use crate::outbox::{Backoff, Priority, RateLimiter, now_ms};
use crate::service::INBOX_LOOP;
use crate::store::Store;

/// Rows fetched per sync request (the Python SDK's page size).
pub const PAGE_SIZE: u32 = 100;

/// Everything one polling loop needs.
pub struct Poller<'a> {
    /// Runs plugins and records outcomes.
    pub processor: &'a Processor,
    /// The REST client.
    pub client: &'a Client,
    /// The state store (cursor, quarantine).
    pub store: &'a Store,
    /// Paces every request.
    pub limiter: &'a Arc<RateLimiter>,
    /// Pause after a short page.
    pub interval: Duration,
    /// Heartbeat, readiness and metrics.
    pub telemetry: &'a OpsState,
}

impl Poller<'_> {
    /// Polls until `shutdown` fires.
    ///
    /// # Errors
    /// When the store fails or the server refuses the key.
    pub async fn run(&self, shutdown: &CancellationToken) -> Result<(), InboxError> {
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
            .expect("constant bounds are valid");
        let mut failures = 0u32;
        tracing::info!(interval_ms = self.interval.as_millis(), "inbox polling");
        while !shutdown.is_cancelled() {
            self.telemetry.heartbeat.beat(INBOX_LOOP);
            let pause = match self.drain_once(shutdown).await {
                Ok(()) => {
                    failures = 0;
                    self.telemetry.readiness.mark_ready(INBOX_LOOP);
                    self.telemetry.metrics.set_connected(true);
                    self.interval
                }
                Err(PollError::Inbox(err)) => return Err(err),
                Err(PollError::Api(err)) => {
                    self.telemetry.readiness.mark_not_ready(INBOX_LOOP, format!("sync: {err}"));
                    self.telemetry.metrics.set_connected(false);
                    failures += 1;
                    let pause = err.retry_after().unwrap_or_else(|| backoff.delay(failures));
                    tracing::warn!(error = %err, retry_in_ms = pause.as_millis(), "sync failed");
                    pause
                }
            };
            if !pause_beating(pause, self.telemetry, shutdown).await {
                break;
            }
        }
        Ok(())
    }

    /// Fetches and handles pages until a short one. A stop request abandons a fetch still
    /// waiting for the server (nothing of it was handled, so nothing is lost), which keeps a
    /// silent server from holding the stop past systemd's timeout.
    async fn drain_once(&self, shutdown: &CancellationToken) -> Result<(), PollError> {
        loop {
            self.limiter.acquire(Priority::Normal).await;
            let page = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                page = self.client.sync(None, PAGE_SIZE) => page.map_err(api)?,
            };
            let full = page.len() >= PAGE_SIZE as usize;
            let mut last_done: Option<String> = None;
            for row in &page {
                match row {
                    SyncRow::Message(message) => {
                        self.processor.handle(message).await?;
                    }
                    SyncRow::Malformed { raw, reason } => {
                        tracing::warn!(%reason, "malformed sync row quarantined");
                        self.store
                            .quarantine("sync", raw.to_string(), reason.clone(), now_ms())
                            .await
                            .map_err(InboxError::from)?;
                    }
                }
                if let Some(id) = row.delivery_id() {
                    last_done = Some(id.to_owned());
                }
            }
            if let Some(cursor) = last_done {
                self.limiter.acquire(Priority::High).await;
                let acked = self.client.ack(&cursor).await.map_err(api)?;
                self.telemetry.metrics.messages_acked.inc_by(acked.acked);
                tracing::debug!(acked = acked.acked, %cursor, "sync page acknowledged");
                self.store.set_meta("sync_cursor", cursor).await.map_err(InboxError::from)?;
            } else if !page.is_empty() {
                // Without a cursor nothing can be acknowledged and the same page would come back
                // forever; stop draining until the next poll.
                tracing::warn!(
                    rows = page.len(),
                    "sync page has no delivery_id; cannot acknowledge"
                );
                return Ok(());
            }
            if !full {
                return Ok(());
            }
        }
    }
}

enum PollError {
    Inbox(InboxError),
    Api(ApiError),
}

impl From<InboxError> for PollError {
    fn from(err: InboxError) -> Self {
        Self::Inbox(err)
    }
}

impl From<crate::store::StoreError> for PollError {
    fn from(err: crate::store::StoreError) -> Self {
        Self::Inbox(err.into())
    }
}

fn api(err: ApiError) -> PollError {
    if err.disposition() == Disposition::Fatal {
        PollError::Inbox(InboxError::Fatal(err.to_string()))
    } else {
        PollError::Api(err)
    }
}
