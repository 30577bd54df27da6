//! The `agentchatd` command line: parses arguments, sets up logging and signals, and calls
//! into the library. Exit codes: 0 stopped cleanly, 1 runtime failure, 75 another daemon holds
//! the state directory, 77 credentials refused by the server, 78 configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use agentchatd::ops::logging::{self, LogStyle};
use agentchatd::ops::notify::{self, Notifier};
use agentchatd::service::{Controls, ServiceError};
use agentchatd::store::SendState;
use agentchatd::{admin, config, service};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Exit code for credentials the server refused (EX_NOPERM).
const EXIT_AUTH: u8 = 77;
/// Exit code when another daemon holds the state directory (EX_TEMPFAIL).
const EXIT_LOCKED: u8 = 75;
/// Exit code for a configuration error (EX_CONFIG); systemd is told not to restart on it.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "agentchatd", version, about = "Runs an AI agent on AgentChat")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Path of agentchatd.toml.
        #[arg(long, short, default_value = "agentchatd.toml")]
        config: PathBuf,
    },
    /// Validate a config file (and that its key can be read) and exit.
    CheckConfig {
        /// Path of agentchatd.toml.
        #[arg(long, short, default_value = "agentchatd.toml")]
        config: PathBuf,
    },
    /// Ask the running daemon to reload its config and plugins (sends it SIGHUP). A config
    /// that does not load is refused by the daemon, which keeps the running one.
    Reload {
        /// Path of agentchatd.toml.
        #[arg(long, short, default_value = "agentchatd.toml")]
        config: PathBuf,
    },
    /// Summarise the daemon's state: queue, holds, cold-outreach slots, cursor, plugins.
    Status {
        /// Path of agentchatd.toml.
        #[arg(long, short, default_value = "agentchatd.toml")]
        config: PathBuf,
    },
    /// List, retry or drop queued sends and dead letters.
    Outbox {
        /// Path of agentchatd.toml.
        #[arg(long, short, default_value = "agentchatd.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Queue a text message for the daemon to send (through the same paced queue as replies).
    Send {
        /// Path of agentchatd.toml.
        #[arg(long, short, default_value = "agentchatd.toml")]
        config: PathBuf,
        /// Recipient handle.
        #[arg(long)]
        to: String,
        /// Message text.
        #[arg(long)]
        text: String,
        /// An id for this request; repeating a send with the same id queues it only once.
        #[arg(long)]
        id: Option<String>,
    },
    /// Write and try plugins: scaffold a new one, or run one offline on sample messages.
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Run the local AgentChat-compatible server (for development and tests only).
    DevServer(agentchatd::server::DevServerArgs),
    /// Run the local server, the daemon with a plugin and a peer that talks to it.
    Demo(agentchatd::demo::DemoArgs),
}

