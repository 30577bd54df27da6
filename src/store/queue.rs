//! The outbound queue's rows: queueing, picking due sends lane by lane, recording outcomes,
//! holds and dead letters.

use rusqlite::{Connection, params};

use super::{Store, StoreError};

/// The state of a queue row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendState {
    /// Waiting (possibly held).
    Pending,
    /// Accepted by the server.
    Sent,
    /// Given up on.
    Dead,
}

impl SendState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Dead => "dead",
        }
    }
}

/// One queue row as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRow {
    /// Row id (used by `agentchatd outbox retry|drop`).
    pub id: i64,
    /// Idempotency key.
    pub client_msg_id: String,
    /// What caused the send.
    pub origin: String,
    /// Recipient handle of a direct send.
    pub recipient: Option<String>,
    /// `pending`, `sent` or `dead`.
    pub state: String,
    /// Why a pending send is held back, if it is.
    pub hold: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Earliest next attempt, in ms since the epoch.
    pub next_attempt_ms: i64,
    /// The last failure or hold explanation.
    pub last_error: Option<String>,
    /// The server's message id once sent.
    pub message_id: Option<String>,
    /// The request body.
    pub request_json: String,
}

/// One outbound message to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSend {
    /// Deterministic idempotency key; queuing the same key twice keeps the first.
    pub client_msg_id: String,
    /// Ordering lane: sends in one lane go out strictly in queue order.
    pub lane: String,
    /// The JSON body of `POST /v1/messages`.
    pub request_json: String,
    /// What caused the send, for logs and the operator (`reply:<msg>:<plugin>:<n>`).
    pub origin: String,
    /// The recipient's handle for a direct send; `None` for a group send.
    pub recipient: Option<String>,
}

/// A queued send that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSend {
    /// Row id, also the queue order.
    pub id: i64,
    /// Idempotency key.
    pub client_msg_id: String,
    /// Ordering lane.
    pub lane: String,
    /// The JSON body of `POST /v1/messages`.
    pub request_json: String,
    /// What caused the send.
    pub origin: String,
    /// The recipient's handle for a direct send.
    pub recipient: Option<String>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Whether the `before-send` hooks have passed it (they run once per send).
    pub vetted: bool,
}

/// Counts of the outbound queue by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    /// Waiting to be sent.
    pub pending: u64,
    /// Accepted by the server.
    pub sent: u64,
    /// Given up on; see `last_error`.
    pub dead: u64,
}

