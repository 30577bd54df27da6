//! The WASM plugin host: loads plugins (WebAssembly components of the `agentchat:plugin@0.1.0`
//! API, see `plugins/wit`) and calls their hooks: `lifecycle` (start, stop), `inbound` (a
//! decision per message), `outbound` (before-send, after-send, send-failed) and `timer`.
//!
//! # What a call looks like
//!
//! [`PluginHost::load_with`] compiles every plugin once (or loads it from the on-disk cache) and
//! links it against the host imports: `log`, `config`, `kv`, `messaging`, `history`, `http`
//! ([`imports`]) and WASI p2 with an empty context (no files, environment, arguments or
//! sockets; stdout and stderr go to the log at debug). Each hook call gets a fresh store with
//! the plugin's memory limit and an epoch deadline equal to its time budget, so a call can
//! never see state left by an earlier one. [`PluginHost::on_message`] asks the plugins one
//! after another; a `Claim` or `Drop` stops the chain, `Pass` and `Reply` go on to the next.
//! [`PluginHost::before_send`] runs the guards in the same order, each seeing the latest
//! rewrite. Only the hooks a plugin's manifest lists are called (without a manifest: `inbound`).
//!
//! # Where the daemon comes in
//!
//! The host queues nothing itself except through `messaging`: inbound decisions are returned
//! to the inbox, which records them with the message; `before-send` verdicts go back to the
//! outbox, the one place every send passes; proactive sends are written to the same queue
//! with an origin and hop count ([`Origin`]) that stop plugins from feeding each other.
//! [`PluginSet`] is what the inbox, the outbox, the timers and the reloader share, so a
//! reload is one swap.
//!
//! # The failure rule
//!
//! A plugin call that traps, times out, hits its memory limit, returns bad output or reports
//! its own error counts as that plugin passing: the failure is logged at warn, later plugins
//! still run, and the message is still acknowledged. Retrying would not help, because a plugin
//! is deterministic over the same message and a retry would only fail again, in a loop.
//! Callers see the failure as a [`Verdict`] whose result is `Err`.
//!
//! # The breaker
//!
//! A plugin whose calls trap, time out, hit the memory limit or return bad output
//! [`BreakerSettings::max_failures`] times within [`BreakerSettings::window`] is suspended for
//! [`BreakerSettings::cooldown`] (defaults: 5 in 60 s, 5 minutes). While suspended its calls
//! return [`CallError::Suspended`] at once, without running the guest, and count as a pass.
//! Suspension is logged at warn, the end of it at info when the next call arrives, and
//! [`PluginHost::status`] shows the state. An error the plugin reports itself does not count:
//! that is the plugin working as designed (an upstream it needs is down, say).
//!
//! # Output limits
//!
//! A draft must set `text` or `data-json` (or both); `text` holds at most
//! [`MAX_TEXT_BYTES`] bytes, `data-json` must be a JSON object, `conversation-id` may not be
//! empty, and one decision carries at most [`MAX_DRAFTS_PER_DECISION`] drafts. Anything else is
//! [`CallError::BadOutput`] and nothing from that call is used.
//!
//! # The compilation cache
//!
//! With a cache directory, compiled components are stored by wasmtime's own cache, keyed by
//! the SHA-256 of the component bytes together with the engine's compilation settings, under a
//! folder named after the wasmtime version. wasmtime writes entries through a temporary file
//! and a rename, and a corrupt entry is recompiled and overwritten. Our crate forbids `unsafe`,
//! and loading precompiled code is unsafe, so the cache stays inside wasmtime; the host only
//! creates the directory with mode 0700, since whoever can write there can run code in the
//! daemon.
//!
//! # Manifests
//!
//! A plugin may come with an `agentchat-plugin.toml` ([`Manifest`]). When a [`PluginSetup`]
//! carries one, the host refuses to start the plugin unless its id matches, every capability
//! it asks for is granted, its declared limits fit the operator's, the operator's config fits
//! its schema and the component exports exactly the hooks it lists. A declared limit smaller
//! than the operator's tightens the call budget.

pub mod authoring;
mod bindings;
mod breaker;
mod call;
mod engine;
mod error;
mod hooks;
mod imports;
mod manifest;
mod schema;
mod validate;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;
use wasmtime::component::{Component, HasSelf, Linker};

pub use breaker::{BreakerSettings, MAX_BREAKER_SPAN};
pub use engine::{EPOCH_TICK, MAX_CONCURRENT_CALLS};
pub use error::{CallError, PluginError};
pub use hooks::{
    Content, FailureClass, MAX_HOPS, Origin, OutboundMessage, STOP_BUDGET, SendFailure,
    SendVerdict, Sent, StartReason, StopReason, Trigger,
};
pub use imports::HTTP_MAX_RESPONSE_BYTES;
pub use manifest::{
    Capabilities, KNOWN_HOOKS, MANIFEST_FILE, Manifest, ManifestError, ManifestLimits, TimerSpec,
};
pub use schema::{ConfigSchema, Violation};
pub use validate::{MAX_DRAFTS_PER_DECISION, MAX_TEXT_BYTES};

use bindings::{Exports, GuestSendDecision};
use breaker::{Breaker, Transition};
use call::{CallState, CallTarget, Hook, HookReturn, PluginConfig, SendScope};
use engine::{EngineSettings, EpochTicker};

/// The WIT package this host implements.
pub const API_VERSION: &str = "agentchat:plugin@0.1.0";

