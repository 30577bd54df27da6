//! The command line as an operator meets it: exit codes and messages for bad configs.

use std::process::Command;

use crate::support::{echo_plugin_path, repo_root};

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
    // check-config loads the plugin as the daemon would: manifest, exports, config schema.
    let manifest_dir = dir.path().join("plugins/echo");
    std::fs::create_dir_all(&manifest_dir).expect("mkdir");
    std::fs::copy(
        repo_root().join("plugins/echo/agentchat-plugin.toml"),
        manifest_dir.join("agentchat-plugin.toml"),
    )
    .expect("copy manifest");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78), "no key file yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("api-key"));

    std::fs::write(dir.path().join("state/api-key"), "ac_example\n").expect("key");
    let plugin = dir.path().join("plugins/target/wasm32-wasip2/release/echo.wasm");
    std::fs::create_dir_all(plugin.parent().expect("parent")).expect("mkdir");
    std::fs::write(&plugin, b"").expect("plugin placeholder");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78), "an empty file is not a component");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid WebAssembly component"));

    std::fs::copy(echo_plugin_path(), &plugin).expect("copy the built plugin");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A capability the manifest asks for and the entry does not grant is named.
    let manifest = std::fs::read_to_string(manifest_dir.join("agentchat-plugin.toml"))
        .expect("manifest")
        .replace("[limits]", "[capabilities]\nkv = true\n\n[limits]");
    std::fs::write(manifest_dir.join("agentchat-plugin.toml"), manifest).expect("write");
    let out = agentchatd().args(["check-config", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not granted") && stderr.contains("kv"), "{stderr}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_plugins_sighup_refuses_a_broken_config_and_sigterm_stops_cleanly() {
    use tokio::io::AsyncBufReadExt;

    let world = crate::harness::World::start().await;
    let key_file = world.dir.path().join("api-key");
    std::fs::write(&key_file, &world.agent_key).expect("key");
    let path = world.dir.path().join("agentchatd.toml");
    let good = format!(
        "[agent]\napi_base = \"{}\"\napi_key_file = \"{}\"\n[state]\ndir = \"state\"\n\
         [[plugins]]\nid = \"echo\"\npath = \"{}\"\n",
        world.server.base_url(),
        key_file.display(),
        crate::support::echo_plugin_path().display()
    );
    std::fs::write(&path, good).expect("config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentchatd"))
        .args(["run", "--config"])
        .arg(&path)
        .env("AGENTCHATD_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("daemon starts");
    let pid = child.id().expect("pid").to_string();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let log = std::sync::Arc::clone(&log);
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = log.lock().expect("lock");
                log.push_str(&line);
                log.push('\n');
            }
        })
    };

    let conversation = world.open_thread().await;

    // `agentchatd status` shows the plugins the running daemon reports.
    let mut status = String::new();
    for _ in 0..100 {
        let out = agentchatd().args(["status", "--config"]).arg(&path).output().expect("runs");
        status = String::from_utf8_lossy(&out.stdout).into_owned();
        if status.contains("echo: active") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(status.contains("echo: active; hooks inbound"), "{status}");

    // `agentchatd reload` swaps the plugin set: the new config takes effect for new messages.
    let good = std::fs::read_to_string(&path).expect("config");
    let good_with_prefix = format!("{good}config = {{ prefix = \"re: \" }}\n");
    std::fs::write(&path, &good_with_prefix).expect("config");
    let out = agentchatd().args(["reload", "--config"]).arg(&path).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {pid}")));
    for _ in 0..400 {
        if log.lock().expect("lock").contains("configuration reloaded") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    world.peer_says("after-reload", "new prefix?").await;
    let replies = world.wait_for_replies(&conversation, 2).await;
    assert_eq!(replies[1].content.text.as_deref(), Some("re: new prefix?"));
    let status = status_until(&path, "last reload: done at").await;
    assert!(status.contains("last reload: done at"), "{status}");

    std::fs::write(&path, "[agent]\napi_base = 42\n").expect("broken config");
    let out = agentchatd().args(["reload", "--config"]).arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(78), "the CLI refuses a broken config before signalling");
    let hup = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
    assert!(hup.success());
    for _ in 0..400 {
        if log.lock().expect("lock").contains("reload refused") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(log.lock().expect("lock").contains("reload refused"), "{}", log.lock().expect("lock"));
    std::fs::write(&path, &good_with_prefix).expect("config back");
    let status = status_until(&path, "last reload: refused at").await;
    assert!(status.contains("last reload: refused at"), "{status}");
    world.peer_says("after-hup", "still answering?").await;
    let replies = world.wait_for_replies(&conversation, 3).await;
    assert_eq!(replies[2].content.text.as_deref(), Some("re: still answering?"));

    let term = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(term.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .expect("the daemon stops within 20 s")
        .expect("exit status");
    assert_eq!(status.code(), Some(0), "{}", log.lock().expect("lock"));
    let _ = reader.await;
    let log = log.lock().expect("lock");
    assert!(!log.contains(&world.agent_key), "the key never reaches the log");
}

#[test]
fn the_shipped_sample_messages_run_through_plugin_test() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = agentchatd()
        .args(["plugin", "test"])
        .arg(crate::support::echo_plugin_path())
        .args(["--messages", &format!("{root}/examples/messages.json")])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["drafts"][0]["text"], "echo: ping");
    assert_eq!(lines[1]["decision"], "pass");
}

/// `agentchatd status` output once it contains `wanted` (the daemon logs a reload's outcome
/// just before it records it), or the last output after 5 s.
async fn status_until(config: &std::path::Path, wanted: &str) -> String {
    let mut status = String::new();
    for _ in 0..100 {
        let out = agentchatd().args(["status", "--config"]).arg(config).output().expect("runs");
        status = String::from_utf8_lossy(&out.stdout).into_owned();
        if status.contains(wanted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    status
}
