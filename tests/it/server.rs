//! Integration tests of the local AgentChat-compatible server (`agentchatd::server`): real
//! HTTP and WebSocket clients against a server bound to 127.0.0.1:0.

use std::net::SocketAddr;
use std::time::Duration;

use agentchatd::server::{Clock, LocalServer, ServerConfig};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound on any single wait in these tests, so a broken server fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);

async fn start(config: ServerConfig) -> LocalServer {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    LocalServer::start(config, listen).await.expect("server starts")
}

async fn start_default() -> LocalServer {
    start(ServerConfig::default()).await
}

/// A tiny HTTP helper bound to one server.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(server: &LocalServer) -> Api {
        Api { http: reqwest::Client::new(), base: server.base_url() }
    }

    async fn post(&self, key: Option<&str>, path: &str, body: Value) -> reqwest::Response {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send().await.expect("request sent")
    }

    async fn get(&self, key: Option<&str>, path: &str) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send().await.expect("request sent")
    }

    async fn register(&self, handle: &str) -> reqwest::Response {
        let body = json!({
            "email": format!("{handle}@example.com"),
            "handle": handle,
            "display_name": null,
            "description": null,
        });
        self.post(None, "/v1/register", body).await
    }

    /// Full registration flow; returns the API key.
    async fn register_and_verify(&self, handle: &str) -> String {
        let res = self.register(handle).await;
        assert_eq!(res.status(), StatusCode::OK);
        let pending: Value = res.json().await.expect("json");
        let pending_id = pending["pending_id"].as_str().expect("pending_id");
        let body = json!({ "pending_id": pending_id, "code": "424242" });
        let res = self.post(None, "/v1/register/verify", body).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let done: Value = res.json().await.expect("json");
        assert_eq!(done["agent"]["handle"], handle);
        done["api_key"].as_str().expect("api_key").to_owned()
    }

    async fn send(
        &self,
        key: &str,
        to: &str,
        client_msg_id: &str,
        text: &str,
    ) -> reqwest::Response {
        let body = json!({ "to": to, "client_msg_id": client_msg_id, "content": { "text": text } });
        self.post(Some(key), "/v1/messages", body).await
    }

    /// Sends and asserts a 201; returns the message.
    async fn send_ok(&self, key: &str, to: &str, client_msg_id: &str, text: &str) -> Value {
        let res = self.send(key, to, client_msg_id, text).await;
        assert_eq!(res.status(), StatusCode::CREATED, "send {client_msg_id}");
        res.json().await.expect("json")
    }

    async fn sync(&self, key: &str, query: &str) -> Vec<Value> {
        let res = self.get(Some(key), &format!("/v1/messages/sync{query}")).await;
        assert_eq!(res.status(), StatusCode::OK);
        let rows: Value = res.json().await.expect("json");
        rows.as_array().expect("bare array").clone()
    }
}

