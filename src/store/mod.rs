//! Local durable state in one SQLite file: the sync cursor, the ids of processed messages, the
//! outbound queue ([`queue`]), the ledger of threads with peers ([`ledger`]), the plugins'
//! key-value state ([`kv`]) and quarantined inbound data.
//!
//! The invariant that makes restarts safe lives here: a message is recorded as processed in the
//! same transaction that queues its replies, so after a crash either both exist or neither
//! does. The inbox acknowledges a message to the server only after that transaction commits.
//! The file carries a schema version (`PRAGMA user_version`) and is migrated on open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

mod kv;
mod ledger;
mod queue;

pub use kv::{KV_MAX_KEY_BYTES, KV_MAX_VALUE_BYTES, KvWrite};
pub use ledger::{PeerState, PeerThread};
use queue::insert_send;
pub use queue::{NewSend, OutboxCounts, PendingSend, SendRow, SendState};

/// Schema version written by this build.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE processed (
    message_id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    seq INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    replies INTEGER NOT NULL,
    processed_ms INTEGER NOT NULL
);
CREATE INDEX processed_conversation ON processed (conversation_id, processed_ms);
CREATE INDEX processed_sender ON processed (sender, processed_ms);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_msg_id TEXT NOT NULL UNIQUE,
    lane TEXT NOT NULL,
    request_json TEXT NOT NULL,
    origin TEXT NOT NULL,
    recipient TEXT,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    hold TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    message_id TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX outbox_lane_pending ON outbox (state, lane, id);
CREATE INDEX outbox_recipient_hold ON outbox (recipient, hold);
CREATE TABLE peers (
    handle TEXT PRIMARY KEY,
    conversation_id TEXT,
    state TEXT NOT NULL CHECK (state IN ('established', 'awaiting')),
    opened_ms INTEGER,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX peers_awaiting ON peers (state, opened_ms);
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    raw TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
";

/// Version 2: whether a queued send has been through the `before-send` hooks, and the
/// plugins' key-value state.
const SCHEMA_V2: &str = "
ALTER TABLE outbox ADD COLUMN vetted INTEGER NOT NULL DEFAULT 0;
CREATE TABLE plugin_kv (
    plugin TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_ms INTEGER,
    PRIMARY KEY (plugin, key)
) WITHOUT ROWID;
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

/// The identity of an inbound message, as the store records it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// `msg_…`.
    pub id: &'a str,
    /// Its conversation.
    pub conversation_id: &'a str,
    /// Its sender's handle.
    pub sender: &'a str,
    /// Its per-conversation sequence number.
    pub seq: u64,
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
        std::fs::create_dir_all(state_dir)
            .map_err(|source| StoreError::CreateDir { path: state_dir.to_path_buf(), source })?;
        let path = state_dir.join("state.sqlite3");
        let sql = |source| StoreError::Sqlite { path: path.clone(), source };
        let conn = Connection::open(&path).map_err(sql)?;
        // WAL lets readers run beside the writer; FULL makes every commit survive power loss,
        // which the exactly-once promise needs more than it needs the last millisecond.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(sql)?;
        migrate(&conn).map_err(|err| match err {
            Migration::Sqlite(source) => StoreError::Sqlite { path: path.clone(), source },
            Migration::TooNew(found) => StoreError::TooNew { path: path.clone(), found },
        })?;
        Ok(Self { inner: Arc::new(Mutex::new(conn)), path })
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
            let mut conn = inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
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
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
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
            c.query_row("SELECT 1 FROM processed WHERE message_id = ?1", [id], |_| Ok(()))
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
        message: Inbound<'_>,
        outcome: &str,
        sends: Vec<NewSend>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (id, conv, sender, outcome) = (
            message.id.to_owned(),
            message.conversation_id.to_owned(),
            message.sender.to_owned(),
            outcome.to_owned(),
        );
        let seq = i64::try_from(message.seq).unwrap_or(i64::MAX);
        let replies = i64::try_from(sends.len()).unwrap_or(i64::MAX);
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO processed (message_id, conversation_id, sender, seq,
                 outcome, replies, processed_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![id, conv, sender, seq, outcome, replies, now_ms],
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

    /// Automatic replies queued since `since_ms`: (in `conversation_id`, to `sender` anywhere).
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn recent_replies(
        &self,
        conversation_id: &str,
        sender: &str,
        since_ms: i64,
    ) -> Result<(u64, u64), StoreError> {
        let (conv, sender) = (conversation_id.to_owned(), sender.to_owned());
        self.call(move |c| {
            let count = |column: &str, value: &str| {
                c.query_row(
                    &format!(
                        "SELECT COALESCE(SUM(replies), 0) FROM processed
                         WHERE {column} = ?1 AND processed_ms > ?2"
                    ),
                    params![value, since_ms],
                    |r| r.get::<_, u64>(0),
                )
            };
            Ok((count("conversation_id", &conv)?, count("sender", &sender)?))
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
        self.call(|c| c.query_row("SELECT COUNT(*) FROM quarantine", [], |r| r.get(0))).await
    }
}

enum Migration {
    Sqlite(rusqlite::Error),
    TooNew(i64),
}

/// Brings the schema to [`SCHEMA_VERSION`]. The version is read inside a write transaction, so
/// two processes opening a new file at once (the daemon and an operator command) cannot both
/// create the schema.
fn migrate(conn: &Connection) -> Result<(), Migration> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(Migration::Sqlite)?;
    let result = (|| {
        let version: i64 =
            conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(Migration::Sqlite)?;
        // Each step runs inside the one transaction, so a crash mid-way leaves the old
        // version intact.
        let steps: [(i64, &str); 2] = [(1, SCHEMA_V1), (2, SCHEMA_V2)];
        if version > SCHEMA_VERSION {
            return Err(Migration::TooNew(version));
        }
        for (target, sql) in steps {
            if version < target {
                conn.execute_batch(&format!("{sql} PRAGMA user_version = {target};"))
                    .map_err(Migration::Sqlite)?;
            }
        }
        Ok(())
    })();
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    conn.execute_batch(end).map_err(Migration::Sqlite)?;
    result
}

#[cfg(test)]
mod tests;
