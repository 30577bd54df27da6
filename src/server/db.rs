//! SQLite storage of the local server: the schema, the single shared connection and the queries
//! every route needs. It knows nothing about HTTP; callers decide what a missing row means.
//!
//! One connection sits behind a std mutex. No `.await` ever happens while it is held, so a
//! blocking lock is both correct and cheaper than an async one; queries are short.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Value, json};

/// Bumped whenever the schema below changes shape.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    handle TEXT NOT NULL UNIQUE,
    email TEXT NOT NULL,
    display_name TEXT,
    description TEXT,
    api_key_hash TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'active',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_registrations (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    handle TEXT NOT NULL,
    display_name TEXT,
    description TEXT,
    created_ms INTEGER NOT NULL,
    failed_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    agent_lo TEXT NOT NULL REFERENCES agents(id),
    agent_hi TEXT NOT NULL REFERENCES agents(id),
    initiator_id TEXT NOT NULL REFERENCES agents(id),
    established INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    last_message_at TEXT,
    UNIQUE (agent_lo, agent_hi)
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    sender_id TEXT NOT NULL REFERENCES agents(id),
    client_msg_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (sender_id, client_msg_id),
    UNIQUE (conversation_id, seq)
);
CREATE TABLE IF NOT EXISTS envelopes (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id TEXT NOT NULL UNIQUE,
    message_id TEXT NOT NULL REFERENCES messages(id),
    recipient_id TEXT NOT NULL REFERENCES agents(id),
    status TEXT NOT NULL DEFAULT 'stored',
    created_at TEXT NOT NULL,
    delivered_at TEXT,
    read_at TEXT,
    UNIQUE (message_id, recipient_id)
);
CREATE INDEX IF NOT EXISTS envelopes_by_recipient ON envelopes (recipient_id, status, pos);
CREATE TABLE IF NOT EXISTS contacts (
    owner_id TEXT NOT NULL REFERENCES agents(id),
    contact_id TEXT NOT NULL REFERENCES agents(id),
    added_at TEXT NOT NULL,
    PRIMARY KEY (owner_id, contact_id)
);
CREATE TABLE IF NOT EXISTS hidden_messages (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    message_id TEXT NOT NULL REFERENCES messages(id),
    hidden_at TEXT NOT NULL,
    PRIMARY KEY (agent_id, message_id)
);
";

/// The one SQLite connection of a server.
pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens (or creates) the database file, or an in-memory one for `None`, and applies the
    /// schema.
    pub fn open(path: Option<&Path>) -> Result<Db, rusqlite::Error> {
        let conn = match path {
            Some(path) => Connection::open(path)?,
            None => Connection::open_in_memory()?,
        };
        // WAL keeps readers of the file (e.g. a developer's sqlite3 shell) from blocking us.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")?;
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Db { conn: Mutex::new(conn) })
    }

    /// Locks the connection. A poisoned lock only means another request panicked mid-query;
    /// SQLite rolled its transaction back, so the connection is still usable.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An agent as stored.
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub id: String,
    pub handle: String,
    pub email: String,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

const AGENT_COLUMNS: &str =
    "id, handle, email, display_name, description, status, created_at, updated_at";

fn agent_from_row(row: &Row<'_>) -> rusqlite::Result<AgentRow> {
    Ok(AgentRow {
        id: row.get(0)?,
        handle: row.get(1)?,
        email: row.get(2)?,
        display_name: row.get(3)?,
        description: row.get(4)?,
        status: row.get(5)?,
        created_at: row.get(6)?,
        updated_at: row.get(7)?,
    })
}

/// Finds the agent whose key hashes to `key_hash`; only states allowed to authenticate match.
pub fn agent_by_key_hash(conn: &Connection, key_hash: &str) -> rusqlite::Result<Option<AgentRow>> {
    let sql = format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE api_key_hash = ?1 \
         AND status IN ('active', 'restricted', 'suspended')"
    );
    conn.query_row(&sql, [key_hash], agent_from_row).optional()
}

/// Finds an agent by its (already normalised) handle, whatever its state.
pub fn agent_by_handle(conn: &Connection, handle: &str) -> rusqlite::Result<Option<AgentRow>> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE handle = ?1");
    conn.query_row(&sql, [handle], agent_from_row).optional()
}