/// Time budget of one call when the operator sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// Memory limit of one call when the operator sets none: 16 MiB.
pub const DEFAULT_MEMORY_LIMIT_BYTES: usize = 16 << 20;

/// Smallest memory limit accepted: one WebAssembly page (64 KiB).
pub const MIN_MEMORY_LIMIT_BYTES: usize = 64 << 10;

/// How to load and run one plugin.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// Unique name of the plugin, used in logs and verdicts.
    pub id: String,
    /// Path of the `.wasm` component.
    pub path: PathBuf,
    /// The operator's config for this plugin: a JSON object (empty text means `{}`).
    pub config_json: String,
    /// Time budget of one call, including instantiation.
    pub timeout: Duration,
    /// Most linear memory one call may use, in bytes.
    pub memory_limit_bytes: usize,
}

impl PluginSpec {
    /// A spec with an empty config and the default limits.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>) -> PluginSpec {
        PluginSpec {
            id: id.into(),
            path: path.into(),
            config_json: String::new(),
            timeout: DEFAULT_TIMEOUT,
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT_BYTES,
        }
    }
}

/// A [`PluginSpec`] with what the operator and the plugin's author add to it: the manifest and
/// the capabilities granted. Every `load` argument converts into one, so plain specs still work.
#[derive(Debug, Clone)]
pub struct PluginSetup {
    /// How to load and run the plugin.
    pub spec: PluginSpec,
    /// The plugin's manifest; without one, none of the manifest checks run and only the
    /// `inbound` hook is called.
    pub manifest: Option<Manifest>,
    /// What the operator grants; nothing by default.
    pub grants: Grants,
    /// What a failed `before-send` call means for the message.
    pub failure_policy: FailurePolicy,
    /// When repeated failures suspend the plugin.
    pub breaker: BreakerSettings,
}

impl From<PluginSpec> for PluginSetup {
    fn from(spec: PluginSpec) -> PluginSetup {
        PluginSetup {
            spec,
            manifest: None,
            grants: Grants::default(),
            failure_policy: FailurePolicy::Open,
            breaker: BreakerSettings::default(),
        }
    }
}

/// The operator's grants to one plugin: capabilities and the quotas that go with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// What the plugin may use.
    pub capabilities: Capabilities,
    /// Proactive sends per minute (with `send`).
    pub send_per_minute: u32,
    /// Bytes of keys and values the plugin may keep (with `kv`).
    pub kv_max_bytes: u64,
    /// A bearer token the host adds to the plugin's HTTP requests to one granted host, so the
    /// plugin can use an API without ever holding its secret.
    pub http_bearer: Option<HttpBearer>,
}

/// A secret the host puts in the `Authorization` header of requests to `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBearer {
    /// `host` or `host:port`, as in `http_allowed_hosts`.
    pub host: String,
    /// The token; its `Debug` is redacted.
    pub token: crate::config::ApiKey,
}

/// Default proactive sends per minute of a plugin granted `send`.
pub const DEFAULT_SEND_PER_MINUTE: u32 = 10;

/// Default kv quota of a plugin granted `kv`: 1 MiB.
pub const DEFAULT_KV_MAX_BYTES: u64 = 1 << 20;

impl Default for Grants {
    fn default() -> Self {
        Grants {
            capabilities: Capabilities::default(),
            send_per_minute: DEFAULT_SEND_PER_MINUTE,
            kv_max_bytes: DEFAULT_KV_MAX_BYTES,
            http_bearer: None,
        }
    }
}

/// What a failed `before-send` call (trap, timeout, bad output, reported error) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The message goes on as if the plugin had kept it (the default).
    #[default]
    Open,
    /// The message is cancelled: for guards that must never be skipped (data-loss prevention).
    Closed,
}

/// What the daemon lends plugins behind their imports. Missing parts make the matching
/// imports answer `unavailable`, which is what offline tests and `agentchatd plugin test` get.
#[derive(Clone, Default)]
pub struct HostServices {
    /// Backs `kv` and queues `messaging` sends.
    pub store: Option<crate::store::Store>,
    /// Backs `history`.
    pub api: Option<PacedApi>,
    /// Woken when a plugin queues a send.
    pub outbox_wake: Option<Arc<Notify>>,
    /// Where every hook call is counted (`plugin_calls_total`, `plugin_call_seconds`).
    pub metrics: Option<Arc<crate::ops::metrics::Metrics>>,
    /// Each plugin's recent proactive sends, by plugin id. It lives in the services rather
    /// than in the loaded plugin so that a reload does not reset the per-minute cap.
    pub send_windows: SendWindows,
}

/// When each plugin's recent proactive sends were queued, for the per-minute cap.
#[derive(Clone, Default)]
pub struct SendWindows(Arc<std::sync::Mutex<std::collections::HashMap<String, SendWindow>>>);

type SendWindow = std::collections::VecDeque<Instant>;

impl SendWindows {
    /// Counts one send of `plugin` if fewer than `cap` fell within the last `window`;
    /// otherwise returns how long until one leaves it.
    pub(crate) fn take(&self, plugin: &str, cap: usize, window: Duration) -> Result<(), Duration> {
        let now = Instant::now();
        let mut all = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let recent = all.entry(plugin.to_owned()).or_default();
        while recent.front().is_some_and(|t| now.duration_since(*t) >= window) {
            recent.pop_front();
        }
        if recent.len() >= cap {
            return Err(recent.front().map_or(window, |t| window - now.duration_since(*t)));
        }
        recent.push_back(now);
        Ok(())
    }
}

