//! The running daemon: loads what the config names, identifies the agent, then runs the inbox,
//! the outbox and the service helpers (readiness, watchdog, metrics, reload) as tracked tasks
//! until shutdown or a fatal error.
//!
//! Startup order matters: the key, the instance lock, the store and the plugins are checked
//! before anything touches the network, so a broken install fails at once with a clear message.
//! The server being unreachable is not an error; the daemon waits for it with backoff.
//!
//! Shutdown order matters too: intake stops first (the message being handled finishes and is
//! acknowledged), then queued sends may still go out for `service.stop_flush_ms`, then the
//! outbox finishes what is in flight and everything else stops. Whatever was not sent stays
//! queued in the store for the next start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::ws::WsOptions;
use crate::client::{Client, Disposition};
use crate::config::{self, ApiKey, Config, ConfigError, Transport};
use crate::inbox::poll::Poller;
use crate::inbox::websocket::{WsEnd, WsInbox};
use crate::inbox::{InboxError, Processor};
use crate::ops::health::{Heartbeat, Readiness};
use crate::ops::http::{self, HttpError, OpsState};
use crate::ops::lock::{InstanceLock, LockError};
use crate::ops::metrics::Metrics;
use crate::ops::notify::Notifier;
use crate::ops::watchdog;
use crate::outbox::{
    Backoff, COLD_WINDOW, Outbox, OutboxError, OutboxSettings, Priority, RateLimiter, now_ms,
};
use crate::plugins::{
    HostServices, PacedApi, PluginError, PluginHost, PluginSet, PluginSetup, PluginSpec,
    StartReason, StopReason,
};
use crate::store::{Store, StoreError};

