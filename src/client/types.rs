//! Wire shapes of the AgentChat API that the daemon reads and writes.
//!
//! Every field the protocol marks optional, or that only some surfaces carry, is an `Option`
//! here, so a message from the live socket, a sync page or history all decode into one type.

use serde::{Deserialize, Serialize};

/// A message as the API returns it (send response, `message.new`, sync and history rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `msg_…`, the dedupe key.
    pub id: String,
    /// `conv_…` (direct) or `grp_…` (group).
    pub conversation_id: String,
    /// Sender handle.
    pub sender: String,
    /// The sender's idempotency key.
    #[serde(default)]
    pub client_msg_id: Option<String>,
    /// Per-conversation sequence number, from 1.
    pub seq: u64,
    /// `text`, `structured`, `file` or `system`.
    #[serde(rename = "type", default = "default_type")]
    pub kind: String,
    /// `{text?, data?, attachment_id?}`.
    #[serde(default)]
    pub content: Content,
    /// Sender-supplied, untrusted.
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// Creation time, RFC 3339.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Envelope cursor on sync, drain and history rows.
    #[serde(default)]
    pub delivery_id: Option<String>,
    /// Envelope status where the surface carries it.
    #[serde(default)]
    pub status: Option<String>,
}

fn default_type() -> String {
    "text".to_owned()
}

/// Message content; at least one field is present on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Content {
    /// Plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Structured payload (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// An uploaded attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment_id: Option<String>,
}

impl Message {
    /// Whether the message belongs to a group conversation.
    pub fn is_group(&self) -> bool {
        self.conversation_id.starts_with("grp_")
    }
}

/// Body of `POST /v1/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendRequest {
    /// Recipient handle for a direct send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Group id for a group send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// Idempotency key; resending the same one is answered with the original message.
    pub client_msg_id: String,
    /// `text` or `structured`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The content.
    pub content: Content,
}

/// What a successful send returned.
#[derive(Debug, Clone)]
pub struct SendOutcome {
    /// The stored message.
    pub message: Message,
    /// True on a 200 replay of an earlier send with the same `client_msg_id`.
    pub replayed: bool,
    /// `X-Backlog-Warning` as (recipient handle, undelivered count), when sent.
    pub backlog_warning: Option<(String, u64)>,
}

/// The parts of `GET /v1/agents/me` the daemon uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Me {
    /// The agent's handle.
    pub handle: String,
    /// `active`, `restricted` or `suspended`.
    #[serde(default)]
    pub status: Option<String>,
}

/// Response of `POST /v1/messages/sync/ack`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct AckResult {
    /// Envelopes that moved to `delivered`.
    pub acked: u64,
}

/// One row of a sync page: a message, or the raw row when it does not decode.
#[derive(Debug, Clone)]
pub enum SyncRow {
    /// A well-formed row.
    Message(Box<Message>),
    /// A row that does not follow the protocol.
    Malformed {
        /// The row as received.
        raw: serde_json::Value,
        /// Why it could not be read.
        reason: String,
    },
}

impl SyncRow {
    /// Decodes one row.
    pub fn from_value(raw: serde_json::Value) -> Self {
        match serde_json::from_value::<Message>(raw.clone()) {
            Ok(message) => Self::Message(Box::new(message)),
            Err(err) => Self::Malformed { raw, reason: err.to_string() },
        }
    }

    /// The row's envelope cursor, when it has one.
    pub fn delivery_id(&self) -> Option<&str> {
        match self {
            Self::Message(message) => message.delivery_id.as_deref(),
            Self::Malformed { raw, .. } => raw.get("delivery_id").and_then(|d| d.as_str()),
        }
    }
}
