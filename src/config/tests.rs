use super::*;

const GOOD: &str = r#"
[agent]
api_base = "http://127.0.0.1:8080/"
api_key_env = "AGENTCHAT_API_KEY"

[state]
dir = "state"

[inbox]
transport = "poll"
poll_interval_ms = 500

[[plugins]]
id = "echo"
path = "plugins/echo.wasm"
timeout_ms = 50
config = { greeting = "hi" }
"#;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(text, Path::new("/etc/agentchatd/agentchatd.toml"))
}

fn check_invalid(text: &str, key: &str, line: usize) -> String {
    match parse_str(text) {
        Err(ConfigError::Invalid { key: k, line: l, message, .. }) => {
            assert_eq!((k.as_str(), l), (key, line), "message: {message}");
            message
        }
        other => panic!("expected an invalid `{key}`, got {other:?}"),
    }
}

#[test]
fn good_config_is_validated_into_typed_values() {
    let config = parse_str(GOOD).expect("valid config");
    assert_eq!(config.api_base, "http://127.0.0.1:8080");
    assert_eq!(config.ws_url, "ws://127.0.0.1:8080/v1/ws");
    assert_eq!(config.api_key, KeySource::Env("AGENTCHAT_API_KEY".into()));
    assert_eq!(config.state_dir, PathBuf::from("/etc/agentchatd/state"));
    assert_eq!(config.transport, Transport::Poll);
    assert_eq!(config.poll_interval, Duration::from_millis(500));
    assert_eq!(config.requests_per_second, 60);
    let plugin = &config.plugins[0];
    assert_eq!(plugin.id, "echo");
    assert_eq!(plugin.path, PathBuf::from("/etc/agentchatd/plugins/echo.wasm"));
    assert_eq!(plugin.timeout, Duration::from_millis(50));
    assert_eq!(plugin.memory_limit_bytes, 32 * 1024 * 1024);
    assert_eq!(plugin.config_json, r#"{"greeting":"hi"}"#);
}

#[test]
fn https_base_derives_a_wss_inbox_url() {
    assert_eq!(derive_ws_url("https://api.agentchat.me"), "wss://api.agentchat.me/v1/ws");
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let text = GOOD.replace("poll_interval_ms = 500", "poll_interval_secs = 1");
    let err = parse_str(&text).expect_err("unknown key").to_string();
    assert!(err.contains("agentchatd.toml:11: `poll_interval_secs`: unknown field"), "{err}");
    assert!(!err.contains("= 1"), "the source line is not quoted: {err}");
}

#[test]
fn inline_api_key_is_refused_with_the_fix() {
    let text = GOOD.replace("api_key_env = \"AGENTCHAT_API_KEY\"", "api_key = \"ac_secret\"");
    let message = check_invalid(&text, "agent.api_key", 4);
    assert!(message.contains("api_key_file"), "{message}");
}

#[test]
fn bad_url_names_the_key_and_line() {
    let text = GOOD.replace("http://127.0.0.1:8080/", "127.0.0.1:8080");
    check_invalid(&text, "agent.api_base", 3);
}

#[test]
fn out_of_range_number_names_the_limits() {
    let text = GOOD.replace("timeout_ms = 50", "timeout_ms = 0");
    let message = check_invalid(&text, "plugins.timeout_ms", 16);
    assert!(message.contains("between 1 and 60000"), "{message}");
}

#[test]
fn missing_key_source_is_explained() {
    let text = GOOD.replace("api_key_env = \"AGENTCHAT_API_KEY\"", "");
    let message = check_invalid(&text, "agent.api_key_file", 2);
    assert!(message.contains("api_key_env"), "{message}");
}

#[test]
fn missing_state_dir_is_reported() {
    let text = GOOD.replace("[state]\ndir = \"state\"", "");
    check_invalid(&text, "state.dir", 0);
}

#[test]
fn duplicate_plugin_ids_are_refused() {
    let text = format!("{GOOD}\n[[plugins]]\nid = \"echo\"\npath = \"other.wasm\"\n");
    check_invalid(&text, "plugins.id", 20);
}

#[test]
fn wrong_type_is_a_parse_error_naming_the_key() {
    let text = GOOD.replace("poll_interval_ms = 500", "poll_interval_ms = \"fast\"");
    let err = parse_str(&text).expect_err("wrong type").to_string();
    assert!(err.contains("poll_interval_ms"), "{err}");
}

#[test]
fn unknown_transport_is_a_parse_error() {
    let text = GOOD.replace("transport = \"poll\"", "transport = \"carrier-pigeon\"");
    let err = parse_str(&text).expect_err("bad transport").to_string();
    assert!(err.contains("carrier-pigeon") || err.contains("transport"), "{err}");
}

#[test]
fn key_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key");
    std::fs::write(&path, "ac_abc\n").expect("write key");
    let key = KeySource::File(path).load().expect("key loads");
    assert_eq!(key.expose(), "ac_abc");
    assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
}

