//! The Python greeter (`plugins/python-greeter`, a CPython component built by componentize-py)
//! through the real host: it loads with its manifest, answers greetings, passes otherwise,
//! reads its config through the `config` import, logs through `log` without message text, and
//! fits the memory its manifest declares. The last test runs it inside the daemon against the
//! local server.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use agentchatd::config::Transport;
use agentchatd::plugins::{
    CallError, Decision, Draft, Manifest, PluginError, PluginHost, PluginSetup, PluginSpec,
};

use crate::harness::{Daemon, PEER, World, plugin};
use crate::support::{python_greeter_path, repo_root, structured_message, text_message};

/// Largest message content the AgentChat API carries, in bytes.
const MAX_CONTENT_BYTES: usize = 32 * 1024;

/// A compile cache that holds the greeter, shared by every test of a run and kept in cargo's
/// target tmp folder between runs. Compiling the ~18 MiB component takes seconds in a debug
/// build, so the first caller compiles it and the others wait for that and then load it from
/// the cache.
async fn compiled_cache() -> PathBuf {
    static FILLED: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    let fill = || async {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-plugin-cache");
        let spec = PluginSpec::new("python-greeter", python_greeter_path());
        if let Err(err) = PluginHost::load(vec![spec], Some(dir.clone())).await {
            panic!("the Python greeter does not load: {err}");
        }
        dir
    };
    FILLED.get_or_init(fill).await.clone()
}

fn manifest() -> Manifest {
    let path = repo_root().join("plugins/python-greeter/agentchat-plugin.toml");
    Manifest::load(&path).expect("the Python greeter manifest is valid")
}

/// The greeter with its manifest and `config`, under the operator's default host limits.
fn setup(config: &str) -> PluginSetup {
    let mut manifest = manifest();
    manifest.component = python_greeter_path();
    PluginSetup::from_manifest(manifest).with_config(config)
}

async fn load(setup: PluginSetup) -> Result<PluginHost, PluginError> {
    PluginHost::load(vec![setup], Some(compiled_cache().await)).await
}

async fn loaded(config: &str) -> PluginHost {
    load(setup(config)).await.unwrap_or_else(|err| panic!("load failed: {err}"))
}

/// What the greeter decides on a text message from alice.
async fn decide(host: &PluginHost, text: &str) -> Result<Decision, CallError> {
    let mut verdicts = host.on_message(&text_message(text)).await;
    assert_eq!(verdicts.len(), 1);
    verdicts.remove(0).result
}

fn reply(text: &str) -> Result<Decision, CallError> {
    let draft = Draft { conversation_id: None, text: Some(text.to_string()), data_json: None };
    Ok(Decision::Reply(vec![draft]))
}

