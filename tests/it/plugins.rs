//! Tests of the plugin host (`agentchatd::plugins`) with real guests: the echo plugin built
//! for wasm32-wasip2 and small hand-written WAT components that trap, loop, over-allocate or
//! return fixed decisions.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentchatd::plugins::authoring::{self, SdkSource};
use agentchatd::plugins::{
    BreakerSettings, CallError, Capabilities, Decision, Draft, Manifest, PluginError, PluginHost,
    PluginSetup, PluginSpec, PluginState, Verdict,
};

use crate::support::{
    echo_plugin_path, repo_root, structured_message, text_message, write_wat_guest,
};

/// Loads `specs` without a cache, failing the test on a load error.
async fn load<S: Into<PluginSetup>>(specs: Vec<S>) -> PluginHost {
    match PluginHost::load(specs, None).await {
        Ok(host) => host,
        Err(err) => panic!("load failed: {err}"),
    }
}

fn echo_spec(id: &str) -> PluginSpec {
    PluginSpec::new(id, echo_plugin_path())
}

fn wat_spec(dir: &Path, id: &str, guest: &str) -> PluginSpec {
    PluginSpec::new(id, write_wat_guest(dir, guest))
}

fn text_draft(text: &str) -> Draft {
    Draft { conversation_id: None, text: Some(text.to_string()), data_json: None }
}

/// The verdicts as `(plugin id, result)` pairs, for one-line assertions.
fn summary(verdicts: &[Verdict]) -> Vec<(&str, &Result<Decision, CallError>)> {
    verdicts.iter().map(|v| (v.plugin_id.as_str(), &v.result)).collect()
}

#[tokio::test]
async fn echo_replies_to_text_and_passes_on_structured_messages() {
    let host = load(vec![echo_spec("echo")]).await;
    assert_eq!(host.plugin_ids(), vec!["echo".to_string()]);

    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(
        summary(&verdicts),
        vec![("echo", &Ok(Decision::Reply(vec![text_draft("echo: hi")])))]
    );

    let verdicts = host.on_message(&structured_message(r#"{"kind":"ping"}"#)).await;
    assert_eq!(summary(&verdicts), vec![("echo", &Ok(Decision::Pass))]);
}

#[tokio::test]
async fn the_operator_config_reaches_the_plugin() {
    let spec = PluginSpec { config_json: r#"{"prefix": "re: "}"#.to_string(), ..echo_spec("echo") };
    let host = load(vec![spec]).await;

    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Reply(vec![text_draft("re: hi")])));
}

#[tokio::test]
async fn plugins_run_in_order_and_a_claim_stops_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let specs = vec![
        echo_spec("first"),
        wat_spec(dir.path(), "claimer", "claim"),
        echo_spec("never-called"),
    ];
    let host = load(specs).await;
    assert_eq!(host.plugin_ids(), ["first", "claimer", "never-called"]);

    let verdicts = host.on_message(&text_message("yo")).await;
    assert_eq!(
        summary(&verdicts),
        vec![
            ("first", &Ok(Decision::Reply(vec![text_draft("echo: yo")]))),
            ("claimer", &Ok(Decision::Claim(vec![text_draft("claimed")]))),
        ]
    );
}

#[tokio::test]
async fn a_drop_stops_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let host = load(vec![wat_spec(dir.path(), "dropper", "drop"), echo_spec("echo")]).await;

    let verdicts = host.on_message(&text_message("spam")).await;
    assert_eq!(summary(&verdicts), vec![("dropper", &Ok(Decision::Drop))]);
}

#[tokio::test]
async fn a_trap_counts_as_pass_and_the_next_call_works() {
    let dir = tempfile::tempdir().expect("temp dir");
    let host = load(vec![wat_spec(dir.path(), "trapper", "trap"), echo_spec("echo")]).await;

    // Twice: the second call proves the trap left nothing behind.
    for round in 0..2 {
        let verdicts = host.on_message(&text_message("hi")).await;
        assert_eq!(verdicts.len(), 2, "round {round}: later plugins still run");
        match &verdicts[0].result {
            Err(CallError::Trap(why)) => assert!(why.contains("unreachable"), "{why}"),
            other => panic!("round {round}: expected a trap, got {other:?}"),
        }
        assert_eq!(verdicts[1].result, Ok(Decision::Reply(vec![text_draft("echo: hi")])));
    }
}