/// The daemon's API client together with its pacing, so plugin reads share the request budget.
#[derive(Clone)]
pub struct PacedApi {
    pub client: crate::client::Client,
    pub limiter: Arc<crate::outbox::RateLimiter>,
}

impl PluginSpec {
    /// This spec checked against `manifest` at load.
    pub fn with_manifest(self, manifest: Manifest) -> PluginSetup {
        PluginSetup { manifest: Some(manifest), ..PluginSetup::from(self) }
    }
}

impl PluginSetup {
    /// A setup that takes the id and component path from `manifest`, with default limits.
    pub fn from_manifest(manifest: Manifest) -> PluginSetup {
        PluginSpec::new(manifest.id.clone(), manifest.component.clone()).with_manifest(manifest)
    }

    /// This setup with the operator's config (a JSON object as text).
    pub fn with_config(mut self, config_json: impl Into<String>) -> PluginSetup {
        self.spec.config_json = config_json.into();
        self
    }

    /// This setup with other breaker settings.
    pub fn with_breaker(mut self, breaker: BreakerSettings) -> PluginSetup {
        self.breaker = breaker;
        self
    }

    /// This setup with `granted` as the operator's capabilities (quotas at their defaults).
    pub fn with_grants(mut self, granted: Capabilities) -> PluginSetup {
        self.grants.capabilities = granted;
        self
    }

    /// This setup with `grants` as the operator's grants and quotas.
    pub fn with_all_grants(mut self, grants: Grants) -> PluginSetup {
        self.grants = grants;
        self
    }

    /// This setup with another failure policy for `before-send`.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> PluginSetup {
        self.failure_policy = policy;
        self
    }
}

/// A message as plugins see it (mirrors `inbound-message` in the WIT).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InboundMessage {
    /// Server-assigned message id.
    pub id: String,
    pub conversation_id: String,
    pub conversation_kind: ConversationKind,
    /// Handle of the sender.
    pub sender: String,
    pub kind: ContentKind,
    /// Present for text messages.
    pub text: Option<String>,
    /// A JSON object, present for structured messages.
    pub data_json: Option<String>,
    /// Present for file messages.
    pub attachment_id: Option<String>,
    /// Position of the message in its conversation.
    pub seq: u64,
    /// When the daemon received it, in milliseconds since the Unix epoch.
    pub received_at_ms: u64,
}

/// Whether a conversation has two members or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    Direct,
    Group,
}

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentKind {
    Text,
    Structured,
    File,
    System,
}

/// The outcome of one plugin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Which plugin was called.
    pub plugin_id: String,
    /// Its decision, or why it produced none (which counts as a pass).
    pub result: Result<Decision, CallError>,
}

/// What a plugin wants done with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No opinion; later plugins run.
    Pass,
    /// Queue these drafts; later plugins still run.
    Reply(Vec<Draft>),
    /// Queue these drafts; later plugins do not run.
    Claim(Vec<Draft>),
    /// Swallow the message; later plugins do not run.
    Drop,
}

/// An outbound message a plugin asks for, already validated by the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Draft {
    /// `None` or the conversation being answered; drafts naming another one are discarded.
    pub conversation_id: Option<String>,
    pub text: Option<String>,
    /// A JSON object.
    pub data_json: Option<String>,
}

/// State of one plugin, from [`PluginHost::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginStatus {
    /// The plugin id.
    pub id: String,
    /// Whether it runs.
    pub state: PluginState,
    /// The hooks the host calls on it.
    pub hooks: Vec<String>,
    /// Counted failures still inside the breaker window (reset when a suspension starts).
    pub recent_failures: u32,
    /// Counted failures since the host was loaded.
    pub total_failures: u64,
}

/// Whether a plugin runs, sits out a cooldown or failed to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginState {
    /// Its `start` hook failed; none of its hooks run until the next reload.
    Failed {
        /// What went wrong.
        reason: String,
    },
    /// Calls run.
    Active,
    /// Calls return [`CallError::Suspended`] until the cooldown ends.
    Suspended {
        /// Time left in the cooldown.
        remaining: Duration,
        /// When it ends, by the wall clock (for display only).
        until: std::time::SystemTime,
    },
}

/// The plugin set in use, shared by the inbox, the outbox, the timers and the reloader. A
/// reload replaces it; a call already running keeps the set it started with.
#[derive(Clone)]
pub struct PluginSet(Arc<std::sync::RwLock<Arc<PluginHost>>>);

impl PluginSet {
    /// A set holding `host`.
    pub fn new(host: Arc<PluginHost>) -> PluginSet {
        PluginSet(Arc::new(std::sync::RwLock::new(host)))
    }

    /// The plugins in use now.
    pub fn current(&self) -> Arc<PluginHost> {
        Arc::clone(&self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Puts `host` in use and returns the set it replaces.
    pub fn replace(&self, host: Arc<PluginHost>) -> Arc<PluginHost> {
        let mut guard = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *guard, host)
    }
}

impl From<Arc<PluginHost>> for PluginSet {
    fn from(host: Arc<PluginHost>) -> PluginSet {
        PluginSet::new(host)
    }
}

/// Loaded plugins and the engine that runs them. Cheap to share behind an `Arc`; calls on
/// different messages may run concurrently.
pub struct PluginHost {
    /// Plugins in call order.
    plugins: Vec<Arc<CallTarget>>,
    /// One permit per pooled instance slot, so a burst of calls waits instead of failing.
    call_slots: Arc<Semaphore>,
    /// Keeps the deadline clock running for as long as the host lives.
    _ticker: EpochTicker,
}

impl PluginHost {
    /// Compiles (or loads from cache) and links every plugin, in the order given, with no
    /// daemon services behind the imports (kv, messaging and history answer `unavailable`).
    ///
    /// # Errors
    ///
    /// As for [`PluginHost::load_with`].
    pub async fn load<S: Into<PluginSetup>>(
        setups: Vec<S>,
        cache_dir: Option<PathBuf>,
    ) -> Result<PluginHost, PluginError> {
        PluginHost::load_with(setups, cache_dir, HostServices::default()).await
    }

