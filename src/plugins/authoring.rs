//! Tools for plugin authors behind `agentchatd plugin new` and `agentchatd plugin test`:
//! scaffolding a plugin crate that uses the Rust SDK, and running a built plugin offline on
//! sample messages.
//!
//! # Where the SDK comes from
//!
//! The SDK is not published to a registry, so a scaffolded crate must find it on disk. Inside
//! a checkout of this repository (the target folder or one of its parents holds
//! `plugins/sdk`), the crate gets a relative path dependency on that SDK, so it follows SDK
//! changes. Anywhere else, the SDK and the WIT files this binary was built with are written
//! into the crate's `vendor/` folder and the dependency points there: the crate then builds
//! offline against exactly the API this daemon runs, and upgrading is a matter of scaffolding
//! again or copying `vendor/`.
//!
//! Nothing here talks to the network or to a running daemon.

use std::path::{Component, Path, PathBuf};

use super::{Capabilities, HostServices, PluginSetup, PluginSpec, Verdict};
use super::{Decision, InboundMessage, Manifest, ManifestError, PluginError, PluginHost};
use crate::store::Store;

const SDK_CARGO_TOML: &str = include_str!("../../plugins/sdk/Cargo.toml");
const SDK_LIB_RS: &str = include_str!("../../plugins/sdk/src/lib.rs");
const WIT: &str = include_str!("../../plugins/wit/plugin.wit");

/// Largest messages file read by [`run_offline`], in bytes.
const MAX_MESSAGES_FILE_BYTES: u64 = 16 << 20;

/// Why an authoring command failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthoringError {
    /// The plugin name cannot be a crate name and plugin id.
    #[error(
        "`{name}` is not a valid plugin name; use 1 to 64 lowercase letters, digits, `-` or `_`, \
         starting with a letter"
    )]
    BadName {
        /// The name given.
        name: String,
    },

    /// The target folder exists already; nothing is overwritten.
    #[error("{path} already exists; choose another name or folder")]
    Exists {
        /// The folder that would have been created.
        path: PathBuf,
    },

    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The manifest given to `plugin test` is invalid.
    #[error("plugin manifest {0}")]
    Manifest(#[from] ManifestError),

    /// A `--grant` value that names no capability.
    #[error("`{0}` is not a capability; grant kv, send, timers, history or http=HOST[:PORT]")]
    Grant(String),

    /// The scratch store for kv and sends could not be used.
    #[error("cannot use a scratch state store for the test: {0}")]
    Scratch(crate::store::StoreError),

    /// The messages file is not a JSON array of inbound messages.
    #[error("{path}: {reason}; give a JSON array of inbound messages")]
    Messages {
        /// The messages file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The plugin could not be loaded.
    #[error(transparent)]
    Load(#[from] PluginError),

    /// No async runtime could be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What [`scaffold`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaffold {
    /// The new crate's folder.
    pub dir: PathBuf,
    /// Files written, relative to `dir`.
    pub files: Vec<PathBuf>,
    /// How the crate depends on the SDK.
    pub sdk: SdkSource,
}

/// Where a scaffolded crate finds the SDK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSource {
    /// A path dependency on the SDK in the surrounding checkout (relative to the crate).
    Repo(PathBuf),
    /// A copy written into the crate's `vendor/` folder.
    Vendored,
}

/// Creates a plugin crate called `name` in `parent/name`: `Cargo.toml`, `src/lib.rs`,
/// `agentchat-plugin.toml`, `README.md` and `messages.json` (plus `vendor/` outside this
/// repository).
///
/// # Errors
///
/// [`AuthoringError::BadName`] for a name that cannot be an id, [`AuthoringError::Exists`]
/// when the folder exists, [`AuthoringError::Io`] when writing fails.
pub fn scaffold(name: &str, parent: &Path) -> Result<Scaffold, AuthoringError> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c));
    if !valid {
        return Err(AuthoringError::BadName { name: name.to_string() });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuthoringError::Io { path, source }
    };

    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let parent = std::fs::canonicalize(parent).map_err(io(parent))?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(AuthoringError::Exists { path: dir });
    }

    let sdk = match find_repo_sdk(&parent) {
        Some(sdk_dir) => SdkSource::Repo(relative_path(&dir, &sdk_dir)),
        None => SdkSource::Vendored,
    };
    let sdk_path = match &sdk {
        SdkSource::Repo(path) => path.to_string_lossy().into_owned(),
        SdkSource::Vendored => "vendor/agentchat-plugin-sdk".to_string(),
    };

    let mut files: Vec<(PathBuf, String)> = vec![
        ("Cargo.toml".into(), cargo_toml(name, &sdk_path)),
        ("src/lib.rs".into(), lib_rs(name)),
        ("agentchat-plugin.toml".into(), manifest_toml(name)),
        ("README.md".into(), readme(name, &sdk)),
        ("messages.json".into(), SAMPLE_MESSAGES.to_string()),
        (".gitignore".into(), "/target\n".to_string()),
    ];
    if sdk == SdkSource::Vendored {
        files.push(("vendor/agentchat-plugin-sdk/Cargo.toml".into(), SDK_CARGO_TOML.into()));
        files.push(("vendor/agentchat-plugin-sdk/src/lib.rs".into(), SDK_LIB_RS.into()));
        files.push(("vendor/wit/plugin.wit".into(), WIT.into()));
    }

    std::fs::create_dir(&dir).map_err(io(&dir))?;
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(io(folder))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(Scaffold { dir, files: files.into_iter().map(|(rel, _)| rel).collect(), sdk })
}