#[derive(Subcommand)]
enum OutboxAction {
    /// List sends, newest first.
    List {
        /// Only sends in this state.
        #[arg(long, value_parser = ["pending", "sent", "dead"])]
        state: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Put a dead letter back in the queue.
    Retry {
        /// The send's id (from `outbox list`).
        id: i64,
    },
    /// Remove a pending or dead send for good.
    Drop {
        /// The send's id (from `outbox list`).
        id: i64,
    },
}

#[derive(Subcommand)]
enum PluginAction {
    /// Create a plugin crate that uses the Rust SDK.
    New {
        /// Plugin id and crate name.
        name: String,
        /// Folder to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Run a built plugin on sample messages and print each decision as a JSON line.
    Test {
        /// The plugin's .wasm component.
        wasm: PathBuf,
        /// Its agentchat-plugin.toml, to check it as the daemon would.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The plugin's config, a JSON object.
        #[arg(long)]
        config: Option<String>,
        /// A JSON file holding an array of inbound messages.
        #[arg(long)]
        messages: PathBuf,
        /// Grant a capability, as an operator would: kv, send, timers, history or
        /// http=HOST[:PORT]. Repeat for several. kv and send are backed by a scratch store
        /// that is thrown away afterwards; queued sends are printed.
        #[arg(long = "grant", value_name = "CAPABILITY")]
        grants: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config } => run_daemon(&config),
        Command::DevServer(args) => {
            run_tool(|shutdown| agentchatd::server::run_dev_server(args, shutdown))
        }
        Command::Demo(args) => run_tool(|shutdown| agentchatd::demo::run(args, shutdown)),
        Command::Plugin { action } => plugin_command(action),
        Command::Reload { config } => reload_daemon(&config),
        Command::Status { config } => {
            admin_command(&config, |c| async move { Ok((true, admin::status(&c).await?)) })
        }
        Command::Send { config, to, text, id } => {
            admin_command(&config, |c| async move { admin::send(&c, &to, &text, id).await })
        }
        Command::Outbox { config, action } => admin_command(&config, |c| async move {
            match action {
                OutboxAction::List { state, limit } => {
                    let state = match state.as_deref() {
                        Some("pending") => Some(SendState::Pending),
                        Some("sent") => Some(SendState::Sent),
                        Some("dead") => Some(SendState::Dead),
                        _ => None,
                    };
                    Ok((true, admin::list(&c, state, limit).await?))
                }
                OutboxAction::Retry { id } => admin::retry(&c, id).await,
                OutboxAction::Drop { id } => admin::drop_send(&c, id).await,
            }
        }),
    }
}

/// `plugin new` and `plugin test`: prints what they return, exits 1 on any error.
fn plugin_command(action: PluginAction) -> ExitCode {
    use agentchatd::plugins::authoring;

    logging::init(LogStyle::detect(false));
    let lines = match action {
        PluginAction::New { name, dir } => authoring::scaffold(&name, &dir).map(|made| {
            let sdk = match &made.sdk {
                agentchatd::plugins::authoring::SdkSource::Repo(path) => {
                    format!("uses the SDK at {}", path.display())
                }
                agentchatd::plugins::authoring::SdkSource::Vendored => {
                    "the SDK and WIT are copied into its vendor/ folder".to_owned()
                }
            };
            vec![
                format!("created {}; {sdk}", made.dir.display()),
                "build it with `cargo build --release --target wasm32-wasip2` there, then \
                     try it with `agentchatd plugin test`"
                    .to_owned(),
            ]
        }),
        PluginAction::Test { wasm, manifest, config, messages, grants } => {
            authoring::parse_grants(&grants).and_then(|grants| {
                let test = authoring::OfflineTest {
                    wasm,
                    manifest,
                    config_json: config,
                    messages,
                    grants,
                };
                authoring::run_offline_blocking(&test)
            })
        }
    };
    match lines {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("agentchatd: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command other than the daemon: logging, signals, a runtime, and exit 1 on error.
fn run_tool<F, Fut>(command: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    logging::init(LogStyle::detect(false));
    let shutdown = CancellationToken::new();
    let runtime = match prepare(&shutdown, None) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(command(shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agentchatd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an operator command on the state store; prints its text, exits 1 when it did nothing.
fn admin_command<F, Fut>(path: &std::path::Path, command: F) -> ExitCode
where
    F: FnOnce(config::Config) -> Fut,
    Fut: std::future::Future<Output = Result<(bool, String), agentchatd::store::StoreError>>,
{
    let config = match config::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("agentchatd: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("agentchatd: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command(config)) {
        Ok((done, text)) => {
            print!("{text}");
            if done { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(err) => {
            eprintln!("agentchatd: {err}");
            ExitCode::FAILURE
        }
    }
}

fn reload_daemon(path: &std::path::Path) -> ExitCode {
    // The same checks the daemon makes before it swaps anything, so a refusal shows up here
    // instead of only in the daemon's log. The key is not read: a reload keeps the running
    // key, and under systemd only the service can read its credential.
    let checked = config::load(path).and_then(|c| check_plugins(&c).map(|()| c));
    let config = match checked {
        Ok(config) => config,
        Err(err) => {
            eprintln!("agentchatd: {err}; the daemon would refuse it too, so nothing was sent");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match agentchatd::ops::lock::signal_reload(&config.state_dir) {
        Ok(pid) => {
            println!(
                "asked agentchatd (pid {pid}) to reload; `agentchatd status` shows the outcome \
                 within a few seconds"
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("agentchatd: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Loads every plugin of `config` as the daemon would (files, manifests, grants, schemas,
/// exports), without touching the state directory.
fn check_plugins(config: &config::Config) -> Result<(), config::ConfigError> {
    config::check_plugin_files(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| config::ConfigError::Unusable(format!("cannot start a runtime: {err}")))?;
    runtime
        .block_on(agentchatd::service::check_plugins(config))
        .map(drop)
        .map_err(|err| config::ConfigError::Unusable(err.to_string()))
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let checked = config::load(path)
        .and_then(|c| c.api_key.load().map(|_| c))
        .and_then(|c| check_plugins(&c).map(|()| c));
    match checked {
        Ok(config) => {
            let transport = format!("{:?}", config.transport).to_lowercase();
            let plugins = config.plugins.len();
            println!("{}: ok ({plugins} plugin(s), transport {transport})", path.display());
            if plugins == 0 {
                println!("note: no plugins: messages are acknowledged and never answered");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("agentchatd: {err}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run_daemon(path: &std::path::Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("agentchatd: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(LogStyle::detect(config.log_json));
    let (notifier, watchdog) = match (Notifier::from_env(), notify::watchdog_interval()) {
        (Ok(notifier), Ok(watchdog)) => (notifier, watchdog),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("agentchatd: systemd environment: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let runtime = match prepare(&shutdown, Some(reload_tx)) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "starting");
    let controls = Controls {
        shutdown,
        reload: Some(reload_rx),
        config_path: Some(path.to_path_buf()),
        notifier,
        watchdog,
    };
    match runtime.block_on(service::run_with(config, controls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "agentchatd stopped");
            eprintln!("agentchatd: {err}");
            match err {
                ServiceError::Config(_) | ServiceError::Plugin(_) => ExitCode::from(EXIT_CONFIG),
                ServiceError::Auth(_) => ExitCode::from(EXIT_AUTH),
                ServiceError::Locked(_) => ExitCode::from(EXIT_LOCKED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Installs the signal handlers and builds the runtime; on failure, says why and gives the
/// exit code.
fn prepare(
    shutdown: &CancellationToken,
    reload: Option<tokio::sync::mpsc::Sender<()>>,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    if let Err(err) = install_signals(shutdown.clone(), reload) {
        eprintln!("agentchatd: cannot install signal handlers: {err}");
        return Err(ExitCode::FAILURE);
    }
    tokio::runtime::Runtime::new().map_err(|err| {
        eprintln!("agentchatd: cannot start the async runtime: {err}");
        ExitCode::FAILURE
    })
}

/// SIGTERM or SIGINT starts a graceful stop; a second one exits at once. Every state change is
/// a committed SQLite transaction, so exiting mid-way loses nothing: unacknowledged messages
/// are redelivered and queued sends resume on the next start. SIGHUP asks for a reload when
/// `reload` is given.
fn install_signals(
    shutdown: CancellationToken,
    reload: Option<tokio::sync::mpsc::Sender<()>>,
) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            if signal == SIGHUP {
                match &reload {
                    // A reload already waiting covers this one too.
                    Some(reload) => {
                        let _ = reload.try_send(());
                    }
                    None => tracing::info!("SIGHUP ignored: nothing to reload"),
                }
                continue;
            }
            seen += 1;
            if seen > 1 {
                eprintln!("agentchatd: second signal {signal}, exiting now");
                std::process::exit(130);
            }
            tracing::info!(signal, "stopping");
            shutdown.cancel();
        }
    })?;
    Ok(())
}
