//! The service building blocks in `agentchatd::ops`, each against something real: notify
//! datagrams on a unix socket bound here, the watchdog pinger under paused time, the instance
//! lock against this process and a child holding it, and the HTTP endpoint scraped over
//! 127.0.0.1.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentchatd::ops::health::{Heartbeat, Readiness};
use agentchatd::ops::http::{self, HttpError, OpsState};
use agentchatd::ops::lock::{InstanceLock, LOCK_FILE_NAME, LockError};
use agentchatd::ops::metrics::Metrics;
use agentchatd::ops::notify::{self, Notifier};
use agentchatd::ops::watchdog;
use tokio_util::sync::CancellationToken;

/// Upper bound for anything that should happen at once; reaching it means a failure, not a
/// slow machine.
const BOUND: Duration = Duration::from_secs(10);

// === notify ===

/// A datagram socket bound in a fresh directory, and a notifier pointed at it.
fn notify_pair() -> (tempfile::TempDir, UnixDatagram, Notifier) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let receiver = UnixDatagram::bind(&path).expect("bind the notify socket");
    receiver.set_read_timeout(Some(BOUND)).expect("read timeout");
    let notifier = Notifier::to_socket(&path).expect("a path is a valid address");
    (dir, receiver, notifier)
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a datagram arrives");
    String::from_utf8(buf[..n].to_vec()).expect("notifications are UTF-8")
}

/// Every datagram already queued on a non-blocking receiver.
fn drain(socket: &UnixDatagram) -> Vec<String> {
    socket.set_nonblocking(true).expect("non-blocking");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: the pinger cannot have queued more than a handful in any test here.
    for _ in 0..1000 {
        match socket.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) => panic!("receiving failed: {err}"),
        }
    }
    got
}

/// Checks the whole life cycle as systemd would see it, datagram by datagram.
fn check_sequence(notifier: &Notifier, receiver: &UnixDatagram) {
    notifier.ready().expect("ready");
    assert_eq!(receive(receiver), "READY=1");

    notifier.status("connected; 2 plugins loaded").expect("status");
    assert_eq!(receive(receiver), "STATUS=connected; 2 plugins loaded");

    notifier.watchdog().expect("watchdog");
    assert_eq!(receive(receiver), "WATCHDOG=1");

    let before = notify::monotonic_usec();
    notifier.reloading().expect("reloading");
    let after = notify::monotonic_usec();
    let reloading = receive(receiver);
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("unexpected datagram {reloading:?}"));
    let usec: u64 = usec.parse().expect("MONOTONIC_USEC is an integer");
    assert!((before..=after).contains(&usec), "{before} <= {usec} <= {after}");

    notifier.ready().expect("ready after the reload");
    assert_eq!(receive(receiver), "READY=1");

    notifier.stopping().expect("stopping");
    assert_eq!(receive(receiver), "STOPPING=1");
}

#[test]
fn notifications_arrive_on_a_path_socket_in_order() {
    let (_dir, receiver, notifier) = notify_pair();
    assert!(notifier.is_enabled());
    check_sequence(&notifier, &receiver);
}

#[test]
fn notifications_arrive_on_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;

    let name = format!("agentchatd-test-notify-{}-{}", std::process::id(), rand::random::<u64>());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
    let receiver = UnixDatagram::bind_addr(&addr).expect("bind the abstract socket");
    receiver.set_read_timeout(Some(BOUND)).expect("read timeout");

    let notifier = Notifier::to_socket(format!("@{name}")).expect("@name is a valid address");
    check_sequence(&notifier, &receiver);
}

#[test]
fn a_status_cannot_smuggle_in_another_assignment() {
    let (_dir, receiver, notifier) = notify_pair();
    notifier.status("draining\nREADY=1").expect("status");
    assert_eq!(receive(&receiver), "STATUS=draining READY=1");
}

#[test]
fn extend_timeout_is_sent_in_microseconds() {
    let (_dir, receiver, notifier) = notify_pair();
    notifier.extend_timeout(Duration::from_secs(20)).expect("extend");
    assert_eq!(receive(&receiver), "EXTEND_TIMEOUT_USEC=20000000");
}

// === watchdog ===

/// Captures log output so tests can check what an operator would read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const PING_EVERY: Duration = Duration::from_secs(10);
const STALL_LIMIT: Duration = Duration::from_secs(25);

/// Beats `loops` and then sleeps one ping interval, `rounds` times. The test starts 5 s off the
/// pinger's ticks, so every tick falls between a beat and the next check.
async fn beat_for(heartbeat: &Heartbeat, loops: &[&str], rounds: usize) {
    for _ in 0..rounds {
        for name in loops {
            heartbeat.beat(name);
        }
        tokio::time::sleep(PING_EVERY).await;
    }
}

