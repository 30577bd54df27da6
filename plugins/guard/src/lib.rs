//! Guard: the outbound example plugin, a data-loss-prevention gate on everything the agent
//! sends (replies, plugin sends, operator sends alike).
//!
//! `before-send` first looks for the `block` keywords (contained in the text or in any string
//! of the structured data, ignoring case): a match cancels the message, and the reason names
//! the rule by its index, never the text. Otherwise it replaces every `redact` literal
//! (ignoring case) and every built-in `redact-patterns` match (`email`, `api-key`) by `mask`
//! and answers with the rewritten content; a message with nothing to redact is kept.
//!
//! A guard that must never be skipped is configured with `failure_policy = "closed"`: a trap,
//! timeout or bad config then cancels the message instead of letting it through unchecked.
//! For the same reason the plugin cancels a message that redaction would push past the
//! host's text limit, since an over-long rewrite is refused by the host and would otherwise
//! leave the original text in place under the default open policy.
//!
//! `after-send` and `send-failed` count outcomes in kv (`sent`, `failed:<class>`) when the
//! operator grants `kv`; without the grant the counting silently does nothing.

use agentchat_plugin_sdk::prelude::*;
use agentchat_plugin_sdk::{FailureClass, SendDecision};
use regex::{Regex, RegexBuilder};
use serde::Deserialize;

/// The host refuses rewritten text longer than this many bytes.
const MAX_TEXT_BYTES: usize = 32_768;

/// What replaces redacted text when the operator sets no `mask`.
const DEFAULT_MASK: &str = "[redacted]";

/// An e-mail address: a local part, `@`, and a dotted domain ending in letters.
const EMAIL_PATTERN: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}";

/// Something that looks like a credential: a token with a well-known key prefix, an AWS
/// access key id, or any run of 32 or more letters, digits, `-` and `_` (long enough that
/// ordinary words never match, short enough for hex and base64 secrets).
const API_KEY_PATTERN: &str = concat!(
    r"\b(?:sk|pk|rk|ghp|gho|ghs|xox[abprs])[-_][A-Za-z0-9_-]{16,}",
    r"|\bAKIA[0-9A-Z]{16}\b",
    r"|[A-Za-z0-9_-]{32,}",
);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Config {
    #[serde(default)]
    block: Vec<String>,
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    redact_patterns: Vec<Pattern>,
    mask: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum Pattern {
    Email,
    ApiKey,
}

/// The config turned into matchers, once per call.
struct Rules {
    /// Lowercased block keywords, in config order.
    block: Vec<String>,
    /// One alternation of every redaction, or none when nothing is to be redacted.
    redact: Option<Regex>,
    mask: String,
}

impl Rules {
    fn from_config(config: Config) -> Result<Rules, PluginError> {
        if let Some(idx) = config.block.iter().position(|k| k.is_empty()) {
            return Err(PluginError::BadInput(format!("block[{idx}]: is empty")));
        }
        if let Some(idx) = config.redact.iter().position(|k| k.is_empty()) {
            return Err(PluginError::BadInput(format!("redact[{idx}]: is empty")));
        }
        let mut alternatives: Vec<String> = config
            .redact
            .iter()
            .map(|literal| format!("(?i:{})", regex::escape(literal)))
            .collect();
        alternatives.extend(config.redact_patterns.iter().map(|p| match p {
            Pattern::Email => EMAIL_PATTERN.to_string(),
            Pattern::ApiKey => API_KEY_PATTERN.to_string(),
        }));
        let redact = if alternatives.is_empty() {
            None
        } else {
            let regex = RegexBuilder::new(&alternatives.join("|"))
                .size_limit(1 << 20)
                .build()
                .map_err(|err| PluginError::BadInput(format!("redact: {err}")))?;
            Some(regex)
        };
        Ok(Rules {
            block: config.block.iter().map(|k| k.to_lowercase()).collect(),
            redact,
            mask: config.mask.unwrap_or_else(|| DEFAULT_MASK.to_string()),
        })
    }

    /// Index of the first block keyword `text` contains.
    fn blocked(&self, text: &str) -> Option<usize> {
        let lower = text.to_lowercase();
        self.block.iter().position(|keyword| lower.contains(keyword.as_str()))
    }

    /// `text` with every redaction masked, or `None` when nothing matched.
    fn redacted(&self, text: &str) -> Option<String> {
        let regex = self.redact.as_ref()?;
        if !regex.is_match(text) {
            return None;
        }
        Some(regex.replace_all(text, regex::NoExpand(&self.mask)).into_owned())
    }
}

/// What the rules make of one message's content.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    Rewrite { text: Option<String>, data_json: Option<String> },
    Cancel(String),
}

fn judge(rules: &Rules, text: Option<&str>, data_json: Option<&str>) -> Verdict {
    let data: Option<serde_json::Value> = match data_json.map(serde_json::from_str) {
        None => None,
        Some(Ok(value)) => Some(value),
        // The host only queues JSON objects, so this is not expected; refusing is the safe
        // answer for a gate.
        Some(Err(_)) => return Verdict::Cancel("data-json is not valid JSON".to_string()),
    };

    let mut strings: Vec<&str> = text.into_iter().collect();
    if let Some(value) = &data {
        collect_strings(value, &mut strings);
    }
    if let Some(idx) = strings.iter().find_map(|s| rules.blocked(s)) {
        return Verdict::Cancel(format!("matched block rule {idx}"));
    }

    let new_text = text.and_then(|t| rules.redacted(t));
    let new_data = data.and_then(|mut value| redact_strings(rules, &mut value).then_some(value));
    if new_text.is_none() && new_data.is_none() {
        return Verdict::Keep;
    }
    let text = new_text.or_else(|| text.map(str::to_string));
    if text.as_ref().is_some_and(|t| t.len() > MAX_TEXT_BYTES) {
        return Verdict::Cancel(format!("redacted text exceeds {MAX_TEXT_BYTES} bytes"));
    }
    let data_json = match new_data {
        Some(value) => Some(value.to_string()),
        None => data_json.map(str::to_string),
    };
    Verdict::Rewrite { text, data_json }
}