/// Whether a live (not deleted) agent is registered with `email`.
pub fn email_in_use(conn: &Connection, email: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT 1 FROM agents WHERE email = ?1 COLLATE NOCASE AND status != 'deleted' LIMIT 1",
        [email],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
}

/// Inserts a new active agent.
pub fn insert_agent(conn: &Connection, agent: &AgentRow, key_hash: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO agents (id, handle, email, display_name, description, api_key_hash, status, \
         created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            agent.id,
            agent.handle,
            agent.email,
            agent.display_name,
            agent.description,
            key_hash,
            agent.status,
            agent.created_at,
            agent.updated_at
        ],
    )?;
    Ok(())
}

/// A registration waiting for its verification code.
#[derive(Debug, Clone)]
pub struct PendingRow {
    pub id: String,
    pub email: String,
    pub handle: String,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub created_ms: i64,
    pub failed_attempts: i64,
}

/// Stores a pending registration.
pub fn insert_pending(conn: &Connection, pending: &PendingRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO pending_registrations (id, email, handle, display_name, description, \
         created_ms, failed_attempts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
        params![
            pending.id,
            pending.email,
            pending.handle,
            pending.display_name,
            pending.description,
            pending.created_ms
        ],
    )?;
    Ok(())
}

/// Loads a pending registration by id.
pub fn pending_by_id(conn: &Connection, id: &str) -> rusqlite::Result<Option<PendingRow>> {
    conn.query_row(
        "SELECT id, email, handle, display_name, description, created_ms, failed_attempts \
         FROM pending_registrations WHERE id = ?1",
        [id],
        |row| {
            Ok(PendingRow {
                id: row.get(0)?,
                email: row.get(1)?,
                handle: row.get(2)?,
                display_name: row.get(3)?,
                description: row.get(4)?,
                created_ms: row.get(5)?,
                failed_attempts: row.get(6)?,
            })
        },
    )
    .optional()
}

/// Counts one more wrong code against a pending registration.
pub fn bump_pending_attempts(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE pending_registrations SET failed_attempts = failed_attempts + 1 WHERE id = ?1",
        [id],
    )?;
    Ok(())
}

/// Forgets a pending registration (used or burnt).
pub fn delete_pending(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM pending_registrations WHERE id = ?1", [id])?;
    Ok(())
}

/// A direct conversation between two agents.
#[derive(Debug, Clone)]
pub struct ConversationRow {
    pub id: String,
    pub agent_lo: String,
    pub agent_hi: String,
    pub initiator_id: String,
    pub established: bool,
    pub created_at: String,
}

impl ConversationRow {
    /// Whether `agent_id` takes part in this conversation.
    pub fn has(&self, agent_id: &str) -> bool {
        self.agent_lo == agent_id || self.agent_hi == agent_id
    }
}

const CONVERSATION_COLUMNS: &str = "id, agent_lo, agent_hi, initiator_id, established, created_at";

fn conversation_from_row(row: &Row<'_>) -> rusqlite::Result<ConversationRow> {
    Ok(ConversationRow {
        id: row.get(0)?,
        agent_lo: row.get(1)?,
        agent_hi: row.get(2)?,
        initiator_id: row.get(3)?,
        established: row.get::<_, i64>(4)? != 0,
        created_at: row.get(5)?,
    })
}

/// Orders a pair of agent ids so each pair maps to one row.
pub fn ordered_pair<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    if a <= b { (a, b) } else { (b, a) }
}

/// The direct conversation between two agents, if any.
pub fn conversation_between(
    conn: &Connection,
    a: &str,
    b: &str,
) -> rusqlite::Result<Option<ConversationRow>> {
    let (lo, hi) = ordered_pair(a, b);
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE agent_lo = ?1 AND agent_hi = ?2"
    );
    conn.query_row(&sql, [lo, hi], conversation_from_row).optional()
}

/// A conversation by id.
pub fn conversation_by_id(
    conn: &Connection,
    id: &str,
) -> rusqlite::Result<Option<ConversationRow>> {
    let sql = format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?1");
    conn.query_row(&sql, [id], conversation_from_row).optional()
}

/// Creates a direct conversation opened by `initiator`.
pub fn insert_conversation(
    conn: &Connection,
    conv: &ConversationRow,
    created_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO conversations (id, agent_lo, agent_hi, initiator_id, established, \
         created_at, created_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6)",
        params![
            conv.id,
            conv.agent_lo,
            conv.agent_hi,
            conv.initiator_id,
            conv.created_at,
            created_ms
        ],
    )?;
    Ok(())
}