/// The SDK folder of the checkout containing `start`, if any.
fn find_repo_sdk(start: &Path) -> Option<PathBuf> {
    start.ancestors().map(|dir| dir.join("plugins")).find_map(|plugins| {
        let found =
            plugins.join("sdk/Cargo.toml").is_file() && plugins.join("wit/plugin.wit").is_file();
        found.then(|| plugins.join("sdk"))
    })
}

/// `to` relative to `from`; both absolute and free of `..`.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to[common..] {
        out.push(part);
    }
    out
}

fn cargo_toml(name: &str, sdk_path: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
agentchat-plugin-sdk = {{ path = "{sdk_path}" }}

[profile.release]
# Small components load and compile faster in the host.
opt-level = "s"
lto = true
codegen-units = 1
strip = true

# A workspace of its own, so the crate builds wherever it is put. To make it a member of
# another workspace, delete this table and add the folder to that workspace's members.
[workspace]
"#
    )
}

/// `my-bot` becomes `MyBot`, the name of the plugin's type.
fn type_name(name: &str) -> String {
    name.split(['-', '_'])
        .flat_map(|word| {
            let mut chars = word.chars();
            chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars)
        })
        .collect()
}

fn lib_rs(name: &str) -> String {
    let ty = type_name(name);
    format!(
        r#"//! {name}: an AgentChat reply plugin.
//!
//! It answers text messages that contain the configured `keyword` (default "ping") with the
//! configured `answer` (default "pong") and passes on everything else.

use agentchat_plugin_sdk::prelude::*;

struct {ty};

impl Plugin for {ty} {{
    fn on_message(msg: Message) -> Result<Decision, PluginError> {{
        let Some(text) = text_of(&msg) else {{
            return Ok(pass());
        }};
        let keyword = config::get("keyword").unwrap_or_else(|| "ping".to_string());
        if !text.contains(&keyword) {{
            return Ok(pass());
        }}
        log::debug("keyword seen", &[("message_id", &msg.id)]);
        Ok(reply(config::get("answer").unwrap_or_else(|| "pong".to_string())))
    }}
}}

export_plugin!({ty});
"#
    )
}

fn manifest_toml(name: &str) -> String {
    let wasm = name.replace('-', "_");
    format!(
        r#"# Read by agentchatd before the plugin starts: see the plugin author guide.
id = "{name}"
name = "{name}"
version = "0.1.0"
api = "{api}"
component = "target/wasm32-wasip2/release/{wasm}.wasm"
hooks = ["inbound"]

[limits]
memory-mib = 16
hook-timeout-ms = 100

[config-schema]
type = "object"
additionalProperties = false
properties.keyword = {{ type = "string", minLength = 1 }}
properties.answer = {{ type = "string", minLength = 1, maxLength = 4000 }}
"#,
        api = super::API_VERSION
    )
}

fn readme(name: &str, sdk: &SdkSource) -> String {
    let wasm = name.replace('-', "_");
    let sdk_note = match sdk {
        SdkSource::Repo(path) => {
            format!(
                "The SDK is a path dependency on `{}` in the agentchatd checkout.",
                path.display()
            )
        }
        SdkSource::Vendored => "The SDK and the WIT files are copied into `vendor/`, matching the \
                                agentchatd that created this crate."
            .to_string(),
    };
    format!(
        r#"# {name}

An AgentChat reply plugin built with the Rust plugin SDK. {sdk_note}

Build it (once: `rustup target add wasm32-wasip2`):

    cargo build --release --target wasm32-wasip2

Try it offline on sample messages (a JSON array of inbound messages):

    agentchatd plugin test target/wasm32-wasip2/release/{wasm}.wasm \
        --manifest agentchat-plugin.toml --config '{{"keyword": "ping"}}' --messages messages.json

Each decision is printed as one JSON line. Then add the plugin to `agentchatd.toml`.
"#
    )
}

/// Sample inbound messages for `agentchatd plugin test`, written into a new plugin crate.
const SAMPLE_MESSAGES: &str = include_str!("../../examples/messages.json");