#[test]
fn empty_or_missing_key_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key");
    assert!(KeySource::File(path.clone()).load().is_err());
    std::fs::write(&path, "  \n").expect("write key");
    let err = KeySource::File(path).load().expect_err("empty key");
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn a_key_pasted_into_the_wrong_place_is_never_echoed() {
    let secret = "ac_SUPERSECRETvalue0123456789";
    let typo =
        GOOD.replace("api_key_env = \"AGENTCHAT_API_KEY\"", &format!("apikey = \"{secret}\""));
    let err = parse_str(&typo).expect_err("unknown key").to_string();
    assert!(err.contains("apikey") && !err.contains(secret), "{err}");

    let junk = GOOD
        .replace("api_key_env = \"AGENTCHAT_API_KEY\"", &format!("api_key = \"{secret}\" junk"));
    let err = parse_str(&junk).expect_err("syntax").to_string();
    assert!(!err.contains(secret), "{err}");

    let as_env = GOOD.replace("AGENTCHAT_API_KEY", secret);
    let message = check_invalid(&as_env, "agent.api_key_env", 4);
    assert!(!message.contains(secret), "{message}");
}

#[test]
fn credentials_in_the_api_url_are_refused() {
    let text = GOOD.replace("http://127.0.0.1:8080/", "https://user:pass@api.example/");
    let message = check_invalid(&text, "agent.api_base", 3);
    assert!(!message.contains("pass@"), "{message}");
}

const PLUGINS: &str = r#"
[agent]
api_base = "http://127.0.0.1:8080"
api_key_env = "K"

[state]
dir = "state"

[[plugins]]
id = "low"
path = "low.wasm"

[[plugins]]
id = "off"
path = "off.wasm"
enabled = false

[[plugins]]
id = "high"
path = "high.wasm"
priority = 10
failure_policy = "closed"

[plugins.grants]
send = true
kv = true
history = true
http_allowed_hosts = ["api.example.com", "127.0.0.1:9000"]
send_per_minute = 30
kv_max_bytes = 4096

[[plugins]]
id = "also-low"
path = "also.wasm"
"#;

#[test]
fn plugins_run_by_priority_then_file_order_with_their_grants() {
    let config = parse_str(PLUGINS).expect("valid");
    let ids: Vec<&str> = config.plugins.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["high", "low", "also-low"], "disabled entries are left out");
    let high = &config.plugins[0];
    assert_eq!(high.failure_policy, crate::plugins::FailurePolicy::Closed);
    let caps = &high.grants.capabilities;
    assert!(caps.send && caps.kv && caps.history && !caps.timers);
    assert_eq!(caps.http_allowed_hosts, ["api.example.com", "127.0.0.1:9000"]);
    assert_eq!((high.grants.send_per_minute, high.grants.kv_max_bytes), (30, 4096));
    let low = &config.plugins[1];
    assert_eq!(low.grants, crate::plugins::Grants::default(), "nothing granted by default");
    assert_eq!(low.failure_policy, crate::plugins::FailurePolicy::Open);
}