/// Marks a conversation as answered and lists each side as the other's contact.
pub fn establish_conversation(
    conn: &Connection,
    conv: &ConversationRow,
    now: &str,
) -> rusqlite::Result<()> {
    conn.execute("UPDATE conversations SET established = 1 WHERE id = ?1", [&conv.id])?;
    for (owner, contact) in [(&conv.agent_lo, &conv.agent_hi), (&conv.agent_hi, &conv.agent_lo)] {
        conn.execute(
            "INSERT OR IGNORE INTO contacts (owner_id, contact_id, added_at) VALUES (?1, ?2, ?3)",
            params![owner, contact, now],
        )?;
    }
    Ok(())
}

/// Unanswered conversations `initiator` opened at or after `since_ms`.
pub fn count_cold_since(
    conn: &Connection,
    initiator: &str,
    since_ms: i64,
) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COUNT(*) FROM conversations WHERE initiator_id = ?1 AND established = 0 \
         AND created_ms >= ?2",
        params![initiator, since_ms],
        |row| row.get(0),
    )
}

/// Reserves the next `seq` of a conversation. Must run inside the send transaction so the
/// number and the message row commit together.
pub fn next_seq(conn: &Connection, conversation_id: &str, now: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "UPDATE conversations SET last_seq = last_seq + 1, last_message_at = ?2 WHERE id = ?1 \
         RETURNING last_seq",
        params![conversation_id, now],
        |row| row.get(0),
    )
}

/// A stored message joined with its sender's handle.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub id: String,
    pub conversation_id: String,
    pub sender_id: String,
    pub sender_handle: String,
    pub client_msg_id: String,
    pub seq: i64,
    pub kind: String,
    pub content: String,
    pub metadata: String,
    pub created_at: String,
}

impl MessageRow {
    /// The nine base fields every message surface carries.
    pub fn base_json(&self) -> Value {
        // Stored JSON was produced by us; a parse failure would mean a corrupt file, which we
        // surface as null rather than failing the whole page.
        let content: Value = serde_json::from_str(&self.content).unwrap_or(Value::Null);
        let metadata: Value = serde_json::from_str(&self.metadata).unwrap_or(Value::Null);
        json!({
            "id": self.id,
            "conversation_id": self.conversation_id,
            "sender": self.sender_handle,
            "client_msg_id": self.client_msg_id,
            "seq": self.seq,
            "type": self.kind,
            "content": content,
            "metadata": metadata,
            "created_at": self.created_at,
        })
    }
}

const MESSAGE_COLUMNS: &str = "m.id, m.conversation_id, m.sender_id, a.handle, m.client_msg_id, \
     m.seq, m.type, m.content, m.metadata, m.created_at";

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        id: row.get(0)?,
        conversation_id: row.get(1)?,
        sender_id: row.get(2)?,
        sender_handle: row.get(3)?,
        client_msg_id: row.get(4)?,
        seq: row.get(5)?,
        kind: row.get(6)?,
        content: row.get(7)?,
        metadata: row.get(8)?,
        created_at: row.get(9)?,
    })
}

/// The message a sender already stored under `client_msg_id`, if any.
pub fn message_by_client_id(
    conn: &Connection,
    sender_id: &str,
    client_msg_id: &str,
) -> rusqlite::Result<Option<MessageRow>> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m JOIN agents a ON a.id = m.sender_id \
         WHERE m.sender_id = ?1 AND m.client_msg_id = ?2"
    );
    conn.query_row(&sql, [sender_id, client_msg_id], message_from_row).optional()
}

/// A message by id.
pub fn message_by_id(conn: &Connection, id: &str) -> rusqlite::Result<Option<MessageRow>> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m JOIN agents a ON a.id = m.sender_id \
         WHERE m.id = ?1"
    );
    conn.query_row(&sql, [id], message_from_row).optional()
}

/// Inserts a message row.
pub fn insert_message(conn: &Connection, msg: &MessageRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO messages (id, conversation_id, sender_id, client_msg_id, seq, type, \
         content, metadata, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            msg.id,
            msg.conversation_id,
            msg.sender_id,
            msg.client_msg_id,
            msg.seq,
            msg.kind,
            msg.content,
            msg.metadata,
            msg.created_at
        ],
    )?;
    Ok(())
}

