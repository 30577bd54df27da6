//! Message routes: send (with idempotent replay, rate, cold-thread and backlog rules), sync and
//! sync ack, conversation history, mark-read, hide, and the conversation list.
//!
//! A send is one SQLite transaction: replay lookup, conversation find-or-create, cold-thread
//! checks, backlog check, `seq` allocation, message row and envelope. The live push happens
//! after the commit and never on a replay. Only direct conversations exist here; a `grp_`
//! conversation id answers 404 `GROUP_NOT_FOUND`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rusqlite::TransactionBehavior;
use serde_json::{Map, Value, json};

use super::AppState;
use super::auth::{self, Caller};
use super::db::{self, AgentRow, ConversationRow, HistoryCursor, MessageRow, MessageWithEnvelope};
use super::errors::{ApiError, FieldErrors, RawBody, parse_json_object};
use super::ids;
use super::ws::{Outbound, message_frame};

/// Rolling window of the cold-outreach cap.
const COLD_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
const MESSAGE_TYPES: &[&str] = &["text", "structured", "file", "system"];

/// A sync row / drain frame: base fields plus the caller's envelope, always `stored`.
pub fn sync_row_json(row: &MessageWithEnvelope) -> Value {
    let mut value = row.message.base_json();
    if let Value::Object(map) = &mut value {
        let delivery_id = row.envelope.as_ref().map(|e| e.delivery_id.clone());
        map.insert("delivery_id".into(), json!(delivery_id));
        map.insert("status".into(), json!("stored"));
        map.insert("delivered_at".into(), Value::Null);
        map.insert("read_at".into(), Value::Null);
    }
    value
}

/// A history row: base fields plus the recipient envelope's state (null when none).
fn history_row_json(row: &MessageWithEnvelope) -> Value {
    let mut value = row.message.base_json();
    if let Value::Object(map) = &mut value {
        let env = row.envelope.as_ref();
        map.insert("delivery_id".into(), json!(env.map(|e| &e.delivery_id)));
        map.insert("status".into(), json!(env.map(|e| &e.status)));
        map.insert("delivered_at".into(), json!(env.and_then(|e| e.delivered_at.as_ref())));
        map.insert("read_at".into(), json!(env.and_then(|e| e.read_at.as_ref())));
    }
    value
}

/// A validated send request.
struct SendRequest {
    to: Option<String>,
    conversation_id: Option<String>,
    client_msg_id: String,
    kind: String,
    content: Map<String, Value>,
    metadata: Value,
}

fn validate_send(body: &Map<String, Value>) -> Result<SendRequest, ApiError> {
    let mut errors = FieldErrors::default();
    let string_field = |name: &str, errors: &mut FieldErrors| match body.get(name) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.field(name, "Expected string");
            None
        }
    };
    let to = string_field("to", &mut errors);
    let conversation_id = string_field("conversation_id", &mut errors);
    if to.is_some() == conversation_id.is_some() {
        errors.form("Exactly one of `to` or `conversation_id` is required");
    }

    let client_msg_id = match body.get("client_msg_id") {
        Some(Value::String(s)) if (1..=128).contains(&s.chars().count()) => s.clone(),
        Some(Value::String(_)) => {
            errors.field("client_msg_id", "String must contain 1 to 128 character(s)");
            String::new()
        }
        _ => {
            errors.field("client_msg_id", "Required");
            String::new()
        }
    };

    let kind = match body.get("type") {
        None => "text".to_owned(),
        Some(Value::String(t)) if MESSAGE_TYPES.contains(&t.as_str()) => t.clone(),
        Some(_) => {
            errors.field("type", "Invalid enum value");
            String::new()
        }
    };

    let content = validate_content(body.get("content"), &mut errors);
    let metadata = match body.get("metadata") {
        None => json!({}),
        Some(Value::Object(m)) => Value::Object(m.clone()),
        Some(_) => {
            errors.field("metadata", "Expected object");
            json!({})
        }
    };
    errors.finish()?;
    Ok(SendRequest { to, conversation_id, client_msg_id, kind, content, metadata })
}