#[tokio::test]
async fn greetings_are_answered_in_their_language_and_other_messages_pass() {
    let host = loaded("").await;

    let cases = [
        ("hello", reply("Hello, alice!")),
        ("Good morning!", reply("Hello, alice!")),
        ("Bonjour !", reply("Bonjour, alice !")),
        ("¡Buenos días!", reply("¡Hola, alice!")),
        ("GUTEN TAG", reply("Hallo, alice!")),
        ("ciao a tutti", reply("Ciao, alice!")),
        ("Olá", reply("Olá, alice!")),
        ("hoi allemaal", reply("Hoi, alice!")),
        // A request that opens politely is left to other plugins.
        ("hello, can you check my order status", Ok(Decision::Pass)),
        ("what time is it", Ok(Decision::Pass)),
        ("this is hello", Ok(Decision::Pass)),
        ("", Ok(Decision::Pass)),
    ];
    for (text, expected) in cases {
        assert_eq!(decide(&host, text).await, expected, "message {text:?}");
    }

    let verdicts = host.on_message(&structured_message(r#"{"greeting": "hello"}"#)).await;
    assert_eq!(verdicts[0].result, Ok(Decision::Pass));
}

#[tokio::test]
async fn the_languages_config_limits_the_answers() {
    let host = loaded(r#"{"languages": ["fr", "de"]}"#).await;

    assert_eq!(decide(&host, "salut").await, reply("Bonjour, alice !"));
    assert_eq!(decide(&host, "moin").await, reply("Hallo, alice!"));
    assert_eq!(decide(&host, "hello").await, Ok(Decision::Pass));
}

#[tokio::test]
async fn the_manifest_schema_refuses_an_unknown_language() {
    match load(setup(r#"{"languages": ["en", "xx"]}"#)).await {
        Err(PluginError::ConfigSchema { id, field, .. }) => {
            assert_eq!(id, "python-greeter");
            assert_eq!(field, "/languages/1");
        }
        Err(other) => panic!("expected a schema error, got {other}"),
        Ok(_) => panic!("an unknown language code was accepted"),
    }
}

#[tokio::test]
async fn without_its_manifest_a_bad_config_is_reported_by_the_plugin() {
    let spec = PluginSpec {
        config_json: r#"{"languages": "en"}"#.to_string(),
        ..PluginSpec::new("python-greeter", python_greeter_path())
    };
    let host = PluginHost::load(vec![spec], Some(compiled_cache().await)).await.expect("load");

    match decide(&host, "hello").await {
        Err(CallError::PluginError(why)) => assert!(why.contains("languages"), "{why}"),
        other => panic!("expected the plugin's own error, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_log_line_carries_ids_but_not_the_message_text() {
    let host = loaded("").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(Mutex::new(log_file))
        .with_ansi(false)
        .finish();
    // A current-thread runtime runs the call's task on this thread, so a thread-local default
    // subscriber sees the guest's log line.
    let guard = tracing::subscriber::set_default(subscriber);
    assert_eq!(decide(&host, "bonjour tout le monde").await, reply("Bonjour, alice !"));
    drop(guard);

    let text = std::fs::read_to_string(&log_path).expect("read log");
    let line = text.lines().find(|l| l.contains("greeting answered")).unwrap_or_else(|| {
        panic!("no guest log line in:\n{text}");
    });
    assert!(line.contains("plugin=\"python-greeter\""), "{line}");
    assert!(line.contains("message_id=msg-1 language=fr"), "{line}");
    assert!(!text.contains("tout le monde"), "message text reached the log:\n{text}");
}

#[tokio::test]
async fn the_declared_memory_fits_the_largest_message() {
    let declared = manifest().limits.memory_mib.expect("the manifest declares its memory");
    let host = loaded("").await;

    // Too long to be a greeting, so it passes; what matters is that the 32 KiB of text (in
    // two-byte characters) fit in the declared memory next to the interpreter.
    let longest = format!("hello {}", "é".repeat(MAX_CONTENT_BYTES / 2 - 4));
    assert!(longest.len() <= MAX_CONTENT_BYTES);
    assert_eq!(decide(&host, &longest).await, Ok(Decision::Pass), "at {declared} MiB");
}

#[tokio::test]
async fn a_memory_limit_below_the_interpreter_snapshot_refuses_the_load() {
    // The component's memory starts at about 12.4 MiB (CPython after start-up), so 8 MiB can
    // never run it; the host says so at load instead of failing every call.
    let spec = PluginSpec {
        memory_limit_bytes: 8 << 20,
        ..PluginSpec::new("python-greeter", python_greeter_path())
    };
    match PluginHost::load(vec![spec], Some(compiled_cache().await)).await {
        Err(err @ PluginError::Compile { .. }) => {
            assert!(err.to_string().contains("minimum byte size"), "{err}");
        }
        Err(other) => panic!("expected a compile error, got {other}"),
        Ok(_) => panic!("an 8 MiB limit was accepted"),
    }
}

/// Copies the filled compile cache into the daemon's state folder, as a daemon restarted on
/// the same machine would find it; a debug build would otherwise spend the reply wait
/// compiling.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create cache copy");
    for entry in std::fs::read_dir(from).expect("read cache") {
        let entry = entry.expect("cache entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy cache entry");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_with_the_python_greeter_answers_greetings_only() {
    let world = World::start().await;
    let mut greeter = plugin("python-greeter", python_greeter_path());
    greeter.config_json = r#"{"languages": ["en", "es"]}"#.to_string();
    let config = world.config(Transport::Websocket, vec![greeter]);
    copy_dir(&compiled_cache().await, &config.state_dir.join("plugin-cache"));
    let daemon = Daemon::spawn(config);

    // `open_thread` says "hello" and waits for the first answer.
    let conversation = world.open_thread().await;
    world.peer_says("q1", "can you check my order").await;
    world.peer_says("q2", "bonjour").await;
    world.peer_says("q3", "hola").await;
    // Messages of one conversation are handled in order, so once the answer to the last one
    // is in, the two before it have been decided too.
    let replies = world.wait_for_replies(&conversation, 2).await;
    let texts: Vec<_> = replies.iter().filter_map(|m| m.content.text.clone()).collect();
    assert_eq!(texts, [format!("Hello, {PEER}!"), format!("¡Hola, {PEER}!")]);

    daemon.stop().await;
}
