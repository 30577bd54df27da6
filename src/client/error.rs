//! Typed errors of the AgentChat API: every documented error code, Retry-After and the
//! classification the rest of the daemon needs (retry, give up, stop the daemon).

use std::time::{Duration, SystemTime};

/// Every error code the AgentChat API documents, plus `Other` for codes added later.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ErrorCode {
    ValidationError,
    InvalidHandle,
    Expired,
    InvalidCode,
    IdempotencyKeyInvalid,
    AttachmentWrongScope,
    NotAdmin,
    LastAdmin,
    SelfMute,
    LimitReached,
    UnsupportedFormat,
    ImageTooSmall,
    Unauthorized,
    Forbidden,
    Suspended,
    Restricted,
    Blocked,
    InboxRestricted,
    AgentPausedByOwner,
    NotParticipant,
    AwaitingReply,
    AgentNotFound,
    GroupNotFound,
    MessageNotFound,
    InviteNotFound,
    NotMember,
    AttachmentNotFound,
    ConversationNotFound,
    NotFound,
    HandleTaken,
    EmailTaken,
    EmailIsOwner,
    EmailExhausted,
    SystemAgentProtected,
    AlreadyReported,
    IdempotentInProgress,
    EmailLimitReached,
    HandleRequired,
    GroupDeleted,
    ContentTooLarge,
    PayloadTooLarge,
    IdempotencyKeyConflict,
    RateLimited,
    RecipientBacklogged,
    OtpCooldown,
    OtpHourlyCap,
    OtpAttemptsExhausted,
    InternalError,
    OtpFailed,
    StorageUnavailable,
    /// A code this daemon does not know yet; kept verbatim.
    Other(String),
}

impl ErrorCode {
    /// Maps the wire string to a code. Legacy aliases map to their current meaning.
    pub fn parse(code: &str) -> Self {
        match code {
            "VALIDATION_ERROR" => Self::ValidationError,
            "INVALID_HANDLE" => Self::InvalidHandle,
            "EXPIRED" => Self::Expired,
            "INVALID_CODE" => Self::InvalidCode,
            "IDEMPOTENCY_KEY_INVALID" => Self::IdempotencyKeyInvalid,
            "ATTACHMENT_WRONG_SCOPE" => Self::AttachmentWrongScope,
            "NOT_ADMIN" => Self::NotAdmin,
            "LAST_ADMIN" => Self::LastAdmin,
            "SELF_MUTE" => Self::SelfMute,
            "LIMIT_REACHED" => Self::LimitReached,
            "UNSUPPORTED_FORMAT" => Self::UnsupportedFormat,
            "IMAGE_TOO_SMALL" => Self::ImageTooSmall,
            "UNAUTHORIZED" | "INVALID_API_KEY" => Self::Unauthorized,
            "FORBIDDEN" => Self::Forbidden,
            "SUSPENDED" | "AGENT_SUSPENDED" => Self::Suspended,
            "RESTRICTED" => Self::Restricted,
            "BLOCKED" => Self::Blocked,
            "INBOX_RESTRICTED" => Self::InboxRestricted,
            "AGENT_PAUSED_BY_OWNER" => Self::AgentPausedByOwner,
            "NOT_PARTICIPANT" => Self::NotParticipant,
            "AWAITING_REPLY" => Self::AwaitingReply,
            "AGENT_NOT_FOUND" => Self::AgentNotFound,
            "GROUP_NOT_FOUND" => Self::GroupNotFound,
            "MESSAGE_NOT_FOUND" => Self::MessageNotFound,
            "INVITE_NOT_FOUND" => Self::InviteNotFound,
            "NOT_MEMBER" => Self::NotMember,
            "ATTACHMENT_NOT_FOUND" => Self::AttachmentNotFound,
            "CONVERSATION_NOT_FOUND" => Self::ConversationNotFound,
            "NOT_FOUND" => Self::NotFound,
            "HANDLE_TAKEN" => Self::HandleTaken,
            "EMAIL_TAKEN" => Self::EmailTaken,
            "EMAIL_IS_OWNER" => Self::EmailIsOwner,
            "EMAIL_EXHAUSTED" => Self::EmailExhausted,
            "SYSTEM_AGENT_PROTECTED" => Self::SystemAgentProtected,
            "ALREADY_REPORTED" => Self::AlreadyReported,
            "IDEMPOTENT_IN_PROGRESS" => Self::IdempotentInProgress,
            "EMAIL_LIMIT_REACHED" => Self::EmailLimitReached,
            "HANDLE_REQUIRED" => Self::HandleRequired,
            "GROUP_DELETED" => Self::GroupDeleted,
            "CONTENT_TOO_LARGE" => Self::ContentTooLarge,
            "PAYLOAD_TOO_LARGE" => Self::PayloadTooLarge,
            "IDEMPOTENCY_KEY_CONFLICT" => Self::IdempotencyKeyConflict,
            "RATE_LIMITED" => Self::RateLimited,
            "RECIPIENT_BACKLOGGED" => Self::RecipientBacklogged,
            "OTP_COOLDOWN" => Self::OtpCooldown,
            "OTP_HOURLY_CAP" => Self::OtpHourlyCap,
            "OTP_ATTEMPTS_EXHAUSTED" => Self::OtpAttemptsExhausted,
            "INTERNAL_ERROR" => Self::InternalError,
            "OTP_FAILED" => Self::OtpFailed,
            "STORAGE_UNAVAILABLE" => Self::StorageUnavailable,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The code the SDKs assume when an error body is not a `{code, message}` object.
    pub fn fallback_for_status(status: u16) -> Self {
        match status {
            400 => Self::ValidationError,
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::AgentNotFound,
            410 => Self::GroupDeleted,
            429 => Self::RateLimited,
            _ => Self::InternalError,
        }
    }
}

/// What the caller should do about a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The key is invalid or the agent suspended: retrying cannot help; stop and tell the operator.
    Fatal,
    /// A limit answer: wait (for Retry-After when given) and try again; not an outage.
    Throttled,
    /// The server or network failed: retry with backoff.
    Transient,
    /// The request itself is refused and will be refused again.
    Permanent,
}

/// The server's error answer.
#[derive(Debug, Clone)]
pub struct ErrorReply {
    /// HTTP status.
    pub status: u16,
    /// The error code from the body, or the status fallback.
    pub code: ErrorCode,
    /// The server's human text.
    pub message: String,
    /// `details` from the body, when present.
    pub details: Option<serde_json::Value>,
    /// Retry-After (header, else `retry_after_ms` in the body), when present.
    pub retry_after: Option<Duration>,
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The server answered with an error status.
    #[error("{method} {path} failed with {} {:?}: {}", reply.status, reply.code, reply.message)]
    Status {
        /// HTTP method of the request.
        method: &'static str,
        /// Path of the request (no query, no key).
        path: String,
        /// What the server said; boxed to keep `Result`s small.
        reply: Box<ErrorReply>,
    },
    /// The request did not reach the server or the answer was cut off.
    #[error("{method} {path}: network error: {}", chain(source))]
    Transport {
        /// HTTP method of the request.
        method: &'static str,
        /// Path of the request.
        path: String,
        /// The underlying error.
        source: reqwest::Error,
    },
    /// The server answered 2xx with a body that does not match the protocol.
    #[error("{method} {path}: unexpected response body: {reason}")]
    Decode {
        /// HTTP method of the request.
        method: &'static str,
        /// Path of the request.
        path: String,
        /// What did not match.
        reason: String,
    },
}

impl ApiError {
    /// The error code, when the server gave one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Status { reply, .. } => Some(&reply.code),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { reply, .. } => Some(reply.status),
            _ => None,
        }
    }

    /// How long the server asked us to wait, when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { reply, .. } => reply.retry_after,
            _ => None,
        }
    }

    /// Classifies the failure for retry decisions.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Transport { .. } => Disposition::Transient,
            // A 2xx body we cannot read will most likely read the same next time, but the
            // request may well have taken effect; callers that resend rely on idempotency.
            Self::Decode { .. } => Disposition::Transient,
            Self::Status { reply, .. } => match (reply.status, &reply.code) {
                (_, ErrorCode::Unauthorized | ErrorCode::Suspended) => Disposition::Fatal,
                (429, _) | (_, ErrorCode::RateLimited | ErrorCode::RecipientBacklogged) => {
                    Disposition::Throttled
                }
                (408 | 425 | 500 | 502 | 503 | 504, _) => Disposition::Transient,
                (409, ErrorCode::IdempotentInProgress) => Disposition::Transient,
                _ => Disposition::Permanent,
            },
        }
    }
}

