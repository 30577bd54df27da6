//! The daemon as a service: the sd_notify sequence on a real datagram socket, watchdog pings
//! that stop while a loop stalls, the instance lock, reload with a bad and a good config, the
//! metrics and health endpoint, a graceful stop under load, and operator commands writing
//! beside a busy daemon.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use agentchatd::config::{Config, Transport};
use agentchatd::ops::notify::Notifier;
use agentchatd::outbox::queue_operator_send;
use agentchatd::service::{self, Controls, ServiceError};
use agentchatd::store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::harness::{Daemon, World, daemon_config, plugin};
use crate::proxy::Proxy;
use crate::support::echo_plugin_path;

/// A bound notify socket and what arrived on it.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        NotifySocket { socket, path, _dir: dir }
    }

    fn notifier(&self) -> Notifier {
        Notifier::to_socket(&self.path).expect("notifier")
    }

    /// Every datagram received so far.
    fn drain(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..10_000 {
            match self.socket.recv(&mut buf) {
                Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => break,
            }
        }
        out
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServiceError>>,
}

fn spawn_with(
    config: Config,
    notifier: Notifier,
    reload: Option<(mpsc::Receiver<()>, std::path::PathBuf)>,
    watchdog: Option<Duration>,
) -> Running {
    let stop = CancellationToken::new();
    let mut controls = Controls::new(stop.clone());
    controls.notifier = notifier;
    controls.watchdog = watchdog;
    if let Some((rx, path)) = reload {
        controls.reload = Some(rx);
        controls.config_path = Some(path);
    }
    let task = tokio::spawn(service::run_with(config, controls));
    Running { stop, task }
}

