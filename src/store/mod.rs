//! Local durable state in one SQLite file: the sync cursor, the ids of processed messages and
//! the outbound queue.
//!
//! The invariant that makes restarts safe lives here: a message is recorded as processed in the
//! same transaction that queues its replies, so after a crash either both exist or neither
//! does. The inbox acknowledges a message to the server only after that transaction commits.
//! The file carries a schema version (`PRAGMA user_version`) and is migrated on open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

/// Schema version written by this build.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE processed (
    message_id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    processed_ms INTEGER NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_msg_id TEXT NOT NULL UNIQUE,
    lane TEXT NOT NULL,
    request_json TEXT NOT NULL,
    origin TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    message_id TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX outbox_lane_pending ON outbox (state, lane, id);
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    raw TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
";

/// A state-store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The file was written by a newer agentchatd.
    #[error(
        "state database {path} has schema version {found}, newer than this build's \
         {SCHEMA_VERSION}; run the newer agentchatd or move the file away"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
    /// A blocking task running a store operation died.
    #[error("state store task failed: {0}")]
    Task(String),
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
    /// Attempts made so far.
    pub attempts: u32,
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

/// A handle to the state database, cheap to clone and safe to share between tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) `state_dir/state.sqlite3` and migrates it.
    ///
    /// # Errors
    /// When the directory or file cannot be created or the schema is newer than this build.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("state.sqlite3");
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        // WAL lets readers run beside the writer; FULL makes every commit survive power loss,
        // which the exactly-once promise needs more than it needs the last millisecond.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(sql)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql)?;
        match version {
            0 => conn
                .execute_batch(&format!(
                    "BEGIN; {SCHEMA_V1} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(sql)?,
            SCHEMA_VERSION => {}
            found => return Err(StoreError::TooNew { path, found }),
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection in a blocking thread, so SQLite's fsyncs never stall the
    /// async runtime.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // A poisoned lock only means another store call panicked mid-way; SQLite rolled
            // that transaction back, so the connection is still consistent.
            let mut conn = inner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn).map_err(|source| StoreError::Sqlite { path, source })
        })
        .await
        .map_err(|err| StoreError::Task(err.to_string()))?
    }

    /// Reads a value from the key-value table.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn meta(&self, key: &'static str) -> Result<Option<String>, StoreError> {
        self.call(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
        .await
    }

    /// Writes a value to the key-value table.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn set_meta(&self, key: &'static str, value: String) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(drop)
        })
        .await
    }

    /// Whether a message was already processed.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn is_processed(&self, message_id: &str) -> Result<bool, StoreError> {
        let id = message_id.to_owned();
        self.call(move |c| {
            c.query_row(
                "SELECT 1 FROM processed WHERE message_id = ?1",
                [id],
                |_| Ok(()),
            )
            .optional()
            .map(|row| row.is_some())
        })
        .await
    }

    /// Records a message as processed and queues its sends, atomically. Returns false (and
    /// changes nothing) when the message was already recorded.
    ///
    /// # Errors
    /// On SQLite failure; then nothing was recorded.
    pub async fn record_processed(
        &self,
        message_id: &str,
        conversation_id: &str,
        seq: u64,
        outcome: &str,
        sends: Vec<NewSend>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (id, conv, outcome) = (
            message_id.to_owned(),
            conversation_id.to_owned(),
            outcome.to_owned(),
        );
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.call(move |c| {
            let tx = c.transaction()?;
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO processed (message_id, conversation_id, seq, outcome,
                 processed_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, conv, seq, outcome, now_ms],
            )?;
            if inserted == 0 {
                return Ok(false);
            }
            for send in &sends {
                insert_send(&tx, send, now_ms)?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Queues one send outside of message processing. Returns false when a send with the
    /// same `client_msg_id` is already queued.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn enqueue(&self, send: NewSend, now_ms: i64) -> Result<bool, StoreError> {
        self.call(move |c| insert_send(c, &send, now_ms).map(|n| n > 0))
            .await
    }

    /// The sends that may go now: the oldest pending send of each lane, if it is due.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn due_sends(&self, now_ms: i64, limit: u32) -> Result<Vec<PendingSend>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT o.id, o.client_msg_id, o.lane, o.request_json, o.origin, o.attempts
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
                    attempts: r.get(5)?,
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
                 last_error = NULL, updated_ms = ?3 WHERE id = ?1",
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
                "UPDATE outbox SET next_attempt_ms = ?2, last_error = ?3,
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
                 updated_ms = ?3 WHERE id = ?1",
                params![id, error, now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Keeps an inbound item the daemon could not read, so nothing received is lost even when
    /// it cannot be processed.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn quarantine(
        &self,
        source: &'static str,
        raw: String,
        reason: String,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO quarantine (source, raw, reason, received_ms) VALUES (?1, ?2, ?3, ?4)",
                params![source, raw, reason, now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// How many inbound items were quarantined.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn quarantined(&self) -> Result<u64, StoreError> {
        self.call(|c| c.query_row("SELECT COUNT(*) FROM quarantine", [], |r| r.get(0)))
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
}

fn insert_send(c: &Connection, send: &NewSend, now_ms: i64) -> rusqlite::Result<usize> {
    c.execute(
        "INSERT OR IGNORE INTO outbox (client_msg_id, lane, request_json, origin, state,
         next_attempt_ms, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5, ?5)",
        params![
            send.client_msg_id,
            send.lane,
            send.request_json,
            send.origin,
            now_ms
        ],
    )
}

#[cfg(test)]
mod tests;