/// Names of the loops the heartbeat watches.
pub const INBOX_LOOP: &str = "inbox";
/// See [`INBOX_LOOP`].
pub const OUTBOX_LOOP: &str = "outbox";

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The configuration or the key it points to is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another daemon uses the same state directory.
    #[error(transparent)]
    Locked(#[from] LockError),
    /// The state store could not be opened or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The metrics and health endpoint could not be served.
    #[error(transparent)]
    Ops(#[from] HttpError),
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

/// How the outside world steers a running daemon.
pub struct Controls {
    /// Cancelled to stop the daemon gracefully.
    pub shutdown: CancellationToken,
    /// Each message asks for a reload of the config file at `config_path`.
    pub reload: Option<mpsc::Receiver<()>>,
    /// The config file, re-read on reload.
    pub config_path: Option<PathBuf>,
    /// Tells systemd about readiness, status, reloads and the stop.
    pub notifier: Notifier,
    /// How often to ping systemd's watchdog (already half of `WatchdogSec=`), if it asks.
    pub watchdog: Option<Duration>,
}

impl Controls {
    /// Controls with only a shutdown token: no reloads, no systemd.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            reload: None,
            config_path: None,
            notifier: Notifier::disabled(),
            watchdog: None,
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled or a fatal error occurs.
///
/// # Errors
/// See [`run_with`].
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServiceError> {
    run_with(config, Controls::new(shutdown)).await
}

/// Runs the daemon with systemd integration and reloads.
///
/// # Errors
/// On a bad key or config, a held state directory, a store failure, a plugin that cannot load,
/// an endpoint address that cannot be bound, or credentials the server refuses.
pub async fn run_with(config: Config, controls: Controls) -> Result<(), ServiceError> {
    let Controls { shutdown, reload, config_path, notifier, watchdog } = controls;
    let status = StatusLine(notifier.clone());
    status.set("starting");
    let key = config.api_key.load()?;
    let lock = InstanceLock::acquire(&config.state_dir)?;
    let store = Store::open(&config.state_dir)?;
    let client = Client::new(&config.api_base, key.clone())?;
    let limiter =
        Arc::new(RateLimiter::per_second(config.requests_per_second, config.window_margin));
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::new());
    let services = HostServices {
        store: Some(store.clone()),
        api: Some(PacedApi { client: client.clone(), limiter: Arc::clone(&limiter) }),
        outbox_wake: Some(Arc::clone(&wake)),
        metrics: Some(Arc::clone(&metrics)),
        send_windows: crate::plugins::SendWindows::default(),
    };
    status.set("loading plugins");
    let plugins = Arc::new(load_plugins(&config, &services).await?);
    tracing::info!(plugins = ?plugins.plugin_ids(), state = %store.path().display(), "loaded");

    let telemetry = OpsState {
        metrics,
        heartbeat: Heartbeat::new(config.stall_limit),
        readiness: Readiness::new(["plugins", INBOX_LOOP]),
    };
    telemetry.readiness.mark_ready("plugins");
    let aux_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let ops_server = match config.ops_listen {
        Some(addr) => Some(http::start(addr, telemetry.clone(), aux_stop.clone()).await?),
        None => None,
    };
    if let Some(every) = watchdog {
        let (notifier, heartbeat) = (notifier.clone(), telemetry.heartbeat.clone());
        tasks.spawn(watchdog::run(notifier, heartbeat, every, aux_stop.clone()));
    }

    status.set(&format!("connecting to {}", config.api_base));
    let Some(me) = identify(&client, &limiter, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(agent = %me, api = %config.api_base, "agent identified");
    plugins.start(&me, StartReason::Boot).await;

    let processor = Arc::new(
        Processor::new(
            store.clone(),
            plugins,
            me.clone(),
            Arc::clone(&wake),
            Arc::clone(&telemetry.metrics),
        )
        .with_loop_guard(config.loop_guard),
    );
    let plugin_set = processor.plugin_set();
    let timers = Timers::new(aux_stop.clone(), tasks.clone());
    timers.restart(plugin_set.current());
    telemetry.heartbeat.register(INBOX_LOOP);
    telemetry.heartbeat.register(OUTBOX_LOOP);

    let outbox_stop = CancellationToken::new();
    let mut outbox_task = {
        let settings = OutboxSettings {
            cold_threads_per_day: config.cold_threads_per_day,
            max_attempts: config.max_attempts,
            retry_initial: config.retry_initial,
            ..OutboxSettings::default()
        };
        let outbox =
            Outbox::new(store.clone(), client.clone(), Arc::clone(&limiter), wake, settings)
                .with_telemetry(telemetry.clone())
                .with_plugins(plugin_set.clone());
        let stop = outbox_stop.clone();
        tasks.spawn(async move { outbox.run(stop).await.map_err(ServiceError::from) })
    };
    let inbox_stop = CancellationToken::new();
    let mut inbox_task = {
        let inbox = Inbox {
            config: config.clone(),
            processor: Arc::clone(&processor),
            client: client.clone(),
            store: store.clone(),
            limiter: Arc::clone(&limiter),
            key,
            telemetry: telemetry.clone(),
        };
        let stop = inbox_stop.clone();
        tasks.spawn(async move { inbox.run(&stop).await })
    };
    tasks.spawn(announce_ready(
        telemetry.readiness.clone(),
        status.clone(),
        me.clone(),
        aux_stop.clone(),
    ));
    tasks.spawn(refresh_gauges(
        store.clone(),
        telemetry.clone(),
        plugin_set.clone(),
        aux_stop.clone(),
    ));
    if let (Some(reload), Some(path)) = (reload, config_path) {
        let reloader = Reloader {
            path,
            running: config.clone(),
            processor,
            status: status.clone(),
            services,
            me: me.clone(),
            timers,
        };
        tasks.spawn(reloader.run(reload, aux_stop.clone()));
    }
    tasks.close();

    // Wait for a stop request or for a loop to end on its own (always an error or a refusal).
    let early_end = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut inbox_task => Some(("inbox", result)),
        result = &mut outbox_task => Some(("outbox", result)),
    };
    status.stopping();
    tracing::info!("stopping: intake first, then the queue");
    telemetry.readiness.mark_not_ready("shutdown", "stopping");
    let mut first_error: Option<ServiceError> = None;

    inbox_stop.cancel();
    let (inbox_done, outbox_done) = match early_end {
        Some(("inbox", result)) => (Some(result), None),
        Some((_, result)) => (None, Some(result)),
        None => (None, None),
    };
    let inbox_result = match inbox_done {
        Some(result) => result,
        None => (&mut inbox_task).await,
    };
    keep_first_error(&mut first_error, inbox_result);
    telemetry.heartbeat.unregister(INBOX_LOOP);

    let outbox_result = match outbox_done {
        Some(result) => result,
        None => {
            if first_error.is_none() {
                flush(&store, config.stop_flush, &status).await;
            }
            outbox_stop.cancel();
            (&mut outbox_task).await
        }
    };
    keep_first_error(&mut first_error, outbox_result);
    telemetry.heartbeat.unregister(OUTBOX_LOOP);

    aux_stop.cancel();
    plugin_set.current().stop(StopReason::Shutdown).await;
    if let Some(server) = ops_server
        && let Err(err) = server.stopped().await
    {
        tracing::warn!(error = %err, "metrics endpoint did not stop cleanly");
    }
    tasks.wait().await;
    drop(lock);
    match first_error {
        Some(err) => Err(err),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

fn keep_first_error(
    first: &mut Option<ServiceError>,
    result: Result<Result<(), ServiceError>, tokio::task::JoinError>,
) {
    let result = result.map_err(|err| ServiceError::Task(err.to_string())).and_then(|r| r);
    if let Err(err) = result
        && first.is_none()
    {
        *first = Some(err);
    }
}

/// Forwards status text to systemd; failures only matter at debug level, because systemd acts
/// on missing readiness and watchdog pings on its own.
#[derive(Clone)]
struct StatusLine(Notifier);

impl StatusLine {
    fn set(&self, text: &str) {
        if let Err(err) = self.0.status(text) {
            tracing::debug!(error = %err, "cannot send status to systemd");
        }
    }

    fn ready(&self) {
        if let Err(err) = self.0.ready() {
            tracing::warn!(error = %err, "cannot tell systemd we are ready");
        }
    }

    fn reloading(&self) {
        if let Err(err) = self.0.reloading() {
            tracing::debug!(error = %err, "cannot tell systemd we are reloading");
        }
    }

    fn stopping(&self) {
        self.set("stopping");
        if let Err(err) = self.0.stopping() {
            tracing::debug!(error = %err, "cannot tell systemd we are stopping");
        }
    }
}

/// The plugins of `config` as the host takes them, in priority order.
pub fn plugin_setups(config: &Config) -> Vec<PluginSetup> {
    config
        .plugins
        .iter()
        .map(|p| {
            let spec = PluginSpec {
                config_json: p.config_json.clone(),
                timeout: p.timeout,
                memory_limit_bytes: p.memory_limit_bytes,
                ..PluginSpec::new(p.id.clone(), p.path.clone())
            };
            let mut setup = PluginSetup::from(spec)
                .with_all_grants(p.grants.clone())
                .with_failure_policy(p.failure_policy);
            setup.manifest.clone_from(&p.manifest);
            setup
        })
        .collect()
}

async fn load_plugins(config: &Config, services: &HostServices) -> Result<PluginHost, PluginError> {
    let cache = Some(config.state_dir.join("plugin-cache"));
    PluginHost::load_with(plugin_setups(config), cache, services.clone()).await
}

/// Checks that every plugin of `config` loads: files, manifests, grants, config schemas and
/// exports, exactly as the daemon will at start, without touching the state directory.
///
/// # Errors
/// The first plugin that would not load, and why.
pub async fn check_plugins(config: &Config) -> Result<Vec<String>, PluginError> {
    let host = PluginHost::load(plugin_setups(config), None).await?;
    Ok(host.plugin_ids())
}

/// The timer tasks of the plugin set in use; a reload restarts them with the new set.
struct Timers {
    parent: CancellationToken,
    tasks: TaskTracker,
    current: std::sync::Mutex<CancellationToken>,
}

impl Timers {
    fn new(parent: CancellationToken, tasks: TaskTracker) -> Self {
        let current = std::sync::Mutex::new(parent.child_token());
        Self { parent, tasks, current }
    }

    /// Stops the running timers and starts those of `host`.
    fn restart(&self, host: Arc<PluginHost>) {
        let token = self.parent.child_token();
        let old = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            token.clone(),
        );
        old.cancel();
        let timers = host.timers();
        if !timers.is_empty() {
            tracing::info!(timers = timers.len(), "plugin timers started");
            self.tasks.spawn(host.run_timers(token));
        }
    }
}

/// Tells systemd READY=1 once plugins are loaded and the inbox is connected, and again after
/// the inbox comes back.
async fn announce_ready(
    readiness: Readiness,
    status: StatusLine,
    me: String,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = readiness.wait_ready() => {
            status.ready();
            status.set(&format!("serving @{me}"));
        }
    }
}

/// Keeps the queue gauges current for `/metrics`.
async fn refresh_gauges(
    store: Store,
    telemetry: OpsState,
    plugins: PluginSet,
    stop: CancellationToken,
) {
    let window_ms = i64::try_from(COLD_WINDOW.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_plugin_status = String::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // `agentchatd status` runs in another process and reads this from the store; it is
        // written only when it changes, since every write is a synced commit.
        let plugin_status = crate::admin::encode_plugin_status(&plugins.current().status());
        if plugin_status != last_plugin_status
            && store.set_meta(crate::admin::PLUGIN_STATUS_KEY, plugin_status.clone()).await.is_ok()
        {
            last_plugin_status = plugin_status;
        }
        if let Ok(counts) = store.outbox_counts().await {
            let metrics = &telemetry.metrics;
            metrics.outbox_depth.set(i64::try_from(counts.pending).unwrap_or(i64::MAX));
            metrics.dead_letters.set(i64::try_from(counts.dead).unwrap_or(i64::MAX));
        }
        if let Ok(threads) = store.awaiting_threads(now_ms() - window_ms).await {
            telemetry.metrics.cold_slots_used.set_count(threads.len());
        }
    }
}

/// Lets queued sends go out after intake stopped, until the queue has nothing due or the
/// deadline passes.
async fn flush(store: &Store, deadline: Duration, status: &StatusLine) {
    if deadline.is_zero() {
        return;
    }
    status.set("stopping: sending what is queued");
    let until = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < until {
        match store.due_sends(now_ms(), 1).await {
            Ok(due) if due.is_empty() => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(err) => {
                tracing::warn!(error = %err, "cannot check the queue while stopping");
                return;
            }
        }
    }
    tracing::warn!(deadline_ms = deadline.as_millis(), "stopping with sends still queued");
}

/// The inbox task: the WebSocket or polling, as configured.
struct Inbox {
    config: Config,
    processor: Arc<Processor>,
    client: Client,
    store: Store,
    limiter: Arc<RateLimiter>,
    key: ApiKey,
    telemetry: OpsState,
}

impl Inbox {
    async fn run(self, shutdown: &CancellationToken) -> Result<(), ServiceError> {
        let poller = Poller {
            processor: &self.processor,
            client: &self.client,
            store: &self.store,
            limiter: &self.limiter,
            interval: self.config.poll_interval,
            telemetry: &self.telemetry,
        };
        if self.config.transport == Transport::Poll {
            return Ok(poller.run(shutdown).await?);
        }
        let ws = WsInbox {
            processor: &self.processor,
            store: &self.store,
            limiter: &self.limiter,
            url: &self.config.ws_url,
            key: &self.key,
            options: WsOptions::default(),
            allow_unsupported: self.config.transport == Transport::Auto,
            telemetry: &self.telemetry,
        };
        match ws.run(shutdown).await? {
            WsEnd::Shutdown => Ok(()),
            WsEnd::Unsupported => Ok(poller.run(shutdown).await?),
        }
    }
}

/// Applies a new config on request: plugins are swapped in place; settings that need a
/// restart are named in a warning. A config that does not load, or plugins that do not load,
/// are refused and the running ones stay.
struct Reloader {
    path: PathBuf,
    running: Config,
    processor: Arc<Processor>,
    status: StatusLine,
    services: HostServices,
    me: String,
    timers: Timers,
}

impl Reloader {
    async fn run(mut self, mut requests: mpsc::Receiver<()>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                request = requests.recv() => if request.is_none() { return },
            }
            self.status.reloading();
            let at = crate::outbox::format_ms(crate::outbox::now_ms());
            let outcome = match self.reload().await {
                Ok(summary) => {
                    tracing::info!(%summary, "configuration reloaded");
                    self.status.set(&format!("reloaded: {summary}"));
                    format!("done at {at}: {summary}")
                }
                Err(err) => {
                    tracing::error!(
                        error = %err,
                        "reload refused; the running configuration stays"
                    );
                    self.status.set(&format!("reload refused: {err}"));
                    format!("refused at {at}, the running configuration stays: {err}")
                }
            };
            // `agentchatd status` (another process) reads both at once, not after the next
            // refresh.
            if let Some(store) = &self.services.store {
                let plugins = self.processor.plugin_set().current().status();
                let report = crate::admin::encode_plugin_status(&plugins);
                let written = store.set_meta(crate::admin::PLUGIN_STATUS_KEY, report).await;
                let written =
                    written.and(store.set_meta(crate::admin::LAST_RELOAD_KEY, outcome).await);
                if let Err(err) = written {
                    tracing::warn!(error = %err, "cannot record the reload for `status`");
                }
            }
            self.status.ready();
        }
    }

    async fn reload(&mut self) -> Result<String, ServiceError> {
        let new = config::load(&self.path)?;
        let restart_needed = restart_only_changes(&self.running, &new);
        if !restart_needed.is_empty() {
            tracing::warn!(
                keys = ?restart_needed,
                "these settings change only on restart; the running values stay"
            );
        }
        let summary = if new.plugins == self.running.plugins {
            "plugins unchanged".to_owned()
        } else {
            let host = Arc::new(load_plugins(&new, &self.services).await?);
            let ids = host.plugin_ids();
            // The new set starts before it takes messages; the old one stops after the swap,
            // while calls it already runs finish on it.
            host.start(&self.me, StartReason::Reload).await;
            let old = self.processor.swap_plugins(Arc::clone(&host));
            old.stop(StopReason::Reload).await;
            self.timers.restart(host);
            format!("plugins {ids:?}")
        };
        self.running.plugins = new.plugins;
        Ok(summary)
    }
}

