use super::*;

fn send(key: &str, lane: &str) -> NewSend {
    NewSend {
        client_msg_id: key.into(),
        lane: lane.into(),
        request_json: format!(r#"{{"to":"{lane}","client_msg_id":"{key}"}}"#),
        origin: "test".into(),
        recipient: Some(lane.into()),
    }
}

#[tokio::test]
async fn processing_is_recorded_once_with_its_sends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let first = store
        .record_processed(
            Inbound { id: "msg_1", conversation_id: "conv_1", sender: "alice", seq: 1 },
            "reply",
            vec![send("r1", "bob")],
            10,
        )
        .await
        .expect("record");
    assert!(first);
    let again = store
        .record_processed(
            Inbound { id: "msg_1", conversation_id: "conv_1", sender: "alice", seq: 1 },
            "reply",
            vec![send("r2", "bob")],
            11,
        )
        .await
        .expect("record again");
    assert!(!again, "a second record of the same message must be refused");
    assert!(store.is_processed("msg_1").await.expect("query"));
    assert!(!store.is_processed("msg_2").await.expect("query"));
    let due = store.due_sends(100, 10).await.expect("due");
    assert_eq!(due.iter().map(|s| s.client_msg_id.as_str()).collect::<Vec<_>>(), ["r1"]);
}

#[tokio::test]
async fn state_survives_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        store.set_meta("sync_cursor", "del_x".into()).await.expect("meta");
        store
            .record_processed(
                Inbound { id: "msg_1", conversation_id: "c", sender: "alice", seq: 1 },
                "pass",
                vec![],
                1,
            )
            .await
            .expect("record");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.meta("sync_cursor").await.expect("meta"), Some("del_x".into()));
    assert!(store.is_processed("msg_1").await.expect("query"));
}

#[tokio::test]
async fn only_the_head_of_each_lane_is_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    for (key, lane) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
        assert!(store.enqueue(send(key, lane), 0).await.expect("enqueue"));
    }
    assert!(!store.enqueue(send("a1", "a"), 0).await.expect("dup"), "duplicate key is kept once");
    let due = store.due_sends(0, 10).await.expect("due");
    let keys: Vec<_> = due.iter().map(|s| s.client_msg_id.as_str()).collect();
    assert_eq!(keys, ["a1", "b1"]);

    // A retry scheduled later holds its whole lane back; the other lane goes on.
    store.mark_retry(due[0].id, 500, "boom".into(), true, 0).await.expect("retry");
    let due_now: Vec<_> =
        store.due_sends(0, 10).await.expect("due").into_iter().map(|s| s.client_msg_id).collect();
    assert_eq!(due_now, ["b1"]);
    assert_eq!(store.next_due_ms().await.expect("next"), Some(0));

    let due = store.due_sends(500, 10).await.expect("due");
    let a1 = due.into_iter().find(|s| s.client_msg_id == "a1").expect("a1 due again");
    assert_eq!((a1.client_msg_id.as_str(), a1.attempts), ("a1", 1));
    store.mark_sent(a1.id, "msg_9".into(), 500).await.expect("sent");
    let mut next: Vec<_> =
        store.due_sends(500, 10).await.expect("due").into_iter().map(|s| s.client_msg_id).collect();
    next.sort();
    assert_eq!(next, ["a2", "b1"]);

    let due = store.due_sends(500, 10).await.expect("due");
    let b1 = due.into_iter().find(|s| s.client_msg_id == "b1").expect("b1 due");
    store.mark_dead(b1.id, "400 VALIDATION_ERROR".into(), 500).await.expect("dead");
    let counts = store.outbox_counts().await.expect("counts");
    assert_eq!(counts, OutboxCounts { pending: 1, sent: 1, dead: 1 });
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path()).expect("open"));
    let conn = Connection::open(dir.path().join("state.sqlite3")).expect("raw open");
    conn.execute_batch("PRAGMA user_version = 99").expect("bump");
    drop(conn);
    match Store::open(dir.path()) {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        Err(other) => panic!("expected TooNew, got {other}"),
        Ok(_) => panic!("expected TooNew, got a store"),
    }
}

