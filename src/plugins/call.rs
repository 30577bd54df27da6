//! One plugin call: a fresh store, the host side of the `log` and `config` imports, the
//! per-call limits, and the mapping of whatever went wrong onto [`CallError`].
//!
//! Every call gets a new `Store` from the plugin's pre-linked instance, so nothing a guest did
//! in one call (a trap, a corrupted heap, a global it set) can reach the next one.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{self, ReplierPre, agentchat};
use super::breaker::Breaker;
use super::engine::deadline_ticks;
use super::{CallError, Decision, validate};

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
    pub pre: ReplierPre<CallState>,
    pub config: Arc<PluginConfig>,
    pub timeout: Duration,
    pub memory_limit_bytes: usize,
    /// A std mutex: it is held for a few instructions and never across an `.await`.
    pub breaker: Mutex<Breaker>,
}

impl CallTarget {
    pub(crate) fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Store data of one call.
pub(crate) struct CallState {
    plugin_id: Arc<str>,
    config: Arc<PluginConfig>,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: CallLimiter,
    log_lines: u32,
    log_dropped: u32,
    stdout: OutputCapture,
    stderr: OutputCapture,
}

/// Runs `on-message` of one plugin in a fresh store and checks what it returned.
pub(crate) async fn run(
    target: &CallTarget,
    msg: &bindings::wit::InboundMessage,
) -> Result<Decision, CallError> {
    let engine = target.pre.engine();
    let mut store = wasmtime::Store::new(engine, CallState::new(target));
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(deadline_ticks(target.timeout));
    store.epoch_deadline_trap();

    // The store lives past the call so the limiter and the captured output can be read after
    // a failure as well.
    let outcome = {
        let call = async {
            let plugin = target.pre.instantiate_async(&mut store).await?;
            plugin.agentchat_plugin_inbound().call_on_message(&mut store, msg).await
        };
        tokio::time::timeout(target.timeout + BACKSTOP_GRACE, call).await
    };
    store.data().flush_output();
    store.data().report_dropped_logs();

    match outcome {
        Err(_elapsed) => Err(CallError::Timeout { budget: target.timeout }),
        Ok(Err(err)) => Err(classify(&err, &store.data().limiter, target.timeout)),
        Ok(Ok(Err(plugin_err))) => {
            Err(CallError::PluginError(bindings::describe_plugin_error(&plugin_err)))
        }
        Ok(Ok(Ok(decision))) => validate::check_decision(bindings::from_wit_decision(decision)),
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
    fn new(target: &CallTarget) -> CallState {
        let stdout = OutputCapture::default();
        let stderr = OutputCapture::default();

        // No preopens, environment, arguments or network: the builder's defaults deny them,
        // and only the output streams are replaced so they end up in the log.
        let wasi = WasiCtxBuilder::new().stdout(stdout.clone()).stderr(stderr.clone()).build();
        let limits = StoreLimitsBuilder::new().memory_size(target.memory_limit_bytes).build();

        CallState {
            plugin_id: target.id.clone(),
            config: target.config.clone(),
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
                    plugin = %self.plugin_id,
                    stream,
                    "{}",
                    truncate(line, MAX_LOG_LINE_BYTES)
                );
            }
            if dropped > 0 {
                tracing::debug!(plugin = %self.plugin_id, stream, dropped, "plugin output cut");
            }
        }
    }

    fn report_dropped_logs(&self) {
        if self.log_dropped > 0 {
            tracing::warn!(
                plugin = %self.plugin_id,
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
    fn log(
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

        let plugin = &*self.plugin_id;
        let msg = truncate(&msg, MAX_LOG_LINE_BYTES);
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
    fn get(&mut self, key: String) -> Option<String> {
        self.config.values.get(&key).map(|value| match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    }

    fn all_json(&mut self) -> String {
        self.config.json.clone()
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
        out.push_str(truncate(key, 64));
        out.push('=');
        out.push_str(truncate(value, 256));
    }
    out
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
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
