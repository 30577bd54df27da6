//! The llm example plugin against a loopback completions server: what it sends, what it
//! replies, how each failure comes back (a plugin error, never a trap), how the host's grant
//! stops a redirect, and a full exchange through the daemon with conversation history.

use std::time::Duration;

use agentchatd::config::{PluginConfig, Transport};
use agentchatd::plugins::{
    CallError, Capabilities, Decision, Draft, Grants, HostServices, HttpBearer, MAX_TEXT_BYTES,
    Manifest, PluginError, PluginHost, PluginSetup, PluginSpec, PluginState,
};
use serde_json::{Value, json};

use crate::completions::{CompletionsServer, Mode};
use crate::harness::{Daemon, PEER, World};
use crate::support::{echo_plugin_path, repo_root, structured_message, text_message};

/// The hook budget the manifest declares; the operator must allow at least this much.
const HOOK_BUDGET: Duration = Duration::from_secs(30);

fn llm_wasm() -> std::path::PathBuf {
    // Building the guest workspace for echo builds every example plugin.
    echo_plugin_path().with_file_name("llm.wasm")
}

fn llm_manifest() -> Manifest {
    Manifest::load(&repo_root().join("plugins/llm/agentchat-plugin.toml"))
        .expect("the llm manifest is valid")
}

/// The llm plugin with `config`, granted HTTP to `hosts` only.
fn llm_setup(config: &Value, hosts: &[String]) -> PluginSetup {
    let spec = PluginSpec { timeout: HOOK_BUDGET, ..PluginSpec::new("llm", llm_wasm()) };
    let granted = Capabilities { http_allowed_hosts: hosts.to_vec(), ..Capabilities::default() };
    spec.with_manifest(llm_manifest()).with_config(config.to_string()).with_grants(granted)
}

async fn load(setups: Vec<PluginSetup>) -> PluginHost {
    match PluginHost::load_with(setups, None, HostServices::default()).await {
        Ok(host) => host,
        Err(err) => panic!("load failed: {err}"),
    }
}

fn text_draft(text: &str) -> Draft {
    Draft { conversation_id: None, text: Some(text.to_string()), data_json: None }
}

#[tokio::test]
async fn the_request_carries_model_prompt_settings_and_text_and_the_answer_is_the_reply() {
    let server = CompletionsServer::start().await;
    let config = json!({
        "endpoint": server.endpoint(),
        "model": "test-model",
        "system_prompt": "Answer briefly.",
        "api_key": "sk-test-123",
        "max_tokens": 64,
        "temperature": 0.5,
    });
    let host = load(vec![llm_setup(&config, &[server.grant()])]).await;

    let verdicts = host.on_message(&text_message("what is the time?")).await;
    assert_eq!(verdicts.len(), 1);
    let expected = Decision::Reply(vec![text_draft("model says: what is the time?")]);
    assert_eq!(verdicts[0].result, Ok(expected));

    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = &requests[0];
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/v1/chat/completions"));
    assert_eq!(request.authorization.as_deref(), Some("Bearer sk-test-123"));
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    // Without the history grant only the message being answered is sent.
    assert_eq!(
        request.body,
        json!({
            "model": "test-model",
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "what is the time?"},
            ],
            "max_tokens": 64,
            "temperature": 0.5,
        })
    );

    // Messages without text pass and never reach the endpoint.
    let verdicts = host.on_message(&structured_message(r#"{"kind":"ping"}"#)).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Pass));
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn without_key_or_prompt_only_the_user_message_is_sent_unauthenticated() {
    let server = CompletionsServer::start().await;
    // A trailing slash on the endpoint does not double the path separator.
    let config = json!({"endpoint": format!("{}/", server.endpoint()), "model": "m"});
    let host = load(vec![llm_setup(&config, &[server.grant()])]).await;

    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Reply(vec![text_draft("model says: hi")])));
    let requests = server.requests();
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(requests[0].authorization, None);
    assert_eq!(
        requests[0].body,
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    );
}