    /// Compiles (or loads from cache) and links every plugin, in the order given; `services`
    /// back the kv, messaging and history imports.
    ///
    /// `cache_dir`, when set, is created with mode 0700 and holds compiled components between
    /// starts; a corrupt entry is recompiled.
    ///
    /// # Errors
    ///
    /// A [`PluginError`] naming the plugin, its path and what to fix: bad settings or config,
    /// an unreadable file, a file that is not a component, or a component that does not fit
    /// the API. Also fails when the cache directory cannot be prepared.
    ///
    /// A setup with a manifest is also refused when the manifest does not match the spec, the
    /// grants, the config or the component's exports (see the module docs); the message names
    /// the plugin and the field.
    pub async fn load_with<S: Into<PluginSetup>>(
        setups: Vec<S>,
        cache_dir: Option<PathBuf>,
        services: HostServices,
    ) -> Result<PluginHost, PluginError> {
        let setups: Vec<PluginSetup> = setups.into_iter().map(Into::into).collect();
        let mut specs: Vec<PluginSpec> = Vec::with_capacity(setups.len());
        let mut prepared = Vec::with_capacity(setups.len());
        for setup in setups {
            check_spec(&setup.spec, &specs)?;
            let spec = apply_manifest(setup.spec, setup.manifest.as_ref(), &setup.grants)?;
            let config = parse_config(&spec)?;
            if let Some(schema) = setup.manifest.as_ref().and_then(|m| m.config_schema.as_ref()) {
                check_config_schema(&spec.id, schema, &config)?;
            }
            prepared.push(Prepared {
                config: Arc::new(config),
                breaker: setup.breaker,
                manifest: setup.manifest,
                grants: setup.grants,
                failure_policy: setup.failure_policy,
            });
            specs.push(spec);
        }

        let cache_dir = match cache_dir {
            Some(dir) => Some(engine::prepare_cache_dir(&dir)?),
            None => None,
        };
        let max_memory_bytes = specs
            .iter()
            .map(|spec| spec.memory_limit_bytes)
            .fold(MIN_MEMORY_LIMIT_BYTES, usize::max);
        let engine = engine::build_engine(&EngineSettings { max_memory_bytes, cache_dir })?;
        let linker = build_linker(&engine)?;

        let mut plugins = Vec::with_capacity(specs.len());
        for (spec, prepared) in specs.into_iter().zip(prepared) {
            let target = load_one(&engine, &linker, spec, prepared, &services).await?;
            plugins.push(Arc::new(target));
        }

        let ticker = EpochTicker::start(&engine)?;
        let slots = usize::try_from(MAX_CONCURRENT_CALLS).unwrap_or(1);
        Ok(PluginHost { plugins, call_slots: Arc::new(Semaphore::new(slots)), _ticker: ticker })
    }

    /// Runs the plugins that take inbound messages on `msg`, in order, and returns one verdict
    /// per plugin called. Stops after a `Claim` or a `Drop`; a failed call counts as a pass
    /// (see the module docs). Proactive sends made meanwhile are tied to the message's id.
    ///
    /// Does not panic: each call runs on its own tokio task, so even a panic inside wasmtime
    /// comes back as a [`CallError::Trap`] verdict. Must be called within a tokio runtime.
    pub async fn on_message(&self, msg: &InboundMessage) -> Vec<Verdict> {
        let hook = Arc::new(Hook::Message(Arc::new(bindings::to_wit_message(msg))));
        let scope = SendScope { trigger: Some(Trigger::Inbound), hops: 1, cause: msg.id.clone() };
        let mut verdicts = Vec::with_capacity(self.plugins.len());

        for plugin in self.listening("inbound") {
            let result = match self.call(plugin, &hook, scope.clone(), &msg.id).await {
                Ok(HookReturn::Decision(decision)) => Ok(decision),
                Ok(_) => Err(CallError::BadOutput("on-message returned no decision".into())),
                Err(err) => Err(err),
            };
            let stop = matches!(result, Ok(Decision::Claim(_) | Decision::Drop));
            verdicts.push(Verdict { plugin_id: plugin.id.to_string(), result });
            if stop {
                break;
            }
        }
        verdicts
    }

    /// Whether any plugin takes `before-send`, so the outbox can skip the bookkeeping. A guard
    /// that failed to start but fails closed still counts: it cancels every send.
    pub fn guards_sends(&self) -> bool {
        self.closed_or_listening("outbound").next().is_some()
    }

    /// Plugins that take `hook` and have not failed to start, plus those that failed but fail
    /// closed: a guard that must never be skipped may not be skipped because it failed early.
    fn closed_or_listening<'a>(
        &'a self,
        hook: &'a str,
    ) -> impl Iterator<Item = &'a Arc<CallTarget>> + 'a {
        self.plugins.iter().filter(move |p| {
            p.listens(hook) && (p.failure().is_none() || p.failure_policy == FailurePolicy::Closed)
        })
    }

