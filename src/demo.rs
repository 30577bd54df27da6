//! `agentchatd demo`: the whole product on one machine, with nothing to set up.
//!
//! It starts the local AgentChat-compatible server on a loopback port, creates the daemon's
//! agent and a peer, runs the daemon with the configured plugins, has the peer send a few
//! messages over the REST API and prints every reply the peer receives on its own WebSocket.
//! Then it keeps running (so other clients, such as the official SDKs, can talk to the agent)
//! until Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::client::ws::{self, Event, WsOptions};
use crate::client::{Client, Content, SendRequest};
use crate::config::{ApiKey, Config, KeySource, PluginConfig, Transport, derive_ws_url};
use crate::server::{LocalServer, ServerConfig};
use crate::service;

/// What the demo runs.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The reply plugin to run (a WASM component).
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release/echo.wasm")]
    pub plugin: PathBuf,
    /// How many messages the peer sends.
    #[arg(long, default_value_t = 3)]
    pub messages: u32,
    /// Exit after the exchange instead of running until Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

/// Handle of the daemon's agent in the demo.
const AGENT: &str = "echo-agent";
/// Handle of the scripted peer.
const PEER: &str = "alice";

/// Runs the demo until `shutdown` (or after the exchange with `--once`).
///
/// # Errors
/// When the plugin is missing, the server cannot start, or the exchange does not complete.
#[allow(clippy::print_stdout)]
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !args.plugin.exists() {
        bail!(
            "plugin {} not found; build it with `cargo build --release --target wasm32-wasip2 \
             --manifest-path plugins/Cargo.toml` or pass --plugin",
            args.plugin.display()
        );
    }
    let state = tempdir()?;
    let server = LocalServer::start(ServerConfig::default(), "127.0.0.1:0".parse()?)
        .await
        .context("while starting the local server")?;
    let agent_key = server.seed_agent(AGENT).await.context("while creating the agent")?;
    let peer_key = ApiKey::new(server.seed_agent(PEER).await.context("while creating the peer")?);
    let key_file = state.join("api-key");
    std::fs::write(&key_file, &agent_key).context("while writing the agent's key file")?;
    println!("local AgentChat server on {}", server.base_url());

    let mut config =
        Config::new(&server.base_url(), KeySource::File(key_file), state.join("state"));
    config.transport = Transport::Websocket;
    config.plugins = vec![PluginConfig::new("echo", args.plugin.clone())];
    let daemon_stop = shutdown.child_token();
    let daemon = tokio::spawn(service::run(config, daemon_stop.clone()));

    let base = server.base_url();
    let exchange = exchange(&base, &peer_key, args.messages);
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        result = tokio::time::timeout(Duration::from_secs(60), exchange) => {
            result.context("the exchange did not complete within 60 s").and_then(|r| r)
        }
    };
    if result.is_ok() && !args.once && !shutdown.is_cancelled() {
        println!(
            "the agent @{AGENT} keeps answering at {}; register more agents there with the \
             dev verification code {} (see the README); press Ctrl-C to stop",
            server.base_url(),
            ServerConfig::default().verification_code
        );
        shutdown.cancelled().await;
    }
    daemon_stop.cancel();
    let daemon_result = daemon.await.context("daemon task failed")?;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&state);
    result?;
    daemon_result.context("the daemon stopped with an error")?;
    Ok(())
}

/// The peer sends `count` messages, each after the reply to the one before: a new thread
/// allows one message until the other side answers, as on the real platform.
#[allow(clippy::print_stdout)]
async fn exchange(base: &str, key: &ApiKey, count: u32) -> anyhow::Result<()> {
    let client = Client::new(base, key.clone())?;
    let mut socket = ws::connect(&derive_ws_url(base), key, WsOptions::default())
        .await
        .context("the peer could not open its websocket")?;
    for n in 1..=count {
        let text = format!("hello #{n} from {PEER}");
        let request = SendRequest {
            to: Some(AGENT.into()),
            conversation_id: None,
            client_msg_id: format!("demo-{n}"),
            kind: "text".into(),
            content: Content { text: Some(text.clone()), ..Content::default() },
        };
        client.send_message(&request).await.context("the peer's send failed")?;
        println!("{PEER} -> {AGENT}: {text}");
        loop {
            match socket.next_event().await.context("the peer's websocket failed")? {
                Event::Message(message) => {
                    socket.ack(&message.id).await?;
                    let text = message.content.text.unwrap_or_default();
                    println!("{} -> {PEER}: {text}", message.sender);
                    break;
                }
                Event::Other(_) | Event::Malformed { .. } => {}
            }
        }
    }
    socket.close().await;
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("agentchatd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("while creating {}", dir.display()))?;
    Ok(dir)
}
