//! The realtime channel `/v1/ws` and the registry of live sockets ([`Hub`]).
//!
//! A socket authenticates either with a HELLO frame (what the SDKs do; answered with
//! `hello.ok` before anything else) or with an `Authorization: Bearer` upgrade header (no
//! `hello.ok`). It then receives every `stored` envelope of its agent (drain on connect, this
//! socket only) followed by live events.
//!
//! Delivery marking:
//! - a legacy socket marks an envelope `delivered` as soon as its `message.new` frame has been
//!   written;
//! - a socket whose HELLO listed the `ack` capability leaves the envelope `stored` until the
//!   client sends `{"type":"ack","message_id":…}`. Unacked envelopes stay visible to
//!   `/v1/messages/sync` and are sent again by the drain of the agent's next connection; no
//!   timer redelivers them on a socket that stays open.
//!
//! Close codes: 1008 for a missing, malformed or late HELLO and for a bad key; 1001 for a
//! heartbeat timeout (no pong within `pong_timeout` of a ping) and for server shutdown.
//! Unknown client frames are ignored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use super::AppState;
use super::auth;
use super::db::{self, AgentRow};

/// Most envelopes one drain sends; the rest arrive through `/sync` or the next connection.
const DRAIN_CAP: u32 = 10_000;

/// Something queued for one socket's writer.
#[derive(Debug)]
pub enum Outbound {
    /// A `message.new` frame; `message_id` identifies the envelope it carries.
    Message { frame: String, message_id: String },
    /// Any other event frame.
    Event(String),
    /// Close the socket with this code and reason.
    Close { code: u16, reason: String },
}

struct SocketEntry {
    id: u64,
    tx: mpsc::UnboundedSender<Outbound>,
}

#[derive(Default)]
struct HubInner {
    next_id: u64,
    /// agent id → that agent's live sockets.
    sockets: HashMap<String, Vec<SocketEntry>>,
}

/// Live sockets by agent. A std mutex: it is never held across `.await`; pushing only
/// enqueues on unbounded channels.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<HubInner>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a socket of `agent_id`, first queueing the frames `initial` returns. `initial`
    /// runs under the hub lock, and a send pushes (under the same lock) only after its commit,
    /// so a message committed concurrently reaches the new socket by the drain, live, or both,
    /// never by neither.
    fn register_with<F>(
        &self,
        agent_id: &str,
        initial: F,
    ) -> (u64, mpsc::UnboundedReceiver<Outbound>)
    where
        F: FnOnce() -> Vec<Outbound>,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        for item in initial() {
            // The receiver is alive in this scope, so the send cannot fail.
            let _ = tx.send(item);
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.sockets.entry(agent_id.to_owned()).or_default().push(SocketEntry { id, tx });
        (id, rx)
    }

    fn unregister(&self, agent_id: &str, socket_id: u64) {
        let mut inner = self.lock();
        if let Some(list) = inner.sockets.get_mut(agent_id) {
            list.retain(|entry| entry.id != socket_id);
            if list.is_empty() {
                inner.sockets.remove(agent_id);
            }
        }
    }

    /// Queues an item built per socket on every live socket of `agent_id`; returns how many.
    pub fn push<F>(&self, agent_id: &str, make: F) -> usize
    where
        F: Fn() -> Outbound,
    {
        let inner = self.lock();
        let Some(list) = inner.sockets.get(agent_id) else {
            return 0;
        };
        list.iter().filter(|entry| entry.tx.send(make()).is_ok()).count()
    }

    /// Asks every live socket of `agent_id` to close with `code`; returns how many.
    pub fn close_all(&self, agent_id: &str, code: u16, reason: &str) -> usize {
        self.push(agent_id, || Outbound::Close { code, reason: reason.to_owned() })
    }
}

/// Builds a `message.new` frame around a payload.
pub fn message_frame(payload: Value) -> String {
    json!({ "type": "message.new", "payload": payload }).to_string()
}

/// How the upgrade request authenticated, decided before the socket opens.
enum PreAuth {
    /// No header: expect a HELLO frame.
    Hello,
    /// A valid Bearer header.
    Agent(AgentRow),
    /// A Bearer header with an unknown key: close 1008 on open.
    Invalid,
}

