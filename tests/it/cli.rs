//! The command line as an operator meets it: exit codes and messages for bad configs.

use std::process::Command;

fn agentchatd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agentchatd"))
}

#[test]
fn check_config_names_the_bad_key_and_line_and_exits_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agentchatd.toml");
    std::fs::write(
        &path,
        "[agent]\napi_base = \"ftp://example\"\napi_key_env = \"K\"\n[state]\ndir = \"s\"\n",
    )
    .expect("write");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":2: `agent.api_base`"), "{stderr}");
}

#[test]
fn check_config_accepts_the_shipped_example_when_its_key_exists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/agentchatd.toml"))
        .expect("example config");
    let path = dir.path().join("agentchatd.toml");
    std::fs::write(&path, example).expect("write");
    std::fs::create_dir_all(dir.path().join("state")).expect("mkdir");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78), "no key file yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("api-key"));

    std::fs::write(dir.path().join("state/api-key"), "ac_example\n").expect("key");
    // Only the file's presence is checked here; the plugin itself is tested elsewhere.
    let plugin = dir.path().join("plugins/target/wasm32-wasip2/release/echo.wasm");
    std::fs::create_dir_all(plugin.parent().expect("parent")).expect("mkdir");
    std::fs::write(&plugin, b"").expect("plugin placeholder");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn run_with_a_missing_config_file_exits_78() {
    let out = agentchatd()
        .args(["run", "--config", "/nonexistent/agentchatd.toml"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agentchatd.toml"));
}

#[test]
fn check_config_refuses_a_missing_plugin_file_with_the_build_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agentchatd.toml");
    std::fs::write(dir.path().join("key"), "ac_x").expect("key");
    std::fs::write(
        &path,
        "[agent]\napi_base = \"http://127.0.0.1:9\"\napi_key_file = \"key\"\n[state]\n\
         dir = \"s\"\n[[plugins]]\nid = \"echo\"\npath = \"missing.wasm\"\n",
    )
    .expect("write");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugin `echo`") && stderr.contains("scripts/build-plugins"),
        "{stderr}"
    );
}

#[test]
fn an_api_base_with_the_version_path_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agentchatd.toml");
    std::fs::write(
        &path,
        "[agent]\napi_base = \"http://127.0.0.1:9/v1\"\napi_key_env = \"K\"\n[state]\ndir = \"s\"\n",
    )
    .expect("write");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without the /v1 path"));
}
