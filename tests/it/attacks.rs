//! Attacks on the plugin host by a hostile guest (`plugins/hostile`): where its HTTP may go,
//! what it can do to kv, what it may send and from where, what its guards can do to a send,
//! and what its failures put in front of the operator. Every "elsewhere" is a loopback port
//! these tests bound themselves or a name under `.invalid`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentchatd::config::Transport;
use agentchatd::outbox::{parse_origin, queue_operator_send, reply_key};
use agentchatd::plugins::{
    CallError, Capabilities, Decision, FailurePolicy, Grants, HostServices, Manifest,
    OutboundMessage, PluginHost, PluginSetup, PluginSpec, PluginState, SendVerdict, Sent,
    StopReason, Trigger,
};
use agentchatd::plugins::{HTTP_MAX_RESPONSE_BYTES, Origin};
use agentchatd::store::{SendState, Store};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::harness::{Daemon, PEER, World};
use crate::support::{echo_plugin_path, text_message};

fn hostile_wasm() -> PathBuf {
    // Building the guest workspace for echo builds every plugin in it.
    echo_plugin_path().with_file_name("hostile.wasm")
}

fn manifest(id: &str, hooks: &[&str]) -> Manifest {
    let text = format!(
        "id = {id:?}\nname = \"Hostile\"\nversion = \"0.1.0\"\napi = \"agentchat:plugin@0.1.0\"\n\
         component = {:?}\nhooks = {hooks:?}\n",
        hostile_wasm().display().to_string(),
    );
    Manifest::parse(&text, Path::new("/nonexistent/agentchat-plugin.toml")).expect("manifest")
}

/// The hostile plugin as `id` with `config`, `grants` and the given hooks.
fn hostile(id: &str, config: &Value, grants: Grants, hooks: &[&str]) -> PluginSetup {
    let spec =
        PluginSpec { timeout: Duration::from_secs(2), ..PluginSpec::new(id, hostile_wasm()) };
    spec.with_manifest(manifest(id, hooks)).with_config(config.to_string()).with_all_grants(grants)
}

fn grants(capabilities: Capabilities) -> Grants {
    Grants { capabilities, ..Grants::default() }
}

fn http_grant(hosts: &[String]) -> Grants {
    grants(Capabilities { http_allowed_hosts: hosts.to_vec(), ..Capabilities::default() })
}

fn services(store: &Store) -> HostServices {
    HostServices {
        store: Some(store.clone()),
        outbox_wake: Some(Arc::new(Notify::new())),
        ..HostServices::default()
    }
}

async fn load(setups: Vec<PluginSetup>, services: HostServices) -> PluginHost {
    match PluginHost::load_with(setups, None, services).await {
        Ok(host) => host,
        Err(err) => panic!("load failed: {err}"),
    }
}

/// Runs `cmd` in the first plugin's `on-message` and returns the outcome it replied with.
async fn ask(host: &PluginHost, cmd: &Value) -> Value {
    let verdicts = host.on_message(&text_message(&cmd.to_string())).await;
    match &verdicts[0].result {
        Ok(Decision::Reply(drafts)) => {
            serde_json::from_str(drafts[0].text.as_deref().expect("text")).expect("json outcome")
        }
        other => panic!("{cmd}: expected a reply, got {other:?}"),
    }
}

fn err_of(outcome: &Value) -> String {
    outcome.get("err").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| {
        panic!("expected an error, got {outcome}");
    })
}

