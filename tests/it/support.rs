//! Helpers shared by the integration tests: the echo and Python greeter plugin builds,
//! hand-written WAT guests and sample messages.

#![allow(dead_code)] // Each test module uses a different subset.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
// std's clock on purpose: this waits on a child process from plain threads, where tokio's
// clock may be paused by the calling test.
use std::time::{Duration, Instant};

use agentchatd::plugins::{ContentKind, ConversationKind, InboundMessage};

/// Longest a guest plugin build may take (a cold echo build fetches and compiles wit-bindgen; a
/// cold Python build installs componentize-py).
const GUEST_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The crate root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of the echo plugin component, built once per test run with the command from
/// `plugins/README.md` so a changed guest is never tested stale.
///
/// # Panics
///
/// When the build fails or runs past [`GUEST_BUILD_TIMEOUT`] and no earlier build exists.
pub fn echo_plugin_path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build_echo_plugin).clone()
}

fn build_echo_plugin() -> PathBuf {
    let root = repo_root();
    let guest_target = root.join("plugins/target");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
        .arg(root.join("plugins/Cargo.toml"))
        // The guest workspace keeps its own target dir even when the caller set another.
        .env("CARGO_TARGET_DIR", &guest_target);
    build_guest("echo", &mut cargo, guest_target.join("wasm32-wasip2/release/echo.wasm"))
}

/// Path of the Python greeter component (`plugins/python-greeter`), built once per test run by
/// `scripts/build-python-plugins`, which skips the build when its inputs are unchanged.
///
/// # Panics
///
/// When the build fails or runs past [`GUEST_BUILD_TIMEOUT`] and no earlier build exists.
pub fn python_greeter_path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            let mut script = Command::new(root.join("scripts/build-python-plugins"));
            let wasm = root.join("plugins/target/python/python_greeter.wasm");
            build_guest("python-greeter", &mut script, wasm)
        })
        .clone()
}

/// Runs `cmd`, which builds the guest `name` into `wasm`, and returns `wasm`. A failed build
/// falls back to an earlier component, so tests still run where the toolchain is missing.
fn build_guest(name: &str, cmd: &mut Command, wasm: PathBuf) -> PathBuf {
    // Cargo's scratch folder for integration tests, so no log is left behind in /tmp.
    let log_path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("agentchatd-{name}-build-{}.log", std::process::id()));
    let built = run_bounded(cmd, &log_path);
    if built.is_ok() {
        let _ = std::fs::remove_file(&log_path);
    }
    match built {
        Ok(()) => assert!(wasm.is_file(), "the build passed but {} is missing", wasm.display()),
        Err(why) if wasm.is_file() => {
            eprintln!("{name} plugin build failed ({why}); testing the existing {}", wasm.display())
        }
        Err(why) => {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("cannot build the {name} plugin: {why}\n{log}");
        }
    }
    wasm
}

/// Runs `cmd` with its output in `log_path`, killing it after [`GUEST_BUILD_TIMEOUT`].
fn run_bounded(cmd: &mut Command, log_path: &Path) -> Result<(), String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let log = std::fs::File::create(log_path).map_err(|err| format!("log file: {err}"))?;
    let log_err = log.try_clone().map_err(|err| format!("log file: {err}"))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|err| format!("cannot start {program}: {err}"))?;

    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{program} exited with {status}")),
            Ok(None) if started.elapsed() > GUEST_BUILD_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} ran past {GUEST_BUILD_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(err) => return Err(format!("cannot wait for {program}: {err}")),
        }
    }
}

/// A hand-written component from `tests/fixtures`: the shared wrapper around the core code of
/// `tests/fixtures/guests/<name>.wat`, as component binary bytes.
pub fn wat_guest(name: &str) -> Vec<u8> {
    let fixtures = repo_root().join("tests/fixtures");
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    };
    let wrapper = read(fixtures.join("inbound_component.wat"));
    let guest = read(fixtures.join("guests").join(format!("{name}.wat")));
    let text = wrapper.replace(";; @GUEST@", &guest);
    wat::parse_str(&text).unwrap_or_else(|err| panic!("guest {name}: {err}"))
}

/// Writes [`wat_guest`] `name` into `dir` and returns the file's path.
pub fn write_wat_guest(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat_guest(name)).expect("write guest component");
    path
}

/// A direct text message.
pub fn text_message(text: &str) -> InboundMessage {
    InboundMessage {
        id: "msg-1".to_string(),
        conversation_id: "conv-1".to_string(),
        conversation_kind: ConversationKind::Direct,
        sender: "alice".to_string(),
        kind: ContentKind::Text,
        text: Some(text.to_string()),
        data_json: None,
        attachment_id: None,
        seq: 1,
        received_at_ms: 1_700_000_000_000,
    }
}

/// A structured message carrying `data_json`.
pub fn structured_message(data_json: &str) -> InboundMessage {
    InboundMessage {
        kind: ContentKind::Structured,
        text: None,
        data_json: Some(data_json.to_string()),
        ..text_message("")
    }
}
