//! The internal AgentChat client: typed REST calls over reqwest and the inbox WebSocket.
//!
//! It owns the wire protocol and error mapping only. Pacing, retries and durability belong to
//! the callers ([`crate::outbox`] and [`crate::inbox`]), so every call here is a single attempt.

mod error;
mod types;
pub mod ws;

use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

pub use error::{ApiError, Disposition, ErrorCode, ErrorReply, parse_retry_after};
pub use types::{AckResult, Content, Me, Message, SendOutcome, SendRequest, SyncRow};

use crate::config::ApiKey;

/// Time allowed for one request, as the SDKs do.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A REST client bound to one agent's key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: ApiKey,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish_non_exhaustive()
    }
}

impl Client {
    /// Builds a client for `base` (such as `https://api.agentchat.me`).
    ///
    /// # Errors
    /// When the TLS backend cannot be initialised.
    pub fn new(base: &str, key: ApiKey) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("agentchatd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned(), key })
    }

    /// `GET /v1/agents/me`.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn me(&self) -> Result<Me, ApiError> {
        self.request(Method::GET, "/v1/agents/me", &[], None).await.and_then(decode("GET", "me"))
    }

    /// `POST /v1/messages`: one attempt.
    ///
    /// # Errors
    /// Any [`ApiError`]; a 200 replay is a success with `replayed` set.
    pub async fn send_message(&self, body: &SendRequest) -> Result<SendOutcome, ApiError> {
        let path = "/v1/messages";
        let body = serde_json::to_value(body).map_err(|err| ApiError::Decode {
            method: "POST",
            path: path.into(),
            reason: format!("cannot encode request: {err}"),
        })?;
        let reply = self.request(Method::POST, path, &[], Some(&body)).await?;
        let backlog_warning = reply
            .headers
            .get("x-backlog-warning")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_backlog_warning);
        let replayed = reply.status == StatusCode::OK;
        let message = decode("POST", path)(reply)?;
        Ok(SendOutcome { message, replayed, backlog_warning })
    }

    /// `GET /v1/messages/sync`: the next page of undelivered messages. Rows are decoded one by
    /// one, so a single malformed row does not hide the others.
    ///
    /// # Errors
    /// Any [`ApiError`]; a body that is not a JSON array is a [`ApiError::Decode`].
    pub async fn sync(&self, after: Option<&str>, limit: u32) -> Result<Vec<SyncRow>, ApiError> {
        let limit = limit.to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(after) = after {
            query.push(("after", after));
        }
        let path = "/v1/messages/sync";
        let rows: Vec<serde_json::Value> =
            self.request(Method::GET, path, &query, None).await.and_then(decode("GET", path))?;
        Ok(rows.into_iter().map(SyncRow::from_value).collect())
    }

    /// `POST /v1/messages/sync/ack`: marks everything at or before the cursor delivered.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn ack(&self, last_delivery_id: &str) -> Result<AckResult, ApiError> {
        let path = "/v1/messages/sync/ack";
        let body = serde_json::json!({ "last_delivery_id": last_delivery_id });
        self.request(Method::POST, path, &[], Some(&body)).await.and_then(decode("POST", path))
    }

    /// `GET /v1/messages/{conversation_id}?after_seq=…`: history, oldest first.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn history_after(
        &self,
        conversation_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Message>, ApiError> {
        let path = format!("/v1/messages/{conversation_id}");
        let (after, limit) = (after_seq.to_string(), limit.to_string());
        let query = [("after_seq", after.as_str()), ("limit", limit.as_str())];
        self.request(Method::GET, &path, &query, None).await.and_then(decode("GET", &path))
    }

    /// `GET /v1/messages/{conversation_id}?limit=…`: the newest `limit` messages, returned
    /// oldest first.
    ///
    /// # Errors
    /// Any [`ApiError`].
    pub async fn history_recent(
        &self,
        conversation_id: &str,
        limit: u32,
    ) -> Result<Vec<Message>, ApiError> {
        let path = format!("/v1/messages/{conversation_id}");
        let limit = limit.to_string();
        let query = [("limit", limit.as_str())];
        let mut rows: Vec<Message> =
            self.request(Method::GET, &path, &query, None).await.and_then(decode("GET", &path))?;
        // Without a cursor the server answers newest first.
        rows.reverse();
        Ok(rows)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<RawReply, ApiError> {
        let method_name = method_name(&method);
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {}", self.key.expose()))
            .query(query);
        if let Some(body) = body {
            req = req.json(body);
        }
        let transport =
            |source| ApiError::Transport { method: method_name, path: path.into(), source };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(transport)?.to_vec();
        tracing::trace!(method = method_name, path, status = status.as_u16(), "api reply");
        if status.is_success() {
            return Ok(RawReply { status, headers, bytes });
        }
        Err(error_from_reply(method_name, path, status, &headers, &bytes))
    }
}

