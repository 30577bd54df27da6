//! Outbox pacing benchmark: 50 established conversations keep the daemon replying for a while
//! against the local server enforcing 60 sends per second; reports sustained sends per second
//! and the 429 answers the server gave. Then the official Python SDK's own send loop runs in
//! the same setup for comparison (when AGENTCHATD_BENCH_PYTHON names a Python with the SDK).
//!
//! Run: `cargo bench --bench outbox_pacing` (AGENTCHATD_BENCH_SECS sets the measured span,
//! default 60). Everything binds 127.0.0.1 on OS-assigned ports and stops by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agentchatd::client::{Client, Content, SendRequest};
use agentchatd::config::{ApiKey, Config, KeySource, PluginConfig, Transport};
use agentchatd::server::{LocalServer, ServerConfig};
use agentchatd::store::Store;
use tokio_util::sync::CancellationToken;

const CONVERSATIONS: usize = 50;
/// Aggregate rate at which the peers write to the agent: above the 60/s it may answer.
const FEED_PER_SECOND: f64 = 70.0;

#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let secs: u64 =
        std::env::var("AGENTCHATD_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let echo = root.join("plugins/target/wasm32-wasip2/release/echo.wasm");
    anyhow::ensure!(echo.exists(), "build the echo plugin first: scripts/build-plugins");

    let server = LocalServer::start(ServerConfig::default(), "127.0.0.1:0".parse()?).await?;
    let base = server.base_url();
    let agent_key = server.seed_agent("bench-agent").await?;
    let mut peers = Vec::new();
    for n in 0..CONVERSATIONS {
        let key = server.seed_agent(&format!("peer{n}")).await?;
        peers.push(Client::new(&base, ApiKey::new(key))?);
    }

    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("key"), &agent_key)?;
    let mut config =
        Config::new(&base, KeySource::File(dir.path().join("key")), dir.path().join("state"));
    config.transport = Transport::Websocket;
    config.plugins = vec![PluginConfig::new("echo", echo)];
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(agentchatd::service::run(config.clone(), stop.clone()));

    // Each peer opens its thread; the daemon's answers establish all 50.
    for (n, peer) in peers.iter().enumerate() {
        send(peer, "bench-agent", &format!("open-{n}"), "hello").await?;
    }
    let store = Store::open(&config.state_dir)?;
    wait_for(|| async {
        store.outbox_counts().await.map(|c| c.sent >= CONVERSATIONS as u64).unwrap_or(false)
    })
    .await?;

    // The feed: peers take turns writing, faster than the agent may answer.
    let feeding = Arc::new(AtomicBool::new(true));
    let feeder = {
        let (peers, feeding) = (peers.clone(), Arc::clone(&feeding));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / FEED_PER_SECOND));
            let mut n = 0usize;
            while feeding.load(Ordering::Relaxed) && n < 1_000_000 {
                tick.tick().await;
                let peer = &peers[n % CONVERSATIONS];
                let _ = send(peer, "bench-agent", &format!("feed-{n}"), "more").await;
                n += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let limited_before = server.send_stats().rate_limited.load(Ordering::Relaxed);
    let sent_before = store.outbox_counts().await?.sent;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let sent = store.outbox_counts().await?.sent - sent_before;
    let limited = server.send_stats().rate_limited.load(Ordering::Relaxed) - limited_before;
    feeding.store(false, Ordering::Relaxed);
    let _ = feeder.await;
    stop.cancel();
    daemon.await??;

    println!(
        "| agentchatd outbox | {secs} s | {sent} | {:.2} | {limited} |",
        sent as f64 / elapsed
    );

    if let Ok(python) = std::env::var("AGENTCHATD_BENCH_PYTHON") {
        sdk_loop(&server, &python, secs, root).await?;
    }
    server.shutdown().await;
    Ok(())
}

/// The SDK's send loop: one agent answering 50 established conversations as fast as the SDK
/// lets it, with the SDK's own retry policy.
#[allow(clippy::print_stdout)]
async fn sdk_loop(
    server: &LocalServer,
    python: &str,
    secs: u64,
    root: &std::path::Path,
) -> anyhow::Result<()> {
    let base = server.base_url();
    let agent_key = server.seed_agent("sdk-agent").await?;
    let mut handles = Vec::new();
    for n in 0..CONVERSATIONS {
        let handle = format!("sdkpeer{n}");
        let key = server.seed_agent(&handle).await?;
        let peer = Client::new(&base, ApiKey::new(key))?;
        // The peer writes first, so the agent's thread is established.
        send(&peer, "sdk-agent", "open", "hello").await?;
        handles.push(handle);
    }
    let limited_before = server.send_stats().rate_limited.load(Ordering::Relaxed);
    let output = tokio::process::Command::new(python)
        .arg(root.join("benches/sdk_send_loop.py"))
        .args(["--api-base", &base, "--key", &agent_key, "--secs", &secs.to_string()])
        .args(["--peers", &handles.join(",")])
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "sdk loop failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let limited = server.send_stats().rate_limited.load(Ordering::Relaxed) - limited_before;
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    println!(
        "| Python SDK 1.1.1 send loop | {secs} s | {} | {:.2} | {limited} (SDK errors raised: {}) |",
        summary["sent"],
        summary["per_second"].as_f64().unwrap_or(0.0),
        summary["errors"]
    );
    Ok(())
}

async fn send(peer: &Client, to: &str, key: &str, text: &str) -> anyhow::Result<()> {
    let request = SendRequest {
        to: Some(to.into()),
        conversation_id: None,
        client_msg_id: key.into(),
        kind: "text".into(),
        content: Content { text: Some(text.into()), ..Content::default() },
    };
    peer.send_message(&request).await?;
    Ok(())
}

async fn wait_for<F, Fut>(check: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1200 {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("setup did not finish within 60 s")
}
