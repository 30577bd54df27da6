//! One plugin call: a fresh store, the host side of the `log` and `config` imports, the
//! per-call limits, and the mapping of whatever went wrong onto [`CallError`]. The imports
//! that reach the daemon (kv, messaging, history, http) live in [`super::imports`].
//!
//! Every call gets a new `Store` from the plugin's pre-linked instance, so nothing a guest did
//! in one call (a trap, a corrupted heap, a global it set) can reach the next one.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::Instant;
use wasmtime::component::{InstancePre, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{self, Exports, GuestSendDecision, agentchat, wit};
use super::breaker::Breaker;
use super::engine::deadline_ticks;
use super::hooks::Trigger;
use super::{CallError, Decision, FailurePolicy, Grants, HostServices, TimerSpec, validate};

/// Log lines a plugin may write in one call; the rest are counted and dropped.
const MAX_LOG_LINES_PER_CALL: u32 = 32;

/// Longest log message or stdout/stderr line kept, in bytes.
const MAX_LOG_LINE_BYTES: usize = 2048;

/// Most fields kept per log line.
const MAX_LOG_FIELDS: usize = 16;

/// Bytes of stdout and of stderr kept per call; more is dropped silently so a chatty guest
/// neither fails nor floods the log.
const MAX_CAPTURED_OUTPUT_BYTES: usize = 16 * 1024;

/// Extra wall-clock time past the epoch deadline before the host gives up on a call. Epochs
/// only interrupt guest code; this catches a guest parked in a host call (a WASI sleep).
const BACKSTOP_GRACE: Duration = Duration::from_millis(250);

/// tracing target of lines written by guests, so operators can filter them apart.
const GUEST_LOG_TARGET: &str = "agentchatd::plugins::guest";

/// Operator config of one plugin, parsed once at load.
#[derive(Debug)]
pub(crate) struct PluginConfig {
    /// The config object, re-serialized (what `config.all-json` returns).
    pub json: String,
    pub values: serde_json::Map<String, serde_json::Value>,
}

/// What a call needs to know about its plugin.
pub(crate) struct CallTarget {
    pub id: Arc<str>,
    pub pre: InstancePre<CallState>,
    /// Where each exported hook lives.
    pub exports: Exports,
    /// Hooks the host calls: those the manifest lists, or `inbound` without a manifest.
    pub hooks: Vec<String>,
    pub timers: Vec<TimerSpec>,
    pub config: Arc<PluginConfig>,
    pub timeout: Duration,
    pub memory_limit_bytes: usize,
    pub grants: Arc<Grants>,
    pub failure_policy: FailurePolicy,
    /// The daemon's services behind the imports.
    pub services: HostServices,
    /// HTTP client that enforces the granted hosts; `None` when no host is granted.
    pub http: Option<reqwest::Client>,
    /// Why `start` failed, if it did; a failed plugin's hooks are not called.
    pub failed: Mutex<Option<String>>,
    /// A std mutex: it is held for a few instructions and never across an `.await`.
    pub breaker: Mutex<Breaker>,
}

impl CallTarget {
    pub(crate) fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the host calls `hook` on this plugin.
    pub(crate) fn listens(&self, hook: &str) -> bool {
        self.hooks.iter().any(|h| h == hook) && self.exports.has(hook)
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn set_failure(&self, reason: Option<String>) {
        *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = reason;
    }
}

/// One hook invocation and its arguments.
pub(crate) enum Hook {
    Start(wit::StartInfo),
    Stop(wit::StopReason),
    Message(Arc<wit::InboundMessage>),
    BeforeSend(wit::OutboundMessage, wit::Origin),
    AfterSend(wit::Sent, wit::Origin),
    SendFailed(wit::SendFailure, wit::Origin),
    Tick(wit::Tick),
}

impl Hook {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Hook::Start(_) => "start",
            Hook::Stop(_) => "stop",
            Hook::Message(_) => "on-message",
            Hook::BeforeSend(..) => "before-send",
            Hook::AfterSend(..) => "after-send",
            Hook::SendFailed(..) => "send-failed",
            Hook::Tick(_) => "on-tick",
        }
    }
}