/// A loopback HTTP server that answers each request with what `respond` makes of its head
/// (`None`: never answers), counting the requests it read.
struct Scripted {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

type Respond = dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync;

impl Scripted {
    async fn start(respond: Box<Respond>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (hits, heads) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
        let respond: Arc<Respond> = Arc::from(respond);
        let (h, hd) = (hits.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (respond, hits, heads) = (respond.clone(), h.clone(), hd.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    hits.fetch_add(1, Ordering::SeqCst);
                    heads.lock().expect("heads").push(head.clone());
                    match respond(&head) {
                        Some(bytes) => {
                            let _ = conn.write_all(&bytes).await;
                            let _ = conn.shutdown().await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(120)).await,
                    }
                });
            }
        });
        Scripted { addr, hits, heads }
    }

    fn grant(&self) -> String {
        self.addr.to_string()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn redirect(location: &str) -> Vec<u8> {
    format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n").into_bytes()
}

fn ok(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

fn path_of(head: &str) -> String {
    head.split_whitespace().nth(1).unwrap_or("").to_owned()
}

fn fetch(url: &str) -> Value {
    json!({"op": "http", "url": url})
}

// === HTTP ===

#[tokio::test]
async fn redirects_out_of_the_grant_are_refused_in_every_form() {
    let elsewhere = Scripted::start(Box::new(|_| Some(ok("leaked")))).await;
    let other = elsewhere.addr.port();
    let targets: Vec<(&str, String)> = vec![
        ("/absolute", format!("http://127.0.0.1:{other}/")),
        ("/scheme-relative", format!("//127.0.0.1:{other}/x")),
        ("/userinfo", format!("http://127.0.0.1@127.0.0.1:{other}/")),
        ("/localhost", format!("http://localhost:{other}/")),
        ("/trailing-dot", format!("http://127.0.0.1.:{other}/")),
        ("/short-ip", format!("http://127.1:{other}/")),
        ("/mapped-v6", format!("http://[::ffff:127.0.0.1]:{other}/")),
        ("/https", format!("https://127.0.0.1:{other}/")),
        ("/invalid-name", "http://not-granted.invalid/".to_owned()),
    ];
    let table = targets.clone();
    let granted = Scripted::start(Box::new(move |head| {
        let path = path_of(head);
        if path == "/inside" {
            return Some(redirect("/final"));
        }
        if path == "/final" {
            return Some(ok("fine"));
        }
        if path == "/other-scheme" {
            return Some(redirect("file:///etc/passwd"));
        }
        table.iter().find(|(p, _)| *p == path).map(|(_, to)| redirect(to))
    }))
    .await;
    let host = load(
        vec![hostile("hostile", &json!({}), http_grant(&[granted.grant()]), &["inbound"])],
        HostServices::default(),
    )
    .await;

    // A redirect inside the grant is followed, so the refusals below are the grant's doing.
    let inside = ask(&host, &fetch(&format!("http://{}/inside", granted.addr))).await;
    assert_eq!(inside["status"], 200, "{inside}");
    assert_eq!(inside["body"], "fine");
    assert!(inside["url"].as_str().is_some_and(|u| u.ends_with("/final")), "{inside}");

    for (path, to) in &targets {
        let outcome = ask(&host, &fetch(&format!("http://{}{path}", granted.addr))).await;
        let err = err_of(&outcome);
        assert!(err.starts_with("NotGranted"), "redirect to {to}: {err}");
    }
    assert_eq!(elsewhere.hits(), 0, "no redirect reached the port that is not granted");

    // A redirect to another scheme is not followed at all: the plugin gets the 302 itself.
    let file = ask(&host, &fetch(&format!("http://{}/other-scheme", granted.addr))).await;
    assert_eq!(file["status"], 302, "{file}");
}

#[tokio::test]
async fn odd_url_forms_never_reach_a_port_that_is_not_granted() {
    let granted = Scripted::start(Box::new(|_| Some(ok("granted")))).await;
    let elsewhere = Scripted::start(Box::new(|_| Some(ok("leaked")))).await;
    let (g, o) = (granted.addr.port(), elsewhere.addr.port());
    let host = load(
        vec![hostile("hostile", &json!({}), http_grant(&[granted.grant()]), &["inbound"])],
        HostServices::default(),
    )
    .await;

    for url in [
        format!("http://127.1:{o}/"),
        format!("http://0x7f000001:{o}/"),
        format!("http://2130706433:{o}/"),
        format!("HTTP://127.0.0.1:{o}/"),
        format!("http://127.0.0.1:{g}@127.0.0.1:{o}/"),
        format!("http://127.0.0.1.:{o}/"),
        format!("http://%31%32%37.0.0.1:{o}/"),
        format!("http://[::ffff:7f00:1]:{o}/"),
        format!("http://localhost:{g}/"),
        "http://granted.invalid/".to_owned(),
    ] {
        let err = err_of(&ask(&host, &fetch(&url)).await);
        assert!(err.starts_with("NotGranted"), "{url}: {err}");
    }
    // Unusual spellings of the granted host itself are the granted host.
    for url in [format!("HTTP://127.0.0.1:{g}/a"), format!("http://127.1:{g}/b")] {
        let outcome = ask(&host, &fetch(&url)).await;
        assert_eq!(outcome["status"], 200, "{url}: {outcome}");
    }
    assert_eq!(elsewhere.hits(), 0);
    assert_eq!(granted.hits(), 2);
}

#[tokio::test]
async fn the_host_header_cannot_be_set_in_any_spelling() {
    let granted = Scripted::start(Box::new(|_| Some(ok("granted")))).await;
    let host = load(
        vec![hostile("hostile", &json!({}), http_grant(&[granted.grant()]), &["inbound"])],
        HostServices::default(),
    )
    .await;
    for name in ["Host", "HOST", "hOsT"] {
        let cmd = json!({
            "op": "http",
            "url": format!("http://{}/", granted.addr),
            "headers": [[name, "not-granted.invalid"]],
        });
        let err = err_of(&ask(&host, &cmd).await);
        assert!(err.starts_with("Invalid"), "{name}: {err}");
    }
    assert_eq!(granted.hits(), 0, "nothing was sent");

    // Other headers go through, and the Host sent is the URL's.
    let cmd = json!({
        "op": "http",
        "url": format!("http://{}/", granted.addr),
        "headers": [["x-probe", "1"]],
    });
    assert_eq!(ask(&host, &cmd).await["status"], 200);
    let head = granted.heads.lock().expect("heads")[0].to_ascii_lowercase();
    assert!(head.contains(&format!("host: {}", granted.addr)), "{head}");
}

fn chunked(total: usize) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b'x'; 60_000];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&chunk[..n]);
        out.extend_from_slice(b"\r\n");
        left -= n;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn a_chunked_body_over_the_cap_is_too_large_and_one_at_the_cap_is_not() {
    let server = Scripted::start(Box::new(|head| {
        let total = if path_of(head) == "/big" {
            HTTP_MAX_RESPONSE_BYTES + 1
        } else {
            HTTP_MAX_RESPONSE_BYTES
        };
        Some(chunked(total))
    }))
    .await;
    let host = load(
        vec![hostile("hostile", &json!({}), http_grant(&[server.grant()]), &["inbound"])],
        HostServices::default(),
    )
    .await;

    let at_cap = ask(&host, &fetch(&format!("http://{}/cap", server.addr))).await;
    assert_eq!(at_cap["len"], HTTP_MAX_RESPONSE_BYTES, "{at_cap}");
    let over = ask(&host, &fetch(&format!("http://{}/big", server.addr))).await;
    assert_eq!(err_of(&over), "TooLarge");
}

