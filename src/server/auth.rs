//! Accounts and authentication: handle rules, the two-step registration with the dev
//! verification code, key issuance, the Bearer extractor, and the agent profile routes.
//! Keys are only ever stored as SHA-256 hex and never logged.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use super::db::{self, AgentRow, PendingRow};
use super::errors::{ApiError, FieldErrors, RawBody, ServerError, parse_json_object};
use super::ids;

/// How long a pending registration accepts its code.
const PENDING_TTL_MS: i64 = 10 * 60 * 1000;
/// Wrong codes allowed before the pending registration is burnt.
const MAX_CODE_ATTEMPTS: i64 = 5;

/// Handles nobody may register: route words that would shadow API paths, words that suggest
/// authority over other agents, and platform names.
const RESERVED_HANDLES: &[&str] = &[
    // Route and protocol words.
    "me",
    "sync",
    "ack",
    "groups",
    "group",
    "messages",
    "message",
    "conversations",
    "contacts",
    "mutes",
    "presence",
    "directory",
    "webhooks",
    "uploads",
    "attachments",
    "agents",
    "agent",
    "register",
    "verify",
    "recover",
    "health",
    "openapi",
    "ws",
    "api",
    "v1",
    "v2",
    "internal",
    "invites",
    "read",
    "settings",
    "avatar",
    "new",
    "edit",
    "delete",
    "search",
    "login",
    "logout",
    "signup",
    "auth",
    "oauth",
    "dashboard",
    "owner",
    "owners",
    "members",
    "typing",
    "null",
    "undefined",
    "everyone",
    "here",
    "all",
    "anonymous",
    "unknown",
    // Authority words.
    "admin",
    "administrator",
    "admins",
    "support",
    "system",
    "bot",
    "bots",
    "ai",
    "root",
    "moderator",
    "mod",
    "mods",
    "staff",
    "official",
    "help",
    "security",
    "abuse",
    "postmaster",
    "webmaster",
    "hostmaster",
    "billing",
    "team",
    "operator",
    "ops",
    "owner-team",
    // Platform and brand names.
    "agentchat",
    "agentchatme",
    "agent-chat",
    "chatfather",
    "openclaw",
    "hermes",
];

/// Whether `handle` passes `^[a-z][a-z0-9]*(-[a-z0-9]+)*$` and the 3–30 length rule.
pub fn handle_format_ok(handle: &str) -> bool {
    let bytes = handle.as_bytes();
    if !(3..=30).contains(&bytes.len()) || !bytes[0].is_ascii_lowercase() {
        return false;
    }
    let mut prev_hyphen = false;
    for &b in bytes {
        match b {
            b'a'..=b'z' | b'0'..=b'9' => prev_hyphen = false,
            b'-' if !prev_hyphen => prev_hyphen = true,
            _ => return false,
        }
    }
    !prev_hyphen
}

/// Whether a handle may be registered at all (format and reserved list).
pub fn handle_registrable(handle: &str) -> bool {
    handle_format_ok(handle) && !RESERVED_HANDLES.contains(&handle)
}

/// Normalises a handle given in a path or `to`: one leading `@` dropped, lower-cased.
pub fn normalise_handle(raw: &str) -> String {
    raw.strip_prefix('@').unwrap_or(raw).to_lowercase()
}

/// `first char + ****@ + domain`, as `/agents/me` shows the e-mail.
fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}****@{domain}")
        }
        None => "****".to_owned(),
    }
}

fn settings_json() -> Value {
    json!({ "inbox_mode": "open", "group_invite_policy": "open", "discoverable": true })
}

/// The public profile of an agent.
pub fn public_profile(agent: &AgentRow) -> Value {
    json!({
        "handle": agent.handle,
        "display_name": agent.display_name,
        "description": agent.description,
        "avatar_url": null,
        "status": agent.status,
        "created_at": agent.created_at,
    })
}

/// The `/agents/me` view of an agent.
fn me_json(agent: &AgentRow) -> Value {
    json!({
        "handle": agent.handle,
        "display_name": agent.display_name,
        "description": agent.description,
        "avatar_url": null,
        "status": agent.status,
        "paused_by_owner": "none",
        "settings": settings_json(),
        "email_masked": mask_email(&agent.email),
        "created_at": agent.created_at,
    })
}

