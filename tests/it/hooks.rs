//! The lifecycle, outbound and timer hooks with the example plugins (`plugins/guard`,
//! `plugins/digest`, `plugins/rules`) and the `plugins/probe` fixture: first against a bare
//! [`PluginHost`], then in the running daemon against the local server, where every send path
//! must pass the guards and proactive sends must obey the thread rules and the hop limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentchatd::client::{Client, SyncRow};
use agentchatd::config::{ApiKey, PluginConfig, Transport};
use agentchatd::outbox::queue_operator_send;
use agentchatd::plugins::{
    CallError, Capabilities, Content, Decision, Draft, FailurePolicy, HostServices, Manifest,
    Origin, OutboundMessage, PluginHost, PluginSetup, PluginSpec, PluginState, SendVerdict, Sent,
    StartReason, Trigger,
};
use agentchatd::store::{SendRow, Store};
use serde_json::json;
use tokio::sync::Notify;

use crate::harness::{AGENT, Daemon, PEER, World, plugin};
use crate::support::{echo_plugin_path, repo_root, text_message};

// === helpers ===

/// The component of example plugin `name`; building the guest workspace for echo builds them
/// all.
fn wasm(name: &str) -> PathBuf {
    echo_plugin_path().with_file_name(format!("{name}.wasm"))
}

/// The manifest of example plugin `name`, renamed to `id` so one plugin can run twice.
fn manifest(name: &str, id: &str) -> Manifest {
    let path = repo_root().join(format!("plugins/{name}/agentchat-plugin.toml"));
    let mut manifest = Manifest::load(&path).expect("the example manifest is valid");
    manifest.id = id.to_string();
    manifest
}

/// Plugin `name` loaded as `id` with `config`, checked against its manifest.
fn setup(name: &str, id: &str, config: serde_json::Value) -> PluginSetup {
    PluginSpec::new(id, wasm(name))
        .with_manifest(manifest(name, id))
        .with_config(config.to_string())
}

fn grant(kv: bool, send: bool, timers: bool) -> Capabilities {
    Capabilities { kv, send, timers, ..Capabilities::default() }
}

async fn load(setups: Vec<PluginSetup>, services: HostServices) -> PluginHost {
    match PluginHost::load_with(setups, None, services).await {
        Ok(host) => host,
        Err(err) => panic!("load failed: {err}"),
    }
}

/// Services with a state store in `dir` and an outbox wake-up nobody listens to.
fn services(store: &Store) -> HostServices {
    HostServices {
        store: Some(store.clone()),
        api: None,
        outbox_wake: Some(Arc::new(Notify::new())),
        ..HostServices::default()
    }
}

fn outbound(text: &str) -> OutboundMessage {
    OutboundMessage {
        key: "key-1".to_string(),
        to: Some("alice".to_string()),
        conversation_id: None,
        text: Some(text.to_string()),
        data_json: None,
    }
}

fn operator() -> Origin {
    Origin { plugin_id: None, trigger: Trigger::Operator, hops: 0 }
}

fn rewrite(text: &str, by: &[&str]) -> SendVerdict {
    SendVerdict::Rewrite {
        content: Content { text: Some(text.to_string()), data_json: None },
        by: by.iter().map(ToString::to_string).collect(),
    }
}

fn cancel(plugin_id: &str, reason: &str) -> SendVerdict {
    SendVerdict::Cancel { plugin_id: plugin_id.to_string(), reason: reason.to_string() }
}

async fn kv_text(store: &Store, plugin: &str, key: &str) -> Option<String> {
    let now = agentchatd::outbox::now_ms();
    let value = store.kv_get(plugin, key, now).await.expect("kv read");
    value.map(|bytes| String::from_utf8(bytes).expect("utf-8 value"))
}

fn guard_config() -> serde_json::Value {
    json!({
        "block": ["launch code", "secret plan"],
        "redact": ["falcon"],
        "redact-patterns": ["email", "api-key"],
    })
}

// === the host ===