    /// Runs the `before-send` chain on `msg`: plugins in order, each seeing the latest
    /// rewrite, a cancel ending the chain. A failed call keeps the message as it stands,
    /// unless the plugin's failure policy is [`FailurePolicy::Closed`], which cancels it; such
    /// a plugin whose `start` failed cancels every message without being called.
    pub async fn before_send(&self, msg: &OutboundMessage, origin: &Origin) -> SendVerdict {
        let mut current = msg.clone();
        let mut rewriters: Vec<String> = Vec::new();
        let wit_origin = bindings::to_wit_origin(origin);
        for plugin in self.closed_or_listening("outbound") {
            if let Some(failure) = plugin.failure() {
                let reason = format!("it is not running ({failure}) and fails closed");
                return SendVerdict::Cancel { plugin_id: plugin.id.to_string(), reason };
            }
            let hook =
                Arc::new(Hook::BeforeSend(bindings::to_wit_outbound(&current), wit_origin.clone()));
            match self.call(plugin, &hook, SendScope::closed(), &msg.key).await {
                Ok(HookReturn::Send(GuestSendDecision::Keep) | HookReturn::Done) => {}
                Ok(HookReturn::Send(GuestSendDecision::Rewrite(content))) => {
                    tracing::debug!(plugin = %plugin.id, key = %msg.key, "send rewritten");
                    current.text = content.text;
                    current.data_json = content.data_json;
                    rewriters.push(plugin.id.to_string());
                }
                Ok(HookReturn::Send(GuestSendDecision::Cancel(reason))) => {
                    // Stored with the dead letter and printed by `outbox list`.
                    let reason = call::shown(&reason, 512);
                    return SendVerdict::Cancel { plugin_id: plugin.id.to_string(), reason };
                }
                Ok(HookReturn::Decision(_)) => {}
                Err(err) if plugin.failure_policy == FailurePolicy::Closed => {
                    let reason = format!("its before-send failed and it fails closed: {err}");
                    return SendVerdict::Cancel { plugin_id: plugin.id.to_string(), reason };
                }
                Err(_) => {}
            }
        }
        if rewriters.is_empty() {
            SendVerdict::Keep
        } else {
            let content = Content { text: current.text, data_json: current.data_json };
            SendVerdict::Rewrite { content, by: rewriters }
        }
    }

    /// Tells every plugin that takes outbound hooks that `sent` went out. Sends they make
    /// meanwhile are one hop further from the event that started the chain.
    pub async fn after_send(&self, sent: &Sent, origin: &Origin) {
        let hook =
            Arc::new(Hook::AfterSend(bindings::to_wit_sent(sent), bindings::to_wit_origin(origin)));
        self.observe(&hook, origin, &format!("sent:{}", sent.message.key)).await;
    }

    /// Tells every plugin that takes outbound hooks that a send attempt failed.
    pub async fn send_failed(&self, failure: &SendFailure, origin: &Origin) {
        let hook = Arc::new(Hook::SendFailed(
            bindings::to_wit_failure(failure),
            bindings::to_wit_origin(origin),
        ));
        let cause = format!("failed:{}:{}", failure.message.key, failure.attempt);
        self.observe(&hook, origin, &cause).await;
    }

    async fn observe(&self, hook: &Arc<Hook>, origin: &Origin, cause: &str) {
        let hops = origin.hops.saturating_add(1);
        let scope = SendScope { trigger: Some(Trigger::PluginSend), hops, cause: cause.to_owned() };
        for plugin in self.listening("outbound") {
            let _ = self.call(plugin, hook, scope.clone(), cause).await;
        }
    }

    /// Calls `start` on every plugin that takes lifecycle hooks. A plugin whose `start` fails
    /// is marked failed: none of its hooks run and [`PluginHost::status`] says why. Returns
    /// the ids of the plugins that failed.
    pub async fn start(&self, agent_handle: &str, reason: StartReason) -> Vec<String> {
        let info = bindings::wit::StartInfo {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            agent_handle: agent_handle.to_owned(),
            reason: bindings::to_wit_start_reason(reason),
        };
        let hook = Arc::new(Hook::Start(info));
        let started_ms = crate::outbox::now_ms();
        let mut failed = Vec::new();
        for plugin in self.plugins.iter().filter(|p| p.listens("lifecycle")) {
            let cause = format!("start:{started_ms}");
            let scope = SendScope { trigger: Some(Trigger::Startup), hops: 1, cause };
            if let Err(err) = self.call(plugin, &hook, scope, "start").await {
                tracing::warn!(plugin = %plugin.id, error = %err, "plugin failed to start; its \
                    hooks will not run until the next reload");
                plugin.set_failure(Some(format!("start failed: {err}")));
                failed.push(plugin.id.to_string());
            }
        }
        failed
    }

    /// Calls `stop` on every started plugin that takes lifecycle hooks, each with at most
    /// [`STOP_BUDGET`].
    pub async fn stop(&self, reason: StopReason) {
        let hook = Arc::new(Hook::Stop(bindings::to_wit_stop_reason(reason)));
        for plugin in self.listening("lifecycle") {
            let _ = self.call(plugin, &hook, SendScope::closed(), "stop").await;
        }
    }

    /// The timers of every plugin that takes ticks: (plugin id, timer).
    pub fn timers(&self) -> Vec<(String, TimerSpec)> {
        self.listening("timer")
            .flat_map(|p| p.timers.iter().map(|t| (p.id.to_string(), t.clone())))
            .collect()
    }

