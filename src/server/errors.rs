//! Error types of the local server: [`ServerError`] for the Rust API (start, seed, restart) and
//! [`ApiError`] for what an HTTP client sees, rendered as the `{code, message, details?}` JSON
//! envelope of the wire reference. This module does no I/O of its own.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Failures of the local server's Rust API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen socket could not be bound or inspected.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address that was asked for.
        addr: std::net::SocketAddr,
        /// Underlying socket error.
        #[source]
        source: std::io::Error,
    },
    /// The SQLite database could not be opened, migrated or queried.
    #[error("database error")]
    Db(#[from] rusqlite::Error),
    /// A seeded handle does not pass the registration rules.
    #[error("invalid handle {0:?}")]
    InvalidHandle(String),
    /// A seeded handle already belongs to an agent.
    #[error("handle {0:?} is already taken")]
    HandleTaken(String),
}

/// An error answer of the HTTP API: a status plus the JSON error envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Builds an error with a status, a stable code and a human message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: None, retry_after_secs: None }
    }

    /// Attaches the optional `details` object.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Adds an integer `Retry-After` header to the response.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 400 `VALIDATION_ERROR` with a plain message and no details.
    pub fn validation(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
    }

    /// 401 `UNAUTHORIZED`, identical for every auth failure so callers learn nothing.
    pub fn unauthorized() -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "Invalid API key")
    }

    /// 500 `INTERNAL_ERROR`; the cause is logged, never sent to the client.
    pub fn internal() -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "Internal server error")
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(err: rusqlite::Error) -> Self {
        tracing::error!(error = %err, "database query failed");
        ApiError::internal()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("code".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        if let Some(details) = self.details {
            body.insert("details".into(), details);
        }
        let mut res = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(secs) = self.retry_after_secs {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// Collects schema failures in the flattened shape Zod produces, so SDKs that print
/// `details.fieldErrors` show something useful.
#[derive(Debug, Default)]
pub struct FieldErrors {
    form: Vec<String>,
    fields: Map<String, Value>,
}

impl FieldErrors {
    /// Records a failure not tied to one field.
    pub fn form(&mut self, message: &str) {
        self.form.push(message.to_owned());
    }

    /// Records a failure of one field.
    pub fn field(&mut self, field: &str, message: &str) {
        let entry = self.fields.entry(field.to_owned()).or_insert_with(|| json!([]));
        if let Value::Array(list) = entry {
            list.push(json!(message));
        }
    }

    /// `Ok(())` when nothing was recorded, else a 400 `VALIDATION_ERROR` with details.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.form.is_empty() && self.fields.is_empty() {
            return Ok(());
        }
        let details = json!({ "formErrors": self.form, "fieldErrors": self.fields });
        Err(ApiError::validation("Invalid request body").with_details(details))
    }
}

/// A request body as handlers take it, so a body-read failure still gets a JSON error.
pub type RawBody = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// Parses a request body as a JSON object; anything else is a 400 `VALIDATION_ERROR`, and a
/// body beyond the transport limit (2 MiB) is a 413 `CONTENT_TOO_LARGE`.
pub fn parse_json_object(body: RawBody) -> Result<Map<String, Value>, ApiError> {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let message = "Request body too large";
            return Err(ApiError::new(rejection.status(), "CONTENT_TOO_LARGE", message));
        }
        Err(rejection) => return Err(ApiError::validation(rejection.body_text())),
    };
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::validation("Request body must be a JSON object")),
        Err(_) => Err(ApiError::validation("Invalid JSON body")),
    }
}