async fn wait_for<F: Fn() -> bool>(what: &str, check: F) {
    for _ in 0..800 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("waited 20 s for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_says_ready_only_once_connected_then_stopping() {
    let world = World::start().await;
    let sock = NotifySocket::new();
    let config = world.config(Transport::Websocket, vec![plugin("echo", echo_plugin_path())]);
    let running = spawn_with(config, sock.notifier(), None, Some(Duration::from_millis(100)));
    let seen = std::sync::Mutex::new(Vec::new());
    wait_for("READY=1", || {
        seen.lock().expect("lock").extend(sock.drain());
        seen.lock().expect("lock").iter().any(|d| d == "READY=1")
    })
    .await;
    // The agent answers by the time READY=1 was sent: the inbox is connected.
    let conversation = world.open_thread().await;
    assert!(!conversation.is_empty());
    wait_for("watchdog pings", || {
        seen.lock().expect("lock").extend(sock.drain());
        seen.lock().expect("lock").iter().filter(|d| *d == "WATCHDOG=1").count() >= 2
    })
    .await;
    running.stop.cancel();
    running.task.await.expect("join").expect("clean stop");
    seen.lock().expect("lock").extend(sock.drain());
    let seen = seen.into_inner().expect("lock");

    let position = |needle: &str| seen.iter().position(|d| d.starts_with(needle));
    let loading = position("STATUS=loading plugins").expect("status while loading");
    let connecting = position("STATUS=connecting").expect("status while connecting");
    let ready = position("READY=1").expect("ready");
    let stopping = position("STOPPING=1").expect("stopping");
    assert!(loading < connecting && connecting < ready && ready < stopping, "{seen:?}");
    assert_eq!(seen.iter().filter(|d| *d == "READY=1").count(), 1, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_is_refused_naming_the_holder() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![]);
    let first = Daemon::spawn(config.clone());
    wait_for("the first daemon's lock", || config.state_dir.join("agentchatd.lock").exists()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = service::run(config.clone(), CancellationToken::new());
    let err = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second daemon gives up at once")
        .expect_err("refused");
    assert!(matches!(err, ServiceError::Locked(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_a_bad_config_and_applies_a_good_one() {
    let world = World::start().await;
    let sock = NotifySocket::new();
    let echo = echo_plugin_path();
    let key_file = world.dir.path().join("api-key");
    std::fs::write(&key_file, &world.agent_key).expect("key");
    let file = |prefix: &str| {
        format!(
            "[agent]\napi_base = \"{}\"\napi_key_file = \"{}\"\n[state]\ndir = \"{}\"\n\
             [inbox]\ntransport = \"websocket\"\n[[plugins]]\nid = \"echo\"\npath = \"{}\"\n\
             config = {{ prefix = \"{prefix}\" }}\n",
            world.server.base_url(),
            key_file.display(),
            world.dir.path().join("state").display(),
            echo.display()
        )
    };
    let path = world.dir.path().join("agentchatd.toml");
    std::fs::write(&path, file("one: ")).expect("config");
    let config = agentchatd::config::load(&path).expect("valid config");
    let (tx, rx) = mpsc::channel(1);
    let running = spawn_with(config, sock.notifier(), Some((rx, path.clone())), None);

    let conversation = world.open_thread().await;
    let replies = world.wait_for_replies(&conversation, 1).await;
    assert_eq!(replies[0].content.text.as_deref(), Some("one: hello"));

    // A broken file is refused; the running plugins keep answering.
    std::fs::write(&path, "[agent]\napi_base = 42\n").expect("bad config");
    tx.send(()).await.expect("reload");
    let seen = std::sync::Mutex::new(Vec::new());
    wait_for("the refusal", || {
        seen.lock().expect("lock").extend(sock.drain());
        seen.lock().expect("lock").iter().any(|d| d.starts_with("STATUS=reload refused"))
    })
    .await;
    world.peer_says("m2", "still there?").await;
    let replies = world.wait_for_replies(&conversation, 2).await;
    assert_eq!(replies[1].content.text.as_deref(), Some("one: still there?"));

    // A good file swaps the plugin configuration in place.
    std::fs::write(&path, file("two: ")).expect("good config");
    tx.send(()).await.expect("reload");
    wait_for("the reload", || {
        seen.lock().expect("lock").extend(sock.drain());
        seen.lock().expect("lock").iter().any(|d| d.starts_with("STATUS=reloaded"))
    })
    .await;
    world.peer_says("m3", "and now?").await;
    let replies = world.wait_for_replies(&conversation, 3).await;
    assert_eq!(replies[2].content.text.as_deref(), Some("two: and now?"));
    let seen = seen.into_inner().expect("lock");
    assert!(seen.iter().any(|d| d.starts_with("RELOADING=1\nMONOTONIC_USEC=")), "{seen:?}");
    running.stop.cancel();
    running.task.await.expect("join").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints_report_the_running_daemon() {
    let world = World::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut config = world.config(Transport::Websocket, vec![plugin("echo", echo_plugin_path())]);
    config.ops_listen = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
    let daemon = Daemon::spawn(config);
    let conversation = world.open_thread().await;
    world.peer_says("m1", "one more").await;
    world.wait_for_replies(&conversation, 2).await;

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        if metrics.contains("agentchatd_sends_total{result=\"sent\"} 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(metrics.contains("agentchatd_messages_received_total 2"), "{metrics}");
    assert!(metrics.contains("agentchatd_messages_processed_total 2"), "{metrics}");
    assert!(metrics.contains("agentchatd_messages_acked_total 2"), "{metrics}");
    assert!(metrics.contains("agentchatd_sends_total{result=\"sent\"} 2"), "{metrics}");
    assert!(metrics.contains("agentchatd_connected 1"), "{metrics}");
    assert!(metrics.contains("agentchatd_rate_limited_total 0"), "{metrics}");
    let calls = "agentchatd_plugin_calls_total{plugin=\"echo\",outcome=\"ok\"} 2";
    assert!(metrics.contains(calls), "{metrics}");
    assert!(metrics.contains("agentchatd_plugin_call_seconds_count{plugin=\"echo\"} 2"));
    let ready = http.get(format!("{base}/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let health = http.get(format!("{base}/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), 200);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_under_load_loses_nothing() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![plugin("echo", echo_plugin_path())]);
    let first = Daemon::spawn(config.clone());
    let conversation = world.open_thread().await;
    for n in 1..=30 {
        world.peer_says(&format!("g{n}"), &format!("load {n}")).await;
    }
    // Stop while the burst is being answered; a clean stop is required.
    first.stop().await;
    let second = Daemon::spawn(config);
    let replies = world.wait_for_replies(&conversation, 31).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.stop().await;
    let after = world.replies_seen_by_peer(&conversation).await;
    assert_eq!(after.len(), 31, "one reply per message, none twice: {}", replies.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_writing_beside_a_busy_daemon_do_not_stop_it() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![plugin("echo", echo_plugin_path())]);
    let daemon = Daemon::spawn(config.clone());
    let conversation = world.open_thread().await;
    let cli = Store::open(&config.state_dir).expect("store");
    let writer = tokio::spawn(async move {
        for i in 0..200 {
            queue_operator_send(&cli, "nobody-here", "x", &format!("op{i}")).await.expect("queue");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    for n in 1..=20 {
        world.peer_says(&format!("b{n}"), &format!("busy {n}")).await;
    }
    writer.await.expect("writer");
    world.wait_for_replies(&conversation, 21).await;
    assert!(!daemon.task.is_finished(), "the daemon keeps running");
    daemon.stop().await;
}

/// How often the daemon pings the watchdog in the stall test.
const PING_EVERY: Duration = Duration::from_millis(100);

/// Asks the daemon's `/healthz`: its status code and JSON body.
async fn healthz(http: &reqwest::Client, base: &str) -> (u16, serde_json::Value) {
    let response = http.get(format!("{base}/healthz")).send().await.expect("healthz answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

/// Waits (bounded) until `/healthz` answers `status`; returns the body.
async fn wait_for_health(http: &reqwest::Client, base: &str, status: u16) -> serde_json::Value {
    let mut last = (0, serde_json::Value::Null);
    for _ in 0..300 {
        last = healthz(http, base).await;
        if last.0 == status {
            return last.1;
        }
        tokio::time::sleep(PING_EVERY).await;
    }
    panic!("waited 30 s for /healthz {status}; last answer {last:?}");
}

/// The daemon's watchdog pings go to systemd only while its loops are alive: they arrive while
/// it serves, stop while the inbox stalls (and `/healthz` names the inbox), and resume when it
/// moves again.
///
/// The stall is a real one: the inbox polls through a proxy that, on cue, accepts the sync
/// request and never answers, as an API endpoint or a load balancer that went silent would.
/// The poll loop waits on that request (up to the client's 30 s timeout) without beating. The
/// stall limit is 5 s, the shortest `service.stall_limit_secs` accepts, so a daemon configured
/// like this in production would be restarted by systemd. Other waits do not serve as well: a
/// plugin spinning through a time budget longer than the stall limit stalls the loop too, but
/// burns a core all the while; a write blocked by another connection's lock fails after the
/// store's 5 s busy timeout, as soon as the shortest stall limit is reached, so the daemon
/// stops instead of stalling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_while_the_inbox_stalls_and_resume_after() {
    let world = World::start().await;
    let proxy = Proxy::start(&world.server.base_url(), vec![]).await;
    let sock = NotifySocket::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let echo = vec![plugin("echo", echo_plugin_path())];
    let mut config =
        daemon_config(&proxy.base, &world.agent_key, world.dir.path(), Transport::Poll, echo);
    config.ops_listen = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
    config.stall_limit = Duration::from_secs(5);
    let running = spawn_with(config, sock.notifier(), None, Some(PING_EVERY));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let base = format!("http://127.0.0.1:{port}");

    // Healthy: the agent answers through the proxy and the pings keep coming.
    let conversation = world.open_thread().await;
    let seen = std::sync::Mutex::new(Vec::new());
    wait_for("watchdog pings while healthy", || {
        seen.lock().expect("lock").extend(sock.drain());
        seen.lock().expect("lock").iter().filter(|d| *d == "WATCHDOG=1").count() >= 3
    })
    .await;
    assert_eq!(healthz(&http, &base).await.0, 200);

    // The server goes silent on the next sync; the inbox stalls once its 5 s run out.
    proxy.hold_syncs();
    wait_for("a sync request held by the proxy", || proxy.held_syncs() > 0).await;
    let body = wait_for_health(&http, &base, 503).await;
    assert_eq!(body["status"], "stalled", "{body}");
    let stalled: Vec<&str> = body["stalled"]
        .as_array()
        .expect("a list of stalls")
        .iter()
        .filter_map(|stall| stall["loop"].as_str())
        .collect();
    assert_eq!(stalled, ["inbox"], "the outbox still beats: {body}");

    // A ping the pinger decided on just before the stall may still be on its way; after that,
    // none arrives for as long as the request is held (20 ping intervals here).
    tokio::time::sleep(PING_EVERY * 5).await;
    sock.drain();
    tokio::time::sleep(PING_EVERY * 20).await;
    let during_stall = sock.drain();
    assert!(!during_stall.iter().any(|d| d == "WATCHDOG=1"), "{during_stall:?}");
    assert_eq!(proxy.held_syncs(), 1, "the stall lasted through the silent window");

    // The server answers again: the loop beats, health and pings come back, messages flow.
    proxy.release_syncs();
    wait_for_health(&http, &base, 200).await;
    wait_for("watchdog pings after the stall", || sock.drain().iter().any(|d| d == "WATCHDOG=1"))
        .await;
    world.peer_says("after-stall", "awake?").await;
    let replies = world.wait_for_replies(&conversation, 2).await;
    assert_eq!(replies[1].content.text.as_deref(), Some("echo: awake?"));

    running.stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), running.task)
        .await
        .expect("the daemon stops within 20 s")
        .expect("join")
        .expect("clean stop");
}
