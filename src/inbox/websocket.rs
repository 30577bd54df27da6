//! Inbox over the WebSocket: connect, handle each `message.new`, ack it, reconnect on loss.
//!
//! Reconnects back off from 500 ms, doubling to 30 s, with ±25 % jitter; the attempt counter
//! resets only after a connection has stayed up for 30 s, so a server that accepts and then
//! drops us is not hammered. Close codes that mean the key is refused stop the inbox.
//!
//! With the `ack` capability the server keeps each message until our ack, which we send only
//! after the message is recorded. Without it (older servers mark messages delivered as they
//! write them) a message that arrives in the instant before a crash can be lost; the module
//! logs which mode the server accepted so an operator can tell.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BEAT_EVERY, InboxError, Processor, pause as pause_beating};
use crate::client::ws::{self, Event, WsError, WsOptions};
use crate::config::ApiKey;
use crate::ops::http::OpsState;
use crate::outbox::{Backoff, Priority, RateLimiter, now_ms};
use crate::service::INBOX_LOOP;
use crate::store::Store;

/// Longest wait for the TCP, TLS and HELLO handshakes of one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection that lived this long resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How a WebSocket inbox ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The server does not serve the WebSocket (the upgrade got an HTTP error).
    Unsupported,
}

/// Everything one WebSocket inbox needs.
pub struct WsInbox<'a> {
    /// Runs plugins and records outcomes.
    pub processor: &'a Processor,
    /// The state store (quarantine).
    pub store: &'a Store,
    /// Paces connection attempts together with every other request.
    pub limiter: &'a Arc<RateLimiter>,
    /// The `ws(s)://…/v1/ws` URL.
    pub url: &'a str,
    /// The agent's key, for HELLO.
    pub key: &'a ApiKey,
    /// Socket timings.
    pub options: WsOptions,
    /// Give up (and let the caller poll) when the server refuses the upgrade.
    pub allow_unsupported: bool,
    /// Heartbeat, readiness and metrics.
    pub telemetry: &'a OpsState,
}

impl WsInbox<'_> {
    /// Runs until shutdown, a refused key, or (when allowed) a server without WebSocket.
    ///
    /// # Errors
    /// When the store fails or the server refuses the key.
    pub async fn run(&self, shutdown: &CancellationToken) -> Result<WsEnd, InboxError> {
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
            .expect("constant bounds are valid");
        let mut attempt = 0u32;
        loop {
            self.telemetry.heartbeat.beat(INBOX_LOOP);
            self.limiter.acquire(Priority::Normal).await;
            let connect = tokio::time::timeout(
                CONNECT_TIMEOUT,
                ws::connect(self.url, self.key, self.options),
            );
            let connected = tokio::select! {
                () = shutdown.cancelled() => return Ok(WsEnd::Shutdown),
                connected = connect => {
                    connected.unwrap_or(Err(WsError::ConnectTimeout(CONNECT_TIMEOUT)))
                }
            };
            let err = match connected {
                Ok(conn) => {
                    tracing::info!(ack_mode = conn.ack_mode(), "inbox connected");
                    self.telemetry.readiness.mark_ready(INBOX_LOOP);
                    self.telemetry.metrics.set_connected(true);
                    let started = Instant::now();
                    let ended = self.serve(conn, shutdown).await;
                    self.telemetry.metrics.set_connected(false);
                    self.telemetry.readiness.mark_not_ready(INBOX_LOOP, "reconnecting");
                    match ended? {
                        None => return Ok(WsEnd::Shutdown),
                        Some(err) => {
                            if started.elapsed() >= STABLE_AFTER {
                                attempt = 0;
                            }
                            err
                        }
                    }
                }
                Err(err) => err,
            };
            if err.is_auth_terminal() {
                return Err(InboxError::Fatal(err.to_string()));
            }
            if let WsError::UpgradeRefused { status } = err
                && self.allow_unsupported
            {
                tracing::warn!(status, "server refused the websocket upgrade; polling instead");
                return Ok(WsEnd::Unsupported);
            }
            attempt = attempt.saturating_add(1);
            self.telemetry.metrics.reconnects.inc();
            let pause = backoff.delay(attempt);
            let retry_in_ms = pause.as_millis();
            tracing::warn!(error = %err, attempt, retry_in_ms, "inbox disconnected");
            if !pause_beating(pause, self.telemetry, shutdown).await {
                return Ok(WsEnd::Shutdown);
            }
        }
    }

    /// Serves one connection. `Ok(None)` on shutdown, `Ok(Some(err))` when the socket ended.
    async fn serve(
        &self,
        mut conn: ws::Connection,
        shutdown: &CancellationToken,
    ) -> Result<Option<WsError>, InboxError> {
        let mut beat = tokio::time::interval(BEAT_EVERY);
        loop {
            self.telemetry.heartbeat.beat(INBOX_LOOP);
            let event = tokio::select! {
                () = shutdown.cancelled() => {
                    conn.close().await;
                    return Ok(None);
                }
                _ = beat.tick() => continue,
                event = conn.next_event() => event,
            };
            match event {
                Ok(Event::Message(message)) => {
                    // A store failure returns before the ack: the server keeps the message.
                    self.processor.handle(&message).await?;
                    if let Err(err) = conn.ack(&message.id).await {
                        return Ok(Some(err));
                    }
                    if conn.ack_mode() {
                        self.telemetry.metrics.messages_acked.inc();
                    }
                }
                Ok(Event::Other(kind)) => tracing::debug!(%kind, "websocket event ignored"),
                Ok(Event::Malformed { raw, reason }) => {
                    tracing::warn!(%reason, "malformed websocket frame quarantined");
                    self.store.quarantine("websocket", raw, reason, now_ms()).await?;
                }
                Err(err) => return Ok(Some(err)),
            }
        }
    }
}