/// The settings a reload cannot apply to a running daemon.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            keys.push(key);
        }
    };
    check(old.api_base != new.api_base, "agent.api_base");
    check(old.ws_url != new.ws_url, "agent.ws_url");
    check(old.api_key != new.api_key, "agent.api_key_file/api_key_env");
    check(old.state_dir != new.state_dir, "state.dir");
    check(old.transport != new.transport, "inbox.transport");
    check(old.poll_interval != new.poll_interval, "inbox.poll_interval_ms");
    check(old.loop_guard != new.loop_guard, "inbox.max_auto_replies_*");
    check(old.requests_per_second != new.requests_per_second, "outbox.requests_per_second");
    check(old.window_margin != new.window_margin, "outbox.window_margin_ms");
    check(old.cold_threads_per_day != new.cold_threads_per_day, "outbox.cold_threads_per_day");
    check(old.max_attempts != new.max_attempts, "outbox.max_attempts");
    check(old.retry_initial != new.retry_initial, "outbox.retry_initial_ms");
    check(old.ops_listen != new.ops_listen, "service.listen");
    check(old.log_json != new.log_json, "log.format");
    keys
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
        if err.disposition() == Disposition::Permanent {
            // Asking who we are cannot be refused for a reason that goes away: the base URL
            // points at something that is not the AgentChat API.
            return Err(ServiceError::Config(ConfigError::Unusable(format!(
                "the server does not answer like the AgentChat API ({err}); check agent.api_base"
            ))));
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