    /// Runs every declared timer until `stop` fires. A timer's next tick waits for its last
    /// one to finish, and ticks missed meanwhile (or while the daemon was busy) coalesce into
    /// one.
    pub async fn run_timers(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for plugin in self.listening("timer").cloned().collect::<Vec<_>>() {
            for timer in plugin.timers.clone() {
                let (host, plugin, stop) = (Arc::clone(&self), Arc::clone(&plugin), stop.clone());
                tasks.spawn(async move { host.timer_loop(plugin, timer, stop).await });
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn timer_loop(
        &self,
        plugin: Arc<CallTarget>,
        timer: TimerSpec,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut interval =
            tokio::time::interval_at(tokio::time::Instant::now() + timer.period, timer.period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let period_ms = i64::try_from(timer.period.as_millis()).unwrap_or(i64::MAX);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let fired_ms = crate::outbox::now_ms();
            // Due times sit on the period's grid, so a tick replayed after a restart within
            // the same period gets the same cause (and its sends the same keys).
            let due_ms = fired_ms - fired_ms.rem_euclid(period_ms.max(1));
            let tick = bindings::wit::Tick {
                timer_id: timer.id.clone(),
                due_at_ms: u64::try_from(due_ms).unwrap_or(0),
                fired_at_ms: u64::try_from(fired_ms).unwrap_or(0),
            };
            let cause = format!("tick:{}:{due_ms}", timer.id);
            let scope = SendScope { trigger: Some(Trigger::Timer), hops: 1, cause };
            let hook = Arc::new(Hook::Tick(tick));
            let _ = self.call(&plugin, &hook, scope, &timer.id).await;
        }
    }

    /// Plugins that take `hook` and have not failed to start, in call order.
    fn listening<'a>(&'a self, hook: &'a str) -> impl Iterator<Item = &'a Arc<CallTarget>> + 'a {
        self.plugins.iter().filter(move |p| p.listens(hook) && p.failure().is_none())
    }

    /// Ids of the loaded plugins, in call order.
    pub fn plugin_ids(&self) -> Vec<String> {
        self.plugins.iter().map(|plugin| plugin.id.to_string()).collect()
    }

    /// Breaker state of every plugin, in call order, for the daemon's status output.
    pub fn status(&self) -> Vec<PluginStatus> {
        let now = tokio::time::Instant::now();
        let now_wall = std::time::SystemTime::now();
        self.plugins
            .iter()
            .map(|plugin| {
                let (recent_failures, remaining, total_failures) =
                    plugin.lock_breaker().snapshot(now);
                let state = match (plugin.failure(), remaining) {
                    (Some(reason), _) => PluginState::Failed { reason },
                    (None, None) => PluginState::Active,
                    (None, Some(remaining)) => PluginState::Suspended {
                        remaining,
                        until: now_wall.checked_add(remaining).unwrap_or(now_wall),
                    },
                };
                PluginStatus {
                    id: plugin.id.to_string(),
                    state,
                    hooks: plugin.hooks.clone(),
                    recent_failures,
                    total_failures,
                }
            })
            .collect()
    }

    /// One call on its own task: a panic in wasmtime or in our import code then surfaces as a
    /// failed call instead of unwinding through the daemon. A suspended plugin is not run.
    async fn call(
        &self,
        plugin: &Arc<CallTarget>,
        hook: &Arc<Hook>,
        scope: SendScope,
        subject: &str,
    ) -> Result<HookReturn, CallError> {
        let admitted = plugin.lock_breaker().admit(tokio::time::Instant::now());
        match admitted {
            Err(remaining) => {
                let remaining_ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
                tracing::debug!(plugin = %plugin.id, subject, remaining_ms, "plugin skipped");
                if let Some(metrics) = &plugin.services.metrics {
                    metrics.record_plugin_call(&plugin.id, "suspended", Duration::ZERO);
                }
                return Err(CallError::Suspended { remaining });
            }
            Ok(Some(Transition::Resumed)) => tracing::info!(plugin = %plugin.id, "plugin resumed"),
            Ok(_) => {}
        }

        let started = Instant::now();
        let result = self.spawn_call(plugin, hook, scope, subject).await;
        if let Some(metrics) = &plugin.services.metrics {
            metrics.record_plugin_call(&plugin.id, outcome_label(&result), started.elapsed());
        }
        if result.as_ref().is_err_and(CallError::counts_as_failure) {
            let tripped = plugin.lock_breaker().record_failure(tokio::time::Instant::now());
            if let Some(Transition::Suspended { failures }) = tripped {
                let cooldown_secs = plugin.lock_breaker().cooldown().as_secs();
                tracing::warn!(
                    plugin = %plugin.id,
                    failures,
                    cooldown_secs,
                    "plugin suspended after repeated failures"
                );
            }
        }
        result
    }

    async fn spawn_call(
        &self,
        plugin: &Arc<CallTarget>,
        hook: &Arc<Hook>,
        scope: SendScope,
        subject: &str,
    ) -> Result<HookReturn, CallError> {
        let hook_name = hook.name();
        let span =
            tracing::debug_span!("plugin_call", plugin = %plugin.id, hook = hook_name, subject);
        let (target, hook, slots) = (plugin.clone(), hook.clone(), self.call_slots.clone());
        let budget = match &*hook {
            Hook::Stop(_) => plugin.timeout.min(STOP_BUDGET),
            _ => plugin.timeout,
        };
        let task = tokio::spawn(
            async move {
                // The semaphore is never closed, so acquiring only waits.
                let _permit = slots.acquire_owned().await;
                let started = Instant::now();
                let result = call::run(&target, &hook, scope, budget).await;
                log_outcome(&result, started);
                result
            }
            .instrument(span.clone()),
        );

        task.await.unwrap_or_else(|join_err| {
            let err = CallError::Trap(format!("the host failed while running it: {join_err}"));
            span.in_scope(|| tracing::warn!(error = %err, "plugin call failed, counted as pass"));
            Err(err)
        })
    }
}

/// The bounded `outcome` label of `plugin_calls_total`.
fn outcome_label(result: &Result<HookReturn, CallError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(CallError::Trap(_)) => "trap",
        Err(CallError::Timeout { .. }) => "timeout",
        Err(CallError::MemoryLimit) => "memory_limit",
        Err(CallError::BadOutput(_)) => "bad_output",
        Err(CallError::PluginError(_)) => "plugin_error",
        Err(CallError::Suspended { .. }) => "suspended",
    }
}

/// What `load_with` keeps of a setup between checking it and loading the component.
struct Prepared {
    config: Arc<PluginConfig>,
    breaker: BreakerSettings,
    manifest: Option<Manifest>,
    grants: Grants,
    failure_policy: FailurePolicy,
}

/// The kind of a message as plugins see it; unknown kinds are handled as text.
pub fn content_kind(kind: &str) -> ContentKind {
    match kind {
        "structured" => ContentKind::Structured,
        "file" => ContentKind::File,
        "system" => ContentKind::System,
        _ => ContentKind::Text,
    }
}

fn log_outcome(result: &Result<HookReturn, CallError>, started: Instant) {
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Ok(HookReturn::Decision(decision)) => {
            let decision = decision_name(decision);
            tracing::debug!(decision, elapsed_us, "plugin call done");
        }
        Ok(_) => tracing::debug!(elapsed_us, "plugin call done"),
        Err(err) => tracing::warn!(error = %err, elapsed_us, "plugin call failed, counted as pass"),
    }
}

