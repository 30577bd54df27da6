//! Reads `agentchatd.toml` and turns it into a validated [`Config`].
//!
//! The file is parsed into private serde structs that refuse unknown keys, then checked field by
//! field. Every error names the offending key and, where the file has one, its line, so an
//! operator can fix it without reading code. Secrets never live in the file: the API key comes
//! from a file path or an environment variable, and is read only when the daemon starts.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default per-call time budget of a plugin hook.
const DEFAULT_PLUGIN_TIMEOUT_MS: u64 = 200;
/// Default memory cap of one plugin instance.
const DEFAULT_PLUGIN_MEMORY_MIB: u64 = 32;
/// Default pause between two `/v1/messages/sync` polls when the inbox is idle.
const DEFAULT_POLL_INTERVAL_MS: u64 = 2_000;
/// Default ceiling on the requests the daemon makes per second (the platform allows 60).
const DEFAULT_REQUESTS_PER_SECOND: u32 = 60;
/// Default time queued sends may still go out once a stop was asked for (below systemd's
/// TimeoutStopSec=30 in the shipped unit).
const DEFAULT_STOP_FLUSH_MS: u64 = 10_000;
/// Default silence after which a loop counts as stalled.
const DEFAULT_STALL_LIMIT_SECS: u64 = 60;
/// Default number of new threads awaiting a reply allowed per rolling 24 h.
const DEFAULT_COLD_THREADS_PER_DAY: u32 = 100;
/// Default attempts of a failing send before it becomes a dead letter.
const DEFAULT_MAX_ATTEMPTS: u32 = 12;
/// Default first retry delay after a transient send failure.
const DEFAULT_RETRY_INITIAL_MS: u64 = 500;
/// Default slack added to the one-second pacing window, covering request travel-time jitter.
const DEFAULT_WINDOW_MARGIN_MS: u64 = 25;

/// A configuration problem, with the key and line that caused it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown or mistyped key. Shown as
    /// `file:line: `key`: message`, like [`ConfigError::Invalid`].
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file that was parsed.
        path: PathBuf,
        /// The line the parser stopped at.
        line: usize,
        /// The parser's message, led by the key when one is on that line.
        message: String,
    },
    /// A key has a value the daemon cannot use.
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        /// The file that was parsed.
        path: PathBuf,
        /// 1-based line of the value, or 0 when the key is missing altogether.
        line: usize,
        /// The dotted key, such as `agent.api_base`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The configuration loads but does not work with what it points at.
    #[error("{0}")]
    Unusable(String),
    /// The API key could not be loaded from where the config points.
    #[error("cannot load the API key: {0}")]
    ApiKey(String),
}

/// How the daemon receives its inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The live WebSocket `/v1/ws`.
    Websocket,
    /// Polling `GET /v1/messages/sync`.
    Poll,
    /// The WebSocket, falling back to polling when the server does not offer one.
    Auto,
}

/// Where the API key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key (surrounding whitespace is ignored).
    File(PathBuf),
    /// An environment variable holding the key.
    Env(String),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// An API key. Its `Debug` output is redacted so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the Authorization header and the HELLO frame only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl KeySource {
    /// Reads the key.
    ///
    /// # Errors
    /// When the file or variable is missing or empty, or holds something that cannot be a key.
    pub fn load(&self) -> Result<ApiKey, ConfigError> {
        let raw = match self {
            Self::File(path) => std::fs::read_to_string(path).map_err(|err| {
                ConfigError::ApiKey(format!(
                    "cannot read key file {}: {err}; write the agent's API key into it",
                    path.display()
                ))
            })?,
            Self::Env(name) => std::env::var(name).map_err(|_| {
                ConfigError::ApiKey(format!(
                    "environment variable {name} is not set; export the agent's API key in it"
                ))
            })?,
        };
        let key = raw.trim();
        if key.is_empty() {
            return Err(ConfigError::ApiKey(format!("{self:?} is empty")));
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::ApiKey(format!(
                "{self:?} holds whitespace inside the key; it must hold the key alone"
            )));
        }
        Ok(ApiKey::new(key))
    }
}