/// Keeps the three known content keys (unknown keys are dropped) and checks their types.
fn validate_content(content: Option<&Value>, errors: &mut FieldErrors) -> Map<String, Value> {
    let mut kept = Map::new();
    let Some(Value::Object(content)) = content else {
        errors.field("content", "Required object");
        return kept;
    };
    for (key, must_be) in [("text", "string"), ("data", "object"), ("attachment_id", "string")] {
        let Some(value) = content.get(key) else {
            continue;
        };
        let ok = match must_be {
            "string" => value.is_string(),
            _ => value.is_object(),
        };
        if ok {
            kept.insert(key.to_owned(), value.clone());
        } else {
            errors.field("content", &format!("`{key}` must be a {must_be}"));
        }
    }
    if kept.is_empty() {
        errors.field("content", "At least one of text, data or attachment_id is required");
    }
    kept
}

/// What the send transaction decided.
enum SendOutcome {
    Created(MessageRow),
    Replayed(MessageRow),
}

/// `POST /v1/messages`.
pub async fn send(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: RawBody,
) -> Result<Response, ApiError> {
    let result = send_checked(&state, caller, body).await;
    match &result {
        Ok(_) => state.stats.sends_accepted.fetch_add(1, Ordering::Relaxed),
        Err(err) => match err.code() {
            "RATE_LIMITED" => state.stats.rate_limited.fetch_add(1, Ordering::Relaxed),
            "AWAITING_REPLY" => state.stats.awaiting_reply.fetch_add(1, Ordering::Relaxed),
            "RECIPIENT_BACKLOGGED" => state.stats.backlogged.fetch_add(1, Ordering::Relaxed),
            _ => state.stats.other_refusals.fetch_add(1, Ordering::Relaxed),
        },
    };
    result
}

/// `POST /v1/messages` once the answer is counted by [`send`].
async fn send_checked(
    state: &Arc<AppState>,
    Caller(sender): Caller,
    body: RawBody,
) -> Result<Response, ApiError> {
    let state = Arc::clone(state);
    let body = parse_json_object(body)?;
    let req = validate_send(&body)?;

    // Size: UTF-8 bytes of JSON(content) + JSON(metadata); absent metadata counts as `{}`.
    let content_json = Value::Object(req.content.clone()).to_string();
    let metadata_json = req.metadata.to_string();
    if content_json.len() + metadata_json.len() > state.limits.max_content_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "CONTENT_TOO_LARGE",
            format!("Content exceeds {} bytes", state.limits.max_content_bytes),
        ));
    }

    let Some(to) = req.to.as_deref() else {
        return Err(group_send_refusal(req.conversation_id.as_deref().unwrap_or_default()));
    };
    let recipient = {
        let conn = state.db.lock();
        db::agent_by_handle(&conn, &auth::normalise_handle(to))?
    };
    let recipient = match recipient {
        Some(r) if r.status == "active" || r.status == "restricted" => r,
        _ => return Err(auth::agent_not_found()),
    };
    if recipient.id == sender.id {
        return Err(ApiError::validation("Cannot send a message to yourself"));
    }

    if let Err(retry_after) =
        state.limiter.check(&sender.id, state.clock.now_ms(), state.limits.sends_per_second)
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "Too many messages",
        )
        .with_retry_after(retry_after));
    }

    let (outcome, backlog) =
        store_direct(&state, &sender, &recipient, &req, content_json, metadata_json)?;
    let (status, message) = match outcome {
        SendOutcome::Created(message) => {
            let payload = message.base_json();
            let pushed = state.hub.push(&recipient.id, || Outbound::Message {
                frame: message_frame(payload.clone()),
                message_id: message.id.clone(),
            });
            tracing::debug!(message_id = %message.id, seq = message.seq, pushed, "message stored");
            (StatusCode::CREATED, message)
        }
        SendOutcome::Replayed(message) => {
            tracing::debug!(message_id = %message.id, "send replayed");
            (StatusCode::OK, message)
        }
    };

    let mut res = (status, Json(message.base_json())).into_response();
    if backlog >= state.limits.backlog_warn {
        let value = format!("{}={backlog}", recipient.handle);
        if let Ok(value) = HeaderValue::from_str(&value) {
            res.headers_mut().insert("x-backlog-warning", value);
        }
    }
    Ok(res)
}

