//! LLM: answers text messages through an OpenAI-compatible chat-completions endpoint.
//!
//! For each text message it posts `{endpoint}/chat/completions` with the configured model, the
//! optional system prompt, up to `history_messages` earlier messages of a direct conversation
//! (read through the `history` import when the operator granted it) and the message itself,
//! then replies with the first choice's content. Other kinds of message pass.
//!
//! Every failure (the endpoint unreachable or slow, a non-2xx status, a body that is not a
//! chat-completions answer, a config the schema cannot check) is returned as a plugin error
//! naming what went wrong, never a trap: the host logs it, counts the call as a pass and still
//! acknowledges the message. `bad-input` means the operator's settings need fixing,
//! `unavailable` that the endpoint failed and a later message may fare better.
//!
//! Message text and the API key stay out of the log and out of error messages: they carry
//! ids, sizes and status codes only.

use agentchat_plugin_sdk::history::HistoryError;
use agentchat_plugin_sdk::http::{HttpError, Response};
use agentchat_plugin_sdk::prelude::*;
use agentchat_plugin_sdk::{ContentKind, ConversationKind, HistoryMessage};
use serde_json::{Map, Value, json};

/// Earlier messages sent along when the config sets none.
const DEFAULT_HISTORY_MESSAGES: u32 = 10;

/// Most earlier messages the config may ask for.
const MAX_HISTORY_MESSAGES: u32 = 50;

/// Wait for the endpoint when the config sets none. It sits below the manifest's 30 s hook
/// budget so that a slow endpoint ends in a timeout the plugin reports, not in the host
/// stopping the whole call.
const DEFAULT_TIMEOUT_MS: u32 = 25_000;

/// Longest reply text the host accepts in a draft (its `MAX_TEXT_BYTES`); a longer answer is
/// cut rather than refused, since the host would count a refused draft as a misbehaving call.
const MAX_REPLY_BYTES: usize = 32 * 1024;

/// Config keys the plugin reads; the manifest's schema refuses any other.
const KNOWN_KEYS: &[&str] = &[
    "endpoint",
    "model",
    "system_prompt",
    "api_key",
    "history_messages",
    "max_tokens",
    "temperature",
    "timeout_ms",
];

struct Llm;

impl Plugin for Llm {
    fn on_message(msg: Message) -> Result<Decision, PluginError> {
        let Some(text) = text_of(&msg) else {
            return Ok(pass());
        };
        let settings = Settings::parse(&config::json())?;

        let mut messages = Vec::new();
        if let Some(prompt) = &settings.system_prompt {
            messages.push(json!({"role": "system", "content": prompt}));
        }
        let earlier = earlier_turns(settings.history_messages, &msg);
        let n_earlier = earlier.len();
        messages.extend(earlier);
        messages.push(json!({"role": "user", "content": text}));

        let answer = ask(&settings, messages, &msg.id, n_earlier)?;
        Ok(reply(answer))
    }
}

export_plugin!(Llm);

/// The operator's settings, checked.
struct Settings {
    /// `{endpoint}/chat/completions`.
    url: String,
    model: String,
    system_prompt: Option<String>,
    api_key: Option<String>,
    history_messages: u32,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    timeout_ms: u32,
}

impl Settings {
    /// Reads the config by hand rather than through serde: serde's messages quote the
    /// offending value, and a value here may be the API key.
    fn parse(json: &str) -> Result<Settings, PluginError> {
        let bad = |why: String| PluginError::BadInput(format!("config: {why}"));
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(json) else {
            return Err(bad("is not a JSON object".into()));
        };
        if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            return Err(bad(format!("unknown key `{key}`; the plugin reads {KNOWN_KEYS:?}")));
        }

        let endpoint = string(&map, "endpoint")?.ok_or_else(|| {
            bad("`endpoint` is missing; give the base URL, such as http://127.0.0.1:8080/v1".into())
        })?;
        let lower = endpoint.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://"))
            || endpoint.contains(['?', '#'])
        {
            return Err(bad(
                "`endpoint` must be an http:// or https:// base URL without query or fragment"
                    .into(),
            ));
        }
        let model = string(&map, "model")?
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad("`model` is missing; name the model to ask".into()))?;

        Ok(Settings {
            url: format!("{}/chat/completions", endpoint.trim_end_matches('/')),
            model,
            system_prompt: string(&map, "system_prompt")?.filter(|p| !p.is_empty()),
            api_key: string(&map, "api_key")?.filter(|k| !k.is_empty()),
            history_messages: integer(&map, "history_messages", 0, MAX_HISTORY_MESSAGES)?
                .unwrap_or(DEFAULT_HISTORY_MESSAGES),
            max_tokens: integer(&map, "max_tokens", 1, 1_000_000)?,
            temperature: number(&map, "temperature", 0.0, 2.0)?,
            timeout_ms: integer(&map, "timeout_ms", 100, 60_000)?.unwrap_or(DEFAULT_TIMEOUT_MS),
        })
    }
}

