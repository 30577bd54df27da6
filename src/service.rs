//! The running daemon: loads what the config names, identifies the agent, then runs the inbox
//! and the outbox as two tracked tasks until shutdown or a fatal error.
//!
//! Startup order matters: the key, the store and the plugins are checked before anything
//! touches the network, so a broken install fails at once with a clear message. The server
//! being unreachable is not an error; the daemon waits for it with backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::ws::WsOptions;
use crate::client::{Client, Disposition};
use crate::config::{Config, ConfigError, Transport};
use crate::inbox::poll::Poller;
use crate::inbox::websocket::{WsEnd, WsInbox};
use crate::inbox::{InboxError, Processor};
use crate::outbox::{Backoff, Outbox, OutboxError, OutboxSettings, Priority, RateLimiter};
use crate::plugins::{PluginError, PluginHost, PluginSpec};
use crate::store::{Store, StoreError};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The configuration or the key it points to is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state store could not be opened or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The server refused the credentials; the operator must act.
    #[error("{0}; check the API key (and whether the agent is suspended), then restart")]
    Auth(String),
    /// A task died unexpectedly.
    #[error("{0}")]
    Task(String),
}

impl From<InboxError> for ServiceError {
    fn from(err: InboxError) -> Self {
        match err {
            InboxError::Store(err) => Self::Store(err),
            InboxError::Fatal(msg) => Self::Auth(msg),
        }
    }
}

impl From<OutboxError> for ServiceError {
    fn from(err: OutboxError) -> Self {
        match err {
            OutboxError::Store(err) => Self::Store(err),
            OutboxError::Fatal(err) => Self::Auth(err.to_string()),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled or a fatal error occurs.
///
/// # Errors
/// On a bad key or config, a store failure, a plugin that cannot load, or refused credentials.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServiceError> {
    let key = config.api_key.load()?;
    let store = Store::open(&config.state_dir)?;
    let specs = config
        .plugins
        .iter()
        .map(|p| PluginSpec {
            id: p.id.clone(),
            path: p.path.clone(),
            config_json: p.config_json.clone(),
            timeout: p.timeout,
            memory_limit_bytes: p.memory_limit_bytes,
        })
        .collect();
    let plugins =
        Arc::new(PluginHost::load(specs, Some(config.state_dir.join("plugin-cache"))).await?);
    tracing::info!(plugins = ?plugins.plugin_ids(), state = %store.path().display(), "loaded");

    let client = Client::new(&config.api_base, key.clone())?;
    let limiter =
        Arc::new(RateLimiter::per_second(config.requests_per_second, config.window_margin));
    let Some(me) = identify(&client, &limiter, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(agent = %me, api = %config.api_base, "agent identified");

    let wake = Arc::new(Notify::new());
    let processor = Processor::new(store.clone(), plugins, me, Arc::clone(&wake));
    let tasks = TaskTracker::new();
    let stop = shutdown.child_token();

    let outbox = Outbox::new(
        store.clone(),
        client.clone(),
        Arc::clone(&limiter),
        wake,
        OutboxSettings {
            cold_threads_per_day: config.cold_threads_per_day,
            max_attempts: config.max_attempts,
            retry_initial: config.retry_initial,
            ..OutboxSettings::default()
        },
    );
    let outbox_stop = stop.clone();
    let outbox_task = tasks.spawn(async move {
        let result = outbox.run(outbox_stop.clone()).await;
        outbox_stop.cancel();
        result
    });

    let inbox_stop = stop.clone();
    let inbox_task = tasks.spawn(async move {
        let result =
            run_inbox(&config, &processor, &client, &store, &limiter, &key, &inbox_stop).await;
        inbox_stop.cancel();
        result
    });
    tasks.close();

    let inbox_result = inbox_task.await.map_err(|err| ServiceError::Task(err.to_string()))?;
    let outbox_result = outbox_task.await.map_err(|err| ServiceError::Task(err.to_string()))?;
    tasks.wait().await;
    inbox_result?;
    outbox_result?;
    tracing::info!("stopped");
    Ok(())
}

async fn run_inbox(
    config: &Config,
    processor: &Processor,
    client: &Client,
    store: &Store,
    limiter: &Arc<RateLimiter>,
    key: &crate::config::ApiKey,
    shutdown: &CancellationToken,
) -> Result<(), InboxError> {
    let poller = Poller { processor, client, store, limiter, interval: config.poll_interval };
    if config.transport == Transport::Poll {
        return poller.run(shutdown).await;
    }
    let ws = WsInbox {
        processor,
        store,
        limiter,
        url: &config.ws_url,
        key,
        options: WsOptions::default(),
        allow_unsupported: config.transport == Transport::Auto,
    };
    match ws.run(shutdown).await? {
        WsEnd::Shutdown => Ok(()),
        WsEnd::Unsupported => poller.run(shutdown).await,
    }
}

/// Asks the server who we are, waiting out network trouble. `None` when shut down first.
async fn identify(
    client: &Client,
    limiter: &RateLimiter,
    shutdown: &CancellationToken,
) -> Result<Option<String>, ServiceError> {
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
        .expect("constant bounds are valid");
    let mut attempt = 0;
    loop {
        limiter.acquire(Priority::Normal).await;
        let result = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            result = client.me() => result,
        };
        let err = match result {
            Ok(me) => return Ok(Some(me.handle)),
            Err(err) => err,
        };
        if err.disposition() == Disposition::Fatal {
            return Err(ServiceError::Auth(err.to_string()));
        }
        attempt += 1;
        let pause = err.retry_after().unwrap_or_else(|| backoff.delay(attempt));
        tracing::warn!(error = %err, retry_in_ms = pause.as_millis(), "server not reachable yet");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(pause) => {}
        }
    }
}