#[tokio::test]
async fn guard_rewrites_cancels_or_keeps_each_message() {
    let host = load(vec![setup("guard", "guard", guard_config())], HostServices::default()).await;

    let message = outbound("Falcon lands; mail ops@example.com");
    let verdict = host.before_send(&message, &operator()).await;
    assert_eq!(verdict, rewrite("[redacted] lands; mail [redacted]", &["guard"]));

    let verdict = host.before_send(&outbound("the Secret Plan is ready"), &operator()).await;
    assert_eq!(verdict, cancel("guard", "matched block rule 1"), "the reason names the rule only");

    let verdict = host.before_send(&outbound("nothing to see"), &operator()).await;
    assert_eq!(verdict, SendVerdict::Keep);
}

#[tokio::test]
async fn a_second_guard_sees_the_rewrite_of_the_first() {
    let first = || setup("guard", "guard-a", json!({"redact": ["alpha"], "mask": "beta"}));

    let blocker = setup("guard", "guard-b", json!({"block": ["beta"]}));
    let host = load(vec![first(), blocker], HostServices::default()).await;
    let verdict = host.before_send(&outbound("alpha"), &operator()).await;
    assert_eq!(verdict, cancel("guard-b", "matched block rule 0"), "guard-b saw `beta`");

    let second = setup("guard", "guard-b", json!({"redact": ["beta"], "mask": "gamma"}));
    let host = load(vec![first(), second], HostServices::default()).await;
    let verdict = host.before_send(&outbound("alpha and beta"), &operator()).await;
    assert_eq!(verdict, rewrite("gamma and gamma", &["guard-a", "guard-b"]));
}

#[tokio::test]
async fn a_trapping_guard_cancels_when_it_fails_closed_and_is_skipped_when_open() {
    let trapping = |policy| {
        setup("probe", "probe", json!({"before-send": "trap"}))
            .with_grants(grant(false, true, false))
            .with_failure_policy(policy)
    };
    let redactor = || setup("guard", "guard", json!({"redact": ["falcon"]}));

    let host = load(vec![trapping(FailurePolicy::Closed), redactor()], HostServices::default());
    match host.await.before_send(&outbound("falcon"), &operator()).await {
        SendVerdict::Cancel { plugin_id, reason } => {
            assert_eq!(plugin_id, "probe");
            assert!(reason.contains("fails closed") && reason.contains("trap"), "{reason}");
        }
        other => panic!("a closed guard that traps must cancel, got {other:?}"),
    }

    let host = load(vec![trapping(FailurePolicy::Open), redactor()], HostServices::default());
    let verdict = host.await.before_send(&outbound("falcon"), &operator()).await;
    assert_eq!(verdict, rewrite("[redacted]", &["guard"]), "later guards still run");
}

#[tokio::test]
async fn a_closed_guard_that_failed_to_start_cancels_every_send() {
    let failing = |policy| {
        let mut setup = setup("probe", "probe", json!({"fail-start": true}))
            .with_grants(grant(false, true, false))
            .with_failure_policy(policy);
        let manifest = setup.manifest.as_mut().expect("manifest");
        manifest.hooks = vec!["lifecycle".to_string(), "outbound".to_string()];
        setup
    };

    let host = load(vec![failing(FailurePolicy::Closed)], HostServices::default()).await;
    assert_eq!(host.start(AGENT, StartReason::Boot).await, ["probe"]);
    assert!(host.guards_sends(), "the outbox must still ask");
    match host.before_send(&outbound("anything"), &operator()).await {
        SendVerdict::Cancel { plugin_id, reason } => {
            assert_eq!(plugin_id, "probe");
            assert!(reason.contains("start failed") && reason.contains("fails closed"), "{reason}");
        }
        other => panic!("a closed guard that is not running must cancel, got {other:?}"),
    }

    let host = load(vec![failing(FailurePolicy::Open)], HostServices::default()).await;
    assert_eq!(host.start(AGENT, StartReason::Boot).await, ["probe"]);
    assert!(!host.guards_sends(), "an open guard that is not running is skipped");
    assert_eq!(host.before_send(&outbound("anything"), &operator()).await, SendVerdict::Keep);
}

