//! Digest: the lifecycle, timer and kv example plugin.
//!
//! `on-message` never answers; it counts each sender's messages in kv (`count:<handle>`).
//! Each tick of the `digest` timer sends the counts to the operator's `notify` handle through
//! `messaging.send` and takes what it reported off the counters. A tick with nothing counted
//! sends nothing. `start` checks the config, so a digest with nowhere to go shows as a failed
//! plugin instead of counting for nobody.
//!
//! The digest's key is derived from the tick's due time: a tick handled again after a restart
//! queues the same key, which the daemon sends once. A refused send leaves the counters alone,
//! so the next digest carries them.

use agentchat_plugin_sdk::kv::KvError;
use agentchat_plugin_sdk::prelude::*;
use serde::Deserialize;

/// Prefix of the per-sender counters.
const COUNT_PREFIX: &str = "count:";

/// Most counters read per digest (the host's cap on one `list-keys` call).
const MAX_SENDERS: u32 = 1000;

/// How long a reset counter lingers before it expires. Resetting writes an empty value
/// (conditionally, so a message counted meanwhile is never lost) rather than deleting, and
/// the expiry keeps senders who went quiet from piling up.
const RESET_TTL_MS: u64 = 7 * 24 * 3_600_000;

/// Attempts of one compare-and-set loop before giving up on a busy counter.
const CAS_ATTEMPTS: usize = 8;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Config {
    notify: Option<String>,
    heading: Option<String>,
    max_listed: Option<usize>,
}

impl Config {
    fn load() -> Result<Config, PluginError> {
        config::parse()
    }

    /// The handle to notify, checked: what the platform accepts as a handle.
    fn notify(&self) -> Result<&str, PluginError> {
        let Some(handle) = self.notify.as_deref() else {
            return Err(PluginError::BadInput(
                "notify: missing; give the handle that receives the digest".to_string(),
            ));
        };
        let handle = handle.strip_prefix('@').unwrap_or(handle);
        let valid = (3..=30).contains(&handle.len())
            && handle.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && handle.starts_with(|c: char| c.is_ascii_lowercase());
        if !valid {
            return Err(PluginError::BadInput(format!(
                "notify: `{handle}` is not a handle (lowercase letters, digits and -)"
            )));
        }
        Ok(handle)
    }
}

struct Digest;

impl Plugin for Digest {
    fn start(_info: StartInfo) -> Result<(), PluginError> {
        Config::load()?.notify().map(drop)
    }

    fn on_message(msg: Message) -> Result<Decision, PluginError> {
        // A failed count loses one message from the digest, which is no reason to fail the
        // call: the message itself is unaffected either way.
        if let Err(err) = kv::increment(&format!("{COUNT_PREFIX}{}", msg.sender), None) {
            log::warn("message not counted", &[("message_id", &msg.id), ("error", &kv_text(&err))]);
        }
        Ok(pass())
    }

    fn on_tick(tick: Tick) {
        if let Err(why) = send_digest(&tick) {
            log::warn("digest not sent", &[("timer", &tick.timer_id), ("error", &why)]);
        }
    }
}

fn send_digest(tick: &Tick) -> Result<(), String> {
    let config = Config::load().map_err(|err| format!("{err:?}"))?;
    let notify = config.notify().map_err(|err| format!("{err:?}"))?;
    let counts = read_counts().map_err(|err| kv_text(&err))?;
    let Some(text) = summary(config.heading.as_deref(), config.max_listed.unwrap_or(20), &counts)
    else {
        return Ok(());
    };

    let message = NewMessage {
        to: Some(notify.to_string()),
        conversation_id: None,
        text: Some(text),
        data_json: None,
        key: Some(format!("digest-{}", tick.due_at_ms)),
    };
    messaging::send(&message).map_err(|refusal| format!("{refusal:?}"))?;
    for (handle, reported) in &counts {
        if let Err(err) = take_off(&format!("{COUNT_PREFIX}{handle}"), *reported) {
            // The sender shows up again in the next digest with the old count included.
            log::warn("counter not reset", &[("sender", handle), ("error", &kv_text(&err))]);
        }
    }
    Ok(())
}

/// Every non-zero counter, as (handle, count).
fn read_counts() -> Result<Vec<(String, u64)>, KvError> {
    let mut counts = Vec::new();
    for key in kv::keys(COUNT_PREFIX, MAX_SENDERS)? {
        let count = parse_count(kv::get(&key)?.as_deref());
        if count > 0 {
            counts.push((key[COUNT_PREFIX.len()..].to_string(), count));
        }
    }
    Ok(counts)
}

/// Subtracts `reported` from the counter at `key`, keeping what was counted since it was read.
fn take_off(key: &str, reported: u64) -> Result<(), KvError> {
    for _ in 0..CAS_ATTEMPTS {
        let current = kv::get(key)?;
        let left = parse_count(current.as_deref()).saturating_sub(reported);
        let (value, ttl) =
            if left == 0 { (String::new(), Some(RESET_TTL_MS)) } else { (left.to_string(), None) };
        if kv::swap_if(key, current.as_deref(), value.as_bytes(), ttl)? {
            return Ok(());
        }
    }
    Err(KvError::Unavailable("the counter kept changing".to_string()))
}

/// A counter's value; absent and reset (empty) counters are zero, as for `kv::increment`.
fn parse_count(value: Option<&[u8]>) -> u64 {
    value.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The digest text, or `None` when nobody wrote.
fn summary(heading: Option<&str>, max_listed: usize, counts: &[(String, u64)]) -> Option<String> {
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let mut busiest: Vec<&(String, u64)> = counts.iter().collect();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    let senders = counts.len();
    let mut text = format!(
        "{}: {total} message{} from {senders} sender{} since the last digest",
        heading.unwrap_or("Digest"),
        if total == 1 { "" } else { "s" },
        if senders == 1 { "" } else { "s" },
    );
    for (handle, count) in busiest.iter().take(max_listed) {
        text.push_str(&format!("\n@{handle}: {count}"));
    }
    if senders > max_listed {
        text.push_str(&format!("\n… and {} more", senders - max_listed));
    }
    Some(text)
}

fn kv_text(err: &KvError) -> String {
    format!("{err:?}")
}

export_plugin!(Digest);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_lists_the_busiest_senders_first() {
        let counts = vec![("bob".to_string(), 1), ("alice".to_string(), 3), ("carol".into(), 1)];
        let text = summary(Some("Inbox"), 2, &counts).expect("a digest");
        assert_eq!(
            text,
            "Inbox: 5 messages from 3 senders since the last digest\n\
             @alice: 3\n@bob: 1\n… and 1 more"
        );
        assert_eq!(summary(None, 20, &[]), None);
        let one = summary(None, 20, &[("al".into(), 1)]).expect("a digest");
        assert!(one.starts_with("Digest: 1 message from 1 sender since"), "{one}");
    }

    #[test]
    fn reset_counters_read_as_zero() {
        assert_eq!(parse_count(Some(b"")), 0);
        assert_eq!(parse_count(None), 0);
        assert_eq!(parse_count(Some(b"12")), 12);
    }
}
