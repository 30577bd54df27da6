//! Receives the agent's inbox and turns each message into recorded decisions.
//!
//! Two transports feed the same [`Processor`]: the WebSocket ([`websocket`]) and polling of
//! `/v1/messages/sync` ([`poll`]). Whatever the transport, a message is acknowledged to the
//! server only after [`Processor::handle`] has returned, and `handle` returns only once the
//! plugins' decision and the replies it produced are committed to the store in one
//! transaction. A crash therefore leaves a message either unacknowledged (and redelivered,
//! then recognised by its id if it had been recorded) or fully handled.
//!
//! Messages are handled one at a time in arrival order. Known shortcoming: the platform may
//! push one conversation's messages out of `seq` order when a peer sends several at once, and
//! they are then handled (and answered) in the order they arrived; a per-conversation reorder
//! buffer with gap-fill from history would fix it. Plugin failures never hold a message back:
//! a plugin call that traps, times out or returns bad output counts as that plugin passing,
//! and the message is still acknowledged. A plugin that waits on the network (an `http` or
//! `history` import) holds up the messages behind it for as long as its budget allows.

pub mod poll;
pub mod websocket;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::client::{Content, Message, SendRequest};
use crate::ops::http::OpsState;
use crate::ops::metrics::Metrics;
use crate::outbox::{content_too_large, new_send, now_ms, reply_key};
use crate::plugins::{self, ConversationKind, Decision, Draft, PluginHost, PluginSet};
use crate::service::INBOX_LOOP;
use crate::store::{Inbound, NewSend, Store, StoreError};

/// Why the inbox stopped.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The state store failed; unacknowledged messages will be redelivered after a restart.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server refused the key or the agent is suspended; the operator must act.
    #[error("the server refused the agent's credentials: {0}")]
    Fatal(String),
}

/// What happened to one inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Plugins ran and their outcome (with any replies) is recorded.
    Processed {
        /// How many replies were queued.
        replies: usize,
    },
    /// The message had been handled before; nothing was done again.
    Duplicate,
    /// The agent's own message (seen through history or a second device); ignored.
    Own,
}

/// Runs plugins on inbound messages and records the outcome.
pub struct Processor {
    store: Store,
    /// The current plugin set; a reload swaps it, and a message already being handled keeps
    /// the set it started with.
    plugins: PluginSet,
    me: String,
    outbox_wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    guard: LoopGuard,
}

/// Caps on automatic replies, so agents whose plugins answer each other come to rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopGuard {
    /// Replies at most this many times per conversation within `window`.
    pub per_conversation: u32,
    /// Replies at most this many times to one sender (all conversations) within `window`.
    pub per_peer: u32,
    /// The sliding window the caps count in.
    pub window: Duration,
}

impl Default for LoopGuard {
    fn default() -> Self {
        Self { per_conversation: 100, per_peer: 300, window: Duration::from_secs(600) }
    }
}

impl Processor {
    /// A processor for the agent `me`.
    pub fn new(
        store: Store,
        plugins: impl Into<PluginSet>,
        me: String,
        outbox_wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            plugins: plugins.into(),
            me,
            outbox_wake,
            metrics,
            guard: LoopGuard::default(),
        }
    }

    /// Replaces the plugin set for the messages handled from now on; returns the old set.
    pub fn swap_plugins(&self, plugins: Arc<PluginHost>) -> Arc<PluginHost> {
        self.plugins.replace(plugins)
    }

    /// The plugin set this processor uses, to share with the outbox and the timers.
    pub fn plugin_set(&self) -> PluginSet {
        self.plugins.clone()
    }

    /// Sets the caps on automatic replies.
    #[must_use]
    pub fn with_loop_guard(mut self, guard: LoopGuard) -> Self {
        self.guard = guard;
        self
    }

    /// Whether answering `message` would exceed the automatic-reply caps. Two agents whose
    /// plugins answer each other come to rest here, whatever the plugins do.
    async fn over_reply_cap(&self, message: &Message) -> Result<bool, StoreError> {
        let window_ms = i64::try_from(self.guard.window.as_millis()).unwrap_or(i64::MAX);
        let since = now_ms().saturating_sub(window_ms);
        let (in_conversation, to_sender) =
            self.store.recent_replies(&message.conversation_id, &message.sender, since).await?;
        let capped = in_conversation >= u64::from(self.guard.per_conversation)
            || to_sender >= u64::from(self.guard.per_peer);
        if capped {
            tracing::warn!(
                conversation = %message.conversation_id,
                peer = %message.sender,
                in_conversation,
                to_sender,
                window_secs = self.guard.window.as_secs(),
                "automatic replies capped; the message is acknowledged without a reply"
            );
        }
        Ok(capped)
    }

    /// The metrics this processor (and the inbox around it) updates.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Handles one message: dedupe, plugins, then one transaction recording the message as
    /// processed together with its replies.
    ///
    /// # Errors
    /// Only when the store fails; the message must then not be acknowledged.
    pub async fn handle(&self, message: &Message) -> Result<Handled, StoreError> {
        self.metrics.messages_received.inc();
        if self.store.is_processed(&message.id).await? {
            tracing::debug!(message_id = %message.id, "duplicate message skipped");
            return Ok(Handled::Duplicate);
        }
        if message.sender == self.me {
            self.store.record_processed(inbound_key(message), "own", vec![], now_ms()).await?;
            return Ok(Handled::Own);
        }

        // The peer wrote: the thread is established, and sends held for its reply may go.
        if !message.is_group()
            && self
                .store
                .note_peer_wrote(&message.sender, &message.conversation_id, now_ms())
                .await?
        {
            tracing::info!(peer = %message.sender, "peer replied; its thread is established");
            self.outbox_wake.notify_one();
        }

        let inbound = to_plugin_message(message);
        let plugins = self.plugins.current();
        let verdicts = plugins.on_message(&inbound).await;
        let mut sends: Vec<NewSend> = Vec::new();
        let mut outcome: Vec<String> = Vec::new();
        for verdict in verdicts {
            let drafts = match verdict.result {
                Ok(Decision::Pass) => continue,
                Ok(Decision::Drop) => {
                    outcome.push(format!("drop:{}", verdict.plugin_id));
                    continue;
                }
                Ok(Decision::Reply(drafts) | Decision::Claim(drafts)) => drafts,
                Err(err) => {
                    tracing::warn!(
                        plugin = %verdict.plugin_id, message_id = %message.id, error = %err,
                        "plugin call failed; counted as pass"
                    );
                    outcome.push(format!("error:{}", verdict.plugin_id));
                    continue;
                }
            };
            outcome.push(format!("reply:{}", verdict.plugin_id));
            for (index, draft) in drafts.into_iter().enumerate() {
                match reply_request(message, &verdict.plugin_id, index, draft) {
                    Ok((key, request)) => {
                        let origin = format!("reply:{}:{}:{index}", message.id, verdict.plugin_id);
                        sends.push(new_send(key, &request, origin));
                    }
                    Err(reason) => tracing::warn!(
                        plugin = %verdict.plugin_id, message_id = %message.id, %reason,
                        "reply draft discarded"
                    ),
                }
            }
        }

        if !sends.is_empty() && self.over_reply_cap(message).await? {
            sends.clear();
            outcome.push("capped".to_owned());
        }
        let replies = sends.len();
        let outcome = if outcome.is_empty() { "pass".to_owned() } else { outcome.join(",") };
        let fresh =
            self.store.record_processed(inbound_key(message), &outcome, sends, now_ms()).await?;
        if !fresh {
            return Ok(Handled::Duplicate);
        }
        self.metrics.messages_processed.inc();
        if replies > 0 {
            self.outbox_wake.notify_one();
        }
        tracing::debug!(message_id = %message.id, %outcome, replies, "message processed");
        Ok(Handled::Processed { replies })
    }
}

