//! Plugin host benchmark: the inbound hook of the echo plugin per call (a fresh store from the
//! pre-linked instance every call, as in the daemon) and the time until a host is ready to
//! call plugins when the compiled component is already in the on-disk cache.
//!
//! Run: `cargo bench --bench plugins` after `scripts/build-plugins`. AGENTCHATD_BENCH_CALLS
//! sets the measured calls (default 5000). Prints a Markdown table; nothing is written.

use std::time::{Duration, Instant};

use agentchatd::plugins::{ContentKind, ConversationKind, InboundMessage, PluginHost, PluginSpec};

/// Calls made before measuring, so caches and the allocator pool are warm.
const WARMUP_CALLS: usize = 200;

#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::var("AGENTCHATD_BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000)
        .clamp(1, 1_000_000);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let echo = root.join("plugins/target/wasm32-wasip2/release/echo.wasm");
    anyhow::ensure!(echo.exists(), "build the echo plugin first: scripts/build-plugins");

    // Time to ready: the first load fills the cache, the second is the one measured.
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    drop(PluginHost::load(vec![PluginSpec::new("echo", &echo)], Some(cache.clone())).await?);
    let started = Instant::now();
    let host = PluginHost::load(vec![PluginSpec::new("echo", &echo)], Some(cache)).await?;
    let ready = started.elapsed();

    let msg = message();
    for _ in 0..WARMUP_CALLS {
        anyhow::ensure!(host.on_message(&msg).await[0].result.is_ok(), "echo failed");
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        let verdicts = host.on_message(&msg).await;
        samples.push(started.elapsed());
        anyhow::ensure!(verdicts[0].result.is_ok(), "echo failed");
    }
    samples.sort_unstable();

    println!("| measure | value |");
    println!("|---|---|");
    println!("| echo inbound hook, median ({calls} calls) | {:.1} µs |", micros(pct(&samples, 50)));
    println!("| echo inbound hook, p99 | {:.1} µs |", micros(pct(&samples, 99)));
    println!("| time to ready, warm cache | {:.2} ms |", ready.as_secs_f64() * 1e3);
    Ok(())
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    let idx = (sorted.len() * p / 100).min(sorted.len().saturating_sub(1));
    sorted.get(idx).copied().unwrap_or_default()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn message() -> InboundMessage {
    InboundMessage {
        id: "bench-1".to_string(),
        conversation_id: "conv-1".to_string(),
        conversation_kind: ConversationKind::Direct,
        sender: "alice".to_string(),
        kind: ContentKind::Text,
        text: Some("hello from the benchmark".to_string()),
        data_json: None,
        attachment_id: None,
        seq: 1,
        received_at_ms: 1_700_000_000_000,
    }
}
