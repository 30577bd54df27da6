//! The outbound queue against the local server (through a fault-injecting proxy where a
//! failure is needed): Retry-After obeyed in full, cold-thread holds and releases, the cold
//! cap, a crash in mid-send, dead letters and per-conversation order under retries.

use std::future::Future;
use std::time::{Duration, SystemTime};

use agentchatd::admin;
use agentchatd::client::{Client, Content, Message, SendRequest};
use agentchatd::config::{ApiKey, Config, Transport};
use agentchatd::outbox::{hold, now_ms, queue_operator_send};
use agentchatd::store::{SendRow, SendState, Store};

use crate::harness::{AGENT, Daemon, PEER, World};
use crate::proxy::{Fault, Proxy};

/// Polls `check` every 25 ms for at most 20 s.
async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..800 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("waited 20 s for {what}");
}

async fn rows(store: &Store, state: SendState) -> Vec<SendRow> {
    store.list_sends(Some(state), 500).await.expect("list")
}

/// Messages the agent sent that `peer` has received, oldest first.
async fn received_from_agent(peer: &Client) -> Vec<Message> {
    let rows = peer.sync(None, 500).await.expect("sync");
    rows.into_iter()
        .filter_map(|row| match row {
            agentchatd::client::SyncRow::Message(m) if m.sender == AGENT => Some(*m),
            _ => None,
        })
        .collect()
}

fn texts(messages: &[Message]) -> Vec<String> {
    messages.iter().filter_map(|m| m.content.text.clone()).collect()
}

/// A daemon config without plugins whose REST calls go through `proxy`.
fn via_proxy(world: &World, proxy: &Proxy) -> Config {
    let mut config = world.config(Transport::Websocket, vec![]);
    config.api_base = proxy.base.clone();
    config
}

