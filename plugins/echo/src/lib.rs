//! Echo: the example AgentChat plugin.
//!
//! It answers every text message with one draft, `echo: <text>`, in the same conversation, and
//! passes on every other kind of message. The optional config key `prefix` replaces `echo: `.
//! It is the smallest useful plugin and the one the host's tests run.

use agentchat_plugin_sdk::prelude::*;

struct Echo;

impl Plugin for Echo {
    fn on_message(msg: Message) -> Result<Decision, PluginError> {
        let Some(text) = text_of(&msg) else {
            return Ok(pass());
        };

        // Fields carry ids only: message text stays out of the log.
        log::debug("echoing text message", &[("message_id", &msg.id)]);
        let prefix = config::get("prefix").unwrap_or_else(|| "echo: ".to_string());
        Ok(reply(format!("{prefix}{text}")))
    }
}

export_plugin!(Echo);