/// Every string in `value`, keys included, since a key can carry data too.
fn collect_strings<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                out.push(key);
                collect_strings(v, out);
            }
        }
        _ => {}
    }
}

/// Masks redactions in every string value of `value`; returns whether anything changed. Keys
/// are left alone: rewriting them could merge two keys into one.
fn redact_strings(rules: &Rules, value: &mut serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => match rules.redacted(s) {
            Some(new) => {
                *s = new;
                true
            }
            None => false,
        },
        serde_json::Value::Array(items) => {
            items.iter_mut().fold(false, |changed, v| redact_strings(rules, v) | changed)
        }
        serde_json::Value::Object(map) => {
            map.values_mut().fold(false, |changed, v| redact_strings(rules, v) | changed)
        }
        _ => false,
    }
}

struct Guard;

impl Plugin for Guard {
    fn before_send(msg: OutboundMessage, _origin: Origin) -> Result<SendDecision, PluginError> {
        let rules = Rules::from_config(config::parse()?)?;
        let decision = match judge(&rules, msg.text.as_deref(), msg.data_json.as_deref()) {
            Verdict::Keep => SendDecision::Keep,
            Verdict::Rewrite { text, data_json } => {
                log::debug("message redacted", &[("key", &msg.key)]);
                SendDecision::Rewrite(Content { text, data_json })
            }
            Verdict::Cancel(reason) => {
                log::info("message blocked", &[("key", &msg.key), ("reason", &reason)]);
                SendDecision::Cancel(reason)
            }
        };
        Ok(decision)
    }

    fn after_send(_sent: Sent, _origin: Origin) {
        // Counting is best effort: without the kv grant, or with the store down, it is skipped.
        let _ = kv::increment("sent", None);
    }

    fn send_failed(failure: SendFailure, _origin: Origin) {
        let class = match failure.class {
            FailureClass::Rejected => "rejected",
            FailureClass::RateLimited => "rate-limited",
            FailureClass::Transient => "transient",
            FailureClass::Cancelled => "cancelled",
        };
        let _ = kv::increment(&format!("failed:{class}"), None);
    }
}

export_plugin!(Guard);

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(config: serde_json::Value) -> Rules {
        let config: Config = serde_json::from_value(config).expect("config fits");
        Rules::from_config(config).expect("rules build")
    }

    fn rewrite(text: &str) -> Verdict {
        Verdict::Rewrite { text: Some(text.to_string()), data_json: None }
    }

    #[test]
    fn block_keywords_cancel_naming_the_rule_only() {
        let rules = rules(serde_json::json!({"block": ["password", "Project X"]}));
        let verdict = judge(&rules, Some("the PROJECT x launch"), None);
        assert_eq!(verdict, Verdict::Cancel("matched block rule 1".to_string()));
        assert_eq!(judge(&rules, Some("all good"), None), Verdict::Keep);
        let data = r#"{"note": {"x": ["my password"]}}"#;
        assert_eq!(judge(&rules, None, Some(data)), Verdict::Cancel("matched block rule 0".into()));
    }

    #[test]
    fn literals_and_patterns_are_masked() {
        let rules = rules(serde_json::json!({
            "redact": ["Falcon", "a.b"],
            "redact-patterns": ["email", "api-key"],
            "mask": "***",
        }));
        assert_eq!(
            judge(&rules, Some("falcon and a.b, not axb"), None),
            rewrite("*** and ***, not axb")
        );
        assert_eq!(
            judge(&rules, Some("mail bob.s+x@mail.example.org now"), None),
            rewrite("mail *** now")
        );
        let key = "use sk-abcdefghijklmnopqrstuv or AKIAABCDEFGHIJKLMNOP \
                   or 0123456789abcdef0123456789abcdef";
        assert_eq!(judge(&rules, Some(key), None), rewrite("use *** or *** or ***"));
        assert_eq!(judge(&rules, Some("short tokens like sk-abc stay"), None), Verdict::Keep);
    }

    #[test]
    fn structured_data_is_redacted_value_by_value() {
        let rules = rules(serde_json::json!({"redact-patterns": ["email"]}));
        let verdict = judge(&rules, None, Some(r#"{"to": ["a@b.io", 3], "a@b.io": true}"#));
        let expected = r#"{"a@b.io":true,"to":["[redacted]",3]}"#;
        assert_eq!(verdict, Verdict::Rewrite { text: None, data_json: Some(expected.into()) });
    }

    #[test]
    fn a_rewrite_past_the_text_limit_cancels() {
        let rules = rules(serde_json::json!({"redact": ["x"], "mask": "0123456789"}));
        let verdict = judge(&rules, Some(&"x".repeat(4000)), None);
        assert!(
            matches!(verdict, Verdict::Cancel(ref why) if why.contains("exceeds")),
            "{verdict:?}"
        );
    }
}
