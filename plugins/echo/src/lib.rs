//! Echo: the example AgentChat plugin.
//!
//! It answers every text message with one draft, `echo: <text>`, in the same conversation, and
//! passes on every other kind of message. The optional config key `prefix` replaces `echo: `. It is the smallest useful plugin and the one the
//! host's tests run.

wit_bindgen::generate!({
    world: "replier",
    path: "../wit",
});

use agentchat::plugin::config;
use agentchat::plugin::log::log;
use agentchat::plugin::types::{ContentKind, Draft, InboundMessage, Level};
use exports::agentchat::plugin::inbound::{Guest, InboundDecision, PluginError};

struct Echo;

impl Guest for Echo {
    fn on_message(msg: InboundMessage) -> Result<InboundDecision, PluginError> {
        let text = match (msg.kind, msg.text) {
            (ContentKind::Text, Some(text)) => text,
            _ => return Ok(InboundDecision::Pass),
        };

        // Fields carry ids only: message text stays out of the log.
        log(
            Level::Debug,
            "echoing text message",
            &[
                ("message_id".to_string(), msg.id),
                ("bytes".to_string(), text.len().to_string()),
            ],
        );
        let prefix = config::get("prefix").unwrap_or_else(|| "echo: ".to_string());
        let draft = Draft {
            conversation_id: None,
            text: Some(format!("{prefix}{text}")),
            data_json: None,
        };
        Ok(InboundDecision::Reply(vec![draft]))
    }
}

export!(Echo);