/// Runs one message against a server in `mode` and returns the plugin's error text, checking
/// that the failure is the plugin's own report (not a trap), that no reply came of it, that a
/// later plugin still answers and that the breaker did not count it.
async fn plugin_error_in(mode: Mode, timeout_ms: u32) -> String {
    let server = CompletionsServer::start().await;
    server.set_mode(mode.clone());
    let config = json!({
        "endpoint": server.endpoint(),
        "model": "m",
        "api_key": "sk-secret-key",
        "timeout_ms": timeout_ms,
    });
    let echo = PluginSpec::new("echo", echo_plugin_path());
    let host = load(vec![llm_setup(&config, &[server.grant()]), echo.into()]).await;

    let verdicts = host.on_message(&text_message("private words")).await;
    assert_eq!(verdicts.len(), 2, "{mode:?}: the next plugin still runs");
    assert_eq!(verdicts[1].result, Ok(Decision::Reply(vec![text_draft("echo: private words")])));
    let why = match &verdicts[0].result {
        Err(CallError::PluginError(why)) => why.clone(),
        other => panic!("{mode:?}: expected a plugin error, got {other:?}"),
    };
    assert!(!why.contains("private words") && !why.contains("sk-secret"), "{mode:?}: {why}");
    let status = host.status();
    assert_eq!((status[0].total_failures, &status[0].state), (0, &PluginState::Active));
    assert_eq!(server.requests().len(), 1, "{mode:?}: one attempt, no retry");
    why
}

#[tokio::test]
async fn a_server_error_is_reported_as_unavailable() {
    let why = plugin_error_in(Mode::Status(500), 5_000).await;
    assert!(why.starts_with("unavailable: ") && why.contains("HTTP 500"), "{why}");
    assert!(why.contains("`test_failure`"), "the short error code is named: {why}");
}

#[tokio::test]
async fn refused_credentials_are_reported_as_bad_input() {
    let why = plugin_error_in(Mode::Status(401), 5_000).await;
    assert!(why.starts_with("bad-input: ") && why.contains("HTTP 401"), "{why}");
    assert!(why.contains("api_key"), "{why}");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_reported_as_unavailable() {
    let why = plugin_error_in(Mode::Malformed, 5_000).await;
    assert!(why.starts_with("unavailable: ") && why.contains("not JSON"), "{why}");
}

#[tokio::test]
async fn json_without_choices_is_reported_as_unavailable() {
    let why = plugin_error_in(Mode::NoChoices, 5_000).await;
    assert!(why.contains("choices[0].message.content"), "{why}");
}

#[tokio::test]
async fn an_endpoint_slower_than_timeout_ms_is_reported_as_unavailable() {
    let why = plugin_error_in(Mode::Slow(Duration::from_secs(20)), 200).await;
    assert!(why.starts_with("unavailable: ") && why.contains("within 200 ms"), "{why}");
}

#[tokio::test]
async fn a_redirect_to_a_port_that_is_not_granted_is_refused_by_the_host() {
    // The grant names host and port, so another port on the same loopback address is another
    // host as far as the grant goes.
    let elsewhere = CompletionsServer::start().await;
    let redirect = Mode::Redirect(format!("{}/chat/completions", elsewhere.endpoint()));
    let why = plugin_error_in(redirect.clone(), 5_000).await;
    assert!(why.starts_with("bad-input: ") && why.contains("not granted"), "{why}");
    assert!(why.contains(&format!("127.0.0.1:{}", elsewhere.port())), "{why}");
    assert!(elsewhere.requests().is_empty(), "the redirect was not followed");

    // Granting the second server too lets the same redirect through.
    let server = CompletionsServer::start().await;
    server.set_mode(redirect);
    let config = json!({"endpoint": server.endpoint(), "model": "m"});
    let host = load(vec![llm_setup(&config, &[server.grant(), elsewhere.grant()])]).await;
    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Reply(vec![text_draft("model says: hi")])));
    assert_eq!(elsewhere.requests().len(), 1);
}

#[tokio::test]
async fn an_answer_longer_than_a_message_is_cut_at_a_character_boundary() {
    let server = CompletionsServer::start().await;
    // 600 KB of two-byte characters: near the host's 1 MiB cap once quoted as JSON.
    server.set_mode(Mode::Long(300_000));
    let config = json!({"endpoint": server.endpoint(), "model": "m"});
    let host = load(vec![llm_setup(&config, &[server.grant()])]).await;

    let verdicts = host.on_message(&text_message("tell me everything")).await;
    let Ok(Decision::Reply(drafts)) = &verdicts[0].result else {
        panic!("expected a reply, got {:?}", verdicts[0].result)
    };
    let text = drafts[0].text.as_deref().unwrap_or_default();
    // The limit falls inside the last character, which is left out whole.
    let expected = format!("x{}", "é".repeat(MAX_TEXT_BYTES / 2 - 1));
    assert_eq!((text.len(), text), (MAX_TEXT_BYTES - 1, expected.as_str()));
}

