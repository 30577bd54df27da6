//! Operator commands that read or change the state store beside a running daemon:
//! `agentchatd status`, `agentchatd outbox …` and `agentchatd send`.
//!
//! They work on the SQLite file directly (it allows a second connection while the daemon
//! runs), so they need no control socket and work whether the daemon is up or not. The daemon
//! notices queued or re-queued sends within a second. Each function returns the text to print.

use std::fmt::Write as _;

use crate::config::Config;
use crate::outbox::{COLD_WINDOW, format_ms, now_ms, queue_operator_send};
use crate::plugins::{PluginState, PluginStatus};
use crate::store::{SendState, Store, StoreError};

/// A summary of the daemon's state: queue, holds, cold-outreach slots, cursor, quarantine.
///
/// # Errors
/// When the store cannot be opened or read.
pub async fn status(config: &Config) -> Result<String, StoreError> {
    let store = Store::open(&config.state_dir)?;
    let counts = store.outbox_counts().await?;
    let held = store.held_counts().await?;
    let window_ms = i64::try_from(COLD_WINDOW.as_millis()).unwrap_or(i64::MAX);
    let now = now_ms();
    let threads = store.awaiting_threads(now - window_ms).await?;
    let cursor = store.meta("sync_cursor").await?;

    let mut out = String::new();
    let running = match crate::ops::lock::InstanceLock::acquire(&config.state_dir) {
        Ok(_free) => {
            let _ = writeln!(out, "daemon: not running");
            false
        }
        Err(crate::ops::lock::LockError::Held { holder: Some(holder), .. }) => {
            let since = holder.started.map(|t| format!(", started {t}")).unwrap_or_default();
            let _ = writeln!(out, "daemon: running (pid {}{since})", holder.pid);
            true
        }
        Err(crate::ops::lock::LockError::Held { holder: None, .. }) => {
            let _ = writeln!(out, "daemon: running");
            true
        }
        Err(err) => {
            let _ = writeln!(out, "daemon: unknown ({err})");
            false
        }
    };
    let _ = writeln!(out, "api: {}", config.api_base);
    let _ = writeln!(out, "state: {}", store.path().display());
    let held_text = if held.is_empty() {
        String::new()
    } else {
        let parts: Vec<_> = held.iter().map(|(reason, n)| format!("{n} {reason}")).collect();
        format!(", held: {}", parts.join(", "))
    };
    let _ = writeln!(
        out,
        "outbox: {} pending{held_text}; {} sent; {} dead",
        counts.pending, counts.sent, counts.dead
    );
    let _ = write!(
        out,
        "cold threads awaiting a reply (24 h): {} of {}",
        threads.len(),
        config.cold_threads_per_day
    );
    match threads.first() {
        Some(oldest) => {
            let _ =
                writeln!(out, "; the oldest frees at {}", format_ms(oldest.opened_ms + window_ms));
        }
        None => out.push('\n'),
    }
    let _ = writeln!(out, "sync cursor: {}", cursor.as_deref().unwrap_or("none"));
    let _ = writeln!(out, "quarantined inbound items: {}", store.quarantined().await?);
    if let Some(reload) = store.meta(LAST_RELOAD_KEY).await? {
        let _ = writeln!(out, "last reload: {reload}");
    }
    match store.meta(PLUGIN_STATUS_KEY).await? {
        Some(json) if running => out.push_str(&render_plugin_status(&json, now)),
        Some(json) => {
            out.push_str("as of the daemon's last run, ");
            out.push_str(&render_plugin_status(&json, now));
        }
        None => out.push_str("plugins: no report yet (the daemon writes one while it runs)\n"),
    }
    Ok(out)
}