/// The agent row as the verify step returns it (everything but id and key hash).
fn full_agent_json(agent: &AgentRow) -> Value {
    json!({
        "handle": agent.handle,
        "email": agent.email,
        "display_name": agent.display_name,
        "description": agent.description,
        "avatar_url": null,
        "status": agent.status,
        "paused_by_owner": "none",
        "settings": settings_json(),
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
    })
}

/// Resolves a presented API key to its agent, if the key is known and the agent may log in.
pub fn agent_for_key(state: &AppState, key: &str) -> Result<Option<AgentRow>, rusqlite::Error> {
    let hash = ids::hash_key(key);
    let conn = state.db.lock();
    db::agent_by_key_hash(&conn, &hash)
}

/// Creates an active agent with a fresh key and returns the row and the clear key.
pub fn create_agent(
    state: &AppState,
    email: &str,
    handle: &str,
    display_name: Option<String>,
    description: Option<String>,
) -> Result<(AgentRow, String), ServerError> {
    let now = state.clock.now_string();
    let agent = AgentRow {
        id: ids::new_id("agt"),
        handle: handle.to_owned(),
        email: email.to_owned(),
        display_name,
        description,
        status: "active".to_owned(),
        created_at: now.clone(),
        updated_at: now,
    };
    let key = ids::new_api_key();
    let conn = state.db.lock();
    if db::agent_by_handle(&conn, handle)?.is_some() {
        return Err(ServerError::HandleTaken(handle.to_owned()));
    }
    db::insert_agent(&conn, &agent, &ids::hash_key(&key))?;
    Ok((agent, key))
}

/// The authenticated caller of a route, from `Authorization: Bearer <key>`.
pub struct Caller(pub AgentRow);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(ApiError::unauthorized)?;
        let agent = agent_for_key(state, key)?.ok_or_else(ApiError::unauthorized)?;
        if agent.status == "suspended" && parts.uri.path() != "/v1/agents/me" {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "SUSPENDED", "Agent is suspended"));
        }
        Ok(Caller(agent))
    }
}

/// Reads an optional string field that may also be `null`, enforcing a length cap.
fn optional_text(
    body: &Map<String, Value>,
    field: &str,
    max_chars: usize,
    errors: &mut FieldErrors,
) -> Option<String> {
    match body.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= max_chars => Some(s.clone()),
        Some(Value::String(_)) => {
            errors.field(field, &format!("String must contain at most {max_chars} character(s)"));
            None
        }
        Some(_) => {
            errors.field(field, "Expected string");
            None
        }
    }
}

fn email_ok(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !email.chars().any(char::is_whitespace)
                && !domain.contains('@')
        }
        None => false,
    }
}

/// `POST /v1/register`: validates and parks the registration until the code is verified.
pub async fn register(
    State(state): State<Arc<AppState>>,
    body: RawBody,
) -> Result<Response, ApiError> {
    let body = parse_json_object(body)?;
    let mut errors = FieldErrors::default();
    let email = match body.get("email") {
        Some(Value::String(e)) if email_ok(e) => Some(e.clone()),
        Some(Value::String(_)) => {
            errors.field("email", "Invalid email");
            None
        }
        _ => {
            errors.field("email", "Required");
            None
        }
    };
    let handle = match body.get("handle") {
        Some(Value::String(h)) => Some(h.clone()),
        _ => {
            errors.field("handle", "Required");
            None
        }
    };
    let display_name = optional_text(&body, "display_name", 100, &mut errors);
    let description = optional_text(&body, "description", 500, &mut errors);
    errors.finish()?;
    let (Some(email), Some(handle)) = (email, handle) else {
        return Err(ApiError::validation("Invalid request body"));
    };

    // The format check runs on the raw input, so upper case is refused rather than folded.
    if !handle_registrable(&handle) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_HANDLE",
            "Handle is invalid or reserved",
        ));
    }

    let pending = PendingRow {
        id: ids::new_id("pnd"),
        email,
        handle,
        display_name,
        description,
        created_ms: state.clock.now_ms(),
        failed_attempts: 0,
    };
    {
        let conn = state.db.lock();
        if db::agent_by_handle(&conn, &pending.handle)?.is_some() {
            return Err(handle_taken());
        }
        // One live agent per e-mail, as the reference server has it.
        if db::email_in_use(&conn, &pending.email)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "EMAIL_TAKEN",
                "An agent is already registered with this email",
            ));
        }
        db::insert_pending(&conn, &pending)?;
    }
    tracing::debug!(pending_id = %pending.id, handle = %pending.handle, "registration pending");
    let answer = json!({
        "pending_id": pending.id,
        "message": "Verification code sent to your email (local server: use the dev code)",
    });
    Ok(Json(answer).into_response())
}

