//! End to end: local server -> daemon inbox -> echo plugin -> outbox -> local server, over the
//! WebSocket and over polling, across a crash, and with a plugin that traps.

use std::collections::BTreeSet;
use std::time::Duration;

use agentchatd::config::Transport;
use agentchatd::store::Store;

use crate::harness::{Daemon, World, plugin};

use crate::support::echo_plugin_path;

async fn check_exchange(transport: Transport) {
    let world = World::start().await;
    let daemon = Daemon::spawn(world.config(transport, vec![plugin("echo", echo_plugin_path())]));
    let conversation = world.open_thread().await;
    for n in 1..=5 {
        world.peer_says(&format!("m{n}"), &format!("ping {n}")).await;
    }
    let replies = world.wait_for_replies(&conversation, 6).await;
    let texts: Vec<_> = replies.iter().filter_map(|m| m.content.text.clone()).collect();
    let mut expected = vec!["echo: hello".to_owned()];
    expected.extend((1..=5).map(|n| format!("echo: ping {n}")));
    assert_eq!(texts, expected, "one reply per message, in order");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_inbox_answers_every_message_in_order() {
    check_exchange(Transport::Websocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_inbox_answers_every_message_in_order() {
    check_exchange(Transport::Poll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_then_restart_answers_each_message_exactly_once() {
    let world = World::start().await;
    let config = world.config(Transport::Websocket, vec![plugin("echo", echo_plugin_path())]);
    let first = Daemon::spawn(config.clone());

    // The peer writes 50 messages while the daemon runs; the daemon is killed part-way.
    let conversation = world.open_thread().await;
    for n in 1..=20 {
        world.peer_says(&format!("k{n}"), &format!("n{n}")).await;
    }
    world.wait_for_replies(&conversation, 6).await;
    // Abort drops the daemon's futures wherever they are, as a crash would.
    first.task.abort();
    let _ = first.task.await;
    for n in 21..=50 {
        world.peer_says(&format!("k{n}"), &format!("n{n}")).await;
    }

    let second = Daemon::spawn(config.clone());
    let replies = world.wait_for_replies(&conversation, 51).await;

    // Let anything queued twice have its chance to go out before counting.
    let store = Store::open(&config.state_dir).expect("store");
    for _ in 0..200 {
        if store.outbox_counts().await.expect("counts").pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    second.stop().await;
    let replies_after = world.replies_seen_by_peer(&conversation).await;
    assert_eq!(replies_after.len(), replies.len(), "no reply arrived after the last one");

    let texts: Vec<_> = replies_after.iter().filter_map(|m| m.content.text.clone()).collect();
    let unique: BTreeSet<_> = texts.iter().cloned().collect();
    let mut expected: BTreeSet<_> = (1..=50).map(|n| format!("echo: n{n}")).collect();
    expected.insert("echo: hello".to_owned());
    assert_eq!(texts.len(), 51, "exactly one reply per message, got {texts:?}");
    assert_eq!(unique, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_is_contained_and_later_plugins_still_answer() {
    let world = World::start().await;
    let trap = crate::support::write_wat_guest(world.dir.path(), "trap");
    let plugins = vec![plugin("trap", trap), plugin("echo", echo_plugin_path())];
    let config = world.config(Transport::Websocket, plugins);
    let daemon = Daemon::spawn(config.clone());
    let first = world.peer_says("t1", "first").await;
    world.wait_for_replies(&first.conversation_id, 1).await;
    world.peer_says("t2", "second").await;
    let replies = world.wait_for_replies(&first.conversation_id, 2).await;
    let texts: Vec<_> = replies.iter().filter_map(|m| m.content.text.clone()).collect();
    assert_eq!(texts, ["echo: first", "echo: second"]);
    daemon.stop().await;

    // Both messages were acknowledged: nothing is left undelivered on the server.
    let agent = agentchatd::client::Client::new(
        &world.server.base_url(),
        agentchatd::config::ApiKey::new(world.agent_key.clone()),
    )
    .expect("client");
    assert!(agent.sync(None, 10).await.expect("sync").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_waits_for_an_unreachable_server_then_serves() {
    // Find a free port, then leave it closed while the daemon starts.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let base = format!("http://127.0.0.1:{port}");

    let server_dir = tempfile::tempdir().expect("tempdir");
    let db = server_dir.path().join("server.sqlite3");
    let config =
        agentchatd::server::ServerConfig { db_path: Some(db.clone()), ..Default::default() };
    // Seed the agents on a first server run, then stop it: the key must survive a restart.
    let seeding = agentchatd::server::LocalServer::start(
        config.clone(),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("server");
    let agent_key = seeding.seed_agent(crate::harness::AGENT).await.expect("agent");
    let peer_key = seeding.seed_agent(crate::harness::PEER).await.expect("peer");
    seeding.shutdown().await;

    let daemon_config = crate::harness::daemon_config(
        &base,
        &agent_key,
        dir.path(),
        Transport::Auto,
        vec![plugin("echo", echo_plugin_path())],
    );
    let daemon = Daemon::spawn(daemon_config);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!daemon.task.is_finished(), "the daemon must keep waiting for the server");

    let server = agentchatd::server::LocalServer::start(
        config,
        format!("127.0.0.1:{port}").parse().expect("addr"),
    )
    .await
    .expect("server on the chosen port");
    let peer = agentchatd::client::Client::new(
        &server.base_url(),
        agentchatd::config::ApiKey::new(peer_key),
    )
    .expect("client");
    let sent = peer
        .send_message(&agentchatd::client::SendRequest {
            to: Some(crate::harness::AGENT.into()),
            conversation_id: None,
            client_msg_id: "late-1".into(),
            kind: "text".into(),
            content: agentchatd::client::Content {
                text: Some("are you there".into()),
                ..Default::default()
            },
        })
        .await
        .expect("send");
    let mut answered = false;
    for _ in 0..600 {
        let history =
            peer.history_after(&sent.message.conversation_id, 0, 50).await.expect("history");
        if history.iter().any(|m| m.content.text.as_deref() == Some("echo: are you there")) {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered, "the daemon answered once the server came up");
    daemon.stop().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_echo_daemons_answering_each_other_come_to_rest_within_the_cap() {
    let world = World::start().await;
    let guard = agentchatd::inbox::LoopGuard {
        per_conversation: 5,
        per_peer: 50,
        window: Duration::from_secs(600),
    };
    let mut agent = world.config(Transport::Websocket, vec![plugin("echo", echo_plugin_path())]);
    agent.loop_guard = guard;
    // The peer runs its own daemon with the same plugin and the same caps.
    let peer_dir = tempfile::tempdir().expect("tempdir");
    let peer_key = world.server.seed_agent("bouncer").await.expect("seed");
    let mut peer = crate::harness::daemon_config(
        &world.server.base_url(),
        &peer_key,
        peer_dir.path(),
        Transport::Websocket,
        vec![plugin("echo", echo_plugin_path())],
    );
    peer.loop_guard = guard;
    let first = Daemon::spawn(agent.clone());
    let second = Daemon::spawn(peer.clone());
    let peer_store = Store::open(&peer.state_dir).expect("store");
    agentchatd::outbox::queue_operator_send(&peer_store, crate::harness::AGENT, "ping", "kick")
        .await
        .expect("queue");

    // Wait until neither side sends any more (bounded), then count what each sent.
    let agent_store = Store::open(&agent.state_dir).expect("store");
    let sent = || async {
        let agent_sent = agent_store.outbox_counts().await.expect("counts").sent;
        let peer_sent = peer_store.outbox_counts().await.expect("counts").sent;
        (agent_sent, peer_sent)
    };
    let (mut last, mut stable) = ((0, 0), 0);
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent().await;
        if now == last && now != (0, 0) {
            stable += 1;
            if stable >= 20 {
                break;
            }
        } else {
            (last, stable) = (now, 0);
        }
    }
    first.stop().await;
    second.stop().await;
    // The kick, then five automatic replies from each side; the sixth is capped on both.
    assert_eq!(last, (5, 6), "the exchange came to rest at the cap");
}
