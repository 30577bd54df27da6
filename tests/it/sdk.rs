//! The official Python SDK (`agentchatme`, pinned by scripts/test) as the daemon's peer: if the
//! SDK sees anything wrong, the test fails. It needs AGENTCHATD_TEST_PYTHON to name a Python
//! with the SDK installed; scripts/test sets it up.

use std::process::Stdio;
use std::time::Duration;

use agentchatd::config::Transport;
use agentchatd::server::ServerConfig;

use crate::harness::{AGENT, Daemon, World, plugin};
use crate::support::{echo_plugin_path, repo_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_peer_gets_every_reply_in_order_and_drains_through_sync() {
    let python = std::env::var("AGENTCHATD_TEST_PYTHON").expect(
        "AGENTCHATD_TEST_PYTHON must name a Python with agentchatme installed; run scripts/test",
    );
    let server_config = ServerConfig::default();
    let code = server_config.verification_code.clone();
    let world = World::start_with(server_config).await;
    let daemon =
        Daemon::spawn(world.config(Transport::Websocket, vec![plugin("echo", echo_plugin_path())]));

    let base = world.server.base_url();
    let ws_base = base.replacen("http://", "ws://", 1);
    let child = tokio::process::Command::new(python)
        .arg(repo_root().join("tests/sdk/sdk_peer.py"))
        .args(["--api-base", &base, "--ws-base", &ws_base, "--agent", AGENT, "--code", &code])
        .args(["--count", "20", "--offline", "3", "--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the SDK peer finishes within 120 s")
        .expect("the SDK peer runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SDK peer failed:\n{stdout}\n{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("summary line");
    assert_eq!(summary["live_replies"], 20);
    assert_eq!(summary["acked"], 3);
    daemon.stop().await;
}