fn group_send_refusal(conversation_id: &str) -> ApiError {
    if conversation_id.starts_with("conv_") {
        return ApiError::validation("Direct conversations are addressed with `to`");
    }
    ApiError::new(StatusCode::NOT_FOUND, "GROUP_NOT_FOUND", "Group not found")
}

/// The send transaction. Returns the outcome and the recipient's backlog as read before it.
fn store_direct(
    state: &AppState,
    sender: &AgentRow,
    recipient: &AgentRow,
    req: &SendRequest,
    content_json: String,
    metadata_json: String,
) -> Result<(SendOutcome, u64), ApiError> {
    let now = state.clock.now_string();
    let now_ms = state.clock.now_ms();
    let mut conn = state.db.lock();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let backlog = db::count_stored(&tx, &recipient.id)?;

    // Replays come before the cold-thread rules so that a retried first message still gets
    // its 200 instead of AWAITING_REPLY.
    if let Some(existing) = db::message_by_client_id(&tx, &sender.id, &req.client_msg_id)? {
        return Ok((SendOutcome::Replayed(existing), backlog));
    }

    let conversation = match db::conversation_between(&tx, &sender.id, &recipient.id)? {
        Some(conv) => {
            check_thread_state(&tx, &conv, sender, recipient, &now)?;
            conv
        }
        None => open_conversation(&tx, state, sender, recipient, &now, now_ms)?,
    };

    if backlog >= state.limits.backlog_hard {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RECIPIENT_BACKLOGGED",
            "Recipient has too many undelivered messages",
        )
        .with_details(json!({
            "recipient_handle": recipient.handle,
            "undelivered_count": backlog,
        })));
    }

    let seq = db::next_seq(&tx, &conversation.id, &now)?;
    let message = MessageRow {
        id: ids::new_id("msg"),
        conversation_id: conversation.id.clone(),
        sender_id: sender.id.clone(),
        sender_handle: sender.handle.clone(),
        client_msg_id: req.client_msg_id.clone(),
        seq,
        kind: req.kind.clone(),
        content: content_json,
        metadata: metadata_json,
        created_at: now.clone(),
    };
    db::insert_message(&tx, &message)?;
    db::insert_envelope(&tx, &ids::new_delivery_id(), &message.id, &recipient.id, &now)?;
    tx.commit()?;
    Ok((SendOutcome::Created(message), backlog))
}

/// Cold-thread rule on an existing conversation: the initiator gets one message until the
/// other side answers; the other side's first message establishes the thread.
fn check_thread_state(
    tx: &rusqlite::Connection,
    conv: &ConversationRow,
    sender: &AgentRow,
    recipient: &AgentRow,
    now: &str,
) -> Result<(), ApiError> {
    if conv.established {
        return Ok(());
    }
    if conv.initiator_id == sender.id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "AWAITING_REPLY",
            "Wait for a reply before sending another message",
        )
        .with_details(json!({
            "recipient_handle": recipient.handle,
            "waiting_since": conv.created_at,
        })));
    }
    db::establish_conversation(tx, conv, now)?;
    Ok(())
}

/// Creates a conversation after the cold-outreach cap allows one more.
fn open_conversation(
    tx: &rusqlite::Connection,
    state: &AppState,
    sender: &AgentRow,
    recipient: &AgentRow,
    now: &str,
    now_ms: i64,
) -> Result<ConversationRow, ApiError> {
    let window_ms = i64::try_from(COLD_WINDOW.as_millis()).unwrap_or(i64::MAX);
    let cold = db::count_cold_since(tx, &sender.id, now_ms - window_ms)?;
    if cold >= u64::from(state.limits.cold_threads_per_day) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "Too many unanswered new conversations in the last 24 hours",
        ));
    }
    let (lo, hi) = db::ordered_pair(&sender.id, &recipient.id);
    let conv = ConversationRow {
        id: ids::new_id("conv"),
        agent_lo: lo.to_owned(),
        agent_hi: hi.to_owned(),
        initiator_id: sender.id.clone(),
        established: false,
        created_at: now.to_owned(),
    };
    db::insert_conversation(tx, &conv, now_ms)?;
    Ok(conv)
}

