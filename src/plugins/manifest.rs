//! The plugin manifest, `agentchat-plugin.toml`: what a plugin is, which API it was built
//! against, which hooks it exports, what it asks the operator for and how its config looks.
//!
//! Reading a manifest checks only the file itself. Whether the component really exports the
//! listed hooks, whether the operator granted the capabilities and whether the operator's config
//! fits the schema is checked by [`super::PluginHost::load`], which knows all three.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::schema::ConfigSchema;

/// The manifest file name a plugin folder carries.
pub const MANIFEST_FILE: &str = "agentchat-plugin.toml";

/// Largest manifest or schema file read, in bytes; real ones are a few hundred bytes.
const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Hooks (exported interfaces of `agentchat:plugin`) this host can call.
pub const KNOWN_HOOKS: &[&str] = &["lifecycle", "inbound", "outbound", "timer"];

/// Shortest timer period a manifest may declare.
pub const MIN_TIMER_PERIOD: Duration = Duration::from_secs(1);

/// Most timers one plugin may declare.
pub const MAX_TIMERS: usize = 16;

/// A parsed and checked manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Where the manifest was read from; relative paths in it are resolved against its folder.
    pub path: PathBuf,
    /// Unique plugin id; must equal the id the operator configures.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// The plugin's own version, `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// WIT package the plugin was built against, such as `agentchat:plugin@0.1.0`.
    pub api: String,
    /// The component file, resolved against the manifest's folder.
    pub component: PathBuf,
    /// Hooks the host calls, in the names of [`KNOWN_HOOKS`]; the component must export each.
    /// A component may export more (an SDK exports every hook with a default); those are not
    /// called.
    pub hooks: Vec<String>,
    /// Timers whose ticks the `timer` hook receives.
    pub timers: Vec<TimerSpec>,
    /// Capabilities the plugin needs; the operator must grant each one.
    pub capabilities: Capabilities,
    /// Per-call limits the plugin declares.
    pub limits: ManifestLimits,
    /// Schema of the operator's config, when the plugin takes any.
    pub config_schema: Option<ConfigSchema>,
}

/// Capabilities a plugin asks for (in a manifest) or an operator grants (in a
/// [`super::PluginSetup`]). Nothing is granted by default. A request without a grant refuses
/// the load; a grant without a request is harmless. The host checks grants again on every
/// import call, so a plugin without a manifest gets exactly what the operator granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Capabilities {
    /// Proactive sends.
    #[serde(default)]
    pub send: bool,
    /// Plugin-scoped key-value state.
    #[serde(default)]
    pub kv: bool,
    /// Timer ticks.
    #[serde(default)]
    pub timers: bool,
    /// Reading conversation history.
    #[serde(default)]
    pub history: bool,
    /// Hosts outbound HTTP may reach: `host` (any port) or `host:port`.
    #[serde(default)]
    pub http_allowed_hosts: Vec<String>,
    /// In a manifest: the plugin makes HTTP requests to hosts the operator picks (a model
    /// server, a webhook), so no host can be named in advance. Satisfied by a grant of at least
    /// one host in `http_allowed_hosts`; what the plugin may reach is still exactly that list.
    /// Not consulted in a grant.
    #[serde(default)]
    pub http: bool,
}

impl Capabilities {
    /// Names of what `self` asks for and `granted` does not give, such as `send`,
    /// `http-allowed-hosts: api.example.com` or `http-allowed-hosts: at least one host`.
    pub fn missing_from(&self, granted: &Capabilities) -> Vec<String> {
        let mut missing = Vec::new();
        for (name, wanted, given) in [
            ("send", self.send, granted.send),
            ("kv", self.kv, granted.kv),
            ("timers", self.timers, granted.timers),
            ("history", self.history, granted.history),
        ] {
            if wanted && !given {
                missing.push(name.to_string());
            }
        }
        for host in &self.http_allowed_hosts {
            if !granted.http_allowed_hosts.iter().any(|g| g.eq_ignore_ascii_case(host)) {
                missing.push(format!("http-allowed-hosts: {host}"));
            }
        }
        if self.http && granted.http_allowed_hosts.is_empty() {
            missing.push("http-allowed-hosts: at least one host".to_string());
        }
        missing
    }
}

/// A timer a manifest declares: the `timer` hook gets a tick every `period`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerSpec {
    /// Name handed to the hook in each tick.
    pub id: String,
    /// Time between ticks.
    pub period: Duration,
}

