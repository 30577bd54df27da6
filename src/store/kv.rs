//! Plugin key-value state: one namespace per plugin id, with a byte quota per plugin and an
//! optional expiry per entry. Expired entries read as absent and are purged by the next write
//! of the same plugin, so no background task is needed.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Store, StoreError};

/// Longest key accepted, in bytes.
pub const KV_MAX_KEY_BYTES: usize = 256;
/// Largest value accepted, in bytes.
pub const KV_MAX_VALUE_BYTES: usize = 64 * 1024;

/// Outcome of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvWrite {
    /// Stored.
    Stored,
    /// `swap-if` found another value; nothing changed.
    Mismatch,
    /// The plugin's keys and values would exceed its quota; nothing changed.
    OverQuota,
}

impl Store {
    /// The live value of `key` in `plugin`'s namespace.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn kv_get(
        &self,
        plugin: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        self.call(move |c| live_value(c, &plugin, &key, now_ms)).await
    }

    /// Stores `value` at `key`, or only when the live value equals `expected` (`Some(None)`:
    /// when the key is absent). The quota counts key and value bytes of live entries.
    ///
    /// # Errors
    /// On SQLite failure; nothing was written then.
    #[allow(clippy::too_many_arguments)]
    pub async fn kv_put(
        &self,
        plugin: &str,
        key: &str,
        value: Vec<u8>,
        expected: Option<Option<Vec<u8>>>,
        expires_ms: Option<i64>,
        quota_bytes: u64,
        now_ms: i64,
    ) -> Result<KvWrite, StoreError> {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM plugin_kv WHERE plugin = ?1 AND expires_ms IS NOT NULL
                 AND expires_ms <= ?2",
                params![plugin, now_ms],
            )?;
            let current = live_value(&tx, &plugin, &key, now_ms)?;
            if let Some(expected) = expected
                && expected != current
            {
                return Ok(KvWrite::Mismatch);
            }
            let used: i64 = tx.query_row(
                "SELECT COALESCE(SUM(LENGTH(CAST(key AS BLOB)) + LENGTH(value)), 0)
                 FROM plugin_kv WHERE plugin = ?1 AND key <> ?2",
                params![plugin, key],
                |r| r.get(0),
            )?;
            let wanted = u64::try_from(used).unwrap_or(0) + (key.len() + value.len()) as u64;
            if wanted > quota_bytes {
                return Ok(KvWrite::OverQuota);
            }
            tx.execute(
                "INSERT INTO plugin_kv (plugin, key, value, expires_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value,
                 expires_ms = excluded.expires_ms",
                params![plugin, key, value, expires_ms],
            )?;
            tx.commit()?;
            Ok(KvWrite::Stored)
        })
        .await
    }

    /// Removes `key` from `plugin`'s namespace (absent keys are fine).
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn kv_delete(&self, plugin: &str, key: &str) -> Result<(), StoreError> {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        self.call(move |c| {
            c.execute("DELETE FROM plugin_kv WHERE plugin = ?1 AND key = ?2", params![plugin, key])
                .map(drop)
        })
        .await
    }

    /// Live keys of `plugin` that start with `prefix`, in byte order, at most `limit`.
    ///
    /// # Errors
    /// On SQLite failure.
    pub async fn kv_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: u32,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let (plugin, prefix) = (plugin.to_owned(), prefix.to_owned());
        self.call(move |c| {
            // substr comparison instead of LIKE: a prefix may contain `%` or `_`.
            let mut stmt = c.prepare_cached(
                "SELECT key FROM plugin_kv WHERE plugin = ?1
                 AND substr(key, 1, length(?2)) = ?2
                 AND (expires_ms IS NULL OR expires_ms > ?3)
                 ORDER BY key LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![plugin, prefix, now_ms, limit], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }
}

fn live_value(
    c: &Connection,
    plugin: &str,
    key: &str,
    now_ms: i64,
) -> rusqlite::Result<Option<Vec<u8>>> {
    c.query_row(
        "SELECT value FROM plugin_kv WHERE plugin = ?1 AND key = ?2
         AND (expires_ms IS NULL OR expires_ms > ?3)",
        params![plugin, key, now_ms],
        |r| r.get(0),
    )
    .optional()
}
