//! Host bindings generated from `plugins/wit` and the conversions between them and the public
//! types of [`crate::plugins`].
//!
//! Only this file knows the generated names, so a future WIT version gets its own bindings
//! module that converts to the same public types.

use super::{ContentKind, ConversationKind, Decision, Draft, InboundMessage};

wasmtime::component::bindgen!({
    world: "replier",
    path: "plugins/wit",
    // Exports run on the async store so a call can be cut off without blocking a tokio thread;
    // the imports (log, config) are cheap and stay synchronous.
    exports: { default: async },
});

pub(crate) use agentchat::plugin::types as wit;
pub(crate) use exports::agentchat::plugin::inbound::PluginError as WitPluginError;

/// Converts a message into the record the guest receives.
pub(crate) fn to_wit_message(msg: &InboundMessage) -> wit::InboundMessage {
    wit::InboundMessage {
        id: msg.id.clone(),
        conversation_id: msg.conversation_id.clone(),
        conversation_kind: match msg.conversation_kind {
            ConversationKind::Direct => wit::ConversationKind::Direct,
            ConversationKind::Group => wit::ConversationKind::Group,
        },
        sender: msg.sender.clone(),
        kind: match msg.kind {
            ContentKind::Text => wit::ContentKind::Text,
            ContentKind::Structured => wit::ContentKind::Structured,
            ContentKind::File => wit::ContentKind::File,
            ContentKind::System => wit::ContentKind::System,
        },
        text: msg.text.clone(),
        data_json: msg.data_json.clone(),
        attachment_id: msg.attachment_id.clone(),
        seq: msg.seq,
        received_at_ms: msg.received_at_ms,
    }
}

/// Converts a guest decision into the public type, before validation.
pub(crate) fn from_wit_decision(decision: wit::InboundDecision) -> Decision {
    match decision {
        wit::InboundDecision::Pass => Decision::Pass,
        wit::InboundDecision::Reply(drafts) => Decision::Reply(from_wit_drafts(drafts)),
        wit::InboundDecision::Claim(drafts) => Decision::Claim(from_wit_drafts(drafts)),
        wit::InboundDecision::Drop => Decision::Drop,
    }
}

fn from_wit_drafts(drafts: Vec<wit::Draft>) -> Vec<Draft> {
    drafts
        .into_iter()
        .map(|d| Draft { conversation_id: d.conversation_id, text: d.text, data_json: d.data_json })
        .collect()
}

/// Renders a plugin-reported error as `kind: detail`.
pub(crate) fn describe_plugin_error(err: &WitPluginError) -> String {
    match err {
        WitPluginError::BadInput(detail) => format!("bad-input: {detail}"),
        WitPluginError::Unavailable(detail) => format!("unavailable: {detail}"),
        WitPluginError::Internal(detail) => format!("internal: {detail}"),
    }
}
