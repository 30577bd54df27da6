//! The WASM plugin host: loads reply plugins (WebAssembly components of the
//! `agentchat:plugin/replier@0.1.0` world, see `plugins/wit`) and asks them, in order, what to do
//! with each inbound message.
//!
//! # What a call looks like
//!
//! [`PluginHost::load`] compiles every plugin once (or loads it from the on-disk cache) and
//! links it against the host imports: `log`, `config` and WASI p2 with an empty context (no
//! files, environment, arguments or network; stdout and stderr go to the log at debug).
//! [`PluginHost::on_message`] then runs the plugins in the order given. Each call gets a fresh
//! store with the plugin's memory limit and an epoch deadline equal to its time budget, so a
//! call can never see state left by an earlier one. Plugins are asked one after another; a
//! `Claim` or `Drop` stops the chain, `Pass` and `Reply` go on to the next plugin.
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
//! # What this module does not do
//!
//! It sends nothing and stores nothing: drafts are returned to the caller, who queues them.
//! It does not reload plugins while running.
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
mod manifest;
mod schema;
mod validate;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Semaphore;
use tracing::Instrument;
use wasmtime::component::{Component, HasSelf, Linker};

pub use breaker::{BreakerSettings, MAX_BREAKER_SPAN};
pub use engine::{EPOCH_TICK, MAX_CONCURRENT_CALLS};
pub use error::{CallError, PluginError};
pub use manifest::{
    Capabilities, KNOWN_HOOKS, MANIFEST_FILE, Manifest, ManifestError, ManifestLimits,
};
pub use schema::{ConfigSchema, Violation};
pub use validate::{MAX_DRAFTS_PER_DECISION, MAX_TEXT_BYTES};

use breaker::{Breaker, Transition};
use call::{CallState, CallTarget, PluginConfig};
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
    /// The plugin's manifest; without one, none of the manifest checks run.
    pub manifest: Option<Manifest>,
    /// Capabilities the operator grants; nothing by default.
    pub granted: Capabilities,
    /// When repeated failures suspend the plugin.
    pub breaker: BreakerSettings,
}

impl From<PluginSpec> for PluginSetup {
    fn from(spec: PluginSpec) -> PluginSetup {
        PluginSetup {
            spec,
            manifest: None,
            granted: Capabilities::default(),
            breaker: BreakerSettings::default(),
        }
    }
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

    /// This setup with `granted` as the operator's grants.
    pub fn with_grants(mut self, granted: Capabilities) -> PluginSetup {
        self.granted = granted;
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
    /// Target conversation; `None` means the conversation of the message being answered.
    pub conversation_id: Option<String>,
    pub text: Option<String>,
    /// A JSON object.
    pub data_json: Option<String>,
}

/// Breaker state of one plugin, from [`PluginHost::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginStatus {
    /// The plugin id.
    pub id: String,
    /// Whether it runs.
    pub state: PluginState,
    /// Counted failures still inside the breaker window (reset when a suspension starts).
    pub recent_failures: u32,
    /// Counted failures since the host was loaded.
    pub total_failures: u64,
}