/// One plugin the operator enabled, in priority order.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// Short name used in logs and in reply ids.
    pub id: String,
    /// The compiled WASM component.
    pub path: PathBuf,
    /// The plugin's manifest, when the entry names one; the host then checks the component,
    /// the grants and the config against it.
    pub manifest: Option<crate::plugins::Manifest>,
    /// Higher runs first; equal priorities run in file order.
    pub priority: i64,
    /// What the operator grants the plugin.
    pub grants: crate::plugins::Grants,
    /// What a failed `before-send` call of this plugin does to the message.
    pub failure_policy: crate::plugins::FailurePolicy,
    /// Time budget of one hook call.
    pub timeout: Duration,
    /// Memory cap of one plugin instance, in bytes.
    pub memory_limit_bytes: usize,
    /// The plugin's own settings, handed to it as JSON.
    pub config_json: String,
}

/// The validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the AgentChat API, without a trailing slash (`https://api.agentchat.me`).
    pub api_base: String,
    /// WebSocket URL of the inbox (`wss://…/v1/ws`), derived from `api_base` unless set.
    pub ws_url: String,
    /// Where the API key comes from.
    pub api_key: KeySource,
    /// Directory for the daemon's SQLite state and plugin cache.
    pub state_dir: PathBuf,
    /// How the inbox is received.
    pub transport: Transport,
    /// Pause between polls when the inbox is idle.
    pub poll_interval: Duration,
    /// Caps on automatic replies per conversation and per peer within a window.
    pub loop_guard: crate::inbox::LoopGuard,
    /// Ceiling on API requests per second made by this daemon.
    pub requests_per_second: u32,
    /// Slack added to the one-second pacing window so jitter in request travel times cannot
    /// push two windows' worth into one of the server's buckets.
    pub window_margin: Duration,
    /// New threads the agent may have awaiting a reply per rolling 24 h (the platform's 100).
    pub cold_threads_per_day: u32,
    /// Attempts of a send failing for transient reasons before it becomes a dead letter.
    pub max_attempts: u32,
    /// First retry delay after a transient send failure (doubling, jittered, up to 60 s).
    pub retry_initial: Duration,
    /// Plugins in priority order (first runs first).
    pub plugins: Vec<PluginConfig>,
    /// Log output as JSON lines instead of plain text.
    pub log_json: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; off when `None`.
    pub ops_listen: Option<std::net::SocketAddr>,
    /// On shutdown, how long queued sends may still go out after intake stopped.
    pub stop_flush: Duration,
    /// A loop silent for this long counts as stalled (watchdog pings and `/healthz` stop).
    pub stall_limit: Duration,
}

impl Config {
    /// A config with every optional setting at its default: the WebSocket URL derived from
    /// `api_base`, `auto` transport and no plugins.
    pub fn new(api_base: &str, api_key: KeySource, state_dir: PathBuf) -> Self {
        let api_base = api_base.trim_end_matches('/').to_owned();
        Self {
            ws_url: derive_ws_url(&api_base),
            api_base,
            api_key,
            state_dir,
            transport: Transport::Auto,
            poll_interval: Duration::from_millis(DEFAULT_POLL_INTERVAL_MS),
            loop_guard: crate::inbox::LoopGuard::default(),
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            window_margin: Duration::from_millis(DEFAULT_WINDOW_MARGIN_MS),
            cold_threads_per_day: DEFAULT_COLD_THREADS_PER_DAY,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_initial: Duration::from_millis(DEFAULT_RETRY_INITIAL_MS),
            plugins: Vec::new(),
            log_json: false,
            ops_listen: None,
            stop_flush: Duration::from_millis(DEFAULT_STOP_FLUSH_MS),
            stall_limit: Duration::from_secs(DEFAULT_STALL_LIMIT_SECS),
        }
    }
}

impl PluginConfig {
    /// A plugin entry with the default time budget and memory cap and an empty config.
    pub fn new(id: &str, path: PathBuf) -> Self {
        Self {
            id: id.to_owned(),
            path,
            timeout: Duration::from_millis(DEFAULT_PLUGIN_TIMEOUT_MS),
            memory_limit_bytes: usize::try_from(DEFAULT_PLUGIN_MEMORY_MIB << 20)
                .unwrap_or(usize::MAX),
            config_json: "{}".to_owned(),
            manifest: None,
            priority: 0,
            grants: crate::plugins::Grants::default(),
            failure_policy: crate::plugins::FailurePolicy::Open,
        }
    }
}

