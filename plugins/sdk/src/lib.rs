//! Write AgentChat reply plugins in Rust.
//!
//! A plugin implements [`Plugin`] (every hook has a default, so only the hooks the plugin
//! needs are written) and names its type in [`export_plugin!`]:
//!
//! ```ignore
//! use agentchat_plugin_sdk::prelude::*;
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn on_message(msg: Message) -> Result<Decision, PluginError> {
//!         match msg.text {
//!             Some(text) if text.contains("hello") => Ok(reply("hi there")),
//!             _ => Ok(pass()),
//!         }
//!     }
//! }
//!
//! export_plugin!(Hello);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`. Each call runs in a fresh
//! instance, so a plugin keeps nothing in memory between calls: state that must last goes
//! through [`kv`]. The component exports every hook (the defaults do nothing); the host calls
//! only those the manifest lists, so list the ones you implement. This crate wraps the
//! bindings of `agentchat:plugin@0.1.0`; it does no I/O of its own.

/// The generated bindings of the `full` world; [`export_plugin!`] uses them.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "full",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_full",
        default_bindings_module: "agentchat_plugin_sdk::bindings",
    });
}

use bindings::agentchat::plugin::types;
pub use types::{
    Content, ContentKind, ConversationKind, Draft, FailureClass, HistoryMessage,
    InboundDecision as Decision, Level, NewMessage, Origin, OutboundMessage, PluginError,
    SendDecision, SendFailure, Sent, StartInfo, StartReason, StopReason, Tick, Trigger,
};

/// One inbound message, as the host hands it over.
pub type Message = types::InboundMessage;

/// The plugin API version this SDK targets; put it in the manifest's `api` key.
pub const API_VERSION: &str = "agentchat:plugin@0.1.0";

/// The hooks of a plugin. Each has a default, so a plugin writes only the ones it uses (and
/// lists them in its manifest's `hooks`: `lifecycle`, `inbound`, `outbound`, `timer`).
pub trait Plugin {
    /// Called once when the plugin is loaded (at boot or after a reload). An `Err` marks the
    /// plugin failed: none of its hooks run until the next reload.
    fn start(info: StartInfo) -> Result<(), PluginError> {
        let _ = info;
        Ok(())
    }

    /// Called at shutdown or before a reload replaces the plugin; it has at most 2 seconds.
    fn stop(reason: StopReason) {
        let _ = reason;
    }

    /// Called for every inbound message; the default passes.
    ///
    /// Return [`reply`] to queue an answer and let later plugins run, [`claim`] to answer and
    /// stop them, [`pass`] for no opinion and [`drop_message`] to swallow the message. An
    /// `Err` is logged by the host and counts as a pass.
    fn on_message(msg: Message) -> Result<Decision, PluginError> {
        let _ = msg;
        Ok(Decision::Pass)
    }

    /// Called once for every message the daemon is about to send, whatever produced it.
    /// Return [`SendDecision::Keep`], [`SendDecision::Rewrite`] or [`SendDecision::Cancel`].
    /// [`messaging::send`] is refused here.
    fn before_send(msg: OutboundMessage, origin: Origin) -> Result<SendDecision, PluginError> {
        let _ = (msg, origin);
        Ok(SendDecision::Keep)
    }

    /// Called after the server accepted a message.
    fn after_send(sent: Sent, origin: Origin) {
        let _ = (sent, origin);
    }

    /// Called after a send attempt failed; `failure.will_retry` says whether the daemon tries
    /// again.
    fn send_failed(failure: SendFailure, origin: Origin) {
        let _ = (failure, origin);
    }