/// Per-call limits a manifest declares. The host never gives more than the operator allows;
/// a smaller declared limit tightens the call budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManifestLimits {
    /// Most memory one call needs, in MiB.
    pub memory_mib: Option<u32>,
    /// Longest one hook call needs.
    pub hook_timeout: Option<Duration>,
}

/// Why a manifest was refused. Every variant names the file; invalid values also name the key.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest (or a schema file it names) cannot be read.
    #[error("{path}: cannot read it: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        reason: String,
    },

    /// A key has a value the host cannot accept.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key, dotted for nested ones (`limits.memory-mib`).
        key: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
}

/// The file as written, before checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawManifest {
    id: String,
    name: Option<String>,
    version: String,
    api: String,
    component: PathBuf,
    hooks: Vec<String>,
    #[serde(default)]
    timers: Vec<RawTimer>,
    #[serde(default)]
    capabilities: Capabilities,
    #[serde(default)]
    limits: RawLimits,
    config_schema: Option<RawSchema>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTimer {
    id: String,
    every_ms: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    memory_mib: Option<u32>,
    hook_timeout_ms: Option<u64>,
}

/// `config-schema = "schema.json"` or an inline table.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSchema {
    File(PathBuf),
    Inline(toml::Table),
}

impl Manifest {
    /// Reads and checks the manifest at `path`; a schema file it names is read too.
    ///
    /// # Errors
    ///
    /// A [`ManifestError`] naming the file and, for bad values, the key and what to fix.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = read_bounded(path)?;
        Manifest::parse(&text, path)
    }

    /// Checks manifest `text` as if read from `path` (used for relative paths and messages).
    ///
    /// # Errors
    ///
    /// As for [`Manifest::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|err| ManifestError::Syntax {
            path: path.to_path_buf(),
            reason: err.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |key: &str, reason: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let dir = path.parent().unwrap_or(Path::new("."));

        check_id(&raw.id).map_err(|why| invalid("id", why))?;
        check_version(&raw.version).map_err(|why| invalid("version", why))?;
        check_api(&raw.api).map_err(|why| invalid("api", why))?;
        let hooks = check_hooks(raw.hooks).map_err(|why| invalid("hooks", why))?;
        let timers = check_timers(raw.timers, &hooks, &raw.capabilities)
            .map_err(|why| invalid("timers", why))?;
        let limits = check_limits(&raw.limits, &invalid)?;
        if raw.component.as_os_str().is_empty() {
            return Err(invalid("component", "is empty; give the path of the .wasm file".into()));
        }

        let config_schema = match raw.config_schema {
            None => None,
            Some(raw_schema) => Some(load_schema(raw_schema, path, dir)?),
        };
        Ok(Manifest {
            path: path.to_path_buf(),
            name: raw.name.unwrap_or_else(|| raw.id.clone()),
            id: raw.id,
            version: raw.version,
            api: raw.api,
            component: normalize(&dir.join(raw.component)),
            hooks,
            timers,
            capabilities: raw.capabilities,
            limits,
            config_schema,
        })
    }
}