/// What `agentchatd plugin test` runs.
#[derive(Debug, Clone)]
pub struct OfflineTest {
    /// The built component.
    pub wasm: PathBuf,
    /// Its manifest; when given, the id, limits, hooks and config schema are checked.
    pub manifest: Option<PathBuf>,
    /// The config as a JSON object; none means `{}`.
    pub config_json: Option<String>,
    /// A JSON array of [`InboundMessage`]s.
    pub messages: PathBuf,
    /// What the test grants the plugin, as an operator would.
    pub grants: Capabilities,
}

/// Reads `--grant` values: `kv`, `send`, `timers`, `history` or `http=HOST[:PORT]`.
///
/// # Errors
///
/// [`AuthoringError::Grant`] naming the value that is none of those.
pub fn parse_grants(values: &[String]) -> Result<Capabilities, AuthoringError> {
    let mut grants = Capabilities::default();
    for value in values {
        match value.as_str() {
            "kv" => grants.kv = true,
            "send" => grants.send = true,
            "timers" => grants.timers = true,
            "history" => grants.history = true,
            other => match other.strip_prefix("http=") {
                Some(host) if !host.is_empty() => grants.http_allowed_hosts.push(host.to_owned()),
                _ => return Err(AuthoringError::Grant(value.clone())),
            },
        }
    }
    Ok(grants)
}

/// Loads the plugin and runs it on every message, returning one JSON line per decision:
/// `{"message_id", "plugin", "decision", "drafts"}` or `{"message_id", "plugin", "error"}`.
///
/// # Errors
///
/// An unreadable messages file or manifest, or a plugin that does not load.
pub async fn run_offline(test: &OfflineTest) -> Result<Vec<String>, AuthoringError> {
    let messages = read_messages(&test.messages)?;

    let spec = match &test.manifest {
        Some(path) => {
            let manifest = Manifest::load(path)?;
            PluginSpec::new(manifest.id.clone(), &test.wasm).with_manifest(manifest)
        }
        None => {
            let id = test.wasm.file_stem().map(|s| s.to_string_lossy().into_owned());
            PluginSetup::from(PluginSpec::new(id.unwrap_or_else(|| "plugin".into()), &test.wasm))
        }
    };
    let setup = spec
        .with_config(test.config_json.clone().unwrap_or_default())
        .with_grants(test.grants.clone());

    // kv and proactive sends get a scratch store of their own, so a test run touches no
    // daemon's state; it is removed when the run ends.
    let scratch = std::env::temp_dir().join(format!(
        "agentchatd-plugin-test-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let store = Store::open(&scratch).map_err(AuthoringError::Scratch)?;
    let services = HostServices {
        store: Some(store.clone()),
        outbox_wake: Some(std::sync::Arc::new(tokio::sync::Notify::new())),
        ..HostServices::default()
    };
    let result = async {
        let host = PluginHost::load_with(vec![setup], None, services).await?;
        let mut lines = Vec::with_capacity(messages.len());
        for msg in &messages {
            for verdict in host.on_message(msg).await {
                lines.push(verdict_json(&msg.id, &verdict).to_string());
            }
        }
        let queued = store.list_sends(None, 1000).await.map_err(AuthoringError::Scratch)?;
        for row in queued.into_iter().rev() {
            let request: serde_json::Value =
                serde_json::from_str(&row.request_json).unwrap_or_default();
            lines.push(
                serde_json::json!({ "queued_send": request, "origin": row.origin }).to_string(),
            );
        }
        Ok(lines)
    }
    .await;
    drop(store);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// [`run_offline`] on a runtime of its own, for the command line.
///
/// # Errors
///
/// As [`run_offline`], or when no runtime can be started.
pub fn run_offline_blocking(test: &OfflineTest) -> Result<Vec<String>, AuthoringError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AuthoringError::Runtime)?;
    runtime.block_on(run_offline(test))
}

fn read_messages(path: &Path) -> Result<Vec<InboundMessage>, AuthoringError> {
    let io = |source| AuthoringError::Io { path: path.to_path_buf(), source };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_MESSAGES_FILE_BYTES {
        return Err(AuthoringError::Messages {
            path: path.to_path_buf(),
            reason: format!("the file is {len} bytes; at most {MAX_MESSAGES_FILE_BYTES} are read"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    serde_json::from_str(&text).map_err(|err| AuthoringError::Messages {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })
}

/// One verdict as a JSON object.
pub fn verdict_json(message_id: &str, verdict: &Verdict) -> serde_json::Value {
    let mut line = serde_json::json!({ "message_id": message_id, "plugin": verdict.plugin_id });
    match &verdict.result {
        Ok(decision) => {
            let (name, drafts) = match decision {
                Decision::Pass => ("pass", None),
                Decision::Reply(drafts) => ("reply", Some(drafts)),
                Decision::Claim(drafts) => ("claim", Some(drafts)),
                Decision::Drop => ("drop", None),
            };
            line["decision"] = name.into();
            if let Some(drafts) = drafts {
                line["drafts"] = serde_json::to_value(drafts).unwrap_or_default();
            }
        }
        Err(err) => line["error"] = err.to_string().into(),
    }
    line
}