#[tokio::test(start_paused = true)]
async fn watchdog_pings_stop_while_a_loop_stalls_and_resume_when_it_recovers() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber =
        tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    // A current-thread runtime runs the pinger on this thread, so a thread-local default
    // subscriber sees its logs.
    let _guard = tracing::subscriber::set_default(subscriber);

    let (_dir, receiver, notifier) = notify_pair();
    let heartbeat = Heartbeat::new(STALL_LIMIT);
    heartbeat.register("inbox");
    heartbeat.register("outbox");
    let shutdown = CancellationToken::new();
    let pinger =
        tokio::spawn(watchdog::run(notifier, heartbeat.clone(), PING_EVERY, shutdown.clone()));
    tokio::time::sleep(PING_EVERY / 2).await;

    // Both loops beat: a ping at 0, 10, 20, 30 and 40 s.
    beat_for(&heartbeat, &["inbox", "outbox"], 4).await;
    assert_eq!(drain(&receiver), vec!["WATCHDOG=1"; 5]);

    // The inbox last beat at 35 s. Ticks at 50 and 60 s are within the 25 s limit; from
    // 70 s on it has stalled and the pings stop, though the outbox still beats.
    beat_for(&heartbeat, &["outbox"], 4).await;
    assert_eq!(drain(&receiver), vec!["WATCHDOG=1"; 2]);
    beat_for(&heartbeat, &["outbox"], 3).await;
    assert_eq!(drain(&receiver), Vec::<String>::new());
    let text = logs.text();
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("stalled_loop=inbox"), "{text}");
    assert!(!text.contains("stalled_loop=outbox"), "{text}");

    // The inbox beats again: pings resume at the next tick.
    beat_for(&heartbeat, &["inbox", "outbox"], 2).await;
    assert_eq!(drain(&receiver), vec!["WATCHDOG=1"; 2]);
    assert!(logs.text().contains("resuming watchdog pings"));

    shutdown.cancel();
    tokio::time::timeout(BOUND, pinger)
        .await
        .expect("the pinger stops on shutdown")
        .expect("the pinger does not panic");
    assert_eq!(drain(&receiver), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_registered_loop_that_never_beats_stops_the_pings() {
    let (_dir, receiver, notifier) = notify_pair();
    let heartbeat = Heartbeat::new(STALL_LIMIT);
    heartbeat.register("inbox");
    let shutdown = CancellationToken::new();
    let pinger =
        tokio::spawn(watchdog::run(notifier, heartbeat.clone(), PING_EVERY, shutdown.clone()));

    // Ticks at 0, 10 and 20 s ping; from 30 s the never-beating inbox has stalled.
    tokio::time::sleep(Duration::from_secs(65)).await;
    assert_eq!(drain(&receiver), vec!["WATCHDOG=1"; 3]);

    shutdown.cancel();
    tokio::time::timeout(BOUND, pinger)
        .await
        .expect("the pinger stops on shutdown")
        .expect("the pinger does not panic");
}

#[tokio::test(start_paused = true)]
async fn the_pinger_survives_a_notify_socket_that_went_away() {
    let (dir, receiver, notifier) = notify_pair();
    drop(receiver);
    std::fs::remove_file(dir.path().join("notify.sock")).expect("remove the socket");
    let heartbeat = Heartbeat::new(STALL_LIMIT);
    let shutdown = CancellationToken::new();
    let pinger = tokio::spawn(watchdog::run(notifier, heartbeat, PING_EVERY, shutdown.clone()));

    tokio::time::sleep(PING_EVERY * 3).await;
    assert!(!pinger.is_finished(), "send errors must not end the pinger");
    shutdown.cancel();
    tokio::time::timeout(BOUND, pinger)
        .await
        .expect("the pinger stops on shutdown")
        .expect("the pinger does not panic");
}

// === lock ===

#[test]
fn a_second_lock_on_the_same_state_dir_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let first = InstanceLock::acquire(&state_dir).expect("the first lock is free");
    assert_eq!(first.path(), state_dir.join(LOCK_FILE_NAME));

    let err = InstanceLock::acquire(&state_dir).expect_err("the lock is held");
    let LockError::Held { path, holder } = &err else {
        panic!("expected Held, got {err:?}");
    };
    assert_eq!(path, first.path());
    let holder = holder.as_ref().expect("the holder wrote its pid");
    assert_eq!(holder.pid, std::process::id());
    assert!(holder.started.is_some());

    let message = err.to_string();
    let expected_start = format!("another agentchatd (pid {}, started ", std::process::id());
    assert!(message.starts_with(&expected_start), "{message}");
    assert!(
        message.ends_with(&format!(
            ") holds {}; stop it or use another state.dir",
            first.path().display()
        )),
        "{message}"
    );

    drop(first);
    let again = InstanceLock::acquire(&state_dir).expect("free again after drop");
    let contents = std::fs::read_to_string(again.path()).expect("read the lock file");
    assert!(contents.starts_with(&format!("pid={}\nstarted=", std::process::id())));
}