/// A successful answer before decoding.
struct RawReply {
    status: StatusCode,
    headers: HeaderMap,
    bytes: Vec<u8>,
}

fn decode<'a, T: DeserializeOwned>(
    method: &'static str,
    path: &'a str,
) -> impl FnOnce(RawReply) -> Result<T, ApiError> + 'a {
    move |reply| {
        serde_json::from_slice(&reply.bytes).map_err(|err| ApiError::Decode {
            method,
            path: path.to_owned(),
            reason: err.to_string(),
        })
    }
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        _ => "OTHER",
    }
}

/// Builds the typed error from a non-2xx answer, falling back as the SDKs do when the body is
/// not an error envelope.
fn error_from_reply(
    method: &'static str,
    path: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiError {
    let envelope: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        envelope.as_ref().and_then(|v| v.get(name)).and_then(|v| v.as_str()).map(str::to_owned)
    };
    let code = field("code")
        .map(|c| ErrorCode::parse(&c))
        .unwrap_or_else(|| ErrorCode::fallback_for_status(status.as_u16()));
    let message = field("message").unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        text.chars().take(200).collect()
    });
    let details = envelope.as_ref().and_then(|v| v.get("details")).cloned();
    let body_retry_ms = envelope.as_ref().and_then(|v| {
        v.get("retry_after_ms")
            .or_else(|| v.get("details").and_then(|d| d.get("retry_after_ms")))
            .and_then(|ms| ms.as_u64())
    });
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
        .or(body_retry_ms.map(Duration::from_millis));
    let reply = ErrorReply { status: status.as_u16(), code, message, details, retry_after };
    ApiError::Status { method, path: path.to_owned(), reply: Box::new(reply) }
}

/// Parses `X-Backlog-Warning: <handle>=<count>`; malformed values are ignored.
fn parse_backlog_warning(value: &str) -> Option<(String, u64)> {
    let (handle, count) = value.split_once('=')?;
    let count = count.trim().parse().ok()?;
    Some((handle.trim().to_owned(), count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_warning_is_split_at_the_first_equals() {
        assert_eq!(parse_backlog_warning("bob=5001"), Some(("bob".into(), 5001)));
        assert_eq!(parse_backlog_warning("bob=x"), None);
        assert_eq!(parse_backlog_warning("bob"), None);
    }

    #[test]
    fn error_envelope_is_mapped_with_details_and_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "2".parse().expect("header"));
        let body = br#"{"code":"RATE_LIMITED","message":"slow down","details":{"a":1}}"#;
        let err =
            error_from_reply("POST", "/v1/messages", StatusCode::TOO_MANY_REQUESTS, &headers, body);
        assert_eq!(err.code(), Some(&ErrorCode::RateLimited));
        assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
        assert!(matches!(err, ApiError::Status { reply, .. } if reply.details.is_some()));
    }

    #[test]
    fn non_json_error_body_falls_back_by_status() {
        let err = error_from_reply(
            "GET",
            "/v1/x",
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            b"404 Not Found",
        );
        assert_eq!(err.code(), Some(&ErrorCode::AgentNotFound));
        assert!(err.to_string().contains("404 Not Found"));
    }

    #[test]
    fn retry_after_ms_in_the_body_is_used_without_a_header() {
        let body = br#"{"code":"RATE_LIMITED","message":"m","retry_after_ms":1500}"#;
        let err = error_from_reply(
            "POST",
            "/v1/mutes",
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body,
        );
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));
    }
}