#[tokio::test]
async fn digest_without_a_notify_handle_fails_to_start_and_is_never_called() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let grants = grant(true, true, true);
    let broken = setup("digest", "digest", json!({})).with_grants(grants.clone());
    let host = load(vec![broken], services(&store)).await;

    assert_eq!(host.start(AGENT, StartReason::Boot).await, ["digest"]);
    match &host.status()[0].state {
        PluginState::Failed { reason } => assert!(reason.contains("notify"), "{reason}"),
        other => panic!("expected a failed plugin, got {other:?}"),
    }
    assert!(host.on_message(&text_message("hi")).await.is_empty(), "its hooks do not run");
    assert!(host.timers().is_empty(), "nor do its timers");
    assert_eq!(kv_text(&store, "digest", "count:alice").await, None);

    let fine = setup("digest", "digest", json!({"notify": "ops-desk"})).with_grants(grants);
    let host = load(vec![fine], services(&store)).await;
    assert!(host.start(AGENT, StartReason::Boot).await.is_empty());
    assert_eq!(host.status()[0].state, PluginState::Active);
    assert_eq!(host.timers().len(), 1);
}

#[tokio::test]
async fn kv_state_outlives_the_host_that_wrote_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let digest = || {
        setup("digest", "digest", json!({"notify": "ops-desk"}))
            .with_grants(grant(true, true, true))
    };
    let guard = || setup("guard", "guard", json!({})).with_grants(grant(true, false, false));

    let first = load(vec![digest(), guard()], services(&store)).await;
    let verdicts = first.on_message(&text_message("one")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Pass), "digest only counts");
    first.on_message(&text_message("two")).await;
    let sent = Sent { message: outbound("x"), message_id: "m1".to_string(), sent_at_ms: 1 };
    first.after_send(&sent, &operator()).await;
    drop(first);

    let second = load(vec![digest(), guard()], services(&store)).await;
    second.on_message(&text_message("three")).await;
    second.after_send(&sent, &operator()).await;
    assert_eq!(kv_text(&store, "digest", "count:alice").await.as_deref(), Some("3"));
    assert_eq!(kv_text(&store, "guard", "sent").await.as_deref(), Some("2"));
    assert_eq!(kv_text(&store, "digest", "sent").await, None, "namespaces are per plugin");
}

#[tokio::test]
async fn the_rules_budget_is_counted_per_sender_across_calls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let config = json!({
        "rules": [{"keyword": "price", "reply": "See the list."}],
        "per-peer-budget": {"replies": 2, "window-secs": 3600},
    });
    let rules = setup("rules", "rules", config.clone()).with_grants(grant(true, false, false));
    let host = load(vec![rules], services(&store)).await;
    let reply = Ok(Decision::Reply(vec![Draft {
        conversation_id: None,
        text: Some("See the list.".to_string()),
        data_json: None,
    }]));

    let from = |sender: &str| {
        let mut msg = text_message("price?");
        msg.sender = sender.to_string();
        msg
    };
    for round in 0..2 {
        assert_eq!(host.on_message(&from("alice")).await[0].result, reply, "round {round}");
    }
    assert_eq!(host.on_message(&from("alice")).await[0].result, Ok(Decision::Pass));
    assert_eq!(host.on_message(&from("alice")).await[0].result, Ok(Decision::Pass));
    assert_eq!(host.on_message(&from("bob")).await[0].result, reply, "bob has his own budget");
    assert_eq!(kv_text(&store, "rules", "budget:alice").await.as_deref(), Some("2"));

    // Without the kv grant the budget cannot be kept, and the plugin says so.
    let ungranted = setup("rules", "rules", config);
    let host = load(vec![ungranted], services(&store)).await;
    match &host.on_message(&from("carol")).await[0].result {
        Err(CallError::PluginError(why)) => assert!(why.contains("kv"), "{why}"),
        other => panic!("expected the plugin to report the missing grant, got {other:?}"),
    }
}

