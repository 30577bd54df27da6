//! Errors of the plugin host: [`PluginError`] for loading, [`CallError`] for one call.
//!
//! Load errors stop the daemon from starting, so each names the plugin and the file and says
//! what to fix. Call errors never stop anything: the host logs them and counts the call as a
//! pass (see the module docs of [`crate::plugins`]).

use std::path::PathBuf;
use std::time::Duration;

/// Why [`PluginHost::load`](super::PluginHost::load) failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The spec itself is unusable (empty or duplicate id, zero timeout, tiny memory limit).
    #[error("plugin `{id}` ({path}): invalid plugin settings: {reason}")]
    Spec {
        /// The plugin id from the spec.
        id: String,
        /// The component path from the spec.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// The operator's plugin config is not a JSON object.
    #[error("plugin `{id}` ({path}): config must be a JSON object: {reason}")]
    Config {
        /// The plugin id from the spec.
        id: String,
        /// The component path from the spec.
        path: PathBuf,
        /// What the JSON parser or the shape check reported.
        reason: String,
    },

    /// The component file could not be read.
    #[error("plugin `{id}`: cannot read {path}: {source}; check the plugin path")]
    Read {
        /// The plugin id from the spec.
        id: String,
        /// The component path from the spec.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not a valid WebAssembly component for this host.
    #[error(
        "plugin `{id}`: {path} is not a valid WebAssembly component: {reason}; build it for \
         wasm32-wasip2 against agentchat:plugin@0.1.0"
    )]
    Compile {
        /// The plugin id from the spec.
        id: String,
        /// The component path from the spec.
        path: PathBuf,
        /// The compiler's message.
        reason: String,
    },

    /// The component needs imports the host does not provide, or exports no hook the host
    /// would call.
    #[error(
        "plugin `{id}`: {path} does not fit the agentchat:plugin@0.1.0 API: {reason}; it may \
         import only the API's interfaces (log, config, kv, messaging, history, http) and WASI \
         p2, and must export the hooks it is called for"
    )]
    Link {
        /// The plugin id from the spec.
        id: String,
        /// The component path from the spec.
        path: PathBuf,
        /// The linker's message.
        reason: String,
    },

    /// The plugin's manifest does not match its spec or its component.
    #[error("plugin `{id}`: manifest {path}: `{key}` {reason}")]
    Manifest {
        /// The plugin id from the spec.
        id: String,
        /// The manifest file.
        path: PathBuf,
        /// The manifest key at fault (`id`, `hooks`, `limits.memory-mib`, ...).
        key: String,
        /// What does not match and what to change.
        reason: String,
    },

    /// The manifest asks for capabilities the operator did not grant.
    #[error(
        "plugin `{id}` asks for capabilities that are not granted: {missing}; grant them under \
         [plugins.grants] in its agentchatd.toml entry (keys send, kv, timers, history, \
         http_allowed_hosts) or do not enable the plugin"
    )]
    NotGranted {
        /// The plugin id from the spec.
        id: String,
        /// The capabilities missing, comma-separated.
        missing: String,
    },

    /// The operator's config does not fit the manifest's config schema.
    #[error("plugin `{id}`: config field `{field}` {reason}; fix the plugin's config")]
    ConfigSchema {
        /// The plugin id from the spec.
        id: String,
        /// JSON pointer of the offending field (`/` for the whole config).
        field: String,
        /// What the schema refused.
        reason: String,
    },

    /// The manifest file itself is invalid.
    #[error("plugin manifest {0}")]
    ManifestFile(#[from] super::ManifestError),

    /// The compilation cache directory could not be prepared.
    #[error("plugin cache directory {path}: {reason}; fix its permissions or choose another one")]
    Cache {
        /// The cache directory given to the host.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The WebAssembly engine could not be created (an unsupported host, most likely).
    #[error("cannot start the WebAssembly engine: {reason}")]
    Engine {
        /// wasmtime's message.
        reason: String,
    },
}

/// Why one plugin call produced no decision. The host treats every such call as a pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The plugin trapped (a panic, `unreachable`, an out-of-bounds access, ...).
    #[error(
        "plugin trapped: {0}; the call counts as a pass, fix the plugin (its stderr is logged at \
         debug)"
    )]
    Trap(String),

    /// The plugin ran past its time budget and was stopped.
    #[error(
        "plugin ran past its time budget of {budget:?}; the call counts as a pass, make the plugin \
         faster or raise its timeout"
    )]
    Timeout {
        /// The budget the call had.
        budget: Duration,
    },

    /// The plugin tried to grow its memory past its limit.
    #[error(
        "plugin hit its memory limit; the call counts as a pass, raise the plugin's memory limit \
         or make it allocate less"
    )]
    MemoryLimit,

    /// The plugin returned a decision the host refuses (see the limits in the module docs).
    #[error("plugin returned invalid output: {0}; the call counts as a pass, fix the plugin")]
    BadOutput(String),

    /// The plugin itself reported an error through `plugin-error`.
    #[error("plugin reported an error: {0}; the call counts as a pass")]
    PluginError(String),

    /// The plugin failed too often and sits out a cooldown; it was not run.
    #[error(
        "plugin is suspended after repeated failures for another {remaining:?}; the call counts \
         as a pass"
    )]
    Suspended {
        /// Time left in the cooldown.
        remaining: Duration,
    },
}

impl CallError {
    /// Whether this failure counts towards suspending the plugin: the guest misbehaved, as
    /// opposed to reporting an error itself or not being run at all.
    pub fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            CallError::Trap(_)
                | CallError::Timeout { .. }
                | CallError::MemoryLimit
                | CallError::BadOutput(_)
        )
    }
}