#[tokio::test]
async fn an_http_timeout_past_the_hook_budget_is_cut_to_what_is_left_of_it() {
    let silent = Scripted::start(Box::new(|_| None)).await;
    let spec = PluginSpec {
        timeout: Duration::from_millis(400),
        ..PluginSpec::new("hostile", hostile_wasm())
    };
    let setup = spec
        .with_manifest(manifest("hostile", &["inbound"]))
        .with_all_grants(http_grant(&[silent.grant()]));
    let host = load(vec![setup], HostServices::default()).await;

    // Had the host waited the 60 s asked for, the call itself would have been cut off
    // (CallError::Timeout) instead of the plugin seeing its request time out.
    let cmd =
        json!({"op": "http", "url": format!("http://{}/", silent.addr), "timeout_ms": 60_000});
    assert_eq!(err_of(&ask(&host, &cmd).await), "Timeout");
}

// === kv ===

fn kv_grant(quota: u64) -> Grants {
    Grants { kv_max_bytes: quota, ..grants(Capabilities { kv: true, ..Capabilities::default() }) }
}

#[tokio::test]
async fn kv_limits_hold_against_big_keys_many_keys_and_other_namespaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let host =
        load(vec![hostile("hostile", &json!({}), kv_grant(1024), &["inbound"])], services(&store))
            .await;

    let big_key = json!({"op": "kv_set", "key": "k", "repeat": 257});
    assert_eq!(err_of(&ask(&host, &big_key).await), "TooLarge");
    let big_value = json!({"op": "kv_set", "key": "k", "value_len": 64 * 1024 + 1});
    assert_eq!(err_of(&ask(&host, &big_value).await), "TooLarge");
    let big_prefix = json!({"op": "kv_list", "prefix": "p".repeat(257)});
    assert_eq!(err_of(&ask(&host, &big_prefix).await), "TooLarge");

    // Many small entries still add up to the quota: 50 keys of 2-3 bytes with 20-byte values
    // fit 1024 bytes only partly.
    let many = json!({"op": "kv_set", "key": "m", "value_len": 20, "count": 100});
    let outcome = ask(&host, &many).await;
    assert_eq!(outcome["err"], "QuotaExceeded", "{outcome}");
    let stored = outcome["stored"].as_u64().expect("stored");
    assert!((40..=50).contains(&stored), "{outcome}");
    // Expired entries free their bytes, but live ones with a long TTL count in full.
    let ttl = json!({"op": "kv_set", "key": "t", "value_len": 900, "ttl_ms": 3_600_000});
    assert_eq!(err_of(&ask(&host, &ttl).await), "QuotaExceeded");

    // Another plugin on the same store sees none of it, with or without a prefix.
    let mine = ask(&host, &json!({"op": "kv_list", "prefix": "m"})).await;
    assert_eq!(mine["keys"].as_array().map(Vec::len), Some(usize::try_from(stored).expect("n")));
    let other =
        load(vec![hostile("other", &json!({}), kv_grant(1024), &["inbound"])], services(&store))
            .await;
    for prefix in ["", "m", "%", "hostile"] {
        let listed = ask(&other, &json!({"op": "kv_list", "prefix": prefix})).await;
        assert_eq!(listed, json!({"keys": []}), "prefix {prefix:?}");
    }
}