async fn check_retry_after_obeyed_in_full(retry_after: String, wait_ms: i64) {
    let world = World::start().await;
    let proxy = Proxy::start(&world.server.base_url(), vec![Fault::TooMany(retry_after)]).await;
    let config = via_proxy(&world, &proxy);
    let store = Store::open(&config.state_dir).expect("store");
    queue_operator_send(&store, PEER, "patience", "op-1").await.expect("queue");
    let before = now_ms();
    let daemon = Daemon::spawn(config);

    wait_until("the refused attempt", || async {
        rows(&store, SendState::Pending).await.first().is_some_and(|r| r.last_error.is_some())
    })
    .await;
    let row = rows(&store, SendState::Pending).await.remove(0);
    assert!(row.next_attempt_ms >= before + wait_ms - 2_000, "retry scheduled at {row:?}");
    assert_eq!(row.attempts, 0, "a limit answer uses up no attempt");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(proxy.sends().len(), 1, "no retry before Retry-After");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_in_seconds_is_obeyed_in_full() {
    check_retry_after_obeyed_in_full("3600".into(), 3_600_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_http_date_is_obeyed_in_full() {
    let at = SystemTime::now() + Duration::from_secs(7_200);
    check_retry_after_obeyed_in_full(httpdate::fmt_http_date(at), 7_200_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retry_after_is_waited_out_and_the_message_sent_once() {
    let world = World::start().await;
    let proxy = Proxy::start(&world.server.base_url(), vec![Fault::TooMany("1".into())]).await;
    let config = via_proxy(&world, &proxy);
    let store = Store::open(&config.state_dir).expect("store");
    queue_operator_send(&store, PEER, "after a second", "op-1").await.expect("queue");
    let daemon = Daemon::spawn(config);
    wait_until("the send", || async { rows(&store, SendState::Sent).await.len() == 1 }).await;
    daemon.stop().await;
    let statuses: Vec<_> = proxy.sends().iter().map(|s| s.status).collect();
    assert_eq!(statuses, [429, 201]);
    assert_eq!(texts(&received_from_agent(&world.peer).await), ["after a second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_message_into_a_cold_thread_waits_for_the_reply() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![]);
    let store = Store::open(&config.state_dir).expect("store");
    queue_operator_send(&store, PEER, "first", "op-1").await.expect("queue");
    queue_operator_send(&store, PEER, "second", "op-2").await.expect("queue");
    let daemon = Daemon::spawn(config);

    wait_until("the first message", || async { rows(&store, SendState::Sent).await.len() == 1 })
        .await;
    wait_until("the hold", || async {
        rows(&store, SendState::Pending).await.first().and_then(|r| r.hold.clone())
            == Some(hold::AWAITING_REPLY.to_owned())
    })
    .await;
    let status = admin::status(&world.config(Transport::Websocket, vec![])).await.expect("status");
    assert!(status.contains("1 awaiting_reply"), "{status}");
    assert!(status.contains("cold threads awaiting a reply (24 h): 1 of 100"), "{status}");
    assert_eq!(texts(&received_from_agent(&world.peer).await), ["first"]);

    // The peer answers; the held message goes out after it.
    let reply = world.peer_says("r1", "hi back").await;
    wait_until("the second message", || async { rows(&store, SendState::Sent).await.len() == 2 })
        .await;
    daemon.stop().await;
    let history = world.replies_seen_by_peer(&reply.conversation_id).await;
    assert_eq!(texts(&history), ["first", "second"]);
    let stats = world.server.send_stats();
    let refused = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused(&stats.awaiting_reply), 0, "the server never had to refuse");
    assert_eq!(refused(&stats.rate_limited), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_101st_new_thread_waits_until_a_cold_slot_frees() {
    let world = World::start().await;
    let mut peers = Vec::new();
    for n in 0..101 {
        let handle = format!("peer{n}");
        let key = world.server.seed_agent(&handle).await.expect("seed");
        peers.push((handle, key));
    }
    let config = world.config(Transport::Websocket, vec![]);
    let store = Store::open(&config.state_dir).expect("store");
    for (n, (handle, _)) in peers.iter().enumerate() {
        queue_operator_send(&store, handle, "hello there", &format!("op-{n}"))
            .await
            .expect("queue");
    }
    let daemon = Daemon::spawn(config.clone());

    wait_until("100 new threads", || async { rows(&store, SendState::Sent).await.len() == 100 })
        .await;
    wait_until("the cold-cap hold", || async {
        rows(&store, SendState::Pending).await.first().and_then(|r| r.hold.clone())
            == Some(hold::COLD_CAP.to_owned())
    })
    .await;
    let status = admin::status(&config).await.expect("status");
    assert!(status.contains("100 of 100"), "{status}");
    assert!(status.starts_with("daemon: running (pid "), "{status}");
    let stats = world.server.send_stats();
    assert_eq!(stats.rate_limited.load(std::sync::atomic::Ordering::Relaxed), 0);

    // One peer answers; its thread no longer counts and the 101st goes out.
    let (handle, key) = &peers[7];
    let peer = Client::new(&world.server.base_url(), ApiKey::new(key.clone())).expect("client");
    let request = SendRequest {
        to: Some(AGENT.into()),
        conversation_id: None,
        client_msg_id: "answer".into(),
        kind: "text".into(),
        content: Content { text: Some(format!("{handle} here")), ..Content::default() },
    };
    peer.send_message(&request).await.expect("peer answers");
    wait_until("the 101st thread", || async { rows(&store, SendState::Sent).await.len() == 101 })
        .await;
    daemon.stop().await;
    let status = admin::status(&config).await.expect("status");
    assert!(status.starts_with("daemon: not running"), "{status}");
    assert_eq!(stats.rate_limited.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_mid_send_then_restart_leaves_exactly_one_message() {
    let world = World::start().await;
    let proxy = Proxy::start(&world.server.base_url(), vec![Fault::ForwardThenHang]).await;
    let config = via_proxy(&world, &proxy);
    let store = Store::open(&config.state_dir).expect("store");
    queue_operator_send(&store, PEER, "only once", "op-1").await.expect("queue");
    let forwarded = proxy.forwarded();
    let first = Daemon::spawn(config.clone());
    tokio::time::timeout(Duration::from_secs(20), forwarded)
        .await
        .expect("the send reached the server");
    // The server stored the message but the daemon never heard back: kill it there.
    first.task.abort();
    let _ = first.task.await;
    assert_eq!(rows(&store, SendState::Pending).await.len(), 1, "the send is still queued");

    let mut direct = config.clone();
    direct.api_base = world.server.base_url();
    let second = Daemon::spawn(direct);
    wait_until("the resend", || async { rows(&store, SendState::Sent).await.len() == 1 }).await;
    second.stop().await;
    assert_eq!(texts(&received_from_agent(&world.peer).await), ["only once"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sends_become_dead_letters_that_can_be_retried_or_dropped() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![]);
    let store = Store::open(&config.state_dir).expect("store");
    queue_operator_send(&store, "nobody", "hello?", "op-1").await.expect("queue");
    queue_operator_send(&store, PEER, &"x".repeat(40_000), "op-2").await.expect("queue");
    let daemon = Daemon::spawn(config.clone());
    wait_until("two dead letters", || async { rows(&store, SendState::Dead).await.len() == 2 })
        .await;
    let listing = admin::list(&config, Some(SendState::Dead), 10).await.expect("list");
    assert!(listing.contains("AgentNotFound"), "{listing}");
    assert!(listing.contains("ContentTooLarge"), "{listing}");

    let dead = rows(&store, SendState::Dead).await;
    let unknown = dead.iter().find(|r| r.recipient.as_deref() == Some("nobody")).expect("row");
    let too_big = dead.iter().find(|r| r.recipient.as_deref() == Some(PEER)).expect("row");
    // The operator creates the missing agent, then retries; the oversized one is dropped.
    world.server.seed_agent("nobody").await.expect("seed");
    assert!(admin::retry(&config, unknown.id).await.expect("retry").0);
    assert!(admin::drop_send(&config, too_big.id).await.expect("drop").0);
    assert!(!admin::drop_send(&config, too_big.id).await.expect("drop again").0);
    wait_until("the retried send", || async { rows(&store, SendState::Sent).await.len() == 1 })
        .await;
    daemon.stop().await;
    assert!(rows(&store, SendState::Dead).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_retries_run_out_is_dead_lettered() {
    let world = World::start().await;
    let faults = vec![Fault::Unavailable, Fault::Unavailable, Fault::Unavailable];
    let proxy = Proxy::start(&world.server.base_url(), faults).await;
    let mut config = via_proxy(&world, &proxy);
    config.max_attempts = 3;
    config.retry_initial = Duration::from_millis(10);
    let store = Store::open(&config.state_dir).expect("store");
    queue_operator_send(&store, PEER, "doomed", "op-1").await.expect("queue");
    let daemon = Daemon::spawn(config);
    wait_until("the dead letter", || async { rows(&store, SendState::Dead).await.len() == 1 })
        .await;
    daemon.stop().await;
    let dead = rows(&store, SendState::Dead).await.remove(0);
    assert_eq!(dead.attempts, 3);
    assert!(dead.last_error.as_deref().is_some_and(|e| e.contains("503")), "{dead:?}");
    assert_eq!(proxy.sends().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_within_a_conversation_survives_retries() {
    let world = World::start().await;
    let proxy = Proxy::start(&world.server.base_url(), vec![Fault::Unavailable]).await;
    let mut config = via_proxy(&world, &proxy);
    config.retry_initial = Duration::from_millis(50);
    let daemon = Daemon::spawn(config.clone());
    // The peer writes first, so the agent may send freely into the thread.
    let opening = world.peer_says("o1", "talk to me").await;
    let store = Store::open(&config.state_dir).expect("store");
    wait_until("the peer's message to be processed", || async {
        store.is_processed(&opening.id).await.expect("query")
    })
    .await;
    for (n, text) in ["A", "B", "C"].iter().enumerate() {
        queue_operator_send(&store, PEER, text, &format!("op-{n}")).await.expect("queue");
    }
    wait_until("three sends", || async { rows(&store, SendState::Sent).await.len() == 3 }).await;
    daemon.stop().await;

    let attempts: Vec<_> =
        proxy.sends().iter().map(|s| (s.text.clone().unwrap_or_default(), s.status)).collect();
    let expected = [("A", 503), ("A", 201), ("B", 201), ("C", 201)].map(|(t, s)| (t.to_owned(), s));
    assert_eq!(attempts, expected);
    let history = world.replies_seen_by_peer(&opening.conversation_id).await;
    assert_eq!(texts(&history), ["A", "B", "C"]);
}

#[tokio::test]
async fn an_operator_send_names_its_queue_row_and_a_bad_handle_is_not_queued() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![]);
    let (queued, text) = admin::send(&config, "Bad Handle!", "hi", None).await.expect("send");
    assert!(!queued && text.contains("not an AgentChat handle"), "{text}");
    let (queued, text) =
        admin::send(&config, "@Bob-2", "hi", Some("op-1".into())).await.expect("send");
    assert!(queued && text.starts_with("queued for bob-2 as #1 "), "{text}");
    let (queued, text) =
        admin::send(&config, "bob-2", "hi", Some("op-1".into())).await.expect("send");
    assert!(queued && text.starts_with("already queued as #1 "), "{text}");
    let store = Store::open(&config.state_dir).expect("store");
    assert_eq!(rows(&store, SendState::Pending).await.len(), 1);
}
