//! Hostile: a test fixture, never deployed. It tries whatever a command tells it to against
//! the host's limits, so the daemon's tests can check that the host withstands it.
//!
//! A command is a JSON object with an `op`. `on-message` runs the text of the message as a
//! command and replies with the outcome as JSON. The other hooks run the command in the
//! operator config under the hook's name (`start`, `stop`, `before-send`, `after-send`,
//! `send-failed`, `tick`) and, when they cannot answer, keep the outcome in kv under that name.
//!
//! Ops: `http` (method, url, headers, timeout_ms), `send` (to, conversation_id, text, repeat,
//! key, count), `kv_set` (key, repeat, value_len, ttl_ms, count), `kv_list` (prefix, limit),
//! `reply` (text, repeat, conversation_id), `error` (detail, repeat), `trap`, `hang`, and for
//! `before-send` also `cancel` (reason, repeat), `rewrite` (text, repeat, data_json), `keep`.

use agentchat_plugin_sdk::http::Request;
use agentchat_plugin_sdk::prelude::*;
use serde_json::{Value, json};

struct Hostile;

fn text(cmd: &Value, key: &str) -> Option<String> {
    cmd.get(key).and_then(Value::as_str).map(str::to_string)
}

fn num(cmd: &Value, key: &str, default: u64) -> u64 {
    cmd.get(key).and_then(Value::as_u64).unwrap_or(default)
}

/// `text` repeated `repeat` times, so a command stays small while its output is huge.
fn repeated(cmd: &Value, key: &str) -> Option<String> {
    text(cmd, key).map(|t| t.repeat(usize::try_from(num(cmd, "repeat", 1)).unwrap_or(1)))
}

/// An error as `Variant(payload)`, without the type's name the bindings put in front.
fn variant(err: &impl std::fmt::Debug) -> String {
    let text = format!("{err:?}");
    match text.split_once("::") {
        Some((_, rest)) => rest.to_string(),
        None => text,
    }
}

fn configured(hook: &str) -> Value {
    serde_json::from_str::<Value>(&config::json())
        .ok()
        .and_then(|c| c.get(hook).cloned())
        .unwrap_or(Value::Null)
}

/// Runs `cmd` and describes what came of it.
fn run(cmd: &Value) -> Result<Value, PluginError> {
    match text(cmd, "op").as_deref() {
        Some("http") => Ok(fetch(cmd)),
        Some("send") => Ok(send(cmd)),
        Some("kv_set") => Ok(kv_set(cmd)),
        Some("kv_list") => {
            let prefix = text(cmd, "prefix").unwrap_or_default();
            let limit = u32::try_from(num(cmd, "limit", 1000)).unwrap_or(u32::MAX);
            Ok(match kv::keys(&prefix, limit) {
                Ok(keys) => json!({ "keys": keys }),
                Err(err) => json!({ "err": variant(&err) }),
            })
        }
        Some("error") => Err(PluginError::Internal(repeated(cmd, "detail").unwrap_or_default())),
        Some("trap") => panic!("hostile trap"),
        Some("hang") => loop {
            std::hint::spin_loop();
        },
        _ => Ok(Value::Null),
    }
}

fn fetch(cmd: &Value) -> Value {
    let headers = cmd
        .get("headers")
        .and_then(Value::as_array)
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| Some((p.get(0)?.as_str()?.into(), p.get(1)?.as_str()?.into())))
                .collect()
        })
        .unwrap_or_default();
    let req = Request {
        method: text(cmd, "method").unwrap_or_else(|| "GET".into()),
        url: text(cmd, "url").unwrap_or_default(),
        headers,
        body: None,
        timeout_ms: cmd.get("timeout_ms").and_then(Value::as_u64).map(|ms| ms as u32),
    };
    match http::fetch(&req) {
        Ok(r) => json!({
            "status": r.status,
            "url": r.url,
            "len": r.body.len(),
            "body": String::from_utf8_lossy(&r.body[..r.body.len().min(200)]),
        }),
        Err(err) => json!({ "err": variant(&err) }),
    }
}

fn send(cmd: &Value) -> Value {
    let outcomes: Vec<String> = (0..num(cmd, "count", 1))
        .map(|_| {
            let msg = NewMessage {
                to: text(cmd, "to"),
                conversation_id: text(cmd, "conversation_id"),
                text: repeated(cmd, "text"),
                data_json: None,
                key: text(cmd, "key"),
            };
            match messaging::send(&msg) {
                Ok(key) => format!("ok:{key}"),
                Err(err) => format!("err:{}", variant(&err)),
            }
        })
        .collect();
    json!(outcomes)
}

fn kv_set(cmd: &Value) -> Value {
    let value = vec![b'v'; usize::try_from(num(cmd, "value_len", 0)).unwrap_or(0)];
    let ttl = cmd.get("ttl_ms").and_then(Value::as_u64);
    let base = repeated(cmd, "key").unwrap_or_default();
    let mut stored = 0u64;
    for i in 0..num(cmd, "count", 1) {
        let key = if num(cmd, "count", 1) > 1 { format!("{base}{i}") } else { base.clone() };
        match kv::set(&key, &value, ttl) {
            Ok(()) => stored += 1,
            Err(err) => return json!({ "stored": stored, "err": variant(&err) }),
        }
    }
    json!({ "stored": stored })
}

/// Runs the configured command of a hook that cannot answer and keeps the outcome in kv.
fn observe(hook: &str) {
    let cmd = configured(hook);
    if cmd.is_null() {
        return;
    }
    let outcome = match run(&cmd) {
        Ok(value) => value,
        Err(err) => json!({ "err": variant(&err) }),
    };
    let _ = kv::set(hook, outcome.to_string().as_bytes(), None);
}

impl Plugin for Hostile {
    fn start(_info: StartInfo) -> Result<(), PluginError> {
        let cmd = configured("start");
        run(&cmd).map(drop)
    }

    fn stop(_reason: StopReason) {
        observe("stop");
    }

    fn on_message(msg: Message) -> Result<Decision, PluginError> {
        let Some(body) = text_of(&msg) else {
            return Ok(pass());
        };
        let cmd: Value = serde_json::from_str(body)
            .map_err(|err| PluginError::BadInput(format!("not a command: {err}")))?;
        if text(&cmd, "op").as_deref() == Some("reply") {
            let draft = Draft {
                conversation_id: text(&cmd, "conversation_id"),
                text: repeated(&cmd, "text"),
                data_json: None,
            };
            return Ok(Decision::Reply(vec![draft]));
        }
        let outcome = run(&cmd)?;
        Ok(reply(outcome.to_string()))
    }

    fn before_send(_msg: OutboundMessage, _origin: Origin) -> Result<SendDecision, PluginError> {
        let cmd = configured("before-send");
        match text(&cmd, "op").as_deref() {
            Some("cancel") => {
                Ok(SendDecision::Cancel(repeated(&cmd, "reason").unwrap_or_default()))
            }
            Some("rewrite") => Ok(SendDecision::Rewrite(Content {
                text: repeated(&cmd, "text"),
                data_json: text(&cmd, "data_json"),
            })),
            // Anything else runs, and its outcome becomes the cancel reason so tests see it.
            Some(_) => run(&cmd).map(|outcome| SendDecision::Cancel(outcome.to_string())),
            None => Ok(SendDecision::Keep),
        }
    }

    fn after_send(_sent: Sent, _origin: Origin) {
        observe("after-send");
    }

    fn send_failed(_failure: SendFailure, _origin: Origin) {
        observe("send-failed");
    }

    fn on_tick(_tick: Tick) {
        observe("tick");
    }
}

export_plugin!(Hostile);