#[tokio::test]
async fn ledger_tracks_threads_and_releases_held_sends_on_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    assert_eq!(store.peer_state("bob").await.expect("state"), None);

    store.note_thread_opened("bob", Some("conv_b".into()), 1_000).await.expect("open");
    let awaiting = PeerState::Awaiting { opened_ms: 1_000 };
    assert_eq!(store.peer_state("bob").await.expect("state"), Some(awaiting));
    assert!(store.enqueue(send("b2", "bob"), 0).await.expect("enqueue"));
    assert!(store.enqueue(send("c1", "carol"), 0).await.expect("enqueue"));
    let due = store.due_sends(0, 10).await.expect("due");
    let b2 = due.iter().find(|s| s.client_msg_id == "b2").expect("b2").id;
    let c1 = due.iter().find(|s| s.client_msg_id == "c1").expect("c1").id;
    store.hold_send(b2, "awaiting_reply", i64::MAX / 4, "wait".into(), 0).await.expect("hold");
    store.hold_send(c1, "cold_cap", i64::MAX / 4, "cap".into(), 0).await.expect("hold");
    assert!(store.due_sends(5_000, 10).await.expect("due").is_empty());
    let held = store.held_counts().await.expect("held");
    assert_eq!(held, [("awaiting_reply".to_owned(), 1), ("cold_cap".to_owned(), 1)]);

    // Bob's reply establishes the thread and releases both his send and the cold-capped one.
    assert!(store.note_peer_wrote("bob", "conv_b", 6_000).await.expect("wrote"));
    assert_eq!(store.peer_state("bob").await.expect("state"), Some(PeerState::Established));
    let mut due: Vec<_> = store
        .due_sends(6_000, 10)
        .await
        .expect("due")
        .into_iter()
        .map(|s| s.client_msg_id)
        .collect();
    due.sort();
    assert_eq!(due, ["b2", "c1"]);
    // A peer that was never awaited does not count as a released thread.
    assert!(!store.note_peer_wrote("dave", "conv_d", 7_000).await.expect("wrote"));
    // Opening again does not demote an established peer.
    store.note_thread_opened("bob", None, 8_000).await.expect("open");
    assert_eq!(store.peer_state("bob").await.expect("state"), Some(PeerState::Established));
}

#[tokio::test]
async fn only_threads_opened_within_the_window_use_cold_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store.note_thread_opened("old", None, 1_000).await.expect("open");
    store.note_thread_opened("new", None, 90_000).await.expect("open");
    store.note_thread_opened("answered", None, 95_000).await.expect("open");
    store.note_peer_wrote("answered", "conv_a", 96_000).await.expect("wrote");
    let open = store.awaiting_threads(50_000).await.expect("threads");
    let handles: Vec<_> = open.iter().map(|t| t.handle.as_str()).collect();
    assert_eq!(handles, ["new"]);
}

#[tokio::test]
async fn dead_letters_can_be_listed_retried_and_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store.enqueue(send("d1", "x"), 0).await.expect("enqueue");
    let id = store.due_sends(0, 1).await.expect("due")[0].id;
    store.mark_dead(id, "404 AGENT_NOT_FOUND".into(), 1).await.expect("dead");
    let dead = store.list_sends(Some(SendState::Dead), 10).await.expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("404 AGENT_NOT_FOUND"));

    assert!(store.retry_dead(id, 2).await.expect("retry"));
    assert!(!store.retry_dead(id, 2).await.expect("retry twice"), "only dead rows are retried");
    let due = store.due_sends(2, 10).await.expect("due");
    assert_eq!((due[0].id, due[0].attempts), (id, 0));

    store.mark_sent(id, "msg_1".into(), 3).await.expect("sent");
    assert!(!store.drop_send(id).await.expect("drop"), "sent rows are history");
    store.enqueue(send("d2", "x"), 4).await.expect("enqueue");
    let id2 = store.due_sends(4, 1).await.expect("due")[0].id;
    assert!(store.drop_send(id2).await.expect("drop"));
    assert_eq!(
        store.outbox_counts().await.expect("counts"),
        OutboxCounts { pending: 0, sent: 1, dead: 0 }
    );
}

#[tokio::test]
async fn recent_replies_are_counted_by_conversation_and_by_sender() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let two = vec![send("a", "alice"), send("b", "alice")];
    store
        .record_processed(
            Inbound { id: "m1", conversation_id: "conv_1", sender: "alice", seq: 1 },
            "reply",
            two,
            100,
        )
        .await
        .expect("record");
    store
        .record_processed(
            Inbound { id: "m2", conversation_id: "grp_1", sender: "alice", seq: 1 },
            "reply",
            vec![send("c", "g")],
            200,
        )
        .await
        .expect("record");
    store
        .record_processed(
            Inbound { id: "m3", conversation_id: "conv_1", sender: "alice", seq: 2 },
            "pass",
            vec![],
            300,
        )
        .await
        .expect("record");
    assert_eq!(store.recent_replies("conv_1", "alice", 0).await.expect("count"), (2, 3));
    assert_eq!(store.recent_replies("conv_1", "alice", 150).await.expect("count"), (0, 1));
    assert_eq!(store.recent_replies("conv_2", "bob", 0).await.expect("count"), (0, 0));
}

