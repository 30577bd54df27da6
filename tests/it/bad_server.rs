//! A misbehaving server: garbage frames, malformed JSON and rows that do not follow the
//! protocol. The daemon must keep serving, answer the good messages, acknowledge what it
//! handled and quarantine (not drop) what it could not read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentchatd::config::Transport;
use agentchatd::store::Store;
use axum::extract::State;
use axum::extract::ws::{Message as Frame, WebSocket, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::harness::{Daemon, daemon_config, plugin};
use crate::support::echo_plugin_path;

#[derive(Clone, Default)]
struct Seen {
    acks: Arc<Mutex<Vec<String>>>,
    sends: Arc<Mutex<Vec<Value>>>,
    sync_calls: Arc<Mutex<u32>>,
}

fn good_message(id: &str, delivery_id: Option<&str>) -> Value {
    let mut message = json!({
        "id": id, "conversation_id": "conv_fake", "sender": "alice", "client_msg_id": "c1",
        "seq": 1, "type": "text", "content": {"text": "hi"}, "metadata": {},
        "created_at": "2026-12-04T10:00:00.000Z"
    });
    if let Some(delivery_id) = delivery_id {
        message["delivery_id"] = json!(delivery_id);
        message["status"] = json!("stored");
    }
    message
}

async fn me() -> Json<Value> {
    Json(json!({"handle": "echo-agent", "status": "active"}))
}

async fn send(State(seen): State<Seen>, Json(body): Json<Value>) -> impl IntoResponse {
    seen.sends.lock().expect("lock").push(body.clone());
    let reply = json!({
        "id": "msg_reply", "conversation_id": "conv_fake", "sender": "echo-agent",
        "client_msg_id": body["client_msg_id"], "seq": 2, "type": "text",
        "content": body["content"], "metadata": {}, "created_at": "2026-12-04T10:00:01.000Z"
    });
    (axum::http::StatusCode::CREATED, Json(reply))
}

async fn ws(State(seen): State<Seen>, upgrade: WebSocketUpgrade) -> impl IntoResponse {
    upgrade.on_upgrade(move |socket| serve_garbage(socket, seen))
}

async fn serve_garbage(mut socket: WebSocket, seen: Seen) {
    let Some(Ok(Frame::Text(_hello))) = socket.recv().await else {
        return;
    };
    let frames = [
        json!({"type": "hello.ok", "capabilities": ["ack"]}).to_string(),
        "not json at all".to_owned(),
        json!({"type": "message.new", "payload": {"id": 5}}).to_string(),
        json!({"type": "message.new", "payload": good_message("msg_good", None)}).to_string(),
    ];
    for frame in frames {
        if socket.send(Frame::Text(frame.into())).await.is_err() {
            return;
        }
    }
    let _ = socket.send(Frame::Binary(vec![1, 2, 3].into())).await;
    while let Some(Ok(frame)) = socket.recv().await {
        if let Frame::Text(text) = frame {
            let value: Value = serde_json::from_str(&text).unwrap_or_default();
            if value["type"] == "ack" {
                let id = value["message_id"].as_str().unwrap_or_default().to_owned();
                seen.acks.lock().expect("lock").push(id);
            }
        }
    }
}

async fn sync(State(seen): State<Seen>) -> axum::response::Response {
    let call = {
        let mut calls = seen.sync_calls.lock().expect("lock");
        *calls += 1;
        *calls
    };
    match call {
        1 => "{\"this is\": not json".into_response(),
        2 => Json(json!([
            {"id": 7, "delivery_id": format!("del_{}", "a".repeat(32))},
            good_message("msg_polled", Some(&format!("del_{}", "b".repeat(32)))),
        ]))
        .into_response(),
        _ => Json(json!([])).into_response(),
    }
}

async fn ack(State(seen): State<Seen>, Json(body): Json<Value>) -> Json<Value> {
    let cursor = body["last_delivery_id"].as_str().unwrap_or_default().to_owned();
    seen.acks.lock().expect("lock").push(cursor);
    Json(json!({"acked": 2}))
}

async fn start_fake() -> (String, Seen, tokio::task::JoinHandle<()>) {
    let seen = Seen::default();
    let app = Router::new()
        .route("/v1/agents/me", get(me))
        .route("/v1/messages", post(send))
        .route("/v1/messages/sync", get(sync))
        .route("/v1/messages/sync/ack", post(ack))
        .route("/v1/ws", get(ws))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, seen, task)
}

async fn wait_for(what: &str, check: impl Fn() -> bool) {
    for _ in 0..400 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("waited 10 s for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_websocket_frames_are_quarantined_and_good_messages_answered() {
    let (base, seen, server) = start_fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let plugins = vec![plugin("echo", echo_plugin_path())];
    let config = daemon_config(&base, "ac_fake", dir.path(), Transport::Websocket, plugins);
    let daemon = Daemon::spawn(config.clone());

    wait_for("the ack of the good message", || {
        seen.acks.lock().expect("lock").contains(&"msg_good".to_owned())
    })
    .await;
    wait_for("the reply", || !seen.sends.lock().expect("lock").is_empty()).await;
    let reply = seen.sends.lock().expect("lock")[0].clone();
    assert_eq!(reply["to"], "alice");
    assert_eq!(reply["content"]["text"], "echo: hi");
    assert_eq!(
        seen.acks.lock().expect("lock").as_slice(),
        ["msg_good"],
        "only the good one is acked"
    );
    assert!(!daemon.task.is_finished(), "the daemon keeps serving");
    daemon.stop().await;
    server.abort();

    let store = Store::open(&config.state_dir).expect("store");
    assert_eq!(
        store.quarantined().await.expect("count"),
        3,
        "text, payload and binary garbage kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sync_answers_are_survived_and_bad_rows_quarantined() {
    let (base, seen, server) = start_fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let plugins = vec![plugin("echo", echo_plugin_path())];
    let config = daemon_config(&base, "ac_fake", dir.path(), Transport::Poll, plugins);
    let daemon = Daemon::spawn(config.clone());

    let last = format!("del_{}", "b".repeat(32));
    wait_for("the page ack", || seen.acks.lock().expect("lock").contains(&last)).await;
    wait_for("the reply", || !seen.sends.lock().expect("lock").is_empty()).await;
    assert_eq!(seen.sends.lock().expect("lock")[0]["content"]["text"], "echo: hi");
    assert!(*seen.sync_calls.lock().expect("lock") >= 2, "the unparsable answer was retried");
    daemon.stop().await;
    server.abort();

    let store = Store::open(&config.state_dir).expect("store");
    assert_eq!(store.quarantined().await.expect("count"), 1);
    assert_eq!(store.meta("sync_cursor").await.expect("meta"), Some(last));
}
