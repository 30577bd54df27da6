//! Runs the real daemon against the local server for end-to-end tests: a server with two
//! agents, a daemon built from a [`Config`] and a peer that talks to it over REST.

#![allow(dead_code)] // Each test module uses a different subset.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentchatd::client::{Client, Content, Message, SendRequest};
use agentchatd::config::{ApiKey, Config, KeySource, PluginConfig, Transport};
use agentchatd::server::{LocalServer, ServerConfig};
use agentchatd::service::{self, ServiceError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Handle of the daemon's agent.
pub const AGENT: &str = "echo-agent";
/// Handle of the peer that writes to it.
pub const PEER: &str = "alice";

/// A local server with the daemon's agent and a peer registered.
pub struct World {
    pub server: LocalServer,
    pub agent_key: String,
    pub peer: Client,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn start() -> World {
        World::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> World {
        let server = LocalServer::start(config, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("local server starts");
        let agent_key = server.seed_agent(AGENT).await.expect("seed agent");
        let peer_key = server.seed_agent(PEER).await.expect("seed peer");
        let peer = Client::new(&server.base_url(), ApiKey::new(peer_key)).expect("client");
        World { server, agent_key, peer, dir: tempfile::tempdir().expect("tempdir") }
    }

    /// A daemon config for this world with the given transport and plugins.
    pub fn config(&self, transport: Transport, plugins: Vec<PluginConfig>) -> Config {
        daemon_config(&self.server.base_url(), &self.agent_key, self.dir.path(), transport, plugins)
    }

    /// The peer sends `text` to the agent with a given idempotency key.
    pub async fn peer_says(&self, key: &str, text: &str) -> Message {
        let request = SendRequest {
            to: Some(AGENT.into()),
            conversation_id: None,
            client_msg_id: key.into(),
            kind: "text".into(),
            content: Content { text: Some(text.into()), ..Content::default() },
        };
        self.peer.send_message(&request).await.expect("peer send").message
    }

    /// Opens the peer's thread with the agent: the first message of a new thread waits for a
    /// reply before the peer may send more (the platform's cold-thread rule). Returns the
    /// conversation id once the agent has answered.
    pub async fn open_thread(&self) -> String {
        let conversation = self.peer_says("open", "hello").await.conversation_id;
        self.wait_for_replies(&conversation, 1).await;
        conversation
    }

    /// Every message the agent sent in the peer's conversation, oldest first.
    pub async fn replies_seen_by_peer(&self, conversation_id: &str) -> Vec<Message> {
        let mut out = Vec::new();
        let mut after = 0;
        for _ in 0..100 {
            let page = self.peer.history_after(conversation_id, after, 200).await.expect("history");
            let Some(last) = page.last() else { break };
            after = last.seq;
            out.extend(page.into_iter().filter(|m| m.sender == AGENT));
        }
        out
    }

    /// Waits (bounded) until the agent has sent at least `n` messages into the conversation.
    pub async fn wait_for_replies(&self, conversation_id: &str, n: usize) -> Vec<Message> {
        for _ in 0..600 {
            let replies = self.replies_seen_by_peer(conversation_id).await;
            if replies.len() >= n {
                return replies;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = self.replies_seen_by_peer(conversation_id).await.len();
        panic!("waited 30 s for {n} replies, saw {got}");
    }
}

/// Builds a config the way an operator's file would, with the key in a file.
pub fn daemon_config(
    base: &str,
    key: &str,
    dir: &Path,
    transport: Transport,
    plugins: Vec<PluginConfig>,
) -> Config {
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, key).expect("write key");
    let mut config = Config::new(base, KeySource::File(key_file), dir.join("state"));
    config.transport = transport;
    config.poll_interval = Duration::from_millis(50);
    config.plugins = plugins;
    config
}

/// A plugin entry for the config.
pub fn plugin(id: &str, path: PathBuf) -> PluginConfig {
    let mut plugin = PluginConfig::new(id, path);
    plugin.timeout = Duration::from_millis(500);
    plugin
}

/// A running daemon.
pub struct Daemon {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), ServiceError>>,
}

impl Daemon {
    pub fn spawn(config: Config) -> Daemon {
        let stop = CancellationToken::new();
        let task = tokio::spawn(service::run(config, stop.clone()));
        Daemon { stop, task }
    }

    /// Graceful stop; the daemon must end cleanly within 10 s.
    pub async fn stop(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("daemon stops within 10 s")
            .expect("daemon task joins");
        result.expect("daemon stops without error");
    }
}