#[tokio::test]
async fn an_endless_loop_is_stopped_at_the_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let budget = Duration::from_millis(50);
    let spec = PluginSpec { timeout: budget, ..wat_spec(dir.path(), "spinner", "spin") };
    let host = load(vec![spec, echo_spec("echo")]).await;

    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(verdicts[0].result, Err(CallError::Timeout { budget }));
    assert!(verdicts[1].result.is_ok(), "the next plugin still runs");
}

#[tokio::test]
async fn growing_memory_past_the_limit_is_a_memory_limit_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = PluginSpec { memory_limit_bytes: 2 << 20, ..wat_spec(dir.path(), "hog", "grow") };
    let host = load(vec![spec]).await;

    for _ in 0..2 {
        let verdicts = host.on_message(&text_message("hi")).await;
        assert_eq!(summary(&verdicts), vec![("hog", &Err(CallError::MemoryLimit))]);
    }
}

#[tokio::test]
async fn an_empty_draft_is_bad_output() {
    let dir = tempfile::tempdir().expect("temp dir");
    let host = load(vec![wat_spec(dir.path(), "empty", "empty_draft")]).await;

    let verdicts = host.on_message(&text_message("hi")).await;
    match &verdicts[0].result {
        Err(CallError::BadOutput(why)) => {
            assert!(why.contains("text") && why.contains("data-json"), "{why}")
        }
        other => panic!("expected bad output, got {other:?}"),
    }
}

#[tokio::test]
async fn a_plugin_reported_error_is_passed_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let host = load(vec![wat_spec(dir.path(), "failing", "failing")]).await;

    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(verdicts[0].result, Err(CallError::PluginError("internal: broken".to_string())));
}

#[tokio::test]
async fn concurrent_messages_share_one_host() {
    let host = Arc::new(load(vec![echo_spec("echo")]).await);
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let host = host.clone();
            tokio::spawn(async move { host.on_message(&text_message(&format!("m{n}"))).await })
        })
        .collect();

    for (n, task) in tasks.into_iter().enumerate() {
        let verdicts = task.await.expect("task ran");
        let expected = Decision::Reply(vec![text_draft(&format!("echo: m{n}"))]);
        assert_eq!(verdicts[0].result, Ok(expected));
    }
}

/// Loads one plugin at `path` and returns the error message, which must name `id` and `path`.
async fn load_error(id: &str, path: &Path) -> PluginError {
    let specs = vec![echo_spec("fine"), PluginSpec::new(id, path)];
    let err = match PluginHost::load(specs, None).await {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(err) => err,
    };
    let text = err.to_string();
    assert!(text.contains(id), "error does not name the plugin: {text}");
    assert!(text.contains(&path.display().to_string()), "error does not name the path: {text}");
    err
}

#[tokio::test]
async fn a_missing_or_garbage_file_fails_the_load_naming_plugin_and_path() {
    let dir = tempfile::tempdir().expect("temp dir");

    let missing = dir.path().join("missing.wasm");
    assert!(matches!(load_error("ghost", &missing).await, PluginError::Read { .. }));

    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm").expect("write garbage");
    assert!(matches!(load_error("junk", &garbage).await, PluginError::Compile { .. }));

    let empty_component = dir.path().join("empty.wasm");
    std::fs::write(&empty_component, wat::parse_str("(component)").expect("wat")).expect("write");
    assert!(matches!(load_error("hollow", &empty_component).await, PluginError::Link { .. }));
}

/// Compiled entries in the cache (wasmtime names them by hash, without an extension; its
/// statistics and temporary files have one).
fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("read cache dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_none() {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test]
async fn the_compile_cache_is_reused_and_a_corrupt_entry_is_rebuilt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let load_cached = || PluginHost::load(vec![echo_spec("echo")], Some(cache.clone()));

    // First start: compiles and writes one entry into an owner-only directory.
    let host = load_cached().await.expect("first load");
    drop(host);
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    let first = std::fs::read(entry).expect("read entry");
    let first_mtime = std::fs::metadata(entry).and_then(|m| m.modified()).expect("mtime");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cache).expect("cache dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    // Second start: reads the entry and leaves it as it was.
    let host = load_cached().await.expect("second load");
    assert!(host.on_message(&text_message("hi")).await[0].result.is_ok());
    drop(host);
    assert_eq!(cache_entries(&cache), entries);
    assert_eq!(std::fs::metadata(entry).and_then(|m| m.modified()).expect("mtime"), first_mtime);

    // A corrupt entry is not fatal: the plugin is recompiled and the entry rewritten.
    std::fs::write(entry, b"corrupt").expect("corrupt the entry");
    let host = load_cached().await.expect("load over a corrupt entry");
    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Reply(vec![text_draft("echo: hi")])));
    let rebuilt = std::fs::read(entry).expect("read rebuilt entry");
    assert_ne!(rebuilt, b"corrupt");
    assert_eq!(rebuilt.len(), first.len());
}