/// `GET /v1/ws`.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let pre = match bearer {
        None => PreAuth::Hello,
        Some(key) => match auth::agent_for_key(&state, key) {
            Ok(Some(agent)) => PreAuth::Agent(agent),
            Ok(None) => PreAuth::Invalid,
            Err(err) => {
                tracing::error!(error = %err, "websocket key lookup failed");
                PreAuth::Invalid
            }
        },
    };
    let tracker = state.tracker.clone();
    let span = tracing::debug_span!("ws_socket");
    ws.on_upgrade(move |socket| {
        tracker.track_future(run_socket(state, socket, pre).instrument(span))
    })
}

async fn send_close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame { code, reason: reason.into() };
    // The peer may already be gone; there is nothing left to do with the error.
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// Answers a client's close frame. The WebSocket layer queues the reply when it reads the
/// client's frame but only writes it on the next flush; without this the client sees the
/// connection end with "no close frame received".
async fn finish_close_handshake(socket: &mut WebSocket) {
    let _ = futures_util::SinkExt::flush(socket).await;
}

/// The outcome of waiting for a HELLO frame.
enum Hello {
    /// Authenticated; `wants_ack` when the HELLO listed the `ack` capability.
    Ok { agent: AgentRow, wants_ack: bool },
    /// Close the socket with this code and reason.
    Rejected { code: u16, reason: &'static str },
    /// The client went away first.
    Gone,
}

async fn await_hello(state: &AppState, socket: &mut WebSocket) -> Hello {
    let deadline = Instant::now() + state.hello_timeout;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, socket.recv()) => next,
            () = state.shutdown.cancelled() => {
                return Hello::Rejected { code: 1001, reason: "Server shutting down" };
            }
        };
        let text = match next {
            Err(_elapsed) => {
                return Hello::Rejected { code: 1008, reason: "HELLO frame required" };
            }
            Ok(None | Some(Err(_))) => return Hello::Gone,
            Ok(Some(Ok(Message::Close(_)))) => {
                finish_close_handshake(socket).await;
                return Hello::Gone;
            }
            // Control frames are not application frames; keep waiting for the HELLO.
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Binary(_)))) => {
                return Hello::Rejected { code: 1008, reason: "HELLO frame required first" };
            }
            Ok(Some(Ok(Message::Text(text)))) => text,
        };
        return check_hello(state, text.as_str());
    }
}

fn check_hello(state: &AppState, text: &str) -> Hello {
    let first = serde_json::from_str::<Value>(text).ok();
    let hello = first.as_ref().filter(|v| v.get("type").and_then(Value::as_str) == Some("hello"));
    let Some(key) = hello.and_then(|v| v.get("api_key")).and_then(Value::as_str) else {
        return Hello::Rejected { code: 1008, reason: "HELLO frame required first" };
    };
    let wants_ack = hello
        .and_then(|v| v.get("capabilities"))
        .and_then(Value::as_array)
        .is_some_and(|caps| caps.iter().any(|c| c.as_str() == Some("ack")));
    match auth::agent_for_key(state, key) {
        Ok(Some(agent)) => Hello::Ok { agent, wants_ack },
        Ok(None) => Hello::Rejected { code: 1008, reason: "Invalid token" },
        Err(err) => {
            tracing::error!(error = %err, "hello key lookup failed");
            Hello::Rejected { code: 1011, reason: "Internal error" }
        }
    }
}

/// Reads the agent's stored envelopes as drain frames, in sync order.
fn drain_frames(state: &AppState, agent_id: &str) -> Vec<Outbound> {
    let rows = {
        let conn = state.db.lock();
        db::stored_page(&conn, agent_id, 0, DRAIN_CAP)
    };
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|row| Outbound::Message {
                frame: message_frame(super::messages::sync_row_json(row)),
                message_id: row.message.id.clone(),
            })
            .collect(),
        Err(err) => {
            tracing::error!(error = %err, "drain query failed");
            Vec::new()
        }
    }
}

