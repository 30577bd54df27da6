//! Unit tests of the plugin host's pure parts: output validation, config parsing, spec checks
//! and deadline arithmetic. Tests that run guests live in `tests/it/plugins.rs`.

use std::path::Path;
use std::time::Duration;

use super::engine::{EPOCH_TICK, deadline_ticks};
use super::validate::check_decision;
use super::*;

fn draft(text: Option<&str>, data_json: Option<&str>) -> Draft {
    Draft {
        conversation_id: None,
        text: text.map(str::to_string),
        data_json: data_json.map(str::to_string),
    }
}

fn check_reply(drafts: Vec<Draft>) -> Result<Decision, CallError> {
    check_decision(Decision::Reply(drafts))
}

fn bad_output(result: Result<Decision, CallError>) -> String {
    match result {
        Err(CallError::BadOutput(why)) => why,
        other => panic!("expected BadOutput, got {other:?}"),
    }
}

#[test]
fn host_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PluginHost>();
}

#[test]
fn text_and_object_drafts_are_accepted() {
    let drafts = vec![draft(Some("hi"), None), draft(None, Some(r#"{"a":1}"#))];
    assert_eq!(check_reply(drafts.clone()), Ok(Decision::Reply(drafts)));
}

#[test]
fn empty_draft_is_refused_naming_both_fields() {
    let why = bad_output(check_reply(vec![draft(Some("ok"), None), draft(None, None)]));
    assert!(why.contains("draft 1") && why.contains("text") && why.contains("data-json"), "{why}");
}

#[test]
fn text_limit_is_inclusive() {
    let at_limit = "x".repeat(MAX_TEXT_BYTES);
    assert!(check_reply(vec![draft(Some(&at_limit), None)]).is_ok());

    let over = "x".repeat(MAX_TEXT_BYTES + 1);
    let why = bad_output(check_reply(vec![draft(Some(&over), None)]));
    assert!(why.contains("32768"), "{why}");
}

#[test]
fn data_json_must_be_an_object() {
    for data in ["[1]", "\"text\"", "{not json"] {
        let why = bad_output(check_decision(Decision::Claim(vec![draft(None, Some(data))])));
        assert!(why.contains("data-json"), "{why}");
    }
}

#[test]
fn too_many_drafts_are_refused() {
    let drafts = vec![draft(Some("x"), None); MAX_DRAFTS_PER_DECISION + 1];
    assert!(bad_output(check_reply(drafts)).contains("drafts"));
}

#[test]
fn pass_and_drop_need_no_checks() {
    assert_eq!(check_decision(Decision::Pass), Ok(Decision::Pass));
    assert_eq!(check_decision(Decision::Drop), Ok(Decision::Drop));
}

#[test]
fn config_must_be_an_object_and_empty_means_empty_object() {
    let mut spec = PluginSpec::new("p", "/nowhere/p.wasm");
    assert_eq!(parse_config(&spec).map(|c| c.json).ok().as_deref(), Some("{}"));

    spec.config_json = r#"{"greeting": "hello", "n": 3}"#.to_string();
    let config = parse_config(&spec).expect("object config parses");
    assert_eq!(config.values.len(), 2);

    spec.config_json = "[1, 2]".to_string();
    let err = parse_config(&spec).expect_err("array config is refused").to_string();
    assert!(err.contains("`p`") && err.contains("/nowhere/p.wasm"), "{err}");
}

#[test]
fn duplicate_ids_and_zero_limits_are_refused() {
    let first = PluginSpec::new("a", "/a.wasm");
    assert!(check_spec(&first, &[]).is_ok());
    assert!(check_spec(&PluginSpec::new("a", "/b.wasm"), std::slice::from_ref(&first)).is_err());

    let mut zero_time = PluginSpec::new("b", "/b.wasm");
    zero_time.timeout = Duration::ZERO;
    assert!(check_spec(&zero_time, &[]).is_err());

    let mut tiny = PluginSpec::new("c", "/c.wasm");
    tiny.memory_limit_bytes = 1024;
    assert!(check_spec(&tiny, &[]).is_err());
}

#[test]
fn deadline_covers_the_whole_budget() {
    assert_eq!(deadline_ticks(EPOCH_TICK * 10), 11);
    assert_eq!(deadline_ticks(Duration::from_millis(1)), 2);
    assert_eq!(deadline_ticks(EPOCH_TICK * 10 + Duration::from_millis(1)), 12);
    assert!(deadline_ticks(Duration::MAX) > 1);
}

// === manifest and config schema ===

const MANIFEST: &str = r#"
id = "demo"
name = "Demo"
version = "1.2.3"
api = "agentchat:plugin@0.1.0"
component = "demo.wasm"
hooks = ["inbound"]

[capabilities]
send = true
http-allowed-hosts = ["api.example.com"]

[limits]
memory-mib = 8
hook-timeout-ms = 50

[config-schema]
type = "object"
required = ["greeting"]
additionalProperties = false
properties.greeting = { type = "string", minLength = 1, maxLength = 5 }
properties.mode = { enum = ["loud", "quiet"] }
properties.count = { type = "integer", minimum = 1, maximum = 3 }
properties.tags = { type = "array", items = { type = "string" }, maxItems = 2 }
"#;

fn parse_manifest(text: &str) -> Result<Manifest, ManifestError> {
    Manifest::parse(text, Path::new("/plugins/demo/agentchat-plugin.toml"))
}

fn invalid_key(text: &str) -> (String, String) {
    match parse_manifest(text) {
        Err(ManifestError::Invalid { key, reason, .. }) => (key, reason),
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

#[test]
fn a_full_manifest_is_read_with_paths_resolved_against_its_folder() {
    let manifest = parse_manifest(MANIFEST).expect("valid manifest");
    assert_eq!(manifest.id, "demo");
    assert_eq!(manifest.component, Path::new("/plugins/demo/demo.wasm"));
    assert_eq!(manifest.hooks, ["inbound"]);
    assert!(manifest.capabilities.send && !manifest.capabilities.kv);
    assert_eq!(manifest.limits.memory_mib, Some(8));
    assert_eq!(manifest.limits.hook_timeout, Some(Duration::from_millis(50)));
    assert!(manifest.config_schema.is_some());
}

#[test]
fn manifest_errors_name_the_file_and_the_key() {
    let (key, why) = invalid_key(&MANIFEST.replace("agentchat:plugin@0.1.0", "other:pkg@0.1.0"));
    assert_eq!(key, "api");
    assert!(why.contains("agentchat:plugin@0.1.0"), "{why}");

    let (key, _) = invalid_key(&MANIFEST.replace("@0.1.0", "@0.2.0"));
    assert_eq!(key, "api", "a newer minor version is refused");

    let (key, why) = invalid_key(&MANIFEST.replace(r#"["inbound"]"#, r#"["inbound", "tick"]"#));
    assert_eq!(key, "hooks");
    assert!(why.contains("tick"), "{why}");

    let (key, _) = invalid_key(&MANIFEST.replace("1.2.3", "one"));
    assert_eq!(key, "version");
    let (key, _) = invalid_key(&MANIFEST.replace("memory-mib = 8", "memory-mib = 0"));
    assert_eq!(key, "limits.memory-mib");
    let (key, _) = invalid_key(&MANIFEST.replace(r#"id = "demo""#, r#"id = "Bad Id""#));
    assert_eq!(key, "id");

    let (key, why) = invalid_key(&MANIFEST.replace("maxItems = 2", "pattern = \"x\""));
    assert_eq!(key, "config-schema");
    assert!(why.contains("pattern"), "{why}");

    let err = parse_manifest(&MANIFEST.replace("hooks =", "hookz =")).expect_err("unknown key");
    let text = err.to_string();
    assert!(text.contains("agentchat-plugin.toml") && text.contains("hookz"), "{text}");
}

#[test]
fn the_echo_manifest_in_the_repo_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/echo/agentchat-plugin.toml");
    let manifest = Manifest::load(&path).expect("echo manifest");
    assert_eq!(manifest.id, "echo");
    assert!(manifest.component.ends_with("target/wasm32-wasip2/release/echo.wasm"));
}

fn violations(value: serde_json::Value) -> Vec<(String, String)> {
    let manifest = parse_manifest(MANIFEST).expect("valid manifest");
    let schema = manifest.config_schema.expect("schema");
    schema.validate(&value).into_iter().map(|v| (v.pointer, v.reason)).collect()
}

#[test]
fn the_schema_accepts_a_conforming_config() {
    let config = serde_json::json!({"greeting": "hi", "mode": "loud", "count": 2, "tags": ["a"]});
    assert_eq!(violations(config), vec![]);
}

#[test]
fn the_schema_names_each_bad_field() {
    let config = serde_json::json!({
        "greeting": "far too long",
        "mode": "shouting",
        "count": 2.5,
        "tags": ["a", 1, "c"],
        "colour": "red",
    });
    let found = violations(config);
    let pointers: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(pointers, ["/colour", "/count", "/greeting", "/mode", "/tags", "/tags/1"]);
    assert!(found[0].1.contains("known keys"), "{found:?}");
    assert!(found[1].1.contains("integer"), "{found:?}");
    assert!(found[2].1.contains("at most 5"), "{found:?}");
    assert!(found[3].1.contains("\"loud\""), "{found:?}");

    let missing = violations(serde_json::json!({"count": 0}));
    assert_eq!(
        missing,
        vec![
            ("/greeting".to_string(), "is required but missing".to_string()),
            ("/count".to_string(), "0 is below the minimum 1".to_string()),
        ]
    );
}

#[test]
fn capabilities_not_granted_are_named() {
    let manifest = parse_manifest(MANIFEST).expect("valid manifest");
    let granted = Capabilities { send: true, ..Capabilities::default() };
    assert_eq!(
        manifest.capabilities.missing_from(&granted),
        ["http-allowed-hosts: api.example.com"]
    );
    let all = Capabilities { http_allowed_hosts: vec!["API.example.com".into()], ..granted };
    assert!(manifest.capabilities.missing_from(&all).is_empty());
}

#[test]
fn http_without_a_named_host_needs_any_granted_host() {
    let text = MANIFEST.replace(r#"http-allowed-hosts = ["api.example.com"]"#, "http = true");
    let manifest = parse_manifest(&text).expect("valid manifest");
    let granted = Capabilities { send: true, ..Capabilities::default() };
    assert_eq!(
        manifest.capabilities.missing_from(&granted),
        ["http-allowed-hosts: at least one host"]
    );
    let some_host = Capabilities { http_allowed_hosts: vec!["127.0.0.1:8080".into()], ..granted };
    assert!(manifest.capabilities.missing_from(&some_host).is_empty());
}

// === breaker ===

fn breaker_settings() -> BreakerSettings {
    BreakerSettings {
        max_failures: std::num::NonZeroU32::new(3).expect("non-zero"),
        window: Duration::from_secs(10),
        cooldown: Duration::from_secs(60),
    }
}

#[test]
fn failures_spread_wider_than_the_window_never_trip_the_breaker() {
    let mut breaker = breaker::Breaker::new(breaker_settings());
    let start = tokio::time::Instant::now();
    for n in 0..10 {
        let now = start + Duration::from_secs(6) * n;
        assert_eq!(breaker.admit(now), Ok(None), "call {n}");
        assert_eq!(breaker.record_failure(now), None, "failure {n}");
    }
    assert_eq!(breaker.snapshot(start + Duration::from_secs(54)).2, 10);
}

#[test]
fn the_breaker_trips_at_the_limit_and_resumes_after_the_cooldown() {
    let mut breaker = breaker::Breaker::new(breaker_settings());
    let start = tokio::time::Instant::now();
    assert_eq!(breaker.record_failure(start), None);
    assert_eq!(breaker.record_failure(start + Duration::from_secs(1)), None);
    let tripped = breaker.record_failure(start + Duration::from_secs(2));
    assert_eq!(tripped, Some(breaker::Transition::Suspended { failures: 3 }));

    let during = start + Duration::from_secs(30);
    assert_eq!(breaker.admit(during), Err(Duration::from_secs(32)));
    assert_eq!(breaker.record_failure(during), None, "a late failure changes nothing");

    let after = start + Duration::from_secs(62);
    assert_eq!(breaker.admit(after), Ok(Some(breaker::Transition::Resumed)));
    assert_eq!(breaker.admit(after), Ok(None));
    assert_eq!(breaker.snapshot(after), (0, None, 4));
}

#[test]
fn only_misbehaviour_counts_as_a_failure() {
    assert!(CallError::Trap("x".into()).counts_as_failure());
    assert!(CallError::Timeout { budget: Duration::from_millis(1) }.counts_as_failure());
    assert!(CallError::MemoryLimit.counts_as_failure());
    assert!(CallError::BadOutput("x".into()).counts_as_failure());
    assert!(!CallError::PluginError("x".into()).counts_as_failure());
    assert!(!CallError::Suspended { remaining: Duration::from_secs(1) }.counts_as_failure());
}

#[test]
fn guest_text_is_shown_without_control_characters_and_within_its_cap() {
    // What a guest logs or gives as a reason: a line break would forge a log line (tracing
    // escapes ANSI but not line breaks), an escape would repaint the operator's terminal.
    let shown = call::shown("ok\n2026-01-01 INFO forged\u{1b}[2J\r\u{0}", 64);
    assert!(!shown.chars().any(char::is_control), "{shown:?}");
    assert!(shown.starts_with("ok\u{fffd}2026-01-01 INFO forged"), "{shown:?}");
    // Replacements are wider than what they replace; the cap still holds, on a char boundary.
    let wide = call::shown(&"\n".repeat(100), 10);
    assert!(wide.len() <= 10 && wide.chars().all(|c| c == '\u{fffd}'), "{wide:?}");
    assert_eq!(call::shown("é".repeat(10).as_str(), 5), "éé");
}