async fn error_code(res: reqwest::Response) -> (StatusCode, String) {
    let status = res.status();
    let body: Value = res.json().await.expect("error body is json");
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

/// Seeds two agents and makes `b` answer `a`, so the thread is no longer cold.
async fn pair(server: &LocalServer, api: &Api, a: &str, b: &str) -> (String, String) {
    let key_a = server.seed_agent(a).await.expect("seed");
    let key_b = server.seed_agent(b).await.expect("seed");
    api.send_ok(&key_a, b, &format!("{a}-opens"), "hello").await;
    api.send_ok(&key_b, a, &format!("{b}-answers"), "hi back").await;
    (key_a, key_b)
}

// === WebSocket helpers ===

async fn ws_connect(server: &LocalServer) -> Ws {
    let url = format!("ws://{}/v1/ws", server.local_addr());
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws connects");
    ws
}

async fn ws_hello(server: &LocalServer, key: &str, caps: &[&str]) -> (Ws, Value) {
    let mut ws = ws_connect(server).await;
    let hello = json!({ "type": "hello", "api_key": key, "capabilities": caps });
    ws.send(Message::Text(hello.to_string().into())).await.expect("hello sent");
    let first = next_json(&mut ws).await.expect("a frame after hello");
    (ws, first)
}

/// Next JSON text frame, skipping control frames; `None` on close or after [`WAIT`].
async fn next_json(ws: &mut Ws) -> Option<Value> {
    next_json_within(ws, WAIT).await
}

async fn next_json_within(ws: &mut Ws, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??.ok()?;
        match msg {
            Message::Text(text) => return serde_json::from_str(text.as_str()).ok(),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Reads until the server's close frame and returns its code and reason.
async fn close_frame(ws: &mut Ws) -> Option<(u16, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??.ok()?;
        if let Message::Close(frame) = msg {
            return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
        }
    }
}

/// Polls sync until it returns `expected` rows, at most 100 times 20 ms apart.
async fn wait_for_sync_len(api: &Api, key: &str, expected: usize) -> usize {
    let mut last = usize::MAX;
    for _ in 0..100 {
        last = api.sync(key, "").await.len();
        if last == expected {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

// === Registration and auth ===

#[tokio::test]
async fn register_and_verify_issue_a_working_key() {
    let server = start_default().await;
    let api = Api::new(&server);

    let key = api.register_and_verify("alice").await;
    assert!(key.starts_with("ac_"));
    assert_eq!(key.len(), 46);

    let res = api.get(Some(&key), "/v1/agents/me").await;
    assert_eq!(res.status(), StatusCode::OK);
    let me: Value = res.json().await.expect("json");
    assert_eq!(me["handle"], "alice");
    assert_eq!(me["email_masked"], "a****@example.com");
    assert_eq!(me["paused_by_owner"], "none");

    let res = api.get(None, "/v1/agents/@Alice").await;
    assert_eq!(res.status(), StatusCode::OK);
    let profile: Value = res.json().await.expect("json");
    assert_eq!(profile["handle"], "alice");
    assert!(profile.get("email").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn register_refuses_taken_and_invalid_handles() {
    let server = start_default().await;
    let api = Api::new(&server);
    api.register_and_verify("alice").await;

    assert_eq!(
        error_code(api.register("alice").await).await,
        (StatusCode::CONFLICT, "HANDLE_TAKEN".into())
    );
    for bad in ["Alice", "admin", "sync", "bob-", "a--b", "ab"] {
        let got = error_code(api.register(bad).await).await;
        assert_eq!(got, (StatusCode::BAD_REQUEST, "INVALID_HANDLE".into()), "{bad}");
    }
    let res = api.post(None, "/v1/register", json!({ "handle": "carol" })).await;
    assert_eq!(error_code(res).await, (StatusCode::BAD_REQUEST, "VALIDATION_ERROR".into()));
    server.shutdown().await;
}

#[tokio::test]
async fn verify_refuses_wrong_code_and_unknown_pending_id() {
    let server = start_default().await;
    let api = Api::new(&server);
    let pending: Value = api.register("alice").await.json().await.expect("json");

    let body = json!({ "pending_id": pending["pending_id"], "code": "000000" });
    let res = api.post(None, "/v1/register/verify", body).await;
    assert_eq!(error_code(res).await, (StatusCode::BAD_REQUEST, "INVALID_CODE".into()));

    let body = json!({ "pending_id": "pnd_doesnotexist0", "code": "424242" });
    let res = api.post(None, "/v1/register/verify", body).await;
    assert_eq!(error_code(res).await, (StatusCode::BAD_REQUEST, "EXPIRED".into()));

    // The right code still works after one wrong attempt.
    let body = json!({ "pending_id": pending["pending_id"], "code": "424242" });
    assert_eq!(api.post(None, "/v1/register/verify", body).await.status(), StatusCode::CREATED);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_or_missing_keys_get_the_401_envelope() {
    let server = start_default().await;
    let api = Api::new(&server);
    for key in [None, Some("ac_not-a-real-key")] {
        let res = api.get(key, "/v1/agents/me").await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let body: Value = res.json().await.expect("json");
        assert_eq!(body, json!({ "code": "UNAUTHORIZED", "message": "Invalid API key" }));
    }
    let res = api
        .http
        .get(format!("{}/v1/messages/sync", api.base))
        .header("authorization", "Basic abc")
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    server.shutdown().await;
}

#[tokio::test]
async fn common_http_behaviour() {
    let server = start_default().await;
    let api = Api::new(&server);

    let res = api.get(None, "/v1/health").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().contains_key("x-request-id"));
    assert_eq!(res.json::<Value>().await.expect("json"), json!({ "status": "ok" }));

    let res = api
        .http
        .get(format!("{}/v1/health", api.base))
        .header("x-request-id", "req-123")
        .send()
        .await
        .expect("sent");
    assert_eq!(res.headers()["x-request-id"], "req-123");

    let root: Value = api.get(None, "/").await.json().await.expect("json");
    assert_eq!(root["status"], "alive");

    let res = api.get(None, "/v1/nothing-here").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.text().await.expect("text"), "404 Not Found");
    let res = api.http.delete(format!("{}/v1/health", api.base)).send().await.expect("sent");
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    let key = server.seed_agent("alice").await.expect("seed");
    let res = api
        .http
        .post(format!("{}/v1/messages", api.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(error_code(res).await, (StatusCode::BAD_REQUEST, "VALIDATION_ERROR".into()));
    server.shutdown().await;
}

// === Sending ===

#[tokio::test]
async fn send_validation_and_addressing_errors() {
    let server = start_default().await;
    let api = Api::new(&server);
    let key = server.seed_agent("alice").await.expect("seed");
    server.seed_agent("bob").await.expect("seed");

    let both = json!({ "to": "bob", "conversation_id": "grp_x", "client_msg_id": "1",
                       "content": { "text": "x" } });
    let res = api.post(Some(&key), "/v1/messages", both).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["code"], "VALIDATION_ERROR");
    assert!(body["details"]["formErrors"].as_array().is_some_and(|e| !e.is_empty()));

    let empty = json!({ "to": "bob", "client_msg_id": "2", "content": { "other": 1 } });
    let res = api.post(Some(&key), "/v1/messages", empty).await;
    let body: Value = res.json().await.expect("json");
    assert!(body["details"]["fieldErrors"]["content"].is_array());

    let long_id = "x".repeat(129);
    let res = api.send(&key, "bob", &long_id, "x").await;
    assert_eq!(error_code(res).await, (StatusCode::BAD_REQUEST, "VALIDATION_ERROR".into()));

    let res = api.send(&key, "@alice", "3", "x").await;
    assert_eq!(error_code(res).await, (StatusCode::BAD_REQUEST, "VALIDATION_ERROR".into()));
    let res = api.send(&key, "nobody", "4", "x").await;
    assert_eq!(error_code(res).await, (StatusCode::NOT_FOUND, "AGENT_NOT_FOUND".into()));
    let group =
        json!({ "conversation_id": "grp_abc", "client_msg_id": "5", "content": { "text": "x" } });
    let res = api.post(Some(&key), "/v1/messages", group).await;
    assert_eq!(error_code(res).await, (StatusCode::NOT_FOUND, "GROUP_NOT_FOUND".into()));

    // Unknown content keys are dropped, not refused.
    let extra =
        json!({ "to": "@Bob", "client_msg_id": "6", "content": { "text": "x", "junk": 1 } });
    let res = api.post(Some(&key), "/v1/messages", extra).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let msg: Value = res.json().await.expect("json");
    assert_eq!(msg["content"], json!({ "text": "x" }));
    assert_eq!(msg["metadata"], json!({}));
    assert!(msg["id"].as_str().is_some_and(|id| id.starts_with("msg_")));
    assert!(msg["conversation_id"].as_str().is_some_and(|id| id.starts_with("conv_")));
    server.shutdown().await;
}

#[tokio::test]
async fn replayed_client_msg_id_returns_the_original_once() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");

    let first = api.send(&alice, "bob", "same-id", "hello").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.expect("json");

    // Same id, different body and target: still a replay of the first message.
    let again = api.send(&alice, "bob", "same-id", "different").await;
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.expect("json");
    assert_eq!(first, again);

    let rows = api.sync(&bob, "").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], first["id"]);
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_sends_get_distinct_seqs_and_one_row_per_client_msg_id() {
    let server = start_default().await;
    let api = std::sync::Arc::new(Api::new(&server));
    let (alice, bob) = pair(&server, &api, "alice", "bob").await;

    let mut tasks = Vec::new();
    for i in 0..20 {
        let (api, alice) = (api.clone(), alice.clone());
        // Half of the requests reuse one client_msg_id; the rest are distinct.
        let id = if i % 2 == 0 { "shared".to_owned() } else { format!("own-{i}") };
        tasks.push(tokio::spawn(async move {
            let res = api.send(&alice, "bob", &id, "x").await;
            let status = res.status();
            let body: Value = res.json().await.expect("json");
            (status, body)
        }));
    }
    let mut created_seqs = Vec::new();
    let mut shared_ids = std::collections::HashSet::new();
    for task in tasks {
        let (status, body) = task.await.expect("joined");
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{status}");
        if body["client_msg_id"] == "shared" {
            shared_ids.insert(body["id"].as_str().expect("id").to_owned());
        }
        if status == StatusCode::CREATED {
            created_seqs.push(body["seq"].as_i64().expect("seq"));
        }
    }
    created_seqs.sort_unstable();
    // 10 distinct ids + 1 shared one, after seqs 1 and 2 used by `pair`.
    assert_eq!(created_seqs, (3..=13).collect::<Vec<_>>());
    assert_eq!(shared_ids.len(), 1);
    // Bob holds alice's opener plus the 11 new messages.
    assert_eq!(api.sync(&bob, "").await.len(), 12);
    server.shutdown().await;
}

#[tokio::test]
async fn seq_counts_per_conversation() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    server.seed_agent("carol").await.expect("seed");

    let m1 = api.send_ok(&alice, "bob", "a1", "one").await;
    let m2 = api.send_ok(&bob, "alice", "b1", "two").await;
    let m3 = api.send_ok(&alice, "bob", "a2", "three").await;
    let c1 = api.send_ok(&alice, "carol", "a3", "other thread").await;
    assert_eq!([&m1["seq"], &m2["seq"], &m3["seq"]], [&json!(1), &json!(2), &json!(3)]);
    assert_eq!(m1["conversation_id"], m3["conversation_id"]);
    assert_eq!(c1["seq"], 1);
    assert_ne!(c1["conversation_id"], m1["conversation_id"]);
    server.shutdown().await;
}

#[tokio::test]
async fn content_cap_is_exactly_32768_bytes() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    api.send_ok(&bob, "alice", "open", "hi").await;

    // JSON(content) = {"text":"…"} (11 bytes + text) and JSON(metadata) = {} (2 bytes).
    let fits = "x".repeat(32_768 - 11 - 2);
    let body = json!({ "to": "bob", "client_msg_id": "fits", "content": { "text": fits },
                       "metadata": {} });
    assert_eq!(api.post(Some(&alice), "/v1/messages", body).await.status(), StatusCode::CREATED);

    // A body beyond the transport limit still gets the JSON error envelope.
    let huge = json!({ "to": "bob", "client_msg_id": "huge",
                       "content": { "text": "x".repeat(3 << 20) } });
    let res = api.post(Some(&alice), "/v1/messages", huge).await;
    assert_eq!(error_code(res).await, (StatusCode::PAYLOAD_TOO_LARGE, "CONTENT_TOO_LARGE".into()));

    let too_big = "x".repeat(32_768 - 11 - 2 + 1);
    let body = json!({ "to": "bob", "client_msg_id": "too-big", "content": { "text": too_big },
                       "metadata": {} });
    let res = api.post(Some(&alice), "/v1/messages", body).await;
    assert_eq!(error_code(res).await, (StatusCode::PAYLOAD_TOO_LARGE, "CONTENT_TOO_LARGE".into()));
    server.shutdown().await;
}

#[tokio::test]
async fn send_rate_limit_answers_429_with_retry_after() {
    let mut config = ServerConfig::default();
    config.limits.sends_per_second = 3;
    let server = start(config).await;
    let api = Api::new(&server);
    let (alice, _bob) = pair(&server, &api, "alice", "bob").await;

    let mut created = 0;
    let mut limited = None;
    for i in 0..50 {
        let res = api.send(&alice, "bob", &format!("burst-{i}"), "x").await;
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(res);
            break;
        }
        assert_eq!(res.status(), StatusCode::CREATED);
        created += 1;
    }
    let res = limited.expect("a burst of 50 hits a 3/s limit");
    // At most two buckets can be open during the burst, plus the send made by `pair`.
    assert!(created <= 6, "created {created} before the limit");
    let retry_after: u64 =
        res.headers()["retry-after"].to_str().expect("ascii").parse().expect("integer");
    assert!(retry_after >= 1);
    assert_eq!(error_code(res).await.1, "RATE_LIMITED");
    server.shutdown().await;
}

#[tokio::test]
async fn cold_threads_wait_for_a_reply_and_are_capped_per_day() {
    let clock = Clock::wall();
    let mut config = ServerConfig { clock: clock.clone(), ..ServerConfig::default() };
    config.limits.cold_threads_per_day = 1;
    let server = start(config).await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    server.seed_agent("carol").await.expect("seed");

    api.send_ok(&alice, "bob", "a1", "hello").await;
    let res = api.send(&alice, "bob", "a2", "hello again").await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["code"], "AWAITING_REPLY");
    assert_eq!(body["details"]["recipient_handle"], "bob");
    assert!(body["details"]["waiting_since"].is_string());

    // A second unanswered conversation exceeds the cap of 1 per day.
    let res = api.send(&alice, "carol", "a3", "hi carol").await;
    assert!(!res.headers().contains_key("retry-after"));
    assert_eq!(error_code(res).await, (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED".into()));

    // Bob's reply establishes the thread and frees the slot.
    api.send_ok(&bob, "alice", "b1", "hey").await;
    api.send_ok(&alice, "bob", "a4", "great").await;
    api.send_ok(&alice, "carol", "a5", "hi carol").await;

    // Carol's thread is cold again; a day later the window no longer counts it.
    server.seed_agent("dave").await.expect("seed");
    let res = api.send(&alice, "dave", "a6", "hi dave").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    clock.advance(Duration::from_secs(25 * 60 * 60));
    api.send_ok(&alice, "dave", "a7", "hi dave").await;
    server.shutdown().await;
}

#[tokio::test]
async fn backlog_warns_then_refuses() {
    let mut config = ServerConfig::default();
    config.limits.backlog_warn = 2;
    config.limits.backlog_hard = 3;
    let server = start(config).await;
    let api = Api::new(&server);
    let (alice, bob) = pair(&server, &api, "alice", "bob").await;
    // Bob holds 1 stored envelope (alice's opener); acking it makes the count predictable.
    let rows = api.sync(&bob, "").await;
    let last = rows.last().expect("one row")["delivery_id"].clone();
    api.post(Some(&bob), "/v1/messages/sync/ack", json!({ "last_delivery_id": last })).await;

    let first = api.send(&alice, "bob", "m1", "x").await;
    assert!(!first.headers().contains_key("x-backlog-warning"));
    api.send_ok(&alice, "bob", "m2", "x").await;
    let third = api.send(&alice, "bob", "m3", "x").await;
    assert_eq!(third.headers()["x-backlog-warning"], "bob=2");
    let res = api.send(&alice, "bob", "m4", "x").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["code"], "RECIPIENT_BACKLOGGED");
    assert_eq!(body["details"], json!({ "recipient_handle": "bob", "undelivered_count": 3 }));
    server.shutdown().await;
}

// === Sync, ack, history, read ===

#[tokio::test]
async fn sync_pages_with_after_and_ack_counts_rows() {
    let server = start_default().await;
    let api = Api::new(&server);
    let (alice, bob) = pair(&server, &api, "alice", "bob").await;
    for i in 0..4 {
        api.send_ok(&alice, "bob", &format!("m{i}"), "x").await;
    }

    let all = api.sync(&bob, "").await;
    assert_eq!(all.len(), 5);
    for row in &all {
        let id = row["delivery_id"].as_str().expect("delivery id");
        assert!(id.starts_with("del_") && id.len() == 36);
        assert_eq!(row["status"], "stored");
        assert!(row["delivered_at"].is_null() && row["read_at"].is_null());
    }

    let first_page = api.sync(&bob, "?limit=2").await;
    assert_eq!(first_page.len(), 2);
    let cursor = first_page[1]["delivery_id"].as_str().expect("cursor");
    let second_page = api.sync(&bob, &format!("?limit=2&after={cursor}")).await;
    assert_eq!(second_page[0]["id"], all[2]["id"]);

    // Sync is non-destructive.
    assert_eq!(api.sync(&bob, "").await.len(), 5);

    let res =
        api.post(Some(&bob), "/v1/messages/sync/ack", json!({ "last_delivery_id": cursor })).await;
    assert_eq!(res.json::<Value>().await.expect("json"), json!({ "acked": 2 }));
    let res =
        api.post(Some(&bob), "/v1/messages/sync/ack", json!({ "last_delivery_id": cursor })).await;
    assert_eq!(res.json::<Value>().await.expect("json"), json!({ "acked": 0 }));
    assert_eq!(api.sync(&bob, "").await.len(), 3);

    // Alice cannot use Bob's cursor, and a malformed one restarts nothing.
    assert!(api.sync(&alice, &format!("?after={cursor}")).await.is_empty());
    assert!(api.sync(&bob, "?after=del_nothex").await.is_empty());
    let res = api
        .post(Some(&alice), "/v1/messages/sync/ack", json!({ "last_delivery_id": cursor }))
        .await;
    assert_eq!(res.json::<Value>().await.expect("json"), json!({ "acked": 0 }));

    for bad in ["?limit=0", "?limit=abc", "?limit=1.5"] {
        let res = api.get(Some(&bob), &format!("/v1/messages/sync{bad}")).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let res = api.post(Some(&bob), "/v1/messages/sync/ack", json!({})).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    server.shutdown().await;
}

#[tokio::test]
async fn history_pages_before_and_after_seq() {
    let server = start_default().await;
    let api = Api::new(&server);
    let (alice, bob) = pair(&server, &api, "alice", "bob").await;
    let mut conv = Value::Null;
    for i in 3..=6 {
        conv = api.send_ok(&alice, "bob", &format!("m{i}"), "x").await["conversation_id"].clone();
    }
    let conv = conv.as_str().expect("conversation id").to_owned();
    let seqs = |rows: &Value| -> Vec<i64> {
        rows.as_array().expect("array").iter().filter_map(|r| r["seq"].as_i64()).collect()
    };

    let newest: Value =
        api.get(Some(&alice), &format!("/v1/messages/{conv}")).await.json().await.expect("json");
    assert_eq!(seqs(&newest), vec![6, 5, 4, 3, 2, 1]);
    let before: Value = api
        .get(Some(&bob), &format!("/v1/messages/{conv}?before_seq=4&limit=2"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(seqs(&before), vec![3, 2]);
    let after: Value = api
        .get(Some(&bob), &format!("/v1/messages/{conv}?after_seq=4"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(seqs(&after), vec![5, 6]);
    // Alice's own message shows Bob's envelope state.
    assert_eq!(after[0]["status"], "stored");
    assert!(after[0]["delivery_id"].is_string());

    let res = api.get(Some(&bob), &format!("/v1/messages/{conv}?after_seq=1&before_seq=3")).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let carol = server.seed_agent("carol").await.expect("seed");
    let res = api.get(Some(&carol), &format!("/v1/messages/{conv}")).await;
    assert_eq!(error_code(res).await, (StatusCode::FORBIDDEN, "FORBIDDEN".into()));
    let res = api.get(Some(&carol), "/v1/messages/conv_unknown").await;
    assert_eq!(error_code(res).await, (StatusCode::FORBIDDEN, "FORBIDDEN".into()));
    server.shutdown().await;
}

#[tokio::test]
async fn mark_read_updates_the_envelope_and_tells_the_sender() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    let msg = api.send_ok(&alice, "bob", "m1", "read me").await;
    let id = msg["id"].as_str().expect("id");

    let (mut alice_ws, ok) = ws_hello(&server, &alice, &[]).await;
    assert_eq!(ok["type"], "hello.ok");

    let res = api.post(Some(&alice), &format!("/v1/messages/{id}/read"), json!({})).await;
    assert_eq!(error_code(res).await, (StatusCode::NOT_FOUND, "MESSAGE_NOT_FOUND".into()));

    let res = api.post(Some(&bob), &format!("/v1/messages/{id}/read"), json!({})).await;
    assert_eq!(res.status(), StatusCode::OK);
    let read: Value = res.json().await.expect("json");
    assert_eq!(read["status"], "read");
    assert!(read["read_at"].is_string());

    let event = next_json(&mut alice_ws).await.expect("read event");
    assert_eq!(event["type"], "message.read");
    assert_eq!(event["payload"]["message_id"], msg["id"]);
    assert_eq!(event["payload"]["read_by"], "bob");
    server.shutdown().await;
}

#[tokio::test]
async fn hidden_messages_leave_only_the_callers_history() {
    let server = start_default().await;
    let api = Api::new(&server);
    let (alice, bob) = pair(&server, &api, "alice", "bob").await;
    let msg = api.send_ok(&alice, "bob", "m3", "oops").await;
    let (id, conv) =
        (msg["id"].as_str().expect("id"), msg["conversation_id"].as_str().expect("conv"));

    let res = api
        .http
        .delete(format!("{}/v1/messages/{id}", api.base))
        .bearer_auth(&bob)
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), StatusCode::OK);
    let bob_view: Value =
        api.get(Some(&bob), &format!("/v1/messages/{conv}")).await.json().await.expect("json");
    let alice_view: Value =
        api.get(Some(&alice), &format!("/v1/messages/{conv}")).await.json().await.expect("json");
    assert_eq!(bob_view.as_array().map(Vec::len), Some(2));
    assert_eq!(alice_view.as_array().map(Vec::len), Some(3));
    server.shutdown().await;
}

#[tokio::test]
async fn conversation_list_shows_the_counterparty_and_last_message() {
    let server = start_default().await;
    let api = Api::new(&server);
    let (alice, _bob) = pair(&server, &api, "alice", "bob").await;
    server.seed_agent("carol").await.expect("seed");
    api.send_ok(&alice, "carol", "c1", "newest thread").await;

    let list: Value = api.get(Some(&alice), "/v1/conversations").await.json().await.expect("json");
    let list = list.as_array().expect("bare array");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["participants"][0]["handle"], "carol");
    assert_eq!(list[0]["last_message_preview"], "newest thread");
    assert_eq!(list[0]["last_message_is_own"], true);
    assert_eq!(list[1]["participants"][0]["handle"], "bob");
    assert_eq!(list[1]["last_message_is_own"], false);
    server.shutdown().await;
}

// === WebSocket ===

#[tokio::test]
async fn ws_sends_hello_ok_first_then_drains_stored_messages() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    let stored = api.send_ok(&alice, "bob", "m1", "while you were away").await;

    let (mut ws, first) = ws_hello(&server, &bob, &[]).await;
    assert_eq!(first, json!({ "type": "hello.ok" }));
    let drained = next_json(&mut ws).await.expect("drained frame");
    assert_eq!(drained["type"], "message.new");
    assert_eq!(drained["payload"]["id"], stored["id"]);
    assert_eq!(drained["payload"]["status"], "stored");
    assert!(drained["payload"]["delivery_id"].is_string());

    // Legacy mode: written means delivered, so sync empties.
    assert_eq!(wait_for_sync_len(&api, &bob, 0).await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn ws_pushes_live_messages_to_every_recipient_socket_only() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    let (mut bob_ws1, _) = ws_hello(&server, &bob, &[]).await;
    let (mut bob_ws2, _) = ws_hello(&server, &bob, &[]).await;
    let (mut alice_ws, _) = ws_hello(&server, &alice, &[]).await;

    let sent = api.send_ok(&alice, "bob", "live-1", "now").await;
    for ws in [&mut bob_ws1, &mut bob_ws2] {
        let frame = next_json(ws).await.expect("live frame");
        assert_eq!(frame["type"], "message.new");
        assert_eq!(frame["payload"], sent);
    }
    // A replay is not pushed again, and the sender's socket gets nothing.
    assert_eq!(api.send(&alice, "bob", "live-1", "now").await.status(), StatusCode::OK);
    assert!(next_json_within(&mut bob_ws1, Duration::from_millis(300)).await.is_none());
    assert!(next_json_within(&mut alice_ws, Duration::from_millis(300)).await.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn ws_authenticates_with_an_upgrade_header_without_hello_ok() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    api.send_ok(&alice, "bob", "m1", "x").await;

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req =
        format!("ws://{}/v1/ws", server.local_addr()).into_client_request().expect("request");
    req.headers_mut().insert("authorization", format!("Bearer {bob}").parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("connects");
    let first = next_json(&mut ws).await.expect("frame");
    assert_eq!(first["type"], "message.new");

    let mut req =
        format!("ws://{}/v1/ws", server.local_addr()).into_client_request().expect("request");
    req.headers_mut().insert("authorization", "Bearer ac_wrong".parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("connects");
    assert_eq!(close_frame(&mut ws).await, Some((1008, "Invalid token".into())));
    server.shutdown().await;
}

#[tokio::test]
async fn ws_closes_1008_on_bad_key_wrong_first_frame_and_missing_hello() {
    let config =
        ServerConfig { hello_timeout: Duration::from_millis(200), ..ServerConfig::default() };
    let server = start(config).await;

    let mut ws = ws_connect(&server).await;
    let hello = json!({ "type": "hello", "api_key": "ac_bad" });
    ws.send(Message::Text(hello.to_string().into())).await.expect("sent");
    assert_eq!(close_frame(&mut ws).await, Some((1008, "Invalid token".into())));

    let mut ws = ws_connect(&server).await;
    ws.send(Message::Text(r#"{"type":"ack"}"#.into())).await.expect("sent");
    assert_eq!(close_frame(&mut ws).await, Some((1008, "HELLO frame required first".into())));

    let mut ws = ws_connect(&server).await;
    assert_eq!(close_frame(&mut ws).await, Some((1008, "HELLO frame required".into())));
    server.shutdown().await;
}

#[tokio::test]
async fn ws_ack_mode_keeps_envelopes_stored_until_acked() {
    let server = start_default().await;
    let api = Api::new(&server);
    let alice = server.seed_agent("alice").await.expect("seed");
    let bob = server.seed_agent("bob").await.expect("seed");
    let msg = api.send_ok(&alice, "bob", "m1", "ack me").await;

    let (mut ws, ok) = ws_hello(&server, &bob, &["ack"]).await;
    assert_eq!(ok, json!({ "type": "hello.ok", "capabilities": ["ack"] }));
    let frame = next_json(&mut ws).await.expect("drained");
    assert_eq!(frame["payload"]["id"], msg["id"]);
    // Leave without acking: the envelope stays stored and the next connection gets it again.
    ws.close(None).await.expect("closed");
    assert_eq!(api.sync(&bob, "").await.len(), 1);

    let (mut ws, _) = ws_hello(&server, &bob, &["ack"]).await;
    let frame = next_json(&mut ws).await.expect("redelivered");
    assert_eq!(frame["payload"]["id"], msg["id"]);
    // The server answers a client close, completing the handshake.
    ws.close(None).await.expect("close sent");
    let reply = tokio::time::timeout(WAIT, ws.next()).await.expect("reply in time");
    assert!(matches!(reply, Some(Ok(Message::Close(_)))), "{reply:?}");

    let (mut ws, _) = ws_hello(&server, &bob, &["ack"]).await;
    let frame = next_json(&mut ws).await.expect("redelivered again");
    assert_eq!(frame["payload"]["id"], msg["id"]);
    assert_eq!(api.sync(&bob, "").await.len(), 1);

    let ack = json!({ "type": "ack", "message_id": msg["id"] });
    ws.send(Message::Text(ack.to_string().into())).await.expect("ack sent");
    assert_eq!(wait_for_sync_len(&api, &bob, 0).await, 0);
    server.shutdown().await;
}

/// A deliberately minimal WebSocket client over a raw TCP stream. It never answers pings,
/// which is exactly what a heartbeat test needs (tokio-tungstenite answers them, and when the
/// server has already gone it fails on writing the pong before showing the close frame).
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    async fn connect(addr: SocketAddr) -> RawWs {
        use tokio::io::AsyncWriteExt;
        let mut tcp = TcpStream::connect(addr).await.expect("tcp connects");
        let request = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.expect("upgrade sent");
        let mut raw = RawWs { tcp, buf: Vec::new() };
        let head_end = loop {
            if let Some(pos) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            assert!(raw.fill().await, "connection closed during the handshake");
        };
        assert!(raw.buf.starts_with(b"HTTP/1.1 101"), "upgrade refused");
        raw.buf.drain(..head_end);
        raw
    }

    /// Reads more bytes into the buffer; false on EOF, error or after [`WAIT`].
    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, self.tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// Sends one masked text frame (with an all-zero mask, which leaves the payload as is).
    async fn send_text(&mut self, text: &str) {
        use tokio::io::AsyncWriteExt;
        let len = u16::try_from(text.len()).expect("short frame");
        let mut frame = vec![0x81, 0x80 | 126];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(text.as_bytes());
        self.tcp.write_all(&frame).await.expect("frame sent");
    }

    /// Next complete frame as (opcode, payload); `None` when the stream ends first.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, start, len)) = self.frame_header()
                && self.buf.len() >= start + len
            {
                let payload = self.buf[start..start + len].to_vec();
                self.buf.drain(..start + len);
                return Some((opcode, payload));
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Parses an unmasked server frame header: (opcode, payload start, payload length).
    fn frame_header(&self) -> Option<(u8, usize, usize)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        match b[1] & 0x7f {
            126 if b.len() >= 4 => Some((opcode, 4, usize::from(u16::from_be_bytes([b[2], b[3]])))),
            127 if b.len() >= 10 => {
                let len = u64::from_be_bytes(b[2..10].try_into().ok()?);
                Some((opcode, 10, usize::try_from(len).ok()?))
            }
            126 | 127 => None,
            n => Some((opcode, 2, usize::from(n))),
        }
    }
}

#[tokio::test]
async fn ws_closes_1001_when_pings_go_unanswered() {
    let config = ServerConfig {
        ping_interval: Duration::from_millis(50),
        pong_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let bob = server.seed_agent("bob").await.expect("seed");

    let mut ws = RawWs::connect(server.local_addr()).await;
    ws.send_text(&json!({ "type": "hello", "api_key": bob }).to_string()).await;
    let mut pings = 0;
    let mut hello_ok = false;
    let mut close = None;
    for _ in 0..100 {
        match ws.next_frame().await {
            Some((0x1, payload)) => hello_ok |= payload.starts_with(br#"{"type":"hello.ok""#),
            Some((0x9, _)) => pings += 1,
            Some((0x8, payload)) => {
                close = Some(payload);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(hello_ok);
    assert!(pings >= 1);
    let close = close.expect("server sent a close frame");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1001);
    assert_eq!(&close[2..], b"Heartbeat timeout");
    server.shutdown().await;
}

#[tokio::test]
async fn ws_stays_open_while_the_client_answers_pings() {
    let config = ServerConfig {
        ping_interval: Duration::from_millis(30),
        pong_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let bob = server.seed_agent("bob").await.expect("seed");
    let (mut ws, _) = ws_hello(&server, &bob, &[]).await;

    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match msg.expect("frame") {
            Message::Ping(_) => pings += 1,
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
    assert!(pings >= 2, "saw {pings} pings");
    server.shutdown().await;
}

#[tokio::test]
async fn test_hook_and_shutdown_close_sockets_with_their_codes() {
    let server = start_default().await;
    let bob = server.seed_agent("bob").await.expect("seed");
    let (mut ws1, _) = ws_hello(&server, &bob, &[]).await;
    let (mut ws2, _) = ws_hello(&server, &bob, &[]).await;

    assert_eq!(server.drop_sockets("bob", 4000).await, 2);
    for ws in [&mut ws1, &mut ws2] {
        let (code, _) = close_frame(ws).await.expect("close frame");
        assert_eq!(code, 4000);
    }
    assert_eq!(server.drop_sockets("nobody", 4000).await, 0);

    let (mut ws3, _) = ws_hello(&server, &bob, &[]).await;
    // A socket still owing its HELLO is closed the same way.
    let mut ws4 = ws_connect(&server).await;
    let shutdown = tokio::spawn(server.shutdown());
    for ws in [&mut ws3, &mut ws4] {
        let (code, _) = close_frame(ws).await.expect("close frame");
        assert_eq!(CloseCode::from(code), CloseCode::Away);
    }
    tokio::time::timeout(WAIT, shutdown).await.expect("shutdown finishes").expect("joined");
}

#[tokio::test]
async fn dev_server_runs_until_cancelled_and_checks_its_code() {
    use agentchatd::server::{DevServerArgs, run_dev_server};
    use tokio_util::sync::CancellationToken;

    let args = DevServerArgs {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        db: None,
        verification_code: "424242".into(),
        ping_interval_secs: 30,
        pong_timeout_secs: 10,
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(run_dev_server(args.clone(), token.clone()));
    token.cancel();
    let outcome = tokio::time::timeout(WAIT, task).await.expect("stops in time");
    assert!(outcome.expect("joined").is_ok());

    let bad = DevServerArgs { verification_code: "12".into(), ..args };
    assert!(run_dev_server(bad, CancellationToken::new()).await.is_err());
}

// === Persistence ===

#[tokio::test]
async fn data_survives_a_restart_on_the_same_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        ServerConfig { db_path: Some(dir.path().join("server.db")), ..ServerConfig::default() };

    let server = start(config.clone()).await;
    let api = Api::new(&server);
    let alice = api.register_and_verify("alice").await;
    let bob = server.seed_agent("bob").await.expect("seed");
    let sent = api.send_ok(&alice, "bob", "before-restart", "persist me").await;
    server.shutdown().await;

    let server = start(config).await;
    let api = Api::new(&server);
    assert_eq!(api.get(Some(&alice), "/v1/agents/me").await.status(), StatusCode::OK);
    let rows = api.sync(&bob, "").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], sent["id"]);
    // The replay key survives too, and seq continues.
    assert_eq!(api.send(&alice, "bob", "before-restart", "again").await.status(), StatusCode::OK);
    let reply = api.send_ok(&bob, "alice", "after-restart", "hi").await;
    assert_eq!(reply["seq"], 2);
    server.shutdown().await;
}

// === Official SDK ===

/// Runs `tests/sdk/smoke_server.py` with the Python named by `AGENTCHATD_TEST_PYTHON` (an
/// interpreter with `agentchatme` installed, which scripts/test prepares).
#[tokio::test]
async fn official_python_sdk_smoke_script_passes() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/smoke_server.py");
    let python = std::env::var("AGENTCHATD_TEST_PYTHON").expect(
        "AGENTCHATD_TEST_PYTHON must name a Python with agentchatme installed; run scripts/test",
    );
    let server = start_default().await;
    let mut child = tokio::process::Command::new(python)
        .arg(&script)
        .arg(server.base_url())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("script finishes within 60 s")
        .expect("script exit status");
    assert!(status.success(), "smoke script failed: {status}");
    server.shutdown().await;
}
