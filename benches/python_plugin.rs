//! Python plugin benchmark: what a CPython component (`plugins/python-greeter`, built with
//! componentize-py) costs the host. It measures the component's size, the load time with an
//! empty cache (compile) and with a filled one, the first call after a load, the per-call
//! latency (a fresh store from the pre-linked instance every call, as in the daemon) and the
//! smallest memory limit at which the largest message AgentChat carries still gets an answer,
//! and how much the process's resident memory grows with the plugin loaded and called.
//!
//! Run: `scripts/build-plugins && cargo bench --bench python_plugin`. AGENTCHATD_BENCH_CALLS
//! sets the measured calls (default 500). Prints a Markdown table; nothing is written outside
//! a temporary directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentchatd::plugins::{
    ContentKind, ConversationKind, Decision, InboundMessage, PluginHost, PluginSpec,
};

/// Calls made before measuring, so the allocator pool and the page cache are warm.
const WARMUP_CALLS: usize = 20;

/// Largest message content the AgentChat API carries, in bytes.
const MAX_CONTENT_BYTES: usize = 32 * 1024;

/// Generous limits for the timing runs, so only the memory search below meets a limit.
const ROOMY_MEMORY: usize = 64 << 20;
const ROOMY_TIMEOUT: Duration = Duration::from_secs(5);

#[allow(clippy::print_stdout)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::var("AGENTCHATD_BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500)
        .clamp(1, 100_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wasm = root.join("plugins/target/python/python_greeter.wasm");
    anyhow::ensure!(wasm.exists(), "build the Python plugin first: scripts/build-plugins");
    let size_mib = std::fs::metadata(&wasm)?.len() as f64 / f64::from(1 << 20);

    // Cold: an empty cache, so the load compiles. Warm: the same cache, filled by the first.
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let (cold_load, _) = timed_load(&wasm, &cache).await?;
    let rss_before = resident_mib();
    let (warm_load, host) = timed_load(&wasm, &cache).await?;
    let rss_loaded = resident_mib();

    let greeting = message("Bonjour !");
    let started = Instant::now();
    expect_reply(&host, &greeting).await?;
    let first_call = started.elapsed();

    for _ in 0..WARMUP_CALLS {
        expect_reply(&host, &greeting).await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        expect_reply(&host, &greeting).await?;
        samples.push(started.elapsed());
    }
    samples.sort_unstable();
    let rss_called = resident_mib();

    let min_memory = smallest_memory_limit(&wasm, &cache).await?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| measure | value |");
    println!("|---|---|");
    println!("| component size | {size_mib:.1} MiB |");
    println!("| load, empty cache (compile) | {:.0} ms |", ms(cold_load));
    println!("| load, warm cache | {:.1} ms |", ms(warm_load));
    println!("| first call after a warm load | {:.2} ms |", ms(first_call));
    println!("| inbound hook, median ({calls} calls) | {:.2} ms |", ms(pct(&samples, 50)));
    println!("| inbound hook, p99 | {:.2} ms |", ms(pct(&samples, 99)));
    println!("| resident memory added by the warm load | {:.1} MiB |", rss_loaded - rss_before);
    println!("| resident memory added after the calls | {:.1} MiB |", rss_called - rss_before);
    println!(
        "| smallest memory limit for a {} KiB message | {:.2} MiB |",
        MAX_CONTENT_BYTES / 1024,
        min_memory as f64 / f64::from(1 << 20)
    );
    Ok(())
}

async fn timed_load(wasm: &Path, cache: &Path) -> anyhow::Result<(Duration, PluginHost)> {
    let spec = PluginSpec { memory_limit_bytes: ROOMY_MEMORY, ..spec(wasm) };
    let started = Instant::now();
    let host = PluginHost::load(vec![spec], Some(cache.to_path_buf())).await?;
    Ok((started.elapsed(), host))
}

fn spec(wasm: &Path) -> PluginSpec {
    PluginSpec { timeout: ROOMY_TIMEOUT, ..PluginSpec::new("python-greeter", wasm) }
}

async fn expect_reply(host: &PluginHost, msg: &InboundMessage) -> anyhow::Result<()> {
    match &host.on_message(msg).await[0].result {
        Ok(Decision::Reply(_)) => Ok(()),
        other => anyhow::bail!("expected a reply, got {other:?}"),
    }
}

/// Bisects, in WebAssembly pages, the smallest memory limit at which a greeting padded to the
/// largest message size still gets its answer. A limit below the component's initial memory
/// fails the load; one below its peak fails the call.
async fn smallest_memory_limit(wasm: &Path, cache: &Path) -> anyhow::Result<usize> {
    const PAGE: usize = 64 << 10;
    // The padding makes the text too long to be a greeting, so the call passes; what is
    // measured is the memory the message itself takes inside the guest.
    let big = message(&format!("hello {}", "é".repeat(MAX_CONTENT_BYTES / 2 - 4)));
    let works = |limit: usize| {
        let spec = PluginSpec { memory_limit_bytes: limit, ..spec(wasm) };
        let cache: PathBuf = cache.to_path_buf();
        let big = big.clone();
        async move {
            let Ok(host) = PluginHost::load(vec![spec], Some(cache)).await else {
                return false;
            };
            matches!(host.on_message(&big).await[0].result, Ok(Decision::Pass))
        }
    };

    let (mut low, mut high) = (1, ROOMY_MEMORY / PAGE);
    anyhow::ensure!(works(high * PAGE).await, "the large message fails even at 64 MiB");
    // At most log2(1024) = 10 rounds.
    while high - low > 1 {
        let mid = (low + high) / 2;
        if works(mid * PAGE).await {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(high * PAGE)
}

/// The process's resident set size from `/proc/self/status`, in MiB; 0 where that file does
/// not exist.
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    let idx = (sorted.len() * p / 100).min(sorted.len().saturating_sub(1));
    sorted.get(idx).copied().unwrap_or_default()
}

fn message(text: &str) -> InboundMessage {
    InboundMessage {
        id: "bench-1".to_string(),
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