async fn run_socket(state: Arc<AppState>, mut socket: WebSocket, pre: PreAuth) {
    let (agent, ack_mode) = match pre {
        PreAuth::Invalid => {
            send_close(&mut socket, 1008, "Invalid token").await;
            return;
        }
        PreAuth::Agent(agent) => (agent, false),
        PreAuth::Hello => match await_hello(&state, &mut socket).await {
            Hello::Gone => return,
            Hello::Rejected { code, reason } => {
                tracing::debug!(code, reason, "websocket rejected");
                send_close(&mut socket, code, reason).await;
                return;
            }
            Hello::Ok { agent, wants_ack } => {
                let ok = if wants_ack {
                    json!({ "type": "hello.ok", "capabilities": ["ack"] })
                } else {
                    json!({ "type": "hello.ok" })
                };
                if socket.send(Message::Text(ok.to_string().into())).await.is_err() {
                    return;
                }
                (agent, wants_ack)
            }
        },
    };

    let (socket_id, rx) = state.hub.register_with(&agent.id, || drain_frames(&state, &agent.id));
    tracing::debug!(handle = %agent.handle, socket_id, ack_mode, "websocket connected");
    serve_socket(&state, &agent, ack_mode, &mut socket, rx).await;
    state.hub.unregister(&agent.id, socket_id);
    tracing::debug!(handle = %agent.handle, socket_id, "websocket closed");
}

/// The connected phase: writes queued frames, reads client frames, keeps the heartbeat.
async fn serve_socket(
    state: &AppState,
    agent: &AgentRow,
    ack_mode: bool,
    socket: &mut WebSocket,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
) {
    let mut ping_timer =
        tokio::time::interval_at(Instant::now() + state.ping_interval, state.ping_interval);
    ping_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pong_deadline: Option<Instant> = None;

    loop {
        let heartbeat_expired = async {
            match pong_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = state.shutdown.cancelled() => {
                send_close(socket, 1001, "Server shutting down").await;
                return;
            }
            () = heartbeat_expired => {
                tracing::debug!(handle = %agent.handle, "websocket heartbeat timeout");
                send_close(socket, 1001, "Heartbeat timeout").await;
                return;
            }
            _ = ping_timer.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
                // Keep the oldest unanswered ping's deadline: a later ping must not extend it.
                pong_deadline.get_or_insert(Instant::now() + state.pong_timeout);
            }
            item = rx.recv() => {
                let Some(item) = item else { return };
                if !write_outbound(state, agent, ack_mode, socket, item).await {
                    return;
                }
            }
            incoming = socket.recv() => {
                match incoming {
                    None | Some(Err(_)) => return,
                    Some(Ok(Message::Close(_))) => {
                        finish_close_handshake(socket).await;
                        return;
                    }
                    Some(Ok(Message::Pong(_))) => pong_deadline = None,
                    Some(Ok(Message::Text(text))) => {
                        handle_client_frame(state, agent, ack_mode, &text);
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

/// Writes one queued item; false when the socket is finished.
async fn write_outbound(
    state: &AppState,
    agent: &AgentRow,
    ack_mode: bool,
    socket: &mut WebSocket,
    item: Outbound,
) -> bool {
    match item {
        Outbound::Close { code, reason } => {
            send_close(socket, code, &reason).await;
            false
        }
        Outbound::Event(frame) => socket.send(Message::Text(frame.into())).await.is_ok(),
        Outbound::Message { frame, message_id } => {
            if socket.send(Message::Text(frame.into())).await.is_err() {
                return false;
            }
            // Legacy sockets: written means delivered. Ack-mode sockets wait for the ack frame.
            if !ack_mode {
                mark_delivered(state, &agent.id, &message_id);
            }
            true
        }
    }
}

fn mark_delivered(state: &AppState, agent_id: &str, message_id: &str) {
    let now = state.clock.now_string();
    let conn = state.db.lock();
    if let Err(err) = db::mark_delivered(&conn, agent_id, message_id, &now) {
        tracing::error!(error = %err, message_id, "marking envelope delivered failed");
    }
}

fn handle_client_frame(state: &AppState, agent: &AgentRow, ack_mode: bool, text: &str) {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if frame.get("type").and_then(Value::as_str) != Some("ack") || !ack_mode {
        return;
    }
    if let Some(message_id) = frame.get("message_id").and_then(Value::as_str) {
        tracing::debug!(handle = %agent.handle, message_id, "delivery ack");
        mark_delivered(state, &agent.id, message_id);
    }
}
