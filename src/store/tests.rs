use super::*;

fn send(key: &str, lane: &str) -> NewSend {
    NewSend {
        client_msg_id: key.into(),
        lane: lane.into(),
        request_json: format!(r#"{{"to":"{lane}","client_msg_id":"{key}"}}"#),
        origin: "test".into(),
    }
}

#[tokio::test]
async fn processing_is_recorded_once_with_its_sends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let first = store
        .record_processed("msg_1", "conv_1", 1, "reply", vec![send("r1", "bob")], 10)
        .await
        .expect("record");
    assert!(first);
    let again = store
        .record_processed("msg_1", "conv_1", 1, "reply", vec![send("r2", "bob")], 11)
        .await
        .expect("record again");
    assert!(
        !again,
        "a second record of the same message must be refused"
    );
    assert!(store.is_processed("msg_1").await.expect("query"));
    assert!(!store.is_processed("msg_2").await.expect("query"));
    let due = store.due_sends(100, 10).await.expect("due");
    assert_eq!(
        due.iter()
            .map(|s| s.client_msg_id.as_str())
            .collect::<Vec<_>>(),
        ["r1"]
    );
}

#[tokio::test]
async fn state_survives_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        store
            .set_meta("sync_cursor", "del_x".into())
            .await
            .expect("meta");
        store
            .record_processed("msg_1", "c", 1, "pass", vec![], 1)
            .await
            .expect("record");
    }
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(
        store.meta("sync_cursor").await.expect("meta"),
        Some("del_x".into())
    );
    assert!(store.is_processed("msg_1").await.expect("query"));
}

#[tokio::test]
async fn only_the_head_of_each_lane_is_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    for (key, lane) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
        assert!(store.enqueue(send(key, lane), 0).await.expect("enqueue"));
    }
    assert!(
        !store.enqueue(send("a1", "a"), 0).await.expect("dup"),
        "duplicate key is kept once"
    );
    let due = store.due_sends(0, 10).await.expect("due");
    let keys: Vec<_> = due.iter().map(|s| s.client_msg_id.as_str()).collect();
    assert_eq!(keys, ["a1", "b1"]);

    // A retry scheduled later holds its whole lane back; the other lane goes on.
    store
        .mark_retry(due[0].id, 500, "boom".into(), true, 0)
        .await
        .expect("retry");
    let due_now: Vec<_> = store
        .due_sends(0, 10)
        .await
        .expect("due")
        .into_iter()
        .map(|s| s.client_msg_id)
        .collect();
    assert_eq!(due_now, ["b1"]);
    assert_eq!(store.next_due_ms().await.expect("next"), Some(0));

    let due = store.due_sends(500, 10).await.expect("due");
    let a1 = due
        .into_iter()
        .find(|s| s.client_msg_id == "a1")
        .expect("a1 due again");
    assert_eq!((a1.client_msg_id.as_str(), a1.attempts), ("a1", 1));
    store
        .mark_sent(a1.id, "msg_9".into(), 500)
        .await
        .expect("sent");
    let mut next: Vec<_> = store
        .due_sends(500, 10)
        .await
        .expect("due")
        .into_iter()
        .map(|s| s.client_msg_id)
        .collect();
    next.sort();
    assert_eq!(next, ["a2", "b1"]);

    let due = store.due_sends(500, 10).await.expect("due");
    let b1 = due
        .into_iter()
        .find(|s| s.client_msg_id == "b1")
        .expect("b1 due");
    store
        .mark_dead(b1.id, "400 VALIDATION_ERROR".into(), 500)
        .await
        .expect("dead");
    let counts = store.outbox_counts().await.expect("counts");
    assert_eq!(
        counts,
        OutboxCounts {
            pending: 1,
            sent: 1,
            dead: 1
        }
    );
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path()).expect("open"));
    let conn = Connection::open(dir.path().join("state.sqlite3")).expect("raw open");
    conn.execute_batch("PRAGMA user_version = 99")
        .expect("bump");
    drop(conn);
    match Store::open(dir.path()) {
        Err(StoreError::TooNew { found: 99, .. }) => {}
        Err(other) => panic!("expected TooNew, got {other}"),
        Ok(_) => panic!("expected TooNew, got a store"),
    }
}