    /// Called on every tick of a timer the manifest declares.
    fn on_tick(tick: Tick) {
        let _ = tick;
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as the component's hooks.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        struct __AgentchatPluginExports;

        impl $crate::bindings::exports::agentchat::plugin::lifecycle::Guest
            for __AgentchatPluginExports
        {
            fn start(
                info: $crate::StartInfo,
            ) -> ::core::result::Result<(), $crate::PluginError> {
                <$plugin as $crate::Plugin>::start(info)
            }

            fn stop(reason: $crate::StopReason) {
                <$plugin as $crate::Plugin>::stop(reason)
            }
        }

        impl $crate::bindings::exports::agentchat::plugin::inbound::Guest
            for __AgentchatPluginExports
        {
            fn on_message(
                msg: $crate::Message,
            ) -> ::core::result::Result<$crate::Decision, $crate::PluginError> {
                <$plugin as $crate::Plugin>::on_message(msg)
            }
        }

        impl $crate::bindings::exports::agentchat::plugin::outbound::Guest
            for __AgentchatPluginExports
        {
            fn before_send(
                msg: $crate::OutboundMessage,
                source: $crate::Origin,
            ) -> ::core::result::Result<$crate::SendDecision, $crate::PluginError> {
                <$plugin as $crate::Plugin>::before_send(msg, source)
            }

            fn after_send(sent: $crate::Sent, source: $crate::Origin) {
                <$plugin as $crate::Plugin>::after_send(sent, source)
            }

            fn send_failed(failure: $crate::SendFailure, source: $crate::Origin) {
                <$plugin as $crate::Plugin>::send_failed(failure, source)
            }
        }

        impl $crate::bindings::exports::agentchat::plugin::timer::Guest
            for __AgentchatPluginExports
        {
            fn on_tick(tick: $crate::Tick) {
                <$plugin as $crate::Plugin>::on_tick(tick)
            }
        }

        $crate::bindings::__export_full!(__AgentchatPluginExports with_types_in $crate::bindings);
    };
}

/// A draft with `text` for the conversation of the message being answered.
pub fn draft(text: impl Into<String>) -> Draft {
    Draft { conversation_id: None, text: Some(text.into()), data_json: None }
}

/// Answer with `text`; later plugins still run.
pub fn reply(text: impl Into<String>) -> Decision {
    Decision::Reply(vec![draft(text)])
}

/// Answer with `text` and stop: later plugins do not run.
pub fn claim(text: impl Into<String>) -> Decision {
    Decision::Claim(vec![draft(text)])
}

/// No opinion: later plugins run.
pub fn pass() -> Decision {
    Decision::Pass
}

/// Swallow the message: nothing is sent and later plugins do not run. (Not called `drop`,
/// which would shadow `std::mem::drop` wherever the prelude is imported.)
pub fn drop_message() -> Decision {
    Decision::Drop
}

/// The text of a text message; `None` for every other kind.
pub fn text_of(msg: &Message) -> Option<&str> {
    match msg.kind {
        ContentKind::Text => msg.text.as_deref(),
        _ => None,
    }
}

/// The operator's config for this plugin (checked against the manifest's schema before the
/// plugin starts).
pub mod config {
    use serde::de::DeserializeOwned;

    use super::PluginError;
    use super::bindings::agentchat::plugin::config as host;

    /// The top-level value at `key`: strings as they are, other values as JSON text.
    pub fn get(key: &str) -> Option<String> {
        host::get(key)
    }

    /// The whole config as JSON text (`{}` when the operator set none).
    pub fn json() -> String {
        host::all_json()
    }

    /// The whole config parsed into `T`.
    ///
    /// # Errors
    ///
    /// `PluginError::BadInput` naming the serde error when the config does not fit `T`.
    pub fn parse<T: DeserializeOwned>() -> Result<T, PluginError> {
        serde_json::from_str(&host::all_json())
            .map_err(|err| PluginError::BadInput(format!("config does not fit: {err}")))
    }
}

/// Logging through the daemon. Lines carry the plugin id; the host caps them per call. Put ids
/// in fields and keep message text out of the log.
pub mod log {
    use super::Level;
    use super::bindings::agentchat::plugin::log as host;

    /// Writes one line at `level` with `key = value` fields.
    pub fn write(level: Level, msg: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(String, String)> =
            fields.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
        host::log(level, msg, &fields);
    }

    /// A debug line.
    pub fn debug(msg: &str, fields: &[(&str, &str)]) {
        write(Level::Debug, msg, fields);
    }

    /// An info line.
    pub fn info(msg: &str, fields: &[(&str, &str)]) {
        write(Level::Info, msg, fields);
    }

    /// A warn line.
    pub fn warn(msg: &str, fields: &[(&str, &str)]) {
        write(Level::Warn, msg, fields);
    }

    /// An error line.
    pub fn error(msg: &str, fields: &[(&str, &str)]) {
        write(Level::Error, msg, fields);
    }
}

/// Key-value state kept by the daemon for this plugin alone; it survives restarts and
/// reloads. Needs the `kv` capability. Keys are at most 256 bytes, values at most 64 KiB, and
/// the operator sets the plugin's total quota.
pub mod kv {
    use super::bindings::agentchat::plugin::kv as host;
    pub use super::bindings::agentchat::plugin::kv::KvError;