#[test]
fn bad_grants_and_policies_name_the_key() {
    let bad_host = PLUGINS.replace("\"api.example.com\",", "\"https://api.example.com/v1\",");
    let message = check_invalid(&bad_host, "plugins.grants.http_allowed_hosts", 24);
    assert!(message.contains("without scheme, path or wildcards"), "{message}");
    let bad_rate = PLUGINS.replace("send_per_minute = 30", "send_per_minute = 0");
    check_invalid(&bad_rate, "plugins.grants.send_per_minute", 24);
    let bad_policy = PLUGINS.replace("\"closed\"", "\"sometimes\"");
    let message = check_invalid(&bad_policy, "plugins.failure_policy", 22);
    assert!(message.contains("\"open\"") && message.contains("\"closed\""), "{message}");
    let unknown = PLUGINS.replace("kv = true", "kv = true\nfilesystem = true");
    assert!(parse_str(&unknown).is_err(), "an unknown grant is an error, not ignored");
}

#[test]
fn a_plugin_needs_a_path_or_a_manifest() {
    let text = PLUGINS.replace("id = \"low\"\npath = \"low.wasm\"", "id = \"low\"");
    let message = check_invalid(&text, "plugins.path", 9);
    assert!(message.contains("`manifest`"), "{message}");

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("agentchat-plugin.toml");
    std::fs::write(
        &manifest,
        "id = \"low\"\nversion = \"0.1.0\"\napi = \"agentchat:plugin@0.1.0\"\n\
         component = \"build/low.wasm\"\nhooks = [\"inbound\"]\n",
    )
    .expect("write manifest");
    let text = text
        .replace("id = \"low\"", &format!("id = \"low\"\nmanifest = \"{}\"", manifest.display()));
    let config = parse_str(&text).expect("valid");
    let low = config.plugins.iter().find(|p| p.id == "low").expect("low");
    assert_eq!(low.path, dir.path().join("build/low.wasm"), "path taken from the manifest");
    assert!(low.manifest.is_some());

    std::fs::write(&manifest, "id = \"low\"\n").expect("break manifest");
    let message = check_invalid(&text, "plugins.manifest", 11);
    assert!(message.contains("agentchat-plugin.toml"), "{message}");
}

#[test]
fn a_bearer_token_is_read_from_its_file_for_a_granted_host_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("llm-token");
    std::fs::write(&token_file, "sk-secret-value\n").expect("token");
    let with_bearer = |host: &str, file: &str| {
        PLUGINS.replace(
            "kv_max_bytes = 4096",
            &format!(
                "kv_max_bytes = 4096\nhttp_bearer_host = \"{host}\"\nhttp_bearer_file = \"{file}\""
            ),
        )
    };
    let text = with_bearer("api.example.com", &token_file.display().to_string());
    let config = parse_str(&text).expect("valid");
    let bearer = config.plugins[0].grants.http_bearer.as_ref().expect("bearer");
    assert_eq!(bearer.host, "api.example.com");
    assert_eq!(bearer.token.expose(), "sk-secret-value");
    assert!(!format!("{config:?}").contains("sk-secret-value"), "Debug never shows it");

    let message = check_invalid(
        &with_bearer("other.example.com", &token_file.display().to_string()),
        "plugins.grants.http_bearer_host",
        24,
    );
    assert!(message.contains("http_allowed_hosts"), "{message}");
    std::fs::write(&token_file, "two words\n").expect("token");
    let message = check_invalid(&text, "plugins.grants.http_bearer_file", 24);
    assert!(!message.contains("words"), "the contents are never echoed: {message}");
    let only_host =
        PLUGINS.replace("kv_max_bytes = 4096", "kv_max_bytes = 4096\nhttp_bearer_host = \"x\"");
    check_invalid(&only_host, "plugins.grants.http_bearer_host", 24);
}
