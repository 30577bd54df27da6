//! Host bindings generated from `plugins/wit` and the conversions between them and the public
//! types of [`crate::plugins`].
//!
//! Only this file knows the generated names, so a future WIT version gets its own bindings
//! module that converts to the same public types. The bindings are those of the `full` world;
//! a plugin built for `replier` or `guard` exports fewer interfaces, and the host looks each
//! one up on its own (see [`Exports`]).

use super::hooks::{
    Content, FailureClass, Origin, OutboundMessage, SendFailure, Sent, StartReason, StopReason,
    Trigger,
};
use super::{ContentKind, ConversationKind, Decision, Draft, InboundMessage};

wasmtime::component::bindgen!({
    world: "full",
    path: "plugins/wit",
    // Exports run on the async store so a call can be cut off without blocking a tokio thread;
    // imports are async because kv, messaging, history and http wait on I/O.
    exports: { default: async },
    imports: { default: async },
});

pub(crate) use agentchat::plugin::types as wit;
pub(crate) use exports::agentchat::plugin::{inbound, lifecycle, outbound, timer};

/// Where each hook of one component lives, found once at load. `None`: not exported.
pub(crate) struct Exports {
    pub lifecycle: Option<lifecycle::GuestIndices>,
    pub inbound: Option<inbound::GuestIndices>,
    pub outbound: Option<outbound::GuestIndices>,
    pub timer: Option<timer::GuestIndices>,
}

impl Exports {
    pub(crate) fn find<T>(pre: &wasmtime::component::InstancePre<T>) -> Exports {
        Exports {
            lifecycle: lifecycle::GuestIndices::new(pre).ok(),
            inbound: inbound::GuestIndices::new(pre).ok(),
            outbound: outbound::GuestIndices::new(pre).ok(),
            timer: timer::GuestIndices::new(pre).ok(),
        }
    }

    /// Whether the hook named as in [`super::KNOWN_HOOKS`] is exported.
    pub(crate) fn has(&self, hook: &str) -> bool {
        match hook {
            "lifecycle" => self.lifecycle.is_some(),
            "inbound" => self.inbound.is_some(),
            "outbound" => self.outbound.is_some(),
            "timer" => self.timer.is_some(),
            _ => false,
        }
    }
}

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
        kind: to_wit_kind(msg.kind),
        text: msg.text.clone(),
        data_json: msg.data_json.clone(),
        attachment_id: msg.attachment_id.clone(),
        seq: msg.seq,
        received_at_ms: msg.received_at_ms,
    }
}

pub(crate) fn to_wit_kind(kind: ContentKind) -> wit::ContentKind {
    match kind {
        ContentKind::Text => wit::ContentKind::Text,
        ContentKind::Structured => wit::ContentKind::Structured,
        ContentKind::File => wit::ContentKind::File,
        ContentKind::System => wit::ContentKind::System,
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

/// What one `before-send` call returned, before validation.
pub(crate) enum GuestSendDecision {
    Keep,
    Rewrite(Content),
    Cancel(String),
}

pub(crate) fn from_wit_send_decision(decision: wit::SendDecision) -> GuestSendDecision {
    match decision {
        wit::SendDecision::Keep => GuestSendDecision::Keep,
        wit::SendDecision::Rewrite(c) => {
            GuestSendDecision::Rewrite(Content { text: c.text, data_json: c.data_json })
        }
        wit::SendDecision::Cancel(reason) => GuestSendDecision::Cancel(reason),
    }
}

pub(crate) fn to_wit_outbound(msg: &OutboundMessage) -> wit::OutboundMessage {
    wit::OutboundMessage {
        key: msg.key.clone(),
        to: msg.to.clone(),
        conversation_id: msg.conversation_id.clone(),
        text: msg.text.clone(),
        data_json: msg.data_json.clone(),
    }
}

pub(crate) fn to_wit_origin(origin: &Origin) -> wit::Origin {
    wit::Origin {
        plugin_id: origin.plugin_id.clone(),
        trigger: match origin.trigger {
            Trigger::Inbound => wit::Trigger::Inbound,
            Trigger::Timer => wit::Trigger::Timer,
            Trigger::Startup => wit::Trigger::Startup,
            Trigger::PluginSend => wit::Trigger::PluginSend,
            Trigger::Operator => wit::Trigger::Operator,
        },
        hops: origin.hops,
    }
}

pub(crate) fn to_wit_sent(sent: &Sent) -> wit::Sent {
    wit::Sent {
        message: to_wit_outbound(&sent.message),
        message_id: sent.message_id.clone(),
        sent_at_ms: sent.sent_at_ms,
    }
}

pub(crate) fn to_wit_failure(failure: &SendFailure) -> wit::SendFailure {
    wit::SendFailure {
        message: to_wit_outbound(&failure.message),
        class: match failure.class {
            FailureClass::Rejected => wit::FailureClass::Rejected,
            FailureClass::RateLimited => wit::FailureClass::RateLimited,
            FailureClass::Transient => wit::FailureClass::Transient,
            FailureClass::Cancelled => wit::FailureClass::Cancelled,
        },
        detail: failure.detail.clone(),
        attempt: failure.attempt,
        will_retry: failure.will_retry,
    }
}

pub(crate) fn to_wit_start_reason(reason: StartReason) -> wit::StartReason {
    match reason {
        StartReason::Boot => wit::StartReason::Boot,
        StartReason::Reload => wit::StartReason::Reload,
    }
}

pub(crate) fn to_wit_stop_reason(reason: StopReason) -> wit::StopReason {
    match reason {
        StopReason::Shutdown => wit::StopReason::Shutdown,
        StopReason::Reload => wit::StopReason::Reload,
    }
}

/// Renders a plugin-reported error as `kind: detail`.
///
/// The detail is the guest's own text and ends up in warn logs, dead letters and `status`, so
/// it is cut and stripped of control characters here, once for every caller.
pub(crate) fn describe_plugin_error(err: &wit::PluginError) -> String {
    let shown = |detail: &str| super::call::shown(detail, MAX_PLUGIN_ERROR_BYTES);
    match err {
        wit::PluginError::BadInput(detail) => format!("bad-input: {}", shown(detail)),
        wit::PluginError::Unavailable(detail) => format!("unavailable: {}", shown(detail)),
        wit::PluginError::Internal(detail) => format!("internal: {}", shown(detail)),
    }
}

/// Longest detail of a plugin's own error kept, in bytes.
const MAX_PLUGIN_ERROR_BYTES: usize = 512;