/// What a hook returned, already validated.
pub(crate) enum HookReturn {
    /// A hook without a result (`stop`, `after-send`, `send-failed`, `on-tick`, `start` Ok).
    Done,
    Decision(Decision),
    Send(GuestSendDecision),
}

/// What proactive sends made during a call are tied to.
#[derive(Debug, Clone)]
pub(crate) struct SendScope {
    /// The kind of event the call handles; `None`: `messaging.send` is refused in this call.
    pub trigger: Option<Trigger>,
    /// Hops a send made in this call gets.
    pub hops: u8,
    /// Identifies the event, so the same send made again after a restart gets the same key.
    pub cause: String,
}

impl SendScope {
    /// A scope in which `messaging.send` is refused.
    pub(crate) fn closed() -> SendScope {
        SendScope { trigger: None, hops: 0, cause: String::new() }
    }
}

/// Store data of one call.
pub(crate) struct CallState {
    /// The plugin being called: its id, config, grants, services and HTTP client.
    pub(crate) target: Arc<CallTarget>,
    pub(crate) scope: SendScope,
    /// Proactive sends made in this call, which numbers their derived keys.
    pub(crate) sends_made: u32,
    /// When the call's budget runs out; imports that wait never wait past it.
    pub(crate) deadline: Instant,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: CallLimiter,
    log_lines: u32,
    log_dropped: u32,
    stdout: OutputCapture,
    stderr: OutputCapture,
}

/// Runs one hook of one plugin in a fresh store and checks what it returned.
pub(crate) async fn run(
    target: &Arc<CallTarget>,
    hook: &Hook,
    scope: SendScope,
    budget: Duration,
) -> Result<HookReturn, CallError> {
    let engine = target.pre.engine();
    let mut store = wasmtime::Store::new(engine, CallState::new(target, scope, budget));
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(deadline_ticks(budget));
    store.epoch_deadline_trap();

    // The store lives past the call so the limiter and the captured output can be read after
    // a failure as well.
    let outcome = {
        let call = async {
            let instance = target.pre.instantiate_async(&mut store).await?;
            call_hook(target, hook, &mut store, &instance).await
        };
        tokio::time::timeout(budget + BACKSTOP_GRACE, call).await
    };
    store.data().flush_output();
    store.data().report_dropped_logs();

    match outcome {
        Err(_elapsed) => Err(CallError::Timeout { budget }),
        Ok(Err(err)) => Err(classify(&err, &store.data().limiter, budget)),
        Ok(Ok(Err(plugin_err))) => {
            Err(CallError::PluginError(bindings::describe_plugin_error(&plugin_err)))
        }
        Ok(Ok(Ok(HookReturn::Decision(decision)))) => {
            validate::check_decision(decision).map(HookReturn::Decision)
        }
        Ok(Ok(Ok(HookReturn::Send(GuestSendDecision::Rewrite(content))))) => {
            validate::check_content(content.text.as_deref(), content.data_json.as_deref())
                .map_err(|why| CallError::BadOutput(format!("rewrite: {why}")))?;
            Ok(HookReturn::Send(GuestSendDecision::Rewrite(content)))
        }
        Ok(Ok(Ok(other))) => Ok(other),
    }
}

type HookResult = wasmtime::Result<Result<HookReturn, wit::PluginError>>;