/// A `flock` child holding the lock on `path`, which writes its own pid into the file and
/// exits when its stdin closes.
struct FlockChild {
    child: std::process::Child,
    pid: u32,
}

impl FlockChild {
    fn hold(path: &Path) -> Self {
        // `-o` keeps the lock in flock itself (not the shell), and `read` ends the shell as
        // soon as the test closes stdin, so nothing outlives the test.
        let mut child = Command::new("flock")
            .args(["--nonblock", "-o"])
            .arg(path)
            .args(["sh", "-c", "echo \"pid=$$\" > \"$0\"; echo $$; read _ || true"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("util-linux flock is installed");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line)
            .expect("the child reports its pid once it holds the lock");
        let pid = line.trim().parse().expect("a pid");
        Self { child, pid }
    }

    fn release(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("the child exits once stdin closes");
        assert!(status.success(), "flock exited with {status}");
    }
}

#[test]
fn a_lock_held_by_another_process_is_refused_until_it_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(LOCK_FILE_NAME);
    let child = FlockChild::hold(&path);

    let err = InstanceLock::acquire(dir.path()).expect_err("the child holds the lock");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("another agentchatd (pid {}) holds ", child.pid)),
        "{message}"
    );

    child.release();
    InstanceLock::acquire(dir.path()).expect("free once the child exited");
}

// === metrics and http ===

struct Endpoint {
    base: String,
    client: reqwest::Client,
    state: OpsState,
    shutdown: CancellationToken,
    server: http::OpsServer,
}

impl Endpoint {
    async fn start() -> Self {
        let state = OpsState {
            metrics: Arc::new(Metrics::new()),
            heartbeat: Heartbeat::new(Duration::from_secs(30)),
            readiness: Readiness::new(["plugins", "inbox"]),
        };
        let shutdown = CancellationToken::new();
        let addr = "127.0.0.1:0".parse().expect("address");
        let server =
            http::start(addr, state.clone(), shutdown.clone()).await.expect("bind 127.0.0.1:0");
        let client = reqwest::Client::builder().no_proxy().timeout(BOUND).build().expect("client");
        Self { base: format!("http://{}", server.local_addr()), client, state, shutdown, server }
    }

    async fn get(&self, path: &str) -> (u16, String, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("the endpoint answers");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.text().await.expect("a body");
        (status, content_type, body)
    }

    async fn json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, content_type, body) = self.get(path).await;
        assert_eq!(content_type, "application/json", "{path}");
        (status, serde_json::from_str(&body).expect("JSON body"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(BOUND, self.server.stopped())
            .await
            .expect("the server stops on shutdown")
            .expect("the server stopped cleanly");
    }
}

