//! Rules: the config-driven example plugin.
//!
//! The operator lists rules; each has a `keyword` (contained in the text, ignoring case) or a
//! `regex`, and the `reply` to send. Rules are tried in order and the first match answers;
//! with `"claim": true` the answer also stops lower-priority plugins. During `quiet-hours`
//! (a UTC window, judged by when the daemon received the message) the plugin passes on
//! everything. Non-text messages and texts no rule matches are passed on.
//!
//! With `per-peer-budget = { replies = N, window-secs = S }` a sender gets at most N rule
//! replies per window; past it the plugin passes. The count lives in kv (`budget:<sender>`),
//! so it holds across calls, restarts and reloads, and it needs the `kv` grant. A counter
//! expires S seconds after the last reply it counted, so a sender never gets more than N rule
//! replies within any S seconds. Without the grant, or with the store down, the plugin reports
//! `unavailable` (the host logs it and counts it as a pass) rather than reply uncounted.
//!
//! A bad rule (neither or both matchers, a regex that does not compile, a malformed time) is
//! reported as `bad-input` naming the rule, so the operator sees it in the daemon's log.

use agentchat_plugin_sdk::prelude::*;
use serde::Deserialize;

/// Largest compiled regex accepted, in bytes; the plugin's memory limit is the real cap, this
/// gives a readable error first.
const MAX_REGEX_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Config {
    rules: Vec<Rule>,
    quiet_hours: Option<QuietHours>,
    per_peer_budget: Option<Budget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Budget {
    replies: u64,
    window_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    keyword: Option<String>,
    regex: Option<String>,
    reply: String,
    #[serde(default)]
    claim: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuietHours {
    start: String,
    end: String,
}

struct Rules;

impl Plugin for Rules {
    fn on_message(msg: Message) -> Result<Decision, PluginError> {
        let Some(text) = text_of(&msg) else {
            return Ok(pass());
        };
        let config: Config = config::parse()?;

        if let Some(quiet) = &config.quiet_hours
            && in_quiet_hours(quiet, msg.received_at_ms)?
        {
            log::debug("quiet hours, not replying", &[("message_id", &msg.id)]);
            return Ok(pass());
        }

        for (idx, rule) in config.rules.iter().enumerate() {
            if rule_matches(rule, text).map_err(|why| bad_rule(idx, &why))? {
                let index = idx.to_string();
                if let Some(budget) = &config.per_peer_budget
                    && !take_from_budget(budget, &msg.sender)?
                {
                    log::debug("reply budget used up", &[("message_id", &msg.id)]);
                    return Ok(pass());
                }
                log::debug("rule matched", &[("message_id", &msg.id), ("rule", &index)]);
                let reply_text = rule.reply.clone();
                return Ok(if rule.claim { claim(reply_text) } else { reply(reply_text) });
            }
        }
        Ok(pass())
    }
}

/// Counts one reply to `sender` against the budget; false when the budget is used up (and
/// nothing was counted).
fn take_from_budget(budget: &Budget, sender: &str) -> Result<bool, PluginError> {
    let key = format!("budget:{sender}");
    let ttl_ms = budget.window_secs.saturating_mul(1000);
    let failed = |err: kv::KvError| {
        PluginError::Unavailable(format!("per-peer-budget needs kv (grant it): {err:?}"))
    };
    // Compare-and-set, so two messages of one sender handled at once cannot both take the
    // last reply; a handful of attempts is plenty for one sender's traffic.
    for _ in 0..8 {
        let current = kv::get(&key).map_err(failed)?;
        let used: u64 = current
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if used >= budget.replies {
            return Ok(false);
        }
        let next = (used + 1).to_string();
        if kv::swap_if(&key, current.as_deref(), next.as_bytes(), Some(ttl_ms)).map_err(failed)? {
            return Ok(true);
        }
    }
    Err(PluginError::Unavailable("the reply budget kept changing; try again".to_string()))
}

fn bad_rule(idx: usize, why: &str) -> PluginError {
    PluginError::BadInput(format!("rules[{idx}]: {why}"))
}

fn rule_matches(rule: &Rule, text: &str) -> Result<bool, String> {
    match (&rule.keyword, &rule.regex) {
        (Some(keyword), None) => Ok(text.to_lowercase().contains(&keyword.to_lowercase())),
        (None, Some(pattern)) => {
            let regex = regex::RegexBuilder::new(pattern)
                .size_limit(MAX_REGEX_BYTES)
                .build()
                .map_err(|err| format!("regex does not compile: {err}"))?;
            Ok(regex.is_match(text))
        }
        _ => Err("give exactly one of keyword and regex".to_string()),
    }
}

/// Whether `received_at_ms` falls in the window; `start` is included, `end` is not, and a
/// window whose end is before its start wraps past midnight. Equal ends mean no quiet hours.
fn in_quiet_hours(quiet: &QuietHours, received_at_ms: u64) -> Result<bool, PluginError> {
    let start = minute_of_day(&quiet.start)
        .ok_or_else(|| PluginError::BadInput("quiet-hours.start: use HH:MM".to_string()))?;
    let end = minute_of_day(&quiet.end)
        .ok_or_else(|| PluginError::BadInput("quiet-hours.end: use HH:MM".to_string()))?;
    let now = (received_at_ms / 60_000) % (24 * 60);
    Ok(if start <= end { start <= now && now < end } else { now >= start || now < end })
}

fn minute_of_day(text: &str) -> Option<u64> {
    let (hours, minutes) = text.split_once(':')?;
    let (hours, minutes): (u64, u64) = (hours.parse().ok()?, minutes.parse().ok()?);
    (hours < 24 && minutes < 60 && text.len() == 5).then_some(hours * 60 + minutes)
}

export_plugin!(Rules);
