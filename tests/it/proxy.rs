//! A fault-injecting HTTP proxy in front of the local server: it forwards every request, and
//! can answer chosen sends itself (503, 429 with a Retry-After) or forward a send and then
//! never answer, as a crash in mid-send looks to the daemon. It logs every send it saw. On cue
//! it also holds sync requests unanswered, as a server that accepted them and went silent.

#![allow(dead_code)] // Each test module uses a different subset.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use tokio::sync::{Notify, watch};

/// What the proxy does with the next send.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer 503 without forwarding.
    Unavailable,
    /// Answer 429 RATE_LIMITED with this Retry-After, without forwarding.
    TooMany(String),
    /// Forward, then never answer.
    ForwardThenHang,
}

/// One `POST /v1/messages` the proxy saw.
#[derive(Debug, Clone)]
pub struct SeenSend {
    pub client_msg_id: String,
    pub text: Option<String>,
    pub status: u16,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    faults: Mutex<VecDeque<Fault>>,
    sends: Mutex<Vec<SeenSend>>,
    forwarded: Notify,
    /// While true, `GET /v1/messages/sync` requests wait unanswered.
    hold_syncs: watch::Sender<bool>,
    /// Sync requests waiting now.
    held_syncs: AtomicUsize,
}

pub struct Proxy {
    pub base: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str, faults: Vec<Fault>) -> Proxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            faults: Mutex::new(faults.into()),
            sends: Mutex::default(),
            forwarded: Notify::new(),
            hold_syncs: watch::Sender::new(false),
            held_syncs: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(forward).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Proxy { base, state, task }
    }

    /// Every send seen so far, in arrival order.
    pub fn sends(&self) -> Vec<SeenSend> {
        self.state.sends.lock().expect("lock").clone()
    }

    /// Completes once a send was forwarded upstream (bound it with a timeout). Call it before
    /// the send can happen: the future registers at once, so a send forwarded before it is
    /// first polled still counts (an `async fn` would register only when polled, and miss it).
    pub fn forwarded(&self) -> tokio::sync::futures::Notified<'_> {
        self.state.forwarded.notified()
    }

    /// From now on, sync requests get no answer until [`Proxy::release_syncs`].
    pub fn hold_syncs(&self) {
        self.state.hold_syncs.send_replace(true);
    }

    /// Forwards the held sync requests and every later one.
    pub fn release_syncs(&self) {
        self.state.hold_syncs.send_replace(false);
    }

    /// How many sync requests are being held now.
    pub fn held_syncs(&self) -> usize {
        self.state.held_syncs.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    State(state): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::GET && uri.path() == "/v1/messages/sync" {
        hold_while_asked(&state).await;
    }
    let is_send = method == Method::POST && uri.path() == "/v1/messages";
    let fault = if is_send { state.faults.lock().expect("lock").pop_front() } else { None };
    let record = |status: u16| {
        if is_send {
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            state.sends.lock().expect("lock").push(SeenSend {
                client_msg_id: value["client_msg_id"].as_str().unwrap_or_default().to_owned(),
                text: value["content"]["text"].as_str().map(str::to_owned),
                status,
            });
        }
    };
    match fault {
        Some(Fault::Unavailable) => {
            record(503);
            return reply(503, None, r#"{"code":"INTERNAL_ERROR","message":"injected outage"}"#);
        }
        Some(Fault::TooMany(retry_after)) => {
            record(429);
            let body = r#"{"code":"RATE_LIMITED","message":"injected limit"}"#;
            return reply(429, Some(retry_after), body);
        }
        _ => {}
    }

    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request =
        state.http.request(method, format!("{}{path}", state.upstream)).body(body.clone());
    for name in ["authorization", "content-type"] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    let Ok(upstream) = request.send().await else {
        return reply(502, None, r#"{"code":"INTERNAL_ERROR","message":"upstream unreachable"}"#);
    };
    let status = upstream.status().as_u16();
    let retry_after =
        upstream.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bytes = upstream.bytes().await.unwrap_or_default();
    record(status);
    if matches!(fault, Some(Fault::ForwardThenHang)) {
        state.forwarded.notify_waiters();
        std::future::pending::<()>().await;
    }
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    if let Some(value) = retry_after.and_then(|v| v.parse().ok()) {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

/// Keeps a sync request waiting while the test holds syncs.
async fn hold_while_asked(state: &ProxyState) {
    /// Counts a request as held for as long as it waits, even when the client gives up and the
    /// server drops the handler mid-wait.
    struct Held<'a>(&'a AtomicUsize);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    let mut hold = state.hold_syncs.subscribe();
    if !*hold.borrow_and_update() {
        return;
    }
    state.held_syncs.fetch_add(1, Ordering::SeqCst);
    let _held = Held(&state.held_syncs);
    // The sender lives in the state, so the channel stays open for as long as this waits.
    let _ = hold.wait_for(|held| !held).await;
}

fn reply(status: u16, retry_after: Option<String>, body: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    if let Some(value) = retry_after.and_then(|v| v.parse().ok()) {
        response.headers_mut().insert("retry-after", value);
    }
    response
}