impl Store {
    /// Queues one send outside of message processing. Returns false when a send with the
    /// same `client_msg_id` is already queued.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn enqueue(&self, send: NewSend, now_ms: i64) -> Result<bool, StoreError> {
        self.call(move |c| insert_send(c, &send, now_ms).map(|n| n > 0)).await
    }

    /// The sends that may go now: the oldest pending send of each lane, if it is due.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn due_sends(&self, now_ms: i64, limit: u32) -> Result<Vec<PendingSend>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT o.id, o.client_msg_id, o.lane, o.request_json, o.origin, o.recipient,
                        o.attempts, o.vetted
                 FROM outbox o
                 WHERE o.state = 'pending'
                   AND o.id = (SELECT MIN(id) FROM outbox i
                               WHERE i.state = 'pending' AND i.lane = o.lane)
                   AND o.next_attempt_ms <= ?1
                 ORDER BY o.next_attempt_ms, o.id
                 LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![now_ms, limit], |r| {
                Ok(PendingSend {
                    id: r.get(0)?,
                    client_msg_id: r.get(1)?,
                    lane: r.get(2)?,
                    request_json: r.get(3)?,
                    origin: r.get(4)?,
                    recipient: r.get(5)?,
                    attempts: r.get(6)?,
                    vetted: r.get(7)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// When the earliest pending send becomes due, if any is pending.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        self.call(|c| {
            c.query_row(
                "SELECT MIN(next_attempt_ms) FROM outbox WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Marks a send accepted by the server.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn mark_sent(
        &self,
        id: i64,
        message_id: String,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET state = 'sent', message_id = ?2, attempts = attempts + 1,
                 last_error = NULL, hold = NULL, updated_ms = ?3 WHERE id = ?1",
                params![id, message_id, now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Schedules another attempt of a send.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn mark_retry(
        &self,
        id: i64,
        next_attempt_ms: i64,
        error: String,
        count_attempt: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET next_attempt_ms = ?2, last_error = ?3, hold = NULL,
                 attempts = attempts + ?4, updated_ms = ?5 WHERE id = ?1",
                params![id, next_attempt_ms, error, i64::from(count_attempt), now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Gives up on a send, keeping it with its reason for the operator.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn mark_dead(&self, id: i64, error: String, now_ms: i64) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET state = 'dead', last_error = ?2, attempts = attempts + 1,
                 hold = NULL, updated_ms = ?3 WHERE id = ?1",
                params![id, error, now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Counts the outbound queue by state.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        self.call(|c| {
            let mut counts = OutboxCounts::default();
            let mut stmt = c.prepare("SELECT state, COUNT(*) FROM outbox GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                match state.as_str() {
                    "pending" => counts.pending = n,
                    "sent" => counts.sent = n,
                    _ => counts.dead = n,
                }
            }
            Ok(counts)
        })
        .await
    }

    /// Holds a send back: it keeps its place in its lane and is not tried before `until_ms`
    /// (or a release). `reason` is shown to the operator.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn hold_send(
        &self,
        id: i64,
        reason: &'static str,
        until_ms: i64,
        detail: String,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET hold = ?2, next_attempt_ms = ?3, last_error = ?4,
                 updated_ms = ?5 WHERE id = ?1",
                params![id, reason, until_ms, detail, now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Makes held sends due now: those to `recipient` (or every recipient with `None`) held
    /// for `reason`. Returns how many were released.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn release_holds(
        &self,
        recipient: Option<String>,
        reason: &'static str,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET hold = NULL, next_attempt_ms = ?3, updated_ms = ?3
                 WHERE state = 'pending' AND hold = ?2 AND (?1 IS NULL OR recipient = ?1)",
                params![recipient, reason, now_ms],
            )
        })
        .await
    }

    /// Lists queue rows, newest first, optionally of one state.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn list_sends(
        &self,
        state: Option<SendState>,
        limit: u32,
    ) -> Result<Vec<SendRow>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, client_msg_id, origin, recipient, state, hold, attempts,
                        next_attempt_ms, last_error, message_id, request_json
                 FROM outbox WHERE (?1 IS NULL OR state = ?1) ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![state.map(SendState::as_str), limit], |r| {
                Ok(SendRow {
                    id: r.get(0)?,
                    client_msg_id: r.get(1)?,
                    origin: r.get(2)?,
                    recipient: r.get(3)?,
                    state: r.get(4)?,
                    hold: r.get(5)?,
                    attempts: r.get(6)?,
                    next_attempt_ms: r.get(7)?,
                    last_error: r.get(8)?,
                    message_id: r.get(9)?,
                    request_json: r.get(10)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The row id of the send with `client_msg_id`, if queued.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn send_row_id(&self, client_msg_id: &str) -> Result<Option<i64>, StoreError> {
        let key = client_msg_id.to_owned();
        self.call(move |c| {
            use rusqlite::OptionalExtension;
            c.query_row("SELECT id FROM outbox WHERE client_msg_id = ?1", [key], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// Records that the `before-send` hooks passed a send, with the body they left.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn mark_vetted(
        &self,
        id: i64,
        request_json: String,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET vetted = 1, request_json = ?2, updated_ms = ?3
                 WHERE id = ?1 AND state = 'pending'",
                params![id, request_json, now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Puts a dead letter back in the queue with a fresh attempt budget. Returns false when
    /// no dead letter has that id.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn retry_dead(&self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, hold = NULL, vetted = 0,
                 next_attempt_ms = ?2, updated_ms = ?2 WHERE id = ?1 AND state = 'dead'",
                params![id, now_ms],
            )
            .map(|n| n > 0)
        })
        .await
    }

    /// Removes a pending or dead send for good. Returns false when no such row exists (sent
    /// rows are history and cannot be dropped).
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn drop_send(&self, id: i64) -> Result<bool, StoreError> {
        self.call(move |c| {
            c.execute("DELETE FROM outbox WHERE id = ?1 AND state != 'sent'", params![id])
                .map(|n| n > 0)
        })
        .await
    }

    /// Pending sends held back, by reason.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn held_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(
                "SELECT hold, COUNT(*) FROM outbox WHERE state = 'pending' AND hold IS NOT NULL
                 GROUP BY hold ORDER BY hold",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }
}

pub(super) fn insert_send(c: &Connection, send: &NewSend, now_ms: i64) -> rusqlite::Result<usize> {
    c.execute(
        "INSERT OR IGNORE INTO outbox (client_msg_id, lane, request_json, origin, recipient,
         state, next_attempt_ms, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?6)",
        params![
            send.client_msg_id,
            send.lane,
            send.request_json,
            send.origin,
            send.recipient,
            now_ms
        ],
    )
}
