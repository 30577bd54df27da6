//! A loopback OpenAI-compatible chat-completions server for the llm plugin's tests. It binds
//! `127.0.0.1:0`, records every request it gets and answers deterministically, or fails the
//! way the test sets with [`CompletionsServer::set_mode`].

#![allow(dead_code)] // Each test uses a different subset.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest a `Slow` answer waits; the server's stop ends the wait sooner.
const MAX_SLOW: Duration = Duration::from_secs(30);

/// How the server answers `POST /v1/chat/completions`.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 200 with one choice whose content is `model says: <last user message>`.
    Answer,
    /// This status with an OpenAI-style error body.
    Status(u16),
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with JSON that has no `choices`.
    NoChoices,
    /// 200 with content made of `x` and this many repetitions of `é` (two bytes each), so
    /// that any even byte limit falls inside a character.
    Long(usize),
    /// Waits this long (at most [`MAX_SLOW`], or until the server stops), then answers.
    Slow(Duration),
    /// 307 (the method and body are kept) to this absolute URL.
    Redirect(String),
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// The body parsed as JSON (`Null` when it was not JSON).
    pub body: Value,
}

struct Shared {
    mode: Mutex<Mode>,
    requests: Mutex<Vec<Recorded>>,
    stop: CancellationToken,
}

/// A running server; dropping it stops it.
pub struct CompletionsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl CompletionsServer {
    /// Starts a server in [`Mode::Answer`] on a port the OS picks.
    pub async fn start() -> CompletionsServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Answer),
            requests: Mutex::default(),
            stop: CancellationToken::new(),
        });
        let app = Router::new().fallback(handle).with_state(Arc::clone(&shared));
        let stop = shared.stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        CompletionsServer { addr, shared, task }
    }

    /// The `endpoint` a plugin config names: `http://127.0.0.1:PORT/v1`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The grant that lets a plugin reach this server and no other port: `127.0.0.1:PORT`.
    pub fn grant(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().expect("mode lock") = mode;
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests lock").clone()
    }
}

impl Drop for CompletionsServer {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.task.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text_header = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let recorded = Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        authorization: text_header(header::AUTHORIZATION),
        content_type: text_header(header::CONTENT_TYPE),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let request_body = recorded.body.clone();
    shared.requests.lock().expect("requests lock").push(recorded);

    if method != axum::http::Method::POST || uri.path() != "/v1/chat/completions" {
        return error(StatusCode::NOT_FOUND, "not_found");
    }
    let mode = shared.mode.lock().expect("mode lock").clone();
    match mode {
        Mode::Answer => answer(&request_body),
        Mode::Long(n) => answer_with(&request_body, format!("x{}", "é".repeat(n))),
        Mode::Status(status) => {
            error(StatusCode::from_u16(status).expect("a valid status"), "test_failure")
        }
        Mode::Malformed => (StatusCode::OK, "{\"choices\": [oops").into_response(),
        Mode::NoChoices => {
            axum::Json(json!({"id": "chatcmpl-test", "object": "chat.completion"})).into_response()
        }
        Mode::Slow(wait) => {
            tokio::select! {
                () = tokio::time::sleep(wait.min(MAX_SLOW)) => answer(&request_body),
                () = shared.stop.cancelled() => error(StatusCode::SERVICE_UNAVAILABLE, "stopping"),
            }
        }
        Mode::Redirect(to) => {
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
        }
    }
}

/// The deterministic answer: the last user message, prefixed.
fn answer(request: &Value) -> Response {
    let last_user = request["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    answer_with(request, format!("model says: {last_user}"))
}

fn answer_with(request: &Value, content: String) -> Response {
    axum::Json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": request["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }))
    .into_response()
}

fn error(status: StatusCode, code: &str) -> Response {
    let body = json!({"error": {"message": "failing on purpose", "type": "test", "code": code}});
    (status, axum::Json(body)).into_response()
}