// === raw file shape ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Spanned<RawAgent>,
    #[serde(default)]
    state: Option<Spanned<RawState>>,
    #[serde(default)]
    inbox: Option<RawInbox>,
    #[serde(default)]
    outbox: Option<RawOutbox>,
    #[serde(default)]
    log: Option<RawLog>,
    #[serde(default)]
    service: Option<RawService>,
    #[serde(default)]
    plugins: Vec<Spanned<RawPlugin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    api_base: Spanned<String>,
    #[serde(default)]
    ws_url: Option<Spanned<String>>,
    #[serde(default)]
    api_key_file: Option<Spanned<String>>,
    #[serde(default)]
    api_key_env: Option<Spanned<String>>,
    #[serde(default)]
    api_key: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbox {
    #[serde(default)]
    transport: Option<Transport>,
    #[serde(default)]
    poll_interval_ms: Option<Spanned<u64>>,
    #[serde(default)]
    max_auto_replies_per_conversation: Option<Spanned<u32>>,
    #[serde(default)]
    max_auto_replies_per_peer: Option<Spanned<u32>>,
    #[serde(default)]
    auto_reply_window_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    #[serde(default)]
    requests_per_second: Option<Spanned<u32>>,
    #[serde(default)]
    window_margin_ms: Option<Spanned<u64>>,
    #[serde(default)]
    cold_threads_per_day: Option<Spanned<u32>>,
    #[serde(default)]
    max_attempts: Option<Spanned<u32>>,
    #[serde(default)]
    retry_initial_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    stop_flush_ms: Option<Spanned<u64>>,
    #[serde(default)]
    stall_limit_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    id: Spanned<String>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    manifest: Option<Spanned<String>>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    timeout_ms: Option<Spanned<u64>>,
    #[serde(default)]
    memory_mib: Option<Spanned<u64>>,
    #[serde(default)]
    failure_policy: Option<Spanned<String>>,
    #[serde(default)]
    grants: Option<Spanned<RawGrants>>,
    #[serde(default)]
    config: Option<toml::Table>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGrants {
    #[serde(default)]
    send: bool,
    #[serde(default)]
    kv: bool,
    #[serde(default)]
    timers: bool,
    #[serde(default)]
    history: bool,
    #[serde(default)]
    http_allowed_hosts: Vec<String>,
    #[serde(default)]
    send_per_minute: Option<u32>,
    #[serde(default)]
    kv_max_bytes: Option<u64>,
    #[serde(default)]
    http_bearer_host: Option<String>,
    #[serde(default)]
    http_bearer_file: Option<String>,
}

/// Reads and validates a config file. Relative paths in it are taken from the file's folder.
///
/// # Errors
/// When the file cannot be read or any key is missing, unknown or invalid.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse(&text, path)
}

