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
//! instance, so a plugin keeps no state between messages: everything it needs comes from the
//! message and [`config`]. This crate wraps the bindings of `agentchat:plugin@0.1.0`; it does
//! no I/O of its own.

/// The generated bindings of the `replier` world; [`export_plugin!`] uses them.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "replier",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_replier",
        default_bindings_module: "agentchat_plugin_sdk::bindings",
    });
}

use bindings::agentchat::plugin::types;
pub use bindings::exports::agentchat::plugin::inbound::PluginError;
pub use types::{ContentKind, ConversationKind, Draft, InboundDecision as Decision, Level};

/// One inbound message, as the host hands it over.
pub type Message = types::InboundMessage;

/// The plugin API version this SDK targets; put it in the manifest's `api` key.
pub const API_VERSION: &str = "agentchat:plugin@0.1.0";

/// The hooks of a plugin. Each has a default, so a plugin writes only the ones it uses.
pub trait Plugin {
    /// Called for every inbound message; the default passes.
    ///
    /// Return [`reply`] to queue an answer and let later plugins run, [`claim`] to answer and
    /// stop them, [`pass`] for no opinion and [`drop_message`] to swallow the message. An
    /// `Err` is logged by the host and counts as a pass.
    fn on_message(msg: Message) -> Result<Decision, PluginError> {
        let _ = msg;
        Ok(Decision::Pass)
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as the component's hooks.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        struct __AgentchatPluginExports;

        impl $crate::bindings::exports::agentchat::plugin::inbound::Guest
            for __AgentchatPluginExports
        {
            fn on_message(
                msg: $crate::Message,
            ) -> ::core::result::Result<$crate::Decision, $crate::PluginError> {
                <$plugin as $crate::Plugin>::on_message(msg)
            }
        }

        $crate::bindings::__export_replier!(
            __AgentchatPluginExports with_types_in $crate::bindings
        );
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

/// Everything a plugin usually needs: `use agentchat_plugin_sdk::prelude::*;`.
pub mod prelude {
    pub use super::{
        ContentKind, ConversationKind, Decision, Draft, Message, Plugin, PluginError, claim,
        config, draft, drop_message, export_plugin, log, pass, reply, text_of,
    };
}