/// Whether a plugin runs or sits out a cooldown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginState {
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
    /// Compiles (or loads from cache) and links every plugin, in the order given.
    ///
    /// `cache_dir`, when set, is created with mode 0700 and holds compiled components between
    /// starts; a corrupt entry is recompiled.
    ///
    /// # Errors
    ///
    /// A [`PluginError`] naming the plugin, its path and what to fix: bad settings or config,
    /// an unreadable file, a file that is not a component, or a component that does not fit
    /// the `replier` world. Also fails when the cache directory cannot be prepared.
    ///
    /// A setup with a manifest is also refused when the manifest does not match the spec, the
    /// grants, the config or the component's exports (see the module docs); the message names
    /// the plugin and the field.
    pub async fn load<S: Into<PluginSetup>>(
        setups: Vec<S>,
        cache_dir: Option<PathBuf>,
    ) -> Result<PluginHost, PluginError> {
        let setups: Vec<PluginSetup> = setups.into_iter().map(Into::into).collect();
        let mut specs: Vec<PluginSpec> = Vec::with_capacity(setups.len());
        let mut configs = Vec::with_capacity(setups.len());
        let mut manifests = Vec::with_capacity(setups.len());
        for setup in setups {
            check_spec(&setup.spec, &specs)?;
            let spec = apply_manifest(setup.spec, setup.manifest.as_ref(), &setup.granted)?;
            let config = parse_config(&spec)?;
            if let Some(schema) = setup.manifest.as_ref().and_then(|m| m.config_schema.as_ref()) {
                check_config_schema(&spec.id, schema, &config)?;
            }
            configs.push((Arc::new(config), setup.breaker));
            manifests.push(setup.manifest);
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
        for ((spec, (config, breaker)), manifest) in specs.into_iter().zip(configs).zip(manifests) {
            let mut target = load_one(&engine, &linker, spec, config, manifest.as_ref()).await?;
            target.breaker = std::sync::Mutex::new(Breaker::new(breaker));
            plugins.push(Arc::new(target));
        }

        let ticker = EpochTicker::start(&engine)?;
        let slots = usize::try_from(MAX_CONCURRENT_CALLS).unwrap_or(1);
        Ok(PluginHost { plugins, call_slots: Arc::new(Semaphore::new(slots)), _ticker: ticker })
    }

    /// Runs the plugins in order on `msg` and returns one verdict per plugin called. Stops
    /// after a `Claim` or a `Drop`; a failed call counts as a pass (see the module docs).
    ///
    /// Does not panic: each call runs on its own tokio task, so even a panic inside wasmtime
    /// comes back as a [`CallError::Trap`] verdict. Must be called within a tokio runtime.
    pub async fn on_message(&self, msg: &InboundMessage) -> Vec<Verdict> {
        let wit_msg = Arc::new(bindings::to_wit_message(msg));
        let mut verdicts = Vec::with_capacity(self.plugins.len());

        for plugin in &self.plugins {
            let result = self.call(plugin, &wit_msg, &msg.id).await;
            let stop = matches!(result, Ok(Decision::Claim(_) | Decision::Drop));
            verdicts.push(Verdict { plugin_id: plugin.id.to_string(), result });
            if stop {
                break;
            }
        }
        verdicts
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
                let state = match remaining {
                    None => PluginState::Active,
                    Some(remaining) => PluginState::Suspended {
                        remaining,
                        until: now_wall.checked_add(remaining).unwrap_or(now_wall),
                    },
                };
                PluginStatus { id: plugin.id.to_string(), state, recent_failures, total_failures }
            })
            .collect()
    }

    /// One call on its own task: a panic in wasmtime or in our import code then surfaces as a
    /// failed call instead of unwinding through the daemon. A suspended plugin is not run.
    async fn call(
        &self,
        plugin: &Arc<CallTarget>,
        msg: &Arc<bindings::wit::InboundMessage>,
        message_id: &str,
    ) -> Result<Decision, CallError> {
        let admitted = plugin.lock_breaker().admit(tokio::time::Instant::now());
        match admitted {
            Err(remaining) => {
                let remaining_ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
                tracing::debug!(plugin = %plugin.id, message_id, remaining_ms, "plugin skipped");
                return Err(CallError::Suspended { remaining });
            }
            Ok(Some(Transition::Resumed)) => tracing::info!(plugin = %plugin.id, "plugin resumed"),
            Ok(_) => {}
        }

        let result = self.spawn_call(plugin, msg, message_id).await;
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
        msg: &Arc<bindings::wit::InboundMessage>,
        message_id: &str,
    ) -> Result<Decision, CallError> {
        let span = tracing::debug_span!("plugin_call", plugin = %plugin.id, message_id);
        let (target, msg, slots) = (plugin.clone(), msg.clone(), self.call_slots.clone());
        let task = tokio::spawn(
            async move {
                // The semaphore is never closed, so acquiring only waits.
                let _permit = slots.acquire_owned().await;
                let started = Instant::now();
                let result = call::run(&target, &msg).await;
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

fn log_outcome(result: &Result<Decision, CallError>, started: Instant) {
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Ok(decision) => {
            let decision = decision_name(decision);
            tracing::debug!(decision, elapsed_us, "plugin call done");
        }
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
    granted: &Capabilities,
) -> Result<PluginSpec, PluginError> {
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
            let reason = format!(
                "asks for {mib} MiB but the operator allows {} bytes; raise the plugin's memory \
                 limit",
                spec.memory_limit_bytes
            );
            return Err(fail("limits.memory-mib", reason));
        }
        spec.memory_limit_bytes = wanted.max(MIN_MEMORY_LIMIT_BYTES);
    }
    if let Some(wanted) = manifest.limits.hook_timeout {
        if wanted > spec.timeout {
            let reason = format!(
                "asks for {wanted:?} per call but the operator allows {:?}; raise the plugin's \
                 timeout",
                spec.timeout
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

/// Refuses a component whose `agentchat:plugin` exports differ from the manifest's hooks.
fn check_exports(
    engine: &wasmtime::Engine,
    component: &Component,
    spec: &PluginSpec,
    manifest: &Manifest,
) -> Result<(), PluginError> {
    let exported: Vec<String> = component
        .component_type()
        .exports(engine)
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix("agentchat:plugin/")?;
            Some(rest.split('@').next().unwrap_or(rest).to_string())
        })
        .collect();
    let missing: Vec<&str> =
        manifest.hooks.iter().filter(|h| !exported.contains(h)).map(String::as_str).collect();
    let unlisted: Vec<&str> =
        exported.iter().filter(|e| !manifest.hooks.contains(e)).map(String::as_str).collect();
    if missing.is_empty() && unlisted.is_empty() {
        return Ok(());
    }
    Err(PluginError::Manifest {
        id: spec.id.clone(),
        path: manifest.path.clone(),
        key: "hooks".to_string(),
        reason: format!(
            "lists {:?} but {} exports {exported:?} (missing: {missing:?}, not listed: \
             {unlisted:?}); make the list match the component",
            manifest.hooks,
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

/// The imports every plugin is linked against: WASI p2 and the `replier` world's own.
fn build_linker(engine: &wasmtime::Engine) -> Result<Linker<CallState>, PluginError> {
    let link_err = |err: wasmtime::Error| PluginError::Engine {
        reason: format!("cannot set up the plugin imports: {err:#}"),
    };

    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link_err)?;
    bindings::Replier::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
        .map_err(link_err)?;
    Ok(linker)
}

/// Reads, compiles and links one plugin.
async fn load_one(
    engine: &wasmtime::Engine,
    linker: &Linker<CallState>,
    spec: PluginSpec,
    config: Arc<PluginConfig>,
    manifest: Option<&Manifest>,
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
    if let Some(manifest) = manifest {
        check_exports(engine, &component, &spec, manifest)?;
    }

    let link_error = |err: wasmtime::Error| PluginError::Link {
        id: spec.id.clone(),
        path: spec.path.clone(),
        reason: format!("{err:#}"),
    };
    let instance_pre = linker.instantiate_pre(&component).map_err(link_error)?;
    let pre = bindings::ReplierPre::new(instance_pre).map_err(link_error)?;

    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(plugin = %spec.id, path = %spec.path.display(), elapsed_ms, "plugin loaded");
    Ok(CallTarget {
        id: Arc::from(spec.id),
        pre,
        config,
        timeout: spec.timeout,
        memory_limit_bytes: spec.memory_limit_bytes,
        breaker: std::sync::Mutex::new(Breaker::new(BreakerSettings::default())),
    })
}

fn compile_error(spec: &PluginSpec, reason: String) -> PluginError {
    PluginError::Compile { id: spec.id.clone(), path: spec.path.clone(), reason }
}