/// The platform's handle rule: 3 to 30 characters, `^[a-z][a-z0-9]*(-[a-z0-9]+)*$`.
fn valid_handle(handle: &str) -> bool {
    let bytes = handle.as_bytes();
    (3..=30).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && !handle.ends_with('-')
        && !handle.contains("--")
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Meta key under which the running daemon keeps its plugins' states for `status`.
pub const PLUGIN_STATUS_KEY: &str = "plugin_status";

/// Meta key under which the daemon records how its last reload went.
pub const LAST_RELOAD_KEY: &str = "last_reload";

/// One plugin's state as the daemon records it for `status`.
#[derive(serde::Serialize, serde::Deserialize)]
struct PluginReport {
    id: String,
    /// `active`, `suspended` or `failed`.
    state: String,
    hooks: Vec<String>,
    /// End of a suspension, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    total_failures: u64,
}

/// Encodes plugin states for the store. Stable while nothing changes, so the daemon can skip
/// writing an unchanged report.
pub fn encode_plugin_status(status: &[PluginStatus]) -> String {
    let reports: Vec<PluginReport> = status
        .iter()
        .map(|p| {
            let (state, until_ms, reason) = match &p.state {
                PluginState::Active => ("active", None, None),
                PluginState::Suspended { until, .. } => {
                    let ms = until
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .and_then(|d| i64::try_from(d.as_millis()).ok());
                    // Rounded to the second so the report does not change on every refresh.
                    ("suspended", ms.map(|ms| ms - ms % 1000), None)
                }
                PluginState::Failed { reason } => ("failed", None, Some(reason.clone())),
            };
            PluginReport {
                id: p.id.clone(),
                state: state.to_owned(),
                hooks: p.hooks.clone(),
                until_ms,
                reason,
                total_failures: p.total_failures,
            }
        })
        .collect();
    serde_json::to_string(&reports).unwrap_or_else(|_| "[]".to_owned())
}

fn render_plugin_status(json: &str, now: i64) -> String {
    let Ok(reports) = serde_json::from_str::<Vec<PluginReport>>(json) else {
        return "plugins: the recorded report is unreadable\n".to_owned();
    };
    if reports.is_empty() {
        return "plugins: none\n".to_owned();
    }
    let mut out = String::from("plugins:\n");
    for p in reports {
        let state = match (p.state.as_str(), p.until_ms, &p.reason) {
            ("suspended", Some(until), _) if until > now => {
                format!("suspended until {} after repeated failures", format_ms(until))
            }
            ("suspended", _, _) => "active (its suspension has ended)".to_owned(),
            ("failed", _, Some(reason)) => format!("failed: {reason}"),
            (state, _, _) => state.to_owned(),
        };
        let _ = writeln!(
            out,
            "  {}: {state}; hooks {}; {} failures since start",
            p.id,
            p.hooks.join(", "),
            p.total_failures
        );
    }
    out
}

/// Lists queue rows, newest first.
///
/// # Errors
/// When the store cannot be opened or read.
pub async fn list(
    config: &Config,
    state: Option<SendState>,
    limit: u32,
) -> Result<String, StoreError> {
    let store = Store::open(&config.state_dir)?;
    let rows = store.list_sends(state, limit).await?;
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no sends\n");
    }
    for row in rows {
        let to = row.recipient.as_deref().unwrap_or("(group)");
        let _ = write!(out, "{:>6}  {:<7}  to {to}  attempts {}", row.id, row.state, row.attempts);
        if let Some(hold) = &row.hold {
            // Sends held for a reply carry a far-future time; "until released" says it better.
            if row.next_attempt_ms > now_ms() + 10 * 365 * 86_400_000 {
                let _ = write!(out, "  held: {hold} until released");
            } else {
                let _ = write!(out, "  held: {hold} until {}", format_ms(row.next_attempt_ms));
            }
        }
        let _ = write!(out, "  origin {}", row.origin);
        if let Some(error) = &row.last_error {
            let _ = write!(out, "\n        reason: {error}");
        }
        out.push('\n');
    }
    Ok(out)
}

/// Re-queues a dead letter.
///
/// # Errors
/// When the store fails; a missing row is reported in the text.
pub async fn retry(config: &Config, id: i64) -> Result<(bool, String), StoreError> {
    let store = Store::open(&config.state_dir)?;
    Ok(if store.retry_dead(id, now_ms()).await? {
        (true, format!("send {id} queued again\n"))
    } else {
        (false, format!("no dead letter with id {id}; see `agentchatd outbox list --state dead`\n"))
    })
}

/// Removes a pending or dead send.
///
/// # Errors
/// When the store fails; a missing row is reported in the text.
pub async fn drop_send(config: &Config, id: i64) -> Result<(bool, String), StoreError> {
    let store = Store::open(&config.state_dir)?;
    Ok(if store.drop_send(id).await? {
        (true, format!("send {id} dropped\n"))
    } else {
        (false, format!("no pending or dead send with id {id}\n"))
    })
}

/// Queues a text message to `to` for the daemon to send.
///
/// # Errors
/// When the store fails.
pub async fn send(
    config: &Config,
    to: &str,
    text: &str,
    id: Option<String>,
) -> Result<(bool, String), StoreError> {
    let wire_bytes = serde_json::json!({ "text": text }).to_string().len() + 2;
    if text.is_empty() || wire_bytes > 32_768 {
        let reason = format!(
            "not queued: the text must be 1 to about 32 000 bytes (it is {wire_bytes} bytes as \
             JSON)\n"
        );
        return Ok((false, reason));
    }
    let handle = to.trim_start_matches('@').to_lowercase();
    if !valid_handle(&handle) {
        let reason = format!(
            "not queued: `{to}` is not an AgentChat handle (3 to 30 characters: a lower-case \
             letter, then letters, digits and single hyphens)\n"
        );
        return Ok((false, reason));
    }
    let store = Store::open(&config.state_dir)?;
    let id = id.unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let (key, fresh) = queue_operator_send(&store, &handle, text, &id).await?;
    let row = store.send_row_id(&key).await?.map_or_else(String::new, |row| format!("#{row} "));
    Ok((
        true,
        if fresh {
            format!(
                "queued for {handle} as {row}(key {key}, operator id {id}); `agentchatd outbox \
                 list` shows how it goes\n"
            )
        } else {
            format!("already queued as {row}(key {key}, operator id {id}); nothing added\n")
        },
    ))
}