// === messaging ===

fn send_grant(per_minute: u32) -> Grants {
    Grants {
        send_per_minute: per_minute,
        ..grants(Capabilities { send: true, kv: true, ..Capabilities::default() })
    }
}

async fn pending(store: &Store) -> Vec<agentchatd::store::SendRow> {
    store.list_sends(Some(SendState::Pending), 500).await.expect("list")
}

#[tokio::test]
async fn sends_need_the_grant_and_stop_at_the_per_minute_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let ungranted = load(
        vec![hostile("hostile", &json!({}), grants(Capabilities::default()), &["inbound"])],
        services(&store),
    )
    .await;
    let send = json!({"op": "send", "to": "bob", "text": "hi", "count": 5});
    assert_eq!(ask(&ungranted, &send).await, json!(vec!["err:NotGranted"; 5]));
    assert!(pending(&store).await.is_empty());

    let shared = services(&store);
    let setup = || vec![hostile("hostile", &json!({}), send_grant(3), &["inbound"])];
    let host = load(setup(), shared.clone()).await;
    let outcome = ask(&host, &send).await;
    let outcomes: Vec<&str> =
        outcome.as_array().expect("list").iter().filter_map(Value::as_str).collect();
    assert!(outcomes[..3].iter().all(|o| o.starts_with("ok:acp-")), "{outcomes:?}");
    assert!(outcomes[3..].iter().all(|o| o.starts_with("err:OverLimit(")), "{outcomes:?}");
    // The cap is the plugin's, not the call's: a second message gets no fresh allowance.
    let again = ask(&host, &json!({"op": "send", "to": "bob", "text": "hi"})).await;
    assert!(again[0].as_str().is_some_and(|o| o.starts_with("err:OverLimit(")), "{again}");
    // Nor does a reload: the daemon hands the same services to the new plugin set.
    let reloaded = load(setup(), shared).await;
    let again = ask(&reloaded, &json!({"op": "send", "to": "bob", "text": "hi"})).await;
    assert!(again[0].as_str().is_some_and(|o| o.starts_with("err:OverLimit(")), "{again}");
    assert_eq!(pending(&store).await.len(), 3);
}