fn assert_lines(text: &str, expected: &[&str]) {
    for line in expected {
        assert!(text.lines().any(|l| l == *line), "missing {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn metrics_are_served_in_the_prometheus_text_format() {
    let endpoint = Endpoint::start().await;
    let metrics = &endpoint.state.metrics;
    metrics.messages_received.inc_by(3);
    metrics.messages_processed.inc_by(2);
    metrics.messages_acked.inc();
    metrics.record_plugin_call("echo", "ok", Duration::from_millis(3));
    metrics.record_plugin_call("echo", "ok", Duration::from_millis(40));
    metrics.record_plugin_call("echo", "timeout", Duration::from_secs(20));
    metrics.record_plugin_call("we\"ird\\id", "ok", Duration::from_millis(1));
    metrics.record_send("sent", false);
    metrics.record_send("retry", true);
    metrics.outbox_depth.set(4);
    metrics.set_connected(true);

    let (status, content_type, text) = endpoint.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_lines(
        &text,
        &[
            "# HELP agentchatd_messages_received_total Inbound messages taken from the inbox.",
            "# TYPE agentchatd_messages_received_total counter",
            "agentchatd_messages_received_total 3",
            "agentchatd_messages_processed_total 2",
            "agentchatd_messages_acked_total 1",
            "agentchatd_plugin_calls_total{plugin=\"echo\",outcome=\"ok\"} 2",
            "agentchatd_plugin_calls_total{plugin=\"echo\",outcome=\"timeout\"} 1",
            "agentchatd_plugin_calls_total{plugin=\"we\\\"ird\\\\id\",outcome=\"ok\"} 1",
            "agentchatd_plugin_errors_total{plugin=\"echo\"} 1",
            "# TYPE agentchatd_plugin_call_seconds histogram",
            "agentchatd_plugin_call_seconds_bucket{plugin=\"echo\",le=\"0.001\"} 0",
            "agentchatd_plugin_call_seconds_bucket{plugin=\"echo\",le=\"0.0025\"} 0",
            "agentchatd_plugin_call_seconds_bucket{plugin=\"echo\",le=\"0.005\"} 1",
            "agentchatd_plugin_call_seconds_bucket{plugin=\"echo\",le=\"0.025\"} 1",
            "agentchatd_plugin_call_seconds_bucket{plugin=\"echo\",le=\"0.05\"} 2",
            "agentchatd_plugin_call_seconds_bucket{plugin=\"echo\",le=\"10\"} 2",
            "agentchatd_plugin_call_seconds_bucket{plugin=\"echo\",le=\"+Inf\"} 3",
            "agentchatd_plugin_call_seconds_sum{plugin=\"echo\"} 20.043",
            "agentchatd_plugin_call_seconds_count{plugin=\"echo\"} 3",
            "# TYPE agentchatd_outbox_depth gauge",
            "agentchatd_outbox_depth 4",
            "agentchatd_sends_total{result=\"retry\"} 1",
            "agentchatd_sends_total{result=\"sent\"} 1",
            "agentchatd_rate_limited_total 1",
            "agentchatd_dead_letters 0",
            "agentchatd_cold_slots_used 0",
            "agentchatd_reconnects_total 0",
            "agentchatd_connected 1",
        ],
    );
    // The histogram has every bucket and nothing else for `echo`.
    let echo_buckets = text
        .lines()
        .filter(|l| l.starts_with("agentchatd_plugin_call_seconds_bucket{plugin=\"echo\""))
        .count();
    assert_eq!(echo_buckets, 14);
    assert!(text.ends_with('\n'));

    endpoint.stop().await;
}

#[tokio::test]
async fn readyz_turns_200_only_once_every_condition_holds() {
    let endpoint = Endpoint::start().await;
    let readiness = &endpoint.state.readiness;

    let (status, body) = endpoint.json("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "not ready");
    assert_eq!(body["pending"].as_array().map(Vec::len), Some(2));

    readiness.mark_ready("plugins");
    readiness.mark_not_ready("inbox", "connecting to the server");
    let (status, body) = endpoint.json("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        body["pending"],
        serde_json::json!([{ "condition": "inbox", "reason": "connecting to the server" }])
    );

    readiness.mark_ready("inbox");
    let (status, body) = endpoint.json("/readyz").await;
    assert_eq!((status, body), (200, serde_json::json!({ "status": "ready" })));

    readiness.mark_not_ready("inbox", "reconnecting");
    let (status, _) = endpoint.json("/readyz").await;
    assert_eq!(status, 503);

    endpoint.stop().await;
}

#[tokio::test]
async fn healthz_turns_503_naming_the_stalled_loop_and_back_when_it_beats() {
    let endpoint = Endpoint::start().await;
    let heartbeat = &endpoint.state.heartbeat;
    heartbeat.beat("inbox");
    heartbeat.beat("outbox");

    let (status, body) = endpoint.json("/healthz").await;
    assert_eq!((status, body), (200, serde_json::json!({ "status": "ok" })));

    // Date the inbox's last beat a minute back instead of waiting out the 30 s limit.
    let a_minute_ago = tokio::time::Instant::now() - Duration::from_secs(60);
    heartbeat.beat_at("inbox", a_minute_ago);
    let (status, body) = endpoint.json("/healthz").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "stalled");
    let stalled = body["stalled"].as_array().expect("a list of stalls");
    assert_eq!(stalled.len(), 1);
    assert_eq!(stalled[0]["loop"], "inbox");
    assert_eq!(stalled[0]["stall_limit_secs"], 30.0);
    assert!(stalled[0]["silent_for_secs"].as_f64().expect("seconds") >= 60.0);

    heartbeat.beat("inbox");
    let (status, _) = endpoint.json("/healthz").await;
    assert_eq!(status, 200);

    endpoint.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_not_found() {
    let endpoint = Endpoint::start().await;
    let (status, _, _) = endpoint.get("/admin").await;
    assert_eq!(status, 404);
    endpoint.stop().await;
}

#[tokio::test]
async fn an_address_in_use_is_a_bind_error_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address");
    let state = OpsState {
        metrics: Arc::new(Metrics::new()),
        heartbeat: Heartbeat::new(Duration::from_secs(30)),
        readiness: Readiness::new(["plugins"]),
    };
    let err =
        http::start(addr, state, CancellationToken::new()).await.expect_err("the port is taken");
    assert!(matches!(err, HttpError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