fn decision_name(decision: &Decision) -> &'static str {
    match decision {
        Decision::Pass => "pass",
        Decision::Reply(_) => "reply",
        Decision::Claim(_) => "claim",
        Decision::Drop => "drop",
    }
}

/// Rejects specs the host cannot run, before anything is compiled.
fn check_spec(spec: &PluginSpec, earlier: &[PluginSpec]) -> Result<(), PluginError> {
    let fail =
        |reason: String| PluginError::Spec { id: spec.id.clone(), path: spec.path.clone(), reason };

    if spec.id.trim().is_empty() {
        return Err(fail("the id is empty; give every plugin a unique id".to_string()));
    }
    if earlier.iter().any(|other| other.id == spec.id) {
        return Err(fail("the id is used by another plugin; ids must be unique".to_string()));
    }
    if spec.timeout.is_zero() {
        return Err(fail("the timeout is zero; give each call some time".to_string()));
    }
    if spec.memory_limit_bytes < MIN_MEMORY_LIMIT_BYTES {
        return Err(fail(format!(
            "the memory limit is {} bytes; it must be at least {MIN_MEMORY_LIMIT_BYTES}",
            spec.memory_limit_bytes
        )));
    }
    Ok(())
}

/// Checks `spec` against its manifest and returns it with the manifest's tighter limits.
fn apply_manifest(
    mut spec: PluginSpec,
    manifest: Option<&Manifest>,
    grants: &Grants,
) -> Result<PluginSpec, PluginError> {
    let granted = &grants.capabilities;
    let Some(manifest) = manifest else {
        return Ok(spec);
    };
    let fail = |key: &str, reason: String| PluginError::Manifest {
        id: spec.id.clone(),
        path: manifest.path.clone(),
        key: key.to_string(),
        reason,
    };

    if manifest.id != spec.id {
        let reason = format!("is `{}`; the configured id must be the same", manifest.id);
        return Err(fail("id", reason));
    }
    let missing = manifest.capabilities.missing_from(granted);
    if !missing.is_empty() {
        return Err(PluginError::NotGranted { id: spec.id.clone(), missing: missing.join(", ") });
    }

    if let Some(mib) = manifest.limits.memory_mib {
        let wanted = usize::try_from(mib).unwrap_or(usize::MAX).saturating_mul(1 << 20);
        if wanted > spec.memory_limit_bytes {
            let allowed = spec.memory_limit_bytes as f64 / f64::from(1u32 << 20);
            let reason = format!(
                "asks for {mib} MiB but the operator allows {allowed:.1} MiB; raise `memory_mib` \
                 in the plugin's agentchatd.toml entry"
            );
            return Err(fail("limits.memory-mib", reason));
        }
        spec.memory_limit_bytes = wanted.max(MIN_MEMORY_LIMIT_BYTES);
    }
    if let Some(wanted) = manifest.limits.hook_timeout {
        if wanted > spec.timeout {
            let reason = format!(
                "asks for {} ms per call but the operator allows {} ms; raise `timeout_ms` in \
                 the plugin's agentchatd.toml entry",
                wanted.as_millis(),
                spec.timeout.as_millis()
            );
            return Err(fail("limits.hook-timeout-ms", reason));
        }
        spec.timeout = wanted;
    }
    Ok(spec)
}