/// Looks the hook up on the instance and calls it. A hook the component does not export is a
/// host bug (only listed, exported hooks are called), reported as a trap.
async fn call_hook(
    target: &CallTarget,
    hook: &Hook,
    store: &mut wasmtime::Store<CallState>,
    instance: &wasmtime::component::Instance,
) -> HookResult {
    let missing = || wasmtime::format_err!("the component does not export this hook");
    let exports = &target.exports;
    match hook {
        Hook::Start(info) => {
            let guest =
                exports.lifecycle.as_ref().ok_or_else(missing)?.load(&mut *store, instance)?;
            Ok(guest.call_start(store, info).await?.map(|()| HookReturn::Done))
        }
        Hook::Stop(reason) => {
            let guest =
                exports.lifecycle.as_ref().ok_or_else(missing)?.load(&mut *store, instance)?;
            guest.call_stop(store, *reason).await?;
            Ok(Ok(HookReturn::Done))
        }
        Hook::Message(msg) => {
            let guest =
                exports.inbound.as_ref().ok_or_else(missing)?.load(&mut *store, instance)?;
            let decision = guest.call_on_message(store, msg).await?;
            Ok(decision.map(|d| HookReturn::Decision(bindings::from_wit_decision(d))))
        }
        Hook::BeforeSend(msg, origin) => {
            let guest =
                exports.outbound.as_ref().ok_or_else(missing)?.load(&mut *store, instance)?;
            let decision = guest.call_before_send(store, msg, origin).await?;
            Ok(decision.map(|d| HookReturn::Send(bindings::from_wit_send_decision(d))))
        }
        Hook::AfterSend(sent, origin) => {
            let guest =
                exports.outbound.as_ref().ok_or_else(missing)?.load(&mut *store, instance)?;
            guest.call_after_send(store, sent, origin).await?;
            Ok(Ok(HookReturn::Done))
        }
        Hook::SendFailed(failure, origin) => {
            let guest =
                exports.outbound.as_ref().ok_or_else(missing)?.load(&mut *store, instance)?;
            guest.call_send_failed(store, failure, origin).await?;
            Ok(Ok(HookReturn::Done))
        }
        Hook::Tick(tick) => {
            let guest = exports.timer.as_ref().ok_or_else(missing)?.load(&mut *store, instance)?;
            guest.call_on_tick(store, tick).await?;
            Ok(Ok(HookReturn::Done))
        }
    }
}

/// Maps a wasmtime failure onto what the operator needs to know.
fn classify(err: &wasmtime::Error, limiter: &CallLimiter, budget: Duration) -> CallError {
    tracing::debug!(error = ?err, "plugin call failed");

    // A refused memory.grow is the real cause even when the guest then traps on its own
    // (Rust aborts on allocation failure), so it wins over the trap code.
    if limiter.memory_refused {
        return CallError::MemoryLimit;
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Timeout { budget },
        Some(trap) => CallError::Trap(trap.to_string()),
        None => CallError::Trap(err.root_cause().to_string()),
    }
}

impl CallState {
    fn new(target: &Arc<CallTarget>, scope: SendScope, budget: Duration) -> CallState {
        let stdout = OutputCapture::default();
        let stderr = OutputCapture::default();

        // No preopens, environment, arguments or network: the builder's defaults deny them,
        // and only the output streams are replaced so they end up in the log.
        let wasi = WasiCtxBuilder::new().stdout(stdout.clone()).stderr(stderr.clone()).build();
        let limits = StoreLimitsBuilder::new().memory_size(target.memory_limit_bytes).build();

        CallState {
            target: Arc::clone(target),
            scope,
            sends_made: 0,
            deadline: Instant::now() + budget,
            wasi,
            table: ResourceTable::new(),
            limiter: CallLimiter { limits, memory_refused: false },
            log_lines: 0,
            log_dropped: 0,
            stdout,
            stderr,
        }
    }