#[tokio::test]
async fn sends_made_in_reaction_to_sends_stop_at_the_hop_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let probe = setup("probe", "probe", json!({"resend-to": "alice"}))
        .with_grants(grant(false, true, false));
    let host = load(vec![probe], services(&store)).await;
    let sent = Sent { message: outbound("x"), message_id: "m1".to_string(), sent_at_ms: 1 };

    let mut origins = Vec::new();
    for hops in 0..=agentchatd::plugins::MAX_HOPS {
        let origin = Origin { plugin_id: Some("probe".into()), trigger: Trigger::PluginSend, hops };
        let mut sent = sent.clone();
        sent.message.key = format!("key-{hops}");
        host.after_send(&sent, &origin).await;
        let rows = store.list_sends(None, 10).await.expect("list");
        origins = rows.iter().rev().map(|row| row.origin.clone()).collect();
    }
    let hops: Vec<&str> = origins.iter().map(|o| o.split(':').nth(2).unwrap_or("?")).collect();
    assert_eq!(hops, ["1", "2"], "a send at hop 2 may not cause another: {origins:?}");
}

// === the daemon ===

/// A config entry for example plugin `name`, loaded through its manifest at `manifest`.
fn entry(name: &str, manifest: Manifest, config: serde_json::Value) -> PluginConfig {
    let mut entry = plugin(name, wasm(name));
    entry.manifest = Some(manifest);
    entry.config_json = config.to_string();
    entry
}

/// The guard as a DLP gate: fails closed, counts outcomes in kv.
fn guard_entry() -> PluginConfig {
    let mut guard = entry("guard", manifest("guard", "guard"), guard_config());
    guard.failure_policy = FailurePolicy::Closed;
    guard.grants.capabilities = grant(true, false, false);
    guard
}