fn handle_taken() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "HANDLE_TAKEN", "Handle is already taken")
}

fn expired() -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "EXPIRED", "Verification expired or unknown")
}

/// `POST /v1/register/verify`: checks the dev code and creates the agent with its key.
pub async fn verify(
    State(state): State<Arc<AppState>>,
    body: RawBody,
) -> Result<Response, ApiError> {
    let body = parse_json_object(body)?;
    let mut errors = FieldErrors::default();
    let pending_id = match body.get("pending_id") {
        Some(Value::String(p)) if !p.is_empty() => Some(p.clone()),
        _ => {
            errors.field("pending_id", "Required");
            None
        }
    };
    let code = match body.get("code") {
        Some(Value::String(c)) if c.chars().count() == 6 => Some(c.clone()),
        Some(Value::String(_)) => {
            errors.field("code", "String must contain exactly 6 character(s)");
            None
        }
        _ => {
            errors.field("code", "Required");
            None
        }
    };
    errors.finish()?;
    let (Some(pending_id), Some(code)) = (pending_id, code) else {
        return Err(ApiError::validation("Invalid request body"));
    };

    let pending = {
        let conn = state.db.lock();
        let Some(pending) = db::pending_by_id(&conn, &pending_id)? else {
            return Err(expired());
        };
        let too_old = state.clock.now_ms() - pending.created_ms > PENDING_TTL_MS;
        if too_old || pending.failed_attempts >= MAX_CODE_ATTEMPTS {
            db::delete_pending(&conn, &pending_id)?;
            return Err(expired());
        }
        if code != state.verification_code {
            db::bump_pending_attempts(&conn, &pending_id)?;
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CODE", "Invalid code"));
        }
        db::delete_pending(&conn, &pending_id)?;
        pending
    };

    let created = create_agent(
        &state,
        &pending.email,
        &pending.handle,
        pending.display_name,
        pending.description,
    );
    let (agent, key) = match created {
        Ok(pair) => pair,
        Err(ServerError::HandleTaken(_)) => return Err(handle_taken()),
        Err(ServerError::Db(err)) => return Err(err.into()),
        Err(err) => {
            tracing::error!(error = %err, "agent creation failed");
            return Err(ApiError::internal());
        }
    };
    tracing::debug!(handle = %agent.handle, "agent registered");
    let answer = json!({ "agent": full_agent_json(&agent), "api_key": key });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `GET /v1/agents/me`.
pub async fn me(Caller(agent): Caller) -> Json<Value> {
    Json(me_json(&agent))
}

/// `GET /v1/agents/:handle`: public profile of an active or restricted agent.
pub async fn profile(
    State(state): State<Arc<AppState>>,
    Path(handle): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let handle = normalise_handle(&handle);
    let agent = {
        let conn = state.db.lock();
        db::agent_by_handle(&conn, &handle)?
    };
    match agent {
        Some(agent) if agent.status == "active" || agent.status == "restricted" => {
            Ok(Json(public_profile(&agent)))
        }
        _ => Err(agent_not_found()),
    }
}

/// 404 `AGENT_NOT_FOUND`.
pub fn agent_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "AGENT_NOT_FOUND", "Agent not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_rules_follow_the_wire_regex() {
        for ok in ["abc", "a1b2", "ab-cd", "a-b-c", "x23456789012345678901234567890"] {
            assert!(handle_format_ok(ok), "{ok} should pass");
        }
        for bad in ["ab", "Abc", "1abc", "ab-", "a--b", "ab_c", "a.bc", "-ab", ""] {
            assert!(!handle_format_ok(bad), "{bad} should fail");
        }
        assert!(!handle_registrable("admin"));
        assert!(!handle_registrable("sync"));
    }

    #[test]
    fn email_is_masked_to_first_char_and_domain() {
        assert_eq!(mask_email("alice@example.com"), "a****@example.com");
    }
}
