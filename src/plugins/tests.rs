//! Unit tests of the plugin host's pure parts: output validation, config parsing, spec checks
//! and deadline arithmetic. Tests that run guests live in `tests/it/plugins.rs`.

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