fn string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, PluginError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(_) => Err(PluginError::BadInput(format!("config: `{key}` must be a string"))),
    }
}

fn integer(
    map: &Map<String, Value>,
    key: &str,
    min: u32,
    max: u32,
) -> Result<Option<u32>, PluginError> {
    let Some(value) = map.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    // The host's schema takes 30000.0 for an integer, so the plugin does too.
    let whole = value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|n| n.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(n))
            .map(|n| n as u64)
    });
    match whole.and_then(|n| u32::try_from(n).ok()) {
        Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(PluginError::BadInput(format!(
            "config: `{key}` must be an integer from {min} to {max}"
        ))),
    }
}

fn number(
    map: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, PluginError> {
    let Some(value) = map.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match value.as_f64() {
        Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(PluginError::BadInput(format!(
            "config: `{key}` must be a number from {min} to {max}"
        ))),
    }
}

/// Up to `limit` text messages that came before `msg` in its conversation, as chat turns.
///
/// Only direct conversations get history. The agent's own handle is not handed to this hook,
/// and in a direct conversation it is not needed: the sender of the message being answered is
/// the peer, so every other sender is the agent. In a group that rule would take other members
/// for the agent, so a group message is answered on its own.
fn earlier_turns(limit: u32, msg: &Message) -> Vec<Value> {
    if limit == 0 || !matches!(msg.conversation_kind, ConversationKind::Direct) {
        return Vec::new();
    }
    // One more than wanted, because the message being answered is usually among the newest.
    let rows = match history::recent(&msg.conversation_id, limit + 1) {
        Ok(rows) => rows,
        Err(HistoryError::NotGranted) => {
            log::debug(
                "history not granted; sending the message alone",
                &[("message_id", &msg.id)],
            );
            return Vec::new();
        }
        Err(HistoryError::Refused(_) | HistoryError::Unavailable(_)) => {
            // The reason may quote the server; the id is enough to find the call in the log.
            log::warn("history unavailable; sending the message alone", &[("message_id", &msg.id)]);
            return Vec::new();
        }
    };

    // Rows come oldest first; messages that arrived after this one are left out.
    let turns: Vec<Value> = rows
        .iter()
        .filter(|row| row.id != msg.id && row.seq < msg.seq)
        .filter_map(|row| turn(row, &msg.sender))
        .collect();
    let skip = turns.len().saturating_sub(usize::try_from(limit).unwrap_or(usize::MAX));
    turns.into_iter().skip(skip).collect()
}

/// A history row as a chat turn; rows without text (files, structured data) are left out.
fn turn(row: &HistoryMessage, peer: &str) -> Option<Value> {
    let text = match row.kind {
        ContentKind::Text => row.text.as_deref()?,
        _ => return None,
    };
    let role = if same_handle(&row.sender, peer) { "user" } else { "assistant" };
    Some(json!({"role": role, "content": text}))
}

fn same_handle(a: &str, b: &str) -> bool {
    a.trim_start_matches('@').eq_ignore_ascii_case(b.trim_start_matches('@'))
}

/// Posts the conversation and returns the answer's text, cut to what a draft may hold.
fn ask(
    settings: &Settings,
    messages: Vec<Value>,
    message_id: &str,
    n_earlier: usize,
) -> Result<String, PluginError> {
    let mut body = json!({"model": settings.model, "messages": messages});
    if let Some(max_tokens) = settings.max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    if let Some(temperature) = settings.temperature {
        body["temperature"] = json!(temperature);
    }
    let bearer = settings.api_key.as_ref().map(|key| format!("Bearer {key}"));
    let headers: Vec<(&str, &str)> =
        bearer.iter().map(|value| ("authorization", value.as_str())).collect();

    let request_bytes = body.to_string().len().to_string();
    let earlier = n_earlier.to_string();
    log::debug(
        "asking the model",
        &[("message_id", message_id), ("earlier", &earlier), ("request_bytes", &request_bytes)],
    );
    let response = http::post_json(&settings.url, &headers, &body, Some(settings.timeout_ms))
        .map_err(|err| http_failure(err, settings.timeout_ms))?;
    let mut answer = answer_of(&response)?;

    let response_bytes = response.body.len().to_string();
    let reply_bytes = answer.len().to_string();
    log::debug(
        "model answered",
        &[
            ("message_id", message_id),
            ("response_bytes", &response_bytes),
            ("reply_bytes", &reply_bytes),
        ],
    );
    if answer.len() > MAX_REPLY_BYTES {
        let mut cut = MAX_REPLY_BYTES;
        while !answer.is_char_boundary(cut) {
            cut -= 1;
        }
        answer.truncate(cut);
        log::info("answer cut to the message size limit", &[("message_id", message_id)]);
    }
    Ok(answer)
}

/// What an HTTP failure means for the operator.
fn http_failure(err: HttpError, timeout_ms: u32) -> PluginError {
    match err {
        HttpError::NotGranted(what) => PluginError::BadInput(format!(
            "the host refused the request, not granted: {what}; grant the endpoint's host \
             (or host:port) in the plugin's http_allowed_hosts, or fix `endpoint`"
        )),
        HttpError::Invalid(why) => PluginError::BadInput(format!(
            "the host refused the request as malformed: {why}; check `endpoint` and `api_key`"
        )),
        HttpError::Timeout => PluginError::Unavailable(format!(
            "no answer from the completions endpoint within {timeout_ms} ms (or the hook's \
             budget); raise `timeout_ms` or use a faster model"
        )),
        HttpError::TooLarge => PluginError::Unavailable(
            "the completions answer exceeded the host's 1 MiB cap; lower `max_tokens`".into(),
        ),
        HttpError::Failed(why) => {
            PluginError::Unavailable(format!("cannot reach the completions endpoint: {why}"))
        }
    }
}

/// The first choice's content from a chat-completions answer.
fn answer_of(response: &Response) -> Result<String, PluginError> {
    let status = response.status;
    if !(200..300).contains(&status) {
        return Err(status_failure(status, &response.body));
    }
    let value: Value = serde_json::from_slice(&response.body).map_err(|err| {
        PluginError::Unavailable(format!(
            "the completions endpoint answered {status} with a body that is not JSON ({} bytes, \
             {:?} error at line {} column {}); is `endpoint` an OpenAI-compatible API?",
            response.body.len(),
            err.classify(),
            err.line(),
            err.column()
        ))
    })?;
    let content = value
        .get("choices")
        .and_then(|choices| choices.get(0))
        .and_then(|choice| choice.get("message"))
        .and_then(|message| message.get("content"));
    match content {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.clone()),
        Some(Value::String(_) | Value::Null) => Err(PluginError::Unavailable(
            "the model answered with empty content; nothing to reply".into(),
        )),
        _ => Err(PluginError::Unavailable(
            "the completions answer has no `choices[0].message.content` string; is `endpoint` \
             an OpenAI-compatible API?"
                .into(),
        )),
    }
}