#[tokio::test]
async fn malformed_sends_are_refused_and_queue_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let host =
        load(vec![hostile("hostile", &json!({}), send_grant(100), &["inbound"])], services(&store))
            .await;
    for cmd in [
        json!({"op": "send", "conversation_id": "conv-1", "text": "direct by id"}),
        json!({"op": "send", "conversation_id": "dm_alice", "text": "direct by id"}),
        json!({"op": "send", "to": "bob", "conversation_id": "grp_1", "text": "both"}),
        json!({"op": "send", "text": "neither"}),
        json!({"op": "send", "to": "@", "text": "empty handle"}),
        json!({"op": "send", "to": "bob"}),
        json!({"op": "send", "to": "bob", "text": "x", "repeat": 32 * 1024 + 1}),
        // Fits the text limit but not the platform's JSON size once escaped.
        json!({"op": "send", "to": "bob", "text": "\"", "repeat": 20_000}),
        json!({"op": "send", "to": "bob", "text": "k", "key": "k".repeat(129)}),
        json!({"op": "send", "to": "bob", "text": "k", "key": ""}),
    ] {
        let outcome = ask(&host, &cmd).await;
        assert!(
            outcome[0].as_str().is_some_and(|o| o.starts_with("err:Invalid(")),
            "{cmd}: {outcome}"
        );
    }
    assert!(pending(&store).await.is_empty());
}

#[tokio::test]
async fn a_send_key_cannot_forge_an_origin_or_take_another_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let host =
        load(vec![hostile("hostile", &json!({}), send_grant(100), &["inbound"])], services(&store))
            .await;
    // A key shaped like the rest of an origin, sent twice: one row, and its origin still
    // names this plugin at hop 1.
    let forged = "0:other:x";
    let cmd = json!({"op": "send", "to": "bob", "text": "t", "key": forged, "count": 2});
    let outcome = ask(&host, &cmd).await;
    assert_eq!(outcome[0], outcome[1], "the same key within an event sends once");
    let rows = pending(&store).await;
    assert_eq!(rows.len(), 1);
    let origin = parse_origin(&rows[0].origin);
    assert_eq!(
        origin,
        Origin { plugin_id: Some("hostile".into()), trigger: Trigger::Inbound, hops: 1 }
    );
    // Keys never meet the reply keys of the same message, whatever the plugin names its key.
    let message = text_message("");
    assert_ne!(rows[0].client_msg_id, reply_key(&message.id, "hostile", 0));
    assert!(rows[0].client_msg_id.starts_with("acp-"));
}

fn outbound(text: &str) -> OutboundMessage {
    OutboundMessage {
        key: "acd-test".into(),
        to: Some("bob".into()),
        conversation_id: None,
        text: Some(text.into()),
        data_json: None,
    }
}

fn operator() -> Origin {
    Origin { plugin_id: None, trigger: Trigger::Operator, hops: 0 }
}