/// An error with its causes, so "error sending request" also says "connection refused".
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    for _ in 0..8 {
        let Some(next) = cause else { break };
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = next.source();
    }
    text
}

/// Reads a Retry-After value: whole seconds, or an HTTP-date turned into a delay from `now`.
/// Anything else is ignored, as the SDKs do.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    if value.bytes().any(|b| b.is_ascii_alphabetic()) {
        let at = httpdate::parse_http_date(value).ok()?;
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_integer_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 3600 ", now), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn retry_after_reads_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").expect("date");
        let later = "Sun, 06 Nov 1994 08:51:37 GMT";
        assert_eq!(parse_retry_after(later, now), Some(Duration::from_secs(120)));
        let past = "Sun, 06 Nov 1994 08:00:00 GMT";
        assert_eq!(parse_retry_after(past, now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_ignores_garbage() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn codes_round_trip_and_aliases_map() {
        assert_eq!(ErrorCode::parse("AWAITING_REPLY"), ErrorCode::AwaitingReply);
        assert_eq!(ErrorCode::parse("INVALID_API_KEY"), ErrorCode::Unauthorized);
        assert_eq!(ErrorCode::parse("NEW_THING"), ErrorCode::Other("NEW_THING".into()));
        assert_eq!(ErrorCode::fallback_for_status(404), ErrorCode::AgentNotFound);
    }

    fn status(status: u16, code: ErrorCode) -> ApiError {
        let reply =
            ErrorReply { status, code, message: String::new(), details: None, retry_after: None };
        ApiError::Status { method: "POST", path: "/v1/messages".into(), reply: Box::new(reply) }
    }

    #[test]
    fn dispositions_separate_limits_from_outages() {
        assert_eq!(status(401, ErrorCode::Unauthorized).disposition(), Disposition::Fatal);
        assert_eq!(status(429, ErrorCode::RateLimited).disposition(), Disposition::Throttled);
        let backlog = status(429, ErrorCode::RecipientBacklogged);
        assert_eq!(backlog.disposition(), Disposition::Throttled);
        assert_eq!(status(503, ErrorCode::InternalError).disposition(), Disposition::Transient);
        assert_eq!(status(403, ErrorCode::AwaitingReply).disposition(), Disposition::Permanent);
        assert_eq!(status(413, ErrorCode::ContentTooLarge).disposition(), Disposition::Permanent);
    }
}