/// Validates config text; `path` is used for error messages and to resolve relative paths.
///
/// # Errors
/// When any key is missing, unknown or invalid.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    // The parser's own rendering quotes the offending source line, which may hold a key
    // pasted in by mistake; only its message and the line number are shown.
    let raw: RawConfig = toml::from_str(text).map_err(|err| {
        let at = err.span().map_or(0, |span| span.start);
        let line = line_of(text, at);
        let key = key_on_line(text, at).map(|key| format!("`{key}`: ")).unwrap_or_default();
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            message: format!("{key}{}", err.message().trim_end()),
        }
    })?;
    let ctx = Ctx { text, path };
    let base_dir = path.parent().unwrap_or(Path::new("."));

    let agent_span = raw.agent.span();
    let agent = raw.agent.into_inner();
    if let Some(inline) = &agent.api_key {
        return Err(ctx.invalid(
            "agent.api_key",
            inline.span(),
            "keys are not accepted inline; put the key in a file and set `api_key_file`, \
             or in an environment variable named by `api_key_env`",
        ));
    }
    let api_base = ctx.http_url("agent.api_base", &agent.api_base)?;
    let ws_url = match &agent.ws_url {
        Some(url) => ctx.ws_url("agent.ws_url", url)?,
        None => derive_ws_url(&api_base),
    };
    let api_key = match (&agent.api_key_file, &agent.api_key_env) {
        (Some(file), None) => {
            ctx.non_empty("agent.api_key_file", file)?;
            KeySource::File(resolve(base_dir, file.get_ref()))
        }
        (None, Some(env)) => {
            ctx.non_empty("agent.api_key_env", env)?;
            if !is_env_name(env.get_ref()) {
                // Never echo the value: a key pasted here by mistake must not reach the logs.
                return Err(ctx.invalid(
                    "agent.api_key_env",
                    env.span(),
                    "must be the name of an environment variable (letters, digits and '_'), \
                     not the key itself",
                ));
            }
            KeySource::Env(env.get_ref().clone())
        }
        (Some(file), Some(_)) => {
            return Err(ctx.invalid(
                "agent.api_key_file",
                file.span(),
                "set only one of `api_key_file` and `api_key_env`",
            ));
        }
        (None, None) => {
            return Err(ctx.invalid(
                "agent.api_key_file",
                agent_span,
                "the [agent] table needs `api_key_file` (a file holding the key) or \
                 `api_key_env` (an environment variable holding it)",
            ));
        }
    };

    let state_dir = match &raw.state {
        Some(state) => {
            let dir = &state.get_ref().dir;
            ctx.non_empty("state.dir", dir)?;
            resolve(base_dir, dir.get_ref())
        }
        None => return Err(ctx.missing("state.dir", "add a [state] table with `dir = \"…\"`")),
    };

    let inbox = raw.inbox.unwrap_or(RawInbox {
        transport: None,
        poll_interval_ms: None,
        max_auto_replies_per_conversation: None,
        max_auto_replies_per_peer: None,
        auto_reply_window_secs: None,
    });
    let mut loop_guard = crate::inbox::LoopGuard::default();
    if let Some(n) = &inbox.max_auto_replies_per_conversation {
        let n = ctx.in_range("inbox.max_auto_replies_per_conversation", n, 1, 1_000_000)?;
        loop_guard.per_conversation = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(n) = &inbox.max_auto_replies_per_peer {
        let n = ctx.in_range("inbox.max_auto_replies_per_peer", n, 1, 1_000_000)?;
        loop_guard.per_peer = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(secs) = &inbox.auto_reply_window_secs {
        let secs = ctx.in_range("inbox.auto_reply_window_secs", secs, 1, 86_400)?;
        loop_guard.window = Duration::from_secs(secs);
    }
    let poll_interval_ms = match &inbox.poll_interval_ms {
        Some(ms) => ctx.in_range("inbox.poll_interval_ms", ms, 50, 3_600_000)?,
        None => DEFAULT_POLL_INTERVAL_MS,
    };
    let outbox = raw.outbox.unwrap_or(RawOutbox {
        requests_per_second: None,
        window_margin_ms: None,
        cold_threads_per_day: None,
        max_attempts: None,
        retry_initial_ms: None,
    });
    let requests_per_second = match &outbox.requests_per_second {
        Some(rps) => {
            let value = ctx.in_range("outbox.requests_per_second", rps, 1, 1_000)?;
            u32::try_from(value).unwrap_or(u32::MAX)
        }
        None => DEFAULT_REQUESTS_PER_SECOND,
    };
    let cold_threads_per_day = match &outbox.cold_threads_per_day {
        Some(n) => {
            let value = ctx.in_range("outbox.cold_threads_per_day", n, 0, 100_000)?;
            u32::try_from(value).unwrap_or(u32::MAX)
        }
        None => DEFAULT_COLD_THREADS_PER_DAY,
    };
    let max_attempts = match &outbox.max_attempts {
        Some(n) => u32::try_from(ctx.in_range("outbox.max_attempts", n, 1, 1_000)?).unwrap_or(1),
        None => DEFAULT_MAX_ATTEMPTS,
    };
    let retry_initial_ms = match &outbox.retry_initial_ms {
        Some(ms) => ctx.in_range("outbox.retry_initial_ms", ms, 1, 60_000)?,
        None => DEFAULT_RETRY_INITIAL_MS,
    };
    let window_margin_ms = match &outbox.window_margin_ms {
        Some(ms) => ctx.in_range("outbox.window_margin_ms", ms, 0, 1_000)?,
        None => DEFAULT_WINDOW_MARGIN_MS,
    };
    let log_json = match raw.log.and_then(|l| l.format) {
        Some(format) => match format.get_ref().as_str() {
            "plain" => false,
            "json" => true,
            _ => {
                return Err(ctx.invalid(
                    "log.format",
                    format.span(),
                    "must be \"plain\" or \"json\"",
                ));
            }
        },
        None => false,
    };

    let service = raw.service.unwrap_or(RawService {
        listen: None,
        stop_flush_ms: None,
        stall_limit_secs: None,
    });
    let ops_listen = match &service.listen {
        Some(listen) => Some(listen.get_ref().trim().parse().map_err(|_| {
            ctx.invalid(
                "service.listen",
                listen.span(),
                "must be an address and port such as \"127.0.0.1:9477\"",
            )
        })?),
        None => None,
    };
    let stop_flush_ms = match &service.stop_flush_ms {
        Some(ms) => ctx.in_range("service.stop_flush_ms", ms, 0, 600_000)?,
        None => DEFAULT_STOP_FLUSH_MS,
    };
    let stall_limit_secs = match &service.stall_limit_secs {
        Some(secs) => ctx.in_range("service.stall_limit_secs", secs, 5, 3_600)?,
        None => DEFAULT_STALL_LIMIT_SECS,
    };

    let mut plugins: Vec<PluginConfig> = Vec::with_capacity(raw.plugins.len());
    for plugin in &raw.plugins {
        if plugin.get_ref().enabled == Some(false) {
            continue;
        }
        let plugin = ctx.plugin(plugin.get_ref(), plugin.span(), base_dir)?;
        if plugins.iter().any(|p| p.id == plugin.id) {
            let span = raw
                .plugins
                .iter()
                .rev()
                .find(|p| p.get_ref().id.get_ref() == &plugin.id)
                .map_or(0..0, |p| p.get_ref().id.span());
            return Err(ctx.invalid("plugins.id", span, "plugin ids must be unique"));
        }
        plugins.push(plugin);
    }
    // A stable sort: equal priorities keep the file's order.
    plugins.sort_by_key(|p| std::cmp::Reverse(p.priority));

    Ok(Config {
        api_base,
        ws_url,
        api_key,
        state_dir,
        transport: inbox.transport.unwrap_or(Transport::Auto),
        poll_interval: Duration::from_millis(poll_interval_ms),
        loop_guard,
        requests_per_second,
        window_margin: Duration::from_millis(window_margin_ms),
        cold_threads_per_day,
        max_attempts,
        retry_initial: Duration::from_millis(retry_initial_ms),
        plugins,
        log_json,
        ops_listen,
        stop_flush: Duration::from_millis(stop_flush_ms),
        stall_limit: Duration::from_secs(stall_limit_secs),
    })
}

/// Checks that every plugin file exists and is readable, so a missing build is caught by
/// `check-config` (and systemd's `ExecStartPre=`) rather than at start.
///
/// # Errors
/// Names the first plugin whose file cannot be read.
pub fn check_plugin_files(config: &Config) -> Result<(), ConfigError> {
    for plugin in &config.plugins {
        if let Err(err) = std::fs::File::open(&plugin.path) {
            return Err(ConfigError::Unusable(format!(
                "plugin `{}`: cannot read {}: {err}; build it (scripts/build-plugins builds the \
                 examples) or fix `path`",
                plugin.id,
                plugin.path.display()
            )));
        }
    }
    Ok(())
}

/// Reads a secret token from `path`: one line, no inner whitespace. The message never
/// includes the file's contents.
fn read_token(path: &Path) -> Result<ApiKey, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read {}: {err}; write the token into it", path.display()))?;
    let token = raw.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{} must hold the token alone, on one line", path.display()));
    }
    Ok(ApiKey::new(token))
}

