//! The ledger of direct threads with peers, which is how the daemon keeps the platform's
//! cold-outreach rules without ever being told no.
//!
//! A peer is `established` once it has written to the agent (a reply to a thread the agent
//! opened, or a thread it opened itself). A thread the agent opened stays `awaiting` until then:
//! the platform allows one message into it and counts it against the agent's 100 new threads
//! per rolling 24 hours.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

/// Where the agent stands with one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// The peer has written to the agent: sends flow freely.
    Established,
    /// The agent opened the thread and awaits a reply: no second message yet.
    Awaiting {
        /// When the thread was opened, in ms since the epoch.
        opened_ms: i64,
    },
}

/// One awaiting thread, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerThread {
    /// The peer's handle.
    pub handle: String,
    /// When the agent opened the thread.
    pub opened_ms: i64,
}

impl Store {
    /// Where the agent stands with `handle`; `None` when they never exchanged a message.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn peer_state(&self, handle: &str) -> Result<Option<PeerState>, StoreError> {
        let handle = handle.to_owned();
        self.call(move |c| {
            c.query_row("SELECT state, opened_ms FROM peers WHERE handle = ?1", [handle], |r| {
                let state: String = r.get(0)?;
                let opened_ms: Option<i64> = r.get(1)?;
                Ok(match state.as_str() {
                    "awaiting" => PeerState::Awaiting { opened_ms: opened_ms.unwrap_or(0) },
                    _ => PeerState::Established,
                })
            })
            .optional()
        })
        .await
    }

    /// Records that `handle` wrote to the agent in a direct conversation, and releases sends
    /// that were waiting for it. Returns true when this established a thread that was awaiting
    /// a reply (which also frees a cold-outreach slot).
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn note_peer_wrote(
        &self,
        handle: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (handle, conversation) = (handle.to_owned(), conversation_id.to_owned());
        self.call(move |c| {
            // IMMEDIATE: this transaction reads before it writes, and a read snapshot cannot be
            // upgraded to a write while another connection (an operator command) writes.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let was_awaiting = tx
                .query_row("SELECT state FROM peers WHERE handle = ?1", [&handle], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?
                .is_some_and(|state| state == "awaiting");
            tx.execute(
                "INSERT INTO peers (handle, conversation_id, state, updated_ms)
                 VALUES (?1, ?2, 'established', ?3)
                 ON CONFLICT (handle) DO UPDATE SET state = 'established',
                   conversation_id = excluded.conversation_id, updated_ms = excluded.updated_ms",
                params![handle, conversation, now_ms],
            )?;
            if was_awaiting {
                tx.execute(
                    "UPDATE outbox SET hold = NULL, next_attempt_ms = ?2, updated_ms = ?2
                     WHERE state = 'pending' AND recipient = ?1 AND hold = 'awaiting_reply'",
                    params![handle, now_ms],
                )?;
                // The freed cold slot may let a thread held by the cap open now.
                tx.execute(
                    "UPDATE outbox SET hold = NULL, next_attempt_ms = ?1, updated_ms = ?1
                     WHERE state = 'pending' AND hold = 'cold_cap'",
                    params![now_ms],
                )?;
            }
            tx.commit()?;
            Ok(was_awaiting)
        })
        .await
    }

    /// Records that the agent opened a thread with `handle` (its first message was accepted,
    /// or the server said the thread awaits a reply). Keeps an established peer established.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn note_thread_opened(
        &self,
        handle: &str,
        conversation_id: Option<String>,
        opened_ms: i64,
    ) -> Result<(), StoreError> {
        let handle = handle.to_owned();
        self.call(move |c| {
            c.execute(
                "INSERT INTO peers (handle, conversation_id, state, opened_ms, updated_ms)
                 VALUES (?1, ?2, 'awaiting', ?3, ?3)
                 ON CONFLICT (handle) DO NOTHING",
                params![handle, conversation_id, opened_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Threads the agent opened since `since_ms` that still await a reply, oldest first:
    /// the cold-outreach slots in use.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn awaiting_threads(&self, since_ms: i64) -> Result<Vec<PeerThread>, StoreError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT handle, opened_ms FROM peers
                 WHERE state = 'awaiting' AND opened_ms > ?1 ORDER BY opened_ms",
            )?;
            let rows = stmt.query_map([since_ms], |r| {
                Ok(PeerThread { handle: r.get(0)?, opened_ms: r.get(1)? })
            })?;
            rows.collect()
        })
        .await
    }
}