/// Parses a JS-`Number()`-style integer query value; `None` when it is not an integer.
fn query_int(raw: &str) -> Option<i64> {
    let value: f64 = raw.trim().parse().ok()?;
    (value.is_finite() && value.fract() == 0.0).then_some(value as i64)
}

fn query_map(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    query.map(|Query(q)| q).map_err(|_| ApiError::validation("Invalid query string"))
}

/// `GET /v1/messages/sync`.
pub async fn sync(
    State(state): State<Arc<AppState>>,
    Caller(agent): Caller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let query = query_map(query)?;
    let limit = match query.get("limit") {
        None => 200,
        Some(raw) => match query_int(raw) {
            Some(n) if n >= 1 => n.min(500) as u32,
            _ => return Err(ApiError::validation("limit must be a positive integer")),
        },
    };
    let conn = state.db.lock();
    let after_pos = match query.get("after") {
        None => 0,
        Some(cursor) if ids::is_delivery_id(cursor) => {
            match db::envelope_pos(&conn, &agent.id, cursor)? {
                Some(pos) => pos,
                // A foreign or unknown cursor yields nothing rather than a restart.
                None => return Ok(Json(json!([]))),
            }
        }
        Some(_) => return Ok(Json(json!([]))),
    };
    let rows = db::stored_page(&conn, &agent.id, after_pos, limit)?;
    drop(conn);
    Ok(Json(Value::Array(rows.iter().map(sync_row_json).collect())))
}

/// `POST /v1/messages/sync/ack`.
pub async fn sync_ack(
    State(state): State<Arc<AppState>>,
    Caller(agent): Caller,
    body: RawBody,
) -> Result<Json<Value>, ApiError> {
    let body = parse_json_object(body)?;
    let cursor = match body.get("last_delivery_id") {
        Some(Value::String(c)) if !c.is_empty() => c.clone(),
        _ => {
            let mut errors = FieldErrors::default();
            errors.field("last_delivery_id", "Required");
            errors.finish()?;
            return Err(ApiError::validation("last_delivery_id is required"));
        }
    };
    if !ids::is_delivery_id(&cursor) {
        return Ok(Json(json!({ "acked": 0 })));
    }
    let now = state.clock.now_string();
    let conn = state.db.lock();
    let acked = match db::envelope_pos(&conn, &agent.id, &cursor)? {
        Some(pos) => db::ack_through(&conn, &agent.id, pos, &now)?,
        None => 0,
    };
    drop(conn);
    tracing::debug!(handle = %agent.handle, acked, "sync ack");
    Ok(Json(json!({ "acked": acked })))
}

fn forbidden() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", "Not a participant of this conversation")
}

/// `GET /v1/messages/:conversation_id`.
pub async fn history(
    State(state): State<Arc<AppState>>,
    Caller(agent): Caller,
    Path(conversation_id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let query = query_map(query)?;
    let limit =
        query.get("limit").and_then(|raw| query_int(raw)).map_or(50, |n| n.clamp(1, 200) as u32);
    let seq_param = |name: &str| -> Result<Option<i64>, ApiError> {
        match query.get(name) {
            None => Ok(None),
            Some(raw) => match query_int(raw) {
                Some(n) if n >= 0 => Ok(Some(n)),
                _ => Err(ApiError::validation(format!("{name} must be a non-negative integer"))),
            },
        }
    };
    let cursor = match (seq_param("before_seq")?, seq_param("after_seq")?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::validation("before_seq and after_seq are mutually exclusive"));
        }
        (before, None) => HistoryCursor::Before(before),
        (None, Some(after)) => HistoryCursor::After(after),
    };

    let conn = state.db.lock();
    match db::conversation_by_id(&conn, &conversation_id)? {
        Some(conv) if conv.has(&agent.id) => {}
        _ => return Err(forbidden()),
    }
    let rows = db::history_page(&conn, &conversation_id, &agent.id, cursor, limit)?;
    drop(conn);
    Ok(Json(Value::Array(rows.iter().map(history_row_json).collect())))
}