#[tokio::test]
async fn the_manifest_needs_a_granted_host_and_a_long_enough_budget() {
    let config = json!({"endpoint": "http://127.0.0.1:9/v1", "model": "m"});

    let err = match PluginHost::load(vec![llm_setup(&config, &[])], None).await {
        Ok(_) => panic!("the plugin loaded without any granted host"),
        Err(err) => err,
    };
    let text = err.to_string();
    assert!(matches!(err, PluginError::NotGranted { .. }), "{text}");
    assert!(text.contains("http-allowed-hosts: at least one host"), "{text}");

    let mut setup = llm_setup(&config, &["127.0.0.1:9".to_string()]);
    setup.spec.timeout = Duration::from_millis(500);
    let err = match PluginHost::load(vec![setup], None).await {
        Ok(_) => panic!("the plugin loaded with a budget below its manifest's"),
        Err(err) => err,
    };
    let text = err.to_string();
    assert!(text.contains("limits.hook-timeout-ms") && text.contains("raise"), "{text}");

    let no_model = json!({"endpoint": "http://127.0.0.1:9/v1"});
    let err =
        match PluginHost::load(vec![llm_setup(&no_model, &["127.0.0.1:9".into()])], None).await {
            Ok(_) => panic!("the plugin loaded without a model"),
            Err(err) => err,
        };
    assert!(matches!(err, PluginError::ConfigSchema { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_answers_with_the_model_and_sends_the_conversation_so_far() {
    let world = World::start().await;
    let server = CompletionsServer::start().await;
    let mut entry = PluginConfig::new("llm", llm_wasm());
    entry.manifest = Some(llm_manifest());
    entry.timeout = HOOK_BUDGET;
    entry.grants = Grants {
        capabilities: Capabilities {
            history: true,
            http_allowed_hosts: vec![server.grant()],
            ..Capabilities::default()
        },
        ..Grants::default()
    };
    entry.config_json = json!({
        "endpoint": server.endpoint(),
        "model": "test-model",
        "system_prompt": "You are a test agent.",
        "history_messages": 10,
    })
    .to_string();
    let daemon = Daemon::spawn(world.config(Transport::Websocket, vec![entry]));

    let conversation = world.open_thread().await;
    world.peer_says("q2", "and how are you?").await;
    let replies = world.wait_for_replies(&conversation, 2).await;
    daemon.stop().await;

    let texts: Vec<_> = replies.iter().filter_map(|m| m.content.text.clone()).collect();
    assert_eq!(texts, ["model says: hello", "model says: and how are you?"]);
    let sent: Vec<Value> =
        server.requests().into_iter().map(|r| r.body["messages"].clone()).collect();
    let system = json!({"role": "system", "content": "You are a test agent."});
    assert_eq!(
        sent,
        [
            json!([system, {"role": "user", "content": "hello"}]),
            json!([
                system,
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "model says: hello"},
                {"role": "user", "content": "and how are you?"},
            ]),
        ],
        "the second request carries the first exchange, the peer ({PEER}) as user"
    );
}

#[tokio::test]
async fn the_host_adds_a_granted_bearer_token_the_plugin_never_sees() {
    let server = CompletionsServer::start().await;
    let elsewhere = CompletionsServer::start().await;
    let config = json!({"endpoint": server.endpoint(), "model": "m"});
    let grants = Grants {
        capabilities: Capabilities {
            http_allowed_hosts: vec![server.grant(), elsewhere.grant()],
            ..Capabilities::default()
        },
        http_bearer: Some(HttpBearer {
            host: server.grant(),
            token: agentchatd::config::ApiKey::new("sk-host-held"),
        }),
        ..Grants::default()
    };
    let setup = llm_setup(&config, &[]).with_all_grants(grants.clone());
    let host = load(vec![setup]).await;
    host.on_message(&text_message("hi")).await;
    assert_eq!(server.requests()[0].authorization.as_deref(), Some("Bearer sk-host-held"));

    // A redirect to another granted host does not carry the token along.
    server.set_mode(Mode::Redirect(format!("{}/chat/completions", elsewhere.endpoint())));
    let verdicts = host.on_message(&text_message("again")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Reply(vec![text_draft("model says: again")])));
    assert_eq!(elsewhere.requests().len(), 1);
    assert_eq!(elsewhere.requests()[0].authorization, None);

    // Requests to a host the token is not for never get it.
    let config = json!({"endpoint": elsewhere.endpoint(), "model": "m"});
    let host = load(vec![llm_setup(&config, &[]).with_all_grants(grants)]).await;
    host.on_message(&text_message("third")).await;
    assert_eq!(elsewhere.requests()[1].authorization, None);
}