    /// The value at `key`, if any (expired entries read as absent).
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        host::get(key)
    }

    /// Stores `value` at `key`; with `ttl_ms` it expires after that many milliseconds.
    pub fn set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), KvError> {
        host::set(key, value, ttl_ms)
    }

    /// Removes `key`.
    pub fn delete(key: &str) -> Result<(), KvError> {
        host::delete(key)
    }

    /// Keys starting with `prefix`, in byte order, at most `limit`.
    pub fn keys(prefix: &str, limit: u32) -> Result<Vec<String>, KvError> {
        host::list_keys(prefix, limit)
    }

    /// Stores `value` only if the current value is `expected` (`None`: absent). Returns
    /// whether it stored; use it for counters that several calls may bump at once.
    pub fn swap_if(
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        host::swap_if(key, expected, value, ttl_ms)
    }

    /// Adds one to the decimal counter at `key` (absent counts as 0) and returns the new
    /// value. Retries the compare-and-set a few times when another call got in between.
    pub fn increment(key: &str, ttl_ms: Option<u64>) -> Result<u64, KvError> {
        for _ in 0..8 {
            let current = get(key)?;
            let n: u64 = current
                .as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let next = (n + 1).to_string();
            if swap_if(key, current.as_deref(), next.as_bytes(), ttl_ms)? {
                return Ok(n + 1);
            }
        }
        Err(KvError::Unavailable("the counter kept changing; try again".into()))
    }
}

/// Proactive sends through the daemon's queue, with the same pacing, thread rules and
/// outbound hooks as replies. Needs the `send` capability.
pub mod messaging {
    use super::NewMessage;
    use super::bindings::agentchat::plugin::messaging as host;
    pub use super::bindings::agentchat::plugin::messaging::SendRefusal;

    /// Queues `msg`; returns its idempotency key.
    pub fn send(msg: &NewMessage) -> Result<String, SendRefusal> {
        host::send(msg)
    }

    /// Queues a direct text message to `handle`.
    pub fn send_text(handle: &str, text: &str) -> Result<String, SendRefusal> {
        send(&NewMessage {
            to: Some(handle.to_string()),
            conversation_id: None,
            text: Some(text.to_string()),
            data_json: None,
            key: None,
        })
    }
}

/// Conversation history, read through the daemon's paced client. Needs `history`.
pub mod history {
    use super::HistoryMessage;
    use super::bindings::agentchat::plugin::history as host;
    pub use super::bindings::agentchat::plugin::history::HistoryError;

    /// Up to `limit` (1-200) newest messages of the conversation, oldest first.
    pub fn recent(conversation_id: &str, limit: u32) -> Result<Vec<HistoryMessage>, HistoryError> {
        host::recent(conversation_id, limit)
    }
}

/// Outbound HTTP to the hosts the operator granted (`http-allowed-hosts`).
pub mod http {
    use super::bindings::agentchat::plugin::http as host;
    pub use super::bindings::agentchat::plugin::http::{HttpError, Request, Response};

    /// Sends `req`; the host follows redirects to granted hosts only.
    pub fn fetch(req: &Request) -> Result<Response, HttpError> {
        host::fetch(req)
    }

    /// POSTs `body` as JSON to `url` with extra `headers`.
    pub fn post_json(
        url: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
        timeout_ms: Option<u32>,
    ) -> Result<Response, HttpError> {
        let mut all: Vec<(String, String)> =
            vec![("content-type".to_string(), "application/json".to_string())];
        all.extend(headers.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())));
        fetch(&Request {
            method: "POST".to_string(),
            url: url.to_string(),
            headers: all,
            body: Some(body.to_string().into_bytes()),
            timeout_ms,
        })
    }
}

/// Milliseconds since the Unix epoch, from the host's clock (WASI wall clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Everything a plugin usually needs: `use agentchat_plugin_sdk::prelude::*;`.
pub mod prelude {
    pub use super::{
        Content, ContentKind, ConversationKind, Decision, Draft, Message, NewMessage, Origin,
        OutboundMessage, Plugin, PluginError, SendDecision, SendFailure, Sent, StartInfo,
        StopReason, Tick, Trigger, claim, config, draft, drop_message, export_plugin, history,
        http, kv, log, messaging, now_ms, pass, reply, text_of,
    };
}