#[tokio::test]
async fn plugin_kv_is_namespaced_quota_checked_and_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let put = |plugin: &'static str, key: &'static str, value: &[u8], expected, ttl, quota| {
        let (store, value) = (store.clone(), value.to_vec());
        async move { store.kv_put(plugin, key, value, expected, ttl, quota, 1_000).await }
    };
    assert_eq!(put("a", "k", b"one", None, None, 100).await.expect("put"), KvWrite::Stored);
    assert_eq!(store.kv_get("a", "k", 1_000).await.expect("get"), Some(b"one".to_vec()));
    assert_eq!(store.kv_get("b", "k", 1_000).await.expect("get"), None, "other plugin");

    // Quota counts key and value bytes of the plugin's live entries; a refused write changes
    // nothing.
    assert_eq!(put("a", "big", &[0; 95], None, None, 100).await.expect("put"), KvWrite::OverQuota);
    assert_eq!(store.kv_get("a", "big", 1_000).await.expect("get"), None);
    // Overwriting a key does not count its old value.
    assert_eq!(put("a", "k", &[1; 90], None, None, 100).await.expect("put"), KvWrite::Stored);

    // Compare-and-set.
    let swap = put("a", "n", b"1", Some(None), None, 1_000).await.expect("swap");
    assert_eq!(swap, KvWrite::Stored);
    let stale = put("a", "n", b"2", Some(None), None, 1_000).await.expect("swap");
    assert_eq!(stale, KvWrite::Mismatch, "the key exists now");
    let fresh = put("a", "n", b"2", Some(Some(b"1".to_vec())), None, 1_000).await.expect("swap");
    assert_eq!(fresh, KvWrite::Stored);

    // Expiry: gone at its time, and its bytes no longer count.
    assert_eq!(put("b", "t", b"x", None, Some(1_500), 10).await.expect("put"), KvWrite::Stored);
    assert_eq!(store.kv_get("b", "t", 1_499).await.expect("get"), Some(b"x".to_vec()));
    assert_eq!(store.kv_get("b", "t", 1_500).await.expect("get"), None);
    let later = store.kv_put("b", "u", vec![0; 8], None, None, 10, 2_000).await.expect("put");
    assert_eq!(later, KvWrite::Stored, "the expired entry was purged before the quota check");

    // Prefixes are literal, even with LIKE wildcards in them.
    for key in ["p%1", "p_2", "px3", "q"] {
        put("c", key, b"v", None, None, 1_000).await.expect("put");
    }
    assert_eq!(store.kv_keys("c", "p%", 10, 1_000).await.expect("keys"), ["p%1"]);
    assert_eq!(store.kv_keys("c", "p", 2, 1_000).await.expect("keys"), ["p%1", "p_2"]);
    store.kv_delete("c", "q").await.expect("delete");
    assert_eq!(store.kv_keys("c", "q", 10, 1_000).await.expect("keys").len(), 0);
}

#[tokio::test]
async fn a_version_1_file_is_migrated_keeping_its_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let conn = Connection::open(dir.path().join("state.sqlite3")).expect("open");
        conn.execute_batch(&format!("{SCHEMA_V1} PRAGMA user_version = 1;")).expect("v1");
        conn.execute(
            "INSERT INTO outbox (client_msg_id, lane, request_json, origin, state,
             next_attempt_ms, created_ms, updated_ms) VALUES ('k', 'l', '{}', 'o', 'pending',
             0, 0, 0)",
            [],
        )
        .expect("row");
    }
    let store = Store::open(dir.path()).expect("migrate");
    let due = store.due_sends(1, 10).await.expect("due");
    assert_eq!(due.len(), 1);
    assert!(!due[0].vetted, "sends queued before the upgrade still go through the guards");
    store.mark_vetted(due[0].id, "{\"x\":1}".into(), 2).await.expect("vet");
    let due = store.due_sends(3, 10).await.expect("due");
    assert!(due[0].vetted && due[0].request_json == "{\"x\":1}");
    let put = store.kv_put("p", "k", b"v".to_vec(), None, None, 100, 1).await.expect("kv");
    assert_eq!(put, KvWrite::Stored);
}