/// Removes `.` and `name/..` pairs without touching the file system, so the path in logs
/// and errors is the one an operator would write.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn read_bounded(path: &Path) -> Result<String, ManifestError> {
    let read_err = |source| ManifestError::Read { path: path.to_path_buf(), source };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_FILE_BYTES {
        return Err(ManifestError::Syntax {
            path: path.to_path_buf(),
            reason: format!("the file is {len} bytes; at most {MAX_FILE_BYTES} are read"),
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

fn check_id(id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if id.is_empty() || id.len() > 64 || !id.chars().all(ok_char) {
        return Err(format!(
            "`{id}` is not a valid id; use 1 to 64 lowercase letters, digits, `-` or `_`"
        ));
    }
    Ok(())
}

fn check_version(version: &str) -> Result<(), String> {
    // Pre-release and build suffixes are allowed after the three numbers.
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit());
    if parts.len() != 3 || !parts.iter().all(numeric) {
        return Err(format!("`{version}` is not MAJOR.MINOR.PATCH (for example 0.1.0)"));
    }
    Ok(())
}

/// Accepts the host's package at the same major and minor version and a patch no newer than
/// the host's: patch releases only add, so an older plugin links, a newer one may not.
fn check_api(api: &str) -> Result<(), String> {
    let host = super::API_VERSION;
    let fail = || format!("`{api}` is not supported; this host implements {host}");
    let (package, version) = api.split_once('@').ok_or_else(fail)?;
    let (host_package, host_version) = host.split_once('@').ok_or_else(fail)?;
    if package != host_package {
        return Err(fail());
    }
    let triple = |v: &str| -> Option<(u64, u64, u64)> {
        let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
        let out = (it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(out)
    };
    match (triple(version), triple(host_version)) {
        (Some((ma, mi, pa)), Some((hma, hmi, hpa))) if ma == hma && mi == hmi && pa <= hpa => {
            Ok(())
        }
        _ => Err(fail()),
    }
}

fn check_hooks(hooks: Vec<String>) -> Result<Vec<String>, String> {
    if hooks.is_empty() {
        return Err(format!("is empty; list the hooks the plugin exports: {KNOWN_HOOKS:?}"));
    }
    let mut seen: Vec<String> = Vec::with_capacity(hooks.len());
    for hook in hooks {
        if !KNOWN_HOOKS.contains(&hook.as_str()) {
            return Err(format!("unknown hook `{hook}`; this host supports {KNOWN_HOOKS:?}"));
        }
        if seen.contains(&hook) {
            return Err(format!("hook `{hook}` is listed twice"));
        }
        seen.push(hook);
    }
    Ok(seen)
}

fn check_timers(
    raw: Vec<RawTimer>,
    hooks: &[String],
    capabilities: &Capabilities,
) -> Result<Vec<TimerSpec>, String> {
    let listed = hooks.iter().any(|h| h == "timer");
    match (raw.is_empty(), listed) {
        (true, true) => {
            return Err("is empty but hooks list `timer`; declare at least one timer".into());
        }
        (false, false) => {
            return Err("declares timers but hooks do not list `timer`; add it".into());
        }
        _ => {}
    }
    if !raw.is_empty() && !capabilities.timers {
        return Err("declares timers without asking for them; set capabilities.timers".into());
    }
    if raw.len() > MAX_TIMERS {
        return Err(format!("declares {} timers; at most {MAX_TIMERS} are allowed", raw.len()));
    }
    let mut timers: Vec<TimerSpec> = Vec::with_capacity(raw.len());
    for timer in raw {
        check_id(&timer.id).map_err(|why| format!("timer id: {why}"))?;
        if timers.iter().any(|t| t.id == timer.id) {
            return Err(format!("timer `{}` is declared twice", timer.id));
        }
        let period = Duration::from_millis(timer.every_ms);
        if period < MIN_TIMER_PERIOD || timer.every_ms > 7 * 24 * 3_600_000 {
            return Err(format!(
                "timer `{}`: every-ms = {} is outside 1000..=604800000 (1 s to 7 days)",
                timer.id, timer.every_ms
            ));
        }
        timers.push(TimerSpec { id: timer.id, period });
    }
    Ok(timers)
}

fn check_limits(
    raw: &RawLimits,
    invalid: &impl Fn(&str, String) -> ManifestError,
) -> Result<ManifestLimits, ManifestError> {
    if let Some(mib) = raw.memory_mib
        && !(1..=4096).contains(&mib)
    {
        return Err(invalid("limits.memory-mib", format!("{mib} is outside 1..=4096")));
    }
    if let Some(ms) = raw.hook_timeout_ms
        && !(1..=60_000).contains(&ms)
    {
        return Err(invalid("limits.hook-timeout-ms", format!("{ms} is outside 1..=60000")));
    }
    Ok(ManifestLimits {
        memory_mib: raw.memory_mib,
        hook_timeout: raw.hook_timeout_ms.map(Duration::from_millis),
    })
}

fn load_schema(raw: RawSchema, path: &Path, dir: &Path) -> Result<ConfigSchema, ManifestError> {
    let invalid = |reason: String| ManifestError::Invalid {
        path: path.to_path_buf(),
        key: "config-schema".to_string(),
        reason,
    };
    let value = match raw {
        RawSchema::Inline(table) => serde_json::to_value(table)
            .map_err(|err| invalid(format!("cannot be turned into JSON: {err}")))?,
        RawSchema::File(file) => {
            let file = dir.join(file);
            let text = read_bounded(&file)?;
            serde_json::from_str(&text).map_err(|err| ManifestError::Syntax {
                path: file.clone(),
                reason: format!("not valid JSON: {err}"),
            })?
        }
    };
    ConfigSchema::compile(value).map_err(|why| invalid(format!("unsupported schema: {why}")))
}