/// Inserts a `stored` envelope for one recipient.
pub fn insert_envelope(
    conn: &Connection,
    delivery_id: &str,
    message_id: &str,
    recipient_id: &str,
    now: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO envelopes (delivery_id, message_id, recipient_id, status, created_at) \
         VALUES (?1, ?2, ?3, 'stored', ?4)",
        params![delivery_id, message_id, recipient_id, now],
    )?;
    Ok(())
}

/// How many envelopes of a recipient are still `stored`.
pub fn count_stored(conn: &Connection, recipient_id: &str) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COUNT(*) FROM envelopes WHERE recipient_id = ?1 AND status = 'stored'",
        [recipient_id],
        |row| row.get(0),
    )
}

/// Envelope state as shown on history and read surfaces.
#[derive(Debug, Clone)]
pub struct EnvelopeState {
    pub delivery_id: String,
    pub status: String,
    pub delivered_at: Option<String>,
    pub read_at: Option<String>,
}

/// A message together with one envelope (or none, for a sender's own view).
#[derive(Debug, Clone)]
pub struct MessageWithEnvelope {
    pub message: MessageRow,
    pub envelope: Option<EnvelopeState>,
}

fn envelope_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<Option<EnvelopeState>> {
    let delivery_id: Option<String> = row.get(first)?;
    Ok(match delivery_id {
        None => None,
        Some(delivery_id) => Some(EnvelopeState {
            delivery_id,
            status: row.get(first + 1)?,
            delivered_at: row.get(first + 2)?,
            read_at: row.get(first + 3)?,
        }),
    })
}

/// `stored` envelopes of a recipient in envelope order, strictly after position `after_pos`.
pub fn stored_page(
    conn: &Connection,
    recipient_id: &str,
    after_pos: i64,
    limit: u32,
) -> rusqlite::Result<Vec<MessageWithEnvelope>> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS}, e.delivery_id, e.status, e.delivered_at, e.read_at \
         FROM envelopes e JOIN messages m ON m.id = e.message_id \
         JOIN agents a ON a.id = m.sender_id \
         WHERE e.recipient_id = ?1 AND e.status = 'stored' AND e.pos > ?2 \
         ORDER BY e.pos LIMIT ?3"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![recipient_id, after_pos, limit], |row| {
        Ok(MessageWithEnvelope {
            message: message_from_row(row)?,
            envelope: envelope_from_row(row, 10)?,
        })
    })?;
    rows.collect()
}

/// Position of a delivery id, only if it belongs to `recipient_id`.
pub fn envelope_pos(
    conn: &Connection,
    recipient_id: &str,
    delivery_id: &str,
) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT pos FROM envelopes WHERE delivery_id = ?1 AND recipient_id = ?2",
        [delivery_id, recipient_id],
        |row| row.get(0),
    )
    .optional()
}

/// Marks every `stored` envelope of a recipient at or before `pos` delivered.
pub fn ack_through(
    conn: &Connection,
    recipient_id: &str,
    pos: i64,
    now: &str,
) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE envelopes SET status = 'delivered', delivered_at = ?3 \
         WHERE recipient_id = ?1 AND status = 'stored' AND pos <= ?2",
        params![recipient_id, pos, now],
    )
}

/// Marks one recipient's envelope of a message delivered if it is still `stored`.
pub fn mark_delivered(
    conn: &Connection,
    recipient_id: &str,
    message_id: &str,
    now: &str,
) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE envelopes SET status = 'delivered', delivered_at = ?3 \
         WHERE recipient_id = ?1 AND message_id = ?2 AND status = 'stored'",
        params![recipient_id, message_id, now],
    )
}

/// Marks one recipient's envelope read; `read_at` is set only the first time.
/// Returns false when the caller holds no envelope for that message.
pub fn mark_read(
    conn: &Connection,
    recipient_id: &str,
    message_id: &str,
    now: &str,
) -> rusqlite::Result<bool> {
    let changed = conn.execute(
        "UPDATE envelopes SET status = 'read', read_at = COALESCE(read_at, ?3) \
         WHERE recipient_id = ?1 AND message_id = ?2",
        params![recipient_id, message_id, now],
    )?;
    Ok(changed > 0)
}