/// Polls the daemon's queue (bounded: 30 s) until `done` holds for its rows, newest first.
async fn wait_for_queue(
    store: &Store,
    what: &str,
    done: impl Fn(&[SendRow]) -> bool,
) -> Vec<SendRow> {
    for _ in 0..600 {
        let rows = store.list_sends(None, 100).await.expect("list sends");
        if done(&rows) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = store.list_sends(None, 100).await.expect("list sends");
    panic!("waited 30 s for {what}; the queue holds {rows:#?}");
}

/// Polls (bounded: 30 s) until the plugin's kv `key` reads `want`.
async fn wait_for_kv(store: &Store, plugin: &str, key: &str, want: &str) {
    for _ in 0..600 {
        if kv_text(store, plugin, key).await.as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = kv_text(store, plugin, key).await;
    panic!("waited 30 s for {plugin} kv {key} = {want}, it is {got:?}");
}

/// Texts delivered to `client` and not acknowledged, oldest first, from `sender`.
async fn inbox_texts(client: &Client, sender: &str) -> Vec<String> {
    let rows = client.sync(None, 100).await.expect("sync");
    rows.into_iter()
        .filter_map(|row| match row {
            SyncRow::Message(m) if m.sender == sender => m.content.text.clone(),
            _ => None,
        })
        .collect()
}

/// Polls (bounded: 30 s) until `client` has at least `n` texts from the agent.
async fn wait_for_inbox(client: &Client, n: usize) -> Vec<String> {
    for _ in 0..600 {
        let texts = inbox_texts(client, AGENT).await;
        if texts.len() >= n {
            return texts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let texts = inbox_texts(client, AGENT).await;
    panic!("waited 30 s for {n} messages from the agent, got {texts:?}");
}

fn is_settled(row: &SendRow) -> bool {
    row.state != "pending"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_sends_are_blocked_or_redacted_by_a_closed_guard() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![guard_entry()]);
    let store = Store::open(&config.state_dir).expect("store");
    let daemon = Daemon::spawn(config);

    queue_operator_send(&store, PEER, "the launch code is 0000", "op-blocked").await.expect("q");
    queue_operator_send(&store, PEER, "write to ops@example.com", "op-redacted").await.expect("q");
    let rows = wait_for_queue(&store, "both sends to settle", |rows| {
        rows.len() == 2 && rows.iter().all(is_settled)
    })
    .await;

    let blocked = rows.iter().find(|r| r.origin == "operator:op-blocked").expect("blocked row");
    assert_eq!(blocked.state, "dead");
    let error = blocked.last_error.as_deref().unwrap_or_default();
    assert_eq!(error, "cancelled by plugin `guard`: matched block rule 0");

    let redacted = rows.iter().find(|r| r.origin == "operator:op-redacted").expect("sent row");
    assert_eq!(redacted.state, "sent");
    assert_eq!(wait_for_inbox(&world.peer, 1).await, ["write to [redacted]"]);
    assert!(!redacted.request_json.contains("ops@example.com"), "the vetted body is stored");

    // The outcome hooks run on a task of their own, so their counters arrive a little later.
    wait_for_kv(&store, "guard", "sent", "1").await;
    wait_for_kv(&store, "guard", "failed:cancelled", "1").await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_replies_pass_through_the_guard_too() {
    let world = World::start().await;
    let plugins = vec![guard_entry(), plugin("echo", echo_plugin_path())];
    let config = world.config(Transport::Websocket, plugins);
    let store = Store::open(&config.state_dir).expect("store");
    let daemon = Daemon::spawn(config);

    let first = world.peer_says("g1", "my key is sk-0123456789abcdefghij").await;
    let replies = world.wait_for_replies(&first.conversation_id, 1).await;
    assert_eq!(replies[0].content.text.as_deref(), Some("echo: my key is [redacted]"));

    world.peer_says("g2", "here is the secret plan").await;
    wait_for_queue(&store, "the blocked reply to settle", |rows| {
        rows.len() == 2 && rows.iter().all(is_settled)
    })
    .await;
    world.peer_says("g3", "anything else?").await;
    let replies = world.wait_for_replies(&first.conversation_id, 2).await;
    let texts: Vec<_> = replies.iter().filter_map(|m| m.content.text.as_deref()).collect();
    assert_eq!(texts, ["echo: my key is [redacted]", "echo: anything else?"]);

    let rows = store.list_sends(None, 10).await.expect("list");
    let dead: Vec<_> = rows.iter().filter(|r| r.state == "dead").collect();
    assert_eq!(dead.len(), 1, "{rows:#?}");
    assert!(dead[0].origin.starts_with("reply:"), "the echo reply was the one cancelled");
    assert!(dead[0].last_error.as_deref().unwrap_or_default().contains("cancelled by plugin"));
    daemon.stop().await;
}

/// The digest manifest with its timer every second, written into `dir` with the component
/// path made absolute.
fn fast_digest_manifest(dir: &std::path::Path) -> Manifest {
    let original = repo_root().join("plugins/digest/agentchat-plugin.toml");
    let text = std::fs::read_to_string(original).expect("read the digest manifest");
    let component = format!("component = {:?}", wasm("digest").display().to_string());
    let text = text
        .replace("every-ms = 3600000", "every-ms = 1000")
        .lines()
        .map(|line| if line.starts_with("component =") { component.as_str() } else { line })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join("digest-fast.toml");
    std::fs::write(&path, text).expect("write the manifest");
    let manifest = Manifest::load(&path).expect("the fast manifest is valid");
    assert_eq!(manifest.timers[0].period, Duration::from_secs(1));
    manifest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digest_reaches_the_notify_handle_once_per_thread_until_it_answers() {
    let world = World::start().await;
    let ops_key = world.server.seed_agent("ops-desk").await.expect("seed ops");
    let ops = Client::new(&world.server.base_url(), ApiKey::new(ops_key)).expect("client");
    let bob_key = world.server.seed_agent("bob").await.expect("seed bob");
    let bob = Client::new(&world.server.base_url(), ApiKey::new(bob_key)).expect("client");

    let mut digest =
        entry("digest", fast_digest_manifest(world.dir.path()), json!({"notify": "ops-desk"}));
    digest.grants.capabilities = grant(true, true, true);
    let config = world.config(Transport::Websocket, vec![digest]);
    let store = Store::open(&config.state_dir).expect("store");
    let daemon = Daemon::spawn(config);

    // One message from alice: counted, then reported by the next tick.
    world.peer_says("d1", "hello").await;
    let texts = wait_for_inbox(&ops, 1).await;
    assert_eq!(texts, ["Digest: 1 message from 1 sender since the last digest\n@alice: 1"]);
    let rows = store.list_sends(None, 10).await.expect("list");
    assert!(rows[0].origin.starts_with("plugin:timer:1:digest:tick:digest:"), "{rows:#?}");

    // The digest opened a thread with ops-desk, who has not answered: the next digest waits.
    let message = agentchatd::client::SendRequest {
        to: Some(AGENT.into()),
        conversation_id: None,
        client_msg_id: "b1".into(),
        kind: "text".into(),
        content: agentchatd::client::Content { text: Some("hi".into()), ..Default::default() },
    };
    bob.send_message(&message).await.expect("bob writes");
    let rows = wait_for_queue(&store, "the second digest to be held", |rows| {
        rows.len() == 2 && rows[0].hold.as_deref() == Some("awaiting_reply")
    })
    .await;
    assert_eq!(rows[0].state, "pending");
    assert_eq!(inbox_texts(&ops, AGENT).await.len(), 1, "no second message into a cold thread");

    // ops-desk answers: the held digest goes out.
    let answer = agentchatd::client::SendRequest { client_msg_id: "o1".into(), ..message };
    ops.send_message(&answer).await.expect("ops answers");
    let texts = wait_for_inbox(&ops, 2).await;
    assert_eq!(texts[1], "Digest: 1 message from 1 sender since the last digest\n@bob: 1");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_sends_after_every_send_stops_at_the_hop_limit() {
    let world = World::start().await;
    let mut probe = entry("probe", manifest("probe", "probe"), json!({"resend-to": PEER}));
    probe.grants.capabilities = grant(false, true, false);
    let config = world.config(Transport::Websocket, vec![probe]);
    let store = Store::open(&config.state_dir).expect("store");
    let daemon = Daemon::spawn(config);

    // alice writes first, so the thread is established and every send may go.
    world.peer_says("p1", "hi").await;
    for _ in 0..600 {
        if store.peer_state(PEER).await.expect("peer state").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    queue_operator_send(&store, PEER, "kick", "kick").await.expect("queue");

    // The operator's send (hop 0) causes one at hop 1, which causes one at hop 2; the send
    // at hop 2 may cause none. Wait until three are sent, then watch the queue stay still.
    let three_sent = |rows: &[SendRow]| rows.len() >= 3 && rows.iter().all(|r| r.state == "sent");
    wait_for_queue(&store, "three sends", three_sent).await;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rows = store.list_sends(None, 100).await.expect("list");
        assert_eq!(rows.len(), 3, "a fourth send was queued: {rows:#?}");
    }
    daemon.stop().await;

    let rows = store.list_sends(None, 100).await.expect("list");
    let origins: Vec<&str> = rows.iter().rev().map(|r| r.origin.as_str()).collect();
    assert_eq!(origins[0], "operator:kick");
    assert!(origins[1].starts_with("plugin:plugin-send:1:probe:"), "{origins:?}");
    assert!(origins[2].starts_with("plugin:plugin-send:2:probe:"), "{origins:?}");
    let texts = wait_for_inbox(&world.peer, 3).await;
    assert_eq!(
        texts,
        ["kick", "probe: after a send at hop 0", "probe: after a send at hop 1"],
        "exactly the sends the hop rule allows"
    );
}
