//! The data the lifecycle, outbound and timer hooks exchange with the host, as public types
//! (mirrors of the WIT records, independent of the generated bindings).

use std::time::Duration;

/// What kind of event produced an outbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A plugin's decision on an inbound message.
    Inbound,
    /// A plugin's timer tick.
    Timer,
    /// A plugin's `start` hook.
    Startup,
    /// A plugin reacting to another send.
    PluginSend,
    /// The operator (`agentchatd send`).
    Operator,
}

impl Trigger {
    /// The name used in queue origins and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Inbound => "inbound",
            Trigger::Timer => "timer",
            Trigger::Startup => "startup",
            Trigger::PluginSend => "plugin-send",
            Trigger::Operator => "operator",
        }
    }

    /// The trigger named `name` by [`Trigger::as_str`].
    pub fn parse(name: &str) -> Option<Trigger> {
        [Trigger::Inbound, Trigger::Timer, Trigger::Startup, Trigger::PluginSend, Trigger::Operator]
            .into_iter()
            .find(|t| t.as_str() == name)
    }
}

/// Where an outbound message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The plugin that produced it; `None` for operator sends.
    pub plugin_id: Option<String>,
    pub trigger: Trigger,
    /// Proactive sends leading up to this one (0 for replies and operator sends).
    pub hops: u8,
}

/// Most hops a proactive send may have; deeper ones are refused as a loop.
pub const MAX_HOPS: u8 = 2;

/// An outbound message as it sits in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// The idempotency key (`client_msg_id`).
    pub key: String,
    /// Recipient handle of a direct message.
    pub to: Option<String>,
    /// Target conversation of a group message.
    pub conversation_id: Option<String>,
    pub text: Option<String>,
    /// A JSON object.
    pub data_json: Option<String>,
}

/// Content a `before-send` hook puts in place of a message's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub text: Option<String>,
    /// A JSON object.
    pub data_json: Option<String>,
}

/// What the `before-send` chain decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendVerdict {
    /// Send it unchanged.
    Keep,
    /// Send this content instead; `by` lists the plugins that rewrote it, in order.
    Rewrite { content: Content, by: Vec<String> },
    /// Do not send it.
    Cancel { plugin_id: String, reason: String },
}

/// A message the server accepted, for `after-send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub message: OutboundMessage,
    /// Server-assigned id.
    pub message_id: String,
    pub sent_at_ms: u64,
}

/// Why a send did not go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Refused for good.
    Rejected,
    /// A rate limit answered; retried later.
    RateLimited,
    /// A server or network failure; retried with backoff.
    Transient,
    /// A `before-send` hook cancelled it.
    Cancelled,
}

/// A failed send attempt, for `send-failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    pub message: OutboundMessage,
    pub class: FailureClass,
    /// What went wrong.
    pub detail: String,
    /// Attempts made so far, this one included.
    pub attempt: u32,
    /// Whether the daemon will try again.
    pub will_retry: bool,
}

/// Why `start` is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReason {
    Boot,
    Reload,
}

/// Why `stop` is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Shutdown,
    Reload,
}

/// Longest a `stop` call may take, whatever the plugin's own budget.
pub const STOP_BUDGET: Duration = Duration::from_secs(2);