/// One recipient's envelope of a message.
pub fn envelope_of(
    conn: &Connection,
    recipient_id: &str,
    message_id: &str,
) -> rusqlite::Result<Option<EnvelopeState>> {
    conn.query_row(
        "SELECT delivery_id, status, delivered_at, read_at FROM envelopes \
         WHERE recipient_id = ?1 AND message_id = ?2",
        [recipient_id, message_id],
        |row| envelope_from_row(row, 0),
    )
    .optional()
    .map(Option::flatten)
}

/// Which end of a conversation a history page starts from.
#[derive(Debug, Clone, Copy)]
pub enum HistoryCursor {
    /// Newest first, optionally only seqs below the bound.
    Before(Option<i64>),
    /// Oldest first, only seqs above the bound.
    After(i64),
}

/// A page of a direct conversation's history as seen by `viewer_id`, each row with the
/// recipient's envelope (so a sender sees the other side's delivery state).
pub fn history_page(
    conn: &Connection,
    conversation_id: &str,
    viewer_id: &str,
    cursor: HistoryCursor,
    limit: u32,
) -> rusqlite::Result<Vec<MessageWithEnvelope>> {
    let (filter, order, bound) = match cursor {
        HistoryCursor::Before(None) => ("", "DESC", 0),
        HistoryCursor::Before(Some(seq)) => ("AND m.seq < ?3", "DESC", seq),
        HistoryCursor::After(seq) => ("AND m.seq > ?3", "ASC", seq),
    };
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS}, e.delivery_id, e.status, e.delivered_at, e.read_at \
         FROM messages m JOIN agents a ON a.id = m.sender_id \
         LEFT JOIN envelopes e ON e.message_id = m.id AND e.recipient_id != m.sender_id \
         WHERE m.conversation_id = ?1 \
         AND NOT EXISTS (SELECT 1 FROM hidden_messages h WHERE h.agent_id = ?2 \
                         AND h.message_id = m.id) \
         {filter} ORDER BY m.seq {order} LIMIT ?4"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![conversation_id, viewer_id, bound, limit], |row| {
        Ok(MessageWithEnvelope {
            message: message_from_row(row)?,
            envelope: envelope_from_row(row, 10)?,
        })
    })?;
    rows.collect()
}

/// Hides a message from one agent's view and advances its `stored` envelope to `delivered`.
pub fn hide_message(
    conn: &Connection,
    agent_id: &str,
    message_id: &str,
    now: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO hidden_messages (agent_id, message_id, hidden_at) \
         VALUES (?1, ?2, ?3)",
        params![agent_id, message_id, now],
    )?;
    mark_delivered(conn, agent_id, message_id, now)?;
    Ok(())
}

/// One row of an agent's conversation list.
#[derive(Debug, Clone)]
pub struct ConversationListRow {
    pub id: String,
    pub created_at: String,
    pub last_message_at: Option<String>,
    pub other_handle: String,
    pub other_display_name: Option<String>,
    pub last_sender_id: Option<String>,
    pub last_type: Option<String>,
    pub last_content: Option<String>,
}

/// The caller's direct conversations, most recent message first, at most `limit`.
pub fn conversation_list(
    conn: &Connection,
    agent_id: &str,
    limit: u32,
) -> rusqlite::Result<Vec<ConversationListRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.id, c.created_at, c.last_message_at, o.handle, o.display_name, \
         m.sender_id, m.type, m.content \
         FROM conversations c \
         JOIN agents o ON o.id = CASE WHEN c.agent_lo = ?1 THEN c.agent_hi ELSE c.agent_lo END \
         LEFT JOIN messages m ON m.conversation_id = c.id AND m.seq = c.last_seq \
         WHERE c.agent_lo = ?1 OR c.agent_hi = ?1 \
         ORDER BY c.last_message_at IS NULL, c.last_message_at DESC, m.rowid DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![agent_id, limit], |row| {
        Ok(ConversationListRow {
            id: row.get(0)?,
            created_at: row.get(1)?,
            last_message_at: row.get(2)?,
            other_handle: row.get(3)?,
            other_display_name: row.get(4)?,
            last_sender_id: row.get(5)?,
            last_type: row.get(6)?,
            last_content: row.get(7)?,
        })
    })?;
    rows.collect()
}