/// Turns `http(s)://host` into `ws(s)://host/v1/ws`, as the platform's integrations do.
pub fn derive_ws_url(api_base: &str) -> String {
    let rest = api_base
        .strip_prefix("https://")
        .map(|rest| format!("wss://{rest}"))
        .or_else(|| api_base.strip_prefix("http://").map(|rest| format!("ws://{rest}")))
        .unwrap_or_else(|| api_base.to_owned());
    format!("{rest}/v1/ws")
}

/// Whether `name` can be an environment variable name.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    // `ac_` starts every AgentChat key; no variable worth naming does.
    !name.starts_with("ac_")
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn resolve(base_dir: &Path, value: &str) -> PathBuf {
    let path = Path::new(value);
    if path.is_absolute() { path.to_path_buf() } else { base_dir.join(path) }
}

/// Error-building context: the text (to turn spans into lines) and the file name.
struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
}

/// The bare key assigned on the line holding byte offset `at`, if the line is `key = …`.
fn key_on_line(text: &str, at: usize) -> Option<&str> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let bare = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    bare.then_some(key)
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    let end = at.min(text.len());
    text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
}

impl Ctx<'_> {
    fn line_of(&self, span: Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    fn invalid(&self, key: &str, span: Range<usize>, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line_of(span),
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    fn missing(&self, key: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: 0,
            key: key.to_owned(),
            message: format!("missing; {message}"),
        }
    }

    fn non_empty(&self, key: &str, value: &Spanned<String>) -> Result<(), ConfigError> {
        if value.get_ref().trim().is_empty() {
            return Err(self.invalid(key, value.span(), "must not be empty"));
        }
        Ok(())
    }

    fn in_range(
        &self,
        key: &str,
        value: &Spanned<impl Into<u64> + Copy>,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let n: u64 = (*value.get_ref()).into();
        if !(min..=max).contains(&n) {
            return Err(self.invalid(
                key,
                value.span(),
                &format!("must be between {min} and {max}"),
            ));
        }
        Ok(n)
    }

    fn http_url(&self, key: &str, value: &Spanned<String>) -> Result<String, ConfigError> {
        let url = value.get_ref().trim().trim_end_matches('/');
        let host = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        match host {
            Some(host) if host.split('/').next().is_some_and(|auth| auth.contains('@')) => {
                Err(self.invalid(
                    key,
                    value.span(),
                    "must not carry credentials (user:password@); the API key goes in \
                     `api_key_file` or `api_key_env`",
                ))
            }
            Some(_) if url.ends_with("/v1") => Err(self.invalid(
                key,
                value.span(),
                "must be the server's base URL without the /v1 path (the daemon adds it)",
            )),
            Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
                Ok(url.to_owned())
            }
            _ => Err(self.invalid(
                key,
                value.span(),
                "must be an http:// or https:// URL such as \"https://api.agentchat.me\"",
            )),
        }
    }

    fn ws_url(&self, key: &str, value: &Spanned<String>) -> Result<String, ConfigError> {
        let url = value.get_ref().trim();
        let host = url.strip_prefix("wss://").or_else(|| url.strip_prefix("ws://"));
        match host {
            Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
                Ok(url.to_owned())
            }
            _ => Err(self.invalid(
                key,
                value.span(),
                "must be a ws:// or wss:// URL such as \"wss://api.agentchat.me/v1/ws\"",
            )),
        }
    }

    fn plugin(
        &self,
        raw: &RawPlugin,
        entry: Range<usize>,
        base_dir: &Path,
    ) -> Result<PluginConfig, ConfigError> {
        let id = raw.id.get_ref();
        let valid_id = !id.is_empty()
            && id.len() <= 64
            && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_id {
            return Err(self.invalid(
                "plugins.id",
                raw.id.span(),
                "must be 1-64 characters of a-z, 0-9 and '-'",
            ));
        }
        let manifest = match &raw.manifest {
            Some(value) => {
                self.non_empty("plugins.manifest", value)?;
                let path = resolve(base_dir, value.get_ref());
                let manifest = crate::plugins::Manifest::load(&path).map_err(|err| {
                    self.invalid("plugins.manifest", value.span(), &err.to_string())
                })?;
                Some(manifest)
            }
            None => None,
        };
        let path = match (&raw.path, &manifest) {
            (Some(value), _) => {
                self.non_empty("plugins.path", value)?;
                resolve(base_dir, value.get_ref())
            }
            (None, Some(manifest)) => manifest.component.clone(),
            (None, None) => {
                return Err(self.invalid(
                    "plugins.path",
                    entry,
                    "is missing; give the component's `path` or the plugin's `manifest`",
                ));
            }
        };
        let timeout_ms = match &raw.timeout_ms {
            Some(ms) => self.in_range("plugins.timeout_ms", ms, 1, 60_000)?,
            None => DEFAULT_PLUGIN_TIMEOUT_MS,
        };
        let memory_mib = match &raw.memory_mib {
            Some(mib) => self.in_range("plugins.memory_mib", mib, 1, 4_096)?,
            None => DEFAULT_PLUGIN_MEMORY_MIB,
        };
        let config_json = match &raw.config {
            Some(table) => serde_json::to_string(table).map_err(|err| {
                self.invalid("plugins.config", raw.id.span(), &format!("cannot encode: {err}"))
            })?,
            None => "{}".to_owned(),
        };
        let failure_policy = match raw.failure_policy.as_ref().map(|v| (v.get_ref().as_str(), v)) {
            None | Some(("open", _)) => crate::plugins::FailurePolicy::Open,
            Some(("closed", _)) => crate::plugins::FailurePolicy::Closed,
            Some((_, value)) => {
                return Err(self.invalid(
                    "plugins.failure_policy",
                    value.span(),
                    "must be \"open\" (a failed before-send keeps the message) or \"closed\" \
                     (it cancels the message)",
                ));
            }
        };
        let grants = match &raw.grants {
            Some(grants) => self.grants(grants, base_dir)?,
            None => crate::plugins::Grants::default(),
        };
        Ok(PluginConfig {
            id: id.clone(),
            path,
            manifest,
            priority: raw.priority.unwrap_or(0),
            grants,
            failure_policy,
            timeout: Duration::from_millis(timeout_ms),
            memory_limit_bytes: usize::try_from(memory_mib * 1024 * 1024).unwrap_or(usize::MAX),
            config_json,
        })
    }

    fn grants(
        &self,
        raw: &Spanned<RawGrants>,
        base_dir: &Path,
    ) -> Result<crate::plugins::Grants, ConfigError> {
        let (span, raw) = (raw.span(), raw.get_ref());
        let mut grants = crate::plugins::Grants::default();
        for host in &raw.http_allowed_hosts {
            let bare = host.trim();
            if bare.is_empty() || bare.contains('/') || bare.contains('*') || bare.contains('@') {
                return Err(self.invalid(
                    "plugins.grants.http_allowed_hosts",
                    span,
                    &format!(
                        "`{host}` is not a host name; write `api.example.com` or \
                         `api.example.com:8443`, without scheme, path or wildcards"
                    ),
                ));
            }
        }
        if let Some(per_minute) = raw.send_per_minute {
            if !(1..=600).contains(&per_minute) {
                return Err(self.invalid(
                    "plugins.grants.send_per_minute",
                    span,
                    "must be between 1 and 600",
                ));
            }
            grants.send_per_minute = per_minute;
        }
        if let Some(bytes) = raw.kv_max_bytes {
            if !(1024..=(1 << 30)).contains(&bytes) {
                return Err(self.invalid(
                    "plugins.grants.kv_max_bytes",
                    span,
                    "must be between 1024 and 1073741824",
                ));
            }
            grants.kv_max_bytes = bytes;
        }
        grants.http_bearer = match (&raw.http_bearer_host, &raw.http_bearer_file) {
            (None, None) => None,
            (Some(host), Some(file)) => {
                let granted = raw.http_allowed_hosts.iter().any(|h| h.trim() == host.trim());
                if !granted {
                    return Err(self.invalid(
                        "plugins.grants.http_bearer_host",
                        span,
                        &format!("`{host}` must also be listed in http_allowed_hosts"),
                    ));
                }
                let path = resolve(base_dir, file);
                let token = read_token(&path).map_err(|why| {
                    self.invalid("plugins.grants.http_bearer_file", span.clone(), &why)
                })?;
                Some(crate::plugins::HttpBearer { host: host.trim().to_owned(), token })
            }
            _ => {
                return Err(self.invalid(
                    "plugins.grants.http_bearer_host",
                    span,
                    "set both http_bearer_host and http_bearer_file, or neither",
                ));
            }
        };
        grants.capabilities = crate::plugins::Capabilities {
            send: raw.send,
            kv: raw.kv,
            timers: raw.timers,
            history: raw.history,
            http_allowed_hosts: raw
                .http_allowed_hosts
                .iter()
                .map(|h| h.trim().to_owned())
                .collect(),
            ..crate::plugins::Capabilities::default()
        };
        Ok(grants)
    }
}

#[cfg(test)]
mod tests;