/// A non-2xx answer: 4xx other than 408 and 429 points at the settings, the rest at the
/// endpoint. The body is not quoted (it may echo the conversation); only a short error code.
fn status_failure(status: u16, body: &[u8]) -> PluginError {
    let code = error_code(body).map(|code| format!(" (error code `{code}`)")).unwrap_or_default();
    match status {
        401 | 403 => PluginError::BadInput(format!(
            "the completions endpoint refused the credentials with HTTP {status}{code}; check \
             `api_key`"
        )),
        404 => PluginError::BadInput(format!(
            "the completions endpoint answered HTTP 404{code}; check `endpoint` (the plugin \
             posts to <endpoint>/chat/completions) and `model`"
        )),
        400..=499 if status != 408 && status != 429 => PluginError::BadInput(format!(
            "the completions endpoint refused the request with HTTP {status}{code}; check \
             `model`, `max_tokens` and `temperature`"
        )),
        _ => PluginError::Unavailable(format!(
            "the completions endpoint answered HTTP {status}{code}; later messages will try again"
        )),
    }
}

/// `error.code` or `error.type` of an OpenAI-style error body, when it is a short token.
fn error_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    let code = error.get("code").and_then(Value::as_str).or_else(|| error.get("type")?.as_str())?;
    let token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    (!code.is_empty() && code.len() <= 64 && code.chars().all(token)).then(|| code.to_string())
}