fn message_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "MESSAGE_NOT_FOUND", "Message not found")
}

/// `POST /v1/messages/:id/read`: marks the caller's envelope read and tells the sender.
pub async fn mark_read(
    State(state): State<Arc<AppState>>,
    Caller(agent): Caller,
    Path(message_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.now_string();
    let (message, envelope) = {
        let conn = state.db.lock();
        if !db::mark_read(&conn, &agent.id, &message_id, &now)? {
            return Err(message_not_found());
        }
        let message = db::message_by_id(&conn, &message_id)?.ok_or_else(message_not_found)?;
        let envelope = db::envelope_of(&conn, &agent.id, &message_id)?;
        (message, envelope)
    };

    let read_at = envelope.as_ref().and_then(|e| e.read_at.clone());
    let event = json!({
        "type": "message.read",
        "payload": { "message_id": message.id, "read_by": agent.handle, "read_at": read_at },
    })
    .to_string();
    state.hub.push(&message.sender_id, || Outbound::Event(event.clone()));

    let mut value = message.base_json();
    if let Value::Object(map) = &mut value {
        let env = envelope.as_ref();
        map.insert("status".into(), json!(env.map(|e| &e.status)));
        map.insert("delivered_at".into(), json!(env.and_then(|e| e.delivered_at.as_ref())));
        map.insert("read_at".into(), json!(read_at));
    }
    Ok(Json(value))
}

/// `DELETE /v1/messages/:id`: hides the message from the caller's own view only.
pub async fn hide(
    State(state): State<Arc<AppState>>,
    Caller(agent): Caller,
    Path(message_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.now_string();
    let conn = state.db.lock();
    let message = db::message_by_id(&conn, &message_id)?.ok_or_else(message_not_found)?;
    match db::conversation_by_id(&conn, &message.conversation_id)? {
        Some(conv) if conv.has(&agent.id) => {}
        _ => return Err(forbidden()),
    }
    db::hide_message(&conn, &agent.id, &message_id, &now)?;
    Ok(Json(json!({ "message": "Message hidden from your view" })))
}

/// The list preview of a message: its text (≤140 chars) or a short placeholder.
fn preview(kind: &str, content: &Value) -> String {
    let text = content.get("text").or_else(|| content.get("body")).and_then(Value::as_str);
    match text {
        Some(text) => text.chars().take(140).collect(),
        None if kind == "system" => "System update".to_owned(),
        None if content.get("attachment_id").is_some() => "Attachment".to_owned(),
        None => format!("[{kind}]"),
    }
}

/// `GET /v1/conversations`: the caller's direct conversations (at most 50), newest first.
pub async fn conversations(
    State(state): State<Arc<AppState>>,
    Caller(agent): Caller,
) -> Result<Json<Value>, ApiError> {
    let rows = {
        let conn = state.db.lock();
        db::conversation_list(&conn, &agent.id, 50)?
    };
    let items = rows.iter().map(|row| {
        let content: Value = row
            .last_content
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or(Value::Null);
        let kind = row.last_type.as_deref();
        json!({
            "id": row.id,
            "type": "direct",
            "participants": [{
                "handle": row.other_handle,
                "display_name": row.other_display_name,
                "avatar_url": null,
            }],
            "group_name": null,
            "group_avatar_url": null,
            "group_member_count": null,
            "last_message_at": row.last_message_at,
            "last_message_preview": kind.map(|k| preview(k, &content)),
            "last_message_is_own": row.last_sender_id.as_deref().map(|s| s == agent.id),
            "last_message_type": kind,
            "updated_at": row.last_message_at.as_ref().unwrap_or(&row.created_at),
            "is_muted": false,
        })
    });
    Ok(Json(Value::Array(items.collect())))
}