/// Refuses a config that does not fit the manifest's schema, naming the first bad field.
fn check_config_schema(
    id: &str,
    schema: &ConfigSchema,
    config: &PluginConfig,
) -> Result<(), PluginError> {
    let violations = schema.validate(&serde_json::Value::Object(config.values.clone()));
    let Some(first) = violations.first() else {
        return Ok(());
    };
    let mut reason = first.reason.clone();
    if violations.len() > 1 {
        reason.push_str(&format!(" (and {} more problems)", violations.len() - 1));
    }
    let field = if first.pointer.is_empty() { "/".to_string() } else { first.pointer.clone() };
    Err(PluginError::ConfigSchema { id: id.to_string(), field, reason })
}

/// Refuses a component that does not export every hook its manifest lists. Exports beyond
/// the list are allowed (an SDK may export every hook with a default) and never called.
fn check_exports(
    spec: &PluginSpec,
    manifest: &Manifest,
    exports: &Exports,
) -> Result<(), PluginError> {
    let missing: Vec<&str> =
        manifest.hooks.iter().filter(|h| !exports.has(h)).map(String::as_str).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let exported: Vec<&str> = KNOWN_HOOKS.iter().copied().filter(|h| exports.has(h)).collect();
    Err(PluginError::Manifest {
        id: spec.id.clone(),
        path: manifest.path.clone(),
        key: "hooks".to_string(),
        reason: format!(
            "lists {missing:?}, which {} does not export (it exports {exported:?}); build the \
             component with those hooks or remove them from the list",
            spec.path.display()
        ),
    })
}

/// Parses the operator's config once, so calls only look values up.
fn parse_config(spec: &PluginSpec) -> Result<PluginConfig, PluginError> {
    let fail = |reason: String| PluginError::Config {
        id: spec.id.clone(),
        path: spec.path.clone(),
        reason,
    };

    let text = if spec.config_json.trim().is_empty() { "{}" } else { &spec.config_json };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(values)) => {
            let json = serde_json::Value::Object(values.clone()).to_string();
            Ok(PluginConfig { json, values })
        }
        Ok(_) => Err(fail("found another JSON value".to_string())),
        Err(err) => Err(fail(err.to_string())),
    }
}

/// The imports every plugin is linked against: WASI p2 (empty context) and the API's own.
fn build_linker(engine: &wasmtime::Engine) -> Result<Linker<CallState>, PluginError> {
    let link_err = |err: wasmtime::Error| PluginError::Engine {
        reason: format!("cannot set up the plugin imports: {err:#}"),
    };

    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link_err)?;
    bindings::Full::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(link_err)?;
    Ok(linker)
}

/// Reads, compiles and links one plugin.
async fn load_one(
    engine: &wasmtime::Engine,
    linker: &Linker<CallState>,
    spec: PluginSpec,
    prepared: Prepared,
    services: &HostServices,
) -> Result<CallTarget, PluginError> {
    let started = Instant::now();
    let bytes = tokio::fs::read(&spec.path).await.map_err(|source| PluginError::Read {
        id: spec.id.clone(),
        path: spec.path.clone(),
        source,
    })?;

    // Compiling takes tens of milliseconds of CPU, so it stays off the async threads.
    let compile_engine = engine.clone();
    let compiled =
        tokio::task::spawn_blocking(move || Component::new(&compile_engine, &bytes)).await;
    let component = match compiled {
        Ok(Ok(component)) => component,
        Ok(Err(err)) => return Err(compile_error(&spec, format!("{err:#}"))),
        Err(join_err) => return Err(compile_error(&spec, join_err.to_string())),
    };

    let link_error = |err: wasmtime::Error| PluginError::Link {
        id: spec.id.clone(),
        path: spec.path.clone(),
        reason: format!("{err:#}"),
    };
    let pre = linker.instantiate_pre(&component).map_err(link_error)?;
    let exports = Exports::find(&pre);
    let (hooks, timers) = match &prepared.manifest {
        Some(manifest) => {
            check_exports(&spec, manifest, &exports)?;
            (manifest.hooks.clone(), manifest.timers.clone())
        }
        None if exports.inbound.is_some() => (vec!["inbound".to_string()], Vec::new()),
        None => {
            return Err(link_error(wasmtime::format_err!(
                "it exports no `agentchat:plugin/inbound` hook; without a manifest only that \
                 hook is called, so give the plugin an agentchat-plugin.toml listing its hooks"
            )));
        }
    };
    let granted_hosts = prepared.grants.capabilities.http_allowed_hosts.clone();
    let http = if granted_hosts.is_empty() {
        None
    } else {
        Some(imports::http_client(granted_hosts).map_err(|err| PluginError::Engine {
            reason: format!("cannot build the HTTP client of plugin `{}`: {err}", spec.id),
        })?)
    };

    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        plugin = %spec.id, path = %spec.path.display(), ?hooks, elapsed_ms, "plugin loaded"
    );
    Ok(CallTarget {
        id: Arc::from(spec.id),
        pre,
        exports,
        hooks,
        timers,
        config: prepared.config,
        timeout: spec.timeout,
        memory_limit_bytes: spec.memory_limit_bytes,
        grants: Arc::new(prepared.grants),
        failure_policy: prepared.failure_policy,
        services: services.clone(),
        http,
        failed: std::sync::Mutex::new(None),
        breaker: std::sync::Mutex::new(Breaker::new(prepared.breaker)),
    })
}

fn compile_error(spec: &PluginSpec, reason: String) -> PluginError {
    PluginError::Compile { id: spec.id.clone(), path: spec.path.clone(), reason }
}