    /// Forwards what the guest printed, line by line, at debug (it may quote message text).
    fn flush_output(&self) {
        for (stream, capture) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let (bytes, dropped) = capture.take();
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines().filter(|line| !line.trim().is_empty()) {
                tracing::debug!(
                    target: GUEST_LOG_TARGET,
                    plugin = %self.target.id,
                    stream,
                    "{}",
                    shown(line, MAX_LOG_LINE_BYTES)
                );
            }
            if dropped > 0 {
                tracing::debug!(plugin = %self.target.id, stream, dropped, "plugin output cut");
            }
        }
    }

    fn report_dropped_logs(&self) {
        if self.log_dropped > 0 {
            tracing::warn!(
                plugin = %self.target.id,
                dropped = self.log_dropped,
                limit = MAX_LOG_LINES_PER_CALL,
                "plugin log lines dropped"
            );
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl agentchat::plugin::types::Host for CallState {}

impl agentchat::plugin::log::Host for CallState {
    async fn log(
        &mut self,
        level: agentchat::plugin::types::Level,
        msg: String,
        fields: Vec<(String, String)>,
    ) {
        use agentchat::plugin::types::Level;

        if self.log_lines >= MAX_LOG_LINES_PER_CALL {
            self.log_dropped = self.log_dropped.saturating_add(1);
            return;
        }
        self.log_lines += 1;

        let plugin = &*self.target.id;
        let msg = shown(&msg, MAX_LOG_LINE_BYTES);
        let fields = render_fields(&fields);
        match level {
            Level::Trace => tracing::trace!(target: GUEST_LOG_TARGET, plugin, fields, "{msg}"),
            Level::Debug => tracing::debug!(target: GUEST_LOG_TARGET, plugin, fields, "{msg}"),
            Level::Info => tracing::info!(target: GUEST_LOG_TARGET, plugin, fields, "{msg}"),
            Level::Warn => tracing::warn!(target: GUEST_LOG_TARGET, plugin, fields, "{msg}"),
            Level::Error => tracing::error!(target: GUEST_LOG_TARGET, plugin, fields, "{msg}"),
        }
    }
}

impl agentchat::plugin::config::Host for CallState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.target.config.values.get(&key).map(|value| match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    }

    async fn all_json(&mut self) -> String {
        self.target.config.json.clone()
    }
}

/// Renders guest log fields as `key=value` pairs in one tracing field, since tracing field
/// names are fixed at compile time.
fn render_fields(fields: &[(String, String)]) -> String {
    let mut out = String::new();
    for (key, value) in fields.iter().take(MAX_LOG_FIELDS) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&shown(key, 64));
        out.push('=');
        out.push_str(&shown(value, 256));
    }
    out
}

/// Text a plugin chose, made fit for the log, the queue and the operator's terminal: control
/// characters (ANSI escapes, line breaks, NUL) replaced, then cut to at most `max` bytes. A
/// guest's error or cancel reason could otherwise repaint the terminal of whoever runs
/// `agentchatd outbox list`, forge log lines (tracing escapes ANSI but not line breaks) or
/// flood the log with megabytes on every call.
pub(crate) fn shown(text: &str, max: usize) -> String {
    let clean: String =
        truncate(text, max).chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect();
    truncate(&clean, max).to_owned()
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// [`StoreLimits`] plus a note of whether a memory growth was refused, which is how a
/// memory-limit failure is told apart from any other trap.
pub(crate) struct CallLimiter {
    limits: StoreLimits,
    memory_refused: bool,
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.memory_refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// A guest's stdout or stderr: kept in memory up to a cap, then logged after the call.
#[derive(Clone, Default)]
struct OutputCapture {
    buf: Arc<Mutex<CaptureBuf>>,
}

#[derive(Default)]
struct CaptureBuf {
    bytes: Vec<u8>,
    dropped: usize,
}

impl OutputCapture {
    fn push(&self, data: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        let room = MAX_CAPTURED_OUTPUT_BYTES.saturating_sub(buf.bytes.len());
        let kept = data.len().min(room);
        buf.bytes.extend_from_slice(&data[..kept]);
        buf.dropped += data.len() - kept;
    }

    fn take(&self) -> (Vec<u8>, usize) {
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        let dropped = std::mem::take(&mut buf.dropped);
        (std::mem::take(&mut buf.bytes), dropped)
    }
}

impl IsTerminal for OutputCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputCapture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputCapture {
    async fn ready(&mut self) {}
}

impl OutputStream for OutputCapture {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always accept a full chunk: past the cap, bytes are dropped rather than refused.
        Ok(4096)
    }
}

impl AsyncWrite for OutputCapture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(data);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