#[tokio::test]
async fn before_send_and_stop_cannot_send_and_after_send_stops_at_two_hops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let send = json!({"op": "send", "to": "bob", "text": "again"});
    let config = json!({"before-send": send, "stop": send, "after-send": send});
    let host = load(
        vec![hostile("hostile", &config, send_grant(100), &["lifecycle", "outbound"])],
        services(&store),
    )
    .await;

    match host.before_send(&outbound("hi"), &operator()).await {
        SendVerdict::Cancel { reason, .. } => {
            assert_eq!(reason, r#"["err:LoopDetected"]"#);
        }
        other => panic!("the probe cancels with the send's outcome, got {other:?}"),
    }
    host.stop(StopReason::Shutdown).await;
    let stop = store.kv_get("hostile", "stop", 0).await.expect("get").expect("stop ran");
    assert_eq!(String::from_utf8_lossy(&stop), r#"["err:LoopDetected"]"#);

    let sent = |hops| {
        let origin = Origin { plugin_id: Some("x".into()), trigger: Trigger::PluginSend, hops };
        // Each observed send has its own key, so the sends made for it are not one event.
        let message = OutboundMessage { key: format!("acp-{hops}"), ..outbound("hi") };
        let sent = Sent { message, message_id: format!("m{hops}"), sent_at_ms: 1 };
        (sent, origin)
    };
    for (hops, allowed) in [(0, true), (1, true), (2, false), (u8::MAX, false)] {
        let (s, origin) = sent(hops);
        host.after_send(&s, &origin).await;
        let seen = store.kv_get("hostile", "after-send", 0).await.expect("get").expect("ran");
        let seen = String::from_utf8_lossy(&seen).into_owned();
        assert_eq!(seen.contains("ok:acp-"), allowed, "after a hop-{hops} send: {seen}");
    }
    let rows = pending(&store).await;
    assert_eq!(rows.len(), 2);
    let mut hops: Vec<u8> = rows.iter().map(|r| parse_origin(&r.origin).hops).collect();
    hops.sort_unstable();
    assert_eq!(hops, [1, 2]);
}

// === before-send ===

#[tokio::test]
async fn a_rewrite_past_the_limits_is_bad_output_kept_when_open_and_cancelled_when_closed() {
    for rewrite in [
        json!({"op": "rewrite", "text": "x", "repeat": 32 * 1024 + 1}),
        json!({"op": "rewrite", "data_json": "[1]"}),
        json!({"op": "rewrite", "data_json": "{not json"}),
        json!({"op": "rewrite"}),
        json!({"op": "trap"}),
    ] {
        let config = json!({"before-send": rewrite});
        let setup = |policy| {
            hostile("hostile", &config, Grants::default(), &["outbound"])
                .with_failure_policy(policy)
        };
        let open = load(vec![setup(FailurePolicy::Open)], HostServices::default()).await;
        assert_eq!(open.before_send(&outbound("hi"), &operator()).await, SendVerdict::Keep);
        let closed = load(vec![setup(FailurePolicy::Closed)], HostServices::default()).await;
        match closed.before_send(&outbound("hi"), &operator()).await {
            SendVerdict::Cancel { plugin_id, reason } => {
                assert_eq!(plugin_id, "hostile");
                assert!(reason.contains("fails closed"), "{reason}");
            }
            other => panic!("{rewrite}: a closed guard that failed must cancel, got {other:?}"),
        }
    }
}

// === what a plugin's words do to logs, the queue and the operator's screen ===

/// Text full of what a terminal or a log reader acts on: ANSI escapes, line breaks, NUL.
const NASTY: &str = "\u{1b}[2J\u{1b}[31mred\r\nFAKE LOG LINE\u{0}\u{7}";

fn assert_clean(what: &str, text: &str, max: usize) {
    assert!(text.len() <= max, "{what}: {} bytes, more than {max}", text.len());
    assert!(!text.chars().any(char::is_control), "{what} carries control characters: {text:?}");
}

#[tokio::test]
async fn a_plugins_error_text_is_cut_and_stripped_of_control_characters() {
    let error = json!({"op": "error", "detail": NASTY, "repeat": 200_000});
    let host = load(
        vec![hostile("hostile", &json!({}), Grants::default(), &["inbound"])],
        HostServices::default(),
    )
    .await;
    let verdicts = host.on_message(&text_message(&error.to_string())).await;
    match &verdicts[0].result {
        Err(err @ CallError::PluginError(_)) => {
            // This text is logged at warn on every call: it must not flood or forge the log.
            assert_clean("the error", &err.to_string(), 1024);
        }
        other => panic!("expected the plugin's error, got {other:?}"),
    }

    // A start that fails with it: the reason is shown by `agentchatd status`.
    let config = json!({"start": error});
    let host = load(
        vec![hostile("hostile", &config, Grants::default(), &["lifecycle"])],
        HostServices::default(),
    )
    .await;
    assert_eq!(host.start("me", agentchatd::plugins::StartReason::Boot).await, ["hostile"]);
    match &host.status()[0].state {
        PluginState::Failed { reason } => assert_clean("the start failure", reason, 1024),
        other => panic!("expected a failed start, got {other:?}"),
    }
}

#[tokio::test]
async fn cancel_reasons_are_cut_and_stripped_of_control_characters() {
    let cancel = json!({"op": "cancel", "reason": NASTY, "repeat": 10_000});
    let error = json!({"op": "error", "detail": NASTY, "repeat": 200_000});
    for (config, policy) in [
        (json!({"before-send": cancel}), FailurePolicy::Open),
        (json!({"before-send": error}), FailurePolicy::Closed),
    ] {
        let setup = hostile("hostile", &config, Grants::default(), &["outbound"])
            .with_failure_policy(policy);
        let host = load(vec![setup], HostServices::default()).await;
        match host.before_send(&outbound("hi"), &operator()).await {
            // The reason is stored with the dead letter and printed by `outbox list`.
            SendVerdict::Cancel { reason, .. } => assert_clean("the reason", &reason, 1024),
            other => panic!("{config}: expected a cancel, got {other:?}"),
        }
    }
}

/// Polls `check` every 25 ms for at most 20 s.
async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..800 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("waited 20 s for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_send_goes_through_the_guards_and_its_cancel_prints_safely() {
    let world = World::start().await;
    let mut guard = crate::harness::plugin("hostile", hostile_wasm());
    guard.manifest = Some(manifest("hostile", &["outbound"]));
    guard.config_json = json!({"before-send": {"op": "cancel", "reason": NASTY}}).to_string();
    let config = world.config(Transport::Poll, vec![guard]);
    let store = Store::open(&config.state_dir).expect("store");
    queue_operator_send(&store, PEER, "the operator speaks", "op-1").await.expect("queue");
    let daemon = Daemon::spawn(config.clone());

    wait_until("the cancel", || async {
        !store.list_sends(Some(SendState::Dead), 10).await.expect("list").is_empty()
    })
    .await;
    daemon.stop().await;
    let dead = store.list_sends(Some(SendState::Dead), 10).await.expect("list");
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(reason.starts_with("cancelled by plugin `hostile`"), "{reason}");
    assert_eq!(dead[0].message_id, None, "never sent");
    let listing = agentchatd::admin::list(&config, None, 10).await.expect("list");
    assert_clean("the listing", &listing.replace('\n', " "), 4096);
}

// === replies stay in their conversation ===

#[tokio::test]
async fn a_reply_cannot_post_into_another_group_without_the_send_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let host = load(
        vec![hostile("hostile", &json!({}), grants(Capabilities::default()), &["inbound"])],
        services(&store),
    )
    .await;
    let processor = agentchatd::inbox::Processor::new(
        store.clone(),
        Arc::new(host),
        "me".into(),
        Arc::new(Notify::new()),
        Arc::new(agentchatd::ops::metrics::Metrics::new()),
    );
    let cmd = json!({"op": "reply", "text": "spam", "conversation_id": "grp_elsewhere"});
    let message: agentchatd::client::Message = serde_json::from_value(json!({
        "id": "msg_1",
        "conversation_id": "conv_alice",
        "sender": "alice",
        "seq": 1,
        "type": "text",
        "content": {"text": cmd.to_string()},
    }))
    .expect("message");
    processor.handle(&message).await.expect("handled");
    let rows = pending(&store).await;
    assert!(
        rows.iter().all(|r| !r.request_json.contains("grp_elsewhere")),
        "a plugin without `send` queued into another group: {rows:?}"
    );
}