fn inbound_key(message: &Message) -> Inbound<'_> {
    Inbound {
        id: &message.id,
        conversation_id: &message.conversation_id,
        sender: &message.sender,
        seq: message.seq,
    }
}

fn to_plugin_message(message: &Message) -> plugins::InboundMessage {
    let kind = plugins::content_kind(&message.kind);
    let conversation_kind =
        if message.is_group() { ConversationKind::Group } else { ConversationKind::Direct };
    plugins::InboundMessage {
        id: message.id.clone(),
        conversation_id: message.conversation_id.clone(),
        conversation_kind,
        sender: message.sender.clone(),
        kind,
        text: message.content.text.clone(),
        data_json: message.content.data.as_ref().map(|d| d.to_string()),
        attachment_id: message.content.attachment_id.clone(),
        seq: message.seq,
        received_at_ms: u64::try_from(now_ms()).unwrap_or(0),
    }
}

/// Turns a plugin's draft into a send request addressed the way the API wants: direct
/// conversations by the peer's handle, groups by their id.
fn reply_request(
    message: &Message,
    plugin: &str,
    index: usize,
    draft: Draft,
) -> Result<(String, SendRequest), String> {
    // A reply goes where the message came from. Writing anywhere else is a proactive send:
    // it needs the `send` grant and counts against the plugin's cap (`messaging.send`), and
    // the reply caps, which count the conversation answered, could not hold it back.
    let target = draft.conversation_id.unwrap_or_else(|| message.conversation_id.clone());
    if target != message.conversation_id {
        return Err(format!(
            "draft names conversation {target}, which is not the one being answered; a reply \
             goes to the current conversation, use messaging.send (with the `send` grant) to \
             write elsewhere"
        ));
    }
    let (to, conversation_id) = if target.starts_with("grp_") {
        (None, Some(target))
    } else {
        (Some(message.sender.clone()), None)
    };
    let data = match draft.data_json {
        Some(json) => Some(
            serde_json::from_str::<serde_json::Value>(&json)
                .map_err(|err| format!("data-json is not valid JSON: {err}"))?,
        ),
        None => None,
    };
    let kind = if draft.text.is_none() && data.is_some() { "structured" } else { "text" };
    let content = Content { text: draft.text, data, attachment_id: None };
    // A send that is sure to be refused is not queued.
    if let Some(why) = content_too_large(&content) {
        return Err(why);
    }
    let request = SendRequest {
        to,
        conversation_id,
        client_msg_id: reply_key(&message.id, plugin, index),
        kind: kind.to_owned(),
        content,
    };
    Ok((request.client_msg_id.clone(), request))
}

/// How often a waiting inbox loop tells the heartbeat it is alive: well inside the smallest
/// stall limit the config accepts (5 s), so an idle but healthy loop is never taken for a
/// stalled one. A beat is one atomic store.
const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Sleeps for `duration`, beating the inbox heartbeat so a long wait is not taken for a stall.
/// Returns false when shutdown came first.
async fn pause(duration: Duration, telemetry: &OpsState, shutdown: &CancellationToken) -> bool {
    let until = tokio::time::Instant::now() + duration;
    loop {
        telemetry.heartbeat.beat(INBOX_LOOP);
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        let step = (until - now).min(BEAT_EVERY);
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(step) => {}
        }
    }
}
