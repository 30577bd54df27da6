//! Rules: the config-driven example plugin.
//!
//! The operator lists rules; each has a `keyword` (contained in the text, ignoring case) or a
//! `regex`, and the `reply` to send. Rules are tried in order and the first match answers;
//! with `"claim": true` the answer also stops lower-priority plugins. During `quiet-hours`
//! (a UTC window, judged by when the daemon received the message) the plugin passes on
//! everything. Non-text messages and texts no rule matches are passed on.
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
                log::debug("rule matched", &[("message_id", &msg.id), ("rule", &index)]);
                let reply_text = rule.reply.clone();
                return Ok(if rule.claim { claim(reply_text) } else { reply(reply_text) });
            }
        }
        Ok(pass())
    }
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