// === manifests ===

fn echo_manifest() -> Manifest {
    let path = repo_root().join("plugins/echo/agentchat-plugin.toml");
    Manifest::load(&path).expect("the echo manifest is valid")
}

async fn load_refused(setups: Vec<PluginSetup>) -> PluginError {
    match PluginHost::load(setups, None).await {
        Ok(_) => panic!("the load should be refused"),
        Err(err) => err,
    }
}

#[tokio::test]
async fn echo_loads_from_its_manifest_and_its_prefix_config_is_checked() {
    let setup = PluginSetup::from_manifest(echo_manifest()).with_config(r#"{"prefix": "> "}"#);
    assert_eq!(setup.spec.path, echo_plugin_path());
    let host = load(vec![setup]).await;
    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(summary(&verdicts), vec![("echo", &Ok(Decision::Reply(vec![text_draft("> hi")])))]);

    let bad = PluginSetup::from_manifest(echo_manifest()).with_config(r#"{"prefix": 7}"#);
    let err = load_refused(vec![bad]).await;
    let text = err.to_string();
    assert!(matches!(err, PluginError::ConfigSchema { .. }), "{text}");
    assert!(
        text.contains("`echo`") && text.contains("/prefix") && text.contains("string"),
        "{text}"
    );

    let unknown = PluginSetup::from_manifest(echo_manifest()).with_config(r#"{"prefx": "x"}"#);
    let text = load_refused(vec![unknown]).await.to_string();
    assert!(text.contains("/prefx") && text.contains("prefix"), "{text}");
}

#[tokio::test]
async fn a_manifest_that_does_not_match_refuses_the_plugin_naming_the_field() {
    // The configured id differs from the manifest's.
    let setup = PluginSpec::new("other", echo_plugin_path()).with_manifest(echo_manifest());
    match load_refused(vec![setup]).await {
        PluginError::Manifest { id, key, .. } => {
            assert_eq!((id.as_str(), key.as_str()), ("other", "id"))
        }
        other => panic!("expected a manifest error, got {other}"),
    }

    // The manifest asks for more memory than the operator allows.
    let mut manifest = echo_manifest();
    manifest.limits.memory_mib = Some(64);
    let text = load_refused(vec![PluginSetup::from_manifest(manifest)]).await.to_string();
    assert!(text.contains("limits.memory-mib") && text.contains("64 MiB"), "{text}");

    // A capability the operator did not grant.
    let mut manifest = echo_manifest();
    manifest.capabilities.http_allowed_hosts = vec!["api.example.com".to_string()];
    let err = load_refused(vec![PluginSetup::from_manifest(manifest.clone())]).await;
    let text = err.to_string();
    assert!(matches!(err, PluginError::NotGranted { .. }), "{text}");
    assert!(text.contains("`echo`") && text.contains("api.example.com"), "{text}");
    let granted = Capabilities {
        http_allowed_hosts: vec!["api.example.com".to_string()],
        ..Capabilities::default()
    };
    load(vec![PluginSetup::from_manifest(manifest).with_grants(granted)]).await;
}

#[tokio::test]
async fn hooks_must_match_the_component_exports() {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty.wasm");
    std::fs::write(&empty, wat::parse_str("(component)").expect("wat")).expect("write");
    let mut manifest = echo_manifest();
    manifest.component = empty;

    match load_refused(vec![PluginSetup::from_manifest(manifest)]).await {
        PluginError::Manifest { key, reason, .. } => {
            assert_eq!(key, "hooks");
            assert!(reason.contains("lists [\"inbound\"], which"), "{reason}");
            assert!(reason.contains("does not export"), "{reason}");
        }
        other => panic!("expected a manifest error, got {other}"),
    }
}

#[tokio::test]
async fn a_declared_smaller_timeout_tightens_the_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut manifest = echo_manifest();
    manifest.id = "spinner".to_string();
    manifest.limits.hook_timeout = Some(Duration::from_millis(20));
    let spec = PluginSpec::new("spinner", write_wat_guest(dir.path(), "spin"));
    let host = load(vec![spec.with_manifest(manifest)]).await;

    let verdicts = host.on_message(&text_message("hi")).await;
    assert_eq!(verdicts[0].result, Err(CallError::Timeout { budget: Duration::from_millis(20) }));
}

// === breaker ===

#[tokio::test(start_paused = true)]
async fn repeated_traps_suspend_the_plugin_until_the_cooldown_ends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let breaker = BreakerSettings {
        max_failures: NonZeroU32::new(3).expect("non-zero"),
        window: Duration::from_secs(60),
        cooldown: Duration::from_secs(300),
    };
    let trapper = PluginSetup::from(wat_spec(dir.path(), "trapper", "trap")).with_breaker(breaker);
    let host = load(vec![trapper, echo_spec("echo").into()]).await;

    for round in 0..3 {
        let verdicts = host.on_message(&text_message("hi")).await;
        assert!(matches!(verdicts[0].result, Err(CallError::Trap(_))), "round {round}");
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let status = host.status();
    assert!(matches!(status[0].state, PluginState::Suspended { .. }), "{status:?}");
    assert_eq!((status[0].total_failures, status[1].state.clone()), (3, PluginState::Active));

    // Suspended: the guest is not run, and the next plugin still is.
    let verdicts = host.on_message(&text_message("hi")).await;
    match verdicts[0].result {
        Err(CallError::Suspended { remaining }) => {
            assert_eq!(remaining, Duration::from_secs(299))
        }
        ref other => panic!("expected a suspension, got {other:?}"),
    }
    assert_eq!(verdicts[1].result, Ok(Decision::Reply(vec![text_draft("echo: hi")])));
    assert_eq!(host.status()[0].total_failures, 3, "a skipped call is not a failure");

    // After the cooldown the guest runs again (and traps again).
    tokio::time::advance(Duration::from_secs(300)).await;
    assert_eq!(host.status()[0].state, PluginState::Active);
    let verdicts = host.on_message(&text_message("hi")).await;
    assert!(matches!(verdicts[0].result, Err(CallError::Trap(_))));
    assert_eq!(host.status()[0].recent_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn errors_the_plugin_reports_itself_never_suspend_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let host = load(vec![wat_spec(dir.path(), "failing", "failing")]).await;
    for _ in 0..10 {
        let verdicts = host.on_message(&text_message("hi")).await;
        assert!(matches!(verdicts[0].result, Err(CallError::PluginError(_))));
    }
    assert_eq!(host.status()[0].state, PluginState::Active);
}

// === the rules plugin ===

/// The rules plugin with `config`, checked against its manifest's schema.
fn rules_setup(config: serde_json::Value) -> PluginSetup {
    // Building the guest workspace for echo builds every example plugin.
    let wasm = echo_plugin_path().with_file_name("rules.wasm");
    let manifest = Manifest::load(&repo_root().join("plugins/rules/agentchat-plugin.toml"))
        .expect("the rules manifest is valid");
    PluginSpec::new("rules", wasm).with_manifest(manifest).with_config(config.to_string())
}

fn rules_config() -> serde_json::Value {
    serde_json::json!({
        "rules": [
            {"keyword": "PRICE", "reply": "See our price list."},
            {"regex": r"^(hi|hello)\b", "reply": "Hello!", "claim": true},
            {"keyword": "hello", "reply": "never reached: the regex above wins"},
        ]
    })
}

/// The message `text_message` builds arrives at 22:13 UTC.
fn at_22_13(text: &str) -> agentchatd::plugins::InboundMessage {
    let msg = text_message(text);
    assert_eq!((msg.received_at_ms / 60_000) % 1440, 22 * 60 + 13);
    msg
}

#[tokio::test]
async fn rules_answer_with_the_first_matching_rule() {
    let host = load(vec![rules_setup(rules_config()), echo_spec("echo").into()]).await;

    let verdicts = host.on_message(&at_22_13("what is the price?")).await;
    let expected = Decision::Reply(vec![text_draft("See our price list.")]);
    assert_eq!(verdicts[0].result, Ok(expected));
    assert_eq!(verdicts.len(), 2, "a reply lets later plugins run");

    let verdicts = host.on_message(&at_22_13("hello there")).await;
    assert_eq!(
        summary(&verdicts),
        vec![("rules", &Ok(Decision::Claim(vec![text_draft("Hello!")])))]
    );

    let verdicts = host.on_message(&at_22_13("say hello")).await;
    let expected = Decision::Reply(vec![text_draft("never reached: the regex above wins")]);
    assert_eq!(verdicts[0].result, Ok(expected), "the anchored regex does not match here");

    let verdicts = host.on_message(&at_22_13("nothing to see")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Pass));
    let verdicts = host.on_message(&structured_message(r#"{"price":1}"#)).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Pass));
}

#[tokio::test]
async fn rules_stay_quiet_inside_quiet_hours_only() {
    let mut quiet = rules_config();
    quiet["quiet-hours"] = serde_json::json!({"start": "22:00", "end": "07:00"});
    let mut awake = rules_config();
    awake["quiet-hours"] = serde_json::json!({"start": "08:00", "end": "22:13"});
    let mut quiet_host = rules_setup(quiet);
    quiet_host.spec.id = "quiet".to_string();
    quiet_host.manifest.as_mut().expect("manifest").id = "quiet".to_string();
    let host = load(vec![quiet_host, rules_setup(awake)]).await;

    let verdicts = host.on_message(&at_22_13("price?")).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Pass), "22:13 is inside 22:00-07:00");
    let expected = Decision::Reply(vec![text_draft("See our price list.")]);
    assert_eq!(verdicts[1].result, Ok(expected), "the end of a window is not included");
}

#[tokio::test]
async fn a_bad_rule_is_refused_by_the_schema_or_reported_by_the_plugin() {
    let config = serde_json::json!({"rules": [{"keyword": "x"}]});
    let text = load_refused(vec![rules_setup(config)]).await.to_string();
    assert!(text.contains("/rules/0/reply") && text.contains("required"), "{text}");

    let config = serde_json::json!({"rules": [
        {"keyword": "a", "reply": "ok"},
        {"regex": "(", "reply": "x"},
    ]});
    let host = load(vec![rules_setup(config)]).await;
    match &host.on_message(&at_22_13("b")).await[0].result {
        Err(CallError::PluginError(why)) => {
            assert!(why.contains("rules[1]") && why.contains("regex"), "{why}")
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
}

// === authoring tools ===

#[test]
fn plugin_new_outside_the_repo_vendors_the_sdk_and_writes_a_valid_manifest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let made = authoring::scaffold("my-bot", dir.path()).expect("scaffold");
    assert_eq!(made.sdk, SdkSource::Vendored);

    let read = |rel: &str| std::fs::read_to_string(made.dir.join(rel)).expect(rel);
    assert!(
        read("Cargo.toml")
            .contains(r#"agentchat-plugin-sdk = { path = "vendor/agentchat-plugin-sdk" }"#)
    );
    assert!(read("src/lib.rs").contains("export_plugin!(MyBot);"));
    assert!(read("README.md").contains("agentchatd plugin test"));
    // The README's `plugin test` command names a sample file the scaffold writes.
    let samples: Vec<agentchatd::plugins::InboundMessage> =
        serde_json::from_str(&read("messages.json")).expect("sample messages parse");
    assert!(!samples.is_empty());
    assert_eq!(read("vendor/wit/plugin.wit"), read_repo("plugins/wit/plugin.wit"));
    assert_eq!(read("vendor/agentchat-plugin-sdk/src/lib.rs"), read_repo("plugins/sdk/src/lib.rs"));

    let manifest = Manifest::load(&made.dir.join("agentchat-plugin.toml")).expect("manifest");
    assert_eq!(manifest.id, "my-bot");
    assert!(manifest.component.ends_with("target/wasm32-wasip2/release/my_bot.wasm"));

    // Nothing is overwritten, and names that cannot be ids are refused.
    let again = authoring::scaffold("my-bot", dir.path()).expect_err("exists");
    assert!(matches!(again, authoring::AuthoringError::Exists { .. }), "{again}");
    for bad in ["", "My Bot", "9lives", "../escape"] {
        assert!(authoring::scaffold(bad, dir.path()).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn plugin_new_inside_the_repo_depends_on_the_sdk_by_relative_path() {
    let parent = tempfile::tempdir_in(repo_root().join("target")).expect("temp dir in target");
    let made = authoring::scaffold("local", parent.path()).expect("scaffold");
    let SdkSource::Repo(rel) = &made.sdk else {
        panic!("expected a repo path, got {:?}", made.sdk)
    };
    assert!(rel.is_relative(), "{rel:?}");
    let resolved = std::fs::canonicalize(made.dir.join(rel)).expect("the SDK path resolves");
    assert_eq!(resolved, std::fs::canonicalize(repo_root().join("plugins/sdk")).expect("sdk"));
    assert!(!made.dir.join("vendor").exists());
}

fn read_repo(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).expect(rel)
}

fn run_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agentchatd"))
        .args(args)
        .env("AGENTCHATD_LOG", "warn")
        .output()
        .expect("run agentchatd")
}

#[test]
fn plugin_test_prints_one_json_line_per_decision_and_fails_on_a_bad_plugin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let messages = dir.path().join("messages.json");
    let sample = vec![text_message("hi"), structured_message(r#"{"a":1}"#)];
    std::fs::write(&messages, serde_json::to_string(&sample).expect("json")).expect("write");
    let manifest = repo_root().join("plugins/echo/agentchat-plugin.toml");

    let out = run_cli(&[
        "plugin".as_ref(),
        "test".as_ref(),
        echo_plugin_path().as_os_str(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
        "--config".as_ref(),
        r#"{"prefix": "re: "}"#.as_ref(),
        "--messages".as_ref(),
        messages.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"message_id": "msg-1", "plugin": "echo", "decision": "reply",
                "drafts": [{"conversation_id": null, "text": "re: hi", "data_json": null}]}),
            serde_json::json!({"message_id": "msg-1", "plugin": "echo", "decision": "pass"}),
        ]
    );

    // A config the schema refuses, and a file that is no component, both exit non-zero.
    let bad_config = run_cli(&[
        "plugin".as_ref(),
        "test".as_ref(),
        echo_plugin_path().as_os_str(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
        "--config".as_ref(),
        r#"{"prefix": 1}"#.as_ref(),
        "--messages".as_ref(),
        messages.as_os_str(),
    ]);
    assert!(!bad_config.status.success());
    assert!(String::from_utf8_lossy(&bad_config.stderr).contains("/prefix"));
    let garbage = run_cli(&[
        "plugin".as_ref(),
        "test".as_ref(),
        messages.as_os_str(),
        "--messages".as_ref(),
        messages.as_os_str(),
    ]);
    assert!(!garbage.status.success());
    assert!(garbage.stdout.is_empty());
}

#[test]
fn plugin_test_grants_capabilities_and_backs_kv_with_a_scratch_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let messages = dir.path().join("messages.json");
    let mut second = text_message("ping again");
    second.id = "msg-2".to_string();
    let sample = vec![text_message("ping"), second];
    std::fs::write(&messages, serde_json::to_string(&sample).expect("json")).expect("write");
    // The whole guest workspace is built with echo, rules included.
    let rules = echo_plugin_path().with_file_name("rules.wasm");
    let manifest = repo_root().join("plugins/rules/agentchat-plugin.toml");
    let config = r#"{"rules": [{"keyword": "ping", "reply": "pong"}],
        "per-peer-budget": {"replies": 1, "window-secs": 60}}"#;
    let run = |grants: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "plugin".as_ref(),
            "test".as_ref(),
            rules.as_os_str(),
            "--manifest".as_ref(),
            manifest.as_os_str(),
            "--config".as_ref(),
            config.as_ref(),
            "--messages".as_ref(),
            messages.as_os_str(),
        ];
        for grant in grants {
            args.push("--grant".as_ref());
            args.push(grant.as_ref());
        }
        run_cli(&args)
    };

    // With kv granted the budget is counted: one reply to alice, then a pass.
    let out = run(&["kv"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let decisions: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            value["decision"].as_str().unwrap_or("error").to_string()
        })
        .collect();
    assert_eq!(decisions, ["reply", "pass"]);

    // Without it the budget cannot be kept, so the plugin reports an error instead of replying.
    let out = run(&[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"error\""));

    let out = run(&["filesystem"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`filesystem` is not a capability"));
}
